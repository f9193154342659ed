//! The open-loop generator. A dispatcher thread releases request slots at their intended
//! send times (start + i/rate), sleeping with the OS timer rather than tokio's millisecond
//! wheel; keep-alive connection tasks take the next slot from one queue. Latency runs from
//! the intended time to the last response byte, so a stalled server is charged for every
//! request it held up (coordinated omission corrected, as in wrk2).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::procfs;
use crate::report::{Latency, ProcessUse, Summary, spectrum};
use crate::workload::{Kind, Workload};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub label: String,
    pub target: String,
    /// Requests per second; 0 runs closed loop.
    pub rate: f64,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
    pub swap: Option<Swap>,
    pub pid: Option<u32>,
    pub poll_status: bool,
    pub quiet: bool,
}

#[derive(Debug, Clone)]
pub enum Swap {
    /// Run a shell command every period.
    Command { every: Duration, command: String },
    /// Rename the next file of a directory (in name order) onto `target` every period.
    Files { every: Duration, dir: std::path::PathBuf, target: std::path::PathBuf },
}

struct Slot {
    idx: u64,
    intended: Instant,
}

fn new_histogram() -> Result<Histogram<u64>> {
    // Nanoseconds, up to a minute, three significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("cannot create histogram")
}

/// Everything the connection tasks add to, behind one lock: a few thousand lock takings a
/// second cost nothing next to a request.
struct Recorded {
    total: Histogram<u64>,
    interval: Histogram<u64>,
    lag: Histogram<u64>,
    completed: u64,
    ok: u64,
    non_2xx: u64,
    errors: u64,
    unsent: u64,
    decisions: u64,
    allowed: u64,
    denied: u64,
    by_kind: [u64; 4],
    interval_errors: u64,
    last_error: Option<String>,
}

struct Shared {
    workload: Workload,
    options: RunOptions,
    measure_from: Instant,
    /// After this, unsent slots are dropped and counted.
    deadline: Instant,
    recorded: Mutex<Recorded>,
    next_idx: AtomicU64,
    stop: AtomicBool,
}

fn kind_idx(kind: Kind) -> usize {
    match kind {
        Kind::Check => 0,
        Kind::Batch => 1,
        Kind::Meter => 2,
        Kind::Entitlements => 3,
    }
}

