//! The `tollgate` binary end to end: keygen, compile, inspect, check, and the sidecar
//! watching a snapshot file (atomic renames included), dev mode, bad configuration, and a
//! clean drain on SIGTERM.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate")).args(args).env("TOLLGATE_LOG", "warn").output().unwrap()
}

fn ok(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Running {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("sidecar")
            .args(["--listen", &listen, "--watch-interval-ms", "50"])
            .args(args)
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let addr = listen.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "sidecar did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Running { child, addr }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sidecar did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for_revision(client: &mut common::Client, revision: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get("/v1/status").await.json();
        if status["revision"] == revision {
            return;
        }
        assert!(Instant::now() < deadline, "revision {revision} never served; status {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn keygen_compile_inspect_check() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&tollgate(&["keygen", "--out", path(&keys)]));
    let secret = keys.join("tollgate.key");
    assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!tollgate(&["keygen", "--out", path(&keys)]).status.success(), "keygen must not overwrite a key");

    let snapshot = dir.path().join("snapshot.bin");
    let policies = common::repo_root().join("policies");
    ok(&tollgate(&["compile", path(&policies), "--key", path(&secret), "--out", path(&snapshot), "--revision", "77"]));
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(&tollgate(&["inspect", path(&snapshot), "--trust-key", path(&keys.join("tollgate.pub"))]))).unwrap();
    assert_eq!(inspected["revision"], 77);
    assert_eq!(inspected["counts"]["accounts"], 10);
    assert_eq!(inspected["signature"]["ok"], true);

    let other = dir.path().join("other");
    ok(&tollgate(&["keygen", "--out", path(&other)]));
    let wrong = tollgate(&["inspect", path(&snapshot), "--trust-key", path(&other.join("tollgate.pub"))]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("not trusted"));

    let answer: serde_json::Value = serde_json::from_str(&ok(&tollgate(&[
        "check",
        "--snapshot",
        path(&snapshot),
        "--trust-key",
        path(&keys.join("tollgate.pub")),
        "--account",
        "acme",
        "--feature",
        "export",
        "--user",
        "carol",
        "--now",
        "2026-11-28T00:00:00Z",
    ])))
    .unwrap();
    assert_eq!(answer["reason"], "role_forbidden");
    assert_eq!(answer["revision"], 77);

    let untrusted = tollgate(&[
        "check",
        "--snapshot",
        path(&snapshot),
        "--trust-key",
        path(&other.join("tollgate.pub")),
        "--account",
        "acme",
        "--feature",
        "sso",
    ]);
    assert!(!untrusted.status.success());

    // Compile-time revisions grow by default.
    ok(&tollgate(&["compile", path(&policies), "--key", path(&secret), "--out", path(&snapshot)]));
    let later: serde_json::Value = serde_json::from_str(&ok(&tollgate(&["inspect", path(&snapshot)]))).unwrap();
    assert!(later["revision"].as_u64().unwrap() > 1_700_000_000_000);
}

