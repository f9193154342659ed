//! The in-process mode: `engine::decide` over a verified snapshot held in the sidecar's own
//! `SnapshotStore`, kept current by the sidecar's own file watcher or control-plane
//! subscription (`tollgate_sidecar::source::watch`), so loading, verification and the
//! never-go-backwards rule are the sidecar's code, not a copy. Usage is the sidecar's
//! in-memory `UsageStore`: not durable, not shipped, not shared with other processes.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::clock::Clock;
use tollgate_core::engine::{self, View, decide};
use tollgate_core::period::{Rfc3339, format_rfc3339};
use tollgate_protocol::{CheckBody, DecisionJson, UpgradeJson};
use tollgate_sidecar::source::{self, Source};
use tollgate_sidecar::store::SnapshotStore;
use tollgate_sidecar::subscribe::Subscription;
use tollgate_sidecar::telemetry::Metrics;
use tollgate_sidecar::usage::{MeterEvent, Recorded, UsageStore};
use tollgate_snapshot::{Snapshot, TrustedKeys};

use crate::{
    CheckRequest, ClientError, Decision, Entitlements, FeatureEntitlement, LicenseEntitlement, MeterEntitlement, MeterRequest, MeterResult,
    Reason, SnapshotSource, Upgrade,
};

/// How often the wait for a first control-plane snapshot looks at the store.
const READY_POLL: Duration = Duration::from_millis(10);

