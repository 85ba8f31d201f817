//! Probes: one new connection (TCP, SCTP) or one datagram exchange (UDP) from a pod to an
//! address, with a short time-out.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::model::{PodKey, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::sockets::{self, SocketSpec};

/// One connection attempt: from a pod (its namespace and address; a host-network pod's
/// node namespace and node address) to an address and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    pub from: PodKey,
    pub to_addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = SocketAddr::new(self.to_addr, self.port);
        write!(f, "{} -> {to}/{}", self.from, self.protocol)
    }
}

/// What a probe saw: allowed (`Connected`), dropped (`TimedOut`), refused by the peer, or
/// an error. Only a silent drop is what policy does to a denied packet (the agent drops,
/// never rejects); everything else that is not a connection is breakage and must not be
/// mistaken for a deny.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProbeResult {
    /// Allowed. TCP/SCTP: connected and one byte came back; UDP: the echo came back.
    Connected,
    /// Dropped: no answer at all within the time-out (a drop on the way, either direction).
    TimedOut,
    /// Refused by the peer: the destination answered that nothing listens there (RST, ICMP
    /// port unreachable).
    Refused,
    /// Anything else, with its cause: ICMP unreachable, no route, a local reject (`EPERM`),
    /// a handshake that completed but never echoed, a probe task that failed.
    Error(String),
    /// The probe cannot be carried at all: the kernel lacks the protocol (SCTP), or the
    /// source pod has no address of the destination's family.
    Unsupported(String),
}

impl ProbeResult {
    pub fn is_connected(&self) -> bool {
        matches!(self, ProbeResult::Connected)
    }

    /// Whether this is what a dropped (denied) packet looks like.
    pub fn is_dropped(&self) -> bool {
        matches!(self, ProbeResult::TimedOut)
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeResult::Connected => f.write_str("connected"),
            ProbeResult::TimedOut => f.write_str("timed out (dropped)"),
            ProbeResult::Refused => f.write_str("was refused by the peer"),
            ProbeResult::Error(why) => write!(f, "failed: {why}"),
            ProbeResult::Unsupported(why) => write!(f, "unsupported ({why})"),
        }
    }
}

/// A probe with everything resolved: the source namespace and address.
pub(crate) struct ResolvedProbe {
    pub netns: Arc<OwnedFd>,
    pub source: IpAddr,
    pub target: SocketAddr,
    pub protocol: Protocol,
    /// Distinguishes this probe's datagrams from stray ones.
    pub token: u64,
}

pub(crate) async fn run(probe: ResolvedProbe, timeout: Duration) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    let spec = SocketSpec {
        protocol: probe.protocol,
        bind: SocketAddr::new(probe.source, 0),
        listen: false,
        connect: (probe.protocol == Protocol::Udp).then_some(probe.target),
    };
    let socket = match sockets::create_one(probe.netns.clone(), spec).await {
        Ok(socket) => socket,
        Err(e) if sockets::is_unsupported(&e) => {
            return ProbeResult::Unsupported(format!(
                "the kernel does not support {}",
                probe.protocol
            ))
        }
        Err(e) => return classify(&e),
    };
    match probe.protocol {
        Protocol::Udp => udp(socket, probe.token, deadline, timeout).await,
        Protocol::Tcp | Protocol::Sctp => stream(socket, probe.target, deadline).await,
    }
}

async fn stream(socket: socket2::Socket, target: SocketAddr, deadline: Instant) -> ProbeResult {
    let std_stream: std::net::TcpStream = socket.into();
    let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
    let mut stream = match timeout_at(deadline, socket.connect(target)).await {
        Err(_) => return ProbeResult::TimedOut,
        Ok(Err(e)) => return classify(&e),
        Ok(Ok(stream)) => stream,
    };
    // One byte there and back: the reply direction of an established connection is
    // exercised too, not just the handshake.
    const BYTE: u8 = 0x5a;
    let exchange = async {
        stream.write_all(&[BYTE]).await?;
        let mut buf = [0u8; 1];
        stream.read_exact(&mut buf).await?;
        Ok::<_, io::Error>(buf[0])
    };
    match timeout_at(deadline, exchange).await {
        // The handshake went through both ways, so no policy dropped this flow: a missing
        // echo is a broken server or path, not a deny.
        Err(_) => ProbeResult::Error("connected, but the echo did not come back in time".into()),
        Ok(Ok(BYTE)) => ProbeResult::Connected,
        Ok(Ok(other)) => ProbeResult::Error(format!("echo returned {other:#x}, not {BYTE:#x}")),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            ProbeResult::Error("connection closed before the echo".into())
        }
        Ok(Err(e)) => classify(&e),
    }
}

async fn udp(
    socket: socket2::Socket,
    token: u64,
    deadline: Instant,
    timeout: Duration,
) -> ProbeResult {
    let std_socket: std::net::UdpSocket = socket.into();
    let socket = match tokio::net::UdpSocket::from_std(std_socket) {
        Ok(socket) => socket,
        Err(e) => return classify(&e),
    };
    let payload = token.to_be_bytes();
    // Two tries in the time-out: one lost datagram does not fail a probe.
    let attempts = 2u32;
    for attempt in 1..=attempts {
        let attempt_deadline = if attempt == attempts {
            deadline
        } else {
            Instant::now() + timeout / attempts
        };
        if let Err(e) = socket.send(&payload).await {
            return classify(&e);
        }
        let mut buf = [0u8; 64];
        loop {
            match timeout_at(attempt_deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(n)) if buf[..n] == payload => return ProbeResult::Connected,
                // An echo of an earlier try or a stray datagram: keep waiting.
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return classify(&e),
            }
        }
    }
    ProbeResult::TimedOut
}

fn classify(err: &io::Error) -> ProbeResult {
    match err.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => ProbeResult::Refused,
        io::ErrorKind::TimedOut => ProbeResult::TimedOut,
        _ => ProbeResult::Error(err.to_string()),
    }
}
