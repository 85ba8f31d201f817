//! Address groups: what a peer means as a set of addresses (or, for egress named ports, of
//! (address, protocol, port) triples), and how one pod contributes to it.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;

use crate::addrset::AddrSet;
use crate::model::{Labels, NamespaceScope, Node, Peer, Pod, Protocol};
use crate::ruleset::{Group, GroupId, PortEndpoint};
use crate::selector::LabelSelector;

use super::stable_hash;

/// A group's definition. Equal definitions share one group (and one id) everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum GroupDef {
    Pods {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    Block {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    Nodes(LabelSelector),
    /// Pods matching `peer` (any pod when `None`) with the port `name` means on each.
    NamedPorts {
        peer: Option<Box<GroupDef>>,
        name: String,
        protocol: Protocol,
    },
}

/// A group's identity inside the compiler: the number its [`GroupId`] spells, so that the
/// index hashes and compares a word instead of a string.
pub(crate) type GroupKey = u64;

pub(crate) fn group_id(key: GroupKey) -> GroupId {
    stable_hash::hex_id("g-", key)
}

/// The key a group id spells; `None` for a string that is not a group id.
pub(crate) fn group_key(id: &str) -> Option<GroupKey> {
    let hex = id.strip_prefix("g-").filter(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })?;
    GroupKey::from_str_radix(hex, 16).ok()
}

impl GroupDef {
    /// The definition of a peer's group; `None` for a peer that matches nothing.
    pub(crate) fn of_peer(peer: &Peer) -> Option<GroupDef> {
        match peer {
            Peer::Pods { namespaces, pods } => Some(GroupDef::Pods {
                namespaces: match namespaces {
                    NamespaceScope::Named(n) => NamespaceScope::Named(n.clone()),
                    NamespaceScope::Selector(s) => NamespaceScope::Selector(s.clone().canonical()),
                },
                pods: pods.clone().canonical(),
            }),
            Peer::IpBlock { cidr, except } => {
                let mut except: Vec<IpNet> = except.iter().map(|e| e.trunc()).collect();
                except.sort();
                except.dedup();
                Some(GroupDef::Block {
                    cidr: cidr.trunc(),
                    except,
                })
            }
            Peer::Nodes(sel) => Some(GroupDef::Nodes(sel.clone().canonical())),
            Peer::Nothing => None,
        }
    }

    /// The group's key inside the compiler: the hash its public id spells.
    pub(crate) fn key(&self) -> GroupKey {
        stable_hash::of_group_def(self)
    }

