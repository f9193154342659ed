//! The usage shipper: sends the durable log's unshipped events, with the decision tally, to
//! the control plane (`POST /v1/usage`) in batches, at least every sync interval and at once
//! when nudged; applies the answer (shipped events leave the local share, the control plane's
//! totals become the global count); records how far it got in `state.json`; and lets the log
//! delete what is counted. Failures back off exponentially with full jitter; events keep
//! their ids, so a batch sent twice counts once (at-least-once delivery, exactly-once counting).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::{Notify, watch};

use super::Sidecar;
use super::subscribe::{BACKOFF_MAX, BACKOFF_START, SubscribeError, Subscription};
use super::usage_log::{LoggedEvent, ShipState, UsageLog, write_state};
use crate::usage::{GlobalTotal, Shipped};
use tollgate_core::period::{Rfc3339, parse_rfc3339};
use tollgate_http::backoff::Backoff;
use tollgate_protocol::feed::USAGE_PATH;
use tollgate_protocol::usage::{UsageAnswer, UsageBatch, UsageEvent};

/// Most events in one batch (the control plane takes at most 10000).
const MAX_BATCH: usize = 5_000;
/// A batch stays well under the control plane's 1 MiB body limit, whatever the length of ids
/// and names: events and decision rows are cut at about this many bytes each, and the rest go
/// with the next batch.
const MAX_EVENT_BYTES: usize = 512 << 10;
const MAX_TALLY_BYTES: usize = 256 << 10;
/// Largest answer read from `/v1/usage`.
const MAX_ANSWER: usize = 64 << 20;
/// `state.json` is rewritten at most this often while shipping goes on (and always on flush).
const PERSIST_EVERY: Duration = Duration::from_millis(500);
/// The file holding this sidecar's stable id, in the data directory.
pub const ID_FILE: &str = "sidecar-id";

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Request(#[from] SubscribeError),
    #[error("control plane answered {status} to a usage batch: {body}")]
    Status { status: u16, body: String },
    #[error("control plane's usage answer is malformed: {0}")]
    Answer(String),
    #[error("cannot read or create the sidecar id `{path}`: {source}")]
    Id { path: String, source: std::io::Error },
}

/// Where and how usage is shipped, and what the shipper has done (for `/v1/status`).
pub struct Shipping {
    pub subscription: Arc<Subscription>,
    pub sidecar_id: String,
    pub interval: Duration,
    nudge: Notify,
    synced: watch::Sender<u64>,
    status: Mutex<ShipStatus>,
}

impl std::fmt::Debug for Shipping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipping").field("sidecar_id", &self.sidecar_id).finish()
    }
}

/// What the shipper reports.
#[derive(Debug, Clone, Default)]
pub struct ShipStatus {
    pub cursor: u64,
    pub shipped_through: u64,
    pub persisted_through: u64,
    pub last_sync_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub events_shipped: u64,
    pub events_rejected: u64,
}

/// Reads `DATA_DIR/sidecar-id`, making a random one the first time: the control plane tells
/// pods apart by it, and it stays the same across restarts.
pub fn sidecar_id(data_dir: &std::path::Path) -> Result<String, ShipError> {
    let path: PathBuf = data_dir.join(ID_FILE);
    let id_error = |source| ShipError::Id { path: path.display().to_string(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(id_error(error)),
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|error| id_error(std::io::Error::other(error.to_string())))?;
    let id = hex::encode(bytes);
    std::fs::create_dir_all(data_dir).map_err(id_error)?;
    std::fs::write(&path, &id).map_err(id_error)?;
    Ok(id)
}

impl Shipping {
    pub fn new(subscription: Arc<Subscription>, sidecar_id: String, interval: Duration, state: &ShipState) -> Shipping {
        let status = ShipStatus {
            cursor: state.cursor,
            shipped_through: state.shipped_through,
            persisted_through: state.shipped_through,
            ..ShipStatus::default()
        };
        Shipping { subscription, sidecar_id, interval, nudge: Notify::new(), synced: watch::Sender::new(0), status: Mutex::new(status) }
    }

    /// Asks for a shipment now instead of at the next interval.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// Nudges and waits until a sync completes after this call, or `limit` passes; true if
    /// one did.
    pub async fn sync_now(&self, limit: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        let before = *synced.borrow_and_update();
        self.nudge();
        matches!(tokio::time::timeout(limit, synced.wait_for(|generation| *generation > before)).await, Ok(Ok(_)))
    }

    pub fn status(&self) -> ShipStatus {
        self.status.lock().map(|status| status.clone()).unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut ShipStatus)) {
        if let Ok(mut status) = self.status.lock() {
            change(&mut status);
        }
    }
}

