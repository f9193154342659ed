//! The Tollgate client: one API (`check`, `batch`, `meter`, `entitlements`) over two backends,
//! the sidecar's HTTP API (`remote`) or the engine in-process over a verified snapshot
//! (`local`). It holds no policy logic of its own: every decision comes from the sidecar or
//! from `tollgate_core::engine::decide`.
//!
//! Modules in reading order: this file (the types and the [`Client`]), `remote` (HTTP with
//! pooling, timeouts and retries), `local` (the in-process mode).

mod local;
mod remote;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use tollgate_core::engine::Reason as EngineReason;
pub use tollgate_snapshot::TrustedKeys;

/// Why a decision came out as it did: the engine's reason, or `Unavailable` for an answer the
/// client made up itself because the sidecar could not be asked (see [`Fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Engine(EngineReason),
    Unavailable,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Engine(reason) => reason.as_str(),
            Reason::Unavailable => "unavailable",
        }
    }

    /// Reads a reason code from the wire; `None` for a code this client does not know (a
    /// newer sidecar), which is answered as an error rather than guessed at.
    pub fn parse(text: &str) -> Option<Reason> {
        if text == "unavailable" {
            return Some(Reason::Unavailable);
        }
        EngineReason::parse(text).map(Reason::Engine)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One question for the engine, as `POST /v1/check` takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckRequest {
    pub account: String,
    pub feature: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
}

impl CheckRequest {
    pub fn new(account: impl Into<String>, feature: impl Into<String>) -> CheckRequest {
        CheckRequest { account: account.into(), feature: feature.into(), ..CheckRequest::default() }
    }

    pub fn user(mut self, user: impl Into<String>) -> CheckRequest {
        self.user = Some(user.into());
        self
    }

    pub fn region(mut self, region: impl Into<String>) -> CheckRequest {
        self.region = Some(region.into());
        self
    }

    pub fn device(mut self, device: impl Into<String>) -> CheckRequest {
        self.device = Some(device.into());
        self
    }

    pub fn amount(mut self, amount: u64) -> CheckRequest {
        self.amount = Some(amount);
        self
    }
}

/// The cheapest purchase that would turn a denial into an allow.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Upgrade {
    /// `plan` or `addon`.
    pub kind: String,
    pub id: String,
    /// Where the account buys it (the catalog's `checkout_url`, filled in); `None` when the
    /// plan or add-on has no checkout link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_url: Option<String>,
}

/// A decision as the sidecar answers it; `fallback` is true only for an answer the client
/// made up because the sidecar could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    /// The snapshot revision decided on; `None` for a fallback.
    pub revision: Option<u64>,
    pub license: Option<String>,
    pub meter: Option<String>,
    pub limit: Option<u64>,
    pub used: Option<u64>,
    pub remaining: Option<u64>,
    /// RFC 3339.
    pub reset_at: Option<String>,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub grace: bool,
    pub overage: bool,
    pub stale: bool,
    pub upgrade: Option<Upgrade>,
    pub fallback: bool,
}

impl Decision {
    fn fallback(allow: bool) -> Decision {
        Decision {
            allow,
            reason: if allow { Reason::Engine(EngineReason::Ok) } else { Reason::Unavailable },
            revision: None,
            license: None,
            meter: None,
            limit: None,
            used: None,
            remaining: None,
            reset_at: None,
            expires_at: None,
            grace: false,
            overage: false,
            stale: false,
            upgrade: None,
            fallback: true,
        }
    }
}

/// The wire form of a decision (`DecisionJson`), read before its reason is typed.
#[derive(Debug, Deserialize)]
struct DecisionWire {
    allow: bool,
    reason: String,
    revision: u64,
    #[serde(default)]
    license: Option<String>,
    #[serde(default)]
    meter: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    used: Option<u64>,
    #[serde(default)]
    remaining: Option<u64>,
    #[serde(default)]
    reset_at: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    grace: bool,
    #[serde(default)]
    overage: bool,
    #[serde(default)]
    stale: bool,
    #[serde(default)]
    upgrade: Option<Upgrade>,
}

impl TryFrom<DecisionWire> for Decision {
    type Error = ClientError;

    fn try_from(wire: DecisionWire) -> Result<Decision, ClientError> {
        let reason = Reason::parse(&wire.reason).ok_or_else(|| ClientError::UnknownReason { reason: wire.reason.clone() })?;
        Ok(Decision {
            allow: wire.allow,
            reason,
            revision: Some(wire.revision),
            license: wire.license,
            meter: wire.meter,
            limit: wire.limit,
            used: wire.used,
            remaining: wire.remaining,
            reset_at: wire.reset_at,
            expires_at: wire.expires_at,
            grace: wire.grace,
            overage: wire.overage,
            stale: wire.stale,
            upgrade: wire.upgrade,
            fallback: false,
        })
    }
}

/// One metering event. Without an `id` the client generates one (128 random bits, hex) and
/// reuses it on every retry, so a retried event is counted once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MeterRequest {
    pub account: String,
    pub meter: String,
    pub amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// RFC 3339, when the usage happened if not now (HTTP only; in-process events are now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

