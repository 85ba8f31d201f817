//! The comparison point: the same node rule set rendered for iptables + ipset the way
//! kube-router enforces NetworkPolicy — one ipset per address group (`hash:ip` for host
//! groups, `hash:net` for CIDR groups, CIDR-with-except split into prefixes;
//! `hash:ip,port` for named ports), per-pod chains in the filter table's FORWARD
//! path jumped to by `-i VETH` (the pod's egress) / `-o VETH` (its ingress), peers matched
//! with `-m set --match-set`, ports with `-m multiport` (ranges as `a:b`, 15 slots per
//! rule), and `RETURN` (allow), `DROP` (deny), `-g` (Pass to the next tier). Applied with
//! `ipset restore` and `iptables-restore`, each atomic per call.
//!
//! The tier structure mirrors `palisade_agent::render` rule for rule, so both sides enforce
//! the same policy. IPv4 only (the benches' rule sets are IPv4-only).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use palisade_agent::Interfaces;
use palisade_policy::model::{Action, Direction, PodKey, Protocol};
use palisade_policy::ruleset::{Clause, DirectionRules, Group, NodeRuleSet, PortRange};

use super::fnv64;

/// `iptables-restore` (the system's default backend) or, with
/// `PALISADE_BENCH_IPTABLES=legacy`, `iptables-legacy-restore`.
pub fn restore_program() -> &'static str {
    if legacy() {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    }
}

pub fn list_program() -> &'static str {
    if legacy() {
        "iptables-legacy"
    } else {
        "iptables"
    }
}

fn legacy() -> bool {
    std::env::var("PALISADE_BENCH_IPTABLES").is_ok_and(|v| v == "legacy")
}

/// `iptables -V`, to say which backend was measured.
pub fn backend() -> String {
    super::sh(&[list_program(), "-V"]).trim().to_string()
}

pub struct Rendered {
    /// `ipset restore` input creating and filling every set.
    pub ipset: String,
    /// `iptables-restore` input for the filter table.
    pub iptables: String,
    /// Group id → ipset name.
    pub sets: BTreeMap<String, String>,
    pub set_elements: usize,
    pub rules: usize,
}

pub fn set_name(group: &str) -> String {
    format!("PAL-{:016x}", fnv64(group))
}

const FWD: &str = "PAL-FWD";
const INPUT: &str = "PAL-INPUT";
const MULTIPORT_SLOTS: usize = 15;

fn entry_chain(i: usize, d: Direction) -> String {
    match d {
        Direction::Egress => format!("PAL-E-{i}"),
        Direction::Ingress => format!("PAL-I-{i}"),
    }
}

fn rest_chain(i: usize, d: Direction) -> String {
    match d {
        Direction::Egress => format!("PAL-ER-{i}"),
        Direction::Ingress => format!("PAL-IR-{i}"),
    }
}

/// Minimal CIDR cover of the inclusive range `lo..=hi`.
pub fn cidrs(lo: u32, hi: u32) -> Vec<(u32, u8)> {
    let (mut lo, hi) = (u64::from(lo), u64::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let align = if lo == 0 { 32 } else { lo.trailing_zeros() };
        let fit = 63 - (hi - lo + 1).leading_zeros();
        let bits = align.min(fit).min(32);
        out.push((lo as u32, (32 - bits) as u8));
        lo += 1u64 << bits;
    }
    out
}

fn addr_text(a: u32) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

