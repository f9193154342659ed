"""The shared decision cases (tests/cases/*.toml) through tollgate_sdk against real sidecars
with frozen clocks, served by sdk/cases/serve_cases.py (which sets TOLLGATE_CASES). One test
per check; checks that cannot be reproduced live are reported as skipped, with why."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import pytest

from tollgate_sdk import CheckRequest, Client, Decision, Fallback


def _manifest() -> List[Dict[str, Any]]:
    path = os.environ.get("TOLLGATE_CASES")
    if not path:
        return []
    with open(path) as file:
        return json.load(file)


MANIFEST = _manifest()


def as_json(decision: Decision) -> Dict[str, Any]:
    answer = {key: value for key, value in decision.__dict__.items() if value is not None and value is not False}
    answer["allow"] = decision.allow
    if decision.upgrade is not None:
        answer["upgrade"] = {key: value for key, value in decision.upgrade.__dict__.items() if value is not None}
    answer.pop("fallback", None)
    return answer


@pytest.mark.skipif(not MANIFEST, reason="run through sdk/python/test.sh, which serves the cases")
@pytest.mark.parametrize("entry", MANIFEST or [None], ids=[entry["id"] for entry in MANIFEST] or ["no-cases"])
def test_case_agrees_with_the_engine(entry: Dict[str, Any]) -> None:
    if entry["skip"]:
        pytest.skip(entry["skip"])
    request = CheckRequest(**entry["request"])
    answer = as_json(Client(entry["url"], fallback=Fallback.ERROR).check(request))
    for key, expected in entry["expect"].items():
        found = answer.get(key)
        if expected == "absent":
            assert key not in answer, f"`{key}` should be absent; whole answer {answer}"
        elif expected is False and found is None:
            continue
        else:
            assert found == expected, f"`{key}` expected {expected!r}, got {found!r}; whole answer {answer}"
