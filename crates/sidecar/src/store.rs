//! The serving view: an arc-swap cell that readers load without blocking, holding a verified
//! base snapshot plus an overlay of the accounts that verified deltas changed; the install
//! path that only ever replaces it with a newer view (a new base, deltas on the serving base,
//! or both); and the readiness latch. A replaced base is dropped on a reaper thread, never on a
//! request.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rkyv::util::AlignedVec;

use arc_swap::ArcSwapOption;
use arc_swap::Guard;

use crate::telemetry::{Metrics, RejectCause};
use tollgate_core::clock::{Clock, Stopwatch};
use tollgate_snapshot::{ApplyError, Delta, ServingView, Snapshot};

/// Why an offered snapshot was not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("snapshot revision {offered} is not newer than the serving revision {serving}")]
    NotNewer { offered: u64, serving: u64 },
    #[error(
        "snapshot revision {offered} is older than revision {highest}, which this sidecar installed before; refusing a rollback (start with `--allow-rollback` to accept it)"
    )]
    Rollback { offered: u64, highest: u64 },
    #[error("a delta came without a base to apply it to: no snapshot is serving yet")]
    NoBase,
    #[error(transparent)]
    Delta(#[from] ApplyError),
}

impl InstallError {
    /// The metric cause of a refused install.
    pub fn cause(&self) -> RejectCause {
        match self {
            InstallError::NotNewer { .. } | InstallError::Delta(ApplyError::NotNewer { .. }) => RejectCause::NotNewer,
            InstallError::Rollback { .. } => RejectCause::Rollback,
            InstallError::NoBase | InstallError::Delta(ApplyError::BaseMismatch { .. }) => RejectCause::BaseMismatch,
            InstallError::Delta(ApplyError::Gap { .. }) => RejectCause::Gap,
        }
    }
}

/// Why the record of the highest installed revision could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RollbackGuardError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("`{path}` should hold the highest installed snapshot revision, a whole number; it holds `{text}`")]
    Malformed { path: String, text: String },
}

/// The file in `--data-dir` that keeps the highest revision installed.
pub const HIGHEST_REVISION_FILE: &str = "highest-revision";

#[derive(Debug, Clone, Default)]
struct UpdateStatus {
    /// The outstanding problem, cleared once a good snapshot installs (or the source confirms
    /// the serving one).
    last_error: Option<String>,
    last_error_at_ms: Option<i64>,
    /// The last update refused, kept after it is resolved, for the record.
    last_rejected: Option<String>,
    last_rejected_at_ms: Option<i64>,
    loaded_at_ms: Option<i64>,
}

pub struct SnapshotStore {
    current: ArcSwapOption<ServingView>,
    /// Turns true with the first good snapshot and never back (a latch).
    ready: AtomicBool,
    /// Serializes installers so the revision check and the swap are one step.
    install_lock: Mutex<()>,
    status: Mutex<UpdateStatus>,
    swaps: AtomicU64,
    rejects: AtomicU64,
    metrics: Arc<Metrics>,
    /// Unix ms when the source last confirmed that the serving snapshot is current (a
    /// control-plane answer, or the snapshot's own creation time).
    synced_at_ms: AtomicI64,
    /// Answers are marked stale once the last confirmation is older than this; 0 = never.
    max_staleness_ms: AtomicI64,
    /// Whether `/readyz` turns unready while stale.
    unready_when_stale: AtomicBool,
    /// The buffer of the last snapshot retired, kept a little while for the next load.
    spare: Arc<Mutex<Option<AlignedVec>>>,
    /// Where time comes from: staleness, load and error times.
    clock: Arc<dyn Clock>,
    /// Unix ms when an update was received (a changed file, a snapshot from the control plane)
    /// that is neither installed nor rejected yet; 0 = none.
    pending_since_ms: AtomicI64,
    /// Largest snapshot file or download accepted, in bytes (`--max-snapshot-bytes`).
    max_snapshot_bytes: AtomicU64,
    /// The highest revision ever installed, as recorded in `--data-dir`: older snapshots are
    /// refused, across restarts too. 0: none.
    highest: AtomicU64,
    /// Where the highest revision is recorded, when there is a data directory.
    highest_file: Mutex<Option<std::path::PathBuf>>,
}

