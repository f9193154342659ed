//! Envoy ext_authz and OpenID AuthZEN 1.0 against a real sidecar on 127.0.0.1:0: configurable
//! header names, the catalog's route-to-feature map, and the requests of the AuthZEN 1.0
//! specification's examples answered the way the specification says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::TestServer;
use serde_json::json;
use tollgate_sidecar::protocols::{ExtAuthzHeaders, header_name};

async fn example_server() -> TestServer {
    TestServer::start(Some(common::signed_test(&common::example_data(), 42))).await
}

#[tokio::test]
async fn ext_authz_takes_the_feature_from_the_route_map_and_a_route_wins_over_the_header() {
    let server = example_server().await;
    let mut client = server.client().await;
    let allowed = client.send("GET", "/ext_authz/reports/2026/q3", "", &[("x-tollgate-account", "hooli")]).await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.headers["x-tollgate-feature"], "reports");

    // `/settings/sso` needs sso, which hooli's free plan lacks; naming a feature it has in the
    // header does not get around the route.
    let denied =
        client.send("GET", "/ext_authz/settings/sso/saml", "", &[("x-tollgate-account", "hooli"), ("x-tollgate-feature", "reports")]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.headers["x-tollgate-feature"], "sso");
    assert_eq!(denied.headers["x-tollgate-reason"], "not_entitled");
    assert_eq!(denied.headers["x-tollgate-upgrade"], "plan:business");
    assert_eq!(denied.headers["x-tollgate-upgrade-url"], "https://billing.planwise.example/checkout?account=hooli&plan=business");
    assert_eq!(denied.json()["reason"], "not_entitled");

    // Prefixes match whole segments: `/reportsx` is not under `/reports`, and with no route
    // and no feature header the request is denied for missing identity.
    let unrouted = client.send("GET", "/ext_authz/reportsx", "", &[("x-tollgate-account", "hooli")]).await;
    assert_eq!(unrouted.status, 403);
    assert_eq!(unrouted.headers["x-tollgate-reason"], "missing_identity");

    // A hint without a checkout link (team -> the api_boost add-on) has no URL header.
    let event = json!({"account": "wonka", "meter": "api_calls", "amount": 50000, "id": "ext-authz-1"});
    assert_eq!(client.post("/v1/meter", &event).await.status, 200);
    let exhausted = client.send("POST", "/ext_authz/api/items", "", &[("x-tollgate-account", "wonka")]).await;
    assert_eq!(exhausted.headers["x-tollgate-upgrade"], "addon:api_boost");
    assert!(exhausted.headers.get("x-tollgate-upgrade-url").is_none());

    // Metered routes tell the upstream what is left.
    let metered = client.send("POST", "/ext_authz/api/v2/items", "", &[("x-tollgate-account", "hooli")]).await;
    assert_eq!(metered.status, 200);
    assert_eq!(metered.headers["x-tollgate-limit"], "1000");
    assert_eq!(metered.headers["x-tollgate-remaining"], "1000");
    server.stop().await;
}

/// One request written to the socket byte for byte, as `curl --path-as-is` sends it: the
/// status line and the headers of the answer.
async fn raw_request(addr: std::net::SocketAddr, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let head = text.split_once("\r\n\r\n").map_or(text.as_str(), |(head, _)| head).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head)
}

