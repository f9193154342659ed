//! The policy files: the TOML formats of `catalog.toml` and `accounts/*.toml` (documented in
//! `policies/README.md`), reading a policies directory, and compiling it into a
//! [`SnapshotData`]. Every mistake is reported with file, line and what is wrong, all at once.
//! Accounts need not come from files: [`compile_accounts`] takes typed [`AccountSpec`]s (the
//! control plane's path), and account files are parsed into the same specs, so both go
//! through one validation and lowering (`spec`). Reads files only in [`compile_dir`];
//! everything else is pure. `generate` writes synthetic policies of any size for benches and
//! load tests.

pub mod generate;
pub mod integrations;
pub mod spec;

pub use integrations::{DealStage, Integrations, PriceTarget};
pub use spec::{AccountSpec, FenceSpec, LicenseSpec, LimitSpec, OverridesSpec, SpecError, SpecErrors, UserSpec};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use tollgate_core::model::{self, AccountStatus, Addon, Feature, Limit, Meter, Period, Plan, Role, Rollout, SnapshotData, bits};

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
    /// Named groups of regions, usable wherever a fence names regions.
    #[serde(default)]
    region_groups: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
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
    /// HubSpot deal stages and the orders they become.
    #[serde(default)]
    hubspot: integrations::HubSpotFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureFile {
    #[serde(default)]
    description: String,
    meter: Option<Spanned<String>>,
    regions: Option<Spanned<toml::Value>>,
    rollout: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterFile {
    #[serde(default)]
    unit: String,
    period: Spanned<String>,
    /// Usage alert thresholds in percent of the limit.
    #[serde(default)]
    thresholds: Vec<Spanned<i64>>,
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
    regions: Option<Spanned<toml::Value>>,
    /// Where to buy it: a URL template with `{account}` and `{plan}`.
    checkout_url: Option<Spanned<String>>,
    /// The Stripe price ids that buy it.
    #[serde(default)]
    stripe_prices: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    features: Vec<Spanned<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    #[serde(default)]
    /// Boxed: a file holds thousands of accounts, and a map node moves its values around.
    accounts: BTreeMap<Spanned<String>, Box<AccountFile>>,
}

#[derive(Deserialize, Debug)]
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

#[derive(Deserialize, Debug)]
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
    regions: Option<Spanned<toml::Value>>,
    max_devices: Option<Spanned<i64>>,
    #[serde(default)]
    overrides: OverridesFile,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct OverridesFile {
    #[serde(default)]
    add_features: Vec<Spanned<String>>,
    #[serde(default)]
    remove_features: Vec<Spanned<String>>,
    #[serde(default)]
    limits: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

#[derive(Deserialize, Debug)]
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
    parse_toml_file(source).map_err(|error| errors.push(error)).ok()
}

fn parse_toml_file<T: serde::de::DeserializeOwned>(source: &Source) -> Result<T, PolicyError> {
    toml::from_str::<T>(&source.text).map_err(|error| {
        let line = error.span().map(|span| line_of(&source.text, span.start));
        let message = error.message().trim_end().to_string();
        PolicyError { file: source.path.clone(), line, message }
    })
}

/// Name-to-index tables of the catalog, used while compiling accounts.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) features: HashMap<String, u32>,
    pub(crate) meters: HashMap<String, u32>,
    /// Lowercased region name to region index.
    pub(crate) regions: HashMap<String, u32>,
    /// Lowercased group name to the bitset of its regions.
    pub(crate) region_groups: HashMap<String, Vec<u64>>,
    pub(crate) n_regions: usize,
    pub(crate) plans: HashMap<String, u32>,
    pub(crate) addons: HashMap<String, u32>,
    pub(crate) roles: HashMap<String, u32>,
    pub(crate) n_words: usize,
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
pub(crate) struct Interner {
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

    pub(crate) fn features(&mut self, mut set: Vec<u64>) -> u32 {
        // Trailing zero words change nothing; dropping them lets equal sets meet.
        while set.last() == Some(&0) {
            set.pop();
        }
        self.feature_sets.intern(set)
    }

    pub(crate) fn limits(&mut self, set: Vec<Limit>) -> u32 {
        self.limit_sets.intern(set)
    }
}

/// A compiled catalog (features, meters, plans, add-ons, roles, regions, routes) with the name
/// tables accounts are resolved against. Compile it once and lower many accounts against it.
#[derive(Debug, Clone)]
pub struct Catalog {
    data: SnapshotData,
    names: Names,
    integrations: Integrations,
}

impl Catalog {
    /// The catalog as snapshot data without accounts.
    pub fn data(&self) -> &SnapshotData {
        &self.data
    }

    /// What only the control plane reads: Stripe prices, HubSpot stages, alert thresholds.
    pub fn integrations(&self) -> &Integrations {
        &self.integrations
    }
}

fn empty_data() -> SnapshotData {
    SnapshotData {
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
    }
}

/// Compiles a catalog file alone, or reports every mistake in it with its line.
pub fn compile_catalog(source: &Source) -> Result<Catalog, PolicyErrors> {
    let mut errors = Vec::new();
    let parsed = parse_toml::<CatalogFile>(source, &mut errors);
    let mut data = empty_data();
    let mut integrations = Integrations::default();
    let names = parsed
        .as_ref()
        .map(|parsed| compile_catalog_file(parsed, &mut data, &mut integrations, &mut Diagnostics::new(source, &mut errors)));
    match names {
        Some(names) if errors.is_empty() => Ok(Catalog { data, names, integrations }),
        _ => Err(PolicyErrors(errors)),
    }
}

/// Compiles typed account specs against a compiled catalog: the path of accounts that are not
/// files (the control plane's database). Every mistake is reported with account and field.
pub fn compile_accounts(catalog: &Catalog, accounts: impl IntoIterator<Item = (String, AccountSpec)>) -> Result<SnapshotData, SpecErrors> {
    let mut data = catalog.data.clone();
    let mut interner = Interner::new();
    let mut errors = Vec::new();
    for (account_id, account_spec) in accounts {
        if data.accounts.contains_key(&account_id) {
            errors.push(SpecError {
                account: account_id.clone(),
                field: String::new(),
                message: format!("duplicate account `{account_id}`"),
            });
            continue;
        }
        if let Some(account) = spec::lower_account(&account_id, &account_spec, &data, &catalog.names, &mut interner, &mut errors) {
            data.accounts.insert(account_id, account);
        }
    }
    data.feature_sets = interner.feature_sets.items;
    data.limit_sets = interner.limit_sets.items;
    if errors.is_empty() { Ok(data) } else { Err(SpecErrors(errors)) }
}

/// Compiles a catalog and a stream of account files (each parsed, compiled and dropped in
/// turn), or reports every mistake found.
pub fn compile_sources(
    catalog: &Source,
    accounts: impl Iterator<Item = Result<Source, PolicyError>> + Send,
) -> Result<SnapshotData, PolicyErrors> {
    let mut compiled_accounts = HashMap::new();
    let catalog = read_accounts(catalog, accounts, |account_id, _, account| {
        compiled_accounts.insert(account_id, account);
        Ok(())
    })?;
    let mut data = catalog.data;
    data.accounts = compiled_accounts;
    Ok(data)
}

/// Why an account handed to a [`read_sources`] visitor was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The account cannot be taken as it is: reported at the line of `field` (a `SpecError`
    /// field path such as `licenses[0].regions`) like any other mistake in the file.
    Field { field: String, message: String },
    /// Stop reading at once: the visitor failed for a reason of its own, which it keeps.
    Stop,
}

