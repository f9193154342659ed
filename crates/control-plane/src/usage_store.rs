//! The usage tables of the license repository: metering events (the dedup record, kept
//! forever), usage totals per account, meter and period stamped with one global usage
//! sequence, the sidecars that sent batches, and per-day decision counts and distinct users
//! (the webhook tables are in `webhook_store`). [`UsageTransaction`] is what an ingestion does
//! inside the repository's one write transaction; [`UsageRepository`] the reads. SQLite
//! stores integers as i64: counts saturate at `i64::MAX`. Knows nothing about HTTP.

use rusqlite::{OptionalExtension, params};

use super::store::{AccountDoc, SqliteRepository, SqliteTransaction, StoreError};

/// The second schema migration: everything usage needs. Indexes: totals by sequence (the
/// sidecars' change feed) and by (meter, period) (near-limit analytics), events by time
/// (raw export), the outbox by due time. Never edited: the third migration (`webhook_store`)
/// replaces the outbox, so databases at every version upgrade the same way.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE usage_sequence (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
INSERT INTO usage_sequence (id, seq) VALUES (1, 0);
CREATE TABLE usage_events (
    account TEXT NOT NULL,
    meter TEXT NOT NULL,
    event_id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    at INTEGER NOT NULL,
    period_start INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    sidecar TEXT NOT NULL,
    PRIMARY KEY (account, meter, event_id)
) WITHOUT ROWID;
CREATE INDEX usage_events_at ON usage_events (at);
CREATE TABLE usage_totals (
    account TEXT NOT NULL,
    meter TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    used INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (account, meter, period_start)
);
CREATE UNIQUE INDEX usage_totals_seq ON usage_totals (seq);
CREATE INDEX usage_totals_period ON usage_totals (meter, period_start);
CREATE TABLE usage_sidecars (
    sidecar TEXT PRIMARY KEY,
    first_batch_at INTEGER NOT NULL,
    last_batch_at INTEGER NOT NULL,
    batches INTEGER NOT NULL,
    events INTEGER NOT NULL
);
CREATE TABLE decision_counts (
    day INTEGER NOT NULL,
    feature TEXT NOT NULL,
    account TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, feature, account, reason)
) WITHOUT ROWID;
CREATE TABLE decision_users (
    day INTEGER NOT NULL,
    feature TEXT NOT NULL,
    account TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (day, feature, account, user)
) WITHOUT ROWID;
CREATE TABLE webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    meter TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    delivered_at INTEGER,
    UNIQUE (account, meter, period_start, threshold)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (status, next_attempt_ms);
"#;

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A metering event as the dedup record keeps it. Times are unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub account: &'a str,
    pub meter: &'a str,
    pub event_id: &'a str,
    pub amount: u64,
    pub at: i64,
    pub period_start: i64,
    pub received_at: i64,
    pub sidecar: &'a str,
}

/// One usage total: an account's use of a meter in the period starting at `period_start`,
/// last changed at usage sequence `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalRow {
    pub account: String,
    pub meter: String,
    pub period_start: i64,
    pub used: u64,
    pub seq: u64,
}

/// A total before and after an addition, and the sequence number it was stamped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageChange {
    pub before: u64,
    pub after: u64,
    pub seq: u64,
}

/// A stored event, for the raw export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub account: String,
    pub meter: String,
    pub event_id: String,
    pub amount: u64,
    pub at: i64,
    pub period_start: i64,
    pub received_at: i64,
    pub sidecar: String,
}

/// Totals whose period starts in `[from, to)`, optionally of one account and one meter,
/// ordered by (account, meter, period_start), or newest period first.
#[derive(Debug, Clone, Default)]
pub struct TotalsQuery {
    pub account: Option<String>,
    pub meter: Option<String>,
    pub from: i64,
    pub to: i64,
    pub newest_first: bool,
    pub limit: Option<u32>,
}

/// Decision counts summed over a range of days for one (feature, reason), with the number of
/// distinct accounts that had them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionTotal {
    pub feature: String,
    pub reason: String,
    pub count: u64,
    pub accounts: u64,
}

/// A sidecar that sent usage batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarRecord {
    pub sidecar: String,
    pub first_batch_at: i64,
    pub last_batch_at: i64,
    pub batches: u64,
    pub events: u64,
}

