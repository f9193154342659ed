//! The Rust client (`tollgate-client`) against a real sidecar on 127.0.0.1:0 and in-process
//! over a snapshot file: the same answers both ways, idempotency ids generated once and
//! reused by retries, the fallback when the sidecar is unreachable, and reloads in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_client::{
    CheckRequest, Client, ClientBuilder, ClientError, EngineReason, Fallback, MeterRequest, Reason, SnapshotSource, TrustedKeys,
};

/// Hooli (free plan, no expiry) and stark (enterprise) answer the same whatever the date.
async fn example_server() -> TestServer {
    TestServer::start(Some(common::signed_test(&common::example_data(), 42))).await
}

fn base_url(server: &TestServer) -> String {
    format!("http://{}", server.addr)
}

/// An address nothing listens on: bound, then released.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn check_batch_and_entitlements_over_http() {
    let server = example_server().await;
    let client = Client::new(&base_url(&server)).unwrap();
    let allowed = client.check(&CheckRequest::new("hooli", "reports")).await.unwrap();
    assert!(allowed.allow);
    assert_eq!(allowed.reason, Reason::Engine(EngineReason::Ok));
    assert_eq!(allowed.revision, Some(42));
    assert!(!allowed.fallback);
    let denied = client.check(&CheckRequest::new("hooli", "sso")).await.unwrap();
    assert_eq!(denied.reason, Reason::Engine(EngineReason::NotEntitled));
    let upgrade = denied.upgrade.unwrap();
    assert_eq!((upgrade.kind.as_str(), upgrade.id.as_str()), ("plan", "business"));
    assert_eq!(upgrade.checkout_url.as_deref(), Some("https://billing.planwise.example/checkout?account=hooli&plan=business"));

    let batch = client
        .batch(&[CheckRequest::new("hooli", "reports"), CheckRequest::new("hooli", "reports").user("nobody"), CheckRequest::new("x", "y")])
        .await
        .unwrap();
    let reasons: Vec<&str> = batch.iter().map(|decision| decision.reason.as_str()).collect();
    assert_eq!(reasons, ["ok", "unknown_user", "unknown_account"]);

    let entitlements = client.entitlements("hooli", None, None).await.unwrap();
    assert_eq!(entitlements.account, "hooli");
    assert_eq!(entitlements.revision, 42);
    let sso = entitlements.features.iter().find(|feature| feature.feature == "sso").unwrap();
    assert!(!sso.allow);
    assert_eq!(
        sso.upgrade.as_ref().and_then(|upgrade| upgrade.checkout_url.as_deref()),
        Some("https://billing.planwise.example/checkout?account=hooli&plan=business")
    );
    let unknown = client.entitlements("nobody", None, None).await.unwrap_err();
    assert!(matches!(unknown, ClientError::Api { status: 404, ref code, .. } if code == "unknown_account"), "{unknown}");
    server.stop().await;
}

#[tokio::test]
async fn metering_generates_an_id_and_the_same_id_counts_once() {
    let server = example_server().await;
    let client = Client::new(&base_url(&server)).unwrap();
    let first = client.meter(&MeterRequest::new("hooli", "api_calls", 3)).await.unwrap();
    assert!(first.accepted && !first.duplicate);
    assert_eq!(first.id.len(), 32);
    let second = client.meter(&MeterRequest::new("hooli", "api_calls", 3)).await.unwrap();
    assert_ne!(first.id, second.id, "each event gets its own id");
    assert_eq!(second.used, 6);
    let replay = client.meter(&MeterRequest::new("hooli", "api_calls", 3).id(first.id.clone())).await.unwrap();
    assert!(replay.duplicate);
    assert_eq!(replay.used, 3, "a replay answers the original outcome and is not counted again");
    let unknown = client.meter(&MeterRequest::new("hooli", "nothing", 1)).await.unwrap_err();
    assert!(matches!(unknown, ClientError::Api { status: 400, ref code, .. } if code == "unknown_meter"), "{unknown}");
    server.stop().await;
}

