//! The control plane: the license repository behind a REST integration API with scoped API
//! keys, order intake, signed license tokens, snapshot publishing to sidecars, and usage
//! ingestion with reports, and outbound webhooks. This module holds the shared state
//! ([`ControlPlane`]), API keys and callers, and the error kinds; the HTTP server is `api`,
//! the database `store` (usage tables in `usage_store`), writes `changes`, publishing
//! `publish`, bulk import of a policies directory `import`, tokens `tokens`, usage `ingest`,
//! `reports` and `limits`, webhooks `webhooks` (their tables `webhook_store`), the customer
//! portal and vendor console `portal`. It never
//! decides a request: sidecars do, from the snapshots it publishes.

/// An enum carried in request bodies and stored documents as fixed strings, which stay what
/// they always were (so existing databases still read). A value outside the list is refused
/// naming the field, the value and every valid one, as serde's derive cannot.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident in $field:literal { $($(#[$variant_meta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            /// Every value, in the order the API documents them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The wire strings of [`Self::ALL`].
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(deserializer)?;
                $name::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!("`{}` value `{text}` is not one of {}", $field, $name::NAMES.join(", ")))
                })
            }
        }
    };
}

mod accounts;
pub mod api;
pub mod changes;
pub mod import;
pub mod ingest;
pub mod integration_store;
pub mod integrations;
pub mod limits;
pub mod metrics;
pub mod portal;
pub mod postgres;
pub mod publish;
pub mod reports;
pub mod store;
pub mod tokens;
pub mod usage_store;
pub mod webhook_store;
pub mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use metrics::ControlPlaneMetrics;
use publish::Publisher;
use store::{KeyRecord, Repository, Scope, SqliteRepository, StoreError};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::model::SnapshotData;
use tollgate_policy::{CATALOG_FILE, PolicyErrors, Source};

pub use accounts::{catalog_json, compile_all, compile_one, token_claims};

/// How long a license token is valid by default, in seconds (one day).
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 86_400;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read catalog `{path}`: {source}")]
    Catalog { path: String, source: std::io::Error },
    #[error(transparent)]
    Policy(#[from] PolicyErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An error answer of the API, by kind; `api` turns each into a status and a code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body or a parameter is malformed; the message names the field.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401
    #[error("a valid API key is required: send `Authorization: Bearer KEY`")]
    Unauthorized,
    /// 403
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 422: well-formed, but the account it would leave breaks a policy rule (messages from
    /// the policy compiler).
    #[error("{}", .0.join("; "))]
    Policy(Vec<String>),
    /// 422: the request cannot apply to the account as it is.
    #[error("{}", .0.join("; "))]
    Unprocessable(Vec<String>),
    /// 500
    #[error(transparent)]
    Store(#[from] StoreError),
    /// 500: the handler failed without an answer (logged where it happened).
    #[error("the request could not be completed")]
    Internal,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { code: "invalid_request", message: message.into() }
    }

    pub fn json(error: &serde_json::Error) -> ApiError {
        let json = tollgate_protocol::json_error(error);
        let code = if json.error.code == "invalid_json" { "invalid_json" } else { "invalid_request" };
        ApiError::BadRequest { code, message: json.error.message }
    }

    /// A body that did not deserialize: like [`ApiError::json`], but a type error also names
    /// the top-level field it is in (serde's message names the value, not the field).
    pub fn body(error: &serde_json::Error, body: &[u8]) -> ApiError {
        let mut api_error = ApiError::json(error);
        if let (ApiError::BadRequest { code: "invalid_request", message }, Some(field)) = (&mut api_error, field_at(error, body))
            && !message.contains(&format!("`{field}`"))
        {
            *message = format!("`{field}`: {message}");
        }
        api_error
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::NotFound { code, message: message.into() }
    }
}

/// The top-level key of a JSON object body whose value holds the error's position.
fn field_at(error: &serde_json::Error, body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let line_start: usize = text.split_inclusive('\n').take(error.line().saturating_sub(1)).map(str::len).sum();
    let offset = line_start + error.column();
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    object
        .keys()
        .filter_map(|key| {
            let quoted = serde_json::to_string(key).ok()?;
            text.find(&quoted).filter(|position| *position < offset).map(|position| (position, key))
        })
        .max_by_key(|(position, _)| *position)
        .map(|(_, key)| key.clone())
}

/// Who is calling: the key's id (written to the audit log), its scope, and the account it is
/// bound to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub scope: Scope,
    pub account: Option<String>,
}

