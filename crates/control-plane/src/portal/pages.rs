//! The customer portal's pages and forms, and what every page shares: the layout's chrome,
//! sessions and CSRF checks, the error page. Figures come from `reports::account_usage` and
//! the engine's `entitlements` over the account compiled alone; changes go through `changes`.

use askama::Template;
use hyper::StatusCode;
use sha2::{Digest, Sha256};
use tollgate_core::engine::{self, Entitlements, Reason, UsageLookup};
use tollgate_core::model::{ArchivedSnapshotData, Period};
use tollgate_core::period::format_rfc3339;

use super::chart::{self, Bar, Line};
use super::store::{NewSession, Redeemed, SessionKind, WebSession};
use super::web::{self, HttpResponse, PageError, WebRequest};
use super::{ADMIN_ROLE, PORTAL_SESSION_SECS, portal_caller};
use crate::store::{AccessRequest, AccessStatus, AccountDoc};
use crate::{ApiError, ControlPlane, accounts, changes, random_hex, reports, sha256_hex};

pub const PORTAL_COOKIE: &str = "tg_portal";
pub const CONSOLE_COOKIE: &str = "tg_console";

/// One link of the section navigation.
#[derive(Debug, Clone)]
pub struct NavLink {
    pub href: String,
    pub label: &'static str,
    pub current: bool,
}

/// What the layout shows around every page.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    pub title: String,
    pub console: bool,
    pub account: String,
    pub person: String,
    pub csrf: String,
    pub return_url: String,
    pub nav: Vec<NavLink>,
    /// A confirmation after a form.
    pub done: String,
    /// Where a meta refresh goes (the page after an entry link).
    pub refresh_to: String,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage {
    chrome: Chrome,
    message: String,
    link_href: String,
    link_label: String,
}

/// A page that says what happened, with a way on.
pub fn message(status: StatusCode, chrome: Chrome, message: String, link: Option<(&str, &str)>) -> HttpResponse {
    let (link_href, link_label) = link.map_or((String::new(), String::new()), |(href, label)| (href.to_string(), label.to_string()));
    let page = MessagePage { chrome, message, link_href, link_label };
    match page.render() {
        Ok(body) => web::html(status, body),
        Err(error) => {
            tracing::error!(%error, "message page did not render");
            web::html(StatusCode::INTERNAL_SERVER_ERROR, "the page could not be shown".into())
        }
    }
}

fn titled(title: &str, console: bool) -> Chrome {
    Chrome { title: title.to_string(), console, ..Chrome::default() }
}

