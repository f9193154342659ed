//! Black-box HTTP fuzzing: a real sidecar and a real control plane (in-process, on port 0) get
//! thousands of mutated raw HTTP/1.1 requests each, built from valid requests to every route
//! and then mutated anywhere (request line, headers, body). Whatever arrives, no answer may be
//! a 5xx (a client's mistake is a named 4xx), no process may fall over, and afterwards both
//! still give the right answers. `TOLLGATE_HTTP_FUZZ_REQUESTS` requests per server (default
//! 10,000); the counts by status are printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::TestServer;
use control_plane_support::{TestControlPlane, get, post};

/// xorshift64*: reproducible mutations without a dependency.
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

const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"18446744073709551616",
    b"9223372036854775808",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"\\u0000",
    b"\xff",
    b"%00",
    b"%2F",
    b"/..",
    b"//",
    b"\r\n",
    b"\n",
    b"\"",
    b"{",
    b"[",
    b":",
    b"0000-01-01T00:00:00Z",
    b"chunked",
    b"99999999999",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let idx = rng.below(bytes.len());
                bytes[idx] ^= 1 << rng.below(8);
            }
            1 => bytes.insert(at, rng.next() as u8),
            2 if at < bytes.len() => {
                let end = (at + 1 + rng.below(8)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                bytes.splice(at..at, value.iter().copied());
            }
        }
    }
    bytes
}

/// A raw request; the body's length is declared correctly before mutation.
fn raw(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    text.into_bytes()
}

/// Sends raw bytes on a new connection and returns the status code, if an answer came.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 15 s to {:?}", String::from_utf8_lossy(bytes));
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok())
}

fn requests_per_server() -> usize {
    std::env::var("TOLLGATE_HTTP_FUZZ_REQUESTS").ok().and_then(|text| text.parse().ok()).unwrap_or(10_000)
}

/// Sends `n` mutations of `seeds` and counts the answers by status; panics on any 5xx.
async fn barrage(name: &str, addr: SocketAddr, seeds: &[Vec<u8>], seed: u64) -> BTreeMap<String, usize> {
    let mut rng = Rng(seed);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..requests_per_server() {
        let base = &seeds[n % seeds.len()];
        let request = if n < seeds.len() { base.clone() } else { mutate(&mut rng, base) };
        let status = exchange(addr, &request).await;
        if let Some(status) = status {
            assert!(status < 500, "{name}: {status} for {:?}", String::from_utf8_lossy(&request));
        }
        *counts.entry(status.map_or_else(|| "closed".to_string(), |status| status.to_string())).or_default() += 1;
    }
    eprintln!("{name}: {} mutated requests, answers by status {counts:?}", requests_per_server());
    counts
}

