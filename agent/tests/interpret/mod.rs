//! A pure interpreter of a rendered table: a new packet evaluated against the `Ruleset`'s
//! base chains, regular chains, sets and dispatch maps the way nftables evaluates them.
//! It follows `palisade_agent::render::model` item by item, so a change to the rendered
//! chains (a new match, a new base statement) shows up here as a compile error or a
//! disagreement, never as silent agreement.
//!
//! nftables semantics kept here: the base chains of a hook run in priority order and an
//! `accept` ends only that base chain (a `drop` ends the packet); the end of a base chain
//! is its policy (accept); `jump` returns to the next rule after the callee returns or
//! runs off its end; `goto` does not return, so the callee's return goes to the caller's
//! caller; a verdict-map lookup that misses goes on with the next rule; in an `inet` table a payload match of the other family (`ip saddr` on an IPv6
//! packet) is false, since nft adds the `meta nfproto` dependency.

#![allow(dead_code)]

use std::net::IpAddr;

use palisade_agent::render::{
    AddrRange, BaseStatement, End, Endpoint, IpFamily, Match, Ruleset, SetElement, SetKind, Verdict,
};
use palisade_policy::model::{Direction, Protocol};

/// A new packet (conntrack state `new`: no `established` rule matches it).
#[derive(Clone, Debug)]
pub struct Packet {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub protocol: Protocol,
    pub dport: u16,
    /// Incoming and outgoing interface (`None`: the node's own stack, or an interface no
    /// dispatch map names, such as the underlay).
    pub iif: Option<String>,
    pub oif: Option<String>,
}

impl Packet {
    fn family(&self) -> IpFamily {
        IpFamily::of(&self.saddr)
    }

