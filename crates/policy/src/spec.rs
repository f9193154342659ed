//! Accounts as typed values: [`AccountSpec`] is what both an `[accounts.ID]` table of a policy
//! file and a control-plane account document turn into, and [`lower_account`] is the one
//! validation and lowering of a spec into a compiled [`Account`]. Mistakes come back as
//! [`SpecError`]s naming the account and the field (`licenses[0].plan`); the TOML front end maps
//! fields back to file and line. Pure: no I/O, no TOML.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use tollgate_core::model::{self, Account, AccountStatus, License, Limit, SnapshotData, User, bits};

use crate::{Interner, Names};

/// One account: status, licenses, users, groups and devices, with names as strings and times
/// as unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSpec {
    pub status: AccountStatus,
    pub licenses: Vec<LicenseSpec>,
    /// User id to user.
    pub users: BTreeMap<String, UserSpec>,
    /// Group name to the roles it carries.
    pub groups: BTreeMap<String, Vec<String>>,
    pub devices: Vec<String>,
}

impl Default for AccountSpec {
    fn default() -> AccountSpec {
        AccountSpec {
            status: AccountStatus::Active,
            licenses: Vec::new(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            devices: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseSpec {
    /// `ACCOUNT-N` (N counting from 1 in list order) when absent.
    pub id: Option<String>,
    pub plan: String,
    pub addons: Vec<String>,
    pub seats: u32,
    pub trial: bool,
    pub starts_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub grace_days: u32,
    pub regions: Option<FenceSpec>,
    pub max_devices: Option<u32>,
    pub overrides: OverridesSpec,
}

impl LicenseSpec {
    /// A license of `plan` with one seat and nothing else set.
    pub fn new(plan: impl Into<String>) -> LicenseSpec {
        LicenseSpec {
            id: None,
            plan: plan.into(),
            addons: Vec::new(),
            seats: 1,
            trial: false,
            starts_at: None,
            expires_at: None,
            grace_days: 0,
            regions: None,
            max_devices: None,
            overrides: OverridesSpec::default(),
        }
    }
}

/// A geo-fence: only the listed regions, or every declared region but the listed ones. Names
/// are regions or region groups of the catalog, compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceSpec {
    Allow(Vec<String>),
    Deny(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverridesSpec {
    pub add_features: Vec<String>,
    pub remove_features: Vec<String>,
    /// Meter name to the limit that replaces the license's.
    pub limits: BTreeMap<String, LimitSpec>,
}

/// Both absent is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSpec {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    pub seat: bool,
}

/// One mistake in an account spec: the account, the field (empty for the account as a
/// whole; `licenses[1].addons[0]`, `users.ann.groups[0]`, ...) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub account: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "account `{}`: {}", self.account, self.message)
        } else {
            write!(f, "account `{}` field `{}`: {}", self.account, self.field, self.message)
        }
    }
}

/// Every mistake found in a set of account specs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_errors = self.0.len();
        write!(f, "{n_errors} error{} in accounts", if n_errors == 1 { "" } else { "s" })?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

/// Collects the mistakes of one account.
pub(crate) struct Report<'a> {
    account: &'a str,
    pub(crate) errors: &'a mut Vec<SpecError>,
}

impl Report<'_> {
    fn at(&mut self, field: impl Into<String>, message: String) {
        self.errors.push(SpecError { account: self.account.to_string(), field: field.into(), message });
    }
}

/// Whether `id` is 1 to 128 characters of ASCII letters, digits, `-`, `_`, `.`, `:` or `@`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
}

pub(crate) fn id_message(what: &str, id: &str) -> String {
    format!("{what} id `{id}` must be 1 to 128 characters of letters, digits, `-`, `_`, `.`, `:` or `@`")
}

// Field paths and owner names are closures: they are only built for a mistake, and most
// accounts of a large compile have none.

fn check_id(id: &str, what: &str, field: impl FnOnce() -> String, report: &mut Report<'_>) {
    if !valid_id(id) {
        report.at(field(), id_message(what, id));
    }
}

fn resolve(
    name: &str,
    index: &HashMap<String, u32>,
    kind: &str,
    owner: &dyn Fn() -> String,
    field: impl FnOnce() -> String,
    report: &mut Report<'_>,
) -> Option<u32> {
    let found = index.get(name).copied();
    if found.is_none() {
        report.at(field(), format!("{} names unknown {kind} `{name}`", owner()));
    }
    found
}