/// Reads a policies directory like [`compile_dir`], validating every account exactly as a
/// compile does, and hands each valid account to `visit` as a spec, in file order, instead
/// of building snapshot data. Returns the compiled catalog when every account was valid and
/// taken; otherwise every mistake found (empty after [`Refusal::Stop`]). Memory holds one
/// file and the account ids seen, never every account.
pub fn read_dir(dir: &Path, visit: impl FnMut(String, AccountSpec) -> Result<(), Refusal>) -> Result<Catalog, PolicyErrors> {
    let catalog = read_source(&dir.join(CATALOG_FILE)).map_err(|error| PolicyErrors(vec![error]))?;
    let paths = account_paths(dir).map_err(|error| PolicyErrors(vec![error]))?;
    read_sources(&catalog, paths.iter().map(|path| read_source(path)), visit)
}

/// [`read_dir`] over sources already read.
pub fn read_sources(
    catalog: &Source,
    accounts: impl Iterator<Item = Result<Source, PolicyError>> + Send,
    mut visit: impl FnMut(String, AccountSpec) -> Result<(), Refusal>,
) -> Result<Catalog, PolicyErrors> {
    read_accounts(catalog, accounts, |account_id, account_spec, _| visit(account_id, account_spec))
}

/// The one reading of a catalog and account files: every account is parsed, validated and
/// lowered, then handed to `take` with its spec; the catalog comes back with the shared
/// feature and limit sets of every account taken.
fn read_accounts(
    catalog: &Source,
    accounts: impl Iterator<Item = Result<Source, PolicyError>> + Send,
    mut take: impl FnMut(String, AccountSpec, model::Account) -> Result<(), Refusal>,
) -> Result<Catalog, PolicyErrors> {
    let mut errors = Vec::new();
    let parsed_catalog = parse_toml::<CatalogFile>(catalog, &mut errors);
    let mut data = empty_data();
    let mut integrations = Integrations::default();
    let names = parsed_catalog
        .as_ref()
        .map(|parsed| compile_catalog_file(parsed, &mut data, &mut integrations, &mut Diagnostics::new(catalog, &mut errors)));
    let mut interner = Interner::new();

    // Where each account was first defined: the file and the line of its id.
    let mut account_origin: HashMap<String, (usize, usize)> = HashMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stopped = false;
    // Reading and parsing files (half the time of a large compile) runs on a second thread, a
    // file or two ahead of the lowering here, which keeps the interning order (and so the
    // output) what it is on one thread.
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Result<(Source, Result<AccountsFile, PolicyError>), PolicyError>>(2);
        scope.spawn(move || {
            for source in accounts {
                let parsed = source.map(|source| {
                    let parsed = parse_toml_file::<AccountsFile>(&source);
                    (source, parsed)
                });
                if sender.send(parsed).is_err() {
                    // The reader stopped early.
                    break;
                }
            }
        });
        'files: for parsed in receiver {
            let (source, parsed) = match parsed {
                Ok(parsed) => parsed,
                Err(error) => {
                    errors.push(error);
                    continue;
                }
            };
            // Without a catalog the accounts are still parsed, to report their syntax errors.
            let parsed = match parsed {
                Ok(parsed) => parsed,
                Err(error) => {
                    errors.push(error);
                    continue;
                }
            };
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
                let n_errors_before = diagnostics.errors.len();
                let account_spec = account_spec_of_file(&account_id, &account_file, &mut diagnostics);
                let mut spec_errors = Vec::new();
                let account = spec::lower_account(account_id.get_ref(), &account_spec, &data, names, &mut interner, &mut spec_errors);
                if !spec_errors.is_empty() {
                    // Spans are only gathered for an account with mistakes: most have none.
                    let spans = spans_of_file(&account_file);
                    for error in spec_errors {
                        diagnostics.at(spans.find(&error.field, account_id.span()), error.message);
                    }
                }
                let Some(account) = account else { continue };
                if diagnostics.errors.len() != n_errors_before {
                    continue;
                }
                let id_span = account_id.span();
                match take(account_id.into_inner(), account_spec, account) {
                    Ok(()) => {}
                    Err(Refusal::Field { field, message }) => {
                        let span = spans_of_file(&account_file).find(&field, id_span);
                        diagnostics.at(span, message);
                    }
                    Err(Refusal::Stop) => {
                        stopped = true;
                        break 'files;
                    }
                }
            }
        }
    });
    if stopped {
        return Err(PolicyErrors(errors));
    }

    data.feature_sets = interner.feature_sets.items;
    data.limit_sets = interner.limit_sets.items;
    if errors.is_empty()
        && let Some(names) = names
    {
        return Ok(Catalog { data, names, integrations });
    }
    // Files in the order they were read, each file's errors in line order.
    let file_order: HashMap<PathBuf, usize> =
        std::iter::once(catalog.path.clone()).chain(files).enumerate().map(|(idx, path)| (path, idx)).collect();
    errors.sort_by_key(|error| (file_order.get(&error.file).copied().unwrap_or(usize::MAX), error.line));
    Err(PolicyErrors(errors))
}

