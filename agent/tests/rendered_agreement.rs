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
use support::{cluster_and_policies, config, flows, staged_case};

/// Each node's rendered table, every local non-host-network pod on its own veth, with the
/// flow log on as the agent loads it by default (each drop through its log chain).
fn tables(cluster: &Cluster, policies: &[Policy]) -> BTreeMap<String, Ruleset> {
    render_all(cluster, &compile(cluster, policies))
}

fn render_all(
    cluster: &Cluster,
    rule_sets: &BTreeMap<String, palisade_policy::NodeRuleSet>,
) -> BTreeMap<String, Ruleset> {
    render_with_classes_from(cluster, rule_sets, render::classes::CLASSES_FROM)
}

/// As [`render_all`], shared lists with at least `classes_from` peer tests rendered through
/// address classes.
fn render_with_classes_from(
    cluster: &Cluster,
    rule_sets: &BTreeMap<String, palisade_policy::NodeRuleSet>,
    classes_from: usize,
) -> BTreeMap<String, Ruleset> {
    let mut out = BTreeMap::new();
    for (node, set) in rule_sets {
        let interfaces: Interfaces = cluster
            .pods
            .values()
            .filter(|p| p.node == *node && !p.host_network)
            .map(|p| (p.key(), veth(p)))
            .collect();
        let mut renderer = render::Renderer::with_flow_log(render::FlowLog {
            group: 9469,
            per_second: 10,
            burst: 20,
        });
        renderer.set_classes_from(classes_from);
        let table = renderer
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

/// Where the tables with every shared list rendered through its address classes differ
/// from those with none: in a flow's verdict, or in the counters its hops counted in (the
/// same rule must decide, and be counted, either way).
fn class_disagreement(cluster: &Cluster, policies: &[Policy]) -> Option<String> {
    let sets = compile(cluster, policies);
    let linear = render_with_classes_from(cluster, &sets, usize::MAX);
    let classed = render_with_classes_from(cluster, &sets, 1);
    for flow in flows(cluster) {
        let reference = evaluate(cluster, policies, &flow).expect("flows have both ends");
        let (lv, lt) = dataplane(cluster, &linear, &flow);
        let (cv, ct) = dataplane(cluster, &classed, &flow);
        let counted = |t: &[(String, Trace)]| -> Vec<(String, Vec<String>)> {
            t.iter()
                .map(|(hop, trace)| (hop.clone(), trace.counters.clone()))
                .collect()
        };
        if cv != reference.verdict || lv != cv || counted(&lt) != counted(&ct) {
            return Some(format!(
                "flow {flow}: with classes {cv}, without {lv}, the evaluator says\n{reference}\nhops with classes: {ct:#?}\nwithout: {lt:#?}"
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

    /// Shared lists rendered through address classes decide every flow as the evaluator
    /// does, by the same rules (and counters) as the lists' plain chains.
    #[test]
    fn class_chains_decide_as_plain_chains_do((cluster, policies) in cluster_and_policies()) {
        if let Some(report) = class_disagreement(&cluster, &policies) {
            prop_assert!(false, "{}", report);
        }
    }
}

/// The audit counters a flow's hops passed, as (direction, what would have denied it):
/// `audit/<rule>` counters name the rule's origin, `audit/deny-…` the pod's default deny.
fn would_denials(
    tables: &BTreeMap<String, Ruleset>,
    traces: &[(String, Trace)],
) -> Vec<(palisade_policy::Direction, palisade_policy::Reason)> {
    use palisade_agent::render::CounterMeta;
    let mut out = Vec::new();
    for (hop, trace) in traces {
        let node = hop.split(' ').next().unwrap_or_default();
        for counter in &trace.counters {
            let Some(CounterMeta::Audit(inner)) = tables[node].counters.get(counter) else {
                continue;
            };
            out.push(match &**inner {
                CounterMeta::Rule {
                    origin: Some(o), ..
                } => (o.direction, palisade_policy::Reason::Rule(o.clone())),
                CounterMeta::DefaultDeny { direction, .. } => (
                    *direction,
                    palisade_policy::Reason::DefaultDeny {
                        isolated_by: Vec::new(),
                    },
                ),
                other => panic!("audit counter {counter} of {other:?}"),
            });
        }
    }
    out
}

/// The would-deny decisions the evaluator says the hops must report: a direction the
/// enforced rules allow, reached (egress first, then ingress if egress allowed), that the
/// full view denies.
fn expected_denials(
    d: &palisade_policy::AuditDecision,
) -> Vec<(palisade_policy::Direction, palisade_policy::Reason)> {
    let mut out = Vec::new();
    for (enforced, would) in [
        (&d.enforced.egress, &d.would.egress),
        (&d.enforced.ingress, &d.would.ingress),
    ] {
        if enforced.verdict == Verdict::Deny {
            break;
        }
        if would.verdict == Verdict::Deny {
            let reason = match &would.reason {
                palisade_policy::Reason::DefaultDeny { .. } => {
                    palisade_policy::Reason::DefaultDeny {
                        isolated_by: Vec::new(),
                    }
                }
                other => other.clone(),
            };
            out.push((would.direction, reason));
        }
    }
    out
}

fn audit_disagreement(
    cluster: &Cluster,
    policies: &[Policy],
    default: palisade_policy::Enforcement,
) -> Option<String> {
    let sets = palisade_policy::compile_staged(cluster, policies, default);
    let tables = render_all(cluster, &sets);
    for flow in flows(cluster) {
        let reference =
            palisade_policy::evaluate::evaluate_audit(cluster, policies, default, &flow)
                .expect("flows have both ends");
        let (verdict, traces) = dataplane(cluster, &tables, &flow);
        let denials = would_denials(&tables, &traces);
        let expected = expected_denials(&reference);
        if verdict != reference.enforced.verdict || denials != expected {
            return Some(format!(
                "flow {flow}: the rendered tables {verdict} with would-deny {denials:?}, the evaluator says\nenforced {}\nwould {}\nexpected would-deny {expected:?}\nhops: {traces:#?}",
                reference.enforced, reference.would
            ));
        }
    }
    None
}

proptest! {
    #![proptest_config(config())]

    /// With policies in audit: the tables enforce exactly the enforced view, and count a
    /// would-deny, by the rule or default deny of the full view, exactly where it denies
    /// what the enforced view lets through.
    #[test]
    fn rendered_audit_chains_agree_with_the_evaluator((cluster, policies, default) in staged_case()) {
        if let Some(report) = audit_disagreement(&cluster, &policies, default) {
            prop_assert!(false, "{}", report);
        }
    }
}
