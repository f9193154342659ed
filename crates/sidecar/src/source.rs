//! Where snapshots come from: a signed snapshot file, (dev mode) a policies directory
//! compiled in-process and signed with an ephemeral key, or a control-plane subscription
//! (`subscribe`), whose on-disk cache is what `load` reads at start. Files are watched by
//! polling their metadata, which also catches a file replaced by an atomic rename. Every
//! candidate goes through the same verification before it reaches the store.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rkyv::util::AlignedVec;

use super::store::{InstallError, SnapshotStore};
use super::subscribe::{self, Subscription};
use crate::telemetry::RejectCause;
use tollgate_core::clock::Stopwatch;
use tollgate_policy::{ACCOUNTS_DIR, CATALOG_FILE, PolicyErrors};
use tollgate_snapshot::{self, ReadError, Snapshot, SnapshotError, TrustedKeys};

pub enum Source {
    File(PathBuf),
    Policies { dir: PathBuf, key: Box<SigningKey> },
    ControlPlane(Arc<Subscription>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    /// Not a regular file, or larger than `--max-snapshot-bytes`: refused before reading.
    #[error(transparent)]
    Refused(ReadError),
    #[error(transparent)]
    Compile(#[from] PolicyErrors),
    #[error(transparent)]
    Build(SnapshotError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl LoadError {
    pub fn cause(&self) -> RejectCause {
        match self {
            LoadError::Read { .. } | LoadError::Refused(_) => RejectCause::Read,
            LoadError::Compile(_) | LoadError::Build(_) => RejectCause::Compile,
            LoadError::Snapshot(SnapshotError::UntrustedKey(_)) => RejectCause::UntrustedKey,
            LoadError::Snapshot(SnapshotError::BadSignature(_)) => RejectCause::Signature,
            LoadError::Snapshot(SnapshotError::Invalid(_)) => RejectCause::Validation,
            LoadError::Snapshot(_) => RejectCause::Framing,
        }
    }
}

/// What changes when a watched file changes: size, modification time and inode (a rename
/// brings a new inode even when size and time match).
pub type Fingerprint = Vec<(PathBuf, u64, i64, i64, u64)>;

fn file_fingerprint(path: &Path) -> Option<(PathBuf, u64, i64, i64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((path.to_path_buf(), metadata.len(), metadata.mtime(), metadata.mtime_nsec(), metadata.ino()))
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::File(path) => format!("file:{}", path.display()),
            Source::Policies { dir, .. } => format!("policies:{}", dir.display()),
            Source::ControlPlane(subscription) => subscription.describe(),
        }
    }

    /// What the source's files look like now. Taken before a load, it is what that load saw
    /// (or older), so a watcher that starts from it cannot miss a change made meanwhile.
    pub fn fingerprint(&self) -> Fingerprint {
        match self {
            Source::File(path) => file_fingerprint(path).into_iter().collect(),
            Source::ControlPlane(subscription) => file_fingerprint(&subscription.cache_path()).into_iter().collect(),
            Source::Policies { dir, .. } => {
                let mut paths = vec![dir.join(CATALOG_FILE), dir.join(ACCOUNTS_DIR)];
                if let Ok(entries) = std::fs::read_dir(dir.join(ACCOUNTS_DIR)) {
                    paths.extend(entries.flatten().map(|entry| entry.path()));
                }
                paths.sort();
                paths.iter().filter_map(|path| file_fingerprint(path)).collect()
            }
        }
    }

    /// Reads (or compiles and signs) and verifies a snapshot. `serving` is the revision in
    /// use; a compiled snapshot gets a newer one.
    /// `spare` is a retired snapshot's buffer to read into, if there is one.
    /// `now_ms` stamps (and numbers) a snapshot compiled in dev mode. Files larger than
    /// `max_bytes` are refused unread.
    pub fn load(
        &self,
        trusted: &TrustedKeys,
        serving: Option<u64>,
        spare: Option<AlignedVec>,
        now_ms: i64,
        max_bytes: u64,
    ) -> Result<Snapshot, LoadError> {
        let read_error = |error| match error {
            ReadError::Io { path, source } => LoadError::Read { path, source },
            ReadError::Snapshot(error) => LoadError::Snapshot(error),
            refused => LoadError::Refused(refused),
        };
        match self {
            Source::ControlPlane(subscription) => {
                Snapshot::read_file_into(&subscription.cache_path(), trusted, spare, max_bytes).map_err(read_error)
            }
            Source::File(path) => Snapshot::read_file_into(path, trusted, spare, max_bytes).map_err(read_error),
            Source::Policies { dir, key } => {
                let data = tollgate_policy::compile_dir(dir)?;
                let revision = (now_ms.max(0) as u64).max(serving.map_or(0, |serving| serving + 1));
                let bytes = tollgate_snapshot::build(&data, revision, now_ms, key).map_err(LoadError::Build)?;
                Ok(Snapshot::verify(&bytes, trusted)?)
            }
        }
    }
}

/// Why a reload did not install a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A subscription's first start: nothing cached yet, and nothing rejected.
    #[error("no cached snapshot at `{0}` yet")]
    NoCache(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error("snapshot loading did not finish")]
    Unfinished,
}

/// Loads the source once and installs the result; failures are recorded as rejects.
pub fn reload(source: &Source, trusted: &TrustedKeys, store: &SnapshotStore) -> Result<u64, ReloadError> {
    // A subscription with no cache yet (first start) has nothing to load; that is not a
    // rejected update.
    if let Source::ControlPlane(subscription) = source
        && !subscription.cache_path().exists()
    {
        return Err(ReloadError::NoCache(subscription.cache_path().display().to_string()));
    }
    let started = Stopwatch::start();
    let loaded = source.load(trusted, store.revision(), store.take_spare(), store.clock().now_ms(), store.max_snapshot_bytes());
    finish(source, trusted, store, Some(loaded), started)
}

/// Like [`reload`], with loading and verifying on the low-priority loader thread, escalated to
/// normal priority after [`background::DEADLINE`]; the install happens here, once.
pub async fn reload_in_background(
    source: &Arc<Source>,
    trusted: &Arc<TrustedKeys>,
    store: &Arc<SnapshotStore>,
) -> Result<u64, ReloadError> {
    let started = Stopwatch::start();
    let (source_ref, trusted_ref, store_ref) = (Arc::clone(source), Arc::clone(trusted), Arc::clone(store));
    let loaded = super::background::run_with_deadline(
        move || {
            let max_bytes = store_ref.max_snapshot_bytes();
            source_ref.load(&trusted_ref, store_ref.revision(), store_ref.take_spare(), store_ref.clock().now_ms(), max_bytes)
        },
        super::background::DEADLINE,
    )
    .await;
    finish(source, trusted, store, loaded, started)
}

fn finish(
    source: &Source,
    trusted: &TrustedKeys,
    store: &SnapshotStore,
    loaded: Option<Result<Snapshot, LoadError>>,
    started: Stopwatch,
) -> Result<u64, ReloadError> {
    match loaded {
        Some(Ok(snapshot)) => {
            let loaded = started.elapsed();
            // A subscription's cache holds the deltas on that base too: installed with it, as
            // one step (the base alone may be older than the highest revision installed).
            let revision = match source {
                Source::ControlPlane(subscription) => {
                    let deltas = subscribe::cached_deltas(subscription, trusted, snapshot.revision(), store.max_snapshot_bytes());
                    store.install_chain(Some(snapshot), deltas)?
                }
                _ => store.install(snapshot)?,
            };
            tracing::info!(
                revision,
                load_verify_ms = loaded.as_secs_f64() * 1e3,
                total_ms = started.elapsed().as_secs_f64() * 1e3,
                source = %source.describe(),
                "snapshot loaded, verified and swapped"
            );
            Ok(revision)
        }
        Some(Err(error)) => {
            store.reject(error.cause(), &error.to_string());
            Err(ReloadError::Load(error))
        }
        None => {
            let error = ReloadError::Unfinished;
            store.reject(RejectCause::Read, &error.to_string());
            Err(error)
        }
    }
}

/// Polls the source every `interval` and reloads it when its files differ from `seen` (the
/// fingerprint taken before the first load), until `shutdown` resolves; a control-plane source
/// is followed by `subscribe::run` instead.
/// Looking at file metadata is cheap and runs on the blocking pool; loading and verifying run
/// on the low-priority loader thread (`background`), off the request path, within a deadline.
pub async fn watch(
    source: Arc<Source>,
    trusted: Arc<TrustedKeys>,
    store: Arc<SnapshotStore>,
    interval: Duration,
    seen: Fingerprint,
    shutdown: impl std::future::Future<Output = ()>,
) {
    if let Source::ControlPlane(subscription) = source.as_ref() {
        return subscribe::run(Arc::clone(subscription), trusted, store, shutdown).await;
    }
    tokio::pin!(shutdown);
    let fingerprint = |source: &Arc<Source>| {
        let source = Arc::clone(source);
        async move { tokio::task::spawn_blocking(move || source.fingerprint()).await.unwrap_or_default() }
    };
    let mut last = seen;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let seen = fingerprint(&source).await;
        // Nothing to do when nothing changed, or when the file is momentarily absent
        // (between an unlink and a rename).
        if seen == last || seen.is_empty() {
            continue;
        }
        // Let a writer that is still writing finish before reading.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let settled = fingerprint(&source).await;
        if settled != seen {
            continue;
        }
        // Pending from here: the reload below ends in an install or a reject, and either
        // clears it. (Marked earlier, a file changed back before settling would leave it set.)
        store.mark_pending();
        let _ = reload_in_background(&source, &trusted, &store).await;
        last = settled;
    }
}
