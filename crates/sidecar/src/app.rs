//! The sidecar as one value built from a [`Config`] and a [`Clock`]: `App::build` opens the
//! usage log, the subscription and the first snapshot; `App::run` serves on bound listeners
//! until a shutdown future resolves (mini-redis `server::run`), with the watcher, the
//! housekeeping, the shipper and the metrics listener beside it, then drains and flushes.
//! It parses no flags and installs no signal handler: that is the caller's.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, SourceConfig};
use crate::source::{self, LoadError, ReloadError, Source};
use crate::subscribe::{SubscribeError, Subscription};
use crate::telemetry::Metrics;
use crate::usage::{DecisionTally, UsageStore};
use crate::usage_log::{LogError, UsageLog};
use crate::{Metering, Sidecar, ship};
use tollgate_core::clock::Clock;
use tollgate_snapshot::{KeyError, TrustedKeys};

/// Why a sidecar could not be built or could not listen.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot make the dev-mode signing key: {0}")]
    Key(#[source] KeyError),
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    #[error(transparent)]
    UsageLog(#[from] LogError),
    #[error(transparent)]
    Ship(#[from] ship::ShipError),
    /// A policies directory with mistakes is bad configuration and stops the start.
    #[error(transparent)]
    Policies(LoadError),
    #[error(transparent)]
    RollbackGuard(#[from] crate::store::RollbackGuardError),
    #[error("cannot create data directory `{path}`: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot listen on `{address}`{purpose}: {source}")]
    Listen { address: std::net::SocketAddr, purpose: &'static str, source: std::io::Error },
}

/// A built sidecar, not yet serving.
pub struct App {
    sidecar: Arc<Sidecar>,
    source: Arc<Source>,
    /// The source's files as they were just before the first load.
    seen: source::Fingerprint,
    config: Config,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("source", &self.source).finish()
    }
}

/// The bound sockets an [`App`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The decision API.
    pub api: TcpListener,
    /// Only `/metrics`, `/healthz` and `/readyz`.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds `config.listen` and `config.metrics_listen`.
    pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
        let api =
            TcpListener::bind(config.listen).await.map_err(|source| AppError::Listen { address: config.listen, purpose: "", source })?;
        let metrics = match config.metrics_listen {
            Some(address) => {
                Some(TcpListener::bind(address).await.map_err(|source| AppError::Listen { address, purpose: " for metrics", source })?)
            }
            None => None,
        };
        Ok(Listeners { api, metrics })
    }
}

impl App {
    /// Builds the sidecar: validates the configuration, opens the usage log (read back before
    /// serving, so quotas and event ids are as they were) and loads the first snapshot.
    /// Blocking file I/O; call it before serving.
    pub fn build(config: Config, clock: Arc<dyn Clock>) -> Result<App, AppError> {
        config.validate()?;
        let mut trusted: TrustedKeys = config.trusted.clone();
        let source = match &config.source {
            SourceConfig::File(path) => Source::File(path.clone()),
            SourceConfig::Policies(dir) => {
                // Dev mode: an ephemeral key signs what is compiled in-process.
                let key = tollgate_snapshot::generate_key().map_err(AppError::Key)?;
                trusted.add(key.verifying_key());
                Source::Policies { dir: dir.clone(), key: Box::new(key) }
            }
            SourceConfig::ControlPlane { url, api_key_file, poll_wait } => {
                let data_dir = config.data_dir.clone().ok_or(ConfigError::NoDataDir)?;
                let mut subscription = Subscription::new(url, api_key_file, data_dir)?;
                subscription.wait = *poll_wait;
                subscription.max_snapshot_bytes = config.max_snapshot_bytes;
                Source::ControlPlane(Arc::new(subscription))
            }
        };
        let metrics = Arc::new(Metrics::new());
        let usage = UsageStore::new();
        let metering = open_metering(&config, &source, clock.as_ref(), &metrics, &usage)?;
        let sidecar = Sidecar::new(metrics, Arc::new(trusted), source.describe(), clock, usage, &config, metering);
        sidecar.store.set_max_snapshot_bytes(config.max_snapshot_bytes);
        if let Some(data_dir) = &config.data_dir {
            std::fs::create_dir_all(data_dir).map_err(|source| AppError::DataDir { path: data_dir.display().to_string(), source })?;
            sidecar.store.guard_rollback(data_dir.join(crate::store::HIGHEST_REVISION_FILE), config.allow_rollback)?;
        }
        if let Some(staleness) = config.staleness {
            sidecar.store.set_staleness(staleness.max, staleness.unready_when_stale);
        }
        // The first load happens before serving. A policies directory with mistakes is bad
        // configuration and stops here; a snapshot file may legitimately arrive later (a
        // volume being filled), so the sidecar starts unready and keeps watching.
        let seen = source.fingerprint();
        match (source::reload(&source, &sidecar.trusted, &sidecar.store), &source) {
            (Ok(revision), _) => tracing::info!(revision, source = %source.describe(), "serving snapshot"),
            (Err(ReloadError::Load(error)), Source::Policies { .. }) => return Err(AppError::Policies(error)),
            // A subscription's first start has no cache yet; that is expected, not a warning.
            (Err(error @ ReloadError::NoCache(_)), _) => {
                tracing::info!(%error, "waiting for the first snapshot from the control plane");
            }
            (Err(error), _) => tracing::warn!(%error, "no valid snapshot yet; not ready until one arrives"),
        }
        Ok(App { sidecar: Arc::new(sidecar), source: Arc::new(source), seen, config })
    }

    /// The shared state every handler sees (tests reach the store and the usage through it).
    pub fn sidecar(&self) -> &Arc<Sidecar> {
        &self.sidecar
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` resolves; then stops accepting, drains in-flight requests for
    /// at most the drain timeout, stops the background tasks, ships what usage it can within
    /// the flush timeout (the rest stays in the log for the next start) and closes the log.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let App { sidecar, source, seen, config } = self;
        let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
        let stopped = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
            let _ = receiver.wait_for(|stop| *stop).await;
        };
        let watcher = tokio::spawn(source::watch(
            source,
            Arc::clone(&sidecar.trusted),
            Arc::clone(&sidecar.store),
            config.watch_interval,
            seen,
            stopped(stop_receiver.clone()),
        ));
        let housekeeping = {
            let sidecar = Arc::clone(&sidecar);
            let stop = stopped(stop_receiver.clone());
            let interval = config.housekeeping_interval.max(Duration::from_millis(1));
            tokio::spawn(async move {
                tokio::pin!(stop);
                let mut ticker = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        () = &mut stop => return,
                        _ = ticker.tick() => {}
                    }
                    sidecar.housekeep();
                    // After a burst of connections the allocator keeps what it freed; see
                    // `tollgate_http::memory`. Here rather than in `housekeep`, which tests call
                    // with their own clock and which should not depend on the allocator.
                    if let Some(free) = tollgate_http::memory::give_back(tollgate_http::memory::TRIM_ABOVE_BYTES) {
                        tracing::debug!(free_bytes = free, "gave free heap memory back to the OS");
                    }
                }
            })
        };
        let shipper = match &sidecar.metering {
            Metering::Shipped { log, shipping, .. } => {
                Some(tokio::spawn(ship::run(Arc::clone(&sidecar), Arc::clone(shipping), Arc::clone(log), stopped(stop_receiver.clone()))))
            }
            _ => None,
        };
        let drain = config.drain_timeout;
        let metrics_server = listeners
            .metrics
            .map(|listener| tokio::spawn(crate::serve_metrics(listener, Arc::clone(&sidecar), stopped(stop_receiver.clone()), drain)));
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stop_sender.send(true);
        };
        crate::serve(listeners.api, Arc::clone(&sidecar), shutdown, drain).await;
        if let Some(metrics_server) = metrics_server {
            let _ = metrics_server.await;
        }
        let _ = watcher.await;
        let _ = housekeeping.await;
        if let Some(shipper) = shipper {
            let _ = shipper.await;
        }
        // Every in-flight event is on disk by now; ship what can be shipped, keep the rest.
        if let Metering::Shipped { log, shipping, .. } = &sidecar.metering {
            let left = ship::flush(&sidecar, shipping, log, config.metering.flush_timeout).await;
            tracing::info!(unshipped = left, "usage flushed");
        }
        if let Some(log) = sidecar.metering.log() {
            log.stop();
        }
        tracing::info!("stopped");
    }
}

/// Opens the usage log and, with a control plane, the shipping: the one place the three ways
/// of metering are told apart.
fn open_metering(config: &Config, source: &Source, clock: &dyn Clock, metrics: &Metrics, usage: &UsageStore) -> Result<Metering, AppError> {
    let Some(data_dir) = &config.data_dir else {
        tracing::warn!("no `--data-dir`: metering events are kept in memory only and lost on restart");
        return Ok(Metering::InMemory);
    };
    let subscription = match source {
        Source::ControlPlane(subscription) => Some(subscription),
        _ => None,
    };
    let (log, recovery) = UsageLog::open(data_dir, subscription.is_some())?;
    metrics.usage_pending(log.n_pending());
    tracing::info!(
        events = recovery.events.len(),
        unshipped = log.n_pending(),
        truncated_bytes = recovery.truncated_bytes,
        dir = %log.dir().display(),
        "usage log opened"
    );
    ship::restore(usage, &recovery.events, &recovery.state, clock.now());
    let log = Arc::new(log);
    let Some(subscription) = subscription else {
        return Ok(Metering::Durable { log });
    };
    let id = ship::sidecar_id(data_dir)?;
    let shipping = Arc::new(ship::Shipping::new(Arc::clone(subscription), id, config.metering.usage_sync_interval, &recovery.state));
    Ok(Metering::Shipped { log, shipping, tally: DecisionTally::new() })
}
