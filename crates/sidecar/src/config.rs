//! The sidecar's configuration as one typed value: what the command line (or a test) decides,
//! with the command line's defaults. It holds no open file, socket or thread; `app` builds
//! those from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocols::ExtAuthzHeaders;
use tollgate_snapshot::TrustedKeys;

/// The default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8181";

/// Everything a sidecar is started from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the decision API listens (`--listen`).
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are also served (`--metrics-listen`).
    pub metrics_listen: Option<SocketAddr>,
    pub source: SourceConfig,
    /// Keys whose signatures are trusted (`--trust-key`); dev mode adds its ephemeral key.
    pub trusted: TrustedKeys,
    /// Local state: the durable usage log and, with a control plane, the snapshot cache and
    /// the sidecar id (`--data-dir`).
    pub data_dir: Option<PathBuf>,
    pub metering: MeteringSettings,
    /// Marking answers stale (`--max-staleness`, `--unready-when-stale`).
    pub staleness: Option<Staleness>,
    /// Where `/ext_authz` reads identity and feature from (`--ext-authz-*-header`).
    pub ext_authz: ExtAuthzHeaders,
    /// Largest request body in bytes (`--max-body`).
    pub max_body: usize,
    /// Requests with large or unsized bodies (64 KiB or more: big batches) served at a time;
    /// more are answered 503 with `Retry-After` (`--max-heavy-requests`).
    pub max_heavy_requests: usize,
    /// Where apps reach the sidecar (`--public-url`), for discovery documents such as the
    /// AuthZEN configuration; `http://` + `listen` when unset.
    pub public_url: Option<String>,
    /// How long a client may take to send a request head (`--header-read-timeout-secs`).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body (`--body-read-timeout-secs`).
    pub body_read_timeout: Duration,
    /// Largest snapshot file read or downloaded, in bytes (`--max-snapshot-bytes`).
    pub max_snapshot_bytes: u64,
    /// Accept a snapshot older than the highest revision recorded in `data_dir`
    /// (`--allow-rollback`).
    pub allow_rollback: bool,
    /// How long shutdown waits for in-flight requests (`--drain-timeout-secs`).
    pub drain_timeout: Duration,
    /// Worker threads of the runtime the caller builds (`--workers`); `None` follows the
    /// container's CPU quota.
    pub workers: Option<usize>,
    /// How often a file or policies source is checked for changes (`--watch-interval-ms`).
    pub watch_interval: Duration,
    /// How often metrics buffers are drained and old event ids forgotten. Not a flag.
    pub housekeeping_interval: Duration,
}

/// Where snapshots come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A signed snapshot file, watched (`--snapshot`).
    File(PathBuf),
    /// Dev mode: a policies directory compiled in-process with an ephemeral key (`--policies`).
    Policies(PathBuf),
    /// A control-plane subscription (`--control-plane`, `--api-key-file`); needs `data_dir`.
    ControlPlane {
        url: String,
        api_key_file: PathBuf,
        /// How long one long-poll asks the control plane to wait. Not a flag.
        poll_wait: Duration,
    },
}

/// How metering treats time, shared quotas and shipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeteringSettings {
    /// How far in the past an event's own `timestamp` may be, in seconds.
    pub late_arrival_secs: i64,
    /// While shipping: the share of a hard limit this sidecar may use before its usage reaches
    /// the control plane; past it the event waits for a sync first. The bound on how far pods
    /// together overshoot a hard limit is (pods − 1) × this share of the limit.
    pub local_share: f64,
    /// Longest wait for that sync; after it the event is decided on what this sidecar knows.
    pub sync_wait: Duration,
    /// How long metering event ids are remembered for deduplication, in seconds.
    pub dedupe_window_secs: i64,
    /// While shipping: ship and refresh global usage at least this often.
    pub usage_sync_interval: Duration,
    /// On shutdown, how long to try to ship unshipped usage.
    pub flush_timeout: Duration,
}

impl Default for MeteringSettings {
    fn default() -> MeteringSettings {
        MeteringSettings {
            late_arrival_secs: 3_600,
            local_share: 0.02,
            sync_wait: Duration::from_millis(500),
            dedupe_window_secs: 86_400,
            usage_sync_interval: Duration::from_millis(200),
            flush_timeout: Duration::from_secs(5),
        }
    }
}