#[test]
fn bad_configuration_exits_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("policies");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("catalog.toml"), "[features.x]\nmeter = \"missing\"\n").unwrap();
    let output = tollgate(&["sidecar", "--listen", "127.0.0.1:0", "--policies", path(&broken)]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("catalog.toml:2: feature `x` names unknown meter `missing`"), "{stderr}");

    let no_key = tollgate(&["sidecar", "--snapshot", "/nonexistent"]);
    assert!(!no_key.status.success());
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("--trust-key"));

    let garbage_key = dir.path().join("bad.pub");
    std::fs::write(&garbage_key, "not a key").unwrap();
    let bad_key = tollgate(&["sidecar", "--snapshot", "/nonexistent", "--trust-key", path(&garbage_key)]);
    assert!(String::from_utf8_lossy(&bad_key.stderr).contains("is not a key file"), "{}", String::from_utf8_lossy(&bad_key.stderr));

    // Key files say what they hold, and each flag refuses the other kind by name.
    let keys = dir.path().join("keys");
    ok(&tollgate(&["keygen", "--out", path(&keys)]));
    let (secret, public) = (keys.join("tollgate.key"), keys.join("tollgate.pub"));
    let signs_with_public = tollgate(&["compile", "policies", "--key", path(&public), "--out", path(&dir.path().join("s.tgs"))]);
    assert!(!signs_with_public.status.success());
    let stderr = String::from_utf8_lossy(&signs_with_public.stderr);
    assert!(stderr.contains("holds a public key, but a secret (private) key is needed"), "{stderr}");
    let trusts_a_secret = tollgate(&["sidecar", "--snapshot", "/nonexistent", "--trust-key", path(&secret)]);
    assert!(!trusts_a_secret.status.success());
    let stderr = String::from_utf8_lossy(&trusts_a_secret.stderr);
    assert!(stderr.contains("holds a secret (private) key, but a public key is needed"), "{stderr}");
    let again = tollgate(&["keygen", "--out", path(&keys)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"), "{}", String::from_utf8_lossy(&again.stderr));
    let before = std::fs::read(&public).unwrap();
    ok(&tollgate(&["keygen", "--out", path(&keys), "--force"]));
    assert_ne!(std::fs::read(&public).unwrap(), before, "--force writes a new pair");

    let bad_listen = tollgate(&["sidecar", "--listen", "localhost", "--policies", "policies"]);
    assert!(String::from_utf8_lossy(&bad_listen.stderr).contains("`--listen`"));
}

#[test]
fn control_plane_import_loads_a_generated_directory_once_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let data = dir.path().join("data");
    ok(&tollgate(&["gen", "--accounts", "40", "--out", path(&policies)]));
    let first = ok(&tollgate(&["control-plane", "import", "--data", path(&data), path(&policies)]));
    assert!(first.contains("imported 40 accounts") && first.contains("40 created, 0 updated, 0 unchanged (revision 1)"), "{first}");
    let second = ok(&tollgate(&["control-plane", "import", "--data", path(&data), path(&policies)]));
    assert!(second.contains("0 created, 0 updated, 40 unchanged (revision 1)"), "{second}");

    let broken = dir.path().join("broken");
    ok(&tollgate(&["gen", "--accounts", "40", "--out", path(&broken)]));
    let file = broken.join("accounts/accounts-00000.toml");
    let text = std::fs::read_to_string(&file).unwrap().replacen("seats = 5", "seats = -5", 1);
    let line = text.lines().position(|line| line == "seats = -5").unwrap() + 1;
    std::fs::write(&file, text).unwrap();
    let fresh = dir.path().join("fresh");
    let output = tollgate(&["control-plane", "import", "--data", path(&fresh), path(&broken)]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("accounts-00000.toml:{line}: license `acct-0-1` of account `acct-0` has `seats` = -5")), "{stderr}");
    let empty = ok(&tollgate(&["control-plane", "import", "--data", path(&fresh), path(&policies)]));
    assert!(empty.contains("40 created") && empty.contains("(revision 1)"), "the refused import wrote nothing: {empty}");
}

