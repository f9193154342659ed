//! The localhost sidecar: an HTTP/1.1 and h2c server (hyper) over the snapshot store, the
//! usage store and the metrics. It parses and answers; every decision comes from
//! `engine::decide` over one loaded snapshot. Shutdown stops accepting, drains in-flight
//! requests with a grace timeout, then returns.

pub mod app;
pub mod background;
pub mod config;
pub mod container;
pub mod ofrep;
pub mod protocols;
pub mod route_path;
pub mod ship;
pub mod source;
pub mod store;
pub mod subscribe;
pub mod telemetry;
pub mod usage;
pub mod usage_log;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::config::MeteringSettings;
use crate::ship::Shipping;
use crate::telemetry::{MeterResult, Metrics, Route};
use crate::usage::{DecisionTally, MeterEvent, MeterOutcome, Recorded, UsageStore};
use crate::usage_log::UsageLog;
use store::SnapshotStore;
use tollgate_core::clock::{Clock, Stopwatch};
use tollgate_core::engine::View;
use tollgate_core::engine::{Decision, decide};
use tollgate_http::{query_param, read_body};
use tollgate_protocol::usage::rules;
use tollgate_protocol::{BatchBody, BatchJson, CheckBody, DecisionJson, MeterBody, MeterJson, json_error};
use tollgate_snapshot::{ServingView, TrustedKeys};

/// Largest request body accepted by default (1 MiB): room for a batch of about ten
/// thousand checks.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Most checks in one batch.
pub const MAX_BATCH: usize = 10_000;

/// Everything a request handler needs, shared by all connections. Built only by
/// [`app::App::build`] from a [`config::Config`].
pub struct Sidecar {
    pub(crate) store: Arc<SnapshotStore>,
    pub(crate) usage: UsageStore,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) trusted: Arc<TrustedKeys>,
    pub(crate) source: String,
    /// Largest request body and how long it may take to arrive.
    pub(crate) body: tollgate_http::BodyLimits,
    /// How long a client may take to send a request head.
    pub(crate) header_read_timeout: Duration,
    /// Permits for heavy requests (large or unsized bodies) at a time (`--max-heavy-requests`).
    pub(crate) heavy: Arc<tokio::sync::Semaphore>,
    pub(crate) max_heavy: usize,
    /// Where apps reach this sidecar, for discovery documents (`--public-url`).
    pub(crate) public_url: String,
    /// Where `/ext_authz` reads identity and feature from.
    pub(crate) ext_authz: protocols::ExtAuthzHeaders,
    /// Where metered usage goes.
    pub(crate) metering: Metering,
    pub(crate) settings: MeteringSettings,
}

/// Where metered usage goes: the three ways a sidecar meters, as one value, so that a usage
/// log, a shipper and a decision tally cannot disagree about which of them exist.
pub enum Metering {
    /// No data directory: counts live in memory and are lost on restart.
    InMemory,
    /// A data directory: an event is acknowledged once it is synced to the usage log.
    Durable { log: Arc<UsageLog> },
    /// A data directory and a control plane: the log's events and the per-feature decision
    /// tally are shipped, and global usage comes back.
    Shipped { log: Arc<UsageLog>, shipping: Arc<Shipping>, tally: DecisionTally },
}

impl Metering {
    pub fn log(&self) -> Option<&Arc<UsageLog>> {
        match self {
            Metering::InMemory => None,
            Metering::Durable { log } | Metering::Shipped { log, .. } => Some(log),
        }
    }

    pub fn shipping(&self) -> Option<&Arc<Shipping>> {
        match self {
            Metering::Shipped { shipping, .. } => Some(shipping),
            _ => None,
        }
    }

    pub fn tally(&self) -> Option<&DecisionTally> {
        match self {
            Metering::Shipped { tally, .. } => Some(tally),
            _ => None,
        }
    }
}

/// Clock skew tolerated for an event `timestamp` in the future, in seconds.
const FUTURE_SKEW_SECS: i64 = 300;

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar").field("source", &self.source).finish()
    }
}

