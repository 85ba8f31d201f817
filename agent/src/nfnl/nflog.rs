//! The flow log's kernel side: packets that our drop rules send to an NFLOG group
//! (`log group G prefix "COUNTER"`, rate-limited per rule in the table), read over
//! `NETLINK_NETFILTER` (subsystem `NFNL_SUBSYS_ULOG`) and decoded into what a flow line
//! needs: the counter that named the rule, and the packet's addresses, protocol and ports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::{attr_text, attrs, error_code, messages_of, setsockopt, Message, NfnlError};
use super::{NLM_F_ACK, NLM_F_REQUEST};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_ERROR: u16 = 2;
/// Headers are all a flow line needs: IPv6 (40) + the first 8 bytes of TCP/UDP.
const COPY_RANGE: u32 = 128;
/// Lines waiting in the socket before the kernel drops more (counted as lost).
const RCVBUF: libc::c_int = 1 << 20;

/// One logged packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// The rule's prefix: the name of the counter of the rule that dropped it.
    pub prefix: String,
    /// Seconds and microseconds since the epoch, when the kernel stamped it.
    pub time: Option<(u64, u32)>,
    pub packet: Option<Headers>,
}

/// What a flow line says about a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1/58 ICMP).
    pub protocol: u8,
    /// Source and destination ports for TCP, UDP and SCTP.
    pub ports: Option<(u16, u16)>,
}

/// Opens a socket bound to NFLOG `group` in this thread's namespace (or the named one),
/// copying packet headers, each packet sent at once. Fails when another process holds
/// the group (`EBUSY`) or without `CAP_NET_ADMIN`.
pub fn open(group: u16, netns: Option<&str>) -> Result<Socket, NfnlError> {
    let new = move || -> Result<Socket, NfnlError> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        let _ = setsockopt(&socket, libc::SO_RCVBUFFORCE, &RCVBUF);
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([NFULNL_COPY_PACKET, 0]);
        let config: [(u16, Vec<u8>); 4] = [
            (NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
            (NFULA_CFG_MODE, mode),
            // One packet per message, and no waiting for more (in 1/100 s).
            (NFULA_CFG_QTHRESH, 1u32.to_be_bytes().to_vec()),
            (NFULA_CFG_TIMEOUT, 1u32.to_be_bytes().to_vec()),
        ];
        for (seq, (kind, payload)) in (1u32..).zip(config) {
            let g = group.to_be_bytes();
            let mut m = Message::raw(
                (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                NLM_F_REQUEST | NLM_F_ACK,
                [libc::AF_UNSPEC as u8, 0, g[0], g[1]],
            );
            m.attr(kind, &payload);
            socket.send(&m.finish(seq), 0)?;
            let mut buf = Vec::with_capacity(4096);
            socket.recv(&mut buf, 0)?;
            for reply in messages_of(&buf) {
                let reply = reply?;
                if reply.kind == NLMSG_ERROR {
                    let code = error_code(reply.body)?;
                    if code != 0 {
                        return Err(NfnlError::Rejected {
                            what: format!("binding NFLOG group {group}"),
                            code,
                        });
                    }
                }
            }
        }
        Ok(socket)
    };
    super::in_namespace(netns, new)
}

/// The logged packets of one datagram; anything else (and anything malformed) is
/// skipped.
pub fn decode(datagram: &[u8]) -> Vec<Logged> {
    let mut out = Vec::new();
    for message in messages_of(datagram) {
        let Ok(m) = message else { break };
        if m.kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
            continue;
        }
        let mut logged = Logged {
            prefix: String::new(),
            time: None,
            packet: None,
        };
        for (kind, payload) in attrs(m.body.get(4..).unwrap_or_default()).map_while(Result::ok) {
            match kind {
                NFULA_PREFIX => {
                    logged.prefix = String::from_utf8_lossy(attr_text(payload)).into_owned()
                }
                NFULA_TIMESTAMP if payload.len() >= 16 => {
                    let sec = u64::from_be_bytes(payload[0..8].try_into().unwrap_or_default());
                    let usec = u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default());
                    logged.time = Some((sec, u32::try_from(usec).unwrap_or(0)));
                }
                NFULA_PAYLOAD => logged.packet = headers(payload),
                _ => {}
            }
        }
        out.push(logged);
    }
    out
}

/// Addresses, protocol and ports of an IPv4 or IPv6 packet (IPv6 extension headers are
/// not walked: the protocol is then the first next-header value, without ports).
pub fn headers(packet: &[u8]) -> Option<Headers> {
    let version = packet.first()? >> 4;
    let (src, dst, protocol, rest): (IpAddr, IpAddr, u8, &[u8]) = match version {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < 20 {
                return None;
            }
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[12..16]).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?);
            // Only the first fragment carries the ports.
            let offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            let rest = if offset == 0 {
                packet.get(ihl..).unwrap_or_default()
            } else {
                &[]
            };
            (src.into(), dst.into(), packet[9], rest)
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?);
            (src.into(), dst.into(), packet[6], &packet[40..])
        }
        _ => return None,
    };
    let ports = match protocol {
        6 | 17 | 132 if rest.len() >= 4 => Some((
            u16::from_be_bytes([rest[0], rest[1]]),
            u16::from_be_bytes([rest[2], rest[3]]),
        )),
        _ => None,
    };
    Some(Headers {
        src,
        dst,
        protocol,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0u8; 16]);
        p
    }

    fn packet_message(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut m = Message::raw((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET, 0, [2, 0, 0, 7]);
        m.attr(1, &[8, 0, 1, 0]);
        let mut ts = 1_700_000_000u64.to_be_bytes().to_vec();
        ts.extend(250_000u64.to_be_bytes());
        m.attr(NFULA_TIMESTAMP, &ts)
            .attr_str(NFULA_PREFIX, prefix)
            .attr(NFULA_PAYLOAD, payload);
        m.finish(0)
    }

    #[test]
    fn a_logged_packet_names_its_rule_and_flow() {
        let mut datagram = packet_message(
            "deny-ingress/ns/a",
            &tcp4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 8080),
        );
        datagram.extend(packet_message(
            "spoof/ns/b",
            &tcp4([10, 9, 9, 9], [10, 0, 0, 2], 1, 2),
        ));
        let got = decode(&datagram);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].prefix, "deny-ingress/ns/a");
        assert_eq!(got[0].time, Some((1_700_000_000, 250_000)));
        assert_eq!(
            got[0].packet,
            Some(Headers {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                protocol: 6,
                ports: Some((40000, 8080)),
            })
        );
        assert_eq!(got[1].prefix, "spoof/ns/b");
    }

    #[test]
    fn ipv6_udp_and_non_first_fragments() {
        let mut p = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        p.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend([0x13, 0x88, 0x00, 0x35, 0, 8, 0, 0]);
        let h = headers(&p).unwrap();
        assert_eq!((h.protocol, h.ports), (17, Some((5000, 53))));
        let mut frag = tcp4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        frag[7] = 0x10;
        assert_eq!(headers(&frag).unwrap().ports, None);
    }

    #[test]
    fn truncated_input_does_not_panic() {
        let d = packet_message("x", &tcp4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2));
        for n in 0..d.len() {
            let _ = decode(&d[..n]);
        }
        for n in 0..40 {
            let _ = headers(&tcp4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2)[..n]);
        }
        assert_eq!(headers(&[0x45, 0, 0]), None);
        assert_eq!(headers(&[0x70]), None);
    }
}
