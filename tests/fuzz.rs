//! Mutation fuzzing of every parser that takes outside input, on the stable toolchain: each
//! target starts from its committed corpus (`tests/fuzz_corpus/TARGET/`), mutates it (byte
//! flips, insertions, deletions, truncations, splices with other corpus entries and with
//! interesting values) with a seeded generator, and feeds the results to the parser. A parser
//! may refuse anything, but it must not panic, and what it accepts must hold its own invariants.
//! This is not coverage-guided (that needs nightly or an external engine); it is a bounded,
//! reproducible run: `TOLLGATE_FUZZ_ITERATIONS` inputs per target (default 2,000),
//! `TOLLGATE_FUZZ_SEED` to replay a run. A failing input is printed, to be added to the corpus.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::path::{Path, PathBuf};

use tollgate_control_plane::integrations::{hubspot, stripe};
use tollgate_control_plane::tokens;
use tollgate_policy::Source;
use tollgate_snapshot::{Snapshot, TrustedKeys};

/// A small deterministic generator (xorshift64*): reproducible runs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

/// Values that tend to break parsers: boundaries of integers, odd characters, structure.
const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9223372036854775808",
    b"1e400",
    b"-0",
    b"null",
    b"true",
    b"\"\"",
    b"[]",
    b"{}",
    b"\\u0000",
    b"\xff\xfe",
    b"\x00",
    b"%00",
    b"%2F",
    b"..",
    b"//",
    b"\n",
    b"\"",
    b"{",
    b"[",
    b"=",
    b"0000-01-01T00:00:00Z",
    b"9999-12-31T23:59:59Z",
    b"\xe2\x80\xae",
];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(7) {
            0 if !bytes.is_empty() => {
                let idx = rng.below(bytes.len());
                bytes[idx] ^= 1 << rng.below(8);
            }
            1 => bytes.insert(at, rng.next() as u8),
            2 if at < bytes.len() => {
                let end = (at + 1 + rng.below(16)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => bytes.truncate(at),
            4 => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                bytes.splice(at..at, value.iter().copied());
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(64)).min(other.len());
                bytes.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                // Repeat a chunk: long runs, deep nesting.
                let end = (at + rng.below(8)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                for _ in 0..rng.below(64) {
                    bytes.splice(at..at, chunk.iter().copied());
                }
            }
        }
    }
    bytes
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = common::repo_root().join("tests/fuzz_corpus").join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    paths.sort();
    let entries: Vec<Vec<u8>> = paths.iter().map(|path| std::fs::read(path).unwrap()).collect();
    assert!(!entries.is_empty(), "no corpus in {}", dir.display());
    entries
}

fn iterations() -> usize {
    std::env::var("TOLLGATE_FUZZ_ITERATIONS").ok().and_then(|text| text.parse().ok()).unwrap_or(2_000)
}

/// Runs `target` on every corpus entry and on `iterations()` mutations of them; a panic names
/// the input. Returns how many inputs ran.
fn fuzz(name: &str, corpus: &[Vec<u8>], target: impl Fn(&[u8])) -> usize {
    let seed = std::env::var("TOLLGATE_FUZZ_SEED").ok().and_then(|text| text.parse().ok()).unwrap_or(0x7011_6a7e_u64);
    let mut rng = Rng(seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)));
    let mut inputs: Vec<Vec<u8>> = corpus.to_vec();
    for _ in 0..iterations() {
        let base = &corpus[rng.below(corpus.len())];
        inputs.push(mutate(&mut rng, base, corpus));
    }
    for input in &inputs {
        // A panic fails the test at once, so nothing observes state a panic left half-changed.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(input)));
        assert!(outcome.is_ok(), "fuzz target `{name}` panicked on input {:?}", String::from_utf8_lossy(input));
    }
    eprintln!("fuzz `{name}`: {} inputs, no panic", inputs.len());
    inputs.len()
}

#[test]
fn sidecar_request_bodies() {
    let mut corpus_all = corpus("check");
    corpus_all.extend(corpus("meter"));
    corpus_all.extend(corpus("batch"));
    fuzz("check", &corpus_all, |bytes| {
        if let Ok(check) = serde_json::from_slice::<tollgate_protocol::CheckBody<'_>>(bytes) {
            let _ = check.request();
        }
        let _ = serde_json::from_slice::<tollgate_protocol::MeterBody<'_>>(bytes);
        let _ = serde_json::from_slice::<tollgate_protocol::BatchBody<'_>>(bytes);
    });
}

