//! The HTTP server of `/metrics`, `/healthz` and `/readyz`, one implementation for the
//! agent and the controller.
//!
//! - Only `GET` is answered (405 otherwise), with a cap on connections and time-outs on
//!   headers and on whole connections, so that a flood of idle clients cannot take the
//!   process's file descriptors ([`Limits`]).
//! - [`Mode::Loopback`]: plain HTTP on a loopback address only (binding anything else is
//!   refused); only the node itself reaches it.
//! - [`Mode::Secure`], as controller-runtime's secure metrics: TLS, and every request for
//!   anything but the health paths must carry a bearer token that a TokenReview
//!   authenticates and a SubjectAccessReview authorizes for the request's path (a
//!   non-resource URL) and verb `get`. 401 without a valid token, 403 without the
//!   permission.
//! - [`Mode::Insecure`]: plain HTTP on any address, only when asked for by name.
//!
//! `/healthz` and `/readyz` answer without a token in every mode, on the same port:
//! kubelet probes carry no credentials (controller-runtime serves them on a separate probe
//! port for the same reason). They say "ok" or "ready" and nothing else, so they reveal
//! nothing a port scan would not. In secure mode the kubelet probes them with
//! `scheme: HTTPS`, which it does without verifying the certificate.

mod authz;
mod limits;
mod mode;
mod serve;
mod tls;

pub use authz::DecisionFuture;
pub use authz::{Authorize, Decision, KubeAuthorizer, ThreadAuthorizer};
pub use hyper::StatusCode;
pub use limits::Limits;
pub use mode::{bind, Mode, ModeError};
pub use serve::{serve, Access, Handler, Reply, ReplyFuture, PUBLIC_PATHS};
pub use tls::{self_signed, server_config, TlsError};
