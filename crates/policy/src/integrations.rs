//! The parts of the catalog that only the control plane reads: which Stripe prices buy which
//! plan or add-on, which HubSpot deal stages become which orders, and at which percentages of
//! a limit usage alerts go out. Checked with the rest of the catalog, with file and line.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use toml::Spanned;

use crate::Diagnostics;

/// Usage alert thresholds when a meter names none: percent of the limit.
pub const DEFAULT_THRESHOLDS: &[u32] = &[80, 100];
/// Highest threshold a meter may declare, in percent of its limit.
pub const MAX_THRESHOLD: u32 = 1000;

/// What a Stripe price buys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceTarget {
    Plan(String),
    Addon(String),
}

/// The order a HubSpot deal stage turns into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DealStage {
    /// An order action as `POST /v1/orders` spells it (`new`, `upgrade`, `cancel`, ...).
    pub action: String,
    pub plan: Option<String>,
    pub addons: Vec<String>,
    pub seats: Option<u32>,
    /// Length of the license the order grants, in days; open-ended when absent.
    pub days: Option<u32>,
}

/// The control plane's view of the catalog's integration settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Integrations {
    /// Stripe price id to what it buys.
    pub stripe_prices: HashMap<String, PriceTarget>,
    /// HubSpot deal stage id (as `dealstage` carries it) to the order it becomes.
    pub hubspot_deal_stages: BTreeMap<String, DealStage>,
    /// Meter name to its alert thresholds, ascending; meters not listed use
    /// [`DEFAULT_THRESHOLDS`].
    pub meter_thresholds: HashMap<String, Vec<u32>>,
}

impl Integrations {
    /// A meter's alert thresholds in percent, ascending.
    pub fn thresholds(&self, meter: &str) -> &[u32] {
        self.meter_thresholds.get(meter).map_or(DEFAULT_THRESHOLDS, Vec::as_slice)
    }
}

/// `[hubspot]` of the catalog.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct HubSpotFile {
    #[serde(default)]
    deal_stages: BTreeMap<Spanned<String>, DealStageFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DealStageFile {
    order: Option<Spanned<String>>,
    plan: Option<Spanned<String>>,
    #[serde(default)]
    addons: Vec<Spanned<String>>,
    seats: Option<Spanned<i64>>,
    days: Option<Spanned<i64>>,
}

/// Order actions a deal stage may name: the wire names of `POST /v1/orders`.
const STAGE_ORDERS: &[&str] = &["new", "upgrade", "downgrade", "renew", "add-on", "cancel", "suspend", "resume"];

/// Checks a `checkout_url` template: an absolute http(s) URL whose only placeholders are
/// `{account}` and `{plan}`.
pub(crate) fn check_checkout_url(url: &Spanned<String>, owner: &str, diagnostics: &mut Diagnostics<'_>) -> Option<String> {
    let text = url.get_ref();
    let scheme_ok = text.starts_with("https://") || text.starts_with("http://");
    if !scheme_ok || text.len() > 2048 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        diagnostics.at(url.span(), format!("{owner} has `checkout_url` `{text}`; expected an http:// or https:// URL without spaces"));
        return None;
    }
    let mut rest = text.as_str();
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            diagnostics.at(url.span(), format!("{owner} has `checkout_url` with an unclosed `{{`"));
            return None;
        };
        let name = &after[..close];
        if !matches!(name, "account" | "plan") {
            diagnostics.at(
                url.span(),
                format!("{owner} has `checkout_url` placeholder `{{{name}}}`; the placeholders are `{{account}}` and `{{plan}}`"),
            );
            return None;
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        diagnostics.at(url.span(), format!("{owner} has `checkout_url` with an unopened `}}`"));
        return None;
    }
    Some(text.clone())
}

/// Records the Stripe prices of a plan or add-on; a price may buy one thing only.
pub(crate) fn add_stripe_prices(
    prices: &[Spanned<String>],
    target: &PriceTarget,
    owner: &str,
    integrations: &mut Integrations,
    diagnostics: &mut Diagnostics<'_>,
) {
    for price in prices {
        let id = price.get_ref();
        if id.is_empty() || id.len() > 255 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            diagnostics.at(price.span(), format!("{owner} has Stripe price `{id}`; expected an id such as `price_1Nx...`"));
            continue;
        }
        if let Some(existing) = integrations.stripe_prices.get(id) {
            let existing = match existing {
                PriceTarget::Plan(name) => format!("plan `{name}`"),
                PriceTarget::Addon(name) => format!("add-on `{name}`"),
            };
            diagnostics.at(price.span(), format!("Stripe price `{id}` of {owner} is already the price of {existing}"));
            continue;
        }
        integrations.stripe_prices.insert(id.clone(), target.clone());
    }
}

