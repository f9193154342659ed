//! The decision engine: `decide(view, request, now, usage) -> Decision`, a pure function over
//! a borrowed [`View`]: an archived snapshot, or a base with an overlay of changed accounts.
//! It never does I/O, never locks, never logs, never allocates and never panics; usage counts
//! come in through [`UsageLookup`], which the caller implements.

use rkyv::option::ArchivedOption;
use rkyv::rend::{u32_le, u64_le};

pub use crate::rules::Validity;
use rkyv::vec::ArchivedVec;

use crate::model::{
    ArchivedAccount, ArchivedAccountStatus, ArchivedLicense, ArchivedLimit, ArchivedSnapshotData, Limit, NEVER_EXPIRES, SINCE_FOREVER,
    bits, fnv1a64,
};
use crate::rules::{self, LicenseTerms};

/// One question: may `account` (and `user`) use `feature`, here and now, for `amount`?
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request<'a> {
    pub account: &'a str,
    pub feature: &'a str,
    pub user: Option<&'a str>,
    pub region: Option<&'a str>,
    pub device: Option<&'a str>,
    /// Units of the feature's meter this use would consume; 1 when absent.
    pub amount: Option<u64>,
}

/// How much of a meter an account has used in a period. Implemented by the sidecar's usage
/// store; the engine only reads through it.
pub trait UsageLookup {
    fn used(&self, account: &str, meter: &str, period_start: i64) -> u64;
}

/// No usage at all: for callers without a usage store (the `check` command, benches).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoUsage;

impl UsageLookup for NoUsage {
    fn used(&self, _account: &str, _meter: &str, _period_start: i64) -> u64 {
        0
    }
}

/// Why a decision came out as it did; `Ok` is the only allow. The order of the variants is
/// the order of the checks in docs/DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    UnknownAccount,
    AccountSuspended,
    UnknownFeature,
    LicenseExpired,
    NotEntitled,
    NotInRollout,
    RegionBlocked,
    UnknownUser,
    NoSeat,
    RoleForbidden,
    DeviceNotActivated,
    QuotaExceeded,
    Ok,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::UnknownAccount,
        Reason::AccountSuspended,
        Reason::UnknownFeature,
        Reason::LicenseExpired,
        Reason::NotEntitled,
        Reason::NotInRollout,
        Reason::RegionBlocked,
        Reason::UnknownUser,
        Reason::NoSeat,
        Reason::RoleForbidden,
        Reason::DeviceNotActivated,
        Reason::QuotaExceeded,
        Reason::Ok,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownAccount => "unknown_account",
            Reason::AccountSuspended => "account_suspended",
            Reason::UnknownFeature => "unknown_feature",
            Reason::LicenseExpired => "license_expired",
            Reason::NotEntitled => "not_entitled",
            Reason::NotInRollout => "not_in_rollout",
            Reason::RegionBlocked => "region_blocked",
            Reason::UnknownUser => "unknown_user",
            Reason::NoSeat => "no_seat",
            Reason::RoleForbidden => "role_forbidden",
            Reason::DeviceNotActivated => "device_not_activated",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::Ok => "ok",
        }
    }

    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|reason| reason.as_str() == text)
    }

    /// Dense index, for per-reason counters.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The cheapest purchase that would turn a denial into an allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    Plan(u32),
    Addon(u32),
}

/// Where the request stands against the meter its feature consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub meter: u32,
    /// The hard limit, or the soft one where there is no hard limit; `None` is unlimited.
    pub limit: Option<u64>,
    pub used: u64,
    pub remaining: Option<u64>,
    pub reset_at: Option<i64>,
    /// The request takes usage past a soft limit.
    pub overage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// Index of the license the decision rests on, within the account's licenses.
    pub license: Option<u32>,
    pub expires_at: Option<i64>,
    /// The license is past its expiry and inside its grace period.
    pub grace: bool,
    pub quota: Option<Quota>,
    pub upgrade: Option<Upgrade>,
}

impl Decision {
    const fn deny(reason: Reason) -> Decision {
        Decision { reason, license: None, expires_at: None, grace: false, quota: None, upgrade: None }
    }

    pub const fn allow(&self) -> bool {
        matches!(self.reason, Reason::Ok)
    }
}

