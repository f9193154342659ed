//! Outbound webhooks in the Standard Webhooks format (<https://www.standardwebhooks.com>):
//! endpoints managed through the API (and the one `--webhook-url` configures), the message
//! envelope and its signature, enqueueing inside the write transaction that causes an event
//! (the outbox pattern: a rolled-back change sends nothing, a committed one is never lost),
//! the `license.expiring` scan over the expiry index, and the background task that delivers
//! due messages with retries. Delivery is at least once (an attempt cut short by shutdown is
//! tried again); a message keeps its `webhook-id` across retries, so receivers dedup on it.
//! Plain HTTP only: TLS needs a local proxy.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use serde::Deserialize;
use sha2::Sha256;
use tollgate_http::backoff;
use tollgate_http::client::{HttpClient, HttpUrl};

use super::store::{self, NewAudit, Scope, StoreError, Transaction};
use super::webhook_store::{Delivery, DeliveryStatus, DeliveryUpdate, DueDelivery, Endpoint, NewMessage};
use super::{ApiError, Caller, ControlPlane};
use tollgate_core::period::format_rfc3339;

pub use super::webhook_store::EventType;

/// Attempts before a delivery is marked failed.
pub const MAX_ATTEMPTS: u32 = 12;
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// How long one attempt may take, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of a receiver's answer that is read (and dropped).
const MAX_ANSWER: usize = 64 * 1024;
/// Longest sleep between looks at the outbox when nothing wakes the task.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// Deliveries taken from the outbox at a time.
const DUE_BATCH: u32 = 50;
/// Licenses the expiry scan looks at per pass.
const EXPIRY_BATCH: u32 = 500;
/// Default of `--license-expiring-days`.
pub const DEFAULT_LICENSE_EXPIRING_DAYS: u32 = 7;
/// The prefix of a Standard Webhooks secret; base64 of the HMAC key follows.
pub const SECRET_PREFIX: &str = "whsec_";
/// Bytes of a generated secret's key.
const SECRET_BYTES: usize = 32;
/// Key lengths a secret given through the API may have, in bytes (the spec's range).
const SECRET_KEY_LENGTHS: std::ops::RangeInclusive<usize> = 24..=64;
/// The id of the endpoint `--webhook-url` configures.
pub const CONFIGURED_ENDPOINT: &str = "configured";
const MAX_URL: usize = 2048;
const MAX_DESCRIPTION: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("`--webhook-url` value `{0}` must look like http://HOST:PORT/PATH (https is not supported; use a local TLS proxy)")]
    Url(String),
    #[error("cannot read webhook secret file `{path}`: {source}")]
    SecretFile { path: String, source: std::io::Error },
    #[error("webhook secret file `{0}` is empty")]
    EmptySecret(String),
    #[error("webhook secret file `{0}` starts with `whsec_` but the rest is not base64 of a key")]
    BadSecret(String),
    #[error("the webhook secret must not be empty")]
    NoSecret,
}

/// The endpoint `--webhook-url` and `--webhook-secret-file` configure: subscribed to every
/// event type, stored as endpoint `configured` at start.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: HttpUrl,
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig").field("url", &self.url.to_string()).finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// Parses `http://HOST:PORT[/PATH]`; `key` is the raw HMAC key and must not be empty.
    pub fn new(url: &str, key: Vec<u8>) -> Result<WebhookConfig, WebhookError> {
        let url = HttpUrl::parse(url).map_err(|_| WebhookError::Url(url.to_string()))?;
        if key.is_empty() {
            return Err(WebhookError::NoSecret);
        }
        Ok(WebhookConfig { url, key })
    }

    /// Like [`WebhookConfig::new`] with the secret read from a file, surrounding whitespace
    /// (a trailing newline) left out: a `whsec_BASE64` secret is used as Standard Webhooks
    /// libraries read it (the key is the decoded base64); any other text is the raw key.
    pub fn from_file(url: &str, secret_file: &Path) -> Result<WebhookConfig, WebhookError> {
        let path = secret_file.display().to_string();
        let text = std::fs::read(secret_file).map_err(|source| WebhookError::SecretFile { path: path.clone(), source })?;
        let text = text.trim_ascii();
        if text.is_empty() {
            return Err(WebhookError::EmptySecret(path));
        }
        let key = match std::str::from_utf8(text).ok().filter(|text| text.starts_with(SECRET_PREFIX)) {
            Some(secret) => secret_key(secret).ok_or(WebhookError::BadSecret(path))?,
            None => text.to_vec(),
        };
        WebhookConfig::new(url, key)
    }

    /// The secret in `whsec_` form: what a receiver gives its Standard Webhooks library.
    pub fn secret(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.key))
    }
}

