//! The control-plane subscription: long-polls `GET /v1/snapshot?after=REV&base=BASE` with a
//! sidecar key; the answer is the deltas after the serving revision, or a new base and the
//! deltas on it. Every file is verified against the trusted keys off the request path, then the
//! lot is installed as one step. The base and the deltas installed on it are kept on disk
//! (`DATA_DIR/snapshot.tgs` and `DATA_DIR/deltas.tgd`), so a restart serves at once, without a
//! full download, while the control plane is down. Failures back off exponentially with full
//! jitter; every answer from the control plane (something new or "nothing newer") marks the
//! serving view as fresh.
//!
//! Several control-plane addresses may be given (replicas on one database): requests go to the
//! one that answered last, and move on to the next when it cannot be reached, fails midway or
//! answers 5xx, so a sidecar follows whichever replica is alive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use tollgate_http::backoff::Backoff;
use tollgate_http::client::{ClientError, HttpClient, HttpUrl};
use tollgate_protocol::feed;

use super::store::SnapshotStore;
use crate::telemetry::RejectCause;
use tollgate_snapshot::{Delta, Piece, Snapshot, SnapshotError, TrustedKeys};

/// The cached base snapshot's file name inside the data directory.
pub const CACHE_FILE: &str = "snapshot.tgs";
/// The cached deltas on that base, back to back, in the order they were installed.
pub const DELTA_CACHE_FILE: &str = "deltas.tgd";
/// Feed answers up to this size (deltas, in practice) are verified on the subscription's own
/// task instead of the loader thread.
const INLINE_VERIFY_BYTES: usize = 256 * 1024;
/// How long one long-poll asks the control plane to wait, in seconds.
pub const DEFAULT_WAIT_SECS: u64 = 25;
pub const BACKOFF_START: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a connection attempt to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request other than the long-poll (a usage batch) may take in all.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The control planes' addresses (with any API path prefix), tried in turn.
    pub urls: Vec<HttpUrl>,
    /// Index into `urls` of the one to ask first: the one that answered last.
    current: Arc<AtomicUsize>,
    pub api_key: String,
    pub data_dir: PathBuf,
    pub wait: Duration,
    /// Largest snapshot download accepted, in bytes (`--max-snapshot-bytes`).
    pub max_snapshot_bytes: u64,
    /// Pooled: the long-poll and the shipper reuse their connections.
    client: HttpClient,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error(
        "`--control-plane` value `{0}` must look like http://HOST:PORT, or several such separated by commas (https is not supported; use a local TLS proxy)"
    )]
    Url(String),
    #[error("cannot read API key file `{path}`: {source}")]
    KeyFile { path: String, source: std::io::Error },
    #[error("API key file `{0}` is empty")]
    EmptyKey(String),
    #[error("cannot reach the control plane: {0}")]
    Connect(#[from] ClientError),
    #[error("control plane answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot write snapshot cache `{path}`: {source}")]
    Cache { path: String, source: std::io::Error },
}

