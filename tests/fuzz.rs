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

/// A sidecar serving the example policies, for the targets that go through its real handlers
/// (called directly, without a connection), and the runtime it runs on, which also reads the
/// answers' bodies.
fn serving_sidecar() -> (tokio::runtime::Runtime, common::TestServer) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server = runtime.block_on(common::TestServer::start(Some(common::signed_test(&common::example_data(), 9))));
    assert!(server.sidecar.store().load().is_some(), "the example snapshot is served");
    (runtime, server)
}

/// An answer's status, headers and JSON body (`null` when the body is empty or not JSON).
fn answer(runtime: &tokio::runtime::Runtime, response: tollgate_sidecar::HttpResponse) -> (u16, hyper::HeaderMap, serde_json::Value) {
    use http_body_util::BodyExt;
    let (parts, body) = response.into_parts();
    let bytes = runtime.block_on(body.collect()).unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

#[test]
fn authzen_bodies() {
    use serde_json::Value;
    let (runtime, server) = serving_sidecar();
    fuzz("authzen", &corpus("authzen"), |bytes| {
        for path in ["/access/v1/evaluation", "/access/v1/evaluations"] {
            let (status, _, body) = answer(&runtime, tollgate_sidecar::protocols::authzen(&server.sidecar, path, bytes));
            // Whatever a body holds, a mistake is the client's (400), never the server's.
            assert!(status == 200 || status == 400, "{path} answered {status}: {body}");
            if status != 200 {
                assert!(body.get("error").is_some(), "{path}: a 400 without an error: {body}");
                continue;
            }
            let answers = match body.get("evaluations") {
                Some(items) => {
                    assert_eq!(path, "/access/v1/evaluations", "only the batch endpoint answers a list");
                    let items = items.as_array().expect("`evaluations` is a list").clone();
                    // One answer per evaluation asked at most (fewer when a semantic stops early).
                    let asked = serde_json::from_slice::<Value>(bytes)
                        .ok()
                        .and_then(|request| request.get("evaluations").and_then(Value::as_array).map(Vec::len));
                    assert!(!items.is_empty() && asked.is_none_or(|asked| items.len() <= asked), "{} answers for {asked:?}", items.len());
                    assert!(items.len() <= tollgate_sidecar::MAX_BATCH);
                    items
                }
                None => vec![body],
            };
            for item in answers {
                let decision = item.get("decision").and_then(Value::as_bool).unwrap_or_else(|| panic!("no boolean decision: {item}"));
                // An allow only ever comes from the engine, whose answer is the context.
                if decision {
                    assert_eq!(item["context"]["allow"], Value::Bool(true), "{item}");
                }
            }
        }
    });
}

#[test]
fn ofrep_bodies() {
    use serde_json::Value;
    let (runtime, server) = serving_sidecar();
    let n_features = server.sidecar.store().load().as_ref().unwrap().base().data().features.len();
    let flag = |flag: &Value, key: Option<&str>| {
        let value = flag.get("value").and_then(Value::as_bool).unwrap_or_else(|| panic!("no boolean value: {flag}"));
        let reason = if value { "TARGETING_MATCH" } else { "DISABLED" };
        assert_eq!(flag.get("reason").and_then(Value::as_str), Some(reason), "{flag}");
        if let Some(key) = key {
            assert_eq!(flag.get("key").and_then(Value::as_str), Some(key), "{flag}");
        }
    };
    fuzz("ofrep", &corpus("ofrep"), |bytes| {
        for path in ["/ofrep/v1/evaluate/flags/reports", "/ofrep/v1/evaluate/flags"] {
            let (status, _, body) = answer(&runtime, tollgate_sidecar::ofrep::evaluate_body(&server.sidecar, path, bytes, None));
            match status {
                200 if path.ends_with("/reports") => flag(&body, Some("reports")),
                200 => {
                    // Bulk: every feature of the catalog, each a boolean flag.
                    let flags = body.get("flags").and_then(Value::as_array).unwrap_or_else(|| panic!("no flags: {body}"));
                    assert_eq!(flags.len(), n_features);
                    flags.iter().for_each(|each| flag(each, None));
                }
                400 => {
                    let code = body.get("errorCode").and_then(Value::as_str);
                    assert!(
                        matches!(code, Some("PARSE_ERROR" | "TARGETING_KEY_MISSING" | "INVALID_CONTEXT")),
                        "{path}: unexpected 400 {body}"
                    );
                }
                other => panic!("{path} answered {other} for a client's body: {body}"),
            }
        }
    });
}

/// An ext_authz request from a corpus entry: the first line is the original path (Envoy's
/// `/ext_authz` prefix is added), every further `name: value` line a header; lines that are no
/// valid header are left out, as hyper would refuse them before any handler.
fn ext_authz_request(bytes: &[u8]) -> Option<hyper::Request<()>> {
    let mut lines = bytes.split(|byte| *byte == b'\n');
    let path = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let uri = format!("/ext_authz{path}").parse::<hyper::Uri>().ok()?;
    let mut request = hyper::Request::new(());
    *request.uri_mut() = uri;
    for line in lines {
        let Some(colon) = line.iter().position(|byte| *byte == b':') else { continue };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (hyper::header::HeaderName::from_bytes(name), hyper::header::HeaderValue::from_bytes(value)) {
            request.headers_mut().append(name, value);
        }
    }
    Some(request)
}

#[test]
fn ext_authz_requests() {
    use tollgate_sidecar::{protocols, route_path};
    let (runtime, server) = serving_sidecar();
    let guard = server.sidecar.store().load();
    let snapshot = guard.as_ref().unwrap();
    fuzz("ext_authz", &corpus("ext_authz"), |bytes| {
        let Some(request) = ext_authz_request(bytes) else { return };
        let (status, headers, body) = answer(&runtime, protocols::ext_authz(&server.sidecar, &request));
        assert!(status == 200 || status == 403, "answered {status}: {body}");
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_string);
        let reason = header("x-tollgate-reason").unwrap_or_else(|| panic!("no reason header: {body}"));
        let original = request.uri().path().strip_prefix(protocols::EXT_AUTHZ_PREFIX).unwrap_or_default();
        let normalised = match route_path::normalize(original) {
            Ok(normalised) => normalised,
            Err(_) => {
                assert_eq!((status, reason.as_str()), (403, "invalid_path"), "`{original}` cannot be normalised");
                return;
            }
        };
        for segment in ["//", "/./", "/../"] {
            assert!(!normalised.contains(segment), "`{original}` normalised to `{normalised}`");
        }
        assert!(!normalised.ends_with("/.") && !normalised.ends_with("/.."), "`{original}` normalised to `{normalised}`");
        if reason == "missing_identity" {
            assert_eq!(status, 403);
            return;
        }
        // A decision was made: for an account the request named, on the route's feature when the
        // path has a route, whatever feature header the client sent.
        let account = request.headers().get(protocols::HEADER_ACCOUNT).and_then(|value| value.to_str().ok());
        assert!(account.is_some_and(|account| !account.is_empty()), "a decision without an account: {body}");
        let feature = header("x-tollgate-feature");
        if let Some(routed) = protocols::route_feature(snapshot.base().data(), &normalised) {
            assert_eq!(feature.as_deref(), Some(routed), "`{original}` is routed to `{routed}`");
        }
        assert_eq!(body.get("allow").and_then(serde_json::Value::as_bool), Some(status == 200), "{body}");
    });
}

