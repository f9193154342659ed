//! The webhook tables of the license repository: endpoints and the event types they subscribe
//! to, messages (one per event, its body fixed when enqueued, with an optional dedup key so an
//! event is enqueued once ever), deliveries (one per message and endpoint, the outbox the
//! delivery task works through), and the index of license expiries that `license.expiring`
//! scans instead of walking every account. [`WebhookTransaction`] is what writes do inside the
//! repository's one write transaction (so an event is enqueued exactly when the change that
//! causes it commits); [`WebhookRepository`] the reads and the delivery bookkeeping. Knows
//! nothing about HTTP or signing.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, params};

use super::store::{AccountDoc, SqliteRepository, SqliteTransaction, StoreError};

/// The third schema migration: endpoints, messages and deliveries replace the threshold-only
/// `webhook_outbox`, whose rows are carried over (as `usage.threshold` messages to the endpoint
/// `configured`, the one `--webhook-url` sets), and the license expiry index is filled from the
/// stored accounts.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    description TEXT,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE webhook_subscriptions (
    event_type TEXT NOT NULL,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    PRIMARY KEY (event_type, endpoint_id)
) WITHOUT ROWID;
CREATE TABLE webhook_messages (
    id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    dedup_key TEXT UNIQUE,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL REFERENCES webhook_messages (id),
    endpoint_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    delivered_at INTEGER,
    UNIQUE (message_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_ms);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, status);
INSERT INTO webhook_messages (id, event_type, dedup_key, body, created_at)
    SELECT 'msg_outbox_' || id, 'usage.threshold',
           'usage.threshold/' || account || '/' || meter || '/' || period_start || '/' || threshold,
           json_object('type', 'usage.threshold', 'timestamp', strftime('%Y-%m-%dT%H:%M:%SZ', created_at, 'unixepoch'),
                       'data', json_remove(json(body), '$.type', '$.at')),
           created_at
    FROM webhook_outbox;
INSERT INTO webhook_deliveries (message_id, endpoint_id, status, attempts, next_attempt_ms, last_error, created_at, delivered_at)
    SELECT 'msg_outbox_' || id, 'configured', status, attempts, next_attempt_ms, last_error, created_at, delivered_at
    FROM webhook_outbox;
DROP TABLE webhook_outbox;
CREATE TABLE license_expiries (
    account TEXT NOT NULL,
    license_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    notified INTEGER NOT NULL,
    PRIMARY KEY (account, license_id)
);
CREATE INDEX license_expiries_due ON license_expiries (notified, expires_at);
INSERT OR IGNORE INTO license_expiries (account, license_id, expires_at, notified)
    SELECT accounts.id, json_extract(license.value, '$.id'), json_extract(license.value, '$.expires_at'), 0
    FROM accounts, json_each(accounts.doc, '$.licenses') AS license
    WHERE json_extract(license.value, '$.expires_at') IS NOT NULL AND NOT json_extract(license.value, '$.cancelled');
"#;