impl Sidecar {
    /// The clock every answer reads time from (the store's).
    pub fn clock(&self) -> &Arc<dyn Clock> {
        self.store.clock()
    }

    pub(crate) fn new(
        metrics: Arc<Metrics>,
        trusted: Arc<TrustedKeys>,
        source: String,
        clock: Arc<dyn Clock>,
        usage: UsageStore,
        config: &config::Config,
        metering: Metering,
    ) -> Sidecar {
        Sidecar {
            store: Arc::new(SnapshotStore::new(Arc::clone(&metrics), clock)),
            usage,
            metrics,
            trusted,
            source,
            body: tollgate_http::BodyLimits { max_bytes: config.max_body, timeout: config.body_read_timeout },
            header_read_timeout: config.header_read_timeout,
            public_url: config.public_url(),
            heavy: Arc::new(tokio::sync::Semaphore::new(config.max_heavy_requests)),
            max_heavy: config.max_heavy_requests,
            ext_authz: config.ext_authz.clone(),
            metering,
            settings: config.metering,
        }
    }

    /// The serving snapshot and its freshness.
    pub fn store(&self) -> &Arc<SnapshotStore> {
        &self.store
    }

    /// Metered usage and event ids.
    pub fn usage(&self) -> &UsageStore {
        &self.usage
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn metering(&self) -> &Metering {
        &self.metering
    }

    /// Periodic upkeep: drains metrics buffers and forgets event ids older than the dedupe
    /// window, on the sidecar's clock.
    pub fn housekeep(&self) {
        self.metrics.upkeep();
        let cutoff = self.clock().now().saturating_sub(self.settings.dedupe_window_secs);
        let pruned = self.usage.prune_events(cutoff);
        if pruned > 0 {
            tracing::debug!(pruned, "forgot metering event ids past the dedupe window");
        }
    }
}

/// Serves `sidecar` on `listener` until `shutdown` resolves, then drains open connections
/// for at most `drain_timeout`.
pub async fn serve(listener: TcpListener, sidecar: Arc<Sidecar>, shutdown: impl Future<Output = ()>, drain_timeout: Duration) {
    serve_scoped(listener, sidecar, Scope::Api, shutdown, drain_timeout).await;
}

/// Serves only `/metrics`, `/healthz` and `/readyz`: a listener on the pod address for
/// Prometheus and the kubelet, while the decision API stays on loopback.
pub async fn serve_metrics(listener: TcpListener, sidecar: Arc<Sidecar>, shutdown: impl Future<Output = ()>, drain_timeout: Duration) {
    serve_scoped(listener, sidecar, Scope::MetricsOnly, shutdown, drain_timeout).await;
}

/// Which endpoints a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Api,
    MetricsOnly,
}

async fn serve_scoped(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    scope: Scope,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let header_timeout = sidecar.header_read_timeout;
    let handler = move |request| handle(Arc::clone(&sidecar), scope, request);
    tollgate_http::connections(listener, handler, shutdown, || {}, drain_timeout, header_timeout).await;
}

pub use tollgate_http::HttpResponse;
use tollgate_http::{error_response, json_response, json_response_sized};

fn not_ready() -> HttpResponse {
    error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no valid snapshot is loaded yet")
}

/// Unix seconds on the sidecar's clock.
fn unix_now(sidecar: &Sidecar) -> i64 {
    sidecar.clock().now()
}

fn unix_now_ms(sidecar: &Sidecar) -> i64 {
    sidecar.clock().now_ms()
}

async fn handle(sidecar: Arc<Sidecar>, scope: Scope, request: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let started = Stopwatch::start();
    let path = request.uri().path();
    let (route, response) = if scope == Scope::MetricsOnly && !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        let message = format!("`{path}` is not served on the metrics listener");
        (Route::NotFound, error_response(StatusCode::NOT_FOUND, "not_found", message))
    } else {
        route(&sidecar, request).await
    };
    sidecar.metrics.request(route, started.elapsed().as_secs_f64());
    Ok(response)
}

/// Bodies from this size on (or of unknown size) are heavy: read under a permit and decided on
/// the blocking pool, so that large batches neither hold the async workers light requests need
/// nor pile up in memory past `--max-heavy-requests` at a time.
const HEAVY_BODY: u64 = 64 * 1024;

