//! The PostgreSQL license repository: [`PgRepository`] implements every repository trait
//! (`store`, `usage_store`, `integration_store`, `webhook_store`, `portal::store`) with the
//! same behaviour as `SqliteRepository`, so several control-plane replicas can share one
//! database. One file per store area mirrors the SQLite ones; `schema` holds the migrations,
//! `copy` the one-off copy of a SQLite repository into an empty PostgreSQL one.
//!
//! The repository traits are synchronous and are called from blocking threads, plain threads
//! and directly from async tasks (where blocking on the caller's runtime would panic). So the
//! repository owns a small runtime of its own that owns the pool and drives the connections:
//! every call sends its future there and waits for the answer on a blocking channel. Statements
//! carry owned parameters for that reason, and rows are decoded on the calling thread.
//!
//! Write transactions take one pooled connection for their whole life (`BEGIN` ... `COMMIT`,
//! rolled back when the change fails, declines or panics) and a transaction-level advisory
//! lock, so writers are serialised across every replica exactly as SQLite serialises them in
//! one process: a read-then-write (an order's replay check, an account's document) never
//! loses an update. The revision row is bumped with `UPDATE ... RETURNING` in the same
//! transaction, one sequence for every replica. Knows nothing about HTTP.

/// Boxes statement parameters: every value must be owned (`String`, `i64`, `Option<..>`),
/// since the statement runs on the repository's own runtime.
macro_rules! pg_params {
    ($($value:expr),* $(,)?) => {
        vec![$(Box::new($value) as crate::postgres::Param),*]
    };
}

mod copy;
mod integration;
mod portal;
mod schema;
mod usage;
mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{NoTls, Row};

use crate::store::{
    AccessRequest, AccessStatus, AccountDoc, AuditEntry, AuditQuery, Imported, KeyInfo, KeyRecord, NewAudit, OrderRecord, Repository,
    Scope, StoreError, Transaction,
};

pub use copy::{CopyReport, copy_from_sqlite};

/// One statement parameter, owned so the statement can run on the repository's runtime.
pub(crate) type Param = Box<dyn ToSql + Send + Sync>;

/// Advisory lock keys (`pg_advisory_xact_lock`): one for migrations, one for writers. Fixed
/// numbers, so every replica and every binary version agrees on them.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"
const WRITER_LOCK: i64 = 0x746f_6c6c_7772_6974; // "tollwrit"

/// How often a write transaction that failed with a serialisation failure or a deadlock is
/// run again from scratch before the error is returned.
const MAX_ATTEMPTS: u32 = 4;

/// Connections in the pool; the control plane's blocking threads share them.
const POOL_SIZE: usize = 16;

/// Why PostgreSQL could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("`{url}` is not a PostgreSQL URL like postgres://USER@HOST:5432/DATABASE: {source}")]
    Url { url: String, source: tokio_postgres::Error },
    #[error("cannot start the PostgreSQL client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot set up the PostgreSQL connection pool for {target}: {message}")]
    Pool { target: String, message: String },
    #[error("cannot reach PostgreSQL at {target}: {source}")]
    Connect { target: String, source: tokio_postgres::Error },
    #[error("cannot get a PostgreSQL connection to {target}: {source}")]
    Checkout { target: String, source: PoolError },
    #[error("PostgreSQL statement `{statement}` failed: {source}")]
    Statement { statement: String, source: tokio_postgres::Error },
    #[error("PostgreSQL statement `{statement}` returned no row")]
    NoRow { statement: String },
    #[error("PostgreSQL column `{column}` could not be read: {source}")]
    Column { column: String, source: tokio_postgres::Error },
    #[error("the PostgreSQL client task for {target} ended without an answer")]
    Lost { target: String },
    #[error("PostgreSQL database {target} holds schema version {version}, newer than this binary knows ({known})")]
    SchemaTooNew { target: String, version: i64, known: usize },
}

impl PgError {
    /// A serialisation failure or a deadlock: the transaction can be run again.
    fn is_retryable(&self) -> bool {
        match self {
            PgError::Statement { source, .. } => {
                matches!(source.code(), Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED)
            }
            _ => false,
        }
    }