/// Resolves a fence's names (regions or groups, any case) to a bitset over region indices;
/// `Err` carries the unknown names.
pub(crate) fn resolve_fence<'n>(fence: &'n FenceSpec, names: &Names) -> Result<Vec<u64>, Vec<&'n str>> {
    let (listed, deny) = match fence {
        FenceSpec::Allow(listed) => (listed, false),
        FenceSpec::Deny(listed) => (listed, true),
    };
    let mut set = vec![0u64; bits::words_for(names.n_regions)];
    let mut unknown = Vec::new();
    for name in listed {
        let key = name.to_ascii_lowercase();
        if let Some(region_idx) = names.regions.get(&key) {
            bits::set(&mut set, *region_idx);
        } else if let Some(group) = names.region_groups.get(&key) {
            bits::union_into(&mut set, group);
        } else {
            unknown.push(name.as_str());
        }
    }
    if !unknown.is_empty() {
        return Err(unknown);
    }
    if deny {
        for (word_idx, word) in set.iter_mut().enumerate() {
            let declared_bits = names.n_regions.saturating_sub(word_idx * 64).min(64);
            let declared = if declared_bits == 64 { u64::MAX } else { (1u64 << declared_bits) - 1 };
            *word = !*word & declared;
        }
    }
    Ok(set)
}

fn fence(fence: &FenceSpec, names: &Names, owner: &dyn Fn() -> String, field: String, report: &mut Report<'_>) -> Option<Vec<u64>> {
    match resolve_fence(fence, names) {
        Ok(set) => Some(set),
        Err(unknown) => {
            for name in unknown {
                report.at(field.clone(), format!("{} names unknown region `{name}`", owner()));
            }
            None
        }
    }
}

