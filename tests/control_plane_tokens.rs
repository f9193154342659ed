//! License tokens: compact JWS with `alg: EdDSA` and a `kid`, the JWKS, verification by an
//! independent JOSE library (PyJWT with cryptography, `tests/jwt_interop.py`), refusal of
//! tampered, expired, wrong-key and `alg: none` tokens by `tollgate token verify`, and key
//! rotation keeping old tokens verifiable.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use control_plane_support::{TestControlPlane, get, post, signing_key};
use tollgate_control_plane::tokens::{self, TokenError};

fn now() -> i64 {
    tollgate_core::clock::system_now_ms() / 1000
}

/// `tollgate token verify`: (success, stdout, stderr).
fn cli_verify(jwks: &Path, token: &str) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate")).args(["token", "verify", "--jwks"]).arg(jwks).arg(token).output().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn python_verify(jwks: &Path, token: &str, account: &str) -> (bool, String) {
    let script = common::repo_root().join("tests/jwt_interop.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(jwks)
        .arg(token)
        .arg(account)
        .output()
        .expect("python3 is needed for the JOSE interop test (with `pip install pyjwt cryptography`)");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("ModuleNotFoundError"), "install PyJWT: pip install pyjwt cryptography\n{stderr}");
    (output.status.success(), format!("{}{stderr}", String::from_utf8_lossy(&output.stdout)))
}

fn tamper(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["plan"] = json!("enterprise");
    format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2])
}

fn alg_none(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT", "kid": "x"}).to_string());
    format!("{header}.{}.", parts[1])
}

#[tokio::test]
async fn tokens_verify_with_pyjwt_and_ours_refuses_forgeries() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    let order = json!({"order_id": "o-1", "action": "new", "account": "acme", "plan": "business", "seats": 7,
        "addons": ["analytics_pack"], "regions": ["eu"], "expires_at": "2099-01-01T00:00:00Z"});
    assert_eq!(post(&mut client, "/v1/orders", &integration, &order).await.status, 200);

    let reply = get(&mut client, "/v1/accounts/acme/license-token", &integration).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let token = reply.json()["token"].as_str().unwrap().to_string();
    let jwks_text = client.get("/.well-known/jwks.json").await.text();
    let jwks: serde_json::Value = serde_json::from_str(&jwks_text).unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, &jwks_text).unwrap();

    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);

    // An independent JOSE library accepts it, with every claim the issue names.
    let (accepted, output) = python_verify(&jwks_file, &token, "acme");
    assert!(accepted, "{output}");
    let claims: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
    assert_eq!(claims["iss"], "tollgate");
    assert_eq!(claims["sub"], "acme");
    assert_eq!(claims["plan"], "business");
    assert_eq!(claims["seats"], 7);
    assert_eq!(claims["regions"], json!(["eu"]));
    assert!(claims["features"].as_array().unwrap().contains(&json!("advanced_analytics")));
    assert_eq!(claims["limits"]["api_calls"], json!({"hard": 500000}));
    for claim in ["iat", "nbf", "exp"] {
        assert!(claims[claim].as_i64().is_some(), "{claim}");
    }

    // Ours accepts it too, offline.
    let (ok, stdout, stderr) = cli_verify(&jwks_file, &token);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"sub\": \"acme\""), "{stdout}");

    // Tampered, alg none, wrong key, expired: refused by ours (and PyJWT agrees).
    let tampered = tamper(&token);
    let (ok, _, stderr) = cli_verify(&jwks_file, &tampered);
    assert!(!ok && stderr.contains("signature does not verify"), "{stderr}");
    assert!(!python_verify(&jwks_file, &tampered, "acme").0);

    let none = alg_none(&token);
    let (ok, _, stderr) = cli_verify(&jwks_file, &none);
    assert!(!ok && stderr.contains("algorithm `none` is refused"), "{stderr}");

    let mut claims_map = claims.as_object().unwrap().clone();
    let stranger = signing_key(99);
    let wrong_key = tokens::sign(&claims_map, &stranger);
    let (ok, _, stderr) = cli_verify(&jwks_file, &wrong_key);
    assert!(!ok && stderr.contains("is not in the key set"), "{stderr}");
    // A forger who reuses our kid fails on the signature.
    let parts: Vec<&str> = wrong_key.split('.').collect();
    let forged = format!("{}.{}.{}", token.split('.').next().unwrap(), parts[1], parts[2]);
    let (ok, _, stderr) = cli_verify(&jwks_file, &forged);
    assert!(!ok && stderr.contains("signature does not verify"), "{stderr}");

    claims_map.insert("exp".into(), json!(now() - 10));
    claims_map.insert("nbf".into(), json!(now() - 100));
    let expired = tokens::sign(&claims_map, &signing_key(7));
    let (ok, _, stderr) = cli_verify(&jwks_file, &expired);
    assert!(!ok && stderr.contains("token expired"), "{stderr}");
    assert!(!python_verify(&jwks_file, &expired, "acme").0);

    claims_map.insert("exp".into(), json!(now() + 1000));
    claims_map.insert("nbf".into(), json!(now() + 500));
    let early = tokens::sign(&claims_map, &signing_key(7));
    let keys = tokens::parse_jwks(&jwks_text).unwrap();
    assert!(matches!(tokens::verify(&early, &keys, now()), Err(TokenError::NotYetValid(_))));
    assert_eq!(tokens::verify("a.b", &keys, now()), Err(TokenError::Format));
    server.stop().await;
}