fn starts_at(license: &ArchivedLicense) -> Option<i64> {
    let starts_at = license.starts_at.to_native();
    (starts_at != SINCE_FOREVER).then_some(starts_at)
}

fn expires_at(license: &ArchivedLicense) -> Option<i64> {
    let expires_at = license.expires_at.to_native();
    (expires_at != NEVER_EXPIRES).then_some(expires_at)
}

/// The feature and limit set tables an account's licenses point into: the base snapshot's, or
/// those of the delta that carried the account.
#[derive(Clone, Copy)]
pub struct Sets<'s> {
    pub features: &'s ArchivedVec<ArchivedVec<u64_le>>,
    pub limits: &'s ArchivedVec<ArchivedVec<ArchivedLimit>>,
}

/// An account as a [`View`] finds it: its id, its data, and the set tables it points into.
#[derive(Clone, Copy)]
pub struct Found<'s> {
    pub id: &'s str,
    pub account: &'s ArchivedAccount,
    pub sets: Sets<'s>,
}

/// What decisions read: a catalog, and accounts by id. A base snapshot on its own is a view;
/// so is the sidecar's serving view, a base plus an overlay of the accounts deltas changed.
/// Every index other than a set index is the catalog's, so both agree on them.
pub trait View {
    fn catalog(&self) -> &ArchivedSnapshotData;
    /// The account `id`; must not allocate, lock or block (it is on every decision's path).
    fn account(&self, id: &str) -> Option<Found<'_>>;
}

impl View for ArchivedSnapshotData {
    fn catalog(&self) -> &ArchivedSnapshotData {
        self
    }

    fn account(&self, id: &str) -> Option<Found<'_>> {
        let (key, account) = self.accounts.get_key_value(id)?;
        Some(Found { id: key.as_str(), account, sets: Sets { features: &self.feature_sets, limits: &self.limit_sets } })
    }
}

fn feature_set<'s>(sets: Sets<'s>, set_idx: &u32_le) -> &'s [u64_le] {
    sets.features.get(set_idx.to_native() as usize).map_or(&[], |set| set.as_slice())
}

fn limit_set<'s>(sets: Sets<'s>, license: &ArchivedLicense) -> &'s [ArchivedLimit] {
    sets.limits.get(license.limits.to_native() as usize).map_or(&[], |set| set.as_slice())
}

fn grants(sets: Sets<'_>, license: &ArchivedLicense, feature_idx: u32) -> bool {
    bits::contains_le(feature_set(sets, &license.features), feature_idx)
}

/// The preferred license in force at `now` for which `accept` holds (`rules::preferred`).
fn best_license(
    account: &ArchivedAccount,
    now: i64,
    accept: impl FnMut(&ArchivedLicense) -> bool,
) -> Option<(u32, &ArchivedLicense, Validity)> {
    rules::preferred(account.licenses.as_slice(), now, accept)
}

/// Whether a geo-fence (a bitset over region indices) admits the request's region. No fence
/// admits anything; a fence admits nothing without a declared region (fail closed).
fn fence_allows(fence: &ArchivedOption<ArchivedVec<u64_le>>, region_idx: Option<u32>) -> bool {
    match fence.as_ref() {
        None => true,
        Some(regions) => region_idx.is_some_and(|region_idx| bits::contains_le(regions, region_idx)),
    }
}

/// The longest region name looked up; longer ones cannot be declared (ids are at most 128).
const MAX_REGION_LEN: usize = 128;

/// The index of a declared region, compared case-insensitively (ASCII; region ids are ASCII).
/// Lowercases into a stack buffer, so it does not allocate.
fn region_index(snapshot: &ArchivedSnapshotData, region: &str) -> Option<u32> {
    let mut buffer = [0u8; MAX_REGION_LEN];
    let lowered = buffer.get_mut(..region.len())?;
    lowered.copy_from_slice(region.as_bytes());
    lowered.make_ascii_lowercase();
    let key = std::str::from_utf8(lowered).ok()?;
    snapshot.region_index.get(key).map(|idx| idx.to_native())
}

fn find_limit(limits: &[ArchivedLimit], meter_idx: u32) -> Option<&ArchivedLimit> {
    limits.binary_search_by_key(&meter_idx, |limit| limit.meter.to_native()).ok().and_then(|position| limits.get(position))
}

