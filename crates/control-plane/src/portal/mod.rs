//! The customer portal (`/portal`) and the vendor console (`/console`): server-rendered HTML
//! over the same code paths as the JSON API. Owns the browser side only: single-use entry
//! links, cookie sessions, CSRF tokens, security headers, forms and pages. Every change goes
//! through `changes` (users, devices, access requests), every figure through `reports` and the
//! engine's `entitlements`, so a page never applies a business rule of its own; the only rule
//! here is who may press which button (delegated administration for the `admin` role).
//!
//! Pages are `askama` templates (checked at compile time, HTML-escaped by default) under
//! `templates/`; charts are SVG drawn by `chart`; the stylesheet and the one script are
//! compiled in and served from `/portal/assets/`, so `Content-Security-Policy: default-src
//! 'self'` holds and nothing is fetched from anywhere else.

pub mod chart;
mod console;
mod pages;
pub mod store;
mod web;

use std::sync::Arc;

use hyper::Request;
use hyper::body::Incoming;
use serde::Deserialize;

use crate::store::Scope;
use crate::{ApiError, Caller, ControlPlane, changes, random_hex, sha256_hex};
use web::{HttpResponse, PageError};
pub use web::{WebRequest, serves};

/// How long an entry link can be used, in seconds.
pub const LINK_TTL_SECS: i64 = 300;
/// How long a portal session lasts, in seconds.
pub const PORTAL_SESSION_SECS: i64 = 3_600;
/// How long a console session lasts, in seconds.
pub const CONSOLE_SESSION_SECS: i64 = 8 * 3_600;
/// The catalog role that makes a portal user an administrator of their account's users and
/// devices (delegated administration); everyone else sees those pages read-only.
pub const ADMIN_ROLE: &str = "admin";
/// Longest `return_url`, in bytes.
const MAX_RETURN_URL: usize = 2_048;

/// The actor written to the audit trail (and compared for self-approval) for a portal user:
/// `portal/ACCOUNT/USER`. Ids never contain `/`, so the parts cannot run together.
pub fn portal_actor(account: &str, user: &str) -> String {
    format!("portal/{account}/{user}")
}

/// The actor of a console user: `console/KEY_ID/PERSON`.
pub fn console_actor(key_id: &str, person: &str) -> String {
    format!("console/{key_id}/{person}")
}

/// The person behind an actor: the user of a portal actor, the person of a console actor, and
/// the key id itself for an API key (one key, one holder). Nobody may decide an access request
/// whose requester is the same person, whichever way each of them came in.
pub fn person_of(actor: &str) -> &str {
    actor.rsplit('/').next().unwrap_or(actor)
}

/// `POST /v1/portal/sessions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    pub account: String,
    pub user: String,
    #[serde(default)]
    pub return_url: Option<String>,
}

fn check_return_url(url: &str) -> Result<(), ApiError> {
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !scheme_ok || url.len() > MAX_RETURN_URL || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(format!(
            "`return_url` value `{url}` must be an http or https URL of at most {MAX_RETURN_URL} bytes without spaces"
        )));
    }
    Ok(())
}

/// `POST /v1/portal/sessions`: a single-use link into the portal for one user of one account,
/// valid for [`LINK_TTL_SECS`]. `host` (the request's `Host`) makes the link absolute when the
/// control plane has no configured public URL.
pub fn create_link(control_plane: &ControlPlane, caller: &Caller, host: Option<&str>, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let link: LinkBody = serde_json::from_slice(body).map_err(|error| ApiError::body(&error, body))?;
    for (field, id) in [("account", &link.account), ("user", &link.user)] {
        if !changes::valid_id(id) {
            return Err(ApiError::invalid(format!(
                "`{field}` value `{id}` must be 1 to 128 characters of letters, digits, `-`, `_`, `.`, `:` or `@`"
            )));
        }
    }
    caller.may_touch(&link.account)?;
    if let Some(url) = &link.return_url {
        check_return_url(url)?;
    }
    let account = control_plane
        .repository
        .account(&link.account)?
        .ok_or_else(|| ApiError::not_found("unknown_account", format!("`account` names unknown account `{}`", link.account)))?;
    if !account.users.contains_key(&link.user) {
        return Err(ApiError::not_found(
            "unknown_user",
            format!("`user` names unknown user `{}` of account `{}`", link.user, link.account),
        ));
    }
    let token = random_hex(32).map_err(|error| {
        tracing::error!(%error, "no randomness for a portal link");
        ApiError::Internal
    })?;
    let now = control_plane.now();
    let expires_at = now + LINK_TTL_SECS;
    control_plane.repository.create_link(&store::NewLink {
        token_sha256: &sha256_hex(&token),
        account: &link.account,
        user: &link.user,
        return_url: link.return_url.as_deref(),
        created_at: now,
        expires_at,
    })?;
    let base = web::base_url(control_plane.config().public_url.as_deref(), host);
    Ok(serde_json::json!({
        "url": format!("{base}/portal/enter?token={token}"),
        "expires_at": tollgate_core::period::format_rfc3339(expires_at),
    }))
}

/// Answers a request under `/portal` or `/console`.
pub async fn handle(control_plane: Arc<ControlPlane>, request: Request<Incoming>) -> HttpResponse {
    let web_request = match WebRequest::read(request, control_plane.config().body_limits()).await {
        Ok(web_request) => web_request,
        Err(response) => return response,
    };
    let secure = web::is_https(control_plane.config().public_url.as_deref());
    match tokio::task::spawn_blocking(move || render(&control_plane, &web_request)).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "portal request task failed");
            pages::error_page(&PageError::Internal, secure)
        }
    }
}

/// Answers one page request synchronously (the blocking pool's side of [`handle`]); public so
/// that benches can time rendering without a socket.
pub fn render(control_plane: &ControlPlane, request: &WebRequest) -> HttpResponse {
    match dispatch(control_plane, request) {
        Ok(response) => response,
        Err(error) => pages::error_page(&error, web::is_https(control_plane.config().public_url.as_deref())),
    }
}

fn dispatch(control_plane: &ControlPlane, request: &WebRequest) -> Result<HttpResponse, PageError> {
    let segments = request.segments();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let post = request.is_post();
    match segments.as_slice() {
        ["portal", "assets", name] if !post => web::asset(name),
        ["portal", "enter"] if !post => pages::enter(control_plane, request),
        ["portal"] if !post => pages::portal_home(control_plane, request),
        ["portal", "signout"] if post => pages::portal_signout(control_plane, request),
        ["portal", "accounts", account, rest @ ..] => pages::portal_account(control_plane, request, account, rest),
        ["console", rest @ ..] => console::dispatch(control_plane, request, rest),
        _ => Err(PageError::NotFound("There is no page at this address.".into())),
    }
}

/// The caller a portal user acts as: bound to their account, audited as the user.
fn portal_caller(account: &str, user: &str) -> Caller {
    Caller { key_id: portal_actor(account, user), scope: Scope::Account, account: Some(account.to_string()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_person_is_the_same_however_they_came_in() {
        assert_eq!(person_of(&portal_actor("acme", "alice@acme.com")), "alice@acme.com");
        assert_eq!(person_of(&console_actor("0123456789abcdef", "alice@acme.com")), "alice@acme.com");
        assert_eq!(person_of("0123456789abcdef"), "0123456789abcdef");
    }

    #[test]
    fn return_urls_must_be_web_addresses() {
        assert!(check_return_url("https://app.example/settings").is_ok());
        assert!(check_return_url("javascript:alert(1)").is_err());
        assert!(check_return_url("https://a.example/x y").is_err());
    }
}
