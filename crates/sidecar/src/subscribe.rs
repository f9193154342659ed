//! The control-plane subscription: long-polls `GET /v1/snapshot?after=REV` with a sidecar
//! key, verifies each snapshot against the trusted keys off the request path, installs it, and
//! keeps the last good one on disk (`DATA_DIR/snapshot.tgs`) so a restart serves while the
//! control plane is down. Failures back off exponentially with full jitter; every answer from
//! the control plane (new snapshot or "nothing newer") marks the serving snapshot as fresh.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use tollgate_http::backoff::Backoff;
use tollgate_http::client::{ClientError, HttpClient, HttpUrl};
use tollgate_protocol::feed;

use super::store::SnapshotStore;
use crate::telemetry::RejectCause;
use tollgate_snapshot::{Snapshot, SnapshotError, TrustedKeys};

/// The cached snapshot's file name inside the data directory.
pub const CACHE_FILE: &str = "snapshot.tgs";
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
    /// The control plane's address and API path prefix.
    pub url: HttpUrl,
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
    #[error("`--control-plane` value `{0}` must look like http://HOST:PORT (https is not supported; use a local TLS proxy)")]
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
    /// Parses `http://HOST:PORT[/PREFIX]` and reads the API key file.
    pub fn new(url: &str, api_key_file: &Path, data_dir: PathBuf) -> Result<Subscription, SubscribeError> {
        let parsed = HttpUrl::parse(url).map_err(|_| SubscribeError::Url(url.to_string()))?;
        let api_key = std::fs::read_to_string(api_key_file)
            .map_err(|source| SubscribeError::KeyFile { path: api_key_file.display().to_string(), source })?
            .trim()
            .to_string();
        if api_key.is_empty() {
            return Err(SubscribeError::EmptyKey(api_key_file.display().to_string()));
        }
        Ok(Subscription {
            url: parsed,
            api_key,
            data_dir,
            wait: Duration::from_secs(DEFAULT_WAIT_SECS),
            max_snapshot_bytes: tollgate_snapshot::DEFAULT_MAX_FILE_BYTES,
            client: HttpClient::new(CONNECT_TIMEOUT),
        })
    }

    pub fn describe(&self) -> String {
        format!("control-plane:{}", self.url)
    }

    pub fn cache_path(&self) -> PathBuf {
        self.data_dir.join(CACHE_FILE)
    }

    /// One long-poll: `Ok(Some(bytes))` for a newer snapshot, `Ok(None)` when nothing newer
    /// came within the wait.
    pub async fn poll(&self, after: u64) -> Result<Option<Bytes>, SubscribeError> {
        let path = feed::snapshot_query(after, self.wait.as_secs());
        let limit = self.wait + Duration::from_secs(10);
        let max_body = usize::try_from(self.max_snapshot_bytes).unwrap_or(usize::MAX);
        let (status, body) = self.exchange_within("GET", &path, Bytes::new(), max_body, limit).await?;
        match status {
            StatusCode::OK => Ok(Some(body)),
            StatusCode::NOT_MODIFIED => Ok(None),
            other => Err(SubscribeError::Status {
                status: other.as_u16(),
                body: String::from_utf8_lossy(body.get(..body.len().min(300)).unwrap_or_default()).into_owned(),
            }),
        }
    }

    /// One request to the control plane with the API key, on a pooled connection: the status
    /// and a body of at most `max_body` bytes, within [`REQUEST_TIMEOUT`]. Used by the usage
    /// shipper.
    pub async fn exchange(&self, method: &str, path: &str, body: Bytes, max_body: usize) -> Result<(StatusCode, Bytes), SubscribeError> {
        self.exchange_within(method, path, body, max_body, REQUEST_TIMEOUT).await
    }

    async fn exchange_within(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        max_body: usize,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), SubscribeError> {
        let mut request =
            hyper::Request::builder().method(method).uri(self.url.join(path)).header("authorization", format!("Bearer {}", self.api_key));
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(body)).map_err(|error| ClientError::Build(error.to_string()))?;
        let answer = self.client.send(request, limit, max_body).await?;
        Ok((answer.status, answer.body))
    }
}

/// Writes the cache atomically, so a crash never leaves half a file.
fn write_cache(path: &Path, bytes: &[u8]) -> Result<(), SubscribeError> {
    tollgate_http::fs::write_atomically(path, bytes).map_err(|source| SubscribeError::Cache { path: path.display().to_string(), source })
}

fn reject_cause(error: &SubscribeError) -> RejectCause {
    match error {
        SubscribeError::Snapshot(SnapshotError::UntrustedKey(_)) => RejectCause::UntrustedKey,
        SubscribeError::Snapshot(SnapshotError::BadSignature(_)) => RejectCause::Signature,
        SubscribeError::Snapshot(SnapshotError::Invalid(_)) => RejectCause::Validation,
        SubscribeError::Snapshot(_) => RejectCause::Framing,
        _ => RejectCause::Read,
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
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
    loop {
        let after = store.revision().unwrap_or(0);
        let outcome = tokio::select! {
            () = &mut shutdown => return,
            outcome = subscription.poll(after) => outcome,
        };
        let failure = match outcome {
            Ok(None) => {
                store.mark_synced();
                None
            }
            Ok(Some(bytes)) => {
                store.mark_pending();
                let trusted = Arc::clone(&trusted);
                let started = tollgate_core::clock::Stopwatch::start();
                let verify_bytes = bytes.clone();
                let spare_store = Arc::clone(&store);
                let verified = super::background::run_with_deadline(
                    move || Snapshot::verify_into(&verify_bytes, &trusted, spare_store.take_spare()).map_err(SubscribeError::from),
                    super::background::DEADLINE,
                );
                match verified.await {
                    Some(Ok(snapshot)) => match store.install(snapshot) {
                        Ok(revision) => {
                            // Cached only once installed: a snapshot the store refused (not
                            // newer) must not be what a restart serves.
                            let cache = subscription.cache_path();
                            match super::background::run(move || write_cache(&cache, &bytes)).await {
                                Some(Ok(())) => {}
                                Some(Err(error)) => tracing::warn!(%error, "snapshot installed but not cached"),
                                None => tracing::warn!("snapshot cache write did not finish"),
                            }
                            store.mark_synced();
                            tracing::info!(
                                revision,
                                verify_ms = started.elapsed().as_secs_f64() * 1e3,
                                "snapshot from control plane installed"
                            );
                            None
                        }
                        // The store recorded the reject; a control plane that goes backwards is
                        // a fault worth backing off from.
                        Err(error) => Some((error.to_string(), None)),
                    },
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
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
