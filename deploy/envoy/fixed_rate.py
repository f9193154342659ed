#!/usr/bin/env python3
"""A fixed-rate HTTP/1.1 client for measure-latency.sh when oha is not installed: one
keep-alive connection, requests sent on a fixed schedule, latency counted from the scheduled
send time (so a stall is not hidden by sending later). Prints percentiles in milliseconds.
Usage: fixed_rate.py URL RATE SECONDS [HEADER: VALUE ...]"""
import http.client, sys, time, urllib.parse

url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
headers = dict(h.split(": ", 1) for h in sys.argv[4:])
parts = urllib.parse.urlsplit(url)
connection = http.client.HTTPConnection(parts.hostname, parts.port)
interval, start = 1.0 / rate, time.perf_counter()
latencies, statuses = [], {}
for n in range(int(rate * seconds)):
    scheduled = start + n * interval
    delay = scheduled - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    connection.request("GET", parts.path, headers=headers)
    response = connection.getresponse()
    response.read()
    latencies.append(time.perf_counter() - scheduled)
    statuses[response.status] = statuses.get(response.status, 0) + 1
latencies.sort()
pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3
print(f"requests {len(latencies)} statuses {statuses} p50 {pick(0.5):.3f} ms p90 {pick(0.9):.3f} ms "
      f"p99 {pick(0.99):.3f} ms p99.9 {pick(0.999):.3f} ms max {latencies[-1] * 1e3:.3f} ms")
