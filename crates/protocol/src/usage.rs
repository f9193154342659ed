//! Usage shipping, `POST /v1/usage`: a sidecar's batch of metering events and per-feature
//! decision counts, and the control plane's answer with the global totals changed since the
//! sidecar's cursor. The limits below are the control plane's; the sidecar refuses at its own
//! edge what would break them, so no record it accepts can be refused later.

use serde::{Deserialize, Serialize};

/// Most events in one batch.
pub const MAX_EVENTS: usize = 10_000;
/// Most distinct user names per account and feature in one batch.
pub const MAX_USERS: usize = 1_000;
/// Longest metering event id, in bytes.
pub const MAX_EVENT_ID: usize = 256;
/// Longest sidecar id, in bytes.
pub const MAX_SIDECAR_ID: usize = 64;
/// Longest user name in a decision row, in bytes.
pub const MAX_USER: usize = 256;

/// Largest amount of one metering event: 2^53, the largest whole number every JSON client
/// (JavaScript's included) reads exactly. Totals add up saturating.
pub const MAX_AMOUNT: u64 = 1 << 53;
/// Largest decision count of one row of one batch.
pub const MAX_DECISION_COUNT: u64 = 1 << 53;
/// Earliest time a usage event may carry: 2000-01-01T00:00:00Z.
pub const EARLIEST_EVENT_TIME: i64 = 946_684_800;
/// How far in the future an event's time may be, in seconds (clock skew between pods).
pub const MAX_FUTURE_SECS: i64 = 300;

/// The record rules both ends apply, one definition: the sidecar refuses at its edge what the
/// control plane would refuse, so nothing a sidecar accepted is refused later. Each answers
/// what is wrong without naming the field; callers say which field it is.
pub mod rules {
    use super::{EARLIEST_EVENT_TIME, MAX_AMOUNT, MAX_DECISION_COUNT, MAX_EVENT_ID, MAX_FUTURE_SECS, MAX_USER};

    pub fn amount(amount: u64) -> Result<(), String> {
        if (1..=MAX_AMOUNT).contains(&amount) { Ok(()) } else { Err(format!("must be from 1 to {MAX_AMOUNT}, not {amount}")) }
    }

    pub fn event_id(id: &str) -> Result<(), String> {
        if (1..=MAX_EVENT_ID).contains(&id.len()) { Ok(()) } else { Err(format!("must be 1 to {MAX_EVENT_ID} bytes")) }
    }

    pub fn user(user: &str) -> Result<(), String> {
        if (1..=MAX_USER).contains(&user.len()) { Ok(()) } else { Err(format!("must be 1 to {MAX_USER} bytes")) }
    }

    pub fn decision_count(count: u64) -> Result<(), String> {
        if count <= MAX_DECISION_COUNT { Ok(()) } else { Err(format!("must be at most {MAX_DECISION_COUNT}, not {count}")) }
    }

    /// `at` (unix seconds) between 2000-01-01 and a few minutes past `now`.
    pub fn event_time(at: i64, now: i64) -> Result<(), String> {
        if at < EARLIEST_EVENT_TIME {
            return Err("is before 2000-01-01T00:00:00Z".into());
        }
        if at > now.saturating_add(MAX_FUTURE_SECS) {
            return Err(format!("is more than {} minutes in the future", MAX_FUTURE_SECS / 60));
        }
        Ok(())
    }
}

/// A batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    /// The sending sidecar's stable id.
    pub sidecar: String,
    /// The cursor of the last answer (0 at first).
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub events: Vec<UsageEvent>,
    #[serde(default)]
    pub decisions: Vec<DecisionRow>,
    /// When the decision counts were taken (RFC 3339).
    #[serde(default)]
    pub decisions_at: Option<String>,
}

/// One metering event, counted once ever per (account, meter, id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageEvent {
    pub account: String,
    pub meter: String,
    pub id: String,
    pub amount: u64,
    /// When the usage happened (RFC 3339); it counts in that instant's period.
    pub at: String,
}

/// Decisions of one account and feature with one reason since the last batch, and the
/// distinct users seen (on the first row of the pair only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRow {
    pub account: String,
    pub feature: String,
    pub reason: String,
    pub count: u64,
    #[serde(default)]
    pub users: Vec<String>,
}

/// The answer to a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAnswer {
    /// New events added to totals.
    pub counted: u64,
    /// Events already recorded (by an earlier batch or earlier in this one).
    pub duplicates: u64,
    /// Events no retry can make count (unknown account or meter, a value out of bounds); not
    /// recorded. The rest of the batch counts.
    #[serde(default)]
    pub rejected: Vec<RejectedEvent>,
    /// Decision rows that were not counted (an unknown reason, a user name or count out of
    /// bounds); the rest count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_decisions: Vec<RejectedDecision>,
    /// Current-period totals changed after `since`, in sequence order.
    #[serde(default)]
    pub totals: Vec<UsageTotal>,
    /// The highest usage sequence scanned: the next batch's `since`.
    pub cursor: u64,
    /// More changed totals remain past `cursor`.
    #[serde(default)]
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedEvent {
    pub id: String,
    pub account: String,
    pub meter: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedDecision {
    pub account: String,
    pub feature: String,
    pub reason: String,
    pub error: String,
}

/// The control plane's total for one account, meter and period (every pod's usage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotal {
    pub account: String,
    pub meter: String,
    /// RFC 3339.
    pub period_start: String,
    pub used: u64,
}
