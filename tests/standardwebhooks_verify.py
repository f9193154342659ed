"""Verifies webhook deliveries captured by tests/control_plane_webhooks.rs with the reference
Python library of Standard Webhooks (`pip install standardwebhooks`).

Usage: standardwebhooks_verify.py FILE, where FILE holds
{"now": UNIX_SECONDS, "deliveries": [{"secret": "whsec_...", "headers": {...}, "body": "..."}]}.
The library checks timestamps against its own clock (5 minutes either way); the tests run the
control plane on a pinned clock, so the library's clock is pinned to `now` too. Every delivery
must verify, and the same delivery with its body or its webhook-id changed must not. Prints
the verified bodies as a JSON list; exits 1 naming the first delivery that fails.
"""

import json
import sys
from datetime import datetime, timezone

import standardwebhooks.webhooks as webhooks
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as file:
        captured = json.load(file)
    now = datetime.fromtimestamp(captured["now"], tz=timezone.utc)

    class PinnedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return now

    webhooks.datetime = PinnedDatetime
    verified = []
    for idx, delivery in enumerate(captured["deliveries"]):
        hook = Webhook(delivery["secret"])
        try:
            verified.append(hook.verify(delivery["body"], delivery["headers"]))
        except WebhookVerificationError as error:
            print(f"delivery {idx} does not verify: {error}", file=sys.stderr)
            return 1
        tampered = [(delivery["body"] + " ", delivery["headers"]),
                    (delivery["body"], {**delivery["headers"], "webhook-id": delivery["headers"]["webhook-id"] + "x"})]
        for body, headers in tampered:
            try:
                hook.verify(body, headers)
            except WebhookVerificationError:
                continue
            print(f"delivery {idx} verifies after tampering", file=sys.stderr)
            return 1
    print(json.dumps(verified))
    return 0


if __name__ == "__main__":
    sys.exit(main())
