//! Snapshot publishing and the sidecar's subscription: long-polls, the sidecar scope, an
//! upgrade order changing a running sidecar's answer with no restart, coalesced bursts, a
//! stopped control plane (the sidecar keeps serving, restarts from its disk cache, turns
//! stale), a snapshot signed by an untrusted key (rejected), and failover between the
//! addresses of several control planes on one repository.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use control_plane_support::{TestControlPlane, TestSidecar, get, post, signing_key, trusting};
use tollgate_core::clock::ManualClock;
use tollgate_sidecar::config::Staleness;
use tollgate_snapshot::{Delta, ServingView, Snapshot};

fn new_order(id: &str, account: &str, plan: &str) -> serde_json::Value {
    json!({"order_id": id, "action": "new", "account": account, "plan": plan})
}

#[tokio::test]
async fn snapshot_long_poll_answers_newer_at_once_or_waits() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let sidecar_key = server.key("sidecar", None);
    let integration = server.key("integration", None);
    let mut client = server.client().await;

    let first = get(&mut client, "/v1/snapshot?after=0", &sidecar_key).await;
    assert_eq!(first.status, 200);
    let revision: u64 = first.headers["x-tollgate-revision"].to_str().unwrap().parse().unwrap();
    assert_eq!(first.headers["etag"].to_str().unwrap(), format!("\"{revision}\""));
    let snapshot = Snapshot::verify(&first.body, &trusting(&signing_key(7))).unwrap();
    assert_eq!(snapshot.revision(), revision);
    assert!(Snapshot::verify(&first.body, &trusting(&signing_key(8))).is_err());

    // Nothing newer: 304 after the wait.
    let started = std::time::Instant::now();
    let unchanged = get(&mut client, &format!("/v1/snapshot?after={revision}&wait=1"), &sidecar_key).await;
    assert_eq!(unchanged.status, 304);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A waiting poll answers as soon as an order commits.
    let addr = server.addr;
    let key = sidecar_key.clone();
    let waiting = tokio::spawn(async move {
        let mut client = common::Client::connect(addr).await;
        let started = std::time::Instant::now();
        let reply = get(&mut client, &format!("/v1/snapshot?after={revision}&wait=20"), &key).await;
        (reply.status, reply.headers["x-tollgate-revision"].to_str().unwrap().to_string(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let order = post(&mut client, "/v1/orders", &integration, &new_order("o-1", "acme", "team")).await.json();
    let (status, published, waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(published, order["revision"].to_string());
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    // Only sidecar (or admin) keys may read snapshots.
    assert_eq!(get(&mut client, "/v1/snapshot?after=0", &integration).await.status, 403);
    assert_eq!(client.get("/v1/snapshot?after=0").await.status, 401);
    assert_eq!(get(&mut client, "/v1/snapshot?after=abc", &sidecar_key).await.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn a_burst_of_orders_ends_in_a_snapshot_holding_every_account() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    let mut last = 0;
    for n in 0..50 {
        last = post(&mut client, "/v1/orders", &integration, &new_order(&format!("o-{n}"), &format!("a-{n}"), "team")).await.json()["revision"]
            .as_u64()
            .unwrap();
    }
    let mut latest = server.control_plane.publisher.subscribe();
    let published =
        tokio::time::timeout(Duration::from_secs(10), latest.wait_for(|published| published.as_ref().is_some_and(|p| p.revision >= last)))
            .await
            .unwrap()
            .unwrap()
            .clone()
            .unwrap();
    // The base and the deltas on it hold every account, whatever revisions were skipped (or
    // coalesced into one delta) on the way.
    let trusted = trusting(&signing_key(7));
    let mut view = ServingView::new(Snapshot::verify(&published.base.bytes, &trusted).unwrap());
    for delta in &published.deltas {
        view = view.apply(Delta::verify(&delta.bytes, &trusted).unwrap()).unwrap();
    }
    assert_eq!(view.revision(), published.revision);
    assert_eq!(view.account_count(), 50);
    server.stop().await;
}

#[tokio::test]
async fn an_upgrade_order_changes_a_running_sidecar_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    assert_eq!(post(&mut client, "/v1/orders", &integration, &new_order("o-1", "acme", "team")).await.status, 200);

    let sidecar = TestSidecar::start(server.addr, &server.key("sidecar", None), trusting(&signing_key(7)), &dir.path().join("sc")).await;
    let check = json!({"account": "acme", "feature": "sso"});
    let before = sidecar.wait_for(&check, Duration::from_secs(10), |answer| answer["reason"] == "not_entitled").await;
    // The catalog's checkout link survives the control plane's compile and the feed.
    assert_eq!(
        before["upgrade"],
        json!({"kind": "plan", "id": "business", "checkout_url": "https://billing.planwise.example/checkout?account=acme&plan=business"})
    );

    let upgrade = json!({"order_id": "o-2", "action": "upgrade", "account": "acme", "plan": "business"});
    let accepted = std::time::Instant::now();
    let order = post(&mut client, "/v1/orders", &integration, &upgrade).await.json();
    let revision = order["revision"].as_u64().unwrap();
    let after = sidecar.wait_for(&check, Duration::from_secs(10), |answer| answer["allow"] == true).await;
    assert!(after["revision"].as_u64().unwrap() >= revision);
    assert!(accepted.elapsed() < Duration::from_secs(10));
    assert!(dir.path().join("sc").join("snapshot.tgs").exists(), "the last good snapshot is cached on disk");
    sidecar.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_stopped_control_plane_leaves_sidecars_serving_from_cache_then_stale() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let sidecar_key = server.key("sidecar", None);
    let mut client = server.client().await;
    assert_eq!(post(&mut client, "/v1/orders", &integration, &new_order("o-1", "acme", "business")).await.status, 200);
    let cache = dir.path().join("sc");
    let check = json!({"account": "acme", "feature": "sso"});
    let sidecar = TestSidecar::start(server.addr, &sidecar_key, trusting(&signing_key(7)), &cache).await;
    sidecar.wait_for(&check, Duration::from_secs(10), |answer| answer["allow"] == true).await;
    let addr = server.addr;
    server.stop().await;

    // Still serving; the failed reconnects show as the last error.
    let answer = sidecar.wait_for(&check, Duration::from_secs(1), |answer| answer["allow"] == true).await;
    assert!(answer.get("stale").is_none());
    let mut sidecar_client = common::Client::connect(sidecar.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = sidecar_client.get("/v1/status").await.json();
        if status["last_error"].as_str().is_some_and(|error| error.contains("cannot reach the control plane")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sidecar.stop().await;

    // A restart while the control plane is down serves the cached snapshot; past the
    // staleness bound the answers say so and readiness can follow.
    // The clock is moved, not waited for: fresh at first, stale past `--max-staleness`.
    let clock = Arc::new(ManualClock::new(tollgate_core::clock::system_now_ms()));
    let staleness = Staleness { max: Duration::from_secs(90), unready_when_stale: true };
    let restarted = TestSidecar::start_with(addr, &sidecar_key, trusting(&signing_key(7)), &cache, clock.clone(), |config| {
        config.staleness = Some(staleness);
    })
    .await;
    let answer = restarted.wait_for(&check, Duration::from_secs(5), |answer| answer["allow"] == true).await;
    assert!(answer.get("stale").is_none(), "{answer}");
    clock.advance(Duration::from_secs(91));
    let answer = restarted.wait_for(&check, Duration::from_secs(5), |answer| answer["allow"] == true).await;
    assert_eq!(answer["stale"], true);
    let mut restarted_client = common::Client::connect(restarted.addr).await;
    assert_eq!(restarted_client.get("/v1/status").await.json()["stale"], true);
    assert_eq!(restarted_client.get("/readyz").await.status, 503);
    assert!(restarted_client.get("/metrics").await.text().contains("tollgate_snapshot_stale 1"));
    restarted.stop().await;
}

#[tokio::test]
async fn a_snapshot_signed_by_an_untrusted_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let sidecar = TestSidecar::start(server.addr, &server.key("sidecar", None), trusting(&signing_key(9)), &dir.path().join("sc")).await;
    let mut client = common::Client::connect(sidecar.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get("/v1/status").await.json();
        if status["last_error"].as_str().is_some_and(|error| error.contains("not trusted")) {
            assert_eq!(status["ready"], false);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.get("/readyz").await.status, 503);
    assert!(!dir.path().join("sc").join("snapshot.tgs").exists(), "a rejected snapshot is never cached");
    sidecar.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_api_key_is_reported_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let sidecar = TestSidecar::start(server.addr, &integration, trusting(&signing_key(7)), &dir.path().join("sc")).await;
    let mut client = common::Client::connect(sidecar.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get("/v1/status").await.json();
        if status["last_error"].as_str().is_some_and(|error| error.contains("403")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sidecar.stop().await;
    server.stop().await;
}

/// A port nothing listens on (bound once, then released).
fn unused_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test]
async fn a_sidecar_fails_over_between_control_plane_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let cp_dir = dir.path().join("cp");
    let first = TestControlPlane::start(&cp_dir).await;
    let sidecar_key = first.key("sidecar", None);
    let integration = first.key("integration", None);
    let mut client = first.client().await;
    post(&mut client, "/v1/orders", &integration, &new_order("o-1", "acme", "team")).await;

    // The first address is down at start: the sidecar follows the second.
    let spare = unused_port();
    let urls = format!("http://{spare},http://{}", first.addr);
    let sidecar = TestSidecar::start_with(
        first.addr,
        &sidecar_key,
        trusting(&signing_key(7)),
        &dir.path().join("sc"),
        Arc::new(tollgate_core::clock::SystemClock),
        |config| {
            if let tollgate_sidecar::config::SourceConfig::ControlPlane { url, .. } = &mut config.source {
                *url = urls.clone();
            }
        },
    )
    .await;
    let check = json!({"account": "acme", "feature": "advanced_analytics"});
    sidecar.wait_for(&check, Duration::from_secs(10), |answer| answer["reason"] == "not_entitled").await;

    // That control plane goes; another one on the same repository takes the first address,
    // and an order placed there reaches the sidecar.
    first.stop_keeping_data().await;
    let second = TestControlPlane::start_on(&cp_dir, spare).await;
    let mut client = second.client().await;
    let upgraded = post(
        &mut client,
        "/v1/orders",
        &integration,
        &json!({"order_id": "o-2", "action": "upgrade", "account": "acme", "plan": "enterprise"}),
    )
    .await;
    assert_eq!(upgraded.status, 200, "{}", upgraded.text());
    sidecar.wait_for(&check, Duration::from_secs(20), |answer| answer["allow"] == true).await;
    let mut sidecar_client = common::Client::connect(sidecar.addr).await;
    let status = sidecar_client.get("/v1/status").await.json();
    assert_eq!(status["revision"], upgraded.json()["revision"], "{status}");
    sidecar.stop().await;
    second.stop().await;
}

#[test]
fn a_bad_address_in_a_list_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "tg_x").unwrap();
    let error =
        tollgate_sidecar::subscribe::Subscription::new("http://127.0.0.1:1,https://cp:443", &key, dir.path().to_path_buf()).unwrap_err();
    assert!(error.to_string().contains("`https://cp:443`"), "{error}");
    let error = tollgate_sidecar::subscribe::Subscription::new("http://127.0.0.1:1,", &key, dir.path().to_path_buf()).unwrap_err();
    assert!(error.to_string().contains("value ``"), "{error}");
}
