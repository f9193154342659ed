#![allow(clippy::disallowed_methods, reason = "a load generator measures with the monotonic clock itself")]
//! `tollgate-load`: an open-loop, coordinated-omission-corrected load generator for the
//! Tollgate sidecar, the bare-hyper floor server it is compared with, the snapshot
//! re-stamper for hot-swap runs, and a chart maker. Talks to loopback addresses only.

mod floor;
mod procfs;
mod report;
mod restamp;
mod run;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

use run::{RunOptions, Swap};
use workload::{Scenario, Workload};

#[derive(Parser)]
#[command(name = "tollgate-load", version, about = "Load generator and floor server for the Tollgate sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send requests at a fixed rate and report latency from their intended send times.
    Run(Box<RunArgs>),
    /// Serve a fixed small JSON body on every path: the floor of HTTP on loopback.
    Floor {
        /// Address to serve on (not the sidecar's 8181 nor the control plane's 8282, and
        /// below the kernel's ephemeral port range, so it never collides with either).
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: String,
        /// Tokio worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Write copies of a snapshot re-signed under revisions FROM, FROM+1, … for swap runs.
    Restamp {
        snapshot: PathBuf,
        /// Secret key file written by `tollgate keygen`.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        count: u64,
    },
    /// Print runs' `--json` files as one Markdown table.
    Table {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// Print a run's p50/p99/p99.9 as ratios to a floor run at the same rate.
    Ratio {
        #[arg(long)]
        floor: PathBuf,
        run: PathBuf,
    },
    /// Draw several runs' `--json` files into one percentile chart.
    Chart {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Server address, host:port on loopback.
    #[arg(long, default_value = "127.0.0.1:8181")]
    target: String,
    #[arg(long, value_enum, default_value_t = Scenario::Check)]
    scenario: Scenario,
    /// Requests per second; 0 runs closed loop (each connection sends as fast as it can).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the same rate before measuring, not counted.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Tokio worker threads of the generator (the dispatcher is one more thread).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Accounts in the snapshot: acct-0 … acct-{N-1}.
    #[arg(long, default_value_t = 10_000)]
    accounts: u64,
    #[arg(long, default_value_t = 64)]
    features: u64,
    /// Zipf exponent of account popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Checks per request in the `batch` scenario.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Seconds before a request counts as an error.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Install a new snapshot every SECS during the measured window.
    #[arg(long)]
    swap_every: Option<f64>,
    /// With --swap-every: shell command that installs the next snapshot.
    #[arg(long, conflicts_with = "swap_dir")]
    swap_cmd: Option<String>,
    /// With --swap-every: directory of snapshots (from `restamp`) renamed in name order onto --swap-target.
    #[arg(long, requires = "swap_target")]
    swap_dir: Option<PathBuf>,
    /// The snapshot file the sidecar watches.
    #[arg(long)]
    swap_target: Option<PathBuf>,
    /// Process to sample for RSS and CPU time (the sidecar): a PID, or a file holding one
    /// (a PID file). Without it, the process listening on `--target` is found in /proc.
    #[arg(long)]
    pid: Option<String>,
    /// Do not sample any process for RSS and CPU time.
    #[arg(long, conflicts_with = "pid")]
    no_pid: bool,
    /// Do not poll GET /v1/status each second.
    #[arg(long)]
    no_status: bool,
    /// Name for this run in the summary, JSON and charts.
    #[arg(long)]
    label: Option<String>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Exit non-zero if any request failed, timed out, went unsent or was not 2xx.
    #[arg(long)]
    fail_on_error: bool,
    /// CI smoke run: mix scenario, 500 req/s, 2 s, no warm-up, 8 connections, --fail-on-error.
    #[arg(long)]
    smoke: bool,
    #[arg(long)]
    quiet: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?)
}

fn run_command(mut args: RunArgs) -> Result<bool> {
    if args.smoke {
        args.scenario = Scenario::Mix;
        args.rate = 500.0;
        args.duration = 2.0;
        args.warmup = 0.0;
        args.connections = args.connections.min(8);
        args.fail_on_error = true;
    }
    ensure!(args.rate >= 0.0 && args.rate.is_finite(), "`--rate` must be 0 or more");
    ensure!(args.duration > 0.0, "`--duration` must be more than 0");
    ensure!(args.connections > 0, "`--connections` must be at least 1");
    ensure!(args.batch_size > 0 && args.batch_size <= 10_000, "`--batch-size` must be 1 to 10000");
    let swap = match (args.swap_every, args.swap_cmd, args.swap_dir, args.swap_target) {
        (None, None, None, _) => None,
        (Some(every), Some(command), None, _) => Some(Swap::Command { every: Duration::from_secs_f64(every), command }),
        (Some(every), None, Some(dir), Some(target)) => Some(Swap::Files { every: Duration::from_secs_f64(every), dir, target }),
        _ => anyhow::bail!("`--swap-every` needs either `--swap-cmd` or `--swap-dir` with `--swap-target`"),
    };
    // Output folders are made (or refused) before the run, not after minutes of load.
    for path in [&args.json, &args.svg].into_iter().flatten() {
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create the output folder `{}`", parent.display()))?;
        }
    }
    let pid = if args.no_pid { None } else { target_pid(args.pid.as_deref(), &args.target)? };
    let workload = Workload::new(args.scenario, args.accounts, args.features, args.zipf, args.batch_size, args.seed);
    let label = args.label.unwrap_or_else(|| format!("{:?} @ {}/s", args.scenario, args.rate).to_lowercase());
    let options = RunOptions {
        label,
        target: args.target,
        rate: args.rate,
        connections: args.connections,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration),
        timeout: Duration::from_secs_f64(args.timeout),
        swap,
        pid,
        poll_status: !args.no_status,
        quiet: args.quiet,
    };
    // Timer slack is 50 µs by default: the dispatcher would send every request that late.
    // Threads inherit the slack of the thread that creates them, so set it before any exist.
    let _ = std::fs::write("/proc/self/timerslack_ns", "1000");
    let summary = runtime(args.threads)?.block_on(run::run(workload, options))?;
    report::print(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?).with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let svg = report::svg(&summary.label, &[(summary.label.clone(), summary.spectrum.clone())]);
        std::fs::write(path, svg).with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    if args.fail_on_error && !summary.passed() {
        eprintln!(
            "FAIL: {} errors, {} unsent, {} non-2xx of {} completed",
            summary.errors, summary.unsent, summary.non_2xx, summary.completed
        );
        return Ok(false);
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(*args),
        Command::Floor { listen, workers } => runtime(workers).and_then(|runtime| runtime.block_on(floor::serve(&listen))).map(|()| true),
        Command::Restamp { snapshot, key, out_dir, from, count } => restamp::restamp(&snapshot, &key, &out_dir, from, count).map(|()| true),
        Command::Table { runs } => table(&runs).map(|()| true),
        Command::Ratio { floor, run } => ratio(&floor, &run).map(|()| true),
        Command::Chart { out, title, runs } => chart(&out, &title, &runs).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The process to sample: `--pid` as a number or a PID file, else whoever listens on the
/// target's port (so several sidecars on one machine are told apart by port, not by name).
fn target_pid(pid: Option<&str>, target: &str) -> Result<Option<u32>> {
    match pid {
        Some(text) => match text.parse::<u32>() {
            Ok(pid) => Ok(Some(pid)),
            Err(_) => {
                let contents = std::fs::read_to_string(text)
                    .with_context(|| format!("`--pid` value `{text}` is neither a PID nor a readable PID file"))?;
                let pid = contents.trim().parse::<u32>().with_context(|| format!("PID file `{text}` does not hold a process id"))?;
                Ok(Some(pid))
            }
        },
        None => {
            let port = target.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok());
            let found = port.and_then(procfs::listener_pid);
            if found.is_none() {
                eprintln!("note: no process found listening on `{target}`; RSS and CPU are not sampled (give --pid)");
            }
            Ok(found)
        }
    }
}

