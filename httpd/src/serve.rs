use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::authz::{Authorize, Decision};
use crate::limits::Limits;

/// Paths answered without a token in every mode: the kubelet's probes carry none.
pub const PUBLIC_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// A response's status and text body.
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
}

impl Reply {
    pub fn ok(body: impl Into<String>) -> Self {
        Reply {
            status: StatusCode::OK,
            body: body.into(),
        }
    }
    pub fn new(status: StatusCode, body: impl Into<String>) -> Self {
        Reply {
            status,
            body: body.into(),
        }
    }
    pub fn not_found() -> Self {
        Reply::new(StatusCode::NOT_FOUND, "not found\n")
    }
}

pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send + 'static>>;

/// What the process serves: the answer to a `GET` of `path`, once access is granted.
pub trait Handler: Send + Sync + 'static {
    fn get(&self, path: &str) -> ReplyFuture;
}

/// How clients reach the handler.
#[derive(Clone)]
pub enum Access {
    /// Plain HTTP (the listener was bound for loopback or insecure mode).
    Plain,
    /// TLS, and a token check for every path but [`PUBLIC_PATHS`].
    Secure {
        tls: Arc<rustls::ServerConfig>,
        authorizer: Arc<dyn Authorize>,
    },
}

impl Access {
    /// The access of `mode`: plain, or TLS with the certificate and key of `tls` (a
    /// self-signed one when `None`) and `authorizer`, which secure mode requires.
    pub fn for_mode(
        mode: crate::Mode,
        tls: Option<(&std::path::Path, &std::path::Path)>,
        authorizer: Option<Arc<dyn Authorize>>,
    ) -> Result<Access, crate::TlsError> {
        if mode != crate::Mode::Secure {
            return Ok(Access::Plain);
        }
        let Some(authorizer) = authorizer else {
            return Err(crate::TlsError::Config(
                "secure metrics need an authorizer (TokenReview and SubjectAccessReview)".into(),
            ));
        };
        let tls = match tls {
            Some((cert, key)) => crate::server_config(cert, key)?,
            None => crate::self_signed(&["localhost".to_string()])?,
        };
        Ok(Access::Secure { tls, authorizer })
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Access::Plain => "http",
            Access::Secure { .. } => "https",
        }
    }
}

/// Serves `handler` on `listener` until the task is dropped, within `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    access: Access,
    limits: Limits,
    handler: Arc<dyn Handler>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut failing = false;
    loop {
        // A slot first: at the cap, connections wait unaccepted, holding no descriptor.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                // EMFILE and the like: do not spin; the backlog keeps the clients. Said
                // once per episode.
                if !failing {
                    tracing::warn!(error = %e, "metrics listener cannot accept; trying every 100 ms");
                }
                failing = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (access, handler) = (access.clone(), handler.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let whole = async {
                match access {
                    Access::Plain => connection(stream, None, handler, limits).await,
                    Access::Secure { tls, authorizer } => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        // A plain-HTTP client fails here: nothing is answered in clear.
                        let handshake =
                            tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
                        if let Ok(Ok(stream)) = handshake.await {
                            connection(stream, Some(authorizer), handler, limits).await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(limits.connection_timeout, whole).await;
        });
    }
}

async fn connection<S>(
    stream: S,
    authorizer: Option<Arc<dyn Authorize>>,
    handler: Arc<dyn Handler>,
    limits: Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let (authorizer, handler) = (authorizer.clone(), handler.clone());
        async move { Ok::<_, Infallible>(respond(&req, authorizer, handler).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn bearer<B>(req: &Request<B>) -> String {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .unwrap_or_default()
}

async fn respond<B>(
    req: &Request<B>,
    authorizer: Option<Arc<dyn Authorize>>,
    handler: Arc<dyn Handler>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut resp = response(Reply::new(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"));
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return resp;
    }
    let path = req.uri().path().to_string();
    if let Some(authorizer) = authorizer.filter(|_| !PUBLIC_PATHS.contains(&path.as_str())) {
        let refused = match authorizer.authorize(bearer(req), path.clone()).await {
            Decision::Allowed => None,
            Decision::Unauthenticated(why) => Some((StatusCode::UNAUTHORIZED, why)),
            Decision::Forbidden(why) => Some((StatusCode::FORBIDDEN, why)),
            Decision::Unavailable(why) => {
                tracing::warn!(error = %why, "cannot check a metrics client's token");
                Some((StatusCode::SERVICE_UNAVAILABLE, why))
            }
        };
        if let Some((status, why)) = refused {
            let mut resp = response(Reply::new(status, format!("{why}\n")));
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            return resp;
        }
    }
    response(handler.get(&path).await)
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = reply.status;
    resp
}
