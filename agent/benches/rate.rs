//! Rate benchmark (issue 4, benchmark b): new-connection rate (TCP connect + close) and
//! request/response rate (UDP, a new socket and source port per request) from pod A to
//! pod B on one node (routed veths, docs/design.md's lab topology), with
//!
//! 1. no firewall in the node namespace at all;
//! 2. Palisade with no policy (its table loaded: conntrack on, pods' anti-spoofing chains);
//! 3. Palisade with an ingress policy on B: one rule from a group of 10,000 distinct /24s
//!    that do not hold the client, one rule from the client's group, both with the same
//!    1,000 TCP + 1,000 UDP port ranges, so every new flow makes the address and the
//!    port lookups of both rules before it is allowed;
//! 4. the same rule set as iptables + ipset (kube-router style, `common/iptables.rs`);
//! 5. variant 2 again: the difference between 2 and 5 is the bench's noise floor;
//! 6. variant 2 without the start-up window's unknown-interface rules (no pod interface
//!    patterns): the difference to 2 is what those base-chain rules cost every packet.
//!
//! Palisade's tables are rendered as the agent renders them by default: with the flow log
//! (denied packets go through rate-limited NFLOG chains) and the start-up window's rules.
//!
//! Variants run interleaved, each round in a different order (rotated, every other round
//! reversed), so no variant always follows the same one; each run starts at least 2 s after
//! the previous one ended, when its conntrack entries have expired. The
//! machine is usually shared, so the bench reports, besides medians of the rates, the
//! median over rounds of each variant's rate relative to Palisade without policy in the
//! same round, and the process CPU time per successful flow (softirq time is charged to
//! the sending thread without IRQ_TIME_ACCOUNTING, so it includes the forwarding path),
//! which other processes' load disturbs less than the rate.
//!
//! Then the paired measurement, the one to judge the 95 % target by: with the policy table
//! loaded, the client alternates every 100 ms between B (the policy) and a third pod C on
//! the same node that no policy isolates, TCP then UDP; then the same with a policy in
//! audit beside B's enforced one (issue 10: every allowed new flow runs B's audit chain
//! too, see [`with_audit`]); then with the 200 tiered policies of issue 11 on the client's
//! egress and the server's ingress, which every new flow to B walks to their last rules
//! ([`with_tiered`]): once rendered as the agent does (long lists through address
//! classes, their maps split by prefix length), once as plain chains, once with the class
//! maps as interval maps; then what one member joining a group of those classes
//! costs to render and apply ([`membership_changes`]). Both pods' flows cross the same
//! table and conntrack table under the same load, so the per-cycle ratio isolates what B's
//! rules cost; separate runs differ by more than that on a shared machine (compare
//! "Palisade, no policy" with its repeat).
//!
//! Before each policy run
//! the bench checks that a port outside the ranges is blocked (TCP and UDP) and the
//! allowed one is open; after it, that the allow rule's counter grew by at least the number
//! of successful connections (every one was a conntrack NEW flow that traversed the rules).
//!
//! Run (as root): `cargo bench -p palisade-agent --bench rate`
//! (`PALISADE_BENCH_IPTABLES=legacy` measures iptables-legacy instead of the system's
//! default iptables backend; `PALISADE_BENCH_SECONDS` / `PALISADE_BENCH_ROUNDS` change the
//! run length, default 3 s and 5 rounds; `PALISADE_BENCH_PAIRED_SECONDS` the paired
//! measurement's, per protocol, default 20 s, 0 skips it; `PALISADE_BENCH_VARIANTS` runs
//! some variants only (none, empty, policy, iptables, again); `PALISADE_BENCH_PAIRED` the
//! paired measurement's parts (default `policy,audit,tiered,plain,interval,members`;
//! `interval`: the tiered policies with their class maps as interval maps);
//! `PALISADE_BENCH_CIDRS` /
//! `PALISADE_BENCH_RANGES` the policy's size, for profiling.)

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::{group_id, in_netns, iptables, median, print_table, rule_id, sh, sh_stdin};
use palisade_agent::render::FlowLog;
use palisade_agent::{Applier, Interfaces, Nft, Renderer};
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance, TierList,
};
use palisade_policy::AddrSet;
use socket2::{Domain, SockAddr, Socket, Type};

const SUBNET: u8 = 50;
/// Inside the first range (2000-2024).
const PORT: u16 = 2_010;
/// In the gap after the first range.
const DENIED_PORT: u16 = 2_030;
const CLIENT_THREADS: usize = 4;
const SERVER_THREADS: usize = 2;
/// UDP servers (all inside the first range); requests go round-robin to them.
const UDP_PORTS: [u16; 4] = [2_010, 2_011, 2_012, 2_013];
/// Each UDP client thread cycles through its own block of source ports and the server
/// ports, so a (source port, server port) pair comes back only after 52,000 requests of
/// that thread — long after its conntrack entry (1 s UDP timeout in the node) expired.
const UDP_PORT_BASE: u16 = 10_000;
const UDP_PORTS_PER_THREAD: u16 = 13_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many CIDRs and port ranges (per protocol) the policy has: 10,000 and 1,000 unless
/// `PALISADE_BENCH_CIDRS` / `PALISADE_BENCH_RANGES` say otherwise (for profiling).
fn sizes() -> (u32, u16) {
    (
        env_or("PALISADE_BENCH_CIDRS", 10_000u32).clamp(1, 100_000),
        env_or("PALISADE_BENCH_RANGES", 1_000u16).clamp(1, 1_200),
    )
}

