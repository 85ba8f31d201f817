//! One small hand-built cluster per semantic point of the specifications.

use std::net::IpAddr;

use super::evaluate;
use crate::model::*;
use crate::selector::{LabelSelector, Operator, Requirement};
use crate::verdict::{Flow, FlowError, Reason, Verdict};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::with_labels(pairs.iter().copied())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A builder of small clusters: nodes `n1` (10.0.0.1, fd00::1, `zone=a`) and `n2`
/// (10.0.0.2, fd00::2, `zone=b`).
struct World {
    cluster: Cluster,
}

impl World {
    fn new() -> Self {
        let mut cluster = Cluster::default();
        for (name, v4, v6, zone) in [
            ("n1", "10.0.0.1", "fd00::1", "a"),
            ("n2", "10.0.0.2", "fd00::2", "b"),
        ] {
            cluster.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    labels: labels(&[("zone", zone)]),
                    addresses: vec![ip(v4), ip(v6)],
                },
            );
        }
        World { cluster }
    }

    fn ns(mut self, name: &str, l: &[(&str, &str)]) -> Self {
        self.cluster.namespaces.insert(
            name.into(),
            Namespace {
                name: name.into(),
                labels: labels(l),
            },
        );
        self
    }

    fn pod(self, ns: &str, name: &str, l: &[(&str, &str)], node: &str, ips: &[&str]) -> Self {
        self.pod_full(ns, name, l, node, ips, false, vec![])
    }

    fn host_pod(self, ns: &str, name: &str, node: &str) -> Self {
        let ips: Vec<String> = self.cluster.nodes[node]
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        self.pod_full(ns, name, &[("app", "host")], node, &ips, true, vec![])
    }

    #[allow(clippy::too_many_arguments)]
    fn pod_full(
        mut self,
        ns: &str,
        name: &str,
        l: &[(&str, &str)],
        node: &str,
        ips: &[&str],
        host_network: bool,
        ports: Vec<ContainerPort>,
    ) -> Self {
        self.cluster.pods.insert(
            PodKey::new(ns, name),
            Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: labels(l),
                node: node.into(),
                ips: ips.iter().map(|a| ip(a)).collect(),
                host_network,
                ports,
            },
        );
        self
    }

    fn eval(&self, policies: &[Policy], flow: &Flow) -> crate::verdict::FlowDecision {
        evaluate(&self.cluster, policies, flow).unwrap()
    }
}

fn flow(src: &str, dst: &str, protocol: Protocol, port: u16) -> Flow {
    let key = |s: &str| {
        let (ns, name) = s.split_once('/').unwrap();
        PodKey::new(ns, name)
    };
    Flow {
        src: key(src),
        dst: key(dst),
        protocol,
        port,
        family: Family::IPv4,
    }
}

fn tcp(src: &str, dst: &str, port: u16) -> Flow {
    flow(src, dst, Protocol::Tcp, port)
}

fn rule(action: Action, peers: Option<Vec<Peer>>, ports: Option<Vec<PortRule>>) -> Rule {
    Rule {
        name: None,
        action,
        peers,
        ports,
    }
}

fn allow(peers: Option<Vec<Peer>>, ports: Option<Vec<PortRule>>) -> Rule {
    rule(Action::Allow, peers, ports)
}

fn pods_in(ns: &str, pods: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Named(ns.into()),
        pods: sel(pods),
    }
}

fn pods_where(namespaces: &[(&str, &str)], pods: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Selector(sel(namespaces)),
        pods: sel(pods),
    }
}

fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

fn port(protocol: Protocol, start: u16, end: u16) -> PortRule {
    PortRule {
        protocol,
        port: PortSpec::Range { start, end },
    }
}

fn named(protocol: Protocol, name: &str) -> PortRule {
    PortRule {
        protocol,
        port: PortSpec::Named(name.into()),
    }
}

fn np(
    ns: &str,
    name: &str,
    pods: &[(&str, &str)],
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
) -> Policy {
    Policy {
        id: PolicyId {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some(ns.into()),
            name: name.into(),
        },
        tier: Tier::NetworkPolicy,
        priority: 0,
        subject: Subject::Namespace {
            namespace: ns.into(),
            pods: sel(pods),
        },
        isolates: Isolation {
            ingress: ingress.is_some(),
            egress: egress.is_some(),
        },
        enforcement: None,
        ingress: ingress.unwrap_or_default(),
        egress: egress.unwrap_or_default(),
    }
}