#[test]
fn delta_bytes_and_feed_answers() {
    use tollgate_core::model::{AccountStatus, DeltaAccount, DeltaData};
    use tollgate_snapshot::{ApplyError, Delta, Piece, ServingView, build_delta, describe, pieces};
    let key = common::test_key(1);
    let trusted = TrustedKeys::new([key.verifying_key()]);
    let data = common::example_data();
    let base_file = common::signed_test(&data, 9);
    let mut suspended = data.accounts["acme"].clone();
    suspended.status = AccountStatus::Suspended;
    let payload = DeltaData {
        feature_sets: data.feature_sets.clone(),
        limit_sets: data.limit_sets.clone(),
        accounts: vec![DeltaAccount { id: "acme".into(), account: suspended }],
        removed: vec!["globex".into()],
    };
    let first = build_delta(&payload, 9, 9, 10, 0, &key).unwrap();
    let second = build_delta(&DeltaData::default(), 9, 10, 11, 0, &key).unwrap();
    let feed = [base_file.clone(), first.clone(), second.clone()].concat();
    // As sent: a mutated delta never verifies, and splitting a mutated feed answer never
    // panics and never yields a file longer than what is left.
    fuzz("delta", &[first.clone(), feed.clone()], |bytes| {
        if bytes != first.as_slice() && bytes != second.as_slice() {
            assert!(Delta::verify(bytes, &trusted).is_err(), "a mutated delta verified");
        }
        let _ = describe(bytes);
        let mut total = 0;
        for piece in pieces(bytes) {
            match piece {
                Ok(Piece::Base(file) | Piece::Delta(file)) => total += file.len(),
                Err(_) => break,
            }
        }
        assert!(total <= bytes.len());
    });
    // Any order of validly signed deltas, applied to a view: refused by name or applied, and
    // the revision only ever moves forward.
    let view = ServingView::new(Snapshot::verify(&base_file, &trusted).unwrap());
    let mut rng = Rng(0xde17a);
    for _ in 0..iterations().min(100) {
        let mut current = view.clone();
        for _ in 0..4 {
            let base = 8 + rng.below(3) as u64;
            let follows = base + rng.below(4) as u64;
            let revision = follows + 1 + rng.below(2) as u64;
            let delta = Delta::verify(&build_delta(&payload, base, follows, revision, 0, &key).unwrap(), &trusted).unwrap();
            match current.apply(delta) {
                Ok(applied) => {
                    assert!(applied.revision() > current.revision() && applied.base_revision() == 9);
                    current = applied;
                }
                Err(ApplyError::BaseMismatch { .. } | ApplyError::NotNewer { .. } | ApplyError::Gap { .. }) => {}
            }
        }
    }
}
