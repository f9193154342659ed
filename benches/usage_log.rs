//! The durable usage log's cost: one event appended and synced alone (the price of one
//! `fdatasync` here, plus framing), and 64 events that arrive together and share one sync
//! (group commit). `cargo bench --bench usage_log`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use tollgate_sidecar::usage_log::{LoggedEvent, UsageLog};

fn event(n: u64) -> LoggedEvent {
    LoggedEvent {
        seq: 0,
        account: format!("acct-{}", n % 1000),
        meter: "api_calls".into(),
        id: format!("bench-{n}"),
        amount: 1,
        at: 1_790_000_000,
        period_start: 1_788_220_800,
        recorded_at: 1_790_000_000,
    }
}

fn bench_usage_log(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = UsageLog::open(dir.path(), false).unwrap();
    let mut n = 0u64;
    let mut group = c.benchmark_group("usage_log");
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_and_sync_one", |b| {
        b.iter(|| {
            n += 1;
            log.append(event(n)).unwrap().blocking_recv().unwrap().unwrap()
        })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("append_64_one_group", |b| {
        b.iter_batched(
            || {
                n += 64;
                (n - 64..n).map(event).collect::<Vec<_>>()
            },
            |events| {
                let receivers: Vec<_> = events.into_iter().map(|event| log.append(event).unwrap()).collect();
                receivers.into_iter().map(|receiver| receiver.blocking_recv().unwrap().unwrap()).last()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    log.stop();
}

criterion_group!(benches, bench_usage_log);
criterion_main!(benches);
