//! The `tollgate` command line: keygen, compile, inspect, check, gen, sidecar, and the probes
//! health and ready. Parses arguments, reads files, and hands off to the library; bad
//! configuration exits non-zero before anything serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use tollgate_core::engine::{NoUsage, Request, decide};
use tollgate_protocol::DecisionJson;
use tollgate_sidecar::app::{App, Listeners};
use tollgate_sidecar::config::{Config, MeteringSettings, SourceConfig, Staleness};
use tollgate_sidecar::source::Source;
use tollgate_snapshot::{self as snapshot, Snapshot, TrustedKeys};

#[cfg(feature = "control-plane")]
use tollgate_control_plane::Database;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Entitlement decisions from signed policy snapshots")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 key pair as DIR/tollgate.key (secret, mode 0600) and DIR/tollgate.pub.
    Keygen {
        /// Directory to write the key pair into (created if missing).
        #[arg(long, env = "TOLLGATE_KEYGEN_OUT")]
        out: PathBuf,
        /// Replace a key pair already in the directory (the old secret key is gone for good).
        #[arg(long, env = "TOLLGATE_KEYGEN_FORCE")]
        force: bool,
    },
    /// Compile a policies directory into a signed snapshot file.
    Compile {
        /// The policies directory (`catalog.toml` and `accounts/`).
        policy_dir: PathBuf,
        /// Secret key file written by `tollgate keygen`.
        #[arg(long, env = "TOLLGATE_COMPILE_KEY")]
        key: PathBuf,
        /// Where to write the signed snapshot.
        #[arg(long, env = "TOLLGATE_COMPILE_OUT")]
        out: PathBuf,
        /// Revision number; defaults to the current time in milliseconds, so it grows.
        #[arg(long, env = "TOLLGATE_COMPILE_REVISION")]
        revision: Option<u64>,
    },
    /// Print a base or delta snapshot's header and whether its signature verifies.
    Inspect {
        /// The snapshot file (a base, or a delta from a control plane).
        file: PathBuf,
        /// Public key to verify against.
        #[arg(long, env = "TOLLGATE_INSPECT_TRUST_KEY")]
        trust_key: Vec<PathBuf>,
    },
    /// Answer one decision from a snapshot, as JSON.
    Check {
        /// A signed snapshot file to decide from (with `--trust-key`).
        #[arg(long, env = "TOLLGATE_CHECK_SNAPSHOT")]
        snapshot: Option<PathBuf>,
        /// Compile this policies directory in-process instead of reading a snapshot.
        #[arg(long, env = "TOLLGATE_CHECK_POLICIES", conflicts_with = "snapshot")]
        policies: Option<PathBuf>,
        /// Public key(s) whose signatures are trusted; repeat for several.
        #[arg(long, env = "TOLLGATE_CHECK_TRUST_KEY")]
        trust_key: Vec<PathBuf>,
        /// The account to decide for.
        #[arg(long, env = "TOLLGATE_CHECK_ACCOUNT")]
        account: String,
        /// The feature to check.
        #[arg(long, env = "TOLLGATE_CHECK_FEATURE")]
        feature: String,
        /// The user asking (seats and roles).
        #[arg(long, env = "TOLLGATE_CHECK_USER")]
        user: Option<String>,
        /// The region the request comes from.
        #[arg(long, env = "TOLLGATE_CHECK_REGION")]
        region: Option<String>,
        /// The device asking (device limits).
        #[arg(long, env = "TOLLGATE_CHECK_DEVICE")]
        device: Option<String>,
        /// Units of a metered feature the request would use.
        #[arg(long, env = "TOLLGATE_CHECK_AMOUNT")]
        amount: Option<u64>,
        /// Decide as of this instant (RFC 3339) instead of now.
        #[arg(long, env = "TOLLGATE_CHECK_NOW")]
        now: Option<String>,
    },
    /// Write a synthetic policies directory with N accounts (acct-0 …) for benches and load tests.
    Gen {
        /// How many accounts to write.
        #[arg(long, env = "TOLLGATE_GEN_ACCOUNTS")]
        accounts: usize,
        /// Directory to write the policies into.
        #[arg(long, env = "TOLLGATE_GEN_OUT")]
        out: PathBuf,
        /// How many features the catalog has.
        #[arg(long, env = "TOLLGATE_GEN_FEATURES", default_value_t = 64)]
        features: usize,
        /// Seed of the generator: the same seed writes the same policies.
        #[arg(long, env = "TOLLGATE_GEN_SEED", default_value_t = 1)]
        seed: u64,
    },
    /// Serve the decision API on localhost.
    Sidecar(Box<SidecarArgs>),
    #[cfg(feature = "control-plane")]
    /// Run the control plane (license repository, integration API, tokens, snapshot
    /// publishing), or manage its API keys.
    ControlPlane(Box<ControlPlaneArgs>),
    #[cfg(feature = "control-plane")]
    /// License tokens: verify one offline against a JWKS.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Liveness probe: exit 0 when the local sidecar answers `/healthz`, 1 otherwise.
    Health(ProbeArgs),
    /// Readiness probe: exit 0 when the local sidecar answers `/readyz` (a valid snapshot is
    /// loaded), 1 otherwise.
    Ready(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The sidecar's `--listen` address.
    #[arg(long, env = "TOLLGATE_PROBE_ADDR", default_value = "127.0.0.1:8181")]
    addr: String,
    /// Give up after this many milliseconds.
    #[arg(long, env = "TOLLGATE_PROBE_TIMEOUT_MS", default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(clap::Args)]
struct SidecarArgs {
    /// Address to listen on; loopback unless you mean otherwise.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:8181")]
    listen: String,
    /// Public key(s) whose signatures are trusted; repeat for several.
    #[arg(long, env = "TOLLGATE_TRUST_KEY")]
    trust_key: Vec<PathBuf>,
    /// A signed snapshot file, watched and reloaded when it changes.
    #[arg(long, env = "TOLLGATE_SNAPSHOT", required_unless_present_any = ["policies", "control_plane"], conflicts_with_all = ["policies", "control_plane"])]
    snapshot: Option<PathBuf>,
    /// Subscribe to a control plane (http://HOST:PORT): long-poll for signed snapshots,
    /// verify them with `--trust-key`, keep the last good one in `--data-dir`. Replicas of one
    /// control plane may be listed separated by commas: the sidecar fails over between them.
    #[arg(long, env = "TOLLGATE_CONTROL_PLANE", requires_all = ["api_key_file", "data_dir"], conflicts_with = "policies")]
    control_plane: Option<String>,
    /// File holding the API key (scope `sidecar`) for `--control-plane`.
    #[arg(long, env = "TOLLGATE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Local state: the durable usage log (`DIR/usage/`; a metering event is acknowledged only
    /// once it is synced there) and, with `--control-plane`, the last good snapshot. Without
    /// it metering is in memory only.
    #[arg(long, env = "TOLLGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// With `--control-plane`: ship usage and refresh global usage at least this often, in
    /// milliseconds.
    #[arg(long, env = "TOLLGATE_USAGE_SYNC_INTERVAL_MS", default_value_t = 200)]
    usage_sync_interval_ms: u64,
    /// With `--control-plane`: the share of a hard limit one sidecar may use before its usage
    /// reaches the control plane; past it an event waits for a sync. Pods together overshoot a
    /// hard limit by at most (pods - 1) x this share. 0 < share <= 1.
    #[arg(long, env = "TOLLGATE_QUOTA_LOCAL_SHARE", default_value_t = 0.02)]
    quota_local_share: f64,
    /// How long an event that needs a sync may wait for one before it is decided on what this
    /// sidecar knows, in milliseconds.
    #[arg(long, env = "TOLLGATE_QUOTA_SYNC_WAIT_MS", default_value_t = 500)]
    quota_sync_wait_ms: u64,
    /// How far in the past a metering event's own `timestamp` may be, in seconds.
    #[arg(long, env = "TOLLGATE_LATE_ARRIVAL_SECS", default_value_t = 3600)]
    late_arrival_secs: i64,
    /// On SIGTERM, how long to try to ship unshipped usage before exiting (what is left stays
    /// in the log for the next start), in seconds.
    #[arg(long, env = "TOLLGATE_FLUSH_TIMEOUT_SECS", default_value_t = 5)]
    flush_timeout_secs: u64,
    /// Mark answers and status stale once the control plane has not confirmed the snapshot
    /// for this long, e.g. `90s`, `10m`, `1h` (a bare number is seconds).
    #[arg(long, env = "TOLLGATE_MAX_STALENESS", requires = "control_plane", value_parser = parse_duration)]
    max_staleness: Option<Duration>,
    /// Turn `/readyz` unready while stale (answers keep coming from the last good snapshot).
    // `requires_if`, not `requires`: `TOLLGATE_UNREADY_WHEN_STALE=false` counts as present
    // for clap, and turning the option off must not demand `--max-staleness`.
    #[arg(long, env = "TOLLGATE_UNREADY_WHEN_STALE", requires_if("true", "max_staleness"))]
    unready_when_stale: bool,
    /// Dev mode: compile this policies directory in-process with an ephemeral key, and
    /// recompile when it changes.
    #[arg(long, env = "TOLLGATE_POLICIES")]
    policies: Option<PathBuf>,
    /// How often the source is checked for changes, in milliseconds.
    #[arg(long, env = "TOLLGATE_WATCH_INTERVAL_MS", default_value_t = 500)]
    watch_interval_ms: u64,
    /// Largest request body in bytes.
    #[arg(long, env = "TOLLGATE_MAX_BODY", default_value_t = tollgate_sidecar::DEFAULT_MAX_BODY)]
    max_body: usize,
    /// Largest snapshot accepted, from a file or the control plane, in bytes; a larger file is
    /// refused unread. A million accounts take about 160 MB.
    #[arg(long, env = "TOLLGATE_MAX_SNAPSHOT_BYTES", default_value_t = tollgate_snapshot::DEFAULT_MAX_FILE_BYTES)]
    max_snapshot_bytes: u64,
    /// Requests with bodies of 64 KiB or more (large batches) served at a time; more are answered
    /// 503 with `Retry-After: 1`. Bounds the memory and CPU that big requests can take.
    #[arg(long, env = "TOLLGATE_MAX_HEAVY_REQUESTS", default_value_t = 4)]
    max_heavy_requests: usize,
    /// Where apps reach this sidecar (e.g. http://localhost:8181), as discovery documents such
    /// as /.well-known/authzen-configuration announce it; default http:// plus `--listen`.
    #[arg(long, env = "TOLLGATE_PUBLIC_URL")]
    public_url: Option<String>,
    /// How long a client may take to send a request's head (request line and headers, idle
    /// keep-alive time included), in seconds; slower connections are closed.
    #[arg(long, env = "TOLLGATE_HEADER_READ_TIMEOUT_SECS", default_value_t = tollgate_http::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    header_read_timeout_secs: u64,
    /// How long a client may take to send a request's body, in seconds; past it the answer is
    /// 408 `body_timeout`.
    #[arg(long, env = "TOLLGATE_BODY_READ_TIMEOUT_SECS", default_value_t = tollgate_http::DEFAULT_BODY_READ_TIMEOUT.as_secs())]
    body_read_timeout_secs: u64,
    /// Accept a snapshot older than the highest revision this sidecar installed before (kept in
    /// `--data-dir`); without it such a snapshot is refused as a rollback.
    #[arg(long, env = "TOLLGATE_ALLOW_ROLLBACK")]
    allow_rollback: bool,
    /// How long SIGTERM waits for in-flight requests, in seconds.
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    drain_timeout_secs: u64,
    /// How long metering event ids are remembered for deduplication, in seconds.
    #[arg(long, env = "TOLLGATE_DEDUPE_WINDOW_SECS", default_value_t = 86_400)]
    dedupe_window_secs: i64,
    /// Also serve /metrics, /healthz and /readyz (nothing else) on this address, e.g. the pod
    /// address for Prometheus, while the decision API stays on `--listen`.
    #[arg(long, env = "TOLLGATE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Worker threads; defaults to the cgroup CPU quota in whole CPUs (rounded up), or the
    /// CPUs the process may run on when there is no quota.
    #[arg(long, env = "TOLLGATE_WORKERS")]
    workers: Option<usize>,
    /// Envoy ext_authz: the request header naming the account.
    #[arg(long, env = "TOLLGATE_EXT_AUTHZ_ACCOUNT_HEADER", default_value = tollgate_sidecar::protocols::HEADER_ACCOUNT)]
    ext_authz_account_header: String,
    /// Envoy ext_authz: the request header naming the user.
    #[arg(long, env = "TOLLGATE_EXT_AUTHZ_USER_HEADER", default_value = tollgate_sidecar::protocols::HEADER_USER)]
    ext_authz_user_header: String,
    /// Envoy ext_authz: the request header naming the feature (a route in the catalog's
    /// `[routes]` map matching the path wins over it).
    #[arg(long, env = "TOLLGATE_EXT_AUTHZ_FEATURE_HEADER", default_value = tollgate_sidecar::protocols::HEADER_FEATURE)]
    ext_authz_feature_header: String,
    /// Envoy ext_authz: the request header naming the region.
    #[arg(long, env = "TOLLGATE_EXT_AUTHZ_REGION_HEADER", default_value = tollgate_sidecar::protocols::HEADER_REGION)]
    ext_authz_region_header: String,
    /// Envoy ext_authz: the request header naming the device.
    #[arg(long, env = "TOLLGATE_EXT_AUTHZ_DEVICE_HEADER", default_value = tollgate_sidecar::protocols::HEADER_DEVICE)]
    ext_authz_device_header: String,
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a log file or collector.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `outer: inner: …`, each text once: many errors
/// already print their source in their own message (`cannot read `x`: No such file …`), and
/// anyhow's `{:#}` would then repeat it.
fn error_chain(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out, force } => {
            let key = snapshot::generate_key()?;
            snapshot::write_key_pair(&out, &key, force)?;
            println!(
                "wrote {} and {} (key id {})",
                out.join("tollgate.key").display(),
                out.join("tollgate.pub").display(),
                snapshot::key_id(&key.verifying_key())
            );
            Ok(())
        }
        Command::Compile { policy_dir, key, out, revision } => {
            let key = snapshot::read_signing_key(&key)?;
            let stopwatch = tollgate_core::clock::Stopwatch::start();
            let data = tollgate_policy::compile_dir(&policy_dir)?;
            let compiled_s = stopwatch.elapsed_secs();
            let now_ms = tollgate_core::clock::system_now_ms();
            let revision = revision.unwrap_or(now_ms.max(0) as u64);
            let bytes = snapshot::build(&data, revision, now_ms, &key)?;
            let built_s = stopwatch.elapsed_secs();
            write_atomically(&out, &bytes)?;
            let n_accounts = data.accounts.len();
            // The process ends here: freeing a million accounts one allocation at a time
            // would cost about a second for nothing.
            std::mem::forget(data);
            tracing::debug!(
                compile_s = compiled_s,
                build_s = built_s - compiled_s,
                write_s = stopwatch.elapsed_secs() - built_s,
                "compiled, built and signed, written"
            );
            println!("wrote {} (revision {revision}, {n_accounts} accounts, {} bytes)", out.display(), bytes.len());
            Ok(())
        }
        Command::Inspect { file, trust_key } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read `{}`", file.display()))?;
            let described = snapshot::describe(&bytes)?;
            let verified = if trust_key.is_empty() {
                serde_json::Value::Null
            } else {
                let trusted = read_trusted(&trust_key)?;
                let outcome = match described {
                    snapshot::Described::Base(_) => Snapshot::verify(&bytes, &trusted).map(drop),
                    snapshot::Described::Delta(_) => snapshot::Delta::verify(&bytes, &trusted).map(drop),
                };
                match outcome {
                    Ok(()) => serde_json::json!({"ok": true}),
                    Err(error) => serde_json::json!({"ok": false, "error": error.to_string()}),
                }
            };
            let created_at = |ms: i64| tollgate_core::period::format_rfc3339(ms.div_euclid(1000));
            let report = match described {
                snapshot::Described::Base(header) => serde_json::json!({
                    "file": file.display().to_string(),
                    "kind": "base",
                    "size_bytes": bytes.len(),
                    "format": header.format,
                    "revision": header.revision,
                    "key_id": header.key_id,
                    "created_at": created_at(header.created_at_ms),
                    "payload_bytes": header.payload_len,
                    "counts": header.counts,
                    "signature": verified,
                }),
                snapshot::Described::Delta(header) => serde_json::json!({
                    "file": file.display().to_string(),
                    "kind": "delta",
                    "size_bytes": bytes.len(),
                    "format": header.format,
                    "base_revision": header.base_revision,
                    "follows": header.follows,
                    "revision": header.revision,
                    "key_id": header.key_id,
                    "created_at": created_at(header.created_at_ms),
                    "payload_bytes": header.payload_len,
                    "accounts": header.accounts,
                    "removed": header.removed,
                    "signature": verified,
                }),
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
            if verified.get("ok") == Some(&serde_json::Value::Bool(false)) {
                bail!("signature does not verify");
            }
            Ok(())
        }
        Command::Check { snapshot, policies, trust_key, account, feature, user, region, device, amount, now } => {
            let snapshot = match (snapshot, policies) {
                (Some(path), _) => {
                    if trust_key.is_empty() {
                        bail!("`--trust-key` is required with `--snapshot`");
                    }
                    Source::File(path).load(
                        &read_trusted(&trust_key)?,
                        None,
                        None,
                        tollgate_core::clock::system_now_ms(),
                        snapshot::DEFAULT_MAX_FILE_BYTES,
                    )?
                }
                (None, Some(dir)) => {
                    let (source, trusted) = dev_source(dir)?;
                    source.load(&trusted, None, None, tollgate_core::clock::system_now_ms(), snapshot::DEFAULT_MAX_FILE_BYTES)?
                }
                (None, None) => bail!("give `--snapshot FILE --trust-key KEY` or `--policies DIR`"),
            };
            let now = match now {
                Some(text) => tollgate_core::period::parse_rfc3339(&text)
                    .with_context(|| format!("`--now` value `{text}` is not an RFC 3339 timestamp"))?,
                None => tollgate_core::clock::system_now_ms().div_euclid(1000),
            };
            let request = Request {
                account: &account,
                feature: &feature,
                user: user.as_deref(),
                region: region.as_deref(),
                device: device.as_deref(),
                amount,
            };
            let decision = decide(snapshot.data(), &request, now, &NoUsage);
            let json = DecisionJson::new(snapshot.data(), &account, snapshot.revision(), &decision, false);
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::Gen { accounts, out, features, seed } => {
            tollgate_policy::generate::write(
                &out,
                &tollgate_policy::generate::GenOptions { n_accounts: accounts, n_features: features, seed },
            )
            .with_context(|| format!("cannot write policies to `{}`", out.display()))?;
            println!("wrote {accounts} accounts to {}", out.display());
            Ok(())
        }
        Command::Sidecar(args) => run_sidecar(*args),
        #[cfg(feature = "control-plane")]
        Command::ControlPlane(args) => run_control_plane(*args),
        #[cfg(feature = "control-plane")]
        Command::Token { command } => run_token(command),
        Command::Health(args) => probe(&args, "/healthz"),
        Command::Ready(args) => probe(&args, "/readyz"),
    }
}

/// `tollgate health` and `tollgate ready`: the exit status is the answer.
fn probe(args: &ProbeArgs, path: &str) -> Result<()> {
    tollgate_sidecar::container::probe(&args.addr, path, Duration::from_millis(args.timeout_ms.max(1)))?;
    Ok(())
}

fn read_trusted(paths: &[PathBuf]) -> Result<TrustedKeys> {
    let mut trusted = TrustedKeys::default();
    for path in paths {
        trusted.add(snapshot::read_public_key(path)?);
    }
    Ok(trusted)
}

/// Dev mode: an ephemeral key signs what is compiled in-process, and only it is trusted.
fn dev_source(dir: PathBuf) -> Result<(Source, TrustedKeys)> {
    let key = snapshot::generate_key()?;
    let trusted = TrustedKeys::new([key.verifying_key()]);
    Ok((Source::Policies { dir, key: Box::new(key) }, trusted))
}

/// Writes through a temporary file and a rename, so a watcher never reads half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    tollgate_http::fs::write_atomically(path, bytes).with_context(|| format!("cannot write `{}`", path.display()))
}

