//! `/metrics`, `/healthz` and `/readyz`. GET only, with a cap on connections and time-outs
//! on reading headers and on idle connections, so that a flood of half-open requests
//! cannot take the controller's file descriptors.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::hub::Hub;

const MAX_CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let hub = hub.clone();
                async move { Ok::<_, Infallible>(respond(&req, &hub)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, hub: &Hub) -> Response<Full<Bytes>> {
    let (status, body) = if req.method() != Method::GET {
        (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_string())
    } else {
        match req.uri().path() {
            "/metrics" => (StatusCode::OK, hub.metrics.encode()),
            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
            "/readyz" if hub.is_ready() => (StatusCode::OK, "ready\n".to_string()),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "caches not synced or first compile not done\n".to_string(),
            ),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