/// The HMAC key of a `whsec_BASE64` secret (padding optional); `None` when it is not one.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix(SECRET_PREFIX)?.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded).ok().filter(|key| !key.is_empty())
}

/// A new secret: `whsec_` and the base64 of 32 random bytes.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; SECRET_BYTES];
    getrandom::fill(&mut key)?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
}

fn random_id(prefix: &str) -> Result<String, StoreError> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(StoreError::Random)?;
    Ok(format!("{prefix}{}", hex::encode(bytes)))
}

/// `v1,BASE64` of HMAC-SHA256(`key`, "{id}.{timestamp}.{body}"): the `webhook-signature`.
pub fn signature(key: &[u8], message_id: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length, so this cannot fail; an empty MAC would never verify.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { return String::new() };
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The JSON body of a message, fixed when it is enqueued so every attempt sends the same:
/// `{"type", "timestamp" (RFC 3339), "data"}`.
pub fn envelope(event_type: EventType, data: serde_json::Value, now: i64) -> String {
    serde_json::json!({"type": event_type.as_str(), "timestamp": format_rfc3339(now), "data": data}).to_string()
}

/// Enqueues an event inside the write transaction that causes it, for every enabled endpoint
/// subscribed to `event_type`; it is sent only if that transaction commits. Returns the
/// message id (the `webhook-id` of every attempt), or `None` when no endpoint subscribes. Wake
/// the delivery task after the commit (`control_plane.webhook_wake.notify_one()`); otherwise
/// it finds the message within 30 s.
pub fn enqueue(
    transaction: &mut dyn Transaction,
    event_type: EventType,
    data: serde_json::Value,
    now: i64,
) -> Result<Option<String>, StoreError> {
    enqueue_message(transaction, event_type, None, data, now)
}

/// Like [`enqueue`], at most once ever per `dedup_key` (such as `usage.threshold/ACCOUNT/METER/
/// PERIOD/PERCENT`, or an inbound event's own id): `None` when a message with that key exists.
pub fn enqueue_once(
    transaction: &mut dyn Transaction,
    event_type: EventType,
    dedup_key: &str,
    data: serde_json::Value,
    now: i64,
) -> Result<Option<String>, StoreError> {
    enqueue_message(transaction, event_type, Some(dedup_key), data, now)
}

fn enqueue_message(
    transaction: &mut dyn Transaction,
    event_type: EventType,
    dedup_key: Option<&str>,
    data: serde_json::Value,
    now: i64,
) -> Result<Option<String>, StoreError> {
    if !transaction.has_subscribers(event_type)? {
        return Ok(None);
    }
    let id = random_id("msg_")?;
    let body = envelope(event_type, data, now);
    let n_deliveries = transaction.enqueue_message(&NewMessage { id: &id, event_type, dedup_key, body: &body, created_at: now })?;
    Ok((n_deliveries > 0).then_some(id))
}

/// The thresholds (percent) `used` has reached against `limit`, of a meter's ascending
/// `thresholds`. Past 100 % only a soft limit can be overrun, so thresholds above 100 apply to
/// soft limits only. A limit of 0 is reached by any use at all.
pub fn reached(used: u64, limit: u64, kind: super::limits::LimitKind, thresholds: &[u32]) -> impl Iterator<Item = u32> + '_ {
    thresholds.iter().copied().filter(move |threshold| {
        (*threshold <= 100 || kind == super::limits::LimitKind::Soft)
            && used > 0
            && u128::from(used) * 100 >= u128::from(limit) * u128::from(*threshold)
    })
}