/// Maps the sidecar's flags onto a [`Config`]; everything else is the library's.
fn sidecar_config(args: SidecarArgs) -> Result<Config> {
    use tollgate_sidecar::protocols::header_name;
    let listen: std::net::SocketAddr =
        args.listen.parse().with_context(|| format!("`--listen` value `{}` is not an address like 127.0.0.1:8181", args.listen))?;
    let metrics_listen: Option<std::net::SocketAddr> = args
        .metrics_listen
        .as_deref()
        .map(|address| address.parse().with_context(|| format!("`--metrics-listen` value `{address}` is not an address like 0.0.0.0:9181")))
        .transpose()?;
    let source = match (args.snapshot, args.policies, args.control_plane, args.api_key_file) {
        (Some(path), _, _, _) => SourceConfig::File(path),
        (None, Some(dir), _, _) => SourceConfig::Policies(dir),
        (None, None, Some(url), Some(api_key_file)) => {
            SourceConfig::ControlPlane { url, api_key_file, poll_wait: Duration::from_secs(tollgate_sidecar::subscribe::DEFAULT_WAIT_SECS) }
        }
        _ => bail!("give `--snapshot FILE`, `--policies DIR` or `--control-plane URL`"),
    };
    let mut config = Config::new(source, read_trusted(&args.trust_key)?);
    config.listen = listen;
    config.metrics_listen = metrics_listen;
    config.data_dir = args.data_dir;
    config.metering = MeteringSettings {
        late_arrival_secs: args.late_arrival_secs,
        local_share: args.quota_local_share,
        sync_wait: Duration::from_millis(args.quota_sync_wait_ms),
        dedupe_window_secs: args.dedupe_window_secs,
        usage_sync_interval: Duration::from_millis(args.usage_sync_interval_ms),
        flush_timeout: Duration::from_secs(args.flush_timeout_secs),
    };
    config.staleness = args.max_staleness.map(|max| Staleness { max, unready_when_stale: args.unready_when_stale });
    config.ext_authz = tollgate_sidecar::protocols::ExtAuthzHeaders {
        account: header_name(&args.ext_authz_account_header).context("`--ext-authz-account-header`")?,
        user: header_name(&args.ext_authz_user_header).context("`--ext-authz-user-header`")?,
        feature: header_name(&args.ext_authz_feature_header).context("`--ext-authz-feature-header`")?,
        region: header_name(&args.ext_authz_region_header).context("`--ext-authz-region-header`")?,
        device: header_name(&args.ext_authz_device_header).context("`--ext-authz-device-header`")?,
    };
    config.max_body = args.max_body;
    config.max_snapshot_bytes = args.max_snapshot_bytes;
    config.allow_rollback = args.allow_rollback;
    config.header_read_timeout = Duration::from_secs(args.header_read_timeout_secs);
    config.public_url = args.public_url.clone();
    config.max_heavy_requests = args.max_heavy_requests;
    config.body_read_timeout = Duration::from_secs(args.body_read_timeout_secs);
    config.drain_timeout = Duration::from_secs(args.drain_timeout_secs);
    config.workers = args.workers;
    config.watch_interval = Duration::from_millis(args.watch_interval_ms);
    Ok(config)
}