impl MeterRequest {
    pub fn new(account: impl Into<String>, meter: impl Into<String>, amount: u64) -> MeterRequest {
        MeterRequest { account: account.into(), meter: meter.into(), amount, ..MeterRequest::default() }
    }

    pub fn id(mut self, id: impl Into<String>) -> MeterRequest {
        self.id = Some(id.into());
        self
    }
}

/// The answer to a metering event (`MeterJson`), with the id it was sent under.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MeterResult {
    pub accepted: bool,
    pub duplicate: bool,
    pub used: u64,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub remaining: Option<u64>,
    #[serde(default)]
    pub reset_at: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    pub period_start: String,
    /// False in-process, where usage lives in this process's memory only.
    pub durable: bool,
    pub revision: u64,
    /// The idempotency id the event was recorded under.
    #[serde(default)]
    pub id: String,
}

/// An account's resolved view (`GET /v1/entitlements/{account}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Entitlements {
    pub account: String,
    /// `active` or `suspended`.
    pub status: String,
    pub revision: u64,
    #[serde(default)]
    pub stale: bool,
    pub licenses: Vec<LicenseEntitlement>,
    pub features: Vec<FeatureEntitlement>,
    pub meters: Vec<MeterEntitlement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LicenseEntitlement {
    pub id: String,
    pub plan: String,
    pub addons: Vec<String>,
    pub seats: u32,
    pub trial: bool,
    pub starts_at: Option<String>,
    pub expires_at: Option<String>,
    pub valid: bool,
    pub grace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FeatureEntitlement {
    pub feature: String,
    pub allow: bool,
    pub reason: String,
    pub upgrade: Option<Upgrade>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MeterEntitlement {
    pub meter: String,
    pub unit: String,
    pub period: String,
    pub period_start: String,
    pub reset_at: Option<String>,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
    pub used: u64,
    pub remaining: Option<u64>,
}

/// What `check` and `batch` answer when the sidecar cannot be reached (connection refused,
/// timeout, a 5xx after the retries). Metering and entitlements never fall back: a made-up
/// usage count would be wrong in a way nobody notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Deny, with reason `unavailable` and `fallback: true` (the default: fail closed).
    #[default]
    Deny,
    /// Allow, with `fallback: true`: for features where an outage must not stop users.
    Allow,
    /// Return the error.
    Error,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{url}` is not an http:// base URL")]
    InvalidUrl { url: String },
    #[error("cannot reach the sidecar for `{path}`: {message}")]
    Unreachable { path: String, message: String },
    #[error("`{path}` did not answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("`{path}` answered {status} `{code}`: {message}")]
    Api { path: String, status: u16, code: String, message: String },
    #[error("cannot decode the answer of `{path}`: {source}")]
    Decode { path: String, source: serde_json::Error },
    #[error("cannot encode the request for `{path}`: {source}")]
    Encode { path: String, source: serde_json::Error },
    #[error("the answer names unknown reason `{reason}`")]
    UnknownReason { reason: String },
    #[error("cannot generate an idempotency id: {source}")]
    Random { source: getrandom::Error },
    #[error("cannot load snapshot: {source}")]
    Snapshot {
        #[from]
        source: tollgate_snapshot::ReadError,
    },
    #[error("cannot subscribe to the control plane: {source}")]
    Subscribe {
        #[from]
        source: tollgate_sidecar::subscribe::SubscribeError,
    },
    #[error("no snapshot arrived within {waited:?}")]
    NotReady { waited: Duration },
}

impl ClientError {
    /// Whether trying again (or falling back) makes sense: the sidecar was not reached, was
    /// too slow, or failed on its side.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Timeout { .. } | ClientError::NotReady { .. } => true,
            ClientError::Api { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Settings for an HTTP client; `ClientBuilder::new(url).build()` takes the defaults.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    timeout: Duration,
    retries: u32,
    retry_backoff: Duration,
    fallback: Fallback,
}

impl ClientBuilder {
    pub fn new(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            timeout: Duration::from_millis(500),
            retries: 2,
            retry_backoff: Duration::from_millis(25),
            fallback: Fallback::Deny,
        }
    }

    /// Longest wait for one attempt, connecting included (default 500 ms).
    pub fn timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.timeout = timeout;
        self
    }

    /// Further attempts after an unavailable answer (default 2); the wait doubles each time.
    pub fn retries(mut self, retries: u32, backoff: Duration) -> ClientBuilder {
        self.retries = retries;
        self.retry_backoff = backoff;
        self
    }

    pub fn fallback(mut self, fallback: Fallback) -> ClientBuilder {
        self.fallback = fallback;
        self
    }

    pub fn build(self) -> Result<Client, ClientError> {
        let remote = remote::Remote::new(&self.base_url, self.timeout, self.retries, self.retry_backoff)?;
        Ok(Client { backend: Arc::new(Backend::Remote(Box::new(remote))), fallback: self.fallback })
    }
}

/// Where an in-process client takes snapshots from.
#[derive(Debug, Clone)]
pub enum SnapshotSource {
    /// A signed snapshot file, re-read when it changes (polled every `poll`).
    File { path: PathBuf, poll: Duration },
    /// A control-plane subscription, through the sidecar's own subscription code; `data_dir`
    /// holds the cached snapshot so a restart serves at once.
    ControlPlane { url: String, api_key_file: PathBuf, data_dir: PathBuf, first_wait: Duration },
}

/// Both live behind the client's `Arc`, so the remote side's size does not matter; boxed to
/// keep the variants alike.
enum Backend {
    Remote(Box<remote::Remote>),
    Local(local::Local),
}

/// A Tollgate client. Cloning is cheap and shares the connection pool or the snapshot.
#[derive(Clone)]
pub struct Client {
    backend: Arc<Backend>,
    fallback: Fallback,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.backend.as_ref() {
            Backend::Remote(remote) => remote.describe(),
            Backend::Local(_) => "in-process".to_string(),
        };
        f.debug_struct("Client").field("mode", &mode).field("fallback", &self.fallback).finish()
    }
}

impl Client {
    /// An HTTP client for the sidecar at `base_url` with the default settings.
    pub fn new(base_url: &str) -> Result<Client, ClientError> {
        ClientBuilder::new(base_url).build()
    }

    /// An in-process client: decisions from `engine::decide` over a snapshot verified against
    /// `trusted`, kept current from `source` by a background task (call from within a tokio
    /// runtime). Metering in this mode keeps usage in this process's memory only: it is not
    /// durable, not shipped and not shared with other processes.
    pub async fn in_process(source: SnapshotSource, trusted: TrustedKeys) -> Result<Client, ClientError> {
        Client::in_process_with_clock(source, trusted, Arc::new(tollgate_core::clock::SystemClock)).await
    }

    /// [`Client::in_process`] with the clock decisions read time from (tests pin it).
    pub async fn in_process_with_clock(
        source: SnapshotSource,
        trusted: TrustedKeys,
        clock: Arc<dyn tollgate_core::clock::Clock>,
    ) -> Result<Client, ClientError> {
        let local = local::Local::start(source, trusted, clock).await?;
        Ok(Client { backend: Arc::new(Backend::Local(local)), fallback: Fallback::Error })
    }

    pub async fn check(&self, request: &CheckRequest) -> Result<Decision, ClientError> {
        let answer = match self.backend.as_ref() {
            Backend::Remote(remote) => remote.check(request).await,
            Backend::Local(local) => local.check(request),
        };
        self.or_fallback(answer, || Decision::fallback(self.fallback == Fallback::Allow))
    }

    /// Many checks in one request, answered in order.
    pub async fn batch(&self, requests: &[CheckRequest]) -> Result<Vec<Decision>, ClientError> {
        let answer = match self.backend.as_ref() {
            Backend::Remote(remote) => remote.batch(requests).await,
            Backend::Local(local) => Ok(requests.iter().map(|request| local.check(request)).collect::<Result<Vec<_>, _>>()?),
        };
        self.or_fallback(answer, || requests.iter().map(|_| Decision::fallback(self.fallback == Fallback::Allow)).collect())
    }

    /// Records usage. The idempotency id is generated here when absent and reused by every
    /// retry; it is returned in the answer.
    pub async fn meter(&self, request: &MeterRequest) -> Result<MeterResult, ClientError> {
        let mut request = request.clone();
        if request.id.is_none() {
            request.id = Some(new_event_id()?);
        }
        match self.backend.as_ref() {
            Backend::Remote(remote) => remote.meter(&request).await,
            Backend::Local(local) => local.meter(&request),
        }
    }

    pub async fn entitlements(&self, account: &str, user: Option<&str>, region: Option<&str>) -> Result<Entitlements, ClientError> {
        match self.backend.as_ref() {
            Backend::Remote(remote) => remote.entitlements(account, user, region).await,
            Backend::Local(local) => local.entitlements(account, user, region),
        }
    }

    fn or_fallback<T>(&self, answer: Result<T, ClientError>, fallback: impl FnOnce() -> T) -> Result<T, ClientError> {
        match answer {
            Err(error) if error.is_unavailable() && self.fallback != Fallback::Error => Ok(fallback()),
            other => other,
        }
    }
}

/// A fresh idempotency id: 128 random bits in hex.
pub fn new_event_id() -> Result<String, ClientError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|source| ClientError::Random { source })?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_codes() {
        for reason in EngineReason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(Reason::Engine(reason)));
        }
        assert_eq!(Reason::parse("unavailable"), Some(Reason::Unavailable));
        assert_eq!(Reason::parse("from_the_future"), None);
    }

    #[test]
    fn event_ids_are_128_bit_hex_and_differ() {
        let (first, second) = (new_event_id().ok(), new_event_id().ok());
        assert_eq!(first.as_ref().map(String::len), Some(32));
        assert!(first.as_ref().is_some_and(|id| id.chars().all(|c| c.is_ascii_hexdigit())));
        assert_ne!(first, second);
    }

    #[test]
    fn fallback_answers_say_they_are_fallbacks() {
        let deny = Decision::fallback(false);
        assert!(!deny.allow && deny.fallback);
        assert_eq!(deny.reason, Reason::Unavailable);
        assert!(Decision::fallback(true).allow);
    }
}
