// The shared decision cases (tests/cases/*.toml) through @tollgate/sdk against real sidecars
// with frozen clocks, served by sdk/cases/serve_cases.py (which sets TOLLGATE_CASES).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import { TollgateClient } from "../dist/index.js";

function matches(expected, found) {
  if (expected === "absent") return found === undefined;
  if (expected === false && found === undefined) return true;
  return found !== undefined && JSON.stringify(sorted(expected)) === JSON.stringify(sorted(found));
}

function sorted(value) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return value;
  return Object.fromEntries(Object.keys(value).sort().map((key) => [key, sorted(value[key])]));
}

test("every reproducible decision case agrees with the engine", { skip: !process.env.TOLLGATE_CASES && "run through sdk/typescript/test.sh" }, async () => {
  const manifest = JSON.parse(readFileSync(process.env.TOLLGATE_CASES, "utf8"));
  const clients = new Map();
  const failures = [];
  let ran = 0;
  for (const entry of manifest) {
    if (entry.skip) continue;
    if (!clients.has(entry.url)) clients.set(entry.url, new TollgateClient({ baseUrl: entry.url, fallback: "error" }));
    const decision = await clients.get(entry.url).check(entry.request);
    ran++;
    for (const [key, expected] of Object.entries(entry.expect)) {
      if (!matches(expected, decision[key])) {
        failures.push(`${entry.id}: \`${key}\` expected ${JSON.stringify(expected)}, got ${JSON.stringify(decision[key])}`);
      }
    }
  }
  console.log(`typescript cases: ${ran} of ${manifest.length} run, ${manifest.length - ran} not reproducible live`);
  assert.deepEqual(failures, []);
  assert.ok(ran > 0, "no case ran");
});