    /// The SQLSTATE of a failed statement.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Statement { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// A statement shortened for error messages: whitespace collapsed, at most 80 characters.
fn statement_name(sql: &str) -> String {
    let collapsed: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match collapsed.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", collapsed.get(..cut).unwrap_or(&collapsed)),
        None => collapsed,
    }
}

fn statement_error(sql: &str, source: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(PgError::Statement { statement: statement_name(sql), source })
}

/// Reads column `idx` of `row`, naming the column when it does not hold a `T`.
pub(crate) fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx).map_err(|source| {
        let column = row.columns().get(idx).map_or_else(|| idx.to_string(), |column| column.name().to_string());
        StoreError::Postgres(PgError::Column { column, source })
    })
}

/// Where a database is, for messages and logs: host, port and database name, never the
/// user's password.
pub fn describe_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{database}")
}

/// Parses a `postgres://` URL (or a `key=value` connection string).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, PgError> {
    url.parse::<tokio_postgres::Config>().map_err(|source| PgError::Url { url: redact(url), source })
}

/// A URL with its password replaced, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "(connection string)".to_string() };
    let (authority, tail) = rest.split_once('/').map_or((rest, None), |(authority, tail)| (authority, Some(tail)));
    let authority = match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{credentials}@{host}"),
        },
        None => authority.to_string(),
    };
    match tail {
        Some(tail) => format!("{scheme}://{authority}/{}", tail.split('?').next().unwrap_or_default()),
        None => format!("{scheme}://{authority}"),
    }
}

/// The runtime that owns the pool and drives every connection. Shut down without waiting when
/// the repository is dropped, which may happen inside an async task.
struct Bridge {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What every handle on one database shares: the runtime, the pool, and the database's name
/// for messages.
struct Shared {
    // Field order matters: the pool's connections are dropped before their runtime.
    pool: Pool,
    target: String,
    bridge: Bridge,
}

impl Shared {
    /// Runs `future` on the repository's runtime and waits for its answer.
    fn run<T: Send + 'static>(&self, future: impl Future<Output = Result<T, StoreError>> + Send + 'static) -> Result<T, StoreError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.bridge.handle.spawn(async move {
            let _ = sender.send(future.await);
        });
        // The sender is dropped unanswered only when the task panicked or the runtime ended.
        receiver.recv().map_err(|_| StoreError::Postgres(PgError::Lost { target: self.target.clone() }))?
    }

    fn checkout_error(&self, source: PoolError) -> StoreError {
        checkout_error(&self.target, source)
    }
}

fn checkout_error(target: &str, source: PoolError) -> StoreError {
    match source {
        PoolError::Backend(source) => StoreError::Postgres(PgError::Connect { target: target.to_string(), source }),
        source => StoreError::Postgres(PgError::Checkout { target: target.to_string(), source }),
    }
}

/// Runs one statement on `client` (prepared once per connection) and returns its rows.
async fn query_on(client: &Object, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(|source| statement_error(sql, source))?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|param| param.as_ref() as &(dyn ToSql + Sync)).collect();
    client.query(&statement, &refs).await.map_err(|source| statement_error(sql, source))
}

/// Like [`query_on`], for a statement without rows: how many rows it changed.
async fn execute_on(client: &Object, sql: &str, params: &[Param]) -> Result<u64, StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(|source| statement_error(sql, source))?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|param| param.as_ref() as &(dyn ToSql + Sync)).collect();
    client.execute(&statement, &refs).await.map_err(|source| statement_error(sql, source))
}

async fn batch_on(client: &Object, sql: &str) -> Result<(), StoreError> {
    client.batch_execute(sql).await.map_err(|source| statement_error(sql, source))
}

/// The license repository in PostgreSQL. Cheap to clone: clones share the runtime and the
/// pool.
#[derive(Clone)]
pub struct PgRepository {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRepository").field("database", &self.shared.target).finish()
    }
}