#[tokio::test]
async fn the_sidecar_answers_mutated_requests_without_a_5xx_and_still_decides_right() {
    let server = TestServer::start(Some(common::signed_test(&common::example_data(), 3))).await;
    let check = r#"{"account": "acme", "feature": "sso", "user": "ann", "region": "eu"}"#;
    let json_header = [("content-type", "application/json")];
    let seeds = vec![
        raw("POST", "/v1/check", &json_header, check),
        raw("POST", "/v1/check/batch", &json_header, &format!(r#"{{"checks": [{check}, {{"account": "hooli", "feature": "reports"}}]}}"#)),
        raw("POST", "/v1/meter", &json_header, r#"{"account": "acme", "meter": "api_calls", "amount": 1, "id": "fuzz-1"}"#),
        raw("GET", "/v1/entitlements/acme?user=ann", &[], ""),
        raw(
            "POST",
            "/access/v1/evaluation",
            &json_header,
            r#"{"subject": {"type": "account", "id": "acme"}, "resource": {"type": "feature", "id": "sso"}}"#,
        ),
        raw(
            "POST",
            "/access/v1/evaluations",
            &json_header,
            r#"{"subject": {"type": "account", "id": "acme"}, "evaluations": [{"action": {"name": "sso"}}]}"#,
        ),
        raw("GET", "/ext_authz/settings/sso", &[("x-tollgate-account", "hooli"), ("x-tollgate-feature", "reports")], ""),
        raw("POST", "/ofrep/v1/evaluate/flags/sso", &json_header, r#"{"context": {"targetingKey": "acme"}}"#),
        raw("POST", "/ofrep/v1/evaluate/flags", &json_header, r#"{"context": {"account": "acme"}}"#),
        raw("GET", "/v1/status", &[], ""),
    ];
    let counts = barrage("sidecar", server.addr, &seeds, 0x51de).await;
    assert!(counts.get("200").copied().unwrap_or(0) > 0 && counts.keys().any(|status| status.starts_with('4')), "{counts:?}");

    // Still right afterwards: the same decisions as before the barrage.
    let mut client = server.client().await;
    let answer = client.post("/v1/check", &json!({"account": "hooli", "feature": "sso"})).await.json();
    assert_eq!((answer["allow"].as_bool(), answer["reason"].as_str()), (Some(false), Some("not_entitled")), "{answer}");
    let answer = client.post("/v1/check", &json!({"account": "acme", "feature": "reports"})).await.json();
    assert_eq!(answer["allow"], true, "{answer}");
    assert_eq!(client.get("/readyz").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn the_control_plane_answers_mutated_requests_without_a_5xx_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    let order = json!({"order_id": "seed-1", "action": "new", "account": "acme", "plan": "team", "seats": 5});
    assert_eq!(post(&mut client, "/v1/orders", &admin, &order).await.status, 200);
    let bearer = format!("Bearer {admin}");
    let as_admin = [("authorization", bearer.as_str()), ("content-type", "application/json")];
    let sidecar_bearer = format!("Bearer {sidecar}");
    let as_sidecar = [("authorization", sidecar_bearer.as_str()), ("content-type", "application/json")];
    let seeds = vec![
        raw(
            "POST",
            "/v1/orders",
            &as_admin,
            r#"{"order_id": "o-2", "action": "upgrade", "account": "acme", "plan": "business", "seats": 6}"#,
        ),
        raw("PUT", "/v1/accounts/acme/users/ann", &as_admin, r#"{"roles": ["admin"], "seat": true}"#),
        raw(
            "PUT",
            "/v1/accounts/acme/licenses/acme-1/overrides",
            &as_admin,
            r#"{"add_features": ["sso"], "limits": {"api_calls": {"hard": 10}}}"#,
        ),
        raw(
            "POST",
            "/v1/access-requests",
            &as_admin,
            r#"{"account": "acme", "user": "ann", "kind": "feature", "feature": "sso", "reason": "demo"}"#,
        ),
        raw(
            "POST",
            "/v1/usage",
            &as_sidecar,
            r#"{"sidecar": "pod-a", "events": [{"account": "acme", "meter": "api_calls", "id": "e", "amount": 1, "at": "2026-12-15T00:00:00Z"}], "decisions": [{"account": "acme", "feature": "reports", "reason": "ok", "count": 3, "users": ["ann"]}]}"#,
        ),
        raw("GET", "/v1/accounts/acme/usage?history=2", &as_admin, ""),
        raw("GET", "/v1/analytics/features", &as_admin, ""),
        raw("GET", "/v1/usage/export?format=csv&from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z", &as_admin, ""),
        raw("GET", "/v1/audit?account=acme", &as_admin, ""),
        raw("POST", "/v1/webhooks/endpoints", &as_admin, r#"{"url": "http://127.0.0.1:9/hooks", "event_types": ["order.applied"]}"#),
        raw(
            "POST",
            "/v1/integrations/stripe",
            &[("stripe-signature", "t=1,v1=00")],
            r#"{"id": "evt_1", "type": "customer.subscription.updated"}"#,
        ),
        raw("GET", "/v1/snapshot?after=0&wait=0", &as_sidecar, ""),
    ];
    let counts = barrage("control plane", server.addr, &seeds, 0xc0de).await;
    assert!(counts.get("200").copied().unwrap_or(0) > 0 && counts.keys().any(|status| status.starts_with('4')), "{counts:?}");

    // The data is still what valid requests made it: the account exists with a team or business
    // license, and the server takes a new valid order. (On a new connection: the one opened
    // before the barrage may have idled past the server's keep-alive timeout meanwhile.)
    let mut client = server.client().await;
    let account = get(&mut client, "/v1/accounts/acme", &admin).await;
    assert_eq!(account.status, 200, "{}", account.text());
    let plan = account.json()["state"]["licenses"][0]["plan"].as_str().unwrap().to_string();
    assert!(plan == "team" || plan == "business", "{plan}");
    let after = json!({"order_id": "after-fuzz", "action": "new", "account": "initech", "plan": "team"});
    assert_eq!(post(&mut client, "/v1/orders", &admin, &after).await.status, 200);
    assert_eq!(client.get("/readyz").await.status, 200);
    server.stop().await;
}
