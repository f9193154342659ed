//! The control plane's HTTP API (hyper): routing, API-key authentication and scopes, bodies,
//! the long-polled snapshot feed, tokens and the JWKS, usage ingestion, reports, analytics and
//! webhook deliveries. Every database call runs on the
//! blocking pool. The routes and their answers are documented in `openapi.json`, served at
//! `/openapi.json` and kept true by `tests/control_plane_openapi.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::store::{AuditQuery, Scope};
use super::usage_store::{Delivery, DeliveryStatus};
use super::{ApiError, Caller, ControlPlane, authenticate, changes, ingest, reports, tokens};
use tollgate_http::{query_param, read_body};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

pub use tollgate_protocol::feed::REVISION_HEADER;
use tollgate_protocol::feed::{AFTER_PARAM, SNAPSHOT_PATH, USAGE_PATH, WAIT_PARAM};
/// Default long-poll wait on `/v1/snapshot`, in seconds.
const DEFAULT_WAIT_SECS: u64 = 30;
/// Most audit entries in one answer.
const MAX_AUDIT: u32 = 1_000;

pub use tollgate_http::HttpResponse;
use tollgate_http::{error_response, json_response};

/// Which routes a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Everything (no `--sync-listen`).
    All,
    /// Everything but the sidecar routes.
    Api,
    /// Only the sidecar routes and the probes.
    Sync,
}

/// The routes sidecars call, served on the sync listener when there is one.
pub const SYNC_ROUTES: &[&str] = &[SNAPSHOT_PATH, USAGE_PATH];

impl Listener {
    fn serves(self, pattern: &str) -> bool {
        match self {
            Listener::All => true,
            Listener::Api => !SYNC_ROUTES.contains(&pattern),
            Listener::Sync => SYNC_ROUTES.contains(&pattern) || matches!(pattern, "/healthz" | "/readyz"),
        }
    }
}

struct Server {
    scope: Listener,
    control_plane: Arc<ControlPlane>,
    /// Turns true when shutdown starts, so long-polls answer at once instead of holding the
    /// drain open.
    closing: watch::Receiver<bool>,
}

/// Serves the API on `listener` until `shutdown` resolves, then drains open connections for
/// at most `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    control_plane: Arc<ControlPlane>,
    scope: Listener,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let (closing_sender, closing) = watch::channel(false);
    let server = Arc::new(Server { scope, control_plane, closing });
    let on_close = move || {
        let _ = closing_sender.send(true);
    };
    tollgate_http::connections(listener, move |request| handle(Arc::clone(&server), request), shutdown, on_close, drain_timeout).await;
}

fn api_error(error: &ApiError) -> HttpResponse {
    let (status, code) = match error {
        ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, *code),
        ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, *code),
        ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        ApiError::Policy(_) => (StatusCode::UNPROCESSABLE_ENTITY, "policy_violation"),
        ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
        ApiError::Store(error) => {
            tracing::error!(%error, "repository error");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
        ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    let mut response = error_response(status, code, error.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn respond<T: Serialize>(result: Result<T, ApiError>) -> HttpResponse {
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(error) => api_error(&error),
    }
}

/// Runs repository work on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => {
            tracing::error!(%error, "request task failed");
            Err(ApiError::Internal)
        }
    }
}

async fn handle(server: Arc<Server>, request: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let started = tollgate_core::clock::Stopwatch::start();
    let route_idx = route_index(request.uri().path());
    let response = route(&server, request).await;
    server.control_plane.metrics.request(route_idx, response.status().as_u16(), started.elapsed().as_secs_f64());
    Ok(response)
}

fn number_param<T: std::str::FromStr>(request: &Request<Incoming>, name: &str) -> Result<Option<T>, ApiError> {
    query_param(request, name)
        .map(|text| {
            text.parse::<T>().map_err(|_| ApiError::invalid(format!("query parameter `{name}` value `{text}` is not a whole number")))
        })
        .transpose()
}

