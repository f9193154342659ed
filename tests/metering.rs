//! Metering that loses nothing, end to end with real processes: sidecars with a durable usage
//! log are killed with SIGKILL while clients send uniquely identified events, the control
//! plane is stopped and started again, events are replayed, and two sidecars share one hard
//! limit. Every count is checked against what clients were told: an acknowledged event is
//! counted exactly once, and pods together stay within the documented overshoot bound. The
//! same harness kills the control plane in the middle of a burst of orders: every order it
//! acknowledged is still there after the restart, and a subscribed sidecar catches up.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOLLGATE: &str = env!("CARGO_BIN_EXE_tollgate");

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 exchange on a fresh connection; `Err` when the server is not there (killed).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>, key: Option<&str>) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.map(|body| serde_json::to_vec(body).unwrap()).unwrap_or_default();
    let auth = key.map(|key| format!("authorization: Bearer {key}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{auth}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {text}")))?;
    let status: u16 = head.split(' ').nth(1).and_then(|code| code.parse().ok()).ok_or_else(|| std::io::Error::other(head.to_string()))?;
    let body = if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(Value::String(body.to_string())) };
    Ok((status, body))
}

fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("process exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "nothing listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `tollgate` process that is killed when dropped.
struct Process {
    child: Child,
}

impl Process {
    fn spawn(args: &[String], addr: SocketAddr) -> Process {
        let mut child =
            Command::new(TOLLGATE).args(args).env("TOLLGATE_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        wait_listening(addr, &mut child);
        Process { child }
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control plane's files: keys, data directory and the address it keeps across restarts.
struct ControlPlaneSetup {
    dir: PathBuf,
    addr: SocketAddr,
    integration_key: String,
    sidecar_key_file: PathBuf,
}

impl ControlPlaneSetup {
    fn new(root: &Path) -> ControlPlaneSetup {
        let dir = root.join("control-plane");
        let output = Command::new(TOLLGATE).args(["keygen", "--out"]).arg(dir.join("keys")).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let key = |scope: &str| {
            let output = Command::new(TOLLGATE)
                .args(["control-plane", "keys", "create", "--data"])
                .arg(dir.join("data"))
                .args(["--scope", scope])
                .output()
                .unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap().trim().to_string()
        };
        let integration_key = key("integration");
        let sidecar_key_file = dir.join("sidecar.key");
        std::fs::write(&sidecar_key_file, key("sidecar")).unwrap();
        ControlPlaneSetup { addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(), dir, integration_key, sidecar_key_file }
    }

    fn start(&self) -> Process {
        let args: Vec<String> = vec![
            "control-plane".into(),
            "--data".into(),
            self.dir.join("data").display().to_string(),
            "--policies".into(),
            repo_root().join("policies").display().to_string(),
            "--signing-key".into(),
            self.dir.join("keys/tollgate.key").display().to_string(),
            "--listen".into(),
            self.addr.to_string(),
        ];
        let process = Process::spawn(&args, self.addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http(self.addr, "GET", "/readyz", None, None), Ok((200, _))) {
            assert!(Instant::now() < deadline, "control plane never turned ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    fn order(&self, order_id: &str, account: &str, plan: &str) {
        let body = json!({"order_id": order_id, "action": "new", "account": account, "plan": plan, "seats": 5});
        let (status, answer) = http(self.addr, "POST", "/v1/orders", Some(&body), Some(&self.integration_key)).unwrap();
        assert_eq!(status, 200, "{answer}");
    }

    /// The control plane's count of `meter` for `account` in the current period.
    fn used(&self, account: &str, meter: &str) -> u64 {
        let (status, answer) = http(self.addr, "GET", &format!("/v1/accounts/{account}/usage"), None, Some(&self.integration_key)).unwrap();
        assert_eq!(status, 200, "{answer}");
        answer["meters"].as_array().unwrap().iter().find(|row| row["meter"] == meter).map_or(0, |row| row["used"].as_u64().unwrap())
    }

    /// Waits until the control plane counts `expected`, and checks it stays there.
    fn wait_used(&self, account: &str, meter: &str, expected: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let used = self.used(account, meter);
            if used == expected {
                break;
            }
            assert!(used < expected, "control plane counts {used}, more than the {expected} acknowledged events");
            assert!(Instant::now() < deadline, "control plane counts {used}, expected {expected}");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(self.used(account, meter), expected, "a late shipment counted something twice");
    }
}

fn sidecar_args(addr: SocketAddr, data_dir: &Path, setup: Option<&ControlPlaneSetup>, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        vec!["sidecar".into(), "--listen".into(), addr.to_string(), "--data-dir".into(), data_dir.display().to_string()];
    match setup {
        Some(setup) => args.extend([
            "--control-plane".into(),
            format!("http://{}", setup.addr),
            "--api-key-file".into(),
            setup.sidecar_key_file.display().to_string(),
            "--trust-key".into(),
            setup.dir.join("keys/tollgate.pub").display().to_string(),
        ]),
        None => args.extend(["--policies".into(), repo_root().join("policies").display().to_string()]),
    }
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

fn start_sidecar(addr: SocketAddr, data_dir: &Path, setup: Option<&ControlPlaneSetup>, extra: &[&str]) -> Process {
    let process = Process::spawn(&sidecar_args(addr, data_dir, setup, extra), addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http(addr, "GET", "/readyz", None, None), Ok((200, _))) {
        assert!(Instant::now() < deadline, "sidecar never turned ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    process
}

fn meter(addr: SocketAddr, account: &str, id: &str) -> std::io::Result<(u16, Value)> {
    http(addr, "POST", "/v1/meter", Some(&json!({"account": account, "meter": "api_calls", "amount": 1, "id": id})), None)
}

/// What clients were told, by event id.
#[derive(Default)]
struct Ledger {
    acknowledged: BTreeSet<String>,
    refused: BTreeSet<String>,
    unanswered: BTreeSet<String>,
}

/// `n_clients` threads send events `{prefix}-{client}-{n}` to `addr` until `stop` is set or
/// `per_client` are sent; every answer is written to the ledger.
fn send_events(
    addr: SocketAddr,
    account: &str,
    prefix: &str,
    n_clients: usize,
    per_client: usize,
    ledger: &Arc<Mutex<Ledger>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n_clients)
        .map(|client| {
            let (ledger, account, prefix) = (Arc::clone(ledger), account.to_string(), prefix.to_string());
            std::thread::spawn(move || {
                for n in 0..per_client {
                    let id = format!("{prefix}-{client}-{n}");
                    let answer = meter(addr, &account, &id);
                    let mut ledger = ledger.lock().unwrap();
                    match answer {
                        Ok((200, answer)) if answer["accepted"] == true => {
                            assert_eq!(answer["durable"], true);
                            ledger.acknowledged.insert(id);
                        }
                        Ok((200, _)) => {
                            ledger.refused.insert(id);
                        }
                        _ => {
                            ledger.unanswered.insert(id);
                            // The sidecar is gone; stop this client.
                            return;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Sends every unanswered event again (same ids) until each is answered: the client's side of
/// at-least-once delivery.
fn retry_unanswered(addr: SocketAddr, account: &str, ledger: &Arc<Mutex<Ledger>>) {
    let unanswered: Vec<String> = std::mem::take(&mut ledger.lock().unwrap().unanswered).into_iter().collect();
    for id in unanswered {
        let (status, answer) = meter(addr, account, &id).unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["accepted"], true, "{answer}");
        ledger.lock().unwrap().acknowledged.insert(id);
    }
}

fn local_used(addr: SocketAddr, account: &str) -> u64 {
    let (status, answer) = http(addr, "GET", &format!("/v1/entitlements/{account}"), None, None).unwrap();
    assert_eq!(status, 200, "{answer}");
    answer["meters"].as_array().unwrap().iter().find(|row| row["meter"] == "api_calls").unwrap()["used"].as_u64().unwrap()
}

#[test]
fn acknowledged_events_survive_kill_9_without_a_control_plane() {
    let temporary = tempfile::tempdir().unwrap();
    let data_dir = temporary.path().join("sidecar");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = start_sidecar(addr, &data_dir, None, &[]);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let clients = send_events(addr, "stark", "local", 4, 100_000, &ledger);
    // Kill in mid-stream, once a good number of events are in.
    while ledger.lock().unwrap().acknowledged.len() < 400 {
        std::thread::sleep(Duration::from_millis(5));
    }
    sidecar.kill_9();
    for client in clients {
        client.join().unwrap();
    }
    let before_restart = ledger.lock().unwrap().acknowledged.len() as u64;

    let sidecar = start_sidecar(addr, &data_dir, None, &[]);
    // Every acknowledged event is counted again, none twice; unanswered ones may or may not
    // have reached the disk, so their retries settle them either way.
    let counted = local_used(addr, "stark");
    let n_unanswered = ledger.lock().unwrap().unanswered.len() as u64;
    assert!(counted >= before_restart && counted <= before_restart + n_unanswered, "counted {counted}, acknowledged {before_restart}");
    retry_unanswered(addr, "stark", &ledger);
    let acknowledged = ledger.lock().unwrap().acknowledged.clone();
    assert_eq!(local_used(addr, "stark"), acknowledged.len() as u64);
    // A replay of an acknowledged id after the restart is a duplicate.
    let (_, replay) = meter(addr, "stark", acknowledged.iter().next().unwrap()).unwrap();
    assert_eq!(replay["duplicate"], true, "{replay}");
    assert_eq!(local_used(addr, "stark"), acknowledged.len() as u64);
    drop(sidecar);
}

#[test]
fn acknowledged_events_reach_the_control_plane_exactly_once_across_kill_9() {
    let temporary = tempfile::tempdir().unwrap();
    let setup = ControlPlaneSetup::new(temporary.path());
    let _control_plane = setup.start();
    setup.order("kill-1", "kill-co", "enterprise");
    let data_dir = temporary.path().join("sidecar");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = start_sidecar(addr, &data_dir, Some(&setup), &["--usage-sync-interval-ms", "50"]);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let clients = send_events(addr, "kill-co", "cp", 4, 100_000, &ledger);
    while ledger.lock().unwrap().acknowledged.len() < 600 {
        std::thread::sleep(Duration::from_millis(5));
    }
    sidecar.kill_9();
    for client in clients {
        client.join().unwrap();
    }
    let sidecar = start_sidecar(addr, &data_dir, Some(&setup), &["--usage-sync-interval-ms", "50"]);
    retry_unanswered(addr, "kill-co", &ledger);
    // A second wave after the restart, and replays of the first wave's ids.
    let clients = send_events(addr, "kill-co", "after", 2, 200, &ledger);
    for client in clients {
        client.join().unwrap();
    }
    let replayed: Vec<String> = ledger.lock().unwrap().acknowledged.iter().take(50).cloned().collect();
    for id in &replayed {
        let (_, answer) = meter(addr, "kill-co", id).unwrap();
        assert_eq!(answer["duplicate"], true, "{answer}");
    }
    let acknowledged = ledger.lock().unwrap().acknowledged.len() as u64;
    setup.wait_used("kill-co", "api_calls", acknowledged);
    drop(sidecar);
}

#[test]
fn a_stopped_control_plane_loses_nothing_and_sigterm_flushes() {
    let temporary = tempfile::tempdir().unwrap();
    let setup = ControlPlaneSetup::new(temporary.path());
    let control_plane = setup.start();
    setup.order("down-1", "down-co", "enterprise");
    let data_dir = temporary.path().join("sidecar");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = start_sidecar(addr, &data_dir, Some(&setup), &["--usage-sync-interval-ms", "50"]);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for client in send_events(addr, "down-co", "up", 2, 100, &ledger) {
        client.join().unwrap();
    }
    setup.wait_used("down-co", "api_calls", 200);

    // The control plane goes away; the sidecar keeps acknowledging from its log.
    control_plane.kill_9();
    for client in send_events(addr, "down-co", "down", 2, 150, &ledger) {
        client.join().unwrap();
    }
    assert!(ledger.lock().unwrap().unanswered.is_empty());
    assert_eq!(local_used(addr, "down-co"), 500, "quota checks see local usage while the control plane is down");
    let _control_plane = setup.start();
    setup.wait_used("down-co", "api_calls", 500);

    // With shipping slowed to a crawl, only the SIGTERM flush can deliver these.
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    let sidecar = start_sidecar(addr, &data_dir, Some(&setup), &["--usage-sync-interval-ms", "600000"]);
    for client in send_events(addr, "down-co", "flush", 1, 40, &ledger) {
        client.join().unwrap();
    }
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(setup.used("down-co", "api_calls"), 540, "SIGTERM shipped what the log held");
    assert_eq!(ledger.lock().unwrap().acknowledged.len(), 540);
}

#[test]
fn two_sidecars_sharing_a_hard_limit_stay_within_the_bound() {
    // Plan `free` allows 1000 api_calls a month (hard). With `--quota-local-share 0.02` each
    // sidecar holds at most 20 unsynced calls, so two of them overshoot by at most 20.
    const LIMIT: u64 = 1000;
    const SHARE: f64 = 0.02;
    const PODS: u64 = 2;
    let bound = ((LIMIT as f64 * SHARE).ceil() as u64) * (PODS - 1);
    let temporary = tempfile::tempdir().unwrap();
    let setup = ControlPlaneSetup::new(temporary.path());
    let _control_plane = setup.start();
    setup.order("quota-1", "quota-co", "free");
    let flags = ["--usage-sync-interval-ms", "100", "--quota-local-share", "0.02", "--quota-sync-wait-ms", "10000"];
    let sidecars: Vec<(SocketAddr, Process)> = (0..PODS)
        .map(|n| {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            (addr, start_sidecar(addr, &temporary.path().join(format!("sidecar-{n}")), Some(&setup), &flags))
        })
        .collect();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let clients: Vec<_> = sidecars
        .iter()
        .enumerate()
        .flat_map(|(n, (addr, _))| send_events(*addr, "quota-co", &format!("pod{n}"), 3, 700, &ledger))
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let ledger = ledger.lock().unwrap();
    assert!(ledger.unanswered.is_empty());
    let accepted = ledger.acknowledged.len() as u64;
    assert!(accepted >= LIMIT, "refusals came before the limit was reached: {accepted} accepted");
    assert!(accepted <= LIMIT + bound, "{accepted} accepted: overshoot {} is past the bound {bound}", accepted - LIMIT);
    assert!(!ledger.refused.is_empty());
    setup.wait_used("quota-co", "api_calls", accepted);
    println!("two sidecars, hard limit {LIMIT}: {accepted} accepted (overshoot {}, bound {bound})", accepted - LIMIT);
}

#[test]
fn a_control_plane_killed_mid_burst_keeps_every_acknowledged_order() {
    let temporary = tempfile::tempdir().unwrap();
    let setup = Arc::new(ControlPlaneSetup::new(temporary.path()));
    let control_plane = setup.start();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _sidecar = start_sidecar(addr, &temporary.path().join("sidecar"), Some(&setup), &[]);
    let acknowledged: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let writer = {
        let (setup, acknowledged) = (Arc::clone(&setup), Arc::clone(&acknowledged));
        std::thread::spawn(move || {
            for n in 0..100_000 {
                let order =
                    json!({"order_id": format!("burst-{n}"), "action": "new", "account": format!("burst-{n}"), "plan": "team", "seats": 3});
                match http(setup.addr, "POST", "/v1/orders", Some(&order), Some(&setup.integration_key)) {
                    Ok((200, answer)) => acknowledged.lock().unwrap().push((format!("burst-{n}"), answer)),
                    Ok((status, answer)) => panic!("order refused with {status}: {answer}"),
                    Err(_) => return,
                }
            }
        })
    };
    while acknowledged.lock().unwrap().len() < 60 {
        std::thread::sleep(Duration::from_millis(5));
    }
    control_plane.kill_9();
    writer.join().unwrap();
    let _control_plane = setup.start();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut newest = 0;
    for (account, answer) in &acknowledged {
        let (status, state) = http(setup.addr, "GET", &format!("/v1/accounts/{account}"), None, Some(&setup.integration_key)).unwrap();
        assert_eq!(status, 200, "acknowledged order for `{account}` was lost: {state}");
        // A replay returns the first answer, revision included.
        let order = json!({"order_id": account, "action": "new", "account": account, "plan": "team", "seats": 3});
        let (status, replay) = http(setup.addr, "POST", "/v1/orders", Some(&order), Some(&setup.integration_key)).unwrap();
        assert_eq!((status, &replay), (200, answer));
        newest = newest.max(answer["revision"].as_u64().unwrap());
    }
    // The subscribed sidecar reaches at least the newest acknowledged revision.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = http(addr, "GET", "/v1/status", None, None).unwrap();
        if status["snapshot"]["revision"].as_u64().is_some_and(|revision| revision >= newest) {
            break;
        }
        assert!(Instant::now() < deadline, "sidecar stuck at {} below {newest}", status["snapshot"]["revision"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = &acknowledged.last().unwrap().0;
    let (status, answer) = http(addr, "POST", "/v1/check", Some(&json!({"account": last, "feature": "dashboards"})), None).unwrap();
    assert_eq!((status, answer["allow"].clone()), (200, json!(true)), "{answer}");
}
