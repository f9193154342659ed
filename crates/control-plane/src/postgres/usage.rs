//! The usage tables in PostgreSQL: the same statements as `usage_store` with `ON CONFLICT`
//! for SQLite's `INSERT OR IGNORE`. Counts saturate at `i64::MAX` as they do in SQLite.

use super::{PgRepository, PgTransaction, get, optional_text, text, to_i64, to_u64};
use crate::store::{AccountDoc, StoreError};
use crate::usage_store::{
    DecisionTotal, EventRow, NewEvent, SidecarRecord, TotalRow, TotalsQuery, UsageChange, UsageRepository, UsageTransaction,
};

fn total_row(row: &tokio_postgres::Row) -> Result<TotalRow, StoreError> {
    Ok(TotalRow {
        account: get(row, 0)?,
        meter: get(row, 1)?,
        period_start: get(row, 2)?,
        used: to_u64(get(row, 3)?),
        seq: to_u64(get(row, 4)?),
    })
}

impl UsageTransaction for PgTransaction {
    fn account_revision(&mut self, id: &str) -> Result<Option<u64>, StoreError> {
        let row = self.query_opt("SELECT revision FROM accounts WHERE id = $1", pg_params![text(id)])?;
        row.map(|row| Ok(to_u64(get(&row, 0)?))).transpose()
    }

    fn record_event(&mut self, event: &NewEvent<'_>) -> Result<bool, StoreError> {
        let inserted = self.execute(
            "INSERT INTO usage_events (account, meter, event_id, amount, at, period_start, received_at, sidecar)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (account, meter, event_id) DO NOTHING",
            pg_params![
                text(event.account),
                text(event.meter),
                text(event.event_id),
                to_i64(event.amount),
                event.at,
                event.period_start,
                event.received_at,
                text(event.sidecar)
            ],
        )?;
        Ok(inserted == 1)
    }

    fn add_usage(&mut self, account: &str, meter: &str, period_start: i64, amount: u64, now: i64) -> Result<UsageChange, StoreError> {
        let row = self.query_one("UPDATE usage_sequence SET seq = seq + 1 WHERE id = 1 RETURNING seq", Vec::new())?;
        let seq: i64 = get(&row, 0)?;
        let before = self
            .query_opt(
                "SELECT used FROM usage_totals WHERE account = $1 AND meter = $2 AND period_start = $3",
                pg_params![text(account), text(meter), period_start],
            )?
            .map(|row| get::<i64>(&row, 0))
            .transpose()?
            .map_or(0, to_u64);
        let after = to_u64(to_i64(before.saturating_add(amount)));
        self.execute(
            "INSERT INTO usage_totals (account, meter, period_start, used, seq, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (account, meter, period_start) DO UPDATE
             SET used = excluded.used, seq = excluded.seq, updated_at = excluded.updated_at",
            pg_params![text(account), text(meter), period_start, to_i64(after), seq, now],
        )?;
        Ok(UsageChange { before, after, seq: to_u64(seq) })
    }

    fn usage_changed_since(&mut self, since: u64, limit: u32) -> Result<Vec<TotalRow>, StoreError> {
        let rows = self.query(
            "SELECT account, meter, period_start, used, seq FROM usage_totals WHERE seq > $1 ORDER BY seq LIMIT $2",
            pg_params![to_i64(since), i64::from(limit)],
        )?;
        rows.iter().map(total_row).collect()
    }

    fn usage_sequence(&mut self) -> Result<u64, StoreError> {
        let row = self.query_one("SELECT seq FROM usage_sequence WHERE id = 1", Vec::new())?;
        Ok(to_u64(get(&row, 0)?))
    }

    fn sidecar_batch(&mut self, sidecar: &str, at: i64, n_events: u64) -> Result<(), StoreError> {
        // `events` saturates like every count: read and write rather than add in SQL, where an
        // overflowing BIGINT is an error.
        let current = self
            .query_opt("SELECT events FROM usage_sidecars WHERE sidecar = $1", pg_params![text(sidecar)])?
            .map(|row| get::<i64>(&row, 0))
            .transpose()?;
        let events = to_i64(current.map_or(0, to_u64).saturating_add(n_events));
        self.execute(
            "INSERT INTO usage_sidecars (sidecar, first_batch_at, last_batch_at, batches, events) VALUES ($1, $2, $2, 1, $3)
             ON CONFLICT (sidecar) DO UPDATE
             SET last_batch_at = excluded.last_batch_at, batches = usage_sidecars.batches + 1, events = excluded.events",
            pg_params![text(sidecar), at, events],
        )?;
        Ok(())
    }

    fn add_decisions(&mut self, day: i64, feature: &str, account: &str, reason: &str, count: u64) -> Result<(), StoreError> {
        // Read and write, so the sum saturates as it does in SQLite.
        let current = self
            .query_opt(
                "SELECT count FROM decision_counts WHERE day = $1 AND feature = $2 AND account = $3 AND reason = $4",
                pg_params![day, text(feature), text(account), text(reason)],
            )?
            .map(|row| get::<i64>(&row, 0))
            .transpose()?;
        let total = to_i64(current.map_or(0, to_u64).saturating_add(count));
        self.execute(
            "INSERT INTO decision_counts (day, feature, account, reason, count) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (day, feature, account, reason) DO UPDATE SET count = excluded.count",
            pg_params![day, text(feature), text(account), text(reason), total],
        )?;
        Ok(())
    }