/// The page for an error, with the status it deserves.
pub fn error_page(error: &PageError, secure: bool) -> HttpResponse {
    let back_to_app = "Open the portal again from the app you came from: links into the portal work once and for a few minutes.";
    match error {
        PageError::NoSession { console: true } => {
            let mut response = message(
                StatusCode::UNAUTHORIZED,
                titled("Signed out", true),
                "Your console session has ended or was revoked.".into(),
                Some(("/console", "Sign in")),
            );
            web::set_cookie(&mut response, CONSOLE_COOKIE, "", "/console", 0, secure);
            response
        }
        PageError::NoSession { console: false } => {
            let mut response = message(
                StatusCode::UNAUTHORIZED,
                titled("Session ended", false),
                format!("Your portal session has ended or was revoked. {back_to_app}"),
                None,
            );
            web::set_cookie(&mut response, PORTAL_COOKIE, "", "/portal", 0, secure);
            response
        }
        PageError::LinkReused => {
            message(StatusCode::GONE, titled("Link already used", false), format!("This link has already been used. {back_to_app}"), None)
        }
        PageError::LinkExpired => {
            message(StatusCode::GONE, titled("Link expired", false), format!("This link has expired. {back_to_app}"), None)
        }
        PageError::LinkUnknown => {
            message(StatusCode::NOT_FOUND, titled("Link not valid", false), format!("This link is not valid. {back_to_app}"), None)
        }
        PageError::Csrf => message(
            StatusCode::FORBIDDEN,
            titled("Form refused", false),
            "This form was refused: it did not carry this session's security token. Go back, reload the page and try again.".into(),
            None,
        ),
        PageError::Forbidden(text) => message(StatusCode::FORBIDDEN, titled("Not allowed", false), text.clone(), None),
        PageError::NotFound(text) => message(StatusCode::NOT_FOUND, titled("Not found", false), text.clone(), None),
        PageError::BadRequest(text) => message(StatusCode::BAD_REQUEST, titled("Check the form", false), text.clone(), None),
        PageError::Api(api_error) => {
            let status = match api_error {
                ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
                ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
                ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
                ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
                ApiError::Conflict(_) => StatusCode::CONFLICT,
                ApiError::Policy(_) | ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
                ApiError::Store(error) => {
                    tracing::error!(%error, "repository error on a page");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let text = if status == StatusCode::INTERNAL_SERVER_ERROR {
                "Something went wrong on our side; try again in a moment.".to_string()
            } else {
                format!("The change was refused: {api_error}.")
            };
            message(status, titled("Refused", false), text, None)
        }
        PageError::Internal => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            titled("Error", false),
            "Something went wrong on our side; try again in a moment.".into(),
            None,
        ),
    }
}

fn render(template: &impl Template) -> Result<HttpResponse, PageError> {
    template.render().map(|body| web::html(StatusCode::OK, body)).map_err(|error| {
        tracing::error!(%error, "page did not render");
        PageError::Internal
    })
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// A session as found from its cookie, with the hash it is stored under.
pub struct Signed {
    pub id_sha256: String,
    pub session: WebSession,
}

/// The live session of `kind` behind the request's cookie.
pub fn session_of(control_plane: &ControlPlane, request: &WebRequest, kind: SessionKind) -> Result<Signed, PageError> {
    let (cookie, console) = match kind {
        SessionKind::Portal => (PORTAL_COOKIE, false),
        SessionKind::Console => (CONSOLE_COOKIE, true),
    };
    let id = request.cookie(cookie).filter(|id| !id.is_empty()).ok_or(PageError::NoSession { console })?;
    let id_sha256 = sha256_hex(id);
    let session = control_plane.repository.live_session(&id_sha256, control_plane.now())?.ok_or(PageError::NoSession { console })?;
    if session.kind != kind {
        return Err(PageError::NoSession { console });
    }
    Ok(Signed { id_sha256, session })
}

/// Refuses a POST whose `csrf` field is not the session's token. Digests are compared, so the
/// time taken says nothing about how much of the token was right.
pub fn check_csrf(request: &WebRequest, expected: &str) -> Result<(), PageError> {
    let sent = request.field("csrf").unwrap_or_default();
    if sent.is_empty() || Sha256::digest(sent.as_bytes()) != Sha256::digest(expected.as_bytes()) {
        return Err(PageError::Csrf);
    }
    Ok(())
}

/// A new random secret for a session id or a CSRF token.
pub fn secret() -> Result<String, PageError> {
    random_hex(32).map_err(|error| {
        tracing::error!(%error, "no randomness for a session");
        PageError::Internal
    })
}

/// Stores a new session and returns the cookie value that names it.
pub fn start_session(control_plane: &ControlPlane, session: &WebSession) -> Result<String, PageError> {
    let id = secret()?;
    control_plane.repository.create_session(&NewSession { id_sha256: &sha256_hex(&id), session, created_at: control_plane.now() })?;
    Ok(id)
}

fn secure(control_plane: &ControlPlane) -> bool {
    web::is_https(control_plane.config().public_url.as_deref())
}

/// `GET /portal/enter?token=...`: spends the link and starts a session. The answer is a page
/// that moves on by itself (a meta refresh, and a link), not a redirect: a SameSite=Strict
/// cookie set while arriving from another site is sent again only on a navigation that starts
/// here.
pub fn enter(control_plane: &ControlPlane, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let token = request.query("token").unwrap_or_default();
    if token.is_empty() || token.len() > 128 {
        return Err(PageError::LinkUnknown);
    }
    if request.is_head() {
        return Ok(message(StatusCode::OK, titled("Sign in", false), "Open this link in a browser to sign in.".into(), None));
    }
    let now = control_plane.now();
    let (account, user, return_url) = match control_plane.repository.redeem_link(&sha256_hex(token), now)? {
        Redeemed::Fresh { account, user, return_url } => (account, user, return_url),
        Redeemed::Reused => return Err(PageError::LinkReused),
        Redeemed::Expired => return Err(PageError::LinkExpired),
        Redeemed::Unknown => return Err(PageError::LinkUnknown),
    };
    let session = WebSession {
        kind: SessionKind::Portal,
        account: Some(account.clone()),
        person: user,
        key_id: String::new(),
        csrf: secret()?,
        return_url,
        expires_at: now + PORTAL_SESSION_SECS,
    };
    let id = start_session(control_plane, &session)?;
    let next = format!("/portal/accounts/{account}");
    let chrome = Chrome { title: "Welcome".into(), account: account.clone(), refresh_to: next.clone(), ..Chrome::default() };
    let mut response = message(StatusCode::OK, chrome, "You are signed in to your account portal.".into(), Some((&next, "Continue")));
    web::set_cookie(&mut response, PORTAL_COOKIE, &id, "/portal", PORTAL_SESSION_SECS, secure(control_plane));
    Ok(response)
}

/// `GET /portal`: the session's own account.
pub fn portal_home(control_plane: &ControlPlane, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let signed = session_of(control_plane, request, SessionKind::Portal)?;
    Ok(web::redirect(&format!("/portal/accounts/{}", signed.session.account.unwrap_or_default())))
}

/// `POST /portal/signout`: revokes the session.
pub fn portal_signout(control_plane: &ControlPlane, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let signed = session_of(control_plane, request, SessionKind::Portal)?;
    check_csrf(request, &signed.session.csrf)?;
    control_plane.repository.revoke_session(&signed.id_sha256, control_plane.now())?;
    let mut response = message(
        StatusCode::OK,
        titled("Signed out", false),
        "You are signed out. Open the portal again from the app.".into(),
        signed.session.return_url.as_deref().map(|url| (url, "Back to the app")),
    );
    web::set_cookie(&mut response, PORTAL_COOKIE, "", "/portal", 0, secure(control_plane));
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// The account's pages
// ---------------------------------------------------------------------------------------------

/// What every page of one account starts from: the session (checked to be for this account),
/// the stored account and its usage report.
struct Context {
    account: String,
    user: String,
    csrf: String,
    return_url: String,
    doc: AccountDoc,
}

impl Context {
    fn chrome(&self, title: &str, section: &str, done: Option<&str>) -> Chrome {
        let base = format!("/portal/accounts/{}", self.account);
        let sections: [(&str, &'static str); 7] = [
            ("", "Overview"),
            ("features", "Features"),
            ("usage", "Usage"),
            ("users", "Users & seats"),
            ("devices", "Devices"),
            ("requests", "Access requests"),
            ("token", "License token"),
        ];
        Chrome {
            title: title.to_string(),
            console: false,
            account: self.account.clone(),
            person: self.user.clone(),
            csrf: self.csrf.clone(),
            return_url: self.return_url.clone(),
            nav: sections
                .iter()
                .map(|(path, label)| NavLink {
                    href: if path.is_empty() { base.clone() } else { format!("{base}/{path}") },
                    label,
                    current: *path == section,
                })
                .collect(),
            done: done.map(done_text).unwrap_or_default().to_string(),
            refresh_to: String::new(),
        }
    }

    /// Whether this user administers the account's users and devices: the admin role given
    /// directly or through a group.
    fn can_manage(&self) -> bool {
        self.doc.users.get(&self.user).is_some_and(|user| {
            user.roles.iter().any(|role| role == ADMIN_ROLE)
                || user
                    .groups
                    .iter()
                    .any(|group| self.doc.groups.get(group).is_some_and(|roles| roles.iter().any(|role| role == ADMIN_ROLE)))
        })
    }
}

/// The words for a `?done=` code after a form.
fn done_text(code: &str) -> &'static str {
    match code {
        "user_saved" => "The user is saved.",
        "user_removed" => "The user is removed.",
        "device_deactivated" => "The device is deactivated.",
        "request_sent" => "Your request is sent. You will see the decision here.",
        "approved" => "The request is approved and granted.",
        "denied" => "The request is denied.",
        "sessions_revoked" => "Every portal session of this account is revoked.",
        _ => "",
    }
}

fn context(control_plane: &ControlPlane, request: &WebRequest, account: &str) -> Result<Context, PageError> {
    let signed = session_of(control_plane, request, SessionKind::Portal)?;
    if signed.session.account.as_deref() != Some(account) {
        return Err(PageError::Forbidden("This portal session belongs to another account, and cannot see or change this one.".to_string()));
    }
    let doc =
        control_plane.repository.account(account)?.ok_or_else(|| PageError::NotFound(format!("Account {account} no longer exists.")))?;
    Ok(Context {
        account: account.to_string(),
        user: signed.session.person,
        csrf: signed.session.csrf,
        return_url: signed.session.return_url.unwrap_or_default(),
        doc,
    })
}

/// `/portal/accounts/{account}/...`: the pages (GET) and their forms (POST).
pub fn portal_account(control_plane: &ControlPlane, request: &WebRequest, account: &str, rest: &[&str]) -> Result<HttpResponse, PageError> {
    let context = context(control_plane, request, account)?;
    if request.is_post() {
        check_csrf(request, &context.csrf)?;
        return match rest {
            ["users"] => save_user(control_plane, request, &context),
            ["users", user, "remove"] => remove_user(control_plane, &context, user),
            ["devices", device, "deactivate"] => deactivate_device(control_plane, &context, device),
            ["requests"] => request_access(control_plane, request, &context),
            _ => Err(PageError::NotFound("There is no form at this address.".into())),
        };
    }
    let done = request.query("done");
    match rest {
        [] => overview(control_plane, &context, done),
        ["features"] => features(control_plane, &context),
        ["usage"] => usage(control_plane, &context),
        ["users"] => users(control_plane, &context, done),
        ["devices"] => devices(control_plane, &context, done),
        ["requests"] => requests(control_plane, &context, request.query("feature"), done),
        ["token"] => token(control_plane, &context),
        _ => Err(PageError::NotFound("There is no page at this address.".into())),
    }
}

/// Current-period usage by meter, from the usage report: the engine reads it through
/// [`UsageLookup`], so the features page and the usage page agree with the API.
struct ReportedUsage(Vec<UsageRow>);

impl UsageLookup for ReportedUsage {
    fn used(&self, _account: &str, meter: &str, period_start: i64) -> u64 {
        let period_start = format_rfc3339(period_start);
        self.0.iter().find(|row| row.meter == meter && row.period_start == period_start).map_or(0, |row| row.used)
    }
}

/// A row of `GET /v1/accounts/{id}/usage`, read back.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct UsageRow {
    pub meter: String,
    pub period_start: String,
    pub used: u64,
    pub limit: Option<u64>,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
}

/// The usage report of `GET /v1/accounts/{id}/usage` with `history`.
pub fn usage_rows(control_plane: &ControlPlane, account: &str, history: reports::History) -> Result<Vec<UsageRow>, PageError> {
    let report = reports::account_usage(control_plane, account, history, control_plane.now())?;
    let rows = report.get("meters").cloned().unwrap_or_default();
    serde_json::from_value(rows).map_err(|error| {
        tracing::error!(%error, "usage report did not read back");
        PageError::Internal
    })
}

/// The account compiled alone, archived so the engine can read it.
fn compiled(control_plane: &ControlPlane, account: &str, doc: &AccountDoc) -> Result<rkyv::util::AlignedVec, PageError> {
    let data =
        accounts::compile_one(&control_plane.catalog, account, doc).map_err(|messages| PageError::Api(ApiError::Policy(messages)))?;
    rkyv::to_bytes::<rkyv::rancor::Error>(&data).map_err(|error| {
        tracing::error!(%error, "account did not archive");
        PageError::Internal
    })
}

fn archived(bytes: &rkyv::util::AlignedVec) -> Result<&ArchivedSnapshotData, PageError> {
    rkyv::access::<ArchivedSnapshotData, rkyv::rancor::Error>(bytes).map_err(|error| {
        tracing::error!(%error, "account archive did not validate");
        PageError::Internal
    })
}

/// Runs `read` on the engine's view of the account for this user.
fn with_entitlements<T>(
    control_plane: &ControlPlane,
    context: &Context,
    usage: &ReportedUsage,
    read: impl FnOnce(&ArchivedSnapshotData, &Entitlements<'_>) -> T,
) -> Result<T, PageError> {
    let bytes = compiled(control_plane, &context.account, &context.doc)?;
    let snapshot = archived(&bytes)?;
    let entitlements = engine::entitlements(snapshot, &context.account, Some(&context.user), None, control_plane.now(), usage)
        .ok_or_else(|| PageError::NotFound(format!("Account {} no longer exists.", context.account)))?;
    Ok(read(snapshot, &entitlements))
}

/// One license as the pages show it.
#[derive(Debug, Clone)]
pub struct LicenseRow {
    pub id: String,
    pub plan: String,
    pub addons: String,
    pub seats: u32,
    pub state: &'static str,
    pub state_class: &'static str,
    pub state_detail: String,
    pub expires: String,
}

fn date(unix_seconds: i64) -> String {
    format_rfc3339(unix_seconds).get(..10).unwrap_or_default().to_string()
}

fn days_left(until: i64, now: i64) -> i64 {
    (until - now + 86_399).div_euclid(86_400).max(0)
}

fn plural_days(days: i64) -> String {
    if days == 1 { "1 day left".into() } else { format!("{days} days left") }
}

/// A stored license's state at `now`: the engine's validity rule, put in words.
pub fn license_row(license: &crate::store::LicenseDoc, now: i64) -> LicenseRow {
    let grace_end = license.expires_at.map(|expires_at| expires_at.saturating_add(i64::from(license.grace_days) * 86_400));
    let (state, state_class, state_detail) = if license.cancelled {
        ("cancelled", "muted", String::new())
    } else if license.starts_at.is_some_and(|starts_at| now < starts_at) {
        ("not started", "muted", format!("starts {}", date(license.starts_at.unwrap_or_default())))
    } else {
        match (license.expires_at, grace_end) {
            (Some(expires_at), _) if now < expires_at && license.trial => ("trial", "warn", plural_days(days_left(expires_at, now))),
            (Some(expires_at), _) if now < expires_at => ("valid", "ok", plural_days(days_left(expires_at, now))),
            (Some(_), Some(grace_end)) if now < grace_end => ("grace", "warn", plural_days(days_left(grace_end, now))),
            (Some(_), _) => ("expired", "bad", String::new()),
            (None, _) if license.trial => ("trial", "warn", "no end date".into()),
            (None, _) => ("valid", "ok", "no end date".into()),
        }
    };
    LicenseRow {
        id: license.id.clone(),
        plan: license.plan.clone(),
        addons: license.addons.join(", "),
        seats: license.seats,
        state,
        state_class,
        state_detail,
        expires: license.expires_at.map_or_else(|| "never".to_string(), date),
    }
}

/// Seats taken and the cap the policy compiler enforces (the largest seat count of the
/// licenses that are not cancelled).
pub fn seats(doc: &AccountDoc) -> (usize, u32) {
    let used = doc.users.values().filter(|user| user.seat).count();
    let total = doc.licenses.iter().filter(|license| !license.cancelled).map(|license| license.seats).max().unwrap_or(0);
    (used, total)
}

#[derive(Template)]
#[template(path = "portal/overview.html")]
struct OverviewPage {
    chrome: Chrome,
    plan: String,
    addons: String,
    state: &'static str,
    state_class: &'static str,
    state_detail: String,
    seats_used: usize,
    seats_total: u32,
    devices_used: usize,
    max_devices: String,
    licenses: Vec<LicenseRow>,
    warnings: Vec<String>,
}

/// The warning for a meter at 80 % of its limit or more.
fn near_limit_warning(row: &UsageRow) -> Option<String> {
    let limit = row.limit?;
    if row.used >= limit {
        Some(format!("{}: {} used, the limit of {limit} is reached for this period.", row.meter, row.used))
    } else if row.used as f64 >= 0.8 * limit as f64 {
        Some(format!("{}: {} of {limit} used ({} %), close to the limit.", row.meter, row.used, row.used * 100 / limit.max(1)))
    } else {
        None
    }
}

fn overview(control_plane: &ControlPlane, context: &Context, done: Option<&str>) -> Result<HttpResponse, PageError> {
    let now = control_plane.now();
    let rows: Vec<LicenseRow> =
        context.doc.licenses.iter().filter(|license| !license.cancelled).map(|license| license_row(license, now)).collect();
    // The license that matters: valid before trial before grace, the newest of each.
    let rank = |row: &LicenseRow| match row.state {
        "valid" => 4,
        "trial" => 3,
        "grace" => 2,
        "not started" => 1,
        _ => 0,
    };
    let primary = rows.iter().rev().max_by_key(|row| rank(row)).cloned();
    let usage = usage_rows(control_plane, &context.account, reports::History::Current)?;
    let mut warnings: Vec<String> = usage.iter().filter_map(near_limit_warning).collect();
    if context.doc.status == crate::store::AccountState::Suspended {
        warnings.insert(0, "This account is suspended: nothing is allowed until it is resumed.".into());
    }
    let (seats_used, seats_total) = seats(&context.doc);
    let max_devices = if context.doc.licenses.iter().filter(|license| !license.cancelled).any(|license| license.max_devices.is_none()) {
        String::new()
    } else {
        context.doc.licenses.iter().filter_map(|license| license.max_devices).max().map(|max| max.to_string()).unwrap_or_default()
    };
    let page =
        OverviewPage {
            chrome: context.chrome("Overview", "", done),
            plan: primary.as_ref().map_or_else(|| "none".to_string(), |row| row.plan.clone()),
            addons: primary.as_ref().map(|row| row.addons.clone()).unwrap_or_default(),
            state: primary.as_ref().map_or("no license", |row| row.state),
            state_class: primary.as_ref().map_or("bad", |row| row.state_class),
            state_detail: primary
                .as_ref()
                .map(|row| {
                    if row.expires == "never" {
                        row.state_detail.clone()
                    } else {
                        format!("{} · expires {}", row.state_detail, row.expires)
                    }
                })
                .unwrap_or_default(),
            seats_used,
            seats_total,
            devices_used: context.doc.devices.len(),
            max_devices,
            licenses: rows,
            warnings,
        };
    render(&page)
}

/// A decision's reason in words, for a customer.
pub fn reason_words(reason: Reason) -> &'static str {
    match reason {
        Reason::Ok => "Included",
        Reason::NotEntitled => "Not included in your plan or add-ons",
        Reason::RoleForbidden => "Your role does not include it",
        Reason::NoSeat => "You do not hold a seat",
        Reason::UnknownUser => "You are not a user of this account",
        Reason::LicenseExpired => "The license has expired",
        Reason::AccountSuspended => "The account is suspended",
        Reason::NotInRollout => "Not yet available to this account (gradual rollout)",
        Reason::RegionBlocked => "Only available in some regions",
        Reason::DeviceNotActivated => "This device is not activated",
        Reason::QuotaExceeded => "This period's usage limit is reached",
        Reason::UnknownFeature | Reason::UnknownAccount => "Unknown",
    }
}

pub struct FeatureRow {
    pub name: String,
    pub description: String,
    pub allowed: bool,
    pub reason: &'static str,
    pub upgrade: String,
    pub checkout_url: String,
}

#[derive(Template)]
#[template(path = "portal/features.html")]
struct FeaturesPage {
    chrome: Chrome,
    features: Vec<FeatureRow>,
}

fn features(control_plane: &ControlPlane, context: &Context) -> Result<HttpResponse, PageError> {
    let usage = ReportedUsage(usage_rows(control_plane, &context.account, reports::History::Current)?);
    let catalog = &control_plane.catalog_data;
    let rows = with_entitlements(control_plane, context, &usage, |snapshot, entitlements| {
        entitlements
            .features
            .iter()
            .map(|view| {
                let decision = &view.decision;
                let upgrade = decision.upgrade.and_then(|upgrade| {
                    let (_, name) = engine::upgrade_name(snapshot, upgrade)?;
                    let url = engine::upgrade_checkout_template(snapshot, upgrade)
                        .map(|template| tollgate_protocol::fill_checkout_url(template, &context.account, name))
                        .unwrap_or_default();
                    Some((name.to_string(), url))
                });
                let (upgrade, checkout_url) = upgrade.unwrap_or_default();
                FeatureRow {
                    name: view.feature.to_string(),
                    description: catalog
                        .features
                        .iter()
                        .find(|feature| feature.name == view.feature)
                        .map(|feature| feature.description.clone())
                        .unwrap_or_default(),
                    allowed: decision.reason == Reason::Ok,
                    reason: reason_words(decision.reason),
                    upgrade,
                    checkout_url,
                }
            })
            .collect()
    })?;
    render(&FeaturesPage { chrome: context.chrome("Features", "features", None), features: rows })
}

pub struct MeterRow {
    pub name: String,
    pub unit: String,
    /// How the meter counts, in words: `call per month`, `GB in total`.
    pub per: String,
    pub used: u64,
    pub limit: String,
    pub limit_text: String,
    pub soft: String,
    pub hard: String,
    pub percent: String,
    pub status_class: &'static str,
    pub warning: String,
    pub resets: String,
    pub chart: String,
}

#[derive(Template)]
#[template(path = "portal/usage.html")]
struct UsagePage {
    chrome: Chrome,
    meters: Vec<MeterRow>,
}

/// How many periods the usage chart shows, the current one included.
pub const CHART_PERIODS: usize = 12;

/// The starts of the last [`CHART_PERIODS`] periods of `period`, oldest first.
fn period_starts(period: Period, now: i64) -> Vec<i64> {
    let mut starts = Vec::new();
    let mut at = now;
    for _ in 0..CHART_PERIODS {
        let window = period.window(at);
        starts.push(window.start);
        if window.reset_at.is_none() {
            break;
        }
        at = window.start - 1;
    }
    starts.reverse();
    starts
}

fn period_label(period: Period, start: i64) -> String {
    let text = format_rfc3339(start);
    let range = match period {
        Period::Month => 0..7,
        Period::Day => 5..10,
        Period::Hour => 11..16,
        Period::Never => return "all time".into(),
    };
    text.get(range).unwrap_or_default().to_string()
}

fn usage(control_plane: &ControlPlane, context: &Context) -> Result<HttpResponse, PageError> {
    let now = control_plane.now();
    let rows = usage_rows(control_plane, &context.account, reports::History::Earlier(u32::try_from(CHART_PERIODS - 1).unwrap_or(11)))?;
    let meters = control_plane
        .catalog_data
        .meters
        .iter()
        .map(|meter| {
            let window = meter.period.window(now);
            let current_start = format_rfc3339(window.start);
            let mine: Vec<&UsageRow> = rows.iter().filter(|row| row.meter == meter.name).collect();
            let current = mine.iter().find(|row| row.period_start == current_start);
            let used = current.map_or(0, |row| row.used);
            let (limit, soft, hard) = current.map_or((None, None, None), |row| (row.limit, row.soft_limit, row.hard_limit));
            let bars: Vec<Bar> = period_starts(meter.period, now)
                .into_iter()
                .map(|start| {
                    let start_text = format_rfc3339(start);
                    let value = mine.iter().find(|row| row.period_start == start_text).map_or(0, |row| row.used);
                    Bar { label: period_label(meter.period, start), value }
                })
                .collect();
            let lines: Vec<Line> =
                soft.map(|value| Line { value, soft: true }).into_iter().chain(hard.map(|value| Line { value, soft: false })).collect();
            let title = format!("{} per {}, last {} periods", meter.name, meter.period.as_str(), bars.len());
            let (percent, status_class) = match limit {
                Some(limit) => {
                    let percent = used.saturating_mul(100) / limit.max(1);
                    let class = if used >= limit {
                        "bad"
                    } else if percent >= 80 {
                        "warn"
                    } else {
                        "ok"
                    };
                    (format!("{percent} %"), class)
                }
                None => (String::new(), "ok"),
            };
            let warning = current.and_then(|row| near_limit_warning(row)).unwrap_or_default();
            MeterRow {
                name: meter.name.clone(),
                unit: meter.unit.clone(),
                per: match meter.period {
                    Period::Never => format!("{} in total, never reset", meter.unit),
                    period => format!("{} per {}", meter.unit, period.as_str()),
                },
                used,
                limit: limit.map(|limit| limit.to_string()).unwrap_or_default(),
                limit_text: limit.map(|limit| format!("{limit} {}", meter.unit)).unwrap_or_else(|| "no limit".into()),
                soft: soft.map_or_else(|| "none".into(), |soft| soft.to_string()),
                hard: hard.map_or_else(|| "none".into(), |hard| hard.to_string()),
                percent,
                status_class,
                warning,
                resets: window.reset_at.map(format_rfc3339).unwrap_or_default(),
                chart: chart::bars(&title, &bars, &lines),
            }
        })
        .collect();
    render(&UsagePage { chrome: context.chrome("Usage", "usage", None), meters })
}

pub struct UserRow {
    pub id: String,
    pub roles: String,
    pub groups: String,
    pub seat: bool,
    pub is_me: bool,
}

pub fn user_rows(doc: &AccountDoc, me: &str) -> Vec<UserRow> {
    doc.users
        .iter()
        .map(|(id, user)| UserRow {
            id: id.clone(),
            roles: user.roles.join(", "),
            groups: user.groups.join(", "),
            seat: user.seat,
            is_me: id == me,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "portal/users.html")]
struct UsersPage {
    chrome: Chrome,
    can_manage: bool,
    users: Vec<UserRow>,
    seats_used: usize,
    seats_total: u32,
    seats_full: bool,
    roles: Vec<String>,
    groups: Vec<String>,
}

fn users(control_plane: &ControlPlane, context: &Context, done: Option<&str>) -> Result<HttpResponse, PageError> {
    let (seats_used, seats_total) = seats(&context.doc);
    let page = UsersPage {
        chrome: context.chrome("Users & seats", "users", done),
        can_manage: context.can_manage(),
        users: user_rows(&context.doc, &context.user),
        seats_used,
        seats_total,
        seats_full: seats_used >= seats_total as usize,
        roles: control_plane.catalog_data.roles.iter().map(|role| role.name.clone()).collect(),
        groups: context.doc.groups.keys().cloned().collect(),
    };
    render(&page)
}

fn require_manager(context: &Context) -> Result<(), PageError> {
    if context.can_manage() {
        Ok(())
    } else {
        Err(PageError::Forbidden(format!(
            "Changing users and devices needs the {ADMIN_ROLE} role in account {}; ask an admin of your account.",
            context.account
        )))
    }
}

fn save_user(control_plane: &ControlPlane, request: &WebRequest, context: &Context) -> Result<HttpResponse, PageError> {
    require_manager(context)?;
    let user = request.field("user").unwrap_or_default().trim().to_string();
    if !changes::valid_id(&user) {
        return Err(PageError::BadRequest(format!(
            "“{user}” is not a valid user id: use 1 to 128 letters, digits, or - _ . : @ (an email address works)."
        )));
    }
    let seat = request.field("seat").is_some();
    let body = serde_json::json!({"roles": request.fields("roles"), "groups": request.fields("groups"), "seat": seat});
    let caller = portal_caller(&context.account, &context.user);
    let (seats_used, seats_total) = seats(&context.doc);
    let takes_new_seat = seat && !context.doc.users.get(&user).is_some_and(|existing| existing.seat);
    match changes::put_user(control_plane, &caller, &context.account, &user, body.to_string().as_bytes()) {
        Ok(_) => Ok(web::redirect(&format!("/portal/accounts/{}/users?done=user_saved", context.account))),
        Err(ApiError::Policy(_)) if takes_new_seat && seats_used >= seats_total as usize => {
            Err(PageError::Api(ApiError::Unprocessable(vec![format!(
                "all {seats_total} seats of the account are taken ({seats_used} of {seats_total}); remove a user, add {user} without a seat, or ask for more seats on the access requests page"
            )])))
        }
        Err(error) => Err(error.into()),
    }
}

fn remove_user(control_plane: &ControlPlane, context: &Context, user: &str) -> Result<HttpResponse, PageError> {
    require_manager(context)?;
    if user == context.user {
        return Err(PageError::Forbidden("You cannot remove yourself; ask another admin of your account.".into()));
    }
    let caller = portal_caller(&context.account, &context.user);
    changes::delete_user(control_plane, &caller, &context.account, user)?;
    Ok(web::redirect(&format!("/portal/accounts/{}/users?done=user_removed", context.account)))
}

#[derive(Template)]
#[template(path = "portal/devices.html")]
struct DevicesPage {
    chrome: Chrome,
    can_manage: bool,
    devices: Vec<String>,
    max_devices: String,
}

fn devices(_control_plane: &ControlPlane, context: &Context, done: Option<&str>) -> Result<HttpResponse, PageError> {
    let live = context.doc.licenses.iter().filter(|license| !license.cancelled);
    let max_devices = if live.clone().any(|license| license.max_devices.is_none()) {
        String::new()
    } else {
        live.filter_map(|license| license.max_devices).max().map(|max| max.to_string()).unwrap_or_default()
    };
    let page = DevicesPage {
        chrome: context.chrome("Devices", "devices", done),
        can_manage: context.can_manage(),
        devices: context.doc.devices.clone(),
        max_devices,
    };
    render(&page)
}

fn deactivate_device(control_plane: &ControlPlane, context: &Context, device: &str) -> Result<HttpResponse, PageError> {
    require_manager(context)?;
    let caller = portal_caller(&context.account, &context.user);
    changes::deactivate_device(control_plane, &caller, &context.account, device)?;
    Ok(web::redirect(&format!("/portal/accounts/{}/devices?done=device_deactivated", context.account)))
}

pub struct RequestRow {
    pub id: i64,
    pub account: String,
    pub user: String,
    pub requested_by: String,
    pub what: String,
    pub reason: String,
    pub status: &'static str,
    pub status_class: &'static str,
    pub decided_by: String,
    pub comment: String,
    pub created_at: String,
}

pub fn request_row(request: &AccessRequest) -> RequestRow {
    let what = match (request.feature.as_deref(), request.addon.as_deref(), request.seats) {
        (Some(feature), _, _) => format!("feature {feature}"),
        (_, Some(addon), _) => format!("add-on {addon}"),
        (_, _, Some(seats)) => format!("{seats} more seats"),
        _ => request.kind.as_str().to_string(),
    };
    RequestRow {
        id: request.id,
        account: request.account.clone(),
        user: request.user.clone(),
        requested_by: request.requested_by.clone(),
        what,
        reason: request.reason.clone(),
        status: request.status.as_str(),
        status_class: match request.status {
            AccessStatus::Pending => "warn",
            AccessStatus::Approved => "ok",
            AccessStatus::Denied => "bad",
        },
        decided_by: request.decided_by.clone().unwrap_or_default(),
        comment: request.comment.clone().unwrap_or_default(),
        created_at: request.created_at.clone(),
    }
}

pub struct WhatOption {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

#[derive(Template)]
#[template(path = "portal/requests.html")]
struct RequestsPage {
    chrome: Chrome,
    options: Vec<WhatOption>,
    requests: Vec<RequestRow>,
}

fn requests(
    control_plane: &ControlPlane,
    context: &Context,
    preselect: Option<&str>,
    done: Option<&str>,
) -> Result<HttpResponse, PageError> {
    let catalog = &control_plane.catalog_data;
    let mut options: Vec<WhatOption> = catalog
        .features
        .iter()
        .map(|feature| WhatOption {
            value: format!("feature:{}", feature.name),
            label: format!("Feature: {}", feature.name),
            selected: preselect == Some(feature.name.as_str()),
        })
        .collect();
    options.extend(catalog.addons.iter().map(|addon| WhatOption {
        value: format!("addon:{}", addon.name),
        label: format!("Add-on: {}", addon.name),
        selected: false,
    }));
    options.push(WhatOption { value: "seats".into(), label: "More seats".into(), selected: false });
    let mut found = control_plane.repository.access_requests(Some(&context.account), None)?;
    found.reverse();
    let page = RequestsPage {
        chrome: context.chrome("Access requests", "requests", done),
        options,
        requests: found.iter().map(request_row).collect(),
    };
    render(&page)
}

fn request_access(control_plane: &ControlPlane, request: &WebRequest, context: &Context) -> Result<HttpResponse, PageError> {
    let what = request.field("what").unwrap_or_default();
    let reason = request.field("reason").unwrap_or_default();
    let mut body = serde_json::json!({"account": context.account, "user": context.user, "reason": reason});
    let Some(object) = body.as_object_mut() else { return Err(PageError::Internal) };
    if let Some(feature) = what.strip_prefix("feature:") {
        object.insert("kind".into(), "feature".into());
        object.insert("feature".into(), feature.into());
    } else if let Some(addon) = what.strip_prefix("addon:") {
        object.insert("kind".into(), "addon".into());
        object.insert("addon".into(), addon.into());
    } else if what == "seats" {
        let seats = request.field("seats").unwrap_or("1").trim();
        let seats: u32 = seats.parse().map_err(|_| PageError::BadRequest(format!("“{seats}” is not a number of seats.")))?;
        object.insert("kind".into(), "seats".into());
        object.insert("seats".into(), seats.into());
    } else {
        return Err(PageError::BadRequest("Choose what you need access to.".into()));
    }
    let caller = portal_caller(&context.account, &context.user);
    changes::create_access_request(control_plane, &caller, body.to_string().as_bytes())?;
    Ok(web::redirect(&format!("/portal/accounts/{}/requests?done=request_sent", context.account)))
}

#[derive(Template)]
#[template(path = "portal/token.html")]
struct TokenPage {
    chrome: Chrome,
    token: String,
    expires: String,
    error: String,
}

/// The `exp` claim of a token this control plane just signed.
fn token_expiry(token: &str) -> Option<i64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

fn token(control_plane: &ControlPlane, context: &Context) -> Result<HttpResponse, PageError> {
    let chrome = context.chrome("License token", "token", None);
    let page = match control_plane.license_token(&context.account, control_plane.now()) {
        Ok(token) => {
            TokenPage { expires: token_expiry(&token).map(format_rfc3339).unwrap_or_default(), token, error: String::new(), chrome }
        }
        Err(ApiError::Unprocessable(messages)) => {
            TokenPage { chrome, token: String::new(), expires: String::new(), error: format!("No token now: {}.", messages.join("; ")) }
        }
        Err(error) => return Err(error.into()),
    };
    render(&page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LicenseDoc;

    fn license(expires_at: Option<i64>, grace_days: u32, trial: bool) -> LicenseDoc {
        LicenseDoc { id: "l".into(), plan: "team".into(), expires_at, grace_days, trial, seats: 1, ..LicenseDoc::default() }
    }

    #[test]
    fn license_states_in_words() {
        let day = 86_400;
        let now = 1_000 * day;
        assert_eq!(license_row(&license(None, 0, false), now).state, "valid");
        assert_eq!(license_row(&license(Some(now + 3 * day), 0, true), now).state_detail, "3 days left");
        let grace = license_row(&license(Some(now - day), 7, false), now);
        assert_eq!((grace.state, grace.state_detail.as_str()), ("grace", "6 days left"));
        assert_eq!(license_row(&license(Some(now - 8 * day), 7, false), now).state, "expired");
    }

    #[test]
    fn chart_periods_end_with_the_current_one() {
        let now = 1_764_806_400; // 2025-12-04
        let starts = period_starts(Period::Month, now);
        assert_eq!(starts.len(), CHART_PERIODS);
        assert_eq!(starts.last().copied(), Some(Period::Month.window(now).start));
        assert_eq!(period_starts(Period::Never, now).len(), 1);
        assert_eq!(period_label(Period::Month, Period::Month.window(now).start), "2025-12");
    }
}
