//! The ruleset as nft text (`nft -f` accepts it): for `palisadectl compile -o nft`, the
//! golden tests and humans. The agent itself applies the JSON form ([`super::json`]).

use std::fmt::Write;
use std::net::IpAddr;

use palisade_policy::model::{Direction, Protocol};

use super::model::*;

pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// An address, a CIDR when the range is exactly one, or `lo-hi`.
pub fn range_text(r: &AddrRange) -> String {
    if r.lo == r.hi {
        return r.lo.to_string();
    }
    match prefix_len(r) {
        Some(len) => format!("{}/{}", r.lo, len),
        None => format!("{}-{}", r.lo, r.hi),
    }
}

/// The prefix length if `r` is exactly one CIDR block.
pub fn prefix_len(r: &AddrRange) -> Option<u8> {
    let (lo, hi, bits) = match (r.lo, r.hi) {
        (IpAddr::V4(lo), IpAddr::V4(hi)) => {
            (u128::from(u32::from(lo)), u128::from(u32::from(hi)), 32u32)
        }
        (IpAddr::V6(lo), IpAddr::V6(hi)) => (u128::from(lo), u128::from(hi), 128u32),
        _ => return None,
    };
    let span = hi.checked_sub(lo)?;
    // span + 1 must be a power of two and lo aligned to it.
    let size_minus_one = span;
    if size_minus_one & size_minus_one.wrapping_add(1) != 0 {
        return None;
    }
    let host_bits = 128 - size_minus_one.leading_zeros();
    if host_bits > bits || lo & size_minus_one != 0 {
        return None;
    }
    Some((bits - host_bits) as u8)
}

/// A prefix length's network mask as an address (`255.255.255.0`, `ffff:ffff::`).
/// `ip saddr & 255.255.255.0`.
fn masked_address_text(family: IpFamily, end: End, len: u8) -> String {
    format!(
        "{} {} & {}",
        family.payload(),
        end.field(),
        mask_text(family, len)
    )
}

pub fn mask_text(family: IpFamily, len: u8) -> String {
    let m = super::prefixes::mask(len, family.bits());
    match family {
        // The mask of a 32-bit space fits in 32 bits.
        IpFamily::V4 => std::net::Ipv4Addr::from(m as u32).to_string(),
        IpFamily::V6 => std::net::Ipv6Addr::from(m).to_string(),
    }
}

pub fn element_text(e: &SetElement) -> String {
    match e {
        SetElement::Addr(r) => range_text(r),
        SetElement::Endpoint(ep) => {
            format!("{} . {} . {}", ep.addr, protocol_name(ep.protocol), ep.port)
        }
        SetElement::Class { range, chain } => format!("{} : goto {chain}", range_text(range)),
    }
}

fn port_range_text(&(lo, hi): &(u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

pub fn match_text(m: &Match) -> String {
    match m {
        Match::Family(f) => format!("meta nfproto {}", f.nfproto()),
        Match::AddrNotIn { family, end, addrs } => {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            if list.len() == 1 {
                format!("{} {} != {}", family.payload(), end.field(), list[0])
            } else {
                format!(
                    "{} {} != {{ {} }}",
                    family.payload(),
                    end.field(),
                    list.join(", ")
                )
            }
        }
        Match::AddrInSet { family, end, set } => {
            format!("{} {} @{}", family.payload(), end.field(), set)
        }
        Match::MaskedAddrInSet {
            family,
            end,
            len,
            set,
        } => format!("{} @{set}", masked_address_text(*family, *end, *len)),
        Match::Protocol(p) => format!("meta l4proto {}", protocol_name(*p)),
        Match::Dports(ranges) => match ranges.as_slice() {
            [one] => format!("th dport {}", port_range_text(one)),
            _ => {
                let list: Vec<String> = ranges.iter().map(port_range_text).collect();
                format!("th dport {{ {} }}", list.join(", "))
            }
        },
        Match::EndpointInSet { family, end, set } => format!(
            "{} {} . meta l4proto . th dport @{}",
            family.payload(),
            end.field(),
            set
        ),
        Match::Established => "ct state established,related".into(),
        Match::Limit { per_second, burst } => {
            format!("limit rate {per_second}/second burst {burst} packets")
        }
    }
}

pub fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
        Verdict::RestDispatch(Direction::Egress) => format!("iifname vmap @{EGRESS_REST_DISPATCH}"),
        Verdict::RestDispatch(Direction::Ingress) => {
            format!("oifname vmap @{INGRESS_REST_DISPATCH}")
        }
        Verdict::LogDrop { prefix, group } => format!("log prefix \"{prefix}\" group {group} drop"),
        Verdict::LogReturn { prefix, group } => {
            format!("log prefix \"{prefix}\" group {group} return")
        }
        Verdict::ClassDispatch {
            family,
            end,
            map,
            prefix: None,
        } => format!("{} {} vmap @{map}", family.payload(), end.field()),
        Verdict::ClassDispatch {
            family,
            end,
            map,
            prefix: Some(len),
        } => format!("{} vmap @{map}", masked_address_text(*family, *end, *len)),
    }
}

