//! `/openapi.json` is kept true: its paths and methods are exactly the server's routes, each
//! documented operation is answered by a real handler (never 404 "no endpoint" or 405), every
//! other method is 405, and the order schema's fields are exactly the ones the server accepts
//! and answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::collections::BTreeSet;

use serde_json::{Value, json};

use control_plane_support::{TestControlPlane, post};
use tollgate_control_plane::api::ROUTES;

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE"];

fn concrete(path: &str) -> String {
    path.split('/').map(|segment| if segment.starts_with('{') { "sample-1" } else { segment }).collect::<Vec<_>>().join("/")
}

#[tokio::test]
async fn openapi_matches_the_routes_and_the_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let admin = server.key("admin", None);
    let auth = format!("Bearer {admin}");
    let mut client = server.client().await;
    let document = client.get("/openapi.json").await.json();
    assert_eq!(document["openapi"], "3.1.0");

    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |method| (path.clone(), method.to_uppercase())))
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|route| route.methods().into_iter().map(move |method| (route.pattern.to_string(), method.to_string())))
        .collect();
    assert_eq!(documented, routed);

    for route in ROUTES {
        let (path, methods) = (route.pattern, route.methods());
        let target = concrete(path);
        for method in METHODS {
            let reply = client.send(method, &target, "{}", &[("authorization", &auth), ("content-type", "application/json")]).await;
            if methods.contains(method) {
                assert_ne!(reply.status, 405, "{method} {target}");
                let code =
                    if reply.status == 404 { reply.json()["error"]["code"].as_str().unwrap_or("").to_string() } else { String::new() };
                assert_ne!(code, "not_found", "{method} {target}: {}", reply.text());
                let documented_statuses: Vec<String> =
                    document["paths"][path][method.to_lowercase()]["responses"].as_object().unwrap().keys().cloned().collect();
                let status = reply.status.to_string();
                assert!(documented_statuses.contains(&status), "{method} {target} answered {status}, not documented: {}", reply.text());
            } else {
                assert_eq!(reply.status, 405, "{method} {target}");
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_order_schema_is_what_the_server_takes_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(dir.path()).await;
    let key = server.key("integration", None);
    let mut client = server.client().await;
    let document = client.get("/openapi.json").await.json();
    let schema = &document["components"]["schemas"]["Order"];
    let samples = json!({
        "order_id": "o-1", "action": "new", "account": "acme", "plan": "team", "seats": 2, "addons": ["analytics_pack"],
        "starts_at": "2026-01-01T00:00:00Z", "expires_at": "2030-01-01T00:00:00Z", "regions": ["eu"], "max_devices": 3,
        "license_id": "acme-1", "grace_days": 5,
    });
    let properties: BTreeSet<&String> = schema["properties"].as_object().unwrap().keys().collect();
    let sampled: BTreeSet<&String> = samples.as_object().unwrap().keys().collect();
    assert_eq!(properties, sampled, "the test's sample order must cover the schema");

    let mut full = samples.clone();
    full.as_object_mut().unwrap().remove("license_id");
    let reply = post(&mut client, "/v1/orders", &key, &full).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answered: BTreeSet<String> = reply.json().as_object().unwrap().keys().cloned().collect();
    let result_schema: BTreeSet<String> =
        document["components"]["schemas"]["OrderResult"]["properties"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(answered, result_schema);

    let mut extra = full.clone();
    extra["order_id"] = json!("o-2");
    extra["colour"] = json!("red");
    assert!(post(&mut client, "/v1/orders", &key, &extra).await.text().contains("unknown field `colour`"));
    for required in schema["required"].as_array().unwrap() {
        let mut missing: Value = full.clone();
        missing.as_object_mut().unwrap().remove(required.as_str().unwrap());
        let reply = post(&mut client, "/v1/orders", &key, &missing).await;
        assert!(reply.text().contains(&format!("missing field `{}`", required.as_str().unwrap())), "{}", reply.text());
    }
    let actions: Vec<&str> =
        schema["properties"]["action"]["enum"].as_array().unwrap().iter().map(|action| action.as_str().unwrap()).collect();
    assert_eq!(actions, tollgate_control_plane::changes::ORDER_ACTIONS);
    server.stop().await;
}