impl Caller {
    /// A key bound to one account never sees or changes another.
    pub fn may_touch(&self, account: &str) -> Result<(), ApiError> {
        match &self.account {
            Some(bound) if bound != account => Err(ApiError::Forbidden(format!("this key is bound to another account than `{account}`"))),
            _ => Ok(()),
        }
    }

    /// Like [`Caller::may_touch`] for reads of one record by id: another account's record is
    /// answered as if it did not exist, so ids cannot be probed across accounts.
    pub fn may_see(&self, account: &str, not_found: impl FnOnce() -> ApiError) -> Result<(), ApiError> {
        match &self.account {
            Some(bound) if bound != account => Err(not_found()),
            _ => Ok(()),
        }
    }

    /// Refuses callers whose scope is not listed.
    pub fn require(&self, scopes: &[Scope]) -> Result<(), ApiError> {
        if scopes.contains(&self.scope) {
            Ok(())
        } else {
            let names: Vec<&str> = scopes.iter().map(|scope| scope.as_str()).collect();
            Err(ApiError::Forbidden(format!(
                "this endpoint needs a key with scope {}; this key has `{}`",
                names.join(" or "),
                self.scope.as_str()
            )))
        }
    }

    /// Refuses keys bound to an account, for endpoints that span every account.
    pub fn require_unbound(&self) -> Result<(), ApiError> {
        match &self.account {
            Some(bound) => Err(ApiError::Forbidden(format!("this key is bound to account `{bound}` and cannot see other accounts"))),
            None => Ok(()),
        }
    }
}

