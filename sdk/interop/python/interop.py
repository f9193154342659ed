"""The official OpenFeature Python SDK with its OFREP provider against a real Tollgate sidecar:
every scenario in ../expectations.json must resolve as written there.
Usage: interop.py BASE_URL"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext


def text(value: object) -> object:
    # Reason and ErrorCode are str enums in the SDK; compare their plain values.
    return getattr(value, "value", value)


def main() -> int:
    base_url = sys.argv[1]
    scenarios = json.loads((Path(__file__).resolve().parent.parent / "expectations.json").read_text())
    api.set_provider(OFREPProvider(base_url=base_url))
    client = api.get_client()
    passed = failed = 0
    for scenario in scenarios:
        context = dict(scenario["context"])
        targeting_key = context.pop("targetingKey", None)
        details = client.get_boolean_details(scenario["flag"], scenario["default"], EvaluationContext(targeting_key, context))
        found = {
            "value": details.value,
            "reason": text(details.reason),
            "errorCode": text(details.error_code),
            "metadata": {key: details.flag_metadata.get(key) for key in scenario["metadata"]},
        }
        expected = {key: scenario[key] for key in ("value", "reason", "errorCode", "metadata")}
        if found == expected:
            passed += 1
        else:
            failed += 1
            print(f"FAIL python / {scenario['name']}: expected {expected}, got {found}")
    print(f"python ofrep interop: {passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