#[tokio::test]
async fn ext_authz_matches_routes_on_the_normalised_path_so_no_respelling_falls_back_to_the_header() {
    let server = example_server().await;
    // The report's exact case, on the wire as `curl --path-as-is` sends it: hooli has reports
    // but not sso, and `/settings//sso` is `/settings/sso` to the app.
    let hooli_asks_for_reports = [("x-tollgate-account", "hooli"), ("x-tollgate-feature", "reports")];
    let (status, head) = raw_request(server.addr, "/ext_authz/settings//sso", &hooli_asks_for_reports).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("x-tollgate-feature: sso\r\n"), "{head}");
    assert!(head.contains("x-tollgate-reason: not_entitled\r\n"), "{head}");

    // hyper's client sends the path as given (it does not normalise), so the rest go through it.
    let mut client = server.client().await;
    for respelling in [
        "/ext_authz/settings/sso",
        "/ext_authz/settings//sso",
        "/ext_authz//settings/sso",
        "/ext_authz/settings/%73so",
        "/ext_authz/settings/%73%73%6F",
        "/ext_authz/settings/%73%73%6f/saml",
        "/ext_authz/settings/./sso",
        "/ext_authz/settings/x/../sso",
        "/ext_authz/settings/x/%2e%2E/sso",
        "/ext_authz/settings/sso?x-tollgate-feature=reports",
    ] {
        let denied = client.send("GET", respelling, "", &hooli_asks_for_reports).await;
        assert_eq!(denied.status, 403, "{respelling}");
        assert_eq!(denied.headers["x-tollgate-feature"], "sso", "{respelling}");
        assert_eq!(denied.headers["x-tollgate-reason"], "not_entitled", "{respelling}");
    }
    // acme has sso: the respellings reach the route and are allowed, not just refused.
    let allowed = client.send("GET", "/ext_authz/settings/x/..//%73so", "", &[("x-tollgate-account", "acme")]).await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.headers["x-tollgate-feature"], "sso");

    // Decoded once, `%2573` is `%73`, a name no route has: the path is not under `/settings/sso`
    // and the header decides, as for any unrouted path.
    let double_encoded = client.send("GET", "/ext_authz/settings/%2573so", "", &hooli_asks_for_reports).await;
    assert_eq!(double_encoded.status, 200);
    assert_eq!(double_encoded.headers["x-tollgate-feature"], "reports");

    // Spellings Tollgate will not guess at are denied, whatever the headers say.
    for ambiguous in [
        "/ext_authz/settings%2Fsso",
        "/ext_authz/settings%2fsso",
        "/ext_authz/settings%5Csso",
        "/ext_authz/settings\\sso",
        "/ext_authz/settings/sso%00",
        "/ext_authz/settings/%u0073so",
        "/ext_authz/../settings/sso",
        "/ext_authz/settings/../../settings/sso",
        "/ext_authz/settings/x//../sso",
    ] {
        let refused = client.send("GET", ambiguous, "", &hooli_asks_for_reports).await;
        assert_eq!(refused.status, 403, "{ambiguous}");
        assert_eq!(refused.headers["x-tollgate-reason"], "invalid_path", "{ambiguous}");
        assert_eq!(refused.json()["error"]["code"], "invalid_path", "{ambiguous}");
    }
    let (status, head) = raw_request(server.addr, "/ext_authz/settings/%2e%2e/%2e%2e/settings/sso", &hooli_asks_for_reports).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("x-tollgate-reason: invalid_path\r\n"), "{head}");
    server.stop().await;
}

#[tokio::test]
async fn ext_authz_header_names_are_configurable() {
    let snapshot = common::signed_test(&common::example_data(), 42);
    let server = TestServer::start_with(Some(snapshot), |config| {
        config.ext_authz = ExtAuthzHeaders {
            account: header_name("X-Tenant-Id").unwrap(),
            user: header_name("x-user").unwrap(),
            feature: header_name("x-entitlement").unwrap(),
            ..ExtAuthzHeaders::default()
        };
    })
    .await;
    let mut client = server.client().await;
    let allowed = client.send("GET", "/ext_authz/x", "", &[("x-tenant-id", "acme"), ("x-user", "alice"), ("x-entitlement", "sso")]).await;
    assert_eq!(allowed.status, 200);
    let forbidden =
        client.send("GET", "/ext_authz/x", "", &[("x-tenant-id", "acme"), ("x-user", "carol"), ("x-entitlement", "export")]).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.json()["reason"], "role_forbidden");
    // The default names no longer count.
    let defaults = client.send("GET", "/ext_authz/x", "", &[("x-tollgate-account", "acme"), ("x-tollgate-feature", "sso")]).await;
    assert_eq!(defaults.status, 403);
    assert_eq!(defaults.headers["x-tollgate-reason"], "missing_identity");
    assert!(header_name("not a header").is_err());
    server.stop().await;
}

/// A catalog and account shaped after the AuthZEN 1.0 examples: account `123`, users
/// `alice@acmecorp.com` (may read and edit) and `alice@example.com` (a viewer: may read only).
fn spec_server() -> tollgate_core::model::SnapshotData {
    common::compile_inline(
        r#"
        [features.can_read]
        [features.can_edit]
        [[plans]]
        id = "standard"
        features = ["can_read", "can_edit"]
        [roles.editor]
        features = ["can_read", "can_edit"]
        [roles.viewer]
        features = ["can_read"]
        "#,
        r#"
        [accounts."123"]
        [[accounts."123".licenses]]
        plan = "standard"
        seats = 5
        [accounts."123".users."alice@acmecorp.com"]
        roles = ["editor"]
        [accounts."123".users."alice@example.com"]
        roles = ["viewer"]
        "#,
    )
}

