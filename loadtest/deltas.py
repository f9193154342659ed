#!/usr/bin/env python3
"""Incremental publishing at customer scale: what a one-account order costs, end to end.

Builds a control plane of N accounts with `tollgate gen` and `tollgate control-plane import`,
subscribes K sidecars, and measures, with the release binaries:

  propagation  M one-account orders, one at a time: acknowledgement -> every sidecar serves
               the new revision (p50/p99/max), the bytes each sidecar received per order (from
               its log), the control plane's CPU per order (utime+stime over the orders / M),
               its peak RSS (VmHWM) and the base's size.
  fanout       P simulated sidecars long-polling the control plane at once (threads holding
               `GET /v1/snapshot?after=REV&base=BASE`): order -> each poller answered.
  load         one sidecar at RATE checks/s (tollgate-load, 32 connections) three ways, in one
               run: the bare-hyper floor, the sidecar with no orders, the sidecar while
               ORDERS/s one-account orders flow; then again with `--compact-after` low enough
               that compactions happen during the window.

Nothing here asserts; it prints one JSON object per measurement. Figures in loadtest/README.md.

usage: deltas.py WORKDIR --accounts N [--sidecars K] [--orders M] [--pollers P]
                 [--rate R] [--order-rate O] [--duration S] [--skip-load]
"""
import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tollgate")
LOAD = os.path.join(ROOT, "target", "release", "tollgate-load")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, key=None, body=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = "Bearer " + key
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def wait_ready(port, seconds=900):
    end = time.time() + seconds
    while time.time() < end:
        try:
            status, body = request(port, "GET", "/readyz", timeout=5)
            if status == 200:
                return json.loads(body or b"{}")
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"port {port} never became ready")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def hwm_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(values_s):
    return {
        "p50_ms": round(1000 * statistics.median(values_s), 1),
        "p99_ms": round(1000 * pct(values_s, 0.99), 1),
        "max_ms": round(1000 * max(values_s), 1),
        "n": len(values_s),
    }


