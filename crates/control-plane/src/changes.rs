//! The writes of the integration API: orders, users and groups, devices, overrides and the
//! access-request workflow. Each runs in one repository transaction: load the account, apply
//! the change, validate the whole account with the policy compiler, store it, append to the
//! audit log, reserve the revision that will carry it, and enqueue the webhook messages it
//! causes (`order.applied`, `access_request.*`). An error anywhere writes nothing.
//! Knows nothing about HTTP beyond the error kinds.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::store::{
    self, AccessKind, AccessRequest, AccessStatus, AccountDoc, AccountState, LicenseDoc, NewAudit, OrderRecord, Transaction, UserDoc,
};
use super::webhooks::{self, EventType};
use super::{ApiError, Caller, ControlPlane, accounts};
use tollgate_core::model::SnapshotData;
use tollgate_core::period::{format_rfc3339, parse_rfc3339};

/// The id rules of `policies/README.md`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
}

fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("`{field}` value `{id}` must be 1 to 128 characters of letters, digits, `-`, `_`, `.`, `:` or `@`")))
    }
}

fn parse_time(field: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|text| parse_rfc3339(text).ok_or_else(|| ApiError::invalid(format!("`{field}` value `{text}` is not an RFC 3339 timestamp"))))
        .transpose()
}

fn doc_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// Validates the account with the policy compiler; the messages become a 422.
fn validate(control_plane: &ControlPlane, id: &str, account: &AccountDoc) -> Result<SnapshotData, ApiError> {
    accounts::compile_one(&control_plane.catalog, id, account).map_err(ApiError::Policy)
}

fn plan_rank(catalog: &SnapshotData, plan: &str) -> Option<usize> {
    catalog.plans.iter().position(|candidate| candidate.name == plan)
}

fn check_plan(catalog: &SnapshotData, plan: &str) -> Result<usize, ApiError> {
    plan_rank(catalog, plan).ok_or_else(|| ApiError::invalid(format!("`plan` names unknown plan `{plan}`")))
}

fn check_addons(catalog: &SnapshotData, addons: &[String]) -> Result<(), ApiError> {
    for addon in addons {
        if !catalog.addons.iter().any(|candidate| &candidate.name == addon) {
            return Err(ApiError::invalid(format!("`addons` names unknown add-on `{addon}`")));
        }
    }
    Ok(())
}

fn check_regions(catalog: &SnapshotData, regions: &[String]) -> Result<(), ApiError> {
    for region in regions {
        if !catalog.region_index.contains_key(region) {
            return Err(ApiError::invalid(format!("`regions` names unknown region `{region}`")));
        }
    }
    Ok(())
}

