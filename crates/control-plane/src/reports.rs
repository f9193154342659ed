//! Usage reads: an account's usage per meter and period with its limits, the billing export
//! (CSV or JSON, per period or raw events), feature analytics from the sidecars' decision
//! counts, and accounts near their limits. Limits come from the account as stored now,
//! evaluated at the end of each period (now, for the current one). Reads only; knows nothing
//! about HTTP beyond the error kinds.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::limits::{self, LimitView};
use super::store::AccountDoc;
use super::usage_store::{TotalRow, TotalsQuery};
use super::{ApiError, ControlPlane};
use tollgate_core::engine::Reason;
use tollgate_core::model::{Limit, Period};
use tollgate_core::period::{Window, format_rfc3339};

/// Which periods an account's usage answer covers besides the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// The current period only.
    Current,
    /// Up to N earlier periods with data, per meter.
    Earlier(u32),
    /// Every period starting in `[from, to)`.
    Range { from: i64, to: i64 },
}

/// One meter in one period, as `GET /v1/accounts/{id}/usage` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub meter: String,
    pub period_start: String,
    pub reset_at: Option<String>,
    pub used: u64,
    pub limit: Option<u64>,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
}

fn unknown_account(account: &str) -> ApiError {
    ApiError::not_found("unknown_account", format!("account `{account}` does not exist"))
}

/// The window of the period of `period` that starts at `period_start`.
fn window_at(period: Period, period_start: i64) -> Window {
    period.window(period_start)
}

/// When a period's limit is read: its last second, or now while it runs (and for `never`).
fn limit_instant(window: Window, now: i64) -> i64 {
    window.reset_at.map_or(now, |reset_at| now.min(reset_at.saturating_sub(1)))
}

/// Limits at given instants for (account, meter index, instant) triples, compiling each
/// account involved once; an account that no longer compiles gets no limits.
fn limits_at(control_plane: &ControlPlane, docs: &[(String, AccountDoc)], wanted: &[(String, u32, i64)]) -> Vec<Option<Limit>> {
    let read = |view: &LimitView<'_>, wanted: &mut dyn Iterator<Item = &(String, u32, i64)>| -> Vec<Option<Limit>> {
        wanted.map(|(account, meter_idx, at)| view.limit(account, *meter_idx, *at)).collect()
    };
    if let Ok(found) = limits::with_accounts(&control_plane.catalog, docs, |view| read(view, &mut wanted.iter())) {
        return found;
    }
    let by_account: HashMap<&str, &AccountDoc> = docs.iter().map(|(id, doc)| (id.as_str(), doc)).collect();
    wanted
        .iter()
        .map(|triple| {
            let doc = by_account.get(triple.0.as_str())?;
            limits::with_account(&control_plane.catalog, &triple.0, doc, |view| read(view, &mut std::iter::once(triple)))
                .ok()
                .and_then(|found| found.into_iter().next().flatten())
        })
        .collect()
}

fn docs_of(control_plane: &ControlPlane, accounts: impl IntoIterator<Item = String>) -> Result<Vec<(String, AccountDoc)>, ApiError> {
    let mut docs = Vec::new();
    for account in accounts {
        if let Some(doc) = control_plane.repository.account(&account)? {
            docs.push((account, doc));
        }
    }
    Ok(docs)
}

