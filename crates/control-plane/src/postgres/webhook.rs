//! The webhook tables in PostgreSQL: endpoints, subscriptions, messages, deliveries and the
//! license expiry index, with the same statements and orders as `webhook_store`.

use std::collections::HashMap;

use super::{Param, PgRepository, PgTransaction, get, text};
use crate::store::{AccountDoc, StoreError};
use crate::webhook_store::{
    Delivery, DeliveryStatus, DeliveryUpdate, DueDelivery, Endpoint, EventType, Expiry, NewMessage, WebhookRepository, WebhookTransaction,
};

const ENDPOINT_COLUMNS: &str = "id, url, enabled, description, secret, created_at, updated_at";

const DELIVERY_COLUMNS: &str = "d.id, d.message_id, d.endpoint_id, m.event_type, m.body, d.status, d.attempts, d.next_attempt_ms, \
     d.last_error, d.created_at, d.delivered_at";

fn endpoint_row(row: &tokio_postgres::Row) -> Result<Endpoint, StoreError> {
    Ok(Endpoint {
        id: get(row, 0)?,
        url: get(row, 1)?,
        event_types: Vec::new(),
        enabled: get(row, 2)?,
        description: get(row, 3)?,
        secret: get(row, 4)?,
        created_at: get(row, 5)?,
        updated_at: get(row, 6)?,
    })
}

fn delivery_row(row: &tokio_postgres::Row) -> Result<Delivery, StoreError> {
    let status: String = get(row, 5)?;
    Ok(Delivery {
        id: get(row, 0)?,
        message_id: get(row, 1)?,
        endpoint_id: get(row, 2)?,
        event_type: get(row, 3)?,
        body: get(row, 4)?,
        // Only this module writes the column, with the three names `parse` knows.
        status: DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Failed),
        attempts: u32::try_from(get::<i64>(row, 6)?).unwrap_or(u32::MAX),
        next_attempt_ms: get(row, 7)?,
        last_error: get(row, 8)?,
        created_at: get(row, 9)?,
        delivered_at: get(row, 10)?,
    })
}

/// Keeps the event types of `names` this binary knows, in the order the API documents them.
fn known_types(names: &[String]) -> Vec<EventType> {
    EventType::ALL.iter().copied().filter(|event_type| names.iter().any(|name| name == event_type.as_str())).collect()
}

/// The subscriptions of `endpoints`, by endpoint id.
fn subscriptions(rows: &[tokio_postgres::Row]) -> Result<HashMap<String, Vec<String>>, StoreError> {
    let mut by_endpoint: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        by_endpoint.entry(get(row, 0)?).or_default().push(get(row, 1)?);
    }
    Ok(by_endpoint)
}

const SUBSCRIPTIONS: &str = "SELECT endpoint_id, event_type FROM webhook_subscriptions WHERE endpoint_id = ANY($1)";

fn with_subscriptions(mut endpoints: Vec<Endpoint>, rows: &[tokio_postgres::Row]) -> Result<Vec<Endpoint>, StoreError> {
    let by_endpoint = subscriptions(rows)?;
    for endpoint in &mut endpoints {
        endpoint.event_types = by_endpoint.get(&endpoint.id).map_or_else(Vec::new, |names| known_types(names));
    }
    Ok(endpoints)
}

fn ids(endpoints: &[Endpoint]) -> Vec<Param> {
    pg_params![endpoints.iter().map(|endpoint| endpoint.id.clone()).collect::<Vec<String>>()]
}

