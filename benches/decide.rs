//! Criterion benches: `decide` on snapshots of 10k, 100k and 1M accounts; the batch
//! endpoint's cost per decision; and compile, load+verify and swap time against size.
//!
//! `TOLLGATE_BENCH_SIZES=10000,100000` limits the sizes (the 1M snapshot takes about half a
//! minute and 2.5 GB to compile before its benches start).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;

use tollgate_core::engine::{NoUsage, Request, decide};
use tollgate_core::model::SnapshotData;
use tollgate_policy::generate::{GenOptions, accounts, catalog};
use tollgate_policy::{Source, compile_sources};
use tollgate_sidecar::app::App;
use tollgate_sidecar::config::{Config, SourceConfig};
use tollgate_snapshot::{self as snapshot, Snapshot, TrustedKeys};

const CHUNK: usize = 10_000;

fn sizes() -> Vec<usize> {
    std::env::var("TOLLGATE_BENCH_SIZES")
        .ok()
        .map(|text| text.split(',').filter_map(|size| size.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000])
}

fn compile(n_accounts: usize) -> SnapshotData {
    let options = GenOptions { n_accounts, n_features: 64, seed: 1 };
    let catalog = Source { path: "catalog.toml".into(), text: catalog(&options) };
    let chunks = (0..n_accounts).step_by(CHUNK).map(|start| {
        Ok(Source { path: format!("accounts/{start}.toml").into(), text: accounts(&options, start..(start + CHUNK).min(n_accounts)) })
    });
    compile_sources(&catalog, chunks).unwrap_or_else(|errors| panic!("{errors}"))
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn trusted() -> TrustedKeys {
    TrustedKeys::new([key().verifying_key()])
}

/// A fixed, varied set of requests: allowed and denied, with and without user, region,
/// device and amount, over accounts spread across the snapshot.
/// account, feature, user, region, device
type OwnedRequest = (String, String, Option<String>, Option<&'static str>, Option<String>);

fn requests(n_accounts: usize) -> Vec<OwnedRequest> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..1024)
        .map(|_| {
            let account = format!("acct-{}", next() % n_accounts as u64);
            let feature = format!("feature-{}", next() % 66);
            let user = (next() % 2 == 0).then(|| format!("user-{}", next() % 3));
            let region = [None, Some("us"), Some("eu"), Some("apac")][(next() % 4) as usize];
            let device = (next() % 4 == 0).then(|| format!("dev-{}", next() % 3));
            (account, feature, user, region, device)
        })
        .collect()
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    for n_accounts in sizes() {
        let data = compile(n_accounts);
        let bytes = snapshot::build(&data, 1, 0, &key()).unwrap();
        drop(data);
        eprintln!(
            "snapshot of {n_accounts} accounts: {} bytes, {:.0} bytes per account",
            bytes.len(),
            bytes.len() as f64 / n_accounts as f64
        );
        let snapshot = Snapshot::verify(&bytes, &trusted()).unwrap();
        drop(bytes);
        let owned = requests(n_accounts);
        let requests: Vec<Request<'_>> = owned
            .iter()
            .map(|(account, feature, user, region, device)| Request {
                account,
                feature,
                user: user.as_deref(),
                region: *region,
                device: device.as_deref(),
                amount: None,
            })
            .collect();
        let now = 1_795_000_000;
        let mut idx = 0;
        group.bench_function(BenchmarkId::from_parameter(n_accounts), |b| {
            b.iter(|| {
                idx = (idx + 1) % requests.len();
                black_box(decide(snapshot.data(), black_box(&requests[idx]), now, &NoUsage))
            })
        });
    }
    group.finish();
}

fn bench_batch(c: &mut Criterion) {
    let n_accounts = 10_000;
    let snapshot = Snapshot::verify(&snapshot::build(&compile(n_accounts), 1, 0, &key()).unwrap(), &trusted()).unwrap();
    // Served from the store directly: the watched file is never written.
    let config = Config::new(SourceConfig::File(std::env::temp_dir().join("tollgate-bench-unused.tgs")), trusted());
    let app = App::build(config, Arc::new(tollgate_core::clock::SystemClock)).unwrap();
    let sidecar = app.sidecar();
    sidecar.store().install(snapshot).unwrap();
    let mut group = c.benchmark_group("batch_endpoint");
    for batch_size in [100usize, 1000] {
        let checks: Vec<serde_json::Value> = requests(n_accounts)
            .into_iter()
            .cycle()
            .take(batch_size)
            .map(|(account, feature, user, region, _)| serde_json::json!({"account": account, "feature": feature, "user": user, "region": region}))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "checks": checks })).unwrap();
        group.throughput(Throughput::Elements(batch_size as u64));
        group.bench_function(BenchmarkId::from_parameter(batch_size), |b| {
            b.iter(|| black_box(tollgate_sidecar::check_batch(sidecar, black_box(&body))))
        });
    }
    group.finish();
}

fn bench_snapshot_lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for n_accounts in sizes() {
        if n_accounts <= 100_000 {
            group.bench_function(BenchmarkId::new("compile", n_accounts), |b| b.iter(|| black_box(compile(n_accounts))));
        }
        let data = compile(n_accounts);
        let bytes = snapshot::build(&data, 1, 0, &key()).unwrap();
        drop(data);
        // Load + verify: read the file into an aligned buffer, check the signature, validate
        // the archive; what the sidecar does off the request path for every update.
        let path = std::env::temp_dir().join(format!("tollgate-bench-{}-{n_accounts}.snapshot", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        group.bench_function(BenchmarkId::new("load_verify", n_accounts), |b| {
            b.iter(|| black_box(Snapshot::read_file(&path, &trusted()).unwrap()))
        });
        // Swap: install a verified snapshot over an older one of the same size. The swap is a
        // pointer exchange; the old archive is freed on the reaper thread, not here. Each
        // iteration needs a fresh store and two snapshots, so only the small size runs it.
        if n_accounts <= 10_000 {
            let older = Snapshot::verify(&bytes, &trusted()).unwrap();
            let newer = Snapshot::verify(&snapshot::build(&compile(n_accounts), 2, 0, &key()).unwrap(), &trusted()).unwrap();
            group.bench_function(BenchmarkId::new("swap", n_accounts), |b| {
                b.iter_batched(
                    || {
                        let store = tollgate_sidecar::store::SnapshotStore::new(
                            Arc::new(tollgate_sidecar::telemetry::Metrics::new()),
                            Arc::new(tollgate_core::clock::SystemClock),
                        );
                        store.install(older.clone()).unwrap();
                        (store, newer.clone())
                    },
                    |(store, newer)| {
                        store.install(newer).unwrap();
                        store
                    },
                    criterion::BatchSize::PerIteration,
                )
            });
        }
        let _ = std::fs::remove_file(&path);
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_batch, bench_snapshot_lifecycle);
criterion_main!(benches);
