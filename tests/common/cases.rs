//! The decision-case file format (`tests/cases/*.toml`, described in `tests/cases/README.md`),
//! shared by every runner: the engine's own (`tests/cases.rs`) and the Rust client's
//! (`tests/client_cases.rs`). One definition of the format, of how a case's policies are
//! compiled, and of what "an answer meets an expectation" means.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tollgate_core::model::SnapshotData;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub description: String,
    pub policies: Option<String>,
    pub catalog: Option<String>,
    pub accounts: Option<String>,
    pub now: String,
    #[serde(default)]
    pub usage: Vec<UsageRow>,
    pub checks: Vec<Check>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRow {
    pub account: String,
    pub meter: String,
    pub used: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    pub now: Option<String>,
    /// A `/v1/check` body.
    pub request: toml::Value,
    pub expect: toml::value::Table,
}

impl Check {
    /// The instant the check is decided at: its own `now`, else the file's.
    pub fn now<'a>(&'a self, case: &'a CaseFile) -> &'a str {
        self.now.as_deref().unwrap_or(&case.now)
    }
}

/// Every case file, in name order.
pub fn case_paths() -> Vec<PathBuf> {
    let dir = super::repo_root().join("tests/cases");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no case files in {}", dir.display());
    paths
}

/// Reads a case file and compiles its policies (a directory, or an inline catalog and accounts).
pub fn load(path: &Path) -> (CaseFile, SnapshotData) {
    let text = std::fs::read_to_string(path).unwrap();
    let case: CaseFile = toml::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let data = match (&case.policies, &case.catalog, &case.accounts) {
        (Some(dir), None, None) => tollgate_policy::compile_dir(&super::repo_root().join(dir)).unwrap_or_else(|errors| panic!("{errors}")),
        (None, Some(catalog), accounts) => super::compile_inline(catalog, accounts.as_deref().unwrap_or("")),
        _ => panic!("{}: give either `policies` or inline `catalog` (and `accounts`)", path.display()),
    };
    (case, data)
}

/// Whether an answer's field `found` meets the expectation `expected`: `"absent"` means the
/// field must be missing, `false` also accepts a missing field (flags are left out when false),
/// anything else must be equal.
pub fn meets(expected: &Value, found: Option<&Value>) -> bool {
    match (expected, found) {
        (Value::String(text), None) if text == "absent" => true,
        (Value::String(text), Some(_)) if text == "absent" => false,
        (Value::Bool(false), None) => true,
        (expected, Some(found)) => expected == found,
        (_, None) => false,
    }
}
