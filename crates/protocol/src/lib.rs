//! Every JSON type that crosses a Tollgate process boundary, used by both ends: the sidecar
//! API (this module: request bodies parsed with named errors, decisions rendered), usage
//! shipping between sidecar and control plane (`usage`), the snapshot feed's path, query and
//! header (`feed`), and the one error body. No I/O.

pub mod feed;
pub mod usage;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use tollgate_core::engine::{Decision, Request, upgrade_name};
use tollgate_core::model::ArchivedSnapshotData;
use tollgate_core::period::Rfc3339;

/// `POST /v1/check` body, and one element of a batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody<'a> {
    #[serde(borrow)]
    pub account: Cow<'a, str>,
    #[serde(borrow)]
    pub feature: Cow<'a, str>,
    #[serde(borrow, default)]
    pub user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub region: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub device: Option<Cow<'a, str>>,
    #[serde(default)]
    pub amount: Option<u64>,
}

impl CheckBody<'_> {
    pub fn request(&self) -> Request<'_> {
        Request {
            account: &self.account,
            feature: &self.feature,
            user: self.user.as_deref(),
            region: self.region.as_deref(),
            device: self.device.as_deref(),
            amount: self.amount,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<'a> {
    #[serde(borrow)]
    pub checks: Vec<CheckBody<'a>>,
}

/// `POST /v1/meter` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterBody<'a> {
    #[serde(borrow)]
    pub account: Cow<'a, str>,
    #[serde(borrow)]
    pub meter: Cow<'a, str>,
    pub amount: u64,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// When the usage happened (RFC 3339), if not now; within the late-arrival window it lands
    /// in the period it belongs to.
    #[serde(borrow, default)]
    pub timestamp: Option<Cow<'a, str>>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UpgradeJson<'s> {
    pub kind: &'static str,
    pub id: &'s str,
}

/// A decision as the API returns it; optional fields appear only where they apply.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DecisionJson<'s> {
    pub allow: bool,
    pub reason: &'static str,
    pub revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<&'s str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meter: Option<&'s str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "is_false")]
    pub grace: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub overage: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeJson<'s>>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl<'s> DecisionJson<'s> {
    pub fn new(snapshot: &'s ArchivedSnapshotData, account: &str, revision: u64, decision: &Decision, stale: bool) -> DecisionJson<'s> {
        let license = decision.license.and_then(|license_idx| {
            snapshot.accounts.get(account).and_then(|account| account.licenses.get(license_idx as usize)).map(|license| license.id.as_str())
        });
        let quota = decision.quota.as_ref();
        DecisionJson {
            allow: decision.allow(),
            reason: decision.reason.as_str(),
            revision,
            license,
            meter: quota.and_then(|quota| snapshot.meters.get(quota.meter as usize)).map(|meter| meter.name.as_str()),
            limit: quota.and_then(|quota| quota.limit),
            used: quota.map(|quota| quota.used),
            remaining: quota.and_then(|quota| quota.remaining),
            reset_at: quota.and_then(|quota| quota.reset_at).map(Rfc3339),
            expires_at: decision.expires_at.map(Rfc3339),
            grace: decision.grace,
            overage: quota.is_some_and(|quota| quota.overage),
            stale,
            upgrade: decision.upgrade.and_then(|upgrade| upgrade_name(snapshot, upgrade)).map(|(kind, id)| UpgradeJson { kind, id }),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BatchJson<'s> {
    pub results: Vec<DecisionJson<'s>>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MeterJson {
    pub accepted: bool,
    pub duplicate: bool,
    pub used: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_at: Option<Rfc3339>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Start of the period the event was counted in.
    pub period_start: Rfc3339,
    /// Whether the event is on disk (false only without `--data-dir`).
    pub durable: bool,
    pub revision: u64,
}

/// The body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorJson {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorJson {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorJson {
        ErrorJson { error: ErrorDetail { code: code.to_string(), message: message.into() } }
    }
}

/// Turns a serde_json error into an error code and a message that names the field.
pub fn json_error(error: &serde_json::Error) -> ErrorJson {
    let code = match error.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "invalid_json",
        serde_json::error::Category::Data | serde_json::error::Category::Io => "invalid_request",
    };
    ErrorJson::new(code, error.to_string())
}