#[tokio::test]
async fn rotation_keeps_old_tokens_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let old_key = signing_key(7);
    let server = TestControlPlane::start_with(&dir.path().join("cp"), old_key.clone(), Vec::new()).await;
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    let order = json!({"order_id": "o-1", "action": "new", "account": "acme", "plan": "team"});
    assert_eq!(post(&mut client, "/v1/orders", &integration, &order).await.status, 200);
    let old_token = get(&mut client, "/v1/accounts/acme/license-token", &integration).await.json()["token"].as_str().unwrap().to_string();
    server.stop_keeping_data().await;

    // The new key signs; the old one stays in the JWKS as retired.
    let server = TestControlPlane::start_with(&dir.path().join("cp"), signing_key(8), vec![old_key.verifying_key()]).await;
    let mut client = server.client().await;
    let new_token = get(&mut client, "/v1/accounts/acme/license-token", &integration).await.json()["token"].as_str().unwrap().to_string();
    let jwks_text = client.get("/.well-known/jwks.json").await.text();
    let keys = tokens::parse_jwks(&jwks_text).unwrap();
    assert_eq!(keys.len(), 2);
    assert!(tokens::verify(&old_token, &keys, now()).is_ok());
    assert!(tokens::verify(&new_token, &keys, now()).is_ok());
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, &jwks_text).unwrap();
    assert!(python_verify(&jwks_file, &old_token, "acme").0);
    server.stop().await;
}

/// Signs `claims` under `header` with `key`: a validly signed token whose contents are chosen.
fn forge(header: &serde_json::Value, claims: &serde_json::Value, key: &ed25519_dalek::SigningKey) -> String {
    use ed25519_dalek::Signer;
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()).to_bytes()))
}

/// Signed by the right key and still refused: a foreign issuer, a `crit` header, malformed
/// times. A suspended account gets no token at all.
#[tokio::test]
async fn validly_signed_tokens_with_bad_claims_are_refused() {
    let key = signing_key(7);
    let kid = tollgate_snapshot::key_id(&key.verifying_key());
    let keys = vec![(kid.clone(), key.verifying_key())];
    let at = 1_800_000_000;
    let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let good = json!({"iss": "tollgate", "sub": "acme", "exp": at + 60, "nbf": at - 60});
    assert!(tokens::verify(&forge(&header, &good, &key), &keys, at).is_ok());
    let with = |field: &str, value: serde_json::Value| {
        let mut claims = good.clone();
        claims[field] = value;
        forge(&header, &claims, &key)
    };
    assert_eq!(tokens::verify(&with("iss", json!("evil")), &keys, at), Err(TokenError::Issuer("evil".into())));
    let mut no_issuer = good.clone();
    no_issuer.as_object_mut().unwrap().remove("iss");
    assert_eq!(tokens::verify(&forge(&header, &no_issuer, &key), &keys, at), Err(TokenError::Issuer("(none)".into())));
    assert_eq!(tokens::verify(&with("nbf", json!("yesterday")), &keys, at), Err(TokenError::MalformedTime("nbf")));
    assert_eq!(tokens::verify(&with("nbf", json!(1.5e9)), &keys, at), Err(TokenError::MalformedTime("nbf")));
    assert_eq!(tokens::verify(&with("exp", json!("soon")), &keys, at), Err(TokenError::MalformedTime("exp")));
    let critical = json!({"alg": "EdDSA", "kid": kid, "crit": ["exp-ext"], "exp-ext": true});
    assert!(matches!(tokens::verify(&forge(&critical, &good, &key), &keys, at), Err(TokenError::Critical(_))));

    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    let order = |id: &str, action: &str| json!({"order_id": id, "action": action, "account": "initech", "plan": "team"});
    assert_eq!(post(&mut client, "/v1/orders", &integration, &order("s-1", "new")).await.status, 200);
    assert_eq!(get(&mut client, "/v1/accounts/initech/license-token", &integration).await.status, 200);
    assert_eq!(post(&mut client, "/v1/orders", &integration, &order("s-2", "suspend")).await.status, 200);
    let refused = get(&mut client, "/v1/accounts/initech/license-token", &integration).await;
    assert_eq!(refused.status, 422);
    assert!(refused.text().contains("suspended"), "{}", refused.text());
    server.stop().await;
}