/// Range `i`: 2000 + 50 i ..= 2000 + 50 i + 24, for TCP and for UDP.
fn port_ranges() -> Vec<PortRange> {
    let ranges = sizes().1;
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .flat_map(|protocol| {
            (0..ranges).map(move |i| PortRange {
                protocol,
                start: 2000 + 50 * i,
                end: 2000 + 50 * i + 24,
            })
        })
        .collect()
}

/// Every other /24 from 11.0.0.0: 10,000 distinct, non-adjacent prefixes.
fn cidr_group() -> AddrSet {
    let mut set = AddrSet::default();
    let base = u32::from(Ipv4Addr::new(11, 0, 0, 0));
    for i in 0..sizes().0 {
        let lo = base + 512 * i;
        set.v4.push((lo, lo + 255));
    }
    set.normalize();
    set
}

struct Policy {
    rules: NodeRuleSet,
    /// The rule that allows the client: its counter must see every new flow.
    client_rule: String,
}

fn node_rules(lab: &Lab, with_policy: bool) -> Policy {
    let (client, server) = (&lab.pods[0], &lab.pods[1]);
    let pod = |p: &common::lab::LabPod, ingress: DirectionRules| PodRules {
        namespace: p.key.namespace.clone(),
        name: p.key.name.clone(),
        ips: vec![p.ip4],
        ingress: ingress.into(),
        egress: Default::default(),
        audit: Default::default(),
    };
    let mut rules = NodeRuleSet {
        node: "bench".into(),
        ..NodeRuleSet::default()
    };
    let policy = PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(server.key.namespace.clone()),
        name: "allow-client".into(),
    };
    let mut instance = |index: usize, group: &str| {
        let origin = RuleOrigin {
            policy: policy.clone(),
            tier: Tier::NetworkPolicy,
            priority: 0,
            direction: Direction::Ingress,
            index,
            name: None,
        };
        let id = rule_id(&format!("{origin:?}"));
        std::sync::Arc::make_mut(&mut rules.rules).insert(id.clone(), origin);
        RuleInstance {
            rule: id,
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec![group.to_string()]),
                ports: Some(port_ranges()),
            }],
        }
    };
    let (cidrs, clients) = (group_id("cidrs"), group_id("client"));
    let far = instance(0, &cidrs);
    let near = instance(1, &clients);
    let client_rule = near.rule.clone();
    let server_ingress = if with_policy {
        rules
            .groups
            .insert(cidrs, Arc::new(Group::Addresses(cidr_group())));
        rules.groups.insert(
            clients,
            Arc::new(Group::Hosts(AddrSet::from_addrs([client.ip4]))),
        );
        DirectionRules {
            isolated_by: vec![policy.clone()],
            network_policy: vec![far, near],
            ..DirectionRules::default()
        }
    } else {
        std::sync::Arc::make_mut(&mut rules.rules).clear();
        DirectionRules::default()
    };
    rules.pods = vec![
        pod(client, DirectionRules::default()),
        pod(server, server_ingress),
        pod(&lab.pods[2], DirectionRules::default()),
    ];
    Policy { rules, client_rule }
}

/// `rules` with a policy in audit beside the server's enforced one: an Admin tier Deny
/// rule from the 10,000 CIDRs on the same ports (it never matches the client), so each of
/// the client's new flows, allowed by the enforced chain, runs the audit chain too, with
/// the CIDR lookups of both the audit rule and the enforced rules again.
fn with_audit(rules: &NodeRuleSet) -> NodeRuleSet {
    let mut rules = rules.clone();
    let origin = RuleOrigin {
        policy: PolicyId {
            kind: PolicyKind::ClusterNetworkPolicy,
            namespace: None,
            name: "staged-deny".into(),
        },
        tier: Tier::Admin,
        priority: 10,
        direction: Direction::Ingress,
        index: 0,
        name: Some("no-far-networks".into()),
    };
    let id = rule_id(&format!("{origin:?}"));
    std::sync::Arc::make_mut(&mut rules.rules).insert(id.clone(), origin);
    let server = &mut rules.pods[1];
    let mut full = (*server.ingress).clone();
    full.admin = Arc::new(palisade_policy::ruleset::TierList::new(vec![
        RuleInstance {
            rule: id,
            action: Action::Deny,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec![group_id("cidrs")]),
                ports: Some(port_ranges()),
            }],
        },
    ]));
    server.audit.ingress = Some(Arc::new(full));
    rules
}