/// Reads a POST body and runs `work` on it: inline for small bodies; for heavy ones under one of
/// the sidecar's heavy-request permits (503 with `Retry-After` when none is free) and on the
/// blocking pool.
async fn with_body(
    sidecar: &Arc<Sidecar>,
    request: Request<Incoming>,
    work: impl FnOnce(&Sidecar, &[u8]) -> HttpResponse + Send + 'static,
) -> HttpResponse {
    let declared = request.headers().get(hyper::header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|declared| declared < HEAVY_BODY) {
        return match read_body(request, sidecar.body).await {
            Ok(body) => work(sidecar, &body),
            Err(response) => response,
        };
    }
    let Ok(permit) = Arc::clone(&sidecar.heavy).try_acquire_owned() else {
        sidecar.metrics.heavy_refused();
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{} large requests are being served; retry shortly (see --max-heavy-requests)", sidecar.max_heavy),
        );
        response.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let body = match read_body(request, sidecar.body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let sidecar = Arc::clone(sidecar);
    let answered = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work(&sidecar, &body)
    })
    .await;
    answered.unwrap_or_else(|error| {
        tracing::error!(%error, "a heavy request failed");
        error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request could not be completed")
    })
}

async fn route(sidecar: &Arc<Sidecar>, request: Request<Incoming>) -> (Route, HttpResponse) {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    // AuthZEN 1.0: a PDP answers with the request identifier the PEP sent.
    let request_id = request.headers().get("x-request-id").cloned();
    if path == "/ext_authz" || path.starts_with("/ext_authz/") {
        return (Route::ExtAuthz, protocols::ext_authz(sidecar, &request));
    }
    if path.starts_with(ofrep::PREFIX) {
        return (Route::Ofrep, ofrep::handle(sidecar, request).await);
    }
    let expected = match path.as_str() {
        "/v1/check" | "/v1/check/batch" | "/v1/meter" | "/access/v1/evaluation" | "/access/v1/evaluations" => Method::POST,
        "/v1/status" | "/healthz" | "/readyz" | "/metrics" | "/.well-known/authzen-configuration" => Method::GET,
        _ if path.starts_with("/v1/entitlements/") => Method::GET,
        _ => return (Route::NotFound, error_response(StatusCode::NOT_FOUND, "not_found", format!("no endpoint at `{path}`"))),
    };
    let route = match path.as_str() {
        "/v1/check" => Route::Check,
        "/v1/check/batch" => Route::CheckBatch,
        "/v1/meter" => Route::Meter,
        "/access/v1/evaluation" | "/access/v1/evaluations" | "/.well-known/authzen-configuration" => Route::AuthZen,
        "/v1/status" => Route::Status,
        "/metrics" => Route::Metrics,
        "/healthz" | "/readyz" => Route::Probe,
        _ => Route::Entitlements,
    };
    if method != expected && !(expected == Method::GET && method == Method::HEAD) {
        let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("`{path}` takes {expected}"));
        if let Ok(allow) = HeaderValue::from_str(expected.as_str()) {
            response.headers_mut().insert(hyper::header::ALLOW, allow);
        }
        return (route, response);
    }
    let response = match route {
        Route::Meter => match read_body(request, sidecar.body).await {
            Ok(body) => meter(sidecar, &body).await,
            Err(response) => response,
        },
        Route::Check => with_body(sidecar, request, check).await,
        Route::CheckBatch => with_body(sidecar, request, check_batch).await,
        Route::AuthZen if expected == Method::POST => {
            let path = path.clone();
            with_body(sidecar, request, move |sidecar, body| protocols::authzen(sidecar, &path, body)).await
        }
        Route::AuthZen => protocols::authzen_configuration(&sidecar.public_url),
        Route::Entitlements => entitlements(sidecar, &request),
        Route::Status => status(sidecar),
        Route::Metrics => metrics(sidecar),
        _ if path == "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        _ => readyz(sidecar),
    };
    let mut response = response;
    if let (Route::AuthZen, Some(request_id)) = (route, request_id) {
        response.headers_mut().insert("x-request-id", request_id);
    }
    (route, response)
}

