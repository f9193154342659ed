//! The sidecar's in-memory usage: per account, meter and period, the control plane's global
//! count as of the last sync plus this sidecar's own usage not yet reflected there; the
//! idempotency record of metering events; and the per-feature decision tally shipped for
//! analytics. Check-and-add is atomic per account, so concurrent events cannot together pass a
//! hard limit on this sidecar. Holds no snapshot and does no I/O.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use tollgate_core::engine::{Reason, UsageLookup};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MeterCount {
    period_start: i64,
    /// The control plane's total for the period as of the last sync (every pod's shipped usage).
    global: u64,
    /// This sidecar's accepted usage in the period that the control plane has not yet counted.
    local: u64,
}

impl MeterCount {
    fn used(&self) -> u64 {
        self.global.saturating_add(self.local)
    }
}

/// The outcome of one metering event, kept so that a replay of the same event id gets the
/// same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterOutcome {
    pub accepted: bool,
    pub duplicate: bool,
    /// Usage in the period after this event (or, when refused, without it).
    pub used: u64,
}

/// One metering event to record.
#[derive(Debug, Clone, Copy)]
pub struct MeterEvent<'a> {
    pub account: &'a str,
    pub meter: &'a str,
    pub event_id: &'a str,
    pub amount: u64,
    /// Start of the period the event belongs to (from its own timestamp).
    pub period_start: i64,
    /// Start of the meter's current period; an event of an earlier period is recorded (it is
    /// shipped and billed) but does not count against the current period's limit.
    pub current_period_start: i64,
    /// Refuse the event if it would take usage past this.
    pub hard_limit: Option<u64>,
    /// With a hard limit: the most unsynced local usage this sidecar may hold. An event that
    /// would pass it is not decided here but answered [`Recorded::NeedsSync`], so the caller
    /// can ship and refresh first; this is what bounds how far pods together overshoot.
    pub local_cap: Option<u64>,
    /// Unix seconds, for expiring the idempotency record.
    pub now: i64,
}

#[derive(Debug, Clone, Copy)]
struct EventRecord {
    recorded_at: i64,
    outcome: MeterOutcome,
}

/// What [`UsageStore::record`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Outcome(MeterOutcome),
    /// Nothing recorded: the local share would pass `local_cap`; sync, then ask again.
    NeedsSync,
}

/// The control plane's total for one account, meter and period.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GlobalTotal {
    pub account: String,
    pub meter: String,
    pub period_start: i64,
    pub used: u64,
}

/// An event the control plane has now counted: its amount leaves the local share.
#[derive(Debug, Clone, Copy)]
pub struct Shipped<'a> {
    pub account: &'a str,
    pub meter: &'a str,
    pub period_start: i64,
    pub amount: u64,
}

/// What identifies a metering event: an id is unique per account and meter, the same rule the
/// control plane applies, so the same id on two meters is two events everywhere.
type EventKey = (Box<str>, Box<str>, Box<str>);

fn event_key(account: &str, meter: &str, event_id: &str) -> EventKey {
    (account.into(), meter.into(), event_id.into())
}

#[derive(Debug, Default)]
pub struct UsageStore {
    /// account → meter → count in the current period.
    counts: DashMap<Box<str>, Vec<(Box<str>, MeterCount)>>,
    /// (account, meter, event id) → first outcome: the control plane's dedup key too.
    events: DashMap<EventKey, EventRecord>,
}

impl UsageStore {
    pub fn new() -> UsageStore {
        UsageStore::default()
    }

    /// Records an event once: a repeated event id for the same account and meter returns the first
    /// outcome marked as a duplicate and counts nothing. `on_new` runs for a new event while
    /// its id is still locked, so whatever it starts (the durable log append) is ordered
    /// before any duplicate of the same id can be answered.
    pub fn record(&self, event: &MeterEvent<'_>, on_new: impl FnOnce(&MeterOutcome)) -> Recorded {
        // Lock order is always events, then counts.
        let entry = self.events.entry(event_key(event.account, event.meter, event.event_id));
        let vacant = match entry {
            Entry::Occupied(occupied) => return Recorded::Outcome(MeterOutcome { duplicate: true, ..occupied.get().outcome }),
            Entry::Vacant(vacant) => vacant,
        };
        let Recorded::Outcome(outcome) = self.add(event) else { return Recorded::NeedsSync };
        on_new(&outcome);
        vacant.insert(EventRecord { recorded_at: event.now, outcome });
        Recorded::Outcome(outcome)
    }

