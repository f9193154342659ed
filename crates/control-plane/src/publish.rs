//! Snapshot publishing at the cost of the change. At start one background task compiles the
//! catalog with every account into a signed base. After that, every committed change raises
//! the wanted revision, and the task compiles only the accounts changed since the revision
//! last published into a signed delta on that base (commits made while it works are covered
//! by the next delta: coalesced). Sidecars on the current base fetch only the deltas after
//! their revision; others fetch the base and every delta on it.
//!
//! Once the accounts changed since the base (or the deltas on it) pass `compact_after`, a
//! new base is compiled in the background while deltas keep flowing on the old one; when it
//! is ready, one catch-up delta on it covers the commits made meanwhile, and it replaces the
//! old base. Memory holds one base, the deltas on it and, during a compaction, the one being
//! built. Long-polling subscribers wait on a watch channel for a revision newer than theirs.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use tokio::sync::watch;

use super::accounts;
use super::metrics::ControlPlaneMetrics;
use super::store::Repository;
use tollgate_core::clock::{Clock, Stopwatch};
use tollgate_core::model::{DeltaAccount, DeltaData};
use tollgate_policy::{Catalog, Source};
use tollgate_snapshot as snapshot;

/// Compact once this many accounts changed since the base (or this many deltas were
/// published on it), unless configured otherwise (`--compact-after`).
pub const DEFAULT_COMPACT_AFTER: usize = 10_000;

/// A signed base snapshot.
#[derive(Debug)]
pub struct BaseFile {
    pub revision: u64,
    pub bytes: Bytes,
}

/// A signed delta: applied after revision `follows`, it makes revision `revision`.
#[derive(Debug)]
pub struct DeltaFile {
    pub follows: u64,
    pub revision: u64,
    pub bytes: Bytes,
}

/// What is offered to sidecars: the newest revision, as a base and the deltas on it.
#[derive(Debug)]
pub struct Published {
    pub revision: u64,
    pub base: Arc<BaseFile>,
    /// The deltas on `base`, each following the one before; the first follows the base.
    pub deltas: Vec<Arc<DeltaFile>>,
    pub created_at_ms: i64,
    /// The base and every delta back to back, made on first demand and shared after.
    bundle: OnceLock<Bytes>,
}

impl Published {
    fn new(base: Arc<BaseFile>, deltas: Vec<Arc<DeltaFile>>, created_at_ms: i64) -> Published {
        let revision = deltas.last().map_or(base.revision, |delta| delta.revision);
        Published { revision, base, deltas, created_at_ms, bundle: OnceLock::new() }
    }

    /// What brings a sidecar serving revision `after` on base `base` to this revision: the
    /// deltas after `after` when it stands on this base, else the base and every delta on it.
    pub fn answer_for(&self, after: u64, base: Option<u64>) -> Bytes {
        if base == Some(self.base.revision) {
            let from = if after == self.base.revision { Some(0) } else { self.deltas.iter().position(|delta| delta.follows == after) };
            if let Some(from) = from {
                return join(None, self.deltas.get(from..).unwrap_or_default());
            }
        }
        self.bundle.get_or_init(|| join(Some(&self.base), &self.deltas)).clone()
    }

    /// Whether a sidecar serving `after` on `base` has something to fetch: a newer revision,
    /// or the same revision on a newer base (after a compaction).
    pub fn is_news_for(&self, after: u64, base: Option<u64>) -> bool {
        self.revision > after || base.is_some_and(|base| base < self.base.revision && self.revision >= after)
    }
}