pub fn rule_text(r: &RuleDef) -> String {
    let mut parts: Vec<String> = r.matches.iter().map(match_text).collect();
    if let Some(c) = &r.counter {
        parts.push(format!("counter name \"{c}\""));
    }
    parts.push(verdict_text(&r.verdict));
    parts.join(" ")
}

pub fn base_statement_text(s: &BaseStatement) -> String {
    match s {
        BaseStatement::Established => "ct state established,related accept".into(),
        BaseStatement::NeighbourDiscovery => {
            "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept"
                .into()
        }
        BaseStatement::Dispatch(Direction::Egress) => format!("iifname vmap @{EGRESS_DISPATCH}"),
        BaseStatement::Dispatch(Direction::Ingress) => {
            format!("oifname vmap @{INGRESS_DISPATCH}")
        }
        BaseStatement::TcpPickup(direction) => {
            let key = match direction {
                Direction::Egress => "iifname",
                Direction::Ingress => "oifname",
            };
            format!("ct state new tcp flags & syn == 0 {key} @{EGRESS_DISPATCH} drop")
        }
        BaseStatement::UnknownInterface { direction, pattern } => {
            let key = match direction {
                Direction::Egress => "iifname",
                Direction::Ingress => "oifname",
            };
            format!("{key} \"{pattern}\" {key} != @{EGRESS_DISPATCH} counter name \"{UNKNOWN_INTERFACE_COUNTER}\" drop")
        }
    }
}

fn set_type_text(kind: SetKind) -> (String, bool) {
    match kind {
        SetKind::Addresses(f) => (f.addr_type().to_string(), true),
        SetKind::Classes(f) => (format!("{} : verdict", f.addr_type()), true),
        SetKind::ClassPrefixes(f, _) => (format!("{} : verdict", f.addr_type()), false),
        SetKind::Hosts(f) | SetKind::Prefixes(f, _) => (f.addr_type().to_string(), false),
        SetKind::NamedPorts(f) => (
            format!("{} . inet_proto . inet_service", f.addr_type()),
            false,
        ),
    }
}

/// The whole table as nft text.
pub fn to_text(rs: &Ruleset) -> String {
    table_text(rs, |_| true, |_| true, true, true)
}

/// Everything but the base chains and the counters (a first load creates those over
/// netlink before), as [`super::json::create_unhooked`] creates it: the elements of sets
/// for which `with_elements(kind)` is false are left out.
pub fn unhooked_text(rs: &Ruleset, with_elements: impl Fn(SetKind) -> bool) -> String {
    table_text(rs, with_elements, |_| true, false, false)
}

/// [`unhooked_text`] with only the chains (and their rules) for which `with_chain(rules)`
/// is true: the others a first load writes over netlink.
pub fn unhooked_text_of(
    rs: &Ruleset,
    with_elements: impl Fn(SetKind) -> bool,
    with_chain: impl Fn(&[RuleDef]) -> bool,
) -> String {
    table_text(rs, with_elements, with_chain, false, false)
}

