//! Other protocols mapped onto a Tollgate check: Envoy's ext_authz HTTP service (identity
//! and feature from `x-tollgate-*` headers) and the OpenID AuthZEN Authorization API 1.0.
//! Only translation lives here; decisions come from the engine.

use std::borrow::Cow;

use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::route_path;
use super::{HttpResponse, Sidecar, decide_timed, error_response, json_response, not_ready, unix_now};
use tollgate_core::engine::View;
use tollgate_core::model::ArchivedSnapshotData;
use tollgate_protocol::{CheckBody, DecisionJson, json_error};

pub const HEADER_ACCOUNT: &str = "x-tollgate-account";
pub const HEADER_USER: &str = "x-tollgate-user";
pub const HEADER_FEATURE: &str = "x-tollgate-feature";
pub const HEADER_REGION: &str = "x-tollgate-region";
pub const HEADER_DEVICE: &str = "x-tollgate-device";
/// The path prefix Envoy puts before the original path (`path_prefix: /ext_authz`).
pub const EXT_AUTHZ_PREFIX: &str = "/ext_authz";

/// The request headers ext_authz reads identity and feature from; configurable because the
/// headers in front of an app are often set by another filter (a JWT's claims, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzHeaders {
    pub account: HeaderName,
    pub user: HeaderName,
    pub feature: HeaderName,
    pub region: HeaderName,
    pub device: HeaderName,
}

impl Default for ExtAuthzHeaders {
    fn default() -> ExtAuthzHeaders {
        ExtAuthzHeaders {
            account: HeaderName::from_static(HEADER_ACCOUNT),
            user: HeaderName::from_static(HEADER_USER),
            feature: HeaderName::from_static(HEADER_FEATURE),
            region: HeaderName::from_static(HEADER_REGION),
            device: HeaderName::from_static(HEADER_DEVICE),
        }
    }
}

/// A header name given on the command line is not a valid HTTP header name.
#[derive(Debug, thiserror::Error)]
#[error("`{name}` is not a valid HTTP header name")]
pub struct InvalidHeaderName {
    pub name: String,
}

/// Parses a header name from configuration; HTTP header names are case-insensitive, so it is
/// stored lowercased.
pub fn header_name(name: &str) -> Result<HeaderName, InvalidHeaderName> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| InvalidHeaderName { name: name.to_string() })
}

fn header<'r, B>(request: &'r Request<B>, name: &HeaderName) -> Option<&'r str> {
    request.headers().get(name).and_then(|value| value.to_str().ok()).filter(|value| !value.is_empty())
}

/// The feature of the catalog's `[routes]` map whose prefix matches `path` (the original
/// request path, without the `/ext_authz` prefix, normalised by [`route_path::normalize`]:
/// a raw path is matched byte for byte), most specific first. A prefix matches
/// whole path segments only: `/reports` matches `/reports` and `/reports/1`, not `/reportsx`.
pub fn route_feature<'s>(snapshot: &'s ArchivedSnapshotData, path: &str) -> Option<&'s str> {
    let rule = snapshot.routes.iter().find(|rule| {
        let prefix = rule.prefix.as_str();
        path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'))
    })?;
    snapshot.features.get(rule.feature.to_native() as usize).map(|feature| feature.name.as_str())
}

