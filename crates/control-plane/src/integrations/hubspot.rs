//! HubSpot, in: `POST /v1/integrations/hubspot`, the target of a HubSpot app's webhook
//! subscriptions. The `X-HubSpot-Signature-v3` header is checked as HubSpot specifies: base64
//! of HMAC-SHA256, under the app's client secret, of method + URI + body +
//! `X-HubSpot-Request-Timestamp`, the timestamp within five minutes. A request carries a list
//! of events; each `deal.propertyChange` of `dealstage` into a stage of the catalog's
//! `[hubspot.deal_stages]` becomes that order on the license the deal owns in its linked
//! account (`hubspot:DEAL_ID`). Other events are recorded and ignored.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::{Inbound, Mapping, Received, Refusal, System, account_or_new, is_older, license_id_for, object_license};
use crate::integration_store::ObjectState;
use crate::store::{AccountState, Transaction};
use crate::{ApiError, ControlPlane};

/// How far the request timestamp may be from now: HubSpot's documented five minutes.
pub const TOLERANCE_MS: i64 = 5 * 60 * 1000;
/// Most events one request may carry (HubSpot sends up to 100).
pub const MAX_EVENTS: usize = 1000;

/// How HubSpot requests are checked.
#[derive(Clone)]
pub struct HubSpotConfig {
    /// The app's client secrets: several during a rotation.
    secrets: Vec<Vec<u8>>,
    /// The URL HubSpot is configured to call, as HubSpot signs it (`https://cp.example.com/v1/
    /// integrations/hubspot`); without it, `http://` + the `Host` header + the path.
    pub public_url: Option<String>,
}

impl std::fmt::Debug for HubSpotConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSpotConfig").field("secrets", &self.secrets.len()).field("public_url", &self.public_url).finish()
    }
}

impl HubSpotConfig {
    pub fn new(secrets: Vec<Vec<u8>>, public_url: Option<String>) -> HubSpotConfig {
        HubSpotConfig { secrets, public_url }
    }
}

/// HubSpot decodes these percent-encoded characters of the URI before signing.
const DECODED: &[(&str, &str)] = &[
    ("%3A", ":"),
    ("%2F", "/"),
    ("%3F", "?"),
    ("%40", "@"),
    ("%21", "!"),
    ("%24", "$"),
    ("%27", "'"),
    ("%28", "("),
    ("%29", ")"),
    ("%2A", "*"),
    ("%2C", ","),
    ("%3B", ";"),
];

fn signed_uri(uri: &str) -> String {
    let mut decoded = uri.to_string();
    for (encoded, plain) in DECODED {
        decoded = decoded.replace(encoded, plain).replace(&encoded.to_ascii_lowercase(), plain);
    }
    decoded
}

fn mac(secret: &[u8], method: &str, uri: &str, body: &[u8], timestamp: &str) -> Hmac<Sha256> {
    #[expect(clippy::expect_used, reason = "HMAC accepts keys of every length")]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC key of any length");
    mac.update(method.as_bytes());
    mac.update(signed_uri(uri).as_bytes());
    mac.update(body);
    mac.update(timestamp.as_bytes());
    mac
}

/// The `X-HubSpot-Signature-v3` value HubSpot sends for this request: the tests sign with it.
pub fn sign(secret: &[u8], method: &str, uri: &str, body: &[u8], timestamp_ms: i64) -> String {
    STANDARD.encode(mac(secret, method, uri, body, &timestamp_ms.to_string()).finalize().into_bytes())
}