fn join(base: Option<&BaseFile>, deltas: &[Arc<DeltaFile>]) -> Bytes {
    let len = base.map_or(0, |base| base.bytes.len()) + deltas.iter().map(|delta| delta.bytes.len()).sum::<usize>();
    if base.is_none() && deltas.len() == 1 {
        return deltas.first().map(|delta| delta.bytes.clone()).unwrap_or_default();
    }
    let mut joined = Vec::with_capacity(len);
    if let Some(base) = base {
        joined.extend_from_slice(&base.bytes);
    }
    for delta in deltas {
        joined.extend_from_slice(&delta.bytes);
    }
    Bytes::from(joined)
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error(transparent)]
    Compile(#[from] super::accounts::CompileError),
    #[error(transparent)]
    Build(#[from] tollgate_snapshot::SnapshotError),
    #[error("the publishing task stopped: {0}")]
    Task(String),
}

#[derive(Debug)]
pub struct Publisher {
    latest: watch::Sender<Option<Arc<Published>>>,
    /// The newest committed revision.
    wanted: watch::Sender<u64>,
    last_error: Mutex<Option<String>>,
    metrics: Arc<ControlPlaneMetrics>,
}

impl Publisher {
    pub fn new(committed: u64, metrics: Arc<ControlPlaneMetrics>) -> Publisher {
        metrics.committed(committed);
        Publisher { latest: watch::Sender::new(None), wanted: watch::Sender::new(committed), last_error: Mutex::new(None), metrics }
    }

    /// Records a committed revision; the publishing task picks it up.
    pub fn committed(&self, revision: u64) {
        self.metrics.committed(revision);
        self.wanted.send_if_modified(|wanted| {
            let newer = revision > *wanted;
            if newer {
                *wanted = revision;
            }
            newer
        });
    }

    pub fn latest(&self) -> Option<Arc<Published>> {
        self.latest.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.latest.subscribe()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|error| error.clone()).unwrap_or_default()
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut last_error) = self.last_error.lock() {
            *last_error = error;
        }
    }
}

/// Compiles and signs the repository's current state as a base, stamped `created_at_ms`.
pub fn build_base(repository: &dyn Repository, catalog: &Catalog, key: &SigningKey, created_at_ms: i64) -> Result<BaseFile, PublishError> {
    // The repository is read on a second thread and each account turned into compiler input
    // there, a bounded queue ahead of the compiler: at no point are all stored documents in
    // memory, only the compiled accounts.
    let (sender, receiver) = std::sync::mpsc::sync_channel(BUILD_QUEUE);
    let (read, compiled) = std::thread::scope(|scope| {
        let reader = std::thread::Builder::new().name("tollgate-base-reader".into()).spawn_scoped(scope, move || {
            repository.for_each_account(&mut |id, account| {
                // The compiler only stops taking accounts by panicking, which the scope passes on.
                let _ = sender.send((id, accounts::account_spec(&account)));
                Ok(())
            })
        });
        let compiled = accounts::compile_stream(catalog, receiver.iter());
        let read = match reader {
            Ok(reader) => reader.join().unwrap_or_else(|_| Err(super::store::StoreError::Thread("it panicked".into()))),
            Err(error) => Err(super::store::StoreError::Thread(error.to_string())),
        };
        (read, compiled)
    });
    let revision = read?;
    let data = compiled?;
    let bytes = snapshot::build(&data, revision, created_at_ms, key)?;
    Ok(BaseFile { revision, bytes: Bytes::from(bytes) })
}

/// How many accounts the reader of a full build may be ahead of the compiler.
const BUILD_QUEUE: usize = 4096;