    fn addr(&self, end: End) -> IpAddr {
        match end {
            End::Source => self.saddr,
            End::Destination => self.daddr,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accept,
    Drop,
}

/// What a hook did to a packet, and the named counters it passed, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub outcome: Outcome,
    pub counters: Vec<String>,
}

/// How a regular chain ended.
enum ChainEnd {
    Accept,
    Drop,
    /// `return`, or ran off its end.
    Return,
}

/// The packet through every base chain of `hook` (`forward`, `input`).
pub fn run_hook(rs: &Ruleset, hook: &str, pkt: &Packet) -> Trace {
    let mut counters = Vec::new();
    let mut chains: Vec<_> = rs.base_chains.iter().filter(|c| c.hook == hook).collect();
    chains.sort_by_key(|c| c.priority);
    for base in chains {
        match run_base(rs, &base.statements, pkt, &mut counters) {
            ChainEnd::Drop => {
                return Trace {
                    outcome: Outcome::Drop,
                    counters,
                }
            }
            // An accept ends this base chain only; so does its end (policy accept).
            ChainEnd::Accept | ChainEnd::Return => {}
        }
    }
    Trace {
        outcome: Outcome::Accept,
        counters,
    }
}

fn run_base(
    rs: &Ruleset,
    statements: &[BaseStatement],
    pkt: &Packet,
    counters: &mut Vec<String>,
) -> ChainEnd {
    for statement in statements {
        match statement {
            // A new packet is neither established nor related.
            BaseStatement::Established => {}
            // Neighbour discovery is ICMPv6; the packets interpreted here are TCP, UDP, SCTP.
            BaseStatement::NeighbourDiscovery => {}
            // The first packet of a TCP flow carries a SYN: never a mid-stream pickup.
            BaseStatement::TcpPickup(_) => {}
            BaseStatement::UnknownInterface { direction, pattern } => {
                let ifname = match direction {
                    Direction::Egress => &pkt.iif,
                    Direction::Ingress => &pkt.oif,
                };
                let matched = ifname.as_ref().is_some_and(|i| {
                    let stem = pattern.strip_suffix('*');
                    stem.map_or(i == pattern, |s| i.starts_with(s))
                        && !rs.egress_dispatch.contains_key(i)
                });
                if matched {
                    counters.push(palisade_agent::render::UNKNOWN_INTERFACE_COUNTER.to_string());
                    return ChainEnd::Drop;
                }
            }
            BaseStatement::Dispatch(direction) => {
                let ifname = match direction {
                    Direction::Egress => &pkt.iif,
                    Direction::Ingress => &pkt.oif,
                };
                let target = ifname.as_ref().and_then(|i| rs.dispatch(*direction).get(i));
                if let Some(chain) = target {
                    // The dispatch maps' elements are `jump` verdicts.
                    match run_chain(rs, chain, pkt, counters, 0) {
                        ChainEnd::Return => {}
                        end => return end,
                    }
                }
            }
        }
    }
    ChainEnd::Return
}

fn run_chain(
    rs: &Ruleset,
    name: &str,
    pkt: &Packet,
    counters: &mut Vec<String>,
    depth: usize,
) -> ChainEnd {
    // nftables refuses loops and limits jump depth; a rendered table must never need it.
    assert!(depth < 16, "chain {name}: jumps nested too deep");
    let rules = rs
        .chains
        .get(name)
        .unwrap_or_else(|| panic!("jump to the missing chain {name}"));
    for rule in rules.iter() {
        if !rule.matches.iter().all(|m| matches(rs, m, pkt)) {
            continue;
        }
        if let Some(counter) = &rule.counter {
            assert!(
                rs.counters.contains_key(counter),
                "rule in {name} names the missing counter {counter}"
            );
            counters.push(counter.clone());
        }
        match &rule.verdict {
            Verdict::Accept => return ChainEnd::Accept,
            Verdict::Drop | Verdict::LogDrop { .. } => return ChainEnd::Drop,
            Verdict::Return | Verdict::LogReturn { .. } => return ChainEnd::Return,
            Verdict::Jump(callee) => match run_chain(rs, callee, pkt, counters, depth + 1) {
                ChainEnd::Return => {}
                end => return end,
            },
            Verdict::Goto(callee) => return run_chain(rs, callee, pkt, counters, depth + 1),
            // A verdict-map lookup: its elements are `goto`; a miss ends only this rule.
            Verdict::RestDispatch(direction) => {
                let ifname = match direction {
                    Direction::Egress => &pkt.iif,
                    Direction::Ingress => &pkt.oif,
                };
                let target = ifname
                    .as_ref()
                    .and_then(|i| rs.rest_dispatch(*direction).get(i));
                if let Some(callee) = target {
                    return run_chain(rs, callee, pkt, counters, depth + 1);
                }
            }
            // `ip daddr vmap @map`: a packet of the other family does not match the
            // payload's implicit family test; a peer in no range goes on too.
            // `ip daddr & MASK vmap @map`: the peer's network address is the key.
            Verdict::ClassDispatch {
                family,
                end,
                map,
                prefix,
            } => {
                if *family != pkt.family() {
                    continue;
                }
                let def = rs
                    .sets
                    .get(map)
                    .unwrap_or_else(|| panic!("a rule names the missing map {map}"));
                let peer = match (def.kind, prefix) {
                    (SetKind::Classes(f), None) if f == *family => pkt.addr(*end),
                    (SetKind::ClassPrefixes(f, len), _) if f == *family => {
                        let full = u8::try_from(f.bits()).unwrap_or(128);
                        assert_eq!(
                            prefix.unwrap_or(full),
                            len,
                            "map {map}'s length and its rule's mask"
                        );
                        masked(pkt.addr(*end), len)
                    }
                    (kind, _) => panic!("map {map}'s kind {kind:?} with mask {prefix:?}"),
                };
                let target = def.elements.iter().find_map(|e| match e {
                    SetElement::Class { range, chain } if in_range(range, peer) => {
                        if let SetKind::ClassPrefixes(..) = def.kind {
                            assert_eq!(range.lo, range.hi, "a prefix map's key is one address");
                        }
                        Some(chain)
                    }
                    _ => None,
                });
                if let Some(callee) = target {
                    return run_chain(rs, callee, pkt, counters, depth + 1);
                }
            }
        }
    }
    ChainEnd::Return
}

fn set_has(
    rs: &Ruleset,
    set: &str,
    family: IpFamily,
    element: impl Fn(&SetElement) -> bool,
) -> bool {
    let def = rs
        .sets
        .get(set)
        .unwrap_or_else(|| panic!("a rule names the missing set {set}"));
    assert_eq!(
        def.kind.family(),
        family,
        "set {set} used with the other family"
    );
    def.elements.iter().any(element)
}

fn in_range(range: &AddrRange, addr: IpAddr) -> bool {
    range.lo <= addr && addr <= range.hi
}

/// `addr & mask(len)`: the network address of the prefix of length `len` holding `addr`.
fn masked(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

fn matches(rs: &Ruleset, m: &Match, pkt: &Packet) -> bool {
    let family = pkt.family();
    match m {
        // Every packet here is a new flow's.
        Match::Established => false,
        // A flow-log chain's token bucket: with or without a token the packet is dropped
        // (logged, or counted as suppressed), so a full bucket stands for both.
        Match::Limit { .. } => true,
        Match::Family(f) => *f == family,
        Match::AddrNotIn {
            family: f,
            end,
            addrs,
        } => *f == family && !addrs.contains(&pkt.addr(*end)),
        Match::AddrInSet {
            family: f,
            end,
            set,
        } => {
            *f == family
                && set_has(
                    rs,
                    set,
                    family,
                    |e| matches!(e, SetElement::Addr(r) if in_range(r, pkt.addr(*end))),
                )
        }
        Match::MaskedAddrInSet {
            family: f,
            end,
            len,
            set,
        } => {
            *f == family && {
                let network = masked(pkt.addr(*end), *len);
                set_has(
                    rs,
                    set,
                    family,
                    |e| matches!(e, SetElement::Addr(r) if in_range(r, network)),
                )
            }
        }
        Match::Protocol(p) => *p == pkt.protocol,
        Match::Dports(ranges) => ranges
            .iter()
            .any(|&(lo, hi)| lo <= pkt.dport && pkt.dport <= hi),
        Match::EndpointInSet {
            family: f,
            end,
            set,
        } => {
            let wanted = Endpoint {
                addr: pkt.addr(*end),
                protocol: pkt.protocol,
                port: pkt.dport,
            };
            *f == family
                && set_has(
                    rs,
                    set,
                    family,
                    |e| matches!(e, SetElement::Endpoint(x) if *x == wanted),
                )
        }
    }
}
