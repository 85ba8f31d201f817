//! Sockets created inside a lab namespace. A socket belongs to the namespace it was created
//! in for its whole life, so only creation needs a thread in the namespace; the sockets are
//! then driven by the lab's tokio runtime like any other.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use palisade_policy::model::Protocol;
use socket2::{Domain, Socket, Type};

use crate::netns;

/// What socket to make: a listener/receiver bound to `bind`, or a client bound to `bind`
/// (port 0) and, for UDP, connected to `connect`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SocketSpec {
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub listen: bool,
    pub connect: Option<SocketAddr>,
}

/// Whether an error from `socket(2)` means the kernel does not have the protocol.
pub(crate) fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EPROTONOSUPPORT) | Some(libc::ESOCKTNOSUPPORT) | Some(libc::EAFNOSUPPORT)
    )
}

fn make(spec: &SocketSpec) -> io::Result<Socket> {
    let domain = Domain::for_address(spec.bind);
    let (ty, protocol) = match spec.protocol {
        Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
        Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
        // One-to-one style SCTP behaves like TCP at the socket API, so the same listener
        // and client code serve it.
        Protocol::Sctp => (Type::STREAM, socket2::Protocol::from(libc::IPPROTO_SCTP)),
    };
    let socket = Socket::new(domain, ty, Some(protocol))?;
    if spec.bind.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if spec.listen {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&spec.bind.into())?;
    if spec.listen && spec.protocol != Protocol::Udp {
        socket.listen(1024)?;
    }
    if let Some(peer) = spec.connect {
        socket.connect(&peer.into())?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Creates the sockets inside the namespace, one result per spec.
pub(crate) fn create_in(fd: &OwnedFd, specs: &[SocketSpec]) -> io::Result<Vec<io::Result<Socket>>> {
    netns::run_in(fd.as_fd(), || specs.iter().map(make).collect())
}

/// Creates one socket inside the namespace without blocking the async caller.
pub(crate) async fn create_one(fd: Arc<OwnedFd>, spec: SocketSpec) -> io::Result<Socket> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netlab-socket".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let result = netns::enter(fd.as_fd()).and_then(|()| make(&spec));
            let _ = tx.send(result);
        })?;
    rx.await.unwrap_or_else(|_| {
        Err(io::Error::other(
            "socket worker thread ended without answer",
        ))
    })
}
