//! Stripe, in: `POST /v1/integrations/stripe`. The `Stripe-Signature` header is checked as
//! Stripe specifies (HMAC-SHA256 of `"{t}.{raw body}"` under the endpoint's `whsec_` secret,
//! compared in constant time with every `v1` entry, `t` within a tolerance), then
//! subscription, invoice and entitlement events are mapped onto the license a subscription
//! owns in its account (`stripe:SUBSCRIPTION_ID`):
//!
//! - account: `metadata.tollgate_account` of the subscription or of an expanded customer, else
//!   the customer's link (`PUT /v1/integrations/links/stripe/cus_...`);
//! - plan and add-ons: the catalog's `stripe_prices`; the plan item's quantity is the seats;
//! - status: `trialing` and `active` are live until the period's end (plus the past-due grace,
//!   which also covers the moment between a period's end and its renewal); `past_due` is in
//!   grace from the last paid period's end; `unpaid` and `paused` suspend the account;
//!   `canceled` (or a deleted subscription) ends the license at `ended_at`;
//! - `invoice.paid` extends the license to the end of the paid period;
//! - `entitlements.active_entitlement_summary.updated` sets the features the customer's Stripe
//!   entitlements add (lookup keys naming catalog features) on the customer's Stripe licenses.
//!
//! An event older than the last one applied to its subscription never undoes it, and a
//! canceled subscription stays canceled.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::{Inbound, Mapping, Refusal, System, account_or_new, is_older, license_id_for, object_license};
use crate::integration_store::ObjectState;
use crate::store::{AccountState, Transaction};
use crate::{ApiError, ControlPlane};
use tollgate_policy::PriceTarget;

/// Default tolerance between the signature's timestamp and now, as Stripe's libraries use.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;
/// Default days a `past_due` subscription keeps its features, in grace.
pub const DEFAULT_GRACE_DAYS: u32 = 7;

/// How Stripe events are checked and mapped.
#[derive(Clone)]
pub struct StripeConfig {
    /// Every accepted endpoint secret (`whsec_...`): several during a rotation.
    secrets: Vec<Vec<u8>>,
    pub tolerance_secs: i64,
    pub grace_days: u32,
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig").field("secrets", &self.secrets.len()).field("tolerance_secs", &self.tolerance_secs).finish()
    }
}

impl StripeConfig {
    pub fn new(secrets: Vec<Vec<u8>>) -> StripeConfig {
        StripeConfig { secrets, tolerance_secs: DEFAULT_TOLERANCE_SECS, grace_days: DEFAULT_GRACE_DAYS }
    }
}

/// The `Stripe-Signature` header's value for `body` signed at `timestamp` with `secret`:
/// `t=TIMESTAMP,v1=HEX`. What Stripe sends; the tests sign with it.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", hex::encode(mac(secret, timestamp, body).finalize().into_bytes()))
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    #[expect(clippy::expect_used, reason = "HMAC accepts keys of every length")]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks `Stripe-Signature` against the raw body: some `v1` entry must match under some
/// secret (compared in constant time), and `t` must be within the tolerance of `now` in either
/// direction.
pub fn verify(config: &StripeConfig, header: Option<&str>, body: &[u8], now: i64) -> Result<(), Refusal> {
    const HEADER: &str = "Stripe-Signature";
    let header = header.ok_or(Refusal::MissingHeader(HEADER))?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else { continue };
        match key {
            "t" => {
                timestamp = Some(value.parse::<i64>().map_err(|_| Refusal::MalformedHeader {
                    header: HEADER,
                    reason: format!("timestamp `{value}` is not a whole number"),
                })?);
            }
            "v1" => signatures.push(hex::decode(value).unwrap_or_default()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or_else(|| Refusal::MalformedHeader { header: HEADER, reason: "no `t=` timestamp".into() })?;
    if signatures.is_empty() {
        return Err(Refusal::MalformedHeader { header: HEADER, reason: "no `v1=` signature".into() });
    }
    let matched =
        config.secrets.iter().any(|secret| signatures.iter().any(|signature| mac(secret, timestamp, body).verify_slice(signature).is_ok()));
    if !matched {
        return Err(Refusal::BadSignature);
    }
    let skew = now.saturating_sub(timestamp);
    if skew.abs() > config.tolerance_secs {
        return Err(Refusal::StaleTimestamp(skew));
    }
    Ok(())
}

fn text<'v>(value: &'v Value, path: &[&str]) -> Option<&'v str> {
    path.iter().try_fold(value, |value, key| value.get(key)).and_then(Value::as_str)
}