/// The wait after a failed attempt number `attempts` (1-based): 1 s doubling to 10 min, the
/// upper half jittered so retries from many messages spread out.
pub fn backoff(attempts: u32) -> Duration {
    backoff::equal_jitter(backoff::ceiling(BACKOFF_START, BACKOFF_MAX, attempts))
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

/// Stores the endpoint `--webhook-url` configures (subscribed to every event type), or, without
/// one, deletes the one an earlier start stored, failing its pending deliveries.
pub fn configure_endpoint(repository: &dyn store::Repository, config: Option<&WebhookConfig>, now: i64) -> Result<(), StoreError> {
    store::write(repository, |transaction: &mut dyn Transaction| {
        let existing = transaction.webhook_endpoint(CONFIGURED_ENDPOINT)?;
        match config {
            Some(config) => transaction.put_webhook_endpoint(&Endpoint {
                id: CONFIGURED_ENDPOINT.to_string(),
                url: config.url.absolute(),
                event_types: EventType::ALL.to_vec(),
                enabled: true,
                description: Some("set by --webhook-url".into()),
                secret: config.secret(),
                created_at: existing.as_ref().map_or(now, |existing| existing.created_at),
                updated_at: now,
            }),
            None => {
                transaction.delete_webhook_endpoint(CONFIGURED_ENDPOINT, "endpoint deleted: `--webhook-url` is no longer set").map(|_| ())
            }
        }
    })
}

fn default_true() -> bool {
    true
}

/// `POST /v1/webhooks/endpoints` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEndpointBody {
    pub url: String,
    pub event_types: Vec<EventType>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub description: Option<String>,
    /// A `whsec_` secret of the caller's; generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
}

/// `PUT /v1/webhooks/endpoints/{id}` body: fields left out keep their value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointUpdateBody {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub event_types: Option<Vec<EventType>>,
    #[serde(default)]
    pub enabled: Option<bool>,
    /// An empty description removes it.
    #[serde(default)]
    pub description: Option<String>,
}

/// `POST /v1/webhooks/endpoints/{id}/rotate-secret` body (may be empty).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    #[serde(default)]
    pub secret: Option<String>,
}

fn check_url(url: &str) -> Result<(), ApiError> {
    if url.len() > MAX_URL || HttpUrl::parse(url).is_err() {
        return Err(ApiError::invalid(format!(
            "`url` value `{url}` must look like http://HOST:PORT/PATH, at most {MAX_URL} bytes (https is not supported; use a local TLS proxy)"
        )));
    }
    Ok(())
}

fn check_event_types(event_types: &[EventType]) -> Result<Vec<EventType>, ApiError> {
    if event_types.is_empty() {
        return Err(ApiError::invalid(format!("`event_types` must name at least one of {}", EventType::NAMES.join(", "))));
    }
    Ok(EventType::ALL.iter().copied().filter(|event_type| event_types.contains(event_type)).collect())
}

fn check_description(description: Option<String>) -> Result<Option<String>, ApiError> {
    match description {
        Some(text) if text.len() > MAX_DESCRIPTION => {
            Err(ApiError::invalid(format!("`description` must be at most {MAX_DESCRIPTION} bytes")))
        }
        Some(text) if text.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn check_secret(secret: Option<String>) -> Result<String, ApiError> {
    match secret {
        Some(secret) => match secret_key(&secret) {
            Some(key) if SECRET_KEY_LENGTHS.contains(&key.len()) => Ok(secret),
            _ => Err(ApiError::invalid(format!(
                "`secret` must be `whsec_` followed by the base64 of {} to {} random bytes",
                SECRET_KEY_LENGTHS.start(),
                SECRET_KEY_LENGTHS.end()
            ))),
        },
        None => generate_secret().map_err(|error| {
            tracing::error!(%error, "cannot gather randomness for a webhook secret");
            ApiError::Internal
        }),
    }
}

fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.trim_ascii().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))
}

