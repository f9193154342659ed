//! The shared decision cases (`tests/cases/*.toml`) through the Rust client, both over HTTP
//! against a real sidecar and in-process, with the clock pinned to each check's `now`, so
//! the client agrees with the engine on every case.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use common::{TestServer, cases};
use tollgate_client::{CheckRequest, Client, Decision, MeterRequest, SnapshotSource, TrustedKeys};
use tollgate_core::clock::ManualClock;
use tollgate_core::model::SnapshotData;
use tollgate_core::period::parse_rfc3339;
use tollgate_sidecar::usage::{MeterEvent, Recorded};

#[derive(Deserialize)]
struct CheckRequestRow {
    account: String,
    feature: String,
    user: Option<String>,
    region: Option<String>,
    device: Option<String>,
    amount: Option<u64>,
}

/// A client decision in the JSON shape of `/v1/check`, to compare with a case's `expect`.
fn as_json(decision: &Decision) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("allow".into(), json!(decision.allow));
    map.insert("reason".into(), json!(decision.reason.as_str()));
    let optional = [
        ("revision", decision.revision.map(|value| json!(value))),
        ("license", decision.license.as_ref().map(|value| json!(value))),
        ("meter", decision.meter.as_ref().map(|value| json!(value))),
        ("limit", decision.limit.map(|value| json!(value))),
        ("used", decision.used.map(|value| json!(value))),
        ("remaining", decision.remaining.map(|value| json!(value))),
        ("reset_at", decision.reset_at.as_ref().map(|value| json!(value))),
        ("expires_at", decision.expires_at.as_ref().map(|value| json!(value))),
        ("upgrade", decision.upgrade.as_ref().map(|upgrade| serde_json::to_value(upgrade).unwrap())),
        ("grace", decision.grace.then_some(json!(true))),
        ("overage", decision.overage.then_some(json!(true))),
        ("stale", decision.stale.then_some(json!(true))),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            map.insert(key.into(), value);
        }
    }
    Value::Object(map)
}

/// Expectations about the engine itself rather than a check's answer.
const ENGINE_ONLY: &[&str] = &["meter_limit"];

fn mismatches(label: &str, expect: &toml::value::Table, actual: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    for (key, expected) in expect {
        // `meter_limit` is what `/v1/meter` would apply (engine::meter_limit), not a field of a
        // check's answer: the engine runner (tests/cases.rs) checks it.
        if ENGINE_ONLY.contains(&key.as_str()) {
            continue;
        }
        let expected = serde_json::to_value(expected).unwrap();
        let found = actual.get(key);
        if !cases::meets(&expected, found) {
            failures.push(format!("{label}: `{key}` expected {expected}, got {found:?}; whole answer {actual}"));
        }
    }
    failures
}

fn period_start(data: &SnapshotData, meter: &str, now: i64) -> i64 {
    let meter_idx = data.meter_index[meter] as usize;
    data.meters[meter_idx].period.window(now).start
}

fn request(row: &CheckRequestRow) -> CheckRequest {
    CheckRequest {
        account: row.account.clone(),
        feature: row.feature.clone(),
        user: row.user.clone(),
        region: row.region.clone(),
        device: row.device.clone(),
        amount: row.amount,
    }
}

/// Runs one case file both ways; returns failures, how many checks the file holds, and how
/// many ran in each mode.
async fn run_file(path: &Path) -> (Vec<String>, usize, usize, usize) {
    let (case, data) = cases::load(path);
    let clock = Arc::new(ManualClock::new(0));
    let server = TestServer::start_at(Some(common::signed_test(&data, 7)), 0, |_| {}).await;
    let remote = Client::new(&format!("http://{}", server.addr)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let snapshot_path = dir.path().join("snapshot.tgs");
    std::fs::write(&snapshot_path, common::signed(&data, 7, &common::test_key(1))).unwrap();
    let local = Client::in_process_with_clock(
        SnapshotSource::File { path: snapshot_path, poll: Duration::from_secs(60) },
        TrustedKeys::new([common::test_key(1).verifying_key()]),
        Arc::clone(&clock) as Arc<dyn tollgate_core::clock::Clock>,
    )
    .await
    .unwrap();

    let (mut failures, mut n_remote, mut n_local) = (Vec::new(), 0, 0);
    for check in &case.checks {
        let now_text = check.now(&case);
        let row: CheckRequestRow =
            check.request.clone().try_into().unwrap_or_else(|error| panic!("{}: {}: {error}", path.display(), check.name));
        let now = parse_rfc3339(now_text).unwrap();
        clock.set_ms(now * 1000);
        server.clock.set_ms(now * 1000);
        // Preset usage as the engine runner does: the same count in whatever period `now` is.
        // The sidecar's store takes it directly, past any limit; the in-process client only
        // through `meter`, which refuses what a hard limit forbids, so such checks are skipped.
        let mut local_ok = true;
        for preset in case.usage.iter().filter(|preset| preset.account == row.account) {
            let start = period_start(&data, &preset.meter, now);
            let id = format!("preset-{}-{start}", preset.meter);
            let event = MeterEvent {
                account: &preset.account,
                meter: &preset.meter,
                event_id: &id,
                amount: preset.used,
                period_start: start,
                current_period_start: start,
                hard_limit: None,
                local_cap: None,
                now,
            };
            assert!(matches!(server.sidecar.usage().record(&event, |_| {}), Recorded::Outcome(_)));
            let metered = local.meter(&MeterRequest::new(&preset.account, &preset.meter, preset.used).id(id)).await.unwrap();
            local_ok &= metered.accepted;
        }
        let label = format!("{} / {}", path.display(), check.name);
        let decision = remote.check(&request(&row)).await.unwrap();
        failures.extend(mismatches(&format!("http: {label}"), &check.expect, &as_json(&decision)));
        n_remote += 1;
        if local_ok {
            let decision = local.check(&request(&row)).await.unwrap();
            failures.extend(mismatches(&format!("in-process: {label}"), &check.expect, &as_json(&decision)));
            n_local += 1;
        }
    }
    server.stop().await;
    (failures, case.checks.len(), n_remote, n_local)
}

#[tokio::test]
async fn every_decision_case_agrees_through_the_rust_client() {
    let (mut failures, mut n_remote, mut n_local, mut n_total) = (Vec::new(), 0, 0, 0);
    for path in &cases::case_paths() {
        let (file_failures, total, remote, local) = run_file(path).await;
        n_total += total;
        failures.extend(file_failures);
        n_remote += remote;
        n_local += local;
    }
    println!("rust client cases: {n_remote}/{n_total} over HTTP, {n_local}/{n_total} in-process");
    assert!(failures.is_empty(), "{} failing expectations:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(n_remote, n_total, "every case runs over HTTP");
    assert!(n_local * 10 >= n_total * 9, "most cases run in-process ({n_local}/{n_total})");
}
