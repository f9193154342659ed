//! The vendor console: sign-in with an admin API key (exchanged for a session), account
//! search by id prefix, the account page, the access-request queue, analytics charts, the
//! usage export and webhook deliveries. Reads go through `reports` and the repository's
//! queries, decisions through `changes::decide_access_request`, the same as the JSON API.

use askama::Template;
use hyper::StatusCode;
use tollgate_core::period::{format_rfc3339, parse_rfc3339};

use super::chart;
use super::pages::{self, CONSOLE_COOKIE, Chrome, LicenseRow, NavLink, RequestRow, UserRow, check_csrf, session_of};
use super::store::{SessionKind, WebSession};
use super::web::{self, HttpResponse, PageError, WebRequest};
use super::{CONSOLE_SESSION_SECS, console_actor};
use crate::store::{self, AccessStatus, AuditEntry, Scope};
use crate::webhook_store::DeliveryStatus;
use crate::{ApiError, Caller, ControlPlane, authenticate, changes, reports};

/// Most accounts one search lists.
pub const SEARCH_LIMIT: u32 = 50;
/// Most audit entries on an account page.
const AUDIT_LIMIT: u32 = 100;
/// The cookie holding the sign-in form's CSRF token before there is a session.
const SIGNIN_COOKIE: &str = "tg_console_signin";

/// A signed-in console user.
struct Staff {
    id_sha256: String,
    session: WebSession,
}

impl Staff {
    fn caller(&self) -> Caller {
        Caller { key_id: console_actor(&self.session.key_id, &self.session.person), scope: Scope::Admin, account: None }
    }

    fn chrome(&self, title: &str, section: &str, done: Option<&str>) -> Chrome {
        let sections: [(&str, &'static str); 5] = [
            ("accounts", "Accounts"),
            ("requests", "Access requests"),
            ("analytics", "Analytics"),
            ("export", "Usage export"),
            ("webhooks", "Webhooks"),
        ];
        let mut chrome = Chrome {
            title: title.to_string(),
            console: true,
            person: self.session.person.clone(),
            csrf: self.session.csrf.clone(),
            nav: sections
                .iter()
                .map(|(path, label)| NavLink { href: format!("/console/{path}"), label, current: *path == section })
                .collect(),
            ..Chrome::default()
        };
        if let Some(done) = done {
            // Reuse the portal's confirmations by code.
            chrome.done = pages_done(done).to_string();
        }
        chrome
    }
}

fn pages_done(code: &str) -> &'static str {
    match code {
        "approved" => "The request is approved and granted.",
        "denied" => "The request is denied.",
        "sessions_revoked" => "Every portal session of this account is revoked.",
        _ => "",
    }
}

/// The console session, refused when its admin key has been revoked since sign-in.
fn staff(control_plane: &ControlPlane, request: &WebRequest) -> Result<Staff, PageError> {
    let signed = session_of(control_plane, request, SessionKind::Console)?;
    if control_plane.repository.find_key(&signed.session.key_id)?.is_none() {
        control_plane.repository.revoke_session(&signed.id_sha256, control_plane.now())?;
        return Err(PageError::NoSession { console: true });
    }
    Ok(Staff { id_sha256: signed.id_sha256, session: signed.session })
}

fn render(template: &impl Template) -> Result<HttpResponse, PageError> {
    template.render().map(|body| web::html(StatusCode::OK, body)).map_err(|error| {
        tracing::error!(%error, "console page did not render");
        PageError::Internal
    })
}

