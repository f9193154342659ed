//! The OpenFeature Remote Evaluation Protocol (OFREP) over Tollgate checks: a flag key is a
//! feature, the evaluation context names the account. Only translation lives here; every
//! value comes from the engine through `decide_timed`, and nothing here keeps state.
//!
//! Mapping: an allow is `TARGETING_MATCH` with value `true`; a deny is `DISABLED` with value
//! `false` and Tollgate's reason (and upgrade hint, with its checkout link) in `metadata`. A flag that is not a
//! feature of the catalog is `FLAG_NOT_FOUND` (404); a context without `account` or
//! `targetingKey` is `TARGETING_KEY_MISSING` (400), and one whose fields have the wrong type
//! `INVALID_CONTEXT` (400).

use std::borrow::Cow;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{HttpResponse, Sidecar, decide_timed, json_response, unix_now};
use tollgate_core::engine::View;
use tollgate_protocol::{CheckBody, DecisionJson};
use tollgate_snapshot::ServingView;

/// The path prefix of every OFREP endpoint.
pub const PREFIX: &str = "/ofrep/v1/";
const SINGLE_PREFIX: &str = "/ofrep/v1/evaluate/flags/";
const BULK_PATH: &str = "/ofrep/v1/evaluate/flags";
const CONFIGURATION_PATH: &str = "/ofrep/v1/configuration";
/// The polling interval a bulk-evaluating (client-side) provider is told not to go below.
const MIN_POLLING_INTERVAL_MS: u64 = 1_000;

/// An OFREP request body: only `context` is read; other members are ignored, as the
/// protocol leaves room for them.
#[derive(Debug, Deserialize, Default)]
struct EvaluationRequest {
    #[serde(default)]
    context: Option<Map<String, Value>>,
}

/// Why a context cannot be turned into a check, with the OFREP error code that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ContextError {
    code: &'static str,
    details: String,
}

/// Answers every path under [`PREFIX`]; the caller has matched the prefix.
pub async fn handle(sidecar: &Sidecar, request: Request<Incoming>) -> HttpResponse {
    let path = request.uri().path().to_string();
    let expected = if path == CONFIGURATION_PATH { Method::GET } else { Method::POST };
    let known = path == CONFIGURATION_PATH || path == BULK_PATH || single_key(&path).is_some();
    if !known {
        return ofrep_error(StatusCode::NOT_FOUND, None, "GENERAL", format!("no OFREP endpoint at `{path}`"));
    }
    let method = request.method().clone();
    if method != expected && !(expected == Method::GET && method == Method::HEAD) {
        let mut response = ofrep_error(StatusCode::METHOD_NOT_ALLOWED, None, "GENERAL", format!("`{path}` takes {expected}"));
        if let Ok(allow) = HeaderValue::from_str(expected.as_str()) {
            response.headers_mut().insert(ALLOW, allow);
        }
        return response;
    }
    if path == CONFIGURATION_PATH {
        return configuration();
    }
    let if_none_match = request.headers().get(IF_NONE_MATCH).cloned();
    let body = match tollgate_http::read_body(request, sidecar.body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    evaluate_body(sidecar, &path, &body, if_none_match.as_ref())
}

/// Answers an evaluation POST to `path` (a single flag's path or the bulk path, as [`handle`]
/// has matched it) whose body has been read: parsing, mapping and deciding, with no I/O. Public
/// for the fuzz tests, which feed it bodies without an HTTP connection.
pub fn evaluate_body(sidecar: &Sidecar, path: &str, body: &[u8], if_none_match: Option<&HeaderValue>) -> HttpResponse {
    // An empty body is an empty context: the answer then says which key is missing.
    let parsed: EvaluationRequest = if body.iter().all(u8::is_ascii_whitespace) {
        EvaluationRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(parsed) => parsed,
            Err(error) => {
                let key = single_key(path);
                return ofrep_error(
                    StatusCode::BAD_REQUEST,
                    key.as_deref(),
                    "PARSE_ERROR",
                    format!("the body is not an OFREP request: {error}"),
                );
            }
        }
    };
    let context = parsed.context.unwrap_or_default();
    match single_key(path) {
        Some(key) => single(sidecar, &key, &context),
        None => bulk(sidecar, &context, if_none_match),
    }
}

/// The flag key of a single-evaluation path, percent-decoded.
fn single_key(path: &str) -> Option<String> {
    let raw = path.strip_prefix(SINGLE_PREFIX).filter(|raw| !raw.is_empty() && !raw.contains('/'))?;
    percent_encoding::percent_decode_str(raw).decode_utf8().ok().map(Cow::into_owned)
}

