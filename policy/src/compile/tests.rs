use std::net::IpAddr;

use super::*;
use crate::model::*;
use crate::ruleset::{decide_flow, Clause, Group};
use crate::selector::LabelSelector;
use crate::verdict::{Flow, Reason, Verdict};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, l: &[(&str, &str)]) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(l),
        node: node.into(),
        ips: vec![ip.parse().unwrap()],
        host_network: false,
        ports: vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

fn cluster(pods: Vec<Pod>) -> Cluster {
    let mut c = Cluster::default();
    for ns in ["a", "b"] {
        c.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels: labels(&[("name", ns)]),
            },
        );
    }
    for n in ["n1", "n2"] {
        c.nodes.insert(
            n.into(),
            Node {
                name: n.into(),
                labels: Labels::new(),
                addresses: vec![],
            },
        );
    }
    for p in pods {
        c.pods.insert(p.key(), p);
    }
    c
}

fn np(ns: &str, name: &str, sel: &[(&str, &str)], ingress: Vec<Rule>) -> Policy {
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
            pods: LabelSelector::with_labels(sel.iter().copied()),
        },
        ingress,
        egress: vec![],
        isolates: Isolation {
            ingress: true,
            egress: false,
        },
        enforcement: None,
    }
}

fn allow_from_pods(ns: &str, sel: &[(&str, &str)], ports: Option<Vec<PortRule>>) -> Rule {
    Rule {
        name: None,
        action: Action::Allow,
        peers: Some(vec![Peer::Pods {
            namespaces: NamespaceScope::Named(ns.into()),
            pods: LabelSelector::with_labels(sel.iter().copied()),
        }]),
        ports,
    }
}

fn flow(src: &str, dst: &str, port: u16) -> Flow {
    let (sn, sp) = src.split_once('/').unwrap();
    let (dn, dp) = dst.split_once('/').unwrap();
    Flow {
        src: PodKey::new(sn, sp),
        dst: PodKey::new(dn, dp),
        protocol: Protocol::Tcp,
        port,
        family: Family::IPv4,
    }
}

fn shop() -> (Cluster, Vec<Policy>) {
    let c = cluster(vec![
        pod("a", "web", "n1", "10.0.1.1", &[("app", "web")]),
        pod("a", "api", "n2", "10.0.2.1", &[("app", "api")]),
        pod("a", "db", "n1", "10.0.1.2", &[("app", "db")]),
        pod("b", "other", "n2", "10.0.2.2", &[("app", "web")]),
    ]);
    let named = Some(vec![PortRule {
        protocol: Protocol::Tcp,
        port: PortSpec::Named("http".into()),
    }]);
    let policies = vec![
        np(
            "a",
            "db-from-api",
            &[("app", "db")],
            vec![allow_from_pods("a", &[("app", "api")], named)],
        ),
        np(
            "a",
            "api-from-web",
            &[("app", "api")],
            vec![allow_from_pods("a", &[("app", "web")], None)],
        ),
    ];
    (c, policies)
}

#[test]
fn isolation_and_named_ports_in_compiled_sets() {
    let (c, policies) = shop();
    let sets = compile(&c, &policies);
    let decide = |s, d, p| decide_flow(&c, &sets, &flow(s, d, p)).unwrap();
    assert_eq!(decide("a/api", "a/db", 8080).verdict, Verdict::Allow);
    assert_eq!(decide("a/api", "a/db", 80).verdict, Verdict::Deny);
    assert_eq!(decide("a/web", "a/db", 8080).verdict, Verdict::Deny);
    // podSelector without namespaceSelector means the policy's own namespace only.
    assert_eq!(decide("b/other", "a/api", 1).verdict, Verdict::Deny);
    assert_eq!(decide("a/web", "a/api", 1).verdict, Verdict::Allow);
    let open = decide("a/db", "a/web", 5);
    assert_eq!(open.verdict, Verdict::Allow);
    assert_eq!(open.ingress.reason, Reason::NotIsolated);
    match decide("a/web", "a/db", 8080).ingress.reason {
        Reason::DefaultDeny { isolated_by } => assert_eq!(isolated_by[0].name, "db-from-api"),
        other => panic!("unexpected {other:?}"),
    }
    // The named port became a concrete port on db's node.
    let n1 = &sets["n1"];
    let db = n1.pod("a", "db").unwrap();
    let Clause::PeerPort {
        ports: Some(ports), ..
    } = &db.ingress.network_policy[0].clauses[0]
    else {
        panic!("expected a port clause")
    };
    assert_eq!((ports[0].start, ports[0].end), (8080, 8080));
}

