//! The browser plumbing of the portal and console: the request as the pages see it (path
//! segments, query, cookies, an url-encoded form), cookies with the right attributes, the
//! security headers every answer carries, and the compiled-in assets. No page logic.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;

use crate::ApiError;

pub type HttpResponse = tollgate_http::HttpResponse;

/// Why a page could not be shown; each becomes a page that says so, never a bare error.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// No live session of the right kind: the portal says to come back through the app, the
    /// console shows its sign-in form.
    #[error("your session has ended or was revoked")]
    NoSession { console: bool },
    /// An entry link that was used before.
    #[error("this link has already been used")]
    LinkReused,
    /// An entry link past its expiry.
    #[error("this link has expired")]
    LinkExpired,
    /// An entry link that never existed.
    #[error("this link is not valid")]
    LinkUnknown,
    /// A form without the session's CSRF token.
    #[error("this form did not come from this session")]
    Csrf,
    /// Signed in, but not allowed (another account's pages, a button the role does not have).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// A refusal from the JSON API's own handlers, shown in words.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The page could not be put together (logged where it happened).
    #[error("the page could not be shown")]
    Internal,
}

impl From<crate::store::StoreError> for PageError {
    fn from(error: crate::store::StoreError) -> PageError {
        PageError::Api(ApiError::Store(error))
    }
}

/// Whether a path belongs to the portal or the console.
pub fn serves(path: &str) -> bool {
    ["/portal", "/console"].iter().any(|root| path == *root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/')))
}

/// A request read whole: the pages work on it off the async workers.
#[derive(Debug, Default)]
pub struct WebRequest {
    post: bool,
    /// A HEAD request: link checkers and previews send these, and must not spend a link.
    head: bool,
    path: String,
    query: Vec<(String, String)>,
    cookies: Vec<(String, String)>,
    form: Vec<(String, String)>,
    /// The `Host` header, for absolute links.
    pub host: Option<String>,
}

/// Splits `a=1&b=2` (url-encoded, `+` for space) into decoded pairs.
pub fn parse_pairs(text: &str) -> Vec<(String, String)> {
    let decode = |part: &str| percent_decode_str(&part.replace('+', " ")).decode_utf8_lossy().into_owned();
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (decode(name), decode(value)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

impl WebRequest {
    /// Reads the request (the body of a POST too, within `limits`).
    pub async fn read(request: Request<Incoming>, limits: tollgate_http::BodyLimits) -> Result<WebRequest, HttpResponse> {
        let head = request.method() == Method::HEAD;
        let post = match *request.method() {
            Method::GET | Method::HEAD => false,
            Method::POST => true,
            _ => {
                let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, "pages take GET and POST only");
                response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static("GET, POST"));
                return Err(response);
            }
        };
        let path = request.uri().path().to_string();
        let query = request.uri().query().map(parse_pairs).unwrap_or_default();
        let cookies = request
            .headers()
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let host = request.headers().get(hyper::header::HOST).and_then(|value| value.to_str().ok()).map(str::to_string);
        let form = if post {
            let body = tollgate_http::read_body(request, limits).await?;
            parse_pairs(&String::from_utf8_lossy(&body))
        } else {
            Vec::new()
        };
        Ok(WebRequest { post, head, path, query, cookies, form, host })
    }

    /// A request made up in tests and benches.
    pub fn synthetic(post: bool, path: &str, query: &str, cookies: &[(&str, &str)], form: &str) -> WebRequest {
        WebRequest {
            post,
            head: false,
            path: path.to_string(),
            query: parse_pairs(query),
            cookies: cookies.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
            form: parse_pairs(form),
            host: None,
        }
    }

    pub fn is_post(&self) -> bool {
        self.post
    }

    pub fn is_head(&self) -> bool {
        self.head
    }

    /// The path's segments, percent-decoded.
    pub fn segments(&self) -> Vec<String> {
        self.path
            .trim_matches('/')
            .split('/')
            .filter(|segment| !segment.is_empty())
            .map(|segment| percent_decode_str(segment).decode_utf8_lossy().into_owned())
            .collect()
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// Every value of a repeated field (a multiple select).
    pub fn fields(&self, name: &str) -> Vec<String> {
        self.form.iter().filter(|(key, _)| key == name).map(|(_, value)| value.clone()).collect()
    }
}

/// Whether the public URL is https, so cookies are marked `Secure`.
pub fn is_https(public_url: Option<&str>) -> bool {
    public_url.is_some_and(|url| url.starts_with("https://"))
}

/// Where links point: the configured public URL, else `http://HOST` of the request (when the
/// host is a plain host name or address), else a path alone.
pub fn base_url(public_url: Option<&str>, host: Option<&str>) -> String {
    if let Some(url) = public_url {
        return url.trim_end_matches('/').to_string();
    }
    match host {
        Some(host) if !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')) => {
            format!("http://{host}")
        }
        _ => String::new(),
    }
}

/// The headers every page and asset carries: nothing from elsewhere, no framing, no sniffing,
/// no referrer (entry links carry a secret), no caching of pages.
pub fn security_headers(headers: &mut HeaderMap) {
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    headers.insert("permissions-policy", HeaderValue::from_static("camera=(), microphone=(), geolocation=()"));
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

fn text_response(status: StatusCode, text: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    security_headers(response.headers_mut());
    response
}

/// An HTML page.
pub fn html(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    security_headers(response.headers_mut());
    response
}

/// A download.
pub fn download(content_type: &'static str, file_name: &str, body: Vec<u8>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(disposition) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        response.headers_mut().insert("content-disposition", disposition);
    }
    security_headers(response.headers_mut());
    response
}

/// 303 See Other to `location` (after a form: the browser then GETs the page).
pub fn redirect(location: &str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, location);
    }
    security_headers(response.headers_mut());
    response
}

/// A cookie only this site's own pages get: HttpOnly, SameSite=Strict, Secure behind TLS;
/// `max_age` 0 deletes it.
pub fn set_cookie(response: &mut HttpResponse, name: &str, value: &str, path: &str, max_age: i64, secure: bool) {
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(SET_COOKIE, cookie);
    }
}

const STYLESHEET: &str = include_str!("../../assets/portal.css");
const SCRIPT: &str = include_str!("../../assets/portal.js");

/// `/portal/assets/NAME`: the stylesheet and the token page's copy button script.
pub fn asset(name: &str) -> Result<HttpResponse, PageError> {
    let (content_type, text) = match name {
        "portal.css" => ("text/css; charset=utf-8", STYLESHEET),
        "portal.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => return Err(PageError::NotFound("There is no such file.".into())),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    security_headers(response.headers_mut());
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_plus_and_percent() {
        assert_eq!(
            parse_pairs("a=x+y&b=%2Fz&c"),
            vec![("a".to_string(), "x y".to_string()), ("b".to_string(), "/z".to_string()), ("c".to_string(), String::new())]
        );
    }

    #[test]
    fn only_the_two_roots_are_pages() {
        assert!(serves("/portal") && serves("/portal/x") && serves("/console/accounts"));
        assert!(!serves("/portals") && !serves("/v1/portal/sessions") && !serves("/consoles"));
    }

    #[test]
    fn links_are_absolute_only_with_a_sane_host() {
        assert_eq!(base_url(Some("https://t.example/"), Some("x")), "https://t.example");
        assert_eq!(base_url(None, Some("127.0.0.1:8282")), "http://127.0.0.1:8282");
        assert_eq!(base_url(None, Some("evil.example/<x>")), "");
    }
}
