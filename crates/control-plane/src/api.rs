//! The control plane's HTTP API (hyper): routing, API-key authentication and scopes, bodies,
//! the long-polled snapshot feed, tokens and the JWKS, usage ingestion, reports, analytics and
//! webhook deliveries; `/portal` and `/console` are handed to `portal`. Every database call runs on the
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

use super::integration_store::{EventQuery, EventStatus};
use super::store::{AccessStatus, AuditQuery, Scope};
use super::webhook_store::DeliveryStatus;
use super::{ApiError, Caller, ControlPlane, authenticate, changes, ingest, integrations, reports, tokens, webhooks};
use tollgate_http::{query_param, read_body};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

pub use tollgate_protocol::feed::REVISION_HEADER;
use tollgate_protocol::feed::{AFTER_PARAM, BASE_PARAM, BASE_REVISION_HEADER, FEED_CONTENT_TYPE, SNAPSHOT_PATH, USAGE_PATH, WAIT_PARAM};
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
    let header_timeout = server.control_plane.config().header_read_timeout;
    tollgate_http::connections(
        listener,
        move |request| handle(Arc::clone(&server), request),
        shutdown,
        on_close,
        drain_timeout,
        header_timeout,
    )
    .await;
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
    // One match per request. Metrics label by the pattern the path has, whether or not this
    // listener serves it, as they always have.
    let matched = matching(request.uri().path());
    // The portal and console pages are HTML behind cookies, not keyed JSON: they have their
    // own router, and are served wherever the API is (never on the sidecars' listener).
    if server.scope != Listener::Sync && super::portal::serves(request.uri().path()) {
        let response = super::portal::handle(Arc::clone(&server.control_plane), request).await;
        server.control_plane.metrics.request(None, response.status().as_u16(), started.elapsed().as_secs_f64());
        return Ok(response);
    }
    let response = route(&server, request, matched).await;
    let route_idx = matched.map(|matched| matched.route_idx);
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

/// A method a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn of(method: &Method) -> Option<Verb> {
        match *method {
            Method::GET => Some(Verb::Get),
            Method::POST => Some(Verb::Post),
            Method::PUT => Some(Verb::Put),
            Method::DELETE => Some(Verb::Delete),
            _ => None,
        }
    }
}

/// Endpoints answered without an API key: probes, metrics, the API description and the public
/// keys of license tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Public {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    Jwks,
}

/// Webhook receivers: no API key, each request authenticated by its sender's signature over
/// the raw body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signed {
    Stripe,
    HubSpot,
}

/// Endpoints that need a valid API key; each checks the key's scope and binding itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyed {
    Catalog,
    Order,
    Audit,
    Snapshot,
    Account,
    LicenseToken,
    PutUser,
    DeleteUser,
    PutGroup,
    ActivateDevice,
    DeactivateDevice,
    PutOverrides,
    ListAccessRequests,
    CreateAccessRequest,
    AccessRequest,
    ApproveAccessRequest,
    DenyAccessRequest,
    Usage(Usage),
    Keys,
    RevokeKey,
    PortalSession,
    IntegrationEvents,
    ReapplyIntegrationEvent,
    IntegrationLinks,
    PutIntegrationLink,
    DeleteIntegrationLink,
    Webhook(Webhook),
}

/// The webhook endpoints and the delivery log (admin keys only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Webhook {
    ListEndpoints,
    CreateEndpoint,
    Endpoint,
    UpdateEndpoint,
    DeleteEndpoint,
    RotateSecret,
    Deliveries,
    RetryDelivery,
}

/// The usage endpoints: ingestion, reads and exports, analytics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Ingest,
    Export,
    Sidecars,
    Account,
    FeatureAnalytics,
    LimitAnalytics,
}

