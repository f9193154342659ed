//! The sidecar's in-memory usage counts per account, meter and period, and the idempotency
//! record of metering events. Check-and-add is atomic per account, so concurrent events
//! cannot together pass a hard limit. Holds no snapshot and does no I/O.

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::engine::UsageLookup;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MeterCount {
    period_start: i64,
    used: u64,
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
    pub period_start: i64,
    /// Refuse the event if it would take usage past this.
    pub hard_limit: Option<u64>,
    /// Unix seconds, for expiring the idempotency record.
    pub now: i64,
}

#[derive(Debug, Clone, Copy)]
struct EventRecord {
    recorded_at: i64,
    outcome: MeterOutcome,
}

#[derive(Debug, Default)]
pub struct UsageStore {
    /// account → meter → count in the current period.
    counts: DashMap<Box<str>, Vec<(Box<str>, MeterCount)>>,
    /// (account, event id) → first outcome.
    events: DashMap<(Box<str>, Box<str>), EventRecord>,
}

impl UsageStore {
    pub fn new() -> UsageStore {
        UsageStore::default()
    }

    /// Records an event once: a repeated event id for the same account returns the first
    /// outcome marked as a duplicate and counts nothing.
    pub fn record(&self, event: &MeterEvent<'_>) -> MeterOutcome {
        // Lock order is always events, then counts.
        let entry = self.events.entry((event.account.into(), event.event_id.into()));
        let vacant = match entry {
            Entry::Occupied(occupied) => return MeterOutcome { duplicate: true, ..occupied.get().outcome },
            Entry::Vacant(vacant) => vacant,
        };
        let outcome = self.add(event);
        vacant.insert(EventRecord { recorded_at: event.now, outcome });
        outcome
    }

    fn add(&self, event: &MeterEvent<'_>) -> MeterOutcome {
        let mut meters = self.counts.entry(event.account.into()).or_default();
        let count = match meters.iter_mut().find(|(meter, _)| &**meter == event.meter) {
            Some((_, count)) => count,
            None => {
                meters.push((event.meter.into(), MeterCount { period_start: event.period_start, used: 0 }));
                match meters.last_mut() {
                    Some((_, count)) => count,
                    None => return MeterOutcome { accepted: false, duplicate: false, used: 0 },
                }
            }
        };
        if count.period_start < event.period_start {
            *count = MeterCount { period_start: event.period_start, used: 0 };
        }
        let after = count.used.saturating_add(event.amount);
        if event.hard_limit.is_some_and(|limit| after > limit) {
            return MeterOutcome { accepted: false, duplicate: false, used: count.used };
        }
        count.used = after;
        MeterOutcome { accepted: true, duplicate: false, used: after }
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

impl UsageLookup for UsageStore {
    fn used(&self, account: &str, meter: &str, period_start: i64) -> u64 {
        self.counts.get(account).map_or(0, |meters| {
            meters
                .iter()
                .find(|(name, _)| &**name == meter)
                .filter(|(_, count)| count.period_start == period_start)
                .map_or(0, |(_, count)| count.used)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(event_id: &'a str, amount: u64, period_start: i64) -> MeterEvent<'a> {
        MeterEvent { account: "acme", meter: "api_calls", event_id, amount, period_start, hard_limit: Some(10), now: 0 }
    }

    #[test]
    fn counts_once_per_event_id_and_refuses_past_the_hard_limit() {
        let store = UsageStore::new();
        assert_eq!(store.record(&event("a", 4, 100)), MeterOutcome { accepted: true, duplicate: false, used: 4 });
        assert_eq!(store.record(&event("a", 4, 100)), MeterOutcome { accepted: true, duplicate: true, used: 4 });
        assert_eq!(store.record(&event("b", 6, 100)).used, 10);
        assert_eq!(store.record(&event("c", 1, 100)), MeterOutcome { accepted: false, duplicate: false, used: 10 });
        assert_eq!(store.used("acme", "api_calls", 100), 10);
        assert_eq!(store.used("acme", "api_calls", 200), 0);
        assert_eq!(store.record(&event("d", 1, 200)).used, 1, "a new period starts from zero");
    }

    #[test]
    fn prunes_old_event_records() {
        let store = UsageStore::new();
        store.record(&MeterEvent { now: 5, ..event("a", 1, 0) });
        store.record(&MeterEvent { now: 50, ..event("b", 1, 0) });
        assert_eq!(store.prune_events(10), 1);
        assert_eq!(store.n_events(), 1);
    }
}