/// `rules` with the 200 tiered policies of issue 11 (100 Admin, 100 Baseline, 25 rules
/// each, modelled on `palisade_policy::workloads::scale_tiered`) on the client's egress and
/// the server's ingress, the server no longer isolated by its NetworkPolicy: every new
/// flow from the client to the server walks the client's Admin and Baseline lists (2,500
/// rules each) and then the server's, none of whose rules match it, to the last Baseline
/// rules, which allow it on the policy's ports and deny the rest. The client's Admin list
/// starts with an allow of everything to the third pod, the paired measurement's
/// reference, whose flows thus skip the lists.
fn with_tiered(rules: &NodeRuleSet, lab: &Lab) -> NodeRuleSet {
    let mut rules = rules.clone();
    let (client, server, open) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let mut group = |name: &str, g: Group| {
        let id = group_id(name);
        rules.groups.insert(id.clone(), Arc::new(g));
        id
    };
    let hosts = |addrs: Vec<IpAddr>| Group::Hosts(AddrSet::from_addrs(addrs));
    let elsewhere: Vec<String> = (0..20u8)
        .map(|g| {
            let addrs = (1..=50u8).map(|h| IpAddr::V4(Ipv4Addr::new(10, 99, g, h * 2)));
            group(&format!("tier-pods-{g}"), hosts(addrs.collect()))
        })
        .collect();
    let cidrs: Vec<String> = (0..25u8)
        .map(|r| {
            let net = format!("192.168.{r}.0/24").parse().expect("literal");
            group(
                &format!("tier-cidr-{r}"),
                Group::Addresses(AddrSet::from_block(&net, &[])),
            )
        })
        .collect();
    let to_open = group("tier-open", hosts(vec![open.ip4]));
    let to_server = group("tier-server", hosts(vec![server.ip4]));
    let from_client = group("tier-client", hosts(vec![client.ip4]));
    let mut instance = |name: &str, tier: Tier, direction, index, action, clause: Clause| {
        let origin = RuleOrigin {
            policy: PolicyId {
                kind: PolicyKind::ClusterNetworkPolicy,
                namespace: None,
                name: name.to_string(),
            },
            tier,
            priority: 0,
            direction,
            index,
            name: None,
        };
        let id = rule_id(&format!("{origin:?}"));
        std::sync::Arc::make_mut(&mut rules.rules).insert(id.clone(), origin);
        RuleInstance {
            rule: id,
            action,
            clauses: vec![clause],
        }
    };
    let peer = |peers: &str, ports: Option<Vec<PortRange>>| Clause::PeerPort {
        peers: Some(vec![peers.to_string()]),
        ports,
    };
    let mut list = |tier: Tier, direction: Direction| -> Vec<RuleInstance> {
        let first = if tier == Tier::Admin { 0 } else { 100 };
        let mut out = Vec::new();
        for k in first..first + 100usize {
            for r in 0..25usize {
                let action = match (tier, r % 3) {
                    (Tier::Admin, 0) => Action::Pass,
                    (_, 1) => Action::Deny,
                    _ => Action::Allow,
                };
                let peers = match r % 4 {
                    0 => &elsewhere[(k + r) % 20],
                    1 => &elsewhere[r % 6],
                    2 => &cidrs[r],
                    _ => &cidrs[(k + r) % 25],
                };
                let ports = match r % 3 {
                    0 => Some(vec![PortRange {
                        protocol: Protocol::Tcp,
                        start: 8000 + r as u16,
                        end: 8100,
                    }]),
                    1 => Some(vec![PortRange {
                        protocol: Protocol::Udp,
                        start: 9000 + r as u16,
                        end: 9000 + r as u16,
                    }]),
                    _ => None,
                };
                let name = format!("cnp-{k}");
                out.push(instance(
                    &name,
                    tier,
                    direction,
                    r,
                    action,
                    peer(peers, ports),
                ));
            }
        }
        out
    };
    let (admin_out, admin_in) = (
        list(Tier::Admin, Direction::Egress),
        list(Tier::Admin, Direction::Ingress),
    );
    let (mut baseline_out, mut baseline_in) = (
        list(Tier::Baseline, Direction::Egress),
        list(Tier::Baseline, Direction::Ingress),
    );
    let mut admin_out_all = vec![instance(
        "tier-open",
        Tier::Admin,
        Direction::Egress,
        0,
        Action::Allow,
        peer(&to_open, None),
    )];
    admin_out_all.extend(admin_out);
    for (list, direction, peers) in [
        (&mut baseline_out, Direction::Egress, &to_server),
        (&mut baseline_in, Direction::Ingress, &from_client),
    ] {
        list.push(instance(
            "tier-probe",
            Tier::Baseline,
            direction,
            0,
            Action::Allow,
            peer(peers, Some(port_ranges())),
        ));
        list.push(instance(
            "tier-probe",
            Tier::Baseline,
            direction,
            1,
            Action::Deny,
            Clause::PeerPort {
                peers: None,
                ports: None,
            },
        ));
    }
    rules.pods[0].egress = Arc::new(DirectionRules {
        admin: Arc::new(TierList::new(admin_out_all)),
        baseline: Arc::new(TierList::new(baseline_out)),
        ..DirectionRules::default()
    });
    rules.pods[1].ingress = Arc::new(DirectionRules {
        admin: Arc::new(TierList::new(admin_in)),
        baseline: Arc::new(TierList::new(baseline_in)),
        ..DirectionRules::default()
    });
    rules
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    None,
    PalisadeEmpty,
    Palisade,
    Iptables,
    PalisadeEmptyAgain,
    PalisadeNoWindow,
}

impl Variant {
    const ALL: [Variant; 6] = [
        Variant::None,
        Variant::PalisadeEmpty,
        Variant::Palisade,
        Variant::Iptables,
        Variant::PalisadeEmptyAgain,
        Variant::PalisadeNoWindow,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::None => "no firewall",
            Variant::PalisadeEmpty => "Palisade, no policy",
            Variant::Palisade => "Palisade, policy",
            Variant::Iptables => "iptables+ipset, policy",
            Variant::PalisadeEmptyAgain => "Palisade, no policy (again)",
            Variant::PalisadeNoWindow => "Palisade, no policy, no window rules",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::PalisadeEmpty => "empty",
            Variant::Palisade => "policy",
            Variant::Iptables => "iptables",
            Variant::PalisadeEmptyAgain => "again",
            Variant::PalisadeNoWindow => "nowindow",
        }
    }

    /// The variants to run: all, or those `PALISADE_BENCH_VARIANTS` names (comma-separated
    /// keys: none, empty, policy, iptables, again, nowindow; for profiling one of them alone).
    fn selected() -> Vec<Variant> {
        match std::env::var("PALISADE_BENCH_VARIANTS") {
            Ok(list) => Variant::ALL
                .into_iter()
                .filter(|v| list.split(',').any(|k| k.trim() == v.key()))
                .collect(),
            Err(_) => Variant::ALL.to_vec(),
        }
    }

    /// Round `round`'s order: rotated by the round, reversed every other round.
    fn order(round: usize) -> Vec<Variant> {
        let mut order = Variant::selected();
        let n = order.len();
        order.rotate_left(round % n);
        if round % 2 == 1 {
            order.reverse();
        }
        order
    }

    fn enforces(self) -> bool {
        matches!(self, Variant::Palisade | Variant::Iptables)
    }
}