impl PgRepository {
    /// Connects to `url` and runs any pending migrations (in one transaction, under an advisory
    /// lock, so replicas starting together apply each migration once).
    pub fn open(url: &str) -> Result<PgRepository, StoreError> {
        let mut config = parse_url(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("tollgate-control-plane");
        }
        let target = describe_url(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tollgate-postgres")
            .enable_all()
            .build()
            .map_err(PgError::Runtime)?;
        let handle = runtime.handle().clone();
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = {
            // The pool's timers belong to the repository's runtime.
            let _entered = handle.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(30)))
                .create_timeout(Some(Duration::from_secs(15)))
                .build()
                .map_err(|error| PgError::Pool { target: target.clone(), message: error.to_string() })?
        };
        let repository =
            PgRepository { shared: Arc::new(Shared { pool, target: target.clone(), bridge: Bridge { runtime: Some(runtime), handle } }) };
        let shared = Arc::clone(&repository.shared);
        let applied = repository.shared.run(async move { schema::migrate(&shared.pool, &shared.target).await })?;
        for version in applied {
            tracing::info!(version, database = %target, "applied PostgreSQL migration");
        }
        Ok(repository)
    }

    /// The connection pool, shared by every clone of this repository.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// The runtime that drives the pool's connections.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.shared.bridge.handle
    }

    /// The database as `host:port/name`, for messages.
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// Runs one statement on a pooled connection.
    fn query(&self, sql: &str, params: Vec<Param>) -> Result<Vec<Row>, StoreError> {
        let shared = Arc::clone(&self.shared);
        let sql = sql.to_string();
        self.shared.run(async move {
            let client = shared.pool.get().await.map_err(|error| shared.checkout_error(error))?;
            query_on(&client, &sql, &params).await
        })
    }

    fn query_opt(&self, sql: &str, params: Vec<Param>) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn query_one(&self, sql: &str, params: Vec<Param>) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or_else(|| no_row(sql))
    }

    fn execute(&self, sql: &str, params: Vec<Param>) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let sql = sql.to_string();
        self.shared.run(async move {
            let client = shared.pool.get().await.map_err(|error| shared.checkout_error(error))?;
            execute_on(&client, &sql, &params).await
        })
    }

    /// Runs the statements of `read` in one read-only snapshot, so they see one commit.
    fn read_snapshot(&self, statements: Vec<(&'static str, Vec<Param>)>) -> Result<Vec<Vec<Row>>, StoreError> {
        let shared = Arc::clone(&self.shared);
        self.shared.run(async move {
            let client = shared.pool.get().await.map_err(|error| shared.checkout_error(error))?;
            batch_on(&client, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
            let mut results = Vec::with_capacity(statements.len());
            for (sql, params) in &statements {
                match query_on(&client, sql, params).await {
                    Ok(rows) => results.push(rows),
                    Err(error) => {
                        let _ = batch_on(&client, "ROLLBACK").await;
                        return Err(error);
                    }
                }
            }
            batch_on(&client, "COMMIT").await?;
            Ok(results)
        })
    }

    /// Runs `change` in one write transaction, committed when it returns `Ok(true)`. Run again
    /// from scratch (up to [`MAX_ATTEMPTS`] times) when PostgreSQL reports a serialisation
    /// failure or a deadlock: the writer lock makes both rare (an operator's
    /// `default_transaction_isolation = serializable`, or a deadlock with a statement run
    /// outside a transaction), and a fresh run sees the state that won.
    fn with_transaction(&self, change: &mut dyn FnMut(&mut PgTransaction) -> Result<bool, StoreError>) -> Result<(), StoreError> {
        let mut attempt = 1;
        loop {
            let mut transaction = PgTransaction::begin(&self.shared)?;
            let outcome = change(&mut transaction).and_then(|commit| if commit { transaction.commit() } else { transaction.rollback() });
            let retry = transaction.retryable || matches!(&outcome, Err(StoreError::Postgres(error)) if error.is_retryable());
            drop(transaction);
            if retry && attempt < MAX_ATTEMPTS {
                tracing::warn!(attempt, database = %self.shared.target, "write transaction hit a serialisation failure or deadlock; running it again");
                attempt += 1;
                continue;
            }
            return outcome;
        }
    }
}

fn no_row(sql: &str) -> StoreError {
    StoreError::Postgres(PgError::NoRow { statement: statement_name(sql) })
}

/// One write transaction on one pooled connection. Dropped while still open (the change
/// failed or panicked), it rolls back; a connection that cannot roll back is discarded rather
/// than returned to the pool.
pub(crate) struct PgTransaction {
    shared: Arc<Shared>,
    client: Option<Arc<Object>>,
    /// The revision reserved by this transaction, once asked for.
    revision: Option<u64>,
    /// A statement failed with a serialisation failure or a deadlock.
    retryable: bool,
}

impl PgTransaction {
    fn begin(shared: &Arc<Shared>) -> Result<PgTransaction, StoreError> {
        let task_shared = Arc::clone(shared);
        let client = shared.run(async move {
            let client = task_shared.pool.get().await.map_err(|error| task_shared.checkout_error(error))?;
            batch_on(&client, "BEGIN").await?;
            // Every writer of every replica queues here, as SQLite's writers do on its lock.
            if let Err(error) = execute_on(&client, "SELECT pg_advisory_xact_lock($1)::text", &[Box::new(WRITER_LOCK) as Param]).await {
                let _ = batch_on(&client, "ROLLBACK").await;
                return Err(error);
            }
            Ok(client)
        })?;
        Ok(PgTransaction { shared: Arc::clone(shared), client: Some(Arc::new(client)), revision: None, retryable: false })
    }

    fn client(&self) -> Result<Arc<Object>, StoreError> {
        self.client.clone().ok_or(StoreError::NotRun)
    }

    fn note(&mut self, error: StoreError) -> StoreError {
        if matches!(&error, StoreError::Postgres(error) if error.is_retryable()) {
            self.retryable = true;
        }
        error
    }

    pub(crate) fn query(&mut self, sql: &str, params: Vec<Param>) -> Result<Vec<Row>, StoreError> {
        let client = self.client()?;
        let sql = sql.to_string();
        self.shared.run(async move { query_on(&client, &sql, &params).await }).map_err(|error| self.note(error))
    }

    pub(crate) fn query_opt(&mut self, sql: &str, params: Vec<Param>) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    pub(crate) fn query_one(&mut self, sql: &str, params: Vec<Param>) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or_else(|| no_row(sql))
    }

    pub(crate) fn execute(&mut self, sql: &str, params: Vec<Param>) -> Result<u64, StoreError> {
        let client = self.client()?;
        let sql = sql.to_string();
        self.shared.run(async move { execute_on(&client, &sql, &params).await }).map_err(|error| self.note(error))
    }

    fn finish(&mut self, sql: &'static str) -> Result<(), StoreError> {
        let client = self.client()?;
        let result = self.shared.run(async move { batch_on(&client, sql).await });
        if result.is_ok() {
            // Back to the pool, idle.
            self.client = None;
        }
        result.map_err(|error| self.note(error))
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.finish("COMMIT")
    }

    fn rollback(&mut self) -> Result<(), StoreError> {
        self.finish("ROLLBACK")
    }
}

