//! The license repository: accounts (with their licenses, users, groups, devices and
//! overrides), API keys, orders, the audit log, access requests and the revision counter.
//! [`Repository`] is the narrow interface the rest of the control plane uses, so a PostgreSQL
//! implementation can follow; [`SqliteRepository`] is the embedded default (WAL mode,
//! migrations at start). An account is stored as one JSON document: it is the unit of
//! consistency, validated as a whole by the policy compiler before every commit.
//! The usage tables (metering, decision counts) are in `usage_store`, the webhook tables
//! (endpoints, messages, deliveries, the license expiry index) in `webhook_store`.
//! Knows nothing about HTTP.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::integration_store::{IntegrationRepository, IntegrationTransaction};
use super::portal::store::PortalRepository;
use super::usage_store::{UsageRepository, UsageTransaction};
use super::webhook_store::{WebhookRepository, WebhookTransaction};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored document for `{id}` is not valid: {source}")]
    Document { id: String, source: serde_json::Error },
    #[error("cannot create data directory `{path}`: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("the write transaction did not run")]
    NotRun,
    #[error("the thread reading accounts for a build failed: {0}")]
    Thread(String),
    #[error("database schema version {0} is newer than this binary knows")]
    SchemaTooNew(i64),
    #[error("cannot gather randomness for a new id: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    Postgres(#[from] super::postgres::PgError),
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Admin,
    Integration,
    Sidecar,
    /// Bound to one account: that customer's own users.
    Account,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "admin" => Some(Scope::Admin),
            "integration" => Some(Scope::Integration),
            "sidecar" => Some(Scope::Sidecar),
            "account" => Some(Scope::Account),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Integration => "integration",
            Scope::Sidecar => "sidecar",
            Scope::Account => "account",
        }
    }
}

/// A stored API key: only the SHA-256 of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub secret_sha256: String,
    pub scope: Scope,
    pub account: Option<String>,
}

/// What is shown of an API key: never its secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub scope: Scope,
    pub account: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; the key authenticates no one after it.
    pub revoked_at: Option<i64>,
}

/// An account as stored: the same shape as an `[accounts.ID]` table of a policy file, plus
/// bookkeeping. Times are unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountDoc {
    pub status: AccountState,
    /// Number given to the next license, which is named `ACCOUNT-N`.
    pub next_license: u32,
    pub licenses: Vec<LicenseDoc>,
    pub users: BTreeMap<String, UserDoc>,
    pub groups: BTreeMap<String, Vec<String>>,
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountState {
    #[default]
    Active,
    Suspended,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseDoc {
    pub id: String,
    pub plan: String,
    pub addons: Vec<String>,
    pub seats: u32,
    pub starts_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub grace_days: u32,
    pub regions: Option<Vec<String>>,
    pub max_devices: Option<u32>,
    /// A cancelled license stays on record but is left out of snapshots.
    pub cancelled: bool,
    pub overrides: OverridesDoc,
    /// A trial license (a Stripe subscription that is `trialing`); absent in older documents.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trial: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverridesDoc {
    pub add_features: Vec<String>,
    pub remove_features: Vec<String>,
    pub limits: BTreeMap<String, LimitDoc>,
}

/// A limit as the policy files write it in table form; both absent means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDoc {
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    pub seat: bool,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    /// RFC 3339.
    pub at: String,
    pub key_id: String,
    pub action: String,
    pub account: Option<String>,
    pub target: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub revision: u64,
}

wire_enum! {
    /// What an access request asks for.
    pub enum AccessKind in "kind" {
        /// One feature, for good or until a date.
        Feature = "feature",
        /// More seats on the account's newest license.
        Seats = "seats",
        /// An add-on on the account's newest license.
        Addon = "addon",
    }
}

wire_enum! {
    /// Where an access request stands.
    pub enum AccessStatus in "status" {
        Pending = "pending",
        Approved = "approved",
        Denied = "denied",
    }
}

/// An access request as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: i64,
    pub account: String,
    pub user: String,
    pub requested_by: String,
    pub kind: AccessKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addon: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
    pub reason: String,
    pub status: AccessStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// RFC 3339: a grant that ends at this instant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
}