#[test]
fn usage_batches() {
    fuzz("usage", &corpus("usage"), |bytes| {
        if let Ok(batch) = serde_json::from_slice::<tollgate_protocol::usage::UsageBatch>(bytes) {
            // The shared record rules answer for anything that parses.
            for event in &batch.events {
                let _ = tollgate_protocol::usage::rules::amount(event.amount);
                let _ = tollgate_protocol::usage::rules::event_id(&event.id);
            }
            for decision in &batch.decisions {
                let _ = tollgate_protocol::usage::rules::decision_count(decision.count);
            }
        }
    });
}

#[test]
fn stripe_and_hubspot_payloads() {
    fuzz("stripe", &corpus("stripe"), |bytes| {
        if let Ok(inbound) = stripe::parse_event(bytes) {
            assert!(!inbound.event_id.is_empty());
        }
        let config = stripe::StripeConfig::new(vec![b"whsec_fuzz".to_vec()]);
        let header = String::from_utf8_lossy(bytes);
        let _ = stripe::verify(&config, Some(&header), bytes, 1_797_292_800);
    });
    fuzz("hubspot", &corpus("hubspot"), |bytes| {
        let _ = hubspot::parse_events(bytes);
    });
}

#[test]
fn policy_files() {
    let corpus = corpus("policy");
    fuzz("policy", &corpus, |bytes| {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let catalog = Source { path: "catalog.toml".into(), text: text.clone() };
        let _ = tollgate_policy::compile_catalog(&catalog);
        let shipped = Source { path: "catalog.toml".into(), text: String::from_utf8_lossy(&corpus[0]).into_owned() };
        let accounts = Source { path: "accounts/a.toml".into(), text };
        if let Err(errors) = tollgate_policy::compile(&shipped, &[accounts]) {
            // Every mistake names its file.
            assert!(errors.0.iter().all(|error| !error.file.as_os_str().is_empty()));
        }
    });
}

#[test]
fn ext_authz_paths() {
    let lines: Vec<Vec<u8>> =
        corpus("path").iter().flat_map(|file| file.split(|byte| *byte == b'\n').map(<[u8]>::to_vec).collect::<Vec<_>>()).collect();
    fuzz("path", &lines, |bytes| {
        let path = String::from_utf8_lossy(bytes);
        if let Ok(normalised) = tollgate_sidecar::route_path::normalize(&path) {
            // Normalising is idempotent, and what comes out has no dot segments or double slashes.
            let again = tollgate_sidecar::route_path::normalize(&normalised).expect("a normalised path normalises");
            assert_eq!(again, normalised);
            assert!(!normalised.contains("//") && !normalised.split('/').any(|segment| segment == ".." || segment == "."), "{normalised}");
        }
    });
}

#[test]
fn license_tokens() {
    let key = common::test_key(3);
    let keys = vec![(tollgate_snapshot::key_id(&key.verifying_key()), key.verifying_key())];
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), "tollgate".into());
    claims.insert("sub".into(), "acme".into());
    claims.insert("exp".into(), 1_900_000_000.into());
    let mut corpus = corpus("token");
    corpus.push(tokens::sign(&claims, &key).into_bytes());
    fuzz("token", &corpus, |bytes| {
        let token = String::from_utf8_lossy(bytes);
        if let Ok(verified) = tokens::verify(&token, &keys, 1_800_000_000) {
            // Only a token this key signed verifies: mutations of it must not.
            assert_eq!(verified.get("sub").and_then(|sub| sub.as_str()), Some("acme"));
        }
        let _ = tokens::parse_jwks(&token);
    });
}

