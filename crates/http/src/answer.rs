//! JSON answers: every body both servers send is built here, and every error has the one
//! shape `{"error": {"code": "...", "message": "..."}}` (`tollgate_protocol::ErrorJson`).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tollgate_protocol::ErrorJson;

/// What both servers answer with: a whole body in memory.
pub type HttpResponse = Response<Full<Bytes>>;

/// The body sent when an answer cannot be encoded (it never names the value).
const ENCODE_FAILED: &[u8] = br#"{"error":{"code":"internal","message":"cannot encode answer"}}"#;

/// `body` as JSON with `status`.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    json_response_sized(status, body, 256)
}

/// Like [`json_response`], with room for `capacity` bytes reserved up front (batches are large).
pub fn json_response_sized(status: StatusCode, body: &impl Serialize, capacity: usize) -> HttpResponse {
    let mut bytes = Vec::with_capacity(capacity);
    let status = if serde_json::to_writer(&mut bytes, body).is_ok() {
        status
    } else {
        bytes = ENCODE_FAILED.to_vec();
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error answer: `{"error": {"code", "message"}}`.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> HttpResponse {
    json_response(status, &ErrorJson::new(code, message))
}