/// An endpoint as the API answers it; the secret only when `with_secret` (creation, rotation).
pub fn endpoint_json(endpoint: &Endpoint, with_secret: bool) -> serde_json::Value {
    let mut json = serde_json::json!({
        "id": endpoint.id,
        "url": endpoint.url,
        "event_types": endpoint.event_types,
        "enabled": endpoint.enabled,
        "description": endpoint.description,
        "configured": endpoint.id == CONFIGURED_ENDPOINT,
        "created_at": format_rfc3339(endpoint.created_at),
        "updated_at": format_rfc3339(endpoint.updated_at),
    });
    if let (true, Some(object)) = (with_secret, json.as_object_mut()) {
        object.insert("secret".into(), endpoint.secret.clone().into());
    }
    json
}

fn unknown_endpoint(id: &str) -> ApiError {
    ApiError::not_found("unknown_endpoint", format!("no webhook endpoint `{id}`"))
}

/// Refuses changes through the API to the endpoint the flags configure: the next start would
/// undo them.
fn check_not_configured(id: &str) -> Result<(), ApiError> {
    if id == CONFIGURED_ENDPOINT {
        return Err(ApiError::Conflict(format!(
            "webhook endpoint `{id}` is set by `--webhook-url` and `--webhook-secret-file`; change those flags instead"
        )));
    }
    Ok(())
}

/// Everything but the secret, for the audit log.
fn audit_json(endpoint: &Endpoint) -> serde_json::Value {
    endpoint_json(endpoint, false)
}

fn audit(
    transaction: &mut dyn Transaction,
    caller: &Caller,
    action: &str,
    id: &str,
    before: Option<&Endpoint>,
    after: Option<&Endpoint>,
    now: i64,
) -> Result<(), StoreError> {
    transaction.audit(&NewAudit {
        at: now,
        key_id: &caller.key_id,
        action,
        account: None,
        target: Some(id),
        before: before.map(audit_json),
        after: after.map(audit_json),
    })
}

/// Endpoints are managed by admin keys only, and span every account.
fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    caller.require(&[Scope::Admin])?;
    caller.require_unbound()
}

/// `POST /v1/webhooks/endpoints`: the new endpoint with its secret, shown this once.
pub fn create_endpoint(control_plane: &ControlPlane, caller: &Caller, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let request: NewEndpointBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    check_url(&request.url)?;
    let now = control_plane.now();
    let endpoint = Endpoint {
        id: random_id("ep_")?,
        url: request.url,
        event_types: check_event_types(&request.event_types)?,
        enabled: request.enabled,
        description: check_description(request.description)?,
        secret: check_secret(request.secret)?,
        created_at: now,
        updated_at: now,
    };
    store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        transaction.put_webhook_endpoint(&endpoint)?;
        audit(transaction, caller, "webhook_endpoint.create", &endpoint.id, None, Some(&endpoint), now)
    })?;
    Ok(endpoint_json(&endpoint, true))
}

/// `GET /v1/webhooks/endpoints`: every endpoint, secrets left out.
pub fn list_endpoints(control_plane: &ControlPlane, caller: &Caller) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let endpoints = control_plane.repository.webhook_endpoints()?;
    Ok(serde_json::json!({"endpoints": endpoints.iter().map(|endpoint| endpoint_json(endpoint, false)).collect::<Vec<_>>()}))
}

/// `GET /v1/webhooks/endpoints/{id}`, the secret left out.
pub fn get_endpoint(control_plane: &ControlPlane, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let endpoints = control_plane.repository.webhook_endpoints()?;
    endpoints.iter().find(|endpoint| endpoint.id == id).map(|endpoint| endpoint_json(endpoint, false)).ok_or_else(|| unknown_endpoint(id))
}

