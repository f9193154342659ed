//! Per-call overhead of the Rust client over raw HTTP at a fixed rate, and the in-process
//! mode's decision latency. A measurement, not a test: nothing is asserted.
//!
//! Start a sidecar first (`tollgate sidecar --policies policies --listen 127.0.0.1:8181`),
//! then `cargo run --release -p tollgate-client --example overhead -- http://127.0.0.1:8181 1000 5000`
//! (base URL, calls per second, number of calls).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_client::{CheckRequest, Client, SnapshotSource, TrustedKeys};
use tollgate_core::clock::Stopwatch;

/// The requests cycled through: allows and denials over the example policies' accounts.
fn requests() -> Vec<CheckRequest> {
    vec![
        CheckRequest::new("acme", "reports").user("alice"),
        CheckRequest::new("hooli", "sso"),
        CheckRequest::new("stark", "api"),
        CheckRequest::new("globex", "dashboards"),
        CheckRequest::new("wayne", "export"),
    ]
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

fn summary(name: &str, mut micros: Vec<f64>) -> (f64, f64) {
    micros.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&micros, 0.50), percentile(&micros, 0.99));
    println!("{name:<28} n={:<6} p50={p50:>8.1} µs  p99={p99:>8.1} µs", micros.len());
    (p50, p99)
}

/// Runs `call` `n` times, one start every `1/rate` s (a call that overruns delays the next).
async fn paced<F, Fut>(rate: u32, n: usize, mut call: F) -> Vec<f64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut micros = Vec::with_capacity(n);
    for call_idx in 0..n {
        ticker.tick().await;
        let started = Stopwatch::start();
        call(call_idx).await;
        micros.push(started.elapsed_secs() * 1e6);
    }
    micros
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base_url = args.next().unwrap_or_else(|| "http://127.0.0.1:8181".to_string());
    let rate: u32 = args.next().map(|value| value.parse()).transpose()?.unwrap_or(1000);
    let n: usize = args.next().map(|value| value.parse()).transpose()?.unwrap_or(5000);
    let requests = requests();
    let bodies: Vec<Bytes> = requests.iter().map(|request| serde_json::to_vec(request).map(Bytes::from)).collect::<Result<_, _>>()?;
    println!("{n} calls at {rate}/s against {base_url}; {} distinct requests", requests.len());

    // Raw HTTP: the same pooled hyper client, a pre-encoded body, the answer read but not parsed.
    let raw = Arc::new(HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new()));
    let uri: hyper::Uri = format!("{base_url}/v1/check").parse()?;
    let raw_call = |call_idx: usize| {
        let (raw, uri) = (Arc::clone(&raw), uri.clone());
        let body = bodies.get(call_idx % bodies.len()).cloned().unwrap_or_default();
        async move {
            let request = hyper::Request::post(uri).header("content-type", "application/json").body(Full::new(body));
            if let Ok(request) = request
                && let Ok(response) = raw.request(request).await
            {
                let _ = response.into_body().collect().await;
            }
        }
    };
    paced(rate, n / 10, raw_call).await; // warm-up
    let raw_micros = paced(rate, n, raw_call).await;

    let client = Client::new(&base_url)?;
    let sdk_call = |call_idx: usize| {
        let client = client.clone();
        let request = requests.get(call_idx % requests.len()).cloned().unwrap_or_default();
        async move {
            let _ = client.check(&request).await;
        }
    };
    paced(rate, n / 10, sdk_call).await;
    let sdk_micros = paced(rate, n, sdk_call).await;

    // In-process: the example policies compiled, signed with a throwaway key, read back and
    // verified like any snapshot file.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("snapshot.tgs");
    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let data = tollgate_policy::compile_dir(&policies).map_err(|errors| errors.to_string())?;
    let n_accounts = data.accounts.len();
    let key = tollgate_snapshot::generate_key()?;
    std::fs::write(&path, tollgate_snapshot::build(&data, 1, tollgate_core::clock::system_now_ms(), &key)?)?;
    let local =
        Client::in_process(SnapshotSource::File { path, poll: Duration::from_secs(60) }, TrustedKeys::new([key.verifying_key()])).await?;
    let local_call = |call_idx: usize| {
        let local = local.clone();
        let request = requests.get(call_idx % requests.len()).cloned().unwrap_or_default();
        async move {
            let _ = local.check(&request).await;
        }
    };
    paced(rate, n / 10, local_call).await;
    let local_micros = paced(rate, n, local_call).await;

    println!("snapshot: {n_accounts} accounts (the example policies/)");
    let (raw_p50, raw_p99) = summary("raw HTTP (hyper, no parse)", raw_micros);
    let (sdk_p50, sdk_p99) = summary("tollgate-client HTTP", sdk_micros);
    summary("tollgate-client in-process", local_micros);
    println!("client overhead over raw HTTP: p50 {:+.1} µs, p99 {:+.1} µs", sdk_p50 - raw_p50, sdk_p99 - raw_p99);
    Ok(())
}