/// Where each field of an account file is, by the field paths `SpecError`s use.
struct Spans(HashMap<String, std::ops::Range<usize>>);

impl Spans {
    /// The span of `field`, else of the nearest enclosing field, else `account`.
    fn find(&self, field: &str, account: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let mut field = field;
        loop {
            if let Some(span) = self.0.get(field) {
                return span.clone();
            }
            match field.rfind(['.', '[']) {
                Some(cut) => field = field.get(..cut).unwrap_or(""),
                None => return account,
            }
        }
    }
}

/// Where each field of an `[accounts.ID]` table is, by the paths `SpecError`s use. Worked out
/// only for an account that has a mistake to report.
fn spans_of_file(file: &AccountFile) -> Spans {
    let mut spans = HashMap::new();
    for (license_number, license_file) in file.licenses.iter().enumerate() {
        let field = |name: &str| format!("licenses[{license_number}]{name}");
        spans.insert(field(""), license_file.span());
        let license_file = license_file.get_ref();
        if let Some(id) = &license_file.id {
            spans.insert(field(".id"), id.span());
        }
        spans.insert(field(".plan"), license_file.plan.span());
        for (number, addon) in license_file.addons.iter().enumerate() {
            spans.insert(field(&format!(".addons[{number}]")), addon.span());
        }
        let overrides = &license_file.overrides;
        for (number, feature) in overrides.add_features.iter().enumerate() {
            spans.insert(field(&format!(".overrides.add_features[{number}]")), feature.span());
        }
        for (number, feature) in overrides.remove_features.iter().enumerate() {
            spans.insert(field(&format!(".overrides.remove_features[{number}]")), feature.span());
        }
        for meter in overrides.limits.keys() {
            spans.insert(field(&format!(".overrides.limits.{}", meter.get_ref())), meter.span());
        }
        if let Some(expires_at) = &license_file.expires_at {
            spans.insert(field(".expires_at"), expires_at.span());
        }
        if let Some(regions) = &license_file.regions {
            spans.insert(field(".regions"), regions.span());
        }
    }
    for (group, roles) in &file.groups {
        spans.insert(format!("groups.{}", group.get_ref()), group.span());
        for (number, role) in roles.iter().enumerate() {
            spans.insert(format!("groups.{}[{number}]", group.get_ref()), role.span());
        }
    }
    for (user_id, user_file) in &file.users {
        let field = format!("users.{}", user_id.get_ref());
        for (number, role) in user_file.roles.iter().enumerate() {
            spans.insert(format!("{field}.roles[{number}]"), role.span());
        }
        for (number, group) in user_file.groups.iter().enumerate() {
            spans.insert(format!("{field}.groups[{number}]"), group.span());
        }
        spans.insert(field, user_id.span());
    }
    for (number, device) in file.devices.iter().enumerate() {
        spans.insert(format!("devices[{number}]"), device.span());
    }
    Spans(spans)
}

