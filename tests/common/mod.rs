//! Shared test helpers: compiling inline policies, signing snapshots with a fixed test key,
//! starting a real sidecar on 127.0.0.1:0, and a small keep-alive HTTP/1.1 client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;

use tollgate_core::model::SnapshotData;
use tollgate_policy::Source;
use tollgate_sidecar::Sidecar;
use tollgate_sidecar::telemetry::Metrics;
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

/// A running sidecar on an ephemeral port; dropping the handle does not stop it, `stop` does.
pub struct TestServer {
    pub addr: SocketAddr,
    pub sidecar: Arc<Sidecar>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(snapshot: Option<Snapshot>) -> TestServer {
        TestServer::start_with(snapshot, |_| {}).await
    }

    pub async fn start_with(snapshot: Option<Snapshot>, configure: impl FnOnce(&mut Sidecar)) -> TestServer {
        let key = test_key(1);
        let mut sidecar = Sidecar::new(
            Arc::new(Metrics::new()),
            Arc::new(TrustedKeys::new([key.verifying_key()])),
            "test".into(),
            Arc::new(tollgate_core::clock::SystemClock),
        );
        configure(&mut sidecar);
        if let Some(snapshot) = snapshot {
            sidecar.store.install(snapshot).unwrap();
        }
        let sidecar = Arc::new(sidecar);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tollgate_sidecar::serve(
            listener,
            Arc::clone(&sidecar),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        TestServer { addr, sidecar, stop, task }
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