/// How long a retired snapshot's buffer is kept for reuse; past it, it is freed, so memory
/// between swaps stays at one snapshot.
const SPARE_KEEP: Duration = Duration::from_secs(10);

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore").field("ready", &self.is_ready()).finish()
    }
}

/// What `/v1/status` reports about updates.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub swaps: u64,
    pub rejects: u64,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    pub last_rejected: Option<String>,
    pub last_rejected_at_ms: Option<i64>,
    pub loaded_at_ms: Option<i64>,
}

impl SnapshotStore {
    pub fn new(metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> SnapshotStore {
        SnapshotStore {
            current: ArcSwapOption::const_empty(),
            ready: AtomicBool::new(false),
            install_lock: Mutex::new(()),
            status: Mutex::new(UpdateStatus::default()),
            swaps: AtomicU64::new(0),
            rejects: AtomicU64::new(0),
            metrics,
            synced_at_ms: AtomicI64::new(0),
            max_staleness_ms: AtomicI64::new(0),
            unready_when_stale: AtomicBool::new(false),
            spare: Arc::new(Mutex::new(None)),
            clock,
            pending_since_ms: AtomicI64::new(0),
            max_snapshot_bytes: AtomicU64::new(tollgate_snapshot::DEFAULT_MAX_FILE_BYTES),
            highest: AtomicU64::new(0),
            highest_file: Mutex::new(None),
        }
    }

    /// The clock this store (and the sidecar around it) reads time from.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The serving view. Keep the guard for a whole request so it sees one revision.
    pub fn load(&self) -> Guard<Option<Arc<ServingView>>> {
        self.current.load()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> Option<u64> {
        self.current.load().as_ref().map(|view| view.revision())
    }

    /// The serving view's base revision, if one is serving.
    pub fn base_revision(&self) -> Option<u64> {
        self.current.load().as_ref().map(|view| view.base_revision())
    }

    /// Installs a verified base snapshot, with nothing on top, if it is newer than the serving
    /// view.
    pub fn install(&self, snapshot: Snapshot) -> Result<u64, InstallError> {
        self.install_chain(Some(snapshot), Vec::new())
    }

    /// Installs verified deltas on the serving view, or on `base` when one comes with them (a
    /// control plane that compacted sends its new base and the deltas after it). Each delta must
    /// apply to exactly the view before it (`ServingView::apply`). The result must be newer
    /// than the serving view, or, for a new base, at least as new (the same accounts, with a
    /// smaller overlay). When a delta does not apply, the ones before it are still installed
    /// and the refusal is recorded; the serving view is never left half-changed.
    pub fn install_chain(&self, base: Option<Snapshot>, deltas: Vec<Delta>) -> Result<u64, InstallError> {
        let _installing = self.install_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let serving = self.current.load_full();
        let new_base = base.is_some();
        let mut view = match (base, serving.as_ref()) {
            (Some(base), _) => ServingView::new(base),
            (None, Some(serving)) => ServingView::clone(serving),
            (None, None) => return Err(self.refuse(InstallError::NoBase)),
        };
        let mut refused = None;
        for delta in deltas {
            match view.apply(delta) {
                Ok(applied) => view = applied,
                Err(error) => {
                    refused = Some(InstallError::Delta(error));
                    break;
                }
            }
        }
        let offered = view.revision();
        if let Some(serving) = serving.as_ref() {
            let rebased = new_base && view.base_revision() > serving.base_revision();
            let newer = offered > serving.revision() || (rebased && offered == serving.revision());
            if !newer {
                // A refused delta says more than "not newer" about why nothing moved.
                let error = refused.unwrap_or(InstallError::NotNewer { offered, serving: serving.revision() });
                return Err(self.refuse(error));
            }
        }
        let highest = self.highest.load(Ordering::Relaxed);
        if offered < highest {
            return Err(self.refuse(InstallError::Rollback { offered, highest }));
        }
        self.record_highest(offered);
        let (base_revision, overlay) = (view.base_revision(), view.overlay_len());
        let n_accounts = view.account_count();
        self.synced_at_ms.fetch_max(view.created_at_ms(), Ordering::Relaxed);
        let view = Arc::new(view);
        let old = self.current.swap(Some(Arc::clone(&view)));
        self.ready.store(true, Ordering::Release);
        self.swaps.fetch_add(1, Ordering::Relaxed);
        self.metrics.swapped(offered, n_accounts);
        self.metrics.overlay(base_revision, overlay);
        self.pending_since_ms.store(0, Ordering::Relaxed);
        if let Ok(mut status) = self.status.lock() {
            status.loaded_at_ms = Some(self.clock.now_ms());
            status.last_error = None;
            status.last_error_at_ms = None;
        }
        match old {
            // A new base: the old one is large, so it goes on the reaper thread.
            Some(old) if !old.same_base(&view) => retire(old, Arc::clone(&self.spare)),
            // Deltas only: the old view shares its base and most of its overlay with the new.
            _ => {}
        }
        tracing::info!(revision = offered, base_revision, overlay, accounts = n_accounts, "snapshot installed");
        if let Some(error) = refused {
            self.refuse(error);
        }
        Ok(offered)
    }

    /// Records a refused install and hands the error back.
    fn refuse(&self, error: InstallError) -> InstallError {
        self.reject(error.cause(), &error.to_string());
        error
    }

    /// Keeps the highest installed revision in `path` from now on, and refuses snapshots older
    /// than the one recorded there, unless `allow_rollback` (then the record starts afresh
    /// from the next install). As TUF clients do: a replayed old signed snapshot cannot take
    /// back what a newer one granted or revoked, not even across a restart.
    pub fn guard_rollback(&self, path: std::path::PathBuf, allow_rollback: bool) -> Result<(), RollbackGuardError> {
        let display = path.display().to_string();
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                text.trim()
                    .parse::<u64>()
                    .map_err(|_| RollbackGuardError::Malformed { path: display.clone(), text: text.chars().take(40).collect() })?,
            ),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(RollbackGuardError::Read { path: display, source }),
        };
        if let Some(recorded) = recorded {
            if allow_rollback {
                tracing::warn!(recorded, "--allow-rollback: snapshots older than the highest installed revision are accepted");
            } else {
                self.highest.fetch_max(recorded, Ordering::Relaxed);
            }
        }
        if let Ok(mut slot) = self.highest_file.lock() {
            *slot = Some(path);
        }
        Ok(())
    }

