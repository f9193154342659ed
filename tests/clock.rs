//! Time-dependent sidecar behaviour on a `ManualClock` that the tests move instead of
//! sleeping: answers turning stale past `--max-staleness` on every protocol, a usage period
//! rolling over, the late-arrival window and the dedupe window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;
use tollgate_sidecar::config::Staleness;

/// Unix ms of an RFC 3339 instant.
fn at(text: &str) -> i64 {
    tollgate_core::period::parse_rfc3339(text).unwrap() * 1000
}

/// Test snapshots are created at this instant (see `common::signed`).
const CREATED_AT_MS: i64 = 1_700_000_000_000;

#[tokio::test]
async fn every_protocol_says_stale_once_the_snapshot_is_past_max_staleness() {
    let staleness = Staleness { max: Duration::from_secs(90), unready_when_stale: false };
    let server = TestServer::start_at(Some(common::signed_test(&common::example_data(), 42)), CREATED_AT_MS + 10_000, |config| {
        config.staleness = Some(staleness);
    })
    .await;
    let mut client = server.client().await;
    let check = json!({"account": "acme", "feature": "sso"});
    let evaluation = json!({"subject": {"type": "user", "id": "alice", "properties": {"account": "acme"}}, "action": {"name": "sso"}});
    let ext_authz_headers = [("x-tollgate-account", "acme"), ("x-tollgate-feature", "sso")];

    let fresh = client.post("/v1/check", &check).await.json();
    assert!(fresh.get("stale").is_none(), "{fresh}");
    let fresh = client.send("GET", "/ext_authz/anything", "", &ext_authz_headers).await.json();
    assert!(fresh.get("stale").is_none(), "{fresh}");
    let fresh = client.post("/access/v1/evaluation", &evaluation).await.json();
    assert!(fresh["context"].get("stale").is_none(), "{fresh}");
    assert_eq!(client.get("/v1/status").await.json()["stale"], false);

    server.clock.advance(Duration::from_secs(81));
    let stale = client.post("/v1/check", &check).await.json();
    assert_eq!(stale["stale"], true, "{stale}");
    let stale = client.send("GET", "/ext_authz/anything", "", &ext_authz_headers).await.json();
    assert_eq!(stale["stale"], true, "ext_authz: {stale}");
    let stale = client.post("/access/v1/evaluation", &evaluation).await.json();
    assert_eq!(stale["context"]["stale"], true, "AuthZEN: {stale}");
    let batch = client.post("/access/v1/evaluations", &json!({"evaluations": [evaluation, evaluation]})).await.json();
    assert!(batch["evaluations"].as_array().unwrap().iter().all(|item| item["context"]["stale"] == true), "{batch}");
    assert_eq!(client.get("/v1/status").await.json()["stale"], true);
    assert_eq!(client.get("/readyz").await.status, 200, "readiness follows staleness only when asked to");
    server.stop().await;
}

#[tokio::test]
async fn usage_starts_from_zero_when_the_period_rolls_over() {
    let server = TestServer::start_at(Some(common::signed_test(&common::example_data(), 42)), at("2026-01-31T23:59:00Z"), |_| {}).await;
    let mut client = server.client().await;
    let january = client.post("/v1/meter", &json!({"account": "hooli", "meter": "api_calls", "amount": 998, "id": "jan-1"})).await.json();
    assert_eq!((january["accepted"].as_bool(), january["used"].as_u64()), (Some(true), Some(998)), "{january}");
    let refused = client.post("/v1/meter", &json!({"account": "hooli", "meter": "api_calls", "amount": 5, "id": "jan-2"})).await.json();
    assert_eq!(refused["accepted"], false, "{refused}");

    server.clock.advance(Duration::from_secs(120));
    let february = client.post("/v1/meter", &json!({"account": "hooli", "meter": "api_calls", "amount": 5, "id": "feb-1"})).await.json();
    assert_eq!((february["accepted"].as_bool(), february["used"].as_u64()), (Some(true), Some(5)), "{february}");
    assert_eq!(february["period_start"], "2026-02-01T00:00:00Z");
    assert_eq!(february["remaining"], 995);
    server.stop().await;
}

#[tokio::test]
async fn a_late_event_is_taken_within_the_window_and_refused_once_the_clock_passes_it() {
    let server = TestServer::start_at(Some(common::signed_test(&common::example_data(), 42)), at("2026-03-10T12:00:00Z"), |config| {
        config.metering.late_arrival_secs = 600;
    })
    .await;
    let mut client = server.client().await;
    let event = |id: &str| json!({"account": "hooli", "meter": "api_calls", "amount": 1, "id": id, "timestamp": "2026-03-10T11:55:00Z"});
    let on_time = client.post("/v1/meter", &event("late-1")).await;
    assert_eq!(on_time.status, 200, "{}", on_time.text());

    server.clock.advance(Duration::from_secs(301));
    let too_late = client.post("/v1/meter", &event("late-2")).await;
    assert_eq!(too_late.status, 400, "{}", too_late.text());
    assert!(too_late.json()["error"]["message"].as_str().unwrap().contains("late-arrival window of 600 s"));
    server.stop().await;
}

#[tokio::test]
async fn event_ids_are_forgotten_past_the_dedupe_window() {
    let server = TestServer::start_at(Some(common::signed_test(&common::example_data(), 42)), at("2026-03-10T12:00:00Z"), |config| {
        config.metering.dedupe_window_secs = 3_600;
    })
    .await;
    let mut client = server.client().await;
    let event = json!({"account": "hooli", "meter": "api_calls", "amount": 1, "id": "once"});
    assert_eq!(client.post("/v1/meter", &event).await.json()["duplicate"], false);
    assert_eq!(client.post("/v1/meter", &event).await.json()["duplicate"], true);

    server.clock.advance(Duration::from_secs(1_800));
    server.sidecar.housekeep();
    assert_eq!(client.post("/v1/meter", &event).await.json()["duplicate"], true, "still inside the window");

    server.clock.advance(Duration::from_secs(1_801));
    server.sidecar.housekeep();
    assert_eq!(client.get("/v1/status").await.json()["usage_event_ids"], 0);
    assert_eq!(client.post("/v1/meter", &event).await.json()["duplicate"], false, "forgotten past the window");
    server.stop().await;
}
