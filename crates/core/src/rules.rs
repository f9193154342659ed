//! The license rules every reader of compiled accounts shares: when a license is in force,
//! which of several licenses is preferred, whether a license has room on a meter, and a
//! meter's effective limit. Generic over [`LicenseTerms`], which both the owned [`License`]
//! (the control plane) and the archived one (the engine) implement, so the rule is written
//! once. Pure and allocation-free, like the engine.

use crate::model::{ArchivedLicense, ArchivedLimit, License, Limit, SnapshotData};

/// Whether a license is in force at an instant, and whether only by its grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Invalid,
    Valid,
    Grace,
}

impl Validity {
    /// Rank for the preference rule: valid before in grace.
    const fn rank(self) -> u8 {
        match self {
            Validity::Invalid => 0,
            Validity::Grace => 1,
            Validity::Valid => 2,
        }
    }
}

/// The fields of a license the rules read.
pub trait LicenseTerms {
    /// The plan's rank: plans are ordered cheapest first, so a higher rank is a dearer plan.
    fn plan_rank(&self) -> u32;
    /// Unix seconds; `model::SINCE_FOREVER` when unset.
    fn starts_at(&self) -> i64;
    /// Unix seconds; `model::NEVER_EXPIRES` for a perpetual license.
    fn expires_at(&self) -> i64;
    fn grace_seconds(&self) -> i64;

    /// Whether the license is valid at `now`, in grace, or neither (not started or past grace).
    fn validity(&self, now: i64) -> Validity {
        if now < self.starts_at() {
            return Validity::Invalid;
        }
        let expires_at = self.expires_at();
        if now < expires_at {
            Validity::Valid
        } else if now < expires_at.saturating_add(self.grace_seconds()) {
            Validity::Grace
        } else {
            Validity::Invalid
        }
    }
}

impl LicenseTerms for License {
    fn plan_rank(&self) -> u32 {
        self.plan
    }
    fn starts_at(&self) -> i64 {
        self.starts_at
    }
    fn expires_at(&self) -> i64 {
        self.expires_at
    }
    fn grace_seconds(&self) -> i64 {
        self.grace_seconds
    }
}

impl LicenseTerms for ArchivedLicense {
    fn plan_rank(&self) -> u32 {
        self.plan.to_native()
    }
    fn starts_at(&self) -> i64 {
        self.starts_at.to_native()
    }
    fn expires_at(&self) -> i64 {
        self.expires_at.to_native()
    }
    fn grace_seconds(&self) -> i64 {
        self.grace_seconds.to_native()
    }
}

/// Whether `candidate` (in force as `candidate_validity`) is preferred over `current`: valid
/// before in grace, then the dearer plan. Equal licenses are not preferred, so the first
/// listed wins a tie.
pub fn preferred_over<L: LicenseTerms>(candidate: &L, candidate_validity: Validity, current: &L, current_validity: Validity) -> bool {
    (candidate_validity.rank(), candidate.plan_rank()) > (current_validity.rank(), current.plan_rank())
}

/// The preferred license among those in force at `now` for which `accept` holds: its index
/// within `licenses`, the license, and its validity.
pub fn preferred<L: LicenseTerms>(licenses: &[L], now: i64, mut accept: impl FnMut(&L) -> bool) -> Option<(u32, &L, Validity)> {
    let mut best: Option<(u32, &L, Validity)> = None;
    for (license_idx, license) in licenses.iter().enumerate() {
        let validity = license.validity(now);
        if validity == Validity::Invalid || !accept(license) {
            continue;
        }
        if best.is_none_or(|(_, current, current_validity)| preferred_over(license, validity, current, current_validity)) {
            best = Some((license_idx as u32, license, validity));
        }
    }
    best
}

/// A license's limits on one meter, read from either form. `None` from a lookup means the
/// license sets no limit on the meter.
pub fn native_limit(limit: &ArchivedLimit) -> Limit {
    Limit {
        meter: limit.meter.to_native(),
        soft: limit.soft.as_ref().map(|soft| soft.to_native()),
        hard: limit.hard.as_ref().map(|hard| hard.to_native()),
    }
}

/// Whether a license whose limit on the meter is `limit` has room for `amount` more units
/// after `used`: no hard limit (unlimited, or soft only) always has room, and exactly reaching
/// the hard limit is fine.
pub fn has_room(limit: Option<&Limit>, used: u64, amount: u64) -> bool {
    limit.and_then(|limit| limit.hard).is_none_or(|hard| used.saturating_add(amount) <= hard)
}

/// The limit shown to callers: the hard one, or the soft one where there is no hard limit;
/// `None` is unlimited.
pub fn shown_limit(limit: Option<&Limit>) -> Option<u64> {
    limit.and_then(|limit| limit.hard.or(limit.soft))
}

/// How generous a limit is, for comparing licenses on one meter: no hard limit beats any.
fn generosity(limit: Option<&Limit>) -> (bool, u64) {
    match limit.and_then(|limit| limit.hard) {
        None => (true, 0),
        Some(hard) => (false, hard),
    }
}

