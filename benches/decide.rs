//! Criterion benches: `decide` on snapshots of 10k, 100k and 1M accounts, alone and under an
//! overlay of 10,000 accounts changed by deltas; applying one more delta to such a view; the
//! batch endpoint's cost per decision; and compile, load+verify and swap time against size.
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
use tollgate_core::model::{DeltaAccount, DeltaData, SnapshotData};
use tollgate_policy::generate::{GenOptions, accounts, catalog};
use tollgate_policy::{Source, compile_sources};
use tollgate_sidecar::app::App;
use tollgate_sidecar::config::{Config, SourceConfig};
use tollgate_snapshot::{self as snapshot, Delta, ServingView, Snapshot, TrustedKeys};

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

/// Accounts in the overlay for the overlay benches: one delta per account, as one-account
/// orders make them.
const OVERLAY: usize = 10_000;

/// A delta carrying account `id` of `data` (unchanged), with the sets it points into copied
/// into the delta's own tables.
fn one_account_delta(data: &SnapshotData, id: &str) -> DeltaData {
    let mut account = data.accounts[id].clone();
    let mut feature_sets = Vec::new();
    let mut limit_sets = Vec::new();
    let local = |sets: &mut Vec<Vec<u64>>, set: &[u64]| -> u32 {
        sets.iter().position(|known| known.as_slice() == set).unwrap_or_else(|| {
            sets.push(set.to_vec());
            sets.len() - 1
        }) as u32
    };
    for license in &mut account.licenses {
        license.features = local(&mut feature_sets, &data.feature_sets[license.features as usize]);
        license.removed = local(&mut feature_sets, &data.feature_sets[license.removed as usize]);
        let limits = data.limit_sets[license.limits as usize].clone();
        license.limits = limit_sets.iter().position(|known| *known == limits).unwrap_or_else(|| {
            limit_sets.push(limits);
            limit_sets.len() - 1
        }) as u32;
    }
    DeltaData { feature_sets, limit_sets, accounts: vec![DeltaAccount { id: id.to_string(), account }], removed: Vec::new() }
}

/// A view of `n_accounts` with [`OVERLAY`] of them replaced, one delta each.
fn overlaid_view(n_accounts: usize) -> ServingView {
    let data = compile(n_accounts);
    let base = Snapshot::verify(&snapshot::build(&data, 1, 0, &key()).unwrap(), &trusted()).unwrap();
    let mut view = ServingView::new(base);
    let stride = (n_accounts / OVERLAY).max(1);
    for (position, account_idx) in (0..n_accounts).step_by(stride).take(OVERLAY).enumerate() {
        let delta = one_account_delta(&data, &format!("acct-{account_idx}"));
        let revision = position as u64 + 2;
        let bytes = snapshot::build_delta(&delta, 1, revision - 1, revision, 0, &key()).unwrap();
        view = view.apply(Delta::verify(&bytes, &trusted()).unwrap()).unwrap();
    }
    view
}

fn bench_overlay(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide_with_overlay");
    group.throughput(Throughput::Elements(1));
    for n_accounts in sizes().into_iter().filter(|n_accounts| *n_accounts >= 100_000) {
        let view = overlaid_view(n_accounts);
        eprintln!("view of {n_accounts} accounts with {} in the overlay", view.overlay_len());
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
                black_box(decide(&view, black_box(&requests[idx]), now, &NoUsage))
            })
        });
        // Every request on an account the overlay holds: the overlay's hit path.
        let stride = (n_accounts / OVERLAY).max(1);
        let overlaid: Vec<String> = (0..1024).map(|i| format!("acct-{}", (i * 7 % OVERLAY) * stride)).collect();
        let mut idx = 0;
        group.bench_function(BenchmarkId::new("overlay_hits", n_accounts), |b| {
            b.iter(|| {
                idx = (idx + 1) % overlaid.len();
                let request = Request { account: &overlaid[idx], feature: "feature-1", ..Request::default() };
                black_box(decide(&view, black_box(&request), now, &NoUsage))
            })
        });
        // Installing one more one-account delta on that view: the work a one-account order
        // costs a sidecar once the delta is verified.
        let data = compile(n_accounts.min(10_000));
        let next = view.revision();
        let bytes = snapshot::build_delta(&one_account_delta(&data, "acct-1"), 1, next, next + 1, 0, &key()).unwrap();
        group.bench_function(BenchmarkId::new("apply_delta", n_accounts), |b| {
            b.iter_batched(
                || Delta::verify(&bytes, &trusted()).unwrap(),
                |delta| black_box(view.apply(delta).unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
        group.bench_function(BenchmarkId::new("verify_delta", n_accounts), |b| {
            b.iter(|| black_box(Delta::verify(&bytes, &trusted()).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_overlay, bench_batch, bench_snapshot_lifecycle);
criterion_main!(benches);
