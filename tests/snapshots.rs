//! Snapshot trust and hot swap: tampered, truncated, wrong-key and older snapshots are
//! rejected while the good one keeps serving; swaps under load lose no request and every
//! answer comes from one revision.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::TestServer;
use serde_json::json;
use tollgate_sidecar::source::{Source, reload};
use tollgate_snapshot::{Snapshot, SnapshotError, TrustedKeys};

fn trusted() -> TrustedKeys {
    TrustedKeys::new([common::test_key(1).verifying_key()])
}

#[test]
fn verification_rejects_every_kind_of_bad_snapshot() {
    let data = common::example_data();
    let good = common::signed(&data, 5, &common::test_key(1));
    assert!(Snapshot::verify(&good, &trusted()).is_ok());

    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(matches!(Snapshot::verify(&tampered, &trusted()), Err(SnapshotError::BadSignature(_))));

    // A header edit (say, a bumped revision) breaks the signature too.
    let needle = b"\"revision\":5";
    let position = good.windows(needle.len()).position(|window| window == needle).unwrap() + needle.len() - 1;
    let mut bumped = good.clone();
    bumped[position] = b'9';
    let bumped_result = Snapshot::verify(&bumped, &trusted());
    assert!(matches!(bumped_result, Err(SnapshotError::BadSignature(_))), "{bumped_result:?}");

    for cut in [0, 5, 11, 40, good.len() / 2, good.len() - 1] {
        assert!(Snapshot::verify(&good[..cut], &trusted()).is_err(), "truncated to {cut} bytes");
    }

    let wrong_key = common::signed(&data, 5, &common::test_key(2));
    assert!(matches!(Snapshot::verify(&wrong_key, &trusted()), Err(SnapshotError::UntrustedKey(_))));

    let mut not_ours = good.clone();
    not_ours[0] = b'X';
    assert!(matches!(Snapshot::verify(&not_ours, &trusted()), Err(SnapshotError::BadMagic)));
}

#[test]
fn a_signed_but_malformed_archive_fails_validation() {
    // Sign garbage with a trusted key: the signature holds, rkyv validation must not.
    let data = common::example_data();
    let good = common::signed(&data, 5, &common::test_key(1));
    let header = Snapshot::read_header(&good).unwrap();
    let header_len = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    let signed_end = good.len() - 64;
    let mut forged = good[..signed_end].to_vec();
    let payload_start = 12 + header_len;
    // rkyv puts the root object at the end of the archive: point its offsets astray.
    for byte in &mut forged[signed_end - 48..signed_end] {
        *byte = 0x7f;
    }
    use ed25519_dalek::Signer;
    let signature = common::test_key(1).sign(&forged);
    forged.extend_from_slice(&signature.to_bytes());
    assert_eq!(header.payload_len as usize, signed_end - payload_start);
    let result = Snapshot::verify(&forged, &trusted());
    assert!(matches!(result, Err(SnapshotError::Invalid(_))), "{result:?}");
}

