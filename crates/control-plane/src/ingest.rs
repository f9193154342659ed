//! Usage ingestion, `POST /v1/usage`: a sidecar's batch of metering events and decision
//! counts: the envelope is validated as a whole (a bad one writes nothing), each record on its
//! own (a bad one is reported and left out), and the batch is applied in one repository
//! transaction. Events are deduplicated forever on (account, meter, event id); each new one
//! adds to the total of its period, found from the event's own time by `Period::window`; every
//! changed total is stamped with the next usage sequence number, and the answer carries the
//! totals changed since the sidecar's cursor, which is how sidecars learn other pods' usage.
//! With an endpoint subscribed to `usage.threshold`, a total reaching one of its meter's
//! thresholds (the catalog's, default 80 % and 100 %) enqueues one message in the same
//! transaction, once per (account, meter, period, threshold). Knows nothing about HTTP beyond
//! the error kinds.

use std::collections::{BTreeMap, HashMap};

use super::limits::{self, MeterLimits};
use super::metrics::IngestResult;
use super::store::{self, Transaction};
use super::usage_store::NewEvent;
use super::{ApiError, ControlPlane, webhooks};
use tollgate_core::engine::Reason;
use tollgate_core::model::{Period, SnapshotData};
use tollgate_core::period::{format_rfc3339, parse_rfc3339};

/// Most totals in one answer; `more` says when others remain.
pub const TOTALS_PAGE: u32 = 10_000;
pub use tollgate_protocol::usage::{
    DecisionRow as DecisionCount, MAX_EVENT_ID, MAX_EVENTS, MAX_FUTURE_SECS, MAX_SIDECAR_ID, MAX_USER, MAX_USERS, RejectedDecision,
    RejectedEvent, UsageAnswer as IngestAnswer, UsageBatch, UsageEvent, UsageTotal as TotalJson, rules,
};

fn sidecar_id_ok(id: &str) -> bool {
    (1..=MAX_SIDECAR_ID).contains(&id.len()) && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_'))
}

/// A batch whose envelope passed validation, with each record's own verdict.
#[derive(Debug)]
struct Checked {
    batch: UsageBatch,
    /// Each event's `at` in unix seconds, or what is wrong with the event.
    event_times: Vec<Result<i64, String>>,
    /// What is wrong with each decision row, if anything.
    decision_errors: Vec<Option<String>>,
    /// Start of the UTC day the decision counts belong to.
    decision_day: i64,
}

/// One event's verdict under the shared record rules: its time, or what is wrong.
fn check_event(idx: usize, event: &UsageEvent, now: i64) -> Result<i64, String> {
    rules::amount(event.amount).map_err(|error| format!("`events[{idx}].amount` {error}"))?;
    rules::event_id(&event.id).map_err(|error| format!("`events[{idx}].id` {error}"))?;
    let at = parse_rfc3339(&event.at).ok_or_else(|| format!("`events[{idx}].at` value `{}` is not an RFC 3339 timestamp", event.at))?;
    rules::event_time(at, now).map_err(|error| format!("`events[{idx}].at` value `{}` {error}", event.at))?;
    Ok(at)
}

/// One decision row's verdict under the shared record rules.
fn check_decision(idx: usize, decision: &DecisionCount) -> Result<(), String> {
    if Reason::parse(&decision.reason).is_none() {
        return Err(format!("`decisions[{idx}].reason` value `{}` is not a reason code", decision.reason));
    }
    rules::decision_count(decision.count).map_err(|error| format!("`decisions[{idx}].count` {error}"))?;
    if decision.users.len() > MAX_USERS {
        return Err(format!("`decisions[{idx}].users` holds {} names; at most {MAX_USERS}", decision.users.len()));
    }
    if let Some((user, error)) = decision.users.iter().find_map(|user| rules::user(user).err().map(|error| (user, error))) {
        let shown: String = user.chars().take(40).collect();
        return Err(format!("`decisions[{idx}].users` name `{shown}` {error}"));
    }
    Ok(())
}

