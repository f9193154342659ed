//! Inbound integrations: payment and CRM systems whose webhooks become changes to accounts.
//! Each system verifies its own signature scheme and maps its own payloads (`stripe`,
//! `hubspot`); what they share is here: every event is recorded once, forever, keyed by the
//! system's event id (a replay changes nothing), the last event applied to each external
//! object (a subscription, a deal) guards against an older event undoing a newer one, and an
//! event that cannot be mapped yet is kept as `unmapped` (answered 2xx, so the sender stops
//! retrying), listed, counted, and applied again on request once the mapping exists. An
//! applied event is an order in the audit trail whose id is the event id.

pub mod hubspot;
pub mod stripe;

use std::path::Path;

use sha2::{Digest, Sha256};

use super::integration_store::{EventStatus, Link, ObjectState, StoredEvent};
use super::store::{self, AccountDoc, AccountState, LicenseDoc, NewAudit, OrderRecord, Transaction};
use super::{ApiError, Caller, ControlPlane, accounts, changes};

wire_enum! {
    /// The systems events come from.
    pub enum System in "source" {
        Stripe = "stripe",
        HubSpot = "hubspot",
    }
}

/// Longest secret file read: secrets are tens of bytes, a few during rotation.
const MAX_SECRET_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("secret file `{0}` is not a regular file of at most 64 KiB")]
    NotASecretFile(String),
    #[error("secret file `{0}` holds no secret (one per line)")]
    Empty(String),
}

/// The non-empty lines of a secret file, trimmed: several lines are several secrets, all
/// accepted, which is how a secret is rotated without a gap.
pub fn read_secrets(path: &Path) -> Result<Vec<Vec<u8>>, SecretError> {
    let display = path.display().to_string();
    let metadata = std::fs::metadata(path).map_err(|source| SecretError::Read { path: display.clone(), source })?;
    if !metadata.is_file() || metadata.len() > MAX_SECRET_FILE {
        return Err(SecretError::NotASecretFile(display));
    }
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read { path: display.clone(), source })?;
    let secrets: Vec<Vec<u8>> = text.lines().map(str::trim).filter(|line| !line.is_empty()).map(|line| line.as_bytes().to_vec()).collect();
    if secrets.is_empty() {
        return Err(SecretError::Empty(display));
    }
    Ok(secrets)
}

/// Why a webhook request was refused before anything was recorded: each a 400 with this code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    #[error("the `{header}` header is malformed: {reason}")]
    MalformedHeader { header: &'static str, reason: String },
    #[error("the signature does not match the body with any configured secret")]
    BadSignature,
    #[error("the signature's timestamp is {0} s away from now, more than the tolerance allows")]
    StaleTimestamp(i64),
    #[error("the body is not a valid event: {0}")]
    MalformedEvent(String),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::MissingHeader(_) => "missing_signature",
            Refusal::MalformedHeader { .. } => "malformed_signature",
            Refusal::BadSignature => "bad_signature",
            Refusal::StaleTimestamp(_) => "stale_timestamp",
            Refusal::MalformedEvent(_) => "malformed_event",
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        ApiError::BadRequest { code: refusal.code(), message: refusal.to_string() }
    }
}

/// One event as it arrived, before mapping.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub system: System,
    pub event_id: String,
    pub event_type: String,
    /// The external object the event is about (subscription, deal), when it names one.
    pub object_id: Option<String>,
    /// Unix milliseconds, as the sender stamped the event.
    pub occurred_at_ms: i64,
    /// The event's own JSON, kept to apply it again later.
    pub payload: String,
}

/// What an event maps to.
#[derive(Debug)]
pub enum Mapping {
    /// Set `account` to `after` and remember the object's new state.
    Change { account: String, after: AccountDoc, license: Option<String>, object: Option<(String, ObjectState)> },
    /// Kept to be applied again once the mapping exists; the reason says what is missing.
    Unmapped { account: Option<String>, reason: String },
    /// Older than what was applied to the same object.
    Stale { account: Option<String>, reason: String },
    /// Linked an external id to an account (applied, without changing the account).
    Linked { account: String, reason: String },
    /// Changes nothing (a type or stage Tollgate does not map); may still update the object's
    /// record.
    Ignored { reason: String, object: Option<(String, ObjectState)> },
}