/// Compiles the accounts changed after revision `follows` into a signed delta on base
/// `base_revision`; also gives the ids it carries.
pub fn build_delta(
    repository: &dyn Repository,
    catalog: &Catalog,
    key: &SigningKey,
    base_revision: u64,
    follows: u64,
    created_at_ms: i64,
) -> Result<(DeltaFile, Vec<String>), PublishError> {
    let (revision, changed) = repository.accounts_changed_since(follows)?;
    let mut compiled = accounts::compile_with(catalog, &changed)?;
    let ids: Vec<String> = changed.into_iter().map(|(id, _)| id).collect();
    let mut delta_accounts: Vec<DeltaAccount> =
        ids.iter().filter_map(|id| compiled.accounts.remove(id).map(|account| DeltaAccount { id: id.clone(), account })).collect();
    delta_accounts.sort_by(|a, b| a.id.cmp(&b.id));
    let data = DeltaData {
        feature_sets: std::mem::take(&mut compiled.feature_sets),
        limit_sets: std::mem::take(&mut compiled.limit_sets),
        accounts: delta_accounts,
        removed: Vec::new(),
    };
    // A commit that changed no account (a catalog bump) still moves the revision on.
    let revision = revision.max(follows + 1);
    let bytes = snapshot::build_delta(&data, base_revision, follows, revision, created_at_ms, key)?;
    Ok((DeltaFile { follows, revision, bytes: Bytes::from(bytes) }, ids))
}

/// The publishing task's own state: the base, the deltas on it, and which accounts they
/// changed.
struct State {
    base: Arc<BaseFile>,
    deltas: Vec<Arc<DeltaFile>>,
    changed: HashSet<String>,
    revision: u64,
}

impl State {
    fn on(base: BaseFile) -> State {
        let revision = base.revision;
        State { base: Arc::new(base), deltas: Vec::new(), changed: HashSet::new(), revision }
    }

    fn push(&mut self, delta: DeltaFile, ids: Vec<String>) {
        self.revision = delta.revision;
        self.deltas.push(Arc::new(delta));
        self.changed.extend(ids);
    }
}

/// Everything one build needs, shareable with the blocking pool.
#[derive(Clone)]
struct Builder {
    repository: Arc<dyn Repository>,
    catalog: Arc<Catalog>,
    key: Arc<SigningKey>,
}

impl Builder {
    async fn base(&self, created_at_ms: i64) -> Result<BaseFile, PublishError> {
        let builder = self.clone();
        tokio::task::spawn_blocking(move || build_base(builder.repository.as_ref(), &builder.catalog, &builder.key, created_at_ms))
            .await
            .map_err(|error| PublishError::Task(error.to_string()))?
    }

    async fn delta(&self, base_revision: u64, follows: u64, created_at_ms: i64) -> Result<(DeltaFile, Vec<String>), PublishError> {
        let builder = self.clone();
        tokio::task::spawn_blocking(move || {
            build_delta(builder.repository.as_ref(), &builder.catalog, &builder.key, base_revision, follows, created_at_ms)
        })
        .await
        .map_err(|error| PublishError::Task(error.to_string()))?
    }
}