/// Decides one request against `snapshot`, timing the engine for the metrics.
fn decide_timed(sidecar: &Sidecar, snapshot: &ServingView, body: &CheckBody<'_>, now: i64) -> Decision {
    let started = Stopwatch::start();
    let decision = decide(snapshot, &body.request(), now, &sidecar.usage);
    sidecar.metrics.decision(decision.reason, started.elapsed_secs());
    tally(sidecar, body, &decision);
    decision
}

/// Counts a decision for the control plane's analytics, when usage is shipped.
fn tally(sidecar: &Sidecar, body: &CheckBody<'_>, decision: &Decision) {
    if let Some(tally) = sidecar.metering.tally() {
        tally.record(&body.account, &body.feature, body.user.as_deref(), decision.reason);
    }
}

/// A user name the control plane would not take: refused at the edge.
fn bad_user(field: &str, check: &CheckBody<'_>) -> Option<HttpResponse> {
    let user = check.user.as_deref()?;
    rules::user(user).err().map(|error| error_response(StatusCode::BAD_REQUEST, "invalid_request", format!("`{field}` {error}")))
}

fn check(sidecar: &Sidecar, body: &[u8]) -> HttpResponse {
    let check: CheckBody<'_> = match serde_json::from_slice(body) {
        Ok(check) => check,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &json_error(&error)),
    };
    if let Some(refused) = bad_user("user", &check) {
        return refused;
    }
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let decision = decide_timed(sidecar, snapshot, &check, unix_now(sidecar));
    let stale = sidecar.store.is_stale();
    json_response(StatusCode::OK, &DecisionJson::new(snapshot.catalog(), &check.account, snapshot.revision(), &decision, stale))
}

/// Answers a `/v1/check/batch` body; public so the benches can measure it without a socket.
pub fn check_batch(sidecar: &Sidecar, body: &[u8]) -> HttpResponse {
    let batch: BatchBody<'_> = match serde_json::from_slice(body) {
        Ok(batch) => batch,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &json_error(&error)),
    };
    if batch.checks.len() > MAX_BATCH {
        return error_response(
            StatusCode::BAD_REQUEST,
            "too_many_checks",
            format!("`checks` holds {} checks; at most {MAX_BATCH} are allowed", batch.checks.len()),
        );
    }
    if let Some(refused) = batch.checks.iter().enumerate().find_map(|(idx, check)| bad_user(&format!("checks[{idx}].user"), check)) {
        return refused;
    }
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let now = unix_now(sidecar);
    let stale = sidecar.store.is_stale();
    let started = Stopwatch::start();
    let decisions: Vec<Decision> =
        batch.checks.iter().map(|check| decide(snapshot.as_ref(), &check.request(), now, &sidecar.usage)).collect();
    let per_decision = started.elapsed_secs() / decisions.len().max(1) as f64;
    let results = batch
        .checks
        .iter()
        .zip(&decisions)
        .map(|(check, decision)| {
            sidecar.metrics.decision(decision.reason, per_decision);
            tally(sidecar, check, decision);
            DecisionJson::new(snapshot.catalog(), &check.account, snapshot.revision(), decision, stale)
        })
        .collect();
    json_response_sized(StatusCode::OK, &BatchJson { results }, 16 + 192 * decisions.len())
}

/// What a metering event needs from the snapshot, read under one guard (the guard is not
/// held across the wait for the disk).
struct MeterContext {
    revision: u64,
    period_start: i64,
    current: tollgate_core::period::Window,
    hard_limit: Option<u64>,
    shown_limit: Option<u64>,
}

