//! HTTP plumbing both Tollgate servers share, and nothing else: the accept and drain loop
//! (`serve`), JSON answers in the one error shape (`answer`), a pooled HTTP client with
//! timeouts and its URL form (`client`), retry backoff with jitter (`backoff`), atomic file
//! writes (`fs`), and giving the heap a burst of connections freed back to the OS (`memory`).
//! It owns no routes and no state; it never decides anything.

pub mod answer;
pub mod backoff;
pub mod client;
pub mod fs;
pub mod memory;
pub mod serve;

pub use answer::{HttpResponse, error_response, json_response, json_response_sized};
pub use serve::{BodyLimits, DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, connections, query_param, read_body};