fn tiered(
    kind: PolicyKind,
    tier: Tier,
    name: &str,
    priority: u32,
    namespaces: &[(&str, &str)],
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
) -> Policy {
    Policy {
        id: PolicyId {
            kind,
            namespace: None,
            name: name.into(),
        },
        tier,
        priority,
        subject: Subject::Cluster {
            namespaces: sel(namespaces),
            pods: LabelSelector::everything(),
        },
        ingress,
        egress,
        isolates: Isolation::default(),
        enforcement: None,
    }
}

fn admin(name: &str, priority: u32, ingress: Vec<Rule>, egress: Vec<Rule>) -> Policy {
    tiered(
        PolicyKind::ClusterNetworkPolicy,
        Tier::Admin,
        name,
        priority,
        &[],
        ingress,
        egress,
    )
}

fn baseline(name: &str, priority: u32, ingress: Vec<Rule>, egress: Vec<Rule>) -> Policy {
    tiered(
        PolicyKind::ClusterNetworkPolicy,
        Tier::Baseline,
        name,
        priority,
        &[],
        ingress,
        egress,
    )
}

fn origin(policy: &Policy, direction: Direction, index: usize) -> RuleOrigin {
    RuleOrigin {
        policy: policy.id.clone(),
        tier: policy.tier,
        priority: policy.priority,
        direction,
        index,
        name: policy.rules(direction)[index].name.clone(),
    }
}

/// Two namespaces (`a` labelled `team=x`, `b` labelled `team=y`) with web and db pods.
fn shop() -> World {
    World::new()
        .ns("a", &[("team", "x")])
        .ns("b", &[("team", "y")])
        .pod(
            "a",
            "web",
            &[("app", "web")],
            "n1",
            &["10.1.0.1", "fd01::1"],
        )
        .pod("a", "db", &[("app", "db")], "n2", &["10.1.0.2"])
        .pod("b", "web", &[("app", "web")], "n2", &["10.1.0.3"])
}

#[test]
fn no_policy_allows_with_not_isolated() {
    let d = shop().eval(&[], &tcp("a/web", "a/db", 80));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.egress.reason, Reason::NotIsolated);
    assert_eq!(d.ingress.reason, Reason::NotIsolated);
    assert_eq!(d.egress.direction, Direction::Egress);
    assert_eq!(d.ingress.direction, Direction::Ingress);
}

#[test]
fn isolation_without_rules_denies_only_its_direction() {
    let w = shop();
    let deny_in = np("a", "deny-in", &[("app", "db")], Some(vec![]), None);
    let d = w.eval(std::slice::from_ref(&deny_in), &tcp("a/web", "a/db", 80));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.egress.reason, Reason::NotIsolated);
    assert_eq!(
        d.ingress.reason,
        Reason::DefaultDeny {
            isolated_by: vec![deny_in.id.clone()]
        }
    );
    // The db pod's egress is not isolated by an ingress-only policy.
    let d = w.eval(&[deny_in], &tcp("a/db", "a/web", 80));
    assert_eq!(d.verdict, Verdict::Allow);
}

#[test]
fn policy_selects_only_its_namespace_and_labels() {
    let w = shop();
    let p = np("a", "deny-web", &[("app", "web")], Some(vec![]), None);
    assert_eq!(
        w.eval(std::slice::from_ref(&p), &tcp("a/db", "a/web", 80))
            .verdict,
        Verdict::Deny
    );
    // b/web has the same labels but lives in another namespace.
    assert_eq!(
        w.eval(&[p], &tcp("a/db", "b/web", 80)).verdict,
        Verdict::Allow
    );
}

