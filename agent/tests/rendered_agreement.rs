//! What the agent loads agrees with the reference evaluator: random clusters and policies
//! (the policy crate's generators: tiers, Pass, named ports, masked CIDR sets, both
//! families) are compiled, rendered per node into the table the agent applies, and every
//! flow's packets are run through the rendered chains by a pure interpreter of nftables'
//! evaluation (`interpret`), hop by hop as the lab topology routes them. No root needed.
//!
//! Case counts follow `PROPTEST_CASES` (256 by default).

#[path = "../../policy/tests/support/mod.rs"]
mod support;

mod interpret;

use std::collections::BTreeMap;

use interpret::{run_hook, Outcome, Packet, Trace};
use palisade_agent::render::{self, Interfaces, Ruleset};
use palisade_policy::evaluate::evaluate;
use palisade_policy::{compile, Cluster, Flow, Pod, Policy, Verdict};
use proptest::prelude::*;
use support::{cluster_and_policies, config, flows};

/// Each node's rendered table, every local non-host-network pod on its own veth, with the
/// flow log on as the agent loads it by default (each drop through its log chain).
fn tables(cluster: &Cluster, policies: &[Policy]) -> BTreeMap<String, Ruleset> {
    let rule_sets = compile(cluster, policies);
    let mut out = BTreeMap::new();
    for (node, set) in &rule_sets {
        let interfaces: Interfaces = cluster
            .pods
            .values()
            .filter(|p| p.node == *node && !p.host_network)
            .map(|p| (p.key(), veth(p)))
            .collect();
        let table = render::Renderer::with_flow_log(render::FlowLog {
            group: 9469,
            per_second: 10,
            burst: 20,
        })
        .render(set, &interfaces)
        .unwrap_or_else(|e| panic!("rendering node {node}: {e}"));
        out.insert(node.clone(), table);
    }
    out
}

fn veth(pod: &Pod) -> String {
    format!("v-{}", pod.name)
}

/// One hook on one node: what the packet meets there. A node without a table lets
/// everything through.
struct Hop<'a> {
    node: &'a str,
    hook: &'static str,
    iif: Option<String>,
    oif: Option<String>,
}

/// The hooks a flow's first packet passes, as the lab routes it: a pod's packets enter its
/// node from its veth; a packet for another node leaves by the underlay (no pod interface)
/// and enters that node from it; a packet for a node's own address (a host-network pod) is
/// the node's input; a host-network pod's packets leave through its node's output, which
/// has no chain. Traffic to itself never leaves the pod.
fn hops<'a>(src: &'a Pod, dst: &'a Pod) -> Vec<Hop<'a>> {
    if src.key() == dst.key() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let same_node = src.node == dst.node;
    let dst_if = (!dst.host_network).then(|| veth(dst));
    if !src.host_network {
        let hook = if same_node && dst.host_network {
            "input"
        } else {
            "forward"
        };
        out.push(Hop {
            node: &src.node,
            hook,
            iif: Some(veth(src)),
            oif: if same_node { dst_if.clone() } else { None },
        });
    }
    if !same_node {
        out.push(Hop {
            node: &dst.node,
            hook: if dst.host_network { "input" } else { "forward" },
            iif: None,
            oif: dst_if,
        });
    }
    out
}

/// The rendered tables' verdict on a flow's first packet, with the trace of each hop.
fn dataplane(
    cluster: &Cluster,
    tables: &BTreeMap<String, Ruleset>,
    flow: &Flow,
) -> (Verdict, Vec<(String, Trace)>) {
    let (src, dst) = (&cluster.pods[&flow.src], &cluster.pods[&flow.dst]);
    let (Some(saddr), Some(daddr)) = (src.ip_of(flow.family), dst.ip_of(flow.family)) else {
        unreachable!("flows are drawn between pods with an address of the family");
    };
    let mut traces = Vec::new();
    for hop in hops(src, dst) {
        let Some(table) = tables.get(hop.node) else {
            continue;
        };
        let packet = Packet {
            saddr,
            daddr,
            protocol: flow.protocol,
            dport: flow.port,
            iif: hop.iif,
            oif: hop.oif,
        };
        let trace = run_hook(table, hop.hook, &packet);
        let dropped = trace.outcome == Outcome::Drop;
        traces.push((format!("{} {}", hop.node, hop.hook), trace));
        if dropped {
            return (Verdict::Deny, traces);
        }
    }
    (Verdict::Allow, traces)
}

fn disagreement(cluster: &Cluster, policies: &[Policy]) -> Option<String> {
    let tables = tables(cluster, policies);
    for flow in flows(cluster) {
        let reference = evaluate(cluster, policies, &flow).expect("flows have both ends");
        let (verdict, traces) = dataplane(cluster, &tables, &flow);
        if verdict != reference.verdict {
            return Some(format!(
                "flow {flow}: the rendered tables {verdict}, the evaluator says\n{reference}\nhops: {traces:#?}"
            ));
        }
    }
    None
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn rendered_tables_agree_with_the_evaluator((cluster, policies) in cluster_and_policies()) {
        if let Some(report) = disagreement(&cluster, &policies) {
            prop_assert!(false, "{}", report);
        }
    }
}