#[expect(clippy::result_large_err, reason = "the error is the finished answer, built at most once per request")]
fn meter_context(sidecar: &Sidecar, account: &str, meter_name: &str, at: i64, now: i64) -> Result<MeterContext, HttpResponse> {
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return Err(not_ready()) };
    let data = snapshot.catalog();
    if snapshot.account(account).is_none() {
        return Err(error_response(StatusCode::BAD_REQUEST, "unknown_account", format!("`account` names unknown account `{account}`")));
    }
    let Some((meter_idx, meter)) = data
        .meter_index
        .get(meter_name)
        .and_then(|meter_idx| data.meters.get(meter_idx.to_native() as usize).map(|meter| (meter_idx.to_native(), meter)))
    else {
        return Err(error_response(StatusCode::BAD_REQUEST, "unknown_meter", format!("`meter` names unknown meter `{meter_name}`")));
    };
    let period = meter.period.to_native();
    let limit = tollgate_core::engine::meter_limit(snapshot.as_ref(), account, meter_idx, now);
    let hard_limit = limit.and_then(|limit| limit.hard);
    Ok(MeterContext {
        revision: snapshot.revision(),
        period_start: period.window(at).start,
        current: period.window(now),
        hard_limit,
        shown_limit: hard_limit.or(limit.and_then(|limit| limit.soft)),
    })
}

/// The event's own time: now, or its `timestamp` when that is within the late-arrival window.
#[expect(clippy::result_large_err, reason = "the error is the finished answer, built at most once per request")]
fn event_time(sidecar: &Sidecar, timestamp: Option<&str>, now: i64) -> Result<i64, HttpResponse> {
    let Some(text) = timestamp else { return Ok(now) };
    let bad = |message: String| error_response(StatusCode::BAD_REQUEST, "invalid_request", message);
    let at =
        tollgate_core::period::parse_rfc3339(text).ok_or_else(|| bad(format!("`timestamp` value `{text}` is not an RFC 3339 time")))?;
    let window = sidecar.settings.late_arrival_secs;
    if at < now - window {
        return Err(bad(format!("`timestamp` `{text}` is older than the late-arrival window of {window} s")));
    }
    if at > now + FUTURE_SKEW_SECS {
        return Err(bad(format!("`timestamp` `{text}` is more than {FUTURE_SKEW_SECS} s in the future")));
    }
    rules::event_time(at, now).map_err(|error| bad(format!("`timestamp` `{text}` {error}")))?;
    Ok(at)
}

async fn meter(sidecar: &Sidecar, body: &[u8]) -> HttpResponse {
    let event: MeterBody<'_> = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, &json_error(&error)),
    };
    // The control plane's record rules, applied here so that nothing accepted is refused there.
    if let Err(error) = rules::amount(event.amount) {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", format!("`amount` {error}"));
    }
    if let Err(error) = rules::event_id(&event.id) {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", format!("`id` {error}"));
    }
    let now = unix_now(sidecar);
    let at = match event_time(sidecar, event.timestamp.as_deref(), now) {
        Ok(at) => at,
        Err(response) => return response,
    };
    let context = match meter_context(sidecar, &event.account, &event.meter, at, now) {
        Ok(context) => context,
        Err(response) => return response,
    };
    let local_cap = match (sidecar.metering.shipping(), context.hard_limit) {
        (Some(_), Some(hard)) => Some(((hard as f64 * sidecar.settings.local_share).ceil() as u64).max(1)),
        _ => None,
    };
    let mut usage_event = MeterEvent {
        account: &event.account,
        meter: &event.meter,
        event_id: &event.id,
        amount: event.amount,
        period_start: context.period_start,
        current_period_start: context.current.start,
        hard_limit: context.hard_limit,
        local_cap,
        now,
    };
    let deadline = tokio::time::Instant::now() + sidecar.settings.sync_wait;
    let (outcome, appended) = loop {
        let mut appended = None;
        let recorded = sidecar.usage.record(&usage_event, |outcome| {
            if let (true, Some(log)) = (outcome.accepted, sidecar.metering.log()) {
                appended = Some(log.append(usage_log::LoggedEvent {
                    seq: 0,
                    account: event.account.to_string(),
                    meter: event.meter.to_string(),
                    id: event.id.to_string(),
                    amount: event.amount,
                    at,
                    period_start: context.period_start,
                    recorded_at: now,
                }));
            }
        });
        match recorded {
            Recorded::Outcome(outcome) => break (outcome, appended),
            Recorded::NeedsSync => {
                // This pod's unsynced share of the hard limit is used up: ship and refresh
                // first. Should the control plane not answer in time, decide on what this pod
                // knows (available over exact; the overshoot bound then does not hold).
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                // While the last shipment failed there is no point waiting for the next.
                let synced = match sidecar.metering.shipping() {
                    Some(shipping) if !remaining.is_zero() && shipping.status().last_error.is_none() => shipping.sync_now(remaining).await,
                    _ => false,
                };
                if !synced {
                    usage_event.local_cap = None;
                }
            }
        }
    };
    if let Err(response) = make_durable(sidecar, &usage_event, &outcome, appended).await {
        return response;
    }
    let result = match (outcome.duplicate, outcome.accepted) {
        (true, _) => MeterResult::Duplicate,
        (false, true) => MeterResult::Accepted,
        (false, false) => MeterResult::Refused,
    };
    sidecar.metrics.metered(result, event.amount);
    if let (Some(shipping), Some(limit)) = (sidecar.metering.shipping(), context.hard_limit)
        && outcome.accepted
        && !outcome.duplicate
        && outcome.used.saturating_mul(5) >= limit.saturating_mul(4)
    {
        // Near a hard limit other pods should learn of this soon.
        shipping.nudge();
    }
    let current = context.period_start == context.current.start;
    json_response(
        StatusCode::OK,
        &MeterJson {
            accepted: outcome.accepted,
            duplicate: outcome.duplicate,
            used: outcome.used,
            limit: context.shown_limit.filter(|_| current),
            remaining: context.shown_limit.filter(|_| current).map(|limit| limit.saturating_sub(outcome.used)),
            reset_at: if current { context.current.reset_at.map(tollgate_core::period::Rfc3339) } else { None },
            reason: (!outcome.accepted).then_some("quota_exceeded"),
            period_start: tollgate_core::period::Rfc3339(context.period_start),
            durable: sidecar.metering.log().is_some(),
            revision: context.revision,
        },
    )
}