class Setup:
    """A control plane over an imported repository, and sidecars subscribed to it."""

    def __init__(self, work, accounts):
        self.work, self.accounts, self.procs = work, accounts, []
        os.makedirs(work, exist_ok=True)
        self.keys = os.path.join(work, "keys")
        self.cp_data = os.path.join(work, "cp")
        self.policies = os.path.join(work, "gen")
        if not os.path.exists(os.path.join(self.keys, "tollgate.key")):
            subprocess.run([BIN, "keygen", "--out", self.keys], check=True, capture_output=True)
        mk = lambda scope: subprocess.run([BIN, "control-plane", "keys", "create", "--data", self.cp_data, "--scope", scope],
                                          check=True, capture_output=True, text=True).stdout.strip()
        self.integration, self.sidecar_key = mk("integration"), mk("sidecar")
        with open(os.path.join(work, "sidecar.key"), "w") as f:
            f.write(self.sidecar_key)
        marker = os.path.join(work, f"imported-{accounts}")
        self.import_s = None
        if not os.path.exists(marker):
            subprocess.run([BIN, "gen", "--accounts", str(accounts), "--out", self.policies], check=True, capture_output=True)
            started = time.time()
            subprocess.run([BIN, "control-plane", "import", "--data", self.cp_data, self.policies], check=True, capture_output=True)
            self.import_s = round(time.time() - started, 1)
            open(marker, "w").close()

    def start_control_plane(self, *extra):
        # A restart keeps the port, so subscribed sidecars follow the new process.
        self.cp_port = getattr(self, "cp_port", None) or free_port()
        log = open(os.path.join(self.work, "cp.log"), "a")
        self.cp = subprocess.Popen([BIN, "control-plane", "--data", self.cp_data, "--policies", self.policies,
                                    "--signing-key", os.path.join(self.keys, "tollgate.key"),
                                    "--listen", f"127.0.0.1:{self.cp_port}", *extra], stdout=log, stderr=log)
        self.procs.append(self.cp)
        started = time.time()
        wait_ready(self.cp_port)
        return time.time() - started

    def start_sidecars(self, count):
        self.sidecars = []
        for k in range(count):
            port = free_port()
            log_path = os.path.join(self.work, f"sidecar{k}.log")
            log = open(log_path, "w")
            proc = subprocess.Popen([BIN, "sidecar", "--listen", f"127.0.0.1:{port}",
                                     "--control-plane", f"http://127.0.0.1:{self.cp_port}",
                                     "--api-key-file", os.path.join(self.work, "sidecar.key"),
                                     "--trust-key", os.path.join(self.keys, "tollgate.pub"),
                                     "--data-dir", os.path.join(self.work, f"sc{k}")],
                                    stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "info"})
            self.procs.append(proc)
            self.sidecars.append((port, log_path, proc))
        for port, _, _ in self.sidecars:
            wait_ready(port)
        self.wait_caught_up()

    def wait_caught_up(self, seconds=900):
        """Until every sidecar serves the newest published revision (a sidecar may be ready from
        its cache while the new base is still on its way)."""
        end = time.time() + seconds
        while time.time() < end:
            newest = wait_ready(self.cp_port).get("revision") or 0
            if all(sidecar_revision(port)["revision"] >= newest for port, _, _ in self.sidecars):
                return
            time.sleep(0.2)
        raise SystemExit("the sidecars never caught up with the control plane")

    def plans(self):
        status, body = request(self.cp_port, "GET", "/v1/catalog", self.integration)
        plans = [plan["id"] for plan in json.loads(body)["plans"] if not plan.get("regions")]
        return plans[0], plans[-1]

    def order(self, n, account):
        low, high = self.plans_cache
        plan = high if n % 2 == 0 else low
        action = "upgrade" if plan == high else "downgrade"
        status, body = request(self.cp_port, "POST", "/v1/orders", self.integration,
                               {"order_id": f"probe-{time.time_ns()}-{n}", "action": action, "account": account, "plan": plan, "seats": 5})
        if status != 200:
            raise SystemExit(f"order: {status} {body[:300]!r}")
        return json.loads(body)["revision"]

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


def sidecar_revision(port):
    status, body = request(port, "GET", "/v1/status", timeout=10)
    return json.loads(body)


def propagation(setup, orders):
    setup.plans_cache = setup.plans()
    base_bytes = len(request(setup.cp_port, "GET", "/v1/snapshot?after=0&wait=0", setup.sidecar_key)[1])
    latencies = []
    cpu_before = cpu_seconds(setup.cp.pid)
    for n in range(orders):
        account = f"acct-{(n * 7919) % setup.accounts}"
        revision = setup.order(n, account)
        acked = time.time()
        pending = {port for port, _, _ in setup.sidecars}
        while pending:
            for port in list(pending):
                if sidecar_revision(port)["revision"] >= revision:
                    pending.discard(port)
            if time.time() - acked > 120:
                raise SystemExit(f"order {n}: sidecars {pending} never reached {revision}")
        latencies.append(time.time() - acked)
    cpu = cpu_seconds(setup.cp.pid) - cpu_before
    received = []
    for _, log_path, _ in setup.sidecars:
        lines = [line for line in open(log_path) if "update from control plane installed" in line]
        for line in lines[1:]:  # the first is the initial download of the base
            match = re.search(r"\bbytes=(\d+)", line)
            if match:
                received.append(int(match.group(1)))
    status = sidecar_revision(setup.sidecars[0][0])["snapshot"]
    return {
        "measure": "propagation", "accounts": setup.accounts, "sidecars": len(setup.sidecars), "orders": orders,
        "order_to_every_sidecar": summary(latencies),
        "slowest_order": {"index": latencies.index(max(latencies)), "ms": round(1000 * max(latencies), 1)},
        "bytes_per_order_per_sidecar": {"median": statistics.median(received), "max": max(received)} if received else None,
        "cp_cpu_ms_per_order": round(1000 * cpu / orders, 2),
        "cp_peak_rss_mib": round(hwm_mib(setup.cp.pid), 1),
        "base_bytes": base_bytes,
        "sidecar_peak_rss_mib": round(hwm_mib(setup.sidecars[0][2].pid), 1),
        "sidecar_view": {key: status.get(key) for key in ("base_revision", "overlay_accounts", "deltas", "revision")},
    }


