use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Who may read the server (see the crate's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plain HTTP, loopback addresses only.
    Loopback,
    /// TLS, bearer tokens checked by TokenReview and SubjectAccessReview.
    Secure,
    /// Plain HTTP on any address, anyone who reaches it reads it.
    Insecure,
}

impl Mode {
    /// The mode when none is configured: never the open one. Loopback for a loopback
    /// address, secure for any other.
    pub fn default_for(addr: SocketAddr) -> Mode {
        if addr.ip().is_loopback() {
            Mode::Loopback
        } else {
            Mode::Secure
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Loopback => "loopback",
            Mode::Secure => "secure",
            Mode::Insecure => "insecure",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("unknown metrics mode {0:?}: give loopback, secure or insecure")]
    Unknown(String),
    #[error(
        "metrics mode loopback serves plain HTTP on a loopback address only, not {0}: give \
         127.0.0.1 or [::1], or use mode secure (TLS and Kubernetes authentication)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl FromStr for Mode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "loopback" => Ok(Mode::Loopback),
            "secure" => Ok(Mode::Secure),
            "insecure" => Ok(Mode::Insecure),
            other => Err(ModeError::Unknown(other.to_string())),
        }
    }
}

/// Binds `addr` for `mode`: loopback mode refuses any address that is not loopback, so
/// a plain listener can never be reached from outside the node by a mistake in `addr`.
pub fn bind(mode: Mode, addr: SocketAddr) -> Result<std::net::TcpListener, ModeError> {
    if mode == Mode::Loopback && !addr.ip().is_loopback() {
        return Err(ModeError::NotLoopback(addr));
    }
    std::net::TcpListener::bind(addr).map_err(|source| ModeError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_never_insecure() {
        assert_eq!(
            Mode::default_for("127.0.0.1:1".parse().unwrap()),
            Mode::Loopback
        );
        assert_eq!(
            Mode::default_for("[::1]:1".parse().unwrap()),
            Mode::Loopback
        );
        assert_eq!(
            Mode::default_for("0.0.0.0:1".parse().unwrap()),
            Mode::Secure
        );
        assert_eq!(
            Mode::default_for("10.0.0.1:1".parse().unwrap()),
            Mode::Secure
        );
    }

    #[test]
    fn modes_parse_by_name_only() {
        for m in [Mode::Loopback, Mode::Secure, Mode::Insecure] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
        }
        let err = "open".parse::<Mode>().unwrap_err().to_string();
        assert!(
            err.contains("\"open\"") && err.contains("loopback"),
            "{err}"
        );
    }
}
