//! Stripe and HubSpot webhooks in: signatures checked as each system specifies (and
//! cross-checked with Stripe's own Python library), events deduplicated forever, mapped onto
//! licenses, never undone by an older event, and kept when they cannot be mapped yet. The
//! payloads are shaped like the systems' documented ones (field names as in their API
//! references). The control plane runs on a manual clock pinned to 2026-12-15.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use common::{Client, PINNED_NOW_MS, Reply, repo_root};
use control_plane_support::{TestControlPlane, TestSidecar, get, send_json, trusting};
use tollgate_control_plane::integrations::hubspot::{self, HubSpotConfig};
use tollgate_control_plane::integrations::stripe::{self, StripeConfig};
use tollgate_core::clock::{Clock, ManualClock};

const SECRET: &str = "whsec_test_4eC39HqLyjWDarjtT1zdp7dc";
const ROTATED: &str = "whsec_next_Zx81mQ9vB2";
const HUBSPOT_SECRET: &str = "hubspot-client-secret-6b1f";
const NOW: i64 = PINNED_NOW_MS / 1000;
/// 2026-12-01 and 2027-01-01: the subscription's billing period around the pinned clock.
const PERIOD_START: i64 = 1_796_083_200;
const PERIOD_END: i64 = 1_798_761_600;

struct Setup {
    server: TestControlPlane,
    clock: Arc<ManualClock>,
    admin: String,
    client: Client,
}

async fn start(dir: &std::path::Path) -> Setup {
    let clock = Arc::new(ManualClock::new(PINNED_NOW_MS));
    let shared: Arc<dyn Clock> = clock.clone();
    let server = TestControlPlane::start_configured(dir, |config| {
        config.clock = shared;
        config.stripe = Some(StripeConfig::new(vec![SECRET.as_bytes().to_vec(), ROTATED.as_bytes().to_vec()]));
        config.hubspot = Some(HubSpotConfig::new(vec![HUBSPOT_SECRET.as_bytes().to_vec()], None));
    })
    .await;
    let admin = server.key("admin", None);
    let client = server.client().await;
    Setup { server, clock, admin, client }
}

fn subscription(id: &str, status: &str, price: &str, quantity: u32, metadata: Value) -> Value {
    json!({
        "id": id,
        "object": "subscription",
        "customer": "cus_NffrFeUfNV2Hib",
        "status": status,
        "metadata": metadata,
        "start_date": PERIOD_START - 86_400 * 30,
        "current_period_start": PERIOD_START,
        "current_period_end": PERIOD_END,
        "cancel_at_period_end": false,
        "canceled_at": null,
        "ended_at": null,
        "trial_end": null,
        "items": {"object": "list", "data": [{
            "id": "si_OCq2Ow6ah6uGw1",
            "object": "subscription_item",
            "price": {"id": price, "object": "price", "product": "prod_NWjs8kKbJWmuuc", "unit_amount": 9900},
            "quantity": quantity,
        }]},
    })
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "livemode": false,
        "pending_webhooks": 1,
        "type": kind,
        "data": {"object": object},
    })
}

async fn deliver(setup: &mut Setup, body: &str, signature: &str) -> Reply {
    setup
        .client
        .send("POST", "/v1/integrations/stripe", body.to_string(), &[("stripe-signature", signature), ("content-type", "application/json")])
        .await
}

async fn stripe_send(setup: &mut Setup, event: &Value) -> Reply {
    let body = event.to_string();
    let signature = stripe::sign(SECRET.as_bytes(), NOW, body.as_bytes());
    deliver(setup, &body, &signature).await
}

async fn license(setup: &mut Setup, account: &str, id: &str) -> Value {
    let state = get(&mut setup.client, &format!("/v1/accounts/{account}"), &setup.admin).await.json();
    state["state"]["licenses"].as_array().unwrap().iter().find(|license| license["id"] == id).cloned().unwrap_or(Value::Null)
}