pub fn render(rules: &NodeRuleSet, interfaces: &Interfaces) -> Rendered {
    let mut ipset = String::new();
    let mut sets = BTreeMap::new();
    let mut set_elements = 0;
    // Group id → (ipset name, is named-port set); only groups with IPv4 content.
    let mut kinds: BTreeMap<&str, bool> = BTreeMap::new();
    for (id, group) in &rules.groups {
        let name = set_name(id);
        let mut lines = Vec::new();
        let named = match &**group {
            Group::Hosts(set) => {
                assert!(set.v6.is_empty(), "bench renderer is IPv4-only");
                lines.extend(set.v4.iter().flat_map(|&(lo, hi)| (lo..=hi).map(addr_text)));
                if lines.is_empty() {
                    continue;
                }
                create(&mut ipset, &name, "hash:ip", lines.len());
                false
            }
            Group::Addresses(set) => {
                assert!(set.v6.is_empty(), "bench renderer is IPv4-only");
                for &(lo, hi) in &set.v4 {
                    for (net, len) in cidrs(lo, hi) {
                        lines.push(format!("{}/{len}", addr_text(net)));
                    }
                }
                if lines.is_empty() {
                    continue;
                }
                create(&mut ipset, &name, "hash:net", lines.len());
                false
            }
            Group::NamedPorts(endpoints) => {
                for e in endpoints {
                    let IpAddr::V4(a) = e.addr else {
                        panic!("bench renderer is IPv4-only")
                    };
                    lines.push(format!("{a},{}:{}", proto(e.protocol), e.port));
                }
                if lines.is_empty() {
                    continue;
                }
                create(&mut ipset, &name, "hash:ip,port", lines.len());
                true
            }
        };
        set_elements += lines.len();
        for l in lines {
            let _ = writeln!(ipset, "add {name} {l}");
        }
        kinds.insert(id.as_str(), named);
        sets.insert(id.clone(), name);
    }

    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let mut fwd_egress = Vec::new();
    let mut fwd_ingress = Vec::new();
    let mut input = Vec::new();
    let mut taken = BTreeSet::new();
    for (i, pod) in rules.pods.iter().enumerate() {
        let key = PodKey::new(&pod.namespace, &pod.name);
        let Some(ifname) = interfaces.get(&key) else {
            continue;
        };
        if !taken.insert(ifname.clone()) {
            continue;
        }
        for direction in [Direction::Egress, Direction::Ingress] {
            let dir_rules = pod.direction(direction);
            let (entry, rest) = (entry_chain(i, direction), rest_chain(i, direction));
            let mut entry_rules = Vec::new();
            if direction == Direction::Egress {
                let v4: Vec<&IpAddr> = pod.ips.iter().filter(|a| a.is_ipv4()).collect();
                assert!(v4.len() <= 1, "one IPv4 address per pod");
                match v4.first() {
                    Some(a) => entry_rules.push(format!("! -s {a}/32 -j DROP")),
                    None => entry_rules.push("-j DROP".to_string()),
                }
            }
            let rest_rules = rest_rules(&kinds, dir_rules, direction);
            let has_rest = !rest_rules.is_empty();
            for inst in dir_rules.admin.iter() {
                let verdict = match inst.action {
                    Action::Allow => "-j RETURN".to_string(),
                    Action::Deny => "-j DROP".to_string(),
                    Action::Pass if has_rest => format!("-g {rest}"),
                    Action::Pass => "-j RETURN".to_string(),
                };
                entry_rules.extend(instance_rules(&kinds, &inst.clauses, direction, &verdict));
            }
            if has_rest {
                entry_rules.push(format!("-g {rest}"));
                chains.push((rest, rest_rules));
            }
            if entry_rules.is_empty() {
                continue;
            }
            match direction {
                Direction::Egress => {
                    fwd_egress.push(format!("-i {ifname} -j {entry}"));
                    input.push(format!("-i {ifname} -j {entry}"));
                }
                Direction::Ingress => fwd_ingress.push(format!("-o {ifname} -j {entry}")),
            }
            chains.push((entry, entry_rules));
        }
    }
    let established = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string();
    let mut fwd = vec![established.clone()];
    fwd.extend(fwd_egress);
    fwd.extend(fwd_ingress);
    let mut inp = vec![established];
    inp.extend(input);
    chains.insert(0, (INPUT.to_string(), inp));
    chains.insert(0, (FWD.to_string(), fwd));

    let mut iptables = String::from("*filter\n");
    for (name, _) in &chains {
        let _ = writeln!(iptables, ":{name} - [0:0]");
    }
    let _ = writeln!(iptables, "-A FORWARD -j {FWD}");
    let _ = writeln!(iptables, "-A INPUT -j {INPUT}");
    let mut count = 2;
    for (name, lines) in &chains {
        for l in lines {
            let _ = writeln!(iptables, "-A {name} {l}");
            count += 1;
        }
    }
    iptables.push_str("COMMIT\n");
    Rendered {
        ipset,
        iptables,
        sets,
        set_elements,
        rules: count,
    }
}

/// Removes everything [`render`] created: an empty filter table, then the sets.
pub fn teardown_scripts(r: &Rendered) -> (String, String) {
    let iptables = "*filter\nCOMMIT\n".to_string();
    let ipset = r
        .sets
        .values()
        .map(|s| format!("destroy {s}\n"))
        .collect::<String>();
    (iptables, ipset)
}