impl Subscription {
    /// Parses `http://HOST:PORT[/PREFIX]`, or several separated by commas, and reads the API
    /// key file.
    pub fn new(url: &str, api_key_file: &Path, data_dir: PathBuf) -> Result<Subscription, SubscribeError> {
        let urls = url
            .split(',')
            .map(|one| HttpUrl::parse(one.trim()).map_err(|_| SubscribeError::Url(one.trim().to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let api_key = std::fs::read_to_string(api_key_file)
            .map_err(|source| SubscribeError::KeyFile { path: api_key_file.display().to_string(), source })?
            .trim()
            .to_string();
        if api_key.is_empty() {
            return Err(SubscribeError::EmptyKey(api_key_file.display().to_string()));
        }
        Ok(Subscription {
            urls,
            current: Arc::new(AtomicUsize::new(0)),
            api_key,
            data_dir,
            wait: Duration::from_secs(DEFAULT_WAIT_SECS),
            max_snapshot_bytes: tollgate_snapshot::DEFAULT_MAX_FILE_BYTES,
            client: HttpClient::new(CONNECT_TIMEOUT),
        })
    }

    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.urls.iter().map(HttpUrl::to_string).collect();
        format!("control-plane:{}", urls.join(","))
    }

    pub fn cache_path(&self) -> PathBuf {
        self.data_dir.join(CACHE_FILE)
    }

    pub fn delta_cache_path(&self) -> PathBuf {
        self.data_dir.join(DELTA_CACHE_FILE)
    }

    /// One long-poll from revision `after` on base `base`: `Ok(Some(bytes))` with what brings
    /// the sidecar up to date, `Ok(None)` when nothing newer came within the wait.
    pub async fn poll(&self, after: u64, base: Option<u64>) -> Result<Option<Bytes>, SubscribeError> {
        let path = feed::snapshot_query(after, base, self.wait.as_secs());
        let limit = self.wait + Duration::from_secs(10);
        let max_body = usize::try_from(self.max_snapshot_bytes).unwrap_or(usize::MAX);
        let (status, body) = self.exchange_within("GET", &path, Bytes::new(), max_body, limit).await?;
        match status {
            StatusCode::OK => Ok(Some(body)),
            StatusCode::NOT_MODIFIED => Ok(None),
            other => Err(SubscribeError::Status { status: other.as_u16(), body: snippet(&body) }),
        }
    }

    /// One request to the control plane with the API key, on a pooled connection: the status
    /// and a body of at most `max_body` bytes, within [`REQUEST_TIMEOUT`]. Used by the usage
    /// shipper.
    pub async fn exchange(&self, method: &str, path: &str, body: Bytes, max_body: usize) -> Result<(StatusCode, Bytes), SubscribeError> {
        self.exchange_within(method, path, body, max_body, REQUEST_TIMEOUT).await
    }

    /// Asks the current address, then each other one in turn while an address cannot be
    /// reached, fails midway or answers 5xx; the first that answers otherwise becomes current.
    /// With one address this is a single attempt.
    async fn exchange_within(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        max_body: usize,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), SubscribeError> {
        let first = self.current.load(Ordering::Relaxed);
        let count = self.urls.len();
        let mut failure = None;
        for step in 0..count {
            let index = (first + step) % count;
            let Some(url) = self.urls.get(index) else { continue };
            let last = step + 1 == count;
            match self.exchange_with(url, method, path, body.clone(), max_body, limit).await {
                Ok((status, answer)) if status.is_server_error() && !last => {
                    tracing::warn!(control_plane = %url, status = status.as_u16(), "control plane failing; trying the next address");
                    failure = Some(SubscribeError::Status { status: status.as_u16(), body: snippet(&answer) });
                }
                Ok(answer) => {
                    if index != first {
                        tracing::info!(control_plane = %url, "following another control-plane address");
                        self.current.store(index, Ordering::Relaxed);
                    }
                    return Ok(answer);
                }
                Err(ClientError::Build(message)) => return Err(ClientError::Build(message).into()),
                Err(error) => {
                    if !last {
                        tracing::warn!(control_plane = %url, %error, "control plane unreachable; trying the next address");
                    }
                    failure = Some(error.into());
                }
            }
        }
        Err(failure.unwrap_or_else(|| SubscribeError::Url(String::new())))
    }

    async fn exchange_with(
        &self,
        url: &HttpUrl,
        method: &str,
        path: &str,
        body: Bytes,
        max_body: usize,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut request =
            hyper::Request::builder().method(method).uri(url.join(path)).header("authorization", format!("Bearer {}", self.api_key));
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(body)).map_err(|error| ClientError::Build(error.to_string()))?;
        let answer = self.client.send(request, limit, max_body).await?;
        Ok((answer.status, answer.body))
    }
}

/// The start of an answer's body, for an error message.
fn snippet(body: &Bytes) -> String {
    String::from_utf8_lossy(body.get(..body.len().min(300)).unwrap_or_default()).into_owned()
}

/// Writes the cache atomically, so a crash never leaves half a file.
fn write_cache(path: &Path, bytes: &[u8]) -> Result<(), SubscribeError> {
    tollgate_http::fs::write_atomically(path, bytes).map_err(|source| SubscribeError::Cache { path: path.display().to_string(), source })
}

/// A feed answer, verified: a new base if one came, the deltas after it, and the bytes of each
/// for the cache.
pub struct VerifiedFeed {
    pub base: Option<(Snapshot, Bytes)>,
    pub deltas: Vec<(Delta, Bytes)>,
}

/// Splits a feed answer into its files and verifies each. A base may only come first.
pub fn verify_feed(bytes: &Bytes, trusted: &TrustedKeys, spare: Option<rkyv::util::AlignedVec>) -> Result<VerifiedFeed, SnapshotError> {
    let mut feed = VerifiedFeed { base: None, deltas: Vec::new() };
    let mut spare = spare;
    for (position, piece) in tollgate_snapshot::pieces(bytes).enumerate() {
        match piece? {
            Piece::Base(file) if position == 0 => {
                let snapshot = Snapshot::verify_into(file, trusted, spare.take())?;
                feed.base = Some((snapshot, bytes.slice_ref(file)));
            }
            Piece::Base(_) => return Err(SnapshotError::WrongKind),
            Piece::Delta(file) => feed.deltas.push((Delta::verify(file, trusted)?, bytes.slice_ref(file))),
        }
    }
    Ok(feed)
}

/// Caches what was installed: a new base replaces the cache (base, then a fresh delta file);
/// deltas alone are appended. Only files at or below `installed` are written.
fn cache_installed(
    subscription: &Subscription,
    base: Option<&Bytes>,
    deltas: &[(u64, Bytes)],
    installed: u64,
) -> Result<(), SubscribeError> {
    let kept = deltas.iter().filter(|(revision, _)| *revision <= installed).map(|(_, bytes)| bytes);
    let delta_path = subscription.delta_cache_path();
    match base {
        Some(base) => {
            write_cache(&subscription.cache_path(), base)?;
            let joined: Vec<u8> = kept.flat_map(|bytes| bytes.iter().copied()).collect();
            write_cache(&delta_path, &joined)
        }
        None => {
            use std::io::Write;
            let cache_error = |source| SubscribeError::Cache { path: delta_path.display().to_string(), source };
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&delta_path).map_err(cache_error)?;
            for bytes in kept {
                file.write_all(bytes).map_err(cache_error)?;
            }
            Ok(())
        }
    }
}