#[tokio::test]
async fn rejected_updates_keep_the_last_good_snapshot_serving() {
    let data = common::example_data();
    let server = TestServer::start(Some(common::signed_test(&data, 10))).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.bin");
    let source = Source::File(path.clone());
    let store = &server.sidecar.store();

    let good = common::signed(&data, 11, &common::test_key(1));
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tampered", tampered),
        ("truncated", good[..good.len() / 3].to_vec()),
        ("wrong key", common::signed(&data, 12, &common::test_key(9))),
        ("older revision", common::signed(&data, 9, &common::test_key(1))),
        ("same revision", common::signed(&data, 10, &common::test_key(1))),
        ("empty", Vec::new()),
    ];
    for (name, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        assert!(reload(&source, &trusted(), store).is_err(), "{name} snapshot was accepted");
        assert_eq!(store.revision(), Some(10), "{name} snapshot replaced the good one");
        let mut client = server.client().await;
        let answer = client.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await.json();
        assert_eq!(answer["allow"], true);
        assert_eq!(answer["revision"], 10);
    }
    let status = server.client().await.get("/v1/status").await.json();
    assert_eq!(status["rejects"], 6);
    assert!(status["last_error"].as_str().unwrap().contains("truncated"), "{status}");
    assert_eq!(server.client().await.get("/readyz").await.status, 200, "readiness is a latch");
    let metrics = server.client().await.get("/metrics").await.text();
    assert!(metrics.contains(r#"tollgate_snapshot_rejects_total{cause="signature"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"tollgate_snapshot_rejects_total{cause="untrusted_key"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"tollgate_snapshot_rejects_total{cause="not_newer"} 2"#), "{metrics}");

    std::fs::write(&path, &good).unwrap();
    assert_eq!(reload(&source, &trusted(), store).ok(), Some(11));
    // Once a good snapshot is in, nothing is wrong any more; the refusal stays on record.
    let status = server.client().await.get("/v1/status").await.json();
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    assert_eq!(status["last_error_at"], serde_json::Value::Null, "{status}");
    assert!(status["last_rejected"].as_str().unwrap().contains("truncated"), "{status}");
    assert!(status["last_rejected_at"].is_string(), "{status}");
    assert_eq!(status["rejects"], 6);
    server.stop().await;
}

#[tokio::test]
async fn a_received_update_reports_how_long_it_has_waited_to_install() {
    let data = common::example_data();
    let server = TestServer::start(Some(common::signed_test(&data, 10))).await;
    let mut client = server.client().await;
    assert_eq!(client.get("/v1/status").await.json()["pending_seconds"], serde_json::Value::Null);
    assert!(client.get("/metrics").await.text().contains("tollgate_snapshot_pending_seconds 0\n"));
    let store = server.sidecar.store();
    store.mark_pending();
    server.clock.advance(std::time::Duration::from_millis(2_500));
    assert_eq!(client.get("/v1/status").await.json()["pending_seconds"], 2.5);
    assert!(client.get("/metrics").await.text().contains("tollgate_snapshot_pending_seconds 2.5\n"));
    store.install(common::verified(&data, 11)).unwrap();
    assert_eq!(client.get("/v1/status").await.json()["pending_seconds"], serde_json::Value::Null);
    server.stop().await;
}

/// Spins on every core until `stop` is set or `limit` passes, whichever is first.
fn saturate_cpu(stop: &Arc<AtomicBool>, limit: std::time::Duration) -> Vec<std::thread::JoinHandle<()>> {
    let n_threads = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    (0..n_threads)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let started = tollgate_core::clock::Stopwatch::start();
                let mut spin = 0u64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                    spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(1));
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_installs_past_a_starved_loader_with_every_core_busy() {
    let data = common::example_data();
    let server = TestServer::start(Some(common::signed_test(&data, 10))).await;
    // Starvation made certain rather than hoped for: the idle-priority loader is kept busy
    // until the end, so only the escalation can install the update (a test that measured how
    // long idle CPU took to appear would depend on the machine's load).
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (occupied, is_occupied) = tokio::sync::oneshot::channel::<()>();
    let loader = tokio::spawn(tollgate_sidecar::background::run(move || {
        let _ = occupied.send(());
        let _ = hold.recv_timeout(std::time::Duration::from_secs(120));
    }));
    is_occupied.await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spinners = saturate_cpu(&stop, std::time::Duration::from_secs(120));
    // Let the spinners take the cores before the update arrives.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let bytes = common::signed_test(&data, 11);
    let temporary = server.dir().join("next.tgs");
    std::fs::write(&temporary, bytes).unwrap();
    let written = tokio::time::Instant::now();
    std::fs::rename(&temporary, &server.snapshot_path).unwrap();
    // Generous: the escalation comes after `DEADLINE`; the rest is a small load competing with
    // the spinners (and whatever else the machine runs) at normal priority.
    let bound = tollgate_sidecar::background::DEADLINE + std::time::Duration::from_secs(60);
    while server.sidecar.store().revision() != Some(11) && written.elapsed() < bound {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let took = written.elapsed();
    stop.store(true, Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().unwrap();
    }
    let _ = release.send(());
    assert_eq!(loader.await.unwrap(), Some(()));
    assert_eq!(server.sidecar.store().revision(), Some(11), "not installed after {took:?} with the loader starved");
    assert!(took >= tollgate_sidecar::background::DEADLINE, "installed after {took:?}, before the deadline: not by the escalation");
    server.stop().await;
}

fn flip_flop(revision: u64) -> tollgate_core::model::SnapshotData {
    let features = if revision.is_multiple_of(2) { "[\"sso\", \"reports\"]" } else { "[\"reports\"]" };
    common::compile_inline(
        &format!("[features.sso]\n[features.reports]\n[[plans]]\nid = \"pro\"\nfeatures = {features}\n"),
        "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"pro\"\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_under_load_lose_nothing_and_answer_from_one_revision() {
    let server = TestServer::start(Some(common::signed_test(&flip_flop(0), 0))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        let stop = Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let mut answers = 0u64;
            let mut revisions = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = client
                    .post("/v1/check/batch", &json!({"checks": [{"account": "a", "feature": "sso"}, {"account": "a", "feature": "sso"}]}))
                    .await;
                assert_eq!(reply.status, 200);
                let body = reply.json();
                let results = body["results"].as_array().unwrap();
                let revision = results[0]["revision"].as_u64().unwrap();
                for result in results {
                    assert_eq!(result["revision"].as_u64().unwrap(), revision, "one batch, one revision");
                    assert_eq!(result["allow"].as_bool().unwrap(), revision % 2 == 0, "answer inconsistent with revision {revision}");
                }
                revisions.insert(revision);
                answers += 1;
            }
            (answers, revisions.len())
        }));
    }
    let store = Arc::clone(server.sidecar.store());
    let n_swaps = 200u64;
    let swapper = tokio::task::spawn_blocking(move || {
        for revision in 1..=n_swaps {
            store.install(common::verified(&flip_flop(revision), revision)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    swapper.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut seen_revisions = 0;
    for client in clients {
        let (answers, revisions) = client.await.unwrap();
        total += answers;
        seen_revisions = seen_revisions.max(revisions);
    }
    assert!(total > 0);
    assert!(seen_revisions > 1, "clients saw the swaps");
    assert_eq!(server.sidecar.store().revision(), Some(n_swaps));
    server.stop().await;
}

#[test]
fn resigning_gives_a_new_revision_of_the_same_data() {
    let data = common::example_data();
    let original = common::signed(&data, 5, &common::test_key(1));
    let resigned = tollgate_snapshot::resign(&original, 6, 42, &common::test_key(1)).unwrap();
    let snapshot = Snapshot::verify(&resigned, &trusted()).unwrap();
    assert_eq!(snapshot.revision(), 6);
    assert_eq!(snapshot.header().created_at_ms, 42);
    let back: tollgate_core::model::SnapshotData = rkyv::deserialize::<_, rkyv::rancor::Error>(snapshot.data()).unwrap();
    assert_eq!(back, data);
    assert!(tollgate_snapshot::resign(b"garbage that is not a snapshot", 6, 0, &common::test_key(1)).is_err());
}

#[test]
fn a_retired_snapshot_buffer_is_reused_and_still_verified() {
    let data = common::example_data();
    let first = Snapshot::verify(&common::signed(&data, 5, &common::test_key(1)), &trusted()).unwrap();
    let spare = first.into_buffer();
    let (address, capacity) = (spare.as_ptr(), spare.capacity());
    assert!(spare.is_empty());
    let second = Snapshot::verify_into(&common::signed(&data, 6, &common::test_key(1)), &trusted(), Some(spare)).unwrap();
    assert_eq!(second.revision(), 6);
    assert_eq!(second.data().accounts.len(), data.accounts.len());
    let reused = second.into_buffer();
    assert_eq!((reused.as_ptr(), reused.capacity()), (address, capacity), "the same memory served the second load");
    // A reused buffer gets no pass: a forged snapshot read into it is still refused.
    let mut forged = common::signed(&data, 7, &common::test_key(1));
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(matches!(Snapshot::verify_into(&forged, &trusted(), Some(reused)), Err(SnapshotError::BadSignature(_))));
}

/// What stands where a snapshot file should be is untrusted: a FIFO must not block the loader,
/// a device behind a symlink must not be read without end, and a large file that is not a
/// snapshot (or whose header disagrees with its size) is refused from its first bytes.
#[test]
fn snapshot_sources_are_checked_before_they_are_read() {
    use tollgate_snapshot::{DEFAULT_MAX_FILE_BYTES, ReadError};
    let dir = tempfile::tempdir().unwrap();
    let trusted = trusted();

    let fifo = dir.path().join("fifo.snap");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let error = Snapshot::read_file_into(&fifo, &trusted, None, DEFAULT_MAX_FILE_BYTES).unwrap_err();
    assert!(matches!(error, ReadError::NotAFile { kind: "a FIFO", .. }), "{error}");

    let zero = dir.path().join("zero.snap");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let error = Snapshot::read_file_into(&zero, &trusted, None, DEFAULT_MAX_FILE_BYTES).unwrap_err();
    assert!(error.to_string().contains("a character device, not a regular file"), "{error}");
    let error = Snapshot::read_file_into(dir.path(), &trusted, None, DEFAULT_MAX_FILE_BYTES).unwrap_err();
    assert!(matches!(error, ReadError::NotAFile { kind: "a directory", .. }), "{error}");

    // A sparse gigabyte: past a configured ceiling it is refused by size, and under the default
    // one by its first bytes.
    let sparse = dir.path().join("sparse.snap");
    std::fs::File::create(&sparse).unwrap().set_len(1 << 30).unwrap();
    let error = Snapshot::read_file_into(&sparse, &trusted, None, 1 << 20).unwrap_err();
    assert!(matches!(error, ReadError::TooLarge { len: 1_073_741_824, max: 1_048_576, .. }), "{error}");
    assert!(error.to_string().contains("--max-snapshot-bytes"), "{error}");
    let error = Snapshot::read_file_into(&sparse, &trusted, None, DEFAULT_MAX_FILE_BYTES).unwrap_err();
    assert!(matches!(error, ReadError::Snapshot(SnapshotError::BadMagic)), "{error}");

    // A real snapshot with a gigabyte of padding after it: the header's length gives it away.
    let bytes = common::signed_test(&common::example_data(), 5);
    let padded = dir.path().join("padded.snap");
    std::fs::write(&padded, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(&padded).unwrap().set_len(1 << 30).unwrap();
    let error = Snapshot::read_file_into(&padded, &trusted, None, DEFAULT_MAX_FILE_BYTES).unwrap_err();
    assert!(matches!(error, ReadError::Snapshot(SnapshotError::PayloadLength { .. })), "{error}");

    // The same snapshot as it was written still reads, and an empty file is truncated.
    let good = dir.path().join("good.snap");
    std::fs::write(&good, &bytes).unwrap();
    assert_eq!(Snapshot::read_file_into(&good, &trusted, None, bytes.len() as u64).unwrap().revision(), 5);
    assert!(matches!(Snapshot::read_file_into(&good, &trusted, None, bytes.len() as u64 - 1), Err(ReadError::TooLarge { .. })));
    let empty = dir.path().join("empty.snap");
    std::fs::write(&empty, b"").unwrap();
    let error = Snapshot::read_file_into(&empty, &trusted, None, DEFAULT_MAX_FILE_BYTES).unwrap_err();
    assert!(matches!(error, ReadError::Snapshot(SnapshotError::Truncated(0))), "{error}");
}

/// With a data directory, the highest revision ever installed is kept there, and an older
/// signed snapshot is refused at the next start (a rollback), unless `--allow-rollback`.
#[test]
fn an_older_signed_snapshot_is_refused_across_a_restart() {
    use tollgate_core::clock::{Clock, ManualClock};
    use tollgate_sidecar::app::App;
    use tollgate_sidecar::config::{Config, SourceConfig};
    let dir = tempfile::tempdir().unwrap();
    let (file, data_dir) = (dir.path().join("snapshot.tgs"), dir.path().join("data"));
    let build = |allow_rollback: bool| {
        let mut config = Config::new(SourceConfig::File(file.clone()), trusted());
        config.data_dir = Some(data_dir.clone());
        config.allow_rollback = allow_rollback;
        App::build(config, Arc::new(ManualClock::new(common::PINNED_NOW_MS)) as Arc<dyn Clock>).unwrap()
    };
    std::fs::write(&file, common::signed_test(&common::example_data(), 10)).unwrap();
    let first = build(false);
    assert_eq!(first.sidecar().store().revision(), Some(10));
    drop(first);
    assert_eq!(std::fs::read_to_string(data_dir.join("highest-revision")).unwrap().trim(), "10");

    // The same revision again is fine (a restart reads its own cache).
    assert_eq!(build(false).sidecar().store().revision(), Some(10));

    // An older, validly signed snapshot in its place is a rollback: not installed, not ready.
    std::fs::write(&file, common::signed_test(&common::example_data(), 7)).unwrap();
    let refused = build(false);
    let store = refused.sidecar().store();
    assert_eq!((store.revision(), store.is_ready()), (None, false));
    let status = store.status();
    assert!(status.last_error.as_deref().unwrap().contains("older than revision 10"), "{status:?}");
    drop(refused);

    // The operator may allow it explicitly; the record then follows what is installed.
    assert_eq!(build(true).sidecar().store().revision(), Some(7));
    assert_eq!(std::fs::read_to_string(data_dir.join("highest-revision")).unwrap().trim(), "7");

    // A record that is not a number stops the start with a message naming the file.
    std::fs::write(data_dir.join("highest-revision"), "garbage").unwrap();
    let mut config = Config::new(SourceConfig::File(file.clone()), trusted());
    config.data_dir = Some(data_dir.clone());
    let error = App::build(config, Arc::new(ManualClock::new(common::PINNED_NOW_MS)) as Arc<dyn Clock>).unwrap_err();
    assert!(error.to_string().contains("highest-revision") && error.to_string().contains("garbage"), "{error}");
}

/// A change made between the first load and the watcher's first look is still picked up: the
/// watcher starts from what the first load saw, not from what is there when it starts.
#[tokio::test]
async fn a_change_right_after_the_first_load_is_not_missed() {
    use tollgate_core::clock::{Clock, ManualClock};
    use tollgate_sidecar::app::{App, Listeners};
    use tollgate_sidecar::config::{Config, SourceConfig};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapshot.tgs");
    std::fs::write(&file, common::signed_test(&common::example_data(), 1)).unwrap();
    let mut config = Config::new(SourceConfig::File(file.clone()), trusted());
    config.watch_interval = std::time::Duration::from_millis(20);
    let app = App::build(config, Arc::new(ManualClock::new(common::PINNED_NOW_MS)) as Arc<dyn Clock>).unwrap();
    let sidecar = Arc::clone(app.sidecar());
    assert_eq!(sidecar.store().revision(), Some(1));
    // Replaced after the load and before anything watches.
    let staged = dir.path().join("snapshot.new");
    std::fs::write(&staged, common::signed_test(&common::example_data(), 2)).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(Listeners { api: listener, metrics: None }, async move {
        let _ = stopped.await;
    }));
    #[expect(clippy::disallowed_methods, reason = "a deadline for a real file watcher")]
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sidecar.store().revision() != Some(2) {
        #[expect(clippy::disallowed_methods, reason = "see the deadline")]
        let late = std::time::Instant::now() > deadline;
        assert!(!late, "the change made before the watcher started was never installed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
}
