//! Policy mistakes are reported with file, line and what is wrong, all of them at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use tollgate_policy::{PolicyError, Source, compile};

fn source(path: &str, text: &str) -> Source {
    Source { path: path.into(), text: text.to_string() }
}

fn errors(catalog: &str, accounts: &[(&str, &str)]) -> Vec<PolicyError> {
    let accounts: Vec<Source> = accounts.iter().map(|(path, text)| source(path, text)).collect();
    compile(&source("catalog.toml", catalog), &accounts).expect_err("policies with mistakes compiled").0
}

fn has(errors: &[PolicyError], file: &str, line: usize, fragment: &str) -> bool {
    errors.iter().any(|error| error.file.to_str() == Some(file) && error.line == Some(line) && error.message.contains(fragment))
}

const CATALOG: &str = r#"regions = ["us", "eu", "us"]

[meters.calls]
period = "fortnight"

[features.export]
meter = "nope"

[features.beta]
rollout = 150

[[plans]]
id = "free"
features = ["export", "exprot"]
limits = { calls = -5 }

[[plans]]
id = "free"

[[addons]]
id = "extra"
limits = { calls = { soft = 10, hard = 5 } }

[roles.admin]
features = ["*", "missing"]
"#;

#[test]
fn catalog_mistakes_are_all_reported_with_lines() {
    let errors = errors(CATALOG, &[]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let expected = [
        (1, "duplicate region `us`"),
        (4, "unknown period `fortnight`"),
        (7, "unknown meter `nope`"),
        (10, "rollout 150"),
        (14, "unknown feature `exprot`"),
        (15, "negative limit -5"),
        (18, "duplicate plan `free`"),
        (22, "soft limit 10 above hard limit 5"),
        (25, "unknown feature `missing`"),
    ];
    for (line, fragment) in expected {
        assert!(has(&errors, "catalog.toml", line, fragment), "no error at line {line} saying {fragment:?} in:\n{}", rendered.join("\n"));
    }
    assert_eq!(errors.len(), expected.len(), "{}", rendered.join("\n"));
    assert!(rendered[0].starts_with("catalog.toml:"), "{}", rendered[0]);
}

const GOOD_CATALOG: &str = r#"regions = ["us"]
[meters.calls]
period = "month"
[features.export]
[[plans]]
id = "pro"
features = ["export"]
[roles.member]
features = ["export"]
"#;

#[test]
fn account_mistakes_are_all_reported_across_files() {
    let first = r#"[accounts.acme]
status = "gone"

[[accounts.acme.licenses]]
plan = "platinum"

[[accounts.acme.licenses]]
plan = "pro"
seats = -1
starts_at = 2026-05-01
expires_at = 2026-01-01
regions = ["mars"]

[accounts.acme.users.bob]
roles = ["wizard"]
groups = ["nobody"]
"#;
    let second = r#"[accounts.acme]

[[accounts.acme.licenses]]
plan = "pro"
expires_at = 2026-13-45
"#;
    let errors = errors(GOOD_CATALOG, &[("accounts/a.toml", first), ("accounts/b.toml", second)]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for (file, line, fragment) in [
        ("accounts/a.toml", 2, "unknown status `gone`"),
        ("accounts/a.toml", 5, "unknown plan `platinum`"),
        ("accounts/a.toml", 9, "`seats` = -1"),
        ("accounts/a.toml", 11, "expires before it starts"),
        ("accounts/a.toml", 12, "unknown region `mars`"),
        ("accounts/a.toml", 15, "unknown role `wizard`"),
        ("accounts/a.toml", 16, "unknown group `nobody`"),
    ] {
        assert!(has(&errors, file, line, fragment), "no error at {file}:{line} saying {fragment:?} in:\n{}", rendered.join("\n"));
    }
    // A TOML syntax error (month 13) in the second file is reported alongside.
    assert!(errors.iter().any(|error| error.file.to_str() == Some("accounts/b.toml") && error.line == Some(5)), "{}", rendered.join("\n"));
}

#[test]
fn duplicate_accounts_across_files_name_both_places() {
    let account = "[accounts.acme]\n[[accounts.acme.licenses]]\nplan = \"pro\"\n";
    let errors = errors(GOOD_CATALOG, &[("accounts/a.toml", account), ("accounts/b.toml", account)]);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().starts_with("accounts/b.toml:1: duplicate account `acme` (first defined at accounts/a.toml:1)"),
        "{}",
        errors[0]
    );
}

#[test]
fn seat_and_device_limits_are_enforced_at_compile_time() {
    let account = r#"[accounts.acme]
devices = ["a", "b", "c"]
[[accounts.acme.licenses]]
plan = "pro"
seats = 1
max_devices = 2
[accounts.acme.users.one]
roles = ["member"]
[accounts.acme.users.two]
roles = ["member"]
"#;
    let errors = errors(GOOD_CATALOG, &[("accounts/a.toml", account)]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(rendered.iter().any(|error| error.contains("assigns 2 seats but its licenses allow at most 1")), "{rendered:?}");
    assert!(rendered.iter().any(|error| error.contains("activates 3 devices but its licenses allow at most 2")), "{rendered:?}");
}

#[test]
fn unknown_keys_and_wrong_types_name_the_line() {
    let errors = errors("[features.export]\ndescriptoin = \"typo\"\n", &[]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(2));
    assert!(errors[0].message.contains("descriptoin"), "{}", errors[0]);
}

#[test]
fn the_shipped_example_policies_compile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let data = tollgate_policy::compile_dir(&dir).unwrap_or_else(|errors| panic!("{errors}"));
    assert!(data.plans.len() >= 3 && data.addons.len() >= 2 && data.meters.len() >= 2 && data.roles.len() >= 3);
}

#[test]
fn an_unknown_plan_does_not_hide_the_rest_of_the_license() {
    let account = r#"[accounts.acme]
[[accounts.acme.licenses]]
plan = "platinum"
addons = ["turbo"]
seats = 3
[accounts.acme.users.a]
[accounts.acme.users.b]
"#;
    let errors = errors(GOOD_CATALOG, &[("accounts/a.toml", account)]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(has(&errors, "accounts/a.toml", 3, "unknown plan `platinum`"), "{rendered:?}");
    assert!(has(&errors, "accounts/a.toml", 4, "unknown add-on `turbo`"), "{rendered:?}");
    assert!(!rendered.iter().any(|error| error.contains("seats")), "no invented seat error: {rendered:?}");
    let lines: Vec<Option<usize>> = errors.iter().map(|error| error.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "errors are in line order");
}

#[test]
fn plans_must_be_listed_cheapest_first() {
    let catalog = "[features.sso]\n\n[[plans]]\nid = \"team\"\nprice = 2900\n\n[[plans]]\nid = \"free\"\nprice = 0\n";
    let errors = errors(catalog, &[]);
    assert!(has(&errors, "catalog.toml", 8, "plan `free` (price 0) is listed after plan `team` (price 2900)"), "{errors:?}");
}

#[test]
fn region_vocabulary_groups_and_fences_are_checked() {
    let catalog = r#"regions = ["us", "de", "US"]
[region_groups]
eu = ["de", "mars"]
De = ["de"]
[features.a]
regions = { deny = ["eu", "pluto"] }
[features.b]
regions = { block = ["us"] }
[[plans]]
id = "p"
regions = ["EU", "atlantis"]
"#;
    let errors = errors(catalog, &[]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for (line, fragment) in [
        (1, "duplicate region `US`"),
        (3, "region group `eu` names unknown region `mars`"),
        (4, "region group `De` reuses the name of a region"),
        (6, "feature `a` names unknown region `pluto`"),
        (8, "`{ allow = [...] }` or `{ deny = [...] }`"),
        (11, "plan `p` names unknown region `atlantis`"),
    ] {
        assert!(has(&errors, "catalog.toml", line, fragment), "no error at line {line} saying {fragment:?} in:\n{}", rendered.join("\n"));
    }
    assert_eq!(errors.len(), 6, "{}", rendered.join("\n"));
}

#[test]
fn license_ids_group_names_and_repeated_addons_follow_the_documented_rules() {
    let catalog = "regions = [\"us\"]\n[features.x]\n[[plans]]\nid = \"p\"\nfeatures = [\"x\"]\n[[addons]]\nid = \"boost\"\n[roles.r]\nfeatures = [\"x\"]\n";
    let account = r#"[accounts.acme]
groups = { "ops team" = ["r"] }
[[accounts.acme.licenses]]
id = "acme 2026"
plan = "p"
addons = ["boost", "boost"]
regions = { deny = ["mars"] }
"#;
    let errors = errors(catalog, &[("accounts/a.toml", account)]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for (line, fragment) in [
        (2, "group id `ops team` must be"),
        (4, "license id `acme 2026` must be"),
        (6, "lists add-on `boost` more than once"),
        (7, "names unknown region `mars`"),
    ] {
        assert!(
            has(&errors, "accounts/a.toml", line, fragment),
            "no error at line {line} saying {fragment:?} in:\n{}",
            rendered.join("\n")
        );
    }
}

#[test]
fn account_specs_compile_through_the_same_lowering_with_field_context() {
    use tollgate_policy::{AccountSpec, LicenseSpec, compile_accounts, compile_catalog};
    let catalog = compile_catalog(&source("catalog.toml", GOOD_CATALOG)).unwrap();
    let mut license = LicenseSpec::new("pro");
    license.addons = vec!["nope".into()];
    let bad = AccountSpec { licenses: vec![license, LicenseSpec::new("platinum")], ..AccountSpec::default() };
    let errors = compile_accounts(&catalog, [("acme".to_string(), bad)]).unwrap_err().0;
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        rendered.iter().any(|error| error.contains("field `licenses[0].addons[0]`") && error.contains("unknown add-on `nope`")),
        "{rendered:?}"
    );
    assert!(
        rendered.iter().any(|error| error.contains("field `licenses[1].plan`") && error.contains("unknown plan `platinum`")),
        "{rendered:?}"
    );
    let good = AccountSpec { licenses: vec![LicenseSpec::new("pro")], ..AccountSpec::default() };
    let data = compile_accounts(&catalog, [("acme".to_string(), good)]).unwrap();
    assert_eq!(data.accounts["acme"].licenses[0].id, "acme-1");
}

const INTEGRATIONS_CATALOG: &str = r#"[meters.calls]
period = "month"
thresholds = [90, 75]

[meters.seats]
period = "never"
thresholds = [0, 2000]

[features.api]
meter = "calls"

[[plans]]
id = "free"
checkout_url = "ftp://example.com/{account}"
stripe_prices = ["price_free"]

[[plans]]
id = "pro"
checkout_url = "https://shop.example/buy?a={account}&p={plan}&c={coupon}"
stripe_prices = ["price_free", "has space"]

[[addons]]
id = "boost"
checkout_url = "https://shop.example/buy?a={account}&addon={plan}"

[hubspot.deal_stages.closedwon]
plan = "platinum"

[hubspot.deal_stages.appointmentscheduled]
order = "archive"

[hubspot.deal_stages.contractsent]
order = "upgrade"

[hubspot.deal_stages.qualified]
plan = "pro"
addons = ["nope"]
seats = 0
"#;

#[test]
fn integration_settings_mistakes_are_reported_with_lines() {
    let errors = errors(INTEGRATIONS_CATALOG, &[]);
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let expected = [
        (3, "threshold 75 out of order"),
        (7, "threshold 0; expected a percentage from 1 to 1000"),
        (14, "expected an http:// or https:// URL"),
        (19, "placeholder `{coupon}`"),
        (20, "Stripe price `price_free` of plan `pro` is already the price of plan `free`"),
        (20, "Stripe price `has space`"),
        (27, "unknown plan `platinum`"),
        (30, "order `archive`"),
        (32, "makes a `upgrade` order, which needs a `plan`"),
        (37, "unknown add-on `nope`"),
        (38, "`seats` 0"),
    ];
    for (line, fragment) in expected {
        assert!(has(&errors, "catalog.toml", line, fragment), "missing line {line} `{fragment}` in {rendered:#?}");
    }
}

#[test]
fn the_example_catalog_maps_prices_stages_and_thresholds() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/catalog.toml")).unwrap();
    let catalog = tollgate_policy::compile_catalog(&source("catalog.toml", &text)).unwrap();
    let integrations = catalog.integrations();
    assert_eq!(integrations.stripe_prices.get("price_business_yearly"), Some(&tollgate_policy::PriceTarget::Plan("business".into())));
    assert_eq!(integrations.stripe_prices.get("price_api_boost"), Some(&tollgate_policy::PriceTarget::Addon("api_boost".into())));
    assert_eq!(integrations.thresholds("api_calls"), &[75, 90, 100, 120]);
    assert_eq!(integrations.thresholds("exports"), tollgate_policy::integrations::DEFAULT_THRESHOLDS);
    let won = &integrations.hubspot_deal_stages["closedwon"];
    assert_eq!((won.action.as_str(), won.plan.as_deref(), won.seats, won.days), ("new", Some("business"), Some(10), Some(365)));
    assert_eq!(integrations.hubspot_deal_stages["closedlost"].action, "cancel");
    let business = catalog.data().plans.iter().find(|plan| plan.name == "business").unwrap();
    assert_eq!(business.checkout_url.as_deref(), Some("https://billing.planwise.example/checkout?account={account}&plan={plan}"));
}
