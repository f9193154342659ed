//! Bar charts as SVG text, drawn on the server so that pages need no script and no asset from
//! anywhere else. Pure: numbers in, markup out; every label is escaped here.

use std::fmt::Write as _;

/// One bar: its label under the axis and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub value: u64,
}

/// A horizontal line across the chart (a soft or hard limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    pub value: u64,
    pub soft: bool,
}

const WIDTH: u32 = 640;
const HEIGHT: u32 = 220;
const LEFT: u32 = 56;
const BOTTOM: u32 = 40;
const TOP: u32 = 12;

/// Escapes text for SVG/HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A vertical bar chart of `bars` (oldest first) with optional limit lines. Bars at or above
/// the lowest limit are drawn as over it, those at 80 % or more of it as near. Each bar carries
/// its value in `data-value` and a `<title>`, so the figures can be read (and tested) exactly.
pub fn bars(title: &str, bars: &[Bar], lines: &[Line]) -> String {
    let peak = bars.iter().map(|bar| bar.value).chain(lines.iter().map(|line| line.value)).max().unwrap_or(0).max(1);
    let plot_height = f64::from(HEIGHT - TOP - BOTTOM);
    let plot_width = f64::from(WIDTH - LEFT - 8);
    let n_bars = bars.len().max(1) as f64;
    let slot = plot_width / n_bars;
    let bar_width = (slot * 0.7).max(1.0);
    let y_of = |value: u64| f64::from(TOP) + plot_height * (1.0 - value as f64 / peak as f64);
    let lowest_limit = lines.iter().map(|line| line.value).min();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    let axis_y = HEIGHT - BOTTOM;
    let _ = write!(svg, r#"<line x1="{LEFT}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="currentColor" stroke-opacity="0.3"/>"#, WIDTH - 8);
    let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="end">{peak}</text>"#, LEFT - 6, TOP + 4);
    let _ = write!(svg, r#"<text x="{}" y="{axis_y}" text-anchor="end">0</text>"#, LEFT - 6);
    for (bar_idx, bar) in bars.iter().enumerate() {
        let x = f64::from(LEFT) + slot * bar_idx as f64 + (slot - bar_width) / 2.0;
        let y = y_of(bar.value);
        let height = f64::from(axis_y) - y;
        let class = match lowest_limit {
            Some(limit) if bar.value >= limit => "bar over",
            Some(limit) if bar.value as f64 >= 0.8 * limit as f64 => "bar near",
            _ => "bar",
        };
        let label = escape(&bar.label);
        let _ = write!(
            svg,
            r#"<rect class="{class}" x="{x:.1}" y="{y:.1}" width="{bar_width:.1}" height="{height:.1}" data-label="{label}" data-value="{}"><title>{label}: {}</title></rect>"#,
            bar.value, bar.value
        );
        // Every label when they fit, else every other one.
        if bars.len() <= 12 || bar_idx % 2 == 0 {
            let _ = write!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#, x + bar_width / 2.0, axis_y + 16);
        }
    }
    for line in lines {
        let y = y_of(line.value);
        let (class, name) = if line.soft { ("soft", "soft limit") } else { ("limit", "hard limit") };
        let _ = write!(svg, r#"<line class="{class}" x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}"/>"#, WIDTH - 8);
        let _ = write!(svg, r#"<text x="{}" y="{:.1}" text-anchor="end">{name} {}</text>"#, WIDTH - 10, y - 4.0, line.value);
    }
    svg.push_str("</svg>");
    svg
}

/// A horizontal bar chart of named values, largest first as given: for analytics, whose labels
/// are long (feature names, reasons, accounts).
pub fn horizontal(title: &str, rows: &[(String, u64)]) -> String {
    let row_height = 22u32;
    let label_width = 200u32;
    let height = TOP + row_height * u32::try_from(rows.len()).unwrap_or(u32::MAX / 32).max(1) + 8;
    let peak = rows.iter().map(|(_, value)| *value).max().unwrap_or(0).max(1);
    let plot_width = f64::from(WIDTH - label_width - 60);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    if rows.is_empty() {
        let _ = write!(svg, r#"<text x="{LEFT}" y="{}">no data in this range</text>"#, TOP + 12);
    }
    for (row_idx, (label, value)) in rows.iter().enumerate() {
        let y = TOP + row_height * u32::try_from(row_idx).unwrap_or(0);
        let width = (plot_width * *value as f64 / peak as f64).max(if *value > 0 { 1.0 } else { 0.0 });
        let label = escape(label);
        let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#, label_width - 6, y + 14);
        let _ = write!(
            svg,
            r#"<rect class="bar" x="{label_width}" y="{}" width="{width:.1}" height="{}" data-label="{label}" data-value="{value}"><title>{label}: {value}</title></rect>"#,
            y + 3,
            row_height - 6
        );
        let _ = write!(svg, r#"<text x="{:.1}" y="{}">{value}</text>"#, f64::from(label_width) + width + 4.0, y + 14);
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_and_label_is_in_the_markup_and_escaped() {
        let svg = bars(
            "calls <per> month",
            &[Bar { label: "Nov".into(), value: 7 }, Bar { label: "<b>".into(), value: 950 }],
            &[Line { value: 1000, soft: false }],
        );
        assert!(svg.contains(r#"data-value="7""#));
        assert!(svg.contains(r#"data-value="950""#));
        assert!(svg.contains("bar near"));
        assert!(svg.contains("&lt;b&gt;"));
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("calls &lt;per&gt; month"));
    }

    #[test]
    fn an_empty_chart_still_draws() {
        assert!(bars("nothing", &[], &[]).ends_with("</svg>"));
        assert!(horizontal("nothing", &[]).contains("no data"));
    }
}