/// A server that answers `/v1/meter` with 503 once, then 200, recording each body's id.
async fn flaky_meter_server(ids: Arc<Mutex<Vec<String>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for attempt in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then as much body as Content-Length says.
            loop {
                let n = stream.read(&mut chunk).await.unwrap();
                buffer.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buffer).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|line| {
                            line.to_ascii_lowercase().strip_prefix("content-length:").map(|value| value.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buffer.len() >= head_end + 4 + length {
                        let body: serde_json::Value = serde_json::from_slice(&buffer[head_end + 4..head_end + 4 + length]).unwrap();
                        ids.lock().unwrap().push(body["id"].as_str().unwrap().to_string());
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let (status, body) = if attempt == 0 {
                ("503 Service Unavailable", r#"{"error":{"code":"usage_log_unavailable","message":"try again"}}"#.to_string())
            } else {
                (
                    "200 OK",
                    r#"{"accepted":true,"duplicate":false,"used":1,"period_start":"2026-01-01T00:00:00Z","durable":true,"revision":1}"#
                        .to_string(),
                )
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(reply.as_bytes()).await.unwrap();
            let _ = stream.shutdown().await;
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_retried_meter_event_keeps_its_id() {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let url = flaky_meter_server(Arc::clone(&ids)).await;
    let client = ClientBuilder::new(url).retries(2, Duration::from_millis(1)).build().unwrap();
    let result = client.meter(&MeterRequest::new("hooli", "api_calls", 1)).await.unwrap();
    assert!(result.accepted);
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2, "one 503, one retry");
    assert_eq!(ids[0], ids[1], "the retry reuses the id, so the event cannot count twice");
    assert_eq!(result.id, ids[0]);
}

#[tokio::test]
async fn an_unreachable_sidecar_fails_closed_by_default_and_as_configured_otherwise() {
    let url = closed_port().await;
    let quick = |fallback| ClientBuilder::new(url.clone()).retries(1, Duration::from_millis(1)).fallback(fallback).build().unwrap();
    let denied = quick(Fallback::Deny).check(&CheckRequest::new("hooli", "reports")).await.unwrap();
    assert!(!denied.allow && denied.fallback);
    assert_eq!(denied.reason, Reason::Unavailable);
    assert_eq!(denied.revision, None);
    let allowed = quick(Fallback::Allow).batch(&[CheckRequest::new("a", "b"), CheckRequest::new("c", "d")]).await.unwrap();
    assert!(allowed.iter().all(|decision| decision.allow && decision.fallback));
    let error = quick(Fallback::Error).check(&CheckRequest::new("hooli", "reports")).await.unwrap_err();
    assert!(matches!(error, ClientError::Unreachable { .. }), "{error}");
    // Metering never falls back: a made-up count would be wrong.
    let meter = quick(Fallback::Allow).meter(&MeterRequest::new("hooli", "api_calls", 1)).await.unwrap_err();
    assert!(meter.is_unavailable());
    assert!(matches!(Client::new("ftp://x"), Err(ClientError::InvalidUrl { .. })));
}

#[tokio::test]
async fn a_sidecar_that_does_not_answer_times_out_into_the_fallback() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let client = ClientBuilder::new(url).timeout(Duration::from_millis(50)).retries(0, Duration::ZERO).build().unwrap();
    let decision = client.check(&CheckRequest::new("hooli", "reports")).await.unwrap();
    assert!(decision.fallback && !decision.allow);
    let error = client.entitlements("hooli", None, None).await.unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    held.abort();
}

fn write_snapshot(path: &std::path::Path, revision: u64) {
    let bytes = common::signed(&common::example_data(), revision, &common::test_key(1));
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, bytes).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

#[tokio::test]
async fn in_process_answers_like_the_sidecar_and_follows_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.tgs");
    write_snapshot(&path, 42);
    let trusted = || TrustedKeys::new([common::test_key(1).verifying_key()]);
    let source = SnapshotSource::File { path: path.clone(), poll: Duration::from_millis(20) };
    // Both on the same pinned instant, so their answers cannot differ by the day the test runs.
    let clock = std::sync::Arc::new(tollgate_core::clock::ManualClock::new(common::PINNED_NOW_MS));
    let local = Client::in_process_with_clock(source, trusted(), clock).await.unwrap();
    let server = example_server().await;
    let remote = Client::new(&base_url(&server)).unwrap();
    for (account, feature, user) in
        [("hooli", "reports", None), ("hooli", "sso", None), ("stark", "api", None), ("hooli", "reports", Some("x"))]
    {
        let mut request = CheckRequest::new(account, feature);
        request.user = user.map(str::to_string);
        assert_eq!(local.check(&request).await.unwrap(), remote.check(&request).await.unwrap(), "{account}/{feature}");
    }
    assert_eq!(local.entitlements("hooli", None, None).await.unwrap(), remote.entitlements("hooli", None, None).await.unwrap());
    let upgrade = local.check(&CheckRequest::new("hooli", "sso")).await.unwrap().upgrade.unwrap();
    assert_eq!(upgrade.checkout_url.as_deref(), Some("https://billing.planwise.example/checkout?account=hooli&plan=business"));

    // Usage is kept in memory, with the same idempotency and limits.
    let event = MeterRequest::new("hooli", "api_calls", 2).id("event-1");
    let first = local.meter(&event).await.unwrap();
    assert!(first.accepted && !first.durable);
    assert!(local.meter(&event).await.unwrap().duplicate);
    let generated = local.meter(&MeterRequest::new("hooli", "api_calls", 1)).await.unwrap();
    assert_eq!(generated.id.len(), 32);
    assert_eq!(generated.used, 3);

    // A newer file is picked up; a corrupt one is refused and the last good one keeps serving.
    write_snapshot(&path, 43);
    let mut revision = None;
    for _ in 0..250 {
        revision = local.check(&CheckRequest::new("hooli", "reports")).await.unwrap().revision;
        if revision == Some(43) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(revision, Some(43));
    std::fs::write(&path, b"not a snapshot").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(local.check(&CheckRequest::new("hooli", "reports")).await.unwrap().revision, Some(43));

    // An untrusted or missing file is an error of the constructor.
    let missing = SnapshotSource::File { path: dir.path().join("absent"), poll: Duration::from_secs(1) };
    assert!(matches!(Client::in_process(missing, trusted()).await, Err(ClientError::Snapshot { .. })));
    server.stop().await;
}
