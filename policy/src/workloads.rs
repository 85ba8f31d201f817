//! Synthetic clusters for the benchmarks (the compile benchmark here, the controller's
//! fan-out benchmark): deterministic, the same workload always gives the same objects.
//! Behind the `workloads` feature, so that nothing else carries them.

use std::net::{IpAddr, Ipv4Addr};

use crate::*;
use ipnet::IpNet;

pub struct Workload {
    pub cluster: Cluster,
    pub policies: Vec<Policy>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::with_labels(pairs.iter().copied())
}

pub fn pod_ip(global: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 64, 0, 0)) + global,
    ))
}

fn node(i: usize) -> Node {
    let a = u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i as u32 + 1;
    Node {
        name: format!("node-{i}"),
        labels: labels(&[("zone", &format!("zone-{}", i % 3))]),
        addresses: vec![IpAddr::V4(Ipv4Addr::from(a))],
    }
}

fn port(name: &str, port: u16, protocol: Protocol) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        port,
        protocol,
    }
}

fn np_id(ns: &str, name: &str) -> PolicyId {
    PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(ns.into()),
        name: name.into(),
    }
}

fn tcp(p: u16) -> PortRule {
    PortRule {
        protocol: Protocol::Tcp,
        port: PortSpec::Range { start: p, end: p },
    }
}

fn named(n: &str) -> PortRule {
    PortRule {
        protocol: Protocol::Tcp,
        port: PortSpec::Named(n.into()),
    }
}

fn allow(peers: Option<Vec<Peer>>, ports: Option<Vec<PortRule>>) -> Rule {
    Rule {
        name: None,
        action: Action::Allow,
        peers,
        ports,
    }
}

fn pods_in(ns: &str, s: LabelSelector) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Named(ns.into()),
        pods: s,
    }
}

fn pods_across(ns: LabelSelector, s: LabelSelector) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Selector(ns),
        pods: s,
    }
}

fn netpol(
    ns: &str,
    name: &str,
    subject: LabelSelector,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
    iso: Isolation,
) -> Policy {
    Policy {
        id: np_id(ns, name),
        tier: Tier::NetworkPolicy,
        priority: 0,
        subject: Subject::Namespace {
            namespace: ns.into(),
            pods: subject,
        },
        ingress,
        egress,
        isolates: iso,
        enforcement: None,
    }
}

const BOTH: Isolation = Isolation {
    ingress: true,
    egress: true,
};
const INGRESS: Isolation = Isolation {
    ingress: true,
    egress: false,
};

/// A pod of the *Scale* workload: `j`th pod of namespace `i`.
pub fn scale_pod(i: usize, j: usize, global: u32, nodes: usize) -> Pod {
    let ns = format!("ns-{i}");
    let app = format!("app-{}", j % 6);
    let hash = format!("h{i}-{}", j % 6);
    let tier = ["frontend", "backend", "data"][j % 3];
    let grpc = if j % 6 == 3 { 9001 } else { 9000 };
    Pod {
        namespace: ns.clone(),
        name: format!("{app}-{j}"),
        labels: labels(&[("app", &app), ("tier", tier), ("pod-template-hash", &hash)]),
        node: format!("node-{}", (global as usize * 7919) % nodes),
        ips: vec![pod_ip(global)],
        host_network: false,
        ports: vec![
            port("http", 8080, Protocol::Tcp),
            port("metrics", 9100, Protocol::Tcp),
            port("grpc", grpc, Protocol::Tcp),
        ],
    }
}

/// 5,000 nodes, 5,000 namespaces of 30 pods, 20,000 NetworkPolicies: default deny with DNS
/// egress, app-to-app by named port, cross-namespace by team with a port range, egress to
/// the internet (ipBlock with except) and to a sibling by named port, scrapes from
/// monitoring namespaces.
pub fn scale() -> Workload {
    scale_sized(5000, 5000, 30)
}