/// Envoy ext_authz: 200 allows (with quota headers for the upstream), 403 denies with a JSON
/// reason. A request missing its identity is denied, never answered with a 5xx.
///
/// The feature comes from the catalog's route map when the normalised original path matches a
/// route, and from the feature header otherwise: a matching route wins, so a client that can
/// set headers cannot pick a feature it has for a path that needs another, however it spells
/// the path. A path Tollgate will not guess at (an encoded `/`, a `\`, `..` above the root;
/// see [`route_path::InvalidPath`]) is denied with `invalid_path`.
///
/// Only the path and the headers are read, never the body: any body type will do (the fuzz
/// tests build requests without a connection).
pub fn ext_authz<B>(sidecar: &Sidecar, request: &Request<B>) -> HttpResponse {
    let names = &sidecar.ext_authz;
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let original_path = request.uri().path().strip_prefix(EXT_AUTHZ_PREFIX).unwrap_or_default();
    // Routes are matched against the path as the app will see it (Envoy normalises the same
    // way), so no respelling of a routed path can miss its route and fall back to the header.
    let path = match route_path::normalize(original_path) {
        Ok(path) => path,
        Err(error) => {
            let mut response = error_response(StatusCode::FORBIDDEN, "invalid_path", format!("path `{original_path}` {error}"));
            response.headers_mut().insert("x-tollgate-reason", HeaderValue::from_static("invalid_path"));
            return response;
        }
    };
    let feature = route_feature(snapshot.catalog(), &path).or_else(|| header(request, &names.feature));
    let (Some(account), Some(feature)) = (header(request, &names.account), feature) else {
        let mut response = error_response(
            StatusCode::FORBIDDEN,
            "missing_identity",
            format!("`{}` and `{}` headers (or a route for the path) are required", names.account, names.feature),
        );
        response.headers_mut().insert("x-tollgate-reason", HeaderValue::from_static("missing_identity"));
        return response;
    };
    let check = CheckBody {
        account: Cow::Borrowed(account),
        feature: Cow::Borrowed(feature),
        user: header(request, &names.user).map(Cow::Borrowed),
        region: header(request, &names.region).map(Cow::Borrowed),
        device: header(request, &names.device).map(Cow::Borrowed),
        amount: None,
    };
    let decision = decide_timed(sidecar, snapshot, &check, unix_now(sidecar));
    let body = DecisionJson::new(snapshot.catalog(), account, snapshot.revision(), &decision, sidecar.store.is_stale());
    let status = if body.allow { StatusCode::OK } else { StatusCode::FORBIDDEN };
    let mut response = json_response(status, &body);
    let headers = response.headers_mut();
    headers.insert("x-tollgate-reason", HeaderValue::from_static(decision.reason.as_str()));
    if let Ok(revision) = HeaderValue::from_str(&snapshot.revision().to_string()) {
        headers.insert("x-tollgate-revision", revision);
    }
    if let Ok(feature) = HeaderValue::from_str(feature) {
        headers.insert("x-tollgate-feature", feature);
    }
    if let Some(remaining) = body.remaining.and_then(|remaining| HeaderValue::from_str(&remaining.to_string()).ok()) {
        headers.insert("x-tollgate-remaining", remaining);
    }
    if let Some(limit) = body.limit.and_then(|limit| HeaderValue::from_str(&limit.to_string()).ok()) {
        headers.insert("x-tollgate-limit", limit);
    }
    if let Some(reset_at) = body.reset_at.and_then(|reset_at| HeaderValue::from_str(&reset_at.to_string()).ok()) {
        headers.insert("x-tollgate-reset-at", reset_at);
    }
    if let Some(upgrade) = body.upgrade.as_ref().and_then(|upgrade| HeaderValue::from_str(&format!("{}:{}", upgrade.kind, upgrade.id)).ok())
    {
        headers.insert("x-tollgate-upgrade", upgrade);
    }
    // The filled-in values are percent-encoded ASCII; only a template with characters a header
    // cannot carry would fail, and then the header is left out rather than mangled.
    if let Some(checkout_url) =
        body.upgrade.as_ref().and_then(|upgrade| upgrade.checkout_url.as_deref()).and_then(|url| HeaderValue::from_str(url).ok())
    {
        headers.insert("x-tollgate-upgrade-url", checkout_url);
    }
    response
}

#[derive(Debug, Deserialize, Default, Clone)]
struct Entity {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    properties: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
struct Action {
    #[serde(default)]
    name: Option<String>,
}

/// One AuthZEN evaluation request; in a batch, each item's parts override the defaults.
#[derive(Debug, Deserialize, Default, Clone)]
struct Evaluation {
    #[serde(default)]
    subject: Option<Entity>,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    resource: Option<Entity>,
    #[serde(default)]
    context: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize, Default)]
struct Evaluations {
    #[serde(flatten)]
    defaults: Evaluation,
    #[serde(default)]
    evaluations: Option<Vec<Evaluation>>,
    #[serde(default)]
    options: Option<serde_json::Map<String, Value>>,
}

fn property<'e>(entity: Option<&'e Entity>, name: &str) -> Option<&'e str> {
    entity.and_then(|entity| entity.properties.as_ref()).and_then(|properties| properties.get(name)).and_then(Value::as_str)
}

/// Maps AuthZEN onto a check: the account is `subject.properties.account` (or
/// `resource.properties.account`, or the resource's id when its type is `account` as in the
/// specification's first example, or the subject itself when its type is `account`); the user
/// is the subject's id otherwise; the feature is the resource's id when its type is `feature`,
/// else the action's name; region, device and amount come from the context.
fn to_check(evaluation: Merged<'_>) -> Result<CheckBody<'static>, String> {
    let subject = evaluation.subject;
    let resource = evaluation.resource;
    let subject_is_account = subject.and_then(|subject| subject.kind.as_deref()) == Some("account");
    let resource_account =
        resource.filter(|resource| resource.kind.as_deref() == Some("account")).and_then(|resource| resource.id.as_deref());
    let account = property(subject, "account")
        .or_else(|| property(resource, "account"))
        .or(resource_account)
        .or_else(|| subject.filter(|_| subject_is_account).and_then(|subject| subject.id.as_deref()))
        .ok_or("no account: set `subject.properties.account`, use a resource or a subject of type `account`")?;
    let user = if subject_is_account { None } else { subject.and_then(|subject| subject.id.clone()) };
    let feature = resource
        .filter(|resource| resource.kind.as_deref() == Some("feature"))
        .and_then(|resource| resource.id.clone())
        .or_else(|| evaluation.action.and_then(|action| action.name.clone()))
        .ok_or("no feature: use a resource of type `feature` or an action name")?;
    let context = evaluation.context;
    let context_str =
        |name: &str| context.and_then(|context| context.get(name)).and_then(Value::as_str).map(|value| Cow::Owned(value.to_string()));
    Ok(CheckBody {
        account: Cow::Owned(account.to_string()),
        feature: Cow::Owned(feature),
        user: user.map(Cow::Owned),
        region: context_str("region"),
        device: context_str("device"),
        amount: context.and_then(|context| context.get("amount")).and_then(Value::as_u64),
    })
}

/// An evaluation with each part taken from the item, else from the request's defaults: borrowed,
/// so a large default context costs nothing per item and a batch costs what its body holds.
#[derive(Debug, Clone, Copy)]
struct Merged<'e> {
    subject: Option<&'e Entity>,
    action: Option<&'e Action>,
    resource: Option<&'e Entity>,
    context: Option<&'e serde_json::Map<String, Value>>,
}