fn number(value: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(value, |value, key| value.get(key)).and_then(Value::as_i64)
}

/// An id field that Stripe sends either as the id or as the expanded object.
fn id_of(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::String(id) => Some(id),
        object => object.get("id").and_then(Value::as_str),
    }
}

/// Reads the envelope of a Stripe event: `id`, `type`, `created` and `data.object` must be
/// there; everything inside the object is the mapping's business.
pub fn parse_event(body: &[u8]) -> Result<Inbound, ApiError> {
    let event: Value = serde_json::from_slice(body).map_err(|error| Refusal::MalformedEvent(format!("not JSON: {error}")))?;
    let event_id = text(&event, &["id"]).ok_or_else(|| Refusal::MalformedEvent("no `id`".into()))?;
    if event_id.is_empty() || event_id.len() > 255 || event_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Refusal::MalformedEvent(format!("`id` `{event_id}` is not an event id")).into());
    }
    let event_type = text(&event, &["type"]).ok_or_else(|| Refusal::MalformedEvent("no `type`".into()))?;
    let created = number(&event, &["created"]).ok_or_else(|| Refusal::MalformedEvent("no `created` timestamp".into()))?;
    let object = event.get("data").and_then(|data| data.get("object")).filter(|object| object.is_object());
    let object = object.ok_or_else(|| Refusal::MalformedEvent("no `data.object`".into()))?;
    let object_id = match event_type {
        "invoice.paid" => invoice_subscription(object).map(str::to_string),
        _ if event_type.starts_with("customer.subscription.") => text(object, &["id"]).map(str::to_string),
        "customer.created" | "customer.updated" => text(object, &["id"]).map(str::to_string),
        _ => id_of(object.get("customer")).map(|customer| format!("entitlements:{customer}")),
    };
    Ok(Inbound {
        system: System::Stripe,
        event_id: event_id.to_string(),
        event_type: event_type.to_string(),
        object_id,
        occurred_at_ms: created.saturating_mul(1000),
        payload: String::from_utf8_lossy(body).into_owned(),
    })
}

/// The subscription an invoice pays: `subscription` in older API versions,
/// `parent.subscription_details.subscription` in newer ones.
fn invoice_subscription(invoice: &Value) -> Option<&str> {
    id_of(invoice.get("subscription")).or_else(|| {
        id_of(invoice.get("parent").and_then(|parent| parent.get("subscription_details")).and_then(|details| details.get("subscription")))
    })
}

/// What Tollgate keeps of a subscription between events.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SubscriptionState {
    status: String,
    customer: Option<String>,
    /// Whether this subscription suspended the account (and so may resume it).
    #[serde(default)]
    suspended_account: bool,
}

/// What Tollgate keeps of a customer's active entitlement summary.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct EntitlementState {
    features: Vec<String>,
}

fn entitlement_key(customer: &str) -> String {
    format!("entitlements:{customer}")
}

/// Maps a Stripe event, reading links and object states through `transaction`.
pub fn map(control_plane: &ControlPlane, transaction: &mut dyn Transaction, inbound: &Inbound) -> Result<Mapping, ApiError> {
    let event: Value = serde_json::from_str(&inbound.payload).map_err(|error| Refusal::MalformedEvent(error.to_string()))?;
    let object = event.get("data").and_then(|data| data.get("object")).cloned().unwrap_or_default();
    Ok(match inbound.event_type.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" => {
            subscription(control_plane, transaction, inbound, &object, false)?
        }
        "customer.subscription.deleted" => subscription(control_plane, transaction, inbound, &object, true)?,
        "invoice.paid" => invoice_paid(control_plane, transaction, &object)?,
        "entitlements.active_entitlement_summary.updated" => entitlements(control_plane, transaction, inbound, &object)?,
        "customer.created" | "customer.updated" => customer(transaction, inbound, &object)?,
        other => Mapping::Ignored { reason: format!("Tollgate does not map `{other}` events"), object: None },
    })
}