impl Drop for PgTransaction {
    fn drop(&mut self) {
        if self.client.is_some() && self.rollback().is_err() {
            // The connection may still be inside the transaction: never hand it out again.
            if let Some(client) = self.client.take().and_then(|client| Arc::try_unwrap(client).ok()) {
                let _detached = Object::take(client);
            }
        }
    }
}

fn parse_doc<T: serde::de::DeserializeOwned>(id: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Document { id: id.to_string(), source })
}

fn to_json<T: serde::Serialize>(id: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Document { id: id.to_string(), source })
}

/// A stored unsigned number: BIGINT holds i64, so values above `i64::MAX` saturate (as in
/// SQLite) and negative ones read as 0.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn text(value: &str) -> String {
    value.to_string()
}

fn optional_text(value: Option<&str>) -> Option<String> {
    value.map(str::to_string)
}

const UPSERT_ACCOUNT: &str = "INSERT INTO accounts (id, doc, revision) VALUES ($1, $2, $3)
     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, revision = excluded.revision";

impl PgTransaction {
    fn read_revision(&mut self) -> Result<u64, StoreError> {
        let row = self.query_one("SELECT revision FROM revision WHERE id = 1", Vec::new())?;
        Ok(to_u64(get(&row, 0)?))
    }
}

impl Transaction for PgTransaction {
    fn account(&mut self, id: &str) -> Result<Option<AccountDoc>, StoreError> {
        let row = self.query_opt("SELECT doc FROM accounts WHERE id = $1", pg_params![text(id)])?;
        row.map(|row| parse_doc(id, &get::<String>(&row, 0)?)).transpose()
    }

