//! The compiled rule sets, matched the way the agent matches them, agree with the reference
//! evaluator on every flow; and the incremental compiler agrees with a full compile after
//! every change.
//!
//! Case counts follow `PROPTEST_CASES` (256 by default); CI raises it.

mod support;

use std::collections::BTreeMap;

use palisade_policy::evaluate::evaluate;
use palisade_policy::ruleset::decide_flow;
use palisade_policy::verdict::FlowError;
use palisade_policy::{
    compile, Change, Cluster, Compiler, Flow, NodeRuleSet, Policy, PolicyId, Touched,
};
use proptest::prelude::*;
use proptest::test_runner::Config;
use support::*;

/// The first flow on which compiled rule sets and the evaluator disagree, described.
fn disagreement(
    cluster: &Cluster,
    policies: &[Policy],
    rule_sets: &BTreeMap<String, NodeRuleSet>,
) -> Option<String> {
    for flow in flows(cluster) {
        let compiled = decide_flow(cluster, rule_sets, &flow);
        let reference = evaluate(cluster, policies, &flow);
        if compiled != reference {
            return Some(format!(
                "flow {flow}\ncompiled:  {compiled:#?}\nreference: {reference:#?}"
            ));
        }
    }
    None
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn compiled_rule_sets_agree_with_the_evaluator(
        (cluster, policies) in cluster_and_policies()
    ) {
        let rule_sets = compile(&cluster, &policies);
        if let Some(report) = disagreement(&cluster, &policies, &rule_sets) {
            prop_assert!(false, "{}", report);
        }
    }
}