/// A meter's effective limit for an account: the most generous limit among the licenses in
/// force at `now` that pay for the meter (`pays`: they grant a feature consuming it), ties
/// going to the preferred license. When none pays for it (a meter no granted feature
/// consumes), every license in force counts. `None` is unlimited, and also the answer when
/// no license is in force at all.
///
/// Since every license `decide` lets a metered feature rest on pays for the meter, an amount
/// `decide` allows is always within this limit: `/v1/meter` never refuses what `/v1/check`
/// allowed.
pub fn meter_limit<L: LicenseTerms>(
    licenses: &[L],
    now: i64,
    pays: impl Fn(&L) -> bool,
    limit_of: impl Fn(&L) -> Option<Limit>,
) -> Option<Limit> {
    let any_pays = licenses.iter().any(|license| license.validity(now) != Validity::Invalid && pays(license));
    let mut best: Option<(&L, Validity, Option<Limit>)> = None;
    for license in licenses {
        let validity = license.validity(now);
        if validity == Validity::Invalid || (any_pays && !pays(license)) {
            continue;
        }
        let limit = limit_of(license);
        let better = match &best {
            None => true,
            Some((current, current_validity, current_limit)) => {
                let (candidate_key, current_key) = (generosity(limit.as_ref()), generosity(current_limit.as_ref()));
                candidate_key > current_key
                    || (candidate_key == current_key && preferred_over(license, validity, *current, *current_validity))
            }
        };
        if better {
            best = Some((license, validity, limit));
        }
    }
    best.and_then(|(_, _, limit)| limit)
}

/// [`meter_limit`] over owned compiled data (the control plane's), the same rule the engine
/// applies to an archived snapshot: `engine::meter_limit`.
pub fn owned_meter_limit(data: &SnapshotData, account: &str, meter_idx: u32, now: i64) -> Option<Limit> {
    let account = data.accounts.get(account)?;
    let consumers = data.meters.get(meter_idx as usize).map_or(&[][..], |meter| meter.features.as_slice());
    let feature_set = |license: &License| data.feature_sets.get(license.features as usize).map_or(&[][..], |set| set.as_slice());
    meter_limit(
        &account.licenses,
        now,
        |license| feature_set(license).iter().zip(consumers).any(|(granted, consumer)| granted & consumer != 0),
        |license| {
            let limits = data.limit_sets.get(license.limits as usize).map_or(&[][..], |set| set.as_slice());
            limits.binary_search_by_key(&meter_idx, |limit| limit.meter).ok().and_then(|position| limits.get(position)).copied()
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    struct Terms(u32, i64, i64, i64);
    impl LicenseTerms for Terms {
        fn plan_rank(&self) -> u32 {
            self.0
        }
        fn starts_at(&self) -> i64 {
            self.1
        }
        fn expires_at(&self) -> i64 {
            self.2
        }
        fn grace_seconds(&self) -> i64 {
            self.3
        }
    }

    #[test]
    fn valid_beats_grace_then_dearer_then_first() {
        let licenses = [Terms(5, 0, 100, 50), Terms(1, 0, 200, 0), Terms(1, 0, 300, 0)];
        // At 150 the dear one is in grace; the two cheap ones are valid: the first of them.
        assert_eq!(preferred(&licenses, 150, |_| true).map(|(idx, _, _)| idx), Some(1));
        // At 50 all are valid: the dearer plan.
        assert_eq!(preferred(&licenses, 50, |_| true).map(|(idx, _, validity)| (idx, validity)), Some((0, Validity::Valid)));
        assert!(preferred(&licenses, 400, |_| true).is_none());
    }

    #[test]
    fn meter_limit_is_the_most_generous_paying_license() {
        let licenses = [Terms(0, 0, 100, 0), Terms(1, 0, 100, 0)];
        let limits = [Some(Limit { meter: 0, soft: None, hard: Some(100) }), Some(Limit { meter: 0, soft: None, hard: Some(5) })];
        let limit_of = |license: &Terms| limits[license.0 as usize];
        assert_eq!(meter_limit(&licenses, 10, |_| true, limit_of).and_then(|limit| limit.hard), Some(100));
        // Only the dear license pays for the meter.
        assert_eq!(meter_limit(&licenses, 10, |license| license.0 == 1, limit_of).and_then(|limit| limit.hard), Some(5));
        // No hard limit is unlimited and beats any.
        let unlimited = |license: &Terms| if license.0 == 1 { Some(Limit { meter: 0, soft: Some(3), hard: None }) } else { limits[0] };
        assert_eq!(meter_limit(&licenses, 10, |_| true, unlimited).and_then(|limit| limit.hard), None);
        assert!(has_room(None, u64::MAX, 1));
        assert!(has_room(limits[0].as_ref(), 90, 10));
        assert!(!has_room(limits[0].as_ref(), 90, 11));
    }
}