/// Checks a meter's `thresholds`: percentages from 1 to [`MAX_THRESHOLD`], strictly ascending.
pub(crate) fn check_thresholds(thresholds: &[Spanned<i64>], owner: &str, diagnostics: &mut Diagnostics<'_>) -> Option<Vec<u32>> {
    let mut checked = Vec::with_capacity(thresholds.len());
    for threshold in thresholds {
        let value = *threshold.get_ref();
        if !(1..=i64::from(MAX_THRESHOLD)).contains(&value) {
            diagnostics.at(threshold.span(), format!("{owner} has threshold {value}; expected a percentage from 1 to {MAX_THRESHOLD}"));
            return None;
        }
        let value = value as u32;
        if checked.last().is_some_and(|last| *last >= value) {
            diagnostics.at(threshold.span(), format!("{owner} lists threshold {value} out of order; list thresholds ascending, once each"));
            return None;
        }
        checked.push(value);
    }
    if checked.is_empty() {
        return None;
    }
    Some(checked)
}

/// Checks `[hubspot.deal_stages]` against the plans and add-ons of the catalog.
pub(crate) fn compile_hubspot(
    hubspot: &HubSpotFile,
    plans: &HashMap<String, u32>,
    addons: &HashMap<String, u32>,
    diagnostics: &mut Diagnostics<'_>,
) -> BTreeMap<String, DealStage> {
    let mut stages = BTreeMap::new();
    for (stage, file) in &hubspot.deal_stages {
        let owner = format!("HubSpot deal stage `{}`", stage.get_ref());
        let action = file.order.as_ref().map_or("new", |order| order.get_ref().as_str());
        if !STAGE_ORDERS.contains(&action) {
            let span = file.order.as_ref().map_or_else(|| stage.span(), Spanned::span);
            diagnostics.at(span, format!("{owner} has order `{action}`; expected one of {}", STAGE_ORDERS.join(", ")));
            continue;
        }
        let needs_plan = matches!(action, "new" | "upgrade" | "downgrade");
        if needs_plan && file.plan.is_none() {
            diagnostics.at(stage.span(), format!("{owner} makes a `{action}` order, which needs a `plan`"));
            continue;
        }
        let mut valid = true;
        if let Some(plan) = &file.plan
            && !plans.contains_key(plan.get_ref())
        {
            diagnostics.at(plan.span(), format!("{owner} names unknown plan `{}`", plan.get_ref()));
            valid = false;
        }
        for addon in &file.addons {
            if !addons.contains_key(addon.get_ref()) {
                diagnostics.at(addon.span(), format!("{owner} names unknown add-on `{}`", addon.get_ref()));
                valid = false;
            }
        }
        let positive = |value: &Option<Spanned<i64>>, field: &str, diagnostics: &mut Diagnostics<'_>| -> Result<Option<u32>, ()> {
            match value {
                None => Ok(None),
                Some(value) if (1..=i64::from(u32::MAX)).contains(value.get_ref()) => Ok(Some(*value.get_ref() as u32)),
                Some(value) => {
                    diagnostics.at(value.span(), format!("{owner} has `{field}` {}; expected a positive whole number", value.get_ref()));
                    Err(())
                }
            }
        };
        let seats = positive(&file.seats, "seats", diagnostics);
        let days = positive(&file.days, "days", diagnostics);
        let (Ok(seats), Ok(days)) = (seats, days) else { continue };
        if valid {
            stages.insert(
                stage.get_ref().clone(),
                DealStage {
                    action: action.to_string(),
                    plan: file.plan.as_ref().map(|plan| plan.get_ref().clone()),
                    addons: file.addons.iter().map(|addon| addon.get_ref().clone()).collect(),
                    seats,
                    days,
                },
            );
        }
    }
    stages
}
