//! The portal's tables in the license repository: single-use entry links and browser sessions
//! (customer portal and vendor console), plus the few reads the pages need that the JSON API
//! has no query for (an account-id prefix search on the primary key, an account's newest audit
//! entries). Only hashes of link and session secrets are stored. Knows nothing about HTTP.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::store::{AuditEntry, SqliteRepository, StoreError};

/// The sixth schema migration: portal links and web sessions.
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE portal_links (
    token_sha256 TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    user TEXT NOT NULL,
    return_url TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE web_sessions (
    id_sha256 TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    account TEXT,
    person TEXT NOT NULL,
    key_id TEXT NOT NULL,
    csrf TEXT NOT NULL,
    return_url TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX web_sessions_account ON web_sessions (account, kind);
"#;

/// Which side a browser session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A customer's user, in one account.
    Portal,
    /// A vendor's staff member, signed in with an admin key.
    Console,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Portal => "portal",
            SessionKind::Console => "console",
        }
    }
}

/// A new single-use portal link.
#[derive(Debug, Clone)]
pub struct NewLink<'a> {
    pub token_sha256: &'a str,
    pub account: &'a str,
    pub user: &'a str,
    pub return_url: Option<&'a str>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A link as it stood when it was redeemed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// First use, in time: the link is now spent.
    Fresh { account: String, user: String, return_url: Option<String> },
    /// Used before.
    Reused,
    /// Past its expiry (and now spent as well).
    Expired,
    /// No such link.
    Unknown,
}

/// A live browser session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub kind: SessionKind,
    /// The account of a portal session; `None` for the console.
    pub account: Option<String>,
    /// The portal user, or the console's signed-in person.
    pub person: String,
    /// The API key the session came from (the integration key that made the link, or the
    /// admin key the console was signed in with).
    pub key_id: String,
    pub csrf: String,
    pub return_url: Option<String>,
    pub expires_at: i64,
}

/// A new session to store.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    pub id_sha256: &'a str,
    pub session: &'a WebSession,
    pub created_at: i64,
}

/// The portal's reads and writes.
pub trait PortalRepository {
    fn create_link(&self, link: &NewLink<'_>) -> Result<(), StoreError>;
    /// Marks the link used at `now` in one transaction and says how it stood: a link is
    /// redeemed at most once, even by two requests at the same moment.
    fn redeem_link(&self, token_sha256: &str, now: i64) -> Result<Redeemed, StoreError>;
    fn create_session(&self, session: &NewSession<'_>) -> Result<(), StoreError>;
    /// A session that is neither revoked nor expired at `now`.
    fn live_session(&self, id_sha256: &str, now: i64) -> Result<Option<WebSession>, StoreError>;
    /// Revokes one session; `false` when it was not live.
    fn revoke_session(&self, id_sha256: &str, now: i64) -> Result<bool, StoreError>;
    /// Revokes every live portal session of an account; returns how many.
    fn revoke_account_sessions(&self, account: &str, now: i64) -> Result<usize, StoreError>;
    /// Live portal sessions of an account at `now`.
    fn count_account_sessions(&self, account: &str, now: i64) -> Result<u64, StoreError>;
    /// Account ids starting with `prefix`, in order, at most `limit`: a range scan of the
    /// primary key, so its cost does not grow with the number of accounts.
    fn accounts_with_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StoreError>;
    /// An account's newest audit entries, newest first.
    fn recent_audit(&self, account: &str, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
}

/// The smallest string above every string that starts with `prefix`, if there is one.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(u32::from(last) + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl PortalRepository for SqliteRepository {
    fn create_link(&self, link: &NewLink<'_>) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO portal_links (token_sha256, account, user, return_url, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![link.token_sha256, link.account, link.user, link.return_url, link.created_at, link.expires_at],
        )?;
        Ok(())
    }

    fn redeem_link(&self, token_sha256: &str, now: i64) -> Result<Redeemed, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // What the link grants, and whether and until when it can still be used.
        let row: Option<(Redeemed, Option<i64>, i64)> = transaction
            .query_row(
                "SELECT account, user, return_url, used_at, expires_at FROM portal_links WHERE token_sha256 = ?1",
                [token_sha256],
                |row| Ok((Redeemed::Fresh { account: row.get(0)?, user: row.get(1)?, return_url: row.get(2)? }, row.get(3)?, row.get(4)?)),
            )
            .optional()?;
        let redeemed = match row {
            None => Redeemed::Unknown,
            Some((_, Some(_), _)) => Redeemed::Reused,
            Some((fresh, None, expires_at)) => {
                transaction.execute("UPDATE portal_links SET used_at = ?1 WHERE token_sha256 = ?2", params![now, token_sha256])?;
                if now >= expires_at { Redeemed::Expired } else { fresh }
            }
        };
        transaction.commit()?;
        Ok(redeemed)
    }

