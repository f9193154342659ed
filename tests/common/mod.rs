//! Shared test helpers: compiling inline policies, signing snapshots with a fixed test key,
//! starting a real sidecar on 127.0.0.1:0, and a small keep-alive HTTP/1.1 client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

pub mod cases;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;

use tollgate_core::clock::{Clock, ManualClock};
use tollgate_core::model::SnapshotData;
use tollgate_policy::Source;
use tollgate_sidecar::Sidecar;
use tollgate_sidecar::app::{App, Listeners};
use tollgate_sidecar::config::{Config, SourceConfig};
use tollgate_snapshot::{self as snapshot, Snapshot, TrustedKeys};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn compile_inline(catalog: &str, accounts: &str) -> SnapshotData {
    let catalog = Source { path: "catalog.toml".into(), text: catalog.to_string() };
    let accounts = Source { path: "accounts/test.toml".into(), text: accounts.to_string() };
    tollgate_policy::compile(&catalog, &[accounts]).unwrap_or_else(|errors| panic!("{errors}"))
}

pub fn example_data() -> SnapshotData {
    tollgate_policy::compile_dir(&repo_root().join("policies")).unwrap_or_else(|errors| panic!("{errors}"))
}

pub fn test_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn signed(data: &SnapshotData, revision: u64, key: &SigningKey) -> Vec<u8> {
    snapshot::build(data, revision, 1_700_000_000_000, key).unwrap()
}

pub fn verified(data: &SnapshotData, revision: u64) -> Snapshot {
    let key = test_key(1);
    Snapshot::verify(&signed(data, revision, &key), &TrustedKeys::new([key.verifying_key()])).unwrap()
}

/// A snapshot file's bytes, signed with the key [`TestServer`] trusts.
pub fn signed_test(data: &SnapshotData, revision: u64) -> Vec<u8> {
    signed(data, revision, &test_key(1))
}

/// When test sidecars start by default: now, so policies with real dates decide as they would
/// today; a test that needs a given instant uses [`TestServer::start_at`].
/// The instant in-process test sidecars start at: 2026-12-15T00:00:00Z, inside every example
/// license that the tests lean on, whatever the wall clock says.
pub const PINNED_NOW_MS: i64 = 1_797_292_800_000;

pub fn wall_clock_ms() -> i64 {
    tollgate_core::clock::system_now_ms()
}

/// A running sidecar ([`App`]) on an ephemeral port, on a [`ManualClock`] that only the test
/// moves, watching a snapshot file in a temporary directory. Dropping the handle does not stop
/// it, `stop` does.
pub struct TestServer {
    pub addr: SocketAddr,
    pub sidecar: Arc<Sidecar>,
    pub clock: Arc<ManualClock>,
    /// The watched snapshot file: write a newer signed snapshot here to update.
    pub snapshot_path: PathBuf,
    dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A sidecar serving `snapshot` (bytes from [`signed_test`]), or unready without one.
    pub async fn start(snapshot: Option<Vec<u8>>) -> TestServer {
        TestServer::start_with(snapshot, |_| {}).await
    }

    /// On the clock at [`PINNED_NOW_MS`]: answers never depend on the day the tests run.
    pub async fn start_with(snapshot: Option<Vec<u8>>, configure: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_at(snapshot, PINNED_NOW_MS, configure).await
    }

    /// Like [`TestServer::start_with`], with the clock at `now_ms` (unix ms).
    pub async fn start_at(snapshot: Option<Vec<u8>>, now_ms: i64, configure: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let snapshot_path = dir.path().join("snapshot.tgs");
        if let Some(bytes) = snapshot {
            std::fs::write(&snapshot_path, bytes).unwrap();
        }
        let mut config = Config::new(SourceConfig::File(snapshot_path.clone()), TrustedKeys::new([test_key(1).verifying_key()]));
        config.watch_interval = Duration::from_millis(50);
        config.drain_timeout = Duration::from_secs(5);
        configure(&mut config);
        let clock = Arc::new(ManualClock::new(now_ms));
        let app = App::build(config, Arc::clone(&clock) as Arc<dyn Clock>).unwrap();
        let sidecar = Arc::clone(app.sidecar());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(Listeners { api: listener, metrics: None }, async move {
            let _ = stopped.await;
        }));
        TestServer { addr, sidecar, clock, snapshot_path, dir, stop, task }
    }

    /// The temporary directory holding the snapshot file (and any data directory a test puts
    /// there).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client { sender, addr }
    }

    pub async fn send(&mut self, method: &str, path: &str, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Reply {
        let mut builder = Request::builder().method(method).uri(path).header("host", self.addr.to_string());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body.into())).unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply { status, headers, body }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path, Bytes::new(), &[]).await
    }

    pub async fn post(&mut self, path: &str, body: &serde_json::Value) -> Reply {
        self.send("POST", path, serde_json::to_vec(body).unwrap(), &[("content-type", "application/json")]).await
    }

    pub async fn post_raw(&mut self, path: &str, body: &'static str) -> Reply {
        self.send("POST", path, body, &[("content-type", "application/json")]).await
    }
}