#[tokio::test]
async fn authzen_spec_example_evaluation() {
    let server = TestServer::start(Some(common::signed_test(&spec_server(), 7))).await;
    let mut client = server.client().await;
    // The specification's access evaluation request: a user, a resource of type account, an
    // action with properties and a context; the PEP's X-Request-ID comes back.
    let request = json!({
        "subject": {"type": "user", "id": "alice@acmecorp.com"},
        "resource": {"type": "account", "id": "123"},
        "action": {"name": "can_read", "properties": {"method": "GET"}},
        "context": {"time": "1985-10-26T01:22-07:00"}
    });
    let body = serde_json::to_vec(&request).unwrap();
    let reply = client
        .send(
            "POST",
            "/access/v1/evaluation",
            body,
            &[("content-type", "application/json"), ("x-request-id", "bfe9eb29-ab87-4ca3-be83-a1d5d8305716")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.headers["x-request-id"], "bfe9eb29-ab87-4ca3-be83-a1d5d8305716");
    let answer = reply.json();
    assert_eq!(answer["decision"], true);
    assert!(answer["context"].is_object(), "context, when present, is an object");

    // A deny is a 200 with `decision: false`, never an HTTP error.
    let mut denied = request.clone();
    denied["subject"]["id"] = json!("mallory@acmecorp.com");
    let reply = client.post("/access/v1/evaluation", &denied).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["decision"], false);
    assert_eq!(reply.json()["context"]["reason"], "unknown_user");
    server.stop().await;
}

#[tokio::test]
async fn authzen_context_carries_the_upgrade_hint_with_its_checkout_link() {
    let server = example_server().await;
    let mut client = server.client().await;
    let request = json!({
        "subject": {"type": "account", "id": "hooli"},
        "resource": {"type": "feature", "id": "sso"},
        "action": {"name": "use"}
    });
    let answer = client.post("/access/v1/evaluation", &request).await.json();
    assert_eq!(answer["decision"], false);
    assert_eq!(answer["context"]["reason"], "not_entitled");
    assert_eq!(
        answer["context"]["upgrade"],
        json!({"kind": "plan", "id": "business", "checkout_url": "https://billing.planwise.example/checkout?account=hooli&plan=business"})
    );
    server.stop().await;
}

#[tokio::test]
async fn authzen_spec_example_evaluations_with_defaults_and_semantics() {
    let server = TestServer::start(Some(common::signed_test(&spec_server(), 7))).await;
    let mut client = server.client().await;
    // The specification's batch: top-level subject and action are defaults for each item, and
    // an item's own action replaces the default. Tollgate learns the account from the
    // subject's properties.
    let mut request = json!({
        "subject": {"type": "user", "id": "alice@example.com", "properties": {"account": "123"}},
        "action": {"name": "can_read"},
        "evaluations": [
            {"resource": {"type": "document", "id": "boxcarring.md"}},
            {"resource": {"type": "document", "id": "subject-search.md"}},
            {"action": {"name": "can_edit"}, "resource": {"type": "document", "id": "resource-search.md"}}
        ]
    });
    let reply = client.post("/access/v1/evaluations", &request).await;
    assert_eq!(reply.status, 200);
    let decisions: Vec<bool> =
        reply.json()["evaluations"].as_array().unwrap().iter().map(|item| item["decision"].as_bool().unwrap()).collect();
    assert_eq!(decisions, [true, true, false], "one answer per item, in order");
    assert_eq!(reply.json()["evaluations"][2]["context"]["reason"], "role_forbidden");

    // `execute_all` is the default and answers every item.
    request["options"] = json!({"evaluations_semantic": "execute_all"});
    assert_eq!(client.post("/access/v1/evaluations", &request).await.json()["evaluations"].as_array().unwrap().len(), 3);

    // `deny_on_first_deny` stops at the first deny, which is the last answer.
    request["evaluations"] = json!([
        {"action": {"name": "can_edit"}, "resource": {"type": "document", "id": "1"}},
        {"resource": {"type": "document", "id": "2"}},
    ]);
    request["options"] = json!({"evaluations_semantic": "deny_on_first_deny"});
    let answers = client.post("/access/v1/evaluations", &request).await.json();
    assert_eq!(answers["evaluations"].as_array().unwrap().len(), 1);
    assert_eq!(answers["evaluations"][0]["decision"], false);

    // `permit_on_first_permit` stops at the first permit.
    request["evaluations"] = json!([
        {"action": {"name": "can_edit"}, "resource": {"type": "document", "id": "1"}},
        {"resource": {"type": "document", "id": "2"}},
        {"resource": {"type": "document", "id": "3"}},
    ]);
    request["options"] = json!({"evaluations_semantic": "permit_on_first_permit"});
    let answers = client.post("/access/v1/evaluations", &request).await.json();
    let decisions: Vec<bool> = answers["evaluations"].as_array().unwrap().iter().map(|item| item["decision"].as_bool().unwrap()).collect();
    assert_eq!(decisions, [false, true]);

    // Without an `evaluations` array the batch endpoint answers one evaluation.
    let single = client
        .post(
            "/access/v1/evaluations",
            &json!({
                "subject": {"type": "user", "id": "alice@example.com"},
                "resource": {"type": "account", "id": "123"},
                "action": {"name": "can_read"}
            }),
        )
        .await
        .json();
    assert_eq!(single["decision"], true);
    server.stop().await;
}

