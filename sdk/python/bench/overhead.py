"""Per-call overhead of tollgate_sdk over raw urllib at a fixed rate (a measurement; nothing
is asserted). Start a sidecar over policies/, then:
    PYTHONPATH=sdk/python python3 sdk/python/bench/overhead.py http://127.0.0.1:8181 1000 5000"""

from __future__ import annotations

import sys
import time
import urllib.request
from typing import Callable, List

from tollgate_sdk import CheckRequest, Client

REQUESTS = [
    CheckRequest("acme", "reports", user="alice"),
    CheckRequest("hooli", "sso"),
    CheckRequest("stark", "api"),
    CheckRequest("globex", "dashboards"),
    CheckRequest("wayne", "export"),
]


def paced(rate: int, count: int, call: Callable[[int], None]) -> List[float]:
    micros = []
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(count):
        wait = start + i * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        started = time.perf_counter()
        call(i)
        micros.append((time.perf_counter() - started) * 1e6)
    return micros


def summary(name: str, micros: List[float]) -> tuple:
    micros.sort()
    p50, p99 = micros[round((len(micros) - 1) * 0.5)], micros[round((len(micros) - 1) * 0.99)]
    print(f"{name:<28} n={len(micros)} p50={p50:.1f} µs p99={p99:.1f} µs")
    return p50, p99


def main() -> None:
    base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8181"
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    bodies = [__import__("json").dumps(request.to_json()).encode() for request in REQUESTS]

    def raw(i: int) -> None:
        request = urllib.request.Request(base_url + "/v1/check", data=bodies[i % len(bodies)], headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=1) as response:
            response.read()

    client = Client(base_url)

    def sdk(i: int) -> None:
        client.check(REQUESTS[i % len(REQUESTS)])

    print(f"{count} calls at {rate}/s against {base_url}")
    paced(rate, count // 10, raw)
    raw_p50, raw_p99 = summary("raw urllib (read, no parse)", paced(rate, count, raw))
    paced(rate, count // 10, sdk)
    sdk_p50, sdk_p99 = summary("tollgate_sdk check", paced(rate, count, sdk))
    print(f"sdk overhead over raw urllib: p50 {sdk_p50 - raw_p50:+.1f} µs, p99 {sdk_p99 - raw_p99:+.1f} µs")


if __name__ == "__main__":
    main()