/// A license's resolved limit on a meter, `None` when it sets none.
fn license_limit(sets: Sets<'_>, license: &ArchivedLicense, meter_idx: u32) -> Option<Limit> {
    find_limit(limit_set(sets, license), meter_idx).map(rules::native_limit)
}

/// The rollout bucket (0..100) of an account for a feature whose seed is `seed`.
pub fn rollout_bucket(seed: u64, account: &str) -> u8 {
    // A separator keeps ("ab", "c") and ("a", "bc") apart; the final mix spreads FNV's weak
    // low bits before the modulus.
    let mut hash = fnv1a64(seed, b"/");
    hash = fnv1a64(hash, account.as_bytes());
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    (hash % 100) as u8
}

/// The decision resting on `license`, allowed unless changed.
fn resting_on(license_idx: u32, license: &ArchivedLicense, validity: Validity) -> Decision {
    Decision {
        reason: Reason::Ok,
        license: Some(license_idx),
        expires_at: expires_at(license),
        grace: validity == Validity::Grace,
        quota: None,
        upgrade: None,
    }
}

/// Decides one request. Pure: the same snapshot, request, `now` (unix seconds) and usage
/// always give the same decision.
///
/// The account's licenses narrow step by step (in force → granting the feature → admitting the
/// region → with room on the meter); the first step that leaves none gives the reason, and an
/// allow rests on the preferred survivor. Each step is one pass over the account's few
/// licenses with the shared preference rule, never an allocation.
pub fn decide<V: View + ?Sized>(view: &V, request: &Request<'_>, now: i64, usage: &impl UsageLookup) -> Decision {
    let snapshot = view.catalog();
    let Some(Found { account, sets, .. }) = view.account(request.account) else {
        return Decision::deny(Reason::UnknownAccount);
    };
    if account.status != ArchivedAccountStatus::Active {
        return Decision::deny(Reason::AccountSuspended);
    }
    let Some(feature_idx) = snapshot.feature_index.get(request.feature).map(|idx| idx.to_native()) else {
        return Decision::deny(Reason::UnknownFeature);
    };
    let Some(feature) = snapshot.features.get(feature_idx as usize) else {
        return Decision::deny(Reason::UnknownFeature);
    };

    // Geo-fences: the feature's applies whatever the license; a plan's and a license's apply
    // to that license only.
    let region_idx = request.region.and_then(|region| region_index(snapshot, region));
    let feature_in_region = fence_allows(&feature.regions, region_idx);
    let in_region = |license: &ArchivedLicense| {
        feature_in_region
            && fence_allows(&license.regions, region_idx)
            && snapshot.plans.get(license.plan.to_native() as usize).is_none_or(|plan| fence_allows(&plan.regions, region_idx))
    };
    let granting_in_region = best_license(account, now, |license| grants(sets, license, feature_idx) && in_region(license));
    let (license_idx, license, validity) = match granting_in_region {
        Some(found) => found,
        None => {
            let Some((granting_idx, granting, granting_validity)) =
                best_license(account, now, |license| grants(sets, license, feature_idx))
            else {
                if best_license(account, now, |_| true).is_none() {
                    return Decision::deny(Reason::LicenseExpired);
                }
                let mut decision = Decision::deny(Reason::NotEntitled);
                decision.upgrade = upgrade_for_feature(snapshot, sets, account, now, feature_idx);
                return decision;
            };
            let mut decision = resting_on(granting_idx, granting, granting_validity);
            decision.reason = if in_rollout(feature, request.account) { Reason::RegionBlocked } else { Reason::NotInRollout };
            return decision;
        }
    };
    let mut decision = resting_on(license_idx, license, validity);
    let deny = |mut decision: Decision, reason: Reason| {
        decision.reason = reason;
        decision
    };
    if !in_rollout(feature, request.account) {
        return deny(decision, Reason::NotInRollout);
    }

    if let Some(user_id) = request.user {
        let Some(user) =
            account.users.binary_search_by(|user| user.id.as_str().cmp(user_id)).ok().and_then(|position| account.users.get(position))
        else {
            return deny(decision, Reason::UnknownUser);
        };
        if !user.seat {
            return deny(decision, Reason::NoSeat);
        }
        let role_grants = user.roles.iter().any(|role_idx| {
            snapshot.roles.get(role_idx.to_native() as usize).is_some_and(|role| bits::contains_le(&role.features, feature_idx))
        });
        if !role_grants {
            return deny(decision, Reason::RoleForbidden);
        }
    }

    if let Some(device) = request.device
        && account.devices.binary_search_by(|activated| activated.as_str().cmp(device)).is_err()
    {
        return deny(decision, Reason::DeviceNotActivated);
    }

    if let Some(meter_idx) = feature.meter.as_ref().map(|idx| idx.to_native())
        && let Some(meter) = snapshot.meters.get(meter_idx as usize)
    {
        let window = meter.period.to_native().window(now);
        let used = usage.used(request.account, meter.name.as_str(), window.start);
        let amount = request.amount.unwrap_or(1);
        // The last step: among the licenses still in the running, those with room. Usually
        // the preferred one has room and is the answer.
        let with_room = if rules::has_room(license_limit(sets, license, meter_idx).as_ref(), used, amount) {
            Some((license_idx, license, validity))
        } else {
            best_license(account, now, |candidate| {
                grants(sets, candidate, feature_idx)
                    && in_region(candidate)
                    && rules::has_room(license_limit(sets, candidate, meter_idx).as_ref(), used, amount)
            })
        };
        let (quota_license, exceeded) = match with_room {
            Some((room_idx, room_license, room_validity)) => {
                decision = resting_on(room_idx, room_license, room_validity);
                (room_license, false)
            }
            None => (license, true),
        };
        let limit = license_limit(sets, quota_license, meter_idx);
        let shown = rules::shown_limit(limit.as_ref());
        let soft = limit.and_then(|limit| limit.soft);
        decision.quota = Some(Quota {
            meter: meter_idx,
            limit: shown,
            used,
            remaining: shown.map(|limit| limit.saturating_sub(used)),
            reset_at: window.reset_at,
            overage: soft.is_some_and(|soft| used.saturating_add(amount) > soft),
        });
        if exceeded {
            let hard = limit.and_then(|limit| limit.hard).unwrap_or(0);
            decision.upgrade = upgrade_for_quota(snapshot, license, feature_idx, meter_idx, hard);
            return deny(decision, Reason::QuotaExceeded);
        }
    }
    decision
}

