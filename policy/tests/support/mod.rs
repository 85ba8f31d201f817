//! Generators of small random clusters, policies and changes for the property tests.
//!
//! Everything is drawn from small vocabularies (three label keys, three values, a handful of
//! ports and port names) so that selectors, ranges and names actually hit each other, and
//! addresses are laid out by index so that `ipBlock`s with `except` can cut right around pod
//! and node addresses.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use palisade_policy::ruleset::Group;
use palisade_policy::{
    Action, Change, Cluster, ContainerPort, Enforcement, Family, Flow, Isolation, LabelSelector,
    Labels, Namespace, NamespaceScope, Node, NodeRuleSet, Operator, Peer, Pod, PodKey, Policy,
    PolicyId, PolicyKind, PortRule, PortSpec, Protocol, Requirement, Rule, Subject, Tier, Touched,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;

pub const KEYS: [&str; 3] = ["app", "tier", "env"];
pub const VALUES: [&str; 3] = ["a", "b", "c"];
pub const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
pub const PORTS: [u16; 5] = [53, 80, 443, 8080, 9090];
/// The (protocol, port) pairs every flow of a generated cluster is probed with.
pub const PROBES: [(Protocol, u16); 9] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 443),
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 9090),
    (Protocol::Tcp, 1234),
    (Protocol::Udp, 53),
    (Protocol::Udp, 80),
    (Protocol::Sctp, 80),
    (Protocol::Sctp, 9090),
];

/// The property tests' configuration. `Config::default()` reads PROPTEST_CASES. Shrinking
/// replays whole change sequences and compiles, so it is bounded in time rather than left
/// to run for many minutes in CI. Seeds of past failures (`NAME.proptest-regressions`,
/// beside each test file) are replayed before new cases; minimal reproductions also become
/// named #[test]s.
pub fn config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        max_shrink_time: 120_000,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..proptest::test_runner::Config::default()
    }
}

/// Every pod pair, both families where both ends have one, every probe port.
pub fn flows(cluster: &Cluster) -> Vec<Flow> {
    let mut out = Vec::new();
    for src in cluster.pods.values() {
        for dst in cluster.pods.values() {
            for family in [Family::IPv4, Family::IPv6] {
                if src.ip_of(family).is_none() || dst.ip_of(family).is_none() {
                    continue;
                }
                for (protocol, port) in PROBES {
                    out.push(Flow {
                        src: src.key(),
                        dst: dst.key(),
                        protocol,
                        port,
                        family,
                    });
                }
            }
        }
    }
    out
}

pub fn namespace_name(i: usize) -> String {
    format!("ns{i}")
}

pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Node `i`: 10.0.0.(1+i) and fd10::(1+i). Pod `i`: 10.0.0.(16+i) and fd10::(16+i), so
/// one /27 or /123 can cover nodes and pods alike.
pub fn node_addresses(i: usize) -> Vec<IpAddr> {
    vec![v4(1 + i as u8), v6(1 + i as u16)]
}

pub fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

pub fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, last))
}

pub fn labels() -> impl Strategy<Value = Labels> {
    btree_map(select(&KEYS[..]), select(&VALUES[..]), 0..=2).prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn requirement() -> impl Strategy<Value = Requirement> {
    (
        select(&KEYS[..]),
        select(
            &[
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist,
            ][..],
        ),
        proptest::sample::subsequence(&VALUES[..], 1..=2),
    )
        .prop_map(|(key, operator, values)| Requirement {
            key: key.to_string(),
            operator,
            values: match operator {
                Operator::In | Operator::NotIn => values.iter().map(|v| v.to_string()).collect(),
                Operator::Exists | Operator::DoesNotExist => BTreeSet::new(),
            },
        })
}

/// Mostly small selectors; a fair share of `{}`.
pub fn selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        2 => Just(LabelSelector::everything()),
        3 => btree_map(select(&KEYS[..]), select(&VALUES[..]), 1..=2).prop_map(|m| {
            LabelSelector::with_labels(m)
        }),
        2 => (labels(), vec(requirement(), 1..=2)).prop_map(|(match_labels, match_expressions)| {
            LabelSelector { match_labels, match_expressions }
        }),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![3 => Just(Protocol::Tcp), 2 => Just(Protocol::Udp), 1 => Just(Protocol::Sctp)]
}

