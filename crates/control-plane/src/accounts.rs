//! Accounts from the database into the policy compiler: each stored account is written out as
//! the `[accounts.ID]` TOML that `policies/README.md` documents and compiled together with the
//! catalog by `policy::compile_sources`, so a database account passes exactly the validation a
//! policy file does. Also the catalog as JSON and the claims of a license token. Pure: no I/O.

use std::collections::BTreeMap;

use tollgate_core::model::{self, SnapshotData, bits};
use tollgate_policy::{self, PolicyError, PolicyErrors, Source};

use super::store::{AccountDoc, AccountState, LicenseDoc, LimitDoc};

/// How many accounts go into one generated TOML source when compiling everything: enough to
/// keep the per-source overhead small, few enough that one source's text stays small.
const ACCOUNTS_PER_SOURCE: usize = 2_000;

fn datetime(unix_seconds: i64) -> toml::Value {
    let text = tollgate_core::period::format_rfc3339(unix_seconds);
    match text.parse::<toml::value::Datetime>() {
        Ok(datetime) => toml::Value::Datetime(datetime),
        // format_rfc3339 always yields a valid date-time; a string would be reported by the
        // compiler as a type error rather than pass silently.
        Err(_) => toml::Value::String(text),
    }
}

fn strings(values: &[String]) -> toml::Value {
    toml::Value::Array(values.iter().cloned().map(toml::Value::String).collect())
}

fn limit_value(limit: &LimitDoc) -> toml::Value {
    let mut table = toml::Table::new();
    if let Some(soft) = limit.soft {
        table.insert("soft".into(), toml::Value::Integer(i64::try_from(soft).unwrap_or(i64::MAX)));
    }
    if let Some(hard) = limit.hard {
        table.insert("hard".into(), toml::Value::Integer(i64::try_from(hard).unwrap_or(i64::MAX)));
    }
    toml::Value::Table(table)
}

fn license_table(license: &LicenseDoc) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert("id".into(), toml::Value::String(license.id.clone()));
    table.insert("plan".into(), toml::Value::String(license.plan.clone()));
    table.insert("addons".into(), strings(&license.addons));
    table.insert("seats".into(), toml::Value::Integer(i64::from(license.seats)));
    if let Some(starts_at) = license.starts_at {
        table.insert("starts_at".into(), datetime(starts_at));
    }
    if let Some(expires_at) = license.expires_at {
        table.insert("expires_at".into(), datetime(expires_at));
    }
    table.insert("grace_days".into(), toml::Value::Integer(i64::from(license.grace_days)));
    if let Some(regions) = &license.regions {
        table.insert("regions".into(), strings(regions));
    }
    if let Some(max_devices) = license.max_devices {
        table.insert("max_devices".into(), toml::Value::Integer(i64::from(max_devices)));
    }
    let overrides = &license.overrides;
    let mut overrides_table = toml::Table::new();
    overrides_table.insert("add_features".into(), strings(&overrides.add_features));
    overrides_table.insert("remove_features".into(), strings(&overrides.remove_features));
    let limits: toml::Table = overrides.limits.iter().map(|(meter, limit)| (meter.clone(), limit_value(limit))).collect();
    overrides_table.insert("limits".into(), toml::Value::Table(limits));
    table.insert("overrides".into(), toml::Value::Table(overrides_table));
    table
}

/// An account as the body of an `[accounts.ID]` table. Cancelled licenses are left out.
pub fn account_table(account: &AccountDoc) -> toml::Table {
    let mut table = toml::Table::new();
    let status = match account.status {
        AccountState::Active => "active",
        AccountState::Suspended => "suspended",
    };
    table.insert("status".into(), toml::Value::String(status.into()));
    table.insert("devices".into(), strings(&account.devices));
    let groups: toml::Table = account.groups.iter().map(|(name, roles)| (name.clone(), strings(roles))).collect();
    table.insert("groups".into(), toml::Value::Table(groups));
    let licenses =
        account.licenses.iter().filter(|license| !license.cancelled).map(|license| toml::Value::Table(license_table(license))).collect();
    table.insert("licenses".into(), toml::Value::Array(licenses));
    let mut users = toml::Table::new();
    for (id, user) in &account.users {
        let mut user_table = toml::Table::new();
        user_table.insert("roles".into(), strings(&user.roles));
        user_table.insert("groups".into(), strings(&user.groups));
        user_table.insert("seat".into(), toml::Value::Boolean(user.seat));
        users.insert(id.clone(), toml::Value::Table(user_table));
    }
    table.insert("users".into(), toml::Value::Table(users));
    table
}

