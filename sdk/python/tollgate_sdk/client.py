"""The client and its typed answers. HTTP with a timeout per attempt and retries with
doubling waits for answers that say the sidecar is unavailable; nothing here decides."""

from __future__ import annotations

import enum
import json
import secrets
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, TypeVar

T = TypeVar("T")

#: Every reason code; ``ok`` is the only allow, ``unavailable`` marks a fallback.
REASONS = (
    "ok",
    "unknown_account",
    "account_suspended",
    "unknown_feature",
    "license_expired",
    "not_entitled",
    "not_in_rollout",
    "region_blocked",
    "unknown_user",
    "no_seat",
    "role_forbidden",
    "device_not_activated",
    "quota_exceeded",
    "unavailable",
)


class Fallback(str, enum.Enum):
    """What ``check`` and ``batch`` answer when the sidecar cannot be asked."""

    DENY = "deny"  # fail closed (the default)
    ALLOW = "allow"
    ERROR = "error"


class TollgateError(Exception):
    """An error answer or a transport failure; ``unavailable`` says whether a retry may help."""

    def __init__(self, message: str, code: str, status: Optional[int] = None, unavailable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.unavailable = unavailable


@dataclass(frozen=True)
class CheckRequest:
    account: str
    feature: str
    user: Optional[str] = None
    region: Optional[str] = None
    device: Optional[str] = None
    amount: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True)
class Upgrade:
    """The cheapest purchase that would turn a denial into an allow."""

    kind: str  # "plan" or "addon"
    id: str
    # Where the account buys it: the catalog's `checkout_url` with the account and the plan's
    # or add-on's id filled in; None when the plan or add-on has no checkout link.
    checkout_url: Optional[str] = None

    def hint(self) -> str:
        return f"{self.kind}:{self.id}"

    @staticmethod
    def from_json(wire: Optional[Dict[str, Any]]) -> Optional["Upgrade"]:
        if not wire:
            return None
        return Upgrade(wire["kind"], wire["id"], wire.get("checkout_url"))


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str
    revision: Optional[int] = None
    license: Optional[str] = None
    meter: Optional[str] = None
    limit: Optional[int] = None
    used: Optional[int] = None
    remaining: Optional[int] = None
    reset_at: Optional[str] = None
    expires_at: Optional[str] = None
    grace: bool = False
    overage: bool = False
    stale: bool = False
    upgrade: Optional[Upgrade] = None
    fallback: bool = False

    @staticmethod
    def from_json(wire: Dict[str, Any]) -> "Decision":
        reason = wire.get("reason")
        if reason not in REASONS:
            raise TollgateError(f"the answer names unknown reason `{reason}`", "unknown_reason")
        return Decision(
            allow=bool(wire["allow"]),
            reason=str(reason),
            revision=wire.get("revision"),
            license=wire.get("license"),
            meter=wire.get("meter"),
            limit=wire.get("limit"),
            used=wire.get("used"),
            remaining=wire.get("remaining"),
            reset_at=wire.get("reset_at"),
            expires_at=wire.get("expires_at"),
            grace=bool(wire.get("grace", False)),
            overage=bool(wire.get("overage", False)),
            stale=bool(wire.get("stale", False)),
            upgrade=Upgrade.from_json(wire.get("upgrade")),
        )


@dataclass(frozen=True)
class MeterResult:
    accepted: bool
    duplicate: bool
    used: int
    period_start: str
    durable: bool
    revision: int
    id: str
    limit: Optional[int] = None
    remaining: Optional[int] = None
    reset_at: Optional[str] = None
    reason: Optional[str] = None


@dataclass(frozen=True)
class FeatureEntitlement:
    feature: str
    allow: bool
    reason: str
    upgrade: Optional[Upgrade]


@dataclass(frozen=True)
class Entitlements:
    account: str
    status: str
    revision: int
    stale: bool
    features: List[FeatureEntitlement]
    licenses: List[Dict[str, Any]] = field(default_factory=list)
    meters: List[Dict[str, Any]] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict)


def new_event_id() -> str:
    """A fresh idempotency id: 128 random bits in hex."""
    return secrets.token_hex(16)


def _fallback(allow: bool) -> Decision:
    return Decision(allow=allow, reason="ok" if allow else "unavailable", fallback=True)