/// Container ports with names unique within the pod (as Kubernetes validates).
fn container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
    vec(
        (
            proptest::option::weighted(0.7, select(&PORT_NAMES[..])),
            select(&PORTS[..]),
            protocol(),
        ),
        0..=3,
    )
    .prop_map(|ports| {
        let mut seen = BTreeSet::new();
        ports
            .into_iter()
            .map(|(name, port, protocol)| ContainerPort {
                name: name.filter(|n| seen.insert(*n)).map(str::to_string),
                port,
                protocol,
            })
            .collect()
    })
}

/// How a generated pod is addressed.
#[derive(Clone, Copy, Debug)]
pub enum Stack {
    V4,
    Dual,
    V6,
    HostNetwork,
    /// Scheduled, no address yet.
    Pending,
}

fn stack() -> impl Strategy<Value = Stack> {
    prop_oneof![
        4 => Just(Stack::V4),
        3 => Just(Stack::Dual),
        1 => Just(Stack::V6),
        2 => Just(Stack::HostNetwork),
        1 => Just(Stack::Pending),
    ]
}

/// Pod `index` in namespace `namespace` on node `node`.
pub fn pod(
    index: usize,
    namespace: usize,
    node: usize,
    stack: Stack,
    labels: Labels,
    ports: Vec<ContainerPort>,
) -> Pod {
    let last = 16 + index;
    let ips = match stack {
        Stack::V4 => vec![v4(last as u8)],
        Stack::Dual => vec![v4(last as u8), v6(last as u16)],
        Stack::V6 => vec![v6(last as u16)],
        Stack::HostNetwork => node_addresses(node),
        Stack::Pending => Vec::new(),
    };
    Pod {
        namespace: namespace_name(namespace),
        name: format!("p{index}"),
        labels,
        node: node_name(node),
        ips,
        host_network: matches!(stack, Stack::HostNetwork),
        ports,
    }
}

/// The parts of a pod that do not depend on its index.
pub type PodShape = (usize, usize, Stack, Labels, Vec<ContainerPort>);

/// Namespace index up to `namespaces` inclusive: the last one has no Namespace object.
pub fn pod_shape(namespaces: usize, nodes: usize) -> impl Strategy<Value = PodShape> {
    (
        0..=namespaces,
        0..nodes,
        stack(),
        labels(),
        container_ports(),
    )
}

pub fn node(index: usize, labels: Labels) -> Node {
    Node {
        name: node_name(index),
        labels,
        addresses: node_addresses(index),
    }
}

pub fn namespace(index: usize, labels: Labels) -> Namespace {
    Namespace {
        name: namespace_name(index),
        labels,
    }
}

/// 2-3 nodes, 2-3 namespaces (plus pods in one namespace without an object), 3-8 pods.
pub fn cluster() -> impl Strategy<Value = Cluster> {
    (2usize..=3, 2usize..=3).prop_flat_map(|(nodes, namespaces)| {
        (
            vec(labels(), nodes),
            vec(labels(), namespaces),
            vec(pod_shape(namespaces, nodes), 3..=8),
        )
            .prop_map(|(node_labels, ns_labels, pods)| {
                let mut cluster = Cluster::default();
                for (i, l) in node_labels.into_iter().enumerate() {
                    cluster.nodes.insert(node_name(i), node(i, l));
                }
                for (i, l) in ns_labels.into_iter().enumerate() {
                    cluster
                        .namespaces
                        .insert(namespace_name(i), namespace(i, l));
                }
                for (i, (ns, nd, st, l, ports)) in pods.into_iter().enumerate() {
                    let p = pod(i, ns, nd, st, l, ports);
                    cluster.pods.insert(p.key(), p);
                }
                cluster
            })
    })
}