/// Whether the account is inside the feature's percentage rollout (always, without one).
fn in_rollout(feature: &crate::model::ArchivedFeature, account: &str) -> bool {
    feature.rollout.as_ref().is_none_or(|rollout| rollout_bucket(rollout.seed.to_native(), account) < rollout.percent)
}

/// The cheaper of a plan and an add-on candidate: by price where both have one, else the
/// add-on, since buying one on top of a plan is the smaller step.
fn cheaper(snapshot: &ArchivedSnapshotData, plan: Option<u32>, addon: Option<u32>) -> Option<Upgrade> {
    match (plan, addon) {
        (None, None) => None,
        (Some(plan_idx), None) => Some(Upgrade::Plan(plan_idx)),
        (None, Some(addon_idx)) => Some(Upgrade::Addon(addon_idx)),
        (Some(plan_idx), Some(addon_idx)) => {
            let plan_price = snapshot.plans.get(plan_idx as usize).and_then(|plan| plan.price.as_ref().map(|price| price.to_native()));
            let addon_price = snapshot.addons.get(addon_idx as usize).and_then(|addon| addon.price.as_ref().map(|price| price.to_native()));
            match (plan_price, addon_price) {
                (Some(plan_price), Some(addon_price)) if plan_price < addon_price => Some(Upgrade::Plan(plan_idx)),
                _ => Some(Upgrade::Addon(addon_idx)),
            }
        }
    }
}

fn upgrade_for_feature(
    snapshot: &ArchivedSnapshotData,
    sets: Sets<'_>,
    account: &ArchivedAccount,
    now: i64,
    feature_idx: u32,
) -> Option<Upgrade> {
    let current = best_license(account, now, |_| true);
    // A feature an override took away was taken on purpose; no purchase brings it back.
    if current.is_some_and(|(_, license, _)| bits::contains_le(feature_set(sets, &license.removed), feature_idx)) {
        return None;
    }
    let first_plan = current.map_or(0, |(_, license, _)| license.plan.to_native() as usize + 1);
    let plan = snapshot
        .plans
        .iter()
        .enumerate()
        .skip(first_plan)
        .find(|(_, plan)| bits::contains_le(&plan.features, feature_idx))
        .map(|(plan_idx, _)| plan_idx as u32);
    let addon = snapshot.addons.iter().position(|addon| bits::contains_le(&addon.features, feature_idx)).map(|addon_idx| addon_idx as u32);
    cheaper(snapshot, plan, addon)
}

