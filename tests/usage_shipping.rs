//! The usage shipper against a real control plane on port 0: a decision tally far larger than
//! one request body goes out over several batches, each accepted, and nothing is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::sync::Arc;
use std::time::Duration;

use control_plane_support::TestControlPlane;
use tollgate_core::engine::Reason;
use tollgate_sidecar::Metering;
use tollgate_sidecar::app::App;
use tollgate_sidecar::config::{Config, SourceConfig};
use tollgate_sidecar::ship::ship_once;
use tollgate_snapshot::TrustedKeys;

#[tokio::test]
async fn a_tally_larger_than_a_request_body_ships_in_several_batches() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let key_file = dir.path().join("sidecar.key");
    std::fs::write(&key_file, server.key("sidecar", None)).unwrap();
    let data_dir = dir.path().join("sidecar");
    let mut config = Config::new(
        SourceConfig::ControlPlane { url: format!("http://{}", server.addr), api_key_file: key_file, poll_wait: Duration::from_secs(5) },
        TrustedKeys::new([control_plane_support::signing_key(7).verifying_key()]),
    );
    config.data_dir = Some(data_dir);
    let app = App::build(config, Arc::new(tollgate_core::clock::SystemClock)).unwrap();
    let sidecar = app.sidecar();
    let Metering::Shipped { log, shipping, tally } = sidecar.metering() else { panic!("a control plane and a data dir ship usage") };
    // 6000 pairs with a long user name each: several megabytes of rows.
    for n in 0..6_000 {
        tally.record(&format!("account-with-a-rather-long-name-{n:05}"), "sso", Some(&"u".repeat(200)), Reason::Ok);
    }
    let mut batches = 0;
    loop {
        batches += 1;
        let more = ship_once(sidecar, shipping, log).await.unwrap_or_else(|error| panic!("batch {batches} failed: {error}"));
        if !more {
            break;
        }
        assert!(batches < 100, "shipping never finished");
    }
    assert!(batches >= 3, "expected the tally to need several batches, took {batches}");
    assert!(tally.take().is_empty(), "every row was shipped");
    server.stop().await;
}
