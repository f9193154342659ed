//! The integration tables of the license repository: every inbound event from a payment or
//! CRM system (kept forever: the dedup record and the list of unmapped events), the links from
//! a system's customer or deal ids to accounts, and the last state applied per external object
//! (a Stripe subscription, a HubSpot deal), which keeps an older event from undoing a newer
//! one. Knows nothing about HTTP or about any one system's payloads.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::store::{SqliteRepository, SqliteTransaction, StoreError};

/// The schema migration that adds the integration tables.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE integration_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    object_id TEXT,
    occurred_at_ms INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    account TEXT,
    revision INTEGER,
    payload TEXT NOT NULL,
    UNIQUE (source, event_id)
);
CREATE INDEX integration_events_status ON integration_events (status, seq);
CREATE TABLE integration_links (
    source TEXT NOT NULL,
    external_id TEXT NOT NULL,
    account TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;
CREATE INDEX integration_links_account ON integration_links (account);
CREATE TABLE integration_objects (
    source TEXT NOT NULL,
    object_id TEXT NOT NULL,
    account TEXT NOT NULL,
    last_event_id TEXT NOT NULL,
    last_occurred_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (source, object_id)
) WITHOUT ROWID;
"#;

wire_enum! {
    /// What became of an inbound event.
    pub enum EventStatus in "status" {
        /// Turned into a change of an account (an order in the audit trail).
        Applied = "applied",
        /// Could not be mapped (no account, unknown price, ...): kept to be applied again once
        /// the mapping exists.
        Unmapped = "unmapped",
        /// Older than the last event applied to the same object: recorded, not applied.
        Stale = "stale",
        /// A type or stage that changes nothing.
        Ignored = "ignored",
    }
}

/// One inbound event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub source: String,
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub object_id: Option<String>,
    /// When the system says the event happened, in unix milliseconds.
    pub occurred_at_ms: i64,
    /// Unix seconds.
    pub received_at: i64,
    pub status: EventStatus,
    pub reason: Option<String>,
    pub account: Option<String>,
    /// The revision that carries the change, for applied events.
    pub revision: Option<u64>,
    #[serde(skip)]
    pub payload: String,
}

/// The last event applied to an external object, and what it left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectState {
    pub account: String,
    pub last_event_id: String,
    pub last_occurred_at_ms: i64,
    /// The integration's own record of the object (JSON).
    pub state: String,
}

/// A link from an external id (a Stripe customer, a HubSpot deal) to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub source: String,
    pub external_id: String,
    pub account: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// Filters for listing events.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub source: Option<String>,
    pub status: Option<EventStatus>,
    pub after_seq: i64,
    pub limit: u32,
}

/// What an inbound event does inside the repository's one write transaction.
pub trait IntegrationTransaction {
    fn integration_event(&mut self, source: &str, event_id: &str) -> Result<Option<StoredEvent>, StoreError>;
    /// Inserts the event, or updates the one with the same source and id.
    fn put_integration_event(&mut self, event: &StoredEvent) -> Result<(), StoreError>;
    fn integration_link(&mut self, source: &str, external_id: &str) -> Result<Option<String>, StoreError>;
    /// Links `external_id` to `account`, replacing an earlier link.
    fn put_integration_link(&mut self, link: &Link) -> Result<(), StoreError>;
    /// Removes a link; `false` when there was none.
    fn delete_integration_link(&mut self, source: &str, external_id: &str) -> Result<bool, StoreError>;
    fn integration_object(&mut self, source: &str, object_id: &str) -> Result<Option<ObjectState>, StoreError>;
    fn put_integration_object(&mut self, source: &str, object_id: &str, object: &ObjectState) -> Result<(), StoreError>;
}

/// The reads of the integration tables.
pub trait IntegrationRepository {
    fn integration_events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StoreError>;
    fn integration_event_by_seq(&self, seq: i64) -> Result<Option<StoredEvent>, StoreError>;
    fn integration_links(&self, source: Option<&str>, account: Option<&str>) -> Result<Vec<Link>, StoreError>;
    /// How many events stand at each status, for metrics and status pages.
    fn integration_event_counts(&self) -> Result<Vec<(String, EventStatus, u64)>, StoreError>;
}

const EVENT_COLUMNS: &str =
    "seq, source, event_id, type, object_id, occurred_at_ms, received_at, status, reason, account, revision, payload";

fn event_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let status: String = row.get(7)?;
    Ok(StoredEvent {
        seq: row.get(0)?,
        source: row.get(1)?,
        event_id: row.get(2)?,
        event_type: row.get(3)?,
        object_id: row.get(4)?,
        occurred_at_ms: row.get(5)?,
        received_at: row.get(6)?,
        // Only this module writes the column, always from `EventStatus::as_str`.
        status: EventStatus::parse(&status).unwrap_or(EventStatus::Unmapped),
        reason: row.get(8)?,
        account: row.get(9)?,
        revision: row.get::<_, Option<i64>>(10)?.map(|revision| revision as u64),
        payload: row.get(11)?,
    })
}