def fanout(setup, pollers, rounds):
    setup.plans_cache = setup.plans()
    latencies = []
    cpu_total = 0.0
    for n in range(rounds):
        ready = wait_ready(setup.cp_port)
        after = ready["revision"]
        conn = http.client.HTTPConnection("127.0.0.1", setup.cp_port, timeout=30)
        conn.request("GET", f"/v1/snapshot?after={after - 1}&wait=0", headers={"authorization": "Bearer " + setup.sidecar_key})
        response = conn.getresponse()
        response.read()
        base = int(response.getheader("x-tollgate-base-revision"))
        conn.close()
        answered, lock = [], threading.Lock()
        start = threading.Barrier(pollers + 1)
        sent = [0.0]

        def poll():
            conn = http.client.HTTPConnection("127.0.0.1", setup.cp_port, timeout=60)
            start.wait()
            conn.request("GET", f"/v1/snapshot?after={after}&base={base}&wait=30",
                         headers={"authorization": "Bearer " + setup.sidecar_key})
            response = conn.getresponse()
            response.read()
            done = time.time()
            with lock:
                answered.append((response.status, done))
            conn.close()

        threads = [threading.Thread(target=poll) for _ in range(pollers)]
        for thread in threads:
            thread.start()
        start.wait()
        time.sleep(1.0)  # every poll is waiting now
        cpu_before = cpu_seconds(setup.cp.pid)
        setup.order(n, f"acct-{(n * 104729) % setup.accounts}")
        sent[0] = time.time()
        for thread in threads:
            thread.join()
        cpu_total += cpu_seconds(setup.cp.pid) - cpu_before
        latencies.extend(done - sent[0] for status, done in answered if status == 200)
    return {
        "measure": "fanout", "accounts": setup.accounts, "pollers": pollers, "rounds": rounds,
        "order_ack_to_poller_answered": summary([max(latency, 0.0) for latency in latencies]),
        "cp_cpu_ms_per_order": round(1000 * cpu_total / rounds, 2),
    }


def load_run(setup, port, label, rate, duration, out, pid=None, orders_per_s=0.0):
    stop = threading.Event()
    placed, failed = [0], [0]

    def order_loop():
        n = 0
        period = 1.0 / orders_per_s
        next_at = time.time() + 3.0  # after the generator's warm-up
        while not stop.is_set():
            now = time.time()
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            # A new account per order: one account changed, and never refused.
            status, body = request(setup.cp_port, "POST", "/v1/orders", setup.integration,
                                   {"order_id": f"flow-{label}-{n}", "action": "new", "account": f"flow-{label}-{n}",
                                    "plan": setup.plans_cache[0], "seats": 5})
            if status != 200:
                failed[0] += 1
            n += 1
            placed[0] = n
            next_at += period

    thread = None
    if orders_per_s > 0:
        thread = threading.Thread(target=order_loop, daemon=True)
        thread.start()
    json_path = os.path.join(out, f"{label}.json")
    command = [LOAD, "run", "--target", f"127.0.0.1:{port}", "--scenario", "check", "--rate", str(rate),
               "--duration", str(duration), "--warmup", "3", "--accounts", str(setup.accounts),
               "--label", label, "--json", json_path, "--quiet"]
    if pid is None:
        command += ["--no-status", "--no-pid"]
    subprocess.run(command, check=True, capture_output=True)
    stop.set()
    if thread:
        thread.join()
    result = json.load(open(json_path))
    latency = result["latency_us"]
    revisions = result.get("revisions_seen") or []
    return {
        "label": label, "orders_placed": placed[0], "orders_failed": failed[0],
        "p50_ms": round(latency["p50"] / 1000, 3), "p99_ms": round(latency["p99"] / 1000, 3),
        "p999_ms": round(latency["p999"] / 1000, 3), "max_ms": round(latency["max"] / 1000, 3),
        "errors": result["errors"] + result["non_2xx"] + result["unsent"],
        "send_lag_p99_ms": round(result["send_lag_us"]["p99"] / 1000, 3),
        "revisions_seen": len(revisions),
    }


