//! The control-plane subscription: long-polls `GET /v1/snapshot?after=REV` with a sidecar
//! key, verifies each snapshot against the trusted keys off the request path, installs it, and
//! keeps the last good one on disk (`DATA_DIR/snapshot.tgs`) so a restart serves while the
//! control plane is down. Failures back off exponentially with full jitter; every answer from
//! the control plane (new snapshot or "nothing newer") marks the serving snapshot as fresh.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use tokio::net::TcpStream;

use super::store::SnapshotStore;
use crate::telemetry::RejectCause;
use tollgate_snapshot::{Snapshot, SnapshotError, TrustedKeys};

/// The cached snapshot's file name inside the data directory.
pub const CACHE_FILE: &str = "snapshot.tgs";
/// How long one long-poll asks the control plane to wait, in seconds.
pub const DEFAULT_WAIT_SECS: u64 = 25;
pub const BACKOFF_START: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest snapshot accepted from the control plane (1 GiB).
const MAX_SNAPSHOT: usize = 1 << 30;

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// `host:port` of the control plane.
    pub authority: String,
    /// Path prefix of the API (empty for none).
    pub prefix: String,
    pub api_key: String,
    pub data_dir: PathBuf,
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("`--control-plane` value `{0}` must look like http://HOST:PORT (https is not supported; use a local TLS proxy)")]
    Url(String),
    #[error("cannot read API key file `{path}`: {source}")]
    KeyFile { path: String, source: std::io::Error },
    #[error("API key file `{0}` is empty")]
    EmptyKey(String),
    #[error("cannot reach the control plane at `{authority}`: {message}")]
    Connect { authority: String, message: String },
    #[error("control plane answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("control plane did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot write snapshot cache `{path}`: {source}")]
    Cache { path: String, source: std::io::Error },
}

impl Subscription {
    /// Parses `http://HOST:PORT[/PREFIX]` and reads the API key file.
    pub fn new(url: &str, api_key_file: &Path, data_dir: PathBuf) -> Result<Subscription, SubscribeError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| SubscribeError::Url(url.to_string()))?;
        let (authority, prefix) = match rest.split_once('/') {
            Some((authority, prefix)) => (authority, format!("/{}", prefix.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(SubscribeError::Url(url.to_string()));
        }
        let prefix = if prefix == "/" { String::new() } else { prefix };
        let api_key = std::fs::read_to_string(api_key_file)
            .map_err(|source| SubscribeError::KeyFile { path: api_key_file.display().to_string(), source })?
            .trim()
            .to_string();
        if api_key.is_empty() {
            return Err(SubscribeError::EmptyKey(api_key_file.display().to_string()));
        }
        Ok(Subscription { authority: authority.to_string(), prefix, api_key, data_dir, wait: Duration::from_secs(DEFAULT_WAIT_SECS) })
    }

    pub fn describe(&self) -> String {
        format!("control-plane:http://{}{}", self.authority, self.prefix)
    }

    pub fn cache_path(&self) -> PathBuf {
        self.data_dir.join(CACHE_FILE)
    }

    /// One long-poll: `Ok(Some(bytes))` for a newer snapshot, `Ok(None)` when nothing newer
    /// came within the wait.
    pub async fn poll(&self, after: u64) -> Result<Option<Bytes>, SubscribeError> {
        let limit = self.wait + Duration::from_secs(10);
        match tokio::time::timeout(limit, self.poll_inner(after)).await {
            Ok(result) => result,
            Err(_) => Err(SubscribeError::Timeout(limit)),
        }
    }

    async fn poll_inner(&self, after: u64) -> Result<Option<Bytes>, SubscribeError> {
        let path = format!("/v1/snapshot?after={after}&wait={}", self.wait.as_secs());
        let (status, body) = self.exchange("GET", &path, Bytes::new(), MAX_SNAPSHOT).await?;
        match status {
            StatusCode::OK => Ok(Some(body)),
            StatusCode::NOT_MODIFIED => Ok(None),
            other => Err(SubscribeError::Status {
                status: other.as_u16(),
                body: String::from_utf8_lossy(body.get(..body.len().min(300)).unwrap_or_default()).into_owned(),
            }),
        }
    }

    /// One request to the control plane on a fresh connection, with the API key: the status
    /// and a body of at most `max_body` bytes. Used by the snapshot feed and the usage shipper.
    pub async fn exchange(&self, method: &str, path: &str, body: Bytes, max_body: usize) -> Result<(StatusCode, Bytes), SubscribeError> {
        let connect_error = |message: String| SubscribeError::Connect { authority: self.authority.clone(), message };
        let stream = TcpStream::connect(&self.authority).await.map_err(|error| connect_error(error.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| connect_error(error.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header("host", &self.authority)
            .header("authorization", format!("Bearer {}", self.api_key));
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(body)).map_err(|error| connect_error(error.to_string()))?;
        let response = sender.send_request(request).await.map_err(|error| connect_error(error.to_string()))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|error| connect_error(format!("cannot read answer: {error}")))?
            .to_bytes();
        Ok((status, body))
    }
}

/// Writes the cache through a temporary file and a rename, so a crash never leaves half a file.
fn write_cache(path: &Path, bytes: &[u8]) -> Result<(), SubscribeError> {
    use std::io::Write;
    let cache_error = |source| SubscribeError::Cache { path: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(cache_error)?;
    }
    let temporary = path.with_extension("tgs.tmp");
    let mut file = std::fs::File::create(&temporary).map_err(cache_error)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(cache_error)?;
    std::fs::rename(&temporary, path).map_err(cache_error)?;
    Ok(())
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

/// A random duration in `[0, ceiling]`: full jitter, so sidecars that lost the control plane
/// together do not come back in step.
pub fn jitter(ceiling: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return ceiling;
    }
    let fraction = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    ceiling.mul_f64(fraction)
}

/// Follows the control plane until `shutdown` resolves.
pub async fn run(
    subscription: Arc<Subscription>,
    trusted: Arc<TrustedKeys>,
    store: Arc<SnapshotStore>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_START;
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
                let trusted = Arc::clone(&trusted);
                let started = tollgate_core::clock::Stopwatch::start();
                let verify_bytes = bytes.clone();
                let spare = store.take_spare();
                let verified =
                    super::background::run(move || Snapshot::verify_into(&verify_bytes, &trusted, spare).map_err(SubscribeError::from));
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
            None => backoff = BACKOFF_START,
            Some((message, cause)) => {
                if let Some(cause) = cause {
                    store.reject(cause, &message);
                }
                let delay = jitter(backoff);
                tracing::warn!(error = %message, retry_in_ms = delay.as_millis() as u64, "control plane subscription failed");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