/// The prefix of every API key: `tg_ID_SECRET`.
const KEY_PREFIX: &str = "tg_";

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn random_hex(n_bytes: usize) -> Result<String, getrandom::Error> {
    let mut bytes = vec![0u8; n_bytes];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyCreateError {
    #[error("unknown scope `{0}` (expected admin, integration, sidecar or account)")]
    Scope(String),
    #[error("scope `account` needs `--account ID`")]
    AccountRequired,
    #[error("only scope `account` can be bound to an account; `{0}` keys span every account")]
    BoundScope(&'static str),
    #[error("`--account` value `{0}` is not a valid account id")]
    AccountId(String),
    #[error("cannot gather randomness for a new key: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes a new API key and stores its hash, created at `now` (unix seconds); returns the key,
/// which is shown only this once.
pub fn create_key(repository: &dyn Repository, scope: &str, account: Option<&str>, now: i64) -> Result<String, KeyCreateError> {
    let scope = Scope::parse(scope).ok_or_else(|| KeyCreateError::Scope(scope.to_string()))?;
    if scope == Scope::Account && account.is_none() {
        return Err(KeyCreateError::AccountRequired);
    }
    // An admin, integration or sidecar key bound to one account would be a key that cannot
    // do its job (a sidecar subscribes to every account) or that meets other accounts' ids
    // (order ids are global), so binding is for customer keys only.
    if scope != Scope::Account && account.is_some() {
        return Err(KeyCreateError::BoundScope(scope.as_str()));
    }
    if let Some(account) = account
        && !changes::valid_id(account)
    {
        return Err(KeyCreateError::AccountId(account.to_string()));
    }
    let id = random_hex(8).map_err(KeyCreateError::Random)?;
    let secret = random_hex(32).map_err(KeyCreateError::Random)?;
    repository
        .create_key(&KeyRecord { id: id.clone(), secret_sha256: sha256_hex(&secret), scope, account: account.map(str::to_string) }, now)?;
    Ok(format!("{KEY_PREFIX}{id}_{secret}"))
}

/// Looks up the caller of an `Authorization: Bearer KEY` value.
pub fn authenticate(repository: &dyn Repository, bearer: &str) -> Result<Caller, ApiError> {
    let (id, secret) = bearer.strip_prefix(KEY_PREFIX).and_then(|rest| rest.split_once('_')).ok_or(ApiError::Unauthorized)?;
    if id.len() != 16 || !id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(ApiError::Unauthorized);
    }
    let record = repository.find_key(id)?.ok_or(ApiError::Unauthorized)?;
    // Both sides are SHA-256 digests of the same length; comparing digests leaks nothing
    // useful about the secret through timing.
    if record.secret_sha256 != sha256_hex(secret) {
        return Err(ApiError::Unauthorized);
    }
    Ok(Caller { key_id: record.id, scope: record.scope, account: record.account })
}

/// How a control plane is tuned, besides its data, catalog and keys. Fixed once it is open.
#[derive(Debug, Clone)]
pub struct Config {
    /// Longest validity of a license token, in seconds (a license ending sooner ends it sooner).
    pub token_ttl_secs: i64,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// How long a client may take to send a request head (`--header-read-timeout-secs`).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body (`--body-read-timeout-secs`).
    pub body_read_timeout: Duration,
    /// Longest long-poll wait on `/v1/snapshot`.
    pub max_wait: Duration,
    /// A new base is compiled once this many accounts changed since the published one (or
    /// this many deltas were published on it).
    pub compact_after: usize,
    /// The webhook endpoint the flags configure (subscribed to every event type), besides
    /// those managed through the API; `None`: only those.
    pub webhook: Option<webhooks::WebhookConfig>,
    /// `license.expiring` goes out this many days before a license's `expires_at`; 0: never.
    pub license_expiring_days: u32,
    /// Most totals in one `POST /v1/usage` answer.
    pub usage_page: u32,
    /// Stripe webhooks in (`POST /v1/integrations/stripe`); `None`: that route answers 404.
    pub stripe: Option<integrations::stripe::StripeConfig>,
    /// HubSpot webhooks in (`POST /v1/integrations/hubspot`); `None`: that route answers 404.
    pub hubspot: Option<integrations::hubspot::HubSpotConfig>,
    /// Where browsers reach this control plane (`https://tollgate.example.com`): portal links
    /// point there, and an https URL marks session cookies `Secure`. `None`: links use the
    /// `Host` of the request that made them.
    pub public_url: Option<String>,
    /// The one wall clock of the control plane: audit and key timestamps, access-request times,
    /// token `iat`/`exp`, usage periods, webhook schedules and snapshot `created_at`.
    pub clock: Arc<dyn Clock>,
}

impl Config {
    /// The body size and time limits of a request.
    pub fn body_limits(&self) -> tollgate_http::BodyLimits {
        tollgate_http::BodyLimits { max_bytes: self.max_body, timeout: self.body_read_timeout }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            max_body: 1024 * 1024,
            header_read_timeout: tollgate_http::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: tollgate_http::DEFAULT_BODY_READ_TIMEOUT,
            max_wait: Duration::from_secs(60),
            compact_after: publish::DEFAULT_COMPACT_AFTER,
            webhook: None,
            license_expiring_days: webhooks::DEFAULT_LICENSE_EXPIRING_DAYS,
            usage_page: ingest::TOTALS_PAGE,
            stripe: None,
            hubspot: None,
            public_url: None,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Everything the control plane's handlers share.
pub struct ControlPlane {
    pub repository: Arc<dyn Repository>,
    pub catalog: Arc<Source>,
    /// The catalog compiled alone: names, ranks and limits for validating requests.
    pub catalog_data: SnapshotData,
    /// The catalog's integration settings: Stripe prices, HubSpot stages, alert thresholds.
    pub integrations: tollgate_policy::Integrations,
    pub signing_key: Arc<SigningKey>,
    /// Published in the JWKS: the signing key's public half first, then retired keys.
    pub token_keys: Vec<VerifyingKey>,
    pub publisher: Arc<Publisher>,
    pub metrics: Arc<ControlPlaneMetrics>,
    /// Wakes the webhook task after a commit enqueued a message (or a delivery is retried).
    pub webhook_wake: tokio::sync::Notify,
    /// Accounts' limits, for `usage.threshold` messages.
    pub limits: limits::LimitCache,
    config: Config,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("catalog", &self.catalog.path).finish()
    }
}

/// Meta key under which the hash of the catalog last published is kept.
const CATALOG_HASH: &str = "catalog_sha256";

/// Opens the SQLite repository in `data_dir`.
pub fn open_repository(data_dir: &Path) -> Result<SqliteRepository, StoreError> {
    SqliteRepository::open(data_dir)
}

/// Where the license repository lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// The embedded default: `DIR/tollgate.db`.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL (`postgres://USER:PASSWORD@HOST:5432/NAME`), which
    /// several control-plane replicas can share.
    Postgres(String),
}

impl Database {
    /// Says where the database is without its password: a path, or `postgres host:port/name`.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(dir) => dir.join(store::DATABASE_FILE).display().to_string(),
            Database::Postgres(url) => match postgres::parse_url(url) {
                Ok(config) => format!("postgres {}", postgres::describe_url(&config)),
                Err(_) => "postgres (unparsable URL)".to_string(),
            },
        }
    }
}