/// A customer whose `metadata.tollgate_account` names an account is linked to it, so later
/// subscription and entitlement events of that customer find their account.
fn customer(transaction: &mut dyn Transaction, inbound: &Inbound, customer: &Value) -> Result<Mapping, ApiError> {
    let Some(customer_id) = text(customer, &["id"]) else {
        return Ok(unmapped(None, "the customer has no `id`".into()));
    };
    let Some(account) = text(customer, &["metadata", "tollgate_account"]) else {
        return Ok(Mapping::Ignored { reason: "the customer has no `metadata.tollgate_account`".into(), object: None });
    };
    if !crate::changes::valid_id(account) {
        return Ok(unmapped(None, format!("`metadata.tollgate_account` value `{account}` is not a valid account id")));
    }
    let link = crate::integration_store::Link {
        source: System::Stripe.as_str().to_string(),
        external_id: customer_id.to_string(),
        account: account.to_string(),
        created_at: inbound.occurred_at_ms.div_euclid(1000),
    };
    transaction.put_integration_link(&link)?;
    Ok(Mapping::Linked { account: account.to_string(), reason: format!("customer `{customer_id}` is linked to account `{account}`") })
}

fn unmapped(account: Option<&str>, reason: String) -> Mapping {
    Mapping::Unmapped { account: account.map(str::to_string), reason }
}

/// The account a subscription belongs to: metadata first, then the customer's link.
fn subscription_account(
    transaction: &mut dyn Transaction,
    subscription: &Value,
    customer: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let from_metadata = text(subscription, &["metadata", "tollgate_account"])
        .or_else(|| subscription.get("customer").and_then(|customer| text(customer, &["metadata", "tollgate_account"])));
    if let Some(account) = from_metadata {
        return Ok(Some(account.to_string()));
    }
    match customer {
        Some(customer) => Ok(transaction.integration_link(System::Stripe.as_str(), customer)?),
        None => Ok(None),
    }
}

/// The end of the subscription's current period: on the subscription in older API versions,
/// on each item in newer ones.
fn period_bound(subscription: &Value, field: &str) -> Option<i64> {
    number(subscription, &[field]).or_else(|| {
        let items = subscription.get("items")?.get("data")?.as_array()?;
        items.iter().filter_map(|item| number(item, &[field])).max()
    })
}