/// What an ingestion does inside the repository's write transaction.
pub trait UsageTransaction {
    /// The revision an account was last written at; `None` when it does not exist.
    fn account_revision(&mut self, id: &str) -> Result<Option<u64>, StoreError>;
    /// Adds an event to the dedup record; `false` when (account, meter, event id) is there already.
    fn record_event(&mut self, event: &NewEvent<'_>) -> Result<bool, StoreError>;
    /// Adds `amount` to a total and stamps it with the next usage sequence number.
    fn add_usage(&mut self, account: &str, meter: &str, period_start: i64, amount: u64, now: i64) -> Result<UsageChange, StoreError>;
    /// Totals stamped after `since`, in sequence order, at most `limit`.
    fn usage_changed_since(&mut self, since: u64, limit: u32) -> Result<Vec<TotalRow>, StoreError>;
    /// The newest usage sequence number handed out.
    fn usage_sequence(&mut self) -> Result<u64, StoreError>;
    fn sidecar_batch(&mut self, sidecar: &str, at: i64, n_events: u64) -> Result<(), StoreError>;
    fn add_decisions(&mut self, day: i64, feature: &str, account: &str, reason: &str, count: u64) -> Result<(), StoreError>;
    fn add_decision_user(&mut self, day: i64, feature: &str, account: &str, user: &str) -> Result<(), StoreError>;
}

/// Usage reads.
pub trait UsageRepository {
    /// An account with the revision it was last written at.
    fn account_with_revision(&self, id: &str) -> Result<Option<(u64, AccountDoc)>, StoreError>;
    fn usage_totals(&self, query: &TotalsQuery) -> Result<Vec<TotalRow>, StoreError>;
    /// Events whose own time is in `[from, to)`, optionally of one account, ordered by
    /// (account, meter, at, event id).
    fn usage_events(&self, account: Option<&str>, from: i64, to: i64) -> Result<Vec<EventRow>, StoreError>;
    /// Decision counts of the days starting in `[from_day, to_day)`.
    fn decision_totals(&self, from_day: i64, to_day: i64) -> Result<Vec<DecisionTotal>, StoreError>;
    /// Distinct (account, user) pairs per feature over the days starting in `[from_day, to_day)`.
    fn decision_users(&self, from_day: i64, to_day: i64) -> Result<Vec<(String, u64)>, StoreError>;
    fn usage_sidecars(&self) -> Result<Vec<SidecarRecord>, StoreError>;
}

impl UsageTransaction for SqliteTransaction<'_> {
    fn account_revision(&mut self, id: &str) -> Result<Option<u64>, StoreError> {
        let revision: Option<i64> =
            self.transaction.prepare_cached("SELECT revision FROM accounts WHERE id = ?1")?.query_row([id], |row| row.get(0)).optional()?;
        Ok(revision.map(to_u64))
    }