/// Every route and the methods it takes, as `openapi.json` writes them; a `{name}` segment
/// matches any one segment. `tests/control_plane_openapi.rs` holds the document to this table.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["GET"]),
    ("/readyz", &["GET"]),
    ("/metrics", &["GET"]),
    ("/openapi.json", &["GET"]),
    ("/.well-known/jwks.json", &["GET"]),
    ("/v1/catalog", &["GET"]),
    ("/v1/orders", &["POST"]),
    ("/v1/audit", &["GET"]),
    ("/v1/snapshot", &["GET"]),
    ("/v1/accounts/{id}", &["GET"]),
    ("/v1/accounts/{id}/license-token", &["GET"]),
    ("/v1/accounts/{id}/users/{user}", &["PUT", "DELETE"]),
    ("/v1/accounts/{id}/groups/{group}", &["PUT"]),
    ("/v1/accounts/{id}/devices", &["POST"]),
    ("/v1/accounts/{id}/devices/{device}", &["DELETE"]),
    ("/v1/accounts/{id}/licenses/{license}/overrides", &["PUT"]),
    ("/v1/access-requests", &["GET", "POST"]),
    ("/v1/access-requests/{id}", &["GET"]),
    ("/v1/access-requests/{id}/approve", &["POST"]),
    ("/v1/access-requests/{id}/deny", &["POST"]),
    ("/v1/usage", &["POST"]),
    ("/v1/usage/export", &["GET"]),
    ("/v1/usage/sidecars", &["GET"]),
    ("/v1/accounts/{id}/usage", &["GET"]),
    ("/v1/analytics/features", &["GET"]),
    ("/v1/analytics/limits", &["GET"]),
    ("/v1/webhooks/deliveries", &["GET"]),
];

/// Routes answered without an API key: probes, metrics, the API description and the public
/// keys of license tokens.
const PUBLIC_ROUTES: &[&str] = &["/healthz", "/readyz", "/metrics", "/openapi.json", "/.well-known/jwks.json"];

/// The index in `ROUTES` of the route at `segments`; `None` for unknown paths.
fn matching_route(segments: &[&str]) -> Option<usize> {
    ROUTES.iter().position(|(pattern, _)| {
        let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
        parts.len() == segments.len()
            && parts.iter().zip(segments).all(|(part, segment)| if part.starts_with('{') { !segment.is_empty() } else { part == segment })
    })
}

/// The route of a raw path, for metrics (percent-decoding cannot change which pattern matches
/// except inside `{name}` segments, which match anything non-empty).
fn route_index(path: &str) -> Option<usize> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matching_route(&segments)
}

