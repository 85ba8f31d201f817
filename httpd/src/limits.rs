use std::time::Duration;

/// What one client may take of the server: the process's file descriptors are shared with
/// netlink sockets, `nft` and the gRPC stream, so a flood of idle connections must never
/// use them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog (no descriptor).
    pub max_connections: usize,
    /// Time for a TLS handshake and a request's headers to arrive, and for the next
    /// request on an idle keep-alive connection; then the connection is closed.
    pub header_timeout: Duration,
    /// Longest a connection stays open, whatever it does (a client that never reads).
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}
