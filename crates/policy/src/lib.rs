//! The policy files: the TOML formats of `catalog.toml` and `accounts/*.toml` (documented in
//! `policies/README.md`), reading a policies directory, and compiling it into a
//! [`SnapshotData`]. Every mistake is reported with file, line and what is wrong, all at once.
//! Reads files only in [`compile_dir`]; everything else is pure. `generate` writes synthetic
//! policies of any size for benches and load tests.

pub mod generate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use tollgate_core::model::{
    self, Account, AccountStatus, Addon, Feature, License, Limit, Meter, Period, Plan, Role, Rollout, SnapshotData, User, bits,
};

/// One policy file's name and contents.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// One mistake in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; `None` when the mistake is about the file as a whole.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every mistake found in a policies directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_errors = self.0.len();
        write!(f, "{n_errors} error{} in policies", if n_errors == 1 { "" } else { "s" })?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// File formats
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    regions: Vec<Spanned<String>>,
    #[serde(default)]
    features: BTreeMap<Spanned<String>, FeatureFile>,
    #[serde(default)]
    meters: BTreeMap<Spanned<String>, MeterFile>,
    #[serde(default)]
    plans: Vec<PlanFile>,
    #[serde(default)]
    addons: Vec<PlanFile>,
    #[serde(default)]
    roles: BTreeMap<Spanned<String>, RoleFile>,
    /// Envoy ext_authz route-to-feature map: path prefix to feature name.
    #[serde(default)]
    routes: BTreeMap<Spanned<String>, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureFile {
    #[serde(default)]
    description: String,
    meter: Option<Spanned<String>>,
    regions: Option<Vec<Spanned<String>>>,
    rollout: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterFile {
    #[serde(default)]
    unit: String,
    period: Spanned<String>,
}

/// A plan or an add-on: add-ons have the same shape but no `regions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    id: Spanned<String>,
    price: Option<Spanned<i64>>,
    #[serde(default)]
    features: Vec<Spanned<String>>,
    #[serde(default)]
    limits: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    regions: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    features: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    #[serde(default)]
    accounts: BTreeMap<Spanned<String>, AccountFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    status: Option<Spanned<String>>,
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    #[serde(default)]
    licenses: Vec<Spanned<LicenseFile>>,
    #[serde(default)]
    users: BTreeMap<Spanned<String>, UserFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LicenseFile {
    id: Option<Spanned<String>>,
    plan: Spanned<String>,
    #[serde(default)]
    addons: Vec<Spanned<String>>,
    seats: Option<Spanned<i64>>,
    #[serde(default)]
    trial: bool,
    starts_at: Option<Spanned<toml::value::Datetime>>,
    expires_at: Option<Spanned<toml::value::Datetime>>,
    grace_days: Option<Spanned<i64>>,
    regions: Option<Vec<Spanned<String>>>,
    max_devices: Option<Spanned<i64>>,
    #[serde(default)]
    overrides: OverridesFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OverridesFile {
    #[serde(default)]
    add_features: Vec<Spanned<String>>,
    #[serde(default)]
    remove_features: Vec<Spanned<String>>,
    #[serde(default)]
    limits: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    #[serde(default)]
    roles: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    seat: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Reading a directory
// ---------------------------------------------------------------------------------------------

/// The catalog file of a policies directory.
pub const CATALOG_FILE: &str = "catalog.toml";
/// The folder of account files in a policies directory.
pub const ACCOUNTS_DIR: &str = "accounts";

/// The account files of a policies directory, in name order.
fn account_paths(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let accounts_dir = dir.join(ACCOUNTS_DIR);
    if !accounts_dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries =
        std::fs::read_dir(&accounts_dir).map_err(|error| whole_file_error(&accounts_dir, format!("cannot list directory: {error}")))?;
    let mut paths: Vec<PathBuf> =
        entries.flatten().map(|entry| entry.path()).filter(|path| path.extension().is_some_and(|ext| ext == "toml")).collect();
    paths.sort();
    Ok(paths)
}

/// Reads and compiles a policies directory: `DIR/catalog.toml` and every
/// `DIR/accounts/*.toml` in name order. Account files are read one at a time, so memory
/// holds one file's text and the compiled result, not every file at once.
pub fn compile_dir(dir: &Path) -> Result<SnapshotData, PolicyErrors> {
    let catalog = read_source(&dir.join(CATALOG_FILE)).map_err(|error| PolicyErrors(vec![error]))?;
    let paths = account_paths(dir).map_err(|error| PolicyErrors(vec![error]))?;
    compile_sources(&catalog, paths.iter().map(|path| read_source(path)))
}

fn read_source(path: &Path) -> Result<Source, PolicyError> {
    std::fs::read_to_string(path)
        .map(|text| Source { path: path.to_path_buf(), text })
        .map_err(|error| whole_file_error(path, format!("cannot read file: {error}")))
}

fn whole_file_error(path: &Path, message: String) -> PolicyError {
    PolicyError { file: path.to_path_buf(), line: None, message }
}

// ---------------------------------------------------------------------------------------------
// Compiling
// ---------------------------------------------------------------------------------------------

/// Collects errors for one file, turning byte spans into line numbers.
struct Diagnostics<'a> {
    source: &'a Source,
    errors: &'a mut Vec<PolicyError>,
    /// Offsets of the file's newlines, built on the first error only.
    newlines: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> Diagnostics<'a> {
    fn new(source: &'a Source, errors: &'a mut Vec<PolicyError>) -> Diagnostics<'a> {
        Diagnostics { source, errors, newlines: std::cell::OnceCell::new() }
    }

    fn line(&self, offset: usize) -> usize {
        let newlines = self.newlines.get_or_init(|| newline_offsets(&self.source.text));
        newlines.partition_point(|&newline| newline < offset) + 1
    }

    fn at(&mut self, span: std::ops::Range<usize>, message: String) {
        let line = self.line(span.start);
        self.errors.push(PolicyError { file: self.source.path.clone(), line: Some(line), message });
    }
}

fn newline_offsets(text: &str) -> Vec<usize> {
    text.bytes().enumerate().filter(|(_, byte)| *byte == b'\n').map(|(offset, _)| offset).collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    newline_offsets(text).partition_point(|&newline| newline < offset) + 1
}
fn parse_toml<T: serde::de::DeserializeOwned>(source: &Source, errors: &mut Vec<PolicyError>) -> Option<T> {
    match toml::from_str::<T>(&source.text) {
        Ok(value) => Some(value),
        Err(error) => {
            let line = error.span().map(|span| line_of(&source.text, span.start));
            let message = error.message().trim_end().to_string();
            errors.push(PolicyError { file: source.path.clone(), line, message });
            None
        }
    }
}

/// Name-to-index tables of the catalog, used while compiling accounts.
struct Names {
    features: HashMap<String, u32>,
    meters: HashMap<String, u32>,
    regions: HashMap<String, u32>,
    plans: HashMap<String, u32>,
    addons: HashMap<String, u32>,
    roles: HashMap<String, u32>,
    n_words: usize,
}

/// Compiles a catalog and account files into snapshot data, or every mistake found.
pub fn compile(catalog: &Source, accounts: &[Source]) -> Result<SnapshotData, PolicyErrors> {
    compile_sources(catalog, accounts.iter().map(|source| Ok(source.clone())))
}

/// A list of distinct values, each named by its position.
struct Dedup<T> {
    items: Vec<T>,
    index: HashMap<T, u32>,
}

impl<T: std::hash::Hash + Eq + Clone> Dedup<T> {
    fn new() -> Dedup<T> {
        Dedup { items: Vec::new(), index: HashMap::new() }
    }

    fn intern(&mut self, item: T) -> u32 {
        if let Some(&idx) = self.index.get(&item) {
            return idx;
        }
        let idx = self.items.len() as u32;
        self.index.insert(item.clone(), idx);
        self.items.push(item);
        idx
    }
}

/// Deduplicates feature sets and limit lists so licenses can point at shared copies.
struct Interner {
    feature_sets: Dedup<Vec<u64>>,
    limit_sets: Dedup<Vec<Limit>>,
}

impl Interner {
    fn new() -> Interner {
        let mut interner = Interner { feature_sets: Dedup::new(), limit_sets: Dedup::new() };
        // Set 0 is the empty feature set (model::EMPTY_FEATURE_SET).
        interner.features(Vec::new());
        interner
    }

    fn features(&mut self, mut set: Vec<u64>) -> u32 {
        // Trailing zero words change nothing; dropping them lets equal sets meet.
        while set.last() == Some(&0) {
            set.pop();
        }
        self.feature_sets.intern(set)
    }

    fn limits(&mut self, set: Vec<Limit>) -> u32 {
        self.limit_sets.intern(set)
    }
}

/// Compiles a catalog and a stream of account files (each parsed, compiled and dropped in
/// turn), or reports every mistake found.
pub fn compile_sources(
    catalog: &Source,
    accounts: impl Iterator<Item = Result<Source, PolicyError>>,
) -> Result<SnapshotData, PolicyErrors> {
    let mut errors = Vec::new();
    let parsed_catalog = parse_toml::<CatalogFile>(catalog, &mut errors);

    let mut data = SnapshotData {
        features: Vec::new(),
        meters: Vec::new(),
        plans: Vec::new(),
        addons: Vec::new(),
        roles: Vec::new(),
        regions: Vec::new(),
        feature_index: HashMap::new(),
        meter_index: HashMap::new(),
        region_index: HashMap::new(),
        feature_sets: Vec::new(),
        limit_sets: Vec::new(),
        accounts: HashMap::new(),
        routes: Vec::new(),
    };
    let names = parsed_catalog.as_ref().map(|parsed| compile_catalog(parsed, &mut data, &mut Diagnostics::new(catalog, &mut errors)));
    let mut interner = Interner::new();

    // Where each account was first defined: the file and the line of its id.
    let mut account_origin: HashMap<String, (usize, usize)> = HashMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for source in accounts {
        let source = match source {
            Ok(source) => source,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        // Without a catalog the accounts are still parsed, to report their syntax errors.
        let Some(parsed) = parse_toml::<AccountsFile>(&source, &mut errors) else { continue };
        let Some(names) = names.as_ref() else { continue };
        let file_idx = files.len();
        files.push(source.path.clone());
        let mut diagnostics = Diagnostics::new(&source, &mut errors);
        for (account_id, account_file) in parsed.accounts {
            if let Some((first_file, first_line)) = account_origin.get(account_id.get_ref()) {
                let first_path = files.get(*first_file).map_or_else(String::new, |path| path.display().to_string());
                diagnostics.at(
                    account_id.span(),
                    format!("duplicate account `{}` (first defined at {first_path}:{first_line})", account_id.get_ref()),
                );
                continue;
            }
            let line = diagnostics.line(account_id.span().start);
            account_origin.insert(account_id.get_ref().clone(), (file_idx, line));
            if let Some(account) = compile_account(&account_id, &account_file, &data, names, &mut interner, &mut diagnostics) {
                data.accounts.insert(account_id.into_inner(), account);
            }
        }
    }

    data.feature_sets = interner.feature_sets.items;
    data.limit_sets = interner.limit_sets.items;
    if errors.is_empty() {
        return Ok(data);
    }
    // Files in the order they were read, each file's errors in line order.
    let file_order: HashMap<PathBuf, usize> =
        std::iter::once(catalog.path.clone()).chain(files).enumerate().map(|(idx, path)| (path, idx)).collect();
    errors.sort_by_key(|error| (file_order.get(&error.file).copied().unwrap_or(usize::MAX), error.line));
    Err(PolicyErrors(errors))
}

fn check_id(id: &Spanned<String>, what: &str, diagnostics: &mut Diagnostics<'_>) {
    let valid = !id.get_ref().is_empty()
        && id.get_ref().len() <= 128
        && id.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if !valid {
        diagnostics.at(
            id.span(),
            format!("{what} id `{}` must be 1 to 128 characters of letters, digits, `-`, `_`, `.`, `:` or `@`", id.get_ref()),
        );
    }
}

fn compile_catalog(catalog: &CatalogFile, data: &mut SnapshotData, diagnostics: &mut Diagnostics<'_>) -> Names {
    for region in &catalog.regions {
        check_id(region, "region", diagnostics);
        if data.region_index.contains_key(region.get_ref()) {
            diagnostics.at(region.span(), format!("duplicate region `{}`", region.get_ref()));
            continue;
        }
        data.region_index.insert(region.get_ref().clone(), data.regions.len() as u32);
        data.regions.push(region.get_ref().clone());
    }

    for (name, meter) in &catalog.meters {
        check_id(name, "meter", diagnostics);
        let period = Period::parse(meter.period.get_ref()).unwrap_or_else(|| {
            diagnostics.at(
                meter.period.span(),
                format!("meter `{}` has unknown period `{}` (expected hour, day, month or never)", name.get_ref(), meter.period.get_ref()),
            );
            Period::Never
        });
        data.meter_index.insert(name.get_ref().clone(), data.meters.len() as u32);
        data.meters.push(Meter { name: name.get_ref().clone(), unit: meter.unit.clone(), period });
    }

    // Features are indexed first so that references to them can be resolved in any order.
    for (feature_idx, name) in catalog.features.keys().enumerate() {
        check_id(name, "feature", diagnostics);
        data.feature_index.insert(name.get_ref().clone(), feature_idx as u32);
    }
    let n_words = bits::words_for(data.feature_index.len());
    for (name, feature) in &catalog.features {
        let meter = feature.meter.as_ref().and_then(|meter| {
            let found = data.meter_index.get(meter.get_ref()).copied();
            if found.is_none() {
                diagnostics.at(meter.span(), format!("feature `{}` names unknown meter `{}`", name.get_ref(), meter.get_ref()));
            }
            found
        });
        let regions = feature
            .regions
            .as_ref()
            .map(|regions| resolve_regions(regions, &data.region_index, &format!("feature `{}`", name.get_ref()), diagnostics));
        let rollout = feature.rollout.as_ref().map(|percent| {
            let value = *percent.get_ref();
            if !(0..=100).contains(&value) {
                diagnostics
                    .at(percent.span(), format!("feature `{}` has rollout {value}, expected a percentage from 0 to 100", name.get_ref()));
            }
            Rollout { percent: value.clamp(0, 100) as u8, seed: model::fnv1a64(model::FNV_OFFSET, name.get_ref().as_bytes()) }
        });
        data.features.push(Feature { name: name.get_ref().clone(), description: feature.description.clone(), meter, regions, rollout });
    }

    let mut names = Names {
        features: data.feature_index.clone(),
        meters: data.meter_index.clone(),
        regions: data.region_index.clone(),
        plans: HashMap::new(),
        addons: HashMap::new(),
        roles: HashMap::new(),
        n_words,
    };

    for (kind, files, index) in [("plan", &catalog.plans, &mut names.plans), ("add-on", &catalog.addons, &mut names.addons)] {
        for file in files.iter() {
            check_id(&file.id, kind, diagnostics);
            if index.contains_key(file.id.get_ref()) {
                diagnostics.at(file.id.span(), format!("duplicate {kind} `{}`", file.id.get_ref()));
                continue;
            }
            let owner = format!("{kind} `{}`", file.id.get_ref());
            let price = file.price.as_ref().and_then(|price| {
                if *price.get_ref() < 0 {
                    diagnostics.at(price.span(), format!("{owner} has negative price {}", price.get_ref()));
                    return None;
                }
                Some(*price.get_ref() as u64)
            });
            let mut features = vec![0u64; n_words];
            for feature in &file.features {
                if let Some(feature_idx) = resolve(feature, &data.feature_index, "feature", &owner, diagnostics) {
                    bits::set(&mut features, feature_idx);
                }
            }
            let limits = resolve_limits(&file.limits, &data.meter_index, &owner, diagnostics);
            let regions = file.regions.as_ref().map(|regions| {
                if kind == "add-on" {
                    diagnostics
                        .at(file.id.span(), format!("{owner} cannot carry `regions`; geo-fences belong on features, plans and licenses"));
                }
                resolve_regions(regions, &data.region_index, &owner, diagnostics)
            });
            if kind == "plan" {
                // Plans are the upgrade path, cheapest first: an upgrade hint names the first
                // plan that allows a request, which is only the cheapest if the order holds.
                let dearer = data.plans.iter().rev().find_map(|plan: &Plan| plan.price.map(|previous| (plan, previous)));
                if let (Some(price), Some((previous_plan, previous))) = (price, dearer)
                    && price < previous
                {
                    diagnostics.at(
                        file.id.span(),
                        format!(
                            "{owner} (price {price}) is listed after plan `{}` (price {previous}); plans go cheapest first",
                            previous_plan.name
                        ),
                    );
                }
                index.insert(file.id.get_ref().clone(), data.plans.len() as u32);
                data.plans.push(Plan { name: file.id.get_ref().clone(), price, features, limits, regions });
            } else {
                index.insert(file.id.get_ref().clone(), data.addons.len() as u32);
                data.addons.push(Addon { name: file.id.get_ref().clone(), price, features, limits });
            }
        }
    }

    for (name, role) in &catalog.roles {
        check_id(name, "role", diagnostics);
        let owner = format!("role `{}`", name.get_ref());
        let mut features = vec![0u64; n_words];
        for feature in &role.features {
            if feature.get_ref() == "*" {
                for feature_idx in 0..data.features.len() {
                    bits::set(&mut features, feature_idx as u32);
                }
            } else if let Some(feature_idx) = resolve(feature, &data.feature_index, "feature", &owner, diagnostics) {
                bits::set(&mut features, feature_idx);
            }
        }
        names.roles.insert(name.get_ref().clone(), data.roles.len() as u32);
        data.roles.push(Role { name: name.get_ref().clone(), features });
    }

    compile_routes(&catalog.routes, data, diagnostics);
    names
}

/// The `[routes]` table: each key a path prefix starting with `/`, each value a feature.
fn compile_routes(routes: &BTreeMap<Spanned<String>, Spanned<String>>, data: &mut SnapshotData, diagnostics: &mut Diagnostics<'_>) {
    for (prefix, feature) in routes {
        let valid = prefix.get_ref().starts_with('/') && prefix.get_ref().len() <= 1024 && !prefix.get_ref().contains(['?', '#', ' ']);
        if !valid {
            diagnostics.at(
                prefix.span(),
                format!("route `{}` must be a path prefix starting with `/`, without `?`, `#` or spaces", prefix.get_ref()),
            );
            continue;
        }
        let owner = format!("route `{}`", prefix.get_ref());
        if let Some(feature_idx) = resolve(feature, &data.feature_index, "feature", &owner, diagnostics) {
            data.routes.push(model::RouteRule { prefix: prefix.get_ref().clone(), feature: feature_idx });
        }
    }
    // Longest prefix first; equal lengths in name order, so compiles are reproducible.
    data.routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.prefix.cmp(&b.prefix)));
}