/// A CIDR of the pod/node address plan, with or without exceptions inside it.
fn ip_block(with_except: bool) -> impl Strategy<Value = Peer> {
    (
        any::<bool>(),
        0u8..32,
        select(&[24u8, 27, 28, 29, 30, 31, 32][..]),
        vec((0u8..32, 1u8..=8), 0..=2),
    )
        .prop_map(move |(six, target, len, excepts)| {
            let (cidr, bits) = if six {
                (
                    IpNet::new(v6(u16::from(target)), 96 + len).unwrap().trunc(),
                    128u8,
                )
            } else {
                (IpNet::new(v4(target), len).unwrap().trunc(), 32u8)
            };
            let except = if with_except {
                excepts
                    .into_iter()
                    .filter_map(|(offset, extra)| {
                        let sub_len = (cidr.prefix_len() + extra).min(bits);
                        if sub_len <= cidr.prefix_len() {
                            return None;
                        }
                        let addr = if six {
                            v6(u16::from(offset))
                        } else {
                            v4(offset)
                        };
                        let sub = IpNet::new(addr, sub_len).ok()?.trunc();
                        cidr.contains(&sub).then_some(sub)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Peer::IpBlock { cidr, except }
        })
}

/// A NetworkPolicy peer in namespace `ns`: podSelector, namespaceSelector (+ podSelector),
/// or ipBlock.
fn np_peer(ns: String) -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => selector().prop_map(move |pods| Peer::Pods {
            namespaces: NamespaceScope::Named(ns.clone()),
            pods,
        }),
        3 => (selector(), selector()).prop_map(|(namespaces, pods)| Peer::Pods {
            namespaces: NamespaceScope::Selector(namespaces),
            pods,
        }),
        3 => ip_block(true),
    ]
}

/// A cluster policy peer: namespaces, pods, networks, nodes, or an unenforceable one.
fn tiered_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        4 => (selector(), selector()).prop_map(|(namespaces, pods)| Peer::Pods {
            namespaces: NamespaceScope::Selector(namespaces),
            pods,
        }),
        3 => ip_block(false),
        2 => selector().prop_map(Peer::Nodes),
        1 => Just(Peer::Nothing),
    ]
}

fn port_rule() -> impl Strategy<Value = PortRule> {
    let spec = prop_oneof![
        3 => select(&PORTS[..]).prop_map(|p| PortSpec::Range { start: p, end: p }),
        2 => select(&[(53u16, 80u16), (80, 443), (443, 8080), (8080, 9090), (1000, 2000)][..])
            .prop_map(|(start, end)| PortSpec::Range { start, end }),
        1 => Just(PortSpec::Any),
        3 => select(&PORT_NAMES[..]).prop_map(|n| PortSpec::Named(n.to_string())),
    ];
    (protocol(), spec).prop_map(|(protocol, port)| PortRule { protocol, port })
}

/// `None` (absent), `Some([])` rarely, else 1-2 entries.
fn optional_list<T: std::fmt::Debug + Clone>(
    item: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<Vec<T>>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Vec::new())),
        6 => vec(item, 1..=2).prop_map(Some),
    ]
}

fn np_rule(ns: String) -> impl Strategy<Value = Rule> {
    (optional_list(np_peer(ns)), optional_list(port_rule())).prop_map(|(peers, ports)| Rule {
        name: None,
        action: Action::Allow,
        peers,
        ports,
    })
}

/// A NetworkPolicy in one of the namespaces (or the object-less one).
pub fn network_policy(namespaces: usize) -> impl Strategy<Value = Policy> {
    (0..=namespaces, 0u8..3).prop_flat_map(|(ns_index, name)| {
        let ns = namespace_name(ns_index);
        (
            selector(),
            vec(np_rule(ns.clone()), 0..=3),
            vec(np_rule(ns.clone()), 0..=3),
            select(&[(true, false), (false, true), (true, true)][..]),
        )
            .prop_map(move |(pods, ingress, egress, (i, e))| Policy {
                id: PolicyId {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some(ns.clone()),
                    name: format!("np{name}"),
                },
                tier: Tier::NetworkPolicy,
                priority: 0,
                subject: Subject::Namespace {
                    namespace: ns.clone(),
                    pods,
                },
                ingress,
                egress,
                isolates: Isolation {
                    ingress: i,
                    egress: e,
                },
                enforcement: None,
            })
    })
}