#[test]
fn pod_selector_peer_is_limited_to_the_policy_namespace() {
    let w = shop();
    let p = np(
        "a",
        "from-web",
        &[("app", "db")],
        Some(vec![allow(
            Some(vec![pods_in("a", &[("app", "web")])]),
            None,
        )]),
        None,
    );
    let d = w.eval(std::slice::from_ref(&p), &tcp("a/web", "a/db", 5432));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&p, Direction::Ingress, 0))
    );
    let d = w.eval(&[p], &tcp("b/web", "a/db", 5432));
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn namespace_selector_peer_and_missing_namespace_object() {
    // Pod `c/web` lives in a namespace without a Namespace object: it has no labels.
    let w = shop().pod("c", "web", &[("app", "web")], "n1", &["10.1.0.9"]);
    let by_team = np(
        "a",
        "from-team-y",
        &[("app", "db")],
        Some(vec![allow(
            Some(vec![pods_where(&[("team", "y")], &[("app", "web")])]),
            None,
        )]),
        None,
    );
    let policies = [by_team];
    assert_eq!(
        w.eval(&policies, &tcp("b/web", "a/db", 1)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        w.eval(&policies, &tcp("a/web", "a/db", 1)).verdict,
        Verdict::Deny
    );
    assert_eq!(
        w.eval(&policies, &tcp("c/web", "a/db", 1)).verdict,
        Verdict::Deny
    );
    // `namespaceSelector: {}` means every namespace, the one without an object included.
    let all_ns = np(
        "a",
        "from-any-ns",
        &[("app", "db")],
        Some(vec![allow(Some(vec![pods_where(&[], &[])]), None)]),
        None,
    );
    assert_eq!(
        w.eval(std::slice::from_ref(&all_ns), &tcp("c/web", "a/db", 1))
            .verdict,
        Verdict::Allow
    );
    // NotIn matches the missing key of a namespace without labels.
    let not_in = np(
        "a",
        "not-team-x",
        &[("app", "db")],
        Some(vec![allow(
            Some(vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(LabelSelector {
                    match_labels: Default::default(),
                    match_expressions: vec![Requirement {
                        key: "team".into(),
                        operator: Operator::NotIn,
                        values: ["x".to_string()].into(),
                    }],
                }),
                pods: LabelSelector::everything(),
            }]),
            None,
        )]),
        None,
    );
    assert_eq!(
        w.eval(std::slice::from_ref(&not_in), &tcp("c/web", "a/db", 1))
            .verdict,
        Verdict::Allow
    );
    assert_eq!(
        w.eval(&[not_in], &tcp("a/web", "a/db", 1)).verdict,
        Verdict::Deny
    );
}

#[test]
fn policies_are_a_union_and_isolated_by_is_sorted() {
    let w = shop();
    let z = np("a", "z-deny", &[], Some(vec![]), None);
    let m = np(
        "a",
        "m-allow-web",
        &[("app", "db")],
        Some(vec![allow(
            Some(vec![pods_in("a", &[("app", "web")])]),
            None,
        )]),
        None,
    );
    let d = w.eval(&[z.clone(), m.clone()], &tcp("a/web", "a/db", 1));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&m, Direction::Ingress, 0))
    );
    let d = w.eval(&[z.clone(), m.clone()], &tcp("b/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::DefaultDeny {
            isolated_by: vec![m.id.clone(), z.id.clone()]
        }
    );
}

#[test]
fn absent_empty_and_any_rules() {
    let w = shop();
    // `ingress: [{}]`: one rule with no peers and no ports allows everything.
    let any = np("a", "any", &[], Some(vec![allow(None, None)]), None);
    assert_eq!(
        w.eval(&[any], &tcp("b/web", "a/db", 9)).verdict,
        Verdict::Allow
    );
    // `from: []` and `ports: []` match nothing.
    let empty_from = np("a", "e1", &[], Some(vec![allow(Some(vec![]), None)]), None);
    let empty_ports = np("a", "e2", &[], Some(vec![allow(None, Some(vec![]))]), None);
    assert_eq!(
        w.eval(&[empty_from, empty_ports], &tcp("b/web", "a/db", 9))
            .verdict,
        Verdict::Deny
    );
    // Unenforceable peers fail closed.
    let nothing = np(
        "a",
        "nothing",
        &[],
        Some(vec![allow(Some(vec![Peer::Nothing]), None)]),
        None,
    );
    assert_eq!(
        w.eval(&[nothing], &tcp("b/web", "a/db", 9)).verdict,
        Verdict::Deny
    );
}

#[test]
fn egress_isolation_checks_the_destination_address() {
    let w = shop();
    let p = np(
        "a",
        "web-out",
        &[("app", "web")],
        None,
        Some(vec![allow(
            Some(vec![pods_in("a", &[("app", "db")])]),
            None,
        )]),
    );
    let d = w.eval(std::slice::from_ref(&p), &tcp("a/web", "a/db", 5432));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(
        d.egress.reason,
        Reason::Rule(origin(&p, Direction::Egress, 0))
    );
    let d = w.eval(std::slice::from_ref(&p), &tcp("a/web", "b/web", 80));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        d.egress.reason,
        Reason::DefaultDeny {
            isolated_by: vec![p.id.clone()]
        }
    );
    assert_eq!(d.ingress.reason, Reason::NotIsolated);
}