/// The envelope: what only the sender can get wrong as a whole (its id, the batch's size),
/// refused with the field named. Each record is judged on its own: a bad one is reported and
/// left out, and the rest of the batch counts, so one bad record never blocks the others.
fn check(batch: UsageBatch, now: i64) -> Result<Checked, ApiError> {
    if !sidecar_id_ok(&batch.sidecar) {
        return Err(ApiError::invalid(format!(
            "`sidecar` value `{}` must be 1 to {MAX_SIDECAR_ID} characters of letters, digits, `-` or `_`",
            batch.sidecar
        )));
    }
    if batch.events.len() > MAX_EVENTS {
        return Err(ApiError::invalid(format!("`events` holds {} events; at most {MAX_EVENTS} per batch", batch.events.len())));
    }
    let event_times = batch.events.iter().enumerate().map(|(idx, event)| check_event(idx, event, now)).collect();
    let decision_errors = batch.decisions.iter().enumerate().map(|(idx, decision)| check_decision(idx, decision).err()).collect();
    let decisions_at = match &batch.decisions_at {
        Some(text) => {
            parse_rfc3339(text).ok_or_else(|| ApiError::invalid(format!("`decisions_at` value `{text}` is not an RFC 3339 timestamp")))?
        }
        None => now,
    };
    Ok(Checked { batch, event_times, decision_errors, decision_day: Period::Day.window(decisions_at).start })
}

/// Whether a total's period is the one in force at `now` (always, for period `never`).
pub fn is_current(catalog: &SnapshotData, meter: &str, period_start: i64, now: i64) -> bool {
    catalog
        .meter_index
        .get(meter)
        .and_then(|meter_idx| catalog.meters.get(*meter_idx as usize))
        .is_some_and(|meter| meter.period.window(now).start == period_start)
}

/// A total this batch changed.
#[derive(Debug)]
struct Changed {
    account: String,
    meter_idx: u32,
    period_start: i64,
    used: u64,
}

/// Parses, checks and applies one batch as of `now` (unix seconds).
pub fn ingest(control_plane: &ControlPlane, body: &[u8], now: i64) -> Result<IngestAnswer, ApiError> {
    let batch: UsageBatch = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    let checked = check(batch, now)?;
    let answer = store::write(control_plane.repository.as_ref(), |transaction: &mut dyn Transaction| {
        apply(control_plane, transaction, &checked, now)
    });
    let metrics = &control_plane.metrics;
    metrics.usage_batch();
    let (answer, enqueued) = answer?;
    metrics.usage_event(IngestResult::Counted, answer.counted);
    metrics.usage_event(IngestResult::Duplicate, answer.duplicates);
    metrics.usage_event(IngestResult::Rejected, answer.rejected.len() as u64);
    if enqueued > 0 {
        control_plane.webhook_wake.notify_one();
    }
    Ok(answer)
}