fn subscription(
    control_plane: &ControlPlane,
    transaction: &mut dyn Transaction,
    inbound: &Inbound,
    subscription: &Value,
    deleted: bool,
) -> Result<Mapping, ApiError> {
    let Some(subscription_id) = text(subscription, &["id"]) else {
        return Ok(unmapped(None, "the subscription has no `id`".into()));
    };
    let customer = id_of(subscription.get("customer"));
    let Some(account) = subscription_account(transaction, subscription, customer)? else {
        let customer = customer.unwrap_or("(none)");
        return Ok(unmapped(
            None,
            format!(
                "no account: set `metadata.tollgate_account` on the subscription or customer, or link the customer with `PUT /v1/integrations/links/stripe/{customer}`"
            ),
        ));
    };
    if !crate::changes::valid_id(&account) {
        return Ok(unmapped(None, format!("`metadata.tollgate_account` value `{account}` is not a valid account id")));
    }
    let previous = transaction.integration_object(System::Stripe.as_str(), subscription_id)?;
    let previous_state: SubscriptionState =
        previous.as_ref().and_then(|object| serde_json::from_str(&object.state).ok()).unwrap_or_default();
    if is_older(previous.as_ref(), inbound.occurred_at_ms) {
        return Ok(Mapping::Stale {
            account: Some(account),
            reason: format!("an event newer than this one was applied to subscription `{subscription_id}` already"),
        });
    }
    let status = if deleted { "canceled" } else { text(subscription, &["status"]).unwrap_or("") };
    let ended = matches!(status, "canceled" | "incomplete_expired");
    if previous_state.status == "canceled" && !ended {
        return Ok(Mapping::Stale {
            account: Some(account),
            reason: format!("subscription `{subscription_id}` was canceled; a canceled subscription is not revived"),
        });
    }
    let license_id = match license_id_for(System::Stripe, subscription_id) {
        Ok(id) => id,
        Err(reason) => return Ok(unmapped(Some(&account), reason)),
    };
    let state_of = |suspended_account: bool| ObjectState {
        account: account.clone(),
        last_event_id: inbound.event_id.clone(),
        last_occurred_at_ms: inbound.occurred_at_ms,
        state: serde_json::to_string(&SubscriptionState {
            status: status.to_string(),
            customer: customer.map(str::to_string),
            suspended_account,
        })
        .unwrap_or_default(),
    };
    if status == "incomplete" {
        return Ok(Mapping::Ignored {
            reason: "the subscription is `incomplete`: its first payment has not succeeded".into(),
            object: Some((subscription_id.to_string(), state_of(false))),
        });
    }

    // Plan, add-ons and seats from the items' prices.
    let items = subscription.get("items").and_then(|items| items.get("data")).and_then(Value::as_array);
    let items = items.map(Vec::as_slice).unwrap_or_default();
    let mut plan: Option<(String, u32)> = None;
    let mut addons = Vec::new();
    for item in items {
        let price = id_of(item.get("price")).or_else(|| id_of(item.get("plan"))).unwrap_or("");
        let quantity = number(item, &["quantity"]).unwrap_or(1).clamp(1, i64::from(u32::MAX)) as u32;
        match control_plane.integrations.stripe_prices.get(price) {
            Some(PriceTarget::Plan(name)) => {
                if let Some((other, _)) = &plan {
                    return Ok(unmapped(Some(&account), format!("the subscription has two plans: `{other}` and `{name}`")));
                }
                plan = Some((name.clone(), quantity));
            }
            Some(PriceTarget::Addon(name)) => addons.push(name.clone()),
            None => {
                return Ok(unmapped(
                    Some(&account),
                    format!("price `{price}` is in the `stripe_prices` of no plan or add-on of the catalog"),
                ));
            }
        }
    }
    let Some((plan, seats)) = plan else {
        return Ok(unmapped(Some(&account), "no item of the subscription has a price that buys a plan".into()));
    };

    let mut after = account_or_new(transaction, &account)?;
    let entitlement_features = match customer {
        Some(customer) => transaction
            .integration_object(System::Stripe.as_str(), &entitlement_key(customer))?
            .and_then(|object| serde_json::from_str::<EntitlementState>(&object.state).ok())
            .map(|state| state.features),
        None => None,
    };
    let grace_days = control_plane.config().stripe.as_ref().map_or(DEFAULT_GRACE_DAYS, |config| config.grace_days);
    let period_start = period_bound(subscription, "current_period_start");
    let period_end = period_bound(subscription, "current_period_end");
    let event_time = inbound.occurred_at_ms.div_euclid(1000);
    let mut suspended_account = previous_state.suspended_account;
    {
        let license = object_license(&mut after, &license_id);
        license.plan = plan;
        license.addons = addons;
        license.seats = seats;
        license.cancelled = false;
        license.starts_at = number(subscription, &["start_date"]).or(license.starts_at);
        license.trial = status == "trialing";
        if let Some(features) = entitlement_features {
            license.overrides.add_features = features;
        }
        match status {
            "trialing" => {
                license.expires_at = number(subscription, &["trial_end"]).or(period_end);
                license.grace_days = 0;
            }
            "active" => {
                license.expires_at = period_end;
                license.grace_days = grace_days;
            }
            "past_due" => {
                // The new period's invoice is unpaid: paid through the period's start.
                license.expires_at = period_start.or(period_end).or(Some(event_time));
                license.grace_days = grace_days;
            }
            "canceled" | "incomplete_expired" => {
                license.expires_at = number(subscription, &["ended_at"])
                    .or_else(|| number(subscription, &["canceled_at"]))
                    .or(period_end)
                    .or(Some(event_time));
                license.grace_days = 0;
                license.trial = false;
            }
            "unpaid" | "paused" => {}
            other => {
                return Ok(unmapped(Some(&account), format!("subscription status `{other}` is not one Tollgate knows")));
            }
        }
    }
    match status {
        "unpaid" | "paused" if after.status == AccountState::Active => {
            after.status = AccountState::Suspended;
            suspended_account = true;
        }
        "unpaid" | "paused" => {}
        _ if suspended_account => {
            after.status = AccountState::Active;
            suspended_account = false;
        }
        _ => {}
    }
    Ok(Mapping::Change {
        account: account.clone(),
        after,
        license: Some(license_id),
        object: Some((subscription_id.to_string(), state_of(suspended_account))),
    })
}