fn check_features(catalog: &SnapshotData, field: &str, features: &[String]) -> Result<(), ApiError> {
    for feature in features {
        if !catalog.feature_index.contains_key(feature) {
            return Err(ApiError::invalid(format!("`{field}` names unknown feature `{feature}`")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orders
// ---------------------------------------------------------------------------------------------

/// `POST /v1/orders` body.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrderBody {
    pub order_id: String,
    pub action: OrderAction,
    pub account: String,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub seats: Option<u32>,
    #[serde(default)]
    pub addons: Option<Vec<String>>,
    #[serde(default)]
    pub starts_at: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    #[serde(default)]
    pub max_devices: Option<u32>,
    /// Which license an upgrade, downgrade, renewal, add-on or cancellation applies to;
    /// default: the account's newest license that is not cancelled.
    #[serde(default)]
    pub license_id: Option<String>,
    #[serde(default)]
    pub grace_days: Option<u32>,
}

wire_enum! {
    /// What an order does to an account.
    pub enum OrderAction in "action" {
        /// A new license (and the account, if it does not exist yet).
        New = "new",
        Upgrade = "upgrade",
        Downgrade = "downgrade",
        Renew = "renew",
        AddOn = "add-on",
        Cancel = "cancel",
        Suspend = "suspend",
        Resume = "resume",
    }
}

/// The wire names of every order action, as `openapi.json` lists them.
pub const ORDER_ACTIONS: &[&str] = OrderAction::NAMES;

/// The answer to an order: the same for its first run and every replay.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderResult {
    pub order_id: String,
    pub account: String,
    pub license_id: Option<String>,
    pub revision: u64,
}

fn target_license<'a>(account: &'a mut AccountDoc, license_id: Option<&str>) -> Result<&'a mut LicenseDoc, ApiError> {
    let found = match license_id {
        Some(id) => account.licenses.iter_mut().find(|license| license.id == id && !license.cancelled),
        None => account.licenses.iter_mut().rev().find(|license| !license.cancelled),
    };
    found.ok_or_else(|| match license_id {
        Some(id) => ApiError::not_found("unknown_license", format!("`license_id` names no active license `{id}`")),
        None => ApiError::Unprocessable(vec!["the account has no license that is not cancelled".into()]),
    })
}

/// Applies an order to an account; returns the license it concerns.
fn apply_order(catalog: &SnapshotData, order: &OrderBody, account: &mut AccountDoc) -> Result<Option<String>, ApiError> {
    let starts_at = parse_time("starts_at", order.starts_at.as_deref())?;
    let expires_at = parse_time("expires_at", order.expires_at.as_deref())?;
    if let Some(addons) = &order.addons {
        check_addons(catalog, addons)?;
    }
    if let Some(regions) = &order.regions {
        check_regions(catalog, regions)?;
    }
    let require_plan =
        || order.plan.as_deref().ok_or_else(|| ApiError::invalid(format!("`plan` is required for action `{}`", order.action)));
    match order.action {
        OrderAction::New => {
            let plan = require_plan()?;
            check_plan(catalog, plan)?;
            let number = account.next_license.max(1);
            account.next_license = number + 1;
            let id = format!("{}-{number}", order.account);
            account.licenses.push(LicenseDoc {
                id: id.clone(),
                plan: plan.to_string(),
                addons: order.addons.clone().unwrap_or_default(),
                seats: order.seats.unwrap_or(1),
                starts_at,
                expires_at,
                grace_days: order.grace_days.unwrap_or(0),
                regions: order.regions.clone(),
                max_devices: order.max_devices,
                cancelled: false,
                overrides: Default::default(),
                trial: false,
            });
            Ok(Some(id))
        }
        action @ (OrderAction::Upgrade | OrderAction::Downgrade) => {
            let plan = require_plan()?;
            let new_rank = check_plan(catalog, plan)?;
            let license = target_license(account, order.license_id.as_deref())?;
            let current_rank = plan_rank(catalog, &license.plan).unwrap_or(0);
            if action == OrderAction::Upgrade && new_rank < current_rank {
                return Err(ApiError::invalid(format!(
                    "`plan` `{plan}` ranks below the license's plan `{}`: use `downgrade`",
                    license.plan
                )));
            }
            if action == OrderAction::Downgrade && new_rank > current_rank {
                return Err(ApiError::invalid(format!("`plan` `{plan}` ranks above the license's plan `{}`: use `upgrade`", license.plan)));
            }
            license.plan = plan.to_string();
            update_terms(license, order, starts_at, expires_at);
            Ok(Some(license.id.clone()))
        }
        OrderAction::Renew => {
            let expires_at = expires_at.ok_or_else(|| ApiError::invalid("`expires_at` is required for action `renew`".to_string()))?;
            if let Some(plan) = &order.plan {
                check_plan(catalog, plan)?;
            }
            let license = target_license(account, order.license_id.as_deref())?;
            if license.expires_at.is_some_and(|current| expires_at <= current) {
                return Err(ApiError::invalid(format!(
                    "`expires_at` {} is not after the license's current expiry {}",
                    format_rfc3339(expires_at),
                    format_rfc3339(license.expires_at.unwrap_or_default())
                )));
            }
            if let Some(plan) = &order.plan {
                license.plan = plan.clone();
            }
            update_terms(license, order, starts_at, Some(expires_at));
            Ok(Some(license.id.clone()))
        }
        OrderAction::AddOn => {
            let addons = order.addons.as_deref().filter(|addons| !addons.is_empty());
            let addons =
                addons.ok_or_else(|| ApiError::invalid("`addons` must name at least one add-on for action `add-on`".to_string()))?;
            let license = target_license(account, order.license_id.as_deref())?;
            for addon in addons {
                if license.addons.contains(addon) {
                    return Err(ApiError::invalid(format!("license `{}` already has add-on `{addon}`", license.id)));
                }
                license.addons.push(addon.clone());
            }
            Ok(Some(license.id.clone()))
        }
        OrderAction::Cancel => {
            let license = target_license(account, order.license_id.as_deref())?;
            license.cancelled = true;
            Ok(Some(license.id.clone()))
        }
        OrderAction::Suspend => {
            account.status = AccountState::Suspended;
            Ok(None)
        }
        OrderAction::Resume => {
            account.status = AccountState::Active;
            Ok(None)
        }
    }
}

/// Fields an upgrade, downgrade or renewal may change besides the plan.
fn update_terms(license: &mut LicenseDoc, order: &OrderBody, starts_at: Option<i64>, expires_at: Option<i64>) {
    if let Some(seats) = order.seats {
        license.seats = seats;
    }
    if let Some(addons) = &order.addons {
        license.addons = addons.clone();
    }
    if starts_at.is_some() {
        license.starts_at = starts_at;
    }
    if expires_at.is_some() {
        license.expires_at = expires_at;
    }
    if order.regions.is_some() {
        license.regions = order.regions.clone();
    }
    if order.max_devices.is_some() {
        license.max_devices = order.max_devices;
    }
    if let Some(grace_days) = order.grace_days {
        license.grace_days = grace_days;
    }
}

/// Processes an order, idempotently on its id: a replay with the same body returns the first
/// answer and changes nothing; the same id with a different body is a conflict.
pub fn order(control_plane: &ControlPlane, caller: &Caller, body: &[u8]) -> Result<OrderResult, ApiError> {
    let order: OrderBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    check_id("order_id", &order.order_id)?;
    check_id("account", &order.account)?;
    caller.may_touch(&order.account)?;
    if let Some(license_id) = &order.license_id {
        check_id("license_id", license_id)?;
    }
    // The canonical body (parsed, then re-encoded with sorted keys) decides what a replay is,
    // so whitespace and key order do not make a conflict.
    let canonical = serde_json::to_value(&order).map_err(|error| ApiError::json(&error))?;
    let body_sha256 = hex::encode(Sha256::digest(canonical.to_string().as_bytes()));
    let catalog = &control_plane.catalog_data;
    let now = control_plane.now();
    store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        if let Some(existing) = transaction.order(&order.order_id)? {
            if existing.body_sha256 != body_sha256 {
                return Err(ApiError::Conflict(format!("order `{}` was already processed with a different body", order.order_id)));
            }
            let first: OrderResult = serde_json::from_str(&existing.response)
                .map_err(|source| store::StoreError::Document { id: order.order_id.clone(), source })?;
            return Ok((first, false));
        }
        let before = transaction.account(&order.account)?;
        let mut account = match (&before, order.action) {
            (Some(account), _) => account.clone(),
            (None, OrderAction::New) => AccountDoc { next_license: 1, ..AccountDoc::default() },
            (None, _) => {
                return Err(ApiError::not_found("unknown_account", format!("`account` names unknown account `{}`", order.account)));
            }
        };
        let license_id = apply_order(catalog, &order, &mut account)?;
        validate(control_plane, &order.account, &account)?;
        transaction.put_account(&order.account, &account)?;
        let revision = transaction.next_revision()?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action: &format!("order.{}", order.action.as_str()),
            account: Some(&order.account),
            target: Some(&order.order_id),
            before: before.as_ref().map(doc_json),
            after: Some(doc_json(&account)),
        })?;
        let result = OrderResult { order_id: order.order_id.clone(), account: order.account.clone(), license_id, revision };
        let response =
            serde_json::to_string(&result).map_err(|source| store::StoreError::Document { id: order.order_id.clone(), source })?;
        transaction.put_order(&order.order_id, &OrderRecord { body_sha256: body_sha256.clone(), response }, now)?;
        // Only a first run gets here (a replay answered above), and the dedup key holds
        // even so: one `order.applied` per order id.
        let data = serde_json::json!({
            "order_id": result.order_id,
            "action": order.action.as_str(),
            "account": result.account,
            "license_id": result.license_id,
            "revision": result.revision,
            // The order as received, without the fields it left out.
            "order": canonical.as_object().map(|fields| fields.iter().filter(|(_, value)| !value.is_null()).map(|(key, value)| (key.clone(), value.clone())).collect::<serde_json::Map<_, _>>()),
        });
        webhooks::enqueue_once(transaction, EventType::OrderApplied, &format!("order.applied/{}", order.order_id), data, now)?;
        Ok((result, true))
    })
    .map(|(result, changed)| {
        if changed {
            control_plane.publisher.committed(result.revision);
            control_plane.webhook_wake.notify_one();
        }
        result
    })
}