fn resolve(
    name: &Spanned<String>,
    index: &HashMap<String, u32>,
    kind: &str,
    owner: &str,
    diagnostics: &mut Diagnostics<'_>,
) -> Option<u32> {
    let found = index.get(name.get_ref()).copied();
    if found.is_none() {
        diagnostics.at(name.span(), format!("{owner} names unknown {kind} `{}`", name.get_ref()));
    }
    found
}

fn resolve_regions(regions: &[Spanned<String>], index: &HashMap<String, u32>, owner: &str, diagnostics: &mut Diagnostics<'_>) -> Vec<u32> {
    let mut resolved: Vec<u32> = regions.iter().filter_map(|region| resolve(region, index, "region", owner, diagnostics)).collect();
    resolved.sort_unstable();
    resolved.dedup();
    resolved
}

/// A limit is either a number (a hard limit) or a table `{ soft = N, hard = M }`.
fn parse_limit(meter_idx: u32, value: &Spanned<toml::Value>, owner: &str, meter: &str, diagnostics: &mut Diagnostics<'_>) -> Option<Limit> {
    let mut check = |number: &toml::Value, which: &str| -> Option<u64> {
        match number {
            toml::Value::Integer(n) if *n >= 0 => Some(*n as u64),
            toml::Value::Integer(n) => {
                diagnostics.at(value.span(), format!("{owner} has negative {which}limit {n} for meter `{meter}`"));
                None
            }
            other => {
                diagnostics.at(
                    value.span(),
                    format!("{owner} has a {which}limit for meter `{meter}` that is a {}, expected a whole number", other.type_str()),
                );
                None
            }
        }
    };
    match value.get_ref() {
        toml::Value::Table(table) => {
            let mut limit = Limit { meter: meter_idx, soft: None, hard: None };
            for (key, number) in table {
                match key.as_str() {
                    "soft" => limit.soft = check(number, "soft ")?.into(),
                    "hard" => limit.hard = check(number, "hard ")?.into(),
                    other => {
                        diagnostics.at(
                            value.span(),
                            format!("{owner} has unknown key `{other}` in the limit for meter `{meter}` (expected `soft` or `hard`)"),
                        );
                        return None;
                    }
                }
            }
            if let (Some(soft), Some(hard)) = (limit.soft, limit.hard)
                && soft > hard
            {
                diagnostics.at(value.span(), format!("{owner} has soft limit {soft} above hard limit {hard} for meter `{meter}`"));
            }
            Some(limit)
        }
        number => Some(Limit { meter: meter_idx, soft: None, hard: Some(check(number, "")?) }),
    }
}

