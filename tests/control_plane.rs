//! The control plane's integration API against a real server on port 0: API keys and scopes,
//! the catalog, orders (every action, idempotency, conflicts, validation, nothing partial
//! written), the audit log, users/seats/devices/overrides, the access-request workflow, and a
//! restart that loses nothing committed.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use serde_json::{Value, json};

use control_plane_support::{TestControlPlane, get, post, send_json};

fn order(id: &str, action: &str, account: &str, extra: Value) -> Value {
    let mut body = json!({"order_id": id, "action": action, "account": account});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

async fn audit_len(client: &mut common::Client, key: &str) -> usize {
    get(client, "/v1/audit?limit=1000", key).await.json()["entries"].as_array().unwrap().len()
}

#[test]
fn keys_create_prints_the_key_alone_and_stores_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["control-plane", "keys", "create", "--data"])
        .arg(dir.path())
        .args(["--scope", "integration"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key = stdout.trim_end_matches('\n');
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(key.starts_with("tg_") && !key.contains(' '), "{key}");
    let secret = key.rsplit('_').next().unwrap();
    let database = std::fs::read(dir.path().join("tollgate.db")).unwrap();
    assert!(!database.windows(secret.len()).any(|window| window == secret.as_bytes()), "the secret is stored in clear");

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["control-plane", "keys", "create", "--data"])
        .arg(dir.path())
        .args(["--scope", "account"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--account"));
}

#[tokio::test]
async fn keys_scopes_and_account_binding() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let sidecar = server.key("sidecar", None);
    let hooli = server.key("account", Some("hooli"));
    let mut client = server.client().await;

    assert_eq!(client.get("/v1/catalog").await.status, 401);
    assert_eq!(get(&mut client, "/v1/catalog", "tg_0000000000000000_nope").await.status, 401);
    let mut forged = admin.clone();
    forged.pop();
    forged.push('x');
    assert_eq!(get(&mut client, "/v1/catalog", &forged).await.status, 401);
    assert_eq!(get(&mut client, "/v1/catalog", &sidecar).await.status, 200);

    let new_acme = order("o-1", "new", "acme", json!({"plan": "team"}));
    let reply = post(&mut client, "/v1/orders", &sidecar, &new_acme).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(post(&mut client, "/v1/orders", &admin, &new_acme).await.status, 200);
    assert_eq!(post(&mut client, "/v1/orders", &admin, &order("o-2", "new", "hooli", json!({"plan": "free"}))).await.status, 200);

    // An account key sees its own account, never another.
    assert_eq!(get(&mut client, "/v1/accounts/hooli", &hooli).await.status, 200);
    assert_eq!(get(&mut client, "/v1/accounts/acme", &hooli).await.status, 403);
    assert_eq!(get(&mut client, "/v1/accounts/acme/license-token", &hooli).await.status, 403);
    assert_eq!(get(&mut client, "/v1/snapshot?after=0&wait=0", &hooli).await.status, 403);
    assert_eq!(get(&mut client, "/v1/audit", &hooli).await.status, 403);
    let other = send_json(&mut client, "POST", "/v1/accounts/acme/devices", &hooli, &json!({"device": "d1"})).await;
    assert_eq!(other.status, 403);
    server.stop().await;
}

#[tokio::test]
async fn catalog_lists_plans_cheapest_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let mut client = server.client().await;
    let catalog = get(&mut client, "/v1/catalog", &key).await.json();
    let plans: Vec<&str> = catalog["plans"].as_array().unwrap().iter().map(|plan| plan["id"].as_str().unwrap()).collect();
    assert_eq!(plans, ["free", "team", "business", "enterprise", "government"]);
    let free = &catalog["plans"][0];
    assert_eq!(free["limits"]["api_calls"], json!({"hard": 1000}));
    assert_eq!(free["limits"]["storage_gb"], json!({"soft": 1, "hard": 2}));
    assert!(free["features"].as_array().unwrap().contains(&json!("projects")));
    for section in ["addons", "features", "meters", "roles"] {
        assert!(!catalog[section].as_array().unwrap().is_empty(), "{section}");
    }
    assert_eq!(catalog["addons"][0]["id"], "analytics_pack");
    server.stop().await;
}