/// The check a context asks for, for `feature`. The account is `account`, falling back to
/// OpenFeature's `targetingKey`, so a plain OpenFeature client that sets only a targeting
/// key still names one.
fn to_check<'c>(context: &'c Map<String, Value>, feature: &'c str) -> Result<CheckBody<'c>, ContextError> {
    let text = |name: &str| -> Result<Option<&'c str>, ContextError> {
        match context.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.as_str()).filter(|value| !value.is_empty())),
            Some(_) => Err(ContextError { code: "INVALID_CONTEXT", details: format!("context field `{name}` must be a string") }),
        }
    };
    let account = match text("account")? {
        Some(account) => account,
        None => text("targetingKey")?.ok_or_else(|| ContextError {
            code: "TARGETING_KEY_MISSING",
            details: "the context names no account: set `account` (or `targetingKey`)".to_string(),
        })?,
    };
    let amount = match context.get("amount") {
        None | Some(Value::Null) => None,
        Some(value) => Some(value.as_u64().ok_or_else(|| ContextError {
            code: "INVALID_CONTEXT",
            details: "context field `amount` must be a non-negative integer".to_string(),
        })?),
    };
    Ok(CheckBody {
        account: Cow::Borrowed(account),
        feature: Cow::Borrowed(feature),
        user: text("user")?.map(Cow::Borrowed),
        region: text("region")?.map(Cow::Borrowed),
        device: text("device")?.map(Cow::Borrowed),
        amount,
    })
}

/// One flag's evaluation as OFREP's success object.
fn evaluate(sidecar: &Sidecar, snapshot: &ServingView, check: &CheckBody<'_>, now: i64, stale: bool) -> Value {
    let decision = decide_timed(sidecar, snapshot, check, now);
    let answer = DecisionJson::new(snapshot.catalog(), &check.account, snapshot.revision(), &decision, stale);
    json!({
        "key": check.feature,
        "value": answer.allow,
        "reason": if answer.allow { "TARGETING_MATCH" } else { "DISABLED" },
        "variant": if answer.allow { "on" } else { "off" },
        "metadata": metadata(&answer),
    })
}

/// Flag metadata must be flat (strings, numbers, booleans), so the decision's fields are
/// copied across and the upgrade hint becomes `upgrade = "kind:id"` plus its two parts, and
/// `upgrade_checkout_url` when the plan or add-on has a checkout link.
fn metadata(answer: &DecisionJson<'_>) -> Value {
    let mut metadata = match serde_json::to_value(answer) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    metadata.remove("allow");
    if let Some(upgrade) = &answer.upgrade {
        metadata.insert("upgrade".into(), Value::String(format!("{}:{}", upgrade.kind, upgrade.id)));
        metadata.insert("upgrade_kind".into(), Value::String(upgrade.kind.to_string()));
        metadata.insert("upgrade_id".into(), Value::String(upgrade.id.to_string()));
        if let Some(checkout_url) = &upgrade.checkout_url {
            metadata.insert("upgrade_checkout_url".into(), Value::String(checkout_url.clone()));
        }
    }
    Value::Object(metadata)
}

fn single(sidecar: &Sidecar, key: &str, context: &Map<String, Value>) -> HttpResponse {
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready(Some(key)) };
    if snapshot.catalog().feature_index.get(key).is_none() {
        return ofrep_error(StatusCode::NOT_FOUND, Some(key), "FLAG_NOT_FOUND", format!("`{key}` is not a feature of the catalog"));
    }
    let check = match to_check(context, key) {
        Ok(check) => check,
        Err(error) => return ofrep_error(StatusCode::BAD_REQUEST, Some(key), error.code, error.details),
    };
    let stale = sidecar.store.is_stale();
    json_response(StatusCode::OK, &evaluate(sidecar, snapshot, &check, unix_now(sidecar), stale))
}

