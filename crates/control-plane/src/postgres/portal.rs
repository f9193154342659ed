//! The portal tables in PostgreSQL: single-use links, browser sessions, and the portal's own
//! reads, with the same statements and orders as `portal::store`.

use super::{PgRepository, get, text};
use crate::portal::store::{NewLink, NewSession, PortalRepository, Redeemed, SessionKind, WebSession, prefix_end};
use crate::store::{AuditEntry, StoreError};

impl PortalRepository for PgRepository {
    fn create_link(&self, link: &NewLink<'_>) -> Result<(), StoreError> {
        self.execute(
            r#"INSERT INTO portal_links (token_sha256, account, "user", return_url, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)"#,
            pg_params![
                text(link.token_sha256),
                text(link.account),
                text(link.user),
                link.return_url.map(str::to_string),
                link.created_at,
                link.expires_at
            ],
        )?;
        Ok(())
    }

    fn redeem_link(&self, token_sha256: &str, now: i64) -> Result<Redeemed, StoreError> {
        let mut redeemed = Redeemed::Unknown;
        self.with_transaction(&mut |transaction| {
            // The row lock makes a second redemption at the same moment wait and see it used.
            let row = transaction.query_opt(
                r#"SELECT account, "user", return_url, used_at, expires_at FROM portal_links WHERE token_sha256 = $1 FOR UPDATE"#,
                pg_params![text(token_sha256)],
            )?;
            redeemed = match row {
                None => Redeemed::Unknown,
                Some(row) if get::<Option<i64>>(&row, 3)?.is_some() => Redeemed::Reused,
                Some(row) => {
                    transaction
                        .execute("UPDATE portal_links SET used_at = $1 WHERE token_sha256 = $2", pg_params![now, text(token_sha256)])?;
                    if now >= get::<i64>(&row, 4)? {
                        Redeemed::Expired
                    } else {
                        Redeemed::Fresh { account: get(&row, 0)?, user: get(&row, 1)?, return_url: get(&row, 2)? }
                    }
                }
            };
            Ok(true)
        })?;
        Ok(redeemed)
    }

    fn create_session(&self, new: &NewSession<'_>) -> Result<(), StoreError> {
        let session = new.session;
        self.execute(
            "INSERT INTO web_sessions (id_sha256, kind, account, person, key_id, csrf, return_url, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            pg_params![
                text(new.id_sha256),
                text(session.kind.as_str()),
                session.account.clone(),
                session.person.clone(),
                session.key_id.clone(),
                session.csrf.clone(),
                session.return_url.clone(),
                new.created_at,
                session.expires_at
            ],
        )?;
        Ok(())
    }

    fn live_session(&self, id_sha256: &str, now: i64) -> Result<Option<WebSession>, StoreError> {
        let Some(row) = self.query_opt(
            "SELECT kind, account, person, key_id, csrf, return_url, expires_at FROM web_sessions
             WHERE id_sha256 = $1 AND revoked_at IS NULL AND expires_at > $2",
            pg_params![text(id_sha256), now],
        )?
        else {
            return Ok(None);
        };
        // A kind this binary does not know grants nothing.
        let kind = match get::<String>(&row, 0)?.as_str() {
            "portal" => SessionKind::Portal,
            "console" => SessionKind::Console,
            _ => return Ok(None),
        };
        Ok(Some(WebSession {
            kind,
            account: get(&row, 1)?,
            person: get(&row, 2)?,
            key_id: get(&row, 3)?,
            csrf: get(&row, 4)?,
            return_url: get(&row, 5)?,
            expires_at: get(&row, 6)?,
        }))
    }

    fn revoke_session(&self, id_sha256: &str, now: i64) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE web_sessions SET revoked_at = $1 WHERE id_sha256 = $2 AND revoked_at IS NULL",
            pg_params![now, text(id_sha256)],
        )?;
        Ok(changed > 0)
    }

    fn revoke_account_sessions(&self, account: &str, now: i64) -> Result<usize, StoreError> {
        let changed = self.execute(
            "UPDATE web_sessions SET revoked_at = $1 WHERE account = $2 AND kind = 'portal' AND revoked_at IS NULL AND expires_at > $1",
            pg_params![now, text(account)],
        )?;
        Ok(usize::try_from(changed).unwrap_or(usize::MAX))
    }

    fn count_account_sessions(&self, account: &str, now: i64) -> Result<u64, StoreError> {
        let row = self.query_one(
            "SELECT COUNT(*) FROM web_sessions WHERE account = $1 AND kind = 'portal' AND revoked_at IS NULL AND expires_at > $2",
            pg_params![text(account), now],
        )?;
        Ok(super::to_u64(get(&row, 0)?))
    }

    fn accounts_with_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        // A range of the primary key, as in SQLite; `COLLATE "C"` makes it a byte range.
        let rows = match prefix_end(prefix) {
            Some(end) => self.query(
                "SELECT id FROM accounts WHERE id >= $1 AND id < $2 ORDER BY id LIMIT $3",
                pg_params![text(prefix), end, i64::from(limit)],
            )?,
            None => self.query("SELECT id FROM accounts ORDER BY id LIMIT $1", pg_params![i64::from(limit)])?,
        };
        rows.iter().map(|row| get(row, 0)).collect()
    }

    fn recent_audit(&self, account: &str, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self.query(
            "SELECT seq, at, key_id, action, account, target, revision FROM audit WHERE account = $1 ORDER BY seq DESC LIMIT $2",
            pg_params![text(account), i64::from(limit)],
        )?;
        rows.iter().map(|row| super::audit_entry(row, false)).collect()
    }
}
