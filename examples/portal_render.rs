//! Measures the server's time to render two pages at scale: the customer portal's usage page
//! (the usage report with 12 periods of history, limits from the account compiled alone, SVG
//! charts, the template) and the console's account search by id prefix, against a repository
//! of N accounts (default 1,000,000, named `acct-0` … like `tollgate gen`). Pages are rendered
//! through `portal::render`, the function the HTTP handler calls on the blocking pool, so the
//! times are the server's own, without the socket.
//!
//! cargo run --release --example portal_render -- [N_ACCOUNTS] [DATA_DIR]
//!
//! The repository is built once in DATA_DIR (default: a temporary directory) by writing account
//! documents in large transactions, which is what a million orders would leave behind; an
//! existing DATA_DIR with accounts is reused. Prints one JSON object.
#![allow(clippy::disallowed_methods, reason = "a measurement reads the wall clock")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use http_body_util::BodyExt;

use tollgate_control_plane::portal::{self, WebRequest};
use tollgate_control_plane::store::{self, AccountDoc, LicenseDoc, Repository, Scope, UserDoc};
use tollgate_control_plane::{Caller, ControlPlane};

const ITERATIONS: usize = 300;
const WRITE_BATCH: usize = 50_000;

fn account(idx: usize) -> AccountDoc {
    let plans = ["free", "team", "business", "enterprise"];
    let mut users = BTreeMap::new();
    for user_idx in 0..3 {
        let roles = if user_idx == 0 { vec!["admin".to_string()] } else { vec!["member".to_string()] };
        users.insert(format!("user-{user_idx}"), UserDoc { roles, groups: Vec::new(), seat: true });
    }
    AccountDoc {
        next_license: 2,
        licenses: vec![LicenseDoc {
            id: format!("acct-{idx}-1"),
            plan: plans[idx % plans.len()].to_string(),
            seats: 5,
            max_devices: Some(3),
            ..LicenseDoc::default()
        }],
        users,
        ..AccountDoc::default()
    }
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn body_text(response: tollgate_control_plane::api::HttpResponse) -> (u16, Vec<String>, String) {
    let status = response.status().as_u16();
    let cookies = response.headers().get_all("set-cookie").iter().map(|value| value.to_str().unwrap().to_string()).collect();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, cookies, String::from_utf8_lossy(&body).into_owned())
}

fn cookie(cookies: &[String], name: &str) -> String {
    cookies
        .iter()
        .find(|cookie| cookie.starts_with(&format!("{name}=")))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
}

fn csrf(page: &str) -> String {
    let marker = r#"name="csrf" value=""#;
    let start = page.find(marker).unwrap() + marker.len();
    page[start..].split('"').next().unwrap().to_string()
}

/// Milliseconds of `ITERATIONS` renders of `request`, sorted; each must answer 200.
fn time(control_plane: &ControlPlane, request: impl Fn(usize) -> WebRequest) -> Vec<f64> {
    let mut times: Vec<f64> = (0..ITERATIONS)
        .map(|iteration| {
            let request = request(iteration);
            let started = Instant::now();
            let response = portal::render(control_plane, &request);
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(response.status(), 200);
            elapsed
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n_accounts: usize = args.next().map_or(1_000_000, |text| text.parse().expect("N_ACCOUNTS is a number"));
    let temporary = tempfile::tempdir().unwrap();
    let data_dir: PathBuf = args.next().map_or_else(|| temporary.path().to_path_buf(), PathBuf::from);
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    let build_started = Instant::now();
    {
        let repository = tollgate_control_plane::open_repository(&data_dir).unwrap();
        let existing = repository.account(&format!("acct-{}", n_accounts - 1)).unwrap().is_some();
        if !existing {
            for start in (0..n_accounts).step_by(WRITE_BATCH) {
                store::write(&repository, |transaction| {
                    for idx in start..(start + WRITE_BATCH).min(n_accounts) {
                        transaction.put_account(&format!("acct-{idx}"), &account(idx))?;
                    }
                    Ok::<_, store::StoreError>(())
                })
                .unwrap();
            }
        }
    }
    let build_seconds = build_started.elapsed().as_secs_f64();

    let key = tollgate_snapshot::generate_key().unwrap();
    let control_plane = ControlPlane::open(&data_dir, &repo_root.join("policies"), key, Vec::new()).unwrap();
    let now = control_plane.now();
    let target = format!("acct-{}", n_accounts / 2 + 1);

    // Twelve months of usage for the account whose page is rendered.
    let events: Vec<serde_json::Value> = (0..12)
        .map(|month| {
            let at = tollgate_core::period::format_rfc3339(now - month * 30 * 86_400 - 60);
            serde_json::json!({"account": target, "meter": "api_calls", "id": format!("bench-{month}"), "amount": 100 + month * 37, "at": at})
        })
        .collect();
    let batch = serde_json::json!({"sidecar": "bench", "since": 0, "events": events});
    tollgate_control_plane::ingest::ingest(&control_plane, batch.to_string().as_bytes(), now).unwrap();

    // A portal session for the usage page, a console session for the search.
    let integration = Caller { key_id: "bench".into(), scope: Scope::Integration, account: None };
    let link = portal::create_link(
        &control_plane,
        &integration,
        None,
        serde_json::json!({"account": target, "user": "user-0"}).to_string().as_bytes(),
    )
    .unwrap();
    let token = link["url"].as_str().unwrap().split("token=").nth(1).unwrap().to_string();
    let (status, cookies, _) =
        body_text(portal::render(&control_plane, &WebRequest::synthetic(false, "/portal/enter", &format!("token={token}"), &[], ""))).await;
    assert_eq!(status, 200);
    let portal_session = cookie(&cookies, "tg_portal");

    let admin = tollgate_control_plane::create_key(control_plane.repository.as_ref(), "admin", None, now).unwrap();
    let (_, cookies, page) = body_text(portal::render(&control_plane, &WebRequest::synthetic(false, "/console", "", &[], ""))).await;
    let signin_cookie = cookie(&cookies, "tg_console_signin");
    let form = format!("csrf={}&person=bench&key={admin}", csrf(&page));
    let signin = WebRequest::synthetic(true, "/console/signin", "", &[("tg_console_signin", &signin_cookie)], &form);
    let (status, cookies, _) = body_text(portal::render(&control_plane, &signin)).await;
    assert_eq!(status, 303);
    let console_session = cookie(&cookies, "tg_console");

    let usage_path = format!("/portal/accounts/{target}/usage");
    let usage = time(&control_plane, |_| WebRequest::synthetic(false, &usage_path, "", &[("tg_portal", &portal_session)], ""));
    // Prefixes of a few ids (`acct-123456` lists one account and the ten below it; `acct-9`
    // lists the first 50 of about a tenth of them), spread over the key space.
    let search = time(&control_plane, |iteration| {
        let idx = (iteration * 7_919 * 1_009) % n_accounts;
        let id = format!("acct-{idx}");
        let prefix = &id[..id.len() - iteration % 4];
        WebRequest::synthetic(false, "/console/accounts", &format!("q={prefix}"), &[("tg_console", &console_session)], "")
    });
    let figures = |times: &[f64]| serde_json::json!({"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99), "max_ms": percentile(times, 1.0)});
    println!(
        "{}",
        serde_json::json!({
            "accounts": n_accounts,
            "build_seconds": build_seconds,
            "iterations": ITERATIONS,
            "usage_page": figures(&usage),
            "console_search": figures(&search),
        })
    );
}