fn resolve_limits(
    limits: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    meter_index: &HashMap<String, u32>,
    owner: &str,
    diagnostics: &mut Diagnostics<'_>,
) -> Vec<Limit> {
    let mut resolved = Vec::new();
    for (meter, value) in limits {
        let Some(meter_idx) = resolve(meter, meter_index, "meter", owner, diagnostics) else { continue };
        if let Some(limit) = parse_limit(meter_idx, value, owner, meter.get_ref(), diagnostics) {
            resolved.push(limit);
        }
    }
    resolved.sort_by_key(|limit| limit.meter);
    resolved
}

fn datetime_to_unix(value: &Spanned<toml::value::Datetime>, owner: &str, field: &str, diagnostics: &mut Diagnostics<'_>) -> Option<i64> {
    let datetime = value.get_ref();
    let parsed = match (datetime.date, datetime.time, datetime.offset) {
        (Some(date), None, None) => tollgate_core::period::parse_rfc3339(&format!("{date}T00:00:00Z")),
        (Some(_), Some(_), Some(_)) => tollgate_core::period::parse_rfc3339(&datetime.to_string()),
        _ => {
            diagnostics.at(
                value.span(),
                format!(
                    "{owner} has `{field}` = {datetime}, expected a date (2026-01-31) or a date-time with offset (2026-01-31T12:00:00Z)"
                ),
            );
            return None;
        }
    };
    if parsed.is_none() {
        diagnostics.at(value.span(), format!("{owner} has bad date `{datetime}` in `{field}`"));
    }
    parsed
}