/// What a route's methods lead to. A route is public or keyed as a whole, so whether a key is
/// needed is known from the path alone, before the method is looked at.
#[derive(Debug, Clone, Copy)]
enum Handlers {
    Public(&'static [(Verb, Public)]),
    Signed(&'static [(Verb, Signed)]),
    Keyed(&'static [(Verb, Keyed)]),
}

/// One entry of the route table: a path pattern and the endpoint of each method it takes.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// As `openapi.json` writes it; a `{name}` segment matches any one non-empty segment.
    pub pattern: &'static str,
    handlers: Handlers,
}

impl Route {
    /// The methods this route takes, in table order.
    pub fn methods(&self) -> Vec<&'static str> {
        match self.handlers {
            Handlers::Public(handlers) => handlers.iter().map(|(verb, _)| verb.as_str()).collect(),
            Handlers::Signed(handlers) => handlers.iter().map(|(verb, _)| verb.as_str()).collect(),
            Handlers::Keyed(handlers) => handlers.iter().map(|(verb, _)| verb.as_str()).collect(),
        }
    }

    /// Whether this route is answered without an API key (probes, or webhook receivers that
    /// check a signature instead).
    pub fn is_public(&self) -> bool {
        matches!(self.handlers, Handlers::Public(_) | Handlers::Signed(_))
    }

    /// Where the `{name}` segments are in `path` when it has this route's shape; `start` is
    /// the offset of `path` in the whole request path. Compares borrowed segments: nothing is
    /// allocated or decoded.
    fn matches(&self, path: &str, mut start: usize) -> Option<Spans> {
        let mut spans = Spans::default();
        let mut segments = path.split('/');
        for part in self.pattern.trim_start_matches('/').split('/') {
            let segment = segments.next()?;
            if part.starts_with('{') {
                if segment.is_empty() {
                    return None;
                }
                *spans.ranges.get_mut(spans.n_params)? = (start, start + segment.len());
                spans.n_params += 1;
            } else if part != segment {
                return None;
            }
            start += segment.len() + 1;
        }
        segments.next().is_none().then_some(spans)
    }
}

/// Most `{name}` segments in one pattern.
const MAX_PARAMS: usize = 2;

/// A path's route (an index in [`ROUTES`]) and where its `{name}` segments are.
#[derive(Debug, Clone, Copy)]
struct Match {
    route_idx: usize,
    spans: Spans,
}

/// Byte ranges of the `{name}` segments in the request path, percent-encoded as they came.
#[derive(Debug, Clone, Copy, Default)]
struct Spans {
    ranges: [(usize, usize); MAX_PARAMS],
    n_params: usize,
}

impl Spans {
    /// Percent-decodes the parameters of `path`, once the request is known to reach a handler,
    /// which takes them by value into its blocking work.
    fn decode(&self, path: &str) -> Params {
        let mut params = Params::default();
        for (decoded, (start, end)) in params.values.iter_mut().zip(self.ranges.iter().take(self.n_params)) {
            let raw = path.get(*start..*end).unwrap_or_default();
            *decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned();
        }
        params
    }
}

/// The decoded `{name}` segments of a matched path, in pattern order.
#[derive(Debug, Default)]
struct Params {
    values: [String; MAX_PARAMS],
}

impl Params {
    /// The parameter at `idx`, taken out (empty if the pattern has fewer).
    fn take(&mut self, idx: usize) -> String {
        self.values.get_mut(idx).map(std::mem::take).unwrap_or_default()
    }
}

const fn public_route(pattern: &'static str, handlers: &'static [(Verb, Public)]) -> Route {
    Route { pattern, handlers: Handlers::Public(handlers) }
}

const fn signed_route(pattern: &'static str, handlers: &'static [(Verb, Signed)]) -> Route {
    Route { pattern, handlers: Handlers::Signed(handlers) }
}

const fn keyed_route(pattern: &'static str, handlers: &'static [(Verb, Keyed)]) -> Route {
    Route { pattern, handlers: Handlers::Keyed(handlers) }
}

/// The route table: every path, its methods and their endpoints, as `openapi.json` documents
/// them (`tests/control_plane_openapi.rs` holds the document to this table); metrics label
/// requests by these patterns. Hand-written rather than a router crate (`matchit` and the like):
/// A few dozen static patterns matched segment by segment without allocating are as quick as a radix
/// tree here, this order of checks (the path's route, then the key, then 404 or 405) stays in
/// plain sight in [`route`], and the API needs no new dependency.
pub static ROUTES: &[Route] = &[
    public_route("/healthz", &[(Verb::Get, Public::Healthz)]),
    public_route("/readyz", &[(Verb::Get, Public::Readyz)]),
    public_route("/metrics", &[(Verb::Get, Public::Metrics)]),
    public_route("/openapi.json", &[(Verb::Get, Public::OpenApi)]),
    public_route("/.well-known/jwks.json", &[(Verb::Get, Public::Jwks)]),
    keyed_route("/v1/catalog", &[(Verb::Get, Keyed::Catalog)]),
    keyed_route("/v1/keys", &[(Verb::Get, Keyed::Keys)]),
    keyed_route("/v1/keys/{id}", &[(Verb::Delete, Keyed::RevokeKey)]),
    keyed_route("/v1/orders", &[(Verb::Post, Keyed::Order)]),
    keyed_route("/v1/audit", &[(Verb::Get, Keyed::Audit)]),
    keyed_route(SNAPSHOT_PATH, &[(Verb::Get, Keyed::Snapshot)]),
    keyed_route("/v1/accounts/{id}", &[(Verb::Get, Keyed::Account)]),
    keyed_route("/v1/accounts/{id}/license-token", &[(Verb::Get, Keyed::LicenseToken)]),
    keyed_route("/v1/accounts/{id}/users/{user}", &[(Verb::Put, Keyed::PutUser), (Verb::Delete, Keyed::DeleteUser)]),
    keyed_route("/v1/accounts/{id}/groups/{group}", &[(Verb::Put, Keyed::PutGroup)]),
    keyed_route("/v1/accounts/{id}/devices", &[(Verb::Post, Keyed::ActivateDevice)]),
    keyed_route("/v1/accounts/{id}/devices/{device}", &[(Verb::Delete, Keyed::DeactivateDevice)]),
    keyed_route("/v1/accounts/{id}/licenses/{license}/overrides", &[(Verb::Put, Keyed::PutOverrides)]),
    keyed_route("/v1/access-requests", &[(Verb::Get, Keyed::ListAccessRequests), (Verb::Post, Keyed::CreateAccessRequest)]),
    keyed_route("/v1/access-requests/{id}", &[(Verb::Get, Keyed::AccessRequest)]),
    keyed_route("/v1/access-requests/{id}/approve", &[(Verb::Post, Keyed::ApproveAccessRequest)]),
    keyed_route("/v1/access-requests/{id}/deny", &[(Verb::Post, Keyed::DenyAccessRequest)]),
    keyed_route("/v1/portal/sessions", &[(Verb::Post, Keyed::PortalSession)]),
    keyed_route(USAGE_PATH, &[(Verb::Post, Keyed::Usage(Usage::Ingest))]),
    keyed_route("/v1/usage/export", &[(Verb::Get, Keyed::Usage(Usage::Export))]),
    keyed_route("/v1/usage/sidecars", &[(Verb::Get, Keyed::Usage(Usage::Sidecars))]),
    keyed_route("/v1/accounts/{id}/usage", &[(Verb::Get, Keyed::Usage(Usage::Account))]),
    keyed_route("/v1/analytics/features", &[(Verb::Get, Keyed::Usage(Usage::FeatureAnalytics))]),
    keyed_route("/v1/analytics/limits", &[(Verb::Get, Keyed::Usage(Usage::LimitAnalytics))]),
    keyed_route(
        "/v1/webhooks/endpoints",
        &[(Verb::Get, Keyed::Webhook(Webhook::ListEndpoints)), (Verb::Post, Keyed::Webhook(Webhook::CreateEndpoint))],
    ),
    keyed_route(
        "/v1/webhooks/endpoints/{id}",
        &[
            (Verb::Get, Keyed::Webhook(Webhook::Endpoint)),
            (Verb::Put, Keyed::Webhook(Webhook::UpdateEndpoint)),
            (Verb::Delete, Keyed::Webhook(Webhook::DeleteEndpoint)),
        ],
    ),
    keyed_route("/v1/webhooks/endpoints/{id}/rotate-secret", &[(Verb::Post, Keyed::Webhook(Webhook::RotateSecret))]),
    keyed_route("/v1/webhooks/deliveries", &[(Verb::Get, Keyed::Webhook(Webhook::Deliveries))]),
    keyed_route("/v1/webhooks/deliveries/{id}/retry", &[(Verb::Post, Keyed::Webhook(Webhook::RetryDelivery))]),
    signed_route("/v1/integrations/stripe", &[(Verb::Post, Signed::Stripe)]),
    signed_route("/v1/integrations/hubspot", &[(Verb::Post, Signed::HubSpot)]),
    keyed_route("/v1/integrations/events", &[(Verb::Get, Keyed::IntegrationEvents)]),
    keyed_route("/v1/integrations/events/{seq}/apply", &[(Verb::Post, Keyed::ReapplyIntegrationEvent)]),
    keyed_route("/v1/integrations/links", &[(Verb::Get, Keyed::IntegrationLinks)]),
    keyed_route(
        "/v1/integrations/links/{source}/{external_id}",
        &[(Verb::Put, Keyed::PutIntegrationLink), (Verb::Delete, Keyed::DeleteIntegrationLink)],
    ),
];

/// The route of a raw path and its raw parameters; `None` for unknown paths. Literal segments
/// are compared as sent (a percent-encoded letter does not spell a route).
fn matching(path: &str) -> Option<Match> {
    let trimmed = path.trim_start_matches('/');
    let start = path.len() - trimmed.len();
    ROUTES.iter().enumerate().find_map(|(route_idx, route)| route.matches(trimmed, start).map(|spans| Match { route_idx, spans }))
}

/// The endpoint of `method` among `handlers`.
fn endpoint<E: Copy>(handlers: &[(Verb, E)], method: &Method) -> Option<E> {
    let verb = Verb::of(method)?;
    handlers.iter().find(|(candidate, _)| *candidate == verb).map(|(_, endpoint)| *endpoint)
}

fn method_not_allowed(path: &str, route: &Route) -> HttpResponse {
    let names = route.methods();
    let mut response =
        error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("`{path}` takes {}", names.join(" or ")));
    if let Ok(allow) = HeaderValue::from_str(&names.join(", ")) {
        response.headers_mut().insert(hyper::header::ALLOW, allow);
    }
    response
}