#[tokio::test]
async fn authzen_requests_tollgate_cannot_map_are_denied_not_errors_and_bad_json_is_400() {
    let server = TestServer::start_with(Some(common::signed_test(&spec_server(), 7)), |config| {
        config.public_url = Some("http://pdp.internal:8181/".into());
    })
    .await;
    let mut client = server.client().await;
    // The specification's batch example as written names no account: each item is a deny
    // with the reason in its context, and the answer is still a 200.
    let reply = client
        .post(
            "/access/v1/evaluations",
            &json!({
                "subject": {"type": "user", "id": "alice@example.com"},
                "action": {"name": "can_read"},
                "evaluations": [
                    {"resource": {"type": "document", "id": "boxcarring.md"}},
                    {"resource": {"type": "document", "id": "subject-search.md"}}
                ]
            }),
        )
        .await;
    assert_eq!(reply.status, 200);
    for item in reply.json()["evaluations"].as_array().unwrap() {
        assert_eq!(item["decision"], false);
        assert_eq!(item["context"]["reason"], "invalid_request");
    }
    let single =
        client.post("/access/v1/evaluation", &json!({"subject": {"type": "user", "id": "x"}, "action": {"name": "can_read"}})).await;
    assert_eq!(single.status, 200);
    assert_eq!(single.json()["decision"], false);

    assert_eq!(client.post_raw("/access/v1/evaluation", "{not json").await.status, 400);
    let unknown_semantic =
        client.post("/access/v1/evaluations", &json!({"evaluations": [{}], "options": {"evaluations_semantic": "sometimes"}})).await;
    assert_eq!(unknown_semantic.status, 400);

    // The discovery document comes from configuration, never from the caller's Host header.
    let configuration = client.send("GET", "/.well-known/authzen-configuration", "", &[("host", "evil.example")]).await.json();
    let base = "http://pdp.internal:8181";
    assert_eq!(configuration["policy_decision_point"], base);
    assert_eq!(configuration["access_evaluation_endpoint"], format!("{base}/access/v1/evaluation"));
    assert_eq!(configuration["access_evaluations_endpoint"], format!("{base}/access/v1/evaluations"));
    server.stop().await;
}

#[test]
fn route_map_mistakes_are_named_with_their_line() {
    let catalog = tollgate_policy::Source {
        path: "catalog.toml".into(),
        text: "[features.reports]\n\n[routes]\n\"/reports\" = \"reports\"\n\"reports\" = \"reports\"\n\"/x\" = \"nope\"\n".to_string(),
    };
    let errors = tollgate_policy::compile(&catalog, &[]).unwrap_err().to_string();
    assert!(errors.contains("catalog.toml:5: route `reports` must be a path prefix starting with `/`"), "{errors}");
    assert!(errors.contains("catalog.toml:6: route `/x` names unknown feature `nope`"), "{errors}");
}

/// A batch's default context is shared by its items, not copied into each: 10,000 evaluations
/// under a 60,000-key default context (a 1 MB body) cost what the body holds. (It took 138 s of
/// CPU when each item copied the context.) The elapsed time is printed, not asserted.
#[tokio::test]
async fn a_large_default_context_is_not_copied_into_every_evaluation() {
    let server = TestServer::start_with(Some(common::signed_test(&common::example_data(), 7)), |config| {
        config.max_body = 2 * 1024 * 1024;
    })
    .await;
    let mut client = server.client().await;
    let mut context = serde_json::Map::new();
    for n in 0..60_000 {
        context.insert(format!("k{n}"), json!(n));
    }
    context.insert("region".into(), json!("eu"));
    let evaluations: Vec<_> = (0..10_000).map(|_| json!({"resource": {"type": "feature", "id": "reports"}})).collect();
    let body = json!({"subject": {"type": "account", "id": "acme"}, "context": context, "evaluations": evaluations});
    #[expect(clippy::disallowed_methods, reason = "prints how long the request took; nothing depends on it")]
    let started = std::time::Instant::now();
    let reply = client.post("/access/v1/evaluations", &body).await;
    eprintln!("10,000 evaluations under a 60,000-key context: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let results = reply.json()["evaluations"].as_array().unwrap().clone();
    assert_eq!(results.len(), 10_000);
    assert!(results.iter().all(|result| result["decision"] == true), "{}", results[0]);
    server.stop().await;
}