/// *Scale* with other counts (for quick runs of the benchmarks); `n_ns` of at least 11
/// keeps every kind of namespace.
pub fn scale_sized(n_nodes: usize, n_ns: usize, per_ns: usize) -> Workload {
    let mut cluster = Cluster::default();
    nodes(&mut cluster, n_nodes);
    let mut policies = Vec::new();
    let mut global = 0u32;
    for i in 0..n_ns {
        let name = format!("ns-{i}");
        let role = if i < 10 {
            "monitoring"
        } else if i == 10 {
            "infra"
        } else {
            "app"
        };
        cluster.namespaces.insert(
            name.clone(),
            Namespace {
                name: name.clone(),
                labels: labels(&[
                    ("kubernetes.io/metadata.name", &name),
                    ("team", &format!("team-{}", i % 50)),
                    ("env", ["prod", "dev", "staging"][i % 3]),
                    ("role", role),
                ]),
            },
        );
        for j in 0..per_ns {
            let p = scale_pod(i, j, global, n_nodes);
            global += 1;
            cluster.pods.insert(p.key(), p);
        }
        let dns = allow(
            Some(vec![pods_across(
                sel(&[("role", "infra")]),
                sel(&[("app", "app-0")]),
            )]),
            Some(vec![
                PortRule {
                    protocol: Protocol::Udp,
                    port: PortSpec::Range { start: 53, end: 53 },
                },
                tcp(53),
            ]),
        );
        policies.push(netpol(
            &name,
            "default-deny",
            LabelSelector::everything(),
            vec![],
            vec![dns],
            BOTH,
        ));
        policies.push(netpol(
            &name,
            "web-to-api",
            sel(&[("app", "app-1")]),
            vec![allow(
                Some(vec![pods_in(&name, sel(&[("app", "app-0")]))]),
                Some(vec![named("http")]),
            )],
            vec![],
            INGRESS,
        ));
        policies.push(netpol(
            &name,
            "from-partner-team",
            sel(&[("app", "app-2")]),
            vec![allow(
                Some(vec![pods_across(
                    sel(&[("team", &format!("team-{}", (i + 1) % 50))]),
                    sel(&[("app", "app-3")]),
                )]),
                Some(vec![PortRule {
                    protocol: Protocol::Tcp,
                    port: PortSpec::Range {
                        start: 9000,
                        end: 9010,
                    },
                }]),
            )],
            vec![],
            INGRESS,
        ));
        let internet = Peer::IpBlock {
            cidr: "0.0.0.0/0".parse::<IpNet>().expect("literal"),
            except: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
                .iter()
                .map(|c| c.parse().expect("literal"))
                .collect(),
        };
        policies.push(netpol(
            &name,
            "egress-and-scrapes",
            sel(&[("app", "app-4")]),
            vec![allow(
                Some(vec![pods_across(
                    sel(&[("role", "monitoring")]),
                    LabelSelector::everything(),
                )]),
                Some(vec![named("metrics")]),
            )],
            vec![
                allow(Some(vec![internet]), Some(vec![tcp(443)])),
                allow(
                    Some(vec![pods_in(&name, sel(&[("app", "app-5")]))]),
                    Some(vec![named("grpc")]),
                ),
            ],
            BOTH,
        ));
    }
    Workload { cluster, policies }
}

/// *Scale* plus 200 cluster-wide policies (100 Admin, 100 Baseline) of 25 rules each.
pub fn scale_tiered() -> Workload {
    let mut w = scale();
    w.policies.extend(tiered_policies());
    w
}