/// `PUT /v1/webhooks/endpoints/{id}`: changes the URL, event types, enabled flag or
/// description. A disabled endpoint's pending deliveries wait until it is enabled again.
pub fn update_endpoint(control_plane: &ControlPlane, caller: &Caller, id: &str, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let update: EndpointUpdateBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    if let Some(url) = &update.url {
        check_url(url)?;
    }
    let event_types = update.event_types.as_deref().map(check_event_types).transpose()?;
    let description = update.description.map(|text| check_description(Some(text))).transpose()?;
    let now = control_plane.now();
    let endpoint = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let before = transaction.webhook_endpoint(id)?.ok_or_else(|| unknown_endpoint(id))?;
        check_not_configured(id)?;
        let mut endpoint = before.clone();
        if let Some(url) = &update.url {
            endpoint.url.clone_from(url);
        }
        if let Some(event_types) = &event_types {
            endpoint.event_types.clone_from(event_types);
        }
        if let Some(enabled) = update.enabled {
            endpoint.enabled = enabled;
        }
        if let Some(description) = &description {
            endpoint.description.clone_from(description);
        }
        endpoint.updated_at = now;
        transaction.put_webhook_endpoint(&endpoint)?;
        audit(transaction, caller, "webhook_endpoint.update", id, Some(&before), Some(&endpoint), now)?;
        Ok::<_, ApiError>(endpoint)
    })?;
    control_plane.webhook_wake.notify_one();
    Ok(endpoint_json(&endpoint, false))
}

/// `DELETE /v1/webhooks/endpoints/{id}`: its pending deliveries become failed.
pub fn delete_endpoint(control_plane: &ControlPlane, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let now = control_plane.now();
    store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let before = transaction.webhook_endpoint(id)?.ok_or_else(|| unknown_endpoint(id))?;
        check_not_configured(id)?;
        transaction.delete_webhook_endpoint(id, "endpoint deleted")?;
        audit(transaction, caller, "webhook_endpoint.delete", id, Some(&before), None, now)?;
        Ok::<_, ApiError>(())
    })?;
    Ok(serde_json::json!({"id": id, "deleted": true}))
}

/// `POST /v1/webhooks/endpoints/{id}/rotate-secret`: the endpoint with its new secret (the
/// body's, or a generated one). Attempts from now on are signed with it.
pub fn rotate_secret(control_plane: &ControlPlane, caller: &Caller, id: &str, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let rotate: RotateBody = parse_body(body)?;
    let secret = check_secret(rotate.secret)?;
    let now = control_plane.now();
    let endpoint = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        let before = transaction.webhook_endpoint(id)?.ok_or_else(|| unknown_endpoint(id))?;
        check_not_configured(id)?;
        let endpoint = Endpoint { secret: secret.clone(), updated_at: now, ..before.clone() };
        transaction.put_webhook_endpoint(&endpoint)?;
        audit(transaction, caller, "webhook_endpoint.rotate_secret", id, Some(&before), Some(&endpoint), now)?;
        Ok::<_, ApiError>(endpoint)
    })?;
    Ok(endpoint_json(&endpoint, true))
}

/// A delivery as `GET /v1/webhooks/deliveries` lists it.
pub fn delivery_json(delivery: &Delivery) -> serde_json::Value {
    let pending = delivery.status == DeliveryStatus::Pending;
    serde_json::json!({
        "id": delivery.id,
        "endpoint_id": delivery.endpoint_id,
        "message_id": delivery.message_id,
        "type": delivery.event_type,
        "status": delivery.status.as_str(),
        "attempts": delivery.attempts,
        "next_attempt_at": pending.then(|| format_rfc3339(delivery.next_attempt_ms.div_euclid(1000))),
        "last_error": delivery.last_error,
        "created_at": format_rfc3339(delivery.created_at),
        "delivered_at": delivery.delivered_at.map(format_rfc3339),
        "message": serde_json::from_str::<serde_json::Value>(&delivery.body).unwrap_or(serde_json::Value::Null),
    })
}