#[tokio::test]
async fn stripe_signatures_are_checked_as_stripe_specifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(dir.path()).await;
    let body = event(
        "evt_sig_1",
        "customer.subscription.created",
        NOW,
        subscription("sub_sig", "active", "price_team_monthly", 3, json!({"tollgate_account": "sigco"})),
    )
    .to_string();

    // Tampered body, wrong secret, no header, junk header: 400 with a named code, nothing kept.
    let good = stripe::sign(SECRET.as_bytes(), NOW, body.as_bytes());
    let tampered = body.replace("\"quantity\":3", "\"quantity\":300");
    for (body, signature, code) in [
        (tampered.as_str(), good.as_str(), "bad_signature"),
        (body.as_str(), &stripe::sign(b"whsec_wrong", NOW, body.as_bytes()) as &str, "bad_signature"),
        (body.as_str(), "v1=abcdef", "malformed_signature"),
        (body.as_str(), &format!("t={NOW}") as &str, "malformed_signature"),
    ] {
        let reply = deliver(&mut setup, body, signature).await;
        assert_eq!((reply.status, reply.json()["error"]["code"].as_str().unwrap()), (400, code), "{}", reply.text());
    }
    let reply = setup.client.send("POST", "/v1/integrations/stripe", body.clone(), &[]).await;
    assert_eq!(reply.json()["error"]["code"], "missing_signature");

    // Timestamps too old and too far ahead are refused even when the signature matches.
    for at in [NOW - 301, NOW + 301] {
        let reply = deliver(&mut setup, &body, &stripe::sign(SECRET.as_bytes(), at, body.as_bytes())).await;
        assert_eq!((reply.status, reply.json()["error"]["code"].as_str().unwrap()), (400, "stale_timestamp"));
    }
    let events = get(&mut setup.client, "/v1/integrations/events", &setup.admin).await.json();
    assert!(events["events"].as_array().unwrap().is_empty(), "refused requests leave no trace: {events}");

    // Malformed JSON and a body over the limit, signed correctly, are refused by name.
    let junk = "{\"id\": \"evt_x\", ";
    let reply = deliver(&mut setup, junk, &stripe::sign(SECRET.as_bytes(), NOW, junk.as_bytes())).await;
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str().unwrap()), (400, "malformed_event"));
    // A 10 MB body is refused from its declared length, before it is read or verified.
    let answer = ten_megabytes(setup.server.addr).await;
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("body_too_large"), "{answer}");

    // Either secret of a rotation is accepted; a header with several v1 entries matches any.
    let rotated = stripe::sign(ROTATED.as_bytes(), NOW, body.as_bytes());
    let both = format!("{},v1={}", rotated, "00".repeat(32));
    let reply = deliver(&mut setup, &body, &both).await;
    assert_eq!((reply.status, reply.json()["status"].as_str().unwrap()), (200, "applied"), "{}", reply.text());
    setup.server.stop().await;
}

/// Sends the head of a 10 MB Stripe webhook request and reads what the server answers.
async fn ten_megabytes(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/integrations/stripe HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nstripe-signature: t={NOW},v1=00\r\ncontent-length: {}\r\n\r\n",
        10 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; 64 * 1024]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test]