/// The 200 cluster-wide policies of *scale-tiered* (100 Admin, 100 Baseline, 25 rules
/// each, selecting namespaces `team=team-<k % 50>`).
pub fn tiered_policies() -> Vec<Policy> {
    let mut policies = Vec::new();
    for k in 0..200u32 {
        let tier = if k < 100 { Tier::Admin } else { Tier::Baseline };
        let team = format!("team-{}", k % 50);
        let rules = |direction: Direction| -> Vec<Rule> {
            (0..25u32)
                .map(|r| {
                    let action = match (tier, r % 3) {
                        (Tier::Admin, 0) => Action::Pass,
                        (_, 1) => Action::Deny,
                        _ => Action::Allow,
                    };
                    let peer = match r % 4 {
                        0 => pods_across(
                            sel(&[("team", &format!("team-{}", (k + r) % 50))]),
                            LabelSelector::everything(),
                        ),
                        1 => pods_across(
                            LabelSelector::everything(),
                            sel(&[("app", &format!("app-{}", r % 6))]),
                        ),
                        2 => Peer::IpBlock {
                            cidr: format!("192.168.{}.0/24", r).parse().expect("literal"),
                            except: vec![],
                        },
                        _ => Peer::Nodes(sel(&[("zone", &format!("zone-{}", r % 3))])),
                    };
                    let ports = match r % 3 {
                        0 => Some(vec![PortRule {
                            protocol: Protocol::Tcp,
                            port: PortSpec::Range {
                                start: 8000 + r as u16,
                                end: 8100,
                            },
                        }]),
                        1 => Some(vec![named("http")]),
                        _ => None,
                    };
                    let _ = direction;
                    Rule {
                        name: Some(format!("rule-{r}")),
                        action,
                        peers: Some(vec![peer]),
                        ports,
                    }
                })
                .collect()
        };
        policies.push(Policy {
            id: PolicyId {
                kind: PolicyKind::ClusterNetworkPolicy,
                namespace: None,
                name: format!("cnp-{k}"),
            },
            tier,
            priority: k % 100 * 10,
            subject: Subject::Cluster {
                namespaces: sel(&[("team", &team)]),
                pods: LabelSelector::everything(),
            },
            ingress: rules(Direction::Ingress),
            egress: rules(Direction::Egress),
            isolates: Isolation::default(),
            enforcement: None,
        });
    }
    policies
}

/// 25,000 namespaces `app=<ns>` with 4 pods each on 1,000 nodes; per namespace a
/// default-deny-all and two policies admitting `app-k=scale-k` from itself.
pub fn small_namespaces() -> Workload {
    let (n_nodes, n_ns) = (1000, 25_000);
    let mut cluster = Cluster::default();
    nodes(&mut cluster, n_nodes);
    let mut policies = Vec::new();
    let mut global = 0u32;
    for i in 0..n_ns {
        let name = format!("ns-{i}");
        cluster.namespaces.insert(
            name.clone(),
            Namespace {
                name: name.clone(),
                labels: labels(&[("app", &name)]),
            },
        );
        for j in 0..4 {
            let (k, v) = if j < 2 {
                ("app-1", "scale-1")
            } else {
                ("app-2", "scale-2")
            };
            let p = Pod {
                namespace: name.clone(),
                name: format!("pod-{j}"),
                labels: labels(&[(k, v)]),
                node: format!("node-{}", global as usize % n_nodes),
                ips: vec![pod_ip(global)],
                host_network: false,
                ports: vec![],
            };
            global += 1;
            cluster.pods.insert(p.key(), p);
        }
        policies.push(netpol(
            &name,
            "default-deny-all",
            LabelSelector::everything(),
            vec![],
            vec![],
            BOTH,
        ));
        for k in 1..=2 {
            let (key, value) = (format!("app-{k}"), format!("scale-{k}"));
            let s = sel(&[(&key, &value)]);
            policies.push(netpol(
                &name,
                &format!("allow-{k}"),
                s.clone(),
                vec![allow(Some(vec![pods_in(&name, s)]), None)],
                vec![],
                BOTH,
            ));
        }
    }
    Workload { cluster, policies }
}

/// One namespace, 10,000 pods `app-1=scale-1` on 100 nodes, 10,000 identical policies.
pub fn one_namespace() -> Workload {
    let (n_nodes, n_pods, n_pol) = (100, 10_000, 10_000);
    let mut cluster = Cluster::default();
    nodes(&mut cluster, n_nodes);
    let ns = "scale".to_string();
    cluster.namespaces.insert(
        ns.clone(),
        Namespace {
            name: ns.clone(),
            labels: Labels::new(),
        },
    );
    let s = sel(&[("app-1", "scale-1")]);
    for g in 0..n_pods {
        let p = Pod {
            namespace: ns.clone(),
            name: format!("pod-{g}"),
            labels: labels(&[("app-1", "scale-1")]),
            node: format!("node-{}", g % n_nodes),
            ips: vec![pod_ip(g as u32)],
            host_network: false,
            ports: vec![],
        };
        cluster.pods.insert(p.key(), p);
    }
    let policies = (0..n_pol)
        .map(|k| {
            netpol(
                &ns,
                &format!("policy-{k}"),
                s.clone(),
                vec![allow(Some(vec![pods_in(&ns, s.clone())]), None)],
                vec![],
                BOTH,
            )
        })
        .collect();
    Workload { cluster, policies }
}

