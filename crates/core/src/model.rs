//! The compiled snapshot's data model: what `compile` produces, rkyv archives, and `engine`
//! reads zero-copy. Plain data only: no I/O, no parsing, no decision logic beyond bit tests.
//!
//! Names are interned to dense indices (`feature_idx`, `meter_idx`, `region_idx`), feature sets
//! are bitsets over feature indices, and accounts live in a hash index keyed by account id.

use std::collections::HashMap;

use rkyv::{Archive, Deserialize, Serialize};

/// The root of a compiled snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SnapshotData {
    pub features: Vec<Feature>,
    pub meters: Vec<Meter>,
    /// Ordered cheapest first; a plan's position is its rank.
    pub plans: Vec<Plan>,
    /// Ordered cheapest first.
    pub addons: Vec<Addon>,
    pub roles: Vec<Role>,
    /// The declared region vocabulary, as the catalog spells it.
    pub regions: Vec<String>,
    pub feature_index: HashMap<String, u32>,
    pub meter_index: HashMap<String, u32>,
    /// Region names lowercased (regions compare case-insensitively) to region indices.
    pub region_index: HashMap<String, u32>,
    /// Distinct feature bitsets that licenses point into; set 0 is the empty set. Most
    /// licenses share a handful of plan and add-on combinations, so this keeps a snapshot of a
    /// million accounts small.
    pub feature_sets: Vec<Vec<u64>>,
    /// Distinct resolved limit lists that licenses point into, each sorted by meter.
    pub limit_sets: Vec<Vec<Limit>>,
    pub accounts: HashMap<String, Account>,
    /// The catalog's route-to-feature map for Envoy ext_authz, longest prefix first, so the
    /// first match is the most specific one.
    pub routes: Vec<RouteRule>,
}

/// The payload of a delta snapshot: the accounts one or more commits added, replaced or removed,
/// on top of a base compiled from the same catalog. Feature and limit set indices in these
/// accounts point into the delta's own `feature_sets` and `limit_sets`; every other index
/// (features, meters, plans, add-ons, roles, regions) is the base's, which a base and the deltas
/// on it share because a catalog change makes a new base.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct DeltaData {
    pub feature_sets: Vec<Vec<u64>>,
    pub limit_sets: Vec<Vec<Limit>>,
    /// Added or replaced accounts, sorted by id.
    pub accounts: Vec<DeltaAccount>,
    /// Ids of removed accounts, sorted.
    pub removed: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeltaAccount {
    pub id: String,
    pub account: Account,
}

/// Requests whose path starts with `prefix` use feature `feature` (an index into `features`)
/// when no feature header names one.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RouteRule {
    pub prefix: String,
    pub feature: u32,
}

