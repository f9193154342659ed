// The official OpenFeature server SDK for JavaScript with its OFREP provider against a real
// Tollgate sidecar: every scenario in ../expectations.json must resolve as written there.
// Also a raw conditional bulk request: the ETag comes back and If-None-Match gets a 304.
// Usage: node interop.mjs BASE_URL
import { readFileSync } from "node:fs";
import { OpenFeature } from "@openfeature/server-sdk";
import { OFREPProvider } from "@openfeature/ofrep-provider";

const baseUrl = process.argv[2];
const scenarios = JSON.parse(readFileSync(new URL("../expectations.json", import.meta.url), "utf8"));
await OpenFeature.setProviderAndWait(new OFREPProvider({ baseUrl }));
const client = OpenFeature.getClient();
let passed = 0;
let failed = 0;
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
for (const scenario of scenarios) {
  const details = await client.getBooleanDetails(scenario.flag, scenario.default, scenario.context);
  const metadata = Object.fromEntries(Object.keys(scenario.metadata).map((key) => [key, details.flagMetadata?.[key] ?? null]));
  const found = { value: details.value, reason: details.reason, errorCode: details.errorCode ?? null, metadata };
  const expected = { value: scenario.value, reason: scenario.reason, errorCode: scenario.errorCode, metadata: scenario.metadata };
  if (same(found, expected)) passed++;
  else {
    failed++;
    console.log(`FAIL node / ${scenario.name}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(found)}`);
  }
}

const bulk = (headers = {}) =>
  fetch(`${baseUrl}/ofrep/v1/evaluate/flags`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify({ context: { targetingKey: "hooli" } }),
  });
const first = await bulk();
const etag = first.headers.get("etag");
const flags = (await first.json()).flags ?? [];
const second = await bulk({ "if-none-match": etag ?? "" });
if (first.status === 200 && etag && flags.some((flag) => flag.key === "sso" && flag.value === false) && second.status === 304) passed++;
else {
  failed++;
  console.log(`FAIL node / bulk ETag: first ${first.status} etag ${etag}, second ${second.status}`);
}

console.log(`node ofrep interop: ${passed} passed, ${failed} failed`);
await OpenFeature.close();
process.exit(failed || !passed ? 1 : 0);