async fn subscriptions_become_licenses_and_follow_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(dir.path()).await;
    let meta = json!({"tollgate_account": "acme-pay"});

    let reply = stripe_send(
        &mut setup,
        &event(
            "evt_1",
            "customer.subscription.created",
            NOW - 50,
            subscription("sub_1", "trialing", "price_team_monthly", 4, meta.clone()),
        ),
    )
    .await;
    let answer = reply.json();
    assert_eq!((answer["status"].as_str(), answer["duplicate"].as_bool()), (Some("applied"), Some(false)), "{answer}");
    let first_revision = answer["revision"].as_u64().unwrap();
    let trial = license(&mut setup, "acme-pay", "stripe:sub_1").await;
    assert_eq!((trial["plan"].as_str(), trial["seats"].as_u64(), trial["trial"].as_bool()), (Some("team"), Some(4), Some(true)), "{trial}");
    assert_eq!(trial["expires_at"], PERIOD_END);

    // The same event again changes nothing and answers what it answered.
    let again = stripe_send(
        &mut setup,
        &event(
            "evt_1",
            "customer.subscription.created",
            NOW - 50,
            subscription("sub_1", "trialing", "price_team_monthly", 4, meta.clone()),
        ),
    )
    .await
    .json();
    assert_eq!((again["duplicate"].as_bool(), again["revision"].as_u64()), (Some(true), Some(first_revision)));

    // Upgraded to business with an add-on, active: live to the period's end, in grace after.
    let mut upgraded = subscription("sub_1", "active", "price_business_yearly", 5, meta.clone());
    upgraded["items"]["data"].as_array_mut().unwrap().push(json!({"id": "si_2", "price": {"id": "price_analytics_pack"}, "quantity": 1}));
    stripe_send(&mut setup, &event("evt_2", "customer.subscription.updated", NOW - 40, upgraded)).await;
    let active = license(&mut setup, "acme-pay", "stripe:sub_1").await;
    assert_eq!(
        (active["plan"].as_str(), active["seats"].as_u64(), active["trial"].as_bool()),
        (Some("business"), Some(5), None),
        "{active}"
    );
    assert_eq!((active["addons"].clone(), active["grace_days"].as_u64()), (json!(["analytics_pack"]), Some(7)));

    // An older `updated` that arrives late (a downgrade to team) never undoes the newer one.
    let late = stripe_send(
        &mut setup,
        &event("evt_0", "customer.subscription.updated", NOW - 45, subscription("sub_1", "active", "price_team_monthly", 1, meta.clone())),
    )
    .await
    .json();
    assert_eq!(late["status"], "stale", "{late}");
    assert_eq!(license(&mut setup, "acme-pay", "stripe:sub_1").await["plan"], "business");

    // Past due: paid through the period's start, in grace for the configured days.
    stripe_send(
        &mut setup,
        &event(
            "evt_3",
            "customer.subscription.updated",
            NOW - 30,
            subscription("sub_1", "past_due", "price_business_yearly", 5, meta.clone()),
        ),
    )
    .await;
    let past_due = license(&mut setup, "acme-pay", "stripe:sub_1").await;
    assert_eq!((past_due["expires_at"].as_i64(), past_due["grace_days"].as_u64()), (Some(PERIOD_START), Some(7)));

    // The invoice is paid: the license runs to the end of the paid period again.
    let invoice = json!({
        "id": "in_1MtHbELkdIwHu7ixl4OzzPMv", "object": "invoice", "customer": "cus_NffrFeUfNV2Hib",
        "subscription": "sub_1", "status": "paid", "paid": true,
        "lines": {"object": "list", "data": [{"id": "il_1", "period": {"start": PERIOD_START, "end": PERIOD_END}}]},
    });
    stripe_send(&mut setup, &event("evt_4", "invoice.paid", NOW - 20, invoice)).await;
    assert_eq!(license(&mut setup, "acme-pay", "stripe:sub_1").await["expires_at"], PERIOD_END);

    // Unpaid suspends the account; active again resumes it.
    stripe_send(
        &mut setup,
        &event(
            "evt_5",
            "customer.subscription.updated",
            NOW - 15,
            subscription("sub_1", "unpaid", "price_business_yearly", 5, meta.clone()),
        ),
    )
    .await;
    let account = get(&mut setup.client, "/v1/accounts/acme-pay", &setup.admin).await.json();
    assert_eq!(account["state"]["status"], "suspended");
    stripe_send(
        &mut setup,
        &event(
            "evt_6",
            "customer.subscription.updated",
            NOW - 12,
            subscription("sub_1", "active", "price_business_yearly", 5, meta.clone()),
        ),
    )
    .await;
    assert_eq!(get(&mut setup.client, "/v1/accounts/acme-pay", &setup.admin).await.json()["state"]["status"], "active");

    // Deleted: ends at `ended_at`; a later-arriving `updated` cannot revive it.
    let mut canceled = subscription("sub_1", "canceled", "price_business_yearly", 5, meta.clone());
    canceled["ended_at"] = json!(NOW - 10);
    canceled["canceled_at"] = json!(NOW - 10);
    stripe_send(&mut setup, &event("evt_7", "customer.subscription.deleted", NOW - 10, canceled)).await;
    let ended = license(&mut setup, "acme-pay", "stripe:sub_1").await;
    assert_eq!((ended["expires_at"].as_i64(), ended["grace_days"].as_u64()), (Some(NOW - 10), Some(0)));
    let revived = stripe_send(
        &mut setup,
        &event(
            "evt_8",
            "customer.subscription.updated",
            NOW - 5,
            subscription("sub_1", "active", "price_business_yearly", 5, meta.clone()),
        ),
    )
    .await
    .json();
    assert_eq!(revived["status"], "stale", "{revived}");

    // Every applied event is an order in the audit trail under its event id.
    let audit = get(&mut setup.client, "/v1/audit?account=acme-pay", &setup.admin).await.json();
    let targets: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["action"] == "order.stripe")
        .map(|entry| entry["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["evt_1", "evt_2", "evt_3", "evt_4", "evt_5", "evt_6", "evt_7"]);
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["key_id"] == "integration:stripe" || entry["action"] != "order.stripe")
    );
    setup.server.stop().await;
}

