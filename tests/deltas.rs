//! Delta snapshots: a delta changes only the accounts it carries; every misordered or forged
//! delta (a gap, a replay, a reordering, another base, an untrusted key, a tampered or
//! inconsistent file) is refused with its cause while the serving view keeps answering; the
//! store installs a base and deltas as one step; feed answers split back into their files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::sync::Arc;

use tollgate_core::clock::ManualClock;
use tollgate_core::engine::{self, NoUsage, Reason, Request, View};
use tollgate_core::model::{AccountStatus, DeltaAccount, DeltaData, SnapshotData};
use tollgate_sidecar::store::{InstallError, SnapshotStore};
use tollgate_sidecar::telemetry::Metrics;
use tollgate_snapshot::{ApplyError, Delta, Piece, ServingView, Snapshot, SnapshotError, TrustedKeys, build_delta, pieces};

const NOW: i64 = common::PINNED_NOW_MS / 1000;
const BASE: u64 = 10;

fn trusted() -> TrustedKeys {
    TrustedKeys::new([common::test_key(1).verifying_key()])
}

/// The delta payload carrying `accounts` (copies of base accounts, possibly changed) and
/// removing `removed`; its set tables are a copy of the base's, so the indices hold.
fn payload(base: &SnapshotData, accounts: Vec<(&str, tollgate_core::model::Account)>, removed: &[&str]) -> DeltaData {
    DeltaData {
        feature_sets: base.feature_sets.clone(),
        limit_sets: base.limit_sets.clone(),
        accounts: accounts.into_iter().map(|(id, account)| DeltaAccount { id: id.to_string(), account }).collect(),
        removed: removed.iter().map(|id| id.to_string()).collect(),
    }
}

fn delta(data: &DeltaData, base: u64, follows: u64, revision: u64) -> Delta {
    let bytes = build_delta(data, base, follows, revision, 1_700_000_000_000, &common::test_key(1)).unwrap();
    Delta::verify(&bytes, &trusted()).unwrap()
}

fn decide(view: &impl View, account: &str, feature: &str) -> Reason {
    engine::decide(view, &Request { account, feature, ..Request::default() }, NOW, &NoUsage).reason
}

/// An account allowed a feature in the example base, with no user named.
fn allowed_pair(base: &SnapshotData) -> (String, String) {
    let view = common::verified(base, BASE);
    let mut ids: Vec<&String> = base.accounts.keys().collect();
    ids.sort();
    for id in ids {
        for feature in &base.features {
            if decide(view.data(), id, &feature.name) == Reason::Ok {
                return (id.clone(), feature.name.clone());
            }
        }
    }
    panic!("the example policies allow something");
}

#[test]
fn a_delta_changes_only_the_accounts_it_carries() {
    let base = common::example_data();
    let (account, feature) = allowed_pair(&base);
    let view = ServingView::new(common::verified(&base, BASE));
    let mut suspended = base.accounts[&account].clone();
    suspended.status = AccountStatus::Suspended;
    let newcomer = base.accounts[&account].clone();
    let changed =
        view.apply(delta(&payload(&base, vec![(account.as_str(), suspended), ("newco", newcomer)], &[]), BASE, BASE, 11)).unwrap();

    assert_eq!((changed.revision(), changed.base_revision(), changed.overlay_len()), (11, BASE, 2));
    assert_eq!(changed.account_count(), base.accounts.len() as u64 + 1);
    assert_eq!(decide(&changed, &account, &feature), Reason::AccountSuspended);
    assert_eq!(decide(&changed, "newco", &feature), Reason::Ok);
    // Every other account answers exactly as the base does, for every feature.
    for other in base.accounts.keys().filter(|id| **id != account) {
        for catalog_feature in &base.features {
            assert_eq!(decide(&changed, other, &catalog_feature.name), decide(view.base().data(), other, &catalog_feature.name));
        }
    }
    // The view it was applied to is untouched.
    assert_eq!(decide(&view, &account, &feature), Reason::Ok);
    assert_eq!(decide(&view, "newco", &feature), Reason::UnknownAccount);

    let removed = changed.apply(delta(&payload(&base, Vec::new(), &[account.as_str()]), BASE, 11, 12)).unwrap();
    assert_eq!(decide(&removed, &account, &feature), Reason::UnknownAccount);
    assert_eq!(removed.account_count(), base.accounts.len() as u64);
    assert!(engine::entitlements(&removed, &account, None, None, NOW, &NoUsage).is_none());
    assert!(engine::entitlements(&removed, "newco", None, None, NOW, &NoUsage).is_some());
}

