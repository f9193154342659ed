//! Turns a finished run into a terminal summary, JSON and an SVG percentile chart. Pure
//! formatting: no network and no clocks.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency figures in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
    pub mean: f64,
    pub count: u64,
}

impl Latency {
    /// From a histogram recorded in nanoseconds.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50: us(histogram.value_at_quantile(0.50)),
            p90: us(histogram.value_at_quantile(0.90)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            p9999: us(histogram.value_at_quantile(0.9999)),
            max: us(histogram.max()),
            mean: histogram.mean() / 1000.0,
            count: histogram.len(),
        }
    }
}

/// What the sidecar process cost during the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessUse {
    pub pid: u32,
    pub rss_start_kb: u64,
    pub rss_max_kb: u64,
    pub rss_end_kb: u64,
    pub hwm_end_kb: u64,
    pub cpu_seconds: f64,
    /// CPU seconds per wall second: 1.0 is one core busy.
    pub cores: f64,
    /// Cores busy per 1000 requests per second of achieved rate.
    pub cores_per_1k_rps: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub label: String,
    pub scenario: String,
    pub target: String,
    /// Intended requests per second; 0 means closed loop (as fast as the connections go).
    pub rate: f64,
    pub connections: usize,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    /// Requests scheduled inside the measured window.
    pub scheduled: u64,
    pub completed: u64,
    pub ok: u64,
    pub non_2xx: u64,
    pub errors: u64,
    /// Scheduled but never sent before the run's deadline: counted as errors too.
    pub unsent: u64,
    pub achieved_rps: f64,
    pub decisions: u64,
    pub decisions_per_sec: f64,
    pub allowed: u64,
    pub denied: u64,
    pub by_kind: std::collections::BTreeMap<String, u64>,
    /// Latency from each request's intended send time to its last response byte.
    pub latency_us: Latency,
    /// How late the generator itself sent requests, relative to their intended times.
    pub send_lag_us: Latency,
    /// (percentile, microseconds) pairs for charts.
    pub spectrum: Vec<(f64, f64)>,
    pub swaps: u64,
    pub swap_failures: u64,
    pub revisions_seen: Vec<u64>,
    pub sidecar: Option<ProcessUse>,
    pub generator_cpu_seconds: f64,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.errors == 0 && self.unsent == 0 && self.non_2xx == 0 && self.completed > 0
    }
}

pub fn spectrum(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    if histogram.is_empty() {
        return points;
    }
    for value in histogram.iter_quantiles(8) {
        let percentile = value.quantile_iterated_to() * 100.0;
        points.push((percentile, value.value_iterated_to() as f64 / 1000.0));
        if percentile >= 99.9999 {
            break;
        }
    }
    points
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

pub fn print(summary: &Summary) {
    let latency = &summary.latency_us;
    eprintln!();
    println!("== {} ({}) -> {}", summary.label, summary.scenario, summary.target);
    let rate = if summary.rate > 0.0 { format!("{:.0}/s", summary.rate) } else { "closed loop".to_string() };
    println!(
        "   rate {rate} over {} connections, {:.0}s measured after {:.0}s warm-up",
        summary.connections, summary.duration_secs, summary.warmup_secs
    );
    println!(
        "   requests {} completed, {:.0}/s achieved; ok {}, non-2xx {}, errors {}, unsent {}",
        summary.completed, summary.achieved_rps, summary.ok, summary.non_2xx, summary.errors, summary.unsent
    );
    if summary.decisions > 0 {
        println!(
            "   decisions {} ({:.0}/s); allowed {}, denied {}",
            summary.decisions, summary.decisions_per_sec, summary.allowed, summary.denied
        );
    }
    println!(
        "   latency p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}",
        ms(latency.p50),
        ms(latency.p90),
        ms(latency.p99),
        ms(latency.p999),
        ms(latency.p9999),
        ms(latency.max)
    );
    println!(
        "   generator send lag p50 {}  p99 {}  max {}",
        ms(summary.send_lag_us.p50),
        ms(summary.send_lag_us.p99),
        ms(summary.send_lag_us.max)
    );
    if summary.swaps > 0 || summary.swap_failures > 0 {
        println!("   swaps {} (failed {}); revisions seen {:?}", summary.swaps, summary.swap_failures, summary.revisions_seen);
    }
    if let Some(sidecar) = &summary.sidecar {
        println!(
            "   target pid {}: rss start {} MiB, max {} MiB, end {} MiB, hwm {} MiB; cpu {:.2}s = {:.2} cores = {:.3} cores per 1k req/s",
            sidecar.pid,
            sidecar.rss_start_kb / 1024,
            sidecar.rss_max_kb / 1024,
            sidecar.rss_end_kb / 1024,
            sidecar.hwm_end_kb / 1024,
            sidecar.cpu_seconds,
            sidecar.cores,
            sidecar.cores_per_1k_rps
        );
    }
    println!("   generator cpu {:.2}s", summary.generator_cpu_seconds);
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// HdrHistogram-style chart: x is the percentile on a log scale of 1/(1-p), y is latency.
pub fn svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (width, height) = (860.0, 480.0);
    let (left, right, top, bottom) = (70.0, 200.0, 40.0, 50.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let max_nines = 5.0_f64;
    let x_of = |percentile: f64| {
        let tail = (1.0 - percentile / 100.0).max(10f64.powf(-max_nines));
        left + (-tail.log10() / max_nines) * plot_w
    };
    let max_us = series.iter().flat_map(|(_, points)| points.iter().map(|&(_, us)| us)).fold(0.0_f64, f64::max).max(1.0);
    let y_max_ms = nice_ceiling(max_us / 1000.0);
    let y_of = |us: f64| top + plot_h - (us / 1000.0 / y_max_ms) * plot_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, left + plot_w / 2.0, escape(title));
    for (nines, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"].iter().enumerate() {
        let x = left + nines as f64 / max_nines * plot_w;
        let _ = writeln!(out, r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##, top + plot_h);
        let _ = writeln!(out, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"#, top + plot_h + 18.0);
    }
    for tick in 0..=5 {
        let value_ms = y_max_ms * tick as f64 / 5.0;
        let y = y_of(value_ms * 1000.0);
        let _ = writeln!(out, r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, left + plot_w);
        let _ = writeln!(out, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, y + 4.0, trim_float(value_ms));
    }
    let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#, left + plot_w / 2.0, height - 10.0);
    let _ = writeln!(out, r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">latency (ms)</text>"#, top + plot_h / 2.0);
    let _ = writeln!(out, r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##);
    for (series_idx, (label, points)) in series.iter().enumerate() {
        let color = COLORS.get(series_idx % COLORS.len()).copied().unwrap_or("#000");
        let path: Vec<String> = points.iter().map(|&(percentile, us)| format!("{:.1},{:.1}", x_of(percentile), y_of(us))).collect();
        let _ = writeln!(out, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        let y = top + 16.0 + series_idx as f64 * 18.0;
        let x = left + plot_w + 12.0;
        let _ = writeln!(out, r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="3"/>"#, x + 18.0);
        let _ = writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, x + 24.0, y + 4.0, escape(label));
    }
    out.push_str("</svg>\n");
    out
}

fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if value <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