/// A change, drawn without knowing the state it will apply to; [`Op::change`] makes it
/// concrete (an index picks an existing object, modulo their number).
#[derive(Clone, Debug)]
enum Op {
    RelabelPod(usize, palisade_policy::Labels),
    UpsertPod(usize, PodShape),
    RemovePod(usize),
    RelabelNamespace(usize, palisade_policy::Labels),
    RemoveNamespace(usize),
    UpsertNode(usize, palisade_policy::Labels),
    RemoveNode(usize),
    UpsertPolicy(Policy),
    ModifyPolicy(usize, Policy),
    RemovePolicy(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let index = 0usize..16;
    prop_oneof![
        4 => (index.clone(), labels()).prop_map(|(i, l)| Op::RelabelPod(i, l)),
        3 => (0usize..10, pod_shape(3, 3)).prop_map(|(i, s)| Op::UpsertPod(i, s)),
        2 => index.clone().prop_map(Op::RemovePod),
        3 => (0usize..4, labels()).prop_map(|(i, l)| Op::RelabelNamespace(i, l)),
        1 => (0usize..4).prop_map(Op::RemoveNamespace),
        2 => (0usize..4, labels()).prop_map(|(i, l)| Op::UpsertNode(i, l)),
        1 => (0usize..4).prop_map(Op::RemoveNode),
        2 => prop_oneof![network_policy(3), tiered_policy()].prop_map(Op::UpsertPolicy),
        3 => (index.clone(), prop_oneof![network_policy(3), tiered_policy()])
            .prop_map(|(i, p)| Op::ModifyPolicy(i, p)),
        2 => index.prop_map(Op::RemovePolicy),
    ]
}

fn nth_policy(policies: &BTreeMap<PolicyId, Policy>, index: usize) -> Option<&Policy> {
    let n = policies.len();
    (n > 0).then(|| policies.values().nth(index % n))?
}

impl Op {
    fn change(&self, cluster: &Cluster, policies: &BTreeMap<PolicyId, Policy>) -> Option<Change> {
        Some(match self {
            Op::RelabelPod(i, labels) => {
                let mut pod = cluster.pods.get(&nth_pod(cluster, *i)?)?.clone();
                pod.labels = labels.clone();
                Change::UpsertPod(pod)
            }
            Op::UpsertPod(i, (ns, node, stack, labels, ports)) => {
                Change::UpsertPod(pod(*i, *ns, *node, *stack, labels.clone(), ports.clone()))
            }
            Op::RemovePod(i) => Change::RemovePod(nth_pod(cluster, *i)?),
            Op::RelabelNamespace(i, labels) => {
                Change::UpsertNamespace(namespace(*i, labels.clone()))
            }
            Op::RemoveNamespace(i) => Change::RemoveNamespace(namespace_name(*i)),
            Op::UpsertNode(i, labels) => Change::UpsertNode(node(*i, labels.clone())),
            Op::RemoveNode(i) => Change::RemoveNode(node_name(*i)),
            Op::UpsertPolicy(p) => Change::UpsertPolicy(p.clone()),
            Op::ModifyPolicy(i, body) => {
                let old = nth_policy(policies, *i)?;
                // Same identity, new content (the kind, and so the tier family, stays).
                let mut p = body.clone();
                if p.id.kind != old.id.kind {
                    return Some(Change::UpsertPolicy(p));
                }
                p.id = old.id.clone();
                if let (palisade_policy::Subject::Namespace { namespace, .. }, Some(ns)) =
                    (&mut p.subject, &old.id.namespace)
                {
                    namespace.clone_from(ns);
                }
                Change::UpsertPolicy(p)
            }
            Op::RemovePolicy(i) => Change::RemovePolicy(nth_policy(policies, *i)?.id.clone()),
        })
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn incremental_compile_equals_full_compile(
        (cluster, policies) in cluster_and_policies(),
        ops in proptest::collection::vec(op(), 1..=8),
    ) {
        let mut compiler = Compiler::new(cluster.clone(), policies.clone());
        let mut cluster = cluster;
        let mut policies: BTreeMap<PolicyId, Policy> =
            policies.into_iter().map(|p| (p.id.clone(), p)).collect();
        let mut before = compiler.node_rule_sets();
        for op in ops {
            let Some(change) = op.change(&cluster, &policies) else { continue };
            apply(&mut cluster, &mut policies, &change);
            let touched = compiler.apply(change.clone());
            let list: Vec<Policy> = policies.values().cloned().collect();
            let after = compiler.node_rule_sets();
            let full = compile(&cluster, &list);
            prop_assert_eq!(&after, &full, "after {:?}", change);
            if let Some(problem) = unreported_by(&compiler, &before, &after, &touched) {
                prop_assert!(false, "{:?}: {}", change, problem);
            }
            before = after;
        }
    }
}

/// A flow's compiled and reference decisions must be equal; the message shows both.
#[track_caller]
fn assert_agree(cluster: &Cluster, policies: &[Policy], flow: &Flow) {
    let compiled = decide_flow(cluster, &compile(cluster, policies), flow);
    let reference = evaluate(cluster, policies, flow);
    assert_eq!(compiled, reference, "flow {flow}");
}

#[test]
fn flows_cover_every_pair_family_and_probe() {
    let mut cluster = Cluster::default();
    cluster
        .nodes
        .insert(node_name(0), node(0, Default::default()));
    let p0 = pod(0, 0, 0, Stack::Dual, Default::default(), vec![]);
    let p1 = pod(1, 0, 0, Stack::V4, Default::default(), vec![]);
    for p in [p0, p1] {
        cluster.pods.insert(p.key(), p);
    }
    // 4 ordered pairs over IPv4, 1 (p0 to itself) over IPv6.
    assert_eq!(flows(&cluster).len(), 5 * PROBES.len());
    let unknown = Flow {
        src: palisade_policy::PodKey::new("ns0", "nope"),
        ..flows(&cluster)[0].clone()
    };
    let err = Err(FlowError::NoSuchPod(unknown.src.clone()));
    assert_eq!(evaluate(&cluster, &[], &unknown), err);
    assert_eq!(
        decide_flow(&cluster, &compile(&cluster, &[]), &unknown),
        err
    );
    for flow in flows(&cluster) {
        assert_agree(&cluster, &[], &flow);
    }
}

/// The generators reach every kind of decision, so the agreement property cannot pass by
/// only ever exercising the easy cases.
#[test]
fn generated_cases_reach_every_kind_of_decision() {
    use palisade_policy::{Reason, Tier, Verdict};
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..150 {
        let (cluster, policies) = cluster_and_policies()
            .new_tree(&mut runner)
            .expect("generator")
            .current();
        for flow in flows(&cluster) {
            let Ok(decision) = evaluate(&cluster, &policies, &flow) else {
                continue;
            };
            for d in [&decision.egress, &decision.ingress] {
                let kind = match &d.reason {
                    Reason::Rule(o) => match o.tier {
                        Tier::Admin => format!("admin {}", d.verdict),
                        Tier::NetworkPolicy => "network policy allow".to_string(),
                        Tier::Baseline => format!("baseline {}", d.verdict),
                    },
                    Reason::DefaultDeny { isolated_by } if isolated_by.len() > 1 => {
                        "default deny by several".to_string()
                    }
                    Reason::DefaultDeny { .. } => "default deny".to_string(),
                    Reason::NotIsolated => "not isolated".to_string(),
                    Reason::HostNetwork => "host network".to_string(),
                    Reason::NodeLocal => "node local".to_string(),
                    Reason::ToItself => "to itself".to_string(),
                };
                *seen.entry(kind).or_default() += 1;
                if !d.passed.is_empty() {
                    *seen
                        .entry(format!("passed then {}", d.verdict))
                        .or_default() += 1;
                }
            }
            let v = match decision.verdict {
                Verdict::Allow => "flow allowed",
                Verdict::Deny => "flow denied",
            };
            *seen.entry(v.to_string()).or_default() += 1;
        }
    }
    let expected = [
        "admin allow",
        "admin deny",
        "network policy allow",
        "baseline allow",
        "baseline deny",
        "default deny",
        "default deny by several",
        "not isolated",
        "host network",
        "node local",
        "passed then allow",
        "passed then deny",
        "flow allowed",
        "flow denied",
    ];
    for kind in expected {
        assert!(
            seen.get(kind).copied().unwrap_or(0) >= 5,
            "{kind} is rare or missing: {seen:#?}"
        );
    }
}

// Regression tests: minimal reproductions of disagreements the property tests found.

fn small_cluster(pods: &[(usize, usize, Stack)]) -> Cluster {
    let mut cluster = Cluster::default();
    for i in 0..2 {
        cluster
            .nodes
            .insert(node_name(i), node(i, Default::default()));
        cluster
            .namespaces
            .insert(namespace_name(i), namespace(i, Default::default()));
    }
    for (i, &(ns, nd, stack)) in pods.iter().enumerate() {
        let p = pod(i, ns, nd, stack, Default::default(), vec![]);
        cluster.pods.insert(p.key(), p);
    }
    cluster
}

/// Applies `change` to a compiler over `cluster` and checks it against a full compile and
/// that every node whose rule set changed is reported.
#[track_caller]
fn assert_incremental(cluster: &Cluster, policies: &[Policy], change: Change) {
    let mut compiler = Compiler::new(cluster.clone(), policies.to_vec());
    let before = compiler.node_rule_sets();
    let mut cluster = cluster.clone();
    let mut by_id: BTreeMap<PolicyId, Policy> =
        policies.iter().map(|p| (p.id.clone(), p.clone())).collect();
    apply(&mut cluster, &mut by_id, &change);
    let touched = compiler.apply(change.clone());
    let after = compiler.node_rule_sets();
    let list: Vec<Policy> = by_id.into_values().collect();
    assert_eq!(after, compile(&cluster, &list), "after {change:?}");
    if let Some(problem) = unreported_by(&compiler, &before, &after, &touched) {
        panic!("{change:?}: {problem}");
    }
}

/// Found by `incremental_compile_equals_full_compile`: a host-network pod on a node without a
/// Node object gives that node an (empty) rule set, in full and incremental compiles alike,
/// but the change did not report the node as touched.
#[test]
fn regression_host_network_pod_on_unknown_node_touches_it() {
    let cluster = small_cluster(&[(0, 0, Stack::V4)]);
    let added = pod(5, 0, 2, Stack::HostNetwork, Default::default(), vec![]);
    assert_incremental(&cluster, &[], Change::UpsertPod(added));
}

/// The same for a pod moving there from a known node.
#[test]
fn regression_pod_moving_to_an_unknown_node_touches_it() {
    let cluster = small_cluster(&[(0, 0, Stack::V4), (0, 0, Stack::V4)]);
    let moved = pod(0, 0, 2, Stack::HostNetwork, Default::default(), vec![]);
    assert_incremental(&cluster, &[], Change::UpsertPod(moved));
}

/// [`unreported`] for a plain compiler.
fn unreported_by(
    compiler: &Compiler,
    before: &BTreeMap<String, NodeRuleSet>,
    after: &BTreeMap<String, NodeRuleSet>,
    touched: &Touched,
) -> Option<String> {
    unreported(
        before,
        after,
        touched,
        |id| compiler.group(id),
        |id, node| compiler.group_nodes(id).any(|n| n == node),
    )
}