impl WebhookTransaction for PgTransaction {
    fn has_subscribers(&mut self, event_type: EventType) -> Result<bool, StoreError> {
        let row = self.query_one(
            "SELECT EXISTS (SELECT 1 FROM webhook_subscriptions s JOIN webhook_endpoints e ON e.id = s.endpoint_id
             WHERE s.event_type = $1 AND e.enabled)",
            pg_params![text(event_type.as_str())],
        )?;
        get(&row, 0)
    }

    fn enqueue_message(&mut self, message: &NewMessage<'_>) -> Result<usize, StoreError> {
        if !self.has_subscribers(message.event_type)? {
            return Ok(0);
        }
        // SQLite's INSERT OR IGNORE: a clash on the id or on the dedup key stores nothing.
        let inserted = self.execute(
            "INSERT INTO webhook_messages (id, event_type, dedup_key, body, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            pg_params![
                text(message.id),
                text(message.event_type.as_str()),
                message.dedup_key.map(str::to_string),
                text(message.body),
                message.created_at
            ],
        )?;
        if inserted == 0 {
            return Ok(0);
        }
        let n_deliveries = self.execute(
            "INSERT INTO webhook_deliveries (message_id, endpoint_id, status, attempts, next_attempt_ms, created_at)
             SELECT $1, e.id, 'pending', 0, $3, $4 FROM webhook_subscriptions s JOIN webhook_endpoints e ON e.id = s.endpoint_id
             WHERE s.event_type = $2 AND e.enabled ORDER BY e.id",
            pg_params![text(message.id), text(message.event_type.as_str()), message.created_at.saturating_mul(1000), message.created_at],
        )?;
        Ok(usize::try_from(n_deliveries).unwrap_or(usize::MAX))
    }

    fn webhook_endpoint(&mut self, id: &str) -> Result<Option<Endpoint>, StoreError> {
        let row = self.query_opt(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"), pg_params![text(id)])?;
        let endpoints: Vec<Endpoint> = row.as_ref().map(endpoint_row).transpose()?.into_iter().collect();
        if endpoints.is_empty() {
            return Ok(None);
        }
        let rows = self.query(SUBSCRIPTIONS, ids(&endpoints))?;
        Ok(with_subscriptions(endpoints, &rows)?.pop())
    }

    fn put_webhook_endpoint(&mut self, endpoint: &Endpoint) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO webhook_endpoints (id, url, enabled, description, secret, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, enabled = excluded.enabled, description = excluded.description,
             secret = excluded.secret, updated_at = excluded.updated_at",
            pg_params![
                endpoint.id.clone(),
                endpoint.url.clone(),
                endpoint.enabled,
                endpoint.description.clone(),
                endpoint.secret.clone(),
                endpoint.created_at,
                endpoint.updated_at
            ],
        )?;
        self.execute("DELETE FROM webhook_subscriptions WHERE endpoint_id = $1", pg_params![endpoint.id.clone()])?;
        for event_type in &endpoint.event_types {
            self.execute(
                "INSERT INTO webhook_subscriptions (event_type, endpoint_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                pg_params![text(event_type.as_str()), endpoint.id.clone()],
            )?;
        }
        Ok(())
    }

    fn delete_webhook_endpoint(&mut self, id: &str, reason: &str) -> Result<bool, StoreError> {
        self.execute(
            "UPDATE webhook_deliveries SET status = 'failed', last_error = $2 WHERE endpoint_id = $1 AND status = 'pending'",
            pg_params![text(id), text(reason)],
        )?;
        let deleted = self.execute("DELETE FROM webhook_endpoints WHERE id = $1", pg_params![text(id)])?;
        Ok(deleted == 1)
    }

    fn index_license_expiries(&mut self, account_id: &str, account: &AccountDoc) -> Result<(), StoreError> {
        let rows = self.query("SELECT license_id, expires_at FROM license_expiries WHERE account = $1", pg_params![text(account_id)])?;
        let indexed: HashMap<String, i64> = rows.iter().map(|row| Ok((get(row, 0)?, get(row, 1)?))).collect::<Result<_, StoreError>>()?;
        let wanted = crate::webhook_store::expiring_licenses(account);
        for license_id in indexed.keys() {
            if !wanted.iter().any(|(id, _)| id == license_id) {
                self.execute(
                    "DELETE FROM license_expiries WHERE account = $1 AND license_id = $2",
                    pg_params![text(account_id), license_id.clone()],
                )?;
            }
        }
        for (license_id, expires_at) in wanted {
            if indexed.get(license_id) != Some(&expires_at) {
                self.execute(
                    "INSERT INTO license_expiries (account, license_id, expires_at, notified) VALUES ($1, $2, $3, FALSE)
                     ON CONFLICT (account, license_id) DO UPDATE SET expires_at = excluded.expires_at, notified = FALSE",
                    pg_params![text(account_id), text(license_id), expires_at],
                )?;
            }
        }
        Ok(())
    }

    fn mark_expiry_notified(&mut self, expiry: &Expiry) -> Result<(), StoreError> {
        self.execute(
            "UPDATE license_expiries SET notified = TRUE WHERE account = $1 AND license_id = $2 AND expires_at = $3",
            pg_params![expiry.account.clone(), expiry.license_id.clone(), expiry.expires_at],
        )?;
        Ok(())
    }
}

