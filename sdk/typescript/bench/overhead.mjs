// Per-call overhead of @tollgate/sdk over raw fetch at a fixed rate (a measurement; nothing
// is asserted). Start a sidecar over policies/, build (npm run build), then:
//   node bench/overhead.mjs http://127.0.0.1:8181 1000 5000
import { performance } from "node:perf_hooks";
import { TollgateClient } from "../dist/index.js";

const [baseUrl = "http://127.0.0.1:8181", rateText = "1000", countText = "5000"] = process.argv.slice(2);
const rate = Number(rateText);
const n = Number(countText);
const requests = [
  { account: "acme", feature: "reports", user: "alice" },
  { account: "hooli", feature: "sso" },
  { account: "stark", feature: "api" },
  { account: "globex", feature: "dashboards" },
  { account: "wayne", feature: "export" },
];
const bodies = requests.map((request) => JSON.stringify(request));

async function paced(count, call) {
  const micros = [];
  const interval = 1000 / rate;
  const start = performance.now();
  for (let i = 0; i < count; i++) {
    const due = start + i * interval;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    const started = performance.now();
    await call(i);
    micros.push((performance.now() - started) * 1000);
  }
  return micros;
}

function summary(name, micros) {
  micros.sort((a, b) => a - b);
  const at = (fraction) => micros[Math.round((micros.length - 1) * fraction)];
  console.log(`${name.padEnd(26)} n=${micros.length} p50=${at(0.5).toFixed(1)} µs p99=${at(0.99).toFixed(1)} µs`);
  return [at(0.5), at(0.99)];
}

const raw = async (i) => {
  const response = await fetch(`${baseUrl}/v1/check`, { method: "POST", headers: { "content-type": "application/json" }, body: bodies[i % bodies.length] });
  await response.text();
};
const client = new TollgateClient({ baseUrl });
const sdk = async (i) => {
  await client.check(requests[i % requests.length]);
};
console.log(`${n} calls at ${rate}/s against ${baseUrl}`);
await paced(n / 10, raw);
const rawMicros = await paced(n, raw);
await paced(n / 10, sdk);
const sdkMicros = await paced(n, sdk);
const [rawP50, rawP99] = summary("raw fetch (text, no parse)", rawMicros);
const [sdkP50, sdkP99] = summary("@tollgate/sdk check", sdkMicros);
console.log(`sdk overhead over raw fetch: p50 ${(sdkP50 - rawP50).toFixed(1)} µs, p99 ${(sdkP99 - rawP99).toFixed(1)} µs`);

// The SDK's own work per call, without the network: a fetch that answers a canned decision,
// against the same canned answer read raw. This separates the client's cost from socket noise.
const canned = JSON.stringify({ allow: false, reason: "not_entitled", revision: 1, upgrade: { kind: "plan", id: "business" } });
const stubFetch = async () => new Response(canned, { status: 200, headers: { "content-type": "application/json" } });
const stubbed = new TollgateClient({ baseUrl, fetch: stubFetch });
const rawStub = async (i) => {
  const response = await stubFetch(`${baseUrl}/v1/check`, { method: "POST", body: bodies[i % bodies.length] });
  await response.text();
};
const sdkStub = async (i) => {
  await stubbed.check(requests[i % requests.length]);
};
await paced(n / 10, rawStub);
const [stubRawP50, stubRawP99] = summary("canned fetch (text)", await paced(n, rawStub));
const [stubSdkP50, stubSdkP99] = summary("@tollgate/sdk, canned fetch", await paced(n, sdkStub));
console.log(`sdk's own cost per call: p50 ${(stubSdkP50 - stubRawP50).toFixed(1)} µs, p99 ${(stubSdkP99 - stubRawP99).toFixed(1)} µs`);