    /// Takes back an accepted event that could not be made durable, so that a retry of the
    /// same id is judged afresh.
    pub fn unrecord(&self, event: &MeterEvent<'_>) {
        let removed = self.events.remove(&event_key(event.account, event.meter, event.event_id));
        if removed.is_some_and(|(_, record)| record.outcome.accepted)
            && let Some(mut meters) = self.counts.get_mut(event.account)
            && let Some((_, count)) = meters.iter_mut().find(|(meter, _)| &**meter == event.meter)
            && count.period_start == event.period_start
        {
            count.local = count.local.saturating_sub(event.amount);
        }
    }

    /// Whether an event id is known for this account and meter (accepted, refused or replayed
    /// from the log).
    pub fn has_event(&self, account: &str, meter: &str, event_id: &str) -> bool {
        self.events.contains_key(&event_key(account, meter, event_id))
    }

    fn add(&self, event: &MeterEvent<'_>) -> Recorded {
        let mut meters = self.counts.entry(event.account.into()).or_default();
        let count = meter_count(&mut meters, event.meter, event.current_period_start);
        if event.period_start < count.period_start {
            // A late event of an earlier period: billed there, invisible to today's limit.
            return Recorded::Outcome(MeterOutcome { accepted: true, duplicate: false, used: event.amount });
        }
        let after = count.used().saturating_add(event.amount);
        if event.hard_limit.is_some_and(|limit| after > limit) {
            return Recorded::Outcome(MeterOutcome { accepted: false, duplicate: false, used: count.used() });
        }
        if event.hard_limit.is_some() && event.local_cap.is_some_and(|cap| count.local.saturating_add(event.amount) > cap) {
            return Recorded::NeedsSync;
        }
        count.local = count.local.saturating_add(event.amount);
        Recorded::Outcome(MeterOutcome { accepted: true, duplicate: false, used: after })
    }

    /// Replays an event read back from the durable log at start: its id is remembered, and
    /// unless the control plane has already counted it (`shipped`), it is local usage again.
    pub fn replay(&self, event: &MeterEvent<'_>, shipped: bool) {
        let key = event_key(event.account, event.meter, event.event_id);
        if self.events.contains_key(&key) {
            return;
        }
        let replayed = if shipped {
            Recorded::Outcome(MeterOutcome { accepted: true, duplicate: false, used: event.amount })
        } else {
            // No limit on replay: the event was accepted once and stays accepted.
            self.add(&MeterEvent { hard_limit: None, local_cap: None, ..*event })
        };
        let outcome = match replayed {
            Recorded::Outcome(outcome) => outcome,
            Recorded::NeedsSync => MeterOutcome { accepted: true, duplicate: false, used: event.amount },
        };
        self.events.insert(key, EventRecord { recorded_at: event.now, outcome });
    }

    /// Applies a control-plane answer atomically per account: shipped events leave the local
    /// share and the totals (which include them) become the global count, so no decision in
    /// between sees either half alone. Totals never go backwards within a period.
    pub fn apply_sync(&self, shipped: &[Shipped<'_>], totals: &[GlobalTotal]) {
        let mut accounts: Vec<&str> =
            shipped.iter().map(|event| event.account).chain(totals.iter().map(|total| total.account.as_str())).collect();
        accounts.sort_unstable();
        accounts.dedup();
        for account in accounts {
            let mut meters = self.counts.entry(account.into()).or_default();
            for event in shipped.iter().filter(|event| event.account == account) {
                if let Some((_, count)) = meters.iter_mut().find(|(meter, _)| &**meter == event.meter)
                    && count.period_start == event.period_start
                {
                    count.local = count.local.saturating_sub(event.amount);
                }
            }
            for total in totals.iter().filter(|total| total.account == account) {
                let count = meter_count(&mut meters, &total.meter, total.period_start);
                if count.period_start == total.period_start {
                    count.global = count.global.max(total.used);
                }
            }
        }
    }

    /// The global totals held now, for the on-disk cache that a restart starts from.
    pub fn global_totals(&self) -> Vec<GlobalTotal> {
        let mut totals = Vec::new();
        for entry in self.counts.iter() {
            for (meter, count) in entry.value() {
                if count.global > 0 {
                    totals.push(GlobalTotal {
                        account: entry.key().to_string(),
                        meter: meter.to_string(),
                        period_start: count.period_start,
                        used: count.global,
                    });
                }
            }
        }
        totals
    }

    /// Forgets idempotency records older than `cutoff` (unix seconds), so memory stays bounded.
    pub fn prune_events(&self, cutoff: i64) -> usize {
        let before = self.events.len();
        self.events.retain(|_, record| record.recorded_at >= cutoff);
        before - self.events.len()
    }

    pub fn n_events(&self) -> usize {
        self.events.len()
    }
}

/// The count of `meter` in `meters`, rolled over to `period_start` when that is newer (a new
/// period starts from zero on both sides).
fn meter_count<'m>(meters: &'m mut Vec<(Box<str>, MeterCount)>, meter: &str, period_start: i64) -> &'m mut MeterCount {
    let idx = match meters.iter().position(|(name, _)| &**name == meter) {
        Some(idx) => idx,
        None => {
            meters.push((meter.into(), MeterCount { period_start, global: 0, local: 0 }));
            meters.len() - 1
        }
    };
    // `idx` is in bounds: it was found or just pushed.
    #[expect(clippy::indexing_slicing, reason = "idx was found in or pushed onto `meters` above")]
    let count = &mut meters[idx].1;
    if count.period_start < period_start {
        *count = MeterCount { period_start, global: 0, local: 0 };
    }
    count
}