/// `GET /v1/accounts/{id}/usage`.
pub fn account_usage(control_plane: &ControlPlane, account: &str, history: History, now: i64) -> Result<serde_json::Value, ApiError> {
    let doc = control_plane.repository.account(account)?.ok_or_else(|| unknown_account(account))?;
    let catalog = &control_plane.catalog_data;
    let mut periods: Vec<(u32, i64, u64)> = Vec::new();
    for (meter_idx, meter) in catalog.meters.iter().enumerate() {
        let meter_idx = u32::try_from(meter_idx).unwrap_or(u32::MAX);
        let current = meter.period.window(now).start;
        let query = |from: i64, to: i64, limit: Option<u32>| TotalsQuery {
            account: Some(account.to_string()),
            meter: Some(meter.name.clone()),
            from,
            to,
            newest_first: true,
            limit,
        };
        let used_now =
            control_plane.repository.usage_totals(&query(current, current.saturating_add(1), Some(1)))?.first().map_or(0, |row| row.used);
        match history {
            History::Current => periods.push((meter_idx, current, used_now)),
            History::Earlier(n) => {
                periods.push((meter_idx, current, used_now));
                if n > 0 {
                    let earlier = control_plane.repository.usage_totals(&query(i64::MIN, current, Some(n)))?;
                    periods.extend(earlier.into_iter().map(|row| (meter_idx, row.period_start, row.used)));
                }
            }
            History::Range { from, to } => {
                let rows = control_plane.repository.usage_totals(&query(from, to, None))?;
                let mut found: Vec<(u32, i64, u64)> = rows.into_iter().map(|row| (meter_idx, row.period_start, row.used)).collect();
                if (from..to).contains(&current) && !found.iter().any(|(_, start, _)| *start == current) {
                    found.insert(0, (meter_idx, current, 0));
                }
                periods.extend(found);
            }
        }
    }
    let windows: Vec<Window> = periods
        .iter()
        .map(|(meter_idx, start, _)| {
            catalog
                .meters
                .get(*meter_idx as usize)
                .map_or(Window { start: *start, reset_at: None }, |meter| window_at(meter.period, *start))
        })
        .collect();
    let wanted: Vec<(String, u32, i64)> = periods
        .iter()
        .zip(&windows)
        .map(|((meter_idx, _, _), window)| (account.to_string(), *meter_idx, limit_instant(*window, now)))
        .collect();
    let found = limits_at(control_plane, &[(account.to_string(), doc)], &wanted);
    let meters: Vec<UsageRow> = periods
        .iter()
        .zip(&windows)
        .zip(found)
        .map(|(((meter_idx, start, used), window), limit)| UsageRow {
            meter: catalog.meters.get(*meter_idx as usize).map(|meter| meter.name.clone()).unwrap_or_default(),
            period_start: format_rfc3339(*start),
            reset_at: window.reset_at.map(format_rfc3339),
            used: *used,
            limit: limits::effective(limit.as_ref()).map(|(value, _)| value),
            soft_limit: limit.and_then(|limit| limit.soft),
            hard_limit: limit.and_then(|limit| limit.hard),
        })
        .collect();
    Ok(serde_json::json!({"account": account, "meters": meters}))
}

/// The format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
}

/// One row per (account, meter, period), or one per raw event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Periods,
    Events,
}

#[derive(Debug, Clone)]
pub struct ExportQuery {
    pub format: Format,
    pub granularity: Granularity,
    pub from: i64,
    pub to: i64,
    pub account: Option<String>,
}

/// An export ready to send.
#[derive(Debug, Clone)]
pub struct Export {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// A CSV field, quoted as RFC 4180 says when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_string() }
}

