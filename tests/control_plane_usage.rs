//! Usage against a real control plane on port 0 over real HTTP: ingestion (counting,
//! dedup across and within batches, per-event rejection, envelope errors that write nothing,
//! scopes), the sidecars' cursor feed and its paging, late events in their own period, the
//! account usage answer with plan limits, the billing export, analytics, and a restart that
//! keeps totals, dedup and the webhook outbox (webhooks themselves: `control_plane_webhooks.rs`).
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::time::Duration;

use serde_json::{Value, json};

use common::Client;
use control_plane_support::{TestControlPlane, get, post};
use tollgate_control_plane::webhooks::WebhookConfig;
use tollgate_core::model::Period;
use tollgate_core::period::format_rfc3339;

fn now() -> i64 {
    tollgate_core::clock::system_now_ms().div_euclid(1000)
}

fn at_now() -> String {
    format_rfc3339(now())
}

fn event(account: &str, meter: &str, id: &str, amount: u64, at: &str) -> Value {
    json!({"account": account, "meter": meter, "id": id, "amount": amount, "at": at})
}

fn batch(sidecar: &str, since: u64, events: Vec<Value>) -> Value {
    json!({"sidecar": sidecar, "since": since, "events": events})
}

async fn new_account(client: &mut Client, admin: &str, account: &str, plan: &str) {
    let order = json!({"order_id": format!("order-{account}"), "action": "new", "account": account, "plan": plan});
    let reply = post(client, "/v1/orders", admin, &order).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

async fn ingest(client: &mut Client, key: &str, body: &Value) -> Value {
    let reply = post(client, "/v1/usage", key, body).await;
    assert_eq!(reply.status, 200, "{body}: {}", reply.text());
    reply.json()
}

/// The current-period row of `meter` in an account's usage answer.
fn meter_row<'a>(usage: &'a Value, meter: &str) -> &'a Value {
    usage["meters"].as_array().unwrap().iter().find(|row| row["meter"] == meter).unwrap_or_else(|| panic!("no `{meter}` in {usage}"))
}

