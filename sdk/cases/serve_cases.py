#!/usr/bin/env python3
"""Serves the shared decision cases (tests/cases/*.toml) to the SDK test suites.

For every case file and every distinct `now` in it, starts a real sidecar
(`tollgate sidecar --policies DIR`) on a free loopback port under libfaketime with the wall
clock frozen at that `now`, presets the file's usage through `POST /v1/meter`, writes a JSON
manifest of {id, url, request, expect, skip} and runs the given command with
TOLLGATE_CASES=<manifest>. The sidecars are stopped afterwards; the exit code is the command's.

A check is skipped (and counted as skipped by the runners) only when it cannot be reproduced
against a live sidecar: libfaketime is not installed (every case pins `now`), or a usage
preset exceeds a hard limit (the engine runner injects usage directly; `/v1/meter` refuses it).

Usage: serve_cases.py --bin target/debug/tollgate -- node --test test/cases.test.mjs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = REPO / "tests" / "cases"



# Expectations about the engine itself (what `/v1/meter` would apply), not fields of a check's
# answer; the engine's own runner (tests/cases.rs) checks them.
ENGINE_ONLY = {"meter_limit"}


def client_expect(expect: dict) -> dict:
    return {key: value for key, value in expect.items() if key not in ENGINE_ONLY}

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def wait_ready(url: str, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sidecar for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"sidecar at {url} not ready in time")


def stop_group(process: subprocess.Popen, signum: int) -> None:
    """Signals the process group led by `process` (faketime and the sidecar under it)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def policies_dir(case: dict, scratch: Path, name: str) -> Path:
    if "policies" in case:
        return REPO / case["policies"]
    directory = scratch / name
    (directory / "accounts").mkdir(parents=True)
    (directory / "catalog.toml").write_text(case["catalog"])
    (directory / "accounts" / "test.toml").write_text(case.get("accounts", ""))
    return directory


def faketime_time(now: str) -> str:
    # "2026-11-28T13:45:10Z" -> "2026-11-28 13:45:10", frozen (`-f` without `@`).
    return now.replace("T", " ").rstrip("Z")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="the built tollgate binary")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = [part for part in args.command if part != "--"] if args.command[:1] == ["--"] else args.command
    binary = str(Path(args.bin).resolve())
    faketime = shutil.which("faketime")
    scratch = Path(tempfile.mkdtemp(prefix="tollgate-cases-"))
    processes: list[subprocess.Popen] = []
    entries = []
    try:
        groups = []
        for path in sorted(CASES.glob("*.toml")):
            case = tomllib.loads(path.read_text())
            directory = policies_dir(case, scratch, path.stem)
            by_now: dict[str, list[dict]] = {}
            for check in case["checks"]:
                by_now.setdefault(check.get("now", case["now"]), []).append(check)
            for now, checks in by_now.items():
                if faketime is None:
                    entries.extend(
                        {"id": f"{path.name} / {check['name']}", "url": None, "request": check["request"],
                         "expect": client_expect(check["expect"]), "skip": "libfaketime is not installed and the case pins `now`"}
                        for check in checks
                    )
                    continue
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                env = dict(os.environ, TZ="UTC", FAKETIME_DONT_FAKE_MONOTONIC="1", RUST_LOG="error")
                argv = [faketime, "-f", faketime_time(now), binary, "sidecar", "--policies", str(directory),
                        "--listen", f"127.0.0.1:{port}"]
                log = open(scratch / f"{path.stem}-{port}.log", "w")
                # faketime runs the sidecar as its child rather than exec'ing it, so each gets its own
                # process group and the whole group is stopped at the end.
                processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                groups.append((path, case, checks, url, processes[-1]))
        deadline = time.monotonic() + 60
        for path, case, checks, url, process in groups:
            wait_ready(url, process, deadline)
            refused = set()
            accounts = {check["request"]["account"] for check in checks}
            for row in case.get("usage", []):
                if row["account"] not in accounts:
                    continue
                answer = post(url + "/v1/meter", {"account": row["account"], "meter": row["meter"],
                                                  "amount": row["used"], "id": f"preset-{row['meter']}"})
                if not answer["accepted"]:
                    refused.add(row["account"])
            for check in checks:
                skip = None
                if check["request"]["account"] in refused:
                    skip = "its usage preset exceeds a hard limit, which /v1/meter refuses"
                entries.append({"id": f"{path.name} / {check['name']}", "url": url, "request": check["request"],
                                "expect": client_expect(check["expect"]), "skip": skip})
        manifest = scratch / "manifest.json"
        manifest.write_text(json.dumps(entries, indent=1))
        n_skipped = sum(1 for entry in entries if entry["skip"])
        print(f"serve_cases: {len(entries)} checks from {len(list(CASES.glob('*.toml')))} files on {len(processes)} sidecars, "
              f"{n_skipped} not reproducible live", flush=True)
        if not command:
            return 0
        return subprocess.call(command, env=dict(os.environ, TOLLGATE_CASES=str(manifest)))
    finally:
        for process in processes:
            stop_group(process, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_group(process, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