// ---------------------------------------------------------------------------------------------
// Users, groups, devices, overrides
// ---------------------------------------------------------------------------------------------

/// A change to one existing account, audited under `action` with `target`; returns the
/// account after the change and the revision that carries it.
fn change_account(
    control_plane: &ControlPlane,
    caller: &Caller,
    account_id: &str,
    action: &str,
    target: &str,
    mut change: impl FnMut(&mut AccountDoc) -> Result<(), ApiError>,
) -> Result<serde_json::Value, ApiError> {
    caller.may_touch(account_id)?;
    let now = control_plane.now();
    let (account, revision) = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let before = transaction
            .account(account_id)?
            .ok_or_else(|| ApiError::not_found("unknown_account", format!("account `{account_id}` does not exist")))?;
        let mut account = before.clone();
        change(&mut account)?;
        validate(control_plane, account_id, &account)?;
        transaction.put_account(account_id, &account)?;
        let revision = transaction.next_revision()?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action,
            account: Some(account_id),
            target: Some(target),
            before: Some(doc_json(&before)),
            after: Some(doc_json(&account)),
        })?;
        Ok::<_, ApiError>((account, revision))
    })?;
    control_plane.publisher.committed(revision);
    Ok(serde_json::json!({"account": account_id, "revision": revision, "state": doc_json(&account)}))
}

