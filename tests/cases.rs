//! Decision cases as data: every `tests/cases/*.toml` file names a policy source, optional
//! usage, and checks with their expected answers; one `check` walks them all. A new case is
//! a new file. The file format is described in `tests/cases/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::cases;

use tollgate_core::engine::{UsageLookup, decide, meter_limit};
use tollgate_core::period::parse_rfc3339;
use tollgate_protocol::{CheckBody, DecisionJson};

/// Usage preset by a case: the same counts for whatever period the engine asks about.
struct FixedUsage(HashMap<(String, String), u64>);

impl UsageLookup for FixedUsage {
    fn used(&self, account: &str, meter: &str, _period_start: i64) -> u64 {
        self.0.get(&(account.to_string(), meter.to_string())).copied().unwrap_or(0)
    }
}

fn check(path: &Path) -> Vec<String> {
    let (case, data) = cases::load(path);
    let snapshot = common::verified(&data, 7);
    let usage = FixedUsage(case.usage.iter().map(|row| ((row.account.clone(), row.meter.clone()), row.used)).collect());
    let mut failures = Vec::new();
    for check in &case.checks {
        let now_text = check.now(&case);
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
            if !cases::meets(&expected, found) {
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
    let failures: Vec<String> = cases::case_paths().iter().flat_map(|path| check(path)).collect();
    assert!(failures.is_empty(), "{} failing expectations:\n{}", failures.len(), failures.join("\n"));
}
