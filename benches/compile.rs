//! Criterion benches of a full compile, stage by stage, at 100k accounts (issue 12, item 7):
//! policy files to snapshot data (`tollgate compile`), snapshot data to a signed snapshot, and
//! the control plane's full build (every stored account read from SQLite, compiled, signed).
//!
//! `TOLLGATE_BENCH_SIZES=10000,1000000` changes the sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;

use tollgate_control_plane::store::SqliteRepository;
use tollgate_policy::generate::{GenOptions, accounts, catalog};
use tollgate_policy::{Source, compile_sources};

const CHUNK: usize = 10_000;

fn sizes() -> Vec<usize> {
    std::env::var("TOLLGATE_BENCH_SIZES")
        .ok()
        .map(|text| text.split(',').filter_map(|size| size.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000])
}

fn options(n_accounts: usize) -> GenOptions {
    GenOptions { n_accounts, n_features: 64, seed: 1 }
}

fn bench_compile(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for n_accounts in sizes() {
        let options = options(n_accounts);
        let catalog = Source { path: "catalog.toml".into(), text: catalog(&options) };
        let files: Vec<Source> = (0..n_accounts)
            .step_by(CHUNK)
            .map(|start| Source {
                path: format!("accounts/{start}.toml").into(),
                text: accounts(&options, start..(start + CHUNK).min(n_accounts)),
            })
            .collect();
        group.throughput(Throughput::Elements(n_accounts as u64));
        group.bench_function(BenchmarkId::new("policy_files", n_accounts), |b| {
            b.iter(|| black_box(compile_sources(&catalog, files.iter().cloned().map(Ok)).unwrap()))
        });
        let data = compile_sources(&catalog, files.iter().cloned().map(Ok)).unwrap();
        group.bench_function(BenchmarkId::new("build_and_sign", n_accounts), |b| {
            b.iter(|| black_box(tollgate_snapshot::build(&data, 1, 0, &key).unwrap()))
        });
        drop(data);

        // The control plane's full build over the same accounts, imported.
        let policies = tempfile::tempdir().unwrap();
        tollgate_policy::generate::write(policies.path(), &options).unwrap();
        let data_dir = tempfile::tempdir().unwrap();
        let repository = SqliteRepository::open(data_dir.path()).unwrap();
        tollgate_control_plane::import::import_dir(&repository, policies.path(), "bench", 0).unwrap();
        let compiled_catalog = tollgate_policy::compile_catalog(&catalog).unwrap();
        group.bench_function(BenchmarkId::new("control_plane_build", n_accounts), |b| {
            b.iter(|| black_box(tollgate_control_plane::publish::build_base(&repository, &compiled_catalog, &key, 0).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_compile);
criterion_main!(benches);