/// `PUT /v1/accounts/{id}/users/{user}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "default_true")]
    pub seat: bool,
}

fn default_true() -> bool {
    true
}

/// Creates or replaces a user. Taking a seat past the license's seat count is refused by
/// validation.
pub fn put_user(
    control_plane: &ControlPlane,
    caller: &Caller,
    account_id: &str,
    user_id: &str,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    check_id("user", user_id)?;
    let user: UserBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    for role in &user.roles {
        if !control_plane.catalog_data.roles.iter().any(|candidate| &candidate.name == role) {
            return Err(ApiError::invalid(format!("`roles` names unknown role `{role}`")));
        }
    }
    change_account(control_plane, caller, account_id, "user.put", user_id, |account| {
        for group in &user.groups {
            if !account.groups.contains_key(group) {
                return Err(ApiError::invalid(format!("`groups` names unknown group `{group}` of account `{account_id}`")));
            }
        }
        account.users.insert(user_id.to_string(), UserDoc { roles: user.roles.clone(), groups: user.groups.clone(), seat: user.seat });
        Ok(())
    })
}

pub fn delete_user(control_plane: &ControlPlane, caller: &Caller, account_id: &str, user_id: &str) -> Result<serde_json::Value, ApiError> {
    change_account(control_plane, caller, account_id, "user.delete", user_id, |account| {
        account
            .users
            .remove(user_id)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found("unknown_user", format!("account `{account_id}` has no user `{user_id}`")))
    })
}