    /// Whether a (non-host-network) pod is a member of a pod-based group.
    fn pod_matches(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        match self {
            GroupDef::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    NamespaceScope::Named(n) => &pod.namespace == n,
                    NamespaceScope::Selector(s) => s.matches(ns_labels),
                };
                ns_ok && pods.matches(&pod.labels)
            }
            _ => false,
        }
    }

    /// What one pod contributes to this group (nothing for node- and block-based groups,
    /// except named-port groups over a block).
    pub(crate) fn contribution(&self, pod: &Pod, ns_labels: &Labels, out: &mut Vec<Member>) {
        if !pod.host_network && self.admits(pod, ns_labels) {
            self.admitted_members(pod, out);
        }
    }

    /// Whether a (non-host-network) pod is in the group's peer and, for named ports, has a
    /// port of the name. It reads only the pod's namespace, labels and ports, so the full
    /// compile asks once for pods that share them.
    pub(crate) fn admits(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        match self {
            GroupDef::Pods { .. } => self.pod_matches(pod, ns_labels),
            GroupDef::NamedPorts {
                peer,
                name,
                protocol,
            } => {
                let in_peer = match peer.as_deref() {
                    None | Some(GroupDef::Block { .. }) => true,
                    Some(p @ GroupDef::Pods { .. }) => p.pod_matches(pod, ns_labels),
                    // Pods are never node peers (host-network ones are not asked).
                    Some(GroupDef::Nodes(_)) | Some(GroupDef::NamedPorts { .. }) => false,
                };
                in_peer && pod.named_ports(name, *protocol).next().is_some()
            }
            GroupDef::Block { .. } | GroupDef::Nodes(_) => false,
        }
    }

    /// What a (non-host-network) pod the group admits contributes: its addresses, or for
    /// named ports the ports the name means on it at its addresses (in the block, if any).
    /// A pod it does not admit may contribute anything.
    pub(crate) fn admitted_members(&self, pod: &Pod, out: &mut Vec<Member>) {
        match self {
            GroupDef::Pods { .. } => out.extend(pod.ips.iter().map(|a| Member::Addr(*a))),
            GroupDef::NamedPorts {
                peer,
                name,
                protocol,
            } => {
                for addr in &pod.ips {
                    if let Some(GroupDef::Block { cidr, except }) = peer.as_deref() {
                        let in_block =
                            cidr.contains(addr) && !except.iter().any(|e| e.contains(addr));
                        if !in_block {
                            continue;
                        }
                    }
                    out.extend(pod.named_ports(name, *protocol).map(|port| {
                        Member::Endpoint(PortEndpoint {
                            addr: *addr,
                            protocol: *protocol,
                            port,
                        })
                    }));
                }
            }
            GroupDef::Block { .. } | GroupDef::Nodes(_) => {}
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Member {
    Addr(IpAddr),
    Endpoint(PortEndpoint),
}

/// Members with their counts. Many are sorted and counted first, so the map is built in
/// bulk; a few (most groups) are inserted.
fn count_members(mut all: Vec<Member>) -> BTreeMap<Member, u32> {
    if all.len() <= 16 {
        let mut fresh = BTreeMap::new();
        for m in all {
            *fresh.entry(m).or_insert(0) += 1;
        }
        return fresh;
    }
    if let Some(packed) = all.iter().map(Member::packed_v4).collect() {
        return count_packed(packed);
    }
    if !all.is_sorted_by_key(Member::order_key) {
        all.sort_unstable_by_key(Member::order_key);
    }
    debug_assert!(all.is_sorted());
    all.chunk_by(|a, b| a == b)
        .map(|same| (same[0], same.len() as u32))
        .collect()
}

/// [`count_members`] for IPv4 members, packed: sorting machine words is several times
/// faster than sorting by `order_key`, and the largest groups are sorted at every full
/// compile.
fn count_packed(mut packed: Vec<u64>) -> BTreeMap<Member, u32> {
    packed.sort_unstable();
    packed
        .chunk_by(|a, b| a == b)
        .map(|same| (Member::unpack_v4(same[0]), same.len() as u32))
        .collect()
}

impl Member {
    /// An IPv4 member as one integer, in the order of `Ord` (kind, address, protocol,
    /// port); `None` for IPv6.
    fn packed_v4(&self) -> Option<u64> {
        let (kind, addr, protocol, port) = match self {
            Member::Addr(IpAddr::V4(a)) => (0, a, 0, 0),
            Member::Endpoint(PortEndpoint {
                addr: IpAddr::V4(a),
                protocol,
                port,
            }) => (1, a, *protocol as u64, *port),
            _ => return None,
        };
        Some(kind << 56 | u64::from(u32::from(*addr)) << 24 | protocol << 16 | u64::from(port))
    }

    fn unpack_v4(packed: u64) -> Member {
        let addr = IpAddr::V4(Ipv4Addr::from((packed >> 24) as u32));
        if packed >> 56 == 0 {
            return Member::Addr(addr);
        }
        let protocol = match (packed >> 16) & 0xff {
            0 => Protocol::Tcp,
            1 => Protocol::Udp,
            _ => Protocol::Sctp,
        };
        Member::Endpoint(PortEndpoint {
            addr,
            protocol,
            port: packed as u16,
        })
    }

    /// Integers in the order of `Ord`, which compare faster than the nested enums.
    fn order_key(&self) -> (u8, u8, u128, u8, u16) {
        fn bits(a: &IpAddr) -> (u8, u128) {
            match a {
                IpAddr::V4(v4) => (0, u128::from(u32::from(*v4))),
                IpAddr::V6(v6) => (1, u128::from(*v6)),
            }
        }
        match self {
            Member::Addr(a) => {
                let (family, b) = bits(a);
                (0, family, b, 0, 0)
            }
            Member::Endpoint(e) => {
                let (family, b) = bits(&e.addr);
                (1, family, b, e.protocol as u8, e.port)
            }
        }
    }
}

/// A live group: its members with reference counts (two pods may share an address), the
/// nodes whose rules reference it, and its materialized form, built on demand.
pub(crate) struct GroupState {
    pub def: Arc<GroupDef>,
    pub members: BTreeMap<Member, u32>,
    /// Node (by its index in the compiler's node table) → number of pods on that node
    /// whose rules reference the group.
    pub nodes: HashMap<u32, u32>,
    built: OnceLock<Arc<Group>>,
}

impl GroupState {
    pub(crate) fn new(def: Arc<GroupDef>) -> Self {
        GroupState {
            def,
            members: BTreeMap::new(),
            nodes: HashMap::default(),
            built: OnceLock::new(),
        }
    }

    pub(crate) fn add(&mut self, m: Member) -> bool {
        let c = self.members.entry(m).or_insert(0);
        *c += 1;
        let changed = *c == 1;
        if changed {
            self.built = OnceLock::new();
        }
        changed
    }

    pub(crate) fn remove(&mut self, m: Member) -> bool {
        let Some(c) = self.members.get_mut(&m) else {
            return false;
        };
        *c -= 1;
        if *c > 0 {
            return false;
        }
        self.members.remove(&m);
        self.built = OnceLock::new();
        true
    }

    /// Replaces all members (for groups recomputed as a whole); says whether they changed.
    pub(crate) fn reset(&mut self, members: impl IntoIterator<Item = Member>) -> bool {
        let all: Vec<Member> = members.into_iter().collect();
        let fresh = count_members(all);
        let changed = fresh.keys().ne(self.members.keys());
        self.members = fresh;
        if changed {
            self.built = OnceLock::new();
        }
        changed
    }

    pub(crate) fn group(&self) -> Arc<Group> {
        self.built
            .get_or_init(|| {
                Arc::new(match self.def.as_ref() {
                    GroupDef::Block { cidr, except } => {
                        Group::Addresses(AddrSet::from_block(cidr, except))
                    }
                    GroupDef::NamedPorts { .. } => Group::NamedPorts(
                        self.members
                            .keys()
                            .filter_map(|m| match m {
                                Member::Endpoint(e) => Some(*e),
                                Member::Addr(_) => None,
                            })
                            .collect(),
                    ),
                    GroupDef::Pods { .. } | GroupDef::Nodes(_) => Group::Hosts(
                        AddrSet::from_addrs(self.members.keys().filter_map(|m| match m {
                            Member::Addr(a) => Some(*a),
                            Member::Endpoint(_) => None,
                        })),
                    ),
                })
            })
            .clone()
    }
}

/// The addresses of the nodes a node selector matches.
pub(crate) fn node_members<'a>(
    sel: &'a LabelSelector,
    nodes: impl Iterator<Item = &'a Node>,
) -> Vec<Member> {
    nodes
        .filter(|n| sel.matches(&n.labels))
        .flat_map(|n| n.addresses.iter().map(|a| Member::Addr(*a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Member> {
        let mut out = Vec::new();
        for addr in [
            "10.0.0.2",
            "10.0.0.1",
            "192.168.1.1",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            out.push(Member::Addr(addr));
            for protocol in [Protocol::Sctp, Protocol::Tcp, Protocol::Udp] {
                for port in [443, 1, u16::MAX] {
                    out.push(Member::Endpoint(PortEndpoint {
                        addr,
                        protocol,
                        port,
                    }));
                }
            }
        }
        out
    }

    fn counted_one_by_one(all: &[Member]) -> BTreeMap<Member, u32> {
        let mut out = BTreeMap::new();
        for m in all {
            *out.entry(*m).or_insert(0) += 1;
        }
        out
    }

    #[test]
    fn packed_members_sort_and_read_back_as_members() {
        let all = sample();
        for a in &all {
            let pa = a.packed_v4().unwrap();
            assert_eq!(Member::unpack_v4(pa), *a);
            for b in &all {
                assert_eq!(pa.cmp(&b.packed_v4().unwrap()), a.cmp(b), "{a:?} {b:?}");
            }
        }
        let v6 = Member::Addr("fd00::1".parse().unwrap());
        assert_eq!(v6.packed_v4(), None);
    }

    /// IPv4-only lists take the packed path, a list with IPv6 the general one: both count
    /// as one-by-one insertion does.
    #[test]
    fn counting_in_bulk_equals_counting_one_by_one() {
        let mut v4 = sample();
        v4.extend(sample().into_iter().rev().step_by(3));
        let mut mixed = v4.clone();
        mixed.insert(7, Member::Addr("fd00::1".parse().unwrap()));
        mixed.push(Member::Addr("fd00::1".parse().unwrap()));
        for all in [v4, mixed] {
            assert_eq!(count_members(all.clone()), counted_one_by_one(&all));
        }
    }
}