/// What a member joining a group that the tier lists' classes are cut from costs on the
/// node with the 200 tiered policies (issue 11's incremental target, with class maps):
/// the table loaded, then 10 times one address added to `tier-pods-0`, rendered and
/// applied (the class maps' intervals change with the host set, over netlink).
fn membership_changes(node: &str, tiered: &NodeRuleSet, ifaces: &Interfaces) {
    let mut renderer = agent_renderer(true);
    let mut applier = Applier::new(Nft::in_netns(node));
    let mut rules = tiered.clone();
    let table = renderer.render(&rules, ifaces).expect("render");
    let maps = table
        .sets
        .values()
        .filter(|s| s.kind.names_chains())
        .count();
    let form = if INTERVAL_CLASS_MAPS.load(Ordering::Relaxed) {
        "interval maps"
    } else {
        "the agent's maps"
    };
    applier.apply(&table).expect("apply the tiered table");
    let id = group_id("tier-pods-0");
    let (mut total, mut render, mut kernel) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..10u8 {
        let Group::Hosts(set) = &*rules.groups[&id] else {
            unreachable!("tier-pods-0 is a host group");
        };
        let mut set = set.clone();
        set.push_addr(IpAddr::V4(Ipv4Addr::new(10, 99, 0, 101 + 2 * i)));
        set.normalize();
        rules.groups.insert(id.clone(), Arc::new(Group::Hosts(set)));
        let t0 = Instant::now();
        let desired = renderer.render(&rules, ifaces).expect("render");
        let t1 = Instant::now();
        let outcome = applier.apply(&desired).expect("incremental apply");
        assert_eq!(outcome.kind, palisade_agent::ApplyKind::Incremental);
        assert!(
            outcome
                .phases
                .iter()
                .any(|(p, _)| *p == palisade_agent::apply::phase::NETLINK_ELEMENTS),
            "members go over netlink: {:?}",
            outcome.phases
        );
        total.push(common::ms(t0.elapsed()));
        render.push(common::ms(t1 - t0));
        kernel.push(common::ms(outcome.duration));
    }
    println!(
        "one member added to a group of the tiered lists' classes ({maps} class maps, \
         {form}), render + apply, median of 10: {:.2} ms (render {:.2}, applier {:.2})",
        median(&total),
        median(&render),
        median(&kernel)
    );
    let _ = std::process::Command::new("ip")
        .args([
            "netns", "exec", node, "nft", "delete", "table", "inet", "palisade",
        ])
        .output();
}

/// Whether [`agent_renderer`] renders tier lists as one plain chain each, as before
/// address classes: the paired measurement's baseline for them.
static PLAIN_TIERS: AtomicBool = AtomicBool::new(false);
/// Whether class maps stay interval maps (the paired measurement's `interval` part).
static INTERVAL_CLASS_MAPS: AtomicBool = AtomicBool::new(false);

/// The agent's renderer with its default configuration: the flow log on (denied packets
/// go through its rate-limited NFLOG chains; allowed ones never meet them) and the start-up
/// window's unknown-interface rules, or (`window` false) none of those rules, whose cost
/// per packet is then the difference to the default.
fn agent_renderer(window: bool) -> Renderer {
    let mut renderer = if window {
        Renderer::default()
    } else {
        Renderer::with_pod_interface_patterns(Vec::new())
    };
    if PLAIN_TIERS.load(Ordering::Relaxed) {
        renderer.set_classes_from(usize::MAX);
    }
    if INTERVAL_CLASS_MAPS.load(Ordering::Relaxed) {
        renderer.set_class_map_lengths(0);
    }
    renderer.set_flow_log(Some(FlowLog {
        group: 9469,
        per_second: 10,
        burst: 20,
    }));
    renderer
}

/// What is loaded in the node namespace for one variant; unloaded on drop.
struct Loaded<'a> {
    node: &'a str,
    variant: Variant,
    ipt: Option<iptables::Rendered>,
}