/// Waits until an accepted event is on disk; a duplicate waits until its original is. An
/// event that cannot be written is taken back and answered 503, so the client retries it.
async fn make_durable(
    sidecar: &Sidecar,
    event: &MeterEvent<'_>,
    outcome: &MeterOutcome,
    appended: Option<Result<tokio::sync::oneshot::Receiver<Result<u64, String>>, usage_log::LogError>>,
) -> Result<(), HttpResponse> {
    let Some(log) = sidecar.metering.log() else { return Ok(()) };
    let unavailable = |message: String| {
        sidecar.metrics.usage_log_failed();
        error_response(StatusCode::SERVICE_UNAVAILABLE, "usage_log_unavailable", format!("the event was not recorded: {message}"))
    };
    if outcome.duplicate {
        if !outcome.accepted {
            return Ok(());
        }
        // The original was queued before its id became visible, so a barrier queued now
        // answers only once the original is on disk.
        let synced = match log.barrier() {
            Ok(receiver) => receiver.await.map_err(|_| "the usage log stopped".to_string()).and_then(|result| result),
            Err(error) => Err(error.to_string()),
        };
        return match synced {
            Ok(()) if sidecar.usage.has_event(event.account, event.meter, event.event_id) => Ok(()),
            Ok(()) => Err(unavailable("its first delivery was not recorded; send it again".into())),
            Err(message) => Err(unavailable(message)),
        };
    }
    let Some(appended) = appended else { return Ok(()) };
    let written = match appended {
        Ok(receiver) => receiver.await.map_err(|_| "the usage log stopped".to_string()).and_then(|result| result.map(|_| ())),
        Err(error) => Err(error.to_string()),
    };
    written.map_err(|message| {
        sidecar.usage.unrecord(event);
        unavailable(message)
    })
}

