//! Measures the control plane: the time from an order being accepted to every subscribed
//! sidecar answering `/v1/check` with the new revision, and orders per second. Starts one
//! `tollgate control-plane` and N `tollgate sidecar --control-plane` processes on loopback.
//!
//! cargo build --release --bin tollgate
//! cargo run --release --example control_plane_propagation -- [BINARY] [SIDECARS] [ORDERS] [SECONDS] [CLIENTS]
//!
//! Defaults: target/release/tollgate, 10 sidecars, 200 orders, 10 s of order throughput with
//! 8 concurrent clients. Prints one JSON object.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Instant;

mod support;

use support::{Client, Planned, Setup, latency_summary, throughput, wait_for_revision};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = args.get(1).cloned().unwrap_or_else(|| "target/release/tollgate".into());
    let n_sidecars: usize = args.get(2).map_or(10, |n| n.parse().unwrap());
    let n_orders: usize = args.get(3).map_or(200, |n| n.parse().unwrap());
    let seconds: u64 = args.get(4).map_or(10, |n| n.parse().unwrap());
    let n_clients: usize = args.get(5).map_or(8, |n| n.parse().unwrap());

    let mut setup = Setup::start(binary, |_| Vec::new()).await;
    let cp_addr = setup.control_plane;
    let integration = setup.key("integration");
    let mut cp = Client::connect(cp_addr).await;
    let order = |id: String, action: &str, account: &str, plan: &str| {
        serde_json::to_vec(&serde_json::json!({"order_id": id, "action": action, "account": account, "plan": plan})).unwrap()
    };
    assert_eq!(cp.send("POST", "/v1/orders", order("seed".into(), "new", "acme", "team"), Some(&integration)).await.0, 200);

    let sidecars = setup.sidecars(n_sidecars).await;

    // Propagation: alternate upgrade and downgrade; after each order, poll every sidecar
    // until it answers with the order's revision.
    let check = serde_json::to_vec(&serde_json::json!({"account": "acme", "feature": "sso"})).unwrap();
    let mut pollers = Vec::new();
    for addr in &sidecars {
        pollers.push(Client::connect(*addr).await);
    }
    let mut latencies_ms = Vec::new();
    for n in 0..n_orders {
        let (action, plan) = if n % 2 == 0 { ("upgrade", "business") } else { ("downgrade", "team") };
        let (status, body) = cp.send("POST", "/v1/orders", order(format!("p-{n}"), action, "acme", plan), Some(&integration)).await;
        let accepted = Instant::now();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let revision = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["revision"].as_u64().unwrap();
        wait_for_revision(&mut pollers, &check, revision).await;
        latencies_ms.push(accepted.elapsed().as_secs_f64() * 1e3);
    }
    // Throughput: concurrent clients posting new orders for distinct accounts.
    let (n_done, elapsed) = throughput(cp_addr, n_clients, seconds, move |worker, n| {
        let id = format!("t-{worker}-{n}");
        let body = serde_json::to_vec(&serde_json::json!({"order_id": id, "action": "new", "account": id, "plan": "team"})).unwrap();
        Planned { path: "/v1/orders", body, key: Some(integration.clone()), headers: Vec::new() }
    })
    .await;

    let report = serde_json::json!({
        "sidecars": n_sidecars,
        "orders_measured": n_orders,
        "order_to_every_sidecar_ms": latency_summary(&mut latencies_ms),
        "orders_per_second": n_done as f64 / elapsed,
        "throughput_clients": n_clients,
        "throughput_seconds": elapsed,
        "orders_in_throughput_run": n_done,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