    fn put_account(&mut self, id: &str, account: &AccountDoc) -> Result<(), StoreError> {
        let revision = self.next_revision()?;
        let doc = to_json(id, account)?;
        self.execute(UPSERT_ACCOUNT, pg_params![text(id), doc, to_i64(revision)])?;
        // Every account write keeps the expiry index `license.expiring` scans in step.
        crate::webhook_store::WebhookTransaction::index_license_expiries(self, id, account)?;
        Ok(())
    }

    fn order(&mut self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row = self.query_opt("SELECT body_sha256, response FROM orders WHERE order_id = $1", pg_params![text(order_id)])?;
        row.map(|row| Ok(OrderRecord { body_sha256: get(&row, 0)?, response: get(&row, 1)? })).transpose()
    }

    fn put_order(&mut self, order_id: &str, order: &OrderRecord, now: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO orders (order_id, body_sha256, response, created_at) VALUES ($1, $2, $3, $4)",
            pg_params![text(order_id), order.body_sha256.clone(), order.response.clone(), now],
        )?;
        Ok(())
    }

    fn access_request(&mut self, id: i64) -> Result<Option<AccessRequest>, StoreError> {
        let row = self.query_opt("SELECT doc FROM access_requests WHERE id = $1", pg_params![id])?;
        row.map(|row| parse_doc(&format!("access request {id}"), &get::<String>(&row, 0)?)).transpose()
    }

    fn put_access_request(&mut self, request: &AccessRequest) -> Result<i64, StoreError> {
        let name = format!("access request {}", request.id);
        if request.id == 0 {
            let row = self.query_one(
                "INSERT INTO access_requests (account, doc, status) VALUES ($1, '{}', $2) RETURNING id",
                pg_params![request.account.clone(), text(request.status.as_str())],
            )?;
            let id: i64 = get(&row, 0)?;
            let stored = AccessRequest { id, ..request.clone() };
            self.execute("UPDATE access_requests SET doc = $1 WHERE id = $2", pg_params![to_json(&name, &stored)?, id])?;
            Ok(id)
        } else {
            self.execute(
                "UPDATE access_requests SET doc = $1, status = $2 WHERE id = $3",
                pg_params![to_json(&name, request)?, text(request.status.as_str()), request.id],
            )?;
            Ok(request.id)
        }
    }

    fn next_revision(&mut self) -> Result<u64, StoreError> {
        if let Some(revision) = self.revision {
            return Ok(revision);
        }
        // The row lock taken here holds until commit: one revision sequence for every replica.
        let row = self.query_one("UPDATE revision SET revision = revision + 1 WHERE id = 1 RETURNING revision", Vec::new())?;
        let revision = to_u64(get(&row, 0)?);
        self.revision = Some(revision);
        Ok(revision)
    }

    fn audit(&mut self, entry: &NewAudit<'_>) -> Result<(), StoreError> {
        // As in SQLite: an audit-only write records the revision in force, never a new one.
        let revision = match self.revision {
            Some(revision) => revision,
            None => self.read_revision()?,
        };
        let before = entry.before.as_ref().map(serde_json::Value::to_string);
        let after = entry.after.as_ref().map(serde_json::Value::to_string);
        self.execute(
            "INSERT INTO audit (at, key_id, action, account, target, before, after, revision) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            pg_params![
                entry.at,
                text(entry.key_id),
                text(entry.action),
                optional_text(entry.account),
                optional_text(entry.target),
                before,
                after,
                to_i64(revision)
            ],
        )?;
        Ok(())
    }

    fn import_account(&mut self, id: &str, account: &AccountDoc) -> Result<Imported, StoreError> {
        let doc = to_json(id, account)?;
        let stored: Option<String> =
            self.query_opt("SELECT doc FROM accounts WHERE id = $1", pg_params![text(id)])?.map(|row| get(&row, 0)).transpose()?;
        let imported = crate::store::import_outcome(id, stored.as_deref(), &doc, account);
        if imported == Imported::Unchanged {
            return Ok(imported);
        }
        let revision = self.next_revision()?;
        self.execute(UPSERT_ACCOUNT, pg_params![text(id), doc, to_i64(revision)])?;
        crate::webhook_store::WebhookTransaction::index_license_expiries(self, id, account)?;
        Ok(imported)
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.query_opt("SELECT value FROM meta WHERE key = $1", pg_params![text(key)])?.map(|row| get(&row, 0)).transpose()
    }

    fn put_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            pg_params![text(key), text(value)],
        )?;
        Ok(())
    }
}