fn entitlements(sidecar: &Sidecar, request: &Request<Incoming>) -> HttpResponse {
    let raw = request.uri().path().trim_start_matches("/v1/entitlements/");
    let Ok(account) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", "the account in the path is not valid UTF-8");
    };
    if account.is_empty() || account.contains('/') {
        return error_response(StatusCode::NOT_FOUND, "not_found", "expected /v1/entitlements/{account}");
    }
    let user = query_param(request, "user");
    let region = query_param(request, "region");
    let guard = sidecar.store.load();
    let Some(snapshot) = guard.as_ref() else { return not_ready() };
    let data = snapshot.catalog();
    let Some(view) = tollgate_core::engine::entitlements(
        snapshot.as_ref(),
        &account,
        user.as_deref(),
        region.as_deref(),
        unix_now(sidecar),
        &sidecar.usage,
    ) else {
        return error_response(StatusCode::NOT_FOUND, "unknown_account", format!("account `{account}` is not in the snapshot"));
    };
    let format_time = |value: Option<i64>| value.map(tollgate_core::period::format_rfc3339);
    let body = serde_json::json!({
        "account": view.account,
        "status": if view.active { "active" } else { "suspended" },
        "revision": snapshot.revision(),
        "stale": sidecar.store.is_stale(),
        "licenses": view.licenses.iter().map(|license| serde_json::json!({
            "id": license.id,
            "plan": license.plan,
            "addons": license.addons,
            "seats": license.seats,
            "trial": license.trial,
            "starts_at": format_time(license.starts_at),
            "expires_at": format_time(license.expires_at),
            "valid": license.valid,
            "grace": license.grace,
        })).collect::<Vec<_>>(),
        "features": view.features.iter().map(|feature| {
            let decision = DecisionJson::new(data, &account, snapshot.revision(), &feature.decision, sidecar.store.is_stale());
            serde_json::json!({
                "feature": feature.feature,
                "allow": decision.allow,
                "reason": decision.reason,
                "upgrade": decision.upgrade,
            })
        }).collect::<Vec<_>>(),
        "meters": view.meters.iter().map(|meter| serde_json::json!({
            "meter": meter.meter,
            "unit": meter.unit,
            "period": meter.period,
            "period_start": tollgate_core::period::format_rfc3339(meter.period_start),
            "reset_at": format_time(meter.reset_at),
            "soft_limit": meter.soft_limit,
            "hard_limit": meter.hard_limit,
            "used": meter.used,
            "remaining": meter.remaining,
        })).collect::<Vec<_>>(),
        "seats": view.seats,
        "seats_assigned": view.seats_assigned,
        "devices": view.devices,
        "max_devices": view.max_devices,
    });
    json_response(StatusCode::OK, &body)
}

fn status(sidecar: &Sidecar) -> HttpResponse {
    let guard = sidecar.store.load();
    let update = sidecar.store.status();
    let now_ms = unix_now_ms(sidecar);
    let snapshot = guard.as_ref().map(|view| {
        let header = view.base().header();
        let mut counts = header.counts;
        counts.accounts = view.account_count();
        serde_json::json!({
            "revision": view.revision(),
            "base_revision": view.base_revision(),
            "overlay_accounts": view.overlay_len(),
            "deltas": view.deltas(),
            "key_id": header.key_id,
            "created_at": tollgate_core::period::format_rfc3339(view.created_at_ms().div_euclid(1000)),
            "age_seconds": (now_ms - view.created_at_ms()) as f64 / 1000.0,
            "size_bytes": view.base().size(),
            "counts": counts,
        })
    });
    let body = serde_json::json!({
        "ready": sidecar.store.is_ready(),
        "revision": guard.as_ref().map(|snapshot| snapshot.revision()),
        "source": sidecar.source,
        "snapshot": snapshot,
        "loaded_at": update.loaded_at_ms.map(|ms| tollgate_core::period::format_rfc3339(ms.div_euclid(1000))),
        "swaps": update.swaps,
        "rejects": update.rejects,
        "last_error": update.last_error,
        "last_error_at": update.last_error_at_ms.map(|ms| tollgate_core::period::format_rfc3339(ms.div_euclid(1000))),
        "last_rejected": update.last_rejected,
        "last_rejected_at": update.last_rejected_at_ms.map(|ms| tollgate_core::period::format_rfc3339(ms.div_euclid(1000))),
        "pending_seconds": sidecar.store.pending_seconds(),
        "stale": sidecar.store.is_stale(),
        "synced_at": sidecar.store.synced_at_ms().map(|ms| tollgate_core::period::format_rfc3339(ms.div_euclid(1000))),
        "sync_age_seconds": sidecar.store.synced_at_ms().map(|ms| (now_ms - ms) as f64 / 1000.0),
        "trusted_keys": sidecar.trusted.ids().collect::<Vec<_>>(),
        "usage_event_ids": sidecar.usage.n_events(),
        "usage": usage_status(sidecar),
    });
    json_response(StatusCode::OK, &body)
}