/// A stored order: the hash of its canonical body and the answer given the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    pub body_sha256: String,
    pub response: String,
}

/// What one write transaction may read and change. Everything done through it commits
/// together or not at all.
pub trait Transaction: UsageTransaction + IntegrationTransaction + WebhookTransaction {
    fn account(&mut self, id: &str) -> Result<Option<AccountDoc>, StoreError>;
    fn put_account(&mut self, id: &str, account: &AccountDoc) -> Result<(), StoreError>;
    fn order(&mut self, order_id: &str) -> Result<Option<OrderRecord>, StoreError>;
    /// Records a processed order, received at `now` (unix seconds).
    fn put_order(&mut self, order_id: &str, order: &OrderRecord, now: i64) -> Result<(), StoreError>;
    fn access_request(&mut self, id: i64) -> Result<Option<AccessRequest>, StoreError>;
    /// Inserts (`id` 0) or updates an access request; returns its id.
    fn put_access_request(&mut self, request: &AccessRequest) -> Result<i64, StoreError>;
    /// The revision this transaction's changes will carry: the committed one plus one,
    /// reserved on first use.
    fn next_revision(&mut self) -> Result<u64, StoreError>;
    fn audit(&mut self, entry: &NewAudit<'_>) -> Result<(), StoreError>;
    /// Stores `account` unless the stored one is already identical (bulk import): statements
    /// prepared once, and the stored document only parsed when its text differs.
    fn import_account(&mut self, id: &str, account: &AccountDoc) -> Result<Imported, StoreError>;
    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets a meta value without moving the revision.
    fn put_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError>;
}

/// What [`Transaction::import_account`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    Created,
    Updated,
    Unchanged,
}

/// An audit entry to append; `seq` is assigned by the store, `at` by the caller's clock.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    /// Unix seconds.
    pub at: i64,
    pub key_id: &'a str,
    pub action: &'a str,
    pub account: Option<&'a str>,
    pub target: Option<&'a str>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

impl<'a> NewAudit<'a> {
    /// The audit entry of key `id` revoked by `by` at `now`.
    pub fn key_revoked(by: &'a str, id: &'a str, now: i64) -> NewAudit<'a> {
        NewAudit {
            at: now,
            key_id: by,
            action: "key.revoke",
            account: None,
            target: Some(id),
            before: None,
            after: Some(serde_json::json!({"revoked_at": now})),
        }
    }
}

/// Filters for reading the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub account: Option<String>,
    pub after_seq: i64,
    pub limit: u32,
}

/// The license repository's interface.
pub trait Repository: Send + Sync + UsageRepository + IntegrationRepository + WebhookRepository + PortalRepository {
    /// Stores a new key, created at `now` (unix seconds). The repository never reads a clock:
    /// every time it records comes from its caller.
    fn create_key(&self, key: &KeyRecord, now: i64) -> Result<(), StoreError>;
    /// A key that is not revoked.
    fn find_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Revokes a key at `now` and audits it as done by `by`, in one transaction; `false` when
    /// no such key is live.
    fn revoke_key(&self, id: &str, by: &str, now: i64) -> Result<bool, StoreError>;
    /// Every key, revoked ones included, without secrets.
    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError>;
    /// Runs `change` in one write transaction: committed when it returns `Ok(true)`, rolled
    /// back when it returns `Ok(false)` or an error. See [`write`] for the typed form.
    fn transact(&self, change: &mut dyn FnMut(&mut dyn Transaction) -> Result<bool, StoreError>) -> Result<(), StoreError>;
    fn account(&self, id: &str) -> Result<Option<AccountDoc>, StoreError>;
    /// Every account and the revision they are at, read consistently.
    fn all_accounts(&self) -> Result<(u64, Vec<(String, AccountDoc)>), StoreError>;
    /// Hands every account to `each` in id order, one at a time, and gives the revision they
    /// are at, read consistently: a full build never holds every stored document at once. An
    /// error from `each` stops the scan. The default reads them all first.
    fn for_each_account(&self, each: &mut dyn FnMut(String, AccountDoc) -> Result<(), StoreError>) -> Result<u64, StoreError> {
        let (revision, accounts) = self.all_accounts()?;
        for (id, account) in accounts {
            each(id, account)?;
        }
        Ok(revision)
    }
    /// The accounts changed by commits after revision `after`, sorted by id, and the revision
    /// they are at, read consistently.
    fn accounts_changed_since(&self, after: u64) -> Result<(u64, Vec<(String, AccountDoc)>), StoreError>;
    fn revision(&self) -> Result<u64, StoreError>;
    fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
    fn access_requests(&self, account: Option<&str>, status: Option<AccessStatus>) -> Result<Vec<AccessRequest>, StoreError>;
    fn access_request(&self, id: i64) -> Result<Option<AccessRequest>, StoreError>;
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets a meta value; when `bump` the revision moves on too (a catalog change).
    fn set_meta(&self, key: &str, value: &str, bump: bool) -> Result<u64, StoreError>;
}