/// The caller of a request's `Authorization: Bearer KEY`.
async fn caller_of(control_plane: &ControlPlane, request: &Request<Incoming>) -> Result<Caller, ApiError> {
    let bearer = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(|value| value.trim().to_string())
        .ok_or(ApiError::Unauthorized)?;
    let repository = Arc::clone(&control_plane.repository);
    blocking(move || authenticate(repository.as_ref(), &bearer)).await
}

async fn route(server: &Server, request: Request<Incoming>, matched: Option<Match>) -> HttpResponse {
    // A route this listener does not serve is answered like a path that does not exist.
    let matched = matched
        .and_then(|matched| ROUTES.get(matched.route_idx).map(|route| (route, matched.spans)))
        .filter(|(route, _)| server.scope.serves(route.pattern));
    let keyed = match matched {
        Some((route, spans)) => match route.handlers {
            Handlers::Public(handlers) => {
                return match endpoint(handlers, request.method()) {
                    Some(public) => public_endpoint(server, public),
                    None => method_not_allowed(request.uri().path(), route),
                };
            }
            Handlers::Signed(handlers) => {
                return match endpoint(handlers, request.method()) {
                    Some(signed) => signed_endpoint(server, signed, request).await,
                    None => method_not_allowed(request.uri().path(), route),
                };
            }
            Handlers::Keyed(handlers) => Some((route, handlers, spans)),
        },
        None => None,
    };
    // Everything but the public routes needs a valid key first, so that an unauthenticated
    // caller learns nothing about which paths and methods exist.
    let caller = match caller_of(&server.control_plane, &request).await {
        Ok(caller) => caller,
        Err(error) => return api_error(&error),
    };
    let Some((route, handlers, spans)) = keyed else {
        return error_response(StatusCode::NOT_FOUND, "not_found", format!("no endpoint at `{}`", request.uri().path()));
    };
    match endpoint(handlers, request.method()) {
        Some(keyed) => {
            let params = spans.decode(request.uri().path());
            keyed_endpoint(server, keyed, caller, params, request).await
        }
        None => method_not_allowed(request.uri().path(), route),
    }
}