/// One round trip: ships up to a batch of pending events and the tally, applies the answer.
/// `Ok(true)` when more is waiting (events left, or the feed has more totals).
pub async fn ship_once(sidecar: &Sidecar, shipping: &Shipping, log: &UsageLog) -> Result<bool, ShipError> {
    let mut events = log.pending_front(MAX_BATCH);
    let fetched = events.len();
    let mut event_bytes = 0;
    let n_events = events
        .iter()
        .take_while(|event| {
            event_bytes += event.account.len() + event.meter.len() + event.id.len() + 80;
            event_bytes <= MAX_EVENT_BYTES
        })
        .count()
        .max(1)
        .min(events.len());
    events.truncate(n_events);
    let mut decisions = sidecar.metering.tally().map(|tally| tally.take()).unwrap_or_default();
    let mut tally_bytes = 0;
    let n_rows = decisions
        .iter()
        .take_while(|row| {
            tally_bytes += row.account.len() + row.feature.len() + row.users.iter().map(|user| user.len() + 3).sum::<usize>() + 80;
            tally_bytes <= MAX_TALLY_BYTES
        })
        .count();
    let later = decisions.split_off(n_rows);
    if let Some(tally) = sidecar.metering.tally() {
        tally.restore(&later);
    }
    let since = shipping.status().cursor;
    let now = sidecar.clock().now();
    let batch = UsageBatch {
        sidecar: shipping.sidecar_id.clone(),
        since,
        events: events
            .iter()
            .map(|event| UsageEvent {
                account: event.account.clone(),
                meter: event.meter.clone(),
                id: event.id.clone(),
                amount: event.amount,
                at: Rfc3339(event.at).to_string(),
            })
            .collect(),
        decisions,
        decisions_at: Some(Rfc3339(now).to_string()),
    };
    let body = serde_json::to_vec(&batch).map_err(|error| ShipError::Answer(error.to_string()))?;
    let outcome = shipping.subscription.exchange("POST", USAGE_PATH, Bytes::from(body), MAX_ANSWER).await;
    let answer = match outcome {
        Ok((StatusCode::OK, body)) => serde_json::from_slice::<UsageAnswer>(&body).map_err(|error| ShipError::Answer(error.to_string())),
        Ok((status, body)) => Err(ShipError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(body.get(..body.len().min(300)).unwrap_or_default()).into_owned(),
        }),
        Err(error) => Err(ShipError::Request(error)),
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            // Nothing was counted that we know of: the tally goes with the next batch, and the
            // events stay queued (a batch that did land is recognised by its ids next time).
            if let Some(tally) = sidecar.metering.tally() {
                tally.restore(&batch.decisions);
            }
            return Err(error);
        }
    };
    for rejected in &answer.rejected {
        tracing::warn!(id = %rejected.id, account = %rejected.account, error = %rejected.error, "control plane refused a usage event; it is dropped");
    }
    let totals: Vec<GlobalTotal> = answer
        .totals
        .iter()
        .filter_map(|total| {
            Some(GlobalTotal {
                account: total.account.clone(),
                meter: total.meter.clone(),
                period_start: parse_rfc3339(&total.period_start)?,
                used: total.used,
            })
        })
        .collect();
    let shipped: Vec<Shipped<'_>> = events
        .iter()
        .map(|event| Shipped { account: &event.account, meter: &event.meter, period_start: event.period_start, amount: event.amount })
        .collect();
    sidecar.usage.apply_sync(&shipped, &totals);
    let through = events.last().map(|event| event.seq);
    if let Some(through) = through {
        log.shipped(through);
    }
    let n_rejected = answer.rejected.len() as u64;
    shipping.update(|status| {
        status.cursor = answer.cursor;
        if let Some(through) = through {
            status.shipped_through = status.shipped_through.max(through);
        }
        status.last_sync_at_ms = Some(sidecar.clock().now_ms());
        status.last_error = None;
        status.events_shipped += events.len() as u64;
        status.events_rejected += n_rejected;
    });
    sidecar.metrics.usage_shipped(events.len() as u64, n_rejected);
    sidecar.metrics.usage_pending(log.n_pending());
    shipping.synced.send_modify(|generation| *generation += 1);
    // More is waiting when the batch was cut short (by count or size), when decision rows
    // were held back, or when the feed has more totals.
    let cut_short = n_events < fetched || fetched == MAX_BATCH;
    Ok(answer.more || cut_short || !later.is_empty())
}