/// Runs `change` in one write transaction of `repository`: everything it did is committed
/// when it returns `Ok`, and nothing when it returns an error. A repository may run `change`
/// more than once (PostgreSQL re-runs a transaction that lost a serialisation conflict), each
/// time from scratch; the outcome of the last run is returned.
pub fn write<T, E: From<StoreError>>(
    repository: &dyn Repository,
    mut change: impl FnMut(&mut dyn Transaction) -> Result<T, E>,
) -> Result<T, E> {
    let mut outcome: Option<Result<T, E>> = None;
    repository.transact(&mut |transaction| {
        let result = change(transaction);
        let commit = result.is_ok();
        outcome = Some(result);
        Ok(commit)
    })?;
    outcome.unwrap_or_else(|| Err(StoreError::NotRun.into()))
}

/// Schema migrations, applied in order; the index plus one is the schema version.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL);
INSERT INTO revision (id, revision) VALUES (1, 0);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    scope TEXT NOT NULL,
    account TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE orders (
    order_id TEXT PRIMARY KEY,
    body_sha256 TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    account TEXT,
    target TEXT,
    before TEXT,
    after TEXT,
    revision INTEGER NOT NULL
);
CREATE INDEX audit_account ON audit (account, seq);
CREATE TABLE access_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    doc TEXT NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX access_requests_account ON access_requests (account, id);
"#,
    super::usage_store::MIGRATION,
    super::integration_store::MIGRATION,
    // Revoked keys stay on record (who had access, until when) but authenticate no one.
    "ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;",
    super::webhook_store::MIGRATION,
    // Incremental publishing reads the accounts changed after a revision.
    "CREATE INDEX accounts_revision ON accounts (revision);",
    super::portal::store::MIGRATION,
];

/// The file name of the database inside the data directory.
pub const DATABASE_FILE: &str = "tollgate.db";

pub struct SqliteRepository {
    connection: Mutex<Connection>,
    /// A second connection for long reads (snapshot compiles), so they never wait for a
    /// writer: WAL lets readers see the last commit while a write is in progress.
    reader: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteRepository")
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(std::time::Duration::from_secs(10))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an acknowledged commit survives power loss too, not only a process crash.
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    Ok(connection)
}

impl SqliteRepository {
    /// Opens (or creates) `DIR/tollgate.db` and runs any pending migrations.
    pub fn open(data_dir: &Path) -> Result<SqliteRepository, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
        let path = data_dir.join(DATABASE_FILE);
        let mut connection = open_connection(&path)?;
        migrate(&mut connection)?;
        let reader = open_connection(&path)?;
        Ok(SqliteRepository { connection: Mutex::new(connection), reader: Mutex::new(reader) })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction open: rusqlite rolls back
        // on drop, so the connection is still usable.
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn lock_reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > MIGRATIONS.len() as i64 {
        return Err(StoreError::SchemaTooNew(version));
    }
    for (idx, migration) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", idx as i64 + 1)?;
        transaction.commit()?;
        tracing::info!(version = idx + 1, "applied database migration");
    }
    Ok(())
}

fn parse_doc<T: serde::de::DeserializeOwned>(id: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Document { id: id.to_string(), source })
}