    fn record_event(&mut self, event: &NewEvent<'_>) -> Result<bool, StoreError> {
        let inserted = self
            .transaction
            .prepare_cached(
                "INSERT OR IGNORE INTO usage_events (account, meter, event_id, amount, at, period_start, received_at, sidecar)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                event.account,
                event.meter,
                event.event_id,
                to_i64(event.amount),
                event.at,
                event.period_start,
                event.received_at,
                event.sidecar
            ])?;
        Ok(inserted == 1)
    }

    fn add_usage(&mut self, account: &str, meter: &str, period_start: i64, amount: u64, now: i64) -> Result<UsageChange, StoreError> {
        let seq: i64 = self
            .transaction
            .prepare_cached("UPDATE usage_sequence SET seq = seq + 1 WHERE id = 1 RETURNING seq")?
            .query_row([], |row| row.get(0))?;
        let before: Option<i64> = self
            .transaction
            .prepare_cached("SELECT used FROM usage_totals WHERE account = ?1 AND meter = ?2 AND period_start = ?3")?
            .query_row(params![account, meter, period_start], |row| row.get(0))
            .optional()?;
        let before = before.map_or(0, to_u64);
        let after = to_u64(to_i64(before.saturating_add(amount)));
        self.transaction
            .prepare_cached(
                "INSERT INTO usage_totals (account, meter, period_start, used, seq, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account, meter, period_start) DO UPDATE
                 SET used = excluded.used, seq = excluded.seq, updated_at = excluded.updated_at",
            )?
            .execute(params![account, meter, period_start, to_i64(after), seq, now])?;
        Ok(UsageChange { before, after, seq: to_u64(seq) })
    }

    fn usage_changed_since(&mut self, since: u64, limit: u32) -> Result<Vec<TotalRow>, StoreError> {
        let mut statement = self
            .transaction
            .prepare_cached("SELECT account, meter, period_start, used, seq FROM usage_totals WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = statement.query_map(params![to_i64(since), limit], total_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn usage_sequence(&mut self) -> Result<u64, StoreError> {
        let seq: i64 = self.transaction.prepare_cached("SELECT seq FROM usage_sequence WHERE id = 1")?.query_row([], |row| row.get(0))?;
        Ok(to_u64(seq))
    }

    fn sidecar_batch(&mut self, sidecar: &str, at: i64, n_events: u64) -> Result<(), StoreError> {
        self.transaction
            .prepare_cached(
                "INSERT INTO usage_sidecars (sidecar, first_batch_at, last_batch_at, batches, events) VALUES (?1, ?2, ?2, 1, ?3)
                 ON CONFLICT (sidecar) DO UPDATE
                 SET last_batch_at = excluded.last_batch_at, batches = batches + 1, events = events + excluded.events",
            )?
            .execute(params![sidecar, at, to_i64(n_events)])?;
        Ok(())
    }

    fn add_decisions(&mut self, day: i64, feature: &str, account: &str, reason: &str, count: u64) -> Result<(), StoreError> {
        // Read and write rather than `count + excluded.count`, so the sum saturates instead
        // of SQLite turning an overflowing integer into a float.
        let current: Option<i64> = self
            .transaction
            .prepare_cached("SELECT count FROM decision_counts WHERE day = ?1 AND feature = ?2 AND account = ?3 AND reason = ?4")?
            .query_row(params![day, feature, account, reason], |row| row.get(0))
            .optional()?;
        let total = to_i64(current.map_or(0, to_u64).saturating_add(count));
        self.transaction
            .prepare_cached(
                "INSERT INTO decision_counts (day, feature, account, reason, count) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (day, feature, account, reason) DO UPDATE SET count = excluded.count",
            )?
            .execute(params![day, feature, account, reason, total])?;
        Ok(())
    }

    fn add_decision_user(&mut self, day: i64, feature: &str, account: &str, user: &str) -> Result<(), StoreError> {
        self.transaction
            .prepare_cached("INSERT OR IGNORE INTO decision_users (day, feature, account, user) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![day, feature, account, user])?;
        Ok(())
    }
}

fn total_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TotalRow> {
    Ok(TotalRow {
        account: row.get(0)?,
        meter: row.get(1)?,
        period_start: row.get(2)?,
        used: to_u64(row.get(3)?),
        seq: to_u64(row.get(4)?),
    })
}

impl UsageRepository for SqliteRepository {
    fn account_with_revision(&self, id: &str) -> Result<Option<(u64, AccountDoc)>, StoreError> {
        let row: Option<(i64, String)> = self
            .lock_reader()
            .prepare_cached("SELECT revision, doc FROM accounts WHERE id = ?1")?
            .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        row.map(|(revision, text)| {
            serde_json::from_str(&text)
                .map(|doc| (to_u64(revision), doc))
                .map_err(|source| StoreError::Document { id: id.to_string(), source })
        })
        .transpose()
    }

    fn usage_totals(&self, query: &TotalsQuery) -> Result<Vec<TotalRow>, StoreError> {
        let order = if query.newest_first { "period_start DESC" } else { "account, meter, period_start" };
        let sql = format!(
            "SELECT account, meter, period_start, used, seq FROM usage_totals
             WHERE (?1 IS NULL OR account = ?1) AND (?2 IS NULL OR meter = ?2) AND period_start >= ?3 AND period_start < ?4
             ORDER BY {order} LIMIT ?5"
        );
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(&sql)?;
        let limit = query.limit.map_or(-1, i64::from);
        let rows = statement.query_map(params![query.account, query.meter, query.from, query.to, limit], total_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn usage_events(&self, account: Option<&str>, from: i64, to: i64) -> Result<Vec<EventRow>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(
            "SELECT account, meter, event_id, amount, at, period_start, received_at, sidecar FROM usage_events
             WHERE (?1 IS NULL OR account = ?1) AND at >= ?2 AND at < ?3 ORDER BY account, meter, at, event_id",
        )?;
        let rows = statement.query_map(params![account, from, to], |row| {
            Ok(EventRow {
                account: row.get(0)?,
                meter: row.get(1)?,
                event_id: row.get(2)?,
                amount: to_u64(row.get(3)?),
                at: row.get(4)?,
                period_start: row.get(5)?,
                received_at: row.get(6)?,
                sidecar: row.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn decision_totals(&self, from_day: i64, to_day: i64) -> Result<Vec<DecisionTotal>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(
            // TOTAL, a float sum, never fails on overflow as SUM does; it is exact below 2^53 and
            // the cast saturates above i64::MAX, so huge stored counts cannot break a report.
            "SELECT feature, reason, CAST(MIN(TOTAL(count), 9.2233720368547758e18) AS INTEGER), COUNT(DISTINCT account) FROM decision_counts
             WHERE day >= ?1 AND day < ?2 AND count > 0 GROUP BY feature, reason ORDER BY feature, reason",
        )?;
        let rows = statement.query_map(params![from_day, to_day], |row| {
            Ok(DecisionTotal { feature: row.get(0)?, reason: row.get(1)?, count: to_u64(row.get(2)?), accounts: to_u64(row.get(3)?) })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn decision_users(&self, from_day: i64, to_day: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(
            "SELECT feature, COUNT(*) FROM (SELECT DISTINCT feature, account, user FROM decision_users WHERE day >= ?1 AND day < ?2)
             GROUP BY feature ORDER BY feature",
        )?;
        let rows = statement.query_map(params![from_day, to_day], |row| Ok((row.get(0)?, to_u64(row.get(1)?))))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn usage_sidecars(&self) -> Result<Vec<SidecarRecord>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection
            .prepare_cached("SELECT sidecar, first_batch_at, last_batch_at, batches, events FROM usage_sidecars ORDER BY sidecar")?;
        let rows = statement.query_map([], |row| {
            Ok(SidecarRecord {
                sidecar: row.get(0)?,
                first_batch_at: row.get(1)?,
                last_batch_at: row.get(2)?,
                batches: to_u64(row.get(3)?),
                events: to_u64(row.get(4)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