async fn route(server: &Server, request: Request<Incoming>) -> HttpResponse {
    let path = request.uri().path().to_string();
    let decoded: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|segment| percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let control_plane = &server.control_plane;
    // A route this listener does not serve is answered like a path that does not exist.
    let route_idx =
        matching_route(&segments).filter(|route_idx| ROUTES.get(*route_idx).is_some_and(|(pattern, _)| server.scope.serves(pattern)));
    let public = route_idx.and_then(|route_idx| ROUTES.get(route_idx)).is_some_and(|(pattern, _)| PUBLIC_ROUTES.contains(pattern));
    // Everything but the public routes needs a valid key first, so that an unauthenticated
    // caller learns nothing about which paths and methods exist.
    let caller = if public {
        None
    } else {
        let bearer = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(|value| value.trim().to_string());
        let Some(bearer) = bearer else { return api_error(&ApiError::Unauthorized) };
        let repository = Arc::clone(&control_plane.repository);
        match blocking(move || authenticate(repository.as_ref(), &bearer)).await {
            Ok(caller) => Some(caller),
            Err(error) => return api_error(&error),
        }
    };
    let Some(allowed) = route_idx.and_then(|route_idx| ROUTES.get(route_idx)).map(|(_, methods)| *methods) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", format!("no endpoint at `{path}`"));
    };
    let method = request.method().clone();
    if !allowed.contains(&method.as_str()) {
        let names: Vec<&str> = allowed.to_vec();
        let mut response =
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("`{path}` takes {}", names.join(" or ")));
        if let Ok(allow) = HeaderValue::from_str(&names.join(", ")) {
            response.headers_mut().insert(hyper::header::ALLOW, allow);
        }
        return response;
    }
    let Some(caller) = caller else {
        return match segments.as_slice() {
            ["healthz"] => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            // Ready once the first snapshot is signed and offered: a sidecar that subscribes
            // then gets one at once.
            ["readyz"] => match control_plane.publisher.latest() {
                Some(published) => json_response(StatusCode::OK, &serde_json::json!({"status": "ready", "revision": published.revision})),
                None => error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no snapshot has been published yet"),
            },
            ["metrics"] => {
                let mut response = Response::new(Full::new(Bytes::from(control_plane.metrics.render())));
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
                response
            }
            ["openapi.json"] => {
                let mut response = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
            _ => json_response(StatusCode::OK, &tokens::jwks(&control_plane.token_keys)),
        };
    };

    let owned: Vec<String> = decoded.clone();
    let account_of = |idx: usize| owned.get(idx).cloned().unwrap_or_default();
    match segments.as_slice() {
        ["v1", "catalog"] => json_response(StatusCode::OK, &super::catalog_json(&control_plane.catalog_data)),
        ["v1", "snapshot"] => snapshot(server, &caller, &request).await,
        ["v1", "audit"] => {
            let query = match audit_query(&request) {
                Ok(query) => query,
                Err(error) => return api_error(&error),
            };
            let cp = Arc::clone(control_plane);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration])?;
                    match &query.account {
                        Some(account) => caller.may_touch(account)?,
                        None => caller.require_unbound()?,
                    }
                    let entries = cp.repository.audit_log(&query)?;
                    Ok(serde_json::json!({"entries": entries}))
                })
                .await,
            )
        }
        ["v1", "orders"] => {
            let body = match read_body(request, control_plane.max_body).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let cp = Arc::clone(control_plane);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration])?;
                    changes::order(&cp, &caller, &body)
                })
                .await,
            )
        }
        ["v1", "accounts", _] => {
            let account = account_of(2);
            let cp = Arc::clone(control_plane);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                    caller.may_touch(&account)?;
                    let doc = cp
                        .repository
                        .account(&account)?
                        .ok_or_else(|| ApiError::not_found("unknown_account", format!("account `{account}` does not exist")))?;
                    Ok(serde_json::json!({"account": account, "revision": cp.repository.revision()?, "state": doc}))
                })
                .await,
            )
        }
        ["v1", "accounts", _, "license-token"] => {
            let account = account_of(2);
            let cp = Arc::clone(control_plane);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                    caller.may_touch(&account)?;
                    let now = tollgate_core::clock::system_now_ms().div_euclid(1000);
                    Ok(serde_json::json!({"token": cp.license_token(&account, now)?}))
                })
                .await,
            )
        }
        ["v1", "usage", ..] | ["v1", "accounts", _, "usage"] | ["v1", "analytics", _] | ["v1", "webhooks", _] => {
            usage_route(server, caller, &segments, request).await
        }
        _ => write_route(server, caller, &segments, request).await,
    }
}

fn unix_now() -> i64 {
    tollgate_core::clock::system_now_ms().div_euclid(1000)
}

fn time_param(request: &Request<Incoming>, name: &str) -> Result<Option<i64>, ApiError> {
    query_param(request, name)
        .map(|text| {
            tollgate_core::period::parse_rfc3339(&text)
                .ok_or_else(|| ApiError::invalid(format!("query parameter `{name}` value `{text}` is not an RFC 3339 timestamp")))
        })
        .transpose()
}

/// `from` and `to` of a report, each defaulting to the bounds of the current UTC month.
fn range_params(request: &Request<Incoming>, now: i64) -> Result<(i64, i64), ApiError> {
    let month = tollgate_core::model::Period::Month.window(now);
    let from = time_param(request, "from")?.unwrap_or(month.start);
    let to = time_param(request, "to")?.unwrap_or(month.reset_at.unwrap_or(i64::MAX));
    if from >= to {
        return Err(ApiError::invalid("query parameter `from` must be before `to`"));
    }
    Ok((from, to))
}

fn history_param(request: &Request<Incoming>) -> Result<reports::History, ApiError> {
    let history = number_param::<u32>(request, "history")?;
    let (from, to) = (time_param(request, "from")?, time_param(request, "to")?);
    match (history, from, to) {
        (None, None, None) => Ok(reports::History::Current),
        (Some(n), None, None) => Ok(reports::History::Earlier(n.min(MAX_HISTORY))),
        (None, Some(from), Some(to)) if from < to => Ok(reports::History::Range { from, to }),
        (None, Some(_), Some(_)) => Err(ApiError::invalid("query parameter `from` must be before `to`")),
        (None, _, _) => Err(ApiError::invalid("query parameters `from` and `to` go together")),
        (Some(_), _, _) => Err(ApiError::invalid("query parameter `history` cannot be combined with `from` and `to`")),
    }
}

