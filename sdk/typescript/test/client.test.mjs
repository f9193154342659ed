// @tollgate/sdk against a real sidecar: checks, batches, metering ids, entitlements, upgrade
// hints, and the fallback when the sidecar cannot be reached.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { createServer as createTcpServer } from "node:net";

import { TollgateClient, TollgateError, newEventId, VERSION } from "../dist/index.js";
import { freePort, startSidecar } from "./sidecar.mjs";

let sidecar;
let client;

before(async () => {
  sidecar = await startSidecar();
  client = new TollgateClient({ baseUrl: sidecar.url });
});

after(async () => {
  await sidecar?.stop();
});

// hooli is on the free plan with no expiry, so these answers do not depend on the date.
test("check allows and denies with a reason and an upgrade hint", async () => {
  const allowed = await client.check({ account: "hooli", feature: "reports" });
  assert.equal(allowed.allow, true);
  assert.equal(allowed.reason, "ok");
  assert.equal(allowed.fallback, false);
  assert.equal(typeof allowed.revision, "number");
  const denied = await client.check({ account: "hooli", feature: "sso" });
  assert.equal(denied.allow, false);
  assert.equal(denied.reason, "not_entitled");
  assert.deepEqual(denied.upgrade, { kind: "plan", id: "business", checkout_url: "https://billing.planwise.example/checkout?account=hooli&plan=business" });
  assert.equal(TollgateClient.upgradeHint(denied), "plan:business");
  assert.equal(TollgateClient.upgradeHint(allowed), undefined);
});

test("batch answers in order", async () => {
  const results = await client.batch([
    { account: "hooli", feature: "reports" },
    { account: "hooli", feature: "reports", user: "nobody" },
    { account: "nobody", feature: "reports" },
  ]);
  assert.deepEqual(results.map((result) => result.reason), ["ok", "unknown_user", "unknown_account"]);
});

test("meter generates a 128-bit id per event and a replayed id counts once", async () => {
  const first = await client.meter({ account: "hooli", meter: "api_calls", amount: 2 });
  assert.match(first.id, /^[0-9a-f]{32}$/);
  assert.equal(first.accepted, true);
  const second = await client.meter({ account: "hooli", meter: "api_calls", amount: 2 });
  assert.notEqual(second.id, first.id);
  const replay = await client.meter({ account: "hooli", meter: "api_calls", amount: 2, id: first.id });
  assert.equal(replay.duplicate, true);
  assert.equal(replay.used, first.used);
  await assert.rejects(client.meter({ account: "hooli", meter: "nothing", amount: 1 }), (error) => {
    assert.ok(error instanceof TollgateError);
    assert.equal(error.status, 400);
    assert.equal(error.code, "unknown_meter");
    return true;
  });
  assert.notEqual(newEventId(), newEventId());
});

test("entitlements list every feature with its upgrade hint", async () => {
  const view = await client.entitlements("hooli");
  assert.equal(view.account, "hooli");
  const sso = view.features.find((feature) => feature.feature === "sso");
  assert.equal(sso.allow, false);
  assert.deepEqual(sso.upgrade, { kind: "plan", id: "business", checkout_url: "https://billing.planwise.example/checkout?account=hooli&plan=business" });
  const analytics = view.features.find((feature) => feature.feature === "advanced_analytics");
  assert.deepEqual(analytics.upgrade, { kind: "addon", id: "analytics_pack", checkout_url: "https://billing.planwise.example/checkout?account=hooli&addon=analytics_pack" });
  await assert.rejects(client.entitlements("nobody"), (error) => error.status === 404 && error.code === "unknown_account");
});

test("an unreachable sidecar fails closed by default, open or loudly when configured", async () => {
  const port = await freePort();
  const options = { baseUrl: `http://127.0.0.1:${port}`, retries: 1, retryBackoffMs: 1 };
  const denied = await new TollgateClient(options).check({ account: "hooli", feature: "reports" });
  assert.deepEqual(denied, { allow: false, reason: "unavailable", fallback: true });
  const allowed = await new TollgateClient({ ...options, fallback: "allow" }).batch([{ account: "a", feature: "b" }]);
  assert.deepEqual(allowed, [{ allow: true, reason: "ok", fallback: true }]);
  await assert.rejects(new TollgateClient({ ...options, fallback: "error" }).check({ account: "a", feature: "b" }), (error) => error.unavailable);
  // Metering never falls back.
  await assert.rejects(new TollgateClient({ ...options, fallback: "allow" }).meter({ account: "a", meter: "b", amount: 1 }));
  assert.throws(() => new TollgateClient({ baseUrl: "ftp://x" }), TollgateError);
});

test("a sidecar that does not answer times out into the fallback", async () => {
  const sockets = [];
  const silent = createTcpServer((socket) => sockets.push(socket));
  await new Promise((resolve) => silent.listen(0, "127.0.0.1", resolve));
  const slow = new TollgateClient({ baseUrl: `http://127.0.0.1:${silent.address().port}`, timeoutMs: 50, retries: 0 });
  const decision = await slow.check({ account: "hooli", feature: "reports" });
  assert.equal(decision.fallback, true);
  await assert.rejects(slow.entitlements("hooli"), (error) => error.code === "timeout");
  sockets.forEach((socket) => socket.destroy());
  await new Promise((resolve) => silent.close(resolve));
});

test("a retried meter event keeps its id", async () => {
  const ids = [];
  const flaky = createServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      ids.push(JSON.parse(body).id);
      response.setHeader("content-type", "application/json");
      if (ids.length === 1) {
        response.statusCode = 503;
        response.end(JSON.stringify({ error: { code: "usage_log_unavailable", message: "try again" } }));
      } else {
        response.end(JSON.stringify({ accepted: true, duplicate: false, used: 1, period_start: "2026-01-01T00:00:00Z", durable: true, revision: 1 }));
      }
    });
  });
  await new Promise((resolve) => flaky.listen(0, "127.0.0.1", resolve));
  const retrying = new TollgateClient({ baseUrl: `http://127.0.0.1:${flaky.address().port}`, retries: 2, retryBackoffMs: 1 });
  const result = await retrying.meter({ account: "hooli", meter: "api_calls", amount: 1 });
  assert.equal(ids.length, 2);
  assert.equal(ids[0], ids[1]);
  assert.equal(result.id, ids[0]);
  await new Promise((resolve) => flaky.close(resolve));
});

test("the version is 0.2.0", () => assert.equal(VERSION, "0.2.0"));
