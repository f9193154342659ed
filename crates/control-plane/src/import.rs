//! Bulk import: the accounts of a policies directory (`catalog.toml` + `accounts/*.toml`, as
//! `tollgate compile` reads them) into the repository, in one write transaction. Every account
//! goes through the policy compiler's own validation, so a mistake is reported with file and
//! line exactly as `compile` reports it, and then nothing is written. An account already
//! stored identically is left alone, so a second import of the same directory changes nothing
//! and moves no revision. Reads the policies directory; writes only through the repository's
//! transaction, never through the HTTP API or a running control plane.

use std::collections::BTreeMap;
use std::path::Path;

use tollgate_core::model::AccountStatus;
use tollgate_policy::{AccountSpec, FenceSpec, LicenseSpec, PolicyErrors, Refusal};

use super::store::{
    self, AccountDoc, AccountState, Imported, LicenseDoc, LimitDoc, NewAudit, OverridesDoc, Repository, StoreError, UserDoc,
};

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Accounts in the policies directory.
    pub n_accounts: u64,
    pub n_created: u64,
    pub n_updated: u64,
    /// Accounts stored identically already; left alone.
    pub n_unchanged: u64,
    /// The repository's revision after the import: moved by one when anything changed.
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read catalog `{path}`: {source}")]
    Catalog { path: String, source: std::io::Error },
    #[error(transparent)]
    Policy(#[from] PolicyErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the catalog `{path}` (sha256 {found}) is not the catalog this control plane serves (sha256 {configured}); nothing was \
         imported: import a policies directory whose catalog.toml is the one given to `tollgate control-plane --policies`, or \
         start the control plane once with this catalog first"
    )]
    CatalogMismatch { path: String, found: String, configured: String },
}

/// The audit action of an import.
pub const AUDIT_ACTION: &str = "accounts.import";

/// Imports every account of `policies_dir` into `repository` in one transaction, audited as
/// done by `key_id` at `now` (unix seconds). The directory's catalog must be the one the
/// control plane serves (the hash it recorded at its last start); a repository that never
/// served records this catalog, so a control plane started on the same directory publishes
/// the imported accounts without a further revision.
pub fn import_dir(repository: &dyn Repository, policies_dir: &Path, key_id: &str, now: i64) -> Result<ImportSummary, ImportError> {
    let catalog_path = policies_dir.join(tollgate_policy::CATALOG_FILE);
    let catalog_text = std::fs::read_to_string(&catalog_path)
        .map_err(|source| ImportError::Catalog { path: catalog_path.display().to_string(), source })?;
    let catalog_hash = super::sha256_hex(&catalog_text);
    store::write(repository, |transaction| {
        match transaction.meta(super::CATALOG_HASH)? {
            Some(configured) if configured != catalog_hash => {
                return Err(ImportError::CatalogMismatch {
                    path: catalog_path.display().to_string(),
                    found: catalog_hash.clone(),
                    configured,
                });
            }
            Some(_) => {}
            None => transaction.put_meta(super::CATALOG_HASH, &catalog_hash)?,
        }
        let mut summary = ImportSummary::default();
        let mut store_error: Option<StoreError> = None;
        let read = tollgate_policy::read_dir(policies_dir, |account_id, account_spec| {
            let account = account_doc(&account_id, account_spec)?;
            match transaction.import_account(&account_id, &account) {
                Ok(imported) => {
                    summary.n_accounts += 1;
                    match imported {
                        Imported::Created => summary.n_created += 1,
                        Imported::Updated => summary.n_updated += 1,
                        Imported::Unchanged => summary.n_unchanged += 1,
                    }
                    Ok(())
                }
                Err(error) => {
                    store_error = Some(error);
                    Err(Refusal::Stop)
                }
            }
        });
        if let Some(error) = store_error {
            return Err(error.into());
        }
        read?;
        if summary.n_created + summary.n_updated > 0 {
            let target = policies_dir.display().to_string();
            transaction.audit(&NewAudit {
                at: now,
                key_id,
                action: AUDIT_ACTION,
                account: None,
                target: Some(&target),
                before: None,
                after: Some(serde_json::json!({
                    "accounts": summary.n_accounts,
                    "created": summary.n_created,
                    "updated": summary.n_updated,
                    "unchanged": summary.n_unchanged,
                })),
            })?;
            summary.revision = transaction.next_revision()?;
        }
        Ok(summary)
    })
    .and_then(|mut summary| {
        if summary.revision == 0 {
            summary.revision = repository.revision()?;
        }
        Ok(summary)
    })
}

/// An account of a policy file as the repository stores it: the inverse of
/// `accounts::account_spec`. Licenses without an id get the name the compiler gives them
/// (`ACCOUNT-N`), and the next license the API adds is numbered past every such name.
fn account_doc(account_id: &str, spec: AccountSpec) -> Result<AccountDoc, Refusal> {
    let n_licenses = spec.licenses.len();
    let mut licenses = Vec::with_capacity(n_licenses);
    for (license_number, license) in spec.licenses.into_iter().enumerate() {
        licenses.push(license_doc(account_id, license_number, license)?);
    }
    let prefix = format!("{account_id}-");
    let highest = licenses
        .iter()
        .filter_map(|license| license.id.strip_prefix(&prefix).and_then(|number| number.parse::<u32>().ok()))
        .max()
        .unwrap_or(0);
    Ok(AccountDoc {
        status: match spec.status {
            AccountStatus::Active => AccountState::Active,
            AccountStatus::Suspended => AccountState::Suspended,
        },
        next_license: highest.max(n_licenses as u32).saturating_add(1),
        licenses,
        users: spec
            .users
            .into_iter()
            .map(|(user_id, user)| (user_id, UserDoc { roles: user.roles, groups: user.groups, seat: user.seat }))
            .collect(),
        groups: spec.groups,
        devices: spec.devices,
    })
}

fn license_doc(account_id: &str, license_number: usize, license: LicenseSpec) -> Result<LicenseDoc, Refusal> {
    let regions = match license.regions {
        None => None,
        Some(FenceSpec::Allow(regions)) => Some(regions),
        Some(FenceSpec::Deny(_)) => {
            return Err(Refusal::Field {
                field: format!("licenses[{license_number}].regions"),
                message: format!(
                    "account `{account_id}` has a license with `regions = {{ deny = [...] }}`, which the control plane cannot \
                     store; list the allowed regions instead"
                ),
            });
        }
    };
    Ok(LicenseDoc {
        id: license.id.unwrap_or_else(|| format!("{account_id}-{}", license_number + 1)),
        plan: license.plan,
        addons: license.addons,
        seats: license.seats,
        starts_at: license.starts_at,
        expires_at: license.expires_at,
        grace_days: license.grace_days,
        regions,
        max_devices: license.max_devices,
        cancelled: false,
        overrides: OverridesDoc {
            add_features: license.overrides.add_features,
            remove_features: license.overrides.remove_features,
            limits: license
                .overrides
                .limits
                .into_iter()
                .map(|(meter, limit)| (meter, LimitDoc { soft: limit.soft, hard: limit.hard }))
                .collect::<BTreeMap<_, _>>(),
        },
        trial: license.trial,
    })
}
