//! The accept loop the sidecar and the control plane share: serves HTTP/1.1 and h2c
//! connections from a bound listener until `shutdown` resolves, then stops accepting, calls
//! `on_close` (so that long-polls can answer at once), and drains open connections for at most
//! the grace timeout. It owns no routes and no state; the handler is the caller's. Also the
//! capped body read and the query-parameter lookup both servers use.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// Default of `--header-read-timeout-secs`: how long a client may take to send a request's
/// head (request line and headers), idle keep-alive time before it included.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `--body-read-timeout-secs`: how long a client may take to send a request's body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How much body a request may have and how long the client may take to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// Serves `handler` on every connection `listener` accepts; see the module doc. A client that
/// does not send a whole request head within `header_timeout` is disconnected, so slow or idle
/// connections cannot pile up.
pub async fn connections<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    on_close: impl FnOnce(),
    drain_timeout: Duration,
    header_timeout: Duration,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // HTTP/2: a connection that stops answering pings is closed too.
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(header_timeout).keep_alive_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(handler.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
        });
    }
    drop(listener);
    on_close();
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(drain_timeout) => tracing::warn!("drain timed out; closing remaining connections"),
    }
}

/// Reads a request body of at most `limits.max_bytes` bytes within `limits.timeout`: 413 past
/// the size (refused up front when the declared length says so), 408 past the time, 400 when
/// the body cannot be read.
pub async fn read_body(request: Request<Incoming>, limits: BodyLimits) -> Result<Bytes, Response<Full<Bytes>>> {
    let max_body = limits.max_bytes;
    let too_large = || {
        crate::answer::error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {max_body} bytes"),
        )
    };
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|value| value.to_str().ok()).and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|declared| declared > max_body as u64) {
        return Err(too_large());
    }
    let Ok(collected) = tokio::time::timeout(limits.timeout, Limited::new(request.into_body(), max_body).collect()).await else {
        return Err(crate::answer::error_response(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {} s", limits.timeout.as_secs_f64()),
        ));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => {
            Err(crate::answer::error_response(StatusCode::BAD_REQUEST, "body_unreadable", format!("cannot read request body: {error}")))
        }
    }
}

/// The first query parameter called `name`, percent-decoded (`+` as a space).
pub fn query_param(request: &Request<Incoming>, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_encoding::percent_decode_str(key).decode_utf8().ok()?;
        (key == name).then(|| percent_encoding::percent_decode_str(&value.replace('+', " ")).decode_utf8_lossy().into_owned())
    })
}
