//! Every JSON type that crosses a Tollgate process boundary, used by both ends: the sidecar
//! API (this module: request bodies parsed with named errors, decisions rendered), usage
//! shipping between sidecar and control plane (`usage`), the snapshot feed's path, query and
//! header (`feed`), and the one error body. No I/O.

pub mod feed;
pub mod usage;

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use tollgate_core::engine::{Decision, Request, Upgrade, upgrade_checkout_template, upgrade_name};
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
    /// Where the account buys it: the plan's or add-on's `checkout_url` template filled in;
    /// absent when the catalog gives none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkout_url: Option<String>,
}

impl<'s> UpgradeJson<'s> {
    /// The hint for `account`, or `None` when the upgrade names no plan or add-on of the
    /// snapshot.
    pub fn new(snapshot: &'s ArchivedSnapshotData, account: &str, upgrade: Upgrade) -> Option<UpgradeJson<'s>> {
        let (kind, id) = upgrade_name(snapshot, upgrade)?;
        let checkout_url = upgrade_checkout_template(snapshot, upgrade).map(|template| fill_checkout_url(template, account, id));
        Some(UpgradeJson { kind, id, checkout_url })
    }
}

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`): a filled-in value
/// can then sit in a path segment, a query value or a fragment without changing the URL's
/// structure. Bytes beyond ASCII are always encoded.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Fills a `checkout_url` template: `{account}` with the account id and `{plan}` with the plan's
/// or add-on's id, each percent-encoded. The policy compiler admits no other placeholder; any
/// other brace is copied as it is.
pub fn fill_checkout_url(template: &str, account: &str, id: &str) -> String {
    let mut url = String::with_capacity(template.len() + account.len() + id.len());
    let mut rest = template;
    while let Some((before, after)) = rest.split_once('{') {
        url.push_str(before);
        if let Some(after) = after.strip_prefix("account}") {
            url.extend(utf8_percent_encode(account, NOT_UNRESERVED));
            rest = after;
        } else if let Some(after) = after.strip_prefix("plan}") {
            url.extend(utf8_percent_encode(id, NOT_UNRESERVED));
            rest = after;
        } else {
            url.push('{');
            rest = after;
        }
    }
    url.push_str(rest);
    url
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
            upgrade: decision.upgrade.and_then(|upgrade| UpgradeJson::new(snapshot, account, upgrade)),
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

#[cfg(test)]
mod tests {
    use super::fill_checkout_url;

    const TEMPLATE: &str = "https://billing.example/checkout?account={account}&plan={plan}";

    #[test]
    fn a_checkout_url_fills_both_placeholders() {
        assert_eq!(fill_checkout_url(TEMPLATE, "acme", "business"), "https://billing.example/checkout?account=acme&plan=business");
    }

    #[test]
    fn a_checkout_url_encodes_everything_but_unreserved_characters() {
        assert_eq!(
            fill_checkout_url(TEMPLATE, "a@b:c/d?e&f=g h+é", "Az09-._~"),
            "https://billing.example/checkout?account=a%40b%3Ac%2Fd%3Fe%26f%3Dg%20h%2B%C3%A9&plan=Az09-._~"
        );
    }

    #[test]
    fn a_checkout_url_fills_repeated_placeholders_and_keeps_other_braces() {
        assert_eq!(
            fill_checkout_url("https://x.example/{plan}/{account}?again={plan}&{other}", "{plan}", "p"),
            "https://x.example/p/%7Bplan%7D?again=p&{other}"
        );
        assert_eq!(fill_checkout_url("https://x.example/no-placeholders", "a", "p"), "https://x.example/no-placeholders");
    }
}
