//! The Rust client's in-process mode following a real control plane: the first snapshot
//! arrives through the sidecar's subscription code, an order changes the in-process answer
//! with no restart, a restart serves the cached snapshot at once, and no snapshot at all is an error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::time::Duration;

use serde_json::json;

use control_plane_support::{TestControlPlane, post, signing_key, trusting};
use tollgate_client::{CheckRequest, Client, ClientError, EngineReason, Reason, SnapshotSource};

#[tokio::test]
async fn in_process_follows_the_control_plane_and_restarts_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("control-plane")).await;
    let data_dir = dir.path().join("client");
    std::fs::create_dir_all(&data_dir).unwrap();
    let key_file = data_dir.join("api.key");
    std::fs::write(&key_file, server.key("sidecar", None)).unwrap();
    let source = SnapshotSource::ControlPlane {
        url: format!("http://{}", server.addr),
        api_key_file: key_file.clone(),
        data_dir: data_dir.clone(),
        first_wait: Duration::from_secs(10),
    };
    let local = Client::in_process(source.clone(), trusting(&signing_key(7))).await.unwrap();
    let request = CheckRequest::new("newco", "reports");
    assert_eq!(local.check(&request).await.unwrap().reason, Reason::Engine(EngineReason::UnknownAccount));

    let mut admin = server.client().await;
    let integration = server.key("integration", None);
    let order = json!({"order_id": "o-1", "action": "new", "account": "newco", "plan": "team"});
    assert_eq!(post(&mut admin, "/v1/orders", &integration, &order).await.status, 200);
    let mut decision = local.check(&request).await.unwrap();
    for _ in 0..1000 {
        if decision.allow {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        decision = local.check(&request).await.unwrap();
    }
    assert!(decision.allow, "the order reached the in-process client: {decision:?}");
    drop(local);

    // With the control plane gone, a new client serves the cached snapshot.
    server.stop().await;
    let restarted = Client::in_process(source, trusting(&signing_key(7))).await.unwrap();
    assert!(restarted.check(&request).await.unwrap().allow);

    // With no cache and no control plane to reach, the constructor gives up after `first_wait`
    // rather than hand out a client that can only fail.
    let unreachable = SnapshotSource::ControlPlane {
        url: "http://127.0.0.1:9".into(),
        api_key_file: key_file,
        data_dir: dir.path().join("empty"),
        first_wait: Duration::from_millis(50),
    };
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    assert!(matches!(Client::in_process(unreachable, trusting(&signing_key(7))).await, Err(ClientError::NotReady { .. })));
}