impl<'a> Loaded<'a> {
    fn load(
        node: &'a str,
        variant: Variant,
        empty: &NodeRuleSet,
        policy: &NodeRuleSet,
        ifaces: &Interfaces,
    ) -> Loaded<'a> {
        let mut loaded = Loaded {
            node,
            variant,
            ipt: None,
        };
        match variant {
            Variant::None => {}
            Variant::PalisadeEmpty
            | Variant::Palisade
            | Variant::PalisadeEmptyAgain
            | Variant::PalisadeNoWindow => {
                let rules = if variant == Variant::Palisade {
                    policy
                } else {
                    empty
                };
                let table = agent_renderer(variant != Variant::PalisadeNoWindow)
                    .render(rules, ifaces)
                    .expect("render");
                Applier::new(Nft::in_netns(node))
                    .apply(&table)
                    .expect("apply palisade table");
            }
            Variant::Iptables => {
                let r = iptables::render(policy, ifaces);
                sh_stdin(&["ip", "netns", "exec", node, "ipset", "restore"], &r.ipset);
                sh_stdin(
                    &[
                        "ip",
                        "netns",
                        "exec",
                        node,
                        iptables::restore_program(),
                        "-w",
                    ],
                    &r.iptables,
                );
                loaded.ipt = Some(r);
            }
        }
        loaded
    }

    /// Packets that hit the client's allow rule so far.
    fn allowed_packets(&self, client_rule: &str) -> u64 {
        match self.variant {
            Variant::Palisade => {
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    self.node,
                    "nft",
                    "-j",
                    "list",
                    "counter",
                    "inet",
                    "palisade",
                    client_rule,
                ]);
                let doc: serde_json::Value = serde_json::from_str(&out).expect("nft JSON");
                doc["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["counter"]["packets"].as_u64())
                    .sum()
            }
            Variant::Iptables => {
                // The server is pod 1; its ingress rest chain holds the allow rules (the
                // 10k-CIDR ones never match the client, so RETURN hits are the client's).
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    self.node,
                    iptables::list_program(),
                    "-w",
                    "-L",
                    "PAL-IR-1",
                    "-v",
                    "-x",
                    "-n",
                ]);
                out.lines()
                    .skip(2)
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.get(2) == Some(&"RETURN")).then(|| f[0].parse::<u64>().ok())?
                    })
                    .sum()
            }
            _ => 0,
        }
    }
}

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        let run = |args: &[&str], input: Option<&str>| {
            let mut cmd = vec!["ip", "netns", "exec", self.node];
            cmd.extend_from_slice(args);
            match input {
                Some(text) => sh_stdin(&cmd, text),
                None => {
                    let _ = std::process::Command::new(cmd[0]).args(&cmd[1..]).output();
                }
            }
        };
        match self.variant {
            Variant::None => {}
            Variant::PalisadeEmpty
            | Variant::Palisade
            | Variant::PalisadeEmptyAgain
            | Variant::PalisadeNoWindow => {
                run(&["nft", "delete", "table", "inet", "palisade"], None)
            }
            Variant::Iptables => {
                if let Some(r) = &self.ipt {
                    let (ipt, ipset) = iptables::teardown_scripts(r);
                    run(&[iptables::restore_program(), "-w"], Some(&ipt));
                    run(&["ipset", "restore"], Some(&ipset));
                }
                // iptables-nft leaves an empty `ip filter` table with hooked base chains.
                run(&["nft", "delete", "table", "ip", "filter"], None);
            }
        }
    }
}

/// TCP acceptors and UDP echo servers on PORT and DENIED_PORT in the server pod.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    netns: String,
    addr: IpAddr,
}

impl Servers {
    fn start(netns: &str, addr: IpAddr) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let ports: std::collections::BTreeSet<u16> =
            [PORT, DENIED_PORT].into_iter().chain(UDP_PORTS).collect();
        for port in ports {
            // Sockets belong to the namespace they were created in; serving them from
            // threads outside it is fine.
            let (listener, udp) = in_netns(netns, move || {
                let listener = (port == PORT || port == DENIED_PORT).then(|| {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
                    s.set_reuse_address(true).expect("reuseaddr");
                    s.bind(&SockAddr::from(SocketAddr::new(addr, port)))
                        .expect("bind tcp");
                    s.listen(4096).expect("listen");
                    TcpListener::from(s)
                });
                let udp = UdpSocket::bind(SocketAddr::new(addr, port)).expect("bind udp");
                udp.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                (listener, udp)
            })
            .join()
            .expect("servers bound");
            for _ in 0..SERVER_THREADS {
                let Some(listener) = &listener else { break };
                let l = listener.try_clone().expect("clone listener");
                let stop2 = stop.clone();
                threads.push(std::thread::spawn(move || {
                    // Accepted connections are dropped at once; the client resets them.
                    while !stop2.load(Ordering::Relaxed) {
                        let _ = l.accept();
                    }
                }));
            }
            let stop2 = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Servers {
            stop,
            threads,
            netns: netns.to_string(),
            addr,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking acceptors (from inside the pod: no policy in the way).
        let addr = self.addr;
        let _ = in_netns(&self.netns, move || {
            for port in [PORT, DENIED_PORT] {
                for _ in 0..SERVER_THREADS * 2 {
                    let _ = std::net::TcpStream::connect_timeout(
                        &SocketAddr::new(addr, port),
                        Duration::from_millis(100),
                    );
                }
            }
        })
        .join();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_connect(dst: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
        return false;
    };
    // Closing with a reset leaves no TIME_WAIT behind: ports stay available, and the
    // next SYN from a reused port opens a new conntrack entry.
    let _ = s.set_linger(Some(Duration::ZERO));
    s.connect_timeout(&SockAddr::from(dst), timeout).is_ok()
}

fn udp_request(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = UdpSocket::bind(src) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 16];
    s.send_to(b"ping", dst).is_ok() && s.recv_from(&mut buf).is_ok()
}

/// CPU time of this whole process, exited threads included (client, server threads and
/// the softirq work they run), from /proc: a clock tick is < 0.2 % of a 3 s run on 2 CPUs.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th.
    let fields: Vec<u64> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let tick = 1.0
        / sh(&["getconf", "CLK_TCK"])
            .trim()
            .parse::<f64>()
            .unwrap_or(100.0);
    Duration::from_secs_f64((fields[11] + fields[12]) as f64 * tick)
}