fn totals(answer: &Value) -> Vec<(String, String, u64)> {
    answer["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|total| {
            (total["account"].as_str().unwrap().to_string(), total["meter"].as_str().unwrap().to_string(), total["used"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn ingestion_counts_dedups_and_rejects_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    let at = at_now();

    let first = batch(
        "pod-a",
        0,
        vec![
            event("acme", "api_calls", "e-1", 3, &at),
            event("acme", "api_calls", "e-2", 4, &at),
            // The same id twice in one batch counts once.
            event("acme", "api_calls", "e-2", 4, &at),
            event("ghost", "api_calls", "e-3", 1, &at),
            event("acme", "teleports", "e-4", 1, &at),
            // The same id on another meter is another event.
            event("acme", "exports", "e-1", 2, &at),
        ],
    );
    let answer = ingest(&mut client, &sidecar, &first).await;
    assert_eq!((answer["counted"].as_u64(), answer["duplicates"].as_u64()), (Some(3), Some(1)), "{answer}");
    let rejected = answer["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{answer}");
    assert_eq!(rejected[0], json!({"id": "e-3", "account": "ghost", "meter": "api_calls", "error": "account `ghost` does not exist"}));
    assert_eq!(rejected[1]["error"], "meter `teleports` is not in the catalog");
    let mut sent = totals(&answer);
    sent.sort();
    assert_eq!(sent, [("acme".into(), "api_calls".into(), 7), ("acme".into(), "exports".into(), 2)]);

    // A replayed batch counts nothing and reports every known event as a duplicate.
    let replay = ingest(&mut client, &sidecar, &first).await;
    assert_eq!((replay["counted"].as_u64(), replay["duplicates"].as_u64()), (Some(0), Some(4)), "{replay}");
    assert_eq!(replay["rejected"].as_array().unwrap().len(), 2);
    let usage = get(&mut client, "/v1/accounts/acme/usage", &admin).await.json();
    assert_eq!(meter_row(&usage, "api_calls")["used"], 7);
    assert_eq!(meter_row(&usage, "exports")["used"], 2);

    // An admin key may post too; the sidecar's batch time is recorded for status.
    assert_eq!(post(&mut client, "/v1/usage", &admin, &batch("pod-b", 0, vec![])).await.status, 200);
    let sidecars = get(&mut client, "/v1/usage/sidecars", &admin).await.json();
    let names: Vec<&str> = sidecars["sidecars"].as_array().unwrap().iter().map(|record| record["sidecar"].as_str().unwrap()).collect();
    assert_eq!(names, ["pod-a", "pod-b"]);
    assert_eq!(sidecars["sidecars"][0]["batches"], 2);
    server.stop().await;
}

#[tokio::test]
async fn envelope_errors_are_named_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    let at = at_now();
    let good = event("acme", "api_calls", "ok-1", 1, &at);
    let too_many: Vec<Value> =
        (0..10_001).map(|n| json!({"account": "a", "meter": "m", "id": n.to_string(), "amount": 1, "at": "x"})).collect();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"events": [good.clone()]}), "missing field `sidecar`"),
        (json!({"sidecar": "pod a", "events": [good.clone()]}), "`sidecar` value `pod a`"),
        (json!({"sidecar": "x".repeat(65)}), "`sidecar` value"),
        (json!({"sidecar": "pod-a", "events": [good.clone()], "colour": "red"}), "unknown field `colour`"),
        (
            json!({"sidecar": "pod-a", "events": [{"account": "acme", "meter": "api_calls", "id": "q", "amount": "3", "at": at}]}),
            "`events`",
        ),
        (json!({"sidecar": "pod-a", "since": -1}), "`since`"),
        (json!({"sidecar": "pod-a", "events": too_many}), "at most 10000"),
        (json!({"sidecar": "pod-a", "events": [good.clone()], "decisions_at": "soon"}), "`decisions_at` value `soon`"),
    ];
    for (body, needle) in cases {
        let reply = post(&mut client, "/v1/usage", &sidecar, &body).await;
        assert_eq!(reply.status, 400, "{needle}: {}", reply.text());
        let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{needle}: {message}");
    }
    let malformed = client.send("POST", "/v1/usage", "{\"sidecar\": ", &[("authorization", &format!("Bearer {sidecar}"))]).await;
    assert_eq!((malformed.status, malformed.json()["error"]["code"].as_str()), (400, Some("invalid_json")));

    // Nothing was written: no usage, no sequence used, no sidecar recorded; the good event's
    // id is still free.
    assert_eq!(meter_row(&get(&mut client, "/v1/accounts/acme/usage", &admin).await.json(), "api_calls")["used"], 0);
    assert!(get(&mut client, "/v1/usage/sidecars", &admin).await.json()["sidecars"].as_array().unwrap().is_empty());
    let answer = ingest(&mut client, &sidecar, &batch("pod-a", 0, vec![good])).await;
    assert_eq!((answer["counted"].as_u64(), answer["cursor"].as_u64()), (Some(1), Some(1)), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn only_unbound_sidecar_and_admin_keys_post_usage() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let acme_key = server.key("account", Some("acme"));
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    new_account(&mut client, &admin, "hooli", "free").await;
    let body = batch("pod-a", 0, vec![event("acme", "api_calls", "e-1", 1, &at_now())]);

    assert_eq!(client.post("/v1/usage", &body).await.status, 401);
    assert_eq!(post(&mut client, "/v1/usage", "tg_0000000000000000_nope", &body).await.status, 401);
    assert_eq!(post(&mut client, "/v1/usage", &integration, &body).await.status, 403);
    assert_eq!(post(&mut client, "/v1/usage", &acme_key, &body).await.status, 403);
    assert_eq!(meter_row(&get(&mut client, "/v1/accounts/acme/usage", &admin).await.json(), "api_calls")["used"], 0);

    // Reads: an account key sees its own usage; another account is answered as unknown.
    assert_eq!(get(&mut client, "/v1/accounts/acme/usage", &acme_key).await.status, 200);
    let other = get(&mut client, "/v1/accounts/hooli/usage", &acme_key).await;
    let unknown = get(&mut client, "/v1/accounts/nobody/usage", &admin).await;
    assert_eq!((other.status, unknown.status), (404, 404));
    assert_eq!(other.json()["error"]["code"], unknown.json()["error"]["code"]);
    assert_eq!(get(&mut client, "/v1/accounts/acme/usage", &integration).await.status, 200);
    // Exports: an account key only for itself; analytics and deliveries are not for it.
    assert_eq!(get(&mut client, "/v1/usage/export", &acme_key).await.status, 200);
    assert_eq!(get(&mut client, "/v1/usage/export?account=hooli", &acme_key).await.status, 403);
    assert_eq!(get(&mut client, "/v1/analytics/features", &acme_key).await.status, 403);
    assert_eq!(get(&mut client, "/v1/analytics/limits", &acme_key).await.status, 403);
    assert_eq!(get(&mut client, "/v1/webhooks/deliveries", &integration).await.status, 403);
    server.stop().await;
}