/// The cached deltas on the cached base (revision `base`), verified, to install with it at
/// start. A torn or stale tail (a crash mid-append, deltas of an older base) is dropped and the
/// file rewritten to the part that is good, so later appends follow good data.
pub fn cached_deltas(subscription: &Subscription, trusted: &TrustedKeys, base: u64, max_bytes: u64) -> Vec<Delta> {
    let path = subscription.delta_cache_path();
    let bytes = match std::fs::metadata(&path) {
        Ok(metadata) if metadata.is_file() && metadata.len() <= max_bytes => std::fs::read(&path).unwrap_or_default(),
        _ => return Vec::new(),
    };
    let mut deltas = Vec::new();
    let mut good_len = 0;
    for piece in tollgate_snapshot::pieces(&bytes) {
        let Ok(Piece::Delta(file)) = piece else { break };
        let Ok(delta) = Delta::verify(file, trusted) else { break };
        if delta.header().base_revision != base {
            break;
        }
        good_len += file.len();
        deltas.push(delta);
    }
    if good_len < bytes.len() {
        tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() - good_len, "cached deltas end in a torn or stale part; dropped");
        if let Err(error) = write_cache(&path, bytes.get(..good_len).unwrap_or_default()) {
            tracing::warn!(%error, "cannot rewrite the delta cache");
        }
    }
    deltas
}

fn reject_cause(error: &SubscribeError) -> RejectCause {
    match error {
        SubscribeError::Snapshot(SnapshotError::UntrustedKey(_)) => RejectCause::UntrustedKey,
        SubscribeError::Snapshot(SnapshotError::BadSignature(_)) => RejectCause::Signature,
        SubscribeError::Snapshot(SnapshotError::Invalid(_)) => RejectCause::Validation,
        SubscribeError::Snapshot(SnapshotError::DeltaHeader(_)) => RejectCause::Validation,
        SubscribeError::Snapshot(_) => RejectCause::Framing,
        _ => RejectCause::Read,
    }
}

/// Installs a verified feed answer and caches what was installed; `None` when all went well,
/// else the failure to back off from (the store has recorded a refusal already).
/// One write of the cache: what an install added.
struct CacheWrite {
    base: Option<Bytes>,
    deltas: Vec<(u64, Bytes)>,
    installed: u64,
}

/// Writes the cache in the order installs happened, on the loader thread, while the
/// subscription goes on polling: writing a new base of a million accounts takes seconds, and
/// the deltas that follow must not wait for it. Dropping the sender ends it once the writes
/// queued are done.
fn start_cache_writer(subscription: Arc<Subscription>) -> (tokio::sync::mpsc::UnboundedSender<CacheWrite>, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<CacheWrite>();
    let writer = tokio::spawn(async move {
        while let Some(write) = receiver.recv().await {
            let subscription = Arc::clone(&subscription);
            let written =
                super::background::run(move || cache_installed(&subscription, write.base.as_ref(), &write.deltas, write.installed));
            match written.await {
                Some(Ok(())) => {}
                Some(Err(error)) => tracing::warn!(%error, "snapshot installed but not cached"),
                None => tracing::warn!("snapshot cache write did not finish"),
            }
        }
    });
    (sender, writer)
}