fn tiered_rule(tier: Tier) -> impl Strategy<Value = Rule> {
    // Pass is legal in both tiers (v1alpha2/v1beta1); in Baseline it ends the tier, leaving
    // the flow to the default allow.
    let action = match tier {
        Tier::Admin | Tier::Baseline => {
            select(&[Action::Allow, Action::Deny, Action::Pass][..]).boxed()
        }
        Tier::NetworkPolicy => select(&[Action::Allow, Action::Deny][..]).boxed(),
    };
    (
        action,
        proptest::option::of(select(&["r0", "r1", "r2"][..])),
        prop_oneof![1 => Just(None), 4 => vec(tiered_peer(), 1..=2).prop_map(Some)],
        prop_oneof![2 => Just(None), 3 => vec(port_rule(), 1..=2).prop_map(Some)],
    )
        .prop_map(|(action, name, peers, ports)| Rule {
            name: name.map(str::to_string),
            action,
            peers,
            ports,
        })
}

/// A ClusterNetworkPolicy (Admin or Baseline), AdminNetworkPolicy or
/// BaselineAdminNetworkPolicy; priorities from a small set so that ties happen.
pub fn tiered_policy() -> impl Strategy<Value = Policy> {
    (
        select(
            &[
                (PolicyKind::ClusterNetworkPolicy, Tier::Admin),
                (PolicyKind::ClusterNetworkPolicy, Tier::Baseline),
                (PolicyKind::AdminNetworkPolicy, Tier::Admin),
                (PolicyKind::BaselineAdminNetworkPolicy, Tier::Baseline),
            ][..],
        ),
        0u8..3,
        0u32..3,
    )
        .prop_flat_map(|((kind, tier), name, priority)| {
            let (name, priority) = match kind {
                PolicyKind::BaselineAdminNetworkPolicy => ("default".to_string(), 0),
                _ => (format!("t{name}"), priority),
            };
            (
                selector(),
                selector(),
                vec(tiered_rule(tier), 0..=3),
                vec(tiered_rule(tier), 0..=3),
            )
                .prop_map(move |(namespaces, pods, ingress, egress)| Policy {
                    id: PolicyId {
                        kind,
                        namespace: None,
                        name: name.clone(),
                    },
                    tier,
                    priority,
                    subject: Subject::Cluster { namespaces, pods },
                    ingress,
                    egress,
                    isolates: Isolation::default(),
                    enforcement: None,
                })
        })
}

/// A mix of every kind, with unique ids.
pub fn policies(namespaces: usize) -> impl Strategy<Value = Vec<Policy>> {
    (
        vec(network_policy(namespaces), 0..=6),
        vec(tiered_policy(), 0..=5),
    )
        .prop_map(|(nps, tiered)| {
            let mut by_id = BTreeMap::new();
            for p in nps.into_iter().chain(tiered) {
                by_id.entry(p.id.clone()).or_insert(p);
            }
            by_id.into_values().collect()
        })
}

pub fn cluster_and_policies() -> impl Strategy<Value = (Cluster, Vec<Policy>)> {
    cluster().prop_flat_map(|c| {
        let namespaces = c.namespaces.len();
        (Just(c), policies(namespaces))
    })
}

/// The pod key of an index into the cluster's pods, if there are any.
pub fn nth_pod(cluster: &Cluster, index: usize) -> Option<PodKey> {
    let n = cluster.pods.len();
    (n > 0).then(|| cluster.pods.keys().nth(index % n).cloned())?
}

/// Audit: the annotation and namespace label of enforcement modes.
pub const KEY: &str = "palisade.dev/enforcement";

/// A policy annotation: none (namespace or default decides), audit or enforce.
pub fn annotation() -> impl Strategy<Value = Option<Enforcement>> {
    select(vec![
        None,
        None,
        Some(Enforcement::Audit),
        Some(Enforcement::Enforce),
    ])
}