    /// The highest revision installed before, if recorded.
    pub fn highest_revision(&self) -> Option<u64> {
        Some(self.highest.load(Ordering::Relaxed)).filter(|highest| *highest > 0)
    }

    /// Records `revision` as installed, in memory and in the data directory.
    fn record_highest(&self, revision: u64) {
        self.highest.fetch_max(revision, Ordering::Relaxed);
        let path = self.highest_file.lock().ok().and_then(|slot| slot.clone());
        if let Some(path) = path
            && let Err(error) = tollgate_http::fs::write_atomically(&path, format!("{revision}\n").as_bytes())
        {
            tracing::warn!(%error, path = %path.display(), "cannot record the highest installed revision");
        }
    }

    /// Largest snapshot accepted, in bytes: files are refused unread past it.
    pub fn max_snapshot_bytes(&self) -> u64 {
        self.max_snapshot_bytes.load(Ordering::Relaxed)
    }

    pub fn set_max_snapshot_bytes(&self, max: u64) {
        self.max_snapshot_bytes.store(max, Ordering::Relaxed);
    }

    /// The retired snapshot's buffer, if one is being kept, for the next load.
    pub fn take_spare(&self) -> Option<AlignedVec> {
        self.spare.lock().ok().and_then(|mut slot| slot.take())
    }

    /// Configures staleness: past `max_staleness` without a confirmation from the source,
    /// answers are marked stale (and `/readyz` turns unready when `unready_when_stale`).
    pub fn set_staleness(&self, max_staleness: Duration, unready_when_stale: bool) {
        self.max_staleness_ms.store(i64::try_from(max_staleness.as_millis()).unwrap_or(i64::MAX), Ordering::Relaxed);
        self.unready_when_stale.store(unready_when_stale, Ordering::Relaxed);
    }

    /// The source confirmed that the serving snapshot is current: whatever went wrong
    /// before is no longer outstanding.
    pub fn mark_synced(&self) {
        self.synced_at_ms.fetch_max(self.clock.now_ms(), Ordering::Relaxed);
        if let Ok(mut status) = self.status.lock() {
            status.last_error = None;
            status.last_error_at_ms = None;
        }
    }