/// `POST /v1/webhooks/deliveries/{id}/retry`: a failed delivery is due again at once, with a
/// fresh round of attempts.
pub fn retry_delivery(control_plane: &ControlPlane, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
    require_admin(caller)?;
    let unknown = || ApiError::not_found("unknown_delivery", format!("no webhook delivery `{id}`"));
    let id: i64 = id.parse().map_err(|_| unknown())?;
    let delivery = control_plane.repository.delivery(id)?.ok_or_else(unknown)?;
    if !control_plane.repository.retry_delivery(id, control_plane.now_ms())? {
        return Err(ApiError::Conflict(format!(
            "webhook delivery `{id}` is {}; only a failed one is retried by hand",
            delivery.status.as_str()
        )));
    }
    control_plane.webhook_wake.notify_one();
    let delivery = control_plane.repository.delivery(id)?.ok_or_else(unknown)?;
    Ok(delivery_json(&delivery))
}

// ---------------------------------------------------------------------------------------------
// license.expiring
// ---------------------------------------------------------------------------------------------

/// Enqueues `license.expiring` for licenses that expire within `--license-expiring-days` of
/// `now` and were not notified yet, from the expiry index (a range scan, however many
/// accounts there are). Each (license, expiry) is notified once; a renewal that moves the
/// expiry is a new date. Returns how many messages were enqueued.
pub fn scan_license_expiries(control_plane: &ControlPlane, now: i64) -> Result<usize, StoreError> {
    let days = control_plane.config.license_expiring_days;
    if days == 0 {
        return Ok(0);
    }
    let until = now.saturating_add(i64::from(days) * 86_400);
    let repository = control_plane.repository.as_ref();
    let mut enqueued = 0;
    for expiry in repository.expiring_licenses(now, until, EXPIRY_BATCH)? {
        let sent = store::write(repository, |transaction: &mut dyn Transaction| {
            let account = transaction.account(&expiry.account)?;
            let license = account.as_ref().and_then(|account| {
                account
                    .licenses
                    .iter()
                    .find(|license| license.id == expiry.license_id && !license.cancelled && license.expires_at == Some(expiry.expires_at))
            });
            let mut sent = None;
            if let Some(license) = license {
                let data = serde_json::json!({
                    "account": expiry.account,
                    "license_id": license.id,
                    "plan": license.plan,
                    "expires_at": format_rfc3339(expiry.expires_at),
                    "days_left": (expiry.expires_at - now + 86_399).div_euclid(86_400),
                });
                let key = format!("license.expiring/{}/{}/{}", expiry.account, license.id, expiry.expires_at);
                sent = enqueue_once(transaction, EventType::LicenseExpiring, &key, data, now)?;
            }
            transaction.mark_expiry_notified(&expiry)?;
            Ok::<_, StoreError>(sent)
        })?;
        enqueued += usize::from(sent.is_some());
    }
    Ok(enqueued)
}

// ---------------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------------