/// A namespace label value: none, audit, enforce, or one that means nothing (enforce).
pub fn label_value() -> impl Strategy<Value = Option<&'static str>> {
    select(vec![None, Some("audit"), Some("enforce"), Some("Audit")])
}

pub fn with_label(mut labels: Labels, value: Option<&str>) -> Labels {
    match value {
        Some(v) => labels.insert(KEY.to_string(), v.to_string()),
        None => labels.remove(KEY),
    };
    labels
}

pub fn default_mode() -> impl Strategy<Value = Enforcement> {
    select(vec![Enforcement::Enforce, Enforcement::Audit])
}

/// A generated cluster and policies, with enforcement annotations and namespace labels.
pub fn staged_case() -> impl Strategy<Value = (Cluster, Vec<Policy>, Enforcement)> {
    cluster_and_policies().prop_flat_map(|(cluster, policies)| {
        let n = policies.len();
        let m = cluster.namespaces.len();
        (
            Just(cluster),
            Just(policies),
            proptest::collection::vec(annotation(), n),
            proptest::collection::vec(label_value(), m),
            default_mode(),
        )
            .prop_map(|(mut cluster, mut policies, notes, labels, default)| {
                for (p, note) in policies.iter_mut().zip(notes) {
                    p.enforcement = note;
                }
                for (ns, value) in cluster.namespaces.values_mut().zip(labels) {
                    ns.labels = with_label(std::mem::take(&mut ns.labels), value);
                }
                (cluster, policies, default)
            })
    })
}

/// The model's meaning of a change, applied to plain collections.
pub fn apply(cluster: &mut Cluster, policies: &mut BTreeMap<PolicyId, Policy>, change: &Change) {
    match change.clone() {
        Change::UpsertPod(p) => {
            cluster.pods.insert(p.key(), p);
        }
        Change::RemovePod(k) => {
            cluster.pods.remove(&k);
        }
        Change::UpsertNamespace(n) => {
            cluster.namespaces.insert(n.name.clone(), n);
        }
        Change::RemoveNamespace(n) => {
            cluster.namespaces.remove(&n);
        }
        Change::UpsertNode(n) => {
            cluster.nodes.insert(n.name.clone(), n);
        }
        Change::RemoveNode(n) => {
            cluster.nodes.remove(&n);
        }
        Change::UpsertPolicy(p) => {
            policies.insert(p.id.clone(), p);
        }
        Change::RemovePolicy(id) => {
            policies.remove(&id);
        }
    }
}

/// What a change failed to report, if anything: every node whose rule set changed is in
/// `touched.nodes`, or differs only in groups of `touched.groups`, is among the nodes
/// referencing each of them, and gets exactly its new state by taking their new members
/// from the compiler (what the controller sends it). `group` gives a group's members,
/// `references(group, node)` whether the compiler has the node among the group's.
pub fn unreported(
    before: &BTreeMap<String, NodeRuleSet>,
    after: &BTreeMap<String, NodeRuleSet>,
    touched: &Touched,
    group: impl Fn(&str) -> Option<Arc<Group>>,
    references: impl Fn(&str, &str) -> bool,
) -> Option<String> {
    let nodes: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for node in nodes {
        let (old, new) = (before.get(node), after.get(node));
        if old == new || touched.nodes.contains(node) {
            continue;
        }
        let (Some(old), Some(new)) = (old, new) else {
            return Some(format!(
                "node {node} came or went, touched only {:?}",
                touched.nodes
            ));
        };
        let mut patched = old.clone();
        for id in &touched.groups {
            if let Some(held) = patched.groups.get_mut(id) {
                if !references(id, node) {
                    return Some(format!(
                        "node {node} holds changed group {id} but is not among its nodes"
                    ));
                }
                match group(id) {
                    Some(g) => *held = g,
                    None => return Some(format!("changed group {id} is not live")),
                }
            }
        }
        if patched != *new {
            return Some(format!(
                "node {node} changed: {old:?} -> {new:?}, touched only {:?} and groups {:?}",
                touched.nodes, touched.groups
            ));
        }
    }
    None
}