/// The index of the empty feature set in [`SnapshotData::feature_sets`].
pub const EMPTY_FEATURE_SET: u32 = 0;
/// `License::starts_at` of a license valid since forever.
pub const SINCE_FOREVER: i64 = i64::MIN;
/// `License::expires_at` of a perpetual license.
pub const NEVER_EXPIRES: i64 = i64::MAX;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Feature {
    pub name: String,
    pub description: String,
    /// The meter a use of this feature consumes, if any.
    pub meter: Option<u32>,
    /// Geo-fence: the regions this feature may be used in, a bitset over region indices
    /// (deny-lists and groups are resolved at compile time).
    pub regions: Option<Vec<u64>>,
    /// Percentage rollout: only accounts whose bucket is below `percent` get the feature.
    pub rollout: Option<Rollout>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Rollout {
    /// 0..=100
    pub percent: u8,
    /// Hash of the feature name: the bucket of an account depends only on the feature's and
    /// the account's names, so it is stable across recompiles and catalog edits.
    pub seed: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum Period {
    Hour,
    Day,
    Month,
    Never,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Meter {
    pub name: String,
    pub unit: String,
    pub period: Period,
    /// The features that consume this meter, a bitset: a license pays for the meter when it
    /// grants one of them.
    pub features: Vec<u64>,
}

/// Limits on one meter. `hard` denies past it; `soft` only marks overage.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub meter: u32,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    /// Price in the smallest currency unit per billing period, used to pick upgrade hints.
    pub price: Option<u64>,
    pub features: Vec<u64>,
    /// Sorted by meter index.
    pub limits: Vec<Limit>,
    /// Geo-fence on everything the plan grants: a bitset over region indices.
    pub regions: Option<Vec<u64>>,
    /// Where a customer buys this plan: a URL template with `{account}` and `{plan}`
    /// placeholders, carried in upgrade hints.
    pub checkout_url: Option<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Addon {
    pub name: String,
    pub price: Option<u64>,
    pub features: Vec<u64>,
    /// Added to the plan's limits. Sorted by meter index.
    pub limits: Vec<Limit>,
    /// Where a customer buys this add-on; placeholders as for [`Plan::checkout_url`].
    pub checkout_url: Option<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Role {
    pub name: String,
    pub features: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum AccountStatus {
    Active,
    Suspended,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Account {
    pub status: AccountStatus,
    pub licenses: Vec<License>,
    /// Sorted by id.
    pub users: Vec<User>,
    /// Activated device ids, sorted.
    pub devices: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct License {
    pub id: String,
    pub plan: u32,
    pub addons: Vec<u32>,
    pub seats: u32,
    pub trial: bool,
    /// Unix seconds; [`SINCE_FOREVER`] when unset.
    pub starts_at: i64,
    /// Unix seconds; [`NEVER_EXPIRES`] for a perpetual license.
    pub expires_at: i64,
    pub grace_seconds: i64,
    /// Feature set (index into `feature_sets`), resolved: plan ∪ add-ons ∪ added overrides,
    /// minus removed overrides.
    pub features: u32,
    /// Limit set (index into `limit_sets`), resolved: plan limits plus add-on limits, then
    /// overrides.
    pub limits: u32,
    /// Feature set an override removed, kept so upgrade hints do not suggest buying them.
    pub removed: u32,
    /// Meters whose limit an override set outright, sorted: no purchase changes those.
    pub overridden_meters: Vec<u32>,
    /// Geo-fence of this license: a bitset over region indices.
    pub regions: Option<Vec<u64>>,
    pub max_devices: Option<u32>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    /// Whether the user holds one of the license's seats.
    pub seat: bool,
    /// Role indices, sorted, from the user's own roles and the roles of their groups.
    pub roles: Vec<u32>,
}

/// Bitset helpers over `u64` words, shared by the compiler (owned) and the engine (archived).
pub mod bits {
    /// Number of words for `n_bits` bits.
    pub const fn words_for(n_bits: usize) -> usize {
        n_bits.div_ceil(64)
    }

    pub fn set(words: &mut [u64], idx: u32) {
        if let Some(word) = words.get_mut(idx as usize / 64) {
            *word |= 1 << (idx % 64);
        }
    }

    pub fn clear(words: &mut [u64], idx: u32) {
        if let Some(word) = words.get_mut(idx as usize / 64) {
            *word &= !(1 << (idx % 64));
        }
    }

    pub fn contains(words: &[u64], idx: u32) -> bool {
        words.get(idx as usize / 64).is_some_and(|word| word & (1 << (idx % 64)) != 0)
    }

    pub fn contains_le(words: &[rkyv::rend::u64_le], idx: u32) -> bool {
        words.get(idx as usize / 64).is_some_and(|word| word.to_native() & (1 << (idx % 64)) != 0)
    }

    pub fn union_into(into: &mut [u64], from: &[u64]) {
        for (a, b) in into.iter_mut().zip(from) {
            *a |= b;
        }
    }

    pub fn iter(words: &[u64]) -> impl Iterator<Item = u32> + '_ {
        words
            .iter()
            .enumerate()
            .flat_map(|(word_idx, &word)| (0..64u32).filter(move |bit| word & (1 << bit) != 0).map(move |bit| word_idx as u32 * 64 + bit))
    }

    pub fn iter_le(words: &[rkyv::rend::u64_le]) -> impl Iterator<Item = u32> + '_ {
        words.iter().enumerate().flat_map(|(word_idx, word)| {
            let word = word.to_native();
            (0..64u32).filter(move |bit| word & (1 << bit) != 0).map(move |bit| word_idx as u32 * 64 + bit)
        })
    }
}

/// The FNV-1a offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, continued from `state`: a tiny, stable hash for rollout buckets. It must never
/// change, or accounts would move in and out of rollouts.
pub const fn fnv1a64(mut state: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        #[expect(clippy::indexing_slicing, reason = "i < bytes.len() is the loop condition")]
        let byte = bytes[i];
        state ^= byte as u64;
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    state
}