impl IntegrationTransaction for SqliteTransaction<'_> {
    fn integration_event(&mut self, source: &str, event_id: &str) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self
            .transaction
            .query_row(
                &format!("SELECT {EVENT_COLUMNS} FROM integration_events WHERE source = ?1 AND event_id = ?2"),
                params![source, event_id],
                event_row,
            )
            .optional()?)
    }

    fn put_integration_event(&mut self, event: &StoredEvent) -> Result<(), StoreError> {
        self.transaction.execute(
            "INSERT INTO integration_events
                 (source, event_id, type, object_id, occurred_at_ms, received_at, status, reason, account, revision, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (source, event_id) DO UPDATE SET
                 object_id = excluded.object_id, status = excluded.status, reason = excluded.reason,
                 account = excluded.account, revision = excluded.revision",
            params![
                event.source,
                event.event_id,
                event.event_type,
                event.object_id,
                event.occurred_at_ms,
                event.received_at,
                event.status.as_str(),
                event.reason,
                event.account,
                event.revision.map(|revision| revision as i64),
                event.payload,
            ],
        )?;
        Ok(())
    }

    fn integration_link(&mut self, source: &str, external_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .transaction
            .query_row(
                "SELECT account FROM integration_links WHERE source = ?1 AND external_id = ?2",
                params![source, external_id],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn put_integration_link(&mut self, link: &Link) -> Result<(), StoreError> {
        self.transaction.execute(
            "INSERT INTO integration_links (source, external_id, account, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (source, external_id) DO UPDATE SET account = excluded.account, created_at = excluded.created_at",
            params![link.source, link.external_id, link.account, link.created_at],
        )?;
        Ok(())
    }

    fn delete_integration_link(&mut self, source: &str, external_id: &str) -> Result<bool, StoreError> {
        let deleted = self
            .transaction
            .execute("DELETE FROM integration_links WHERE source = ?1 AND external_id = ?2", params![source, external_id])?;
        Ok(deleted > 0)
    }

    fn integration_object(&mut self, source: &str, object_id: &str) -> Result<Option<ObjectState>, StoreError> {
        Ok(self
            .transaction
            .query_row(
                "SELECT account, last_event_id, last_occurred_at_ms, state FROM integration_objects
                 WHERE source = ?1 AND object_id = ?2",
                params![source, object_id],
                |row| {
                    Ok(ObjectState {
                        account: row.get(0)?,
                        last_event_id: row.get(1)?,
                        last_occurred_at_ms: row.get(2)?,
                        state: row.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    fn put_integration_object(&mut self, source: &str, object_id: &str, object: &ObjectState) -> Result<(), StoreError> {
        self.transaction.execute(
            "INSERT INTO integration_objects (source, object_id, account, last_event_id, last_occurred_at_ms, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (source, object_id) DO UPDATE SET account = excluded.account, last_event_id = excluded.last_event_id,
                 last_occurred_at_ms = excluded.last_occurred_at_ms, state = excluded.state",
            params![source, object_id, object.account, object.last_event_id, object.last_occurred_at_ms, object.state],
        )?;
        Ok(())
    }
}

impl IntegrationRepository for SqliteRepository {
    fn integration_events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM integration_events
             WHERE seq > ?1 AND (?2 IS NULL OR source = ?2) AND (?3 IS NULL OR status = ?3) ORDER BY seq LIMIT ?4"
        ))?;
        let rows =
            statement.query_map(params![query.after_seq, query.source, query.status.map(EventStatus::as_str), query.limit], event_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn integration_event_by_seq(&self, seq: i64) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self
            .lock_reader()
            .query_row(&format!("SELECT {EVENT_COLUMNS} FROM integration_events WHERE seq = ?1"), [seq], event_row)
            .optional()?)
    }

    fn integration_links(&self, source: Option<&str>, account: Option<&str>) -> Result<Vec<Link>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare(
            "SELECT source, external_id, account, created_at FROM integration_links
             WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR account = ?2) ORDER BY source, external_id LIMIT 10000",
        )?;
        let rows = statement.query_map(params![source, account], |row| {
            Ok(Link { source: row.get(0)?, external_id: row.get(1)?, account: row.get(2)?, created_at: row.get(3)? })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn integration_event_counts(&self) -> Result<Vec<(String, EventStatus, u64)>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare("SELECT source, status, COUNT(*) FROM integration_events GROUP BY source, status")?;
        let rows = statement.query_map([], |row| {
            let status: String = row.get(1)?;
            Ok((row.get::<_, String>(0)?, EventStatus::parse(&status).unwrap_or(EventStatus::Unmapped), row.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