/// `/console/...`.
pub fn dispatch(control_plane: &ControlPlane, request: &WebRequest, rest: &[&str]) -> Result<HttpResponse, PageError> {
    let post = request.is_post();
    match rest {
        [] if !post => match staff(control_plane, request) {
            Ok(_) => Ok(web::redirect("/console/accounts")),
            Err(PageError::NoSession { .. }) => signin_form(control_plane, String::new()),
            Err(error) => Err(error),
        },
        ["signin"] if post => signin(control_plane, request),
        ["signout"] if post => {
            let staff = staff(control_plane, request)?;
            check_csrf(request, &staff.session.csrf)?;
            control_plane.repository.revoke_session(&staff.id_sha256, control_plane.now())?;
            let mut response = web::redirect("/console");
            web::set_cookie(&mut response, CONSOLE_COOKIE, "", "/console", 0, secure(control_plane));
            Ok(response)
        }
        _ => {
            let staff = staff(control_plane, request)?;
            if post {
                check_csrf(request, &staff.session.csrf)?;
            }
            let done = request.query("done");
            match (post, rest) {
                (false, ["accounts"]) => search(control_plane, &staff, request.query("q").unwrap_or_default()),
                (false, ["accounts", account]) => account_page(control_plane, &staff, account, done),
                (true, ["accounts", account, "revoke-sessions"]) => revoke_sessions(control_plane, &staff, account),
                (false, ["requests"]) => queue(control_plane, &staff, done),
                (true, ["requests", id, "decide"]) => decide(control_plane, &staff, request, id),
                (false, ["analytics"]) => analytics(control_plane, &staff, request),
                (false, ["export"]) => export_form(control_plane, &staff),
                (false, ["export.csv"]) => export(control_plane, request),
                (false, ["webhooks"]) => deliveries(control_plane, &staff, request),
                _ => Err(PageError::NotFound("There is no console page at this address.".into())),
            }
        }
    }
}

fn secure(control_plane: &ControlPlane) -> bool {
    web::is_https(control_plane.config().public_url.as_deref())
}

#[derive(Template)]
#[template(path = "console/signin.html")]
struct SigninPage {
    chrome: Chrome,
    error: String,
}