/// `PUT /v1/accounts/{id}/groups/{group}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupBody {
    pub roles: Vec<String>,
}

pub fn put_group(
    control_plane: &ControlPlane,
    caller: &Caller,
    account_id: &str,
    group: &str,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    check_id("group", group)?;
    let group_body: GroupBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    for role in &group_body.roles {
        if !control_plane.catalog_data.roles.iter().any(|candidate| &candidate.name == role) {
            return Err(ApiError::invalid(format!("`roles` names unknown role `{role}`")));
        }
    }
    change_account(control_plane, caller, account_id, "group.put", group, |account| {
        account.groups.insert(group.to_string(), group_body.roles.clone());
        Ok(())
    })
}

/// `POST /v1/accounts/{id}/devices` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBody {
    pub device: String,
}

/// Activates a device; past the license's device limit validation refuses it.
pub fn activate_device(
    control_plane: &ControlPlane,
    caller: &Caller,
    account_id: &str,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let device: DeviceBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    check_id("device", &device.device)?;
    change_account(control_plane, caller, account_id, "device.activate", &device.device.clone(), |account| {
        if account.devices.contains(&device.device) {
            return Err(ApiError::Conflict(format!("device `{}` is already activated", device.device)));
        }
        account.devices.push(device.device.clone());
        account.devices.sort();
        Ok(())
    })
}

pub fn deactivate_device(
    control_plane: &ControlPlane,
    caller: &Caller,
    account_id: &str,
    device: &str,
) -> Result<serde_json::Value, ApiError> {
    change_account(control_plane, caller, account_id, "device.deactivate", device, |account| {
        let before = account.devices.len();
        account.devices.retain(|candidate| candidate != device);
        if account.devices.len() == before {
            return Err(ApiError::not_found("unknown_device", format!("device `{device}` is not activated on account `{account_id}`")));
        }
        Ok(())
    })
}

/// `PUT /v1/accounts/{id}/licenses/{license}/overrides` body: replaces the license's overrides.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverridesBody {
    #[serde(default)]
    pub add_features: Vec<String>,
    #[serde(default)]
    pub remove_features: Vec<String>,
    #[serde(default)]
    pub limits: BTreeMap<String, serde_json::Value>,
}

