//! The control plane's Prometheus metrics, as a value held by [`super::ControlPlane`]: requests
//! by route pattern and status class with a latency histogram, the committed and published
//! revisions, publish failures, waiting long-polls, and usage ingestion. Labels come only from
//! fixed sets (route patterns of `api::ROUTES`, status classes, results), never from account
//! ids or other caller input, so the series count stays bounded and no customer's data shows.

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::api::ROUTES;

static METADATA: Metadata<'static> = Metadata::new("tollgate_control_plane", Level::INFO, Some(module_path!()));

const REQUEST_BUCKETS: &[f64] = &[100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 5.0, 30.0];
const STATUS_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// Outcome of one ingested usage event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestResult {
    Counted,
    Duplicate,
    Rejected,
}

pub struct ControlPlaneMetrics {
    handle: PrometheusHandle,
    recorder: PrometheusRecorder,
    /// One counter per (route pattern, status class); the last row is "no route".
    requests: Vec<[Counter; STATUS_CLASSES.len()]>,
    revision_committed: Gauge,
    revision_published: Gauge,
    publish_failures: Counter,
    overlay_accounts: Gauge,
    overlay_deltas: Gauge,
    long_polls_waiting: Gauge,
    usage_events: [Counter; 3],
    usage_batches: Counter,
}

impl std::fmt::Debug for ControlPlaneMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlPlaneMetrics")
    }
}

fn counter(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
}

fn gauge(recorder: &PrometheusRecorder, name: &'static str) -> Gauge {
    recorder.register_gauge(&Key::from_name(name), &METADATA)
}

impl ControlPlaneMetrics {
    pub fn new() -> ControlPlaneMetrics {
        #[expect(clippy::expect_used, reason = "the bucket list is a non-empty constant")]
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("tollgate_cp_request_duration_seconds".into()), REQUEST_BUCKETS)
            .expect("non-empty bucket list")
            .build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, SharedString::const_str(help));
        };
        describe("tollgate_cp_requests_total", None, "API requests by route pattern and status class.");
        describe("tollgate_cp_request_duration_seconds", Some(Unit::Seconds), "API latency by route pattern (long-polls included).");
        describe("tollgate_cp_revision_committed", None, "Newest committed repository revision.");
        describe("tollgate_cp_revision_published", None, "Revision of the newest signed snapshot offered to sidecars.");
        describe("tollgate_cp_publish_failures_total", None, "Snapshot builds that failed (retried).");
        describe("tollgate_cp_overlay_accounts", None, "Accounts changed since the published base (compaction starts at --compact-after).");
        describe("tollgate_cp_overlay_deltas", None, "Deltas published on the current base.");
        describe("tollgate_cp_snapshot_long_polls", None, "Sidecar long-polls waiting on /v1/snapshot.");
        describe("tollgate_cp_usage_events_total", None, "Usage events received from sidecars by result.");
        describe("tollgate_cp_usage_batches_total", None, "Usage batches received from sidecars.");
        describe(
            "tollgate_cp_integration_events_total",
            None,
            "Inbound Stripe and HubSpot events by source and outcome (applied, unmapped, stale, ignored, duplicate).",
        );
        let route_names = ROUTES.iter().map(|route| route.pattern).chain(std::iter::once("unmatched"));
        let requests = route_names
            .map(|route| {
                STATUS_CLASSES.map(|class| {
                    counter(&recorder, "tollgate_cp_requests_total", vec![Label::new("route", route), Label::new("status", class)])
                })
            })
            .collect();
        let usage_events = ["counted", "duplicate", "rejected"]
            .map(|result| counter(&recorder, "tollgate_cp_usage_events_total", vec![Label::new("result", result)]));
        ControlPlaneMetrics {
            handle: recorder.handle(),
            requests,
            revision_committed: gauge(&recorder, "tollgate_cp_revision_committed"),
            revision_published: gauge(&recorder, "tollgate_cp_revision_published"),
            publish_failures: counter(&recorder, "tollgate_cp_publish_failures_total", Vec::new()),
            overlay_accounts: gauge(&recorder, "tollgate_cp_overlay_accounts"),
            overlay_deltas: gauge(&recorder, "tollgate_cp_overlay_deltas"),
            long_polls_waiting: gauge(&recorder, "tollgate_cp_snapshot_long_polls"),
            usage_events,
            usage_batches: counter(&recorder, "tollgate_cp_usage_batches_total", Vec::new()),
            recorder,
        }
    }

    /// Records one answered request; `route_idx` indexes `api::ROUTES` (`None`: no route matched).
    pub fn request(&self, route_idx: Option<usize>, status: u16, seconds: f64) {
        let row = route_idx.unwrap_or(ROUTES.len());
        let class = usize::from(status.clamp(200, 599) / 100 - 2);
        if let Some(counter) = self.requests.get(row).and_then(|classes| classes.get(class)) {
            counter.increment(1);
        }
        let route = ROUTES.get(row).map_or("unmatched", |route| route.pattern);
        self.recorder
            .register_histogram(&Key::from_parts("tollgate_cp_request_duration_seconds", vec![Label::new("route", route)]), &METADATA)
            .record(seconds);
    }

    pub fn committed(&self, revision: u64) {
        self.revision_committed.set(revision as f64);
    }

    pub fn published(&self, revision: u64) {
        self.revision_published.set(revision as f64);
    }

    /// Accounts changed since the published base, and deltas on it.
    pub fn overlay(&self, accounts: usize, deltas: usize) {
        self.overlay_accounts.set(accounts as f64);
        self.overlay_deltas.set(deltas as f64);
    }

    pub fn publish_failed(&self) {
        self.publish_failures.increment(1);
    }

    pub fn long_poll_started(&self) {
        self.long_polls_waiting.increment(1.0);
    }

    pub fn long_poll_ended(&self) {
        self.long_polls_waiting.decrement(1.0);
    }

    pub fn usage_batch(&self) {
        self.usage_batches.increment(1);
    }

    pub fn usage_event(&self, result: IngestResult, n: u64) {
        if let Some(counter) = self.usage_events.get(result as usize) {
            counter.increment(n);
        }
    }

    /// Counts an inbound integration event by its source and what became of it.
    pub fn integration_event(&self, source: &'static str, outcome: &'static str) {
        let labels = vec![Label::new("source", source), Label::new("outcome", outcome)];
        counter(&self.recorder, "tollgate_cp_integration_events_total", labels).increment(1);
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram buffers so memory stays bounded when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for ControlPlaneMetrics {
    fn default() -> ControlPlaneMetrics {
        ControlPlaneMetrics::new()
    }
}