impl UsageLookup for UsageStore {
    fn used(&self, account: &str, meter: &str, period_start: i64) -> u64 {
        self.counts.get(account).map_or(0, |meters| {
            meters
                .iter()
                .find(|(name, _)| &**name == meter)
                .filter(|(_, count)| count.period_start == period_start)
                .map_or(0, |(_, count)| count.used())
        })
    }
}

/// Most distinct users remembered per account and feature between two shipments.
const MAX_USERS_PER_FEATURE: usize = 1_000;
/// Most (account, feature) pairs tallied between two shipments; past it new pairs are dropped
/// (and counted), so a flood of accounts cannot grow memory without bound.
const MAX_PAIRS: usize = 200_000;

/// One (account, feature) pair's counts. Counting is atomic, so a decision needs only a read
/// lock on the map; the users set takes its write lock only for a user not seen before.
#[derive(Debug)]
struct FeatureTally {
    counts: [AtomicU64; Reason::ALL.len()],
    users: RwLock<HashSet<Box<str>>>,
}

impl Default for FeatureTally {
    fn default() -> FeatureTally {
        FeatureTally { counts: std::array::from_fn(|_| AtomicU64::new(0)), users: RwLock::new(HashSet::new()) }
    }
}

impl FeatureTally {
    fn count(&self, reason: Reason, n: u64, user: Option<&str>) {
        if let Some(count) = self.counts.get(reason.index()) {
            count.fetch_add(n, Ordering::Relaxed);
        }
        let Some(user) = user else { return };
        let known = self.users.read().map(|users| users.len() >= MAX_USERS_PER_FEATURE || users.contains(user)).unwrap_or(true);
        if !known && let Ok(mut users) = self.users.write() {
            // Checked again: another decision may have added it (or filled the set) meanwhile.
            if users.len() < MAX_USERS_PER_FEATURE {
                users.insert(user.into());
            }
        }
    }
}

/// Decision counts per account, feature and reason, with the distinct users seen, since the
/// last shipment. Only catalog features of known accounts are tallied.
///
/// Every decision is counted here, so the common case (a pair and a user already seen) takes
/// only a shard read lock and atomic adds; the map's write lock is taken when a new account or
/// (account, feature) pair appears, and by `take` and `restore`.
#[derive(Debug, Default)]
pub struct DecisionTally {
    accounts: DashMap<Box<str>, Vec<(Box<str>, FeatureTally)>>,
    n_pairs: AtomicUsize,
    dropped: AtomicU64,
}

/// One tallied row, as shipped.
pub use tollgate_protocol::usage::DecisionRow as TallyRow;

impl DecisionTally {
    pub fn new() -> DecisionTally {
        DecisionTally::default()
    }