/// Every feature of the catalog for one context. The ETag is a digest of the answer itself
/// (with its revision), since an answer can change without a new snapshot: a license expires,
/// a quota fills up.
fn bulk(sidecar: &Sidecar, context: &Map<String, Value>, if_none_match: Option<&HeaderValue>) -> HttpResponse {
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready(None) };
    let now = unix_now(sidecar);
    let stale = sidecar.store.is_stale();
    let data = snapshot.catalog();
    let mut flags = Vec::with_capacity(data.features.len());
    for feature in data.features.iter() {
        let check = match to_check(context, feature.name.as_str()) {
            Ok(check) => check,
            Err(error) => return ofrep_error(StatusCode::BAD_REQUEST, None, error.code, error.details),
        };
        flags.push(evaluate(sidecar, snapshot, &check, now, stale));
    }
    let bytes = match serde_json::to_vec(&json!({ "flags": flags })) {
        Ok(bytes) => bytes,
        Err(error) => return ofrep_error(StatusCode::INTERNAL_SERVER_ERROR, None, "GENERAL", format!("cannot encode answer: {error}")),
    };
    let etag = etag(snapshot.revision(), &bytes);
    let Ok(etag_value) = HeaderValue::from_str(&etag) else { return json_bytes(StatusCode::OK, bytes) };
    if if_none_match.is_some_and(|sent| matches_etag(sent, &etag)) {
        let mut not_modified = Response::new(Full::new(Bytes::new()));
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        not_modified.headers_mut().insert(ETAG, etag_value);
        return not_modified;
    }
    let mut response = json_bytes(StatusCode::OK, bytes);
    response.headers_mut().insert(ETAG, etag_value);
    response
}

fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A strong ETag from the revision and a CRC-32 and length of the body: enough to tell one
/// answer from the next for the same context, which is all a conditional request asks.
fn etag(revision: u64, body: &[u8]) -> String {
    format!("\"{revision:x}-{:08x}-{:x}\"", crc32fast::hash(body), body.len())
}

/// `If-None-Match` holds `*` or a comma-separated list of ETags (weak ones compare equal
/// to their strong form for this purpose, RFC 9110 13.1.2).
fn matches_etag(sent: &HeaderValue, etag: &str) -> bool {
    let Ok(sent) = sent.to_str() else { return false };
    sent.split(',').map(str::trim).any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == etag)
}

/// `GET /ofrep/v1/configuration`: boolean flags only; bulk answers can be polled.
fn configuration() -> HttpResponse {
    json_response(
        StatusCode::OK,
        &json!({
            "name": "Tollgate",
            "capabilities": {
                "cacheInvalidation": {"polling": {"enabled": true, "minPollingIntervalMs": MIN_POLLING_INTERVAL_MS}},
                "flagEvaluation": {"supportedTypes": ["boolean"]},
            },
        }),
    )
}

fn not_ready(key: Option<&str>) -> HttpResponse {
    ofrep_error(StatusCode::SERVICE_UNAVAILABLE, key, "GENERAL", "no valid snapshot is loaded yet")
}

/// OFREP's error object: `{key, errorCode, errorDetails}` (`key` only for a single flag).
fn ofrep_error(status: StatusCode, key: Option<&str>, code: &str, details: impl Into<String>) -> HttpResponse {
    let mut body = Map::new();
    if let Some(key) = key {
        body.insert("key".into(), Value::String(key.to_string()));
    }
    body.insert("errorCode".into(), Value::String(code.to_string()));
    body.insert("errorDetails".into(), Value::String(details.into()));
    json_response(status, &Value::Object(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn account_falls_back_to_the_targeting_key() {
        let ctx = context(json!({"targetingKey": "acme", "user": "alice"}));
        let check = to_check(&ctx, "reports").map_err(|error| error.details);
        assert_eq!(check.as_ref().map(|check| check.account.as_ref()), Ok("acme"));
        let ctx = context(json!({"targetingKey": "someone", "account": "globex"}));
        assert_eq!(to_check(&ctx, "reports").map(|check| check.account.into_owned()).ok().as_deref(), Some("globex"));
    }

    #[test]
    fn missing_and_mistyped_context_fields_are_named() {
        let missing = to_check(&Map::new(), "reports").err().map(|error| error.code);
        assert_eq!(missing, Some("TARGETING_KEY_MISSING"));
        let mistyped = to_check(&context(json!({"account": 7})), "reports").err().map(|error| error.code);
        assert_eq!(mistyped, Some("INVALID_CONTEXT"));
        let amount = to_check(&context(json!({"account": "acme", "amount": -1})), "api").err().map(|error| error.code);
        assert_eq!(amount, Some("INVALID_CONTEXT"));
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let etag = "\"1-2-3\"";
        assert!(matches_etag(&HeaderValue::from_static("\"0\", W/\"1-2-3\""), etag));
        assert!(matches_etag(&HeaderValue::from_static("*"), etag));
        assert!(!matches_etag(&HeaderValue::from_static("\"1-2-4\""), etag));
    }

    #[test]
    fn single_keys_are_percent_decoded_and_one_segment() {
        assert_eq!(single_key("/ofrep/v1/evaluate/flags/a%20b").as_deref(), Some("a b"));
        assert_eq!(single_key("/ofrep/v1/evaluate/flags/"), None);
        assert_eq!(single_key("/ofrep/v1/evaluate/flags/a/b"), None);
    }
}