fn apply(
    control_plane: &ControlPlane,
    transaction: &mut dyn Transaction,
    checked: &Checked,
    now: i64,
) -> Result<(IngestAnswer, usize), ApiError> {
    let catalog = &control_plane.catalog_data;
    let batch = &checked.batch;
    // Account id → the revision it is stored at; `None` for no such account.
    let mut accounts: HashMap<&str, Option<u64>> = HashMap::new();
    let mut rejected = Vec::new();
    let (mut counted, mut duplicates) = (0u64, 0u64);
    // Ordered, so totals are stamped in a stable order.
    let mut added: BTreeMap<(&str, u32, i64), u64> = BTreeMap::new();
    for (event, at) in batch.events.iter().zip(&checked.event_times) {
        let reject =
            |error: String| RejectedEvent { id: event.id.clone(), account: event.account.clone(), meter: event.meter.clone(), error };
        let at = match at {
            Ok(at) => at,
            Err(error) => {
                rejected.push(reject(error.clone()));
                continue;
            }
        };
        let Some((meter_idx, meter)) =
            catalog.meter_index.get(&event.meter).and_then(|meter_idx| Some((*meter_idx, catalog.meters.get(*meter_idx as usize)?)))
        else {
            rejected.push(reject(format!("meter `{}` is not in the catalog", event.meter)));
            continue;
        };
        let revision = match accounts.get(event.account.as_str()) {
            Some(revision) => *revision,
            None => {
                let revision = transaction.account_revision(&event.account)?;
                accounts.insert(&event.account, revision);
                revision
            }
        };
        if revision.is_none() {
            rejected.push(reject(format!("account `{}` does not exist", event.account)));
            continue;
        }
        let period_start = meter.period.window(*at).start;
        let new = transaction.record_event(&NewEvent {
            account: &event.account,
            meter: &event.meter,
            event_id: &event.id,
            amount: event.amount,
            at: *at,
            period_start,
            received_at: now,
            sidecar: &batch.sidecar,
        })?;
        if new {
            counted += 1;
            let total = added.entry((event.account.as_str(), meter_idx, period_start)).or_insert(0);
            *total = total.saturating_add(event.amount);
        } else {
            duplicates += 1;
        }
    }
    let mut changed = Vec::with_capacity(added.len());
    for ((account, meter_idx, period_start), amount) in added {
        let meter = catalog.meters.get(meter_idx as usize).map_or("", |meter| meter.name.as_str());
        let change = transaction.add_usage(account, meter, period_start, amount, now)?;
        changed.push(Changed { account: account.to_string(), meter_idx, period_start, used: change.after });
    }
    let enqueued = if transaction.has_subscribers(webhooks::EventType::UsageThreshold)? {
        enqueue_thresholds(control_plane, transaction, &accounts, &changed, now)?
    } else {
        0
    };
    let mut rejected_decisions = Vec::new();
    for (decision, error) in batch.decisions.iter().zip(&checked.decision_errors) {
        if let Some(error) = error {
            rejected_decisions.push(RejectedDecision {
                account: decision.account.clone(),
                feature: decision.feature.clone(),
                reason: decision.reason.clone(),
                error: error.clone(),
            });
            continue;
        }
        if !catalog.feature_index.contains_key(&decision.feature) {
            continue;
        }
        let exists = match accounts.get(decision.account.as_str()) {
            Some(revision) => revision.is_some(),
            None => {
                let revision = transaction.account_revision(&decision.account)?;
                accounts.insert(&decision.account, revision);
                revision.is_some()
            }
        };
        if !exists {
            continue;
        }
        let day = checked.decision_day;
        if decision.count > 0 {
            transaction.add_decisions(day, &decision.feature, &decision.account, &decision.reason, decision.count)?;
        }
        for user in &decision.users {
            transaction.add_decision_user(day, &decision.feature, &decision.account, user)?;
        }
    }
    transaction.sidecar_batch(&batch.sidecar, now, batch.events.len() as u64)?;
    let page = control_plane.config.usage_page.max(1);
    let mut rows = transaction.usage_changed_since(batch.since, page.saturating_add(1))?;
    let more = rows.len() > page as usize;
    rows.truncate(page as usize);
    // Nothing past `since`: the cursor stays, unless `since` is ahead of every sequence
    // handed out (a restored database), when it comes back down so the sidecar can tell.
    let cursor = match rows.last() {
        Some(row) => row.seq,
        None => batch.since.min(transaction.usage_sequence()?),
    };
    let totals = rows
        .into_iter()
        .filter(|row| is_current(catalog, &row.meter, row.period_start, now))
        .map(|row| TotalJson { account: row.account, meter: row.meter, period_start: format_rfc3339(row.period_start), used: row.used })
        .collect();
    Ok((IngestAnswer { counted, duplicates, rejected, rejected_decisions, totals, cursor, more }, enqueued))
}