    /// Counts one decision. Unknown accounts and features are not tallied (their names are
    /// whatever a client sent), nor are users the account does not know.
    pub fn record(&self, account: &str, feature: &str, user: Option<&str>, reason: Reason) {
        if matches!(reason, Reason::UnknownAccount | Reason::UnknownFeature) {
            return;
        }
        // A user name the control plane would refuse is not tallied, whichever protocol brought
        // it (an ext_authz header, an AuthZEN subject).
        let user = user.filter(|user| reason != Reason::UnknownUser && tollgate_protocol::usage::rules::user(user).is_ok());
        // Fast path: a pair seen before, under the shard's read lock.
        if let Some(features) = self.accounts.get(account)
            && let Some((_, tally)) = features.iter().find(|(name, _)| &**name == feature)
        {
            tally.count(reason, 1, user);
            return;
        }
        if !self.accounts.contains_key(account) && self.n_pairs.load(Ordering::Relaxed) >= MAX_PAIRS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut features = self.accounts.entry(account.into()).or_default();
        // Another decision may have added the pair between the read and the write lock.
        if let Some((_, tally)) = features.iter().find(|(name, _)| &**name == feature) {
            tally.count(reason, 1, user);
            return;
        }
        if self.n_pairs.fetch_add(1, Ordering::Relaxed) >= MAX_PAIRS {
            self.n_pairs.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let tally = FeatureTally::default();
        tally.count(reason, 1, user);
        features.push((feature.into(), tally));
    }

    /// Takes everything tallied so far, leaving the tally empty.
    pub fn take(&self) -> Vec<TallyRow> {
        let mut rows = Vec::new();
        let accounts: Vec<Box<str>> = self.accounts.iter().map(|entry| entry.key().clone()).collect();
        for account in accounts {
            // Removing waits for decisions holding the shard's read lock, so none is lost:
            // it is counted here or lands in a new entry for the next shipment.
            let Some((account, features)) = self.accounts.remove(&account) else { continue };
            self.n_pairs.fetch_sub(features.len(), Ordering::Relaxed);
            for (feature, tally) in features {
                let mut users: Vec<String> =
                    tally.users.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()).into_iter().map(String::from).collect();
                users.sort_unstable();
                let mut first = true;
                for (reason, count) in Reason::ALL.iter().zip(tally.counts) {
                    let count = count.into_inner();
                    if count == 0 {
                        continue;
                    }
                    // Users go with the first row of the pair only; they are distinct per
                    // account and feature, not per reason.
                    rows.push(TallyRow {
                        account: account.to_string(),
                        feature: feature.to_string(),
                        reason: reason.as_str().to_string(),
                        count,
                        users: if first { std::mem::take(&mut users) } else { Vec::new() },
                    });
                    first = false;
                }
            }
        }
        rows
    }

    /// Puts rows back after a failed shipment, so they go with the next one.
    pub fn restore(&self, rows: &[TallyRow]) {
        for row in rows {
            let Some(reason) = Reason::parse(&row.reason) else { continue };
            let mut features = self.accounts.entry(row.account.as_str().into()).or_default();
            let idx = match features.iter().position(|(name, _)| **name == *row.feature) {
                Some(idx) => idx,
                None => {
                    self.n_pairs.fetch_add(1, Ordering::Relaxed);
                    features.push((row.feature.as_str().into(), FeatureTally::default()));
                    features.len() - 1
                }
            };
            if let Some((_, tally)) = features.get(idx) {
                tally.count(reason, row.count, None);
                for user in &row.users {
                    tally.count(reason, 0, Some(user));
                }
            }
        }
    }

