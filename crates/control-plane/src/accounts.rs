//! Accounts from the database into the policy compiler: each stored account is converted into
//! the typed `AccountSpec` that account files also parse into, and lowered by
//! `policy::compile_accounts`, so a database account passes exactly the validation a policy
//! file does, with no TOML text in between. Also the catalog as JSON and the claims of a
//! license token. Pure: no I/O.

use std::collections::BTreeMap;

use tollgate_core::model::{self, AccountStatus, SnapshotData, bits};
use tollgate_core::rules;
use tollgate_policy::{self, AccountSpec, FenceSpec, LicenseSpec, LimitSpec, OverridesSpec, PolicyErrors, Source, UserSpec};

use super::store::{AccountDoc, AccountState, LicenseDoc, LimitDoc};

fn license_spec(license: &LicenseDoc) -> LicenseSpec {
    LicenseSpec {
        id: Some(license.id.clone()),
        plan: license.plan.clone(),
        addons: license.addons.clone(),
        seats: license.seats,
        trial: license.trial,
        starts_at: license.starts_at,
        expires_at: license.expires_at,
        grace_days: license.grace_days,
        regions: license.regions.clone().map(FenceSpec::Allow),
        max_devices: license.max_devices,
        overrides: OverridesSpec {
            add_features: license.overrides.add_features.clone(),
            remove_features: license.overrides.remove_features.clone(),
            limits: license
                .overrides
                .limits
                .iter()
                .map(|(meter, limit)| (meter.clone(), LimitSpec { soft: limit.soft, hard: limit.hard }))
                .collect(),
        },
    }
}

/// A stored account as the compiler's input. Cancelled licenses are left out.
pub fn account_spec(account: &AccountDoc) -> AccountSpec {
    AccountSpec {
        status: match account.status {
            AccountState::Active => AccountStatus::Active,
            AccountState::Suspended => AccountStatus::Suspended,
        },
        licenses: account.licenses.iter().filter(|license| !license.cancelled).map(license_spec).collect(),
        users: account
            .users
            .iter()
            .map(|(id, user)| (id.clone(), UserSpec { roles: user.roles.clone(), groups: user.groups.clone(), seat: user.seat }))
            .collect(),
        groups: account.groups.clone(),
        devices: account.devices.clone(),
    }
}

/// Why stored accounts did not compile: the catalog itself, or the accounts (each message
/// naming the account and the field).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Catalog(#[from] PolicyErrors),
    #[error(transparent)]
    Accounts(#[from] tollgate_policy::SpecErrors),
}

