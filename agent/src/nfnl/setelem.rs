//! Adding and deleting elements of the plain address hash sets (`SetKind::Hosts`,
//! `SetKind::Prefixes`) with `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM` in one nf_tables
//! batch: one transaction, all or nothing, like an nft transaction, without nft parsing
//! 150,000 elements.
//!
//! Single addresses in sets without flags are encoded here (the key is the address in
//! network byte order), and class maps' intervals ([`super::intervals`]); other interval,
//! concatenated and map elements stay with nft.

use std::net::IpAddr;

use super::{
    msg, Message, NfnlError, NfnlSocket, MAX_ATTR_LEN, NLA_F_NESTED, NLM_F_CREATE, NLM_F_REQUEST,
};
use crate::render::{SetElement, SetKind};

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// Elements to add to or delete from one named set.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    pub set: &'a str,
    pub kind: SetKind,
    pub op: Op,
    pub elements: &'a [SetElement],
}

/// Whether a set of this kind has its elements loaded here rather than through nft.
pub fn handles(kind: SetKind) -> bool {
    matches!(kind, SetKind::Hosts(_) | SetKind::Prefixes(..))
}

/// Whether changes of the elements of a set of this kind can go over netlink: those of
/// [`handles`], and of class maps (loaded with nft, whose intervals and verdicts a first
/// load leaves to it, but changed here: nft fetches every interval set's elements first).
pub fn changes(kind: SetKind) -> bool {
    handles(kind) || matches!(kind, SetKind::Classes(_) | SetKind::ClassPrefixes(..))
}

/// Whether [`messages`] can encode this element.
pub fn encodable(element: &SetElement) -> bool {
    key(element).is_some() || super::intervals::encodable(element)
}

/// The kernel's key of a host set element: the address in network byte order (kept on
/// the stack: digests hash 150,000 of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 16],
    len: usize,
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

pub fn key(element: &SetElement) -> Option<Key> {
    let mut bytes = [0u8; 16];
    match element {
        SetElement::Addr(r) if r.lo == r.hi => Some(match r.lo {
            IpAddr::V4(a) => {
                bytes[..4].copy_from_slice(&a.octets());
                Key { bytes, len: 4 }
            }
            IpAddr::V6(a) => Key {
                bytes: a.octets(),
                len: 16,
            },
        }),
        _ => None,
    }
}

/// One element as it sits in `NFTA_SET_ELEM_LIST_ELEMENTS`.
fn push_element(list: &mut Vec<u8>, key: &[u8]) {
    let mut value = Vec::with_capacity(8 + key.len());
    super::push_attr(&mut value, NFTA_DATA_VALUE, key);
    let mut elem = Vec::with_capacity(12 + key.len());
    super::push_attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
    super::push_attr(list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
}

/// The messages for `change`, as many as the 64 KiB attribute limit needs.
pub(crate) fn messages(table: &str, change: &Change<'_>) -> Result<Vec<Message>, NfnlError> {
    let (kind, flags) = match change.op {
        Op::Add => (msg::NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE),
        Op::Delete => (msg::DELSETELEM, NLM_F_REQUEST),
    };
    let mut out = Vec::new();
    let mut list = Vec::new();
    let flush = |list: &mut Vec<u8>, out: &mut Vec<Message>| {
        let mut m = Message::nftables(kind, flags);
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            .attr_str(NFTA_SET_ELEM_LIST_SET, change.set)
            .attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, list);
        out.push(m);
        list.clear();
    };
    let classes = match change.kind {
        SetKind::Classes(_) => Some(super::intervals::elements(change.elements)?),
        SetKind::ClassPrefixes(..) => Some(super::intervals::keyed(change.elements)?),
        _ => None,
    };
    if let Some(classes) = classes {
        for element in classes {
            if list.len() + element.len() > MAX_ATTR_LEN {
                flush(&mut list, &mut out);
            }
            list.extend(element);
        }
    } else {
        for element in change.elements {
            let key = key(element).ok_or(NfnlError::Malformed(
                "only single addresses are loaded over netlink",
            ))?;
            // An element is at most 28 bytes (IPv6); stay clear of the u16 length.
            if list.len() + 32 + 4 > MAX_ATTR_LEN {
                flush(&mut list, &mut out);
            }
            push_element(&mut list, key.as_ref());
        }
    }
    if !list.is_empty() {
        flush(&mut list, &mut out);
    }
    Ok(out)
}

/// Messages per batch when a load need not be atomic ([`apply_in_batches`]): ~16 MiB, a
/// datagram the kernel allocates without trouble, and error reports (at worst one per
/// message) that fit any receive buffer.
pub const UNHOOKED_BATCH_MESSAGES: usize = 256;