/// Writes `state.json` when shipping moved on, then lets the log delete what is counted.
fn persist(sidecar: &Sidecar, shipping: &Shipping, log: &UsageLog, data_dir: &std::path::Path) {
    let status = shipping.status();
    let state = ShipState { shipped_through: status.shipped_through, cursor: status.cursor, totals: sidecar.usage.global_totals() };
    match write_state(data_dir, &state) {
        Ok(()) => {
            shipping.update(|status| status.persisted_through = state.shipped_through);
            log.compact(state.shipped_through);
        }
        Err(error) => tracing::warn!(%error, "cannot record shipping progress; segments are kept until it can"),
    }
}

/// Ships until `shutdown` resolves.
pub async fn run(sidecar: Arc<Sidecar>, shipping: Arc<Shipping>, log: Arc<UsageLog>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let data_dir = shipping.subscription.data_dir.clone();
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    let mut last_persist = Instant::now();
    let mut more = true;
    loop {
        if !more {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(shipping.interval) => {}
                () = shipping.nudge.notified() => {}
            }
        }
        match ship_once(&sidecar, &shipping, &log).await {
            Ok(more_waiting) => {
                more = more_waiting;
                backoff.reset();
                let status = shipping.status();
                if status.shipped_through > status.persisted_through && (last_persist.elapsed() >= PERSIST_EVERY || !more) {
                    let (sidecar, shipping, log, data_dir) =
                        (Arc::clone(&sidecar), Arc::clone(&shipping), Arc::clone(&log), data_dir.clone());
                    let _ = tokio::task::spawn_blocking(move || persist(&sidecar, &shipping, &log, &data_dir)).await;
                    last_persist = Instant::now();
                }
            }
            Err(error) => {
                more = false;
                sidecar.metrics.usage_ship_failed();
                let delay = backoff.fail();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, pending = log.n_pending(), "usage shipment failed");
                shipping.update(|status| status.last_error = Some(error.to_string()));
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// On shutdown: ships what it can within `limit`, records progress, and returns how many
/// events stay in the log for the next start.
pub async fn flush(sidecar: &Arc<Sidecar>, shipping: &Arc<Shipping>, log: &Arc<UsageLog>, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, ship_once(sidecar, shipping, log)).await {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) => break,
            Ok(Err(error)) => {
                tracing::warn!(%error, "usage flush on shutdown failed; unshipped events stay in the log");
                break;
            }
            Err(_) => break,
        }
    }
    let (sidecar, shipping_clone, log_clone) = (Arc::clone(sidecar), Arc::clone(shipping), Arc::clone(log));
    let data_dir = shipping.subscription.data_dir.clone();
    let _ = tokio::task::spawn_blocking(move || persist(&sidecar, &shipping_clone, &log_clone, &data_dir)).await;
    log.n_pending()
}

/// Rebuilds the in-memory usage from what the log held at start: the cached global totals,
/// then every event (its id remembered; unshipped ones are local usage again).
/// Events come back in the order they were accepted, so each one's own period is the newest
/// its meter had seen when it was accepted (a late event of an earlier period stays out of the
/// current count, as it did then).
pub fn restore(usage: &crate::usage::UsageStore, events: &[LoggedEvent], state: &ShipState, now: i64) {
    usage.apply_sync(&[], &state.totals);
    for event in events {
        usage.replay(
            &crate::usage::MeterEvent {
                account: &event.account,
                meter: &event.meter,
                event_id: &event.id,
                amount: event.amount,
                period_start: event.period_start,
                current_period_start: event.period_start,
                hard_limit: None,
                local_cap: None,
                now: event.recorded_at.min(now),
            },
            event.seq <= state.shipped_through,
        );
    }
}