#[test]
fn ip_block_with_except_matches_pod_addresses() {
    let w = shop();
    let p = np(
        "a",
        "block",
        &[("app", "db")],
        Some(vec![allow(
            Some(vec![block("10.1.0.0/24", &["10.1.0.3/32"])]),
            None,
        )]),
        None,
    );
    assert_eq!(
        w.eval(std::slice::from_ref(&p), &tcp("a/web", "a/db", 1))
            .verdict,
        Verdict::Allow
    );
    assert_eq!(
        w.eval(&[p], &tcp("b/web", "a/db", 1)).verdict,
        Verdict::Deny
    );
}

#[test]
fn dual_stack_flows_use_the_family_address() {
    let w = shop().pod(
        "b",
        "six",
        &[("app", "six")],
        "n2",
        &["10.1.0.6", "fd01::6"],
    );
    let v4_only = np(
        "b",
        "v4",
        &[("app", "six")],
        Some(vec![allow(Some(vec![block("10.0.0.0/8", &[])]), None)]),
        None,
    );
    let mut f = tcp("a/web", "b/six", 80);
    assert_eq!(
        w.eval(std::slice::from_ref(&v4_only), &f).verdict,
        Verdict::Allow
    );
    f.family = Family::IPv6;
    assert_eq!(
        w.eval(std::slice::from_ref(&v4_only), &f).verdict,
        Verdict::Deny
    );
    // Pod selectors match either family.
    let by_pod = np(
        "b",
        "pod",
        &[("app", "six")],
        Some(vec![allow(
            Some(vec![pods_in("a", &[("app", "web")])]),
            None,
        )]),
        None,
    );
    assert_eq!(w.eval(&[by_pod], &f).verdict, Verdict::Allow);
    // a/db has no IPv6 address.
    f.src = PodKey::new("a", "db");
    assert_eq!(
        evaluate(&w.cluster, &[], &f),
        Err(FlowError::NoAddress {
            pod: PodKey::new("a", "db"),
            family: Family::IPv6
        })
    );
}

#[test]
fn unknown_pods_are_errors() {
    let w = shop();
    assert_eq!(
        evaluate(&w.cluster, &[], &tcp("a/web", "a/nope", 1)),
        Err(FlowError::NoSuchPod(PodKey::new("a", "nope")))
    );
}

#[test]
fn host_network_pods_are_not_subjects_and_match_only_by_address() {
    let w = shop().host_pod("a", "agent", "n2");
    let deny_all = np("a", "deny-all", &[], Some(vec![]), Some(vec![]));
    // As subject: both directions exempt.
    let d = w.eval(std::slice::from_ref(&deny_all), &tcp("a/web", "a/agent", 1));
    assert_eq!(d.ingress.reason, Reason::HostNetwork);
    assert_eq!(d.egress.verdict, Verdict::Deny);
    let d = w.eval(std::slice::from_ref(&deny_all), &tcp("a/agent", "b/web", 1));
    assert_eq!(d.egress.reason, Reason::HostNetwork);
    assert_eq!(d.verdict, Verdict::Allow);

    // As a peer (from n2 to a/web on n1): a pod selector never matches it, even one that
    // selects its labels.
    let by_label = np(
        "a",
        "from-host",
        &[("app", "web")],
        Some(vec![allow(
            Some(vec![pods_in("a", &[("app", "host")])]),
            None,
        )]),
        None,
    );
    assert_eq!(
        w.eval(&[by_label], &tcp("a/agent", "a/web", 1)).verdict,
        Verdict::Deny
    );
    let by_block = np(
        "a",
        "from-node",
        &[("app", "web")],
        Some(vec![allow(Some(vec![block("10.0.0.2/32", &[])]), None)]),
        None,
    );
    assert_eq!(
        w.eval(&[by_block], &tcp("a/agent", "a/web", 1)).verdict,
        Verdict::Allow
    );
}