/// Applies every change in one batch. The error names the set whose message the kernel
/// refused; nothing of the batch is then applied.
pub fn apply(
    socket: &mut NfnlSocket,
    table: &str,
    changes: &[Change<'_>],
) -> Result<(), NfnlError> {
    apply_in_batches(socket, table, changes, usize::MAX)
}

/// Applies the changes in batches of at most `per_batch` messages: each batch all or
/// nothing, the whole not. Only for a table no packet sees yet (the staged first load):
/// five groups of a million addresses are 1,500 messages, a 100 MB datagram in one batch.
pub fn apply_in_batches(
    socket: &mut NfnlSocket,
    table: &str,
    changes: &[Change<'_>],
    per_batch: usize,
) -> Result<(), NfnlError> {
    let mut batch = Vec::new();
    let mut owner = Vec::new();
    for change in changes {
        let msgs = messages(table, change)?;
        owner.extend(std::iter::repeat_n(*change, msgs.len()));
        batch.extend(msgs);
    }
    let per_batch = per_batch.max(1);
    let mut done = 0;
    let mut rest = batch.into_iter().peekable();
    while rest.peek().is_some() {
        let part: Vec<Message> = rest.by_ref().take(per_batch).collect();
        let n = part.len();
        socket.batch(part, |i| {
            owner.get(done + i).map_or_else(String::new, |c| {
                let verb = match c.op {
                    Op::Add => "adding elements to",
                    Op::Delete => "deleting elements from",
                };
                format!("{verb} set {}", c.set)
            })
        })?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::{attrs, NLMSG_HDRLEN};
    use crate::render::AddrRange;

    fn addr(a: &str) -> SetElement {
        let ip = a.parse().unwrap();
        SetElement::Addr(AddrRange { lo: ip, hi: ip })
    }

    /// The keys of the elements in one finished message.
    fn keys(bytes: &[u8]) -> Vec<Vec<u8>> {
        let body = &bytes[NLMSG_HDRLEN + 4..];
        let mut out = Vec::new();
        for a in attrs(body) {
            let (kind, payload) = a.unwrap();
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for e in attrs(payload) {
                let (_, elem) = e.unwrap();
                let (_, key) = attrs(elem).next().unwrap().unwrap();
                let (_, value) = attrs(key).next().unwrap().unwrap();
                out.push(value.to_vec());
            }
        }
        out
    }

    #[test]
    fn elements_encode_as_network_order_keys() {
        let elems = [addr("10.0.0.1"), addr("fd00::2")];
        let change = Change {
            set: "g-1_4",
            kind: SetKind::Hosts(crate::render::IpFamily::V4),
            op: Op::Add,
            elements: &elems,
        };
        let msgs = messages("palisade", &change).unwrap();
        assert_eq!(msgs.len(), 1);
        let bytes = msgs.into_iter().next().unwrap().finish(1);
        let mut want6 = vec![0xfd, 0];
        want6.extend([0; 13]);
        want6.push(2);
        assert_eq!(keys(&bytes), vec![vec![10, 0, 0, 1], want6]);
    }

    #[test]
    fn big_changes_split_below_the_attribute_limit() {
        let elems: Vec<SetElement> = (0..10_000u32)
            .map(|i| addr(&std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string()))
            .collect();
        let change = Change {
            set: "g-1_4",
            kind: SetKind::Hosts(crate::render::IpFamily::V4),
            op: Op::Delete,
            elements: &elems,
        };
        let msgs = messages("palisade", &change).unwrap();
        assert!(msgs.len() >= 3, "{}", msgs.len());
        let mut total = 0;
        for m in msgs {
            assert!(m.len() < MAX_ATTR_LEN + 64);
            total += keys(&m.finish(1)).len();
        }
        assert_eq!(total, 10_000);
    }

    #[test]
    fn ranges_are_refused() {
        let r = SetElement::Addr(AddrRange {
            lo: "10.0.0.0".parse().unwrap(),
            hi: "10.0.0.7".parse().unwrap(),
        });
        let change = Change {
            set: "g-1_4",
            kind: SetKind::Hosts(crate::render::IpFamily::V4),
            op: Op::Add,
            elements: std::slice::from_ref(&r),
        };
        assert!(messages("palisade", &change).is_err());
    }

    #[test]
    fn prefix_class_maps_take_keys_with_verdicts_and_refuse_ranges() {
        let class = |lo: &str, hi: &str| SetElement::Class {
            range: AddrRange {
                lo: lo.parse().unwrap(),
                hi: hi.parse().unwrap(),
            },
            chain: "admin-egress/l-1/c-2_4".into(),
        };
        let change = |elements| Change {
            set: "admin-egress/l-1/classes_4/24",
            kind: SetKind::ClassPrefixes(crate::render::IpFamily::V4, 24),
            op: Op::Add,
            elements,
        };
        let one = [class("10.1.2.0", "10.1.2.0")];
        let msgs = messages("palisade", &change(&one)).unwrap();
        // Key and data, no interval end: one element.
        assert_eq!(
            keys(&msgs.into_iter().next().unwrap().finish(1)),
            vec![vec![10, 1, 2, 0]]
        );
        let range = [class("10.1.2.0", "10.1.2.255")];
        assert!(messages("palisade", &change(&range)).is_err());
    }
}