/// The answer to an inbound event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Received {
    pub event_id: String,
    pub status: EventStatus,
    /// The event was received before: nothing was done again.
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Received {
    fn of(event: &StoredEvent, duplicate: bool) -> Received {
        Received {
            event_id: event.event_id.clone(),
            status: event.status,
            duplicate,
            account: event.account.clone(),
            revision: event.revision,
            reason: event.reason.clone(),
        }
    }
}

/// The key id audit entries of inbound events carry: the system, as no API key was used.
fn actor(system: System) -> String {
    format!("integration:{}", system.as_str())
}

/// The order id an applied event is recorded under: Stripe's event ids are globally unique
/// and used as they are; other systems' are prefixed with the system's name.
fn order_id(inbound: &Inbound) -> String {
    match inbound.system {
        System::Stripe => inbound.event_id.clone(),
        system => format!("{}:{}", system.as_str(), inbound.event_id),
    }
}

/// Maps and applies one event inside `transaction`, recording it whatever the outcome. A
/// change the policy compiler refuses (too many seats in use, ...) is kept as unmapped with
/// the compiler's words, so it can be applied once the account allows it.
fn apply(
    control_plane: &ControlPlane,
    transaction: &mut dyn Transaction,
    inbound: &Inbound,
    mapping: Mapping,
    received_at: i64,
) -> Result<StoredEvent, ApiError> {
    let mut event = StoredEvent {
        seq: 0,
        source: inbound.system.as_str().to_string(),
        event_id: inbound.event_id.clone(),
        event_type: inbound.event_type.clone(),
        object_id: inbound.object_id.clone(),
        occurred_at_ms: inbound.occurred_at_ms,
        received_at,
        status: EventStatus::Applied,
        reason: None,
        account: None,
        revision: None,
        payload: inbound.payload.clone(),
    };
    match mapping {
        Mapping::Change { account, after, license, object } => {
            event.account = Some(account.clone());
            match accounts::compile_one(&control_plane.catalog, &account, &after) {
                Err(messages) => {
                    event.status = EventStatus::Unmapped;
                    event.reason = Some(format!("the account would break a policy rule: {}", messages.join("; ")));
                }
                Ok(_) => {
                    let before = transaction.account(&account)?;
                    transaction.put_account(&account, &after)?;
                    let revision = transaction.next_revision()?;
                    let order_id = order_id(inbound);
                    transaction.audit(&NewAudit {
                        at: received_at,
                        key_id: &actor(inbound.system),
                        action: &format!("order.{}", inbound.system.as_str()),
                        account: Some(&account),
                        target: Some(&order_id),
                        before: before.as_ref().map(|doc| serde_json::to_value(doc).unwrap_or_default()),
                        after: Some(serde_json::to_value(&after).unwrap_or_default()),
                    })?;
                    let result =
                        changes::OrderResult { order_id: order_id.clone(), account: account.clone(), license_id: license, revision };
                    let response =
                        serde_json::to_string(&result).map_err(|source| store::StoreError::Document { id: order_id.clone(), source })?;
                    let body_sha256 = hex::encode(Sha256::digest(inbound.payload.as_bytes()));
                    if transaction.order(&order_id)?.is_none() {
                        transaction.put_order(&order_id, &OrderRecord { body_sha256, response }, received_at)?;
                    }
                    if let Some((object_id, state)) = object {
                        transaction.put_integration_object(inbound.system.as_str(), &object_id, &state)?;
                    }
                    let data = serde_json::json!({
                        "order_id": order_id,
                        "action": inbound.system.as_str(),
                        "account": account,
                        "license_id": result.license_id,
                        "revision": revision,
                        "order": {"source": inbound.system.as_str(), "event_id": inbound.event_id, "type": inbound.event_type},
                    });
                    super::webhooks::enqueue_once(
                        transaction,
                        super::webhooks::EventType::OrderApplied,
                        &format!("order.applied/{order_id}"),
                        data,
                        received_at,
                    )?;
                    event.revision = Some(revision);
                }
            }
        }
        Mapping::Linked { account, reason } => {
            event.account = Some(account);
            event.reason = Some(reason);
        }
        Mapping::Unmapped { account, reason } => {
            event.status = EventStatus::Unmapped;
            event.account = account;
            event.reason = Some(reason);
        }
        Mapping::Stale { account, reason } => {
            event.status = EventStatus::Stale;
            event.account = account;
            event.reason = Some(reason);
        }
        Mapping::Ignored { reason, object } => {
            event.status = EventStatus::Ignored;
            event.reason = Some(reason);
            if let Some((object_id, state)) = object {
                event.account = Some(state.account.clone());
                transaction.put_integration_object(inbound.system.as_str(), &object_id, &state)?;
            }
        }
    }
    if event.status == EventStatus::Unmapped {
        let data = serde_json::json!({
            "source": event.source,
            "event_id": event.event_id,
            "type": event.event_type,
            "object_id": event.object_id,
            "account": event.account,
            "reason": event.reason,
        });
        let dedup_key = format!("integration.event_unmapped/{}/{}", event.source, event.event_id);
        super::webhooks::enqueue_once(transaction, super::webhooks::EventType::IntegrationEventUnmapped, &dedup_key, data, received_at)?;
    }
    transaction.put_integration_event(&event)?;
    Ok(event)
}

