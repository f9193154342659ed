//! The one outbound HTTP client: a pooled hyper client (connections are kept and reused) with
//! a connect timeout, a whole-exchange timeout and a cap on the answer's size. Used by the
//! sidecar's subscription and usage shipper and by the control plane's webhooks. Plain HTTP
//! only: for TLS, a local proxy (an Envoy or nginx sidecar) fronts the peer.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// An `http://HOST:PORT[/PATH]` address: where a peer is and the path prefix (or path) on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `HOST:PORT`
    pub authority: String,
    /// Empty, or a path (with its query, if any) starting with `/`; a trailing `/` of a path
    /// without a query is dropped.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` must look like http://HOST:PORT or http://HOST:PORT/PATH (https is not supported; use a local TLS proxy)")]
pub struct UrlError(pub String);

impl HttpUrl {
    /// Parses `http://HOST:PORT[/PATH]`; the port is required, so a typo never silently
    /// means port 80.
    pub fn parse(text: &str) -> Result<HttpUrl, UrlError> {
        let bad = || UrlError(text.to_string());
        let rest = text.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) if path.contains('?') => (authority, format!("/{path}")),
            Some((authority, path)) => (authority, format!("/{}", path.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || authority.contains(['@', '?', '#', ' ']) || path.contains(['#', ' ']) {
            return Err(bad());
        }
        let path = if path == "/" { String::new() } else { path };
        Ok(HttpUrl { authority: authority.to_string(), path })
    }

    /// The absolute URI of `path_and_query` under this address's path.
    pub fn join(&self, path_and_query: &str) -> String {
        format!("http://{}{}{path_and_query}", self.authority, self.path)
    }

    /// The address itself as an absolute URI (path `/` when empty).
    pub fn absolute(&self) -> String {
        format!("http://{}{}", self.authority, self.target())
    }

    /// The path itself as a request target (`/` when empty).
    pub fn target(&self) -> String {
        if self.path.is_empty() { "/".to_string() } else { self.path.clone() }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the request: {0}")]
    Build(String),
    #[error("cannot connect to `{authority}`: {message}")]
    Connect { authority: String, message: String },
    #[error("request to `{authority}` failed: {message}")]
    Request { authority: String, message: String },
    #[error("no answer from `{authority}` within {limit:?}")]
    Timeout { authority: String, limit: Duration },
    #[error("cannot read the answer from `{authority}`: {message}")]
    Body { authority: String, message: String },
}

/// An answer: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The pooled client. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClient {
    /// A client whose connection attempts give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        HttpClient { inner }
    }

    /// Sends `request` and reads an answer of at most `max_body` bytes, all within `limit`.
    pub async fn send(&self, request: Request<Full<Bytes>>, limit: Duration, max_body: usize) -> Result<Answer, ClientError> {
        let authority = request.uri().authority().map_or_else(String::new, |authority| authority.to_string());
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|error| {
                let (authority, message) = (authority.clone(), error_chain(&error));
                if error.is_connect() { ClientError::Connect { authority, message } } else { ClientError::Request { authority, message } }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|error| ClientError::Body { authority: authority.clone(), message: error.to_string() })?
                .to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(ClientError::Timeout { authority, limit }),
        }
    }
}

/// An error and its sources on one line: hyper's own message alone says only "client error".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_addresses_with_a_port_only() {
        let url = HttpUrl::parse("http://127.0.0.1:9000/hooks/usage/").unwrap();
        assert_eq!((url.authority.as_str(), url.path.as_str()), ("127.0.0.1:9000", "/hooks/usage"));
        assert_eq!(url.join("/v1/snapshot?after=1"), "http://127.0.0.1:9000/hooks/usage/v1/snapshot?after=1");
        assert_eq!(HttpUrl::parse("http://cp.local:8282").unwrap().target(), "/");
        assert_eq!(HttpUrl::parse("http://cp.local:8282/").unwrap().path, "");
        for bad in ["https://h:443/x", "http://h/x", "http://:80/x", "ftp://x:1/", "http://h:port/", "http://u@h:1/", "h:1"] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