/// Validates one account against the compiled catalog and lowers it, or reports every
/// mistake in it (and returns `None`).
pub(crate) fn lower_account(
    account_id: &str,
    spec: &AccountSpec,
    data: &SnapshotData,
    names: &Names,
    interner: &mut Interner,
    errors: &mut Vec<SpecError>,
) -> Option<Account> {
    let n_errors_before = errors.len();
    let mut report = Report { account: account_id, errors };
    check_id(account_id, "account", String::new, &mut report);
    let owner = || format!("account `{account_id}`");

    let mut licenses = Vec::new();
    let mut license_failed = false;
    let mut license_ids = HashSet::new();
    for (license_number, license_spec) in spec.licenses.iter().enumerate() {
        let field = |name: &str| format!("licenses[{license_number}]{name}");
        let id = license_spec.id.clone().unwrap_or_else(|| format!("{account_id}-{}", license_number + 1));
        let license_owner = || format!("license `{id}` of {}", owner());
        if !license_ids.insert(id.clone()) {
            report.at(field(""), format!("{} has duplicate license id `{id}`", owner()));
        }
        if license_spec.id.is_some() {
            check_id(&id, "license", || field(".id"), &mut report);
        }
        // An unknown plan still lets the rest of the license be checked, so every mistake in
        // it is reported; the license itself is then left out.
        let plan = resolve(&license_spec.plan, &names.plans, "plan", &license_owner, || field(".plan"), &mut report)
            .and_then(|plan_idx| data.plans.get(plan_idx as usize).map(|plan| (plan_idx, plan)));
        let mut features = plan.map_or_else(|| vec![0u64; names.n_words], |(_, plan)| plan.features.clone());
        let mut limits: BTreeMap<u32, Limit> =
            plan.map_or_else(BTreeMap::new, |(_, plan)| plan.limits.iter().map(|limit| (limit.meter, *limit)).collect());
        let mut addons = Vec::new();
        for (addon_number, addon_name) in license_spec.addons.iter().enumerate() {
            let addon_field = || field(&format!(".addons[{addon_number}]"));
            let Some(addon_idx) = resolve(addon_name, &names.addons, "add-on", &license_owner, addon_field, &mut report) else {
                continue;
            };
            let Some(addon) = data.addons.get(addon_idx as usize) else { continue };
            if addons.contains(&addon_idx) {
                report.at(addon_field(), format!("{} lists add-on `{addon_name}` more than once", license_owner()));
                continue;
            }
            addons.push(addon_idx);
            bits::union_into(&mut features, &addon.features);
            for addon_limit in &addon.limits {
                // An add-on raises a limit the plan sets; where the plan sets none the meter is
                // already unlimited and stays so.
                if let Some(limit) = limits.get_mut(&addon_limit.meter) {
                    limit.soft = limit.soft.zip(addon_limit.soft).map(|(a, b)| a.saturating_add(b)).or(limit.soft);
                    limit.hard = limit.hard.zip(addon_limit.hard).map(|(a, b)| a.saturating_add(b)).or(limit.hard);
                }
            }
        }
        let overrides = &license_spec.overrides;
        for (number, feature) in overrides.add_features.iter().enumerate() {
            let feature_field = || field(&format!(".overrides.add_features[{number}]"));
            if let Some(feature_idx) = resolve(feature, &names.features, "feature", &license_owner, feature_field, &mut report) {
                bits::set(&mut features, feature_idx);
            }
        }
        let mut removed = Vec::new();
        if !overrides.remove_features.is_empty() {
            removed = vec![0u64; names.n_words];
        }
        for (number, feature) in overrides.remove_features.iter().enumerate() {
            let feature_field = || field(&format!(".overrides.remove_features[{number}]"));
            if let Some(feature_idx) = resolve(feature, &names.features, "feature", &license_owner, feature_field, &mut report) {
                bits::clear(&mut features, feature_idx);
                bits::set(&mut removed, feature_idx);
            }
        }
        let mut overridden_meters = Vec::new();
        for (meter, limit) in &overrides.limits {
            let limit_field = || field(&format!(".overrides.limits.{meter}"));
            let Some(meter_idx) = resolve(meter, &names.meters, "meter", &license_owner, limit_field, &mut report) else {
                continue;
            };
            if let (Some(soft), Some(hard)) = (limit.soft, limit.hard)
                && soft > hard
            {
                report.at(limit_field(), format!("{} has soft limit {soft} above hard limit {hard} for meter `{meter}`", license_owner()));
            }
            overridden_meters.push(meter_idx);
            limits.insert(meter_idx, Limit { meter: meter_idx, soft: limit.soft, hard: limit.hard });
        }
        overridden_meters.sort_unstable();
        if let (Some(starts), Some(expires)) = (license_spec.starts_at, license_spec.expires_at)
            && expires <= starts
        {
            report.at(field(".expires_at"), format!("{} expires before it starts", license_owner()));
        }
        let regions =
            license_spec.regions.as_ref().and_then(|regions| fence(regions, names, &license_owner, field(".regions"), &mut report));
        let Some((plan_idx, _)) = plan else {
            license_failed = true;
            continue;
        };
        licenses.push(License {
            id,
            plan: plan_idx,
            addons,
            seats: license_spec.seats,
            trial: license_spec.trial,
            starts_at: license_spec.starts_at.unwrap_or(model::SINCE_FOREVER),
            expires_at: license_spec.expires_at.unwrap_or(model::NEVER_EXPIRES),
            grace_seconds: i64::from(license_spec.grace_days) * 86_400,
            features: interner.features(features),
            limits: interner.limits(limits.into_values().collect()),
            removed: interner.features(removed),
            overridden_meters,
            regions,
            max_devices: license_spec.max_devices,
        });
    }

    let mut groups: HashMap<&str, Vec<u32>> = HashMap::new();
    for (group, roles) in &spec.groups {
        check_id(group, "group", || format!("groups.{group}"), &mut report);
        let group_owner = || format!("group `{group}` of {}", owner());
        let resolved = roles
            .iter()
            .enumerate()
            .filter_map(|(number, role)| {
                resolve(role, &names.roles, "role", &group_owner, || format!("groups.{group}[{number}]"), &mut report)
            })
            .collect();
        groups.insert(group, resolved);
    }

    let mut users = Vec::new();
    let mut n_seated = 0u32;
    let mut last_seated = "";
    for (user_id, user_spec) in &spec.users {
        check_id(user_id, "user", || format!("users.{user_id}"), &mut report);
        let user_owner = || format!("user `{user_id}` of {}", owner());
        let mut roles: Vec<u32> = user_spec
            .roles
            .iter()
            .enumerate()
            .filter_map(|(number, role)| {
                resolve(role, &names.roles, "role", &user_owner, || format!("users.{user_id}.roles[{number}]"), &mut report)
            })
            .collect();
        for (number, group) in user_spec.groups.iter().enumerate() {
            match groups.get(group.as_str()) {
                Some(group_roles) => roles.extend(group_roles),
                None => report.at(format!("users.{user_id}.groups[{number}]"), format!("{} names unknown group `{group}`", user_owner())),
            }
        }
        roles.sort_unstable();
        roles.dedup();
        if user_spec.seat {
            n_seated += 1;
            last_seated = user_id;
        }
        users.push(User { id: user_id.clone(), seat: user_spec.seat, roles });
    }
    users.sort_by(|a, b| a.id.cmp(&b.id));
    // Seat and device counts are only meaningful once every license compiled.
    let max_seats = licenses.iter().map(|license| license.seats).max().unwrap_or(0);
    if !license_failed && n_seated > max_seats {
        let seat_field = if last_seated.is_empty() { String::new() } else { format!("users.{last_seated}") };
        report.at(seat_field, format!("{} assigns {n_seated} seats but its licenses allow at most {max_seats}", owner()));
    }

    let mut devices: Vec<String> = Vec::new();
    for (number, device) in spec.devices.iter().enumerate() {
        check_id(device, "device", || format!("devices[{number}]"), &mut report);
        devices.push(device.clone());
    }
    devices.sort();
    let n_devices = devices.len();
    devices.dedup();
    if devices.len() != n_devices {
        report.at("devices", format!("{} lists a device more than once", owner()));
    }
    let device_limit = if licenses.iter().any(|license| license.max_devices.is_none()) {
        None
    } else {
        licenses.iter().filter_map(|license| license.max_devices).max()
    };
    if let (Some(limit), false) = (device_limit, license_failed)
        && devices.len() > limit as usize
    {
        report.at("devices[0]", format!("{} activates {} devices but its licenses allow at most {limit}", owner(), devices.len()));
    }

    if report.errors.len() > n_errors_before {
        return None;
    }
    Some(Account { status: spec.status, licenses, users, devices })
}