#[tokio::test]
async fn orders_every_action_idempotent_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let admin = server.key("admin", None);
    let mut client = server.client().await;

    let new = order("crm-1", "new", "initrode", json!({"plan": "team", "seats": 3, "expires_at": "2030-01-01T00:00:00Z"}));
    let first = post(&mut client, "/v1/orders", &key, &new).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let first = first.json();
    assert_eq!(first["order_id"], "crm-1");
    assert_eq!(first["account"], "initrode");
    assert_eq!(first["license_id"], "initrode-1");
    let revision = first["revision"].as_u64().unwrap();
    assert!(revision >= 1);

    // A replay answers the same and changes nothing; key order and spacing do not matter.
    let n_audit = audit_len(&mut client, &admin).await;
    let replay = client
        .send(
            "POST",
            "/v1/orders",
            r#"{ "seats": 3, "plan": "team", "account": "initrode", "action": "new", "order_id": "crm-1", "expires_at": "2030-01-01T00:00:00Z" }"#,
            &[("authorization", &format!("Bearer {key}"))],
        )
        .await;
    assert_eq!(replay.json(), first);
    assert_eq!(audit_len(&mut client, &admin).await, n_audit);
    // The same id with another body is a conflict.
    let conflict = post(&mut client, "/v1/orders", &key, &order("crm-1", "new", "initrode", json!({"plan": "business"}))).await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.json()["error"]["code"], "conflict");

    let steps = [
        order("crm-2", "upgrade", "initrode", json!({"plan": "business", "seats": 5})),
        order("crm-3", "downgrade", "initrode", json!({"plan": "team"})),
        order("crm-4", "renew", "initrode", json!({"expires_at": "2031-01-01T00:00:00Z"})),
        order("crm-5", "add-on", "initrode", json!({"addons": ["analytics_pack"]})),
        order("crm-6", "suspend", "initrode", json!({})),
        order("crm-7", "resume", "initrode", json!({})),
    ];
    let mut last = revision;
    for step in &steps {
        let reply = post(&mut client, "/v1/orders", &key, step).await;
        assert_eq!(reply.status, 200, "{step}: {}", reply.text());
        let answer = reply.json();
        assert!(answer["revision"].as_u64().unwrap() > last, "{answer}");
        last = answer["revision"].as_u64().unwrap();
    }
    let state = get(&mut client, "/v1/accounts/initrode", &key).await.json()["state"].clone();
    let license = &state["licenses"][0];
    assert_eq!(license["plan"], "team");
    assert_eq!(license["seats"], 5);
    assert_eq!(license["addons"], json!(["analytics_pack"]));
    assert_eq!(license["expires_at"], 1_924_992_000);
    assert_eq!(state["status"], "active");

    let cancel = post(&mut client, "/v1/orders", &key, &order("crm-8", "cancel", "initrode", json!({}))).await.json();
    assert_eq!(cancel["license_id"], "initrode-1");
    let state = get(&mut client, "/v1/accounts/initrode", &key).await.json()["state"].clone();
    assert_eq!(state["licenses"][0]["cancelled"], true);

    // Every change is in the audit log with who, what, before and after.
    let entries = get(&mut client, "/v1/audit?account=initrode", &admin).await.json()["entries"].as_array().unwrap().clone();
    let actions: Vec<&str> = entries.iter().map(|entry| entry["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["order.new", "order.upgrade", "order.downgrade", "order.renew", "order.add-on", "order.suspend", "order.resume", "order.cancel"]
    );
    assert!(entries[0]["before"].is_null());
    assert_eq!(entries[1]["before"]["licenses"][0]["plan"], "team");
    assert_eq!(entries[1]["after"]["licenses"][0]["plan"], "business");
    assert!(entries.iter().all(|entry| entry["key_id"].as_str().unwrap().len() == 16 && entry["at"].as_str().is_some()));
    server.stop().await;
}