/// The text of an accounts file holding `accounts`, as a source named `path`.
pub fn accounts_source<'a>(path: String, accounts: impl IntoIterator<Item = (&'a str, &'a AccountDoc)>) -> Result<Source, PolicyError> {
    let tables: toml::Table =
        accounts.into_iter().map(|(id, account)| (id.to_string(), toml::Value::Table(account_table(account)))).collect();
    let mut file = toml::Table::new();
    file.insert("accounts".into(), toml::Value::Table(tables));
    // A failure here must never become an empty file: that would publish no accounts.
    match toml::to_string(&file) {
        Ok(text) => Ok(Source { path: path.into(), text }),
        Err(error) => Err(PolicyError { file: path.into(), line: None, message: format!("cannot write accounts as TOML: {error}") }),
    }
}

/// Compiles the catalog with every stored account into snapshot data.
pub fn compile_all(catalog: &Source, accounts: &[(String, AccountDoc)]) -> Result<SnapshotData, PolicyErrors> {
    let sources = accounts.chunks(ACCOUNTS_PER_SOURCE).enumerate().map(|(chunk_idx, chunk)| {
        accounts_source(format!("database/accounts-{chunk_idx}.toml"), chunk.iter().map(|(id, account)| (id.as_str(), account)))
    });
    tollgate_policy::compile_sources(catalog, sources)
}

/// Validates one account against the catalog the way the compiler would, returning its
/// compiled form (a snapshot holding just it) or the compiler's messages without file and line
/// (they would point into generated text).
pub fn compile_one(catalog: &Source, id: &str, account: &AccountDoc) -> Result<SnapshotData, Vec<String>> {
    let source = accounts_source(format!("database/{id}.toml"), [(id, account)]);
    tollgate_policy::compile_sources(catalog, std::iter::once(source))
        .map_err(|errors| errors.0.into_iter().map(|error| error.message).collect())
}

/// The catalog alone, compiled: names, ranks and limits for validating requests.
pub fn compile_catalog(catalog: &Source) -> Result<SnapshotData, PolicyErrors> {
    tollgate_policy::compile_sources(catalog, std::iter::empty())
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
    let region_names = |regions: &Option<Vec<u32>>| {
        regions
            .as_ref()
            .map(|regions| regions.iter().filter_map(|region_idx| data.regions.get(*region_idx as usize).cloned()).collect::<Vec<_>>())
    };
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
/// the best license (valid before grace, then the higher plan), every feature any valid or
/// in-grace license grants, that license's limits, the most seats, and its region fence.
/// `None` when the account has no license valid now.
pub fn token_claims(data: &SnapshotData, account_id: &str, now: i64) -> Option<serde_json::Map<String, serde_json::Value>> {
    let account = data.accounts.get(account_id)?;
    let in_force: Vec<(bool, &model::License)> = account
        .licenses
        .iter()
        .filter(|license| license.starts_at <= now && now < license.expires_at.saturating_add(license.grace_seconds))
        .map(|license| (now < license.expires_at, license))
        .collect();
    let (_, best) = in_force.iter().max_by_key(|(valid, license)| (*valid, license.plan))?;
    let mut features = vec![0u64; bits::words_for(data.features.len())];
    for (_, license) in &in_force {
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
    claims.insert("seats".into(), in_force.iter().map(|(_, license)| license.seats).max().unwrap_or(0).into());
    let regions = best
        .regions
        .as_ref()
        .map(|regions| regions.iter().filter_map(|region_idx| data.regions.get(*region_idx as usize).cloned()).collect::<Vec<_>>());
    claims.insert("regions".into(), regions.into());
    if best.expires_at != model::NEVER_EXPIRES {
        claims.insert("license_expires_at".into(), best.expires_at.into());
        // Through the grace period the license still grants everything.
        claims.insert("license_valid_until".into(), best.expires_at.saturating_add(best.grace_seconds).into());
    }
    claims.insert("status".into(), if account.status == model::AccountStatus::Active { "active" } else { "suspended" }.into());
    Some(claims)
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