#[test]
fn misordered_deltas_are_refused_by_name_and_the_view_is_kept() {
    let base = common::example_data();
    let view = ServingView::new(common::verified(&base, BASE));
    let empty = payload(&base, Vec::new(), &[]);
    let next = view.apply(delta(&empty, BASE, BASE, 11)).unwrap();

    // A gap: the delta after 12 arrives while 11 serves.
    assert_eq!(next.apply(delta(&empty, BASE, 12, 13)).unwrap_err(), ApplyError::Gap { follows: 12, serving: 11 });
    // A replay of the delta already applied, and one older than the serving revision.
    assert_eq!(next.apply(delta(&empty, BASE, BASE, 11)).unwrap_err(), ApplyError::NotNewer { offered: 11, serving: 11 });
    assert!(matches!(next.apply(delta(&empty, BASE, BASE, 10 + 1)), Err(ApplyError::NotNewer { .. })));
    // A delta for another base.
    assert_eq!(next.apply(delta(&empty, 9, 11, 12)).unwrap_err(), ApplyError::BaseMismatch { delta_base: 9, base: BASE });
    // The delta that follows applies.
    assert_eq!(next.apply(delta(&empty, BASE, 11, 12)).unwrap().revision(), 12);
}

#[test]
fn forged_delta_files_fail_verification() {
    let base = common::example_data();
    let empty = payload(&base, Vec::new(), &[]);
    let good = build_delta(&empty, BASE, BASE, 11, 1_700_000_000_000, &common::test_key(1)).unwrap();
    assert!(Delta::verify(&good, &trusted()).is_ok());

    let untrusted = build_delta(&empty, BASE, BASE, 11, 1_700_000_000_000, &common::test_key(2)).unwrap();
    assert!(matches!(Delta::verify(&untrusted, &trusted()), Err(SnapshotError::UntrustedKey(_))));

    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(Delta::verify(&tampered, &trusted()), Err(SnapshotError::BadSignature(_))));
    // A header edit (moving it to follow another revision) breaks the signature too.
    let needle = b"\"follows\":10";
    let position = good.windows(needle.len()).position(|window| window == needle).unwrap() + needle.len() - 1;
    let mut moved = good.clone();
    moved[position] = b'1';
    assert!(matches!(Delta::verify(&moved, &trusted()), Err(SnapshotError::BadSignature(_))));
    for cut in [0, 7, 13, good.len() / 2, good.len() - 1] {
        assert!(Delta::verify(&good[..cut], &trusted()).is_err(), "truncated to {cut} bytes");
    }

    // Signed by the trusted key, and still refused: a delta that does not move forward.
    let backwards = build_delta(&empty, BASE, 11, 11, 1_700_000_000_000, &common::test_key(1)).unwrap();
    assert!(matches!(Delta::verify(&backwards, &trusted()), Err(SnapshotError::DeltaHeader(_))));

    // A base is not a delta, nor a delta a base.
    let base_file = common::signed(&base, BASE, &common::test_key(1));
    assert!(matches!(Delta::verify(&base_file, &trusted()), Err(SnapshotError::WrongKind)));
    assert!(matches!(Snapshot::verify(&good, &trusted()), Err(SnapshotError::WrongKind)));
}

fn rejects(metrics: &Metrics, cause: &str) -> u64 {
    let needle = format!("tollgate_snapshot_rejects_total{{cause=\"{cause}\"}} ");
    metrics.render(None).lines().find_map(|line| line.strip_prefix(&needle).and_then(|count| count.parse().ok())).unwrap_or(0)
}