fn create(out: &mut String, name: &str, ty: &str, n: usize) {
    let hashsize = n.next_power_of_two().max(1024);
    let maxelem = (n * 2).max(65536);
    let _ = writeln!(
        out,
        "create {name} {ty} family inet hashsize {hashsize} maxelem {maxelem}"
    );
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn rest_rules(
    kinds: &BTreeMap<&str, bool>,
    dir_rules: &DirectionRules,
    direction: Direction,
) -> Vec<String> {
    let mut list = Vec::new();
    if !dir_rules.isolated_by.is_empty() {
        for inst in &dir_rules.network_policy {
            list.extend(instance_rules(kinds, &inst.clauses, direction, "-j RETURN"));
        }
        list.push("-j DROP".to_string());
    } else {
        for inst in dir_rules.baseline.iter() {
            let verdict = match inst.action {
                Action::Deny => "-j DROP",
                Action::Allow | Action::Pass => "-j RETURN",
            };
            list.extend(instance_rules(kinds, &inst.clauses, direction, verdict));
        }
    }
    list
}

/// One rule per clause, group and multiport batch (any match means the instance matches).
fn instance_rules(
    kinds: &BTreeMap<&str, bool>,
    clauses: &[Clause],
    direction: Direction,
    verdict: &str,
) -> Vec<String> {
    let peer = match direction {
        Direction::Ingress => "src",
        Direction::Egress => "dst",
    };
    let mut out: Vec<String> = Vec::new();
    let mut emit = |r: String| {
        if !out.contains(&r) {
            out.push(r);
        }
    };
    for clause in clauses {
        match clause {
            Clause::PeerPort { peers, ports } => {
                let port_matches: Vec<String> = match ports {
                    None => vec![String::new()],
                    Some(p) if p.is_empty() => continue,
                    Some(p) => multiport(p),
                };
                let peer_matches: Vec<String> = match peers {
                    None => vec![String::new()],
                    Some(ids) => ids
                        .iter()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .filter(|id| kinds.get(id.as_str()) == Some(&false))
                        .map(|id| format!("-m set --match-set {} {peer} ", set_name(id)))
                        .collect(),
                };
                for pm in &peer_matches {
                    for ports in &port_matches {
                        // Ports first: the cheaper test rejects most packets.
                        emit(format!("{ports}{pm}{verdict}"));
                    }
                }
            }
            Clause::NamedPort { group } => {
                if kinds.get(group.as_str()) == Some(&true) {
                    emit(format!(
                        "-m set --match-set {} {peer},dst {verdict}",
                        set_name(group)
                    ));
                }
            }
        }
    }
    out
}

/// `-p P -m multiport --dports …` batches (≤ 15 slots, a range takes two), merged ranges.
fn multiport(ports: &[PortRange]) -> Vec<String> {
    let mut by_proto: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    for p in ports {
        by_proto
            .entry(p.protocol)
            .or_default()
            .push((p.start.min(p.end), p.start.max(p.end)));
    }
    let mut out = Vec::new();
    for (protocol, mut ranges) in by_proto {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::new();
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        let mut batch: Vec<String> = Vec::new();
        let mut slots = 0;
        let flush = |batch: &mut Vec<String>, out: &mut Vec<String>| {
            if !batch.is_empty() {
                out.push(format!(
                    "-p {} -m multiport --dports {} ",
                    proto(protocol),
                    batch.join(",")
                ));
                batch.clear();
            }
        };
        for (lo, hi) in merged {
            let need = if lo == hi { 1 } else { 2 };
            if slots + need > MULTIPORT_SLOTS {
                flush(&mut batch, &mut out);
                slots = 0;
            }
            batch.push(if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}:{hi}")
            });
            slots += need;
        }
        flush(&mut batch, &mut out);
    }
    out
}

/// Checks [`cidrs`] on known cases (the benches call it before measuring).
pub fn self_check() {
    assert_eq!(cidrs(0, u32::MAX), vec![(0, 0)]);
    assert_eq!(cidrs(10, 10), vec![(10, 32)]);
    assert_eq!(cidrs(4, 11), vec![(4, 30), (8, 30)]);
    assert_eq!(cidrs(1, 4), vec![(1, 32), (2, 31), (4, 32)]);
}