    fn create_session(&self, new: &NewSession<'_>) -> Result<(), StoreError> {
        let session = new.session;
        self.lock().execute(
            "INSERT INTO web_sessions (id_sha256, kind, account, person, key_id, csrf, return_url, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                new.id_sha256,
                session.kind.as_str(),
                session.account,
                session.person,
                session.key_id,
                session.csrf,
                session.return_url,
                new.created_at,
                session.expires_at
            ],
        )?;
        Ok(())
    }

    fn live_session(&self, id_sha256: &str, now: i64) -> Result<Option<WebSession>, StoreError> {
        let found = self
            .lock_reader()
            .query_row(
                "SELECT kind, account, person, key_id, csrf, return_url, expires_at FROM web_sessions
                 WHERE id_sha256 = ?1 AND revoked_at IS NULL AND expires_at > ?2",
                params![id_sha256, now],
                |row| {
                    // A kind this binary does not know grants nothing.
                    let kind = match row.get::<_, String>(0)?.as_str() {
                        "portal" => Some(SessionKind::Portal),
                        "console" => Some(SessionKind::Console),
                        _ => None,
                    };
                    Ok(kind.map(|kind| -> Result<WebSession, rusqlite::Error> {
                        Ok(WebSession {
                            kind,
                            account: row.get(1)?,
                            person: row.get(2)?,
                            key_id: row.get(3)?,
                            csrf: row.get(4)?,
                            return_url: row.get(5)?,
                            expires_at: row.get(6)?,
                        })
                    }))
                },
            )
            .optional()?;
        Ok(found.flatten().transpose()?)
    }

    fn revoke_session(&self, id_sha256: &str, now: i64) -> Result<bool, StoreError> {
        let changed = self
            .lock()
            .execute("UPDATE web_sessions SET revoked_at = ?1 WHERE id_sha256 = ?2 AND revoked_at IS NULL", params![now, id_sha256])?;
        Ok(changed > 0)
    }

    fn revoke_account_sessions(&self, account: &str, now: i64) -> Result<usize, StoreError> {
        Ok(self.lock().execute(
            "UPDATE web_sessions SET revoked_at = ?1 WHERE account = ?2 AND kind = 'portal' AND revoked_at IS NULL AND expires_at > ?1",
            params![now, account],
        )?)
    }

    fn count_account_sessions(&self, account: &str, now: i64) -> Result<u64, StoreError> {
        let count: i64 = self.lock_reader().query_row(
            "SELECT COUNT(*) FROM web_sessions WHERE account = ?1 AND kind = 'portal' AND revoked_at IS NULL AND expires_at > ?2",
            params![account, now],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    fn accounts_with_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let connection = self.lock_reader();
        // `id >= prefix AND id < end` is a range of the primary key's index, read from its start
        // and stopped at its end. `LIKE` would not use the index (case folding, wildcards), and
        // an upper bound written `(?2 IS NULL OR id < ?2)` is not used as a bound either, so a
        // prefix with few matches would read the rest of the index (116 ms at a million
        // accounts instead of 0.06). Hence a statement without a bound for the empty prefix.
        let ids = match prefix_end(prefix) {
            Some(end) => {
                let mut statement = connection.prepare_cached("SELECT id FROM accounts WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3")?;
                let found: Vec<String> = statement.query_map(params![prefix, end, limit], |row| row.get(0))?.collect::<Result<_, _>>()?;
                found
            }
            None => {
                let mut statement = connection.prepare_cached("SELECT id FROM accounts ORDER BY id LIMIT ?1")?;
                let found: Vec<String> = statement.query_map(params![limit], |row| row.get(0))?.collect::<Result<_, _>>()?;
                found
            }
        };
        Ok(ids)
    }

    fn recent_audit(&self, account: &str, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let connection = self.lock_reader();
        let mut statement = connection.prepare_cached(
            "SELECT seq, at, key_id, action, account, target, revision FROM audit WHERE account = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let mut rows = statement.query(params![account, limit])?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            entries.push(AuditEntry {
                seq: row.get(0)?,
                at: tollgate_core::period::format_rfc3339(row.get(1)?),
                key_id: row.get(2)?,
                action: row.get(3)?,
                account: row.get(4)?,
                target: row.get(5)?,
                before: None,
                after: None,
                revision: row.get::<_, i64>(6)? as u64,
            });
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_string_after_every_extension() {
        assert_eq!(prefix_end("acct-1").as_deref(), Some("acct-2"));
        assert_eq!(prefix_end("a").as_deref(), Some("b"));
        assert_eq!(prefix_end(""), None);
    }
}
