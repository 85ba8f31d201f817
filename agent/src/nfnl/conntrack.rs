//! The kernel's connection tracking table over netlink (`NETLINK_NETFILTER`, subsystem
//! ctnetlink): a dump of every entry of the namespace and the deletion of one entry by its
//! original tuple.
//!
//! Deleting an entry is how a connection stops once the rules deny it: its next packet
//! finds no entry, is not `established`, and meets the policy like a new flow.
//!
//! Messages are encoded and decoded here, by hand (`linux/netfilter/nfnetlink_conntrack.h`),
//! as the rest of [`crate::nfnl`] does: a dump is read in place and only the tuples are
//! decoded, because a node's table can hold hundreds of thousands of entries and the sweep
//! reads all of them whenever enforcement starts for a pod. (Decoding every attribute of
//! every entry with `netlink-packet-netfilter` cost about 2 µs of the agent's CPU per entry;
//! the tests check this decoder against that crate's encoder.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{attrs, Message, NfnlError, NfnlSocket, NLA_F_NESTED, NLM_F_DUMP, NLM_F_REQUEST};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `enum cntl_msg_types`.
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `enum ctattr_type`.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
/// `enum ctattr_tuple`.
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
/// `enum ctattr_ip`.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
/// `enum ctattr_l4proto`.
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// One end of a tuple: address and, for protocols with ports, the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub addr: IpAddr,
    pub port: Option<u16>,
}

/// A tracked flow, as the kernel names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// The original direction: the packet that created the entry.
    pub orig_src: End,
    pub orig_dst: End,
    /// The source of the reply direction: where the flow really goes after DNAT (a
    /// Service's endpoint), equal to `orig_dst` without NAT.
    pub reply_src: End,
    /// The original tuple's attributes as the kernel sent them (ICMP ids and zones
    /// included), to delete exactly this entry.
    orig: Vec<u8>,
}

impl Entry {
    /// The flow as the filter chains see it: source, destination after DNAT, protocol and
    /// destination port.
    pub fn flow(&self) -> (IpAddr, IpAddr, u8, Option<u16>) {
        (
            self.orig_src.addr,
            self.reply_src.addr,
            self.protocol,
            self.reply_src.port,
        )
    }
}

/// A ctnetlink socket in the namespace it was opened in.
pub struct Conntrack {
    socket: NfnlSocket,
}

impl Conntrack {
    /// Opens a socket in the current network namespace, or in `/var/run/netns/NAME` (the
    /// socket stays in the namespace it was created in).
    pub fn open(netns: Option<&str>) -> Result<Conntrack, NfnlError> {
        Ok(Conntrack {
            socket: NfnlSocket::open(netns)?,
        })
    }

    /// Every entry of both families.
    pub fn dump(&mut self) -> Result<Vec<Entry>, NfnlError> {
        let mut out = Vec::new();
        for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
            let mut malformed = None;
            self.socket.request_each(
                message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family),
                |kind, body| {
                    if kind != IPCTNL_MSG_CT_NEW {
                        return;
                    }
                    match entry_of(body) {
                        Ok(Some(entry)) => out.push(entry),
                        Ok(None) => {}
                        Err(e) => malformed = Some(e),
                    }
                },
            )?;
            if let Some(e) = malformed {
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Deletes the entry; `Ok(false)` if it is gone already.
    pub fn delete(&mut self, entry: &Entry) -> Result<bool, NfnlError> {
        let family = match entry.orig_src.addr {
            IpAddr::V4(_) => NFPROTO_IPV4,
            IpAddr::V6(_) => NFPROTO_IPV6,
        };
        let mut request = message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST, family);
        request.attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &entry.orig);
        self.socket.request_each(request, |_, _| {})
    }
}

fn message(kind: u16, flags: u16, family: u8) -> Message {
    Message::raw(
        (NFNL_SUBSYS_CTNETLINK << 8) | kind,
        flags,
        [family, 0, 0, 0],
    )
}

/// The entry in a dump message's attributes; `None` for one without both tuples (never
/// sent by the kernel).
fn entry_of(body: &[u8]) -> Result<Option<Entry>, NfnlError> {
    let (mut orig, mut reply) = (None, None);
    for attr in attrs(body) {
        match attr? {
            (CTA_TUPLE_ORIG, payload) => orig = Some(payload),
            (CTA_TUPLE_REPLY, payload) => reply = Some(payload),
            _ => {}
        }
    }
    let (Some(orig_raw), Some(reply)) = (orig, reply) else {
        return Ok(None);
    };
    let (orig, reply) = (tuple_of(orig_raw)?, tuple_of(reply)?);
    let (Some(protocol), Some(orig_src), Some(orig_dst), Some(reply_src)) = (
        orig.protocol,
        orig.src.map(|addr| End {
            addr,
            port: orig.sport,
        }),
        orig.dst.map(|addr| End {
            addr,
            port: orig.dport,
        }),
        reply.src.map(|addr| End {
            addr,
            port: reply.sport,
        }),
    ) else {
        return Ok(None);
    };
    Ok(Some(Entry {
        protocol,
        orig_src,
        orig_dst,
        reply_src,
        orig: orig_raw.to_vec(),
    }))
}

