//! Measures Stripe webhooks in: signed `customer.subscription.*` events applied per second,
//! and the time from an upgrade event being acknowledged to every subscribed sidecar
//! allowing what the new plan grants. Starts one `tollgate control-plane` (with
//! `--stripe-webhook-secret-file`) and N `tollgate sidecar --control-plane` processes.
//!
//! cargo build --release --bin tollgate
//! cargo run --release --example stripe_events -- [BINARY] [SIDECARS] [EVENTS] [SECONDS] [CLIENTS]
//!
//! Defaults: target/release/tollgate, 3 sidecars, 100 upgrade/downgrade events, 10 s of
//! throughput with 8 concurrent senders, each event a new subscription of a new account.
//! Prints one JSON object.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Instant;

mod support;

use support::{Client, Planned, Setup, latency_summary, throughput, wait_for_revision};
use tollgate_control_plane::integrations::stripe;

const SECRET: &str = "whsec_example_measurement";

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A signed Stripe event: the body and its `Stripe-Signature`.
fn stripe_event(id: &str, kind: &str, created: i64, subscription: &str, account: &str, price: &str) -> (Vec<u8>, String) {
    let body = serde_json::json!({
        "id": id,
        "object": "event",
        "type": kind,
        "created": created,
        "data": {"object": {
            "id": subscription,
            "object": "subscription",
            "customer": format!("cus_{account}"),
            "status": "active",
            "metadata": {"tollgate_account": account},
            "start_date": created - 86_400,
            "current_period_start": created - 86_400,
            "current_period_end": created + 30 * 86_400,
            "items": {"data": [{"id": "si_1", "price": {"id": price}, "quantity": 3}]},
        }},
    })
    .to_string()
    .into_bytes();
    let signature = stripe::sign(SECRET.as_bytes(), unix_now(), &body);
    (body, signature)
}

async fn deliver(client: &mut Client, (body, signature): (Vec<u8>, String)) -> serde_json::Value {
    let (status, answer) = client.send_with("POST", "/v1/integrations/stripe", body, None, &[("stripe-signature", &signature)]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["status"], "applied", "{answer}");
    answer
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = args.get(1).cloned().unwrap_or_else(|| "target/release/tollgate".into());
    let n_sidecars: usize = args.get(2).map_or(3, |n| n.parse().unwrap());
    let n_events: usize = args.get(3).map_or(100, |n| n.parse().unwrap());
    let seconds: u64 = args.get(4).map_or(10, |n| n.parse().unwrap());
    let n_clients: usize = args.get(5).map_or(8, |n| n.parse().unwrap());

    let mut setup = Setup::start(binary, |dir| {
        let secret_file = dir.join("stripe.secret");
        std::fs::write(&secret_file, SECRET).unwrap();
        vec!["--stripe-webhook-secret-file".into(), secret_file.display().to_string()]
    })
    .await;
    let cp_addr = setup.control_plane;
    let mut cp = Client::connect(cp_addr).await;
    let base = unix_now();
    deliver(&mut cp, stripe_event("evt_seed", "customer.subscription.created", base, "sub_acme", "acme", "price_team_monthly")).await;

    let sidecars = setup.sidecars(n_sidecars).await;

    // Event -> decision: alternate the business and team prices; after each event, poll every
    // sidecar until `sso` (business only) is allowed or denied as the event says.
    let check = serde_json::to_vec(&serde_json::json!({"account": "acme", "feature": "sso"})).unwrap();
    let mut pollers = Vec::new();
    for addr in &sidecars {
        pollers.push(Client::connect(*addr).await);
    }
    let mut latencies_ms = Vec::new();
    for n in 0..n_events {
        let upgrade = n % 2 == 0;
        let price = if upgrade { "price_business_monthly" } else { "price_team_monthly" };
        let event = stripe_event(&format!("evt_p{n}"), "customer.subscription.updated", base + 1 + n as i64, "sub_acme", "acme", price);
        let answer = deliver(&mut cp, event).await;
        let acknowledged = Instant::now();
        let revision = answer["revision"].as_u64().unwrap();
        for answer in wait_for_revision(&mut pollers, &check, revision).await {
            assert_eq!(answer["allow"], upgrade, "{answer}");
        }
        latencies_ms.push(acknowledged.elapsed().as_secs_f64() * 1e3);
    }
    // Throughput: concurrent senders, each event a new subscription of a new account.
    let (n_done, elapsed) = throughput(cp_addr, n_clients, seconds, move |worker, n| {
        let id = format!("w{worker}-{n}");
        let (body, signature) =
            stripe_event(&format!("evt_{id}"), "customer.subscription.created", base, &format!("sub_{id}"), &id, "price_team_monthly");
        Planned { path: "/v1/integrations/stripe", body, key: None, headers: vec![("stripe-signature", signature)] }
    })
    .await;

    let report = serde_json::json!({
        "sidecars": n_sidecars,
        "events_measured": n_events,
        "event_to_every_sidecar_decision_ms": latency_summary(&mut latencies_ms),
        "events_applied_per_second": n_done as f64 / elapsed,
        "accounts_at_end": n_done + 1,
        "throughput_clients": n_clients,
        "throughput_seconds": elapsed,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