fn audit_entry(row: &Row, with_documents: bool) -> Result<AuditEntry, StoreError> {
    let seq: i64 = get(row, 0)?;
    let json = |text: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
        text.map(|text| parse_doc(&format!("audit entry {seq}"), &text)).transpose()
    };
    let (before, after, revision) =
        if with_documents { (json(get(row, 6)?)?, json(get(row, 7)?)?, get::<i64>(row, 8)?) } else { (None, None, get::<i64>(row, 6)?) };
    Ok(AuditEntry {
        seq,
        at: tollgate_core::period::format_rfc3339(get(row, 1)?),
        key_id: get(row, 2)?,
        action: get(row, 3)?,
        account: get(row, 4)?,
        target: get(row, 5)?,
        before,
        after,
        revision: to_u64(revision),
    })
}

fn account_rows(rows: &[Row]) -> Result<Vec<(String, AccountDoc)>, StoreError> {
    rows.iter()
        .map(|row| {
            let id: String = get(row, 0)?;
            let doc = parse_doc(&id, &get::<String>(row, 1)?)?;
            Ok((id, doc))
        })
        .collect()
}

impl Repository for PgRepository {
    fn create_key(&self, key: &KeyRecord, now: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO api_keys (id, secret_sha256, scope, account, created_at) VALUES ($1, $2, $3, $4, $5)",
            pg_params![key.id.clone(), key.secret_sha256.clone(), text(key.scope.as_str()), key.account.clone(), now],
        )?;
        Ok(())
    }

    fn find_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let Some(row) = self.query_opt(
            "SELECT id, secret_sha256, scope, account FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
            pg_params![text(id)],
        )?
        else {
            return Ok(None);
        };
        // A key with a scope this binary does not know grants nothing.
        let Some(scope) = Scope::parse(&get::<String>(&row, 2)?) else { return Ok(None) };
        Ok(Some(KeyRecord { id: get(&row, 0)?, secret_sha256: get(&row, 1)?, scope, account: get(&row, 3)? }))
    }

    fn revoke_key(&self, id: &str, by: &str, now: i64) -> Result<bool, StoreError> {
        let mut revoked = false;
        self.with_transaction(&mut |transaction| {
            revoked = transaction
                .execute("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL", pg_params![now, text(id)])?
                > 0;
            if revoked {
                transaction.audit(&NewAudit::key_revoked(by, id, now))?;
            }
            Ok(true)
        })?;
        Ok(revoked)
    }

    fn keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let rows = self.query("SELECT id, scope, account, created_at, revoked_at FROM api_keys ORDER BY created_at, id", Vec::new())?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(scope) = Scope::parse(&get::<String>(row, 1)?) {
                keys.push(KeyInfo { id: get(row, 0)?, scope, account: get(row, 2)?, created_at: get(row, 3)?, revoked_at: get(row, 4)? });
            }
        }
        Ok(keys)
    }

    fn transact(&self, change: &mut dyn FnMut(&mut dyn Transaction) -> Result<bool, StoreError>) -> Result<(), StoreError> {
        self.with_transaction(&mut |transaction| change(transaction))
    }

    fn account(&self, id: &str) -> Result<Option<AccountDoc>, StoreError> {
        let row = self.query_opt("SELECT doc FROM accounts WHERE id = $1", pg_params![text(id)])?;
        row.map(|row| parse_doc(id, &get::<String>(&row, 0)?)).transpose()
    }

    fn all_accounts(&self) -> Result<(u64, Vec<(String, AccountDoc)>), StoreError> {
        let results = self.read_snapshot(vec![
            ("SELECT revision FROM revision WHERE id = 1", Vec::new()),
            ("SELECT id, doc FROM accounts ORDER BY id", Vec::new()),
        ])?;
        let mut results = results.into_iter();
        let revision = revision_of(results.next())?;
        Ok((revision, account_rows(&results.next().unwrap_or_default())?))
    }

    fn accounts_changed_since(&self, after: u64) -> Result<(u64, Vec<(String, AccountDoc)>), StoreError> {
        let results = self.read_snapshot(vec![
            ("SELECT revision FROM revision WHERE id = 1", Vec::new()),
            ("SELECT id, doc FROM accounts WHERE revision > $1", pg_params![to_i64(after)]),
        ])?;
        let mut results = results.into_iter();
        let revision = revision_of(results.next())?;
        let mut accounts = account_rows(&results.next().unwrap_or_default())?;
        // Sorted here, as in SQLite: the revision index finds the rows, the id order is cheap.
        accounts.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((revision, accounts))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let row = self.query_one("SELECT revision FROM revision WHERE id = 1", Vec::new())?;
        Ok(to_u64(get(&row, 0)?))
    }

    fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self.query(
            "SELECT seq, at, key_id, action, account, target, before, after, revision FROM audit
             WHERE seq > $1 AND ($2::text IS NULL OR account = $2) ORDER BY seq LIMIT $3",
            pg_params![query.after_seq, query.account.clone(), i64::from(query.limit)],
        )?;
        rows.iter().map(|row| audit_entry(row, true)).collect()
    }

    fn access_requests(&self, account: Option<&str>, status: Option<AccessStatus>) -> Result<Vec<AccessRequest>, StoreError> {
        let rows = self.query(
            "SELECT id, doc FROM access_requests WHERE ($1::text IS NULL OR account = $1) AND ($2::text IS NULL OR status = $2) ORDER BY id",
            pg_params![optional_text(account), status.map(|status| text(status.as_str()))],
        )?;
        rows.iter()
            .map(|row| {
                let id: i64 = get(row, 0)?;
                parse_doc(&format!("access request {id}"), &get::<String>(row, 1)?)
            })
            .collect()
    }

    fn access_request(&self, id: i64) -> Result<Option<AccessRequest>, StoreError> {
        let row = self.query_opt("SELECT doc FROM access_requests WHERE id = $1", pg_params![id])?;
        row.map(|row| parse_doc(&format!("access request {id}"), &get::<String>(&row, 0)?)).transpose()
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.query_opt("SELECT value FROM meta WHERE key = $1", pg_params![text(key)])?.map(|row| get(&row, 0)).transpose()
    }

    fn set_meta(&self, key: &str, value: &str, bump: bool) -> Result<u64, StoreError> {
        let mut revision = 0;
        self.with_transaction(&mut |transaction| {
            transaction.put_meta(key, value)?;
            revision = if bump { transaction.next_revision()? } else { transaction.read_revision()? };
            Ok(true)
        })?;
        Ok(revision)
    }
}

fn revision_of(rows: Option<Vec<Row>>) -> Result<u64, StoreError> {
    let rows = rows.unwrap_or_default();
    let row = rows.first().ok_or_else(|| no_row("SELECT revision FROM revision WHERE id = 1"))?;
    Ok(to_u64(get(row, 0)?))
}
