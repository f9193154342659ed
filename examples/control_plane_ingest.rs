//! Measures usage ingestion: events per second the control plane takes through
//! `POST /v1/usage` over HTTP on loopback, in batches of 1000 unique events spread over 1000
//! accounts (created with orders first), as sidecars send them (each batch carries the
//! cursor of the previous answer, so answers carry the changed totals too). Runs the control
//! plane in-process on a temporary data directory with SQLite's durable commits.
//!
//! cargo run --release --example control_plane_ingest -- [BATCHES] [SIDECARS]
//!
//! Defaults: 100 batches per sidecar, 1 and then 4 concurrent sidecars. Prints one JSON object.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

use tollgate_control_plane::{self as control_plane, ControlPlane};

const N_ACCOUNTS: usize = 1000;
const BATCH: usize = 1000;

struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    key: String,
}

impl Client {
    async fn connect(addr: SocketAddr, key: &str) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client { sender, addr, key: key.to_string() }
    }

    async fn post(&mut self, path: &str, body: Vec<u8>) -> (u16, Bytes) {
        let request = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        (status, response.into_body().collect().await.unwrap().to_bytes())
    }
}

fn batch_body(sidecar: &str, since: u64, batch_idx: usize, at: &str) -> Vec<u8> {
    let events: Vec<serde_json::Value> = (0..BATCH)
        .map(|event_idx| {
            serde_json::json!({
                "account": format!("acct-{}", event_idx % N_ACCOUNTS),
                "meter": "api_calls",
                "id": format!("{sidecar}-{batch_idx}-{event_idx}"),
                "amount": 1,
                "at": at,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"sidecar": sidecar, "since": since, "events": events})).unwrap()
}

/// One sidecar sending `n_batches` batches back to back; returns the latency of each.
async fn sidecar(addr: SocketAddr, key: String, name: String, n_batches: usize, at: String) -> Vec<f64> {
    let mut client = Client::connect(addr, &key).await;
    let mut since = 0u64;
    let mut latencies = Vec::with_capacity(n_batches);
    for batch_idx in 0..n_batches {
        let body = batch_body(&name, since, batch_idx, &at);
        let started = Instant::now();
        let (status, answer) = client.post("/v1/usage", body).await;
        latencies.push(started.elapsed().as_secs_f64());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["counted"].as_u64(), Some(BATCH as u64), "{answer}");
        since = answer["cursor"].as_u64().unwrap();
    }
    latencies
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

async fn run_round(addr: SocketAddr, key: &str, round: usize, n_sidecars: usize, n_batches: usize) -> serde_json::Value {
    let at = tollgate_core::period::format_rfc3339(tollgate_core::clock::system_now_ms().div_euclid(1000));
    let started = Instant::now();
    let tasks: Vec<_> = (0..n_sidecars)
        .map(|sidecar_idx| tokio::spawn(sidecar(addr, key.to_string(), format!("r{round}-pod-{sidecar_idx}"), n_batches, at.clone())))
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let n_events = n_sidecars * n_batches * BATCH;
    serde_json::json!({
        "sidecars": n_sidecars,
        "batches": n_sidecars * n_batches,
        "events": n_events,
        "seconds": seconds,
        "events_per_second": (n_events as f64 / seconds).round(),
        "batch_ms_p50": percentile(&latencies, 0.5) * 1e3,
        "batch_ms_p99": percentile(&latencies, 0.99) * 1e3,
    })
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n_batches: usize = args.next().map_or(100, |text| text.parse().expect("BATCHES is a number"));
    let max_sidecars: usize = args.next().map_or(4, |text| text.parse().expect("SIDECARS is a number"));
    let dir = tempfile::tempdir().unwrap();
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let control_plane = Arc::new(ControlPlane::open(dir.path(), &policies, key, Vec::new()).unwrap());
    let admin = control_plane::create_key(control_plane.repository.as_ref(), "admin", None, control_plane.now()).unwrap();
    let sidecar_key = control_plane::create_key(control_plane.repository.as_ref(), "sidecar", None, control_plane.now()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control_plane::run(
        Arc::clone(&control_plane),
        listener,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(2),
    ));

    let started = Instant::now();
    let mut orders = Client::connect(addr, &admin).await;
    for account_idx in 0..N_ACCOUNTS {
        let order = serde_json::json!({"order_id": format!("o-{account_idx}"), "action": "new", "account": format!("acct-{account_idx}"), "plan": "team"});
        let (status, answer) = orders.post("/v1/orders", serde_json::to_vec(&order).unwrap()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }
    let orders_seconds = started.elapsed().as_secs_f64();

    let mut rounds = vec![run_round(addr, &sidecar_key, 0, 1, n_batches).await];
    if max_sidecars > 1 {
        rounds.push(run_round(addr, &sidecar_key, 1, max_sidecars, n_batches).await);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "accounts": N_ACCOUNTS,
            "batch_size": BATCH,
            "orders_seconds": orders_seconds,
            "rounds": rounds,
        }))
        .unwrap()
    );
    let _ = stop.send(());
    server.await.unwrap();
}
