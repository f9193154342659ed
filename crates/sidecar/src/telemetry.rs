//! Metrics as a value: every counter, gauge and histogram the sidecar exports, registered
//! once with a Prometheus recorder and passed down explicitly. No global recorder is
//! installed; recording is an atomic operation on a pre-registered handle.

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use tollgate_core::engine::Reason;

/// The routes that get their own request-latency series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Check,
    CheckBatch,
    Meter,
    Entitlements,
    ExtAuthz,
    AuthZen,
    Ofrep,
    Status,
    Probe,
    Metrics,
    NotFound,
}

impl Route {
    pub const ALL: [Route; 11] = [
        Route::Check,
        Route::CheckBatch,
        Route::Meter,
        Route::Entitlements,
        Route::ExtAuthz,
        Route::AuthZen,
        Route::Ofrep,
        Route::Status,
        Route::Probe,
        Route::Metrics,
        Route::NotFound,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Check => "check",
            Route::CheckBatch => "check_batch",
            Route::Meter => "meter",
            Route::Entitlements => "entitlements",
            Route::ExtAuthz => "ext_authz",
            Route::AuthZen => "authzen",
            Route::Ofrep => "ofrep",
            Route::Status => "status",
            Route::Probe => "probe",
            Route::Metrics => "metrics",
            Route::NotFound => "not_found",
        }
    }
}

/// Why a snapshot update was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCause {
    Read,
    Compile,
    Framing,
    UntrustedKey,
    Signature,
    Validation,
    NotNewer,
    /// Older than the highest revision this sidecar ever installed (kept in `--data-dir`).
    Rollback,
    /// A delta that does not follow the serving revision: one in between is missing.
    Gap,
    /// A delta for another base than the serving one (or with no base serving at all).
    BaseMismatch,
}

impl RejectCause {
    pub const ALL: [RejectCause; 10] = [
        RejectCause::Read,
        RejectCause::Compile,
        RejectCause::Framing,
        RejectCause::UntrustedKey,
        RejectCause::Signature,
        RejectCause::Validation,
        RejectCause::NotNewer,
        RejectCause::Rollback,
        RejectCause::Gap,
        RejectCause::BaseMismatch,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            RejectCause::Read => "read",
            RejectCause::Compile => "compile",
            RejectCause::Framing => "framing",
            RejectCause::UntrustedKey => "untrusted_key",
            RejectCause::Signature => "signature",
            RejectCause::Validation => "validation",
            RejectCause::NotNewer => "not_newer",
            RejectCause::Rollback => "rollback",
            RejectCause::Gap => "gap",
            RejectCause::BaseMismatch => "base_mismatch",
        }
    }
}

/// Outcome of a metering event, for its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterResult {
    Accepted,
    Duplicate,
    Refused,
}