#[tokio::test]
async fn unmapped_events_are_kept_listed_and_applied_once_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(dir.path()).await;

    // An endpoint subscribed to unmapped events hears of each one.
    let endpoint = send_json(
        &mut setup.client,
        "POST",
        "/v1/webhooks/endpoints",
        &setup.admin,
        &json!({"url": "http://127.0.0.1:9/hooks", "event_types": ["integration.event_unmapped"]}),
    )
    .await;
    assert_eq!(endpoint.status, 200, "{}", endpoint.text());

    // Unknown price, then unknown customer: both answered 200 (so Stripe stops retrying).
    let unknown_price = stripe_send(
        &mut setup,
        &event(
            "evt_u1",
            "customer.subscription.created",
            NOW,
            subscription("sub_u1", "active", "price_gold", 1, json!({"tollgate_account": "umbrella"})),
        ),
    )
    .await;
    assert_eq!(unknown_price.status, 200);
    assert_eq!(unknown_price.json()["status"], "unmapped");
    assert!(unknown_price.json()["reason"].as_str().unwrap().contains("price `price_gold`"), "{}", unknown_price.text());
    let no_account = stripe_send(
        &mut setup,
        &event("evt_u2", "customer.subscription.created", NOW, subscription("sub_u2", "active", "price_team_monthly", 2, json!({}))),
    )
    .await
    .json();
    assert_eq!(no_account["status"], "unmapped");
    assert!(no_account["reason"].as_str().unwrap().contains("/v1/integrations/links/stripe/cus_NffrFeUfNV2Hib"), "{no_account}");

    let listed = get(&mut setup.client, "/v1/integrations/events?status=unmapped&source=stripe", &setup.admin).await.json();
    let ids: Vec<&str> = listed["events"].as_array().unwrap().iter().map(|event| event["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["evt_u1", "evt_u2"]);
    let deliveries = get(&mut setup.client, "/v1/webhooks/deliveries", &setup.admin).await.json();
    let told: Vec<String> = deliveries["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|delivery| delivery["type"] == "integration.event_unmapped")
        .map(|delivery| delivery["message"]["data"]["event_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(told, ["evt_u1", "evt_u2"], "{deliveries}");
    let metrics = setup.client.get("/metrics").await.text();
    assert!(metrics.contains("tollgate_cp_integration_events_total{source=\"stripe\",outcome=\"unmapped\"} 2"), "{metrics}");

    // Link the customer, then apply the kept event again: now it maps.
    let integration = setup.server.key("integration", None);
    let link =
        send_json(&mut setup.client, "PUT", "/v1/integrations/links/stripe/cus_NffrFeUfNV2Hib", &integration, &json!({"account": "wayne"}))
            .await;
    assert_eq!(link.status, 200, "{}", link.text());
    let seq = listed["events"][1]["seq"].as_i64().unwrap();
    let applied =
        send_json(&mut setup.client, "POST", &format!("/v1/integrations/events/{seq}/apply"), &integration, &json!({})).await.json();
    assert_eq!((applied["status"].as_str(), applied["account"].as_str()), (Some("applied"), Some("wayne")), "{applied}");
    assert_eq!(license(&mut setup, "wayne", "stripe:sub_u2").await["seats"], 2);
    let again = send_json(&mut setup.client, "POST", &format!("/v1/integrations/events/{seq}/apply"), &integration, &json!({})).await;
    assert_eq!(again.status, 409);
    let unmapped = get(&mut setup.client, "/v1/integrations/events?status=unmapped", &setup.admin).await.json();
    assert_eq!(unmapped["events"].as_array().unwrap().len(), 1);

    // Links are listed, bound keys see only their own, and bad input is named.
    let links = get(&mut setup.client, "/v1/integrations/links?source=stripe", &setup.admin).await.json();
    assert_eq!(links["links"][0]["account"], "wayne");
    let bound = setup.server.key("account", Some("other"));
    assert_eq!(get(&mut setup.client, "/v1/integrations/events", &bound).await.status, 403);
    assert_eq!(
        send_json(&mut setup.client, "PUT", "/v1/integrations/links/stripe/cus_x", &bound, &json!({"account": "wayne"})).await.status,
        403
    );
    let sidecar = setup.server.key("sidecar", None);
    assert_eq!(get(&mut setup.client, "/v1/integrations/links", &sidecar).await.status, 403);
    let bad = send_json(&mut setup.client, "PUT", "/v1/integrations/links/paypal/x", &integration, &json!({"account": "wayne"})).await;
    assert_eq!((bad.status, bad.json()["error"]["code"].as_str().unwrap()), (404, "unknown_source"));
    assert_eq!(get(&mut setup.client, "/v1/integrations/events?status=lost", &setup.admin).await.status, 400);
    let deleted = setup
        .client
        .send("DELETE", "/v1/integrations/links/stripe/cus_NffrFeUfNV2Hib", "", &[("authorization", &format!("Bearer {integration}"))])
        .await;
    assert_eq!(deleted.status, 200);
    setup.server.stop().await;
}

#[tokio::test]
async fn entitlement_summaries_add_features_to_stripe_licenses() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(dir.path()).await;
    // The customer's own metadata links it to its account.
    let customer =
        json!({"id": "cus_NffrFeUfNV2Hib", "object": "customer", "email": "ops@ent.example", "metadata": {"tollgate_account": "ent"}});
    let linked = stripe_send(&mut setup, &event("evt_c1", "customer.created", NOW - 10, customer)).await.json();
    assert_eq!((linked["status"].as_str(), linked["account"].as_str()), (Some("applied"), Some("ent")), "{linked}");
    let summary = |features: &[&str]| {
        json!({
            "object": "entitlements.active_entitlement_summary",
            "customer": "cus_NffrFeUfNV2Hib",
            "livemode": false,
            "entitlements": {"object": "list", "data": features.iter().map(|key| json!({
                "id": format!("ent_{key}"), "object": "entitlements.active_entitlement", "feature": format!("feat_{key}"), "lookup_key": key,
            })).collect::<Vec<_>>()},
        })
    };
    // Before any subscription: kept, and applied when the subscription arrives.
    let early = stripe_send(&mut setup, &event("evt_e1", "entitlements.active_entitlement_summary.updated", NOW - 9, summary(&["sso"])))
        .await
        .json();
    assert_eq!(early["status"], "ignored", "{early}");
    stripe_send(
        &mut setup,
        &event("evt_e2", "customer.subscription.created", NOW - 8, subscription("sub_e", "active", "price_team_monthly", 1, json!({}))),
    )
    .await;
    assert_eq!(license(&mut setup, "ent", "stripe:sub_e").await["overrides"]["add_features"], json!(["sso"]));
    stripe_send(&mut setup, &event("evt_e3", "entitlements.active_entitlement_summary.updated", NOW - 7, summary(&["audit_log", "sso"])))
        .await;
    assert_eq!(license(&mut setup, "ent", "stripe:sub_e").await["overrides"]["add_features"], json!(["audit_log", "sso"]));
    let unknown =
        stripe_send(&mut setup, &event("evt_e4", "entitlements.active_entitlement_summary.updated", NOW - 6, summary(&["teleport"])))
            .await
            .json();
    assert_eq!(unknown["status"], "unmapped");
    setup.server.stop().await;
}

/// The end-to-end path: a sidecar denies `sso`, a signed subscription update to the business
/// price arrives, and the same sidecar allows `sso` within a second.
#[tokio::test]
async fn a_paid_upgrade_reaches_the_sidecar_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(&dir.path().join("cp")).await;
    let meta = json!({"tollgate_account": "e2e"});
    stripe_send(
        &mut setup,
        &event(
            "evt_a",
            "customer.subscription.created",
            NOW - 60,
            subscription("sub_e2e", "active", "price_team_monthly", 3, meta.clone()),
        ),
    )
    .await;
    let sidecar_key = setup.server.key("sidecar", None);
    let clock: Arc<dyn Clock> = setup.clock.clone();
    let sidecar = TestSidecar::start_with(
        setup.server.addr,
        &sidecar_key,
        trusting(&control_plane_support::signing_key(7)),
        &dir.path().join("sc"),
        clock,
        |_| {},
    )
    .await;
    let check = json!({"account": "e2e", "feature": "sso"});
    let denied = sidecar.wait_for(&check, Duration::from_secs(10), |answer| answer["reason"] == "not_entitled").await;
    assert_eq!(denied["upgrade"]["id"], "business");

    let body =
        event("evt_b", "customer.subscription.updated", NOW - 30, subscription("sub_e2e", "active", "price_business_monthly", 3, meta))
            .to_string();
    let signature = stripe::sign(SECRET.as_bytes(), NOW, body.as_bytes());
    #[expect(clippy::disallowed_methods, reason = "measures real propagation time")]
    let started = std::time::Instant::now();
    let reply = deliver(&mut setup, &body, &signature).await;
    assert_eq!(reply.json()["status"], "applied");
    sidecar.wait_for(&check, Duration::from_secs(1), |answer| answer["allow"] == true).await;
    let elapsed = started.elapsed();
    eprintln!("stripe event -> sidecar allows: {:.1} ms", elapsed.as_secs_f64() * 1e3);
    sidecar.stop().await;
    setup.server.stop().await;
}

/// Stripe's own library accepts what these tests sign, and the control plane accepts what the
/// library's scheme produces (`stripe.WebhookSignature._compute_signature`).
#[tokio::test]
async fn signatures_agree_with_the_stripe_python_library() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(dir.path()).await;
    let body = event(
        "evt_py",
        "customer.subscription.created",
        NOW,
        subscription("sub_py", "active", "price_team_monthly", 1, json!({"tollgate_account": "pyco"})),
    )
    .to_string();
    let ours = stripe::sign(SECRET.as_bytes(), NOW, body.as_bytes());
    let script = r#"
import sys, time, stripe
body, header, secret, now = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
time.time = lambda: now
event = stripe.Webhook.construct_event(body, header, secret, tolerance=300)
assert event["id"] == "evt_py", event
theirs = stripe.WebhookSignature._compute_signature("%d.%s" % (now, body), secret)
print("t=%d,v1=%s" % (now, theirs))
"#;
    let output = Command::new("python3")
        .args(["-c", script, &body, &ours, SECRET, &NOW.to_string()])
        .output()
        .expect("python3 is needed (with `pip install stripe`)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("ModuleNotFoundError"), "install the Stripe library: pip install stripe\n{stderr}");
    assert!(output.status.success(), "stripe.Webhook.construct_event refused our signature: {stderr}");
    let theirs = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert_eq!(theirs, ours);
    let reply = deliver(&mut setup, &body, &theirs).await;
    assert_eq!(reply.json()["status"], "applied", "{}", reply.text());
    let _ = repo_root();
    setup.server.stop().await;
}

fn deal_event(event_id: u64, deal: u64, stage: &str, occurred_at_ms: i64) -> Value {
    json!({
        "eventId": event_id,
        "subscriptionId": 2_281_932,
        "portalId": 62_515,
        "appId": 1_160_452,
        "occurredAt": occurred_at_ms,
        "subscriptionType": "deal.propertyChange",
        "attemptNumber": 0,
        "objectId": deal,
        "propertyName": "dealstage",
        "propertyValue": stage,
        "changeSource": "CRM",
    })
}

async fn hubspot_send(setup: &mut Setup, events: &Value, at_ms: i64, secret: &str) -> Reply {
    let body = events.to_string();
    let uri = format!("http://{}/v1/integrations/hubspot", setup.server.addr);
    let signature = hubspot::sign(secret.as_bytes(), "POST", &uri, body.as_bytes(), at_ms);
    let at = at_ms.to_string();
    setup
        .client
        .send(
            "POST",
            "/v1/integrations/hubspot",
            body,
            &[("x-hubspot-signature-v3", &signature), ("x-hubspot-request-timestamp", &at), ("content-type", "application/json")],
        )
        .await
}

#[tokio::test]
async fn hubspot_deal_stages_become_orders_on_linked_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = start(dir.path()).await;
    let now_ms = PINNED_NOW_MS;

    // Signature and timestamp are checked first.
    let won = json!([deal_event(101, 9001, "closedwon", now_ms - 5000)]);
    assert_eq!(hubspot_send(&mut setup, &won, now_ms, "not-the-secret").await.json()["error"]["code"], "bad_signature");
    assert_eq!(hubspot_send(&mut setup, &won, now_ms - 301_000, HUBSPOT_SECRET).await.json()["error"]["code"], "stale_timestamp");
    let reply = setup.client.send("POST", "/v1/integrations/hubspot", won.to_string(), &[]).await;
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str().unwrap()), (400, "missing_signature"));

    // A won deal linked to no account is kept as unmapped; linked, it applies.
    let first = hubspot_send(&mut setup, &won, now_ms, HUBSPOT_SECRET).await.json();
    assert_eq!(first["events"][0]["status"], "unmapped", "{first}");
    let integration = setup.server.key("integration", None);
    send_json(&mut setup.client, "PUT", "/v1/integrations/links/hubspot/9001", &integration, &json!({"account": "globex"})).await;
    let seq =
        get(&mut setup.client, "/v1/integrations/events?source=hubspot&status=unmapped", &setup.admin).await.json()["events"][0]["seq"]
            .as_i64()
            .unwrap();
    let applied =
        send_json(&mut setup.client, "POST", &format!("/v1/integrations/events/{seq}/apply"), &integration, &json!({})).await.json();
    assert_eq!(applied["status"], "applied", "{applied}");
    let won_license = license(&mut setup, "globex", "hubspot:9001").await;
    assert_eq!((won_license["plan"].as_str(), won_license["seats"].as_u64()), (Some("business"), Some(10)));
    assert_eq!(won_license["expires_at"].as_i64(), Some((now_ms - 5000) / 1000 + 365 * 86_400));

    // Several events in one request; unmapped stages are ignored; an older change is stale;
    // the same event id again is a duplicate.
    let batch = json!([
        deal_event(102, 9001, "appointmentscheduled", now_ms - 4000),
        deal_event(103, 9001, "closedlost", now_ms - 1000),
        deal_event(104, 9001, "closedwon", now_ms - 3000),
        deal_event(101, 9001, "closedwon", now_ms - 5000),
    ]);
    let answers = hubspot_send(&mut setup, &batch, now_ms, HUBSPOT_SECRET).await.json();
    let statuses: Vec<(&str, bool)> = answers["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| (event["status"].as_str().unwrap(), event["duplicate"].as_bool().unwrap()))
        .collect();
    assert_eq!(statuses, [("ignored", false), ("applied", false), ("stale", false), ("applied", true)], "{answers}");
    let lost = license(&mut setup, "globex", "hubspot:9001").await;
    assert_eq!(lost["cancelled"], true);
    let audit = get(&mut setup.client, "/v1/audit?account=globex", &setup.admin).await.json();
    assert!(
        audit["entries"].as_array().unwrap().iter().any(|entry| entry["action"] == "order.hubspot" && entry["target"] == "hubspot:103")
    );

    let malformed = hubspot_send(&mut setup, &json!({"eventId": 1}), now_ms, HUBSPOT_SECRET).await;
    assert_eq!((malformed.status, malformed.json()["error"]["code"].as_str().unwrap()), (400, "malformed_event"));
    setup.server.stop().await;
}

#[test]
fn a_secret_file_holds_one_secret_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stripe.secret");
    std::fs::write(&path, "whsec_old\n\n  whsec_new  \n").unwrap();
    let secrets = tollgate_control_plane::integrations::read_secrets(&path).unwrap();
    assert_eq!(secrets, [b"whsec_old".to_vec(), b"whsec_new".to_vec()]);
    std::fs::write(&path, "\n").unwrap();
    assert!(tollgate_control_plane::integrations::read_secrets(&path).unwrap_err().to_string().contains("holds no secret"));
    assert!(tollgate_control_plane::integrations::read_secrets(dir.path()).is_err());
}