/// Maps an event with `map` and applies it, once: an event id seen before answers what it
/// answered then. Publishes the change, counts the outcome.
pub fn receive(
    control_plane: &ControlPlane,
    inbound: &Inbound,
    mut map: impl FnMut(&ControlPlane, &mut dyn Transaction) -> Result<Mapping, ApiError>,
) -> Result<Received, ApiError> {
    let now = control_plane.now();
    let (received, revision) = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        if let Some(existing) = transaction.integration_event(inbound.system.as_str(), &inbound.event_id)? {
            return Ok::<_, ApiError>((Received::of(&existing, true), None));
        }
        let mapping = map(control_plane, transaction)?;
        let event = apply(control_plane, transaction, inbound, mapping, now)?;
        Ok((Received::of(&event, false), event.revision))
    })?;
    finish(control_plane, inbound.system, &received, revision);
    Ok(received)
}

fn finish(control_plane: &ControlPlane, system: System, received: &Received, revision: Option<u64>) {
    let outcome = if received.duplicate { "duplicate" } else { received.status.as_str() };
    control_plane.metrics.integration_event(system.as_str(), outcome);
    if let Some(revision) = revision {
        control_plane.publisher.committed(revision);
        control_plane.webhook_wake.notify_one();
    }
    if !received.duplicate && received.status == EventStatus::Unmapped {
        control_plane.webhook_wake.notify_one();
        tracing::warn!(
            source = system.as_str(),
            event = received.event_id,
            reason = received.reason.as_deref().unwrap_or_default(),
            "integration event could not be mapped; kept to apply again"
        );
    }
}

/// `POST /v1/integrations/events/{seq}/apply`: maps a kept event again, now that its account
/// link, price or stage may exist. Only unmapped events can be applied again.
pub fn reapply(control_plane: &ControlPlane, caller: &Caller, seq: i64) -> Result<Received, ApiError> {
    caller.require_unbound()?;
    let event = control_plane
        .repository
        .integration_event_by_seq(seq)?
        .ok_or_else(|| ApiError::not_found("unknown_event", format!("no integration event `{seq}`")))?;
    if event.status != EventStatus::Unmapped {
        return Err(ApiError::Conflict(format!(
            "event `{}` is {}; only unmapped events can be applied again",
            event.event_id, event.status
        )));
    }
    let system = System::parse(&event.source).ok_or(ApiError::Internal)?;
    let inbound = match system {
        System::Stripe => stripe::parse_event(event.payload.as_bytes())?,
        System::HubSpot => hubspot::parse_stored(&event.payload)?,
    };
    let now = control_plane.now();
    let (received, revision) = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        // Applied meanwhile by another request: answer what it is now.
        let current = transaction.integration_event(&event.source, &event.event_id)?.ok_or(ApiError::Internal)?;
        if current.status != EventStatus::Unmapped {
            return Ok::<_, ApiError>((Received::of(&current, true), None));
        }
        let mapping = match system {
            System::Stripe => stripe::map(control_plane, transaction, &inbound)?,
            System::HubSpot => hubspot::map(control_plane, transaction, &inbound)?,
        };
        let applied = apply(control_plane, transaction, &inbound, mapping, now)?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action: "integration.reapply",
            account: applied.account.as_deref(),
            target: Some(&event.event_id),
            before: None,
            after: Some(serde_json::json!({"status": applied.status, "reason": applied.reason})),
        })?;
        Ok((Received::of(&applied, false), applied.revision))
    })?;
    finish(control_plane, system, &received, revision);
    Ok(received)
}

/// `PUT /v1/integrations/links/{source}/{external_id}` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    pub account: String,
}

