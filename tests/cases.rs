//! Decision cases as data: every `tests/cases/*.toml` file names a policy source, optional
//! usage, and checks with their expected answers; one `check` walks them all. A new case is
//! a new file. The file format is described in `tests/cases/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use tollgate_core::engine::{UsageLookup, decide, meter_limit};
use tollgate_core::period::parse_rfc3339;
use tollgate_protocol::{CheckBody, DecisionJson};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[allow(dead_code)]
    description: String,
    policies: Option<String>,
    catalog: Option<String>,
    accounts: Option<String>,
    now: String,
    #[serde(default)]
    usage: Vec<UsageRow>,
    checks: Vec<Check>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageRow {
    account: String,
    meter: String,
    used: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    name: String,
    now: Option<String>,
    request: toml::Value,
    expect: toml::value::Table,
}

/// Usage preset by a case: the same counts for whatever period the engine asks about.
struct FixedUsage(HashMap<(String, String), u64>);

impl UsageLookup for FixedUsage {
    fn used(&self, account: &str, meter: &str, _period_start: i64) -> u64 {
        self.0.get(&(account.to_string(), meter.to_string())).copied().unwrap_or(0)
    }
}

fn check(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let case: CaseFile = toml::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let data = match (&case.policies, &case.catalog, &case.accounts) {
        (Some(dir), None, None) => tollgate_policy::compile_dir(&common::repo_root().join(dir)).unwrap_or_else(|errors| panic!("{errors}")),
        (None, Some(catalog), accounts) => common::compile_inline(catalog, accounts.as_deref().unwrap_or("")),
        _ => panic!("{}: give either `policies` or inline `catalog` (and `accounts`)", path.display()),
    };
    let snapshot = common::verified(&data, 7);
    let usage = FixedUsage(case.usage.iter().map(|row| ((row.account.clone(), row.meter.clone()), row.used)).collect());
    let mut failures = Vec::new();
    for check in &case.checks {
        let now_text = check.now.as_deref().unwrap_or(&case.now);
        let now = parse_rfc3339(now_text).unwrap_or_else(|| panic!("{}: bad `now` {now_text}", path.display()));
        let request_json = serde_json::to_string(&check.request).unwrap();
        let body: CheckBody<'_> =
            serde_json::from_str(&request_json).unwrap_or_else(|error| panic!("{}: {}: {error}", path.display(), check.name));
        let decision = decide(snapshot.data(), &body.request(), now, &usage);
        let mut actual =
            serde_json::to_value(DecisionJson::new(snapshot.data(), &body.account, snapshot.revision(), &decision, false)).unwrap();
        // The limit `/v1/meter` would enforce on the feature's meter: an amount this check
        // allows must never be refused there.
        let request = body.request();
        let meter_idx = snapshot.data().feature_index.get(request.feature).and_then(|feature_idx| {
            snapshot
                .data()
                .features
                .get(feature_idx.to_native() as usize)
                .and_then(|feature| feature.meter.as_ref().map(|idx| idx.to_native()))
        });
        if let Some(meter_idx) = meter_idx {
            let hard = meter_limit(snapshot.data(), request.account, meter_idx, now).and_then(|limit| limit.hard);
            if let (true, Some(quota), Some(hard)) = (decision.allow(), decision.quota, hard)
                && quota.used + request.amount.unwrap_or(1) > hard
            {
                failures.push(format!(
                    "{} / {}: allowed {} more after {} but /v1/meter's limit is {hard}",
                    path.display(),
                    check.name,
                    request.amount.unwrap_or(1),
                    quota.used
                ));
            }
            if let (Some(hard), Some(object)) = (hard, actual.as_object_mut()) {
                object.insert("meter_limit".into(), hard.into());
            }
        }
        for (key, expected) in &check.expect {
            let expected = serde_json::to_value(expected).unwrap();
            let found = actual.get(key);
            let matches = match (&expected, found) {
                (serde_json::Value::String(text), None) if text == "absent" => true,
                (serde_json::Value::String(text), Some(_)) if text == "absent" => false,
                (serde_json::Value::Bool(false), None) => true,
                (expected, Some(found)) => expected == found,
                (_, None) => false,
            };
            if !matches {
                failures.push(format!(
                    "{} / {}: `{key}` expected {expected}, got {}; whole answer {actual}",
                    path.display(),
                    check.name,
                    found.map_or("nothing".to_string(), |found| found.to_string())
                ));
            }
        }
    }
    failures
}

#[test]
fn decision_cases() {
    let dir = common::repo_root().join("tests/cases");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no case files in {}", dir.display());
    let failures: Vec<String> = paths.iter().flat_map(|path| check(path)).collect();
    assert!(failures.is_empty(), "{} failing expectations:\n{}", failures.len(), failures.join("\n"));
}
