#!/usr/bin/env python3
r"""Sidecar memory under many concurrent connections (issue 11, item 6): RSS idle, while
CONNECTIONS connections are open and sending bodies up to the body limit, and after they close.

Starts a dev-mode sidecar (`tollgate sidecar --policies`, 1000 generated accounts) on loopback,
reads VmRSS/VmHWM from /proc/PID/status, opens every connection at once and keeps them all open
until each has its answer, samples RSS every 100 ms, closes them all, and samples again after
AFTER seconds (the sidecar's housekeeping runs every 5 s). Bodies, by connection number:

  number mod 10 = 0..3  `slow`     a valid batch (as many checks as fit) padded with whitespace
                                   to just under 64 KiB (the heavy-request threshold), sent in 8
                                   pieces a second apart
  number mod 10 = 4..6  `large`    a valid 10,000-check batch padded to `--max-body` (1 MiB), at once
  number mod 10 = 7, 8  `chunked`  the same batch without a length (chunked), in 64 KiB chunks
  number mod 10 = 9     `keep`     one small check, then the connection idles, kept alive

Only the standard library; every wait is bounded. Nothing is asserted: it prints figures.

    cargo build --release --bin tollgate
    python3 loadtest/memory.py --tollgate target/release/tollgate --connections 1000 --rounds 2

The same binary without giving memory back (the housekeeping's `malloc_trim` made a no-op):

    printf '#include <stddef.h>\nint malloc_trim(size_t pad) { (void)pad; return 0; }\n' > /tmp/notrim.c
    gcc -shared -fPIC -o /tmp/notrim.so /tmp/notrim.c
    LD_PRELOAD=/tmp/notrim.so python3 loadtest/memory.py --tollgate target/release/tollgate --rounds 2
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

MIB = 1024 * 1024
HEAVY_BODY = 64 * 1024


def rss(pid):
    """(VmRSS, VmHWM) of `pid` in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def batch(size, accounts):
    checks = [
        {"account": f"acct-{idx % accounts}", "feature": f"feature-{idx % 16}", "user": f"user-{idx % 5}"}
        for idx in range(10_000)
    ]
    body = json.dumps({"checks": checks}, separators=(",", ":")).encode()
    while len(body) > size:
        checks = checks[: len(checks) * 3 // 4]
        body = json.dumps({"checks": checks}, separators=(",", ":")).encode()
    # Whitespace is valid JSON: the body is exactly `size` bytes and still a batch.
    return body[:-1] + b" " * (size - len(body)) + b"}"


def head(path, port, length=None):
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_answer(reader):
    """Reads one answer; returns its status code (0 when the connection ended first)."""
    status_line = await reader.readline()
    if not status_line:
        return 0
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def connection(number, port, bodies, done, statuses, hold):
    kind = ("slow", "slow", "slow", "slow", "large", "large", "large", "chunked", "chunked", "keep")[number % 10]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        statuses["connect-failed"] = statuses.get("connect-failed", 0) + 1
        done.release()
        return
    status = 0
    try:
        if kind == "slow":
            body = bodies["slow"]
            writer.write(head("/v1/check/batch", port, len(body)))
            step = len(body) // 8 + 1
            for offset in range(0, len(body), step):
                writer.write(body[offset : offset + step])
                await writer.drain()
                await asyncio.sleep(1)
        elif kind == "large":
            body = bodies["large"]
            writer.write(head("/v1/check/batch", port, len(body)) + body)
            await writer.drain()
        elif kind == "chunked":
            body = bodies["large"]
            writer.write(head("/v1/check/batch", port))
            for offset in range(0, len(body), HEAVY_BODY):
                piece = body[offset : offset + HEAVY_BODY]
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        else:
            small = b'{"account":"acct-1","feature":"feature-1"}'
            writer.write(head("/v1/check", port, len(small)) + small)
            await writer.drain()
        status = await asyncio.wait_for(read_answer(reader), 60)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        status = 0
    statuses[f"{kind} {status}"] = statuses.get(f"{kind} {status}", 0) + 1
    done.release()
    # Every connection stays open until all of them have their answer.
    await hold.wait()
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (OSError, asyncio.TimeoutError):
        pass


async def load(args, pid):
    bodies = {"slow": batch(HEAVY_BODY - 1, args.accounts), "large": batch(args.max_body, args.accounts)}
    done = asyncio.Semaphore(0)
    hold = asyncio.Event()
    statuses = {}
    peak = 0.0
    tasks = [asyncio.create_task(connection(number, args.port, bodies, done, statuses, hold)) for number in range(args.connections)]
    started = time.monotonic()
    answered = 0
    while answered < args.connections and time.monotonic() - started < 120:
        try:
            await asyncio.wait_for(done.acquire(), 0.1)
            answered += 1
        except asyncio.TimeoutError:
            pass
        peak = max(peak, rss(pid)[0])
    open_rss, _ = rss(pid)
    hold.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return peak, open_rss, statuses, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tollgate", default="target/release/tollgate")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--port", type=int, default=18195)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--max-body", type=int, default=MIB)
    parser.add_argument("--after", type=float, default=12, help="seconds to wait after the connections close")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole load is repeated")
    parser.add_argument("--sidecar-arg", action="append", default=[], help="extra argument for `tollgate sidecar`")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tollgate-memory-")
    subprocess.run([args.tollgate, "gen", "--accounts", str(args.accounts), "--out", f"{work}/policies"], check=True, stdout=subprocess.DEVNULL)
    log = open(f"{work}/sidecar.log", "w")
    command = [args.tollgate, "sidecar", "--listen", f"127.0.0.1:{args.port}", "--policies", f"{work}/policies", "--max-body", str(args.max_body)]
    sidecar = subprocess.Popen(command + args.sidecar_arg, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/readyz", timeout=1)
                break
            except OSError:
                if sidecar.poll() is not None:
                    sys.exit(f"the sidecar exited; see {work}/sidecar.log")
                time.sleep(0.2)
        time.sleep(2)
        idle, _ = rss(sidecar.pid)
        print(f"binary {args.tollgate}, {args.connections} connections, max body {args.max_body} bytes")
        print(f"idle:                  VmRSS {idle:7.1f} MiB")
        for round_idx in range(args.rounds):
            peak, open_rss, statuses, took = asyncio.run(load(args, sidecar.pid))
            closed, _ = rss(sidecar.pid)
            time.sleep(args.after)
            after, hwm = rss(sidecar.pid)
            print(f"round {round_idx + 1}: answers in {took:.1f} s: {', '.join(f'{key}: {value}' for key, value in sorted(statuses.items()))}")
            print(f"  connections open:    VmRSS {peak:7.1f} MiB at most, {open_rss:7.1f} MiB when all were answered")
            print(f"  just closed:         VmRSS {closed:7.1f} MiB")
            print(f"  {args.after:.0f} s after close:    VmRSS {after:7.1f} MiB   (VmHWM {hwm:.1f} MiB)")
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(30)
        except subprocess.TimeoutExpired:
            sidecar.kill()


if __name__ == "__main__":
    main()
