//! Issue 12.7: a stale route must not blackhole a node. When a pod's /32 route points at
//! the node's uplink (a veth to the underlay that carries the node's address) instead of
//! the pod's veth, the uplink is not bound as the pod's interface; real links and routes in
//! network namespaces of the test's own, read with the agent's rtnetlink discovery.

mod common;

use std::process::Command;

use common::agent::runnable;
use common::*;
use palisade_agent::interfaces::{pod_interfaces, Discovery, REFUSED};
use palisade_policy::ruleset::{NodeRuleSet, PodRules};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn a_route_to_the_uplink_does_not_bind_it_as_a_pods_interface() {
    if !runnable("a_route_to_the_uplink_does_not_bind_it_as_a_pods_interface") {
        return;
    }
    let lab = Lab::new("u", 24, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    // The node's uplink: a veth to an underlay namespace, holding the node's address.
    let underlay = Netns(format!("pu-{}", std::process::id() % 100_000));
    sh(&["ip", "netns", "add", &underlay.0]);
    let uplink = format!("ul{}", std::process::id() % 100_000);
    sh(&[
        "ip",
        "-n",
        &lab.node,
        "link",
        "add",
        &uplink,
        "type",
        "veth",
        "peer",
        "name",
        "ul-peer",
        "netns",
        &underlay.0,
    ]);
    sh(&["ip", "-n", &lab.node, "link", "set", &uplink, "up"]);
    sh(&[
        "ip",
        "-n",
        &lab.node,
        "addr",
        "add",
        "192.0.2.10/24",
        "dev",
        &uplink,
    ]);
    // b's route went stale: it points at the uplink.
    sh(&[
        "ip",
        "-n",
        &lab.node,
        "route",
        "replace",
        &format!("{}/32", b.ip4),
        "dev",
        &uplink,
    ]);
    let rules = NodeRuleSet {
        node: "node-1".into(),
        pods: [a, b]
            .iter()
            .map(|p| PodRules {
                namespace: "default".into(),
                name: p.key.name.clone(),
                ips: vec![p.ip4],
                ingress: Default::default(),
                egress: Default::default(),
                audit: Default::default(),
            })
            .collect(),
        ..NodeRuleSet::default()
    };
    let routes = in_netns(&lab.node, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { Discovery::new().unwrap().host_routes().await.unwrap() })
    })
    .join()
    .unwrap();
    assert_eq!(
        routes[&b.ip4].ifname, uplink,
        "the route as the kernel has it"
    );
    assert!(!routes[&b.ip4].pod_veth, "the uplink is no pod veth");
    assert!(routes[&a.ip4].pod_veth, "a's veth is one");
    let bound = pod_interfaces(&rules, &routes);
    assert_eq!(bound.get(&a.key), Some(&a.veth), "a bound to its veth");
    assert_eq!(bound.get(&b.key), None, "b's stale route binds nothing");
    assert!(
        !bound.values().any(|i| *i == uplink),
        "the uplink is never a pod's interface: {bound:?}"
    );
    assert_eq!(REFUSED.load(std::sync::atomic::Ordering::Relaxed), 1);
}