#[test]
fn own_node_may_always_reach_its_pods() {
    // a/db runs on n2, as does the host-network pod.
    let w = shop().host_pod("a", "agent", "n2");
    let deny_all = np("a", "deny-all", &[], Some(vec![]), None);
    let d = w.eval(std::slice::from_ref(&deny_all), &tcp("a/agent", "a/db", 1));
    assert_eq!(d.ingress.reason, Reason::NodeLocal);
    assert_eq!(d.verdict, Verdict::Allow);
    // A pod on another node is not exempt.
    let d = w.eval(&[deny_all], &tcp("a/agent", "a/web", 1));
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn ports_protocol_range_and_any() {
    let w = shop();
    let p = np(
        "a",
        "ports",
        &[("app", "db")],
        Some(vec![allow(
            None,
            Some(vec![
                port(Protocol::Tcp, 5000, 5010),
                PortRule {
                    protocol: Protocol::Sctp,
                    port: PortSpec::Any,
                },
            ]),
        )]),
        None,
    );
    let ps = [p];
    let v = |proto, port| w.eval(&ps, &flow("a/web", "a/db", proto, port)).verdict;
    assert_eq!(v(Protocol::Tcp, 5000), Verdict::Allow);
    assert_eq!(v(Protocol::Tcp, 5010), Verdict::Allow);
    assert_eq!(v(Protocol::Tcp, 5011), Verdict::Deny);
    assert_eq!(v(Protocol::Tcp, 4999), Verdict::Deny);
    assert_eq!(v(Protocol::Udp, 5005), Verdict::Deny);
    assert_eq!(v(Protocol::Sctp, 1), Verdict::Allow);
    assert_eq!(v(Protocol::Sctp, 65535), Verdict::Allow);
}

fn with_named_ports() -> World {
    let http = |port, protocol| ContainerPort {
        name: Some("http".into()),
        port,
        protocol,
    };
    shop()
        .pod_full(
            "a",
            "api1",
            &[("app", "api")],
            "n1",
            &["10.1.0.11"],
            false,
            vec![http(8080, Protocol::Tcp)],
        )
        .pod_full(
            "a",
            "api2",
            &[("app", "api")],
            "n2",
            &["10.1.0.12"],
            false,
            vec![http(9090, Protocol::Tcp), http(53, Protocol::Udp)],
        )
        .host_pod("a", "agent", "n2")
}

#[test]
fn named_ports_resolve_on_the_destination_pod_for_ingress() {
    let w = with_named_ports();
    let p = np(
        "a",
        "http-in",
        &[("app", "api")],
        Some(vec![allow(None, Some(vec![named(Protocol::Tcp, "http")]))]),
        None,
    );
    let ps = [p];
    let v = |dst, proto, port| w.eval(&ps, &flow("a/web", dst, proto, port)).verdict;
    assert_eq!(v("a/api1", Protocol::Tcp, 8080), Verdict::Allow);
    assert_eq!(v("a/api1", Protocol::Tcp, 9090), Verdict::Deny);
    assert_eq!(v("a/api2", Protocol::Tcp, 9090), Verdict::Allow);
    assert_eq!(v("a/api2", Protocol::Tcp, 8080), Verdict::Deny);
    // The name is resolved per protocol: UDP "http" is not what a TCP rule names.
    assert_eq!(v("a/api2", Protocol::Udp, 53), Verdict::Deny);
}

#[test]
fn named_ports_resolve_on_each_destination_for_egress() {
    let w = with_named_ports();
    let p = np(
        "a",
        "http-out",
        &[("app", "web")],
        None,
        Some(vec![allow(None, Some(vec![named(Protocol::Tcp, "http")]))]),
    );
    let ps = [p];
    let v = |dst, port| w.eval(&ps, &tcp("a/web", dst, port)).verdict;
    assert_eq!(v("a/api1", 8080), Verdict::Allow);
    assert_eq!(v("a/api1", 9090), Verdict::Deny);
    assert_eq!(v("a/api2", 9090), Verdict::Allow);
    // Never on a host-network destination, whatever its declared ports.
    let w = w.pod_full(
        "a",
        "agent",
        &[],
        "n2",
        &["10.0.0.2"],
        true,
        vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    );
    assert_eq!(
        w.eval(&ps, &tcp("a/web", "a/agent", 8080)).verdict,
        Verdict::Deny
    );
}

#[test]
fn admin_deny_overrides_network_policy_allow() {
    let w = shop();
    let np_allow = np("a", "allow-all", &[], Some(vec![allow(None, None)]), None);
    let deny = admin(
        "deny-team-y",
        10,
        vec![rule(
            Action::Deny,
            Some(vec![pods_where(&[("team", "y")], &[])]),
            None,
        )],
        vec![],
    );
    let ps = [np_allow.clone(), deny.clone()];
    let d = w.eval(&ps, &tcp("b/web", "a/db", 1));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&deny, Direction::Ingress, 0))
    );
    // Not matching the Deny: the NetworkPolicy tier decides.
    let d = w.eval(&ps, &tcp("a/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&np_allow, Direction::Ingress, 0))
    );
}