/// Past `max` without a confirmation from the source, answers are marked stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    pub max: Duration,
    /// Turn `/readyz` unready while stale.
    pub unready_when_stale: bool,
}

/// A configuration that cannot serve; the message names the flag.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("`--max-body` must be greater than 0")]
    MaxBody,
    #[error("`--max-heavy-requests` must be greater than 0")]
    MaxHeavyRequests,
    #[error("`--public-url` value `{0}` must be an http:// or https:// URL")]
    PublicUrl(String),
    #[error("`--header-read-timeout-secs` must be greater than 0")]
    HeaderReadTimeout,
    #[error("`--body-read-timeout-secs` must be greater than 0")]
    BodyReadTimeout,
    #[error("`--max-snapshot-bytes` must be greater than 0")]
    MaxSnapshotBytes,
    #[error("`--watch-interval-ms` must be greater than 0")]
    WatchInterval,
    #[error("`--quota-local-share` must be greater than 0 and at most 1, not `{0}`")]
    LocalShare(f64),
    #[error("`--usage-sync-interval-ms` must be greater than 0")]
    UsageSyncInterval,
    #[error("`--late-arrival-secs` must not be negative")]
    LateArrival,
    #[error("`--trust-key` is required with `{0}`: the sidecar trusts only configured keys")]
    NoTrustedKey(&'static str),
    #[error("`--control-plane` needs `--data-dir` for its snapshot cache and usage log")]
    NoDataDir,
}

impl Config {
    /// A configuration with the command line's defaults for everything but the source and the
    /// trusted keys.
    pub fn new(source: SourceConfig, trusted: TrustedKeys) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8181)),
            metrics_listen: None,
            source,
            trusted,
            data_dir: None,
            metering: MeteringSettings::default(),
            staleness: None,
            ext_authz: ExtAuthzHeaders::default(),
            max_body: crate::DEFAULT_MAX_BODY,
            public_url: None,
            max_heavy_requests: 4,
            header_read_timeout: tollgate_http::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: tollgate_http::DEFAULT_BODY_READ_TIMEOUT,
            max_snapshot_bytes: tollgate_snapshot::DEFAULT_MAX_FILE_BYTES,
            allow_rollback: false,
            drain_timeout: Duration::from_secs(10),
            workers: None,
            watch_interval: Duration::from_millis(500),
            housekeeping_interval: Duration::from_secs(5),
        }
    }

    /// Refuses values that cannot serve, before anything is opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body == 0 {
            return Err(ConfigError::MaxBody);
        }
        if let Some(url) = &self.public_url
            && (!(url.starts_with("http://") || url.starts_with("https://")) || url.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::PublicUrl(url.clone()));
        }
        if self.max_heavy_requests == 0 {
            return Err(ConfigError::MaxHeavyRequests);
        }
        if self.header_read_timeout.is_zero() {
            return Err(ConfigError::HeaderReadTimeout);
        }
        if self.body_read_timeout.is_zero() {
            return Err(ConfigError::BodyReadTimeout);
        }
        if self.max_snapshot_bytes == 0 {
            return Err(ConfigError::MaxSnapshotBytes);
        }
        if self.watch_interval.is_zero() {
            return Err(ConfigError::WatchInterval);
        }
        let share = self.metering.local_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(ConfigError::LocalShare(share));
        }
        if self.metering.usage_sync_interval.is_zero() {
            return Err(ConfigError::UsageSyncInterval);
        }
        if self.metering.late_arrival_secs < 0 {
            return Err(ConfigError::LateArrival);
        }
        let no_keys = self.trusted.ids().next().is_none();
        match &self.source {
            SourceConfig::File(_) if no_keys => Err(ConfigError::NoTrustedKey("--snapshot")),
            SourceConfig::ControlPlane { .. } if no_keys => Err(ConfigError::NoTrustedKey("--control-plane")),
            SourceConfig::ControlPlane { .. } if self.data_dir.is_none() => Err(ConfigError::NoDataDir),
            _ => Ok(()),
        }
    }

    /// Where apps reach the sidecar: `public_url` without a trailing `/`, or `http://LISTEN`.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }

    /// The runtime's worker threads: `workers`, or the cgroup CPU quota.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(crate::container::worker_threads).max(1)
    }
}
