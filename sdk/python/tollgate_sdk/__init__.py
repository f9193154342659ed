"""Tollgate client for Python: checks, batches, metering and entitlements over the sidecar.

Standard library only (urllib). It moves JSON and decides nothing itself; the only answers it
makes up are fallbacks when the sidecar cannot be reached, marked ``fallback=True``.
"""

from tollgate_sdk.client import (
    REASONS,
    CheckRequest,
    Client,
    Decision,
    Entitlements,
    FeatureEntitlement,
    Fallback,
    MeterResult,
    TollgateError,
    Upgrade,
    new_event_id,
)

__version__ = "0.2.0"

__all__ = [
    "REASONS",
    "CheckRequest",
    "Client",
    "Decision",
    "Entitlements",
    "FeatureEntitlement",
    "Fallback",
    "MeterResult",
    "TollgateError",
    "Upgrade",
    "new_event_id",
    "__version__",
]
