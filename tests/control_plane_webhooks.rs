//! Outbound webhooks against a real control plane on port 0, on a pinned `ManualClock` that the
//! tests move: endpoint management (validation, scopes, the flag-configured endpoint), each
//! endpoint getting only its event types, signatures checked by the reference Python library
//! of Standard Webhooks (`tests/standardwebhooks_verify.py`), retries that keep the
//! `webhook-id`, a retry by hand, the catalog's custom thresholds once each, `order.applied`
//! once per order id, `license.expiring` once per expiry, access-request events, and a disabled
//! endpoint that gets nothing.
#![allow(clippy::disallowed_methods, reason = "waits on real sockets and processes use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use common::{Client, PINNED_NOW_MS};
use control_plane_support::{TestControlPlane, get, post, send_json};
use tollgate_control_plane::webhooks::{self, WebhookConfig};
use tollgate_core::clock::{Clock, ManualClock};
use tollgate_core::period::format_rfc3339;

const DAY: i64 = 86_400;

/// One request a test receiver got, and the status it answered.
#[derive(Debug, Clone)]
struct Received {
    answered: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

/// An HTTP receiver on 127.0.0.1:0 that answers 500 to the first `n_failures` requests and 200
/// after, recording each. It lives on the test's runtime and ends with it.
async fn receiver(n_failures: usize) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let log = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let log = Arc::clone(&log);
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let log = Arc::clone(&log);
                async move {
                    let headers = request.headers().clone();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let mut log = log.lock().unwrap();
                    let answered = if log.len() < n_failures { 500 } else { 200 };
                    log.push(Received { answered, headers, body });
                    let mut response = hyper::Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = hyper::StatusCode::from_u16(answered).unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        }
    });
    (addr, received)
}

/// A control plane on a manual clock at [`PINNED_NOW_MS`], tuned by `configure`.
async fn start(dir: &std::path::Path, configure: impl FnOnce(&mut tollgate_control_plane::Config)) -> (TestControlPlane, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(PINNED_NOW_MS));
    let configured = Arc::clone(&clock);
    let server = TestControlPlane::start_configured(dir, move |config| {
        config.clock = configured;
        configure(config);
    })
    .await;
    (server, clock)
}

async fn create_endpoint(client: &mut Client, admin: &str, body: &Value) -> Value {
    let reply = post(client, "/v1/webhooks/endpoints", admin, body).await;
    assert_eq!(reply.status, 200, "{body}: {}", reply.text());
    reply.json()
}

async fn deliveries(client: &mut Client, admin: &str) -> Vec<Value> {
    let reply = get(client, "/v1/webhooks/deliveries?limit=1000", admin).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["deliveries"].as_array().unwrap().clone()
}