#[tokio::test]
async fn sidecar_follows_a_watched_snapshot_file_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&tollgate(&["keygen", "--out", path(&keys)]));
    let secret = keys.join("tollgate.key");
    let public = keys.join("tollgate.pub");
    let snapshot = dir.path().join("snapshot.bin");
    let policies = common::repo_root().join("policies");

    // Starts unready with no file, then picks one up when it appears.
    let sidecar = Running::start(&["--trust-key", path(&public), "--snapshot", path(&snapshot)]);
    let mut client = common::Client::connect(sidecar.addr).await;
    assert_eq!(client.get("/readyz").await.status, 503);
    ok(&tollgate(&["compile", path(&policies), "--key", path(&secret), "--out", path(&snapshot), "--revision", "1"]));
    wait_for_revision(&mut client, 1).await;
    assert_eq!(client.get("/readyz").await.status, 200);

    // `compile` replaces the file by an atomic rename.
    ok(&tollgate(&["compile", path(&policies), "--key", path(&secret), "--out", path(&snapshot), "--revision", "2"]));
    wait_for_revision(&mut client, 2).await;

    // A file written in place is picked up too.
    let staged = dir.path().join("staged.bin");
    ok(&tollgate(&["compile", path(&policies), "--key", path(&secret), "--out", path(&staged), "--revision", "3"]));
    std::fs::copy(&staged, &snapshot).unwrap();
    wait_for_revision(&mut client, 3).await;

    // Garbage is rejected; revision 3 keeps serving. (The missing file at start-up already
    // counted as one reject.)
    let rejects_before = client.get("/v1/status").await.json()["rejects"].as_u64().unwrap();
    std::fs::write(&snapshot, b"this is not a tollgate snapshot").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get("/v1/status").await.json();
        if status["rejects"].as_u64().unwrap() > rejects_before {
            assert_eq!(status["revision"], 3);
            assert!(status["last_error"].as_str().unwrap().contains("magic"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "garbage was never noticed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await.json()["revision"], 3);
    drop(client);

    let status = sidecar.terminate();
    assert!(status.success(), "sidecar exited with {status}");
}

#[tokio::test]
async fn dev_mode_recompiles_when_policies_change() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(policies.join("accounts")).unwrap();
    std::fs::write(
        policies.join("catalog.toml"),
        "[features.sso]\n[features.reports]\n[[plans]]\nid = \"pro\"\nfeatures = [\"reports\"]\n",
    )
    .unwrap();
    std::fs::write(policies.join("accounts/a.toml"), "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"pro\"\n").unwrap();
    let sidecar = Running::start(&["--policies", path(&policies)]);
    let mut client = common::Client::connect(sidecar.addr).await;
    assert_eq!(client.post("/v1/check", &json!({"account": "a", "feature": "sso"})).await.json()["reason"], "not_entitled");
    let first = client.get("/v1/status").await.json()["revision"].as_u64().unwrap();

    // Edits land by rename, as editors and `kubectl cp` do: a watcher never sees half a file.
    let replace = |text: &str| {
        let staged = dir.path().join("catalog.toml.new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, policies.join("catalog.toml")).unwrap();
    };
    replace("[features.sso]\n[features.reports]\n[[plans]]\nid = \"pro\"\nfeatures = [\"reports\", \"sso\"]\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = client.post("/v1/check", &json!({"account": "a", "feature": "sso"})).await.json();
        if answer["allow"] == true {
            assert!(answer["revision"].as_u64().unwrap() > first);
            break;
        }
        assert!(Instant::now() < deadline, "the policy change was never served");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A broken edit is rejected and the last good policies keep serving.
    let rejects_before = client.get("/v1/status").await.json()["rejects"].as_u64().unwrap();
    replace("[features.sso\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get("/v1/status").await.json();
        if status["rejects"].as_u64().unwrap() > rejects_before {
            assert!(status["last_error"].as_str().unwrap().contains("catalog.toml:1"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.post("/v1/check", &json!({"account": "a", "feature": "sso"})).await.json()["allow"], true);
    drop(client);
    assert!(sidecar.terminate().success());
}

#[tokio::test]
async fn a_metrics_listener_serves_metrics_and_probes_only() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let policies = common::repo_root().join("policies");
    let sidecar = Running::start(&["--policies", path(&policies), "--metrics-listen", &metrics_addr]);
    let mut api = common::Client::connect(sidecar.addr).await;
    assert_eq!(api.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await.json()["allow"], true);
    let mut metrics = common::Client::connect(metrics_addr.parse().unwrap()).await;
    let scraped = metrics.get("/metrics").await;
    assert_eq!(scraped.status, 200);
    assert!(scraped.text().contains(r#"tollgate_decisions_total{result="allow",reason="ok"} 1"#), "{}", scraped.text());
    assert_eq!(metrics.get("/readyz").await.status, 200);
    let refused = metrics.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await;
    assert_eq!(refused.status, 404, "the decision API is not on the metrics listener");
    drop((api, metrics));
    assert!(sidecar.terminate().success());
}

#[test]
fn errors_name_each_cause_once_and_logs_carry_no_colour_codes_off_a_terminal() {
    let output = tollgate(&["sidecar", "--snapshot", "/nonexistent", "--trust-key", "/nonexistent"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("error: "), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "the OS error is printed once: {stderr}");

    // Logs are written before the failure here (no `--data-dir`, a broken catalog).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("catalog.toml"), "[features.x]\nmeter = \"missing\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["sidecar", "--listen", "127.0.0.1:0", "--policies", path(dir.path())])
        .env("TOLLGATE_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("WARN"), "expected a log line: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in a pipe: {stderr:?}");
}

#[tokio::test]
async fn flags_can_come_from_environment_variables() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("sidecar")
        .env("TOLLGATE_LOG", "warn")
        .env("TOLLGATE_LISTEN", &listen)
        .env("TOLLGATE_POLICIES", common::repo_root().join("policies"))
        .env("TOLLGATE_MAX_BODY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the sidecar exited: it did not take its flags from the environment");
        assert!(Instant::now() < deadline, "nothing listened on `TOLLGATE_LISTEN`");
        std::thread::sleep(Duration::from_millis(20));
    }
    let running = Running { child, addr };
    let mut client = common::Client::connect(running.addr).await;
    assert_eq!(client.post("/v1/check", &json!({"account": "acme", "feature": "sso"})).await.json()["allow"], true);
    let too_big = client.post("/v1/check", &json!({"account": "acme", "feature": "sso", "user": "x".repeat(200)})).await;
    assert_eq!(too_big.status, 413, "`TOLLGATE_MAX_BODY` was taken: {}", too_big.text());
    // `--help` names each variable.
    let help = Command::new(env!("CARGO_BIN_EXE_tollgate")).args(["sidecar", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("[env: TOLLGATE_LISTEN="));
    drop(client);
    assert!(running.terminate().success());
}

#[test]
fn a_boolean_flag_turned_off_in_the_environment_requires_nothing() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["sidecar", "--listen", "127.0.0.1:0", "--policies", "/nonexistent"])
            .env("TOLLGATE_LOG", "warn")
            .env("TOLLGATE_UNREADY_WHEN_STALE", value)
            .output()
            .unwrap()
    };
    // Off: the flags are fine, and the start fails on the missing policies (exit 1).
    let off = run("false");
    let stderr = String::from_utf8_lossy(&off.stderr);
    assert_eq!(off.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("--max-staleness"), "{stderr}");
    // On: `--unready-when-stale` still needs `--max-staleness` (a usage error, exit 2).
    let on = run("true");
    let stderr = String::from_utf8_lossy(&on.stderr);
    assert_eq!(on.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-staleness"), "{stderr}");
}
