//! The sidecar's HTTP API against a real server on 127.0.0.1:0: every endpoint, and bad
//! input answered with named errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::TestServer;
use serde_json::json;

async fn example_server() -> TestServer {
    TestServer::start(Some(common::signed_test(&common::example_data(), 42))).await
}

#[tokio::test]
async fn check_allows_and_denies_with_reasons() {
    let server = example_server().await;
    let mut client = server.client().await;
    let reply = client.post("/v1/check", &json!({"account": "acme", "feature": "sso", "user": "alice"})).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["allow"], true);
    assert_eq!(body["reason"], "ok");
    assert_eq!(body["revision"], 42);
    assert_eq!(body["expires_at"], "2036-01-01T00:00:00Z");

    let denied = client.post("/v1/check", &json!({"account": "hooli", "feature": "sso"})).await.json();
    assert_eq!(denied["allow"], false);
    assert_eq!(denied["reason"], "not_entitled");
    assert_eq!(
        denied["upgrade"],
        json!({"kind": "plan", "id": "business", "checkout_url": "https://billing.planwise.example/checkout?account=hooli&plan=business"})
    );

    let unknown = client.post("/v1/check", &json!({"account": "nobody", "feature": "sso"})).await;
    assert_eq!(unknown.status, 200, "a deny is an answer, not an error");
    assert_eq!(unknown.json()["reason"], "unknown_account");
    server.stop().await;
}

