//! Incremental publishing end to end: an order reaches a subscribed sidecar as a delta of a few
//! KiB on the base it already holds, the feed answers deltas or base plus deltas by what the
//! sidecar says it holds, a restart with the control plane down serves base and cached deltas,
//! and past `compact_after` the control plane publishes a new base that sidecars move to.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::time::Duration;

use serde_json::json;

use control_plane_support::{TestControlPlane, TestSidecar, get, post, signing_key, trusting};
use tollgate_protocol::feed::FEED_CONTENT_TYPE;
use tollgate_snapshot::{Piece, pieces};

fn new_order(id: &str, account: &str, plan: &str) -> serde_json::Value {
    json!({"order_id": id, "action": "new", "account": account, "plan": plan})
}

fn sso(account: &str) -> serde_json::Value {
    json!({"account": account, "feature": "sso"})
}

async fn status(sidecar: &TestSidecar) -> serde_json::Value {
    common::Client::connect(sidecar.addr).await.get("/v1/status").await.json()
}

#[tokio::test]
async fn an_order_reaches_a_sidecar_as_a_small_delta_and_a_restart_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let sidecar_key = server.key("sidecar", None);
    let mut client = server.client().await;
    assert_eq!(post(&mut client, "/v1/orders", &integration, &new_order("o-1", "first", "business")).await.status, 200);
    let cache = dir.path().join("sc");
    let sidecar = TestSidecar::start(server.addr, &sidecar_key, trusting(&signing_key(7)), &cache).await;
    sidecar.wait_for(&sso("first"), Duration::from_secs(10), |answer| answer["allow"] == true).await;
    let before = status(&sidecar).await;
    let base = before["snapshot"]["base_revision"].as_u64().unwrap();
    let serving = before["revision"].as_u64().unwrap();

    let placed = post(&mut client, "/v1/orders", &integration, &new_order("o-2", "second", "business")).await;
    assert_eq!(placed.status, 200);
    let revision = placed.json()["revision"].as_u64().unwrap();
    sidecar.wait_for(&sso("second"), Duration::from_secs(10), |answer| answer["allow"] == true).await;
    let after = status(&sidecar).await;
    assert_eq!(after["snapshot"]["base_revision"].as_u64(), Some(base), "{after}");
    assert!(after["revision"].as_u64().unwrap() >= revision);
    assert!(after["snapshot"]["overlay_accounts"].as_u64().unwrap() >= 1, "{after}");
    assert_eq!(after["snapshot"]["counts"]["accounts"], before["snapshot"]["counts"]["accounts"].as_u64().unwrap() + 1);

    // What a sidecar on the base gets for that order: deltas only, a few KiB.
    let feed = get(&mut client, &format!("/v1/snapshot?after={serving}&base={base}&wait=0"), &sidecar_key).await;
    assert_eq!(feed.status, 200);
    assert_eq!(feed.headers["content-type"], FEED_CONTENT_TYPE);
    assert!(feed.body.len() < 16 * 1024, "{} bytes", feed.body.len());
    let files: Vec<Piece<'_>> = pieces(&feed.body).map(Result::unwrap).collect();
    assert!(!files.is_empty() && files.iter().all(|file| matches!(file, Piece::Delta(_))));
    // A sidecar on no base (or another) gets the base first.
    let fresh = get(&mut client, "/v1/snapshot?after=0&wait=0", &sidecar_key).await;
    assert!(matches!(pieces(&fresh.body).next(), Some(Ok(Piece::Base(_)))));
    let elsewhere = get(&mut client, &format!("/v1/snapshot?after={serving}&base={}&wait=0", base + 1000), &sidecar_key).await;
    assert!(matches!(pieces(&elsewhere.body).next(), Some(Ok(Piece::Base(_)))));
    let bad = get(&mut client, "/v1/snapshot?after=0&base=x", &sidecar_key).await;
    assert_eq!(bad.status, 400, "{}", bad.text());

    // With the control plane gone, a restart serves the cached base and the cached deltas.
    sidecar.stop().await;
    server.stop().await;
    let nowhere = "127.0.0.1:9".parse().unwrap();
    let restarted = TestSidecar::start(nowhere, &sidecar_key, trusting(&signing_key(7)), &cache).await;
    restarted.wait_for(&sso("second"), Duration::from_secs(5), |answer| answer["allow"] == true).await;
    assert_eq!(status(&restarted).await["snapshot"]["base_revision"].as_u64(), Some(base));
    restarted.stop().await;
}

#[tokio::test]
async fn past_compact_after_a_new_base_is_published_and_sidecars_move_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start_configured(&dir.path().join("cp"), |config| config.compact_after = 3).await;
    let integration = server.key("integration", None);
    let sidecar_key = server.key("sidecar", None);
    let sidecar = TestSidecar::start(server.addr, &sidecar_key, trusting(&signing_key(7)), &dir.path().join("sc")).await;
    let mut sidecar_client = common::Client::connect(sidecar.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sidecar_client.get("/readyz").await.status != 200 {
        assert!(tokio::time::Instant::now() < deadline, "sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_base = status(&sidecar).await["snapshot"]["base_revision"].as_u64().unwrap();

    let mut client = server.client().await;
    for n in 0..6 {
        let placed = post(&mut client, "/v1/orders", &integration, &new_order(&format!("o-{n}"), &format!("a-{n}"), "business")).await;
        assert_eq!(placed.status, 200);
        // One at a time, so each makes its own delta and the count passes the threshold.
        sidecar.wait_for(&sso(&format!("a-{n}")), Duration::from_secs(10), |answer| answer["allow"] == true).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = status(&sidecar).await;
        if now["snapshot"]["base_revision"].as_u64().unwrap() > first_base {
            assert!(now["snapshot"]["overlay_accounts"].as_u64().unwrap() < 6, "{now}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the sidecar never moved to a compacted base: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // On the new base every account still answers as ordered.
    for n in 0..6 {
        sidecar.wait_for(&sso(&format!("a-{n}")), Duration::from_secs(1), |answer| answer["allow"] == true).await;
    }
    let metrics = client.get("/metrics").await.text();
    assert!(metrics.contains("tollgate_cp_overlay_deltas"), "{metrics}");
    sidecar.stop().await;
    server.stop().await;
}