#[derive(Default)]
struct TupleFields {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    protocol: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
}

fn tuple_of(payload: &[u8]) -> Result<TupleFields, NfnlError> {
    let mut t = TupleFields::default();
    for attr in attrs(payload) {
        match attr? {
            (CTA_TUPLE_IP, ip) => {
                for attr in attrs(ip) {
                    match attr? {
                        (CTA_IP_V4_SRC, a) => t.src = v4(a),
                        (CTA_IP_V4_DST, a) => t.dst = v4(a),
                        (CTA_IP_V6_SRC, a) => t.src = v6(a),
                        (CTA_IP_V6_DST, a) => t.dst = v6(a),
                        _ => {}
                    }
                }
            }
            (CTA_TUPLE_PROTO, proto) => {
                for attr in attrs(proto) {
                    match attr? {
                        (CTA_PROTO_NUM, &[n, ..]) => t.protocol = Some(n),
                        (CTA_PROTO_SRC_PORT, &[hi, lo, ..]) => {
                            t.sport = Some(u16::from_be_bytes([hi, lo]))
                        }
                        (CTA_PROTO_DST_PORT, &[hi, lo, ..]) => {
                            t.dport = Some(u16::from_be_bytes([hi, lo]))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

fn v4(payload: &[u8]) -> Option<IpAddr> {
    let octets: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

fn v6(payload: &[u8]) -> Option<IpAddr> {
    let octets: [u8; 16] = payload.get(..16)?.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(octets)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
    };
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    /// The attributes of `message` as `netlink-packet-netfilter` encodes them: an
    /// independent encoder for the decoder under test.
    fn encoded(family: NetfilterProtoFamily, message: ConntrackMessage) -> Vec<u8> {
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                message,
            )),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        // The netlink header, then the nfgenmsg.
        buf[super::super::NLMSG_HDRLEN + 4..].to_vec()
    }

    #[test]
    fn an_entry_names_the_flow_after_dnat() {
        // A Service's connection: the original destination is the ClusterIP, the reply
        // comes from the endpoint pod's port.
        let body = encoded(
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::New(vec![
                ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.96.0.10", 40000, 80)),
                ConntrackAttribute::CtaTupleReply(tuple("10.0.0.3", "10.0.0.2", 8080, 40000)),
                ConntrackAttribute::CtaMark(0),
            ]),
        );
        let entry = entry_of(&body).unwrap().unwrap();
        assert_eq!(
            entry.flow(),
            (
                "10.0.0.2".parse().unwrap(),
                "10.0.0.3".parse().unwrap(),
                6,
                Some(8080)
            )
        );
        assert_eq!(entry.orig_dst.port, Some(80));
        assert_eq!(entry.orig_src.port, Some(40000));
        let no_reply = encoded(
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::New(vec![ConntrackAttribute::CtaTupleOrig(tuple(
                "10.0.0.2", "10.0.0.3", 1, 2,
            ))]),
        );
        assert_eq!(entry_of(&no_reply).unwrap(), None);
    }

    #[test]
    fn ipv6_entries_decode_and_their_delete_carries_the_original_tuple() {
        let orig = tuple("fd00::2", "fd00::3", 40000, 443);
        let body = encoded(
            NetfilterProtoFamily::IPv6,
            ConntrackMessage::New(vec![
                ConntrackAttribute::CtaTupleOrig(orig.clone()),
                ConntrackAttribute::CtaTupleReply(tuple("fd00::3", "fd00::2", 443, 40000)),
            ]),
        );
        let entry = entry_of(&body).unwrap().unwrap();
        assert_eq!(
            entry.flow(),
            (
                "fd00::2".parse().unwrap(),
                "fd00::3".parse().unwrap(),
                6,
                Some(443)
            )
        );
        // The delete request's attributes are exactly what the crate would send.
        let mut request = message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST, NFPROTO_IPV6);
        request.attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &entry.orig);
        let ours = request.finish(0);
        let theirs = encoded(
            NetfilterProtoFamily::IPv6,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(orig)]),
        );
        assert_eq!(&ours[super::super::NLMSG_HDRLEN + 4..], &theirs[..]);
        assert_eq!(ours[super::super::NLMSG_HDRLEN], NFPROTO_IPV6);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let body = encoded(
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::New(vec![
                ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.0.0.3", 1, 2)),
                ConntrackAttribute::CtaTupleReply(tuple("10.0.0.3", "10.0.0.2", 2, 1)),
            ]),
        );
        for cut in 0..body.len() {
            let _ = entry_of(&body[..cut]);
        }
        let mut bad = body.clone();
        bad[0] = 0xff; // the first attribute claims more than there is
        assert!(entry_of(&bad).is_err());
    }
}