#[test]
fn admin_priority_then_kind_and_name_order() {
    let w = shop();
    let any_deny = || vec![rule(Action::Deny, None, None)];
    let any_allow = || vec![rule(Action::Allow, None, None)];
    let low_deny = admin("z", 5, any_deny(), vec![]);
    let high_allow = admin("a", 50, any_allow(), vec![]);
    let d = w.eval(
        &[high_allow.clone(), low_deny.clone()],
        &tcp("a/web", "a/db", 1),
    );
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&low_deny, Direction::Ingress, 0))
    );
    // Same priority: name decides.
    let a = admin("a", 5, any_allow(), vec![]);
    let d = w.eval(&[low_deny.clone(), a.clone()], &tcp("a/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&a, Direction::Ingress, 0))
    );
    // Same priority and name: kind decides (ClusterNetworkPolicy before AdminNetworkPolicy).
    let anp = tiered(
        PolicyKind::AdminNetworkPolicy,
        Tier::Admin,
        "a",
        5,
        &[],
        any_deny(),
        vec![],
    );
    let d = w.eval(&[anp, a.clone()], &tcp("a/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&a, Direction::Ingress, 0))
    );
}

#[test]
fn rules_are_tried_in_written_order() {
    let w = shop();
    let mut first = rule(Action::Allow, Some(vec![block("10.1.0.1/32", &[])]), None);
    first.name = Some("web-in".into());
    let mut second = rule(Action::Deny, None, None);
    second.name = Some("rest".into());
    let p = admin("ordered", 1, vec![first, second], vec![]);
    let d = w.eval(std::slice::from_ref(&p), &tcp("a/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&p, Direction::Ingress, 0))
    );
    assert_eq!(d.verdict, Verdict::Allow);
    let d = w.eval(std::slice::from_ref(&p), &tcp("b/web", "a/db", 1));
    let o = origin(&p, Direction::Ingress, 1);
    assert_eq!(o.name.as_deref(), Some("rest"));
    assert_eq!(d.ingress.reason, Reason::Rule(o));
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn pass_skips_the_admin_tier_and_is_recorded() {
    let w = shop();
    let pass = admin(
        "pass",
        1,
        vec![rule(
            Action::Pass,
            Some(vec![pods_where(&[("team", "x")], &[])]),
            None,
        )],
        vec![],
    );
    // A later Admin Deny is skipped by the Pass.
    let deny = admin("deny", 2, vec![rule(Action::Deny, None, None)], vec![]);
    let np_deny = np("a", "iso", &[("app", "db")], Some(vec![]), None);
    let base_allow = baseline("b", 1, vec![rule(Action::Allow, None, None)], vec![]);
    let ps = [
        pass.clone(),
        deny.clone(),
        np_deny.clone(),
        base_allow.clone(),
    ];
    let d = w.eval(&ps, &tcp("a/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::DefaultDeny {
            isolated_by: vec![np_deny.id.clone()]
        }
    );
    assert_eq!(d.ingress.passed, vec![origin(&pass, Direction::Ingress, 0)]);
    // Without isolation, the Baseline tier decides after the Pass.
    let d = w.eval(&ps, &tcp("a/db", "a/web", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&base_allow, Direction::Ingress, 0))
    );
    assert_eq!(d.ingress.passed, vec![origin(&pass, Direction::Ingress, 0)]);
    // Not matching the Pass, the Deny decides.
    let d = w.eval(&ps, &tcp("b/web", "a/web", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&deny, Direction::Ingress, 0))
    );
    assert!(d.ingress.passed.is_empty());
}

#[test]
fn baseline_decides_only_when_not_isolated() {
    let w = shop();
    let base = baseline("default", 0, vec![rule(Action::Deny, None, None)], vec![]);
    let d = w.eval(std::slice::from_ref(&base), &tcp("a/web", "a/db", 1));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&base, Direction::Ingress, 0))
    );
    // An isolating NetworkPolicy takes over, even one that allows.
    let np_allow = np("a", "allow", &[], Some(vec![allow(None, None)]), None);
    let d = w.eval(&[base.clone(), np_allow.clone()], &tcp("a/web", "a/db", 1));
    assert_eq!(d.verdict, Verdict::Allow);
    // An egress-only NetworkPolicy does not isolate ingress.
    let np_egress = np("a", "out", &[], None, Some(vec![allow(None, None)]));
    let d = w.eval(&[base.clone(), np_egress], &tcp("a/web", "a/db", 1));
    assert_eq!(
        d.ingress.reason,
        Reason::Rule(origin(&base, Direction::Ingress, 0))
    );
}