#[tokio::test]
async fn bad_orders_are_named_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let admin = server.key("admin", None);
    let mut client = server.client().await;
    assert_eq!(post(&mut client, "/v1/orders", &key, &order("ok-1", "new", "acme", json!({"plan": "team", "seats": 1}))).await.status, 200);
    let n_audit = audit_len(&mut client, &admin).await;
    let before = get(&mut client, "/v1/accounts/acme", &key).await.json();

    let cases: Vec<(Value, u16, &str)> = vec![
        (order("b-1", "new", "acme", json!({"plan": "platinum"})), 400, "`plan` names unknown plan `platinum`"),
        (order("b-2", "new", "acme", json!({"plan": "team", "addons": ["nope"]})), 400, "unknown add-on `nope`"),
        (order("b-3", "new", "acme", json!({"plan": "team", "regions": ["mars"]})), 400, "unknown region `mars`"),
        (order("b-4", "new", "acme", json!({"plan": "team", "expires_at": "tomorrow"})), 400, "`expires_at`"),
        (order("b-5", "teleport", "acme", json!({})), 400, "`action` value `teleport`"),
        (order("b-6", "upgrade", "acme", json!({"plan": "free"})), 400, "use `downgrade`"),
        (order("b-7", "upgrade", "nobody", json!({"plan": "team"})), 404, "unknown account `nobody`"),
        (
            order("b-8", "new", "acme", json!({"plan": "team", "starts_at": "2030-01-01T00:00:00Z", "expires_at": "2029-01-01T00:00:00Z"})),
            422,
            "expires before it starts",
        ),
        (order("b-9", "new", "acme", json!({"plan": "team", "colour": "red"})), 400, "unknown field `colour`"),
        (order("b 10", "new", "acme", json!({"plan": "team"})), 400, "`order_id`"),
        (order("b-11", "new", "acme", json!({"plan": "team", "seats": -1})), 400, "seats"),
        (json!({"order_id": "b-12", "account": "acme"}), 400, "missing field `action`"),
    ];
    for (body, status, needle) in cases {
        let reply = post(&mut client, "/v1/orders", &key, &body).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let malformed = client.send("POST", "/v1/orders", "{\"order_id\": ", &[("authorization", &format!("Bearer {key}"))]).await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["code"], "invalid_json");
    let huge = "x".repeat(2 * 1024 * 1024);
    let oversized = client.send("POST", "/v1/orders", huge, &[("authorization", &format!("Bearer {key}"))]).await;
    assert_eq!(oversized.status, 413);
    // The server closes a connection whose body it refused to read.
    let mut client = server.client().await;

    // Nothing partial: the account, the audit log and the order ids are untouched.
    assert_eq!(audit_len(&mut client, &admin).await, n_audit);
    let after = get(&mut client, "/v1/accounts/acme", &key).await.json();
    assert_eq!(after["state"], before["state"]);
    let retry = post(&mut client, "/v1/orders", &key, &order("b-1", "new", "acme", json!({"plan": "team"}))).await;
    assert_eq!(retry.status, 200, "a refused order id stays free: {}", retry.text());
    server.stop().await;
}

