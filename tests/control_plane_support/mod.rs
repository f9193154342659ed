//! Shared helpers for the control-plane tests: a control plane on 127.0.0.1:0 over a
//! temporary data directory and the shipped catalog, API keys, and a sidecar subscribed to it.
//! With `TOLLGATE_TEST_DATABASE_URL` set (`postgres://postgres@127.0.0.1:5432/test`) every
//! control plane keeps its repository in a PostgreSQL database of its own, created for its data
//! directory (a restart on the same directory finds it again) and dropped when it stops.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;

use tollgate_control_plane::store::Repository;
use tollgate_control_plane::{self as control_plane, Config as ControlPlaneConfig, ControlPlane, Database};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_sidecar::Sidecar;
use tollgate_sidecar::app::{App, Listeners};
use tollgate_sidecar::config::{Config, SourceConfig};
use tollgate_snapshot::TrustedKeys;

use crate::common::{Client, Reply, repo_root};

pub fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A running control plane; `stop` shuts it down.
pub struct TestControlPlane {
    pub addr: SocketAddr,
    pub control_plane: Arc<ControlPlane>,
    pub data_dir: PathBuf,
    pub database: Database,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The environment variable that points the tests at a PostgreSQL server.
pub const TEST_DATABASE_URL: &str = "TOLLGATE_TEST_DATABASE_URL";

/// The server's URL when the tests run against PostgreSQL.
pub fn postgres_url() -> Option<String> {
    std::env::var(TEST_DATABASE_URL).ok().filter(|url| !url.is_empty())
}

/// The file in a data directory naming the PostgreSQL database made for it.
const DATABASE_MARKER: &str = "postgres-database";

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail.split_once('?').map(|(_, query)| format!("?{query}")).unwrap_or_default();
    format!("{scheme}://{authority}/{name}{query}")
}

/// Runs `statements` one by one on the server of `url` (its own database), from a thread of
/// its own so that it works inside and outside a runtime.
pub fn run_admin(url: &str, statements: Vec<String>) -> Result<Vec<String>, String> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|error| error.to_string())?;
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|error| {
                let cause = std::error::Error::source(&error).map(|cause| format!(": {cause}")).unwrap_or_default();
                format!("cannot reach PostgreSQL at {TEST_DATABASE_URL}: {error}{cause}")
            })?;
            let driver = tokio::spawn(connection);
            let mut names = Vec::new();
            for statement in statements {
                let rows = client.simple_query(&statement).await.map_err(|error| format!("`{statement}`: {error:?}"))?;
                for message in rows {
                    if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                        names.extend(row.get(0).map(str::to_string));
                    }
                }
            }
            drop(client);
            let _ = driver.await;
            Ok(names)
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL admin thread panicked".to_string())?
}

/// Drops the test databases left by test processes that are gone (killed, or stopped
/// without `stop`), once per process.
fn collect_stale_databases(url: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(names) = run_admin(url, vec!["SELECT datname FROM pg_database WHERE datname LIKE 'tollgate_t_%'".into()]) else { return };
        let stale: Vec<String> = names
            .into_iter()
            .filter(|name| {
                let pid = name.trim_start_matches("tollgate_t_").split('_').next().unwrap_or_default();
                !Path::new("/proc").join(pid).exists()
            })
            .map(|name| format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .collect();
        let _ = run_admin(url, stale);
    });
}

