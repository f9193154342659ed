//! License tokens: compact JWS with `alg: EdDSA` over Ed25519 (RFC 8037), the JWKS that
//! publishes the verifying keys (OKP, Ed25519), and offline verification. Verification accepts
//! exactly `EdDSA`, needs a `kid` found in the key set, checks the signature strictly and then
//! the claims: `iss` must be Tollgate's, `exp` a number in the future, `nbf` (when present) a
//! number in the past, and a `crit` header (extensions the token says must be understood) is
//! refused, as none are. Anything else (`alg: none`, another algorithm, an unknown key, a
//! tampered part, an expired token) is refused. No I/O.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use tollgate_snapshot::key_id;

/// The `iss` claim of every token.
pub const ISSUER: &str = "tollgate";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not a compact JWS (three base64url parts separated by `.`)")]
    Format,
    #[error("token header is not valid JSON: {0}")]
    Header(String),
    #[error("token claims are not a valid JSON object: {0}")]
    Claims(String),
    #[error("token algorithm `{0}` is refused; only `EdDSA` is accepted")]
    Algorithm(String),
    #[error("token header has no `kid`")]
    NoKeyId,
    #[error("token key `{0}` is not in the key set")]
    UnknownKey(String),
    #[error("token signature does not verify against key `{0}`")]
    BadSignature(String),
    #[error("token expired at {0}")]
    Expired(i64),
    #[error("token is not valid before {0}")]
    NotYetValid(i64),
    #[error("token has no numeric `exp` claim")]
    NoExpiry,
    #[error("token claim `{0}` is not a number of seconds")]
    MalformedTime(&'static str),
    #[error("token issuer `{0}` is not `tollgate`")]
    Issuer(String),
    #[error("token header lists critical extensions ({0}) that are not understood")]
    Critical(String),
    #[error("key set is not valid: {0}")]
    Jwks(String),
}

/// Signs `claims` (a JSON object) as a compact JWS with `alg: EdDSA` and `kid`.
pub fn sign(claims: &serde_json::Map<String, serde_json::Value>, key: &SigningKey) -> String {
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": key_id(&key.verifying_key())});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(serde_json::Value::Object(claims.clone()).to_string())
    );
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// One public key of a JWKS, as RFC 8037 writes an Ed25519 key.
pub fn jwk(key: &VerifyingKey) -> serde_json::Value {
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(key.to_bytes()),
        "kid": key_id(key),
        "alg": "EdDSA",
        "use": "sig",
    })
}

/// `GET /.well-known/jwks.json`: the current key first, then retired keys whose tokens may
/// still be in use.
pub fn jwks(keys: &[VerifyingKey]) -> serde_json::Value {
    serde_json::json!({"keys": keys.iter().map(jwk).collect::<Vec<_>>()})
}

/// Reads the Ed25519 keys of a JWKS document, by `kid`. Keys of other types are skipped.
pub fn parse_jwks(text: &str) -> Result<Vec<(String, VerifyingKey)>, TokenError> {
    let document: serde_json::Value = serde_json::from_str(text).map_err(|error| TokenError::Jwks(error.to_string()))?;
    let keys = document.get("keys").and_then(serde_json::Value::as_array).ok_or_else(|| TokenError::Jwks("no `keys` array".into()))?;
    let mut parsed = Vec::new();
    for key in keys {
        if key.get("kty").and_then(serde_json::Value::as_str) != Some("OKP")
            || key.get("crv").and_then(serde_json::Value::as_str) != Some("Ed25519")
        {
            continue;
        }
        let x = key.get("x").and_then(serde_json::Value::as_str).ok_or_else(|| TokenError::Jwks("an Ed25519 key has no `x`".into()))?;
        let bytes: [u8; 32] = URL_SAFE_NO_PAD
            .decode(x)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| TokenError::Jwks(format!("`x` value `{x}` is not a base64url 32-byte key")))?;
        let verifying = VerifyingKey::from_bytes(&bytes).map_err(|_| TokenError::Jwks(format!("`x` value `{x}` is not an Ed25519 key")))?;
        let kid = key.get("kid").and_then(serde_json::Value::as_str).map_or_else(|| key_id(&verifying), str::to_string);
        parsed.push((kid, verifying));
    }
    Ok(parsed)
}

/// Verifies a compact JWS against `keys` at `now` (unix seconds) and returns its claims.
pub fn verify(token: &str, keys: &[(String, VerifyingKey)], now: i64) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(header_part), Some(claims_part), Some(signature_part), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Format);
    };
    let header_bytes = URL_SAFE_NO_PAD.decode(header_part).map_err(|_| TokenError::Format)?;
    let header: serde_json::Value = serde_json::from_slice(&header_bytes).map_err(|error| TokenError::Header(error.to_string()))?;
    let alg = header.get("alg").and_then(serde_json::Value::as_str).unwrap_or("");
    if alg != "EdDSA" {
        return Err(TokenError::Algorithm(alg.to_string()));
    }
    if let Some(critical) = header.get("crit") {
        return Err(TokenError::Critical(critical.to_string()));
    }
    let kid = header.get("kid").and_then(serde_json::Value::as_str).ok_or(TokenError::NoKeyId)?;
    let (_, key) = keys.iter().find(|(id, _)| id == kid).ok_or_else(|| TokenError::UnknownKey(kid.to_string()))?;
    let bad_signature = || TokenError::BadSignature(kid.to_string());
    let signature_bytes = URL_SAFE_NO_PAD.decode(signature_part).map_err(|_| bad_signature())?;
    let signature = Signature::from_slice(&signature_bytes).map_err(|_| bad_signature())?;
    let signing_input_len = header_part.len() + 1 + claims_part.len();
    let signing_input = token.trim().get(..signing_input_len).ok_or(TokenError::Format)?;
    key.verify_strict(signing_input.as_bytes(), &signature).map_err(|_| bad_signature())?;
    let claims_bytes = URL_SAFE_NO_PAD.decode(claims_part).map_err(|_| TokenError::Format)?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&claims_bytes).map_err(|error| TokenError::Claims(error.to_string()))?;
    let issuer = claims.get("iss").map_or_else(|| "(none)".to_string(), |iss| iss.as_str().map_or_else(|| iss.to_string(), str::to_string));
    if issuer != ISSUER {
        return Err(TokenError::Issuer(issuer));
    }
    let exp = match claims.get("exp") {
        None => return Err(TokenError::NoExpiry),
        Some(exp) => exp.as_i64().ok_or(TokenError::MalformedTime("exp"))?,
    };
    if now >= exp {
        return Err(TokenError::Expired(exp));
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_i64().ok_or(TokenError::MalformedTime("nbf"))?;
        if now < nbf {
            return Err(TokenError::NotYetValid(nbf));
        }
    }
    Ok(claims)
}
