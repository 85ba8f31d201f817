//! The hub under concurrency: agents subscribe while the compile loop publishes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use palisade_controller::hub::Hub;
use palisade_controller::metrics::Metrics;
use palisade_policy::NodeRuleSet;

fn state(node: &str, generation: u64) -> NodeRuleSet {
    NodeRuleSet {
        node: node.to_string(),
        node_addresses: vec![IpAddr::V4(Ipv4Addr::from(generation as u32))],
        ..Default::default()
    }
}

/// Subscribing to a node for the first time while a publication is under way must neither
/// deadlock nor start the new channel from a state labelled with a generation it is not.
#[test]
fn new_subscribers_during_publications_neither_hang_nor_get_a_mislabelled_state() {
    let hub = Hub::new(Arc::new(Metrics::new()));
    let nodes: Vec<String> = (0..4000).map(|i| format!("node-{i}")).collect();
    let (done_tx, done_rx) = mpsc::channel();
    let publisher = {
        let (hub, nodes, done) = (hub.clone(), nodes.clone(), done_tx.clone());
        std::thread::spawn(move || {
            for round in 0..400u64 {
                // Generation `round + 1` gives every tenth node a state naming that generation.
                let changed: BTreeMap<String, Option<NodeRuleSet>> = nodes
                    .iter()
                    .skip(round as usize % 10)
                    .step_by(10)
                    .map(|n| (n.clone(), Some(state(n, round + 1))))
                    .collect();
                let g = hub.publish(changed);
                assert_eq!(g, round + 1);
            }
            done.send("publisher").unwrap();
        })
    };
    let subscriber = {
        let (hub, done) = (hub.clone(), done_tx);
        std::thread::spawn(move || {
            let mut checked = 0;
            for (i, n) in nodes.iter().enumerate() {
                let rx = hub.subscribe(n);
                let first = rx.borrow().clone().expect("a current state");
                let held = first
                    .rules
                    .node_addresses
                    .first()
                    .map(|a| match a {
                        IpAddr::V4(v4) => u32::from(*v4) as u64,
                        IpAddr::V6(_) => unreachable!(),
                    })
                    .unwrap_or(0);
                // Node i changes in the rounds r with r % 10 == i % 10: at generation g
                // it holds the last such round below g (1-based), or nothing.
                let g = first.generation;
                let expected = (0..g)
                    .rev()
                    .find(|r| r % 10 == i as u64 % 10)
                    .map_or(0, |r| r + 1);
                assert_eq!(held, expected, "{n}: the state labelled generation {g}");
                checked += 1;
            }
            assert_eq!(checked, 4000);
            done.send("subscriber").unwrap();
        })
    };
    for _ in 0..2 {
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("publish and subscribe deadlocked");
    }
    publisher.join().unwrap();
    subscriber.join().unwrap();
}

/// A pod's labels change and it joins a group that rules on many nodes reference: those
/// nodes get the group's new members as a delta of their own, and what the hub then holds
/// for every node is what a full compile gives, with a digest the agent's check accepts.
#[test]
fn a_changed_group_reaches_the_nodes_holding_it_as_a_group_delta() {
    group_delta_case(palisade_policy::Enforcement::Enforce);
}

/// The same with every policy in audit: the group is referenced from audit lists only.
#[test]
fn a_changed_group_of_audit_lists_reaches_its_nodes_as_a_group_delta() {
    group_delta_case(palisade_policy::Enforcement::Audit);
}

fn group_delta_case(default: palisade_policy::Enforcement) {
    use palisade_controller::compile_loop::publish_changes;
    use palisade_policy::workloads::scale_sized;
    use palisade_policy::{Change, StagedCompiler};

    let w = scale_sized(12, 12, 12);
    let mut compiler = StagedCompiler::new(w.cluster, w.policies, default);
    assert_eq!(
        compiler.has_audit(),
        default == palisade_policy::Enforcement::Audit
    );
    let hub = Hub::new(Arc::new(Metrics::new()));
    hub.publish(
        compiler
            .node_rule_sets()
            .into_iter()
            .map(|(n, r)| (n, Some(r)))
            .collect(),
    );
    let nodes: Vec<String> = compiler.nodes().into_iter().map(String::from).collect();
    let before: BTreeMap<String, Arc<NodeRuleSet>> = nodes
        .iter()
        .map(|n| (n.clone(), hub.subscribe(n).borrow().clone().unwrap().rules))
        .collect();
    // app-0 pods are the DNS servers of namespace ns-10 (role infra), which every
    // namespace's default deny lets its pods reach: app-1 becoming app-0 changes a group
    // that rules on every node reference.
    let mut pod = compiler
        .cluster()
        .pods
        .values()
        .find(|p| {
            p.namespace == "ns-10" && p.labels.get("app").map(String::as_str) == Some("app-1")
        })
        .unwrap()
        .clone();
    let own_node = pod.node.clone();
    pod.labels.insert("app".into(), "app-0".into());
    let (generation, reached) = publish_changes(&mut compiler, &hub, [Change::UpsertPod(pod)]);
    let mut deltas_only = 0;
    for node in &nodes {
        let published = hub.subscribe(node).borrow().clone().unwrap();
        let compiled = compiler.node_rule_set(node).unwrap();
        assert_eq!(
            *published.rules, compiled,
            "{node}: the hub's state is the compiled one"
        );
        let update = palisade_wire::diff(Some(&before[node]), &published.rules);
        palisade_wire::delta::apply(node, Some(&before[node]), &update)
            .unwrap_or_else(|e| panic!("{node}: the agent refuses the update: {e}"));
        if *node != own_node {
            assert_eq!(published.generation, generation, "{node} is reached");
            // A group the node holds crosses whole or as a patch, whichever is smaller.
            assert!(
                update.upsert_groups.len() + update.patch_groups.len() > 0
                    && update.upsert_pods.is_empty()
                    && update.upsert_rules.is_empty()
                    && update.remove_groups.is_empty(),
                "{node}: only the group changes: {update:?}"
            );
            deltas_only += 1;
        }
    }
    assert!(deltas_only >= 6, "the group is held on most nodes");
    assert_eq!(reached, nodes.len());
}