async fn install_feed(
    cache: &tokio::sync::mpsc::UnboundedSender<CacheWrite>,
    store: &SnapshotStore,
    feed: VerifiedFeed,
    started: tollgate_core::clock::Stopwatch,
) -> Option<(String, Option<RejectCause>)> {
    let VerifiedFeed { base, deltas } = feed;
    let (base, base_bytes) = base.map_or((None, None), |(snapshot, bytes)| (Some(snapshot), Some(bytes)));
    let delta_bytes: Vec<(u64, Bytes)> = deltas.iter().map(|(delta, bytes)| (delta.revision(), bytes.clone())).collect();
    let n_deltas = deltas.len();
    let received: usize = base_bytes.as_ref().map_or(0, Bytes::len) + delta_bytes.iter().map(|(_, bytes)| bytes.len()).sum::<usize>();
    match store.install_chain(base, deltas.into_iter().map(|(delta, _)| delta).collect()) {
        Ok(revision) => {
            // Cached only once installed: what the store refused must not be what a restart
            // serves.
            let new_base = base_bytes.is_some();
            if cache.send(CacheWrite { base: base_bytes, deltas: delta_bytes, installed: revision }).is_err() {
                tracing::warn!("snapshot installed but not cached: the cache writer stopped");
            }
            store.mark_synced();
            tracing::info!(
                revision,
                new_base,
                deltas = n_deltas,
                bytes = received,
                verify_ms = started.elapsed().as_secs_f64() * 1e3,
                "update from control plane installed"
            );
            None
        }
        // The store recorded the refusal; a control plane that goes backwards, or skips, is a
        // fault worth backing off from.
        Err(error) => Some((error.to_string(), None)),
    }
}

/// Follows the control plane until `shutdown` resolves.
pub async fn run(
    subscription: Arc<Subscription>,
    trusted: Arc<TrustedKeys>,
    store: Arc<SnapshotStore>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let (cache, writer) = start_cache_writer(Arc::clone(&subscription));
    // On shutdown the writes already queued still finish: a restart serves what was installed.
    let stop = |cache, writer: tokio::task::JoinHandle<()>| async move {
        drop(cache);
        let _ = writer.await;
    };
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    loop {
        let after = store.revision().unwrap_or(0);
        let outcome = tokio::select! {
            () = &mut shutdown => return stop(cache, writer).await,
            outcome = subscription.poll(after, store.base_revision()) => outcome,
        };
        let failure = match outcome {
            Ok(None) => {
                store.mark_synced();
                None
            }
            Ok(Some(bytes)) => {
                store.mark_pending();
                let started = tollgate_core::clock::Stopwatch::start();
                // Deltas are verified here, at once (microseconds each); a base goes to the
                // low-priority loader, which may also be busy writing the cache.
                let verified = if bytes.len() <= INLINE_VERIFY_BYTES {
                    Some(verify_feed(&bytes, &trusted, None).map_err(SubscribeError::from))
                } else {
                    let (trusted, spare_store) = (Arc::clone(&trusted), Arc::clone(&store));
                    super::background::run_with_deadline(
                        move || verify_feed(&bytes, &trusted, spare_store.take_spare()).map_err(SubscribeError::from),
                        super::background::DEADLINE,
                    )
                    .await
                };
                match verified {
                    Some(Ok(feed)) => install_feed(&cache, &store, feed, started).await,
                    Some(Err(error)) => Some((error.to_string(), Some(reject_cause(&error)))),
                    None => Some(("snapshot verification did not finish".to_string(), Some(RejectCause::Read))),
                }
            }
            Err(error) => Some((error.to_string(), Some(reject_cause(&error)))),
        };
        match failure {
            None => backoff.reset(),
            Some((message, cause)) => {
                if let Some(cause) = cause {
                    store.reject(cause, &message);
                }
                let delay = backoff.fail();
                tracing::warn!(error = %message, retry_in_ms = delay.as_millis() as u64, "control plane subscription failed");
                tokio::select! {
                    () = &mut shutdown => return stop(cache, writer).await,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