/// An `[accounts.ID]` table as an [`AccountSpec`]. The mistakes only a file can make (wrong
/// types, numbers out of range, dates without a time zone) are reported here; everything else
/// is left to the shared lowering.
fn account_spec_of_file(account_id: &Spanned<String>, file: &AccountFile, diagnostics: &mut Diagnostics<'_>) -> AccountSpec {
    let owner = || format!("account `{}`", account_id.get_ref());
    let status = match file.status.as_ref().map(|status| status.get_ref().as_str()) {
        None | Some("active") => AccountStatus::Active,
        Some("suspended") => AccountStatus::Suspended,
        Some(other) => {
            if let Some(status) = &file.status {
                diagnostics.at(status.span(), format!("{} has unknown status `{other}` (expected active or suspended)", owner()));
            }
            AccountStatus::Suspended
        }
    };
    let mut licenses = Vec::with_capacity(file.licenses.len());
    for (license_number, license_file) in file.licenses.iter().enumerate() {
        let license_file = license_file.get_ref();
        // Named only in messages, so only built for one.
        let license_owner = || {
            let id = license_file
                .id
                .as_ref()
                .map_or_else(|| format!("{}-{}", account_id.get_ref(), license_number + 1), |id| id.get_ref().clone());
            format!("license `{id}` of {}", owner())
        };
        let overrides = &license_file.overrides;
        let mut override_limits = BTreeMap::new();
        for (meter, value) in &overrides.limits {
            if let Some(limit) = parse_limit(0, value, &license_owner, meter.get_ref(), false, diagnostics) {
                override_limits.insert(meter.get_ref().clone(), LimitSpec { soft: limit.soft, hard: limit.hard });
            }
        }
        let regions = license_file.regions.as_ref().and_then(|value| parse_fence(value, &license_owner, diagnostics));
        licenses.push(LicenseSpec {
            id: license_file.id.as_ref().map(|id| id.get_ref().clone()),
            plan: license_file.plan.get_ref().clone(),
            addons: license_file.addons.iter().map(|addon| addon.get_ref().clone()).collect(),
            seats: non_negative(&license_file.seats, &license_owner, "seats", diagnostics).unwrap_or(1),
            trial: license_file.trial,
            starts_at: license_file.starts_at.as_ref().and_then(|value| datetime_to_unix(value, &license_owner, "starts_at", diagnostics)),
            expires_at: license_file
                .expires_at
                .as_ref()
                .and_then(|value| datetime_to_unix(value, &license_owner, "expires_at", diagnostics)),
            grace_days: non_negative(&license_file.grace_days, &license_owner, "grace_days", diagnostics).unwrap_or(0),
            regions,
            max_devices: non_negative(&license_file.max_devices, &license_owner, "max_devices", diagnostics),
            overrides: OverridesSpec {
                add_features: overrides.add_features.iter().map(|feature| feature.get_ref().clone()).collect(),
                remove_features: overrides.remove_features.iter().map(|feature| feature.get_ref().clone()).collect(),
                limits: override_limits,
            },
        });
    }
    let groups = file
        .groups
        .iter()
        .map(|(group, roles)| (group.get_ref().clone(), roles.iter().map(|role| role.get_ref().clone()).collect()))
        .collect();
    let users = file
        .users
        .iter()
        .map(|(user_id, user_file)| {
            (
                user_id.get_ref().clone(),
                UserSpec {
                    roles: user_file.roles.iter().map(|role| role.get_ref().clone()).collect(),
                    groups: user_file.groups.iter().map(|group| group.get_ref().clone()).collect(),
                    seat: user_file.seat.unwrap_or(true),
                },
            )
        })
        .collect();
    let devices = file.devices.iter().map(|device| device.get_ref().clone()).collect();
    AccountSpec { status, licenses, users, groups, devices }
}