#[tokio::test]
async fn users_seats_devices_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let mut client = server.client().await;
    let new = order("o-1", "new", "acme", json!({"plan": "team", "seats": 2, "max_devices": 1}));
    assert_eq!(post(&mut client, "/v1/orders", &key, &new).await.status, 200);

    let put = |user: &str| format!("/v1/accounts/acme/users/{user}");
    assert_eq!(send_json(&mut client, "PUT", "/v1/accounts/acme/groups/eng", &key, &json!({"roles": ["member"]})).await.status, 200);
    assert_eq!(send_json(&mut client, "PUT", &put("alice"), &key, &json!({"roles": ["admin"]})).await.status, 200);
    assert_eq!(send_json(&mut client, "PUT", &put("bob"), &key, &json!({"groups": ["eng"]})).await.status, 200);
    // A third seat is past the license's two.
    let third = send_json(&mut client, "PUT", &put("carol"), &key, &json!({"roles": ["viewer"]})).await;
    assert_eq!(third.status, 422, "{}", third.text());
    assert!(third.json()["error"]["message"].as_str().unwrap().contains("assigns 3 seats but its licenses allow at most 2"));
    // Invited (no seat) is fine.
    assert_eq!(send_json(&mut client, "PUT", &put("carol"), &key, &json!({"roles": ["viewer"], "seat": false})).await.status, 200);
    let unknown_role = send_json(&mut client, "PUT", &put("dave"), &key, &json!({"roles": ["wizard"]})).await;
    assert_eq!(unknown_role.status, 400);
    assert_eq!(send_json(&mut client, "DELETE", &put("bob"), &key, &json!({})).await.status, 200);
    assert_eq!(send_json(&mut client, "DELETE", &put("bob"), &key, &json!({})).await.status, 404);

    let devices = "/v1/accounts/acme/devices";
    assert_eq!(post(&mut client, devices, &key, &json!({"device": "laptop-1"})).await.status, 200);
    let second = post(&mut client, devices, &key, &json!({"device": "laptop-2"})).await;
    assert_eq!(second.status, 422, "{}", second.text());
    assert!(second.text().contains("activates 2 devices but its licenses allow at most 1"));
    assert_eq!(send_json(&mut client, "DELETE", "/v1/accounts/acme/devices/laptop-1", &key, &json!({})).await.status, 200);
    assert_eq!(post(&mut client, devices, &key, &json!({"device": "laptop-2"})).await.status, 200);

    let overrides =
        json!({"add_features": ["sso"], "remove_features": ["export"], "limits": {"api_calls": 120000, "storage_gb": {"soft": 10}}});
    let reply = send_json(&mut client, "PUT", "/v1/accounts/acme/licenses/acme-1/overrides", &key, &overrides).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let state = reply.json()["state"].clone();
    assert_eq!(state["licenses"][0]["overrides"]["limits"]["api_calls"], json!({"hard": 120000}));
    let bad =
        send_json(&mut client, "PUT", "/v1/accounts/acme/licenses/acme-1/overrides", &key, &json!({"add_features": ["teleport"]})).await;
    assert_eq!(bad.status, 400);
    let missing = send_json(&mut client, "PUT", "/v1/accounts/acme/licenses/acme-9/overrides", &key, &json!({})).await;
    assert_eq!(missing.status, 404);

    // The token carries the result: sso added, export removed, the negotiated limit.
    let token = get(&mut client, "/v1/accounts/acme/license-token", &key).await.json()["token"].as_str().unwrap().to_string();
    let keys = tollgate_control_plane::tokens::parse_jwks(&client.get("/.well-known/jwks.json").await.text()).unwrap();
    let claims = tollgate_control_plane::tokens::verify(&token, &keys, tollgate_core::clock::system_now_ms() / 1000).unwrap();
    let features = claims["features"].as_array().unwrap();
    assert!(features.contains(&json!("sso")) && !features.contains(&json!("export")), "{features:?}");
    assert_eq!(claims["limits"]["api_calls"], json!({"hard": 120000}));
    server.stop().await;
}