pub fn put_overrides(
    control_plane: &ControlPlane,
    caller: &Caller,
    account_id: &str,
    license_id: &str,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let overrides: OverridesBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    let catalog = &control_plane.catalog_data;
    check_features(catalog, "add_features", &overrides.add_features)?;
    check_features(catalog, "remove_features", &overrides.remove_features)?;
    let limits = accounts::limits_from_json(&overrides.limits).map_err(ApiError::invalid)?;
    for meter in limits.keys() {
        if !catalog.meter_index.contains_key(meter) {
            return Err(ApiError::invalid(format!("`limits` names unknown meter `{meter}`")));
        }
    }
    change_account(control_plane, caller, account_id, "license.overrides", license_id, |account| {
        let license = target_license(account, Some(license_id))?;
        license.overrides = store::OverridesDoc {
            add_features: overrides.add_features.clone(),
            remove_features: overrides.remove_features.clone(),
            limits: limits.clone(),
        };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Access requests
// ---------------------------------------------------------------------------------------------

/// `POST /v1/access-requests` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRequestBody {
    pub account: String,
    pub user: String,
    pub kind: AccessKind,
    #[serde(default)]
    pub feature: Option<String>,
    #[serde(default)]
    pub addon: Option<String>,
    #[serde(default)]
    pub seats: Option<u32>,
    pub reason: String,
}

const MAX_TEXT: usize = 2_000;

pub fn create_access_request(control_plane: &ControlPlane, caller: &Caller, body: &[u8]) -> Result<AccessRequest, ApiError> {
    let request: AccessRequestBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    check_id("account", &request.account)?;
    check_id("user", &request.user)?;
    caller.may_touch(&request.account)?;
    if request.reason.trim().is_empty() || request.reason.len() > MAX_TEXT {
        return Err(ApiError::invalid(format!("`reason` must be 1 to {MAX_TEXT} bytes")));
    }
    let catalog = &control_plane.catalog_data;
    match request.kind {
        AccessKind::Feature => {
            let feature =
                request.feature.as_deref().ok_or_else(|| ApiError::invalid("`feature` is required for kind `feature`".to_string()))?;
            check_features(catalog, "feature", &[feature.to_string()])?;
        }
        AccessKind::Addon => {
            let addon = request.addon.as_deref().ok_or_else(|| ApiError::invalid("`addon` is required for kind `addon`".to_string()))?;
            check_addons(catalog, &[addon.to_string()])?;
        }
        AccessKind::Seats => {
            if request.seats.is_none_or(|seats| seats == 0) {
                return Err(ApiError::invalid("`seats` (the number of seats to add, > 0) is required for kind `seats`".to_string()));
            }
        }
    }
    let now = control_plane.now();
    let stored = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let account = transaction
            .account(&request.account)?
            .ok_or_else(|| ApiError::not_found("unknown_account", format!("`account` names unknown account `{}`", request.account)))?;
        if !account.users.contains_key(&request.user) {
            return Err(ApiError::not_found(
                "unknown_user",
                format!("`user` names unknown user `{}` of account `{}`", request.user, request.account),
            ));
        }
        let mut stored = AccessRequest {
            id: 0,
            account: request.account.clone(),
            user: request.user.clone(),
            requested_by: caller.key_id.clone(),
            kind: request.kind,
            feature: request.feature.clone(),
            addon: request.addon.clone(),
            seats: request.seats,
            reason: request.reason.clone(),
            status: AccessStatus::Pending,
            decided_by: None,
            comment: None,
            until: None,
            created_at: format_rfc3339(now),
            decided_at: None,
        };
        stored.id = transaction.put_access_request(&stored)?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action: "access_request.create",
            account: Some(&request.account),
            target: Some(&stored.id.to_string()),
            before: None,
            after: Some(doc_json(&stored)),
        })?;
        webhooks::enqueue(transaction, EventType::AccessRequestCreated, doc_json(&stored), now)?;
        Ok::<_, ApiError>(stored)
    })?;
    control_plane.webhook_wake.notify_one();
    Ok(stored)
}

/// `POST /v1/access-requests/{id}/approve` and `/deny` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    pub comment: String,
    /// Approval of a feature request only: the grant ends at this instant (it becomes a
    /// separate license that expires then).
    #[serde(default)]
    pub until: Option<String>,
}