/// Never shows a PostgreSQL URL, which may hold a password.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl From<&Path> for Database {
    fn from(data_dir: &Path) -> Database {
        Database::Sqlite(data_dir.to_path_buf())
    }
}

impl From<&PathBuf> for Database {
    fn from(data_dir: &PathBuf) -> Database {
        Database::Sqlite(data_dir.clone())
    }
}

impl From<PathBuf> for Database {
    fn from(data_dir: PathBuf) -> Database {
        Database::Sqlite(data_dir)
    }
}

impl From<&Database> for Database {
    fn from(database: &Database) -> Database {
        database.clone()
    }
}

/// Opens the repository `database` names, running its pending migrations.
pub fn open_database(database: &Database) -> Result<Arc<dyn Repository>, StoreError> {
    Ok(match database {
        Database::Sqlite(data_dir) => Arc::new(SqliteRepository::open(data_dir)?),
        Database::Postgres(url) => Arc::new(postgres::PgRepository::open(url)?),
    })
}

impl ControlPlane {
    /// Opens the repository `database` names (a data directory opens SQLite in it), running
    /// migrations, compiles the catalog, and bumps the revision
    /// when the catalog differs from the one last published, so sidecars get the new one.
    /// Tuned by [`Config::default`]: the system clock, no flag-configured webhook endpoint.
    pub fn open(
        database: impl Into<Database>,
        policies_dir: &Path,
        signing_key: SigningKey,
        retired_keys: Vec<VerifyingKey>,
    ) -> Result<ControlPlane, StartError> {
        ControlPlane::open_with_config(database, policies_dir, signing_key, retired_keys, Config::default())
    }

    /// Like [`ControlPlane::open`], tuned by `config` (a webhook, a token lifetime, a clock).
    pub fn open_with_config(
        database: impl Into<Database>,
        policies_dir: &Path,
        signing_key: SigningKey,
        retired_keys: Vec<VerifyingKey>,
        config: Config,
    ) -> Result<ControlPlane, StartError> {
        let catalog_path: PathBuf = policies_dir.join(CATALOG_FILE);
        let text = std::fs::read_to_string(&catalog_path)
            .map_err(|source| StartError::Catalog { path: catalog_path.display().to_string(), source })?;
        let catalog = Source { path: catalog_path, text };
        let compiled = tollgate_policy::compile_catalog(&catalog)?;
        let integrations = compiled.integrations().clone();
        let catalog_data = compiled.data().clone();
        let repository = open_database(&database.into())?;
        let catalog_hash = sha256_hex(&catalog.text);
        if repository.meta(CATALOG_HASH)?.as_deref() != Some(catalog_hash.as_str()) {
            let revision = repository.set_meta(CATALOG_HASH, &catalog_hash, true)?;
            tracing::info!(revision, "catalog changed since the last start; publishing a new revision");
        }
        webhooks::configure_endpoint(repository.as_ref(), config.webhook.as_ref(), config.clock.now())?;
        let committed = repository.revision()?;
        let mut token_keys = vec![signing_key.verifying_key()];
        token_keys.extend(retired_keys);
        let metrics = Arc::new(ControlPlaneMetrics::new());
        Ok(ControlPlane {
            repository,
            catalog: Arc::new(catalog),
            catalog_data,
            integrations,
            signing_key: Arc::new(signing_key),
            token_keys,
            publisher: Arc::new(Publisher::new(committed, Arc::clone(&metrics))),
            metrics,
            webhook_wake: tokio::sync::Notify::new(),
            limits: limits::LimitCache::default(),
            config,
        })
    }

    /// What this control plane was opened with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The control plane's clock, in unix seconds.
    pub fn now(&self) -> i64 {
        self.config.clock.now()
    }