#[test]
fn the_store_records_each_refused_delta_by_cause_and_keeps_serving() {
    let base = common::example_data();
    let (account, feature) = allowed_pair(&base);
    let metrics = Arc::new(Metrics::new());
    let store = SnapshotStore::new(Arc::clone(&metrics), Arc::new(ManualClock::new(common::PINNED_NOW_MS)));
    let empty = payload(&base, Vec::new(), &[]);

    // A delta with no base serving yet has nothing to apply to.
    assert!(matches!(store.install_chain(None, vec![delta(&empty, BASE, BASE, 11)]), Err(InstallError::NoBase)));
    assert_eq!(rejects(&metrics, "base_mismatch"), 1);

    store.install(common::verified(&base, BASE)).unwrap();
    assert_eq!(store.install_chain(None, vec![delta(&empty, BASE, BASE, 11)]).unwrap(), 11);
    assert!(matches!(store.install_chain(None, vec![delta(&empty, BASE, 12, 13)]), Err(InstallError::Delta(ApplyError::Gap { .. }))));
    assert!(matches!(
        store.install_chain(None, vec![delta(&empty, BASE, BASE, 11)]),
        Err(InstallError::Delta(ApplyError::NotNewer { .. }))
    ));
    assert!(matches!(store.install_chain(None, vec![delta(&empty, 3, 11, 12)]), Err(InstallError::Delta(ApplyError::BaseMismatch { .. }))));
    assert_eq!((rejects(&metrics, "gap"), rejects(&metrics, "not_newer"), rejects(&metrics, "base_mismatch")), (1, 1, 2));
    assert_eq!(store.revision(), Some(11));
    assert_eq!(decide(store.load().as_ref().unwrap().as_ref(), &account, &feature), Reason::Ok);

    // Deltas that apply are installed up to the first that does not; that one is recorded.
    let mut suspended = base.accounts[&account].clone();
    suspended.status = AccountStatus::Suspended;
    let suspend = payload(&base, vec![(account.as_str(), suspended)], &[]);
    let installed = store.install_chain(None, vec![delta(&suspend, BASE, 11, 12), delta(&empty, BASE, 14, 15)]).unwrap();
    assert_eq!(installed, 12);
    assert_eq!(rejects(&metrics, "gap"), 2);
    assert_eq!(decide(store.load().as_ref().unwrap().as_ref(), &account, &feature), Reason::AccountSuspended);

    // A compacted base at an older revision, with the catch-up delta on it, replaces the view
    // (the same revision on a newer base); the base alone would not.
    let compacted_base = common::verified(&base, 11);
    assert!(matches!(store.install(common::verified(&base, 11)), Err(InstallError::NotNewer { .. })));
    assert_eq!(store.install_chain(Some(compacted_base), vec![delta(&suspend, 11, 11, 12)]).unwrap(), 12);
    let view = store.load();
    let view = view.as_ref().unwrap();
    assert_eq!((view.base_revision(), view.revision(), view.overlay_len()), (11, 12, 1));
    assert_eq!(decide(view.as_ref(), &account, &feature), Reason::AccountSuspended);
}

#[test]
fn a_feed_answer_splits_into_its_files() {
    let base = common::example_data();
    let empty = payload(&base, Vec::new(), &[]);
    let base_file = common::signed(&base, BASE, &common::test_key(1));
    let first = build_delta(&empty, BASE, BASE, 11, 0, &common::test_key(1)).unwrap();
    let second = build_delta(&empty, BASE, 11, 12, 0, &common::test_key(1)).unwrap();
    let answer = [base_file.clone(), first.clone(), second.clone()].concat();
    let split: Vec<Piece<'_>> = pieces(&answer).map(Result::unwrap).collect();
    assert_eq!(split, vec![Piece::Base(&base_file), Piece::Delta(&first), Piece::Delta(&second)]);

    // A torn tail or garbage ends the split with an error, after the good files.
    let torn = [first.clone(), second[..second.len() - 3].to_vec()].concat();
    let split: Vec<_> = pieces(&torn).collect();
    assert!(matches!(split.as_slice(), [Ok(Piece::Delta(_)), Err(SnapshotError::Truncated(_))]));
    assert!(matches!(pieces(b"garbage!garbage!").next(), Some(Err(SnapshotError::BadMagic))));
    assert_eq!(pieces(b"").count(), 0);
}