    fn add_decision_user(&mut self, day: i64, feature: &str, account: &str, user: &str) -> Result<(), StoreError> {
        self.execute(
            r#"INSERT INTO decision_users (day, feature, account, "user") VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"#,
            pg_params![day, text(feature), text(account), text(user)],
        )?;
        Ok(())
    }
}

impl UsageRepository for PgRepository {
    fn account_with_revision(&self, id: &str) -> Result<Option<(u64, AccountDoc)>, StoreError> {
        let row = self.query_opt("SELECT revision, doc FROM accounts WHERE id = $1", pg_params![text(id)])?;
        row.map(|row| {
            let doc = super::parse_doc(id, &get::<String>(&row, 1)?)?;
            Ok((to_u64(get(&row, 0)?), doc))
        })
        .transpose()
    }

    fn usage_totals(&self, query: &TotalsQuery) -> Result<Vec<TotalRow>, StoreError> {
        // Ties of the newest-first order fall back to the primary key, as SQLite's scan does.
        const OLDEST_FIRST: &str = "SELECT account, meter, period_start, used, seq FROM usage_totals
             WHERE ($1::text IS NULL OR account = $1) AND ($2::text IS NULL OR meter = $2) AND period_start >= $3 AND period_start < $4
             ORDER BY account, meter, period_start LIMIT $5";
        const NEWEST_FIRST: &str = "SELECT account, meter, period_start, used, seq FROM usage_totals
             WHERE ($1::text IS NULL OR account = $1) AND ($2::text IS NULL OR meter = $2) AND period_start >= $3 AND period_start < $4
             ORDER BY period_start DESC, account, meter LIMIT $5";
        let sql = if query.newest_first { NEWEST_FIRST } else { OLDEST_FIRST };
        // LIMIT NULL is no limit.
        let limit: Option<i64> = query.limit.map(i64::from);
        let rows = self.query(sql, pg_params![query.account.clone(), query.meter.clone(), query.from, query.to, limit])?;
        rows.iter().map(total_row).collect()
    }

    fn usage_events(&self, account: Option<&str>, from: i64, to: i64) -> Result<Vec<EventRow>, StoreError> {
        let rows = self.query(
            "SELECT account, meter, event_id, amount, at, period_start, received_at, sidecar FROM usage_events
             WHERE ($1::text IS NULL OR account = $1) AND at >= $2 AND at < $3 ORDER BY account, meter, at, event_id",
            pg_params![optional_text(account), from, to],
        )?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    account: get(row, 0)?,
                    meter: get(row, 1)?,
                    event_id: get(row, 2)?,
                    amount: to_u64(get(row, 3)?),
                    at: get(row, 4)?,
                    period_start: get(row, 5)?,
                    received_at: get(row, 6)?,
                    sidecar: get(row, 7)?,
                })
            })
            .collect()
    }

    fn decision_totals(&self, from_day: i64, to_day: i64) -> Result<Vec<DecisionTotal>, StoreError> {
        // SUM of BIGINT is NUMERIC in PostgreSQL: it cannot overflow, and LEAST saturates it.
        let rows = self.query(
            "SELECT feature, reason, LEAST(SUM(count), 9223372036854775807)::BIGINT, COUNT(DISTINCT account) FROM decision_counts
             WHERE day >= $1 AND day < $2 AND count > 0 GROUP BY feature, reason ORDER BY feature, reason",
            pg_params![from_day, to_day],
        )?;
        rows.iter()
            .map(|row| {
                Ok(DecisionTotal {
                    feature: get(row, 0)?,
                    reason: get(row, 1)?,
                    count: to_u64(get(row, 2)?),
                    accounts: to_u64(get(row, 3)?),
                })
            })
            .collect()
    }

    fn decision_users(&self, from_day: i64, to_day: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.query(
            r#"SELECT feature, COUNT(*) FROM (SELECT DISTINCT feature, account, "user" FROM decision_users WHERE day >= $1 AND day < $2) AS pairs
               GROUP BY feature ORDER BY feature"#,
            pg_params![from_day, to_day],
        )?;
        rows.iter().map(|row| Ok((get(row, 0)?, to_u64(get(row, 1)?)))).collect()
    }

    fn usage_sidecars(&self) -> Result<Vec<SidecarRecord>, StoreError> {
        let rows =
            self.query("SELECT sidecar, first_batch_at, last_batch_at, batches, events FROM usage_sidecars ORDER BY sidecar", Vec::new())?;
        rows.iter()
            .map(|row| {
                Ok(SidecarRecord {
                    sidecar: get(row, 0)?,
                    first_batch_at: get(row, 1)?,
                    last_batch_at: get(row, 2)?,
                    batches: to_u64(get(row, 3)?),
                    events: to_u64(get(row, 4)?),
                })
            })
            .collect()
    }
}