    /// The control plane's clock, in unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.config.clock.now_ms()
    }

    /// A license token for `account_id` as of `now`, from the account as it is in the
    /// repository now.
    pub fn license_token(&self, account_id: &str, now: i64) -> Result<String, ApiError> {
        let account = self
            .repository
            .account(account_id)?
            .ok_or_else(|| ApiError::not_found("unknown_account", format!("account `{account_id}` does not exist")))?;
        if account.status == store::AccountState::Suspended {
            return Err(ApiError::Unprocessable(vec![format!(
                "account `{account_id}` is suspended; no license token is issued until it is resumed"
            )]));
        }
        let data = accounts::compile_one(&self.catalog, account_id, &account).map_err(ApiError::Policy)?;
        let mut claims = accounts::token_claims(&data, account_id, now)
            .ok_or_else(|| ApiError::Unprocessable(vec![format!("account `{account_id}` has no license valid now")]))?;
        let exp = claims
            .get("license_valid_until")
            .and_then(serde_json::Value::as_i64)
            .map_or(now + self.config.token_ttl_secs, |license_expiry| license_expiry.min(now + self.config.token_ttl_secs).max(now + 1));
        claims.insert("iss".into(), tokens::ISSUER.into());
        claims.insert("sub".into(), account_id.into());
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        claims.insert("exp".into(), exp.into());
        claims.insert("revision".into(), self.repository.revision()?.into());
        Ok(tokens::sign(&claims, &self.signing_key))
    }
}

/// Runs the control plane on `listener`: publishes a snapshot at once and after every commit,
/// scans license expiries and delivers webhook messages, and serves the API until
/// `shutdown` resolves; then drains for at most `drain_timeout`.
pub async fn run(
    control_plane: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    drain_timeout: std::time::Duration,
) {
    run_with_sync(control_plane, listener, None, shutdown, drain_timeout).await;
}

/// Like [`run`], with the sidecar routes (`/v1/snapshot`, `/v1/usage`) on their own listener
/// when `sync_listener` is given, so a NetworkPolicy can let only sidecars reach that port.
pub async fn run_with_sync(
    control_plane: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    sync_listener: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
    drain_timeout: std::time::Duration,
) {
    let (stop_sender, mut stop_receiver) = tokio::sync::watch::channel(false);
    let mut webhook_stop = stop_receiver.clone();
    let webhooks = tokio::spawn(webhooks::run(Arc::clone(&control_plane), async move {
        let _ = webhook_stop.wait_for(|stop| *stop).await;
    }));
    let publisher = tokio::spawn(publish::run(
        Arc::clone(&control_plane.publisher),
        Arc::clone(&control_plane.repository),
        Arc::clone(&control_plane.catalog),
        Arc::clone(&control_plane.signing_key),
        Arc::clone(&control_plane.config.clock),
        control_plane.config.compact_after,
        async move {
            let _ = stop_receiver.wait_for(|stop| *stop).await;
        },
    ));
    let upkeep = {
        let metrics = Arc::clone(&control_plane.metrics);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                interval.tick().await;
                metrics.upkeep();
                // After a burst of connections the allocator keeps what it freed.
                if let Some(free) = tollgate_http::memory::give_back(tollgate_http::memory::TRIM_ABOVE_BYTES) {
                    tracing::debug!(free_bytes = free, "gave free heap memory back to the OS");
                }
            }
        })
    };
    let (closing_sender, closing) = tokio::sync::watch::channel(false);
    let sync_server = sync_listener.map(|sync_listener| {
        let mut closing = closing.clone();
        let until_closing = async move {
            let _ = closing.wait_for(|closing| *closing).await;
        };
        tokio::spawn(api::serve(sync_listener, Arc::clone(&control_plane), api::Listener::Sync, until_closing, drain_timeout))
    });
    let scope = if sync_server.is_some() { api::Listener::Api } else { api::Listener::All };
    let shutdown = async move {
        shutdown.await;
        let _ = closing_sender.send(true);
    };
    api::serve(listener, control_plane, scope, shutdown, drain_timeout).await;
    if let Some(sync_server) = sync_server {
        let _ = sync_server.await;
    }
    upkeep.abort();
    let _ = stop_sender.send(true);
    let _ = publisher.await;
    let _ = webhooks.await;
}
