//! Bulk import of a policies directory into the control plane's repository: everything in one
//! transaction, validated as `compile` validates (file:line, nothing written on a mistake),
//! idempotent (a second import changes nothing and moves no revision), audited, refused
//! against a repository serving another catalog, and compiling to the same accounts as
//! `compile` of the same directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::path::Path;

use tollgate_control_plane::ControlPlane;
use tollgate_control_plane::import::{AUDIT_ACTION, ImportError, import_dir};
use tollgate_control_plane::store::{AuditQuery, Repository};
use tollgate_core::model::SnapshotData;
use tollgate_policy::generate::{GenOptions, catalog, write};

use control_plane_support::{database_for, open_repository, signing_key};

const NOW: i64 = 1_800_000_000;

fn gen_dir(dir: &Path, n_accounts: usize) {
    write(dir, &GenOptions { n_accounts, n_features: 16, seed: 3 }).unwrap();
}

fn imports(repository: &dyn Repository) -> usize {
    let query = AuditQuery { account: None, after_seq: 0, limit: 1000 };
    repository.audit_log(&query).unwrap().iter().filter(|entry| entry.action == AUDIT_ACTION).count()
}

/// Each account's licenses as (id, plan, resolved feature words, resolved limits), which do
/// not depend on the order accounts were interned in.
/// A license's id, plan, resolved feature words and resolved limits.
type Resolved = (String, u32, Vec<u64>, String);

fn resolved(data: &SnapshotData) -> Vec<(String, Vec<Resolved>)> {
    let mut accounts: Vec<_> = data
        .accounts
        .iter()
        .map(|(id, account)| {
            let licenses = account
                .licenses
                .iter()
                .map(|license| {
                    let features = data.feature_sets[license.features as usize].clone();
                    let limits = format!("{:?}", data.limit_sets[license.limits as usize]);
                    (license.id.clone(), license.plan, features, limits)
                })
                .collect();
            (id.clone(), licenses)
        })
        .collect();
    accounts.sort();
    accounts
}

#[test]
fn import_loads_every_account_once_and_a_second_import_changes_nothing() {
    let policies = tempfile::tempdir().unwrap();
    gen_dir(policies.path(), 120);
    let data = tempfile::tempdir().unwrap();
    let repository = open_repository(data.path());

    let first = import_dir(repository.as_ref(), policies.path(), "cli", NOW).unwrap();
    assert_eq!((first.n_accounts, first.n_created, first.n_updated, first.n_unchanged), (120, 120, 0, 0));
    assert_eq!(first.revision, 1);
    assert_eq!(repository.revision().unwrap(), 1);
    assert_eq!(imports(repository.as_ref()), 1);

    let second = import_dir(repository.as_ref(), policies.path(), "cli", NOW).unwrap();
    assert_eq!((second.n_accounts, second.n_created, second.n_updated, second.n_unchanged), (120, 0, 0, 120));
    assert_eq!(second.revision, 1);
    assert_eq!(repository.revision().unwrap(), 1, "an import that changes nothing moves no revision");
    assert_eq!(imports(repository.as_ref()), 1, "an import that changes nothing is not audited");

    // The stored accounts compile to what `compile` makes of the directory.
    let compiled_dir = tollgate_policy::compile_dir(policies.path()).unwrap();
    let (revision, accounts) = repository.all_accounts().unwrap();
    assert_eq!(revision, 1);
    let catalog = tollgate_policy::Source {
        path: "catalog.toml".into(),
        text: std::fs::read_to_string(policies.path().join("catalog.toml")).unwrap(),
    };
    let compiled_store = tollgate_control_plane::compile_all(&catalog, &accounts).unwrap();
    assert_eq!(resolved(&compiled_store), resolved(&compiled_dir));

    // A control plane started on the same directory finds its catalog recorded: no new revision.
    drop(repository);
    let control_plane = ControlPlane::open(database_for(data.path()), policies.path(), signing_key(7), Vec::new()).unwrap();
    assert_eq!(control_plane.repository.revision().unwrap(), 1);
}