#[tokio::test]
async fn the_cursor_feed_tells_every_sidecar_of_changes_since_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    for account in ["acme", "hooli", "initech"] {
        new_account(&mut client, &admin, account, "team").await;
    }
    let at = at_now();
    let from_a = ingest(
        &mut client,
        &sidecar,
        &batch("pod-a", 0, vec![event("acme", "api_calls", "a-1", 5, &at), event("hooli", "api_calls", "a-2", 6, &at)]),
    )
    .await;
    assert_eq!(totals(&from_a), [("acme".into(), "api_calls".into(), 5), ("hooli".into(), "api_calls".into(), 6)]);

    // Another pod, from scratch, learns what pod-a counted.
    let from_b = ingest(&mut client, &sidecar, &batch("pod-b", 0, vec![])).await;
    assert_eq!(totals(&from_b), totals(&from_a));
    assert_eq!((from_b["cursor"].as_u64(), from_b["more"].as_bool()), (from_a["cursor"].as_u64(), Some(false)));
    let cursor_b = from_b["cursor"].as_u64().unwrap();

    // pod-a counts more for acme; pod-b, at its cursor, hears of that change only.
    ingest(&mut client, &sidecar, &batch("pod-a", from_a["cursor"].as_u64().unwrap(), vec![event("acme", "api_calls", "a-3", 1, &at)]))
        .await;
    let again = ingest(&mut client, &sidecar, &batch("pod-b", cursor_b, vec![event("initech", "api_calls", "b-1", 2, &at)])).await;
    assert_eq!(totals(&again), [("acme".into(), "api_calls".into(), 6), ("initech".into(), "api_calls".into(), 2)]);
    let idle = ingest(&mut client, &sidecar, &batch("pod-b", again["cursor"].as_u64().unwrap(), vec![])).await;
    assert!(totals(&idle).is_empty());
    assert_eq!(idle["cursor"], again["cursor"]);
    server.stop().await;
}

#[tokio::test]
async fn more_pages_through_totals_past_the_page_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start_configured(dir.path(), |config| config.usage_page = 2).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    let at = at_now();
    let mut events = Vec::new();
    for n in 0..5 {
        new_account(&mut client, &admin, &format!("acct-{n}"), "team").await;
        events.push(event(&format!("acct-{n}"), "api_calls", "e", n + 1, &at));
    }
    let first = ingest(&mut client, &sidecar, &batch("pod-a", 0, events)).await;
    assert_eq!((first["totals"].as_array().unwrap().len(), first["more"].as_bool()), (2, Some(true)));
    let mut seen: Vec<(String, String, u64)> = totals(&first);
    let mut cursor = first["cursor"].as_u64().unwrap();
    loop {
        let page = ingest(&mut client, &sidecar, &batch("pod-a", cursor, vec![])).await;
        seen.extend(totals(&page));
        assert!(page["cursor"].as_u64().unwrap() > cursor, "the cursor moves on every page: {page}");
        cursor = page["cursor"].as_u64().unwrap();
        if page["more"] == false {
            break;
        }
    }
    let used: Vec<u64> = seen.iter().map(|(_, _, used)| *used).collect();
    assert_eq!(used, [1, 2, 3, 4, 5]);
    server.stop().await;
}