fn to_json<T: Serialize>(id: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Document { id: id.to_string(), source })
}

/// What importing `account` (serialised as `doc`) over the stored text does. Equal text is an
/// equal document; different text may still be one written by an older version (a field since
/// defaulted), so only then is it parsed.
pub(crate) fn import_outcome(id: &str, stored: Option<&str>, doc: &str, account: &AccountDoc) -> Imported {
    match stored {
        Some(text) if text == doc || parse_doc::<AccountDoc>(id, text).is_ok_and(|stored| stored == *account) => Imported::Unchanged,
        Some(_) => Imported::Updated,
        None => Imported::Created,
    }
}

pub(super) struct SqliteTransaction<'c> {
    pub(super) transaction: rusqlite::Transaction<'c>,
    revision: Option<u64>,
}

impl Transaction for SqliteTransaction<'_> {
    fn account(&mut self, id: &str) -> Result<Option<AccountDoc>, StoreError> {
        let text: Option<String> =
            self.transaction.query_row("SELECT doc FROM accounts WHERE id = ?1", [id], |row| row.get(0)).optional()?;
        text.map(|text| parse_doc(id, &text)).transpose()
    }

    fn put_account(&mut self, id: &str, account: &AccountDoc) -> Result<(), StoreError> {
        let revision = self.next_revision()?;
        let doc = to_json(id, account)?;
        self.transaction.execute(
            "INSERT INTO accounts (id, doc, revision) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, revision = excluded.revision",
            params![id, doc, revision as i64],
        )?;
        // Every account write keeps the expiry index `license.expiring` scans in step.
        self.index_license_expiries(id, account)?;
        Ok(())
    }

    fn order(&mut self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        Ok(self
            .transaction
            .query_row("SELECT body_sha256, response FROM orders WHERE order_id = ?1", [order_id], |row| {
                Ok(OrderRecord { body_sha256: row.get(0)?, response: row.get(1)? })
            })
            .optional()?)
    }

    fn put_order(&mut self, order_id: &str, order: &OrderRecord, now: i64) -> Result<(), StoreError> {
        self.transaction.execute(
            "INSERT INTO orders (order_id, body_sha256, response, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![order_id, order.body_sha256, order.response, now],
        )?;
        Ok(())
    }

    fn access_request(&mut self, id: i64) -> Result<Option<AccessRequest>, StoreError> {
        let text: Option<String> =
            self.transaction.query_row("SELECT doc FROM access_requests WHERE id = ?1", [id], |row| row.get(0)).optional()?;
        text.map(|text| parse_doc(&format!("access request {id}"), &text)).transpose()
    }

    fn put_access_request(&mut self, request: &AccessRequest) -> Result<i64, StoreError> {
        let name = format!("access request {}", request.id);
        if request.id == 0 {
            self.transaction.execute(
                "INSERT INTO access_requests (account, doc, status) VALUES (?1, '{}', ?2)",
                params![request.account, request.status.as_str()],
            )?;
            let id = self.transaction.last_insert_rowid();
            let stored = AccessRequest { id, ..request.clone() };
            self.transaction.execute("UPDATE access_requests SET doc = ?1 WHERE id = ?2", params![to_json(&name, &stored)?, id])?;
            Ok(id)
        } else {
            self.transaction.execute(
                "UPDATE access_requests SET doc = ?1, status = ?2 WHERE id = ?3",
                params![to_json(&name, request)?, request.status.as_str(), request.id],
            )?;
            Ok(request.id)
        }
    }

    fn next_revision(&mut self) -> Result<u64, StoreError> {
        if let Some(revision) = self.revision {
            return Ok(revision);
        }
        let revision: i64 =
            self.transaction
                .query_row("UPDATE revision SET revision = revision + 1 WHERE id = 1 RETURNING revision", [], |row| row.get(0))?;
        let revision = revision as u64;
        self.revision = Some(revision);
        Ok(revision)
    }

    fn audit(&mut self, entry: &NewAudit<'_>) -> Result<(), StoreError> {
        // A write that changes what sidecars see has reserved a revision; an audit-only write
        // (an access request filed or denied) records the revision in force, never a new one
        // that no snapshot would carry.
        let revision = match self.revision {
            Some(revision) => revision,
            None => read_revision(&self.transaction)?,
        };
        let before = entry.before.as_ref().map(serde_json::Value::to_string);
        let after = entry.after.as_ref().map(serde_json::Value::to_string);
        self.transaction.execute(
            "INSERT INTO audit (at, key_id, action, account, target, before, after, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![entry.at, entry.key_id, entry.action, entry.account, entry.target, before, after, revision as i64],
        )?;
        Ok(())
    }

    fn import_account(&mut self, id: &str, account: &AccountDoc) -> Result<Imported, StoreError> {
        let doc = to_json(id, account)?;
        let stored: Option<String> =
            self.transaction.prepare_cached("SELECT doc FROM accounts WHERE id = ?1")?.query_row([id], |row| row.get(0)).optional()?;
        let imported = import_outcome(id, stored.as_deref(), &doc, account);
        if imported == Imported::Unchanged {
            return Ok(imported);
        }
        let revision = self.next_revision()?;
        self.transaction
            .prepare_cached(
                "INSERT INTO accounts (id, doc, revision) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, revision = excluded.revision",
            )?
            .execute(params![id, doc, revision as i64])?;
        self.index_license_expiries(id, account)?;
        Ok(imported)
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.transaction.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0)).optional()?)
    }

    fn put_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.transaction.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// Every `(id, doc)` row, parsed.
