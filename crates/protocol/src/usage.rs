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
    /// Events no retry can make count (unknown account or meter); not recorded.
    #[serde(default)]
    pub rejected: Vec<RejectedEvent>,
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

/// The control plane's total for one account, meter and period (every pod's usage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotal {
    pub account: String,
    pub meter: String,
    /// RFC 3339.
    pub period_start: String,
    pub used: u64,
}