fn csv(header: &[&str], rows: &[Vec<String>]) -> Vec<u8> {
    let mut out = String::new();
    for line in std::iter::once(header.iter().map(|name| name.to_string()).collect::<Vec<_>>()).chain(rows.iter().cloned()) {
        let fields: Vec<String> = line.iter().map(|field| csv_field(field)).collect();
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out.into_bytes()
}

const PERIOD_COLUMNS: [&str; 8] = ["account", "meter", "unit", "period", "period_start", "period_end", "used", "limit"];
const EVENT_COLUMNS: [&str; 8] = ["account", "meter", "event_id", "amount", "at", "period_start", "received_at", "sidecar"];

/// `GET /v1/usage/export`: totals whose period starts in `[from, to)` (totals of meters that
/// never reset always, their one period spanning every range), or events whose own time is
/// in it, ordered by account, meter and period (or time).
pub fn export(control_plane: &ControlPlane, query: &ExportQuery, now: i64) -> Result<Export, ApiError> {
    let (header, rows): (&[&str], Vec<Vec<serde_json::Value>>) = match query.granularity {
        Granularity::Periods => (&PERIOD_COLUMNS, period_rows(control_plane, query, now)?),
        Granularity::Events => {
            let events = control_plane.repository.usage_events(query.account.as_deref(), query.from, query.to)?;
            let rows = events
                .into_iter()
                .map(|event| {
                    vec![
                        event.account.into(),
                        event.meter.into(),
                        event.event_id.into(),
                        event.amount.into(),
                        format_rfc3339(event.at).into(),
                        format_rfc3339(event.period_start).into(),
                        format_rfc3339(event.received_at).into(),
                        event.sidecar.into(),
                    ]
                })
                .collect();
            (&EVENT_COLUMNS, rows)
        }
    };
    Ok(match query.format {
        Format::Json => {
            let objects: Vec<serde_json::Map<String, serde_json::Value>> =
                rows.into_iter().map(|row| header.iter().map(|name| name.to_string()).zip(row).collect()).collect();
            Export { content_type: "application/json", body: serde_json::json!({"rows": objects}).to_string().into_bytes() }
        }
        Format::Csv => {
            let text_rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(|value| match value {
                            serde_json::Value::Null => String::new(),
                            serde_json::Value::String(text) => text,
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect();
            Export { content_type: "text/csv; charset=utf-8", body: csv(header, &text_rows) }
        }
    })
}

fn period_rows(control_plane: &ControlPlane, query: &ExportQuery, now: i64) -> Result<Vec<Vec<serde_json::Value>>, ApiError> {
    let catalog = &control_plane.catalog_data;
    let period_of =
        |meter: &str| catalog.meter_index.get(meter).and_then(|idx| catalog.meters.get(*idx as usize)).map(|meter| meter.period);
    let in_range = TotalsQuery { account: query.account.clone(), from: query.from, to: query.to, ..TotalsQuery::default() };
    let mut totals: Vec<TotalRow> =
        control_plane.repository.usage_totals(&in_range)?.into_iter().filter(|row| period_of(&row.meter) != Some(Period::Never)).collect();
    for meter in catalog.meters.iter().filter(|meter| meter.period == Period::Never) {
        let never =
            TotalsQuery { account: query.account.clone(), meter: Some(meter.name.clone()), from: 0, to: 1, ..TotalsQuery::default() };
        totals.extend(control_plane.repository.usage_totals(&never)?);
    }
    totals.sort_by(|a, b| (&a.account, &a.meter, a.period_start).cmp(&(&b.account, &b.meter, b.period_start)));
    let mut accounts: Vec<String> = totals.iter().map(|row| row.account.clone()).collect();
    accounts.dedup();
    let docs = docs_of(control_plane, accounts)?;
    let windows: Vec<Option<Window>> =
        totals.iter().map(|row| period_of(&row.meter).map(|period| window_at(period, row.period_start))).collect();
    let wanted: Vec<(String, u32, i64)> = totals
        .iter()
        .zip(&windows)
        .map(|(row, window)| {
            let meter_idx = catalog.meter_index.get(&row.meter).copied().unwrap_or(u32::MAX);
            (row.account.clone(), meter_idx, window.map_or(now, |window| limit_instant(window, now)))
        })
        .collect();
    let found = limits_at(control_plane, &docs, &wanted);
    Ok(totals
        .into_iter()
        .zip(windows)
        .zip(found)
        .map(|((row, window), limit)| {
            let meter = catalog.meter_index.get(&row.meter).and_then(|idx| catalog.meters.get(*idx as usize));
            vec![
                row.account.into(),
                row.meter.into(),
                meter.map(|meter| meter.unit.clone()).unwrap_or_default().into(),
                meter.map(|meter| meter.period.as_str()).unwrap_or_default().into(),
                format_rfc3339(row.period_start).into(),
                window.and_then(|window| window.reset_at).map(format_rfc3339).into(),
                row.used.into(),
                limits::effective(limit.as_ref()).map(|(value, _)| value).into(),
            ]
        })
        .collect())
}

/// `GET /v1/analytics/features`: decision counts of the days starting in `[from, to)`.
pub fn feature_analytics(control_plane: &ControlPlane, from: i64, to: i64) -> Result<serde_json::Value, ApiError> {
    let totals = control_plane.repository.decision_totals(from, to)?;
    let users: HashMap<String, u64> = control_plane.repository.decision_users(from, to)?.into_iter().collect();
    let ok = Reason::Ok.as_str();
    let features: Vec<serde_json::Value> = control_plane
        .catalog_data
        .features
        .iter()
        .map(|feature| {
            let mine = totals.iter().filter(|total| total.feature == feature.name);
            let (mut allowed, mut denied, mut accounts) = (0u64, 0u64, 0u64);
            let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
            for total in mine {
                if total.reason == ok {
                    allowed = allowed.saturating_add(total.count);
                    accounts = total.accounts;
                } else {
                    denied = denied.saturating_add(total.count);
                    let count = by_reason.entry(total.reason.as_str()).or_insert(0);
                    *count = count.saturating_add(total.count);
                }
            }
            serde_json::json!({
                "feature": feature.name,
                "accounts": accounts,
                "users": users.get(&feature.name).copied().unwrap_or(0),
                "allowed": allowed,
                "denied": denied,
                "denied_by_reason": by_reason,
            })
        })
        .collect();
    Ok(serde_json::json!({"from": format_rfc3339(from), "to": format_rfc3339(to), "features": features}))
}

/// One account near or over a limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NearLimit {
    pub account: String,
    pub meter: String,
    pub period_start: String,
    pub used: u64,
    pub limit: u64,
    pub kind: &'static str,
    pub ratio: f64,
    /// Usage has reached the limit.
    pub over: bool,
}

/// `GET /v1/analytics/limits`: current-period totals at or above `threshold` times their
/// limit, highest ratio first.
pub fn limit_analytics(control_plane: &ControlPlane, threshold: f64, now: i64) -> Result<serde_json::Value, ApiError> {
    let catalog = &control_plane.catalog_data;
    let mut totals: Vec<(u32, TotalRow)> = Vec::new();
    for (meter_idx, meter) in catalog.meters.iter().enumerate() {
        let start = meter.period.window(now).start;
        let query = TotalsQuery { meter: Some(meter.name.clone()), from: start, to: start.saturating_add(1), ..TotalsQuery::default() };
        let meter_idx = u32::try_from(meter_idx).unwrap_or(u32::MAX);
        totals.extend(control_plane.repository.usage_totals(&query)?.into_iter().map(|row| (meter_idx, row)));
    }
    let mut accounts: Vec<String> = totals.iter().map(|(_, row)| row.account.clone()).collect();
    accounts.sort();
    accounts.dedup();
    let docs = docs_of(control_plane, accounts)?;
    let wanted: Vec<(String, u32, i64)> = totals.iter().map(|(meter_idx, row)| (row.account.clone(), *meter_idx, now)).collect();
    let found = limits_at(control_plane, &docs, &wanted);
    let mut near: Vec<NearLimit> = totals
        .into_iter()
        .zip(found)
        .filter_map(|((_, row), limit)| {
            let (limit, kind) = limits::effective(limit.as_ref())?;
            // A zero limit has no ratio; any use of it counts as fully used and more.
            let ratio = row.used as f64 / limit.max(1) as f64;
            (ratio >= threshold).then(|| NearLimit {
                over: row.used >= limit,
                account: row.account,
                meter: row.meter,
                period_start: format_rfc3339(row.period_start),
                used: row.used,
                limit,
                kind: kind.as_str(),
                ratio,
            })
        })
        .collect();
    near.sort_by(|a, b| b.ratio.total_cmp(&a.ratio).then_with(|| (&a.account, &a.meter).cmp(&(&b.account, &b.meter))));
    Ok(serde_json::json!({"threshold": threshold, "accounts": near}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_as_rfc_4180_says() {
        let text =
            String::from_utf8(csv(&["a", "b"], &[vec!["x,y".into(), "say \"hi\"".into()], vec!["plain".into(), String::new()]])).unwrap();
        assert_eq!(text, "a,b\r\n\"x,y\",\"say \"\"hi\"\"\"\r\nplain,\r\n");
    }
}