fn read_accounts(rows: rusqlite::Rows<'_>) -> Result<Vec<(String, AccountDoc)>, StoreError> {
    let mut accounts = Vec::new();
    each_account_row(rows, &mut |id, doc| {
        accounts.push((id, doc));
        Ok(())
    })?;
    Ok(accounts)
}

/// Hands each `(id, doc)` row, parsed, to `each`.
fn each_account_row(
    mut rows: rusqlite::Rows<'_>,
    each: &mut dyn FnMut(String, AccountDoc) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let text: String = row.get(1)?;
        let doc = parse_doc(&id, &text)?;
        each(id, doc)?;
    }
    Ok(())
}

fn read_revision(connection: &Connection) -> Result<u64, StoreError> {
    let revision: i64 = connection.query_row("SELECT revision FROM revision WHERE id = 1", [], |row| row.get(0))?;
    Ok(revision as u64)
}

impl Repository for SqliteRepository {
    fn create_key(&self, key: &KeyRecord, now: i64) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO api_keys (id, secret_sha256, scope, account, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key.id, key.secret_sha256, key.scope.as_str(), key.account, now],
        )?;
        Ok(())
    }

    fn find_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<(String, String, String, Option<String>)> = self
            .lock_reader()
            .query_row("SELECT id, secret_sha256, scope, account FROM api_keys WHERE id = ?1 AND revoked_at IS NULL", [id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        // A key with a scope this binary does not know grants nothing.
        Ok(row.and_then(|(id, secret_sha256, scope, account)| {
            Scope::parse(&scope).map(|scope| KeyRecord { id, secret_sha256, scope, account })
        }))
    }

    fn revoke_key(&self, id: &str, by: &str, now: i64) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut wrapped = SqliteTransaction { transaction, revision: None };
        let revoked =
            wrapped.transaction.execute("UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL", params![now, id])? > 0;
        if revoked {
            wrapped.audit(&NewAudit::key_revoked(by, id, now))?;
        }
        wrapped.transaction.commit()?;
        Ok(revoked)
    }

    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let connection = self.lock_reader();
        let mut statement =
            connection.prepare("SELECT id, scope, account, created_at, revoked_at FROM api_keys ORDER BY created_at, id")?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))?;
        let mut keys = Vec::new();
        for row in rows {
            let (id, scope, account, created_at, revoked_at) = row?;
            if let Some(scope) = Scope::parse(&scope) {
                keys.push(KeyInfo { id, scope, account, created_at, revoked_at });
            }
        }
        Ok(keys)
    }

    fn transact(&self, change: &mut dyn FnMut(&mut dyn Transaction) -> Result<bool, StoreError>) -> Result<(), StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut wrapped = SqliteTransaction { transaction, revision: None };
        if change(&mut wrapped)? {
            wrapped.transaction.commit()?;
        }
        // Otherwise dropping the transaction rolls it back.
        Ok(())
    }

    fn account(&self, id: &str) -> Result<Option<AccountDoc>, StoreError> {
        let text: Option<String> =
            self.lock_reader().query_row("SELECT doc FROM accounts WHERE id = ?1", [id], |row| row.get(0)).optional()?;
        text.map(|text| parse_doc(id, &text)).transpose()
    }

    fn all_accounts(&self) -> Result<(u64, Vec<(String, AccountDoc)>), StoreError> {
        let mut accounts = Vec::new();
        let revision = self.for_each_account(&mut |id, account| {
            accounts.push((id, account));
            Ok(())
        })?;
        Ok((revision, accounts))
    }

    fn for_each_account(&self, each: &mut dyn FnMut(String, AccountDoc) -> Result<(), StoreError>) -> Result<u64, StoreError> {
        let mut connection = self.lock_reader();
        // One read transaction: the revision and the documents are from the same commit.
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let revision = read_revision(&transaction)?;
        each_account_row(transaction.prepare("SELECT id, doc FROM accounts ORDER BY id")?.query([])?, each)?;
        transaction.commit()?;
        Ok(revision)
    }

    fn accounts_changed_since(&self, after: u64) -> Result<(u64, Vec<(String, AccountDoc)>), StoreError> {
        let mut connection = self.lock_reader();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let revision = read_revision(&transaction)?;
        // Through the revision index, whatever the planner guesses: ordering by id would walk
        // the primary key instead, a scan of every account for every publish.
        let mut accounts = read_accounts(
            transaction
                .prepare_cached("SELECT id, doc FROM accounts INDEXED BY accounts_revision WHERE revision > ?1")?
                .query(params![after as i64])?,
        )?;
        transaction.commit()?;
        accounts.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((revision, accounts))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        read_revision(&self.lock_reader())
    }

    fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare(
            "SELECT seq, at, key_id, action, account, target, before, after, revision FROM audit
             WHERE seq > ?1 AND (?2 IS NULL OR account = ?2) ORDER BY seq LIMIT ?3",
        )?;
        let mut rows = statement.query(params![query.after_seq, query.account, query.limit])?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let json = |text: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
                text.map(|text| parse_doc(&format!("audit entry {seq}"), &text)).transpose()
            };
            entries.push(AuditEntry {
                seq,
                at: tollgate_core::period::format_rfc3339(row.get(1)?),
                key_id: row.get(2)?,
                action: row.get(3)?,
                account: row.get(4)?,
                target: row.get(5)?,
                before: json(row.get(6)?)?,
                after: json(row.get(7)?)?,
                revision: row.get::<_, i64>(8)? as u64,
            });
        }
        Ok(entries)
    }

    fn access_requests(&self, account: Option<&str>, status: Option<AccessStatus>) -> Result<Vec<AccessRequest>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare(
            "SELECT id, doc FROM access_requests WHERE (?1 IS NULL OR account = ?1) AND (?2 IS NULL OR status = ?2) ORDER BY id",
        )?;
        let mut rows = statement.query(params![account, status.map(AccessStatus::as_str)])?;
        let mut requests = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let text: String = row.get(1)?;
            requests.push(parse_doc(&format!("access request {id}"), &text)?);
        }
        Ok(requests)
    }

    fn access_request(&self, id: i64) -> Result<Option<AccessRequest>, StoreError> {
        let text: Option<String> =
            self.lock_reader().query_row("SELECT doc FROM access_requests WHERE id = ?1", [id], |row| row.get(0)).optional()?;
        text.map(|text| parse_doc(&format!("access request {id}"), &text)).transpose()
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock_reader().query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0)).optional()?)
    }

    fn set_meta(&self, key: &str, value: &str, bump: bool) -> Result<u64, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        transaction.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        if bump {
            transaction.execute("UPDATE revision SET revision = revision + 1 WHERE id = 1", [])?;
        }
        let revision = read_revision(&transaction)?;
        transaction.commit()?;
        Ok(revision)
    }
}