/// Prints a line to stdout; a closed pipe (`| head`) ends the output quietly instead of
/// panicking as `println!` does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(error.into());
        }
    }};
}

fn read_summary(path: &std::path::Path) -> Result<report::Summary> {
    let text = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("`{}` is not a run summary", path.display()))
}

fn table(runs: &[PathBuf]) -> Result<()> {
    out!(
        "| run | rate/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | non-2xx | decisions/s | target cores | cores per 1k/s | target max RSS MiB |"
    );
    out!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for path in runs {
        let run = read_summary(path)?;
        let latency = &run.latency_us;
        let ms = |us: f64| format!("{:.3}", us / 1000.0);
        let rate = if run.rate > 0.0 { format!("{:.0}", run.rate) } else { "closed".to_string() };
        let (cores, per_1k, rss) = match &run.sidecar {
            Some(sidecar) => (
                format!("{:.2}", sidecar.cores),
                format!("{:.3}", sidecar.cores_per_1k_rps),
                format!("{:.1}", sidecar.rss_max_kb as f64 / 1024.0),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out!(
            "| {} | {rate} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {cores} | {per_1k} | {rss} |",
            run.label,
            run.achieved_rps,
            ms(latency.p50),
            ms(latency.p90),
            ms(latency.p99),
            ms(latency.p999),
            ms(latency.max),
            run.errors + run.unsent,
            run.non_2xx,
            run.decisions_per_sec,
        );
    }
    Ok(())
}

fn ratio(floor: &std::path::Path, run: &std::path::Path) -> Result<()> {
    let floor = read_summary(floor)?;
    let run = read_summary(run)?;
    let (f, r) = (&floor.latency_us, &run.latency_us);
    out!(
        "{} vs {}: p50 {:.2}x  p99 {:.2}x  p99.9 {:.2}x",
        run.label,
        floor.label,
        r.p50 / f.p50.max(0.001),
        r.p99 / f.p99.max(0.001),
        r.p999 / f.p999.max(0.001)
    );
    Ok(())
}

fn chart(out: &std::path::Path, title: &str, runs: &[PathBuf]) -> Result<()> {
    let mut series = Vec::new();
    for path in runs {
        let summary = read_summary(path)?;
        series.push((summary.label, summary.spectrum));
    }
    std::fs::write(out, report::svg(title, &series)).with_context(|| format!("cannot write `{}`", out.display()))?;
    Ok(())
}