fn parse_system(source: &str) -> Result<System, ApiError> {
    System::parse(source).ok_or_else(|| {
        ApiError::not_found(
            "unknown_source",
            format!("`{source}` is not an integration; the integrations are {}", System::NAMES.join(", ")),
        )
    })
}

fn check_external_id(external_id: &str) -> Result<(), ApiError> {
    if external_id.is_empty() || external_id.len() > 255 || external_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(format!("external id `{external_id}` must be 1 to 255 characters without spaces")));
    }
    Ok(())
}

/// Links a Stripe customer or a HubSpot deal to an account, audited.
pub fn put_link(control_plane: &ControlPlane, caller: &Caller, source: &str, external_id: &str, body: &[u8]) -> Result<Link, ApiError> {
    let system = parse_system(source)?;
    check_external_id(external_id)?;
    let link: LinkBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    if !changes::valid_id(&link.account) {
        return Err(ApiError::invalid(format!("`account` value `{}` is not a valid account id", link.account)));
    }
    caller.may_touch(&link.account)?;
    let now = control_plane.now();
    let link = Link { source: system.as_str().to_string(), external_id: external_id.to_string(), account: link.account, created_at: now };
    store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let before = transaction.integration_link(system.as_str(), external_id)?;
        transaction.put_integration_link(&link)?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action: "integration.link",
            account: Some(&link.account),
            target: Some(&format!("{}:{external_id}", system.as_str())),
            before: before.map(|account| serde_json::json!({"account": account})),
            after: Some(serde_json::json!({"account": link.account})),
        })?;
        Ok::<_, ApiError>(())
    })?;
    Ok(link)
}

/// Removes a link, audited.
pub fn delete_link(control_plane: &ControlPlane, caller: &Caller, source: &str, external_id: &str) -> Result<serde_json::Value, ApiError> {
    let system = parse_system(source)?;
    caller.require_unbound()?;
    let now = control_plane.now();
    store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let Some(account) = transaction.integration_link(system.as_str(), external_id)? else {
            return Err(ApiError::not_found("unknown_link", format!("`{source}` id `{external_id}` is linked to no account")));
        };
        transaction.delete_integration_link(system.as_str(), external_id)?;
        transaction.audit(&NewAudit {
            at: now,
            key_id: &caller.key_id,
            action: "integration.unlink",
            account: Some(&account),
            target: Some(&format!("{}:{external_id}", system.as_str())),
            before: Some(serde_json::json!({"account": account})),
            after: None,
        })?;
        Ok(())
    })?;
    Ok(serde_json::json!({"source": system.as_str(), "external_id": external_id, "deleted": true}))
}

/// The license an external object owns in an account (`stripe:sub_...`, `hubspot:123`),
/// created when absent.
fn object_license<'a>(account: &'a mut AccountDoc, license_id: &str) -> &'a mut LicenseDoc {
    let position = match account.licenses.iter().position(|license| license.id == license_id) {
        Some(position) => position,
        None => {
            account.licenses.push(LicenseDoc { id: license_id.to_string(), seats: 1, ..LicenseDoc::default() });
            account.licenses.len() - 1
        }
    };
    // `position` is in range: found above, or the license just pushed.
    #[expect(clippy::indexing_slicing, reason = "the index was found or pushed just above")]
    &mut account.licenses[position]
}

/// The account to change, or a new one.
fn account_or_new(transaction: &mut dyn Transaction, account: &str) -> Result<AccountDoc, ApiError> {
    Ok(transaction.account(account)?.unwrap_or_else(|| AccountDoc {
        next_license: 1,
        status: AccountState::Active,
        ..AccountDoc::default()
    }))
}

/// The license id an external object owns, or why it cannot have one.
fn license_id_for(system: System, object_id: &str) -> Result<String, String> {
    let id = format!("{}:{object_id}", system.as_str());
    if changes::valid_id(&id) {
        Ok(id)
    } else {
        Err(format!("`{object_id}` cannot name a license: ids are at most 128 letters, digits, `-`, `_`, `.`, `:` or `@`"))
    }
}

/// Whether the last event applied to an object is newer than one that happened at
/// `occurred_at_ms`: equal times (Stripe stamps whole seconds) are applied in arrival order.
fn is_older(object: Option<&ObjectState>, occurred_at_ms: i64) -> bool {
    object.is_some_and(|object| occurred_at_ms < object.last_occurred_at_ms)
}
