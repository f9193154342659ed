//! The HTTP backend: a pooled hyper client to the sidecar, a timeout per attempt, and
//! retries with doubling waits for answers that say the sidecar is unavailable. It only
//! moves JSON; it never decides.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{CheckRequest, ClientError, Decision, DecisionWire, Entitlements, MeterRequest, MeterResult};

/// Idle keep-alive connections kept per host: a sidecar is one host, so this is the pool.
const MAX_IDLE: usize = 32;

pub(crate) struct Remote {
    base_url: String,
    http: HyperClient<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    retries: u32,
    retry_backoff: Duration,
}

#[derive(Deserialize)]
struct BatchWire {
    results: Vec<DecisionWire>,
}

#[derive(Deserialize)]
struct ErrorWire {
    error: ErrorDetailWire,
}

#[derive(Deserialize)]
struct ErrorDetailWire {
    code: String,
    message: String,
}

impl Remote {
    pub(crate) fn new(base_url: &str, timeout: Duration, retries: u32, retry_backoff: Duration) -> Result<Remote, ClientError> {
        let trimmed = base_url.trim_end_matches('/');
        let valid = trimmed.strip_prefix("http://").is_some_and(|rest| !rest.is_empty()) && trimmed.parse::<hyper::Uri>().is_ok();
        if !valid {
            return Err(ClientError::InvalidUrl { url: base_url.to_string() });
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let http = HyperClient::builder(TokioExecutor::new()).pool_max_idle_per_host(MAX_IDLE).build(connector);
        Ok(Remote { base_url: trimmed.to_string(), http, timeout, retries, retry_backoff })
    }

    pub(crate) fn describe(&self) -> String {
        self.base_url.clone()
    }

    pub(crate) async fn check(&self, request: &CheckRequest) -> Result<Decision, ClientError> {
        let wire: DecisionWire = self.call(Method::POST, "/v1/check", Some(body("/v1/check", request)?)).await?;
        Decision::try_from(wire)
    }

    pub(crate) async fn batch(&self, requests: &[CheckRequest]) -> Result<Vec<Decision>, ClientError> {
        let payload = body("/v1/check/batch", &serde_json::json!({ "checks": requests }))?;
        let wire: BatchWire = self.call(Method::POST, "/v1/check/batch", Some(payload)).await?;
        wire.results.into_iter().map(Decision::try_from).collect()
    }

    /// `request.id` is set by the caller, so every retry below sends the same id.
    pub(crate) async fn meter(&self, request: &MeterRequest) -> Result<MeterResult, ClientError> {
        let mut result: MeterResult = self.call(Method::POST, "/v1/meter", Some(body("/v1/meter", request)?)).await?;
        result.id = request.id.clone().unwrap_or_default();
        Ok(result)
    }

    pub(crate) async fn entitlements(&self, account: &str, user: Option<&str>, region: Option<&str>) -> Result<Entitlements, ClientError> {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let mut path = format!("/v1/entitlements/{}", utf8_percent_encode(account, NON_ALPHANUMERIC));
        let query: Vec<String> = [("user", user), ("region", region)]
            .into_iter()
            .filter_map(|(name, value)| value.map(|value| format!("{name}={}", utf8_percent_encode(value, NON_ALPHANUMERIC))))
            .collect();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.call(Method::GET, &path, None).await
    }

    /// Sends one request, retrying while the answer says the sidecar is unavailable.
    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, payload: Option<Bytes>) -> Result<T, ClientError> {
        let mut wait = self.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.attempt(method.clone(), path, payload.clone()).await {
                Err(error) if error.is_unavailable() && attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                other => return other,
            }
        }
    }

    async fn attempt<T: DeserializeOwned>(&self, method: Method, path: &str, payload: Option<Bytes>) -> Result<T, ClientError> {
        let uri = format!("{}{path}", self.base_url);
        let mut builder = Request::builder().method(method).uri(&uri);
        if payload.is_some() {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = builder
            .body(Full::new(payload.unwrap_or_default()))
            .map_err(|error| ClientError::Unreachable { path: path.to_string(), message: error.to_string() })?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|error| ClientError::Unreachable { path: path.to_string(), message: error.to_string() })?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|error| ClientError::Unreachable { path: path.to_string(), message: error.to_string() })?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout { path: path.to_string(), timeout: self.timeout })??;
        if status != StatusCode::OK {
            let (code, message) = match serde_json::from_slice::<ErrorWire>(&bytes) {
                Ok(wire) => (wire.error.code, wire.error.message),
                Err(_) => ("unknown".to_string(), String::from_utf8_lossy(&bytes).into_owned()),
            };
            return Err(ClientError::Api { path: path.to_string(), status: status.as_u16(), code, message });
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { path: path.to_string(), source })
    }
}

fn body(path: &str, value: &impl serde::Serialize) -> Result<Bytes, ClientError> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|source| ClientError::Encode { path: path.to_string(), source })
}