#[test]
fn pass_in_baseline_ends_with_not_isolated() {
    let w = shop();
    let pass = baseline("p", 0, vec![rule(Action::Pass, None, None)], vec![]);
    let deny = baseline("q", 1, vec![rule(Action::Deny, None, None)], vec![]);
    let d = w.eval(&[deny, pass.clone()], &tcp("a/web", "a/db", 1));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.ingress.reason, Reason::NotIsolated);
    assert_eq!(d.ingress.passed, vec![origin(&pass, Direction::Ingress, 0)]);
}

#[test]
fn admin_accept_on_egress_still_needs_ingress() {
    let w = shop();
    let accept_out = admin("out", 1, vec![], vec![rule(Action::Allow, None, None)]);
    let deny_in = np("a", "iso", &[("app", "db")], Some(vec![]), None);
    let d = w.eval(&[accept_out.clone(), deny_in], &tcp("a/web", "a/db", 1));
    assert_eq!(d.egress.verdict, Verdict::Allow);
    assert_eq!(
        d.egress.reason,
        Reason::Rule(origin(&accept_out, Direction::Egress, 0))
    );
    assert_eq!(d.ingress.verdict, Verdict::Deny);
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn cluster_subjects_select_by_namespace_and_pod_labels() {
    let w = shop().host_pod("b", "agent", "n1");
    let mut p = tiered(
        PolicyKind::AdminNetworkPolicy,
        Tier::Admin,
        "team-y-web",
        1,
        &[("team", "y")],
        vec![rule(Action::Deny, None, None)],
        vec![],
    );
    p.subject = Subject::Cluster {
        namespaces: sel(&[("team", "y")]),
        pods: sel(&[("app", "web")]),
    };
    let ps = [p];
    assert_eq!(
        w.eval(&ps, &tcp("a/web", "b/web", 1)).verdict,
        Verdict::Deny
    );
    assert_eq!(
        w.eval(&ps, &tcp("b/web", "a/web", 1)).verdict,
        Verdict::Allow
    );
    // The host-network pod in `b` is never a subject.
    let d = w.eval(&ps, &tcp("a/db", "b/agent", 1));
    assert_eq!(d.ingress.reason, Reason::HostNetwork);
}

#[test]
fn nodes_peer_matches_node_addresses_only() {
    let w = shop().host_pod("a", "agent", "n2");
    let p = admin(
        "nodes",
        1,
        vec![rule(
            Action::Deny,
            Some(vec![Peer::Nodes(sel(&[("zone", "b")]))]),
            None,
        )],
        vec![],
    );
    let ps = [p];
    // From n2's host network to a/web on n1: n2 is in zone b.
    assert_eq!(
        w.eval(&ps, &tcp("a/agent", "a/web", 1)).verdict,
        Verdict::Deny
    );
    // A pod on n2 does not carry the node's address.
    assert_eq!(
        w.eval(&ps, &tcp("a/db", "a/web", 1)).verdict,
        Verdict::Allow
    );
    // A node selector not matching n2.
    let q = admin(
        "nodes-a",
        1,
        vec![rule(
            Action::Deny,
            Some(vec![Peer::Nodes(sel(&[("zone", "a")]))]),
            None,
        )],
        vec![],
    );
    assert_eq!(
        w.eval(&[q], &tcp("a/agent", "a/web", 1)).verdict,
        Verdict::Allow
    );
}

#[test]
fn egress_to_own_node_is_subject_to_policy() {
    let w = shop().host_pod("a", "agent", "n1");
    let deny_out = np("a", "no-out", &[("app", "web")], None, Some(vec![]));
    let d = w.eval(&[deny_out], &tcp("a/web", "a/agent", 10250));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.ingress.reason, Reason::HostNetwork);
}
