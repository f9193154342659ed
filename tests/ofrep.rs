//! The OpenFeature Remote Evaluation Protocol against a real sidecar on 127.0.0.1:0: single
//! and bulk evaluation, the error codes the protocol names, the context's account fallback,
//! conditional bulk requests and the configuration endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;

/// Hooli is on the free plan with no expiry, so these answers do not depend on the date.
async fn example_server() -> TestServer {
    TestServer::start(Some(common::signed_test(&common::example_data(), 42))).await
}

#[tokio::test]
async fn single_evaluation_maps_allow_and_deny_with_the_reason_and_upgrade_in_metadata() {
    let server = example_server().await;
    let mut client = server.client().await;
    let allowed = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"account": "hooli"}})).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let allowed = allowed.json();
    assert_eq!(allowed["key"], "reports");
    assert_eq!(allowed["value"], true);
    assert_eq!(allowed["reason"], "TARGETING_MATCH");
    assert_eq!(allowed["metadata"]["reason"], "ok");
    assert_eq!(allowed["metadata"]["revision"], 42);
    assert!(allowed["metadata"].get("stale").is_none());

    let denied = client.post("/ofrep/v1/evaluate/flags/sso", &json!({"context": {"account": "hooli"}})).await;
    assert_eq!(denied.status, 200);
    let denied = denied.json();
    assert_eq!(denied["value"], false);
    assert_eq!(denied["reason"], "DISABLED");
    assert_eq!(denied["variant"], "off");
    assert_eq!(denied["metadata"]["reason"], "not_entitled");
    assert_eq!(denied["metadata"]["upgrade"], "plan:business");
    assert_eq!(denied["metadata"]["upgrade_kind"], "plan");
    assert_eq!(denied["metadata"]["upgrade_id"], "business");
    assert_eq!(denied["metadata"]["upgrade_checkout_url"], "https://billing.planwise.example/checkout?account=hooli&plan=business");
    // Metadata stays flat, as OpenFeature requires.
    assert!(denied["metadata"].as_object().unwrap().values().all(|value| !value.is_object() && !value.is_array()));
    server.stop().await;
}

#[tokio::test]
async fn the_account_falls_back_to_the_targeting_key_and_user_region_device_are_read() {
    let server = example_server().await;
    let mut client = server.client().await;
    let by_key = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"targetingKey": "hooli"}})).await.json();
    assert_eq!(by_key["value"], true);
    // `account` wins over `targetingKey` (which OpenFeature often sets to a user id).
    let both = client.post("/ofrep/v1/evaluate/flags/sso", &json!({"context": {"targetingKey": "nobody", "account": "hooli"}})).await;
    assert_eq!(both.json()["metadata"]["reason"], "not_entitled");
    let unknown_user =
        client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"account": "hooli", "user": "nobody"}})).await.json();
    assert_eq!(unknown_user["value"], false);
    assert_eq!(unknown_user["metadata"]["reason"], "unknown_user");
    let unknown_account = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"account": "nobody"}})).await.json();
    assert_eq!(unknown_account["reason"], "DISABLED");
    assert_eq!(unknown_account["metadata"]["reason"], "unknown_account");
    server.stop().await;
}

#[tokio::test]
async fn errors_use_the_protocols_codes_and_statuses() {
    let server = example_server().await;
    let mut client = server.client().await;
    let not_found = client.post("/ofrep/v1/evaluate/flags/teleport", &json!({"context": {"account": "hooli"}})).await;
    assert_eq!(not_found.status, 404);
    assert_eq!(
        not_found.json(),
        json!({"key": "teleport", "errorCode": "FLAG_NOT_FOUND", "errorDetails": "`teleport` is not a feature of the catalog"})
    );
    let missing = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"user": "gavin"}})).await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.json()["errorCode"], "TARGETING_KEY_MISSING");
    let no_context = client.send("POST", "/ofrep/v1/evaluate/flags/reports", "", &[]).await;
    assert_eq!(no_context.status, 400);
    assert_eq!(no_context.json()["errorCode"], "TARGETING_KEY_MISSING");
    let invalid = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"account": ["hooli"]}})).await;
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["errorCode"], "INVALID_CONTEXT");
    let unparsable = client.send("POST", "/ofrep/v1/evaluate/flags/reports", "{", &[]).await;
    assert_eq!(unparsable.status, 400);
    assert_eq!(unparsable.json()["errorCode"], "PARSE_ERROR");
    let wrong_method = client.get("/ofrep/v1/evaluate/flags/reports").await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.headers["allow"], "POST");
    let bulk_missing = client.post("/ofrep/v1/evaluate/flags", &json!({"context": {}})).await;
    assert_eq!(bulk_missing.status, 400);
    assert_eq!(bulk_missing.json()["errorCode"], "TARGETING_KEY_MISSING");
    server.stop().await;
}