fn public_endpoint(server: &Server, public: Public) -> HttpResponse {
    let control_plane = &server.control_plane;
    match public {
        Public::Healthz => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        // Ready once the first snapshot is signed and offered: a sidecar that subscribes then
        // gets one at once.
        Public::Readyz => match control_plane.publisher.latest() {
            Some(published) => json_response(StatusCode::OK, &serde_json::json!({"status": "ready", "revision": published.revision})),
            None => error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no snapshot has been published yet"),
        },
        Public::Metrics => {
            let mut response = Response::new(Full::new(Bytes::from(control_plane.metrics.render())));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            response
        }
        Public::OpenApi => {
            let mut response = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Public::Jwks => json_response(StatusCode::OK, &tokens::jwks(&control_plane.token_keys)),
    }
}

/// A webhook receiver: the raw body and the signature headers go to the integration, which
/// verifies before it parses.
async fn signed_endpoint(server: &Server, signed: Signed, request: Request<Incoming>) -> HttpResponse {
    let cp = Arc::clone(&server.control_plane);
    let header = |name: &str| request.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_string);
    match signed {
        Signed::Stripe => {
            let signature = header("stripe-signature");
            with_body(cp.config().body_limits(), request, move |body| integrations::stripe::receive(&cp, signature.as_deref(), &body)).await
        }
        Signed::HubSpot => {
            let (signature, timestamp, host) = (header("x-hubspot-signature-v3"), header("x-hubspot-request-timestamp"), header("host"));
            let path_and_query = request.uri().path_and_query().map_or_else(|| request.uri().path().to_string(), ToString::to_string);
            with_body(cp.config().body_limits(), request, move |body| {
                integrations::hubspot::receive(&cp, host.as_deref(), &path_and_query, signature.as_deref(), timestamp.as_deref(), &body)
            })
            .await
        }
    }
}