fn export_query(request: &Request<Incoming>, now: i64) -> Result<reports::ExportQuery, ApiError> {
    let format = match query_param(request, "format").as_deref() {
        None | Some("json") => reports::Format::Json,
        Some("csv") => reports::Format::Csv,
        Some(other) => return Err(ApiError::invalid(format!("query parameter `format` value `{other}` is not `csv` or `json`"))),
    };
    let granularity = match query_param(request, "granularity").as_deref() {
        None | Some("periods") => reports::Granularity::Periods,
        Some("events") => reports::Granularity::Events,
        Some(other) => {
            return Err(ApiError::invalid(format!("query parameter `granularity` value `{other}` is not `periods` or `events`")));
        }
    };
    let (from, to) = range_params(request, now)?;
    Ok(reports::ExportQuery { format, granularity, from, to, account: query_param(request, "account") })
}

fn threshold_param(request: &Request<Incoming>) -> Result<f64, ApiError> {
    let Some(text) = query_param(request, "threshold") else { return Ok(0.8) };
    match text.parse::<f64>() {
        Ok(threshold) if threshold > 0.0 && threshold <= 10.0 => Ok(threshold),
        _ => Err(ApiError::invalid(format!("query parameter `threshold` value `{text}` must be a number in (0, 10]"))),
    }
}

/// Most earlier periods per meter in one usage answer.
const MAX_HISTORY: u32 = 1_000;

/// Usage ingestion, usage reads and exports, analytics and webhook deliveries.
async fn usage_route(server: &Server, caller: Caller, segments: &[&str], request: Request<Incoming>) -> HttpResponse {
    let control_plane = Arc::clone(&server.control_plane);
    let now = unix_now();
    match segments {
        ["v1", "usage"] => {
            let body = match read_body(request, control_plane.max_body).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            respond(
                blocking(move || {
                    caller.require(&[Scope::Sidecar, Scope::Admin])?;
                    caller.require_unbound()?;
                    ingest::ingest(&control_plane, &body, now)
                })
                .await,
            )
        }
        ["v1", "accounts", account, "usage"] => {
            let account = account.to_string();
            let history = history_param(&request);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                    caller.may_see(&account, || ApiError::not_found("unknown_account", format!("account `{account}` does not exist")))?;
                    reports::account_usage(&control_plane, &account, history?, now)
                })
                .await,
            )
        }
        ["v1", "usage", "export"] => {
            let query = export_query(&request, now);
            let exported = blocking(move || {
                caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                let mut query = query?;
                query.account = query.account.or_else(|| caller.account.clone());
                if let Some(account) = &query.account {
                    caller.may_touch(account)?;
                }
                reports::export(&control_plane, &query, now)
            })
            .await;
            match exported {
                Ok(export) => {
                    let mut response = Response::new(Full::new(Bytes::from(export.body)));
                    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(export.content_type));
                    response
                }
                Err(error) => api_error(&error),
            }
        }
        ["v1", "usage", "sidecars"] => respond(
            blocking(move || {
                caller.require(&[Scope::Admin])?;
                let sidecars = control_plane.repository.usage_sidecars()?;
                let sidecars: Vec<serde_json::Value> = sidecars
                    .into_iter()
                    .map(|record| {
                        serde_json::json!({
                            "sidecar": record.sidecar,
                            "first_batch_at": tollgate_core::period::format_rfc3339(record.first_batch_at),
                            "last_batch_at": tollgate_core::period::format_rfc3339(record.last_batch_at),
                            "batches": record.batches,
                            "events": record.events,
                        })
                    })
                    .collect();
                Ok(serde_json::json!({"sidecars": sidecars}))
            })
            .await,
        ),
        ["v1", "analytics", "features"] => {
            let range = range_params(&request, now);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration])?;
                    caller.require_unbound()?;
                    let (from, to) = range?;
                    reports::feature_analytics(&control_plane, from, to)
                })
                .await,
            )
        }
        ["v1", "analytics", "limits"] => {
            let threshold = threshold_param(&request);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin, Scope::Integration])?;
                    caller.require_unbound()?;
                    reports::limit_analytics(&control_plane, threshold?, now)
                })
                .await,
            )
        }
        _ => {
            let status = query_param(&request, "status");
            let after = number_param::<i64>(&request, "after");
            let limit = number_param::<u32>(&request, "limit");
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin])?;
                    let status = status
                        .map(|text| {
                            DeliveryStatus::parse(&text).ok_or_else(|| {
                                ApiError::invalid(format!("query parameter `status` value `{text}` is not pending, delivered or failed"))
                            })
                        })
                        .transpose()?;
                    let limit = limit?.unwrap_or(100).clamp(1, MAX_AUDIT);
                    let deliveries = control_plane.repository.deliveries(status, after?.unwrap_or(0), limit)?;
                    Ok(serde_json::json!({"deliveries": deliveries.iter().map(delivery_json).collect::<Vec<_>>()}))
                })
                .await,
            )
        }
    }
}