def load(setup, rate, order_rate, duration):
    out = os.path.join(setup.work, "load")
    os.makedirs(out, exist_ok=True)
    setup.plans_cache = setup.plans()
    floor_port = free_port()
    floor = subprocess.Popen([LOAD, "floor", "--listen", f"127.0.0.1:{floor_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    port = setup.sidecars[0][0]
    runs = [load_run(setup, floor_port, "floor", rate, duration, out)]
    floor.terminate()
    setup.wait_caught_up()
    runs.append(load_run(setup, port, "sidecar-no-orders", rate, duration, out, pid=True))
    runs.append(load_run(setup, port, f"sidecar-{order_rate:g}-orders-per-s", rate, duration, out, pid=True, orders_per_s=order_rate))
    return {"measure": "load", "accounts": setup.accounts, "rate": rate, "duration_s": duration, "runs": runs}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--sidecars", type=int, default=10)
    parser.add_argument("--orders", type=int, default=50)
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--order-rate", type=float, default=10.0)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--compact-after", type=int, default=50, help="for the compaction load run")
    parser.add_argument("--compaction-duration", type=int, default=60, help="seconds of the compaction load run")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-fanout", action="store_true")
    args = parser.parse_args()
    setup = Setup(args.work, args.accounts)
    try:
        start_s = setup.start_control_plane()
        print(json.dumps({"measure": "start", "accounts": args.accounts, "import_s": setup.import_s,
                          "control_plane_ready_s": round(start_s, 1)}), flush=True)
        setup.start_sidecars(args.sidecars)
        print(json.dumps(propagation(setup, args.orders)), flush=True)
        if not args.skip_fanout:
            print(json.dumps(fanout(setup, args.pollers, 5)), flush=True)
        if not args.skip_load:
            # One sidecar is enough for the latency runs; the others would share the cores.
            for _, _, proc in setup.sidecars[1:]:
                proc.terminate()
            for _, _, proc in setup.sidecars[1:]:
                proc.wait(30)
            setup.sidecars = setup.sidecars[:1]
            time.sleep(5)  # the kernel reclaims their memory; not part of what is measured
            print(json.dumps(load(setup, args.rate, args.order_rate, args.duration)), flush=True)
            # Compaction under load: restart the control plane with a low threshold.
            setup.cp.terminate()
            setup.cp.wait(30)
            setup.start_control_plane("--compact-after", str(args.compact_after))
            setup.wait_caught_up()
            out = os.path.join(setup.work, "load")
            # Long enough for a compaction to start, finish and reach the sidecar inside the window.
            run = load_run(setup, setup.sidecars[0][0], f"sidecar-{args.order_rate:g}-orders-per-s-compact-after-{args.compact_after}",
                           args.rate, args.compaction_duration, out, pid=True, orders_per_s=args.order_rate)
            compactions = sum(1 for line in open(os.path.join(setup.work, "cp.log")) if "compacted: new base published" in line)
            print(json.dumps({"measure": "load-with-compaction", "accounts": args.accounts, "compactions_in_cp_log": compactions, "run": run}), flush=True)
    finally:
        setup.stop()


if __name__ == "__main__":
    main()