/// One attempt at `now` (unix seconds): `Ok` on a 2xx answer, otherwise what went wrong.
async fn attempt(client: &HttpClient, due: &DueDelivery, now: i64) -> Result<(), String> {
    let url = HttpUrl::parse(&due.url).map_err(|_| format!("endpoint url `{}` is not http://HOST:PORT/PATH", due.url))?;
    let key = secret_key(&due.secret).ok_or_else(|| "the endpoint's secret is not a `whsec_` secret".to_string())?;
    let delivery = &due.delivery;
    let request = hyper::Request::builder()
        .method("POST")
        .uri(url.absolute())
        .header("content-type", "application/json")
        .header("webhook-id", &delivery.message_id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", signature(&key, &delivery.message_id, now, &delivery.body))
        .body(Full::new(Bytes::from(delivery.body.clone())))
        .map_err(|error| format!("cannot build request: {error}"))?;
    let answer = client.send(request, ATTEMPT_TIMEOUT, MAX_ANSWER).await.map_err(|error| error.to_string())?;
    if answer.status.is_success() { Ok(()) } else { Err(format!("receiver answered {}", answer.status.as_u16())) }
}

/// The outcome of an attempt, as the outbox records it.
fn update_after(delivery: &Delivery, outcome: Result<(), String>, now_ms: i64) -> DeliveryUpdate {
    let attempts = delivery.attempts.saturating_add(1);
    match outcome {
        Ok(()) => DeliveryUpdate {
            status: DeliveryStatus::Delivered,
            attempts,
            next_attempt_ms: now_ms,
            last_error: None,
            delivered_at: Some(now_ms.div_euclid(1000)),
        },
        Err(error) => {
            let status = if attempts >= MAX_ATTEMPTS { DeliveryStatus::Failed } else { DeliveryStatus::Pending };
            let delay_ms = i64::try_from(backoff(attempts).as_millis()).unwrap_or(i64::MAX);
            DeliveryUpdate {
                status,
                attempts,
                next_attempt_ms: now_ms.saturating_add(delay_ms),
                last_error: Some(error),
                delivered_at: None,
            }
        }
    }
}

async fn repository_call<T: Send + 'static>(
    control_plane: &Arc<ControlPlane>,
    call: impl FnOnce(&ControlPlane) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    let control_plane = Arc::clone(control_plane);
    match tokio::task::spawn_blocking(move || call(&control_plane)).await {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Scans for expiring licenses and delivers due messages until `shutdown` resolves; wakes on
/// `control_plane.webhook_wake` (a new message, a retry by hand, an endpoint enabled), when the
/// next retry is due, or every 30 s.
pub async fn run(control_plane: Arc<ControlPlane>, shutdown: impl std::future::Future<Output = ()>) {
    let client = HttpClient::new(CONNECT_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let now = control_plane.now();
        if let Err(error) = repository_call(&control_plane, move |cp| scan_license_expiries(cp, now)).await {
            tracing::error!(%error, "cannot scan license expiries");
        }
        let now_ms = control_plane.now_ms();
        let due = repository_call(&control_plane, move |cp| cp.repository.due_deliveries(now_ms, DUE_BATCH)).await;
        let due = due.unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read the webhook outbox");
            Vec::new()
        });
        for due_delivery in &due {
            let delivery = &due_delivery.delivery;
            let now_ms = control_plane.now_ms();
            let outcome = tokio::select! {
                () = &mut shutdown => return,
                outcome = attempt(&client, due_delivery, now_ms.div_euclid(1000)) => outcome,
            };
            match &outcome {
                Ok(()) => {
                    tracing::info!(id = delivery.id, message = %delivery.message_id, endpoint = %delivery.endpoint_id, "webhook delivered")
                }
                Err(error) => {
                    tracing::warn!(id = delivery.id, endpoint = %delivery.endpoint_id, attempt = delivery.attempts + 1, %error, "webhook delivery failed")
                }
            }
            let update = update_after(delivery, outcome, control_plane.now_ms());
            let id = delivery.id;
            if let Err(error) = repository_call(&control_plane, move |cp| cp.repository.update_delivery(id, &update)).await {
                tracing::error!(%error, "cannot record a webhook attempt");
            }
        }
        if due.len() == DUE_BATCH as usize {
            continue;
        }
        let next = repository_call(&control_plane, |cp| cp.repository.next_delivery_ms()).await.ok().flatten();
        let wait =
            next.map_or(IDLE_POLL, |next| Duration::from_millis(u64::try_from(next - control_plane.now_ms()).unwrap_or(0))).min(IDLE_POLL);
        tokio::select! {
            () = &mut shutdown => return,
            () = control_plane.webhook_wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitKind;

    #[test]
    fn parses_http_urls_only() {
        let config = WebhookConfig::new("http://127.0.0.1:9000/hooks/usage", b"s".to_vec()).unwrap();
        assert_eq!(config.url.absolute(), "http://127.0.0.1:9000/hooks/usage");
        assert_eq!(WebhookConfig::new("http://hooks.local:80", b"s".to_vec()).unwrap().url.target(), "/");
        for bad in ["https://hooks.local:443/x", "http://hooks.local/x", "http://:80/x", "ftp://x:1/"] {
            assert!(WebhookConfig::new(bad, b"s".to_vec()).is_err(), "{bad}");
        }
        assert!(matches!(WebhookConfig::new("http://h:1/", Vec::new()), Err(WebhookError::NoSecret)));
    }

    #[test]
    fn secret_files_hold_a_whsec_secret_or_a_raw_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let config = WebhookConfig::from_file("http://h:1/", &file).unwrap();
        assert_eq!(config.secret(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        std::fs::write(&file, "plain-secret\n").unwrap();
        let config = WebhookConfig::from_file("http://h:1/", &file).unwrap();
        assert_eq!(secret_key(&config.secret()).unwrap(), b"plain-secret");
        std::fs::write(&file, "whsec_!!!").unwrap();
        assert!(matches!(WebhookConfig::from_file("http://h:1/", &file), Err(WebhookError::BadSecret(_))));
        std::fs::write(&file, " \n").unwrap();
        assert!(matches!(WebhookConfig::from_file("http://h:1/", &file), Err(WebhookError::EmptySecret(_))));
    }

    #[test]
    fn generated_secrets_are_whsec_base64_of_32_bytes() {
        let secret = generate_secret().unwrap();
        assert!(secret.starts_with("whsec_"), "{secret}");
        assert_eq!(secret_key(&secret).unwrap().len(), 32);
        assert_ne!(secret, generate_secret().unwrap());
    }

    #[test]
    fn thresholds_are_the_meters_and_past_100_only_for_soft_limits() {
        let custom = [75, 90, 100, 120];
        assert_eq!(reached(749, 1000, LimitKind::Soft, &custom).count(), 0);
        assert_eq!(reached(900, 1000, LimitKind::Hard, &custom).collect::<Vec<_>>(), [75, 90]);
        assert_eq!(reached(1300, 1000, LimitKind::Hard, &custom).collect::<Vec<_>>(), [75, 90, 100]);
        assert_eq!(reached(1300, 1000, LimitKind::Soft, &custom).collect::<Vec<_>>(), [75, 90, 100, 120]);
        assert_eq!(reached(0, 0, LimitKind::Hard, &[80, 100]).count(), 0);
        assert_eq!(reached(1, 0, LimitKind::Hard, &[80, 100]).collect::<Vec<_>>(), [80, 100]);
    }

    #[test]
    fn backoff_doubles_to_ten_minutes() {
        for attempts in 1..=MAX_ATTEMPTS {
            let ceiling = Duration::from_secs(1 << (attempts - 1)).min(BACKOFF_MAX);
            let delay = backoff(attempts);
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{attempts}: {delay:?}");
        }
    }

    #[test]
    fn signature_is_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (and its reference libraries).
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_ne!(signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn failed_attempts_back_off_then_fail() {
        let mut delivery = Delivery {
            id: 1,
            message_id: "msg_1".into(),
            endpoint_id: "ep_1".into(),
            event_type: "usage.threshold".into(),
            body: "{}".into(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            created_at: 0,
            delivered_at: None,
        };
        let update = update_after(&delivery, Err("receiver answered 500".into()), 10_000);
        assert_eq!((update.status, update.attempts), (DeliveryStatus::Pending, 1));
        assert!(update.next_attempt_ms >= 10_500 && update.next_attempt_ms <= 11_000, "{update:?}");
        delivery.attempts = MAX_ATTEMPTS - 1;
        assert_eq!(update_after(&delivery, Err("x".into()), 0).status, DeliveryStatus::Failed);
        let delivered = update_after(&delivery, Ok(()), 5_000);
        assert_eq!((delivered.status, delivered.delivered_at), (DeliveryStatus::Delivered, Some(5)));
    }
}