#[test]
fn snapshot_bytes() {
    let key = common::test_key(1);
    let trusted = TrustedKeys::new([key.verifying_key()]);
    let good = common::signed_test(&common::example_data(), 9);
    let payload_start = good.len() - 64 - Snapshot::read_header(&good).unwrap().payload_len as usize;
    // As sent: every mutation must be refused (the signature covers every byte).
    fuzz("snapshot", std::slice::from_ref(&good), |bytes| {
        if bytes != good.as_slice() {
            assert!(Snapshot::verify(bytes, &trusted).is_err(), "a mutated snapshot verified");
        }
        let _ = Snapshot::read_header(bytes);
    });
    // Mutated inside the payload and signed again, as a compromised signer could: the archive
    // validation must refuse or accept it without panicking, and what it accepts must be readable.
    let mut rng = Rng(0x5eed);
    for _ in 0..iterations().min(500) {
        let mut bytes = good.clone();
        for _ in 0..=rng.below(8) {
            let idx = payload_start + rng.below(bytes.len() - 64 - payload_start);
            bytes[idx] = rng.next() as u8;
        }
        let resigned = tollgate_snapshot::resign(&bytes, 10, 0, &key).unwrap();
        if let Ok(snapshot) = Snapshot::verify(&resigned, &trusted) {
            let data = snapshot.data();
            let _ = data.accounts.len() + data.features.len();
        }
    }
}

#[test]
fn usage_log_segments() {
    use tollgate_sidecar::usage_log::{LoggedEvent, USAGE_DIR, UsageLog};
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = UsageLog::open(dir.path(), true).unwrap();
        for n in 0..20 {
            let event = LoggedEvent {
                seq: 0,
                account: "acme".into(),
                meter: "api_calls".into(),
                id: format!("e{n}"),
                amount: 1,
                at: 1_797_292_800,
                period_start: 1_796_083_200,
                recorded_at: 1_797_292_800,
            };
            log.append(event).unwrap().blocking_recv().unwrap().unwrap();
        }
        log.stop();
    }
    let segment_dir = dir.path().join(USAGE_DIR);
    let segments: Vec<PathBuf> = std::fs::read_dir(&segment_dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    let segment: &Path = segments.iter().max_by_key(|path| std::fs::metadata(path).unwrap().len()).unwrap();
    let original = std::fs::read(segment).unwrap();
    let mut rng = Rng(0x106);
    for _ in 0..iterations().min(300) {
        let mutated = mutate(&mut rng, &original, &[]);
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(copy.path().join(USAGE_DIR)).unwrap();
        std::fs::write(copy.path().join(USAGE_DIR).join(segment.file_name().unwrap()), &mutated).unwrap();
        // A damaged log is read up to its first bad record; it never yields more than was written.
        if let Ok((log, recovery)) = UsageLog::open(copy.path(), true) {
            assert!(recovery.events.len() <= 20, "{} events from a log of 20", recovery.events.len());
            log.stop();
        }
    }
}

/// The control plane's write bodies go through their real handlers (parse, validate, policy
/// compile, write): every outcome is an answer or a client error, never a store or internal
/// error, and the account stays valid throughout.
#[test]
fn control_plane_write_bodies() {
    use tollgate_control_plane::{ApiError, Caller, ControlPlane, changes, store::Scope};
    let dir = tempfile::tempdir().unwrap();
    let control_plane = ControlPlane::open(dir.path(), &common::repo_root().join("policies"), common::test_key(5), Vec::new()).unwrap();
    let caller = Caller { key_id: "fuzz".into(), scope: Scope::Admin, account: None };
    let seed = br#"{"order_id": "seed", "action": "new", "account": "acme", "plan": "team", "seats": 50}"#;
    changes::order(&control_plane, &caller, seed).unwrap();
    let client_error = |result: Result<(), ApiError>| {
        if let Err(error) = result {
            assert!(!matches!(error, ApiError::Store(_) | ApiError::Internal), "a server error for a client's body: {error}");
        }
    };
    let corpus = corpus("control_plane");
    let n = fuzz("control_plane", &corpus, |bytes| {
        client_error(changes::order(&control_plane, &caller, bytes).map(|_| ()));
        client_error(changes::put_user(&control_plane, &caller, "acme", "ann", bytes).map(|_| ()));
        client_error(changes::put_overrides(&control_plane, &caller, "acme", "acme-1", bytes).map(|_| ()));
        client_error(changes::create_access_request(&control_plane, &caller, bytes).map(|_| ()));
        client_error(changes::activate_device(&control_plane, &caller, "acme", bytes).map(|_| ()));
    });
    assert!(n > 0);
    // Whatever was accepted left an account the compiler still takes.
    let account = control_plane.repository.account("acme").unwrap().unwrap();
    assert!(tollgate_control_plane::compile_one(&control_plane.catalog, "acme", &account).is_ok());
}