fn nodes(cluster: &mut Cluster, n_nodes: usize) {
    for i in 0..n_nodes {
        let n = node(i);
        cluster.nodes.insert(n.name.clone(), n);
    }
}

fn plain_pod(ns: &str, name: String, pod_labels: Labels, global: u32, n_nodes: usize) -> Pod {
    Pod {
        namespace: ns.to_string(),
        name,
        labels: pod_labels,
        node: format!("node-{}", global as usize % n_nodes),
        ips: vec![pod_ip(global)],
        host_network: false,
        ports: vec![],
    }
}

/// Antrea's *NetpolPerPod*: one namespace, 5,000 pairs of pods `app=scale-<i>a` /
/// `app=scale-<i>b` on 1,000 nodes, and per pair two NetworkPolicies (Ingress and Egress),
/// `np-<i>a` selecting a with ingress from b and egress to b, and `np-<i>b` the mirror.
pub fn netpol_per_pod() -> Workload {
    netpol_per_pod_sized(1000, 5000)
}

/// *NetpolPerPod* with other counts.
pub fn netpol_per_pod_sized(n_nodes: usize, pairs: usize) -> Workload {
    let mut cluster = Cluster::default();
    nodes(&mut cluster, n_nodes);
    let ns = "netpol-per-pod";
    cluster.namespaces.insert(
        ns.to_string(),
        Namespace {
            name: ns.to_string(),
            labels: labels(&[("kubernetes.io/metadata.name", ns)]),
        },
    );
    let mut policies = Vec::new();
    let mut global = 0u32;
    for i in 0..pairs {
        let a = format!("scale-{i}a");
        let b = format!("scale-{i}b");
        for (me, other) in [(&a, &b), (&b, &a)] {
            let p = plain_pod(
                ns,
                format!("pod-{me}"),
                labels(&[("app", me)]),
                global,
                n_nodes,
            );
            global += 1;
            cluster.pods.insert(p.key(), p);
            let peer = || Some(vec![pods_in(ns, sel(&[("app", other)]))]);
            policies.push(netpol(
                ns,
                &format!("np-{me}"),
                sel(&[("app", me)]),
                vec![allow(peer(), None)],
                vec![allow(peer(), None)],
                BOTH,
            ));
        }
    }
    Workload { cluster, policies }
}

/// Antrea's *LargeNamespaces*: 100 namespaces on 1,000 nodes, each with a
/// `default-deny-all` and, for i in 0..99, `np-i` selecting `app-i=scale-i` with ingress
/// from the same pods, and 10 pods `app-i=scale-i` (100,000 pods, 10,100 policies).
pub fn large_namespaces() -> Workload {
    large_namespaces_sized(1000, 100, 100, 10)
}

/// *LargeNamespaces* with other counts.
pub fn large_namespaces_sized(
    n_nodes: usize,
    n_ns: usize,
    apps: usize,
    per_app: usize,
) -> Workload {
    let mut cluster = Cluster::default();
    nodes(&mut cluster, n_nodes);
    let mut policies = Vec::new();
    let mut global = 0u32;
    for n in 0..n_ns {
        let ns = format!("ns-{n}");
        cluster.namespaces.insert(
            ns.clone(),
            Namespace {
                name: ns.clone(),
                labels: labels(&[("kubernetes.io/metadata.name", &ns)]),
            },
        );
        policies.push(netpol(
            &ns,
            "default-deny-all",
            LabelSelector::everything(),
            vec![],
            vec![],
            BOTH,
        ));
        for i in 0..apps {
            let (key, value) = (format!("app-{i}"), format!("scale-{i}"));
            for j in 0..per_app {
                let p = plain_pod(
                    &ns,
                    format!("pod-{i}-{j}"),
                    labels(&[(&key, &value)]),
                    global,
                    n_nodes,
                );
                global += 1;
                cluster.pods.insert(p.key(), p);
            }
            let s = sel(&[(&key, &value)]);
            policies.push(netpol(
                &ns,
                &format!("np-{i}"),
                s.clone(),
                vec![allow(Some(vec![pods_in(&ns, s)]), None)],
                vec![],
                INGRESS,
            ));
        }
    }
    Workload { cluster, policies }
}