/// A fence is a list of region and group names (an allow-list), or a table with exactly one of
/// `allow` or `deny` holding such a list.
fn parse_fence(value: &Spanned<toml::Value>, owner: &dyn Fn() -> String, diagnostics: &mut Diagnostics<'_>) -> Option<FenceSpec> {
    let names =
        |items: &toml::value::Array| -> Option<Vec<String>> { items.iter().map(|item| item.as_str().map(str::to_string)).collect() };
    let parsed = match value.get_ref() {
        toml::Value::Array(items) => names(items).map(FenceSpec::Allow),
        toml::Value::Table(table) if table.len() == 1 => match table.iter().next() {
            Some((key, toml::Value::Array(items))) if key == "allow" => names(items).map(FenceSpec::Allow),
            Some((key, toml::Value::Array(items))) if key == "deny" => names(items).map(FenceSpec::Deny),
            _ => None,
        },
        _ => None,
    };
    if parsed.is_none() {
        let owner = owner();
        diagnostics.at(
            value.span(),
            format!("{owner} has `regions` that is not a list of region names, `{{ allow = [...] }}` or `{{ deny = [...] }}`"),
        );
    }
    parsed
}

fn check_id(id: &Spanned<String>, what: &str, diagnostics: &mut Diagnostics<'_>) {
    if !spec::valid_id(id.get_ref()) {
        diagnostics.at(id.span(), spec::id_message(what, id.get_ref()));
    }
}