/// Polls the delivery log until `accept` holds for it, or panics after 30 s.
async fn wait_for(client: &mut Client, admin: &str, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let deliveries = deliveries(client, admin).await;
        if accept(&deliveries) {
            return deliveries;
        }
        assert!(tokio::time::Instant::now() < deadline, "the delivery log did not get there: {deliveries:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_delivered(n: usize) -> impl Fn(&[Value]) -> bool {
    move |deliveries: &[Value]| deliveries.len() == n && deliveries.iter().all(|delivery| delivery["status"] == "delivered")
}

fn header(received: &Received, name: &str) -> String {
    received.headers[name].to_str().unwrap().to_string()
}

/// Verifies every delivery with the Python `standardwebhooks` library, its clock pinned to
/// `now`; answers the parsed bodies.
fn python_verify(now: i64, captured: &[(&str, &Received)]) -> Vec<Value> {
    let deliveries: Vec<Value> = captured
        .iter()
        .map(|(secret, received)| {
            let headers: serde_json::Map<String, Value> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
                .iter()
                .map(|name| (name.to_string(), header(received, name).into()))
                .collect();
            json!({"secret": secret, "headers": headers, "body": String::from_utf8(received.body.to_vec()).unwrap()})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deliveries.json");
    std::fs::write(&file, json!({"now": now, "deliveries": deliveries}).to_string()).unwrap();
    // `output` waits for the process: nothing is left running, whatever the outcome.
    let output = std::process::Command::new("python3")
        .arg(common::repo_root().join("tests/standardwebhooks_verify.py"))
        .arg(&file)
        .output()
        .expect("python3 is needed for the Standard Webhooks interop test (with `python3 -m pip install standardwebhooks`)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "the Python package `standardwebhooks` is missing: python3 -m pip install standardwebhooks\n{stderr}"
    );
    assert!(output.status.success(), "standardwebhooks refused a delivery: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn order(order_id: &str, action: &str, account: &str, extra: Value) -> Value {
    let mut order = json!({"order_id": order_id, "action": action, "account": account});
    order.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    order
}

async fn apply(client: &mut Client, key: &str, order: &Value) {
    let reply = post(client, "/v1/orders", key, order).await;
    assert_eq!(reply.status, 200, "{order}: {}", reply.text());
}

#[tokio::test]
async fn endpoints_are_managed_by_admin_keys_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let configured = WebhookConfig::new("http://127.0.0.1:9/flags", b"raw-secret".to_vec()).unwrap();
    let (server, clock) = start(dir.path(), |config| config.webhook = Some(configured)).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let customer = server.key("account", Some("acme"));
    let mut client = server.client().await;
    let new = json!({"url": "http://127.0.0.1:9000/hooks", "event_types": ["order.applied", "usage.threshold"], "description": "billing"});
    for key in [&integration, &customer] {
        assert_eq!(post(&mut client, "/v1/webhooks/endpoints", key, &new).await.status, 403);
        assert_eq!(get(&mut client, "/v1/webhooks/endpoints", key).await.status, 403);
        assert_eq!(get(&mut client, "/v1/webhooks/endpoints/configured", key).await.status, 403);
        assert_eq!(get(&mut client, "/v1/webhooks/deliveries", key).await.status, 403);
    }

    let created = create_endpoint(&mut client, &admin, &new).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ep_"), "{created}");
    let secret = created["secret"].as_str().unwrap();
    assert_eq!(webhooks::secret_key(secret).map(|key| key.len()), Some(32), "{secret}");
    assert_eq!(created["event_types"], json!(["usage.threshold", "order.applied"]));
    assert_eq!((created["enabled"].as_bool(), created["description"].as_str()), (Some(true), Some("billing")));
    assert_eq!(created["created_at"], format_rfc3339(clock.now()));
    let own_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8G";
    let mine = create_endpoint(
        &mut client,
        &admin,
        &json!({"url": "http://hooks.local:80/", "event_types": ["license.expiring"], "enabled": false, "secret": own_secret}),
    )
    .await;
    assert_eq!((mine["secret"].as_str(), mine["enabled"].as_bool()), (Some(own_secret), Some(false)));

    let refused = [
        (json!({"url": "https://hooks.local:443/x", "event_types": ["order.applied"]}), "`url` value `https://hooks.local:443/x`"),
        (json!({"url": "http://hooks.local/x", "event_types": ["order.applied"]}), "must look like http://HOST:PORT/PATH"),
        (
            json!({"url": "http://h:1/", "event_types": ["order.applied", "order.shipped"]}),
            "`event_types` value `order.shipped` is not one of usage.threshold, order.applied, license.expiring, \
             access_request.created, access_request.approved, access_request.denied, integration.event_unmapped",
        ),
        (json!({"url": "http://h:1/", "event_types": []}), "`event_types` must name at least one of"),
        (json!({"url": "http://h:1/"}), "missing field `event_types`"),
        (json!({"url": "http://h:1/", "event_types": ["order.applied"], "secret": "whsec_c2hvcnQ="}), "`secret` must be `whsec_`"),
        (json!({"url": "http://h:1/", "event_types": ["order.applied"], "secret": "plain"}), "`secret` must be `whsec_`"),
        (json!({"url": "http://h:1/", "event_types": ["order.applied"], "colour": "red"}), "unknown field `colour`"),
        (json!({"url": "http://h:1/", "event_types": ["order.applied"], "description": "x".repeat(501)}), "`description` must be at most"),
    ];
    for (body, message) in &refused {
        let reply = post(&mut client, "/v1/webhooks/endpoints", &admin, body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert!(reply.text().contains(message), "{body}: {}", reply.text());
    }

    let listed = get(&mut client, "/v1/webhooks/endpoints", &admin).await.json()["endpoints"].clone();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|endpoint| endpoint["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{listed}");
    assert!(ids.contains(&"configured") && ids.contains(&id.as_str()), "{listed}");
    assert!(listed.as_array().unwrap().iter().all(|endpoint| endpoint.get("secret").is_none()), "secrets are never listed: {listed}");
    let flags = listed.as_array().unwrap().iter().find(|endpoint| endpoint["id"] == "configured").unwrap();
    assert_eq!(flags["event_types"].as_array().unwrap().len(), webhooks::EventType::ALL.len());
    assert_eq!((flags["url"].as_str(), flags["configured"].as_bool()), (Some("http://127.0.0.1:9/flags"), Some(true)));
    let one = get(&mut client, &format!("/v1/webhooks/endpoints/{id}"), &admin).await;
    assert_eq!(one.status, 200);
    assert!(one.json().get("secret").is_none());
    let missing = get(&mut client, "/v1/webhooks/endpoints/ep_nothing", &admin).await;
    assert_eq!((missing.status, missing.json()["error"]["code"].as_str()), (404, Some("unknown_endpoint")));

    clock.advance(Duration::from_secs(60));
    let path = format!("/v1/webhooks/endpoints/{id}");
    let update = json!({"enabled": false, "event_types": ["access_request.created"], "url": "http://127.0.0.1:9001/other"});
    let updated = send_json(&mut client, "PUT", &path, &admin, &update).await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let updated = updated.json();
    assert_eq!(
        (&updated["enabled"], &updated["event_types"], &updated["url"], &updated["description"]),
        (&json!(false), &json!(["access_request.created"]), &json!("http://127.0.0.1:9001/other"), &json!("billing"))
    );
    assert_eq!(updated["updated_at"], format_rfc3339(clock.now()));
    for (body, message) in [
        (json!({"url": "ftp://x:1/"}), "`url` value `ftp://x:1/`"),
        (json!({"event_types": ["nope"]}), "`event_types` value `nope` is not one of"),
        (json!({"secret": own_secret}), "unknown field `secret`"),
    ] {
        let reply = send_json(&mut client, "PUT", &path, &admin, &body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert!(reply.text().contains(message), "{body}: {}", reply.text());
    }
    assert_eq!(send_json(&mut client, "PUT", &path, &integration, &json!({"enabled": true})).await.status, 403);

    let rotated = post(&mut client, &format!("{path}/rotate-secret"), &admin, &json!({})).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let rotated_secret = rotated.json()["secret"].as_str().unwrap().to_string();
    assert!(rotated_secret.starts_with("whsec_") && rotated_secret != secret, "{rotated_secret}");
    let chosen = post(&mut client, &format!("{path}/rotate-secret"), &admin, &json!({"secret": own_secret})).await.json();
    assert_eq!(chosen["secret"], own_secret);
    assert_eq!(post(&mut client, &format!("{path}/rotate-secret"), &admin, &json!({"secret": "whsec_"})).await.status, 400);
    assert_eq!(post(&mut client, &format!("{path}/rotate-secret"), &integration, &json!({})).await.status, 403);

    // The flag-configured endpoint changes only through the flags.
    for reply in [
        send_json(&mut client, "PUT", "/v1/webhooks/endpoints/configured", &admin, &json!({"enabled": false})).await,
        send_json(&mut client, "DELETE", "/v1/webhooks/endpoints/configured", &admin, &json!({})).await,
        post(&mut client, "/v1/webhooks/endpoints/configured/rotate-secret", &admin, &json!({})).await,
    ] {
        assert_eq!(reply.status, 409, "{}", reply.text());
        assert!(reply.text().contains("`--webhook-url`"), "{}", reply.text());
    }

    assert_eq!(send_json(&mut client, "DELETE", &path, &integration, &json!({})).await.status, 403);
    let deleted = send_json(&mut client, "DELETE", &path, &admin, &json!({})).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(get(&mut client, &path, &admin).await.status, 404);
    assert_eq!(send_json(&mut client, "DELETE", &path, &admin, &json!({})).await.status, 404);
    let audit = get(&mut client, "/v1/audit", &admin).await.json()["entries"].clone();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|entry| entry["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|action| action.starts_with("webhook_endpoint.")).count(), 6, "{actions:?}");
    assert!(!audit.to_string().contains("whsec_"), "the audit log never holds a secret");
    server.stop_keeping_data().await;

    // Restarted without the flags, the configured endpoint is gone.
    let (server, _clock) = start(dir.path(), |_| {}).await;
    let mut client = server.client().await;
    let listed = get(&mut client, "/v1/webhooks/endpoints", &admin).await.json()["endpoints"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], mine["id"]);
    server.stop().await;
}

#[tokio::test]
async fn each_endpoint_gets_only_its_types_signed_the_standard_webhooks_way() {
    let (orders_addr, orders_received) = receiver(0).await;
    let (requests_addr, requests_received) = receiver(0).await;
    let (disabled_addr, disabled_received) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let (server, clock) = start(dir.path(), |_| {}).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let customer = server.key("account", Some("acme"));
    let mut client = server.client().await;
    let orders =
        create_endpoint(&mut client, &admin, &json!({"url": format!("http://{orders_addr}/orders"), "event_types": ["order.applied"]}))
            .await;
    let requests = create_endpoint(
        &mut client,
        &admin,
        &json!({"url": format!("http://{requests_addr}/requests"),
                "event_types": ["access_request.created", "access_request.approved", "access_request.denied"]}),
    )
    .await;
    let disabled = create_endpoint(
        &mut client,
        &admin,
        &json!({"url": format!("http://{disabled_addr}/all"), "event_types": webhooks::EventType::NAMES, "enabled": false}),
    )
    .await;

    let first = order("o-1", "new", "acme", json!({"plan": "team"}));
    apply(&mut client, &integration, &first).await;
    // A replay answers as the first run did and sends nothing.
    apply(&mut client, &integration, &first).await;
    apply(&mut client, &integration, &order("o-2", "add-on", "acme", json!({"addons": ["analytics_pack"]}))).await;
    apply(&mut client, &integration, &first).await;
    let refused = post(&mut client, "/v1/orders", &integration, &order("o-3", "upgrade", "acme", json!({"plan": "nope"}))).await;
    assert_eq!(refused.status, 400, "a refused order sends nothing: {}", refused.text());
    assert_eq!(
        send_json(&mut client, "PUT", "/v1/accounts/acme/users/alice", &integration, &json!({"roles": ["member"]})).await.status,
        200
    );
    let ask = |feature: &str| json!({"account": "acme", "user": "alice", "kind": "feature", "feature": feature, "reason": "pilot"});
    let sso = post(&mut client, "/v1/access-requests", &customer, &ask("sso")).await.json();
    let audit_logs = post(&mut client, "/v1/access-requests", &customer, &ask("audit_log")).await.json();
    let approved = post(&mut client, &format!("/v1/access-requests/{}/approve", sso["id"]), &admin, &json!({"comment": "ok"})).await;
    assert_eq!(approved.status, 200, "{}", approved.text());
    let denied = post(&mut client, &format!("/v1/access-requests/{}/deny", audit_logs["id"]), &admin, &json!({"comment": "no"})).await;
    assert_eq!(denied.status, 200, "{}", denied.text());

    let log = wait_for(&mut client, &admin, all_delivered(6)).await;
    let to = |endpoint: &Value| -> Vec<String> {
        log.iter()
            .filter(|delivery| delivery["endpoint_id"] == endpoint["id"])
            .map(|delivery| delivery["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(to(&orders), ["order.applied", "order.applied"]);
    assert_eq!(to(&requests), ["access_request.created", "access_request.created", "access_request.approved", "access_request.denied"]);
    assert!(to(&disabled).is_empty());
    assert!(disabled_received.lock().unwrap().is_empty(), "a disabled endpoint gets nothing");

    let orders_received = orders_received.lock().unwrap().clone();
    let requests_received = requests_received.lock().unwrap().clone();
    assert_eq!((orders_received.len(), requests_received.len()), (2, 4));
    let mut captured: Vec<(&str, &Received)> =
        orders_received.iter().map(|received| (orders["secret"].as_str().unwrap(), received)).collect();
    captured.extend(requests_received.iter().map(|received| (requests["secret"].as_str().unwrap(), received)));
    let bodies = python_verify(clock.now(), &captured);
    assert_eq!(bodies.len(), 6);
    for (received, body) in captured.iter().map(|(_, received)| received).zip(&bodies) {
        assert_eq!(header(received, "content-type"), "application/json");
        assert_eq!(header(received, "webhook-timestamp"), clock.now().to_string());
        assert!(header(received, "webhook-id").starts_with("msg_"));
        let listed = log.iter().find(|delivery| delivery["message_id"] == header(received, "webhook-id").as_str()).unwrap();
        assert_eq!(&listed["message"], body);
        assert_eq!(body["timestamp"], format_rfc3339(clock.now()));
    }
    let order_ids: Vec<&str> = bodies[..2].iter().map(|body| body["data"]["order_id"].as_str().unwrap()).collect();
    assert_eq!(order_ids, ["o-1", "o-2"]);
    assert_eq!(
        (&bodies[0]["type"], &bodies[0]["data"]["action"], &bodies[0]["data"]["account"], &bodies[0]["data"]["license_id"]),
        (&json!("order.applied"), &json!("new"), &json!("acme"), &json!("acme-1"))
    );
    assert_eq!((&bodies[2]["data"]["id"], &bodies[2]["data"]["status"]), (&sso["id"], &json!("pending")));
    assert_eq!((&bodies[4]["type"], &bodies[4]["data"]["status"]), (&json!("access_request.approved"), &json!("approved")));
    assert_eq!((&bodies[5]["type"], &bodies[5]["data"]["comment"]), (&json!("access_request.denied"), &json!("no")));

    // Enabling the endpoint later does not replay what went out before.
    let path = format!("/v1/webhooks/endpoints/{}", disabled["id"].as_str().unwrap());
    assert_eq!(send_json(&mut client, "PUT", &path, &admin, &json!({"enabled": true})).await.status, 200);
    apply(&mut client, &integration, &first).await;
    apply(&mut client, &integration, &order("o-4", "renew", "acme", json!({"expires_at": "2040-01-01T00:00:00Z"}))).await;
    let log = wait_for(&mut client, &admin, all_delivered(8)).await;
    assert_eq!(log.iter().filter(|delivery| delivery["endpoint_id"] == disabled["id"]).count(), 1, "{log:#?}");
    assert_eq!(disabled_received.lock().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn retries_keep_the_webhook_id_and_a_failed_delivery_is_retried_by_hand() {
    let n_attempts = webhooks::MAX_ATTEMPTS as usize;
    let (addr, received) = receiver(n_attempts).await;
    let dir = tempfile::tempdir().unwrap();
    let (server, clock) = start(dir.path(), |_| {}).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    let endpoint =
        create_endpoint(&mut client, &admin, &json!({"url": format!("http://{addr}/hooks"), "event_types": ["order.applied"]})).await;
    apply(&mut client, &admin, &order("o-1", "new", "acme", json!({"plan": "team"}))).await;
    // Each failed attempt waits its backoff on the control plane's clock: move it past the
    // longest (10 min) and wake the task, instead of sleeping.
    for attempt in 1..=n_attempts as u64 {
        let log = wait_for(&mut client, &admin, |log| log.len() == 1 && log[0]["attempts"].as_u64() == Some(attempt)).await;
        if attempt < n_attempts as u64 {
            assert_eq!(log[0]["status"], "pending", "{log:#?}");
            assert_eq!(log[0]["last_error"], "receiver answered 500");
            clock.advance(Duration::from_secs(601));
            server.control_plane.webhook_wake.notify_one();
        }
    }
    let failed = wait_for(&mut client, &admin, |log| log[0]["status"] == "failed").await;
    let id = failed[0]["id"].as_i64().unwrap();
    assert_eq!(get(&mut client, "/v1/webhooks/deliveries?status=failed", &admin).await.json()["deliveries"].as_array().unwrap().len(), 1);
    assert!(get(&mut client, "/v1/webhooks/deliveries?status=pending", &admin).await.json()["deliveries"].as_array().unwrap().is_empty());
    assert_eq!(get(&mut client, "/v1/webhooks/deliveries?status=lost", &admin).await.status, 400);

    assert_eq!(post(&mut client, &format!("/v1/webhooks/deliveries/{id}/retry"), &integration, &json!({})).await.status, 403);
    clock.advance(Duration::from_secs(1));
    let unknown = post(&mut client, "/v1/webhooks/deliveries/999/retry", &admin, &json!({})).await;
    assert_eq!((unknown.status, unknown.json()["error"]["code"].as_str()), (404, Some("unknown_delivery")));
    let retried = post(&mut client, &format!("/v1/webhooks/deliveries/{id}/retry"), &admin, &json!({})).await;
    assert_eq!(retried.status, 200, "{}", retried.text());
    let log = wait_for(&mut client, &admin, all_delivered(1)).await;
    assert_eq!(log[0]["attempts"], 1, "a retry by hand starts a fresh round: {log:#?}");
    assert_eq!(log[0]["endpoint_id"], endpoint["id"]);
    let again = post(&mut client, &format!("/v1/webhooks/deliveries/{id}/retry"), &admin, &json!({})).await;
    assert_eq!(again.status, 409, "{}", again.text());

    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), n_attempts + 1);
    assert!(received[..n_attempts].iter().all(|one| one.answered == 500) && received[n_attempts].answered == 200);
    let message_id = header(&received[0], "webhook-id");
    assert!(received.iter().all(|one| header(one, "webhook-id") == message_id && one.body == received[0].body), "same id and body");
    assert_eq!(log[0]["message_id"], message_id.as_str());
    let timestamps: Vec<i64> = received.iter().map(|one| header(one, "webhook-timestamp").parse().unwrap()).collect();
    assert!(timestamps.windows(2).all(|pair| pair[0] < pair[1]), "each attempt is stamped when it is made: {timestamps:?}");
    // The last attempt verifies now; each earlier one verified at its own time.
    let secret = endpoint["secret"].as_str().unwrap();
    for (one, timestamp) in received.iter().zip(&timestamps) {
        python_verify(*timestamp, &[(secret, one)]);
    }
    server.stop().await;
}

#[tokio::test]
async fn custom_thresholds_go_out_once_each_and_past_100_for_soft_limits_only() {
    let (addr, received) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let (server, clock) = start(dir.path(), |_| {}).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let mut client = server.client().await;
    create_endpoint(&mut client, &admin, &json!({"url": format!("http://{addr}/usage"), "event_types": ["usage.threshold"]})).await;
    // Both on plan `free` (api_calls: 1000, hard); hooli's limit is made soft, so it can be
    // overrun. The catalog gives api_calls the thresholds 75, 90, 100 and 120.
    for account in ["hooli", "initech"] {
        apply(&mut client, &admin, &order(&format!("o-{account}"), "new", account, json!({"plan": "free"}))).await;
    }
    let soft = json!({"limits": {"api_calls": {"soft": 1000}}});
    assert_eq!(send_json(&mut client, "PUT", "/v1/accounts/hooli/licenses/hooli-1/overrides", &admin, &soft).await.status, 200);
    let at = format_rfc3339(clock.now());
    // (account, amount, event id): the fourth is a replay of the third.
    let events = [
        ("hooli", 700, "e-1"),
        ("hooli", 60, "e-2"),
        ("hooli", 150, "e-3"),
        ("hooli", 150, "e-3"),
        ("hooli", 100, "e-4"),
        ("hooli", 200, "e-5"),
        ("hooli", 500, "e-6"),
        ("initech", 1300, "e-7"),
        ("initech", 10, "e-8"),
    ];
    for (account, amount, id) in events {
        let event = json!({"account": account, "meter": "api_calls", "id": id, "amount": amount, "at": at});
        let reply = post(&mut client, "/v1/usage", &sidecar, &json!({"sidecar": "pod-1", "since": 0, "events": [event]})).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    wait_for(&mut client, &admin, all_delivered(7)).await;
    let thresholds = |account: &str| -> Vec<(u64, u64, String)> {
        received
            .lock()
            .unwrap()
            .iter()
            .map(|one| serde_json::from_slice::<Value>(&one.body).unwrap())
            .filter(|body| body["data"]["account"] == account)
            .map(|body| {
                let data = &body["data"];
                (data["threshold"].as_u64().unwrap(), data["used"].as_u64().unwrap(), data["kind"].as_str().unwrap().to_string())
            })
            .collect()
    };
    let soft = |threshold, used| (threshold, used, "soft".to_string());
    assert_eq!(thresholds("hooli"), [soft(75, 760), soft(90, 910), soft(100, 1010), soft(120, 1210)]);
    let hard = |threshold| (threshold, 1300, "hard".to_string());
    assert_eq!(thresholds("initech"), [hard(75), hard(90), hard(100)]);
    let body: Value = serde_json::from_slice(&received.lock().unwrap()[0].body).unwrap();
    let month = tollgate_core::model::Period::Month.window(clock.now());
    assert_eq!(
        body,
        json!({"type": "usage.threshold", "timestamp": at, "data": {"account": "hooli", "meter": "api_calls",
               "period_start": format_rfc3339(month.start), "threshold": 75, "used": 760, "limit": 1000, "kind": "soft"}})
    );
    server.stop().await;
}

#[tokio::test]
async fn license_expiring_goes_out_once_per_expiry_and_again_after_a_renewal() {
    let (addr, received) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let (server, clock) = start(dir.path(), |config| config.license_expiring_days = 7).await;
    let admin = server.key("admin", None);
    let mut client = server.client().await;
    let start_at = clock.now();
    create_endpoint(&mut client, &admin, &json!({"url": format!("http://{addr}/licenses"), "event_types": ["license.expiring"]})).await;
    let expires_at = start_at + 10 * DAY;
    apply(&mut client, &admin, &order("o-1", "new", "acme", json!({"plan": "team", "expires_at": format_rfc3339(expires_at)}))).await;
    apply(&mut client, &admin, &order("o-2", "new", "hooli", json!({"plan": "team"}))).await;
    let cancelled = json!({"plan": "team", "expires_at": format_rfc3339(start_at + 9 * DAY)});
    apply(&mut client, &admin, &order("o-3", "new", "initech", cancelled)).await;
    apply(&mut client, &admin, &order("o-4", "cancel", "initech", json!({}))).await;
    let scan = |now: i64| webhooks::scan_license_expiries(&server.control_plane, now).unwrap();
    assert_eq!(scan(clock.now()), 0, "ten days ahead is outside the seven-day window");

    clock.advance(Duration::from_secs(4 * DAY as u64));
    server.control_plane.webhook_wake.notify_one();
    let log = wait_for(&mut client, &admin, all_delivered(1)).await;
    assert_eq!(log[0]["type"], "license.expiring");
    assert_eq!(scan(clock.now()), 0, "once per license and expiry");
    clock.advance(Duration::from_secs(3600));
    assert_eq!(scan(clock.now()), 0);

    // A renewal moves the expiry: the new date is notified when it comes within the window.
    let renewed_to = start_at + 40 * DAY;
    apply(&mut client, &admin, &order("o-5", "renew", "acme", json!({"expires_at": format_rfc3339(renewed_to)}))).await;
    assert_eq!(scan(clock.now()), 0);
    clock.set_ms((renewed_to - 2 * DAY) * 1000);
    server.control_plane.webhook_wake.notify_one();
    wait_for(&mut client, &admin, all_delivered(2)).await;
    assert_eq!(scan(clock.now()), 0);

    let bodies: Vec<Value> = received.lock().unwrap().iter().map(|one| serde_json::from_slice(&one.body).unwrap()).collect();
    assert_eq!(
        bodies[0]["data"],
        json!({"account": "acme", "license_id": "acme-1", "plan": "team", "expires_at": format_rfc3339(expires_at), "days_left": 6})
    );
    assert_eq!(
        bodies[1]["data"],
        json!({"account": "acme", "license_id": "acme-1", "plan": "team", "expires_at": format_rfc3339(renewed_to), "days_left": 2})
    );
    server.stop().await;
}