impl CompileError {
    /// One message per mistake, for API answers.
    pub fn messages(&self) -> Vec<String> {
        match self {
            CompileError::Catalog(errors) => errors.0.iter().map(ToString::to_string).collect(),
            CompileError::Accounts(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Compiles the catalog with every stored account into snapshot data.
pub fn compile_all(catalog: &Source, accounts: &[(String, AccountDoc)]) -> Result<SnapshotData, CompileError> {
    let catalog = tollgate_policy::compile_catalog(catalog)?;
    compile_with(&catalog, accounts)
}

/// Compiles stored accounts against an already compiled catalog.
pub fn compile_with(catalog: &tollgate_policy::Catalog, accounts: &[(String, AccountDoc)]) -> Result<SnapshotData, CompileError> {
    Ok(tollgate_policy::compile_accounts(catalog, accounts.iter().map(|(id, account)| (id.clone(), account_spec(account))))?)
}

/// Compiles accounts as they come (a stream from the repository) against a compiled catalog.
pub fn compile_stream(
    catalog: &tollgate_policy::Catalog,
    accounts: impl IntoIterator<Item = (String, AccountSpec)>,
) -> Result<SnapshotData, CompileError> {
    Ok(tollgate_policy::compile_accounts(catalog, accounts)?)
}

/// Validates one account against the catalog the way the compiler would, returning its
/// compiled form (a snapshot holding just it) or the compiler's messages, each naming the
/// account and the field.
pub fn compile_one(catalog: &Source, id: &str, account: &AccountDoc) -> Result<SnapshotData, Vec<String>> {
    let compiled = tollgate_policy::compile_catalog(catalog).map_err(|errors| CompileError::from(errors).messages())?;
    tollgate_policy::compile_accounts(&compiled, [(id.to_string(), account_spec(account))])
        .map_err(|errors| CompileError::from(errors).messages())
}

fn feature_names(data: &SnapshotData, set: &[u64]) -> Vec<String> {
    bits::iter(set).filter_map(|feature_idx| data.features.get(feature_idx as usize).map(|feature| feature.name.clone())).collect()
}

fn limits_json(data: &SnapshotData, limits: &[model::Limit]) -> serde_json::Map<String, serde_json::Value> {
    limits
        .iter()
        .filter_map(|limit| {
            let meter = data.meters.get(limit.meter as usize)?;
            let mut value = serde_json::Map::new();
            if let Some(soft) = limit.soft {
                value.insert("soft".into(), soft.into());
            }
            if let Some(hard) = limit.hard {
                value.insert("hard".into(), hard.into());
            }
            Some((meter.name.clone(), serde_json::Value::Object(value)))
        })
        .collect()
}

/// `GET /v1/catalog`: plans cheapest first, add-ons, features, meters and roles.
pub fn catalog_json(data: &SnapshotData) -> serde_json::Value {
    let region_names = |regions: &Option<Vec<u64>>| regions.as_ref().map(|regions| region_names(data, regions));
    serde_json::json!({
        "plans": data.plans.iter().map(|plan| serde_json::json!({
            "id": plan.name,
            "price": plan.price,
            "features": feature_names(data, &plan.features),
            "limits": limits_json(data, &plan.limits),
            "regions": region_names(&plan.regions),
        })).collect::<Vec<_>>(),
        "addons": data.addons.iter().map(|addon| serde_json::json!({
            "id": addon.name,
            "price": addon.price,
            "features": feature_names(data, &addon.features),
            "limits": limits_json(data, &addon.limits),
        })).collect::<Vec<_>>(),
        "features": data.features.iter().map(|feature| serde_json::json!({
            "id": feature.name,
            "description": feature.description,
            "meter": feature.meter.and_then(|meter_idx| data.meters.get(meter_idx as usize)).map(|meter| meter.name.clone()),
            "regions": region_names(&feature.regions),
            "rollout": feature.rollout.map(|rollout| rollout.percent),
        })).collect::<Vec<_>>(),
        "meters": data.meters.iter().map(|meter| serde_json::json!({
            "id": meter.name,
            "unit": meter.unit,
            "period": meter.period.as_str(),
        })).collect::<Vec<_>>(),
        "roles": data.roles.iter().map(|role| serde_json::json!({
            "id": role.name,
            "features": feature_names(data, &role.features),
        })).collect::<Vec<_>>(),
        "regions": data.regions,
    })
}

/// The entitlement claims of a license token for one compiled account at `now`: the plan of
/// the preferred license (the engine's rule, `rules::preferred`), every feature any license in
/// force grants, that license's limits, the most seats, and its region fence. `None` when the
/// account has no license in force now.
pub fn token_claims(data: &SnapshotData, account_id: &str, now: i64) -> Option<serde_json::Map<String, serde_json::Value>> {
    let account = data.accounts.get(account_id)?;
    let (_, best, _) = rules::preferred(&account.licenses, now, |_| true)?;
    let in_force =
        || account.licenses.iter().filter(move |license| rules::LicenseTerms::validity(*license, now) != rules::Validity::Invalid);
    let mut features = vec![0u64; bits::words_for(data.features.len())];
    for license in in_force() {
        if let Some(set) = data.feature_sets.get(license.features as usize) {
            bits::union_into(&mut features, set);
        }
    }
    let limits = data.limit_sets.get(best.limits as usize).map(|limits| limits_json(data, limits)).unwrap_or_default();
    let mut claims = serde_json::Map::new();
    claims.insert("license".into(), best.id.clone().into());
    claims.insert("plan".into(), data.plans.get(best.plan as usize).map(|plan| plan.name.clone()).into());
    claims.insert(
        "addons".into(),
        best.addons.iter().filter_map(|addon_idx| data.addons.get(*addon_idx as usize).map(|addon| addon.name.clone())).collect(),
    );
    claims.insert("features".into(), feature_names(data, &features).into());
    claims.insert("limits".into(), serde_json::Value::Object(limits));
    claims.insert("seats".into(), in_force().map(|license| license.seats).max().unwrap_or(0).into());
    claims.insert("regions".into(), best.regions.as_ref().map(|regions| region_names(data, regions)).into());
    if best.expires_at != model::NEVER_EXPIRES {
        claims.insert("license_expires_at".into(), best.expires_at.into());
        // Through the grace period the license still grants everything.
        claims.insert("license_valid_until".into(), best.expires_at.saturating_add(best.grace_seconds).into());
    }
    claims.insert("status".into(), if account.status == model::AccountStatus::Active { "active" } else { "suspended" }.into());
    Some(claims)
}

/// The declared names of the regions in a fence's bitset.
fn region_names(data: &SnapshotData, regions: &[u64]) -> Vec<String> {
    bits::iter(regions).filter_map(|region_idx| data.regions.get(region_idx as usize).cloned()).collect()
}

/// Limits written as the API takes them: a number (hard) or `{ "soft": N, "hard": M }`.
pub fn limits_from_json(value: &BTreeMap<String, serde_json::Value>) -> Result<BTreeMap<String, LimitDoc>, String> {
    let mut limits = BTreeMap::new();
    for (meter, limit) in value {
        let parsed = match limit {
            serde_json::Value::Number(number) => {
                let hard = number.as_u64().ok_or_else(|| format!("limit for meter `{meter}` must be a whole number >= 0"))?;
                LimitDoc { soft: None, hard: Some(hard) }
            }
            serde_json::Value::Object(_) => serde_json::from_value::<LimitDoc>(limit.clone())
                .map_err(|error| format!("limit for meter `{meter}` is not valid: {error}"))?,
            _ => return Err(format!("limit for meter `{meter}` must be a number or an object with `soft` and `hard`")),
        };
        limits.insert(meter.clone(), parsed);
    }
    Ok(limits)
}