/// Enqueues a `usage.threshold` message for every threshold a changed total has reached that
/// was not enqueued before; returns how many were added.
fn enqueue_thresholds(
    control_plane: &ControlPlane,
    transaction: &mut dyn Transaction,
    accounts: &HashMap<&str, Option<u64>>,
    changed: &[Changed],
    now: i64,
) -> Result<usize, ApiError> {
    let catalog = &control_plane.catalog_data;
    let mut limits: HashMap<String, MeterLimits> = HashMap::new();
    let mut missing = Vec::new();
    for total in changed {
        if limits.contains_key(&total.account) || missing.iter().any(|(id, _, _)| id == &total.account) {
            continue;
        }
        let revision = accounts.get(total.account.as_str()).copied().flatten().unwrap_or(0);
        match control_plane.limits.get(&total.account, revision, now) {
            Some(found) => {
                limits.insert(total.account.clone(), found);
            }
            None => {
                if let Some(doc) = transaction.account(&total.account)? {
                    missing.push((total.account.clone(), revision, doc));
                }
            }
        }
    }
    if !missing.is_empty() {
        limits.extend(control_plane.limits.fill(&control_plane.catalog, catalog.meters.len(), missing, now));
    }
    let mut enqueued = 0;
    for total in changed {
        let limit = limits.get(&total.account).and_then(|meters| meters.get(total.meter_idx as usize)).and_then(Option::as_ref);
        let Some((limit, kind)) = limits::effective(limit) else { continue };
        let meter = catalog.meters.get(total.meter_idx as usize).map_or("", |meter| meter.name.as_str());
        for threshold in webhooks::reached(total.used, limit, kind, control_plane.integrations.thresholds(meter)) {
            let data = serde_json::json!({
                "account": total.account,
                "meter": meter,
                "period_start": format_rfc3339(total.period_start),
                "threshold": threshold,
                "used": total.used,
                "limit": limit,
                "kind": kind.as_str(),
            });
            let key = format!("usage.threshold/{}/{meter}/{}/{threshold}", total.account, total.period_start);
            if webhooks::enqueue_once(transaction, webhooks::EventType::UsageThreshold, &key, data, now)?.is_some() {
                enqueued += 1;
            }
        }
    }
    Ok(enqueued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage_store::TotalsQuery;
    use crate::{Caller, changes};

    fn control_plane(dir: &std::path::Path, config: crate::Config) -> ControlPlane {
        let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let control_plane = ControlPlane::open_with_config(dir, &policies, key, Vec::new(), config).unwrap();
        let caller = Caller { key_id: "test".into(), scope: store::Scope::Admin, account: None };
        for (n, account) in ["acme", "hooli", "initech"].iter().enumerate() {
            let order = serde_json::json!({"order_id": format!("o-{n}"), "action": "new", "account": account, "plan": "team"});
            changes::order(&control_plane, &caller, order.to_string().as_bytes()).unwrap();
        }
        control_plane
    }

    fn batch(since: u64, events: &[(&str, &str, &str, u64, &str)]) -> Vec<u8> {
        let events: Vec<serde_json::Value> = events
            .iter()
            .map(|(account, meter, id, amount, at)| serde_json::json!({"account": account, "meter": meter, "id": id, "amount": amount, "at": at}))
            .collect();
        serde_json::json!({"sidecar": "unit", "since": since, "events": events}).to_string().into_bytes()
    }

    #[test]
    fn events_land_in_the_period_of_their_own_time_across_a_month_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let control_plane = control_plane(dir.path(), crate::Config::default());
        let now = parse_rfc3339("2027-01-01T00:02:00Z").unwrap();
        let body = batch(
            0,
            &[
                ("acme", "api_calls", "e-1", 5, "2026-12-31T23:59:59Z"),
                ("acme", "api_calls", "e-2", 7, "2027-01-01T00:00:00Z"),
                ("acme", "exports", "e-3", 1, "2026-12-31T23:59:59Z"),
                ("acme", "storage_gb", "e-4", 2, "2026-12-31T23:59:59Z"),
            ],
        );
        let answer = ingest(&control_plane, &body, now).unwrap();
        assert_eq!(answer.counted, 4);
        let stored = control_plane
            .repository
            .usage_totals(&TotalsQuery { account: Some("acme".into()), from: i64::MIN, to: i64::MAX, ..TotalsQuery::default() })
            .unwrap();
        let periods: Vec<(&str, String, u64)> =
            stored.iter().map(|row| (row.meter.as_str(), format_rfc3339(row.period_start), row.used)).collect();
        assert_eq!(
            periods,
            [
                ("api_calls", "2026-12-01T00:00:00Z".to_string(), 5),
                ("api_calls", "2027-01-01T00:00:00Z".to_string(), 7),
                ("exports", "2026-12-31T00:00:00Z".to_string(), 1),
                ("storage_gb", "1970-01-01T00:00:00Z".to_string(), 2),
            ]
        );
        // Only current periods go back to the sidecar: December's calls and yesterday's
        // exports are history by now.
        let sent: Vec<(&str, &str, u64)> =
            answer.totals.iter().map(|total| (total.meter.as_str(), total.period_start.as_str(), total.used)).collect();
        assert_eq!(sent, [("api_calls", "2027-01-01T00:00:00Z", 7), ("storage_gb", "1970-01-01T00:00:00Z", 2)]);
        assert_eq!(answer.cursor, 4, "the cursor passes the old-period rows too");
    }

    #[test]
    fn a_small_page_pages_through_changed_totals_with_more() {
        let dir = tempfile::tempdir().unwrap();
        let control_plane = control_plane(dir.path(), crate::Config { usage_page: 2, ..crate::Config::default() });
        let now = parse_rfc3339("2026-12-15T12:00:00Z").unwrap();
        let at = "2026-12-15T11:00:00Z";
        let first = ingest(
            &control_plane,
            &batch(0, &[("acme", "api_calls", "a", 1, at), ("hooli", "api_calls", "b", 2, at), ("initech", "api_calls", "c", 3, at)]),
            now,
        )
        .unwrap();
        assert_eq!((first.totals.len(), first.cursor, first.more), (2, 2, true));
        let second = ingest(&control_plane, &batch(first.cursor, &[]), now).unwrap();
        assert_eq!((second.totals.len(), second.cursor, second.more), (1, 3, false));
        assert_eq!(second.totals[0].account, "initech");
        let idle = ingest(&control_plane, &batch(second.cursor, &[]), now).unwrap();
        assert_eq!((idle.totals.len(), idle.cursor, idle.more), (0, 3, false));
        let ahead = ingest(&control_plane, &batch(99, &[]), now).unwrap();
        assert_eq!(ahead.cursor, 3, "a cursor ahead of the database comes back down");
    }
}