class Client:
    """A Tollgate sidecar client. Thread-safe: it keeps no connection state."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8181",
        *,
        timeout: float = 0.5,
        retries: int = 2,
        retry_backoff: float = 0.025,
        fallback: Fallback = Fallback.DENY,
    ) -> None:
        base_url = base_url.rstrip("/")
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise TollgateError(f"`{base_url}` is not an http(s) base URL", "invalid_url")
        self.base_url = base_url
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.fallback = Fallback(fallback)

    def check(self, request: CheckRequest) -> Decision:
        """May ``request.account`` use ``request.feature``? A denial carries a reason and,
        where one exists, an upgrade hint."""
        return self._or_fallback(
            lambda: Decision.from_json(self._call("POST", "/v1/check", request.to_json())),
            lambda: _fallback(self.fallback is Fallback.ALLOW),
        )

    def batch(self, requests: List[CheckRequest]) -> List[Decision]:
        """Many checks in one request, answered in order."""

        def call() -> List[Decision]:
            answer = self._call("POST", "/v1/check/batch", {"checks": [request.to_json() for request in requests]})
            return [Decision.from_json(result) for result in answer["results"]]

        return self._or_fallback(call, lambda: [_fallback(self.fallback is Fallback.ALLOW) for _ in requests])

    def meter(self, account: str, meter: str, amount: int, *, id: Optional[str] = None, timestamp: Optional[str] = None) -> MeterResult:
        """Records usage. Without ``id`` one is generated, and every retry sends the same one,
        so a retried event is counted once. Never falls back."""
        event: Dict[str, Any] = {"account": account, "meter": meter, "amount": amount, "id": id or new_event_id()}
        if timestamp is not None:
            event["timestamp"] = timestamp
        answer = self._call("POST", "/v1/meter", event)
        return MeterResult(
            accepted=answer["accepted"],
            duplicate=answer["duplicate"],
            used=answer["used"],
            period_start=answer["period_start"],
            durable=answer["durable"],
            revision=answer["revision"],
            id=event["id"],
            limit=answer.get("limit"),
            remaining=answer.get("remaining"),
            reset_at=answer.get("reset_at"),
            reason=answer.get("reason"),
        )

    def entitlements(self, account: str, *, user: Optional[str] = None, region: Optional[str] = None) -> Entitlements:
        """The account's licenses, every feature's decision with upgrade hints, and meters."""
        query = urllib.parse.urlencode({key: value for key, value in (("user", user), ("region", region)) if value is not None})
        path = "/v1/entitlements/" + urllib.parse.quote(account, safe="") + (f"?{query}" if query else "")
        answer = self._call("GET", path, None)
        return Entitlements(
            account=answer["account"],
            status=answer["status"],
            revision=answer["revision"],
            stale=bool(answer.get("stale", False)),
            features=[
                FeatureEntitlement(
                    feature["feature"],
                    feature["allow"],
                    feature["reason"],
                    Upgrade.from_json(feature.get("upgrade")),
                )
                for feature in answer["features"]
            ],
            licenses=answer.get("licenses", []),
            meters=answer.get("meters", []),
            raw=answer,
        )

    def _or_fallback(self, call: Callable[[], T], fallback: Callable[[], T]) -> T:
        try:
            return call()
        except TollgateError as error:
            if error.unavailable and self.fallback is not Fallback.ERROR:
                return fallback()
            raise

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        wait = self.retry_backoff
        attempt = 0
        while True:
            try:
                return self._attempt(method, path, body)
            except TollgateError as error:
                if not error.unavailable or attempt >= self.retries:
                    raise
                attempt += 1
                time.sleep(wait)
                wait *= 2

    def _attempt(self, method: str, path: str, body: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"content-type": "application/json"}
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        except (socket.timeout, TimeoutError) as error:
            raise TollgateError(f"`{path}` did not answer within {self.timeout} s", "timeout", unavailable=True) from error
        except (urllib.error.URLError, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            code = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else "unreachable"
            raise TollgateError(f"cannot reach the sidecar for `{path}`: {reason}", code, unavailable=True) from error
        try:
            parsed = json.loads(text)
        except ValueError as error:
            raise TollgateError(f"`{path}` answered {status} with a body that is not JSON", "invalid_answer", status, status >= 500) from error
        if status != 200:
            detail = parsed.get("error", {}) if isinstance(parsed, dict) else {}
            code = detail.get("code", "unknown")
            raise TollgateError(f"`{path}` answered {status} `{code}`: {detail.get('message', '')}", code, status, status >= 500)
        return parsed