#[tokio::test]
async fn bulk_evaluation_answers_every_feature_with_an_etag_and_304_when_unchanged() {
    let server = example_server().await;
    let mut client = server.client().await;
    let body = json!({"context": {"account": "hooli"}});
    let first = client.post("/ofrep/v1/evaluate/flags", &body).await;
    assert_eq!(first.status, 200);
    let flags = first.json()["flags"].as_array().unwrap().clone();
    let n_features = server.sidecar.store().load().as_ref().unwrap().base().data().features.len();
    assert_eq!(flags.len(), n_features);
    let sso = flags.iter().find(|flag| flag["key"] == "sso").unwrap();
    assert_eq!(sso["value"], false);
    assert_eq!(sso["metadata"]["upgrade"], "plan:business");
    assert_eq!(sso["metadata"]["upgrade_checkout_url"], "https://billing.planwise.example/checkout?account=hooli&plan=business");
    let etag = first.headers["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "a strong ETag: {etag}");

    let bytes = serde_json::to_vec(&body).unwrap();
    let unchanged = client.send("POST", "/ofrep/v1/evaluate/flags", bytes.clone(), &[("if-none-match", &etag)]).await;
    assert_eq!(unchanged.status, 304);
    assert!(unchanged.body.is_empty());
    assert_eq!(unchanged.headers["etag"].to_str().unwrap(), etag);

    // Another context is another answer, so the old tag no longer matches.
    let other = serde_json::to_vec(&json!({"context": {"account": "stark"}})).unwrap();
    let changed = client.send("POST", "/ofrep/v1/evaluate/flags", other, &[("if-none-match", &etag)]).await;
    assert_eq!(changed.status, 200);
    assert_ne!(changed.headers["etag"].to_str().unwrap(), etag);
    server.stop().await;
}

#[tokio::test]
async fn configuration_advertises_boolean_flags_and_polling() {
    let server = example_server().await;
    let mut client = server.client().await;
    let configuration = client.get("/ofrep/v1/configuration").await;
    assert_eq!(configuration.status, 200);
    let configuration = configuration.json();
    assert_eq!(configuration["name"], "Tollgate");
    assert_eq!(configuration["capabilities"]["flagEvaluation"]["supportedTypes"], json!(["boolean"]));
    assert_eq!(configuration["capabilities"]["cacheInvalidation"]["polling"]["enabled"], true);
    assert_eq!(client.get("/ofrep/v1/nothing").await.status, 404);
    let metrics = client.get("/metrics").await.text();
    assert!(metrics.contains("route=\"ofrep\""), "OFREP requests have their own latency series");
    server.stop().await;
}

#[tokio::test]
async fn answers_from_a_stale_snapshot_say_so_in_metadata() {
    // The test snapshot was created in 2023, so any staleness bound has long passed.
    let server = TestServer::start_with(Some(common::signed_test(&common::example_data(), 42)), |config| {
        config.staleness = Some(tollgate_sidecar::config::Staleness { max: Duration::from_secs(60), unready_when_stale: false });
    })
    .await;
    let mut client = server.client().await;
    let answer = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"account": "hooli"}})).await.json();
    assert_eq!(answer["metadata"]["stale"], true);
    server.stop().await;
}

#[tokio::test]
async fn before_a_snapshot_is_loaded_the_answer_is_a_general_error() {
    let server = TestServer::start(None).await;
    let mut client = server.client().await;
    let answer = client.post("/ofrep/v1/evaluate/flags/reports", &json!({"context": {"account": "hooli"}})).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["errorCode"], "GENERAL");
    server.stop().await;
}
