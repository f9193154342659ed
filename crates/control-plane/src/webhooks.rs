//! Threshold webhooks: the configuration (`--webhook-url`, `--webhook-secret-file`), the
//! notification body and its HMAC-SHA256 signature, and the background task that delivers the
//! outbox. Notifications are enqueued by ingestion in its own transaction (`ingest`), so each
//! crossing is in the outbox exactly once and survives restarts; delivery is at least once (an
//! attempt cut short by shutdown is tried again), so receivers should key on (account, meter,
//! period_start, threshold) or the `x-tollgate-delivery` header. Plain HTTP only: TLS needs a
//! local proxy.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use sha2::Sha256;
use tollgate_http::backoff;
use tollgate_http::client::{HttpClient, HttpUrl};

use super::ControlPlane;
use super::store::StoreError;
use super::usage_store::{Delivery, DeliveryStatus, DeliveryUpdate};
use tollgate_core::period::format_rfc3339;

/// Attempts before a notification is marked failed.
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
/// Notifications taken from the outbox at a time.
const DUE_BATCH: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("`--webhook-url` value `{0}` must look like http://HOST:PORT/PATH (https is not supported; use a local TLS proxy)")]
    Url(String),
    #[error("cannot read webhook secret file `{path}`: {source}")]
    SecretFile { path: String, source: std::io::Error },
    #[error("webhook secret file `{0}` is empty")]
    EmptySecret(String),
    #[error("the webhook secret must not be empty")]
    NoSecret,
}

/// Where notifications go and the secret that signs them.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: HttpUrl,
    secret: Vec<u8>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig").field("url", &self.url.to_string()).finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// Parses `http://HOST:PORT[/PATH]`; the secret must not be empty.
    pub fn new(url: &str, secret: Vec<u8>) -> Result<WebhookConfig, WebhookError> {
        let url = HttpUrl::parse(url).map_err(|_| WebhookError::Url(url.to_string()))?;
        if secret.is_empty() {
            return Err(WebhookError::NoSecret);
        }
        Ok(WebhookConfig { url, secret })
    }

    /// Like [`WebhookConfig::new`] with the secret read from a file; surrounding whitespace
    /// (a trailing newline) is not part of it.
    pub fn from_file(url: &str, secret_file: &Path) -> Result<WebhookConfig, WebhookError> {
        let path = secret_file.display().to_string();
        let text = std::fs::read(secret_file).map_err(|source| WebhookError::SecretFile { path: path.clone(), source })?;
        let secret = text.trim_ascii().to_vec();
        if secret.is_empty() {
            return Err(WebhookError::EmptySecret(path));
        }
        WebhookConfig::new(url, secret)
    }

    /// `sha256=HEX` of HMAC-SHA256(secret, "{timestamp}.{body}").
    pub fn signature(&self, timestamp: i64, body: &str) -> String {
        signature(&self.secret, timestamp, body)
    }
}

/// `sha256=HEX` of HMAC-SHA256(`secret`, "{timestamp}.{body}").
pub fn signature(secret: &[u8], timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length, so this cannot fail; an empty MAC would never verify.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a threshold notification says.
#[derive(Debug, Clone, Copy)]
pub struct Threshold<'a> {
    pub account: &'a str,
    pub meter: &'a str,
    pub period_start: i64,
    /// 80 or 100 (percent of the limit).
    pub threshold: u8,
    pub used: u64,
    pub limit: u64,
    pub kind: super::limits::LimitKind,
    pub at: i64,
}

/// The JSON body of a notification, fixed when it is enqueued so every attempt sends the same.
pub fn notification_body(threshold: &Threshold<'_>) -> String {
    serde_json::json!({
        "type": "usage.threshold",
        "account": threshold.account,
        "meter": threshold.meter,
        "period_start": format_rfc3339(threshold.period_start),
        "threshold": threshold.threshold,
        "used": threshold.used,
        "limit": threshold.limit,
        "kind": threshold.kind.as_str(),
        "at": format_rfc3339(threshold.at),
    })
    .to_string()
}

/// The thresholds (percent) `used` has reached against `limit`. A limit of 0 is reached by
/// any use at all.
pub fn reached(used: u64, limit: u64) -> impl Iterator<Item = u8> {
    [80u8, 100].into_iter().filter(move |threshold| used > 0 && u128::from(used) * 100 >= u128::from(limit) * u128::from(*threshold))
}

/// The wait after a failed attempt number `attempts` (1-based): 1 s doubling to 10 min, the
/// upper half jittered so retries from many notifications spread out.
pub fn backoff(attempts: u32) -> Duration {
    backoff::equal_jitter(backoff::ceiling(BACKOFF_START, BACKOFF_MAX, attempts))
}

/// One attempt: `Ok` on a 2xx answer, otherwise what went wrong.
async fn attempt(client: &HttpClient, config: &WebhookConfig, delivery: &Delivery, now: i64) -> Result<(), String> {
    let request = hyper::Request::builder()
        .method("POST")
        .uri(config.url.absolute())
        .header("content-type", "application/json")
        .header("x-tollgate-timestamp", now.to_string())
        .header("x-tollgate-signature", config.signature(now, &delivery.body))
        .header("x-tollgate-delivery", delivery.id.to_string())
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

/// Delivers due notifications until `shutdown` resolves; wakes on `control_plane.webhook_wake`
/// (a new notification), when the next retry is due, or every 30 s. Does nothing without a
/// configured webhook.
pub async fn run(control_plane: Arc<ControlPlane>, shutdown: impl std::future::Future<Output = ()>) {
    let Some(config) = control_plane.config.webhook.clone() else { return };
    let client = HttpClient::new(CONNECT_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let now_ms = control_plane.now_ms();
        let due = repository_call(&control_plane, move |cp| cp.repository.due_deliveries(now_ms, DUE_BATCH)).await;
        let due = due.unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read the webhook outbox");
            Vec::new()
        });
        for delivery in &due {
            let now_ms = control_plane.now_ms();
            let outcome = tokio::select! {
                () = &mut shutdown => return,
                outcome = attempt(&client, &config, delivery, now_ms.div_euclid(1000)) => outcome,
            };
            match &outcome {
                Ok(()) => {
                    tracing::info!(id = delivery.id, account = %delivery.account, threshold = delivery.threshold, "webhook delivered")
                }
                Err(error) => tracing::warn!(id = delivery.id, attempt = delivery.attempts + 1, %error, "webhook delivery failed"),
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
    fn thresholds_are_reached_at_80_and_100_percent() {
        assert_eq!(reached(799, 1000).count(), 0);
        assert_eq!(reached(800, 1000).collect::<Vec<_>>(), [80]);
        assert_eq!(reached(1000, 1000).collect::<Vec<_>>(), [80, 100]);
        assert_eq!(reached(0, 0).count(), 0);
        assert_eq!(reached(1, 0).collect::<Vec<_>>(), [80, 100]);
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
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe"; the message here is "1.{}".
        let expected = {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
            mac.update(b"1.{}");
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        };
        assert_eq!(signature(b"Jefe", 1, "{}"), expected);
        assert_ne!(signature(b"Jefe", 2, "{}"), expected);
    }

    #[test]
    fn failed_attempts_back_off_then_fail() {
        let mut delivery = Delivery {
            id: 1,
            account: "acme".into(),
            meter: "api_calls".into(),
            period_start: 0,
            threshold: 80,
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