fn delivery_json(delivery: &Delivery) -> serde_json::Value {
    let format = tollgate_core::period::format_rfc3339;
    let pending = delivery.status == DeliveryStatus::Pending;
    serde_json::json!({
        "id": delivery.id,
        "status": delivery.status.as_str(),
        "account": delivery.account,
        "meter": delivery.meter,
        "period_start": format(delivery.period_start),
        "threshold": delivery.threshold,
        "attempts": delivery.attempts,
        "next_attempt_at": pending.then(|| format(delivery.next_attempt_ms.div_euclid(1000))),
        "last_error": delivery.last_error,
        "created_at": format(delivery.created_at),
        "delivered_at": delivery.delivered_at.map(format),
        "notification": serde_json::from_str::<serde_json::Value>(&delivery.body).unwrap_or(serde_json::Value::Null),
    })
}

/// Routes that change accounts or access requests.
async fn write_route(server: &Server, caller: Caller, segments: &[&str], request: Request<Incoming>) -> HttpResponse {
    let control_plane = Arc::clone(&server.control_plane);
    let owned: Vec<String> = segments.iter().map(|segment| segment.to_string()).collect();
    let part = move |idx: usize| owned.get(idx).cloned().unwrap_or_default();
    let method = request.method().clone();
    // Reads of access requests need no body.
    if method == Method::GET {
        let status = query_param(&request, "status");
        let account = query_param(&request, "account");
        let id = part(2);
        let listing = segments.len() == 2;
        return respond(
            blocking(move || {
                caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                if listing {
                    let account = account.or_else(|| caller.account.clone());
                    match &account {
                        Some(account) => caller.may_touch(account)?,
                        None => caller.require_unbound()?,
                    }
                    let requests = control_plane.repository.access_requests(account.as_deref(), status.as_deref())?;
                    return Ok(serde_json::json!({"access_requests": requests}));
                }
                let id: i64 = id.parse().map_err(|_| ApiError::not_found("unknown_access_request", format!("no access request `{id}`")))?;
                let unknown = || ApiError::not_found("unknown_access_request", format!("no access request `{id}`"));
                let found = control_plane.repository.access_request(id)?.ok_or_else(unknown)?;
                caller.may_see(&found.account, unknown)?;
                Ok(serde_json::to_value(found).unwrap_or_default())
            })
            .await,
        );
    }
    let body = if method == Method::DELETE {
        Bytes::new()
    } else {
        match read_body(request, control_plane.max_body).await {
            Ok(body) => body,
            Err(response) => return response,
        }
    };
    let shape: Vec<&str> = segments.iter().enumerate().map(|(idx, segment)| if matches!(idx, 2 | 4) { "_" } else { *segment }).collect();
    let shape = shape.join("/");
    respond(
        blocking(move || {
            let cp = control_plane.as_ref();
            let manage = [Scope::Admin, Scope::Integration];
            match (method, shape.as_str()) {
                (Method::PUT, "v1/accounts/_/users/_") => {
                    caller.require(&manage)?;
                    changes::put_user(cp, &caller, &part(2), &part(4), &body)
                }
                (Method::DELETE, "v1/accounts/_/users/_") => {
                    caller.require(&manage)?;
                    changes::delete_user(cp, &caller, &part(2), &part(4))
                }
                (Method::PUT, "v1/accounts/_/groups/_") => {
                    caller.require(&manage)?;
                    changes::put_group(cp, &caller, &part(2), &part(4), &body)
                }
                (Method::POST, "v1/accounts/_/devices") => {
                    caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                    changes::activate_device(cp, &caller, &part(2), &body)
                }
                (Method::DELETE, "v1/accounts/_/devices/_") => {
                    caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                    changes::deactivate_device(cp, &caller, &part(2), &part(4))
                }
                (Method::PUT, "v1/accounts/_/licenses/_/overrides") => {
                    caller.require(&manage)?;
                    changes::put_overrides(cp, &caller, &part(2), &part(4), &body)
                }
                (Method::POST, "v1/access-requests") => {
                    caller.require(&[Scope::Admin, Scope::Integration, Scope::Account])?;
                    changes::create_access_request(cp, &caller, &body).map(|request| serde_json::to_value(request).unwrap_or_default())
                }
                (Method::POST, "v1/access-requests/_/approve" | "v1/access-requests/_/deny") => {
                    caller.require(&[Scope::Admin])?;
                    let id = part(2);
                    let id: i64 =
                        id.parse().map_err(|_| ApiError::not_found("unknown_access_request", format!("no access request `{id}`")))?;
                    changes::decide_access_request(cp, &caller, id, part(3) == "approve", &body)
                }
                (_, shape) => Err(ApiError::not_found("not_found", format!("no endpoint at `/{shape}`"))),
            }
        })
        .await,
    )
}

