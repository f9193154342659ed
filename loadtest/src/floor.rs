//! The floor: a bare hyper HTTP/1.1 server that reads the request body and answers a fixed
//! small JSON body. Whatever it costs is what HTTP on loopback costs here; the sidecar is
//! reported as a ratio to it.

use std::convert::Infallible;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// About the size of a sidecar decision.
const BODY: &[u8] = br#"{"allow":true,"reason":"ok","revision":1,"limit":1000,"used":1,"remaining":999}"#;

async fn answer(request: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as the sidecar must, so the floor does the same socket work.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

pub async fn serve(listen: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on `{listen}`"))?;
    eprintln!("floor server listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer)).await;
        });
    }
}