async fn connect(target: &str) -> Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(target).await.with_context(|| format!("cannot connect to `{target}`"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

struct Outcome {
    status: u16,
    body: Bytes,
}

async fn send(sender: &mut SendRequest<Full<Bytes>>, target: &str, kind: Kind, path: &str, body: Bytes) -> Result<Outcome> {
    let method = if kind == Kind::Entitlements { Method::GET } else { Method::POST };
    let mut builder = Request::builder().method(method).uri(path).header(HOST, target);
    if kind != Kind::Entitlements {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let request = builder.body(Full::new(body))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Outcome { status, body })
}

fn count(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack.windows(needle.len()).filter(|window| *window == needle).count() as u64
}

async fn connection_task(shared: Arc<Shared>, slots: Option<Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Slot>>>>) {
    let options = &shared.options;
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        let slot = match &slots {
            Some(slots) => {
                let next = slots.lock().await.recv().await;
                match next {
                    Some(slot) => slot,
                    None => break,
                }
            }
            None => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                Slot { idx: shared.next_idx.fetch_add(1, Ordering::Relaxed), intended: Instant::now() }
            }
        };
        let measured = slot.intended >= shared.measure_from;
        let sent_at = Instant::now();
        if sent_at > shared.deadline {
            if measured && let Ok(mut recorded) = shared.recorded.lock() {
                recorded.unsent += 1;
            }
            continue;
        }
        let (kind, path, body) = shared.workload.request(slot.idx);
        let result = tokio::time::timeout(options.timeout, async {
            if sender.as_ref().is_none_or(|sender| sender.is_closed()) {
                sender = Some(connect(&options.target).await?);
            }
            match sender.as_mut() {
                Some(sender) => send(sender, &options.target, kind, path, body).await,
                None => Err(anyhow::anyhow!("no connection")),
            }
        })
        .await;
        let done = Instant::now();
        let result = result.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {:?}", options.timeout)));
        if result.is_err() {
            // Start the next request on a fresh connection.
            sender = None;
        }
        let latency = done.saturating_duration_since(slot.intended).as_nanos() as u64;
        let lag = sent_at.saturating_duration_since(slot.intended).as_nanos() as u64;
        let Ok(mut recorded) = shared.recorded.lock() else { continue };
        let recorded = &mut *recorded;
        if !measured {
            // Warm-up: shown in the progress line, never in the results.
            if result.is_ok() {
                recorded.interval.saturating_record(latency.max(1));
            }
            continue;
        }
        recorded.lag.saturating_record(lag.max(1));
        match result {
            Ok(outcome) => {
                recorded.completed += 1;
                recorded.total.saturating_record(latency.max(1));
                recorded.interval.saturating_record(latency.max(1));
                if let Some(kind_count) = recorded.by_kind.get_mut(kind_idx(kind)) {
                    *kind_count += 1;
                }
                if (200..300).contains(&outcome.status) {
                    recorded.ok += 1;
                    recorded.decisions += shared.workload.decisions(kind);
                    if matches!(kind, Kind::Check | Kind::Batch) {
                        let allowed = count(&outcome.body, br#""allow":true"#);
                        recorded.allowed += allowed;
                        recorded.denied += count(&outcome.body, br#""allow":false"#);
                    }
                } else {
                    recorded.non_2xx += 1;
                    if recorded.last_error.is_none() {
                        recorded.last_error =
                            Some(format!("HTTP {} from {path}: {}", outcome.status, String::from_utf8_lossy(&outcome.body)));
                    }
                }
            }
            Err(error) => {
                recorded.errors += 1;
                recorded.interval_errors += 1;
                if recorded.last_error.is_none() {
                    recorded.last_error = Some(format!("{error:#}"));
                }
            }
        }
    }
}

/// Releases slots at their intended times from a plain thread: `thread::sleep` wakes within
/// tens of microseconds, where tokio's timer rounds up to the next millisecond.
fn dispatch(sender: mpsc::UnboundedSender<Slot>, start: Instant, end: Instant, rate: f64) -> u64 {
    let interval_ns = 1e9 / rate;
    let mut idx: u64 = 0;
    loop {
        let intended = start + Duration::from_nanos((idx as f64 * interval_ns) as u64);
        if intended >= end {
            break;
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        if sender.send(Slot { idx, intended }).is_err() {
            break;
        }
        idx += 1;
    }
    idx
}

async fn fetch_revision(target: &str) -> Option<u64> {
    let mut sender = connect(target).await.ok()?;
    let outcome = tokio::time::timeout(Duration::from_secs(1), send(&mut sender, target, Kind::Entitlements, "/v1/status", Bytes::new()))
        .await
        .ok()?
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&outcome.body).ok()?;
    value.get("revision")?.as_u64()
}

fn run_swap(swap: &Swap) -> Result<()> {
    match swap {
        Swap::Command { command, .. } => {
            let status = std::process::Command::new("sh").arg("-c").arg(command).status()?;
            anyhow::ensure!(status.success(), "swap command `{command}` exited with {status}");
            Ok(())
        }
        Swap::Files { dir, target, .. } => {
            let mut files: Vec<_> = std::fs::read_dir(dir)?.flatten().map(|entry| entry.path()).filter(|path| path.is_file()).collect();
            files.sort();
            let next = files.first().with_context(|| format!("no more snapshot files in `{}`", dir.display()))?;
            std::fs::rename(next, target).with_context(|| format!("cannot rename `{}` onto `{}`", next.display(), target.display()))?;
            Ok(())
        }
    }
}

pub async fn run(workload: Workload, options: RunOptions) -> Result<Summary> {
    // Fail fast, before the clock starts, if nothing listens.
    drop(connect(&options.target).await?);
    let ticks = procfs::clock_ticks() as f64;
    let own_pid = std::process::id();
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    let deadline = end + options.timeout;
    let shared = Arc::new(Shared {
        workload,
        options: options.clone(),
        measure_from,
        deadline,
        recorded: Mutex::new(Recorded {
            total: new_histogram()?,
            interval: new_histogram()?,
            lag: new_histogram()?,
            completed: 0,
            ok: 0,
            non_2xx: 0,
            errors: 0,
            unsent: 0,
            decisions: 0,
            allowed: 0,
            denied: 0,
            by_kind: [0; 4],
            interval_errors: 0,
            last_error: None,
        }),
        next_idx: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    let (dispatcher, receiver) = if options.rate > 0.0 {
        let (sender, receiver) = mpsc::unbounded_channel();
        let rate = options.rate;
        let handle = std::thread::Builder::new().name("dispatch".into()).spawn(move || dispatch(sender, start, end, rate))?;
        (Some(handle), Some(Arc::new(tokio::sync::Mutex::new(receiver))))
    } else {
        (None, None)
    };
    tokio::time::sleep_until(start.into()).await;
    let mut tasks = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        tasks.push(tokio::spawn(connection_task(Arc::clone(&shared), receiver.clone())));
    }
    drop(receiver);

    // Swaps happen only inside the measured window.
    let swaps = Arc::new(AtomicU64::new(0));
    let swap_failures = Arc::new(AtomicU64::new(0));
    let swapper = options.swap.clone().map(|swap| {
        let (swaps, swap_failures) = (Arc::clone(&swaps), Arc::clone(&swap_failures));
        std::thread::spawn(move || {
            // The writer of new snapshot files stands for a background process (a compiler or
            // the kubelet's atomic writer): at idle priority, replacing a large file (the
            // kernel frees the old one's page cache inside `rename`) does not compete with the
            // sidecar being measured.
            lower_priority();
            let every = match &swap {
                Swap::Command { every, .. } | Swap::Files { every, .. } => *every,
            };
            let mut next = measure_from + every / 2;
            while next < end {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                match run_swap(&swap) {
                    Ok(()) => swaps.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        eprintln!("swap failed: {error:#}");
                        swap_failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                next += every;
            }
        })
    });

    // Progress once a second; CPU and memory of the target around the measured window.
    let mut revisions = BTreeSet::new();
    let mut rss_start = 0;
    let mut rss_max = 0;
    let mut cpu_start: Option<u64> = None;
    let mut own_cpu_start: Option<u64> = None;
    let mut ticker = tokio::time::interval_at((start + Duration::from_secs(1)).into(), Duration::from_secs(1));
    let sample_every = Duration::from_millis(100);
    let mut sampler = tokio::time::interval(sample_every);
    let mut measuring = false;
    let sample_memory = |rss_max: &mut u64| {
        if let Some(memory) = options.pid.and_then(procfs::memory) {
            *rss_max = (*rss_max).max(memory.rss_kb);
        }
    };
    loop {
        tokio::select! {
            _ = sampler.tick() => {
                let now = Instant::now();
                if !measuring && now >= measure_from {
                    measuring = true;
                    cpu_start = options.pid.and_then(procfs::cpu_ticks);
                    own_cpu_start = procfs::cpu_ticks(own_pid);
                    rss_start = options.pid.and_then(procfs::memory).map(|memory| memory.rss_kb).unwrap_or(0);
                }
                if measuring && now <= end {
                    sample_memory(&mut rss_max);
                }
                if now >= end {
                    break;
                }
            }
            _ = ticker.tick() => {
                let elapsed = start.elapsed().as_secs_f64();
                let revision = if options.poll_status { fetch_revision(&options.target).await } else { None };
                if let Some(revision) = revision && Instant::now() >= measure_from {
                    revisions.insert(revision);
                }
                let Ok(mut recorded) = shared.recorded.lock() else { continue };
                let phase = if Instant::now() < measure_from { "warm-up" } else { "measure" };
                let rate_now = recorded.interval.len();
                if !options.quiet {
                    eprintln!(
                        "[{elapsed:5.1}s {phase}] {rate_now:>6} req/s  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  errors {}  non-2xx {}{}",
                        recorded.interval.value_at_quantile(0.5) as f64 / 1e6,
                        recorded.interval.value_at_quantile(0.99) as f64 / 1e6,
                        recorded.interval.max() as f64 / 1e6,
                        recorded.interval_errors,
                        recorded.non_2xx,
                        revision.map(|revision| format!("  revision {revision}")).unwrap_or_default(),
                    );
                }
                recorded.interval.reset();
                recorded.interval_errors = 0;
            }
        }
    }
    let cpu_end = options.pid.and_then(procfs::cpu_ticks);
    let own_cpu_end = procfs::cpu_ticks(own_pid);
    let memory_end = options.pid.and_then(procfs::memory);
    let scheduled = match dispatcher {
        Some(handle) => handle.join().map_err(|_| anyhow::anyhow!("dispatcher thread panicked"))?,
        None => {
            shared.stop.store(true, Ordering::Relaxed);
            shared.next_idx.load(Ordering::Relaxed)
        }
    };
    for task in tasks {
        let _ = task.await;
    }
    if let Some(swapper) = swapper {
        let _ = swapper.join();
    }
    if options.poll_status
        && options.swap.is_some()
        && let Some(revision) = fetch_revision(&options.target).await
    {
        revisions.insert(revision);
    }

    let recorded = shared.recorded.lock().map_err(|_| anyhow::anyhow!("a connection task panicked"))?;
    if let Some(error) = &recorded.last_error {
        eprintln!("first error: {error}");
    }
    let seconds = options.duration.as_secs_f64();
    let scheduled_measured = if options.rate > 0.0 { (seconds * options.rate).round() as u64 } else { scheduled };
    let sidecar = options.pid.map(|pid| {
        let cpu_seconds = match (cpu_start, cpu_end) {
            (Some(start), Some(end)) => end.saturating_sub(start) as f64 / ticks,
            _ => 0.0,
        };
        let achieved = recorded.completed as f64 / seconds;
        ProcessUse {
            pid,
            rss_start_kb: rss_start,
            rss_max_kb: rss_max,
            rss_end_kb: memory_end.map(|memory| memory.rss_kb).unwrap_or(0),
            hwm_end_kb: memory_end.map(|memory| memory.hwm_kb).unwrap_or(0),
            cpu_seconds,
            cores: cpu_seconds / seconds,
            cores_per_1k_rps: if achieved > 0.0 { cpu_seconds / seconds / (achieved / 1000.0) } else { 0.0 },
        }
    });
    let kinds = ["check", "batch", "meter", "entitlements"];
    Ok(Summary {
        label: options.label.clone(),
        scenario: format!("{:?}", shared.workload.scenario).to_lowercase(),
        target: options.target.clone(),
        rate: options.rate,
        connections: options.connections,
        warmup_secs: options.warmup.as_secs_f64(),
        duration_secs: seconds,
        scheduled: scheduled_measured,
        completed: recorded.completed,
        ok: recorded.ok,
        non_2xx: recorded.non_2xx,
        errors: recorded.errors,
        unsent: recorded.unsent,
        achieved_rps: recorded.completed as f64 / seconds,
        decisions: recorded.decisions,
        decisions_per_sec: recorded.decisions as f64 / seconds,
        allowed: recorded.allowed,
        denied: recorded.denied,
        by_kind: kinds.iter().zip(recorded.by_kind).filter(|(_, n)| *n > 0).map(|(kind, n)| (kind.to_string(), n)).collect(),
        latency_us: Latency::from_histogram(&recorded.total),
        send_lag_us: Latency::from_histogram(&recorded.lag),
        spectrum: spectrum(&recorded.total),
        swaps: swaps.load(Ordering::Relaxed),
        swap_failures: swap_failures.load(Ordering::Relaxed),
        revisions_seen: revisions.into_iter().collect(),
        sidecar,
        generator_cpu_seconds: match (own_cpu_start, own_cpu_end) {
            (Some(start), Some(end)) => end.saturating_sub(start) as f64 / ticks,
            _ => 0.0,
        },
    })
}

/// Lowers the calling thread to `SCHED_IDLE`, as the sidecar's own snapshot loader does, so
/// the swapper competes with nothing it measures. Failure leaves normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 changes only the calling thread's policy; `param` is a valid,
        // initialised value that outlives the call.
        #[expect(unsafe_code, reason = "sched_setscheduler has no safe wrapper in std")]
        let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if result != 0 {
            eprintln!("cannot lower the swapper's priority: {}", std::io::Error::last_os_error());
        }
    }
}