fn audit_query(request: &Request<Incoming>) -> Result<AuditQuery, ApiError> {
    Ok(AuditQuery {
        account: query_param(request, "account"),
        after_seq: number_param(request, "after")?.unwrap_or(0),
        limit: number_param::<u32>(request, "limit")?.unwrap_or(100).clamp(1, MAX_AUDIT),
    })
}

/// `GET /v1/snapshot?after=REV&wait=SECONDS`: a signed snapshot newer than `after` at once,
/// or when one is published within the wait; otherwise 304 with the current revision.
async fn snapshot(server: &Server, caller: &Caller, request: &Request<Incoming>) -> HttpResponse {
    let checked = caller.require(&[Scope::Sidecar, Scope::Admin]).and_then(|()| caller.require_unbound());
    if let Err(error) = checked {
        return api_error(&error);
    }
    let after = match number_param::<u64>(request, AFTER_PARAM) {
        Ok(after) => after.unwrap_or(0),
        Err(error) => return api_error(&error),
    };
    let wait = match number_param::<u64>(request, WAIT_PARAM) {
        Ok(wait) => Duration::from_secs(wait.unwrap_or(DEFAULT_WAIT_SECS)).min(server.control_plane.max_wait),
        Err(error) => return api_error(&error),
    };
    let mut latest = server.control_plane.publisher.subscribe();
    let mut closing = server.closing.clone();
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let metrics = &server.control_plane.metrics;
    metrics.long_poll_started();
    // Decrements the gauge however the wait ends, including a client that hangs up.
    struct Waiting<'a>(&'a super::metrics::ControlPlaneMetrics);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.long_poll_ended();
        }
    }
    let _waiting = Waiting(metrics);
    loop {
        let current = latest.borrow_and_update().clone();
        // A sidecar ahead of the newest snapshot means this control plane went backwards (a
        // database restored from an old backup): say so rather than let it think it is current.
        if let Some(published) = current.as_ref().filter(|published| published.revision < after) {
            return error_response(
                StatusCode::CONFLICT,
                "revision_behind",
                format!("this control plane's newest revision {} is older than `after` {after}", published.revision),
            );
        }
        if let Some(published) = current.filter(|published| published.revision > after) {
            let mut response = Response::new(Full::new(published.bytes.clone()));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", published.revision)) {
                headers.insert(ETAG, etag);
            }
            headers.insert(REVISION_HEADER, HeaderValue::from(published.revision));
            return response;
        }
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { break },
            _ = closing.wait_for(|closing| *closing) => break,
            () = &mut deadline => break,
        }
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    let revision = server.control_plane.publisher.latest().map_or(0, |published| published.revision);
    response.headers_mut().insert(REVISION_HEADER, HeaderValue::from(revision));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{revision}\"")) {
        response.headers_mut().insert(ETAG, etag);
    }
    response
}
