//! Snapshot publishing: every committed change raises the wanted revision; one background task
//! compiles the catalog with every account and signs the snapshot, off the request path. A
//! burst of commits made while a compile runs is covered by the next compile (coalesced).
//! Long-polling subscribers wait on a watch channel for a revision newer than theirs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use tokio::sync::watch;

use super::accounts;
use super::metrics::ControlPlaneMetrics;
use super::store::Repository;
use tollgate_core::clock::Clock;
use tollgate_policy::Source;
use tollgate_snapshot as snapshot;

/// A signed snapshot ready to hand to sidecars.
#[derive(Debug)]
pub struct Published {
    pub revision: u64,
    pub bytes: Bytes,
    pub created_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error(transparent)]
    Compile(#[from] super::accounts::CompileError),
    #[error(transparent)]
    Build(#[from] tollgate_snapshot::SnapshotError),
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
}

/// Compiles and signs the repository's current state, stamped `created_at_ms`.
pub fn build(repository: &dyn Repository, catalog: &Source, key: &SigningKey, created_at_ms: i64) -> Result<Published, PublishError> {
    let (revision, accounts) = repository.all_accounts()?;
    let data = accounts::compile_all(catalog, &accounts)?;
    let bytes = snapshot::build(&data, revision, created_at_ms, key)?;
    Ok(Published { revision, bytes: Bytes::from(bytes), created_at_ms })
}

/// Publishes a snapshot at start, then again whenever the committed revision passes the
/// published one, until `shutdown` resolves. A failed build is logged, kept as the last error,
/// and retried after a second; sidecars keep the last good snapshot meanwhile.
pub async fn run(
    publisher: Arc<Publisher>,
    repository: Arc<dyn Repository>,
    catalog: Arc<Source>,
    key: Arc<SigningKey>,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut wanted = publisher.wanted.subscribe();
    let mut published: Option<u64> = None;
    loop {
        let target = *wanted.borrow_and_update();
        if published.is_none_or(|published| target > published) {
            let (repository, catalog, key) = (Arc::clone(&repository), Arc::clone(&catalog), Arc::clone(&key));
            let started = tollgate_core::clock::Stopwatch::start();
            let created_at_ms = clock.now_ms();
            let outcome = tokio::task::spawn_blocking(move || build(repository.as_ref(), &catalog, &key, created_at_ms)).await;
            match outcome {
                Ok(Ok(snapshot)) => {
                    tracing::info!(
                        revision = snapshot.revision,
                        bytes = snapshot.bytes.len(),
                        build_ms = started.elapsed().as_secs_f64() * 1e3,
                        "snapshot published"
                    );
                    published = Some(snapshot.revision);
                    publisher.metrics.published(snapshot.revision);
                    if let Ok(mut last_error) = publisher.last_error.lock() {
                        *last_error = None;
                    }
                    publisher.latest.send_replace(Some(Arc::new(snapshot)));
                    continue;
                }
                Ok(Err(error)) => {
                    publisher.metrics.publish_failed();
                    tracing::error!(%error, "cannot publish snapshot; retrying");
                    if let Ok(mut last_error) = publisher.last_error.lock() {
                        *last_error = Some(error.to_string());
                    }
                }
                Err(error) => {
                    publisher.metrics.publish_failed();
                    tracing::error!(%error, "snapshot build task failed; retrying");
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            changed = wanted.changed() => if changed.is_err() { return },
        }
    }
}