/// The number of objects (sets and maps, chains, rules and element lists) that
/// [`unhooked_text`] creates.
pub fn unhooked_objects(rs: &Ruleset, with_elements: impl Fn(SetKind) -> bool) -> usize {
    rs.sets.len()
        + rs.sets
            .values()
            .filter(|s| !s.elements.is_empty() && with_elements(s.kind))
            .count()
        + DISPATCH_MAPS.len()
        + rs.dispatch_maps()
            .iter()
            .filter(|(_, e, _)| !e.is_empty())
            .count()
        + rs.chains.len()
        + rs.chains.values().map(|c| c.len()).sum::<usize>()
}

fn table_text(
    rs: &Ruleset,
    with_elements: impl Fn(SetKind) -> bool,
    with_chain: impl Fn(&[RuleDef]) -> bool,
    counters: bool,
    hooked: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table inet {TABLE} {{");
    for name in rs.counters.keys().filter(|_| counters) {
        let _ = writeln!(s, "\tcounter {name} {{\n\t}}\n");
    }
    for (name, set) in &rs.sets {
        let (ty, interval) = set_type_text(set.kind);
        let keyword = if set.kind.names_chains() {
            "map"
        } else {
            "set"
        };
        let _ = writeln!(s, "\t{keyword} {name} {{\n\t\ttype {ty}");
        if interval {
            let _ = writeln!(s, "\t\tflags interval");
        }
        if let Some(size) = set.size {
            let _ = writeln!(s, "\t\tsize {size}");
        }
        if !set.elements.is_empty() && with_elements(set.kind) {
            let list: Vec<String> = set.elements.iter().map(element_text).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", list.join(", "));
        }
        let _ = writeln!(s, "\t}}\n");
    }
    for (name, entries, goto) in rs.dispatch_maps() {
        let _ = writeln!(s, "\tmap {name} {{\n\t\ttype ifname : verdict");
        let verb = if goto { "goto" } else { "jump" };
        if !entries.is_empty() {
            let list: Vec<String> = entries
                .iter()
                .map(|(ifname, chain)| format!("\"{ifname}\" : {verb} {chain}"))
                .collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", list.join(",\n\t\t\t     "));
        }
        let _ = writeln!(s, "\t}}\n");
    }
    for (name, rules) in rs.chains.iter().filter(|(_, r)| with_chain(r)) {
        let _ = writeln!(s, "\tchain {name} {{");
        for r in rules.iter() {
            let _ = writeln!(s, "\t\t{}", rule_text(r));
        }
        let _ = writeln!(s, "\t}}\n");
    }
    let base_chains = if hooked { &rs.base_chains[..] } else { &[] };
    for (i, bc) in base_chains.iter().enumerate() {
        let _ = writeln!(
            s,
            "\tchain {} {{\n\t\ttype filter hook {} priority {}; policy accept;",
            bc.name,
            bc.hook,
            priority_text(bc.priority)
        );
        for st in &bc.statements {
            let _ = writeln!(s, "\t\t{}", base_statement_text(st));
        }
        let _ = writeln!(s, "\t}}");
        if i + 1 < base_chains.len() {
            s.push('\n');
        }
    }
    s.push_str("}\n");
    s
}

fn priority_text(p: i32) -> String {
    match p {
        0 => "filter".into(),
        p if p > 0 => format!("filter + {p}"),
        p => format!("filter - {}", -p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(lo: &str, hi: &str) -> AddrRange {
        AddrRange {
            lo: lo.parse().unwrap(),
            hi: hi.parse().unwrap(),
        }
    }

    #[test]
    fn ranges_print_as_address_prefix_or_span() {
        assert_eq!(range_text(&r("10.0.0.1", "10.0.0.1")), "10.0.0.1");
        assert_eq!(range_text(&r("10.0.0.0", "10.0.0.255")), "10.0.0.0/24");
        assert_eq!(range_text(&r("0.0.0.0", "255.255.255.255")), "0.0.0.0/0");
        assert_eq!(range_text(&r("10.0.0.1", "10.0.0.6")), "10.0.0.1-10.0.0.6");
        assert_eq!(
            range_text(&r("10.0.0.4", "10.0.0.11")),
            "10.0.0.4-10.0.0.11"
        );
        assert_eq!(range_text(&r("fd00::", "fd00::ffff")), "fd00::/112");
        assert_eq!(
            range_text(&r("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            "::/0"
        );
    }
}