#[tokio::test]
async fn a_late_event_counts_in_its_own_period_and_shows_in_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    let this_month = Period::Month.window(now());
    let last_month = Period::Month.window(this_month.start - 86_400);
    // Acknowledged by a sidecar a day before this month began, delivered only now.
    let late = format_rfc3339(this_month.start - 86_400);
    let answer = ingest(
        &mut client,
        &sidecar,
        &batch("pod-a", 0, vec![event("acme", "api_calls", "late-1", 40, &late), event("acme", "api_calls", "now-1", 2, &at_now())]),
    )
    .await;
    assert_eq!(answer["counted"], 2);
    // Last month's total is stored but not sent: sidecars only need current periods.
    assert_eq!(totals(&answer), [("acme".into(), "api_calls".into(), 2)]);
    assert_eq!(answer["cursor"], 2, "{answer}");

    let current = get(&mut client, "/v1/accounts/acme/usage", &admin).await.json();
    assert_eq!(current["meters"].as_array().unwrap().iter().filter(|row| row["meter"] == "api_calls").count(), 1);
    assert_eq!(meter_row(&current, "api_calls")["used"], 2);
    let history = get(&mut client, "/v1/accounts/acme/usage?history=1", &admin).await.json();
    let calls: Vec<(&str, u64)> = history["meters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["meter"] == "api_calls")
        .map(|row| (row["period_start"].as_str().unwrap(), row["used"].as_u64().unwrap()))
        .collect();
    let (this_start, last_start) = (format_rfc3339(this_month.start), format_rfc3339(last_month.start));
    assert_eq!(calls, [(this_start.as_str(), 2), (last_start.as_str(), 40)]);
    let previous = history["meters"].as_array().unwrap().iter().find(|row| row["period_start"] == last_start.as_str()).unwrap();
    assert_eq!(previous["reset_at"], this_start.as_str());

    let range = format!("/v1/accounts/acme/usage?from={}&to={}", last_start, this_start);
    let ranged = get(&mut client, &range, &admin).await.json();
    assert_eq!(ranged["meters"].as_array().unwrap().len(), 1, "{ranged}");
    assert_eq!(ranged["meters"][0]["used"], 40);
    let bad = get(&mut client, "/v1/accounts/acme/usage?history=1&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z", &admin).await;
    assert_eq!(bad.status, 400);
    assert_eq!(get(&mut client, "/v1/accounts/acme/usage?from=2026-01-01T00:00:00Z", &admin).await.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn account_usage_carries_the_limits_of_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    new_account(&mut client, &admin, "hooli", "free").await;
    let now = now();

    let acme = get(&mut client, "/v1/accounts/acme/usage", &admin).await.json();
    assert_eq!(acme["account"], "acme");
    let meters: Vec<&str> = acme["meters"].as_array().unwrap().iter().map(|row| row["meter"].as_str().unwrap()).collect();
    assert_eq!(meters, ["api_calls", "exports", "storage_gb"]);
    let month = Period::Month.window(now);
    assert_eq!(
        meter_row(&acme, "api_calls"),
        &json!({
            "meter": "api_calls", "period_start": format_rfc3339(month.start), "reset_at": format_rfc3339(month.reset_at.unwrap()),
            "used": 0, "limit": 50000, "soft_limit": null, "hard_limit": 50000,
        })
    );
    let storage = meter_row(&acme, "storage_gb");
    assert_eq!(
        (storage["limit"].as_u64(), storage["soft_limit"].as_u64(), storage["hard_limit"].as_u64()),
        (Some(100), Some(50), Some(100))
    );
    assert_eq!((storage["period_start"].as_str(), storage["reset_at"].is_null()), (Some("1970-01-01T00:00:00Z"), true));
    assert_eq!(meter_row(&acme, "exports")["reset_at"], format_rfc3339(Period::Day.window(now).reset_at.unwrap()));

    let hooli = get(&mut client, "/v1/accounts/hooli/usage", &admin).await.json();
    assert_eq!(
        (meter_row(&hooli, "api_calls")["limit"].as_u64(), meter_row(&hooli, "api_calls")["hard_limit"].as_u64()),
        (Some(1000), Some(1000))
    );
    // Free has no exports limit at all.
    assert!(meter_row(&hooli, "exports")["limit"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn export_as_csv_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let sidecar = server.key("sidecar", None);
    let hooli_key = server.key("account", Some("hooli"));
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    new_account(&mut client, &admin, "hooli", "free").await;
    let at = at_now();
    let events = vec![
        event("hooli", "api_calls", "h-1", 10, &at),
        event("acme", "storage_gb", "a-2", 3, &at),
        event("acme", "api_calls", "a-1", 7, &at),
        event("acme", "api_calls", "a-3", 1, &at),
    ];
    ingest(&mut client, &sidecar, &batch("pod-1", 0, events)).await;
    let month = Period::Month.window(now());
    let (start, end) = (format_rfc3339(month.start), format_rfc3339(month.reset_at.unwrap()));

    let csv = get(&mut client, "/v1/usage/export?format=csv", &integration).await;
    assert_eq!(csv.status, 200);
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let text = csv.text();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(
        lines,
        [
            "account,meter,unit,period,period_start,period_end,used,limit",
            &format!("acme,api_calls,call,month,{start},{end},8,50000"),
            "acme,storage_gb,GB,never,1970-01-01T00:00:00Z,,3,100",
            &format!("hooli,api_calls,call,month,{start},{end},10,1000"),
            "",
        ]
    );

    let json_export = get(&mut client, &format!("/v1/usage/export?format=json&from={start}&to={end}&account=acme"), &admin).await;
    assert_eq!(json_export.headers["content-type"], "application/json");
    let rows = json_export.json()["rows"].clone();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(
        rows[0],
        json!({"account": "acme", "meter": "api_calls", "unit": "call", "period": "month", "period_start": start, "period_end": end, "used": 8, "limit": 50000})
    );
    assert!(rows[1]["period_end"].is_null());

    // An account key exports its own rows only, by default.
    let own = get(&mut client, "/v1/usage/export", &hooli_key).await.json();
    let accounts: Vec<&str> = own["rows"].as_array().unwrap().iter().map(|row| row["account"].as_str().unwrap()).collect();
    assert_eq!(accounts, ["hooli"]);

    let raw = get(&mut client, "/v1/usage/export?format=csv&granularity=events&account=acme", &admin).await.text();
    let raw_lines: Vec<&str> = raw.trim_end().split("\r\n").collect();
    assert_eq!(raw_lines[0], "account,meter,event_id,amount,at,period_start,received_at,sidecar");
    let ids: Vec<&str> = raw_lines[1..].iter().map(|line| line.split(',').nth(2).unwrap()).collect();
    assert_eq!(ids, ["a-1", "a-3", "a-2"]);
    assert!(raw_lines[1].starts_with(&format!("acme,api_calls,a-1,7,{at},{start},")) && raw_lines[1].ends_with(",pod-1"), "{raw}");

    assert_eq!(get(&mut client, "/v1/usage/export?format=xml", &admin).await.status, 400);
    assert_eq!(get(&mut client, &format!("/v1/usage/export?from={end}&to={start}"), &admin).await.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn analytics_of_features_and_of_accounts_near_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "business").await;
    new_account(&mut client, &admin, "hooli", "free").await;
    let at = at_now();
    let decisions = json!([
        {"account": "acme", "feature": "sso", "reason": "ok", "count": 12, "users": ["alice", "bob"]},
        {"account": "hooli", "feature": "sso", "reason": "not_entitled", "count": 3, "users": ["carol"]},
        {"account": "hooli", "feature": "sso", "reason": "unknown_user", "count": 1},
        {"account": "ghost", "feature": "sso", "reason": "ok", "count": 100, "users": ["x"]},
        {"account": "acme", "feature": "teleport", "reason": "unknown_feature", "count": 5},
    ]);
    let body = json!({"sidecar": "pod-1", "decisions": decisions, "decisions_at": at,
        "events": [event("hooli", "api_calls", "h-1", 850, &at), event("acme", "api_calls", "a-1", 10, &at)]});
    ingest(&mut client, &sidecar, &body).await;
    // A second pod saw alice again and dave: users are distinct, counts add up.
    let more = json!({"sidecar": "pod-2", "decisions": [{"account": "acme", "feature": "sso", "reason": "ok", "count": 3, "users": ["alice", "dave"]}]});
    ingest(&mut client, &sidecar, &more).await;

    let features = get(&mut client, "/v1/analytics/features", &integration).await.json();
    let month = Period::Month.window(now());
    assert_eq!(
        (features["from"].as_str().unwrap(), features["to"].as_str().unwrap()),
        (format_rfc3339(month.start).as_str(), format_rfc3339(month.reset_at.unwrap()).as_str())
    );
    let sso = features["features"].as_array().unwrap().iter().find(|feature| feature["feature"] == "sso").unwrap();
    assert_eq!(
        sso,
        &json!({"feature": "sso", "accounts": 1, "users": 4, "allowed": 15, "denied": 4, "denied_by_reason": {"not_entitled": 3, "unknown_user": 1}})
    );
    let projects = features["features"].as_array().unwrap().iter().find(|feature| feature["feature"] == "projects").unwrap();
    assert_eq!((projects["allowed"].as_u64(), projects["users"].as_u64()), (Some(0), Some(0)));
    let earlier = get(&mut client, "/v1/analytics/features?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z", &admin).await.json();
    assert!(earlier["features"].as_array().unwrap().iter().all(|feature| feature["allowed"] == 0 && feature["users"] == 0));

    let limits = get(&mut client, "/v1/analytics/limits", &integration).await.json();
    assert_eq!(
        limits["accounts"],
        json!([{"account": "hooli", "meter": "api_calls", "period_start": format_rfc3339(month.start), "used": 850, "limit": 1000,
                "kind": "hard", "ratio": 0.85, "over": false}])
    );
    let all = get(&mut client, "/v1/analytics/limits?threshold=0.00001", &admin).await.json();
    let listed: Vec<(&str, f64)> =
        all["accounts"].as_array().unwrap().iter().map(|row| (row["account"].as_str().unwrap(), row["ratio"].as_f64().unwrap())).collect();
    assert_eq!(listed, [("hooli", 0.85), ("acme", 10.0 / 500_000.0)]);
    for bad in ["0", "-1", "11", "lots"] {
        assert_eq!(get(&mut client, &format!("/v1/analytics/limits?threshold={bad}"), &admin).await.status, 400, "{bad}");
    }
    // Without a webhook URL nothing is enqueued, however close to the limit.
    assert!(get(&mut client, "/v1/webhooks/deliveries", &admin).await.json()["deliveries"].as_array().unwrap().is_empty());
    server.stop().await;
}

/// Polls the outbox until `accept` holds for its notifications, or panics after 30 s.
async fn wait_for(client: &mut Client, admin: &str, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let deliveries = get(client, "/v1/webhooks/deliveries", admin).await.json()["deliveries"].clone();
        let deliveries = deliveries.as_array().unwrap().clone();
        if accept(&deliveries) {
            return deliveries;
        }
        assert!(tokio::time::Instant::now() < deadline, "the outbox did not get there: {deliveries:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SECRET: &[u8] = b"whsec-test-1";

#[tokio::test]
async fn a_restart_keeps_totals_dedup_the_sequence_and_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here, so the notification stays in the outbox.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let webhook = WebhookConfig::new(&format!("http://{closed}/hooks"), SECRET.to_vec()).unwrap();
    let configure = |webhook: WebhookConfig| move |config: &mut tollgate_control_plane::Config| config.webhook = Some(webhook);
    let server = TestControlPlane::start_configured(dir.path(), configure(webhook.clone())).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "hooli", "free").await;
    let at = at_now();
    let first = batch("pod-1", 0, vec![event("hooli", "api_calls", "e-1", 900, &at), event("hooli", "exports", "e-2", 1, &at)]);
    let answer = ingest(&mut client, &sidecar, &first).await;
    let cursor = answer["cursor"].as_u64().unwrap();
    let tried = wait_for(&mut client, &admin, |deliveries| {
        deliveries.len() == 3 && deliveries.iter().all(|delivery| delivery["attempts"].as_u64() >= Some(1))
    })
    .await;
    assert!(tried[0]["last_error"].as_str().unwrap().contains("cannot connect"), "{tried:?}");
    server.stop_keeping_data().await;

    let restarted = TestControlPlane::start_configured(dir.path(), configure(webhook)).await;
    let mut client = restarted.client().await;
    let usage = get(&mut client, "/v1/accounts/hooli/usage", &admin).await.json();
    assert_eq!(meter_row(&usage, "api_calls")["used"], 900);
    let replay = ingest(&mut client, &sidecar, &first).await;
    assert_eq!((replay["counted"].as_u64(), replay["duplicates"].as_u64()), (Some(0), Some(2)), "{replay}");
    let feed = ingest(&mut client, &sidecar, &batch("pod-2", 0, vec![])).await;
    assert_eq!(feed["cursor"].as_u64(), Some(cursor));
    assert_eq!(totals(&feed).len(), 2);
    let next = ingest(&mut client, &sidecar, &batch("pod-1", cursor, vec![event("hooli", "api_calls", "e-3", 1, &at)])).await;
    assert!(next["cursor"].as_u64().unwrap() > cursor, "the usage sequence carries on: {next}");
    // 900 of 1000 reached the catalog's thresholds 75 and 90 of `api_calls`, once each.
    // The flag's endpoint takes every event type: the order is in the outbox too.
    let outbox = get(&mut client, "/v1/webhooks/deliveries", &admin).await.json()["deliveries"].clone();
    assert_eq!(outbox[0]["type"], "order.applied", "{outbox}");
    let outbox =
        Value::Array(outbox.as_array().unwrap().iter().filter(|delivery| delivery["type"] == "usage.threshold").cloned().collect());
    assert_eq!(outbox.as_array().unwrap().len(), 2, "{outbox}");
    let thresholds: Vec<u64> =
        outbox.as_array().unwrap().iter().map(|delivery| delivery["message"]["data"]["threshold"].as_u64().unwrap()).collect();
    assert_eq!(thresholds, [75, 90]);
    assert_eq!((outbox[0]["endpoint_id"].as_str(), outbox[0]["status"].as_str()), (Some("configured"), Some("pending")));
    assert_eq!(outbox[0]["id"], tried[1]["id"]);
    assert!(outbox[0]["attempts"].as_u64().unwrap() >= tried[1]["attempts"].as_u64().unwrap(), "{outbox}");
    restarted.stop().await;
}

/// One bad record never blocks the others: each is judged by the shared record rules, reported
/// with what is wrong, and left out, and the rest of the batch counts. Huge decision counts
/// cannot break the analytics afterwards.
#[tokio::test]
async fn bad_records_are_reported_one_by_one_and_the_rest_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    new_account(&mut client, &admin, "acme", "team").await;
    let at = at_now();
    let future = format_rfc3339(now() + 3600);
    let events = vec![
        event("acme", "api_calls", "good-1", 2, &at),
        event("acme", "api_calls", "zero", 0, &at),
        event("acme", "api_calls", "huge", 1 << 63, &at),
        event("acme", "api_calls", "", 1, &at),
        event("acme", "api_calls", &"i".repeat(257), 1, &at),
        event("acme", "api_calls", "future", 1, &future),
        event("acme", "api_calls", "ancient", 1, "0000-01-01T00:00:00Z"),
        event("acme", "api_calls", "words", 1, "yesterday"),
        event("acme", "api_calls", "good-2", 3, &at),
    ];
    let decisions = vec![
        json!({"account": "acme", "feature": "reports", "reason": "ok", "count": 5, "users": ["ann"]}),
        json!({"account": "acme", "feature": "reports", "reason": "maybe", "count": 1}),
        json!({"account": "acme", "feature": "reports", "reason": "ok", "count": 1, "users": [""]}),
        json!({"account": "acme", "feature": "reports", "reason": "ok", "count": 1, "users": ["x".repeat(300)]}),
        json!({"account": "acme", "feature": "reports", "reason": "ok", "count": 1, "users": vec!["u"; 1001]}),
        json!({"account": "acme", "feature": "reports", "reason": "ok", "count": u64::MAX}),
    ];
    let body = json!({"sidecar": "pod-a", "events": events, "decisions": decisions});
    let answer = ingest(&mut client, &sidecar, &body).await;
    assert_eq!(answer["counted"], 2, "{answer}");
    let rejected: Vec<(&str, &str)> =
        answer["rejected"].as_array().unwrap().iter().map(|item| (item["id"].as_str().unwrap(), item["error"].as_str().unwrap())).collect();
    let expected = [
        ("zero", "`events[1].amount` must be from 1"),
        ("huge", "`events[2].amount` must be from 1 to 9007199254740992"),
        ("", "`events[3].id` must be 1 to 256 bytes"),
        ("iii", "`events[4].id`"),
        ("future", "in the future"),
        ("ancient", "before 2000-01-01"),
        ("words", "not an RFC 3339 timestamp"),
    ];
    assert_eq!(rejected.len(), expected.len(), "{answer}");
    for ((id, error), (want_id, want)) in rejected.iter().zip(expected) {
        assert!(id.starts_with(want_id) && error.contains(want), "{id}: {error} (wanted {want})");
    }
    let refused: Vec<&str> = answer["rejected_decisions"].as_array().unwrap().iter().map(|item| item["error"].as_str().unwrap()).collect();
    assert_eq!(refused.len(), 5, "{answer}");
    for (error, want) in refused.iter().zip([
        "reason` value `maybe`",
        "`decisions[2].users` name ``",
        "`decisions[3].users` name",
        "at most 1000",
        "`decisions[5].count` must be at most",
    ]) {
        assert!(error.contains(want), "{error} (wanted {want})");
    }
    assert_eq!(meter_row(&get(&mut client, "/v1/accounts/acme/usage", &admin).await.json(), "api_calls")["used"], 5);

    // Counts near the top of the integer range, stored over several batches, saturate: the
    // analytics keep answering.
    for n in 0..3 {
        let row = json!({"account": "acme", "feature": "reports", "reason": "ok", "count": 1u64 << 53});
        ingest(&mut client, &sidecar, &json!({"sidecar": format!("pod-{n}"), "decisions": [row]})).await;
    }
    let analytics = get(&mut client, "/v1/analytics/features", &admin).await;
    assert_eq!(analytics.status, 200, "{}", analytics.text());
    server.stop().await;
}
