//! Meter limits of accounts at an instant, for usage answers, exports, analytics and threshold
//! webhooks. Stored accounts are compiled with the catalog by the policy compiler and read
//! with `rules::owned_meter_limit`, the very rule sidecars apply (`engine::meter_limit` is the
//! same function over the archived form), so the control plane never resolves plans, add-ons
//! and overrides a second way. [`LimitCache`] keeps each account's
//! limits keyed by the revision it was stored at and only until its next license boundary.
//! No I/O: callers pass the documents.

use std::collections::HashMap;
use std::sync::Mutex;

use tollgate_core::model::{Limit, SnapshotData};
use tollgate_core::rules;
use tollgate_policy::Source;

use super::accounts;
use super::store::AccountDoc;

/// Which limit usage is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Soft,
    Hard,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Soft => "soft",
            LimitKind::Hard => "hard",
        }
    }
}

/// The limit that counts: the hard one where there is one, else the soft one.
pub fn effective(limit: Option<&Limit>) -> Option<(u64, LimitKind)> {
    let limit = limit?;
    match (limit.hard, limit.soft) {
        (Some(hard), _) => Some((hard, LimitKind::Hard)),
        (None, Some(soft)) => Some((soft, LimitKind::Soft)),
        (None, None) => None,
    }
}

/// Compiled accounts, read with the engine's rules.
#[derive(Clone, Copy)]
pub struct LimitView<'a> {
    data: &'a SnapshotData,
}

impl std::fmt::Debug for LimitView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimitView")
    }
}

impl LimitView<'_> {
    /// The account's effective limit on `meter_idx` at `at`: the one `/v1/meter` enforces.
    pub fn limit(&self, account: &str, meter_idx: u32, at: i64) -> Option<Limit> {
        rules::owned_meter_limit(self.data, account, meter_idx, at)
    }

    /// The first instant after `now` at which one of the account's licenses starts, expires
    /// or leaves its grace period: until then its limits at `now` hold.
    pub fn stable_until(&self, account: &str, now: i64) -> i64 {
        let Some(account) = self.data.accounts.get(account) else { return i64::MAX };
        account
            .licenses
            .iter()
            .flat_map(|license| [license.starts_at, license.expires_at, license.expires_at.saturating_add(license.grace_seconds)])
            .filter(|boundary| *boundary > now)
            .min()
            .unwrap_or(i64::MAX)
    }
}

fn view<T>(data: &SnapshotData, read: impl FnOnce(&LimitView<'_>) -> T) -> Result<T, Vec<String>> {
    Ok(read(&LimitView { data }))
}

/// Compiles one account (as `compile_one` validates it) and hands `read` a view of it.
pub fn with_account<T>(catalog: &Source, id: &str, account: &AccountDoc, read: impl FnOnce(&LimitView<'_>) -> T) -> Result<T, Vec<String>> {
    let data = accounts::compile_one(catalog, id, account)?;
    view(&data, read)
}

/// Compiles several accounts in one go and hands `read` a view of them.
pub fn with_accounts<T>(
    catalog: &Source,
    accounts: &[(String, AccountDoc)],
    read: impl FnOnce(&LimitView<'_>) -> T,
) -> Result<T, Vec<String>> {
    let data = accounts::compile_all(catalog, accounts).map_err(|error| error.messages())?;
    view(&data, read)
}

/// An account's limit on every catalog meter, by meter index.
pub type MeterLimits = Vec<Option<Limit>>;

#[derive(Debug, Clone)]
struct Cached {
    revision: u64,
    from: i64,
    until: i64,
    limits: MeterLimits,
}

/// Most accounts kept; past it the cache starts over, which costs recompiles, never answers.
const MAX_CACHED: usize = 100_000;

/// Accounts' limits at now, cached by stored revision until their next license boundary.
#[derive(Debug, Default)]
pub struct LimitCache {
    entries: Mutex<HashMap<String, Cached>>,
}

impl LimitCache {
    /// The cached limits of `account` as stored at `revision`, if they still hold at `now`.
    pub fn get(&self, account: &str, revision: u64, now: i64) -> Option<MeterLimits> {
        let entries = self.entries.lock().ok()?;
        let cached = entries.get(account)?;
        (cached.revision == revision && cached.from <= now && now < cached.until).then(|| cached.limits.clone())
    }

    /// Compiles `accounts` (id, stored revision, document), caches their limits at `now` on
    /// each of `n_meters` meters and returns them. An account that does not compile (the
    /// catalog changed under it) gets no limits and is logged.
    pub fn fill(
        &self,
        catalog: &Source,
        n_meters: usize,
        accounts: Vec<(String, u64, AccountDoc)>,
        now: i64,
    ) -> HashMap<String, MeterLimits> {
        let revisions: HashMap<String, u64> = accounts.iter().map(|(id, revision, _)| (id.clone(), *revision)).collect();
        let docs: Vec<(String, AccountDoc)> = accounts.into_iter().map(|(id, _, doc)| (id, doc)).collect();
        let read = |view: &LimitView<'_>, ids: &mut dyn Iterator<Item = &String>| -> Vec<(String, i64, MeterLimits)> {
            ids.map(|id| {
                let limits = (0..n_meters).map(|meter_idx| view.limit(id, u32::try_from(meter_idx).unwrap_or(u32::MAX), now)).collect();
                (id.clone(), view.stable_until(id, now), limits)
            })
            .collect()
        };
        let computed = match with_accounts(catalog, &docs, |view| read(view, &mut docs.iter().map(|(id, _)| id))) {
            Ok(computed) => computed,
            // One account that no longer compiles must not cost the others their limits.
            Err(_) => docs
                .iter()
                .filter_map(|(id, doc)| match with_account(catalog, id, doc, |view| read(view, &mut std::iter::once(id))) {
                    Ok(computed) => Some(computed),
                    Err(messages) => {
                        tracing::warn!(account = %id, error = %messages.join("; "), "account does not compile; no limits for it");
                        None
                    }
                })
                .flatten()
                .collect(),
        };
        let mut answer = HashMap::with_capacity(computed.len());
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() + computed.len() > MAX_CACHED {
                entries.clear();
            }
            for (id, until, limits) in &computed {
                let revision = revisions.get(id).copied().unwrap_or(0);
                entries.insert(id.clone(), Cached { revision, from: now, until: *until, limits: limits.clone() });
            }
        }
        for (id, _, limits) in computed {
            answer.insert(id, limits);
        }
        answer
    }
}