#[tokio::test]
async fn batch_answers_in_order() {
    let server = example_server().await;
    let mut client = server.client().await;
    let reply = client
        .post(
            "/v1/check/batch",
            &json!({"checks": [
                {"account": "acme", "feature": "reports"},
                {"account": "globex", "feature": "reports"},
                {"account": "acme", "feature": "export", "user": "carol"},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 200);
    let reasons: Vec<String> =
        reply.json()["results"].as_array().unwrap().iter().map(|result| result["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons, ["ok", "account_suspended", "role_forbidden"]);
    server.stop().await;
}

#[tokio::test]
async fn metering_is_idempotent_and_quota_checks_see_it_at_once() {
    let server = example_server().await;
    let mut client = server.client().await;
    // hooli is on the free plan: 1000 API calls a month.
    let first = client.post("/v1/meter", &json!({"account": "hooli", "meter": "api_calls", "amount": 998, "id": "evt-1"})).await.json();
    assert_eq!(first["accepted"], true);
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["used"], 998);
    assert_eq!(first["limit"], 1000);
    assert_eq!(first["remaining"], 2);

    let replay = client.post("/v1/meter", &json!({"account": "hooli", "meter": "api_calls", "amount": 998, "id": "evt-1"})).await.json();
    assert_eq!(replay["duplicate"], true);
    assert_eq!(replay["used"], 998, "a replayed event is not counted again");

    let check = client.post("/v1/check", &json!({"account": "hooli", "feature": "api", "amount": 2})).await.json();
    assert_eq!(check["allow"], true);
    assert_eq!(check["used"], 998);
    assert_eq!(check["remaining"], 2);
    let over = client.post("/v1/check", &json!({"account": "hooli", "feature": "api", "amount": 3})).await.json();
    assert_eq!(over["reason"], "quota_exceeded");
    assert_eq!(
        over["upgrade"],
        json!({"kind": "plan", "id": "team", "checkout_url": "https://billing.planwise.example/checkout?account=hooli&plan=team"})
    );
    assert!(over["reset_at"].as_str().unwrap().ends_with("-01T00:00:00Z"));

    let refused = client.post("/v1/meter", &json!({"account": "hooli", "meter": "api_calls", "amount": 5, "id": "evt-2"})).await.json();
    assert_eq!(refused["accepted"], false);
    assert_eq!(refused["reason"], "quota_exceeded");
    assert_eq!(refused["used"], 998);

    let entitlements = client.get("/v1/entitlements/hooli").await.json();
    let api_calls = entitlements["meters"].as_array().unwrap().iter().find(|meter| meter["meter"] == "api_calls").unwrap().clone();
    assert_eq!(api_calls["used"], 998);
    assert_eq!(api_calls["hard_limit"], 1000);
    server.stop().await;
}

#[tokio::test]
async fn entitlements_describe_the_account() {
    let server = example_server().await;
    let mut client = server.client().await;
    let body = client.get("/v1/entitlements/acme?user=carol").await.json();
    assert_eq!(body["status"], "active");
    assert_eq!(body["licenses"][0]["plan"], "business");
    assert_eq!(body["licenses"][0]["addons"], json!(["analytics_pack"]));
    let feature = |name: &str| body["features"].as_array().unwrap().iter().find(|feature| feature["feature"] == name).unwrap().clone();
    assert_eq!(feature("reports")["allow"], true);
    assert_eq!(feature("export")["reason"], "role_forbidden");
    assert_eq!(body["seats"], 5);
    assert_eq!(body["seats_assigned"], 3);
    assert_eq!(body["devices"], json!(["laptop-alice", "laptop-bob"]));

    let missing = client.get("/v1/entitlements/nobody").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "unknown_account");
    server.stop().await;
}

#[tokio::test]
async fn denials_and_entitlements_carry_the_checkout_link_of_the_suggested_plan_or_addon() {
    let server = example_server().await;
    let mut client = server.client().await;
    // wonka is on the team plan; sso needs business, whose template fills in account and plan.
    let denied = client.post("/v1/check", &json!({"account": "wonka", "feature": "sso"})).await.json();
    assert_eq!(denied["reason"], "not_entitled");
    assert_eq!(denied["upgrade"]["checkout_url"], "https://billing.planwise.example/checkout?account=wonka&plan=business");
    // Past team's 50000 api calls the api_boost add-on is cheaper than business, and it has no
    // checkout_url in the catalog: the field is left out, not null.
    let over = client.post("/v1/check", &json!({"account": "wonka", "feature": "api", "amount": 50001})).await.json();
    assert_eq!(over["reason"], "quota_exceeded");
    assert_eq!(over["upgrade"], json!({"kind": "addon", "id": "api_boost"}));
    // The batch answers the same.
    let batch = client.post("/v1/check/batch", &json!({"checks": [{"account": "wonka", "feature": "sso"}]})).await.json();
    assert_eq!(batch["results"][0]["upgrade"], denied["upgrade"]);

    let body = client.get("/v1/entitlements/wonka").await.json();
    let feature = |name: &str| body["features"].as_array().unwrap().iter().find(|feature| feature["feature"] == name).unwrap().clone();
    assert_eq!(
        feature("sso")["upgrade"],
        json!({"kind": "plan", "id": "business", "checkout_url": "https://billing.planwise.example/checkout?account=wonka&plan=business"})
    );
    assert_eq!(
        feature("advanced_analytics")["upgrade"],
        json!({"kind": "addon", "id": "analytics_pack", "checkout_url": "https://billing.planwise.example/checkout?account=wonka&addon=analytics_pack"})
    );
    assert_eq!(feature("reports")["upgrade"], json!(null));
    server.stop().await;
}

#[tokio::test]
async fn a_checkout_link_percent_encodes_the_account_id() {
    let catalog = std::fs::read_to_string(common::repo_root().join("policies/catalog.toml")).unwrap();
    let accounts = r#"
        [accounts."a@b:c"]
        [[accounts."a@b:c".licenses]]
        plan = "team"
    "#;
    let server = TestServer::start(Some(common::signed_test(&common::compile_inline(&catalog, accounts), 1))).await;
    let mut client = server.client().await;
    let denied = client.post("/v1/check", &json!({"account": "a@b:c", "feature": "sso"})).await.json();
    assert_eq!(denied["upgrade"]["checkout_url"], "https://billing.planwise.example/checkout?account=a%40b%3Ac&plan=business");
    let body = client.get("/v1/entitlements/a%40b%3Ac").await.json();
    let sso = body["features"].as_array().unwrap().iter().find(|feature| feature["feature"] == "sso").unwrap().clone();
    assert_eq!(sso["upgrade"]["checkout_url"], "https://billing.planwise.example/checkout?account=a%40b%3Ac&plan=business");
    server.stop().await;
}

#[tokio::test]
async fn status_probes_and_metrics() {
    let unready = TestServer::start(None).await;
    let mut client = unready.client().await;
    assert_eq!(client.get("/healthz").await.status, 200);
    assert_eq!(client.get("/readyz").await.status, 503);
    let check = client.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await;
    assert_eq!(check.status, 503);
    assert_eq!(check.json()["error"]["code"], "not_ready");
    unready.stop().await;

    let server = example_server().await;
    let mut client = server.client().await;
    assert_eq!(client.get("/readyz").await.status, 200);
    let status = client.get("/v1/status").await.json();
    assert_eq!(status["revision"], 42, "revision is a JSON number");
    assert_eq!(status["ready"], true);
    assert_eq!(status["snapshot"]["counts"]["accounts"], 10);
    client.post("/v1/check", &json!({"account": "globex", "feature": "reports"})).await;
    let metrics = client.get("/metrics").await.text();
    assert!(metrics.contains(r#"tollgate_decisions_total{result="deny",reason="account_suspended"} 1"#), "{metrics}");
    assert!(metrics.contains("tollgate_snapshot_revision 42"), "{metrics}");
    assert!(metrics.contains("tollgate_decision_duration_seconds_bucket"), "{metrics}");
    assert!(metrics.contains(r#"tollgate_request_duration_seconds_bucket{route="check""#), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_named_errors() {
    let server = example_server().await;
    let mut client = server.client().await;

    let syntax = client.post_raw("/v1/check", "{\"account\": ").await;
    assert_eq!(syntax.status, 400);
    assert_eq!(syntax.json()["error"]["code"], "invalid_json");

    let missing = client.post_raw("/v1/check", r#"{"account": "acme"}"#).await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.json()["error"]["code"], "invalid_request");
    assert!(missing.json()["error"]["message"].as_str().unwrap().contains("`feature`"));

    let wrong_type = client.post_raw("/v1/check", r#"{"account": "acme", "feature": 7}"#).await;
    assert_eq!(wrong_type.status, 400);
    assert!(wrong_type.json()["error"]["message"].as_str().unwrap().contains("invalid type"));

    let negative = client.post_raw("/v1/check", r#"{"account": "acme", "feature": "api", "amount": -1}"#).await;
    assert_eq!(negative.status, 400);

    let unknown_field = client.post_raw("/v1/check", r#"{"account": "acme", "feature": "api", "acount": "x"}"#).await;
    assert_eq!(unknown_field.status, 400);
    assert!(unknown_field.json()["error"]["message"].as_str().unwrap().contains("acount"));

    let zero = client.post_raw("/v1/meter", r#"{"account": "acme", "meter": "api_calls", "amount": 0, "id": "x"}"#).await;
    assert_eq!(zero.status, 400);
    assert!(zero.json()["error"]["message"].as_str().unwrap().contains("`amount`"));
    // The control plane's record rules hold at this edge: what it would refuse is refused here.
    let huge = client.post_raw("/v1/meter", r#"{"account": "acme", "meter": "api_calls", "amount": 9223372036854775808, "id": "x"}"#).await;
    assert_eq!(huge.status, 400);
    assert!(huge.json()["error"]["message"].as_str().unwrap().contains("must be from 1 to 9007199254740992"), "{}", huge.text());
    for user in [String::new(), "u".repeat(300)] {
        let check = client.post("/v1/check", &json!({"account": "acme", "feature": "reports", "user": user})).await;
        assert_eq!(check.status, 400, "{}", check.text());
        assert!(check.json()["error"]["message"].as_str().unwrap().contains("`user` must be 1 to 256 bytes"));
    }
    let batch = client
        .post(
            "/v1/check/batch",
            &json!({"checks": [{"account": "acme", "feature": "reports"}, {"account": "acme", "feature": "reports", "user": ""}]}),
        )
        .await;
    assert_eq!(batch.status, 400);
    assert!(batch.json()["error"]["message"].as_str().unwrap().contains("`checks[1].user`"), "{}", batch.text());
    let unknown_meter = client.post_raw("/v1/meter", r#"{"account": "acme", "meter": "nope", "amount": 1, "id": "x"}"#).await;
    assert_eq!(unknown_meter.json()["error"]["code"], "unknown_meter");

    let not_array = client.post_raw("/v1/check/batch", r#"{"checks": {}}"#).await;
    assert_eq!(not_array.status, 400);

    let oversize = client.send("POST", "/v1/check", vec![b' '; 2 * 1024 * 1024], &[]).await;
    assert_eq!(oversize.status, 413);
    assert_eq!(oversize.json()["error"]["code"], "body_too_large");
    // The unread body makes the server close that connection; open another.
    let mut client = server.client().await;

    assert_eq!(client.get("/nope").await.status, 404);
    assert_eq!(client.get("/v1/check").await.status, 405);
    assert_eq!(client.send("DELETE", "/v1/status", "", &[]).await.status, 405);

    // The server is still answering after all of that.
    assert_eq!(client.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await.json()["allow"], true);
    server.stop().await;
}

#[tokio::test]
async fn oversize_body_without_content_length_is_refused() {
    let server = TestServer::start_with(Some(common::signed_test(&common::example_data(), 1)), |config| config.max_body = 100).await;
    let mut client = server.client().await;
    let big = format!(r#"{{"account": "{}", "feature": "sso"}}"#, "a".repeat(200));
    let reply = client.send("POST", "/v1/check", big, &[("transfer-encoding", "chunked")]).await;
    assert_eq!(reply.status, 413);
    server.stop().await;
}

#[tokio::test]
async fn ext_authz_allows_with_200_and_denies_with_403() {
    let server = example_server().await;
    let mut client = server.client().await;
    let allowed =
        client.send("GET", "/ext_authz/projects/1", "", &[("x-tollgate-account", "acme"), ("x-tollgate-feature", "reports")]).await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.headers["x-tollgate-reason"], "ok");
    let denied = client.send("POST", "/ext_authz/sso", "", &[("x-tollgate-account", "hooli"), ("x-tollgate-feature", "sso")]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["reason"], "not_entitled");
    let anonymous = client.send("GET", "/ext_authz/", "", &[]).await;
    assert_eq!(anonymous.status, 403);
    server.stop().await;
}

#[tokio::test]
async fn authzen_evaluations_map_onto_checks() {
    let server = example_server().await;
    let mut client = server.client().await;
    let single = client
        .post(
            "/access/v1/evaluation",
            &json!({
                "subject": {"type": "user", "id": "carol", "properties": {"account": "acme"}},
                "action": {"name": "use"},
                "resource": {"type": "feature", "id": "export"},
                "context": {}
            }),
        )
        .await
        .json();
    assert_eq!(single["decision"], false);
    assert_eq!(single["context"]["reason"], "role_forbidden");

    let many = client
        .post(
            "/access/v1/evaluations",
            &json!({
                "subject": {"type": "account", "id": "acme"},
                "action": {"name": "use"},
                "evaluations": [
                    {"resource": {"type": "feature", "id": "sso"}},
                    {"resource": {"type": "feature", "id": "nope"}},
                ]
            }),
        )
        .await
        .json();
    let decisions: Vec<bool> = many["evaluations"].as_array().unwrap().iter().map(|item| item["decision"].as_bool().unwrap()).collect();
    assert_eq!(decisions, [true, false]);
    let configuration = client.get("/.well-known/authzen-configuration").await.json();
    assert!(configuration["access_evaluation_endpoint"].as_str().unwrap().ends_with("/access/v1/evaluation"));
    server.stop().await;
}

#[tokio::test]
async fn speaks_http2_cleartext_with_prior_knowledge() {
    use http_body_util::BodyExt;
    let server = example_server().await;
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    for _ in 0..3 {
        let request = hyper::Request::post(format!("http://{}/v1/check", server.addr))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"account":"acme","feature":"sso"}"#)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["allow"], true);
    }
    server.stop().await;
}

/// A client that trickles its request head is disconnected after the header read timeout, and
/// one that stalls in its body is answered 408: slow connections cannot pile up. (The timers
/// are hyper's and tokio's, on real time: the timeouts here are one second.)
#[tokio::test]
async fn slow_clients_are_cut_off_by_the_read_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with(Some(common::signed_test(&common::example_data(), 1)), |config| {
        config.header_read_timeout = std::time::Duration::from_secs(1);
        config.body_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let read_all = |mut stream: tokio::net::TcpStream| async move {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        (read.is_ok(), String::from_utf8_lossy(&answer).into_owned())
    };

    let mut trickle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    trickle.write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let (closed, _) = read_all(trickle).await;
    assert!(closed, "a connection that never finished its head was left open");

    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"account\"")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("body_timeout") {
        match tokio::time::timeout(std::time::Duration::from_secs(10), stalled.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"), "{answer}");

    // Prompt clients are served as before.
    let mut client = server.client().await;
    assert_eq!(client.post("/v1/check", &serde_json::json!({"account": "acme", "feature": "reports"})).await.status, 200);
    server.stop().await;
}

/// Large requests are served a bounded number at a time (`--max-heavy-requests`): past it the
/// answer is 503 with `Retry-After`, and small requests are served all along. The heavy request
/// holding the only permit here is one whose body never finishes arriving.
#[tokio::test]
async fn heavy_requests_past_the_limit_are_told_to_retry_and_light_ones_go_on() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start_with(Some(common::signed_test(&common::example_data(), 1)), |config| {
        config.max_heavy_requests = 1;
    })
    .await;
    let checks: Vec<_> = (0..2_000).map(|_| json!({"account": "acme", "feature": "reports"})).collect();
    let big = json!({"checks": checks});
    assert!(big.to_string().len() > 64 * 1024);

    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/check/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200000\r\n\r\n{\"checks\": [",
        )
        .await
        .unwrap();
    let mut client = server.client().await;
    #[expect(clippy::disallowed_methods, reason = "a deadline for the stalled request to take its permit")]
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        let reply = client.post("/v1/check/batch", &big).await;
        if reply.status == 503 {
            break reply;
        }
        #[expect(clippy::disallowed_methods, reason = "see the deadline")]
        let late = std::time::Instant::now() > deadline;
        assert!(!late, "a second heavy request was never refused: {}", reply.status);
        client = server.client().await;
    };
    assert_eq!(refused.json()["error"]["code"], "busy");
    assert_eq!(refused.headers.get("retry-after").map(|value| value.to_str().unwrap()), Some("1"));
    let light = server.client().await.post("/v1/check", &json!({"account": "acme", "feature": "reports"})).await;
    assert_eq!(light.status, 200);

    // Once the stalled request is gone, its permit is free again.
    drop(stalled);
    let answer = loop {
        let mut client = server.client().await;
        let reply = client.post("/v1/check/batch", &big).await;
        if reply.status == 200 {
            break reply;
        }
        #[expect(clippy::disallowed_methods, reason = "see the deadline")]
        let late = std::time::Instant::now() > deadline + std::time::Duration::from_secs(20);
        assert!(!late, "the permit was never given back: {}", reply.status);
    };
    assert_eq!(answer.json()["results"].as_array().unwrap().len(), 2_000);
    server.stop().await;
}