fn upgrade_for_quota(
    snapshot: &ArchivedSnapshotData,
    license: &ArchivedLicense,
    feature_idx: u32,
    meter_idx: u32,
    current_hard: u64,
) -> Option<Upgrade> {
    // A limit set by an override is a negotiated figure that no purchase changes.
    if license.overridden_meters.iter().any(|meter| meter.to_native() == meter_idx) {
        return None;
    }
    let plan = snapshot
        .plans
        .iter()
        .enumerate()
        .skip(license.plan.to_native() as usize + 1)
        .find(|(_, plan)| {
            bits::contains_le(&plan.features, feature_idx)
                && find_limit(&plan.limits, meter_idx)
                    .and_then(|limit| limit.hard.as_ref())
                    .is_none_or(|hard| hard.to_native() > current_hard)
        })
        .map(|(plan_idx, _)| plan_idx as u32);
    let addon = snapshot
        .addons
        .iter()
        .enumerate()
        .find(|(addon_idx, addon)| {
            // An add-on already on the license cannot be bought again.
            !license.addons.iter().any(|held| held.to_native() as usize == *addon_idx)
                && find_limit(&addon.limits, meter_idx).and_then(|limit| limit.hard.as_ref()).is_some_and(|hard| hard.to_native() > 0)
        })
        .map(|(addon_idx, _)| addon_idx as u32);
    cheaper(snapshot, plan, addon)
}

/// The name of an upgrade's plan or add-on.
pub fn upgrade_name(snapshot: &ArchivedSnapshotData, upgrade: Upgrade) -> Option<(&'static str, &str)> {
    match upgrade {
        Upgrade::Plan(plan_idx) => snapshot.plans.get(plan_idx as usize).map(|plan| ("plan", plan.name.as_str())),
        Upgrade::Addon(addon_idx) => snapshot.addons.get(addon_idx as usize).map(|addon| ("addon", addon.name.as_str())),
    }
}

/// The `checkout_url` template of an upgrade's plan or add-on, placeholders unfilled: filling
/// them allocates, so it is left to whoever renders the answer, off the deciding path.
pub fn upgrade_checkout_template(snapshot: &ArchivedSnapshotData, upgrade: Upgrade) -> Option<&str> {
    let template = match upgrade {
        Upgrade::Plan(plan_idx) => snapshot.plans.get(plan_idx as usize)?.checkout_url.as_ref(),
        Upgrade::Addon(addon_idx) => snapshot.addons.get(addon_idx as usize)?.checkout_url.as_ref(),
    };
    template.map(|template| template.as_str())
}

// ---------------------------------------------------------------------------------------------
// Entitlements: the resolved view of one account, for drawing a UI. Off the hot path, so it
// may allocate; it is still pure.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlements<'s> {
    pub account: &'s str,
    pub active: bool,
    pub licenses: Vec<LicenseView<'s>>,
    pub features: Vec<FeatureView<'s>>,
    pub meters: Vec<MeterView<'s>>,
    pub seats: u32,
    pub seats_assigned: u32,
    pub devices: Vec<&'s str>,
    pub max_devices: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseView<'s> {
    pub id: &'s str,
    pub plan: &'s str,
    pub addons: Vec<&'s str>,
    pub seats: u32,
    pub trial: bool,
    pub starts_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub valid: bool,
    pub grace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureView<'s> {
    pub feature: &'s str,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterView<'s> {
    pub meter: &'s str,
    pub unit: &'s str,
    pub period: &'static str,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
    pub used: u64,
    pub remaining: Option<u64>,
    pub period_start: i64,
    pub reset_at: Option<i64>,
}

