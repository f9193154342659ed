//! The portal and console in a real browser: starts a control plane and a sidecar subscribed
//! to it on port 0, loads accounts and usage, and runs `tests/portal_browser.py` (selenium
//! driving Debian's chromium through chromedriver), which walks a customer through the portal
//! and an admin through the console and checks every figure against the JSON API. Skipped,
//! saying so, only where chromium, chromedriver or selenium is not installed
//! (`apt-get install -y chromium chromium-driver` and `pip install selenium`).
//!
//! Screenshots go to a temporary directory, or to `TOLLGATE_PORTAL_SCREENSHOTS` when it is set
//! (`TOLLGATE_PORTAL_SCREENSHOTS=docs/screenshots cargo test --test portal_browser` refreshes
//! the README's).
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use common::repo_root;
use control_plane_support::{TestControlPlane, TestSidecar, post, send_json, signing_key, trusting};
use tollgate_core::period::format_rfc3339;

/// `name` on the PATH, or the first of `candidates` that exists.
fn binary(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain(candidates.iter().map(PathBuf::from)).find(|path| path.is_file())
}

fn has_selenium() -> bool {
    Command::new("python3").args(["-c", "import selenium"]).output().is_ok_and(|output| output.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_and_an_admin_in_a_real_browser() {
    let chromium = binary("chromium", &["/usr/bin/chromium", "/usr/lib/chromium/chromium"]);
    let chromedriver = binary("chromedriver", &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    let (Some(chromium), Some(chromedriver), true) = (chromium.clone(), chromedriver.clone(), has_selenium()) else {
        println!(
            "SKIPPED portal browser test: needs chromium ({}), chromedriver ({}) and python3 selenium ({}); \
             install with `apt-get install -y chromium chromium-driver` and `python3 -m pip install selenium`",
            if chromium.is_some() { "found" } else { "missing" },
            if chromedriver.is_some() { "found" } else { "missing" },
            if has_selenium() { "found" } else { "missing" },
        );
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let server = TestControlPlane::start(&dir.path().join("cp")).await;
    let integration = server.key("integration", None);
    let admin = server.key("admin", None);
    let sidecar_key = server.key("sidecar", None);
    let mut client = server.client().await;
    for (order_id, account, plan) in [("o-acme", "acme", "team"), ("o-globex", "globex", "business")] {
        let order = json!({"order_id": order_id, "action": "new", "account": account, "plan": plan, "seats": 5, "max_devices": 3});
        assert_eq!(post(&mut client, "/v1/orders", &integration, &order).await.status, 200);
    }
    for (account, user, roles) in
        [("acme", "alice", json!(["admin"])), ("acme", "bob", json!(["member"])), ("globex", "gina", json!(["admin"]))]
    {
        let reply =
            send_json(&mut client, "PUT", &format!("/v1/accounts/{account}/users/{user}"), &integration, &json!({"roles": roles})).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(post(&mut client, "/v1/accounts/acme/devices", &integration, &json!({"device": "build-server-1"})).await.status, 200);

    // Usage in this month (84 % of the team plan's 50,000 calls) and two earlier ones.
    let now = server.control_plane.now();
    let events: Vec<_> = [(42_000u64, now - 60), (30_000, now - 35 * 86_400), (12_500, now - 95 * 86_400), (7, now - 60)]
        .iter()
        .enumerate()
        .map(|(idx, (amount, at))| {
            let account = if idx == 3 { "globex" } else { "acme" };
            json!({"account": account, "meter": "api_calls", "id": format!("evt-{idx}"), "amount": amount, "at": format_rfc3339(*at)})
        })
        .collect();
    let ingested = post(&mut client, "/v1/usage", &sidecar_key, &json!({"sidecar": "browser-test", "since": 0, "events": events})).await;
    assert_eq!(ingested.status, 200, "{}", ingested.text());
    assert_eq!(ingested.json()["rejected"], json!([]), "{}", ingested.text());

    let sidecar = TestSidecar::start(server.addr, &sidecar_key, trusting(&signing_key(7)), &dir.path().join("sidecar")).await;
    sidecar
        .wait_for(&json!({"account": "acme", "feature": "reports", "user": "alice"}), std::time::Duration::from_secs(10), |answer| {
            answer["allow"] == true
        })
        .await;

    let screenshots = match std::env::var_os("TOLLGATE_PORTAL_SCREENSHOTS") {
        Some(dir) => {
            let dir = repo_root().join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }
        None => {
            let dir = dir.path().join("screenshots");
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }
    };
    let script = repo_root().join("tests/portal_browser.py");
    let (cp_url, sidecar_url) = (format!("http://{}", server.addr), format!("http://{}", sidecar.addr));
    let output = tokio::task::spawn_blocking(move || {
        // The browser keeps the real clock when the suite runs under `faketime` (CI moves the
        // wall clock years ahead): chromium is not made for a preloaded clock, and nothing the
        // script checks depends on the date, while the servers in this process do run moved.
        Command::new("python3")
            .env_remove("LD_PRELOAD")
            .env_remove("FAKETIME")
            .env_remove("FAKETIME_DONT_FAKE_MONOTONIC")
            .arg(script)
            .env("TG_CP", cp_url)
            .env("TG_SIDECAR", sidecar_url)
            .env("TG_INTEGRATION_KEY", integration)
            .env("TG_ADMIN_KEY", admin)
            .env("TG_SCREENSHOTS", &screenshots)
            .env("TG_CHROMIUM", chromium)
            .env("TG_CHROMEDRIVER", chromedriver)
            .output()
            .expect("python3 runs the browser script")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    assert!(output.status.success(), "browser walk-through failed:\n{stdout}\n{stderr}");
    sidecar.stop().await;
    server.stop().await;
}