fn run_sidecar(args: SidecarArgs) -> Result<()> {
    let config = sidecar_config(args)?;
    config.validate()?;
    // Workers follow the container's CPU limit, not the node's cores: more threads than the
    // quota only get throttled together. Snapshot loading past its idle-priority deadline runs
    // on the blocking pool, capped small so background work cannot fan out over the quota
    // (deploy/README.md).
    let workers = config.worker_threads();
    let app = App::build(config, Arc::new(tollgate_core::clock::SystemClock))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(workers)
        .max_blocking_threads(4)
        .build()
        .context("cannot start the async runtime")?;
    tracing::info!(workers, "async runtime");
    runtime.block_on(async move {
        let listeners = Listeners::bind(app.config()).await?;
        tracing::info!(address = %listeners.api.local_addr()?, "tollgate sidecar listening");
        if let Some(metrics) = &listeners.metrics {
            tracing::info!(address = %metrics.local_addr()?, "metrics listening");
        }
        app.run(listeners, shutdown_signal()).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[cfg(feature = "control-plane")]
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ControlPlaneArgs {
    #[command(subcommand)]
    command: Option<ControlPlaneCommand>,
    /// Data directory: the SQLite license repository lives in DIR/tollgate.db.
    #[arg(long, env = "TOLLGATE_CP_DATA")]
    data: Option<PathBuf>,
    /// Keep the license repository in PostgreSQL instead of SQLite under `--data`:
    /// postgres://USER:PASSWORD@HOST:5432/DATABASE. Several replicas can share one database.
    /// Takes precedence over `--data`.
    #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// Policies directory whose catalog.toml is the catalog (accounts come from the database).
    #[arg(long, env = "TOLLGATE_CP_POLICIES")]
    policies: Option<PathBuf>,
    /// Secret key file (from `tollgate keygen`) that signs snapshots and license tokens.
    #[arg(long, env = "TOLLGATE_CP_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Public key files of retired signing keys, kept in the JWKS so tokens they signed stay
    /// verifiable until they expire; repeat for several.
    #[arg(long, env = "TOLLGATE_CP_RETIRED_KEY")]
    retired_key: Vec<PathBuf>,
    /// Address to listen on for the integration API (and the sidecar routes without
    /// `--sync-listen`).
    #[arg(long, env = "TOLLGATE_CP_LISTEN", default_value = "127.0.0.1:8282")]
    listen: String,
    /// Serve the sidecar routes (`/v1/snapshot`, `/v1/usage`, plus probes) on this address
    /// instead of `--listen`, so that network policy can admit only sidecars to them.
    #[arg(long, env = "TOLLGATE_CP_SYNC_LISTEN")]
    sync_listen: Option<String>,
    /// Lifetime of license tokens, in seconds (never past the license's own end).
    #[arg(long, env = "TOLLGATE_CP_TOKEN_TTL_SECS", default_value_t = tollgate_control_plane::DEFAULT_TOKEN_TTL_SECS)]
    token_ttl_secs: i64,
    /// How long SIGTERM waits for in-flight requests, in seconds.
    #[arg(long, env = "TOLLGATE_CP_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    drain_timeout_secs: u64,
    /// How long a client may take to send a request's head (idle keep-alive time included), in
    /// seconds; slower connections are closed.
    #[arg(long, env = "TOLLGATE_CP_HEADER_READ_TIMEOUT_SECS", default_value_t = tollgate_http::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    header_read_timeout_secs: u64,
    /// How long a client may take to send a request's body, in seconds (408 past it).
    #[arg(long, env = "TOLLGATE_CP_BODY_READ_TIMEOUT_SECS", default_value_t = tollgate_http::DEFAULT_BODY_READ_TIMEOUT.as_secs())]
    body_read_timeout_secs: u64,
    /// A webhook endpoint that receives every event type, besides those managed through
    /// `/v1/webhooks/endpoints` (kept there as endpoint `configured`): http://HOST:PORT/PATH,
    /// signed the Standard Webhooks way. Plain HTTP only; for TLS run a local proxy (such as an
    /// Envoy or nginx sidecar) and point this at it.
    #[arg(long, env = "TOLLGATE_CP_WEBHOOK_URL", requires = "webhook_secret_file")]
    webhook_url: Option<String>,
    /// File holding the secret of `--webhook-url`: a Standard Webhooks secret `whsec_BASE64`
    /// (the key is the decoded base64), or any other text, used as the raw HMAC key.
    /// Surrounding whitespace is ignored; must not be empty. Required with `--webhook-url`.
    #[arg(long, env = "TOLLGATE_CP_WEBHOOK_SECRET_FILE", requires = "webhook_url")]
    webhook_secret_file: Option<PathBuf>,
    /// Enables `POST /v1/integrations/stripe`: a file holding the Stripe endpoint's signing
    /// secret (`whsec_...`); several lines are several secrets, all accepted, for a rotation.
    #[arg(long, env = "TOLLGATE_CP_STRIPE_WEBHOOK_SECRET_FILE")]
    stripe_webhook_secret_file: Option<PathBuf>,
    /// How far a `Stripe-Signature` timestamp may be from now, in seconds, either way.
    #[arg(long, env = "TOLLGATE_CP_STRIPE_TOLERANCE_SECS", default_value_t = tollgate_control_plane::integrations::stripe::DEFAULT_TOLERANCE_SECS)]
    stripe_tolerance_secs: i64,
    /// Days a Stripe license stays usable (in grace) past its paid period: a `past_due`
    /// subscription, or the moment between a period's end and its renewal.
    #[arg(long, env = "TOLLGATE_CP_STRIPE_GRACE_DAYS", default_value_t = tollgate_control_plane::integrations::stripe::DEFAULT_GRACE_DAYS)]
    stripe_grace_days: u32,
    /// Enables `POST /v1/integrations/hubspot`: a file holding the HubSpot app's client
    /// secret; several lines are several secrets, for a rotation.
    #[arg(long, env = "TOLLGATE_CP_HUBSPOT_CLIENT_SECRET_FILE")]
    hubspot_client_secret_file: Option<PathBuf>,
    /// The URL HubSpot calls, exactly as configured in the HubSpot app (HubSpot signs it), e.g.
    /// https://tollgate.example.com/v1/integrations/hubspot. Without it: http://HOST/PATH of the
    /// request as it arrives.
    #[arg(long, env = "TOLLGATE_CP_HUBSPOT_WEBHOOK_URL")]
    hubspot_webhook_url: Option<String>,
    /// Send `license.expiring` this many days before a license's `expires_at` (once per
    /// license and expiry; a renewal that moves the expiry sends again); 0 turns it off.
    #[arg(long, env = "TOLLGATE_CP_LICENSE_EXPIRING_DAYS", default_value_t = tollgate_control_plane::webhooks::DEFAULT_LICENSE_EXPIRING_DAYS)]
    license_expiring_days: u32,
    /// Compile a new base snapshot once this many accounts changed since the published one
    /// (or this many deltas were published on it); until then changes go out as deltas.
    #[arg(long, env = "TOLLGATE_CP_COMPACT_AFTER", default_value_t = tollgate_control_plane::publish::DEFAULT_COMPACT_AFTER as u64, value_parser = clap::value_parser!(u64).range(1..))]
    compact_after: u64,
    /// Where browsers reach this control plane, such as https://tollgate.example.com: links into
    /// the customer portal (`POST /v1/portal/sessions`) point there, and an https URL marks the
    /// portal's and console's session cookies Secure. Without it, links use the request's Host.
    #[arg(long, env = "TOLLGATE_CP_PUBLIC_URL")]
    public_url: Option<String>,
}

#[cfg(feature = "control-plane")]
#[derive(Subcommand)]
enum ControlPlaneCommand {
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Load every account of a policies directory (catalog.toml + accounts/*.toml, as
    /// `tollgate compile` reads them) into the repository in one transaction: all or nothing,
    /// validated like `compile`, idempotent. Run it while the control plane is stopped.
    Import {
        /// The control plane's data directory (SQLite).
        #[arg(long, env = "TOLLGATE_IMPORT_DATA", required_unless_present = "database")]
        data: Option<PathBuf>,
        /// The control plane's PostgreSQL database (instead of `--data`).
        #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
        database: Option<String>,
        /// The policies directory; its catalog.toml must be the one the control plane serves.
        policies_dir: PathBuf,
    },
    /// Copy a SQLite repository into an empty PostgreSQL database, every table in one
    /// transaction, keeping ids; then check that each table holds as many rows on both sides
    /// and print the counts. Run it while the control plane is stopped.
    Migrate {
        /// The data directory of the SQLite repository (holding tollgate.db).
        #[arg(long, env = "TOLLGATE_MIGRATE_FROM_SQLITE")]
        from_sqlite: PathBuf,
        /// The PostgreSQL database to fill: postgres://USER:PASSWORD@HOST:5432/DATABASE. It is
        /// created (migrated) if new, and refused if it holds anything.
        #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
        database: String,
    },
}

#[cfg(feature = "control-plane")]
#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new API key and print it, alone, on stdout; only its hash is stored.
    Create {
        /// The control plane's data directory (SQLite).
        #[arg(long, env = "TOLLGATE_KEYS_DATA", required_unless_present = "database")]
        data: Option<PathBuf>,
        /// The control plane's PostgreSQL database (instead of `--data`).
        #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
        database: Option<String>,
        /// admin, integration, sidecar or account.
        #[arg(long, env = "TOLLGATE_KEYS_SCOPE")]
        scope: String,
        /// Bind the key to this account (required for scope `account`).
        #[arg(long, env = "TOLLGATE_KEYS_ACCOUNT")]
        account: Option<String>,
    },
    /// Revoke an API key at once (by its id, the 16 hex digits after `tg_`); audited.
    Revoke {
        /// The control plane's data directory (SQLite).
        #[arg(long, env = "TOLLGATE_KEYS_DATA", required_unless_present = "database")]
        data: Option<PathBuf>,
        /// The control plane's PostgreSQL database (instead of `--data`).
        #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
        database: Option<String>,
        /// The key's id.
        id: String,
    },
    /// List the API keys (ids, scopes, accounts, creation and revocation times; no secrets).
    List {
        /// The control plane's data directory (SQLite).
        #[arg(long, env = "TOLLGATE_KEYS_DATA", required_unless_present = "database")]
        data: Option<PathBuf>,
        /// The control plane's PostgreSQL database (instead of `--data`).
        #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
        database: Option<String>,
    },
}

#[cfg(feature = "control-plane")]
#[derive(Subcommand)]
enum TokenCommand {
    /// Verify a license token offline against a JWKS file; prints its claims, exits 1 if refused.
    Verify {
        /// The JWKS file (the control plane's `/.well-known/jwks.json`).
        #[arg(long, env = "TOLLGATE_TOKEN_JWKS")]
        jwks: PathBuf,
        /// The license token.
        token: String,
    },
}

/// `90`, `90s`, `10m`, `1h` or `250ms`.
fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let (number, unit) = text.find(|c: char| !c.is_ascii_digit()).map_or((text, ""), |split| text.split_at(split));
    let value: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 90s, 10m or 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        "ms" => return Ok(Duration::from_millis(value)),
        _ => return Err(format!("`{text}` has unknown unit `{unit}` (expected ms, s, m or h)")),
    };
    Ok(Duration::from_secs(seconds))
}

/// The repository `--database` (PostgreSQL) or else `--data` (SQLite) names.
#[cfg(feature = "control-plane")]
fn database_of(data: Option<PathBuf>, database: Option<String>) -> Option<Database> {
    match (database, data) {
        (Some(url), _) => Some(Database::Postgres(url)),
        (None, Some(dir)) => Some(Database::Sqlite(dir)),
        (None, None) => None,
    }
}

/// Opens the repository of a `keys` or `import` command.
#[cfg(feature = "control-plane")]
fn open_database(
    data: Option<PathBuf>,
    database: Option<String>,
) -> Result<(Database, Arc<dyn tollgate_control_plane::store::Repository>)> {
    let Some(database) = database_of(data, database) else {
        bail!("give `--data DIR` (SQLite) or `--database postgres://...` (or TOLLGATE_DATABASE_URL)");
    };
    let repository = tollgate_control_plane::open_database(&database).with_context(|| format!("cannot open {}", database.describe()))?;
    Ok((database, repository))
}

#[cfg(feature = "control-plane")]
fn run_control_plane(args: ControlPlaneArgs) -> Result<()> {
    if let Some(ControlPlaneCommand::Keys { command }) = args.command {
        // The control-plane time reads outside a `ControlPlane`: a key's creation or
        // revocation stamp.
        let now = tollgate_core::clock::system_now_ms().div_euclid(1000);
        match command {
            KeysCommand::Create { data, database, scope, account } => {
                let repository = open_database(data, database)?.1;
                let key = tollgate_control_plane::create_key(repository.as_ref(), &scope, account.as_deref(), now)?;
                println!("{key}");
            }
            KeysCommand::Revoke { data, database, id } => {
                let (database, repository) = open_database(data, database)?;
                if !repository.revoke_key(&id, "cli", now)? {
                    bail!("no live API key `{id}` in {}", database.describe());
                }
                println!("revoked {id}");
            }
            KeysCommand::List { data, database } => {
                let repository = open_database(data, database)?.1;
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"keys": repository.keys()?}))?);
            }
        }
        return Ok(());
    }
    if let Some(ControlPlaneCommand::Migrate { from_sqlite, database }) = args.command {
        let target = tollgate_control_plane::postgres::PgRepository::open(&database)?;
        let database = Database::Postgres(database);
        let started = tollgate_core::clock::Stopwatch::start();
        let report = tollgate_control_plane::postgres::copy_from_sqlite(&from_sqlite, &target)
            .with_context(|| format!("cannot copy `{}` into {}", from_sqlite.display(), database.describe()))?;
        for (table, n_rows) in &report.tables {
            println!("{table:<24} {n_rows:>10} rows");
        }
        println!(
            "copied {} tables from {} into {} in {:.1} s; every table has as many rows on both sides",
            report.tables.len(),
            from_sqlite.display(),
            database.describe(),
            started.elapsed_secs()
        );
        return Ok(());
    }
    if let Some(ControlPlaneCommand::Import { data, database, policies_dir }) = args.command {
        // The import's audit stamp, read outside a `ControlPlane` as for keys.
        let now = tollgate_core::clock::system_now_ms().div_euclid(1000);
        let started = tollgate_core::clock::Stopwatch::start();
        let repository = open_database(data, database)?.1;
        let summary = tollgate_control_plane::import::import_dir(repository.as_ref(), &policies_dir, "cli", now)?;
        println!(
            "imported {} accounts from {} in {:.1} s: {} created, {} updated, {} unchanged (revision {})",
            summary.n_accounts,
            policies_dir.display(),
            started.elapsed_secs(),
            summary.n_created,
            summary.n_updated,
            summary.n_unchanged,
            summary.revision
        );
        return Ok(());
    }
    let (Some(database), Some(policies), Some(signing_key)) = (database_of(args.data, args.database), args.policies, args.signing_key)
    else {
        bail!("`tollgate control-plane` needs `--data DIR` (or `--database URL`), `--policies DIR` and `--signing-key KEY`");
    };
    let listen: std::net::SocketAddr =
        args.listen.parse().with_context(|| format!("`--listen` value `{}` is not an address like 127.0.0.1:8282", args.listen))?;
    let sync_listen: Option<std::net::SocketAddr> = args
        .sync_listen
        .as_deref()
        .map(|address| address.parse().with_context(|| format!("`--sync-listen` value `{address}` is not an address like 0.0.0.0:8283")))
        .transpose()?;
    if args.token_ttl_secs <= 0 {
        bail!("`--token-ttl-secs` must be greater than 0");
    }
    let webhook = match (&args.webhook_url, &args.webhook_secret_file) {
        (Some(url), Some(secret_file)) => Some(tollgate_control_plane::webhooks::WebhookConfig::from_file(url, secret_file)?),
        _ => None,
    };
    let key = snapshot::read_signing_key(&signing_key)?;
    let retired = args.retired_key.iter().map(|path| snapshot::read_public_key(path)).collect::<Result<Vec<_>, _>>()?;
    if args.stripe_tolerance_secs <= 0 {
        bail!("`--stripe-tolerance-secs` must be greater than 0");
    }
    let stripe = match &args.stripe_webhook_secret_file {
        Some(path) => {
            let mut stripe = tollgate_control_plane::integrations::stripe::StripeConfig::new(
                tollgate_control_plane::integrations::read_secrets(path).context("`--stripe-webhook-secret-file`")?,
            );
            stripe.tolerance_secs = args.stripe_tolerance_secs;
            stripe.grace_days = args.stripe_grace_days;
            Some(stripe)
        }
        None => None,
    };
    let hubspot = match &args.hubspot_client_secret_file {
        Some(path) => Some(tollgate_control_plane::integrations::hubspot::HubSpotConfig::new(
            tollgate_control_plane::integrations::read_secrets(path).context("`--hubspot-client-secret-file`")?,
            args.hubspot_webhook_url.clone(),
        )),
        None => None,
    };
    if let Some(url) = &args.public_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        bail!("`--public-url` value `{url}` must start with http:// or https://");
    }
    if args.header_read_timeout_secs == 0 || args.body_read_timeout_secs == 0 {
        bail!("`--header-read-timeout-secs` and `--body-read-timeout-secs` must be greater than 0");
    }
    let config = tollgate_control_plane::Config {
        token_ttl_secs: args.token_ttl_secs,
        webhook,
        stripe,
        hubspot,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
        body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
        license_expiring_days: args.license_expiring_days,
        compact_after: usize::try_from(args.compact_after).unwrap_or(usize::MAX),
        public_url: args.public_url.clone(),
        ..Default::default()
    };
    tracing::info!(database = %database.describe(), "opening the license repository");
    let control_plane = tollgate_control_plane::ControlPlane::open_with_config(&database, &policies, key, retired, config)?;
    let control_plane = Arc::new(control_plane);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on `{listen}`"))?;
        tracing::info!(address = %listener.local_addr()?, "tollgate control plane listening");
        let sync_listener = match sync_listen {
            Some(address) => {
                let sync_listener =
                    tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on `{address}` for sidecars"))?;
                tracing::info!(address = %sync_listener.local_addr()?, "sidecar routes listening");
                Some(sync_listener)
            }
            None => None,
        };
        let shutdown = async {
            shutdown_signal().await;
            tracing::info!("shutting down: draining in-flight requests");
        };
        let drain = Duration::from_secs(args.drain_timeout_secs);
        tollgate_control_plane::run_with_sync(control_plane, listener, sync_listener, shutdown, drain).await;
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(feature = "control-plane")]
fn run_token(command: TokenCommand) -> Result<()> {
    let TokenCommand::Verify { jwks, token } = command;
    let text = std::fs::read_to_string(&jwks).with_context(|| format!("cannot read `{}`", jwks.display()))?;
    let keys = tollgate_control_plane::tokens::parse_jwks(&text).with_context(|| format!("in `{}`", jwks.display()))?;
    let now = tollgate_core::clock::system_now_ms().div_euclid(1000);
    let claims = tollgate_control_plane::tokens::verify(&token, &keys, now)?;
    println!("{}", serde_json::to_string_pretty(&serde_json::Value::Object(claims))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand, with its path of names (`control-plane keys create`).
    fn commands(command: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
        out.push((path.clone(), command.clone()));
        for sub in command.get_subcommands() {
            let mut sub_path = path.clone();
            sub_path.push(sub.get_name().to_string());
            commands(sub, sub_path, out);
        }
    }

    #[test]
    fn every_flag_has_a_description_and_an_environment_variable() {
        let mut all = Vec::new();
        commands(&Cli::command(), Vec::new(), &mut all);
        let mut problems = Vec::new();
        for (path, command) in &all {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() {
                    problems.push(format!("`tollgate {}` argument `{id}` has no description", path.join(" ")));
                }
                let Some(long) = arg.get_long() else { continue };
                match arg.get_env().and_then(|env| env.to_str()) {
                    Some(env) if env.starts_with("TOLLGATE_") && env.ends_with(&long.to_uppercase().replace('-', "_")) => {}
                    // The name PostgreSQL tools and hosting platforms use for a connection URL.
                    Some("TOLLGATE_DATABASE_URL") if long == "database" => {}
                    other => problems.push(format!("`tollgate {}` flag `--{long}` has environment variable {other:?}", path.join(" "))),
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let error = anyhow::Error::new(io).context("cannot read `x`: No such file or directory (os error 2)").context("in `--trust-key`");
        assert_eq!(error_chain(&error), "in `--trust-key`: cannot read `x`: No such file or directory (os error 2)");
    }
}
