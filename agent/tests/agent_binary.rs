//! The `palisade-agent` binary end to end: `--netns`, `--rules` re-read on change, interface
//! discovery from routes (also for a pod whose interface appears later), `/readyz` and
//! `/metrics`. Root only; prints SKIPPED otherwise.

mod common;

use std::process::Command;

use common::agent::*;
use common::*;
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;

fn np(name: &str) -> PolicyId {
    PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some("default".into()),
        name: name.into(),
    }
}

fn isolated_ingress(pod: &str, ips: Vec<std::net::IpAddr>, allow: Vec<RuleInstance>) -> PodRules {
    PodRules {
        namespace: "default".into(),
        name: pod.into(),
        ips,
        ingress: DirectionRules {
            isolated_by: vec![np(pod)],
            network_policy: allow,
            ..DirectionRules::default()
        }
        .into(),
        egress: Default::default(),
        audit: Default::default(),
    }
}

#[test]
fn agent_binary_enforces_follows_files_and_interfaces_and_serves_metrics() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let mut lab = Lab::new("b", 15, &["default/a", "default/b"]);
    let (a_ip, b_ip, c_ip) = (lab.pod("a").ip4, lab.pod("b").ip4, lab.planned_ip4(2));
    let allow = RuleInstance {
        rule: "r-00000000000000f1".into(),
        action: Action::Allow,
        clauses: vec![Clause::PeerPort {
            peers: Some(vec!["g-00000000000000fa".into()]),
            ports: Some(vec![PortRange {
                protocol: Protocol::Tcp,
                start: 8080,
                end: 8080,
            }]),
        }],
    };
    let mut rules = NodeRuleSet {
        node: "node-1".into(),
        node_addresses: vec![],
        pods: vec![
            isolated_ingress("b", vec![b_ip], vec![allow]),
            isolated_ingress("c", vec![c_ip], vec![]),
        ],
        groups: [(
            "g-00000000000000fa".to_string(),
            Group::Hosts(AddrSet::from_addrs([a_ip])).into(),
        )]
        .into_iter()
        .collect(),
        rules: [(
            "r-00000000000000f1".to_string(),
            RuleOrigin {
                policy: np("b"),
                tier: Tier::NetworkPolicy,
                priority: 0,
                direction: Direction::Ingress,
                index: 0,
                name: None,
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into(),
    };
    let dir = std::env::temp_dir().join(format!("palisade-agent-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules_file = dir.join("rules.json");
    std::fs::write(&rules_file, serde_json::to_string(&rules).unwrap()).unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;

    let a_ns = lab.pod("a").netns.clone();
    let _sb = Servers::start(&lab.pod("b").netns, &[7070, 8080], &[]);
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
            .args([
                "--netns",
                &lab.node,
                "--rules",
                rules_file.to_str().unwrap(),
            ])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--poll-interval-ms",
                "200",
            ])
            .spawn()
            .unwrap(),
    );
    eventually("/readyz 200", || {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    });
    assert!(matches!(http_get(port, "/healthz"), Some((200, _))));
    assert!(tcp_ok(&a_ns, b_ip, 8080));
    assert!(!tcp_ok(&a_ns, b_ip, 7070));

    let (_, metrics) = http_get(port, "/metrics").unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("palisade_rule_packets_total{"))
        .unwrap_or_else(|| panic!("no rule metric in:\n{metrics}"));
    for label in [
        r#"kind="NetworkPolicy""#,
        r#"namespace="default""#,
        r#"name="b""#,
        r#"direction="ingress""#,
        r#"rule="0""#,
        r#"tier="NetworkPolicy""#,
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    assert!(
        !line.ends_with(" 0"),
        "the allowed connection was counted: {line}"
    );
    assert!(metrics.contains(r#"palisade_default_deny_packets_total{direction="ingress",namespace="default",pod="b"}"#), "{metrics}");
    assert!(
        metrics.contains("palisade_ruleset_generation "),
        "{metrics}"
    );
    assert!(
        metrics.contains("palisade_apply_duration_seconds_bucket"),
        "{metrics}"
    );

    // Pod c's interface appears while the agent runs: it is enforced without a restart.
    // Unreachable alone would prove nothing (c's network may not be up yet), so c must
    // reach a (its egress is open) while a's connections to it are dropped by c's default
    // deny, whose counter is what moves.
    let c_ns = lab.add_pod("default/c").netns.clone();
    let _sc = Servers::start(&c_ns, &[7070], &[]);
    let _sa = Servers::start(&a_ns, &[7070], &[]);
    let c_denied = |metrics: &str| {
        metric_value(
            metrics,
            r#"palisade_default_deny_packets_total{direction="ingress",namespace="default",pod="c"}"#,
        )
    };
    eventually("c enforced once its interface exists", || {
        let refused = !tcp_ok(&a_ns, c_ip, 7070);
        let counted = http_get(port, "/metrics")
            .and_then(|(_, m)| c_denied(&m))
            .is_some_and(|n| n > 0.0);
        refused && counted
    });
    assert!(tcp_ok(&c_ns, a_ip, 7070), "c's own network works");

    // The rules file changes: b is no longer isolated.
    rules.pods.retain(|p| p.name != "b");
    std::fs::write(&rules_file, serde_json::to_string(&rules).unwrap()).unwrap();
    eventually("b open after the rules file changed", || {
        tcp_ok(&a_ns, b_ip, 7070)
    });
    let _ = std::fs::remove_dir_all(&dir);
}