fn invoice_paid(control_plane: &ControlPlane, transaction: &mut dyn Transaction, invoice: &Value) -> Result<Mapping, ApiError> {
    let Some(subscription_id) = invoice_subscription(invoice) else {
        return Ok(Mapping::Ignored { reason: "the invoice pays no subscription".into(), object: None });
    };
    let Some(object) = transaction.integration_object(System::Stripe.as_str(), subscription_id)? else {
        return Ok(unmapped(
            None,
            format!("subscription `{subscription_id}` is not known yet: no subscription event for it has been applied"),
        ));
    };
    let state: SubscriptionState = serde_json::from_str(&object.state).unwrap_or_default();
    if state.status == "canceled" {
        return Ok(Mapping::Stale { account: Some(object.account), reason: format!("subscription `{subscription_id}` was canceled") });
    }
    let lines = invoice.get("lines").and_then(|lines| lines.get("data")).and_then(Value::as_array);
    let paid_through = lines
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|line| number(line, &["period", "end"]))
        .max()
        .or_else(|| number(invoice, &["period_end"]));
    let Some(paid_through) = paid_through else {
        return Ok(unmapped(Some(&object.account), "the invoice says no period end".into()));
    };
    let license_id = license_id_for(System::Stripe, subscription_id).unwrap_or_default();
    let Some(mut after) = transaction.account(&object.account)? else {
        return Ok(unmapped(Some(&object.account), format!("account `{}` does not exist", object.account)));
    };
    let Some(license) = after.licenses.iter_mut().find(|license| license.id == license_id) else {
        return Ok(unmapped(Some(&object.account), format!("license `{license_id}` does not exist")));
    };
    license.expires_at = Some(license.expires_at.map_or(paid_through, |current| current.max(paid_through)));
    let grace_days = control_plane.config().stripe.as_ref().map_or(DEFAULT_GRACE_DAYS, |config| config.grace_days);
    license.grace_days = grace_days;
    // Payment does not say which status the subscription is in now; its next event will.
    Ok(Mapping::Change { account: object.account.clone(), after, license: Some(license_id), object: None })
}

fn entitlements(
    control_plane: &ControlPlane,
    transaction: &mut dyn Transaction,
    inbound: &Inbound,
    summary: &Value,
) -> Result<Mapping, ApiError> {
    let Some(customer) = id_of(summary.get("customer")) else {
        return Ok(unmapped(None, "the entitlement summary names no customer".into()));
    };
    let Some(account) = transaction.integration_link(System::Stripe.as_str(), customer)? else {
        return Ok(unmapped(None, format!("no account: link the customer with `PUT /v1/integrations/links/stripe/{customer}`")));
    };
    let key = entitlement_key(customer);
    let previous = transaction.integration_object(System::Stripe.as_str(), &key)?;
    if is_older(previous.as_ref(), inbound.occurred_at_ms) {
        return Ok(Mapping::Stale { account: Some(account), reason: "a newer entitlement summary was applied already".into() });
    }
    let entries = summary.get("entitlements").and_then(|list| list.get("data")).and_then(Value::as_array);
    let mut features = Vec::new();
    for entry in entries.map(Vec::as_slice).unwrap_or_default() {
        let lookup_key = text(entry, &["lookup_key"]).unwrap_or("");
        if !control_plane.catalog_data.feature_index.contains_key(lookup_key) {
            return Ok(unmapped(Some(&account), format!("entitlement lookup key `{lookup_key}` names no feature of the catalog")));
        }
        if !features.iter().any(|feature| feature == lookup_key) {
            features.push(lookup_key.to_string());
        }
    }
    features.sort();
    let object = ObjectState {
        account: account.clone(),
        last_event_id: inbound.event_id.clone(),
        last_occurred_at_ms: inbound.occurred_at_ms,
        state: serde_json::to_string(&EntitlementState { features: features.clone() }).unwrap_or_default(),
    };
    let mut after = account_or_new(transaction, &account)?;
    let mut touched = false;
    for license in after.licenses.iter_mut().filter(|license| license.id.starts_with("stripe:")) {
        license.overrides.add_features = features.clone();
        touched = true;
    }
    if !touched {
        return Ok(Mapping::Ignored {
            reason: "the customer has no Stripe subscription yet; its entitlements apply when one arrives".into(),
            object: Some((key, object)),
        });
    }
    Ok(Mapping::Change { account, after, license: None, object: Some((key, object)) })
}

/// Verifies and receives one Stripe webhook request.
pub fn receive(control_plane: &ControlPlane, signature: Option<&str>, body: &[u8]) -> Result<super::Received, ApiError> {
    let Some(config) = control_plane.config().stripe.as_ref() else {
        return Err(ApiError::not_found(
            "integration_disabled",
            "Stripe webhooks are not enabled: start the control plane with `--stripe-webhook-secret-file`",
        ));
    };
    verify(config, signature, body, control_plane.now())?;
    let inbound = parse_event(body)?;
    super::receive(control_plane, &inbound, |control_plane, transaction| map(control_plane, transaction, &inbound))
}
