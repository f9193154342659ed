//! The usage shipper against a real control plane on port 0: a decision tally far larger than
//! one request body goes out over several batches, each accepted, and nothing is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::sync::Arc;
use std::time::Duration;

use control_plane_support::TestControlPlane;
use tollgate_core::engine::Reason;
use tollgate_sidecar::Sidecar;
use tollgate_sidecar::ship::{Shipping, ship_once};
use tollgate_sidecar::subscribe::Subscription;
use tollgate_sidecar::telemetry::Metrics;
use tollgate_sidecar::usage::DecisionTally;
use tollgate_sidecar::usage_log::{ShipState, UsageLog};
use tollgate_snapshot::TrustedKeys;

#[tokio::test]
async fn a_tally_larger_than_a_request_body_ships_in_several_batches() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let key_file = dir.path().join("sidecar.key");
    std::fs::write(&key_file, server.key("sidecar", None)).unwrap();
    let data_dir = dir.path().join("sidecar");
    let subscription = Arc::new(Subscription::new(&format!("http://{}", server.addr), &key_file, data_dir.clone()).unwrap());
    let shipping = Shipping::new(subscription, "pod-big".into(), Duration::from_secs(60), &ShipState::default());
    let (log, _) = UsageLog::open(&data_dir, true).unwrap();
    let mut sidecar = Sidecar::new(
        Arc::new(Metrics::new()),
        Arc::new(TrustedKeys::default()),
        "test".into(),
        Arc::new(tollgate_core::clock::SystemClock),
    );
    let tally = DecisionTally::new();
    // 6000 pairs with a long user name each: several megabytes of rows.
    for n in 0..6_000 {
        tally.record(&format!("account-with-a-rather-long-name-{n:05}"), "sso", Some(&"u".repeat(200)), Reason::Ok);
    }
    sidecar.tally = Some(tally);
    let mut batches = 0;
    loop {
        batches += 1;
        let more = ship_once(&sidecar, &shipping, &log).await.unwrap_or_else(|error| panic!("batch {batches} failed: {error}"));
        if !more {
            break;
        }
        assert!(batches < 100, "shipping never finished");
    }
    assert!(batches >= 3, "expected the tally to need several batches, took {batches}");
    assert!(sidecar.tally.as_ref().unwrap().take().is_empty(), "every row was shipped");
    server.stop().await;
}