/// Publishes a base at start, then a delta whenever the committed revision passes the
/// published one, and a new base when the deltas pass `compact_after`, until `shutdown`
/// resolves. A failed build is logged, kept as the last error, and retried after a second;
/// sidecars keep the last good view meanwhile.
pub async fn run(
    publisher: Arc<Publisher>,
    repository: Arc<dyn Repository>,
    catalog: Arc<Source>,
    key: Arc<SigningKey>,
    clock: Arc<dyn Clock>,
    compact_after: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let catalog = match tollgate_policy::compile_catalog(&catalog) {
        Ok(catalog) => Arc::new(catalog),
        Err(errors) => {
            // `ControlPlane::open` compiled this catalog already; this cannot fail unless the
            // compiler changed under it.
            publisher.set_error(Some(errors.to_string()));
            tracing::error!(%errors, "cannot compile the catalog; nothing is published");
            return;
        }
    };
    let builder = Builder { repository, catalog, key };
    let mut wanted = publisher.wanted.subscribe();
    let mut state: Option<State> = None;
    let mut compaction: Option<tokio::task::JoinHandle<Result<BaseFile, PublishError>>> = None;
    loop {
        let target = *wanted.borrow_and_update();
        if state.as_ref().is_none_or(|state| target > state.revision) {
            let started = Stopwatch::start();
            let created_at_ms = clock.now_ms();
            let outcome = match state.as_mut() {
                None => builder.base(created_at_ms).await.map(|base| {
                    tracing::info!(revision = base.revision, bytes = base.bytes.len(), build_ms = ms(started), "base snapshot published");
                    state = Some(State::on(base));
                }),
                Some(current) => builder.delta(current.base.revision, current.revision, created_at_ms).await.map(|(delta, ids)| {
                    tracing::debug!(
                        revision = delta.revision,
                        follows = delta.follows,
                        accounts = ids.len(),
                        bytes = delta.bytes.len(),
                        build_ms = ms(started),
                        "delta published"
                    );
                    current.push(delta, ids);
                }),
            };
            match outcome {
                Ok(()) => {
                    if let Some(state) = state.as_ref() {
                        offer(&publisher, state, created_at_ms);
                        let due = state.changed.len() >= compact_after || state.deltas.len() >= compact_after;
                        if due && compaction.is_none() {
                            tracing::info!(changed = state.changed.len(), deltas = state.deltas.len(), "compacting: building a new base");
                            let builder = builder.clone();
                            let created_at_ms = clock.now_ms();
                            compaction = Some(tokio::spawn(async move { builder.base(created_at_ms).await }));
                        }
                    }
                    continue;
                }
                Err(error) => {
                    failed(&publisher, &error);
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            changed = wanted.changed() => if changed.is_err() { return },
            built = finished(&mut compaction), if compaction.is_some() => {
                compaction = None;
                let built = built.map_err(|error| PublishError::Task(error.to_string())).and_then(|built| built);
                match built {
                    Ok(base) => {
                        if let Some(rebased) = rebase(&builder, base, state.as_ref(), clock.as_ref()).await {
                            offer(&publisher, &rebased, clock.now_ms());
                            state = Some(rebased);
                        }
                    }
                    Err(error) => failed(&publisher, &error),
                }
            }
        }
    }
}

/// The compaction's result once it is done; never, when none runs.
async fn finished(
    compaction: &mut Option<tokio::task::JoinHandle<Result<BaseFile, PublishError>>>,
) -> Result<Result<BaseFile, PublishError>, tokio::task::JoinError> {
    match compaction {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// The state on a freshly compacted `base`: with one catch-up delta for the commits made
/// while it was built. `None` (the old state stays) when the catch-up cannot be built, or the
/// new base is older than what is published.
async fn rebase(builder: &Builder, base: BaseFile, current: Option<&State>, clock: &dyn Clock) -> Option<State> {
    let published = current.map_or(0, |current| current.revision);
    let mut rebased = State::on(base);
    if rebased.revision < published {
        match builder.delta(rebased.base.revision, rebased.revision, clock.now_ms()).await {
            Ok((delta, ids)) => rebased.push(delta, ids),
            Err(error) => {
                tracing::warn!(%error, "cannot catch the new base up; keeping the old one");
                return None;
            }
        }
    }
    if rebased.revision < published {
        return None;
    }
    tracing::info!(
        base_revision = rebased.base.revision,
        revision = rebased.revision,
        bytes = rebased.base.bytes.len(),
        "compacted: new base published"
    );
    Some(rebased)
}

fn offer(publisher: &Publisher, state: &State, created_at_ms: i64) {
    let published = Published::new(Arc::clone(&state.base), state.deltas.clone(), created_at_ms);
    publisher.metrics.published(published.revision);
    publisher.metrics.overlay(state.changed.len(), state.deltas.len());
    publisher.set_error(None);
    publisher.latest.send_replace(Some(Arc::new(published)));
}

fn failed(publisher: &Publisher, error: &PublishError) {
    publisher.metrics.publish_failed();
    tracing::error!(%error, "cannot publish snapshot; retrying");
    publisher.set_error(Some(error.to_string()));
}

fn ms(stopwatch: Stopwatch) -> f64 {
    stopwatch.elapsed().as_secs_f64() * 1e3
}