pub struct Metrics {
    handle: PrometheusHandle,
    decisions: [Counter; Reason::ALL.len()],
    decision_seconds: Histogram,
    request_seconds: [Histogram; Route::ALL.len()],
    snapshot_revision: Gauge,
    snapshot_age_seconds: Gauge,
    snapshot_accounts: Gauge,
    snapshot_base_revision: Gauge,
    snapshot_overlay_accounts: Gauge,
    snapshot_swaps: Counter,
    snapshot_rejects: [Counter; RejectCause::ALL.len()],
    meter_events: [Counter; 3],
    meter_units: Counter,
    usage_shipped: Counter,
    usage_rejected: Counter,
    usage_ship_failures: Counter,
    usage_pending: Gauge,
    usage_log_failures: Counter,
    heavy_refused: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const DECISION_BUCKETS: &[f64] = &[50e-9, 100e-9, 200e-9, 500e-9, 1e-6, 2e-6, 5e-6, 10e-6, 50e-6, 100e-6, 1e-3];
const REQUEST_BUCKETS: &[f64] = &[10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 100e-3, 1.0];

static METADATA: Metadata<'static> = Metadata::new("tollgate", Level::INFO, Some(module_path!()));

fn counter(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
}

fn gauge(recorder: &PrometheusRecorder, name: &'static str) -> Gauge {
    recorder.register_gauge(&Key::from_name(name), &METADATA)
}

impl Metrics {
    pub fn new() -> Metrics {
        // `set_buckets_for_metric` fails only for an empty bucket list; ours are non-empty
        // constants.
        #[expect(clippy::expect_used, reason = "the bucket lists are non-empty constants")]
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("tollgate_decision_duration_seconds".into()), DECISION_BUCKETS)
            .and_then(|builder| builder.set_buckets_for_metric(Matcher::Full("tollgate_request_duration_seconds".into()), REQUEST_BUCKETS))
            .expect("non-empty bucket lists");
        let recorder = builder.build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, SharedString::const_str(help));
        };
        describe("tollgate_decisions_total", None, "Decisions by result and reason.");
        describe("tollgate_decision_duration_seconds", Some(Unit::Seconds), "Time inside the decision engine per decision.");
        describe("tollgate_request_duration_seconds", Some(Unit::Seconds), "HTTP request latency by route.");
        describe("tollgate_snapshot_revision", None, "Revision of the snapshot being served.");
        describe("tollgate_snapshot_age_seconds", Some(Unit::Seconds), "Age of the served snapshot since it was compiled.");
        describe("tollgate_snapshot_swaps_total", None, "Snapshots installed.");
        describe("tollgate_snapshot_rejects_total", None, "Snapshot updates rejected, by cause.");
        describe("tollgate_meter_events_total", None, "Metering events by result.");
        describe("tollgate_usage_shipped_events_total", None, "Usage events the control plane has acknowledged.");
        describe("tollgate_usage_rejected_events_total", None, "Usage events the control plane refused (unknown account or meter).");
        describe("tollgate_usage_ship_failures_total", None, "Usage shipments that failed and will be retried.");
        describe("tollgate_usage_pending_events", None, "Durable usage events not yet counted by the control plane.");
        describe("tollgate_usage_log_failures_total", None, "Metering events refused because the durable log could not take them.");
        describe("tollgate_heavy_requests_refused_total", None, "Large requests answered 503 because --max-heavy-requests were in flight.");

        let decisions = Reason::ALL.map(|reason| {
            let result = if reason == Reason::Ok { "allow" } else { "deny" };
            counter(&recorder, "tollgate_decisions_total", vec![Label::new("result", result), Label::new("reason", reason.as_str())])
        });
        let request_seconds = Route::ALL.map(|route| {
            recorder.register_histogram(
                &Key::from_parts("tollgate_request_duration_seconds", vec![Label::new("route", route.as_str())]),
                &METADATA,
            )
        });
        let snapshot_rejects =
            RejectCause::ALL.map(|cause| counter(&recorder, "tollgate_snapshot_rejects_total", vec![Label::new("cause", cause.as_str())]));
        let meter_events = ["accepted", "duplicate", "refused"]
            .map(|result| counter(&recorder, "tollgate_meter_events_total", vec![Label::new("result", result)]));
        Metrics {
            handle: recorder.handle(),
            decisions,
            decision_seconds: recorder.register_histogram(&Key::from_name("tollgate_decision_duration_seconds"), &METADATA),
            request_seconds,
            snapshot_revision: gauge(&recorder, "tollgate_snapshot_revision"),
            snapshot_age_seconds: gauge(&recorder, "tollgate_snapshot_age_seconds"),
            snapshot_accounts: gauge(&recorder, "tollgate_snapshot_accounts"),
            snapshot_base_revision: gauge(&recorder, "tollgate_snapshot_base_revision"),
            snapshot_overlay_accounts: gauge(&recorder, "tollgate_snapshot_overlay_accounts"),
            snapshot_swaps: counter(&recorder, "tollgate_snapshot_swaps_total", Vec::new()),
            snapshot_rejects,
            meter_events,
            meter_units: counter(&recorder, "tollgate_meter_units_total", Vec::new()),
            usage_shipped: counter(&recorder, "tollgate_usage_shipped_events_total", Vec::new()),
            usage_rejected: counter(&recorder, "tollgate_usage_rejected_events_total", Vec::new()),
            usage_ship_failures: counter(&recorder, "tollgate_usage_ship_failures_total", Vec::new()),
            usage_pending: gauge(&recorder, "tollgate_usage_pending_events"),
            usage_log_failures: counter(&recorder, "tollgate_usage_log_failures_total", Vec::new()),
            heavy_refused: counter(&recorder, "tollgate_heavy_requests_refused_total", Vec::new()),
        }
    }

    pub fn decision(&self, reason: Reason, seconds: f64) {
        if let Some(counter) = self.decisions.get(reason.index()) {
            counter.increment(1);
        }
        self.decision_seconds.record(seconds);
    }

    /// Records how long one decision took, for decisions counted with `decision_count`.
    pub fn decision_latency(&self, seconds: f64) {
        self.decision_seconds.record(seconds);
    }

    /// Counts decisions made in bulk, timed as a whole.
    pub fn decision_count(&self, reason: Reason) {
        if let Some(counter) = self.decisions.get(reason.index()) {
            counter.increment(1);
        }
    }

    pub fn request(&self, route: Route, seconds: f64) {
        if let Some(histogram) = self.request_seconds.get(route as usize) {
            histogram.record(seconds);
        }
    }

    pub fn swapped(&self, revision: u64, n_accounts: u64) {
        self.snapshot_swaps.increment(1);
        self.snapshot_revision.set(revision as f64);
        self.snapshot_accounts.set(n_accounts as f64);
    }

    /// The serving view's base revision and how many accounts its overlay holds.
    pub fn overlay(&self, base_revision: u64, overlay_accounts: usize) {
        self.snapshot_base_revision.set(base_revision as f64);
        self.snapshot_overlay_accounts.set(overlay_accounts as f64);
    }

    pub fn rejected(&self, cause: RejectCause) {
        if let Some(counter) = self.snapshot_rejects.get(cause as usize) {
            counter.increment(1);
        }
    }

    pub fn metered(&self, result: MeterResult, units: u64) {
        if let Some(counter) = self.meter_events.get(result as usize) {
            counter.increment(1);
        }
        if result == MeterResult::Accepted {
            self.meter_units.increment(units);
        }
    }

    pub fn usage_shipped(&self, n_events: u64, n_rejected: u64) {
        self.usage_shipped.increment(n_events.saturating_sub(n_rejected));
        self.usage_rejected.increment(n_rejected);
    }

    pub fn usage_ship_failed(&self) {
        self.usage_ship_failures.increment(1);
    }

    pub fn usage_pending(&self, n_events: usize) {
        self.usage_pending.set(n_events as f64);
    }

    pub fn usage_log_failed(&self) {
        self.usage_log_failures.increment(1);
    }

    /// A large request was refused because the heavy-request permits were all taken.
    pub fn heavy_refused(&self) {
        self.heavy_refused.increment(1);
    }

    /// Prometheus text exposition; `snapshot_age_seconds` is brought up to date first.
    pub fn render(&self, snapshot_age_seconds: Option<f64>) -> String {
        if let Some(age) = snapshot_age_seconds {
            self.snapshot_age_seconds.set(age);
        }
        self.handle.render()
    }

    /// Drains histogram buffers; call every few seconds so memory stays bounded when nobody
    /// scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
