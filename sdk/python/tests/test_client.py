"""tollgate_sdk against a real sidecar: checks, batches, metering ids, entitlements, upgrade
hints, and the fallback when the sidecar cannot be reached. hooli is on the free plan with no
expiry, so these answers do not depend on the date."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List

import pytest

import tollgate_sdk
from tollgate_sdk import CheckRequest, Client, Fallback, TollgateError, Upgrade, new_event_id

from conftest import free_port

# The example catalog's checkout link template, before its query.
CHECKOUT = "https://billing.planwise.example/checkout"


def test_check_allows_and_denies_with_a_reason_and_an_upgrade_hint(sidecar_url: str) -> None:
    client = Client(sidecar_url)
    allowed = client.check(CheckRequest("hooli", "reports"))
    assert allowed.allow and allowed.reason == "ok" and not allowed.fallback
    assert isinstance(allowed.revision, int)
    denied = client.check(CheckRequest("hooli", "sso"))
    assert not denied.allow and denied.reason == "not_entitled"
    assert denied.upgrade == Upgrade("plan", "business", f"{CHECKOUT}?account=hooli&plan=business")
    assert denied.upgrade.hint() == "plan:business"


def test_batch_answers_in_order(sidecar_url: str) -> None:
    results = Client(sidecar_url).batch(
        [CheckRequest("hooli", "reports"), CheckRequest("hooli", "reports", user="nobody"), CheckRequest("nobody", "reports")]
    )
    assert [result.reason for result in results] == ["ok", "unknown_user", "unknown_account"]


def test_meter_generates_ids_and_a_replayed_id_counts_once(sidecar_url: str) -> None:
    client = Client(sidecar_url)
    first = client.meter("hooli", "api_calls", 2)
    assert len(first.id) == 32 and int(first.id, 16) >= 0
    assert first.accepted and not first.duplicate
    second = client.meter("hooli", "api_calls", 2)
    assert second.id != first.id
    replay = client.meter("hooli", "api_calls", 2, id=first.id)
    assert replay.duplicate and replay.used == first.used
    with pytest.raises(TollgateError) as raised:
        client.meter("hooli", "nothing", 1)
    assert raised.value.status == 400 and raised.value.code == "unknown_meter"
    assert new_event_id() != new_event_id()


def test_entitlements_list_features_with_upgrade_hints(sidecar_url: str) -> None:
    client = Client(sidecar_url)
    view = client.entitlements("hooli")
    assert view.account == "hooli"
    sso = next(feature for feature in view.features if feature.feature == "sso")
    assert not sso.allow and sso.upgrade == Upgrade("plan", "business", f"{CHECKOUT}?account=hooli&plan=business")
    analytics = next(feature for feature in view.features if feature.feature == "advanced_analytics")
    assert analytics.upgrade == Upgrade("addon", "analytics_pack", f"{CHECKOUT}?account=hooli&addon=analytics_pack")
    with pytest.raises(TollgateError) as raised:
        client.entitlements("nobody")
    assert raised.value.status == 404 and raised.value.code == "unknown_account"


def test_an_unreachable_sidecar_fails_closed_by_default_and_as_configured_otherwise() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    denied = Client(url, retries=1, retry_backoff=0.001).check(CheckRequest("hooli", "reports"))
    assert not denied.allow and denied.fallback and denied.reason == "unavailable" and denied.revision is None
    allowed = Client(url, retries=0, fallback=Fallback.ALLOW).batch([CheckRequest("a", "b")])
    assert [(decision.allow, decision.fallback) for decision in allowed] == [(True, True)]
    with pytest.raises(TollgateError) as raised:
        Client(url, retries=0, fallback=Fallback.ERROR).check(CheckRequest("a", "b"))
    assert raised.value.unavailable
    with pytest.raises(TollgateError):
        Client(url, retries=0, fallback=Fallback.ALLOW).meter("a", "b", 1)  # metering never falls back
    with pytest.raises(TollgateError):
        Client("ftp://x")


def test_a_sidecar_that_does_not_answer_times_out_into_the_fallback() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        client = Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.05, retries=0)
        assert client.check(CheckRequest("hooli", "reports")).fallback
        with pytest.raises(TollgateError) as raised:
            client.entitlements("hooli")
        assert raised.value.code == "timeout"
    finally:
        silent.close()


def test_a_retried_meter_event_keeps_its_id() -> None:
    ids: List[str] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            ids.append(body["id"])
            if len(ids) == 1:
                status, answer = 503, {"error": {"code": "usage_log_unavailable", "message": "try again"}}
            else:
                answer = {"accepted": True, "duplicate": False, "used": 1, "period_start": "2026-01-01T00:00:00Z", "durable": True, "revision": 1}
                status = 200
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = Client(f"http://127.0.0.1:{server.server_address[1]}", retries=2, retry_backoff=0.001).meter("hooli", "api_calls", 1)
        assert len(ids) == 2 and ids[0] == ids[1] == result.id
    finally:
        server.shutdown()


def test_the_version_is_0_2_0() -> None:
    assert tollgate_sdk.__version__ == "0.2.0"