/// Approves or denies a pending access request. The requester can never decide their own
/// request. Approval grants what was asked and republishes.
pub fn decide_access_request(
    control_plane: &ControlPlane,
    caller: &Caller,
    id: i64,
    approve: bool,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let decision: DecisionBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    if decision.comment.trim().is_empty() || decision.comment.len() > MAX_TEXT {
        return Err(ApiError::invalid(format!("`comment` must be 1 to {MAX_TEXT} bytes")));
    }
    let until = parse_time("until", decision.until.as_deref())?;
    if !approve && until.is_some() {
        return Err(ApiError::invalid("`until` applies only to an approval".to_string()));
    }
    let now = control_plane.now();
    if until.is_some_and(|until| until <= now) {
        return Err(ApiError::invalid("`until` must be in the future".to_string()));
    }
    let (request, revision) = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let before = transaction
            .access_request(id)?
            .ok_or_else(|| ApiError::not_found("unknown_access_request", format!("no access request `{id}`")))?;
        caller.may_touch(&before.account)?;
        // By person, not by key: a portal user who asked cannot approve it from the console.
        if super::portal::person_of(&before.requested_by) == super::portal::person_of(&caller.key_id) {
            return Err(ApiError::Forbidden("a requester cannot decide their own access request".into()));
        }
        if until.is_some() && before.kind != AccessKind::Feature {
            return Err(ApiError::invalid("`until` applies only to a feature request; seats and add-ons are granted on the license"));
        }
        if before.status != AccessStatus::Pending {
            return Err(ApiError::Conflict(format!("access request `{id}` is already {}", before.status)));
        }
        let mut request = before.clone();
        request.status = if approve { AccessStatus::Approved } else { AccessStatus::Denied };
        request.decided_by = Some(caller.key_id.clone());
        request.comment = Some(decision.comment.clone());
        request.until = until.map(format_rfc3339);
        request.decided_at = Some(format_rfc3339(now));
        let mut revision = None;
        if approve {
            let account_before = transaction
                .account(&request.account)?
                .ok_or_else(|| ApiError::not_found("unknown_account", format!("account `{}` does not exist", request.account)))?;
            let mut account = account_before.clone();
            grant(&mut account, &request, &request.account, until)?;
            validate(control_plane, &request.account, &account)?;
            transaction.put_account(&request.account, &account)?;
            revision = Some(transaction.next_revision()?);
            transaction.audit(&NewAudit {
                at: now,
                key_id: &caller.key_id,
                action: "access_request.grant",
                account: Some(&request.account),
                target: Some(&id.to_string()),
                before: Some(doc_json(&account_before)),
                after: Some(doc_json(&account)),
            })?;
        }
        transaction.put_access_request(&request)?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action: if approve { "access_request.approve" } else { "access_request.deny" },
            account: Some(&request.account),
            target: Some(&id.to_string()),
            before: Some(doc_json(&before)),
            after: Some(doc_json(&request)),
        })?;
        let event_type = if approve { EventType::AccessRequestApproved } else { EventType::AccessRequestDenied };
        webhooks::enqueue(transaction, event_type, doc_json(&request), now)?;
        Ok::<_, ApiError>((request, revision))
    })?;
    if let Some(revision) = revision {
        control_plane.publisher.committed(revision);
    }
    control_plane.webhook_wake.notify_one();
    let mut answer = doc_json(&request);
    if let (Some(object), Some(revision)) = (answer.as_object_mut(), revision) {
        object.insert("revision".into(), revision.into());
    }
    Ok(answer)
}

/// What an approval grants. A feature granted until a date is a separate license on the same
/// plan that adds the feature and expires then, so the snapshot itself ends the grant.
fn grant(account: &mut AccountDoc, request: &AccessRequest, account_id: &str, until: Option<i64>) -> Result<(), ApiError> {
    let base = target_license(account, None)?.clone();
    match request.kind {
        AccessKind::Feature => {
            let feature = request.feature.clone().unwrap_or_default();
            match until {
                None => {
                    let license = target_license(account, None)?;
                    license.overrides.remove_features.retain(|removed| removed != &feature);
                    if !license.overrides.add_features.contains(&feature) {
                        license.overrides.add_features.push(feature);
                    }
                }
                Some(until) => {
                    let number = account.next_license.max(1);
                    account.next_license = number + 1;
                    let mut license = base;
                    license.id = format!("{account_id}-{number}");
                    license.expires_at = Some(license.expires_at.map_or(until, |expires_at| expires_at.min(until)));
                    license.grace_days = 0;
                    license.overrides.remove_features.retain(|removed| removed != &feature);
                    license.overrides.add_features.push(feature);
                    license.addons.clear();
                    account.licenses.push(license);
                }
            }
        }
        AccessKind::Seats => {
            let license = target_license(account, None)?;
            license.seats = license.seats.saturating_add(request.seats.unwrap_or(0));
        }
        AccessKind::Addon => {
            let addon = request.addon.clone().unwrap_or_default();
            let license = target_license(account, None)?;
            if license.addons.contains(&addon) {
                return Err(ApiError::Conflict(format!("license `{}` already has add-on `{addon}`", license.id)));
            }
            license.addons.push(addon);
        }
    }
    Ok(())
}
