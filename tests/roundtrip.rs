//! Property tests: compile → archive → verify → access round-trips exactly, decisions keep
//! their invariants over generated policies of random shape, and normalising an ext_authz path
//! twice changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use proptest::prelude::*;
use tollgate_core::engine::{NoUsage, Reason, Request, decide};
use tollgate_core::model::{AccountStatus, SnapshotData, bits};
use tollgate_policy::generate::{GenOptions, accounts, catalog};
use tollgate_policy::{Source, compile};

fn generated(options: &GenOptions) -> SnapshotData {
    let catalog = Source { path: "catalog.toml".into(), text: catalog(options) };
    let accounts = Source { path: "accounts/a.toml".into(), text: accounts(options, 0..options.n_accounts) };
    compile(&catalog, &[accounts]).unwrap_or_else(|errors| panic!("{errors}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn archive_round_trips(n_accounts in 1usize..40, n_features in 8usize..140, seed in any::<u64>()) {
        let data = generated(&GenOptions { n_accounts, n_features, seed });
        let snapshot = common::verified(&data, 3);
        let back: SnapshotData = rkyv::deserialize::<SnapshotData, rkyv::rancor::Error>(snapshot.data()).unwrap();
        prop_assert_eq!(back, data);
    }

    #[test]
    fn decisions_keep_their_invariants(
        n_accounts in 1usize..30,
        seed in any::<u64>(),
        probes in proptest::collection::vec((0usize..40, 0usize..70, proptest::option::of(0usize..4), proptest::option::of(0usize..4), 0i64..4_000_000_000), 1..40),
    ) {
        let options = GenOptions { n_accounts, n_features: 64, seed };
        let data = generated(&options);
        let snapshot = common::verified(&data, 1);
        let recompiled = common::verified(&generated(&options), 2);
        let regions = ["us", "eu", "apac", "mars"];
        for (account_idx, feature_idx, user_idx, region_idx, now) in probes {
            let account_id = format!("acct-{account_idx}");
            let feature = format!("feature-{feature_idx}");
            let user = user_idx.map(|idx| format!("user-{idx}"));
            let request = Request {
                account: &account_id,
                feature: &feature,
                user: user.as_deref(),
                region: region_idx.map(|idx| regions[idx]),
                device: None,
                amount: None,
            };
            let decision = decide(snapshot.data(), &request, now, &NoUsage);
            prop_assert_eq!(decision, decide(recompiled.data(), &request, now, &NoUsage), "a recompile changed the answer");
            match data.accounts.get(&account_id) {
                None => prop_assert_eq!(decision.reason, Reason::UnknownAccount),
                Some(account) if account.status != AccountStatus::Active => prop_assert_eq!(decision.reason, Reason::AccountSuspended),
                Some(_) if feature_idx >= 64 => prop_assert_eq!(decision.reason, Reason::UnknownFeature),
                Some(account) => {
                    if decision.allow() {
                        let license = &account.licenses[decision.license.unwrap() as usize];
                        let feature_bit = data.feature_index[&feature];
                        prop_assert!(bits::contains(&data.feature_sets[license.features as usize], feature_bit));
                        prop_assert!(now >= license.starts_at);
                        prop_assert!(now < license.expires_at.saturating_add(license.grace_seconds));
                        if let Some(user) = &user {
                            let user = account.users.iter().find(|candidate| &candidate.id == user).unwrap();
                            prop_assert!(user.seat);
                            prop_assert!(user.roles.iter().any(|role| bits::contains(&data.roles[*role as usize].features, feature_bit)));
                        }
                    }
                }
            }
        }
    }
}

/// Pieces paths are made of in the normalisation property: separators, dot segments, escapes
/// of unreserved and reserved characters, double encoding, and what is refused.
const PATH_PIECES: &[&str] =
    &["/", "//", ".", "..", "a", "s", "~", "%2e", "%2E", "%73", "%7e", "%2573", "%25", "%20", "%2F", "%5c", "%", "\\", "?", "#", "x/../"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever Envoy forwards after normalising, the sidecar leaves as it is, and a normalised
    /// path has nothing left that another spelling could differ in.
    #[test]
    fn path_normalisation_is_idempotent(pieces in proptest::collection::vec(proptest::sample::select(PATH_PIECES), 0..14)) {
        let path = format!("/{}", pieces.concat());
        if let Ok(normalized) = tollgate_sidecar::route_path::normalize(&path) {
            let again = tollgate_sidecar::route_path::normalize(&normalized);
            prop_assert_eq!(again.as_deref(), Ok(normalized.as_ref()), "{}", path);
            prop_assert!(!normalized.contains("//"), "{path} -> {normalized}");
            prop_assert!(!normalized.split('/').any(|segment| segment == "." || segment == ".."), "{path} -> {normalized}");
            prop_assert!(!normalized.contains(['?', '#', '\\']), "{path} -> {normalized}");
        }
    }
}