#[test]
fn a_changed_account_is_rewritten_and_the_rest_left_alone() {
    let policies = tempfile::tempdir().unwrap();
    gen_dir(policies.path(), 30);
    let data = tempfile::tempdir().unwrap();
    let repository = open_repository(data.path());
    import_dir(repository.as_ref(), policies.path(), "cli", NOW).unwrap();
    let file = policies.path().join("accounts/accounts-00000.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let at = text.find("[[accounts.acct-7.licenses]]").unwrap();
    let seats = at + text[at..].find("seats = 5").unwrap();
    std::fs::write(&file, format!("{}seats = 4{}", &text[..seats], &text[seats + "seats = 5".len()..])).unwrap();

    let summary = import_dir(repository.as_ref(), policies.path(), "admin-key", NOW).unwrap();
    assert_eq!((summary.n_created, summary.n_updated, summary.n_unchanged), (0, 1, 29));
    assert_eq!(summary.revision, 2);
    assert_eq!(imports(repository.as_ref()), 2);
    assert_eq!(repository.account("acct-7").unwrap().unwrap().licenses[0].seats, 4);
    assert_eq!(repository.account("acct-8").unwrap().unwrap().licenses[0].seats, 5);
}

#[test]
fn a_bad_policies_directory_names_file_and_line_and_writes_nothing() {
    let policies = tempfile::tempdir().unwrap();
    gen_dir(policies.path(), 25_000);
    // The second file is read after the first one's 10,000 accounts were already written in
    // the transaction: the whole import must still roll back.
    let file = policies.path().join("accounts/accounts-00001.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let bad_line = text.lines().position(|line| line.starts_with("plan = ")).unwrap() + 1;
    let text = text.replacen("plan = \"", "plan = \"no-such-", 1);
    std::fs::write(&file, text).unwrap();

    let data = tempfile::tempdir().unwrap();
    let repository = open_repository(data.path());
    let error = import_dir(repository.as_ref(), policies.path(), "cli", NOW).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ImportError::Policy(_)), "{message}");
    assert!(message.contains(&format!("accounts-00001.toml:{bad_line}:")), "{message}");
    assert!(message.contains("names unknown plan `no-such-"), "{message}");
    assert_eq!(repository.revision().unwrap(), 0);
    assert!(repository.all_accounts().unwrap().1.is_empty(), "nothing may be written");
    assert_eq!(imports(repository.as_ref()), 0);
}

#[test]
fn a_deny_fence_cannot_be_stored_and_is_reported_at_its_line() {
    let policies = tempfile::tempdir().unwrap();
    let options = GenOptions { n_accounts: 0, n_features: 16, seed: 3 };
    std::fs::write(policies.path().join("catalog.toml"), catalog(&options)).unwrap();
    std::fs::create_dir(policies.path().join("accounts")).unwrap();
    let accounts = "[accounts.a]\n[[accounts.a.licenses]]\nplan = \"free\"\n\n[accounts.b]\n[[accounts.b.licenses]]\nplan = \"team\"\nregions = { deny = [\"eu\"] }\n";
    std::fs::write(policies.path().join("accounts/a.toml"), accounts).unwrap();
    let data = tempfile::tempdir().unwrap();
    let repository = open_repository(data.path());
    let message = import_dir(repository.as_ref(), policies.path(), "cli", NOW).unwrap_err().to_string();
    assert!(message.contains("a.toml:8: account `b` has a license with `regions = { deny = [...] }`"), "{message}");
    assert!(repository.all_accounts().unwrap().1.is_empty());
}

#[test]
fn a_directory_with_another_catalog_than_the_one_served_is_refused() {
    let data = tempfile::tempdir().unwrap();
    // The control plane has served the shipped catalog.
    let served = common::repo_root().join("policies");
    drop(ControlPlane::open(database_for(data.path()), &served, signing_key(7), Vec::new()).unwrap());
    let repository = open_repository(data.path());
    let revision = repository.revision().unwrap();

    let policies = tempfile::tempdir().unwrap();
    gen_dir(policies.path(), 10);
    let error = import_dir(repository.as_ref(), policies.path(), "cli", NOW).unwrap_err();
    assert!(matches!(error, ImportError::CatalogMismatch { .. }), "{error}");
    assert!(error.to_string().contains("is not the catalog this control plane serves"), "{error}");
    assert_eq!(repository.revision().unwrap(), revision);
    assert!(repository.all_accounts().unwrap().1.is_empty());

    // The served directory itself imports (its catalog matches).
    let summary = import_dir(repository.as_ref(), &served, "cli", NOW).unwrap();
    assert_eq!(summary.n_created, summary.n_accounts);
    assert!(summary.n_accounts > 0);
}
