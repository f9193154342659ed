"""A real sidecar (the binary in TOLLGATE_BIN) on a free loopback port over the repository's
example policies, started once for the test session."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def sidecar_url() -> Iterator[str]:
    binary = os.environ.get("TOLLGATE_BIN")
    if not binary:
        pytest.fail("set TOLLGATE_BIN to the built tollgate binary (see sdk/python/test.sh)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "sidecar", "--policies", str(REPO / "policies"), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, RUST_LOG="error"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            if process.poll() is not None:
                pytest.fail(f"sidecar exited: {process.stderr.read().decode() if process.stderr else ''}")
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.025)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