wire_enum! {
    /// What a webhook message is about: its `type`, and what an endpoint subscribes to.
    pub enum EventType in "event_types" {
        /// A usage total reached one of its meter's thresholds (percent of the limit).
        UsageThreshold = "usage.threshold",
        /// An order was applied (once per order id; replays send nothing).
        OrderApplied = "order.applied",
        /// A license expires within `--license-expiring-days`.
        LicenseExpiring = "license.expiring",
        AccessRequestCreated = "access_request.created",
        AccessRequestApproved = "access_request.approved",
        AccessRequestDenied = "access_request.denied",
        /// An inbound integration event (Stripe, HubSpot) matched no catalog mapping.
        IntegrationEventUnmapped = "integration.event_unmapped",
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    /// Every attempt failed, or the endpoint was deleted; kept for inspection, retried only
    /// by hand (`POST /v1/webhooks/deliveries/{id}/retry`).
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryStatus> {
        match text {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// A webhook endpoint as stored. `secret` is the `whsec_` form; it signs, so it is kept as is
/// (the database is as secret as the signing key beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    pub event_types: Vec<EventType>,
    pub enabled: bool,
    pub description: Option<String>,
    pub secret: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A message to enqueue: `body` is the exact JSON every attempt to every endpoint sends.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub id: &'a str,
    pub event_type: EventType,
    /// When given, a second message with the same key is never enqueued.
    pub dedup_key: Option<&'a str>,
    pub body: &'a str,
    pub created_at: i64,
}

/// One message to one endpoint, with the message's type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub message_id: String,
    pub endpoint_id: String,
    pub event_type: String,
    pub body: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    /// Unix milliseconds.
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// A due delivery and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub delivery: Delivery,
    pub url: String,
    pub secret: String,
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryUpdate {
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
}

/// A license that expires soon, from the expiry index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub license_id: String,
    pub account: String,
    pub expires_at: i64,
}

/// What writes do with webhooks inside the repository's write transaction.
pub trait WebhookTransaction {
    /// Whether an enabled endpoint subscribes to `event_type`.
    fn has_subscribers(&mut self, event_type: EventType) -> Result<bool, StoreError>;
    /// Stores the message and one pending delivery, due at once, per enabled endpoint
    /// subscribed to its type; returns how many deliveries. Nothing is stored (and 0 returned)
    /// when no endpoint subscribes, or when a message with the same dedup key exists.
    fn enqueue_message(&mut self, message: &NewMessage<'_>) -> Result<usize, StoreError>;
    fn webhook_endpoint(&mut self, id: &str) -> Result<Option<Endpoint>, StoreError>;
    /// Inserts or replaces an endpoint and its subscriptions.
    fn put_webhook_endpoint(&mut self, endpoint: &Endpoint) -> Result<(), StoreError>;
    /// Deletes an endpoint; its pending deliveries become failed with `reason`. `false` when
    /// there was no such endpoint.
    fn delete_webhook_endpoint(&mut self, id: &str, reason: &str) -> Result<bool, StoreError>;
    /// Keeps the expiry index in step with an account being stored: one row per license that
    /// is not cancelled and has an expiry. A license whose expiry did not change keeps its
    /// notified mark; a moved expiry (a renewal) is a new date to notify about.
    fn index_license_expiries(&mut self, account_id: &str, account: &AccountDoc) -> Result<(), StoreError>;
    /// Marks a license's expiry notified, if it is still the one indexed.
    fn mark_expiry_notified(&mut self, expiry: &Expiry) -> Result<(), StoreError>;
}

/// Webhook reads and the deliveries' bookkeeping.
pub trait WebhookRepository {
    /// Every endpoint, by id.
    fn webhook_endpoints(&self) -> Result<Vec<Endpoint>, StoreError>;
    /// Deliveries with an id above `after`, oldest first.
    fn deliveries(&self, status: Option<DeliveryStatus>, after: i64, limit: u32) -> Result<Vec<Delivery>, StoreError>;
    fn delivery(&self, id: i64) -> Result<Option<Delivery>, StoreError>;
    /// Pending deliveries to enabled endpoints due at `now_ms`, the longest-due first.
    fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDelivery>, StoreError>;
    /// When the next pending delivery to an enabled endpoint is due, in unix milliseconds.
    fn next_delivery_ms(&self) -> Result<Option<i64>, StoreError>;
    fn update_delivery(&self, id: i64, update: &DeliveryUpdate) -> Result<(), StoreError>;
    /// Makes a failed delivery pending again, due at `now_ms`, with a fresh round of attempts;
    /// `false` when it is not failed.
    fn retry_delivery(&self, id: i64, now_ms: i64) -> Result<bool, StoreError>;
    /// Licenses not yet notified whose expiry is in `(after, until]`, soonest first.
    fn expiring_licenses(&self, after: i64, until: i64, limit: u32) -> Result<Vec<Expiry>, StoreError>;
}

fn endpoint_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Endpoint> {
    Ok(Endpoint {
        id: row.get(0)?,
        url: row.get(1)?,
        event_types: Vec::new(),
        enabled: row.get(2)?,
        description: row.get(3)?,
        secret: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
    })
}

const ENDPOINT_COLUMNS: &str = "id, url, enabled, description, secret, created_at, updated_at";

/// Fills in each endpoint's event types, in the order the API documents them.
fn with_subscriptions(connection: &rusqlite::Connection, mut endpoints: Vec<Endpoint>) -> Result<Vec<Endpoint>, StoreError> {
    let mut statement = connection.prepare_cached("SELECT event_type FROM webhook_subscriptions WHERE endpoint_id = ?1")?;
    for endpoint in &mut endpoints {
        let names = statement.query_map([&endpoint.id], |row| row.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        // A type this binary does not know is not sent to.
        endpoint.event_types =
            EventType::ALL.iter().copied().filter(|event_type| names.iter().any(|name| name == event_type.as_str())).collect();
    }
    Ok(endpoints)
}

fn delivery_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    let status: String = row.get(5)?;
    Ok(Delivery {
        id: row.get(0)?,
        message_id: row.get(1)?,
        endpoint_id: row.get(2)?,
        event_type: row.get(3)?,
        body: row.get(4)?,
        // Only this module writes the column, with the three names `parse` knows.
        status: DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Failed),
        attempts: row.get(6)?,
        next_attempt_ms: row.get(7)?,
        last_error: row.get(8)?,
        created_at: row.get(9)?,
        delivered_at: row.get(10)?,
    })
}

const DELIVERY_COLUMNS: &str = "d.id, d.message_id, d.endpoint_id, m.event_type, m.body, d.status, d.attempts, d.next_attempt_ms, \
     d.last_error, d.created_at, d.delivered_at";

/// The licenses of `account` the expiry index should hold: not cancelled, with an end.
pub(crate) fn expiring_licenses(account: &AccountDoc) -> Vec<(&str, i64)> {
    account
        .licenses
        .iter()
        .filter(|license| !license.cancelled)
        .filter_map(|license| Some((license.id.as_str(), license.expires_at?)))
        .collect()
}

impl WebhookTransaction for SqliteTransaction<'_> {
    fn has_subscribers(&mut self, event_type: EventType) -> Result<bool, StoreError> {
        Ok(self
            .transaction
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM webhook_subscriptions s JOIN webhook_endpoints e ON e.id = s.endpoint_id
                 WHERE s.event_type = ?1 AND e.enabled)",
            )?
            .query_row([event_type.as_str()], |row| row.get(0))?)
    }

    fn enqueue_message(&mut self, message: &NewMessage<'_>) -> Result<usize, StoreError> {
        if !self.has_subscribers(message.event_type)? {
            return Ok(0);
        }
        let inserted = self
            .transaction
            .prepare_cached(
                "INSERT OR IGNORE INTO webhook_messages (id, event_type, dedup_key, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![message.id, message.event_type.as_str(), message.dedup_key, message.body, message.created_at])?;
        if inserted == 0 {
            return Ok(0);
        }
        let n_deliveries = self
            .transaction
            .prepare_cached(
                "INSERT INTO webhook_deliveries (message_id, endpoint_id, status, attempts, next_attempt_ms, created_at)
                 SELECT ?1, e.id, 'pending', 0, ?3, ?4 FROM webhook_subscriptions s JOIN webhook_endpoints e ON e.id = s.endpoint_id
                 WHERE s.event_type = ?2 AND e.enabled ORDER BY e.id",
            )?
            .execute(params![message.id, message.event_type.as_str(), message.created_at.saturating_mul(1000), message.created_at])?;
        Ok(n_deliveries)
    }

    fn webhook_endpoint(&mut self, id: &str) -> Result<Option<Endpoint>, StoreError> {
        let endpoint = self
            .transaction
            .prepare_cached(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = ?1"))?
            .query_row([id], endpoint_row)
            .optional()?;
        Ok(with_subscriptions(&self.transaction, endpoint.into_iter().collect())?.pop())
    }

    fn put_webhook_endpoint(&mut self, endpoint: &Endpoint) -> Result<(), StoreError> {
        self.transaction
            .prepare_cached(
                "INSERT INTO webhook_endpoints (id, url, enabled, description, secret, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET url = excluded.url, enabled = excluded.enabled, description = excluded.description,
                 secret = excluded.secret, updated_at = excluded.updated_at",
            )?
            .execute(params![
                endpoint.id,
                endpoint.url,
                endpoint.enabled,
                endpoint.description,
                endpoint.secret,
                endpoint.created_at,
                endpoint.updated_at
            ])?;
        self.transaction.prepare_cached("DELETE FROM webhook_subscriptions WHERE endpoint_id = ?1")?.execute([&endpoint.id])?;
        let mut insert =
            self.transaction.prepare_cached("INSERT OR IGNORE INTO webhook_subscriptions (event_type, endpoint_id) VALUES (?1, ?2)")?;
        for event_type in &endpoint.event_types {
            insert.execute(params![event_type.as_str(), endpoint.id])?;
        }
        Ok(())
    }

    fn delete_webhook_endpoint(&mut self, id: &str, reason: &str) -> Result<bool, StoreError> {
        self.transaction
            .prepare_cached(
                "UPDATE webhook_deliveries SET status = 'failed', last_error = ?2 WHERE endpoint_id = ?1 AND status = 'pending'",
            )?
            .execute(params![id, reason])?;
        let deleted = self.transaction.prepare_cached("DELETE FROM webhook_endpoints WHERE id = ?1")?.execute([id])?;
        Ok(deleted == 1)
    }

    fn index_license_expiries(&mut self, account_id: &str, account: &AccountDoc) -> Result<(), StoreError> {
        let indexed: HashMap<String, (i64, bool)> = self
            .transaction
            .prepare_cached("SELECT license_id, expires_at, notified FROM license_expiries WHERE account = ?1")?
            .query_map([account_id], |row| Ok((row.get::<_, String>(0)?, (row.get::<_, i64>(1)?, row.get::<_, bool>(2)?))))?
            .collect::<Result<_, _>>()?;
        let wanted = expiring_licenses(account);
        for license_id in indexed.keys() {
            if !wanted.iter().any(|(id, _)| id == license_id) {
                self.transaction
                    .prepare_cached("DELETE FROM license_expiries WHERE account = ?1 AND license_id = ?2")?
                    .execute([account_id, license_id])?;
            }
        }
        for (license_id, expires_at) in wanted {
            match indexed.get(license_id) {
                Some((indexed_at, _)) if *indexed_at == expires_at => {}
                _ => {
                    self.transaction
                        .prepare_cached(
                            "INSERT INTO license_expiries (account, license_id, expires_at, notified) VALUES (?1, ?2, ?3, 0)
                             ON CONFLICT (account, license_id) DO UPDATE SET expires_at = excluded.expires_at, notified = 0",
                        )?
                        .execute(params![account_id, license_id, expires_at])?;
                }
            }
        }
        Ok(())
    }

    fn mark_expiry_notified(&mut self, expiry: &Expiry) -> Result<(), StoreError> {
        self.transaction
            .prepare_cached("UPDATE license_expiries SET notified = 1 WHERE account = ?1 AND license_id = ?2 AND expires_at = ?3")?
            .execute(params![expiry.account, expiry.license_id, expiry.expires_at])?;
        Ok(())
    }
}

impl WebhookRepository for SqliteRepository {
    fn webhook_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let connection = self.lock_reader();
        let endpoints = connection
            .prepare_cached(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY id"))?
            .query_map([], endpoint_row)?
            .collect::<Result<Vec<_>, _>>()?;
        with_subscriptions(&connection, endpoints)
    }

    fn deliveries(&self, status: Option<DeliveryStatus>, after: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
             WHERE (?1 IS NULL OR d.status = ?1) AND d.id > ?2 ORDER BY d.id LIMIT ?3"
        ))?;
        let rows = statement.query_map(params![status.map(DeliveryStatus::as_str), after, limit], delivery_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn delivery(&self, id: i64) -> Result<Option<Delivery>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id WHERE d.id = ?1"
        ))?;
        Ok(statement.query_row([id], delivery_row).optional()?)
    }

    fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDelivery>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS}, e.url, e.secret FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
             JOIN webhook_endpoints e ON e.id = d.endpoint_id
             WHERE d.status = 'pending' AND d.next_attempt_ms <= ?1 AND e.enabled ORDER BY d.next_attempt_ms, d.id LIMIT ?2"
        ))?;
        let rows = statement.query_map(params![now_ms, limit], |row| {
            Ok(DueDelivery { delivery: delivery_row(row)?, url: row.get(11)?, secret: row.get(12)? })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn next_delivery_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .lock_reader()
            .prepare_cached(
                "SELECT MIN(d.next_attempt_ms) FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
                 WHERE d.status = 'pending' AND e.enabled",
            )?
            .query_row([], |row| row.get(0))?)
    }

    fn update_delivery(&self, id: i64, update: &DeliveryUpdate) -> Result<(), StoreError> {
        // Only a pending delivery takes an attempt's outcome: one failed meanwhile because
        // its endpoint was deleted stays failed.
        self.lock()
            .prepare_cached(
                "UPDATE webhook_deliveries SET status = ?2, attempts = ?3, next_attempt_ms = ?4, last_error = ?5, delivered_at = ?6
                 WHERE id = ?1 AND status = 'pending'",
            )?
            .execute(params![
                id,
                update.status.as_str(),
                update.attempts,
                update.next_attempt_ms,
                update.last_error,
                update.delivered_at
            ])?;
        Ok(())
    }

    fn retry_delivery(&self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let updated = self
            .lock()
            .prepare_cached(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_ms = ?2 WHERE id = ?1 AND status = 'failed'",
            )?
            .execute(params![id, now_ms])?;
        Ok(updated == 1)
    }

    fn expiring_licenses(&self, after: i64, until: i64, limit: u32) -> Result<Vec<Expiry>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(
            "SELECT license_id, account, expires_at FROM license_expiries
             WHERE notified = 0 AND expires_at > ?1 AND expires_at <= ?2 ORDER BY expires_at, account, license_id LIMIT ?3",
        )?;
        let rows = statement.query_map(params![after, until, limit], |row| {
            Ok(Expiry { license_id: row.get(0)?, account: row.get(1)?, expires_at: row.get(2)? })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DATABASE_FILE, LicenseDoc, MIGRATIONS};

    /// A database at schema version 2, with a threshold notification in the old outbox and an
    /// account whose license expires, upgrades: the notification becomes a message to the
    /// endpoint `configured` with the same dedup key, and the license is in the expiry index.
    #[test]
    fn a_version_2_database_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        {
            let connection = rusqlite::Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            for migration in MIGRATIONS.iter().take(2) {
                connection.execute_batch(migration).unwrap();
            }
            connection.pragma_update(None, "user_version", 2).unwrap();
            let license = |id: &str, expires_at: Option<i64>, cancelled: bool| LicenseDoc {
                id: id.into(),
                plan: "team".into(),
                seats: 1,
                expires_at,
                cancelled,
                ..LicenseDoc::default()
            };
            let account = AccountDoc {
                next_license: 4,
                licenses: vec![license("acme-1", Some(2_000), false), license("acme-2", None, false), license("acme-3", Some(3_000), true)],
                ..AccountDoc::default()
            };
            connection
                .execute("INSERT INTO accounts (id, doc, revision) VALUES ('acme', ?1, 1)", [serde_json::to_string(&account).unwrap()])
                .unwrap();
            let body = r#"{"type":"usage.threshold","account":"acme","meter":"api_calls","period_start":"1970-01-01T00:00:00Z","threshold":80,"used":800,"limit":1000,"kind":"hard","at":"1970-01-01T00:16:40Z"}"#;
            connection
                .execute(
                    "INSERT INTO webhook_outbox (account, meter, period_start, threshold, body, created_at, status, attempts, next_attempt_ms)
                     VALUES ('acme', 'api_calls', 0, 80, ?1, 1000, 'pending', 3, 1000000)",
                    [body],
                )
                .unwrap();
        }
        let repository = SqliteRepository::open(dir.path()).unwrap();
        let deliveries = repository.deliveries(None, 0, 10).unwrap();
        assert_eq!(deliveries.len(), 1, "{deliveries:?}");
        let delivery = &deliveries[0];
        assert_eq!((delivery.endpoint_id.as_str(), delivery.event_type.as_str()), ("configured", "usage.threshold"));
        assert_eq!((delivery.status, delivery.attempts, delivery.next_attempt_ms), (DeliveryStatus::Pending, 3, 1_000_000));
        let body: serde_json::Value = serde_json::from_str(&delivery.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"type": "usage.threshold", "timestamp": "1970-01-01T00:16:40Z", "data": {"account": "acme", "meter": "api_calls",
                "period_start": "1970-01-01T00:00:00Z", "threshold": 80, "used": 800, "limit": 1000, "kind": "hard"}})
        );
        let expiries = repository.expiring_licenses(0, i64::MAX, 10).unwrap();
        assert_eq!(expiries, [Expiry { license_id: "acme-1".into(), account: "acme".into(), expires_at: 2_000 }]);
        // The old outbox's dedup carries over: the same crossing is not enqueued again.
        crate::store::write(&repository, |transaction: &mut dyn crate::store::Transaction| {
            transaction.put_webhook_endpoint(&Endpoint {
                id: "configured".into(),
                url: "http://h:1/".into(),
                event_types: vec![EventType::UsageThreshold],
                enabled: true,
                description: None,
                secret: "whsec_AAAA".into(),
                created_at: 0,
                updated_at: 0,
            })?;
            let message = NewMessage {
                id: "msg_again",
                event_type: EventType::UsageThreshold,
                dedup_key: Some("usage.threshold/acme/api_calls/0/80"),
                body: "{}",
                created_at: 5,
            };
            assert_eq!(transaction.enqueue_message(&message)?, 0);
            Ok::<_, StoreError>(())
        })
        .unwrap();
    }

    fn endpoint(id: &str, event_types: &[EventType], enabled: bool) -> Endpoint {
        Endpoint {
            id: id.into(),
            url: format!("http://127.0.0.1:1/{id}"),
            event_types: event_types.to_vec(),
            enabled,
            description: None,
            secret: format!("whsec_{id}"),
            created_at: 0,
            updated_at: 0,
        }
    }

    fn write<T>(repository: &SqliteRepository, change: impl FnMut(&mut dyn crate::store::Transaction) -> Result<T, StoreError>) -> T {
        crate::store::write(repository, change).unwrap()
    }

    /// One delivery per subscribed, enabled endpoint; a disabled endpoint's deliveries are not
    /// due until it is enabled again; a deleted endpoint's pending ones fail; a failed one can
    /// be retried by hand.
    #[test]
    fn deliveries_follow_their_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let repository = SqliteRepository::open(dir.path()).unwrap();
        write(&repository, |transaction| {
            transaction.put_webhook_endpoint(&endpoint("ep_a", &[EventType::OrderApplied, EventType::UsageThreshold], true))?;
            transaction.put_webhook_endpoint(&endpoint("ep_b", &[EventType::OrderApplied], true))?;
            transaction.put_webhook_endpoint(&endpoint("ep_c", &[EventType::UsageThreshold], true))?;
            transaction.put_webhook_endpoint(&endpoint("ep_off", EventType::ALL, false))
        });
        let message = |id: &'static str, event_type: EventType| NewMessage { id, event_type, dedup_key: None, body: "{}", created_at: 1 };
        assert_eq!(write(&repository, |transaction| transaction.enqueue_message(&message("msg_1", EventType::OrderApplied))), 2);
        assert_eq!(write(&repository, |transaction| transaction.enqueue_message(&message("msg_2", EventType::LicenseExpiring))), 0);
        let due = |repository: &SqliteRepository| -> Vec<String> {
            repository.due_deliveries(1_000, 10).unwrap().into_iter().map(|due| due.delivery.endpoint_id).collect()
        };
        assert_eq!(due(&repository), ["ep_a", "ep_b"]);
        assert_eq!(repository.due_deliveries(1_000, 10).unwrap()[0].secret, "whsec_ep_a");

        write(&repository, |transaction| transaction.put_webhook_endpoint(&endpoint("ep_b", &[EventType::OrderApplied], false)));
        assert_eq!(due(&repository), ["ep_a"]);
        write(&repository, |transaction| transaction.delete_webhook_endpoint("ep_a", "endpoint deleted"));
        assert!(due(&repository).is_empty());
        assert_eq!(repository.next_delivery_ms().unwrap(), None, "nothing to wake for while ep_b is disabled");
        write(&repository, |transaction| transaction.put_webhook_endpoint(&endpoint("ep_b", &[EventType::OrderApplied], true)));
        assert_eq!(due(&repository), ["ep_b"]);
        assert_eq!(repository.next_delivery_ms().unwrap(), Some(1_000));

        let listed = repository.deliveries(None, 0, 10).unwrap();
        let failed: Vec<&Delivery> = listed.iter().filter(|delivery| delivery.status == DeliveryStatus::Failed).collect();
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].endpoint_id.as_str(), failed[0].last_error.as_deref()), ("ep_a", Some("endpoint deleted")));
        assert!(repository.webhook_endpoints().unwrap().iter().all(|endpoint| endpoint.id != "ep_a"));
        let pending = listed.iter().find(|delivery| delivery.status == DeliveryStatus::Pending).unwrap();
        assert!(!repository.retry_delivery(pending.id, 5_000).unwrap(), "only a failed delivery is retried by hand");
        assert!(repository.retry_delivery(failed[0].id, 5_000).unwrap());
        assert_eq!(repository.delivery(failed[0].id).unwrap().unwrap().status, DeliveryStatus::Pending);
    }

    /// A message enqueued in a transaction that rolls back is not there.
    #[test]
    fn a_rolled_back_change_enqueues_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repository = SqliteRepository::open(dir.path()).unwrap();
        write(&repository, |transaction| transaction.put_webhook_endpoint(&endpoint("ep_a", &[EventType::OrderApplied], true)));
        let failed: Result<(), StoreError> = crate::store::write(&repository, |transaction: &mut dyn crate::store::Transaction| {
            crate::webhooks::enqueue(transaction, EventType::OrderApplied, serde_json::json!({}), 1)?;
            Err(StoreError::NotRun)
        });
        assert!(failed.is_err());
        assert!(repository.deliveries(None, 0, 10).unwrap().is_empty());
        let sent =
            write(&repository, |transaction| crate::webhooks::enqueue(transaction, EventType::OrderApplied, serde_json::json!({}), 1));
        assert!(sent.is_some_and(|id| id.starts_with("msg_")));
        assert_eq!(repository.deliveries(None, 0, 10).unwrap().len(), 1);
    }

    /// Every account write keeps the expiry index: cancelled and open-ended licenses are left
    /// out, an unchanged expiry keeps its notified mark, a moved one is notified again.
    #[test]
    fn the_expiry_index_follows_account_writes() {
        let dir = tempfile::tempdir().unwrap();
        let repository = SqliteRepository::open(dir.path()).unwrap();
        let license =
            |id: &str, expires_at: Option<i64>| LicenseDoc { id: id.into(), plan: "team".into(), expires_at, ..LicenseDoc::default() };
        let mut account = AccountDoc {
            licenses: vec![license("a-1", Some(100)), license("a-2", None), license("a-3", Some(50))],
            ..AccountDoc::default()
        };
        write(&repository, |transaction| transaction.put_account("a", &account));
        let ids = |repository: &SqliteRepository| -> Vec<String> {
            repository.expiring_licenses(0, 1_000, 10).unwrap().into_iter().map(|expiry| expiry.license_id).collect()
        };
        assert_eq!(ids(&repository), ["a-3", "a-1"]);
        assert_eq!(
            ids(&repository),
            repository.expiring_licenses(10, 100, 10).unwrap().into_iter().map(|expiry| expiry.license_id).collect::<Vec<_>>()
        );
        assert!(repository.expiring_licenses(100, 1_000, 10).unwrap().is_empty(), "the window is (after, until]");
        write(&repository, |transaction| {
            transaction.mark_expiry_notified(&Expiry { license_id: "a-1".into(), account: "a".into(), expires_at: 100 })
        });
        account.licenses[2].cancelled = true;
        account.users.insert("u".into(), crate::store::UserDoc::default());
        write(&repository, |transaction| transaction.put_account("a", &account));
        assert!(ids(&repository).is_empty(), "a-1 notified, a-3 cancelled");
        account.licenses[0].expires_at = Some(200);
        write(&repository, |transaction| transaction.put_account("a", &account));
        assert_eq!(ids(&repository), ["a-1"]);
    }
}