pub(crate) struct Local {
    store: Arc<SnapshotStore>,
    usage: UsageStore,
    clock: Arc<dyn Clock>,
    /// Dropping it (with the client) stops the watcher task.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Local {
    pub(crate) async fn start(source: SnapshotSource, trusted: TrustedKeys, clock: Arc<dyn Clock>) -> Result<Local, ClientError> {
        let store = Arc::new(SnapshotStore::new(Arc::new(Metrics::new()), Arc::clone(&clock)));
        let trusted = Arc::new(trusted);
        let (source, seen, poll, first_wait) = match source {
            SnapshotSource::File { path, poll } => {
                // The first load is read here, so a bad file is an error of the constructor
                // rather than a client that denies everything.
                let source = Source::File(path.clone());
                let seen = source.fingerprint();
                let snapshot = Snapshot::read_file(&path, &trusted)?;
                install_first(&store, snapshot);
                (source, seen, poll, Duration::ZERO)
            }
            SnapshotSource::ControlPlane { url, api_key_file, data_dir, first_wait } => {
                let subscription = Subscription::new(&url, &api_key_file, data_dir)?;
                // A cached snapshot from an earlier run serves at once, as in the sidecar.
                if let Ok(snapshot) = Snapshot::read_file(&subscription.cache_path(), &trusted) {
                    let deltas = tollgate_sidecar::subscribe::cached_deltas(
                        &subscription,
                        &trusted,
                        snapshot.revision(),
                        store.max_snapshot_bytes(),
                    );
                    let _ = store.install_chain(Some(snapshot), deltas);
                }
                (Source::ControlPlane(Arc::new(subscription)), Vec::new(), Duration::from_secs(1), first_wait)
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(source::watch(Arc::new(source), trusted, Arc::clone(&store), poll, seen, async move {
            let _ = stopped.await;
        }));
        let mut waited = Duration::ZERO;
        while !store.is_ready() {
            if waited >= first_wait {
                return Err(ClientError::NotReady { waited });
            }
            tokio::time::sleep(READY_POLL).await;
            waited += READY_POLL;
        }
        Ok(Local { store, usage: UsageStore::new(), clock, _stop: stop })
    }

    pub(crate) fn check(&self, request: &CheckRequest) -> Result<Decision, ClientError> {
        let guard = self.store.load();
        let snapshot = guard.as_ref().ok_or(ClientError::NotReady { waited: Duration::ZERO })?;
        let body = check_body(request);
        let decision = decide(snapshot.as_ref(), &body.request(), self.clock.now(), &self.usage);
        let answer = DecisionJson::new(snapshot.catalog(), &request.account, snapshot.revision(), &decision, self.store.is_stale());
        Ok(Decision {
            allow: answer.allow,
            reason: Reason::Engine(decision.reason),
            revision: Some(answer.revision),
            license: answer.license.map(str::to_string),
            meter: answer.meter.map(str::to_string),
            limit: answer.limit,
            used: answer.used,
            remaining: answer.remaining,
            reset_at: answer.reset_at.map(|at| at.to_string()),
            expires_at: answer.expires_at.map(|at| at.to_string()),
            grace: answer.grace,
            overage: answer.overage,
            stale: answer.stale,
            upgrade: answer.upgrade.map(Upgrade::from),
            fallback: false,
        })
    }

    /// Records usage now, under the account's hard limit, as the sidecar's `/v1/meter` does
    /// without a usage log (no late events, no shared-quota sync).
    pub(crate) fn meter(&self, request: &MeterRequest) -> Result<MeterResult, ClientError> {
        let invalid =
            |code: &str, message: String| ClientError::Api { path: "in-process meter".into(), status: 400, code: code.into(), message };
        if request.timestamp.is_some() {
            return Err(invalid("invalid_request", "`timestamp` is not supported in-process: events are counted now".into()));
        }
        let guard = self.store.load();
        let snapshot = guard.as_ref().ok_or(ClientError::NotReady { waited: Duration::ZERO })?;
        let data = snapshot.catalog();
        if snapshot.account(request.account.as_str()).is_none() {
            return Err(invalid("unknown_account", format!("`account` names unknown account `{}`", request.account)));
        }
        let Some((meter_idx, meter)) = data.meter_index.get(request.meter.as_str()).and_then(|meter_idx| {
            let meter_idx = meter_idx.to_native();
            data.meters.get(meter_idx as usize).map(|meter| (meter_idx, meter))
        }) else {
            return Err(invalid("unknown_meter", format!("`meter` names unknown meter `{}`", request.meter)));
        };
        let now = self.clock.now();
        let window = meter.period.to_native().window(now);
        let limit = engine::meter_limit(snapshot.as_ref(), &request.account, meter_idx, now);
        let hard_limit = limit.and_then(|limit| limit.hard);
        let shown_limit = hard_limit.or(limit.and_then(|limit| limit.soft));
        let id = request.id.clone().unwrap_or_default();
        let event = MeterEvent {
            account: &request.account,
            meter: &request.meter,
            event_id: &id,
            amount: request.amount,
            period_start: window.start,
            current_period_start: window.start,
            hard_limit,
            local_cap: None,
            now,
        };
        // Without a local cap the store always decides; `NeedsSync` cannot come back.
        let outcome = match self.usage.record(&event, |_| {}) {
            Recorded::Outcome(outcome) => outcome,
            Recorded::NeedsSync => return Err(ClientError::NotReady { waited: Duration::ZERO }),
        };
        Ok(MeterResult {
            accepted: outcome.accepted,
            duplicate: outcome.duplicate,
            used: outcome.used,
            limit: shown_limit,
            remaining: shown_limit.map(|limit| limit.saturating_sub(outcome.used)),
            reset_at: window.reset_at.map(|at| Rfc3339(at).to_string()),
            reason: (!outcome.accepted).then(|| "quota_exceeded".to_string()),
            period_start: Rfc3339(window.start).to_string(),
            durable: false,
            revision: snapshot.revision(),
            id,
        })
    }

    pub(crate) fn entitlements(&self, account: &str, user: Option<&str>, region: Option<&str>) -> Result<Entitlements, ClientError> {
        let guard = self.store.load();
        let snapshot = guard.as_ref().ok_or(ClientError::NotReady { waited: Duration::ZERO })?;
        let data = snapshot.catalog();
        let stale = self.store.is_stale();
        let view = engine::entitlements(snapshot.as_ref(), account, user, region, self.clock.now(), &self.usage).ok_or_else(|| {
            ClientError::Api {
                path: "in-process entitlements".into(),
                status: 404,
                code: "unknown_account".into(),
                message: format!("account `{account}` is not in the snapshot"),
            }
        })?;
        let time = |at: Option<i64>| at.map(format_rfc3339);
        Ok(Entitlements {
            account: view.account.to_string(),
            status: if view.active { "active" } else { "suspended" }.to_string(),
            revision: snapshot.revision(),
            stale,
            licenses: view
                .licenses
                .iter()
                .map(|license| LicenseEntitlement {
                    id: license.id.to_string(),
                    plan: license.plan.to_string(),
                    addons: license.addons.iter().map(|addon| addon.to_string()).collect(),
                    seats: license.seats,
                    trial: license.trial,
                    starts_at: time(license.starts_at),
                    expires_at: time(license.expires_at),
                    valid: license.valid,
                    grace: license.grace,
                })
                .collect(),
            features: view
                .features
                .iter()
                .map(|feature| {
                    let answer = DecisionJson::new(data, account, snapshot.revision(), &feature.decision, stale);
                    FeatureEntitlement {
                        feature: feature.feature.to_string(),
                        allow: answer.allow,
                        reason: answer.reason.to_string(),
                        upgrade: answer.upgrade.map(Upgrade::from),
                    }
                })
                .collect(),
            meters: view
                .meters
                .iter()
                .map(|meter| MeterEntitlement {
                    meter: meter.meter.to_string(),
                    unit: meter.unit.to_string(),
                    period: meter.period.to_string(),
                    period_start: format_rfc3339(meter.period_start),
                    reset_at: time(meter.reset_at),
                    soft_limit: meter.soft_limit,
                    hard_limit: meter.hard_limit,
                    used: meter.used,
                    remaining: meter.remaining,
                })
                .collect(),
        })
    }
}

impl From<UpgradeJson<'_>> for Upgrade {
    fn from(upgrade: UpgradeJson<'_>) -> Upgrade {
        Upgrade { kind: upgrade.kind.to_string(), id: upgrade.id.to_string(), checkout_url: upgrade.checkout_url }
    }
}

/// The first snapshot goes into an empty store, where "not newer" cannot happen.
fn install_first(store: &SnapshotStore, snapshot: Snapshot) {
    let _ = store.install(snapshot);
}

fn check_body(request: &CheckRequest) -> CheckBody<'_> {
    use std::borrow::Cow;
    CheckBody {
        account: Cow::Borrowed(&request.account),
        feature: Cow::Borrowed(&request.feature),
        user: request.user.as_deref().map(Cow::Borrowed),
        region: request.region.as_deref().map(Cow::Borrowed),
        device: request.device.as_deref().map(Cow::Borrowed),
        amount: request.amount,
    }
}