impl<'e> Merged<'e> {
    fn of(evaluation: &'e Evaluation) -> Merged<'e> {
        Merged {
            subject: evaluation.subject.as_ref(),
            action: evaluation.action.as_ref(),
            resource: evaluation.resource.as_ref(),
            context: evaluation.context.as_ref(),
        }
    }
}

fn merge<'e>(defaults: &'e Evaluation, item: &'e Evaluation) -> Merged<'e> {
    Merged {
        subject: item.subject.as_ref().or(defaults.subject.as_ref()),
        action: item.action.as_ref().or(defaults.action.as_ref()),
        resource: item.resource.as_ref().or(defaults.resource.as_ref()),
        context: item.context.as_ref().or(defaults.context.as_ref()),
    }
}

pub fn authzen(sidecar: &Sidecar, path: &str, body: &[u8]) -> HttpResponse {
    let parsed: Evaluations = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &json_error(&error)),
    };
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let now = unix_now(sidecar);
    // Read once, like `now`: every evaluation of one request says the same.
    let stale = sidecar.store.is_stale();
    let evaluate = |evaluation: Merged<'_>| -> Result<(bool, Value), String> {
        let check = to_check(evaluation)?;
        let decision = decide_timed(sidecar, snapshot, &check, now);
        let body = DecisionJson::new(snapshot.catalog(), &check.account, snapshot.revision(), &decision, stale);
        let context = serde_json::to_value(&body).unwrap_or(Value::Null);
        Ok((body.allow, context))
    };
    // A single evaluation, or a batch request without an `evaluations` array (AuthZEN 1.0,
    // 7.1). A request the specification allows but that names no Tollgate account or feature
    // is answered with a deny and the reason in the context, like a batch item, so that a
    // client written for the standard gets a decision; only a malformed body is a 400.
    let single = |evaluation: &Evaluation| match evaluate(Merged::of(evaluation)) {
        Ok((decision, context)) => json_response(StatusCode::OK, &json!({"decision": decision, "context": context})),
        Err(message) => json_response(StatusCode::OK, &unmappable(message)),
    };
    if path == "/access/v1/evaluation" {
        return single(&parsed.defaults);
    }
    let Some(items) = parsed.evaluations.as_ref().filter(|items| !items.is_empty()) else {
        return single(&parsed.defaults);
    };
    if items.len() > super::MAX_BATCH {
        return error_response(StatusCode::BAD_REQUEST, "too_many_checks", format!("at most {} evaluations are allowed", super::MAX_BATCH));
    }
    let semantic =
        parsed.options.as_ref().and_then(|options| options.get("evaluations_semantic")).and_then(Value::as_str).unwrap_or("execute_all");
    let stop_on = match semantic {
        "execute_all" => None,
        "deny_on_first_deny" => Some(false),
        "permit_on_first_permit" => Some(true),
        other => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_request", format!("unknown `options.evaluations_semantic` `{other}`"));
        }
    };
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        match evaluate(merge(&parsed.defaults, item)) {
            Ok((decision, context)) => {
                results.push(json!({"decision": decision, "context": context}));
                if stop_on == Some(decision) {
                    break;
                }
            }
            Err(message) => {
                results.push(unmappable(message));
                if stop_on == Some(false) {
                    break;
                }
            }
        }
    }
    json_response(StatusCode::OK, &json!({"evaluations": results}))
}

/// The answer to an evaluation that cannot be mapped onto a check: a deny, with why.
fn unmappable(message: String) -> Value {
    json!({"decision": false, "context": {"reason": "invalid_request", "error": {"code": "invalid_request", "message": message}}})
}

/// `/.well-known/authzen-configuration`: the PDP's metadata, with endpoints under `base`, the
/// sidecar's configured public URL (never the request's `Host` header, which the caller
/// chooses).
pub fn authzen_configuration(base: &str) -> HttpResponse {
    json_response(
        StatusCode::OK,
        &json!({
            "policy_decision_point": base,
            "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
            "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
        }),
    )
}