/// Reads the body (its errors are answered as they are), then runs `work` on it on the
/// blocking pool. The body is read before the key's scope is checked, as it always was.
async fn with_body<T: Serialize + Send + 'static>(
    limits: tollgate_http::BodyLimits,
    request: Request<Incoming>,
    work: impl FnOnce(Bytes) -> Result<T, ApiError> + Send + 'static,
) -> HttpResponse {
    match read_body(request, limits).await {
        Ok(body) => respond(blocking(move || work(body)).await),
        Err(response) => response,
    }
}

/// Scopes that manage accounts.
const MANAGE: &[Scope] = &[Scope::Admin, Scope::Integration];
/// Scopes that read an account (a customer's own key included).
const READ: &[Scope] = &[Scope::Admin, Scope::Integration, Scope::Account];

fn access_request_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("unknown_access_request", format!("no access request `{id}`")))
}

/// The endpoints behind a key. `caller` is authenticated; each arm checks its scope.
async fn keyed_endpoint(server: &Server, keyed: Keyed, caller: Caller, mut params: Params, request: Request<Incoming>) -> HttpResponse {
    let cp = Arc::clone(&server.control_plane);
    match keyed {
        Keyed::Catalog => json_response(StatusCode::OK, &super::catalog_json(&cp.catalog_data)),
        Keyed::Keys => respond(
            blocking(move || {
                caller.require(&[Scope::Admin])?;
                Ok(serde_json::json!({"keys": cp.repository.keys()?}))
            })
            .await,
        ),
        Keyed::RevokeKey => {
            let id = params.take(0);
            respond(
                blocking(move || {
                    caller.require(&[Scope::Admin])?;
                    if !cp.repository.revoke_key(&id, &caller.key_id, cp.now())? {
                        return Err(ApiError::not_found("unknown_key", format!("no live API key `{id}`")));
                    }
                    Ok(serde_json::json!({"id": id, "revoked": true}))
                })
                .await,
            )
        }
        Keyed::Snapshot => snapshot(server, &caller, &request).await,
        Keyed::Audit => {
            let query = match audit_query(&request) {
                Ok(query) => query,
                Err(error) => return api_error(&error),
            };
            respond(
                blocking(move || {
                    caller.require(MANAGE)?;
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
        Keyed::Order => {
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(MANAGE)?;
                changes::order(&cp, &caller, &body)
            })
            .await
        }
        Keyed::Account => {
            let account = params.take(0);
            respond(
                blocking(move || {
                    caller.require(READ)?;
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
        Keyed::LicenseToken => {
            let account = params.take(0);
            respond(
                blocking(move || {
                    caller.require(READ)?;
                    caller.may_touch(&account)?;
                    Ok(serde_json::json!({"token": cp.license_token(&account, cp.now())?}))
                })
                .await,
            )
        }
        Keyed::PutUser => {
            let (account, user) = (params.take(0), params.take(1));
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(MANAGE)?;
                changes::put_user(&cp, &caller, &account, &user, &body)
            })
            .await
        }
        Keyed::DeleteUser => {
            let (account, user) = (params.take(0), params.take(1));
            respond(
                blocking(move || {
                    caller.require(MANAGE)?;
                    changes::delete_user(&cp, &caller, &account, &user)
                })
                .await,
            )
        }
        Keyed::PutGroup => {
            let (account, group) = (params.take(0), params.take(1));
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(MANAGE)?;
                changes::put_group(&cp, &caller, &account, &group, &body)
            })
            .await
        }
        Keyed::ActivateDevice => {
            let account = params.take(0);
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(READ)?;
                changes::activate_device(&cp, &caller, &account, &body)
            })
            .await
        }
        Keyed::DeactivateDevice => {
            let (account, device) = (params.take(0), params.take(1));
            respond(
                blocking(move || {
                    caller.require(READ)?;
                    changes::deactivate_device(&cp, &caller, &account, &device)
                })
                .await,
            )
        }
        Keyed::PutOverrides => {
            let (account, license) = (params.take(0), params.take(1));
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(MANAGE)?;
                changes::put_overrides(&cp, &caller, &account, &license, &body)
            })
            .await
        }
        Keyed::ListAccessRequests => {
            let status = query_param(&request, "status");
            let account = query_param(&request, "account");
            respond(
                blocking(move || {
                    caller.require(READ)?;
                    let account = account.or_else(|| caller.account.clone());
                    match &account {
                        Some(account) => caller.may_touch(account)?,
                        None => caller.require_unbound()?,
                    }
                    // A status no request can have matches none, as it always has.
                    let requests = match status.as_deref().map(AccessStatus::parse) {
                        Some(None) => Vec::new(),
                        parsed => cp.repository.access_requests(account.as_deref(), parsed.flatten())?,
                    };
                    Ok(serde_json::json!({"access_requests": requests}))
                })
                .await,
            )
        }
        Keyed::AccessRequest => {
            let id = params.take(0);
            respond(
                blocking(move || {
                    caller.require(READ)?;
                    let id = access_request_id(&id)?;
                    let unknown = || ApiError::not_found("unknown_access_request", format!("no access request `{id}`"));
                    let found = cp.repository.access_request(id)?.ok_or_else(unknown)?;
                    caller.may_see(&found.account, unknown)?;
                    Ok(found)
                })
                .await,
            )
        }
        Keyed::CreateAccessRequest => {
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(READ)?;
                changes::create_access_request(&cp, &caller, &body)
            })
            .await
        }
        Keyed::PortalSession => {
            let host = request.headers().get(hyper::header::HOST).and_then(|value| value.to_str().ok()).map(str::to_string);
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(MANAGE)?;
                super::portal::create_link(&cp, &caller, host.as_deref(), &body)
            })
            .await
        }
        Keyed::IntegrationEvents => {
            let query = match integration_event_query(&request) {
                Ok(query) => query,
                Err(error) => return api_error(&error),
            };
            respond(
                blocking(move || {
                    caller.require(MANAGE)?;
                    caller.require_unbound()?;
                    let events = cp.repository.integration_events(&query)?;
                    let next_after = events.last().map(|event| event.seq);
                    Ok(serde_json::json!({"events": events, "next_after": next_after}))
                })
                .await,
            )
        }
        Keyed::ReapplyIntegrationEvent => {
            let seq = params.take(0);
            respond(
                blocking(move || {
                    caller.require(MANAGE)?;
                    let seq = seq.parse().map_err(|_| ApiError::not_found("unknown_event", format!("no integration event `{seq}`")))?;
                    integrations::reapply(&cp, &caller, seq)
                })
                .await,
            )
        }
        Keyed::IntegrationLinks => {
            let (source, account) = (query_param(&request, "source"), query_param(&request, "account"));
            respond(
                blocking(move || {
                    caller.require(MANAGE)?;
                    let account = account.or_else(|| caller.account.clone());
                    match &account {
                        Some(account) => caller.may_touch(account)?,
                        None => caller.require_unbound()?,
                    }
                    let links = cp.repository.integration_links(source.as_deref(), account.as_deref())?;
                    Ok(serde_json::json!({"links": links}))
                })
                .await,
            )
        }
        Keyed::PutIntegrationLink => {
            let (source, external_id) = (params.take(0), params.take(1));
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(MANAGE)?;
                integrations::put_link(&cp, &caller, &source, &external_id, &body)
            })
            .await
        }
        Keyed::DeleteIntegrationLink => {
            let (source, external_id) = (params.take(0), params.take(1));
            respond(
                blocking(move || {
                    caller.require(MANAGE)?;
                    integrations::delete_link(&cp, &caller, &source, &external_id)
                })
                .await,
            )
        }
        Keyed::ApproveAccessRequest | Keyed::DenyAccessRequest => {
            let id = params.take(0);
            let approve = keyed == Keyed::ApproveAccessRequest;
            with_body(cp.config().body_limits(), request, move |body| {
                caller.require(&[Scope::Admin])?;
                changes::decide_access_request(&cp, &caller, access_request_id(&id)?, approve, &body)
            })
            .await
        }
        Keyed::Usage(usage) => usage_endpoint(cp, usage, caller, params, request).await,
        Keyed::Webhook(webhook) => webhook_endpoint(cp, webhook, caller, params, request).await,
    }
}

