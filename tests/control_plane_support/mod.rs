//! Shared helpers for the control-plane tests: a control plane on 127.0.0.1:0 over a
//! temporary data directory and the shipped catalog, API keys, and a sidecar subscribed to it.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;

use tollgate_control_plane::{self as control_plane, Config as ControlPlaneConfig, ControlPlane};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_sidecar::Sidecar;
use tollgate_sidecar::app::{App, Listeners};
use tollgate_sidecar::config::{Config, SourceConfig};
use tollgate_snapshot::TrustedKeys;

use crate::common::{Client, Reply, repo_root};

pub fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A running control plane; `stop` shuts it down.
pub struct TestControlPlane {
    pub addr: SocketAddr,
    pub control_plane: Arc<ControlPlane>,
    pub data_dir: PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestControlPlane {
    pub async fn start(data_dir: &Path) -> TestControlPlane {
        TestControlPlane::start_with(data_dir, signing_key(7), Vec::new()).await
    }

    pub async fn start_with(data_dir: &Path, key: SigningKey, retired: Vec<ed25519_dalek::VerifyingKey>) -> TestControlPlane {
        let control_plane = ControlPlane::open(data_dir, &repo_root().join("policies"), key, retired).unwrap();
        TestControlPlane::serve(control_plane, data_dir, "127.0.0.1:0").await
    }

    /// Like [`TestControlPlane::start`], listening on `addr` (a replica taking over an address
    /// a sidecar already knows).
    pub async fn start_on(data_dir: &Path, addr: SocketAddr) -> TestControlPlane {
        let control_plane = ControlPlane::open(data_dir, &repo_root().join("policies"), signing_key(7), Vec::new()).unwrap();
        TestControlPlane::serve(control_plane, data_dir, &addr.to_string()).await
    }

    /// Serves `control_plane` on `addr` until `stop`.
    async fn serve(control_plane: ControlPlane, data_dir: &Path, addr: &str) -> TestControlPlane {
        let control_plane = Arc::new(control_plane);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(control_plane::run(
            Arc::clone(&control_plane),
            listener,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(2),
        ));
        TestControlPlane { addr, control_plane, data_dir: data_dir.to_path_buf(), stop, task }
    }

    pub fn key(&self, scope: &str, account: Option<&str>) -> String {
        control_plane::create_key(self.control_plane.repository.as_ref(), scope, account, self.control_plane.now()).unwrap()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

pub async fn get(client: &mut Client, path: &str, key: &str) -> Reply {
    client.send("GET", path, bytes::Bytes::new(), &[("authorization", &format!("Bearer {key}"))]).await
}

pub async fn send_json(client: &mut Client, method: &str, path: &str, key: &str, body: &serde_json::Value) -> Reply {
    let auth = format!("Bearer {key}");
    client.send(method, path, serde_json::to_vec(body).unwrap(), &[("authorization", &auth), ("content-type", "application/json")]).await
}

pub async fn post(client: &mut Client, path: &str, key: &str, body: &serde_json::Value) -> Reply {
    send_json(client, "POST", path, key, body).await
}

/// A sidecar ([`App`]) subscribed to a control plane, shipping usage to it; `stop` ends it.
pub struct TestSidecar {
    pub addr: SocketAddr,
    pub sidecar: Arc<Sidecar>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSidecar {
    pub async fn start(control_plane: SocketAddr, api_key: &str, trusted: TrustedKeys, data_dir: &Path) -> TestSidecar {
        TestSidecar::start_with(control_plane, api_key, trusted, data_dir, Arc::new(SystemClock), |_| {}).await
    }

    /// Like [`TestSidecar::start`], on `clock` and with the configuration adjusted by `configure`.
    pub async fn start_with(
        control_plane: SocketAddr,
        api_key: &str,
        trusted: TrustedKeys,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        configure: impl FnOnce(&mut Config),
    ) -> TestSidecar {
        let key_file = data_dir.join("api.key");
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(&key_file, api_key).unwrap();
        let source = SourceConfig::ControlPlane {
            url: format!("http://{control_plane}"),
            api_key_file: key_file,
            poll_wait: Duration::from_secs(5),
        };
        let mut config = Config::new(source, trusted);
        config.data_dir = Some(data_dir.to_path_buf());
        config.drain_timeout = Duration::from_secs(2);
        config.metering.flush_timeout = Duration::from_millis(500);
        configure(&mut config);
        let app = App::build(config, clock).unwrap();
        let sidecar = Arc::clone(app.sidecar());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(Listeners { api: listener, metrics: None }, async move {
            let _ = stopped.await;
        }));
        TestSidecar { addr, sidecar, stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    /// Polls `/v1/check` until `accept` holds for its answer, or panics after `limit`.
    pub async fn wait_for(
        &self,
        check: &serde_json::Value,
        limit: Duration,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        let mut client = Client::connect(self.addr).await;
        loop {
            let reply = client.post("/v1/check", check).await;
            if reply.status == 200 {
                let answer = reply.json();
                if accept(&answer) {
                    return answer;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "sidecar did not reach the expected answer within {limit:?}: {}", reply.text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub fn trusting(key: &SigningKey) -> TrustedKeys {
    TrustedKeys::new([key.verifying_key()])
}

impl TestControlPlane {
    /// Like [`TestControlPlane::start`], with the control plane's [`ControlPlaneConfig`] adjusted by
    /// `configure` (a webhook, a small usage page, a manual clock).
    pub async fn start_configured(data_dir: &Path, configure: impl FnOnce(&mut ControlPlaneConfig)) -> TestControlPlane {
        let mut config = ControlPlaneConfig::default();
        configure(&mut config);
        let control_plane =
            ControlPlane::open_with_config(data_dir, &repo_root().join("policies"), signing_key(7), Vec::new(), config).unwrap();
        TestControlPlane::serve(control_plane, data_dir, "127.0.0.1:0").await
    }
}
