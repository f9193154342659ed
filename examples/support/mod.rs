//! What the measuring examples share: a keep-alive HTTP/1.1 client, child processes that die
//! with the example, readiness waits and percentiles.
#![allow(dead_code, reason = "each example uses part of it")]
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client { sender, addr }
    }

    pub async fn send(&mut self, method: &str, path: &str, body: Vec<u8>, key: Option<&str>) -> (u16, Bytes) {
        self.send_with(method, path, body, key, &[]).await
    }

    /// Like [`Client::send`], with extra headers.
    pub async fn send_with(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        key: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Bytes) {
        let mut builder = hyper::Request::builder().method(method).uri(path).header("host", self.addr.to_string());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(builder.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
        let status = response.status().as_u16();
        (status, response.into_body().collect().await.unwrap().to_bytes())
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        // Sidecars first, so they do not log the control plane going away.
        for child in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn wait_ready(addr: SocketAddr, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            drop(stream);
            let mut client = Client::connect(addr).await;
            if client.send("GET", path, Vec::new(), None).await.0 == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{addr} did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Starts `n` `tollgate sidecar` processes subscribed to the control plane at `control_plane`
/// (with the API key in `key_file`, trusting `public_key`), each with its own data directory
/// under `dir`, and waits until every one is ready. Returns their addresses.
pub async fn start_sidecars(
    binary: &str,
    processes: &mut Processes,
    n: usize,
    control_plane: SocketAddr,
    key_file: &Path,
    public_key: &Path,
    dir: &Path,
) -> Vec<SocketAddr> {
    let mut sidecars = Vec::new();
    for idx in 0..n {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data_dir = dir.join(format!("sidecar-{idx}"));
        processes.0.push(
            Command::new(binary)
                .args(["sidecar", "--control-plane", &format!("http://{control_plane}"), "--api-key-file", key_file.to_str().unwrap()])
                .args(["--trust-key", public_key.to_str().unwrap(), "--data-dir", data_dir.to_str().unwrap()])
                .args(["--listen", &addr.to_string(), "--workers", "1"])
                .env("TOLLGATE_LOG", "warn")
                .spawn()
                .unwrap(),
        );
        sidecars.push(addr);
    }
    for addr in &sidecars {
        wait_ready(*addr, "/readyz").await;
    }
    sidecars
}

/// Polls every sidecar with the `/v1/check` body `check` until each answers from `revision` or
/// a newer one; returns those answers, one per sidecar.
pub async fn wait_for_revision(pollers: &mut [Client], check: &[u8], revision: u64) -> Vec<serde_json::Value> {
    let waits = pollers.iter_mut().map(|poller| async move {
        loop {
            let (_, answer) = poller.send("POST", "/v1/check", check.to_vec(), None).await;
            let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
            if answer["revision"].as_u64().unwrap_or(0) >= revision {
                return answer;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    let mut answers = Vec::new();
    for wait in waits.map(Box::pin).collect::<Vec<_>>() {
        answers.push(wait.await);
    }
    answers
}

/// One request of a throughput run: method, path, body, API key and extra headers.
pub struct Planned {
    pub path: &'static str,
    pub body: Vec<u8>,
    pub key: Option<String>,
    pub headers: Vec<(&'static str, String)>,
}

/// `clients` concurrent connections to `addr` POST what `plan(client, n)` makes, for `seconds`,
/// each answer a 200; returns how many were answered and the seconds it took.
pub async fn throughput(
    addr: SocketAddr,
    clients: usize,
    seconds: u64,
    plan: impl Fn(usize, u64) -> Planned + Send + Sync + 'static,
) -> (u64, f64) {
    let plan = Arc::new(plan);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..clients {
        let (done, plan) = (Arc::clone(&done), Arc::clone(&plan));
        workers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let request = plan(worker, n);
                let headers: Vec<(&str, &str)> = request.headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
                let (status, answer) = client.send_with("POST", request.path, request.body, request.key.as_deref(), &headers).await;
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    (done.load(Ordering::Relaxed), started.elapsed().as_secs_f64())
}

/// p50, p90, p99 and max of latencies in milliseconds, sorted here.
pub fn latency_summary(latencies_ms: &mut [f64]) -> serde_json::Value {
    latencies_ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "p50": percentile(latencies_ms, 0.50),
        "p90": percentile(latencies_ms, 0.90),
        "p99": percentile(latencies_ms, 0.99),
        "max": latencies_ms.last().copied().unwrap_or(0.0),
    })
}

/// A control plane process over the example policies with a fresh key pair, in a temporary
/// directory, and the processes started around it (stopped on drop).
pub struct Setup {
    pub binary: String,
    pub dir: tempfile::TempDir,
    pub keys: PathBuf,
    pub data: PathBuf,
    pub processes: Processes,
    pub control_plane: SocketAddr,
}

impl Setup {
    /// Writes a key pair and starts `tollgate control-plane` with the flags `extra` gives for the
    /// temporary directory (files it writes there first), then waits until it answers.
    pub async fn start(binary: String, extra: impl FnOnce(&Path) -> Vec<String>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let output = Command::new(&binary).args(["keygen", "--out", keys.to_str().unwrap()]).stderr(Stdio::null()).output().unwrap();
        assert!(output.status.success());
        let data = dir.path().join("cp");
        let control_plane: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let policies = std::env::current_dir().unwrap().join("policies");
        let mut processes = Processes(Vec::new());
        processes.0.push(
            Command::new(&binary)
                .args(["control-plane", "--data", data.to_str().unwrap(), "--policies", policies.to_str().unwrap()])
                .args(["--signing-key", keys.join("tollgate.key").to_str().unwrap(), "--listen", &control_plane.to_string()])
                .args(extra(dir.path()))
                .env("TOLLGATE_LOG", "warn")
                .spawn()
                .unwrap(),
        );
        wait_ready(control_plane, "/healthz").await;
        Setup { binary, dir, keys, data, processes, control_plane }
    }

    /// A new API key of `scope`, made with `tollgate control-plane keys create`.
    pub fn key(&self, scope: &str) -> String {
        let output = Command::new(&self.binary)
            .args(["control-plane", "keys", "create", "--data", self.data.to_str().unwrap(), "--scope", scope])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    /// Starts `n` sidecars subscribed to the control plane with a new sidecar key, ready.
    pub async fn sidecars(&mut self, n: usize) -> Vec<SocketAddr> {
        let key_file = self.dir.path().join("sidecar.key");
        std::fs::write(&key_file, self.key("sidecar")).unwrap();
        let public_key = self.keys.join("tollgate.pub");
        let dir = self.dir.path().to_path_buf();
        start_sidecars(&self.binary, &mut self.processes, n, self.control_plane, &key_file, &public_key, &dir).await
    }
}