/// Where a control plane on `data_dir` keeps its repository: SQLite in the directory, or with
/// `TOLLGATE_TEST_DATABASE_URL` a fresh PostgreSQL database (`tollgate_t_PID_N`), recorded in
/// the directory so that a restart on it opens the same one.
pub fn database_for(data_dir: &Path) -> Database {
    let Some(url) = postgres_url() else { return Database::Sqlite(data_dir.to_path_buf()) };
    let marker = data_dir.join(DATABASE_MARKER);
    if let Ok(name) = std::fs::read_to_string(&marker) {
        return Database::Postgres(with_database(&url, name.trim()));
    }
    collect_stale_databases(&url);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!("tollgate_t_{}_{}", std::process::id(), COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    run_admin(&url, vec![format!("CREATE DATABASE \"{name}\"")]).unwrap_or_else(|error| panic!("{TEST_DATABASE_URL} is set: {error}"));
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(&marker, &name).unwrap();
    Database::Postgres(with_database(&url, &name))
}

/// Drops the PostgreSQL database of `data_dir`, if it has one (best effort).
pub fn drop_database(data_dir: &Path) {
    let (Some(url), Ok(name)) = (postgres_url(), std::fs::read_to_string(data_dir.join(DATABASE_MARKER))) else { return };
    let _ = std::fs::remove_file(data_dir.join(DATABASE_MARKER));
    let _ = run_admin(&url, vec![format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", name.trim())]);
}

/// The repository of `data_dir`, as a control plane on it would open it.
pub fn open_repository(data_dir: &Path) -> Arc<dyn Repository> {
    control_plane::open_database(&database_for(data_dir)).unwrap()
}

/// The CLI arguments that point `tollgate control-plane keys|import` at the repository of
/// `data_dir`: `--data DIR`, or `--database URL` under PostgreSQL.
pub fn database_args(data_dir: &Path) -> Vec<std::ffi::OsString> {
    match database_for(data_dir) {
        Database::Sqlite(dir) => vec!["--data".into(), dir.into_os_string()],
        Database::Postgres(url) => vec!["--database".into(), url.into()],
    }
}

impl TestControlPlane {
    pub async fn start(data_dir: &Path) -> TestControlPlane {
        TestControlPlane::start_with(data_dir, signing_key(7), Vec::new()).await
    }

    pub async fn start_with(data_dir: &Path, key: SigningKey, retired: Vec<ed25519_dalek::VerifyingKey>) -> TestControlPlane {
        let database = database_for(data_dir);
        let control_plane = ControlPlane::open(&database, &repo_root().join("policies"), key, retired).unwrap();
        TestControlPlane::serve(control_plane, data_dir, database, "127.0.0.1:0").await
    }

    /// Like [`TestControlPlane::start`], listening on `addr` (a replica taking over an address
    /// a sidecar already knows).
    pub async fn start_on(data_dir: &Path, addr: SocketAddr) -> TestControlPlane {
        let database = database_for(data_dir);
        let control_plane = ControlPlane::open(&database, &repo_root().join("policies"), signing_key(7), Vec::new()).unwrap();
        TestControlPlane::serve(control_plane, data_dir, database, &addr.to_string()).await
    }

    /// Serves `control_plane` on `addr` until `stop`.
    async fn serve(control_plane: ControlPlane, data_dir: &Path, database: Database, addr: &str) -> TestControlPlane {
        let control_plane = Arc::new(control_plane);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(control_plane::run(
            Arc::clone(&control_plane),
            listener,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(2),
        ));
        TestControlPlane { addr, control_plane, data_dir: data_dir.to_path_buf(), database, stop, task }
    }

    pub fn key(&self, scope: &str, account: Option<&str>) -> String {
        control_plane::create_key(self.control_plane.repository.as_ref(), scope, account, self.control_plane.now()).unwrap()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Stops the control plane and drops its PostgreSQL database, if it has one.
    pub async fn stop(self) {
        let data_dir = self.data_dir.clone();
        self.stop_keeping_data().await;
        drop_database(&data_dir);
    }

    /// Stops the control plane and keeps its repository, for a restart on the same data
    /// directory.
    pub async fn stop_keeping_data(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

pub async fn get(client: &mut Client, path: &str, key: &str) -> Reply {
    client.send("GET", path, bytes::Bytes::new(), &[("authorization", &format!("Bearer {key}"))]).await
}

pub async fn send_json(client: &mut Client, method: &str, path: &str, key: &str, body: &serde_json::Value) -> Reply {
    let auth = format!("Bearer {key}");
    client.send(method, path, serde_json::to_vec(body).unwrap(), &[("authorization", &auth), ("content-type", "application/json")]).await
}

pub async fn post(client: &mut Client, path: &str, key: &str, body: &serde_json::Value) -> Reply {
    send_json(client, "POST", path, key, body).await
}

/// A sidecar ([`App`]) subscribed to a control plane, shipping usage to it; `stop` ends it.
pub struct TestSidecar {
    pub addr: SocketAddr,
    pub sidecar: Arc<Sidecar>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSidecar {
    pub async fn start(control_plane: SocketAddr, api_key: &str, trusted: TrustedKeys, data_dir: &Path) -> TestSidecar {
        TestSidecar::start_with(control_plane, api_key, trusted, data_dir, Arc::new(SystemClock), |_| {}).await
    }

    /// Like [`TestSidecar::start`], on `clock` and with the configuration adjusted by `configure`.
    pub async fn start_with(
        control_plane: SocketAddr,
        api_key: &str,
        trusted: TrustedKeys,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        configure: impl FnOnce(&mut Config),
    ) -> TestSidecar {
        let key_file = data_dir.join("api.key");
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(&key_file, api_key).unwrap();
        let source = SourceConfig::ControlPlane {
            url: format!("http://{control_plane}"),
            api_key_file: key_file,
            poll_wait: Duration::from_secs(5),
        };
        let mut config = Config::new(source, trusted);
        config.data_dir = Some(data_dir.to_path_buf());
        config.drain_timeout = Duration::from_secs(2);
        config.metering.flush_timeout = Duration::from_millis(500);
        configure(&mut config);
        let app = App::build(config, clock).unwrap();
        let sidecar = Arc::clone(app.sidecar());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(Listeners { api: listener, metrics: None }, async move {
            let _ = stopped.await;
        }));
        TestSidecar { addr, sidecar, stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    /// Polls `/v1/check` until `accept` holds for its answer, or panics after `limit`.
    pub async fn wait_for(
        &self,
        check: &serde_json::Value,
        limit: Duration,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        let mut client = Client::connect(self.addr).await;
        loop {
            let reply = client.post("/v1/check", check).await;
            if reply.status == 200 {
                let answer = reply.json();
                if accept(&answer) {
                    return answer;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "sidecar did not reach the expected answer within {limit:?}: {}", reply.text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub fn trusting(key: &SigningKey) -> TrustedKeys {
    TrustedKeys::new([key.verifying_key()])
}

impl TestControlPlane {
    /// Like [`TestControlPlane::start`], with the control plane's [`ControlPlaneConfig`] adjusted by
    /// `configure` (a webhook, a small usage page, a manual clock).
    pub async fn start_configured(data_dir: &Path, configure: impl FnOnce(&mut ControlPlaneConfig)) -> TestControlPlane {
        let mut config = ControlPlaneConfig::default();
        configure(&mut config);
        let database = database_for(data_dir);
        let control_plane =
            ControlPlane::open_with_config(&database, &repo_root().join("policies"), signing_key(7), Vec::new(), config).unwrap();
        TestControlPlane::serve(control_plane, data_dir, database, "127.0.0.1:0").await
    }
}
