//! The integration tables in PostgreSQL: inbound events, links and object states, with the
//! same statements and orders as `integration_store`.

use super::{PgRepository, PgTransaction, get, optional_text, text, to_i64, to_u64};
use crate::integration_store::{EventQuery, EventStatus, IntegrationRepository, IntegrationTransaction, Link, ObjectState, StoredEvent};
use crate::store::StoreError;

const EVENT_COLUMNS: &str =
    "seq, source, event_id, type, object_id, occurred_at_ms, received_at, status, reason, account, revision, payload";

fn event_row(row: &tokio_postgres::Row) -> Result<StoredEvent, StoreError> {
    let status: String = get(row, 7)?;
    Ok(StoredEvent {
        seq: get(row, 0)?,
        source: get(row, 1)?,
        event_id: get(row, 2)?,
        event_type: get(row, 3)?,
        object_id: get(row, 4)?,
        occurred_at_ms: get(row, 5)?,
        received_at: get(row, 6)?,
        // Only this module writes the column, always from `EventStatus::as_str`.
        status: EventStatus::parse(&status).unwrap_or(EventStatus::Unmapped),
        reason: get(row, 8)?,
        account: get(row, 9)?,
        revision: get::<Option<i64>>(row, 10)?.map(to_u64),
        payload: get(row, 11)?,
    })
}

impl IntegrationTransaction for PgTransaction {
    fn integration_event(&mut self, source: &str, event_id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let row = self.query_opt(
            &format!("SELECT {EVENT_COLUMNS} FROM integration_events WHERE source = $1 AND event_id = $2"),
            pg_params![text(source), text(event_id)],
        )?;
        row.as_ref().map(event_row).transpose()
    }

    fn put_integration_event(&mut self, event: &StoredEvent) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO integration_events
                 (source, event_id, type, object_id, occurred_at_ms, received_at, status, reason, account, revision, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (source, event_id) DO UPDATE SET
                 object_id = excluded.object_id, status = excluded.status, reason = excluded.reason,
                 account = excluded.account, revision = excluded.revision",
            pg_params![
                event.source.clone(),
                event.event_id.clone(),
                event.event_type.clone(),
                event.object_id.clone(),
                event.occurred_at_ms,
                event.received_at,
                text(event.status.as_str()),
                event.reason.clone(),
                event.account.clone(),
                event.revision.map(to_i64),
                event.payload.clone(),
            ],
        )?;
        Ok(())
    }

    fn integration_link(&mut self, source: &str, external_id: &str) -> Result<Option<String>, StoreError> {
        self.query_opt(
            "SELECT account FROM integration_links WHERE source = $1 AND external_id = $2",
            pg_params![text(source), text(external_id)],
        )?
        .map(|row| get(&row, 0))
        .transpose()
    }

    fn put_integration_link(&mut self, link: &Link) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO integration_links (source, external_id, account, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (source, external_id) DO UPDATE SET account = excluded.account, created_at = excluded.created_at",
            pg_params![link.source.clone(), link.external_id.clone(), link.account.clone(), link.created_at],
        )?;
        Ok(())
    }

    fn delete_integration_link(&mut self, source: &str, external_id: &str) -> Result<bool, StoreError> {
        let deleted = self
            .execute("DELETE FROM integration_links WHERE source = $1 AND external_id = $2", pg_params![text(source), text(external_id)])?;
        Ok(deleted > 0)
    }

    fn integration_object(&mut self, source: &str, object_id: &str) -> Result<Option<ObjectState>, StoreError> {
        let row = self.query_opt(
            "SELECT account, last_event_id, last_occurred_at_ms, state FROM integration_objects WHERE source = $1 AND object_id = $2",
            pg_params![text(source), text(object_id)],
        )?;
        row.map(|row| {
            Ok(ObjectState {
                account: get(&row, 0)?,
                last_event_id: get(&row, 1)?,
                last_occurred_at_ms: get(&row, 2)?,
                state: get(&row, 3)?,
            })
        })
        .transpose()
    }

    fn put_integration_object(&mut self, source: &str, object_id: &str, object: &ObjectState) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO integration_objects (source, object_id, account, last_event_id, last_occurred_at_ms, state)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (source, object_id) DO UPDATE SET account = excluded.account, last_event_id = excluded.last_event_id,
                 last_occurred_at_ms = excluded.last_occurred_at_ms, state = excluded.state",
            pg_params![
                text(source),
                text(object_id),
                object.account.clone(),
                object.last_event_id.clone(),
                object.last_occurred_at_ms,
                object.state.clone()
            ],
        )?;
        Ok(())
    }
}

impl IntegrationRepository for PgRepository {
    fn integration_events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self.query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM integration_events
                 WHERE seq > $1 AND ($2::text IS NULL OR source = $2) AND ($3::text IS NULL OR status = $3) ORDER BY seq LIMIT $4"
            ),
            pg_params![query.after_seq, query.source.clone(), query.status.map(|status| text(status.as_str())), i64::from(query.limit)],
        )?;
        rows.iter().map(event_row).collect()
    }

    fn integration_event_by_seq(&self, seq: i64) -> Result<Option<StoredEvent>, StoreError> {
        let row = self.query_opt(&format!("SELECT {EVENT_COLUMNS} FROM integration_events WHERE seq = $1"), pg_params![seq])?;
        row.as_ref().map(event_row).transpose()
    }

    fn integration_links(&self, source: Option<&str>, account: Option<&str>) -> Result<Vec<Link>, StoreError> {
        let rows = self.query(
            "SELECT source, external_id, account, created_at FROM integration_links
             WHERE ($1::text IS NULL OR source = $1) AND ($2::text IS NULL OR account = $2) ORDER BY source, external_id LIMIT 10000",
            pg_params![optional_text(source), optional_text(account)],
        )?;
        rows.iter()
            .map(|row| Ok(Link { source: get(row, 0)?, external_id: get(row, 1)?, account: get(row, 2)?, created_at: get(row, 3)? }))
            .collect()
    }

    fn integration_event_counts(&self) -> Result<Vec<(String, EventStatus, u64)>, StoreError> {
        // SQLite's GROUP BY returns the groups sorted; PostgreSQL's needs the ORDER BY.
        let rows = self
            .query("SELECT source, status, COUNT(*) FROM integration_events GROUP BY source, status ORDER BY source, status", Vec::new())?;
        rows.iter()
            .map(|row| {
                let status: String = get(row, 1)?;
                Ok((get(row, 0)?, EventStatus::parse(&status).unwrap_or(EventStatus::Unmapped), to_u64(get(row, 2)?)))
            })
            .collect()
    }
}
