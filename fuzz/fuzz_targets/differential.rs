//! A random scenario (a small cluster and policies of every kind, from the property tests'
//! generators, their RNG seeded from the fuzzer's bytes), compiled, must decide every flow as the
//! reference evaluator does: each pod pair in each family at the probe ports, then flows at
//! any port it draws. Each node's rule set must also cross the
//! controller stream intact (encoded, decoded, applied).
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_fuzz::support::{cluster_and_policies, flows, nth_pod};
use palisade_policy::evaluate::evaluate;
use palisade_policy::ruleset::decide_flow;
use palisade_policy::{compile, Family, Flow, Protocol};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &palisade_fuzz::rng_seed(data));
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let Ok(tree) = cluster_and_policies().new_tree(&mut runner) else {
        return;
    };
    let (cluster, policies) = tree.current();
    let rule_sets = compile(&cluster, &policies);

    let any_port = (
        any::<usize>(),
        any::<usize>(),
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ],
        1u16..=u16::MAX,
        any::<bool>(),
    );
    let extra = proptest::collection::vec(any_port, 0..=16)
        .new_tree(&mut runner)
        .map(|t| t.current())
        .unwrap_or_default();
    let drawn = extra.into_iter().filter_map(|(s, d, protocol, port, six)| {
        let src = nth_pod(&cluster, s)?;
        let dst = nth_pod(&cluster, d)?;
        let family = if six { Family::IPv6 } else { Family::IPv4 };
        let both = cluster.pods[&src].ip_of(family).is_some()
            && cluster.pods[&dst].ip_of(family).is_some();
        both.then_some(Flow {
            src,
            dst,
            protocol,
            port,
            family,
        })
    });
    for flow in flows(&cluster).into_iter().chain(drawn) {
        let compiled = decide_flow(&cluster, &rule_sets, &flow);
        let reference = evaluate(&cluster, &policies, &flow);
        assert_eq!(
            compiled, reference,
            "flow {flow}\ncluster: {cluster:#?}\npolicies: {policies:#?}"
        );
    }

    for (node, set) in &rule_sets {
        let bytes = palisade_wire::diff(None, set).encode_to_vec();
        let update = palisade_wire::pb::NodeUpdate::decode(bytes.as_slice()).expect("decodes");
        let received = palisade_wire::apply(node, None, &update).expect("a compiled set applies");
        assert_eq!(&received, set, "node {node} across the stream");
    }
});