/// A fence of the catalog (on a feature or a plan) as a region bitset.
fn catalog_fence(value: &Spanned<toml::Value>, names: &Names, owner: &str, diagnostics: &mut Diagnostics<'_>) -> Option<Vec<u64>> {
    let fence = parse_fence(value, &|| owner.to_string(), diagnostics)?;
    match spec::resolve_fence(&fence, names) {
        Ok(set) => Some(set),
        Err(unknown) => {
            for name in unknown {
                diagnostics.at(value.span(), format!("{owner} names unknown region `{name}`"));
            }
            None
        }
    }
}

fn compile_catalog_file(
    catalog: &CatalogFile,
    data: &mut SnapshotData,
    integrations: &mut Integrations,
    diagnostics: &mut Diagnostics<'_>,
) -> Names {
    // Regions compare case-insensitively: the index is keyed by the lowercased name.
    for region in &catalog.regions {
        check_id(region, "region", diagnostics);
        let key = region.get_ref().to_ascii_lowercase();
        if data.region_index.contains_key(&key) {
            diagnostics.at(region.span(), format!("duplicate region `{}`", region.get_ref()));
            continue;
        }
        data.region_index.insert(key, data.regions.len() as u32);
        data.regions.push(region.get_ref().clone());
    }
    let mut region_groups: HashMap<String, Vec<u64>> = HashMap::new();
    for (group, members) in &catalog.region_groups {
        check_id(group, "region group", diagnostics);
        let key = group.get_ref().to_ascii_lowercase();
        if data.region_index.contains_key(&key) || region_groups.contains_key(&key) {
            diagnostics.at(group.span(), format!("region group `{}` reuses the name of a region or another group", group.get_ref()));
            continue;
        }
        let mut set = vec![0u64; bits::words_for(data.regions.len())];
        for member in members {
            match data.region_index.get(&member.get_ref().to_ascii_lowercase()) {
                Some(region_idx) => bits::set(&mut set, *region_idx),
                None => {
                    diagnostics.at(member.span(), format!("region group `{}` names unknown region `{}`", group.get_ref(), member.get_ref()))
                }
            }
        }
        region_groups.insert(key, set);
    }
    let mut names = Names {
        features: HashMap::new(),
        meters: HashMap::new(),
        regions: data.region_index.clone(),
        region_groups,
        n_regions: data.regions.len(),
        plans: HashMap::new(),
        addons: HashMap::new(),
        roles: HashMap::new(),
        n_words: 0,
    };

    for (name, meter) in &catalog.meters {
        check_id(name, "meter", diagnostics);
        let period = Period::parse(meter.period.get_ref()).unwrap_or_else(|| {
            diagnostics.at(
                meter.period.span(),
                format!("meter `{}` has unknown period `{}` (expected hour, day, month or never)", name.get_ref(), meter.period.get_ref()),
            );
            Period::Never
        });
        if let Some(thresholds) = integrations::check_thresholds(&meter.thresholds, &format!("meter `{}`", name.get_ref()), diagnostics) {
            integrations.meter_thresholds.insert(name.get_ref().clone(), thresholds);
        }
        data.meter_index.insert(name.get_ref().clone(), data.meters.len() as u32);
        data.meters.push(Meter { name: name.get_ref().clone(), unit: meter.unit.clone(), period, features: Vec::new() });
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
        if let (Some(meter_idx), Some(feature_idx)) = (meter, data.feature_index.get(name.get_ref()))
            && let Some(consumed) = data.meters.get_mut(meter_idx as usize)
        {
            consumed.features.resize(n_words, 0);
            bits::set(&mut consumed.features, *feature_idx);
        }
        let regions = feature
            .regions
            .as_ref()
            .and_then(|regions| catalog_fence(regions, &names, &format!("feature `{}`", name.get_ref()), diagnostics));
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

    names.features = data.feature_index.clone();
    names.meters = data.meter_index.clone();
    names.n_words = n_words;

    let mut plan_index = HashMap::new();
    let mut addon_index = HashMap::new();
    for (kind, files, index) in [("plan", &catalog.plans, &mut plan_index), ("add-on", &catalog.addons, &mut addon_index)] {
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
            let regions = file.regions.as_ref().and_then(|regions| {
                if kind == "add-on" {
                    diagnostics
                        .at(file.id.span(), format!("{owner} cannot carry `regions`; geo-fences belong on features, plans and licenses"));
                }
                catalog_fence(regions, &names, &owner, diagnostics)
            });
            let checkout_url = file.checkout_url.as_ref().and_then(|url| integrations::check_checkout_url(url, &owner, diagnostics));
            let target = if kind == "plan" {
                integrations::PriceTarget::Plan(file.id.get_ref().clone())
            } else {
                integrations::PriceTarget::Addon(file.id.get_ref().clone())
            };
            integrations::add_stripe_prices(&file.stripe_prices, &target, &owner, integrations, diagnostics);
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
                data.plans.push(Plan { name: file.id.get_ref().clone(), price, features, limits, regions, checkout_url });
            } else {
                index.insert(file.id.get_ref().clone(), data.addons.len() as u32);
                data.addons.push(Addon { name: file.id.get_ref().clone(), price, features, limits, checkout_url });
            }
        }
    }

    integrations.hubspot_deal_stages = integrations::compile_hubspot(&catalog.hubspot, &plan_index, &addon_index, diagnostics);
    names.plans = plan_index;
    names.addons = addon_index;
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