/// Everything an app needs to draw an account's UI: licenses, every catalog feature with its
/// decision (for `user` and `region` when given), and each meter's limit and usage.
pub fn entitlements<'s, V: View + ?Sized>(
    view: &'s V,
    account_id: &'s str,
    user: Option<&str>,
    region: Option<&str>,
    now: i64,
    usage: &impl UsageLookup,
) -> Option<Entitlements<'s>> {
    let snapshot = view.catalog();
    let Found { id: account_key, account, sets } = view.account(account_id)?;
    let licenses = account
        .licenses
        .iter()
        .map(|license| {
            let license_validity = license.validity(now);
            LicenseView {
                id: license.id.as_str(),
                plan: snapshot.plans.get(license.plan.to_native() as usize).map_or("", |plan| plan.name.as_str()),
                addons: license
                    .addons
                    .iter()
                    .filter_map(|addon_idx| snapshot.addons.get(addon_idx.to_native() as usize).map(|addon| addon.name.as_str()))
                    .collect(),
                seats: license.seats.to_native(),
                trial: license.trial,
                starts_at: starts_at(license),
                expires_at: expires_at(license),
                valid: license_validity != Validity::Invalid,
                grace: license_validity == Validity::Grace,
            }
        })
        .collect();
    let features = snapshot
        .features
        .iter()
        .map(|feature| {
            let request = Request { account: account_id, feature: feature.name.as_str(), user, region, device: None, amount: Some(0) };
            FeatureView { feature: feature.name.as_str(), decision: decide(view, &request, now, usage) }
        })
        .collect();
    let primary = best_license(account, now, |_| true).map(|(_, license, _)| license);
    let meters = snapshot
        .meters
        .iter()
        .enumerate()
        .map(|(meter_idx, meter)| {
            let window = meter.period.to_native().window(now);
            // The limit `/v1/meter` enforces, so the UI shows what metering will do.
            let limit = account_meter_limit(snapshot, sets, account, meter_idx as u32, now);
            let soft_limit = limit.and_then(|limit| limit.soft);
            let hard_limit = limit.and_then(|limit| limit.hard);
            let used = usage.used(account_id, meter.name.as_str(), window.start);
            MeterView {
                meter: meter.name.as_str(),
                unit: meter.unit.as_str(),
                period: meter.period.to_native().as_str(),
                soft_limit,
                hard_limit,
                used,
                remaining: hard_limit.or(soft_limit).map(|limit| limit.saturating_sub(used)),
                period_start: window.start,
                reset_at: window.reset_at,
            }
        })
        .collect();
    let max_devices = if account.licenses.iter().any(|license| license.max_devices.is_none()) {
        None
    } else {
        account.licenses.iter().filter_map(|license| license.max_devices.as_ref().map(|max| max.to_native())).max()
    };
    Some(Entitlements {
        account: account_key,
        active: account.status == ArchivedAccountStatus::Active,
        licenses,
        features,
        meters,
        seats: primary.map_or(0, |license| license.seats.to_native()),
        seats_assigned: account.users.iter().filter(|user| user.seat).count() as u32,
        devices: account.devices.iter().map(|device| device.as_str()).collect(),
        max_devices,
    })
}

fn account_meter_limit(
    snapshot: &ArchivedSnapshotData,
    sets: Sets<'_>,
    account: &ArchivedAccount,
    meter_idx: u32,
    now: i64,
) -> Option<Limit> {
    let consumers = snapshot.meters.get(meter_idx as usize).map_or(&[][..], |meter| meter.features.as_slice());
    rules::meter_limit(
        account.licenses.as_slice(),
        now,
        |license| {
            let granted = feature_set(sets, &license.features);
            granted.iter().zip(consumers).any(|(granted, consumer)| granted.to_native() & consumer.to_native() != 0)
        },
        |license| license_limit(sets, license, meter_idx),
    )
}

/// The effective limit of an account on a meter at `now`, the one `/v1/meter` enforces and
/// `/v1/entitlements` reports: the most generous limit among the licenses in force that
/// grant a feature consuming the meter (see `rules::meter_limit`). `None` is unlimited.
pub fn meter_limit<V: View + ?Sized>(view: &V, account: &str, meter_idx: u32, now: i64) -> Option<Limit> {
    let found = view.account(account)?;
    account_meter_limit(view.catalog(), found.sets, found.account, meter_idx, now)
}