#[test]
fn groups_are_shared_and_ids_stable() {
    let (c, mut policies) = shop();
    // A second policy with the same peer shares its group.
    policies.push(np(
        "a",
        "db-too",
        &[("app", "db")],
        vec![allow_from_pods("a", &[("app", "api")], None)],
    ));
    let one = compile(&c, &policies);
    let two = compile(&c, &policies);
    assert_eq!(one, two);
    let n1 = &one["n1"];
    // db's two policies on n1 name the same peer: one group, referenced by both rules.
    assert_eq!(n1.groups.len(), 1, "{:?}", n1.groups.keys());
    assert_eq!(n1.pod("a", "db").unwrap().ingress.network_policy.len(), 2);
    let api_group = n1.groups.values().find(
        |g| matches!(&***g, Group::Hosts(a) if a.contains("10.0.2.1".parse::<IpAddr>().unwrap())),
    );
    assert!(api_group.is_some());
    assert!(n1
        .groups
        .keys()
        .all(|k| k.starts_with("g-") && k.len() == 18));
    assert!(n1
        .rules
        .keys()
        .all(|k| k.starts_with("r-") && k.len() == 18));
}

#[test]
fn incremental_updates_match_full_compile_and_touch_only_affected_nodes() {
    let (c, policies) = shop();
    let mut compiler = Compiler::new(c.clone(), policies.clone());
    let mut current = c.clone();
    let before = compiler.node_rule_sets();

    // A new api pod on n2 joins the group referenced by db's rules on n1.
    let new_api = pod("a", "api-2", "n2", "10.0.2.9", &[("app", "api")]);
    current.pods.insert(new_api.key(), new_api.clone());
    let touched = compiler.apply(Change::UpsertPod(new_api));
    assert_eq!(compiler.node_rule_sets(), compile(&current, &policies));
    let db_group_nodes: Vec<&str> = touched
        .groups
        .iter()
        .flat_map(|g| compiler.group_nodes(g))
        .collect();
    assert!(
        db_group_nodes.contains(&"n1") && !touched.nodes.contains("n1"),
        "db's group changed, and only its group: {touched:?}"
    );
    assert!(
        touched.nodes.contains("n2"),
        "api-2 is isolated on n2: {touched:?}"
    );

    // An irrelevant label change is a no-op.
    let mut other = current.pods[&PodKey::new("b", "other")].clone();
    other.labels.insert("version".into(), "2".into());
    current.pods.insert(other.key(), other.clone());
    let touched = compiler.apply(Change::UpsertPod(other));
    assert!(
        touched.nodes.is_empty() && touched.groups.is_empty(),
        "{touched:?}"
    );
    assert_eq!(compiler.node_rule_sets(), compile(&current, &policies));

    // Removing a policy and putting it back restores the original sets exactly.
    let removed = policies[1].clone();
    let t1 = compiler.apply(Change::RemovePolicy(removed.id.clone()));
    assert!(!t1.nodes.is_empty());
    compiler.apply(Change::UpsertPolicy(removed));
    compiler.apply(Change::RemovePod(PodKey::new("a", "api-2")));
    current.pods.remove(&PodKey::new("a", "api-2"));
    let mut other = current.pods[&PodKey::new("b", "other")].clone();
    other.labels.remove("version");
    compiler.apply(Change::UpsertPod(other));
    assert_eq!(compiler.node_rule_sets(), before);
}

#[test]
fn tiered_policies_order_and_pass() {
    let (c, mut policies) = shop();
    let admin = |name: &str, priority: u32, action: Action| Policy {
        id: PolicyId {
            kind: PolicyKind::ClusterNetworkPolicy,
            namespace: None,
            name: name.into(),
        },
        tier: Tier::Admin,
        priority,
        subject: Subject::Cluster {
            namespaces: LabelSelector::everything(),
            pods: LabelSelector::with_labels([("app", "db")]),
        },
        ingress: vec![Rule {
            name: Some(format!("{name}-rule")),
            action,
            peers: None,
            ports: None,
        }],
        egress: vec![],
        isolates: Isolation::default(),
        enforcement: None,
    };
    policies.push(admin("pass-all", 5, Action::Pass));
    policies.push(admin("deny-all", 10, Action::Deny));
    let sets = compile(&c, &policies);
    let d = decide_flow(&c, &sets, &flow("a/api", "a/db", 8080)).unwrap();
    // Pass at priority 5 skips the Deny at 10; the NetworkPolicy then allows.
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.ingress.passed.len(), 1);
    assert_eq!(d.ingress.passed[0].name.as_deref(), Some("pass-all-rule"));

    policies.retain(|p| p.id.name != "pass-all");
    let sets = compile(&c, &policies);
    let d = decide_flow(&c, &sets, &flow("a/api", "a/db", 8080)).unwrap();
    assert_eq!(d.verdict, Verdict::Deny);
    let Reason::Rule(origin) = &d.ingress.reason else {
        panic!("{d:?}")
    };
    assert_eq!((origin.tier, origin.priority), (Tier::Admin, 10));
}
