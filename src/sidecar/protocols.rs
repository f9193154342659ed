//! Other protocols mapped onto a Tollgate check: Envoy's ext_authz HTTP service (identity
//! and feature from `x-tollgate-*` headers) and the OpenID AuthZEN Authorization API 1.0.
//! Only translation lives here; decisions come from the engine.

use std::borrow::Cow;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{HttpResponse, Sidecar, decide_timed, error_response, json_response, not_ready, unix_now};
use crate::wire::{CheckBody, DecisionJson, json_error};

pub const HEADER_ACCOUNT: &str = "x-tollgate-account";
pub const HEADER_USER: &str = "x-tollgate-user";
pub const HEADER_FEATURE: &str = "x-tollgate-feature";
pub const HEADER_REGION: &str = "x-tollgate-region";
pub const HEADER_DEVICE: &str = "x-tollgate-device";

fn header<'r>(request: &'r Request<Incoming>, name: &str) -> Option<&'r str> {
    request.headers().get(name).and_then(|value| value.to_str().ok()).filter(|value| !value.is_empty())
}

/// Envoy ext_authz: 200 allows (with quota headers for the upstream), 403 denies with a JSON
/// reason. A request missing its identity is denied, never answered with a 5xx.
pub fn ext_authz(sidecar: &Sidecar, request: &Request<Incoming>) -> HttpResponse {
    let (Some(account), Some(feature)) = (header(request, HEADER_ACCOUNT), header(request, HEADER_FEATURE)) else {
        let mut response = error_response(
            StatusCode::FORBIDDEN,
            "missing_identity",
            format!("`{HEADER_ACCOUNT}` and `{HEADER_FEATURE}` headers are required"),
        );
        response.headers_mut().insert("x-tollgate-reason", HeaderValue::from_static("missing_identity"));
        return response;
    };
    let check = CheckBody {
        account: Cow::Borrowed(account),
        feature: Cow::Borrowed(feature),
        user: header(request, HEADER_USER).map(Cow::Borrowed),
        region: header(request, HEADER_REGION).map(Cow::Borrowed),
        device: header(request, HEADER_DEVICE).map(Cow::Borrowed),
        amount: None,
    };
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let decision = decide_timed(sidecar, snapshot, &check, unix_now());
    let body = DecisionJson::new(snapshot.data(), account, snapshot.revision(), &decision, false);
    let status = if body.allow { StatusCode::OK } else { StatusCode::FORBIDDEN };
    let mut response = json_response(status, &body);
    let headers = response.headers_mut();
    headers.insert("x-tollgate-reason", HeaderValue::from_static(decision.reason.as_str()));
    if let Ok(revision) = HeaderValue::from_str(&snapshot.revision().to_string()) {
        headers.insert("x-tollgate-revision", revision);
    }
    if let Some(remaining) = body.remaining.and_then(|remaining| HeaderValue::from_str(&remaining.to_string()).ok()) {
        headers.insert("x-tollgate-remaining", remaining);
    }
    if let Some(limit) = body.limit.and_then(|limit| HeaderValue::from_str(&limit.to_string()).ok()) {
        headers.insert("x-tollgate-limit", limit);
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
/// `resource.properties.account`, or the subject itself when its type is `account`); the user
/// is the subject's id otherwise; the feature is the resource's id when its type is `feature`,
/// else the action's name; region, device and amount come from the context.
fn to_check(evaluation: &Evaluation) -> Result<CheckBody<'static>, String> {
    let subject = evaluation.subject.as_ref();
    let resource = evaluation.resource.as_ref();
    let subject_is_account = subject.and_then(|subject| subject.kind.as_deref()) == Some("account");
    let account = property(subject, "account")
        .or_else(|| property(resource, "account"))
        .or_else(|| subject.filter(|_| subject_is_account).and_then(|subject| subject.id.as_deref()))
        .ok_or("no account: set `subject.properties.account`, or use a subject of type `account`")?;
    let user = if subject_is_account { None } else { subject.and_then(|subject| subject.id.clone()) };
    let feature = resource
        .filter(|resource| resource.kind.as_deref() == Some("feature"))
        .and_then(|resource| resource.id.clone())
        .or_else(|| evaluation.action.as_ref().and_then(|action| action.name.clone()))
        .ok_or("no feature: use a resource of type `feature` or an action name")?;
    let context = evaluation.context.as_ref();
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

fn merge(defaults: &Evaluation, item: &Evaluation) -> Evaluation {
    Evaluation {
        subject: item.subject.clone().or_else(|| defaults.subject.clone()),
        action: item.action.clone().or_else(|| defaults.action.clone()),
        resource: item.resource.clone().or_else(|| defaults.resource.clone()),
        context: item.context.clone().or_else(|| defaults.context.clone()),
    }
}

pub fn authzen(sidecar: &Sidecar, path: &str, body: &[u8]) -> HttpResponse {
    let parsed: Evaluations = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &json_error(&error)),
    };
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let now = unix_now();
    let evaluate = |evaluation: &Evaluation| -> Result<(bool, Value), String> {
        let check = to_check(evaluation)?;
        let decision = decide_timed(sidecar, snapshot, &check, now);
        let body = DecisionJson::new(snapshot.data(), &check.account, snapshot.revision(), &decision, false);
        let context = serde_json::to_value(&body).unwrap_or(Value::Null);
        Ok((body.allow, context))
    };
    if path == "/access/v1/evaluation" {
        return match evaluate(&parsed.defaults) {
            Ok((decision, context)) => json_response(StatusCode::OK, &json!({"decision": decision, "context": context})),
            Err(message) => error_response(StatusCode::BAD_REQUEST, "invalid_request", message),
        };
    }
    let Some(items) = parsed.evaluations.as_ref().filter(|items| !items.is_empty()) else {
        // Without an `evaluations` array the request is a single evaluation (AuthZEN 1.0, 7.1).
        return match evaluate(&parsed.defaults) {
            Ok((decision, context)) => json_response(StatusCode::OK, &json!({"decision": decision, "context": context})),
            Err(message) => error_response(StatusCode::BAD_REQUEST, "invalid_request", message),
        };
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
        match evaluate(&merge(&parsed.defaults, item)) {
            Ok((decision, context)) => {
                results.push(json!({"decision": decision, "context": context}));
                if stop_on == Some(decision) {
                    break;
                }
            }
            Err(message) => {
                results.push(json!({"decision": false, "context": {"error": {"code": "invalid_request", "message": message}}}));
                if stop_on == Some(false) {
                    break;
                }
            }
        }
    }
    json_response(StatusCode::OK, &json!({"evaluations": results}))
}

/// `/.well-known/authzen-configuration`: the PDP's metadata, with endpoints under the address
/// the client used.
pub fn authzen_configuration(request: &Request<Incoming>) -> HttpResponse {
    let host = request.headers().get(hyper::header::HOST).and_then(|value| value.to_str().ok()).unwrap_or("127.0.0.1");
    let base = format!("http://{host}");
    json_response(
        StatusCode::OK,
        &json!({
            "policy_decision_point": base,
            "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
            "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
        }),
    )
}