/// A limit is either a number (a hard limit) or a table `{ soft = N, hard = M }`.
/// With `check_order`, a soft limit above the hard one is reported here (catalog limits);
/// account overrides leave that to the shared lowering.
fn parse_limit(
    meter_idx: u32,
    value: &Spanned<toml::Value>,
    owner: &dyn Fn() -> String,
    meter: &str,
    check_order: bool,
    diagnostics: &mut Diagnostics<'_>,
) -> Option<Limit> {
    let mut check = |number: &toml::Value, which: &str| -> Option<u64> {
        match number {
            toml::Value::Integer(n) if *n >= 0 => Some(*n as u64),
            toml::Value::Integer(n) => {
                let owner = owner();
                diagnostics.at(value.span(), format!("{owner} has negative {which}limit {n} for meter `{meter}`"));
                None
            }
            other => {
                let owner = owner();
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
                        let owner = owner();
                        diagnostics.at(
                            value.span(),
                            format!("{owner} has unknown key `{other}` in the limit for meter `{meter}` (expected `soft` or `hard`)"),
                        );
                        return None;
                    }
                }
            }
            if let (Some(soft), Some(hard), true) = (limit.soft, limit.hard, check_order)
                && soft > hard
            {
                let owner = owner();
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
        if let Some(limit) = parse_limit(meter_idx, value, &|| owner.to_string(), meter.get_ref(), true, diagnostics) {
            resolved.push(limit);
        }
    }
    resolved.sort_by_key(|limit| limit.meter);
    resolved
}

fn datetime_to_unix(
    value: &Spanned<toml::value::Datetime>,
    owner: &dyn Fn() -> String,
    field: &str,
    diagnostics: &mut Diagnostics<'_>,
) -> Option<i64> {
    let datetime = value.get_ref();
    let parsed = match (datetime.date, datetime.time, datetime.offset) {
        (Some(date), None, None) => tollgate_core::period::parse_rfc3339(&format!("{date}T00:00:00Z")),
        (Some(_), Some(_), Some(_)) => tollgate_core::period::parse_rfc3339(&datetime.to_string()),
        _ => {
            let owner = owner();
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
        let owner = owner();
        diagnostics.at(value.span(), format!("{owner} has bad date `{datetime}` in `{field}`"));
    }
    parsed
}

fn non_negative(value: &Option<Spanned<i64>>, owner: &dyn Fn() -> String, field: &str, diagnostics: &mut Diagnostics<'_>) -> Option<u32> {
    let value = value.as_ref()?;
    match u32::try_from(*value.get_ref()) {
        Ok(n) => Some(n),
        Err(_) => {
            let owner = owner();
            diagnostics
                .at(value.span(), format!("{owner} has `{field}` = {}, expected a whole number from 0 to {}", value.get_ref(), u32::MAX));
            None
        }
    }
}