fn non_negative(value: &Option<Spanned<i64>>, owner: &str, field: &str, diagnostics: &mut Diagnostics<'_>) -> Option<u32> {
    let value = value.as_ref()?;
    match u32::try_from(*value.get_ref()) {
        Ok(n) => Some(n),
        Err(_) => {
            diagnostics
                .at(value.span(), format!("{owner} has `{field}` = {}, expected a whole number from 0 to {}", value.get_ref(), u32::MAX));
            None
        }
    }
}

fn compile_account(
    account_id: &Spanned<String>,
    file: &AccountFile,
    data: &SnapshotData,
    names: &Names,
    interner: &mut Interner,
    diagnostics: &mut Diagnostics<'_>,
) -> Option<Account> {
    let n_errors_before = diagnostics.errors.len();
    check_id(account_id, "account", diagnostics);
    let owner = format!("account `{}`", account_id.get_ref());
    let status = match file.status.as_ref().map(|status| status.get_ref().as_str()) {
        None | Some("active") => AccountStatus::Active,
        Some("suspended") => AccountStatus::Suspended,
        Some(other) => {
            if let Some(status) = &file.status {
                diagnostics.at(status.span(), format!("{owner} has unknown status `{other}` (expected active or suspended)"));
            }
            AccountStatus::Suspended
        }
    };

    let mut licenses = Vec::new();
    let mut license_failed = false;
    let mut license_ids = HashSet::new();
    for (license_number, license_file) in file.licenses.iter().enumerate() {
        let span = license_file.span();
        let license_file = license_file.get_ref();
        let id =
            license_file.id.as_ref().map_or_else(|| format!("{}-{}", account_id.get_ref(), license_number + 1), |id| id.get_ref().clone());
        let license_owner = format!("license `{id}` of {owner}");
        if !license_ids.insert(id.clone()) {
            diagnostics.at(span.clone(), format!("{owner} has duplicate license id `{id}`"));
        }
        if let Some(id) = &license_file.id {
            check_id(id, "license", diagnostics);
        }
        // An unknown plan still lets the rest of the license be checked, so every mistake in
        // it is reported; the license itself is then left out.
        let plan = resolve(&license_file.plan, &names.plans, "plan", &license_owner, diagnostics)
            .and_then(|plan_idx| data.plans.get(plan_idx as usize).map(|plan| (plan_idx, plan)));
        let mut features = plan.map_or_else(|| vec![0u64; names.n_words], |(_, plan)| plan.features.clone());
        let mut limits: BTreeMap<u32, Limit> =
            plan.map_or_else(BTreeMap::new, |(_, plan)| plan.limits.iter().map(|limit| (limit.meter, *limit)).collect());
        let mut addons = Vec::new();
        for addon_name in &license_file.addons {
            let Some(addon_idx) = resolve(addon_name, &names.addons, "add-on", &license_owner, diagnostics) else { continue };
            let Some(addon) = data.addons.get(addon_idx as usize) else { continue };
            if addons.contains(&addon_idx) {
                diagnostics.at(addon_name.span(), format!("{license_owner} lists add-on `{}` more than once", addon_name.get_ref()));
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
        let overrides = &license_file.overrides;
        for feature in &overrides.add_features {
            if let Some(feature_idx) = resolve(feature, &names.features, "feature", &license_owner, diagnostics) {
                bits::set(&mut features, feature_idx);
            }
        }
        let mut removed = Vec::new();
        if !overrides.remove_features.is_empty() {
            removed = vec![0u64; names.n_words];
        }
        for feature in &overrides.remove_features {
            if let Some(feature_idx) = resolve(feature, &names.features, "feature", &license_owner, diagnostics) {
                bits::clear(&mut features, feature_idx);
                bits::set(&mut removed, feature_idx);
            }
        }
        let override_limits = resolve_limits(&overrides.limits, &names.meters, &license_owner, diagnostics);
        let mut overridden_meters: Vec<u32> = override_limits.iter().map(|limit| limit.meter).collect();
        overridden_meters.sort_unstable();
        for limit in override_limits {
            limits.insert(limit.meter, limit);
        }
        let starts_at = license_file.starts_at.as_ref().and_then(|value| datetime_to_unix(value, &license_owner, "starts_at", diagnostics));
        let expires_at =
            license_file.expires_at.as_ref().and_then(|value| datetime_to_unix(value, &license_owner, "expires_at", diagnostics));
        if let (Some(starts), Some(expires), Some(value)) = (starts_at, expires_at, &license_file.expires_at)
            && expires <= starts
        {
            diagnostics.at(value.span(), format!("{license_owner} expires before it starts"));
        }
        let grace_days = non_negative(&license_file.grace_days, &license_owner, "grace_days", diagnostics).unwrap_or(0);
        let seats = non_negative(&license_file.seats, &license_owner, "seats", diagnostics).unwrap_or(1);
        let max_devices = non_negative(&license_file.max_devices, &license_owner, "max_devices", diagnostics);
        let regions = license_file.regions.as_ref().map(|regions| resolve_regions(regions, &names.regions, &license_owner, diagnostics));
        let Some((plan_idx, _)) = plan else {
            license_failed = true;
            continue;
        };
        licenses.push(License {
            id,
            plan: plan_idx,
            addons,
            seats,
            trial: license_file.trial,
            starts_at: starts_at.unwrap_or(model::SINCE_FOREVER),
            expires_at: expires_at.unwrap_or(model::NEVER_EXPIRES),
            grace_seconds: i64::from(grace_days) * 86_400,
            features: interner.features(features),
            limits: interner.limits(limits.into_values().collect()),
            removed: interner.features(removed),
            overridden_meters,
            regions,
            max_devices,
        });
    }

    let mut groups: HashMap<&str, Vec<u32>> = HashMap::new();
    for (group, roles) in &file.groups {
        check_id(group, "group", diagnostics);
        let group_owner = format!("group `{}` of {owner}", group.get_ref());
        let resolved = roles.iter().filter_map(|role| resolve(role, &names.roles, "role", &group_owner, diagnostics)).collect();
        groups.insert(group.get_ref(), resolved);
    }

    let mut users = Vec::new();
    let mut n_seated = 0u32;
    let mut seat_span = account_id.span();
    for (user_id, user_file) in &file.users {
        check_id(user_id, "user", diagnostics);
        let user_owner = format!("user `{}` of {owner}", user_id.get_ref());
        let mut roles: Vec<u32> =
            user_file.roles.iter().filter_map(|role| resolve(role, &names.roles, "role", &user_owner, diagnostics)).collect();
        for group in &user_file.groups {
            match groups.get(group.get_ref().as_str()) {
                Some(group_roles) => roles.extend(group_roles),
                None => diagnostics.at(group.span(), format!("{user_owner} names unknown group `{}`", group.get_ref())),
            }
        }
        roles.sort_unstable();
        roles.dedup();
        let seat = user_file.seat.unwrap_or(true);
        if seat {
            n_seated += 1;
            seat_span = user_id.span();
        }
        users.push(User { id: user_id.get_ref().clone(), seat, roles });
    }
    users.sort_by(|a, b| a.id.cmp(&b.id));
    // Seat and device counts are only meaningful once every license compiled.
    let max_seats = licenses.iter().map(|license| license.seats).max().unwrap_or(0);
    if !license_failed && n_seated > max_seats {
        diagnostics.at(seat_span, format!("{owner} assigns {n_seated} seats but its licenses allow at most {max_seats}"));
    }

    let mut devices: Vec<String> = Vec::new();
    for device in &file.devices {
        check_id(device, "device", diagnostics);
        devices.push(device.get_ref().clone());
    }
    devices.sort();
    let n_devices = devices.len();
    devices.dedup();
    if devices.len() != n_devices {
        diagnostics.at(account_id.span(), format!("{owner} lists a device more than once"));
    }
    let device_limit = if licenses.iter().any(|license| license.max_devices.is_none()) {
        None
    } else {
        licenses.iter().filter_map(|license| license.max_devices).max()
    };
    if let (Some(limit), Some(first), false) = (device_limit, file.devices.first(), license_failed)
        && devices.len() > limit as usize
    {
        diagnostics.at(first.span(), format!("{owner} activates {} devices but its licenses allow at most {limit}", devices.len()));
    }

    if diagnostics.errors.len() > n_errors_before {
        return None;
    }
    Some(Account { status, licenses, users, devices })
}