#[tokio::test]
async fn access_requests_need_another_admin_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let integration = server.key("integration", None);
    let admin = server.key("admin", None);
    let other_admin = server.key("admin", None);
    let customer = server.key("account", Some("acme"));
    let mut client = server.client().await;
    assert_eq!(
        post(&mut client, "/v1/orders", &integration, &order("o-1", "new", "acme", json!({"plan": "team", "seats": 2}))).await.status,
        200
    );
    assert_eq!(
        send_json(&mut client, "PUT", "/v1/accounts/acme/users/alice", &integration, &json!({"roles": ["member"]})).await.status,
        200
    );

    let ask = json!({"account": "acme", "user": "alice", "kind": "feature", "feature": "sso", "reason": "SAML rollout"});
    let created = post(&mut client, "/v1/access-requests", &customer, &ask).await;
    assert_eq!(created.status, 200, "{}", created.text());
    let created = created.json();
    assert_eq!(created["status"], "pending");
    let id = created["id"].as_i64().unwrap();
    let bad = post(
        &mut client,
        "/v1/access-requests",
        &customer,
        &json!({"account": "acme", "user": "alice", "kind": "feature", "feature": "teleport", "reason": "x"}),
    )
    .await;
    assert_eq!(bad.status, 400);
    let other = post(
        &mut client,
        "/v1/access-requests",
        &customer,
        &json!({"account": "hooli", "user": "x", "kind": "seats", "seats": 1, "reason": "x"}),
    )
    .await;
    assert_eq!(other.status, 403);

    // The customer cannot approve; an admin cannot approve a request they made.
    let approve = format!("/v1/access-requests/{id}/approve");
    assert_eq!(post(&mut client, &approve, &customer, &json!({"comment": "ok"})).await.status, 403);
    let own = post(
        &mut client,
        "/v1/access-requests",
        &admin,
        &json!({"account": "acme", "user": "alice", "kind": "seats", "seats": 1, "reason": "hiring"}),
    )
    .await
    .json();
    let own_approve = post(&mut client, &format!("/v1/access-requests/{}/approve", own["id"]), &admin, &json!({"comment": "self"})).await;
    assert_eq!(own_approve.status, 403, "{}", own_approve.text());
    assert!(own_approve.text().contains("cannot decide their own"));

    let approved =
        post(&mut client, &approve, &admin, &json!({"comment": "approved for the pilot", "until": "2099-01-01T00:00:00Z"})).await;
    assert_eq!(approved.status, 200, "{}", approved.text());
    let approved = approved.json();
    assert_eq!(approved["status"], "approved");
    assert!(approved["revision"].as_u64().is_some());
    assert_eq!(post(&mut client, &approve, &other_admin, &json!({"comment": "again"})).await.status, 409);
    let denied = post(&mut client, &format!("/v1/access-requests/{}/deny", own["id"]), &other_admin, &json!({"comment": "budget"})).await;
    assert_eq!(denied.json()["status"], "denied");

    // The requester sees the outcome; the grant is a license that ends at `until`.
    let seen = get(&mut client, &format!("/v1/access-requests/{id}"), &customer).await.json();
    assert_eq!(seen["status"], "approved");
    assert_eq!(seen["comment"], "approved for the pilot");
    let listed = get(&mut client, "/v1/access-requests?status=pending", &customer).await.json();
    assert!(listed["access_requests"].as_array().unwrap().is_empty());
    let state = get(&mut client, "/v1/accounts/acme", &customer).await.json()["state"].clone();
    let grant = &state["licenses"][1];
    assert_eq!(grant["overrides"]["add_features"], json!(["sso"]));
    assert_eq!(grant["expires_at"], 4_070_908_800i64);

    let actions: Vec<String> = get(&mut client, "/v1/audit?account=acme", &admin).await.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["action"].as_str().unwrap().to_string())
        .collect();
    for expected in ["access_request.create", "access_request.grant", "access_request.approve", "access_request.deny"] {
        assert!(actions.iter().any(|action| action == expected), "{expected} missing from {actions:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_restart_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let mut client = server.client().await;
    let mut last = 0;
    for n in 0..20 {
        let reply =
            post(&mut client, "/v1/orders", &key, &order(&format!("o-{n}"), "new", &format!("acct-{n}"), json!({"plan": "team"}))).await;
        last = reply.json()["revision"].as_u64().unwrap();
    }
    server.stop_keeping_data().await;

    let restarted = TestControlPlane::start(dir.path()).await;
    let mut client = restarted.client().await;
    for n in 0..20 {
        assert_eq!(get(&mut client, &format!("/v1/accounts/acct-{n}"), &key).await.status, 200);
    }
    // A replay after the restart still answers the first result.
    let replay = post(&mut client, "/v1/orders", &key, &order("o-19", "new", "acct-19", json!({"plan": "team"}))).await.json();
    assert_eq!(replay["revision"].as_u64().unwrap(), last);
    let next = post(&mut client, "/v1/orders", &key, &order("o-20", "new", "acct-20", json!({"plan": "team"}))).await.json();
    assert!(next["revision"].as_u64().unwrap() > last);
    restarted.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_first_snapshot_and_metrics_count_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let integration = server.key("integration", None);
    let mut client = server.client().await;
    // The publisher signs the first snapshot right after start; until then the answer is 503.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let ready = loop {
        let reply = client.get("/readyz").await;
        if reply.status == 200 {
            break reply.json();
        }
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "not_ready");
        assert!(tokio::time::Instant::now() < deadline, "control plane never turned ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(ready["revision"].as_u64().is_some(), "{ready}");

    let reply =
        post(&mut client, "/v1/orders", &integration, &order("m-1", "new", "metrics-co", json!({"plan": "team", "seats": 2}))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let revision = reply.json()["revision"].as_u64().unwrap();
    assert_eq!(get(&mut client, "/v1/orders", "not-a-key").await.status, 401, "no path or method is revealed without a key");
    assert_eq!(get(&mut client, "/v1/no-such-endpoint", "not-a-key").await.status, 401);
    assert_eq!(get(&mut client, "/v1/orders", &integration).await.status, 405);
    assert_eq!(client.get("/v1/catalog").await.status, 401);

    let text = client.get("/metrics").await.text();
    assert!(text.contains(r#"tollgate_cp_requests_total{route="/v1/orders",status="2xx"} 1"#), "{text}");
    assert!(text.contains(r#"tollgate_cp_requests_total{route="/v1/orders",status="4xx"} 2"#), "{text}");
    assert!(text.contains(r#"tollgate_cp_requests_total{route="/v1/catalog",status="4xx"} 1"#), "{text}");
    assert!(text.contains(&format!("tollgate_cp_revision_committed {revision}")), "{text}");
    assert!(text.contains("tollgate_cp_request_duration_seconds_bucket"), "{text}");
    assert!(!text.contains("metrics-co"), "account ids never become labels: {text}");
    server.stop().await;
}

#[tokio::test]
async fn account_keys_cannot_probe_other_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let integration = server.key("integration", None);
    let admin = server.key("admin", None);
    let mut client = server.client().await;
    for (order_id, account) in [("p-1", "probe-a"), ("p-2", "probe-b")] {
        let reply =
            post(&mut client, "/v1/orders", &integration, &order(order_id, "new", account, json!({"plan": "team", "seats": 2}))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let customer_b = server.key("account", Some("probe-b"));
    let user = send_json(&mut client, "PUT", "/v1/accounts/probe-b/users/bo", &integration, &json!({"roles": ["member"]})).await;
    assert_eq!(user.status, 200, "{}", user.text());
    let request = post(
        &mut client,
        "/v1/access-requests",
        &customer_b,
        &json!({"account": "probe-b", "user": "bo", "kind": "seats", "seats": 1, "reason": "new hire"}),
    )
    .await;
    assert_eq!(request.status, 200, "{}", request.text());
    let id = request.json()["id"].as_i64().unwrap();

    let customer_a = server.key("account", Some("probe-a"));
    // Another account's request reads exactly like one that does not exist.
    let theirs = get(&mut client, &format!("/v1/access-requests/{id}"), &customer_a).await;
    let missing = get(&mut client, "/v1/access-requests/999999", &customer_a).await;
    assert_eq!((theirs.status, missing.status), (404, 404));
    assert_eq!(theirs.json()["error"]["code"], missing.json()["error"]["code"]);
    assert_eq!(get(&mut client, &format!("/v1/access-requests/{id}"), &customer_b).await.status, 200);
    // Listings that span accounts are refused to a bound key; its own are not.
    assert_eq!(get(&mut client, "/v1/audit", &customer_a).await.status, 403);
    assert_eq!(get(&mut client, "/v1/access-requests?account=probe-b", &customer_a).await.status, 403);
    let own = get(&mut client, "/v1/access-requests", &customer_a).await;
    assert_eq!(own.status, 200);
    assert_eq!(own.json()["access_requests"].as_array().unwrap().len(), 0);
    assert_eq!(get(&mut client, "/v1/audit?account=probe-a", &customer_a).await.status, 403, "audit needs admin or integration");
    assert_eq!(get(&mut client, "/v1/audit?account=probe-b", &admin).await.status, 200);

    // Only customer keys can be bound to an account.
    for scope in ["admin", "integration", "sidecar"] {
        let error = tollgate_control_plane::create_key(server.control_plane.repository.as_ref(), scope, Some("probe-a"), 0).unwrap_err();
        assert!(error.to_string().contains("only scope `account`"), "{scope}: {error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_sync_listener_takes_the_sidecar_routes_off_the_api_port() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let control_plane = Arc::new(
        tollgate_control_plane::ControlPlane::open(
            dir.path(),
            &common::repo_root().join("policies"),
            control_plane_support::signing_key(7),
            Vec::new(),
        )
        .unwrap(),
    );
    let sidecar_key = tollgate_control_plane::create_key(control_plane.repository.as_ref(), "sidecar", None, control_plane.now()).unwrap();
    let integration =
        tollgate_control_plane::create_key(control_plane.repository.as_ref(), "integration", None, control_plane.now()).unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sync = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (api_addr, sync_addr) = (api.local_addr().unwrap(), sync.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tollgate_control_plane::run_with_sync(
        control_plane,
        api,
        Some(sync),
        async move {
            let _ = stopped.await;
        },
        std::time::Duration::from_secs(2),
    ));
    let mut api_client = common::Client::connect(api_addr).await;
    let mut sync_client = common::Client::connect(sync_addr).await;
    let usage = json!({"sidecar": "pod-1", "events": []});
    // On the API port the sidecar routes do not exist; on the sync port only they (and the
    // probes) do.
    let on_api = post(&mut api_client, "/v1/usage", &sidecar_key, &usage).await;
    assert_eq!(on_api.status, 404, "{}", on_api.text());
    assert_eq!(get(&mut api_client, "/v1/snapshot?after=0&wait=0", &sidecar_key).await.status, 404);
    let on_sync = post(&mut sync_client, "/v1/usage", &sidecar_key, &usage).await;
    assert_eq!(on_sync.status, 200, "{}", on_sync.text());
    assert_eq!(get(&mut sync_client, "/v1/catalog", &integration).await.status, 404);
    assert_eq!(get(&mut api_client, "/v1/catalog", &integration).await.status, 200);
    assert_eq!(sync_client.get("/healthz").await.status, 200);
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn a_mistyped_order_action_is_named_before_the_account_is_looked_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let mut client = server.client().await;
    // `nobody` does not exist: the action is still what is wrong, not the account.
    for (action, account) in [("upgrad", "nobody"), ("Renew", "nobody"), ("addon", "acme")] {
        let reply = post(&mut client, "/v1/orders", &key, &order("m-1", action, account, json!({"plan": "team"}))).await;
        assert_eq!(reply.status, 400, "{action}: {}", reply.text());
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "invalid_request");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(&format!(
                "`action` value `{action}` is not one of new, upgrade, downgrade, renew, add-on, cancel, suspend, resume"
            )),
            "{message}"
        );
    }
    let kind = json!({"account": "acme", "user": "alice", "kind": "feature-flag", "reason": "x"});
    let reply = post(&mut client, "/v1/access-requests", &key, &kind).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("`kind` value `feature-flag` is not one of feature, seats, addon"), "{}", reply.text());
    server.stop().await;
}

/// Every time the control plane records or checks comes from its one clock: here a manual one
/// set to a day long past, moved forward instead of slept through.
#[tokio::test]
async fn grants_tokens_and_the_audit_log_follow_the_control_plane_clock() {
    use std::sync::Arc;
    use std::time::Duration;
    use tollgate_core::clock::{Clock, ManualClock};
    use tollgate_core::period::{format_rfc3339, parse_rfc3339};

    let start = parse_rfc3339("2021-03-01T00:00:00Z").unwrap();
    let clock = Arc::new(ManualClock::new(start * 1000));
    let dir = tempfile::tempdir().unwrap();
    let configured = Arc::clone(&clock);
    let server = TestControlPlane::start_configured(dir.path(), move |config| config.clock = configured).await;
    let integration = server.key("integration", None);
    let admin = server.key("admin", None);
    let customer = server.key("account", Some("acme"));
    let mut client = server.client().await;
    assert_eq!(post(&mut client, "/v1/orders", &integration, &order("o-1", "new", "acme", json!({"plan": "team"}))).await.status, 200);
    let user = json!({"roles": ["member"]});
    assert_eq!(send_json(&mut client, "PUT", "/v1/accounts/acme/users/alice", &integration, &user).await.status, 200);

    let ask = json!({"account": "acme", "user": "alice", "kind": "feature", "feature": "sso", "reason": "SAML pilot"});
    let created = post(&mut client, "/v1/access-requests", &customer, &ask).await.json();
    assert_eq!(created["created_at"], "2021-03-01T00:00:00Z");
    // An hour's grant: long over on the wall clock, still ahead on this one.
    let until = json!({"comment": "one hour", "until": "2021-03-01T01:00:00Z"});
    let approved = post(&mut client, &format!("/v1/access-requests/{}/approve", created["id"]), &admin, &until).await;
    assert_eq!(approved.status, 200, "{}", approved.text());
    assert_eq!(approved.json()["decided_at"], "2021-03-01T00:00:00Z");
    let entries = get(&mut client, "/v1/audit?account=acme", &admin).await.json()["entries"].clone();
    assert!(entries.as_array().unwrap().iter().all(|entry| entry["at"] == "2021-03-01T00:00:00Z"), "{entries}");

    let keys = tollgate_control_plane::tokens::parse_jwks(&client.get("/.well-known/jwks.json").await.text()).unwrap();
    let token_claims =
        |token: &Value, now: i64| tollgate_control_plane::tokens::verify(token["token"].as_str().unwrap(), &keys, now).unwrap();
    clock.advance(Duration::from_secs(30 * 60));
    let token = get(&mut client, "/v1/accounts/acme/license-token", &customer).await.json();
    let claims = token_claims(&token, clock.now());
    assert_eq!(claims["iat"], clock.now());
    assert!(claims["features"].as_array().unwrap().contains(&json!("sso")), "{claims:?}");

    // Past `until` the grant has ended: the token no longer carries it, and a new grant that
    // ends at the same instant is refused as not in the future.
    clock.advance(Duration::from_secs(90 * 60));
    let later = format_rfc3339(clock.now());
    let token = get(&mut client, "/v1/accounts/acme/license-token", &customer).await.json();
    let claims = token_claims(&token, clock.now());
    assert_eq!(claims["iat"], clock.now());
    assert!(!claims["features"].as_array().unwrap().contains(&json!("sso")), "{claims:?}");
    let again = post(&mut client, "/v1/access-requests", &customer, &ask).await.json();
    assert_eq!(again["created_at"], later);
    let late = post(&mut client, &format!("/v1/access-requests/{}/approve", again["id"]), &admin, &until).await;
    assert_eq!(late.status, 400, "{}", late.text());
    assert!(late.text().contains("`until` must be in the future"), "{}", late.text());
    server.stop().await;
}

/// A revoked key authenticates no one from its next request on, whether it was revoked through
/// the API or the CLI; revocations are audited and the key stays listed with its time.
#[tokio::test]
async fn revoked_keys_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let integration = server.key("integration", None);
    let sidecar = server.key("sidecar", None);
    let id_of = |key: &str| key.trim_start_matches("tg_").split('_').next().unwrap().to_string();
    let mut client = server.client().await;
    assert_eq!(get(&mut client, "/v1/catalog", &integration).await.status, 200);

    let delete = |key: &str| format!("Bearer {key}");
    let by_integration =
        client.send("DELETE", &format!("/v1/keys/{}", id_of(&sidecar)), "", &[("authorization", &delete(&integration))]).await;
    assert_eq!(by_integration.status, 403);
    let revoked = client.send("DELETE", &format!("/v1/keys/{}", id_of(&integration)), "", &[("authorization", &delete(&admin))]).await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(get(&mut client, "/v1/catalog", &integration).await.status, 401);
    let again = client.send("DELETE", &format!("/v1/keys/{}", id_of(&integration)), "", &[("authorization", &delete(&admin))]).await;
    assert_eq!((again.status, again.json()["error"]["code"].as_str().unwrap()), (404, "unknown_key"));

    // The CLI revokes in the same database, effective for the running server at once.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["control-plane", "keys", "revoke"])
        .args(control_plane_support::database_args(dir.path()))
        .arg(id_of(&sidecar))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(get(&mut client, "/v1/snapshot", &sidecar).await.status, 401);

    let keys = get(&mut client, "/v1/keys", &admin).await.json();
    let listed = keys["keys"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|key| key.get("secret_sha256").is_none()));
    let revoked_ids: Vec<&str> = listed.iter().filter(|key| !key["revoked_at"].is_null()).map(|key| key["id"].as_str().unwrap()).collect();
    assert_eq!(revoked_ids.len(), 2);
    let audit = get(&mut client, "/v1/audit", &admin).await.json();
    let revocations: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["action"] == "key.revoke")
        .map(|entry| entry["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(revocations, [id_of(&admin).as_str(), "cli"]);
    server.stop().await;
}