impl WebhookRepository for PgRepository {
    fn webhook_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let results = self.read_snapshot(vec![
            ("SELECT id, url, enabled, description, secret, created_at, updated_at FROM webhook_endpoints ORDER BY id", Vec::new()),
            ("SELECT endpoint_id, event_type FROM webhook_subscriptions", Vec::new()),
        ])?;
        let mut results = results.into_iter();
        let endpoints = results.next().unwrap_or_default().iter().map(endpoint_row).collect::<Result<Vec<_>, _>>()?;
        with_subscriptions(endpoints, &results.next().unwrap_or_default())
    }

    fn deliveries(&self, status: Option<DeliveryStatus>, after: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let rows = self.query(
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
                 WHERE ($1::text IS NULL OR d.status = $1) AND d.id > $2 ORDER BY d.id LIMIT $3"
            ),
            pg_params![status.map(|status| text(status.as_str())), after, i64::from(limit)],
        )?;
        rows.iter().map(delivery_row).collect()
    }

    fn delivery(&self, id: i64) -> Result<Option<Delivery>, StoreError> {
        let row = self.query_opt(
            &format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id WHERE d.id = $1"),
            pg_params![id],
        )?;
        row.as_ref().map(delivery_row).transpose()
    }

    fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDelivery>, StoreError> {
        let rows = self.query(
            &format!(
                "SELECT {DELIVERY_COLUMNS}, e.url, e.secret FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
                 JOIN webhook_endpoints e ON e.id = d.endpoint_id
                 WHERE d.status = 'pending' AND d.next_attempt_ms <= $1 AND e.enabled ORDER BY d.next_attempt_ms, d.id LIMIT $2"
            ),
            pg_params![now_ms, i64::from(limit)],
        )?;
        rows.iter().map(|row| Ok(DueDelivery { delivery: delivery_row(row)?, url: get(row, 11)?, secret: get(row, 12)? })).collect()
    }

    fn next_delivery_ms(&self) -> Result<Option<i64>, StoreError> {
        let row = self.query_one(
            "SELECT MIN(d.next_attempt_ms) FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
             WHERE d.status = 'pending' AND e.enabled",
            Vec::new(),
        )?;
        get(&row, 0)
    }

    fn update_delivery(&self, id: i64, update: &DeliveryUpdate) -> Result<(), StoreError> {
        // Only a pending delivery takes an attempt's outcome, as in SQLite.
        self.execute(
            "UPDATE webhook_deliveries SET status = $2, attempts = $3, next_attempt_ms = $4, last_error = $5, delivered_at = $6
             WHERE id = $1 AND status = 'pending'",
            pg_params![
                id,
                text(update.status.as_str()),
                i64::from(update.attempts),
                update.next_attempt_ms,
                update.last_error.clone(),
                update.delivered_at
            ],
        )?;
        Ok(())
    }

    fn retry_delivery(&self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let updated = self.execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_ms = $2 WHERE id = $1 AND status = 'failed'",
            pg_params![id, now_ms],
        )?;
        Ok(updated == 1)
    }

    fn expiring_licenses(&self, after: i64, until: i64, limit: u32) -> Result<Vec<Expiry>, StoreError> {
        let rows = self.query(
            "SELECT license_id, account, expires_at FROM license_expiries
             WHERE NOT notified AND expires_at > $1 AND expires_at <= $2 ORDER BY expires_at, account, license_id LIMIT $3",
            pg_params![after, until, i64::from(limit)],
        )?;
        rows.iter().map(|row| Ok(Expiry { license_id: get(row, 0)?, account: get(row, 1)?, expires_at: get(row, 2)? })).collect()
    }
}