fn usage_status(sidecar: &Sidecar) -> serde_json::Value {
    let shipping = sidecar.metering.shipping().map(|shipping| {
        let status = shipping.status();
        serde_json::json!({
            "control_plane": shipping.subscription.describe(),
            "sidecar_id": shipping.sidecar_id,
            "interval_ms": shipping.interval.as_millis() as u64,
            "cursor": status.cursor,
            "shipped_through": status.shipped_through,
            "persisted_through": status.persisted_through,
            "last_sync_at": status.last_sync_at_ms.map(|ms| tollgate_core::period::format_rfc3339(ms.div_euclid(1000))),
            "last_error": status.last_error,
            "events_shipped": status.events_shipped,
            "events_rejected": status.events_rejected,
        })
    });
    serde_json::json!({
        "durable": sidecar.metering.log().is_some_and(|log| log.failure().is_none()),
        "log_failure": sidecar.metering.log().and_then(|log| log.failure()),
        "log_dir": sidecar.metering.log().map(|log| log.dir().display().to_string()),
        "pending_events": sidecar.metering.log().filter(|log| log.tracks_pending()).map(|log| log.n_pending()),
        "shipping": shipping,
        "tally_dropped": sidecar.metering.tally().map(DecisionTally::dropped),
    })
}

fn readyz(sidecar: &Sidecar) -> HttpResponse {
    // A usage log that cannot write (a full disk) cannot acknowledge metered use: take the pod
    // out until it can.
    if let Some(failure) = sidecar.metering.log().and_then(|log| log.failure()) {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "usage_log_failing", format!("the usage log cannot write: {failure}"));
    }
    if sidecar.store.is_serving_ready() {
        json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    } else if sidecar.store.is_ready() {
        error_response(StatusCode::SERVICE_UNAVAILABLE, "stale", "the snapshot is older than `--max-staleness` allows")
    } else {
        error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no valid snapshot is loaded yet")
    }
}

fn metrics(sidecar: &Sidecar) -> HttpResponse {
    let age = sidecar.store.load().as_ref().map(|snapshot| (unix_now_ms(sidecar) - snapshot.created_at_ms()) as f64 / 1000.0);
    let mut text = sidecar.metrics.render(age);
    // Freshness lives in the store (it is about the serving snapshot), so it is rendered here.
    let now_ms = unix_now_ms(sidecar);
    text.push_str("# HELP tollgate_snapshot_stale 1 when the snapshot is older than --max-staleness allows\n");
    text.push_str("# TYPE tollgate_snapshot_stale gauge\n");
    text.push_str(&format!("tollgate_snapshot_stale {}\n", u8::from(sidecar.store.is_stale())));
    text.push_str("# HELP tollgate_snapshot_pending_seconds Seconds an update has been received but not yet installed (0 when none)\n");
    text.push_str("# TYPE tollgate_snapshot_pending_seconds gauge\n");
    text.push_str(&format!("tollgate_snapshot_pending_seconds {}\n", sidecar.store.pending_seconds().unwrap_or(0.0)));
    if let Some(synced_at_ms) = sidecar.store.synced_at_ms() {
        text.push_str("# HELP tollgate_snapshot_sync_age_seconds Seconds since the source last confirmed the snapshot is current\n");
        text.push_str("# TYPE tollgate_snapshot_sync_age_seconds gauge\n");
        text.push_str(&format!("tollgate_snapshot_sync_age_seconds {}\n", (now_ms - synced_at_ms) as f64 / 1000.0));
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}