    /// An update was received and waits to be verified and installed; the oldest such moment
    /// is kept until it is installed or rejected.
    pub fn mark_pending(&self) {
        let _ = self.pending_since_ms.compare_exchange(0, self.clock.now_ms().max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long an update has been received but not installed (nor rejected), in seconds.
    pub fn pending_seconds(&self) -> Option<f64> {
        let since = self.pending_since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| self.clock.now_ms().saturating_sub(since).max(0) as f64 / 1000.0)
    }

    /// Unix ms of the last confirmation, if any.
    pub fn synced_at_ms(&self) -> Option<i64> {
        Some(self.synced_at_ms.load(Ordering::Relaxed)).filter(|synced| *synced > 0)
    }

    /// Whether the serving snapshot is past the configured staleness.
    pub fn is_stale(&self) -> bool {
        let max = self.max_staleness_ms.load(Ordering::Relaxed);
        max > 0 && self.clock.now_ms().saturating_sub(self.synced_at_ms.load(Ordering::Relaxed)) > max
    }

    /// Ready, and not stale when staleness is configured to make it unready.
    pub fn is_serving_ready(&self) -> bool {
        self.is_ready() && !(self.unready_when_stale.load(Ordering::Relaxed) && self.is_stale())
    }

    /// Records a rejected update: a log line, a metric and the status's last error. The
    /// serving snapshot is untouched.
    pub fn reject(&self, cause: RejectCause, message: &str) {
        tracing::warn!(cause = cause.as_str(), error = message, "snapshot update rejected");
        self.rejects.fetch_add(1, Ordering::Relaxed);
        self.metrics.rejected(cause);
        self.pending_since_ms.store(0, Ordering::Relaxed);
        let now_ms = self.clock.now_ms();
        if let Ok(mut status) = self.status.lock() {
            status.last_error = Some(message.to_string());
            status.last_error_at_ms = Some(now_ms);
            status.last_rejected = Some(message.to_string());
            status.last_rejected_at_ms = Some(now_ms);
        }
    }

    pub fn status(&self) -> StoreStatus {
        let status = self.status.lock().map(|status| status.clone()).unwrap_or_default();
        StoreStatus {
            swaps: self.swaps.load(Ordering::Relaxed),
            rejects: self.rejects.load(Ordering::Relaxed),
            last_error: status.last_error,
            last_error_at_ms: status.last_error_at_ms,
            last_rejected: status.last_rejected,
            last_rejected_at_ms: status.last_rejected_at_ms,
            loaded_at_ms: status.loaded_at_ms,
        }
    }
}

/// Drops a replaced snapshot on a background thread once no request holds it, so freeing a
/// large archive never lands on a request. arc-swap turns the readers' outstanding guards
/// into counted references during the swap, so the strong count covers every reader.
/// Its buffer is then kept for a while as the store's spare, for the next load to reuse.
fn retire(old: Arc<ServingView>, spare: Arc<Mutex<Option<AlignedVec>>>) {
    let spawned = std::thread::Builder::new().name("tollgate-reaper".into()).spawn(move || {
        // Returning a large archive's pages to the kernel is background work too.
        super::background::lower_priority();
        let waiting = Stopwatch::start();
        while Arc::strong_count(&old) > 1 && waiting.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let Some(snapshot) = Arc::try_unwrap(old).ok().and_then(ServingView::into_base) else { return };
        let buffer = snapshot.into_buffer();
        let address = buffer.as_ptr() as usize;
        if let Ok(mut slot) = spare.lock() {
            *slot = Some(buffer);
        }
        std::thread::sleep(SPARE_KEEP);
        // Freed here unless a load took it (or a newer one replaced it) meanwhile.
        let expired = spare.lock().ok().and_then(|mut slot| match slot.as_ref() {
            Some(buffer) if buffer.as_ptr() as usize == address => slot.take(),
            _ => None,
        });
        drop(expired);
    });
    if let Err(error) = spawned {
        // Without a thread the old snapshot is dropped by whoever holds it last.
        tracing::warn!(%error, "cannot start the reaper thread");
    }
}
