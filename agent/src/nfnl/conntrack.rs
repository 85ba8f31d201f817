//! The kernel's connection tracking table over netlink (`NETLINK_NETFILTER`, subsystem
//! ctnetlink): a dump of every entry of the namespace and the deletion of one entry by its
//! original tuple. Messages are encoded and decoded by `netlink-packet-netfilter`.
//!
//! Deleting an entry is how a connection stops once the rules deny it: its next packet
//! finds no entry, is not `established`, and meets the policy like a new flow.

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::NfnlError;

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
    /// The original tuple as the kernel sent it, to delete exactly this entry.
    orig: Vec<Tuple>,
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
    socket: Socket,
    seq: u32,
}

impl Conntrack {
    /// Opens a socket in the current network namespace, or in `/var/run/netns/NAME` (the
    /// socket stays in the namespace it was created in).
    pub fn open(netns: Option<&str>) -> Result<Conntrack, NfnlError> {
        let socket = match netns {
            None => new_socket()?,
            Some(name) => crate::netns::spawn_in(name, new_socket)
                .join()
                .map_err(|_| NfnlError::Malformed("namespace thread panicked"))?
                .map_err(|e| NfnlError::Netns(e.path, e.reason))??,
        };
        Ok(Conntrack { socket, seq: 0 })
    }

    /// Every entry of both families.
    pub fn dump(&mut self) -> Result<Vec<Entry>, NfnlError> {
        let mut out = Vec::new();
        for family in [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6] {
            let replies = self.request(
                family,
                ConntrackMessage::Get(vec![]),
                NLM_F_REQUEST | NLM_F_DUMP,
            )?;
            out.extend(replies.iter().filter_map(entry_of));
        }
        Ok(out)
    }

    /// Deletes the entry; `Ok(false)` if it is gone already.
    pub fn delete(&mut self, entry: &Entry) -> Result<bool, NfnlError> {
        let family = match entry.orig_src.addr {
            IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
            IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
        };
        let message =
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(entry.orig.clone())]);
        match self.request(family, message, NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(NfnlError::Kernel { code }) if code == -libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends one request; collects the conntrack messages of the answer until it ends
    /// (`DONE` of a dump, or the acknowledgement).
    fn request(
        &mut self,
        family: NetfilterProtoFamily,
        message: ConntrackMessage,
        flags: u16,
    ) -> Result<Vec<ConntrackMessage>, NfnlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                message,
            )),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut out = Vec::new();
        let mut rbuf: Vec<u8> = Vec::with_capacity(1 << 16);
        loop {
            rbuf.clear();
            let n = self.socket.recv(&mut rbuf, 0)?;
            if n == 0 {
                return Err(NfnlError::Malformed(
                    "socket closed before the answer ended",
                ));
            }
            let mut data = &rbuf[..n];
            while data.len() >= super::NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if len < super::NLMSG_HDRLEN || len > data.len() {
                    return Err(NfnlError::Malformed("message length"));
                }
                let message = NetlinkMessage::<NetfilterMessage>::deserialize(&data[..len])
                    .map_err(|_| NfnlError::Malformed("conntrack message"))?;
                data = &data[len.next_multiple_of(4).min(data.len())..];
                if message.header.sequence_number != seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NfnlError::Kernel { code: code.get() }),
                        }
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(m),
                        ..
                    }) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

fn new_socket() -> Result<Socket, NfnlError> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.set_cap_ack(true)?;
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    super::setsockopt(&socket, libc::SO_RCVTIMEO, &timeout)?;
    Ok(socket)
}

fn end_of(tuple: &[Tuple], source: bool) -> Option<End> {
    let mut addr = None;
    let mut port = None;
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) if source => addr = Some(*a),
                        IPTuple::DestinationAddress(a) if !source => addr = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::SourcePort(n) if source => port = Some(*n),
                        ProtoTuple::DestinationPort(n) if !source => port = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(End { addr: addr?, port })
}

fn protocol_of(tuple: &[Tuple]) -> Option<u8> {
    tuple.iter().find_map(|t| match t {
        Tuple::Proto(protos) => protos.iter().find_map(|p| match p {
            ProtoTuple::Protocol(p) => Some(u8::from(*p)),
            _ => None,
        }),
        _ => None,
    })
}

/// An entry of a dump; one without both tuples (never sent by the kernel) is skipped.
fn entry_of(message: &ConntrackMessage) -> Option<Entry> {
    let ConntrackMessage::New(attributes) = message else {
        return None;
    };
    let mut orig = None;
    let mut reply = None;
    for a in attributes {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    Some(Entry {
        protocol: protocol_of(orig)?,
        orig_src: end_of(orig, true)?,
        orig_dst: end_of(orig, false)?,
        reply_src: end_of(reply, true)?,
        orig: orig.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::conntrack::Protocol;

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

    #[test]
    fn an_entry_names_the_flow_after_dnat() {
        // A Service's connection: the original destination is the ClusterIP, the reply
        // comes from the endpoint pod's port.
        let message = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.96.0.10", 40000, 80)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.0.3", "10.0.0.2", 8080, 40000)),
            ConntrackAttribute::CtaMark(0),
        ]);
        let entry = entry_of(&message).unwrap();
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
        let no_reply = ConntrackMessage::New(vec![ConntrackAttribute::CtaTupleOrig(tuple(
            "10.0.0.2", "10.0.0.3", 1, 2,
        ))]);
        assert_eq!(entry_of(&no_reply), None);
    }
}