/// The sign-in form, with a fresh token in both the form and a cookie (there is no session to
/// keep it in yet): a form posted from elsewhere has neither.
fn signin_form(control_plane: &ControlPlane, error: String) -> Result<HttpResponse, PageError> {
    let token = pages::secret()?;
    let chrome = Chrome { title: "Sign in".into(), console: true, csrf: token.clone(), ..Chrome::default() };
    let status = if error.is_empty() { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
    let mut response = render(&SigninPage { chrome, error })?;
    *response.status_mut() = status;
    web::set_cookie(&mut response, SIGNIN_COOKIE, &token, "/console", 600, secure(control_plane));
    Ok(response)
}

fn signin(control_plane: &ControlPlane, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let expected = request.cookie(SIGNIN_COOKIE).unwrap_or_default();
    if expected.is_empty() {
        return Err(PageError::Csrf);
    }
    check_csrf(request, expected)?;
    let person = request.field("person").unwrap_or_default().trim().to_string();
    if !changes::valid_id(&person) {
        return signin_form(control_plane, "Give your name or email: 1 to 128 letters, digits, or - _ . : @.".into());
    }
    let key = request.field("key").unwrap_or_default().trim();
    let caller = match authenticate(control_plane.repository.as_ref(), key) {
        Ok(caller) if caller.scope == Scope::Admin && caller.account.is_none() => caller,
        Ok(_) => return signin_form(control_plane, "The console needs an admin key; this key has another scope.".into()),
        Err(ApiError::Unauthorized) => return signin_form(control_plane, "That key is not a valid API key.".into()),
        Err(error) => return Err(error.into()),
    };
    let now = control_plane.now();
    let session = WebSession {
        kind: SessionKind::Console,
        account: None,
        person,
        key_id: caller.key_id,
        csrf: pages::secret()?,
        return_url: None,
        expires_at: now + CONSOLE_SESSION_SECS,
    };
    let id = pages::start_session(control_plane, &session)?;
    let mut response = web::redirect("/console/accounts");
    web::set_cookie(&mut response, CONSOLE_COOKIE, &id, "/console", CONSOLE_SESSION_SECS, secure(control_plane));
    web::set_cookie(&mut response, SIGNIN_COOKIE, "", "/console", 0, secure(control_plane));
    Ok(response)
}

#[derive(Template)]
#[template(path = "console/accounts.html")]
struct SearchPage {
    chrome: Chrome,
    query: String,
    results: Vec<String>,
    more: bool,
}

fn search(control_plane: &ControlPlane, staff: &Staff, query: &str) -> Result<HttpResponse, PageError> {
    let query = query.trim();
    let mut results = control_plane.repository.accounts_with_prefix(query, SEARCH_LIMIT + 1)?;
    let more = results.len() > SEARCH_LIMIT as usize;
    results.truncate(SEARCH_LIMIT as usize);
    render(&SearchPage { chrome: staff.chrome("Accounts", "accounts", None), query: query.to_string(), results, more })
}

pub struct AuditRow {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
}

fn audit_row(entry: &AuditEntry) -> AuditRow {
    AuditRow {
        seq: entry.seq,
        at: entry.at.clone(),
        actor: entry.key_id.clone(),
        action: entry.action.clone(),
        target: entry.target.clone().unwrap_or_default(),
    }
}

pub struct UsageLine {
    pub meter: String,
    pub period_start: String,
    pub used: u64,
    pub limit: String,
}

#[derive(Template)]
#[template(path = "console/account.html")]
struct AccountPage {
    chrome: Chrome,
    account: String,
    status: &'static str,
    seats_used: usize,
    seats_total: u32,
    portal_sessions: u64,
    licenses: Vec<LicenseRow>,
    orders: Vec<AuditRow>,
    users: Vec<UserRow>,
    usage: Vec<UsageLine>,
    audit: Vec<AuditRow>,
    audit_limit: u32,
}

fn account_page(control_plane: &ControlPlane, staff: &Staff, account: &str, done: Option<&str>) -> Result<HttpResponse, PageError> {
    let now = control_plane.now();
    let doc = control_plane.repository.account(account)?.ok_or_else(|| PageError::NotFound(format!("There is no account {account}.")))?;
    let audit = control_plane.repository.recent_audit(account, AUDIT_LIMIT)?;
    let usage = pages::usage_rows(control_plane, account, reports::History::Current)?;
    let (seats_used, seats_total) = pages::seats(&doc);
    let mut chrome = staff.chrome(&format!("Account {account}"), "accounts", done);
    chrome.account = account.to_string();
    let page = AccountPage {
        chrome,
        account: account.to_string(),
        status: match doc.status {
            crate::store::AccountState::Active => "active",
            crate::store::AccountState::Suspended => "suspended",
        },
        seats_used,
        seats_total,
        portal_sessions: control_plane.repository.count_account_sessions(account, now)?,
        licenses: doc.licenses.iter().map(|license| pages::license_row(license, now)).collect(),
        orders: audit.iter().filter(|entry| entry.action.starts_with("order.")).map(audit_row).collect(),
        users: pages::user_rows(&doc, ""),
        usage: usage
            .iter()
            .map(|row| UsageLine {
                meter: row.meter.clone(),
                period_start: row.period_start.clone(),
                used: row.used,
                limit: row.limit.map_or_else(|| "none".to_string(), |limit| limit.to_string()),
            })
            .collect(),
        audit: audit.iter().map(audit_row).collect(),
        audit_limit: AUDIT_LIMIT,
    };
    render(&page)
}

/// Revokes every portal session of an account, and says so in its audit trail.
fn revoke_sessions(control_plane: &ControlPlane, staff: &Staff, account: &str) -> Result<HttpResponse, PageError> {
    let now = control_plane.now();
    let n_revoked = control_plane.repository.revoke_account_sessions(account, now)?;
    let actor = staff.caller().key_id;
    store::write(control_plane.repository.as_ref(), |transaction: &mut dyn store::Transaction| {
        transaction.audit(&store::NewAudit {
            at: now,
            key_id: &actor,
            action: "portal.sessions_revoke",
            account: Some(account),
            target: None,
            before: None,
            after: Some(serde_json::json!({"revoked": n_revoked})),
        })
    })?;
    Ok(web::redirect(&format!("/console/accounts/{account}?done=sessions_revoked")))
}

#[derive(Template)]
#[template(path = "console/requests.html")]
struct QueuePage {
    chrome: Chrome,
    pending: Vec<RequestRow>,
    decided: Vec<RequestRow>,
}

fn queue(control_plane: &ControlPlane, staff: &Staff, done: Option<&str>) -> Result<HttpResponse, PageError> {
    let pending = control_plane.repository.access_requests(None, Some(AccessStatus::Pending))?;
    let mut decided: Vec<RequestRow> = control_plane
        .repository
        .access_requests(None, None)?
        .iter()
        .filter(|request| request.status != AccessStatus::Pending)
        .map(pages::request_row)
        .collect();
    decided.reverse();
    decided.truncate(50);
    render(&QueuePage {
        chrome: staff.chrome("Access requests", "requests", done),
        pending: pending.iter().map(pages::request_row).collect(),
        decided,
    })
}

fn decide(control_plane: &ControlPlane, staff: &Staff, request: &WebRequest, id: &str) -> Result<HttpResponse, PageError> {
    let id: i64 = id.parse().map_err(|_| PageError::NotFound(format!("There is no access request {id}.")))?;
    let approve = match request.field("decision") {
        Some("approve") => true,
        Some("deny") => false,
        _ => return Err(PageError::BadRequest("Choose Approve or Deny.".into())),
    };
    let body = serde_json::json!({"comment": request.field("comment").unwrap_or_default()});
    changes::decide_access_request(control_plane, &staff.caller(), id, approve, body.to_string().as_bytes())?;
    Ok(web::redirect(if approve { "/console/requests?done=approved" } else { "/console/requests?done=denied" }))
}

pub struct NearRow {
    pub account: String,
    pub meter: String,
    pub used: u64,
    pub limit: u64,
    pub kind: String,
}

#[derive(Template)]
#[template(path = "console/analytics.html")]
struct AnalyticsPage {
    chrome: Chrome,
    from: String,
    to: String,
    adoption_chart: String,
    denial_chart: String,
    near_chart: String,
    near: Vec<NearRow>,
}

/// `from` and `to` of a form, each defaulting to the bounds of the current UTC month.
fn range(request: &WebRequest, now: i64) -> Result<(i64, i64), PageError> {
    let month = tollgate_core::model::Period::Month.window(now);
    let read = |name: &str, default: i64| -> Result<i64, PageError> {
        match request.query(name).map(str::trim).filter(|text| !text.is_empty()) {
            None => Ok(default),
            Some(text) => parse_rfc3339(text)
                .ok_or_else(|| PageError::BadRequest(format!("“{text}” is not an RFC 3339 time, such as 2026-11-01T00:00:00Z."))),
        }
    };
    let from = read("from", month.start)?;
    let to = read("to", month.reset_at.unwrap_or(i64::MAX))?;
    if from >= to {
        return Err(PageError::BadRequest("“From” must be before “to”.".into()));
    }
    Ok((from, to))
}

fn analytics(control_plane: &ControlPlane, staff: &Staff, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let now = control_plane.now();
    let (from, to) = range(request, now)?;
    let features = reports::feature_analytics(control_plane, from, to)?;
    let mut adoption = Vec::new();
    let mut denials: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for feature in features.get("features").and_then(serde_json::Value::as_array).into_iter().flatten() {
        let name = feature.get("feature").and_then(serde_json::Value::as_str).unwrap_or_default();
        let number = |field: &str| feature.get(field).and_then(serde_json::Value::as_u64).unwrap_or(0);
        adoption.push((format!("{name} · accounts"), number("accounts")));
        adoption.push((format!("{name} · users"), number("users")));
        for (reason, count) in feature.get("denied_by_reason").and_then(serde_json::Value::as_object).into_iter().flatten() {
            *denials.entry(reason.clone()).or_insert(0) += count.as_u64().unwrap_or(0);
        }
    }
    let mut denials: Vec<(String, u64)> = denials.into_iter().collect();
    denials.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    let limits = reports::limit_analytics(control_plane, 0.8, now)?;
    let near: Vec<NearRow> = limits
        .get("accounts")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .map(|row| NearRow {
            account: row.get("account").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
            meter: row.get("meter").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
            used: row.get("used").and_then(serde_json::Value::as_u64).unwrap_or(0),
            limit: row.get("limit").and_then(serde_json::Value::as_u64).unwrap_or(0),
            kind: row.get("kind").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
        })
        .collect();
    let near_bars: Vec<(String, u64)> = near
        .iter()
        .take(20)
        .map(|row| (format!("{} · {}", row.account, row.meter), row.used.saturating_mul(100) / row.limit.max(1)))
        .collect();
    let page = AnalyticsPage {
        chrome: staff.chrome("Analytics", "analytics", None),
        from: format_rfc3339(from),
        to: format_rfc3339(to),
        adoption_chart: chart::horizontal("Accounts and users that were allowed each feature", &adoption),
        denial_chart: chart::horizontal("Denials by reason", &denials),
        near_chart: chart::horizontal("Percent of the limit used, highest first", &near_bars),
        near,
    };
    render(&page)
}

#[derive(Template)]
#[template(path = "console/export.html")]
struct ExportPage {
    chrome: Chrome,
    from: String,
    to: String,
}

fn export_form(control_plane: &ControlPlane, staff: &Staff) -> Result<HttpResponse, PageError> {
    let month = tollgate_core::model::Period::Month.window(control_plane.now());
    render(&ExportPage {
        chrome: staff.chrome("Usage export", "export", None),
        from: format_rfc3339(month.start),
        to: month.reset_at.map(format_rfc3339).unwrap_or_default(),
    })
}

/// `GET /console/export.csv`: the rows of `GET /v1/usage/export?format=csv`.
fn export(control_plane: &ControlPlane, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let now = control_plane.now();
    let (from, to) = range(request, now)?;
    let granularity = match request.query("granularity") {
        None | Some("periods") => reports::Granularity::Periods,
        Some("events") => reports::Granularity::Events,
        Some(other) => return Err(PageError::BadRequest(format!("“{other}” is not a kind of row."))),
    };
    let account = request.query("account").map(str::trim).filter(|account| !account.is_empty()).map(str::to_string);
    let query = reports::ExportQuery { format: reports::Format::Csv, granularity, from, to, account };
    let exported = reports::export(control_plane, &query, now)?;
    Ok(web::download(exported.content_type, "usage.csv", exported.body))
}

pub struct DeliveryRow {
    pub id: i64,
    pub event_type: String,
    pub endpoint: String,
    pub status: &'static str,
    pub status_class: &'static str,
    pub attempts: u32,
    pub last_error: String,
    pub created_at: String,
}

pub struct Filter {
    pub query: String,
    pub label: &'static str,
    pub current: bool,
}

#[derive(Template)]
#[template(path = "console/webhooks.html")]
struct DeliveriesPage {
    chrome: Chrome,
    filters: Vec<Filter>,
    deliveries: Vec<DeliveryRow>,
}

fn deliveries(control_plane: &ControlPlane, staff: &Staff, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let status = request.query("status").and_then(DeliveryStatus::parse);
    let found = control_plane.repository.deliveries(status, 0, 200)?;
    let filters = [
        ("", "all", None),
        ("?status=pending", "pending", Some(DeliveryStatus::Pending)),
        ("?status=failed", "failed", Some(DeliveryStatus::Failed)),
        ("?status=delivered", "delivered", Some(DeliveryStatus::Delivered)),
    ]
    .into_iter()
    .map(|(query, label, filter)| Filter { query: query.to_string(), label, current: filter == status })
    .collect();
    let rows = found
        .iter()
        .rev()
        .map(|delivery| DeliveryRow {
            id: delivery.id,
            event_type: delivery.event_type.clone(),
            endpoint: delivery.endpoint_id.clone(),
            status: delivery.status.as_str(),
            status_class: match delivery.status {
                DeliveryStatus::Delivered => "ok",
                DeliveryStatus::Pending => "warn",
                DeliveryStatus::Failed => "bad",
            },
            attempts: delivery.attempts,
            last_error: delivery.last_error.clone().unwrap_or_default(),
            created_at: format_rfc3339(delivery.created_at),
        })
        .collect();
    render(&DeliveriesPage { chrome: staff.chrome("Webhook deliveries", "webhooks", None), filters, deliveries: rows })
}