/// Checks the v3 signature and the timestamp's window against `now_ms`.
pub fn verify(
    config: &HubSpotConfig,
    method: &str,
    uri: &str,
    body: &[u8],
    signature: Option<&str>,
    timestamp: Option<&str>,
    now_ms: i64,
) -> Result<(), Refusal> {
    let signature = signature.ok_or(Refusal::MissingHeader("X-HubSpot-Signature-v3"))?;
    let timestamp = timestamp.ok_or(Refusal::MissingHeader("X-HubSpot-Request-Timestamp"))?;
    let timestamp_ms: i64 = timestamp.trim().parse().map_err(|_| Refusal::MalformedHeader {
        header: "X-HubSpot-Request-Timestamp",
        reason: format!("`{timestamp}` is not milliseconds since the epoch"),
    })?;
    let signature = STANDARD
        .decode(signature.trim())
        .map_err(|_| Refusal::MalformedHeader { header: "X-HubSpot-Signature-v3", reason: "not base64".into() })?;
    let matched = config.secrets.iter().any(|secret| mac(secret, method, uri, body, timestamp.trim()).verify_slice(&signature).is_ok());
    if !matched {
        return Err(Refusal::BadSignature);
    }
    let skew_ms = now_ms.saturating_sub(timestamp_ms);
    if skew_ms.abs() > TOLERANCE_MS {
        return Err(Refusal::StaleTimestamp(skew_ms / 1000));
    }
    Ok(())
}

fn event_field(event: &Value, key: &str) -> Option<String> {
    match event.get(key)? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// One event of a HubSpot request as an inbound event; its JSON is kept as the payload.
fn inbound(event: &Value) -> Result<Inbound, Refusal> {
    let event_id = event_field(event, "eventId").ok_or_else(|| Refusal::MalformedEvent("an event has no `eventId`".into()))?;
    if event_id.is_empty() || event_id.len() > 128 || event_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Refusal::MalformedEvent(format!("`eventId` `{event_id}` is not an event id")));
    }
    let event_type = event_field(event, "subscriptionType")
        .ok_or_else(|| Refusal::MalformedEvent(format!("event `{event_id}` has no `subscriptionType`")))?;
    let occurred_at_ms = event
        .get("occurredAt")
        .and_then(Value::as_i64)
        .ok_or_else(|| Refusal::MalformedEvent(format!("event `{event_id}` has no `occurredAt` milliseconds")))?;
    Ok(Inbound {
        system: System::HubSpot,
        event_id,
        event_type,
        object_id: event_field(event, "objectId"),
        occurred_at_ms,
        payload: event.to_string(),
    })
}

/// Parses a request body: a JSON array of events, each with an id, a type and a time.
pub fn parse_events(body: &[u8]) -> Result<Vec<Inbound>, Refusal> {
    let events: Value = serde_json::from_slice(body).map_err(|error| Refusal::MalformedEvent(format!("not JSON: {error}")))?;
    let events = events.as_array().ok_or_else(|| Refusal::MalformedEvent("expected a JSON array of events".into()))?;
    if events.len() > MAX_EVENTS {
        return Err(Refusal::MalformedEvent(format!("{} events in one request; at most {MAX_EVENTS}", events.len())));
    }
    events.iter().map(inbound).collect()
}

/// A stored event's payload as an inbound event again.
pub fn parse_stored(payload: &str) -> Result<Inbound, ApiError> {
    let event: Value = serde_json::from_str(payload).map_err(|error| Refusal::MalformedEvent(error.to_string()))?;
    Ok(inbound(&event)?)
}