    /// Decisions not tallied because the tally was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(event_id: &'a str, amount: u64, period_start: i64) -> MeterEvent<'a> {
        MeterEvent {
            account: "acme",
            meter: "api_calls",
            event_id,
            amount,
            period_start,
            current_period_start: period_start,
            hard_limit: Some(10),
            local_cap: None,
            now: 0,
        }
    }

    /// The same event id on two meters is two events, as the control plane counts it.
    #[test]
    fn an_event_id_is_unique_per_account_and_meter() {
        let store = UsageStore::new();
        let calls = event("req-1", 2, 0);
        let exports = MeterEvent { meter: "exports", ..event("req-1", 3, 0) };
        assert!(!record(&store, &calls).duplicate);
        assert!(!record(&store, &exports).duplicate);
        assert!(record(&store, &exports).duplicate);
        assert!(store.has_event("acme", "api_calls", "req-1") && store.has_event("acme", "exports", "req-1"));
        assert!(!store.has_event("acme", "storage_gb", "req-1"));
    }

    fn record(store: &UsageStore, event: &MeterEvent<'_>) -> MeterOutcome {
        match store.record(event, |_| {}) {
            Recorded::Outcome(outcome) => outcome,
            Recorded::NeedsSync => panic!("no local cap in these events"),
        }
    }

    #[test]
    fn counts_once_per_event_id_and_refuses_past_the_hard_limit() {
        let store = UsageStore::new();
        assert_eq!(record(&store, &event("a", 4, 100)), MeterOutcome { accepted: true, duplicate: false, used: 4 });
        assert_eq!(record(&store, &event("a", 4, 100)), MeterOutcome { accepted: true, duplicate: true, used: 4 });
        assert_eq!(record(&store, &event("b", 6, 100)).used, 10);
        assert_eq!(record(&store, &event("c", 1, 100)), MeterOutcome { accepted: false, duplicate: false, used: 10 });
        assert_eq!(store.used("acme", "api_calls", 100), 10);
        assert_eq!(store.used("acme", "api_calls", 200), 0);
        assert_eq!(record(&store, &event("d", 1, 200)).used, 1, "a new period starts from zero");
    }

    #[test]
    fn global_usage_counts_against_the_limit_and_a_sync_moves_local_into_it() {
        let store = UsageStore::new();
        record(&store, &event("a", 3, 100));
        // Another pod has used 5: the control plane's total is ours (3) plus theirs.
        let shipped = [Shipped { account: "acme", meter: "api_calls", period_start: 100, amount: 3 }];
        let totals = [GlobalTotal { account: "acme".into(), meter: "api_calls".into(), period_start: 100, used: 8 }];
        store.apply_sync(&shipped, &totals);
        assert_eq!(store.used("acme", "api_calls", 100), 8, "not 11: our 3 are inside the total now");
        assert!(!record(&store, &event("b", 3, 100)).accepted, "8 + 3 passes the hard limit of 10");
        assert_eq!(record(&store, &event("c", 2, 100)).used, 10);
        // An older total never lowers what is known.
        store.apply_sync(&[], &[GlobalTotal { used: 1, ..totals[0].clone() }]);
        assert_eq!(store.used("acme", "api_calls", 100), 10);
        // A total of a newer period rolls the meter over.
        store.apply_sync(&[], &[GlobalTotal { period_start: 200, used: 4, ..totals[0].clone() }]);
        assert_eq!(store.used("acme", "api_calls", 200), 4);
    }

    #[test]
    fn the_local_cap_asks_for_a_sync_before_the_local_share_passes_it() {
        let store = UsageStore::new();
        let capped = |id| MeterEvent { local_cap: Some(4), ..event(id, 2, 100) };
        assert!(matches!(store.record(&capped("a"), |_| {}), Recorded::Outcome(_)));
        assert!(matches!(store.record(&capped("b"), |_| {}), Recorded::Outcome(_)));
        assert_eq!(store.record(&capped("c"), |_| {}), Recorded::NeedsSync);
        assert!(!store.has_event("acme", "api_calls", "c"), "nothing is recorded for an event that needs a sync");
        let shipped = [Shipped { account: "acme", meter: "api_calls", period_start: 100, amount: 4 }];
        store.apply_sync(&shipped, &[GlobalTotal { account: "acme".into(), meter: "api_calls".into(), period_start: 100, used: 4 }]);
        assert!(matches!(store.record(&capped("c"), |_| {}), Recorded::Outcome(MeterOutcome { accepted: true, used: 6, .. })));
    }

    #[test]
    fn late_events_are_recorded_but_do_not_count_against_the_current_period() {
        let store = UsageStore::new();
        record(&store, &event("now", 9, 200));
        let late = MeterEvent { period_start: 100, current_period_start: 200, ..event("late", 5, 100) };
        assert!(record(&store, &late).accepted);
        assert_eq!(store.used("acme", "api_calls", 200), 9);
    }

    #[test]
    fn unrecord_takes_back_an_event_that_was_not_made_durable() {
        let store = UsageStore::new();
        let first = event("a", 4, 100);
        record(&store, &first);
        store.unrecord(&first);
        assert!(!store.has_event("acme", "api_calls", "a"));
        assert_eq!(store.used("acme", "api_calls", 100), 0);
        assert!(!record(&store, &first).duplicate, "a retry is judged afresh");
    }

    #[test]
    fn replay_restores_ids_and_only_unshipped_usage() {
        let store = UsageStore::new();
        store.replay(&event("shipped", 4, 100), true);
        store.replay(&event("pending", 3, 100), false);
        assert_eq!(store.used("acme", "api_calls", 100), 3);
        assert!(record(&store, &event("shipped", 4, 100)).duplicate);
        assert!(record(&store, &event("pending", 3, 100)).duplicate);
    }

    #[test]
    fn prunes_old_event_records() {
        let store = UsageStore::new();
        record(&store, &MeterEvent { now: 5, ..event("a", 1, 0) });
        record(&store, &MeterEvent { now: 50, ..event("b", 1, 0) });
        assert_eq!(store.prune_events(10), 1);
        assert_eq!(store.n_events(), 1);
    }

    #[test]
    fn tally_counts_by_reason_with_distinct_known_users() {
        let tally = DecisionTally::new();
        tally.record("acme", "sso", Some("alice"), Reason::Ok);
        tally.record("acme", "sso", Some("alice"), Reason::Ok);
        tally.record("acme", "sso", Some("bob"), Reason::RoleForbidden);
        tally.record("acme", "sso", Some("mallory"), Reason::UnknownUser);
        tally.record("acme", "made-up", None, Reason::UnknownFeature);
        tally.record("nobody", "sso", None, Reason::UnknownAccount);
        let mut rows = tally.take();
        rows.sort_by(|a, b| a.reason.cmp(&b.reason));
        let summary: Vec<(&str, u64)> = rows.iter().map(|row| (row.reason.as_str(), row.count)).collect();
        assert_eq!(summary, [("ok", 2), ("role_forbidden", 1), ("unknown_user", 1)]);
        let users: Vec<&String> = rows.iter().flat_map(|row| &row.users).collect();
        assert_eq!(users, ["alice", "bob"]);
        assert!(tally.take().is_empty(), "take empties the tally");
        tally.restore(&rows);
        assert_eq!(tally.take().iter().map(|row| row.count).sum::<u64>(), 4);
    }

    #[test]
    fn concurrent_decisions_are_all_counted_while_shipments_take_them() {
        use std::collections::BTreeMap;
        let tally = DecisionTally::new();
        let n_threads = 8;
        let per_thread = 20_000u64;
        let reasons = [Reason::Ok, Reason::RoleForbidden, Reason::NotEntitled];
        let mut taken: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        let mut users = HashSet::new();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..n_threads)
                .map(|thread| {
                    let tally = &tally;
                    scope.spawn(move || {
                        for n in 0..per_thread {
                            let account = format!("acct-{}", n % 7);
                            let feature = format!("feature-{}", (n / 7) % 5);
                            let user = format!("user-{}", (n + thread) % 11);
                            tally.record(&account, &feature, Some(&user), reasons[(n % 3) as usize]);
                        }
                    })
                })
                .collect();
            // A shipper taking (and once putting back) rows while decisions go on.
            let mut round = 0;
            while workers.iter().any(|worker| !worker.is_finished()) {
                let rows = tally.take();
                round += 1;
                if round == 3 {
                    tally.restore(&rows);
                    continue;
                }
                for row in rows {
                    users.extend(row.users.iter().cloned());
                    *taken.entry((row.account, row.feature, row.reason)).or_default() += row.count;
                }
            }
        });
        for row in tally.take() {
            users.extend(row.users.iter().cloned());
            *taken.entry((row.account, row.feature, row.reason)).or_default() += row.count;
        }
        assert_eq!(taken.values().sum::<u64>(), n_threads * per_thread, "every decision counted exactly once");
        let mut expected: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        for _thread in 0..n_threads {
            for n in 0..per_thread {
                let key = (format!("acct-{}", n % 7), format!("feature-{}", (n / 7) % 5), reasons[(n % 3) as usize].as_str().to_string());
                *expected.entry(key).or_default() += 1;
            }
        }
        assert_eq!(taken, expected);
        assert_eq!(users.len(), 11);
        assert_eq!(tally.dropped(), 0);
    }

    #[test]
    fn the_tally_keeps_its_bounds() {
        let tally = DecisionTally::new();
        for n in 0..MAX_USERS_PER_FEATURE + 50 {
            tally.record("acme", "sso", Some(&format!("user-{n}")), Reason::Ok);
        }
        let rows = tally.take();
        assert_eq!(rows.iter().map(|row| row.users.len()).sum::<usize>(), MAX_USERS_PER_FEATURE);
        assert_eq!(rows.iter().map(|row| row.count).sum::<u64>(), (MAX_USERS_PER_FEATURE + 50) as u64);
        tally.n_pairs.store(MAX_PAIRS, Ordering::Relaxed);
        tally.record("new-account", "sso", None, Reason::Ok);
        assert_eq!(tally.dropped(), 1, "a full tally drops new pairs");
    }
}