/// Entries in the node's conntrack table (0 while no rule has loaded conntrack there).
fn conntrack_count(node: &str) -> u64 {
    std::process::Command::new("ip")
        .args(["netns", "exec", node, "cat"])
        .arg("/proc/sys/net/netfilter/nf_conntrack_count")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (at most 2 s: the previous run's entries have expired by then, 1 s timeouts)
/// until the previous run's conntrack entries have been reaped; returns how many are left.
/// The kernel's garbage collector often takes longer than that, so no variant waits for
/// it and leftovers are reported, not waited for.
fn settle(node: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut count = conntrack_count(node);
    while count > 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        count = conntrack_count(node);
    }
    count
}

/// (successes, failures) per protocol, summed over client threads, for `secs` seconds.
/// One new flow from client thread `t`: a TCP connect, or a UDP request from the next
/// source port of the thread's block (`i` counts the thread's UDP requests).
fn one_flow(udp: bool, src: IpAddr, dst: IpAddr, t: usize, i: &mut usize) -> bool {
    if !udp {
        return tcp_connect(SocketAddr::new(dst, PORT), Duration::from_secs(1));
    }
    let base = UDP_PORT_BASE + t as u16 * UDP_PORTS_PER_THREAD;
    let server = UDP_PORTS[(*i + t) % UDP_PORTS.len()];
    let port = base + ((*i / UDP_PORTS.len()) % usize::from(UDP_PORTS_PER_THREAD)) as u16;
    *i += 1;
    udp_request(
        SocketAddr::new(src, port),
        SocketAddr::new(dst, server),
        Duration::from_millis(200),
    )
}

fn run_load(netns: &str, src: IpAddr, dst: IpAddr, udp: bool, secs: f64) -> (u64, u64) {
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            in_netns(netns, move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut i = 0usize;
                while Instant::now() < start {
                    std::hint::spin_loop();
                }
                while Instant::now() < deadline {
                    let success = one_flow(udp, src, dst, t, &mut i);
                    if success {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// CPU time of this process's live threads (ns resolution, unlike `process_cpu`).
fn threads_cpu() -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// Per-cycle ratios (rate, CPU per flow) of `dsts[1]` to `dsts[0]`: all client threads
/// send to one destination for `slice`, then to the other, in alternating order, for
/// `secs`. Both pods sit behind the same table and conntrack table under the same load,
/// so this isolates what one pod's rules cost from everything else that varies between
/// separate runs.
fn run_alternating(
    netns: &str,
    src: IpAddr,
    dsts: [IpAddr; 2],
    udp: bool,
    slice: Duration,
    secs: f64,
) -> (Vec<f64>, Vec<f64>) {
    // usize::MAX: stop.
    let target = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let oks: Arc<[std::sync::atomic::AtomicU64; 2]> = Arc::new(Default::default());
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let (target, oks) = (target.clone(), oks.clone());
            in_netns(netns, move || {
                let mut i = 0usize;
                loop {
                    let which = target.load(Ordering::Relaxed);
                    if which == usize::MAX {
                        break;
                    }
                    let success = one_flow(udp, src, dsts[which], t, &mut i);
                    if success {
                        oks[which].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let cycles = ((secs / (2.0 * slice.as_secs_f64())) as usize).max(1);
    let (mut rate, mut cpu) = (Vec::new(), Vec::new());
    for c in 0..cycles {
        let mut per = [(0.0, 0.0); 2];
        let order = if c % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            target.store(which, Ordering::Relaxed);
            let (n0, t0, c0) = (
                oks[which].load(Ordering::Relaxed),
                Instant::now(),
                threads_cpu(),
            );
            std::thread::sleep(slice);
            let (n1, t1, c1) = (
                oks[which].load(Ordering::Relaxed),
                Instant::now(),
                threads_cpu(),
            );
            let n = (n1 - n0).max(1) as f64;
            per[which] = (n / (t1 - t0).as_secs_f64(), (c1 - c0).as_secs_f64() / n);
        }
        rate.push(per[1].0 / per[0].0);
        cpu.push(per[1].1 / per[0].1);
    }
    target.store(usize::MAX, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }
    (rate, cpu)
}

/// The `q` quantile (0..=1) of `values`.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Allowed port open and denied port blocked, TCP and UDP, from the client.
fn check_enforced(netns: &str, src: IpAddr, dst: IpAddr, expect_blocked: bool) {
    let (ns, t) = (netns.to_string(), Duration::from_millis(300));
    let results = in_netns(&ns, move || {
        [PORT, DENIED_PORT].map(|port| {
            (
                tcp_connect(SocketAddr::new(dst, port), t),
                udp_request(
                    SocketAddr::new(src, 0),
                    SocketAddr::new(dst, port),
                    Duration::from_millis(300),
                ),
            )
        })
    })
    .join()
    .expect("check thread");
    assert_eq!(results[0], (true, true), "allowed port {PORT} must be open");
    let blocked = (!expect_blocked, !expect_blocked);
    assert_eq!(
        results[1],
        blocked,
        "port {DENIED_PORT} must be {}",
        if expect_blocked { "blocked" } else { "open" }
    );
}

fn main() {
    if !common::can_run("rate") {
        return;
    }
    let secs: f64 = env_or("PALISADE_BENCH_SECONDS", 3.0);
    let rounds: usize = env_or("PALISADE_BENCH_ROUNDS", 5);
    let paired_secs: f64 = env_or("PALISADE_BENCH_PAIRED_SECONDS", 20.0);
    let paired_parts: Vec<String> = std::env::var("PALISADE_BENCH_PAIRED")
        .unwrap_or_else(|_| "policy,audit,tiered,plain,interval,members".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let lab = Lab::new(SUBNET, &["bench/client", "bench/server", "bench/open"]);
    let node = lab.node.name.clone();
    for s in [
        "net.netfilter.nf_conntrack_udp_timeout=1",
        "net.netfilter.nf_conntrack_tcp_timeout_close=1",
    ] {
        // The conntrack module may not be loaded yet: loading any ct rule loads it.
        if std::process::Command::new("ip")
            .args(["netns", "exec", &node, "sysctl", "-qw", s])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            sh(&["modprobe", "nf_conntrack"]);
            lab.node.sysctl(s);
        }
    }
    lab.pods[0]
        .netns
        .sysctl("net.ipv4.ip_local_port_range=1024 65535");
    let (client, server) = (&lab.pods[0], &lab.pods[1]);
    let (src, dst) = (client.ip4, server.ip4);
    let ifaces = lab.interfaces();
    let empty = node_rules(&lab, false);
    let policy = node_rules(&lab, true);
    let _servers = Servers::start(&server.netns.name, dst);
    let open = lab.pods[2].ip4;
    let _open_servers = Servers::start(&lab.pods[2].netns.name, open);
    let client_ns = client.netns.name.clone();

    let ipt = iptables::render(&policy.rules, &ifaces);
    let table = agent_renderer(true)
        .render(&policy.rules, &ifaces)
        .expect("render");
    println!(
        "policy: ingress of {} allows {} /24s (not the client) and the client's /32, each on \
         {} TCP + {} UDP port ranges; {} CPUs, {} client threads, {secs} s per run, {rounds} rounds",
        server.key,
        sizes().0,
        sizes().1,
        sizes().1,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        CLIENT_THREADS
    );
    println!(
        "nftables: {} set elements, {} rules; iptables: {} ipset entries, {} rules ({})",
        table.sets.values().map(|s| s.elements.len()).sum::<usize>(),
        table.chains.values().map(|c| c.len()).sum::<usize>(),
        ipt.set_elements,
        ipt.rules,
        iptables::backend()
    );

    // Warm-up, and the reference check that the denied port is reachable without policy.
    check_enforced(&client_ns, src, dst, false);
    run_load(&client_ns, src, dst, false, 0.5);

    let mut tcp: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut udp: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    // CPU µs per successful flow.
    let mut tcp_cpu: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut udp_cpu: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut traversal: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut failures: BTreeMap<Variant, u64> = BTreeMap::new();
    let mut unsettled = 0u64;
    for round in 0..rounds {
        for variant in Variant::order(round) {
            let loaded = Loaded::load(&node, variant, &empty.rules, &policy.rules, &ifaces);
            check_enforced(&client_ns, src, dst, variant.enforces());
            let before = loaded.allowed_packets(&policy.client_rule);
            unsettled = unsettled.max(settle(&node));
            let cpu0 = process_cpu();
            let (tcp_ok, tcp_failed) = run_load(&client_ns, src, dst, false, secs);
            let cpu1 = process_cpu();
            let mid = loaded.allowed_packets(&policy.client_rule);
            unsettled = unsettled.max(settle(&node));
            let cpu2 = process_cpu();
            let (udp_ok, udp_failed) = run_load(&client_ns, src, dst, true, secs);
            let cpu3 = process_cpu();
            let after = loaded.allowed_packets(&policy.client_rule);
            drop(loaded);
            let per_flow = |cpu: Duration, ok: u64| cpu.as_secs_f64() * 1e6 / ok.max(1) as f64;
            let (tcp_us, udp_us) = (per_flow(cpu1 - cpu0, tcp_ok), per_flow(cpu3 - cpu2, udp_ok));
            tcp_cpu.entry(variant).or_default().push(tcp_us);
            udp_cpu.entry(variant).or_default().push(udp_us);
            if variant.enforces() {
                // Every successful connection's first packet must have passed the rule.
                assert!(
                    mid - before >= tcp_ok && after - mid >= udp_ok,
                    "{}: rule counter grew by {} (TCP) / {} (UDP) for {tcp_ok} / {udp_ok} \
                     successful flows: some flows did not traverse the rules",
                    variant.label(),
                    mid - before,
                    after - mid
                );
                traversal
                    .entry(variant)
                    .or_default()
                    .push((after - before) as f64 / (tcp_ok + udp_ok) as f64);
            }
            *failures.entry(variant).or_default() += tcp_failed + udp_failed;
            tcp.entry(variant).or_default().push(tcp_ok as f64 / secs);
            udp.entry(variant).or_default().push(udp_ok as f64 / secs);
            eprintln!(
                "round {round} {:<30} tcp {:>6.0}/s {tcp_us:>5.1} µs CPU  udp {:>6.0}/s {udp_us:>5.1} µs CPU  failed {}",
                variant.label(),
                tcp_ok as f64 / secs,
                udp_ok as f64 / secs,
                tcp_failed + udp_failed
            );
        }
    }

    if paired_secs > 0.0 {
        // The same pod pair's flows with and without the policy, interleaved finely; then
        // again with a policy in audit beside the enforced one.
        let audited = with_audit(&policy.rules);
        let audit_table = agent_renderer(true)
            .render(&audited, &ifaces)
            .expect("render");
        assert!(
            audit_table
                .chains
                .keys()
                .any(|c| c.starts_with("audit-ingress/")),
            "the server has an audit chain"
        );
        let tiered = with_tiered(&policy.rules, &lab);
        for ((what, rules, plain), part) in [
            ("the policy", &policy.rules, false),
            ("the policy and an audit Admin deny rule", &audited, false),
            (
                "the 200 tiered policies (on its ingress and the client's egress; to the \
                 other pod the client's first Admin rule allows)",
                &tiered,
                false,
            ),
            (
                "the 200 tiered policies as plain chains, without address classes",
                &tiered,
                true,
            ),
            (
                "the 200 tiered policies, class maps as interval maps",
                &tiered,
                false,
            ),
        ]
        .into_iter()
        .zip(["policy", "audit", "tiered", "plain", "interval"])
        .filter(|(_, part)| paired_parts.iter().any(|p| p == part))
        {
            PLAIN_TIERS.store(plain, Ordering::Relaxed);
            INTERVAL_CLASS_MAPS.store(part == "interval", Ordering::Relaxed);
            let loaded = Loaded::load(&node, Variant::Palisade, &empty.rules, rules, &ifaces);
            check_enforced(&client_ns, src, dst, true);
            check_enforced(&client_ns, src, open, false);
            for udp in [false, true] {
                settle(&node);
                let (rate, cpu) = run_alternating(
                    &client_ns,
                    src,
                    [open, dst],
                    udp,
                    Duration::from_millis(100),
                    paired_secs,
                );
                println!(
                    "{} flows to the pod with {what} vs to a pod without, same table, \
                     alternating every 100 ms for {paired_secs} s ({} cycles): rate {:.1} % \
                     (IQR {:.1}-{:.1}), CPU per flow {:.1} % (IQR {:.1}-{:.1})",
                    if udp { "UDP" } else { "TCP" },
                    rate.len(),
                    100.0 * median(&rate),
                    100.0 * quantile(&rate, 0.25),
                    100.0 * quantile(&rate, 0.75),
                    100.0 * median(&cpu),
                    100.0 * quantile(&cpu, 0.25),
                    100.0 * quantile(&cpu, 0.75),
                );
            }
            drop(loaded);
        }
        PLAIN_TIERS.store(false, Ordering::Relaxed);
        INTERVAL_CLASS_MAPS.store(false, Ordering::Relaxed);
        if paired_parts.iter().any(|p| p == "members") {
            for interval in [false, true, false, true] {
                INTERVAL_CLASS_MAPS.store(interval, Ordering::Relaxed);
                membership_changes(&node, &tiered, &ifaces);
            }
            INTERVAL_CLASS_MAPS.store(false, Ordering::Relaxed);
        }
    }
    if tcp.is_empty() {
        return;
    }
    // NaN for a variant not selected.
    let med =
        |m: &BTreeMap<Variant, Vec<f64>>, v: Variant| m.get(&v).map_or(f64::NAN, |x| median(x));
    // Each round's value relative to Palisade without policy in the same round: slow
    // changes in the machine's load cancel out.
    let paired = |m: &BTreeMap<Variant, Vec<f64>>, v: Variant| {
        let (Some(base), Some(values)) = (m.get(&Variant::PalisadeEmpty), m.get(&v)) else {
            return "-".to_string();
        };
        let r: Vec<f64> = values.iter().zip(base).map(|(x, b)| x / b).collect();
        format!("{:.1} %", 100.0 * median(&r))
    };
    let pct = |a: f64, b: f64| format!("{:.1} %", 100.0 * a / b);
    let mut rows = vec![vec![
        "variant".to_string(),
        "TCP conn/s".into(),
        "vs no firewall".into(),
        "vs no policy".into(),
        "paired".into(),
        "CPU µs/conn".into(),
        "paired".into(),
        "UDP req/s".into(),
        "vs no policy".into(),
        "paired".into(),
        "CPU µs/req".into(),
        "paired".into(),
        "rule hits/flow".into(),
        "failed".into(),
    ]];
    for v in Variant::selected() {
        let (t, u) = (med(&tcp, v), med(&udp, v));
        rows.push(vec![
            v.label().to_string(),
            format!("{t:.0}"),
            pct(t, med(&tcp, Variant::None)),
            pct(t, med(&tcp, Variant::PalisadeEmpty)),
            paired(&tcp, v),
            format!("{:.1}", med(&tcp_cpu, v)),
            paired(&tcp_cpu, v),
            format!("{u:.0}"),
            pct(u, med(&udp, Variant::PalisadeEmpty)),
            paired(&udp, v),
            format!("{:.1}", med(&udp_cpu, v)),
            paired(&udp_cpu, v),
            traversal
                .get(&v)
                .map_or("-".into(), |x| format!("{:.3}", median(x))),
            failures.get(&v).copied().unwrap_or(0).to_string(),
        ]);
    }
    println!();
    println!(
        "Medians of {rounds} interleaved runs of {secs} s; \"paired\": median over rounds of the \
         ratio to Palisade without policy in the same round (target: Palisade with the policy \
         ≥ 95 % of no policy; \"no policy (again)\" shows the noise floor):"
    );
    print_table(&rows);
    if unsettled > 64 {
        println!(
            "note: a run started with up to {unsettled} expired conntrack entries not yet reaped"
        );
    }
    let p = med(&tcp, Variant::Palisade);
    let i = med(&tcp, Variant::Iptables);
    println!(
        "Palisade / iptables+ipset: TCP {:.2}x, UDP {:.2}x",
        p / i,
        med(&udp, Variant::Palisade) / med(&udp, Variant::Iptables)
    );
}