/// Maps a HubSpot event, reading links and deal states through `transaction`.
pub fn map(control_plane: &ControlPlane, transaction: &mut dyn Transaction, inbound: &Inbound) -> Result<Mapping, ApiError> {
    let event: Value = serde_json::from_str(&inbound.payload).map_err(|error| Refusal::MalformedEvent(error.to_string()))?;
    let property = event_field(&event, "propertyName");
    if inbound.event_type != "deal.propertyChange" || property.as_deref() != Some("dealstage") {
        return Ok(Mapping::Ignored {
            reason: format!("Tollgate maps `deal.propertyChange` events of `dealstage`, not `{}`", inbound.event_type),
            object: None,
        });
    }
    let Some(deal) = inbound.object_id.clone() else {
        return Ok(Mapping::Unmapped { account: None, reason: "the event names no deal (`objectId`)".into() });
    };
    let stage_id = event_field(&event, "propertyValue").unwrap_or_default();
    let Some(stage) = control_plane.integrations.hubspot_deal_stages.get(&stage_id) else {
        return Ok(Mapping::Ignored {
            reason: format!("deal stage `{stage_id}` is not in the catalog's `[hubspot.deal_stages]`"),
            object: None,
        });
    };
    let Some(account) = transaction.integration_link(System::HubSpot.as_str(), &deal)? else {
        return Ok(Mapping::Unmapped {
            account: None,
            reason: format!("deal `{deal}` is linked to no account: link it with `PUT /v1/integrations/links/hubspot/{deal}`"),
        });
    };
    let previous = transaction.integration_object(System::HubSpot.as_str(), &deal)?;
    if is_older(previous.as_ref(), inbound.occurred_at_ms) {
        return Ok(Mapping::Stale { account: Some(account), reason: format!("a newer stage change of deal `{deal}` was applied already") });
    }
    let license_id = match license_id_for(System::HubSpot, &deal) {
        Ok(id) => id,
        Err(reason) => return Ok(Mapping::Unmapped { account: Some(account), reason }),
    };
    let object = ObjectState {
        account: account.clone(),
        last_event_id: inbound.event_id.clone(),
        last_occurred_at_ms: inbound.occurred_at_ms,
        state: serde_json::json!({"stage": stage_id}).to_string(),
    };
    let mut after = account_or_new(transaction, &account)?;
    let occurred = inbound.occurred_at_ms.div_euclid(1000);
    let has_license = after.licenses.iter().any(|license| license.id == license_id && !license.cancelled);
    match stage.action.as_str() {
        "suspend" => after.status = AccountState::Suspended,
        "resume" => after.status = AccountState::Active,
        "cancel" => {
            if !has_license {
                return Ok(Mapping::Ignored { reason: format!("deal `{deal}` has no license to cancel"), object: Some((deal, object)) });
            }
            object_license(&mut after, &license_id).cancelled = true;
        }
        "add-on" => {
            if !has_license {
                return Ok(Mapping::Unmapped { account: Some(account), reason: format!("deal `{deal}` has no license to add add-ons to") });
            }
            let license = object_license(&mut after, &license_id);
            for addon in &stage.addons {
                if !license.addons.contains(addon) {
                    license.addons.push(addon.clone());
                }
            }
        }
        // new, upgrade, downgrade, renew: the deal's license takes the stage's terms.
        _ => {
            let license = object_license(&mut after, &license_id);
            if !has_license {
                license.starts_at = Some(occurred);
            }
            license.cancelled = false;
            if let Some(plan) = &stage.plan {
                license.plan = plan.clone();
            }
            if !stage.addons.is_empty() {
                license.addons = stage.addons.clone();
            }
            if let Some(seats) = stage.seats {
                license.seats = seats;
            }
            license.expires_at = stage.days.map(|days| occurred.saturating_add(i64::from(days) * 86_400));
            if license.plan.is_empty() {
                return Ok(Mapping::Unmapped {
                    account: Some(account),
                    reason: format!("stage `{stage_id}` names no plan for deal `{deal}`"),
                });
            }
        }
    }
    Ok(Mapping::Change { account, after, license: Some(license_id), object: Some((deal, object)) })
}

/// The answer to a HubSpot request: what became of each event.
#[derive(Debug, serde::Serialize)]
pub struct Answer {
    pub events: Vec<Received>,
}

/// Verifies and receives one HubSpot webhook request.
pub fn receive(
    control_plane: &ControlPlane,
    host: Option<&str>,
    path_and_query: &str,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
) -> Result<Answer, ApiError> {
    let Some(config) = control_plane.config().hubspot.as_ref() else {
        return Err(ApiError::not_found(
            "integration_disabled",
            "HubSpot webhooks are not enabled: start the control plane with `--hubspot-client-secret-file`",
        ));
    };
    let uri = match &config.public_url {
        Some(url) => url.clone(),
        None => format!("http://{}{path_and_query}", host.unwrap_or("localhost")),
    };
    verify(config, "POST", &uri, body, signature, timestamp, control_plane.now_ms())?;
    let events = parse_events(body)?;
    let mut answers = Vec::with_capacity(events.len());
    for inbound in &events {
        answers.push(super::receive(control_plane, inbound, |control_plane, transaction| map(control_plane, transaction, inbound))?);
    }
    Ok(Answer { events: answers })
}