/// Webhook endpoints and deliveries; each handler checks for an admin key.
async fn webhook_endpoint(
    control_plane: Arc<ControlPlane>,
    webhook: Webhook,
    caller: Caller,
    mut params: Params,
    request: Request<Incoming>,
) -> HttpResponse {
    let cp = control_plane;
    let max_body = cp.config().body_limits();
    match webhook {
        Webhook::ListEndpoints => respond(blocking(move || webhooks::list_endpoints(&cp, &caller)).await),
        Webhook::CreateEndpoint => with_body(max_body, request, move |body| webhooks::create_endpoint(&cp, &caller, &body)).await,
        Webhook::Endpoint => {
            let id = params.take(0);
            respond(blocking(move || webhooks::get_endpoint(&cp, &caller, &id)).await)
        }
        Webhook::UpdateEndpoint => {
            let id = params.take(0);
            with_body(max_body, request, move |body| webhooks::update_endpoint(&cp, &caller, &id, &body)).await
        }
        Webhook::DeleteEndpoint => {
            let id = params.take(0);
            respond(blocking(move || webhooks::delete_endpoint(&cp, &caller, &id)).await)
        }
        Webhook::RotateSecret => {
            let id = params.take(0);
            with_body(max_body, request, move |body| webhooks::rotate_secret(&cp, &caller, &id, &body)).await
        }
        Webhook::RetryDelivery => {
            let id = params.take(0);
            respond(blocking(move || webhooks::retry_delivery(&cp, &caller, &id)).await)
        }
        Webhook::Deliveries => {
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
                    let deliveries = cp.repository.deliveries(status, after?.unwrap_or(0), limit)?;
                    Ok(serde_json::json!({"deliveries": deliveries.iter().map(webhooks::delivery_json).collect::<Vec<_>>()}))
                })
                .await,
            )
        }
    }
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
async fn usage_endpoint(
    control_plane: Arc<ControlPlane>,
    usage: Usage,
    caller: Caller,
    mut params: Params,
    request: Request<Incoming>,
) -> HttpResponse {
    let now = control_plane.now();
    match usage {
        Usage::Ingest => {
            with_body(control_plane.config().body_limits(), request, move |body| {
                caller.require(&[Scope::Sidecar, Scope::Admin])?;
                caller.require_unbound()?;
                ingest::ingest(&control_plane, &body, now)
            })
            .await
        }
        Usage::Account => {
            let account = params.take(0);
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
        Usage::Export => {
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
        Usage::Sidecars => respond(
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
        Usage::FeatureAnalytics => {
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
        Usage::LimitAnalytics => {
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
    }
}

fn audit_query(request: &Request<Incoming>) -> Result<AuditQuery, ApiError> {
    Ok(AuditQuery {
        account: query_param(request, "account"),
        after_seq: number_param(request, "after")?.unwrap_or(0),
        limit: number_param::<u32>(request, "limit")?.unwrap_or(100).clamp(1, MAX_AUDIT),
    })
}

/// `GET /v1/snapshot?after=REV&base=BASE&wait=SECONDS`: what brings a sidecar serving `after`
/// on base `base` to the newest revision (the deltas after `after` when `base` is the current
/// base, else the current base and the deltas on it), at once or when it is published within
/// the wait; otherwise 304 with the current revision.
async fn snapshot(server: &Server, caller: &Caller, request: &Request<Incoming>) -> HttpResponse {
    let checked = caller.require(&[Scope::Sidecar, Scope::Admin]).and_then(|()| caller.require_unbound());
    if let Err(error) = checked {
        return api_error(&error);
    }
    let after = match number_param::<u64>(request, AFTER_PARAM) {
        Ok(after) => after.unwrap_or(0),
        Err(error) => return api_error(&error),
    };
    let base = match number_param::<u64>(request, BASE_PARAM) {
        Ok(base) => base,
        Err(error) => return api_error(&error),
    };
    let wait = match number_param::<u64>(request, WAIT_PARAM) {
        Ok(wait) => Duration::from_secs(wait.unwrap_or(DEFAULT_WAIT_SECS)).min(server.control_plane.config().max_wait),
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
        if let Some(published) = current.filter(|published| published.is_news_for(after, base)) {
            let mut response = Response::new(Full::new(published.answer_for(after, base)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(FEED_CONTENT_TYPE));
            headers.insert(BASE_REVISION_HEADER, HeaderValue::from(published.base.revision));
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

/// `GET /v1/integrations/events` filters: `source`, `status`, `after` (a `seq`), `limit`.
fn integration_event_query(request: &Request<Incoming>) -> Result<EventQuery, ApiError> {
    let status = query_param(request, "status")
        .map(|status| {
            EventStatus::parse(&status).ok_or_else(|| {
                ApiError::invalid(format!("query parameter `status` value `{status}` is not one of {}", EventStatus::NAMES.join(", ")))
            })
        })
        .transpose()?;
    let source = query_param(request, "source")
        .map(|source| {
            integrations::System::parse(&source).map(|system| system.as_str().to_string()).ok_or_else(|| {
                ApiError::invalid(format!(
                    "query parameter `source` value `{source}` is not one of {}",
                    integrations::System::NAMES.join(", ")
                ))
            })
        })
        .transpose()?;
    let after_seq = number_param::<i64>(request, "after")?.unwrap_or(0);
    let limit = number_param::<u32>(request, "limit")?.unwrap_or(100).clamp(1, 1000);
    Ok(EventQuery { source, status, after_seq, limit })
}
