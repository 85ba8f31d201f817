//! The randomized dataplane property: random small clusters and policies (the policy
//! crate's generators), compiled, rendered and applied by the agent's applier to real
//! nftables in a lab node, and a random sample of each cluster's flows probed by real TCP
//! connections and compared with the reference evaluator. Before the table is applied
//! every sampled flow must connect, so a deny is never a broken lab.
//!
//! The lab is one node whose pods sit at the generators' address plan (10.77.S.16+i
//! standing for 10.0.0.16+i, fd00:77:S::16+i for fd10::16+i; ipBlocks are moved with
//! them), so generated ipBlocks cut around pods as they do in the offline property. One
//! node means every flow is pod to pod on that node (forward, both directions checked);
//! cross-node and host-network paths are covered by `verify --dataplane` and the
//! rendered-table interpreter. Root only.
//!
//! `PALISADE_DATAPLANE_CLUSTERS` (default 30) clusters × `PALISADE_DATAPLANE_FLOWS`
//! (default 50) flows; `PALISADE_DATAPLANE_SEED` picks another sequence.

mod common;
#[path = "../../policy/tests/support/mod.rs"]
mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use ipnet::IpNet;
use palisade_agent::{render, Applier, Nft};
use palisade_policy::evaluate::evaluate;
use palisade_policy::{compile, Cluster, Family, Flow, Peer, Policy, Protocol, Verdict};
use proptest::prelude::Rng;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const SUBNET: u8 = 31;
const TCP_PORTS: [u16; 5] = [80, 443, 8080, 9090, 1234];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Moves an address of the generators' plan (10.0.0.x, fd10::x) onto the lab's.
fn to_lab(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let [_, _, _, last] = a.octets();
            IpAddr::V4([10, 77, SUBNET, last].into())
        }
        IpAddr::V6(a) => {
            let low = u128::from(a) & 0xffff_ffff;
            let base: u128 = u128::from(std::net::Ipv6Addr::new(
                0xfd00,
                0x77,
                u16::from(SUBNET),
                0,
                0,
                0,
                0,
                0,
            ));
            IpAddr::V6((base | low).into())
        }
    }
}

fn net_to_lab(net: &IpNet) -> IpNet {
    IpNet::new(to_lab(net.addr()), net.prefix_len())
        .expect("same prefix length")
        .trunc()
}

fn policies_to_lab(policies: &mut [Policy]) {
    for policy in policies {
        for rule in policy.ingress.iter_mut().chain(policy.egress.iter_mut()) {
            for peer in rule.peers.iter_mut().flatten() {
                if let Peer::IpBlock { cidr, except } = peer {
                    *cidr = net_to_lab(cidr);
                    except.iter_mut().for_each(|e| *e = net_to_lab(e));
                }
            }
        }
    }
}

/// One random cluster on one node: 3-6 dual-stack pods in up to three namespaces (and one
/// without a Namespace object), with random labels and container ports, and policies.
fn draw(runner: &mut TestRunner) -> (Cluster, Vec<Policy>) {
    let shapes = proptest::collection::vec(support::pod_shape(3, 1), 3..=6);
    let ns_labels = proptest::collection::vec(support::labels(), 3);
    let node_labels = support::labels();
    let (shapes, ns_labels, node_labels) = (shapes, ns_labels, node_labels)
        .new_tree(runner)
        .expect("generator")
        .current();
    let mut cluster = Cluster::default();
    cluster
        .nodes
        .insert(support::node_name(0), support::node(0, node_labels));
    for (i, l) in ns_labels.into_iter().enumerate() {
        cluster
            .namespaces
            .insert(support::namespace_name(i), support::namespace(i, l));
    }
    for (i, (ns, _, _, labels, ports)) in shapes.into_iter().enumerate() {
        let mut pod = support::pod(i, ns, 0, support::Stack::Dual, labels, ports);
        pod.ips = pod.ips.into_iter().map(to_lab).collect();
        cluster.pods.insert(pod.key(), pod);
    }
    let mut policies = support::policies(3)
        .new_tree(runner)
        .expect("generator")
        .current();
    policies_to_lab(&mut policies);
    (cluster, policies)
}

fn pick(rng: &mut TestRng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn sample_flows(cluster: &Cluster, n: usize, rng: &mut TestRng) -> Vec<Flow> {
    let pods: Vec<_> = cluster.pods.values().collect();
    (0..n)
        .map(|_| {
            let src = pods[pick(rng, pods.len())];
            let mut dst = pods[pick(rng, pods.len())];
            while dst.key() == src.key() {
                dst = pods[pick(rng, pods.len())];
            }
            Flow {
                src: src.key(),
                dst: dst.key(),
                protocol: Protocol::Tcp,
                port: TCP_PORTS[pick(rng, TCP_PORTS.len())],
                family: if rng.next_u64().is_multiple_of(2) {
                    Family::IPv4
                } else {
                    Family::IPv6
                },
            }
        })
        .collect()
}

/// Every flow probed at once, each in its own thread: whether it connected.
fn probe(lab: &Lab, cluster: &Cluster, flows: &[Flow]) -> Vec<bool> {
    let threads: Vec<_> = flows
        .iter()
        .map(|f| {
            let netns = lab.pod(&f.src.name).netns.clone();
            let dst = cluster.pods[&f.dst].ip_of(f.family).expect("dual stack");
            let port = f.port;
            std::thread::spawn(move || {
                tcp_ok_within(&netns, dst, port, Duration::from_millis(1000))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn random_clusters_enforced_by_nftables_agree_with_the_evaluator() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let clusters = env_or("PALISADE_DATAPLANE_CLUSTERS", 30);
    let per_cluster = env_or("PALISADE_DATAPLANE_FLOWS", 50) as usize;
    let seed = env_or("PALISADE_DATAPLANE_SEED", 13);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let started = Instant::now();
    let (mut probed, mut denied) = (0usize, 0usize);
    for case in 0..clusters {
        let (cluster, policies) = draw(&mut runner);
        // In address order, so that the lab's i-th pod gets pod i's addresses.
        let mut pods: Vec<_> = cluster.pods.values().collect();
        pods.sort_by_key(|p| p.ips.clone());
        let names: Vec<String> = pods.iter().map(|p| p.key().to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let lab = Lab::with_first_host("q", SUBNET, 16, &names);
        for (pod, lab_pod) in pods.iter().zip(&lab.pods) {
            assert_eq!(pod.key(), lab_pod.key);
            assert_eq!(
                pod.ips,
                vec![lab_pod.ip4, lab_pod.ip6],
                "the address plans agree"
            );
        }
        let _servers: Vec<Servers> = lab
            .pods
            .iter()
            .map(|p| Servers::start(&p.netns, &TCP_PORTS, &[]))
            .collect();
        let flows = sample_flows(&cluster, per_cluster, &mut rng);
        let control = probe(&lab, &cluster, &flows);
        if let Some(i) = control.iter().position(|ok| !ok) {
            panic!("case {case}: {} does not connect without policy", flows[i]);
        }
        let rule_sets = compile(&cluster, &policies);
        let Some(set) = rule_sets.get(&support::node_name(0)) else {
            panic!("case {case}: no rule set for the node");
        };
        // Every other case with each shared tier list rendered through its address
        // classes (which tier lists this small would not have by default).
        let mut renderer = render::Renderer::default();
        if case % 2 == 1 {
            renderer.set_classes_from(1);
        }
        let table = renderer.render(set, &lab.interfaces()).expect("rendering");
        Applier::new(Nft::in_netns(&lab.node))
            .apply(&table)
            .expect("applying");
        let got = probe(&lab, &cluster, &flows);
        for (flow, connected) in flows.iter().zip(got) {
            let reference = evaluate(&cluster, &policies, flow).expect("flow");
            let verdict = if connected {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            assert_eq!(
                verdict, reference.verdict,
                "case {case} (seed {seed}): flow {flow} {} by nftables, the evaluator says {reference}\n\
                 cluster: {cluster:#?}\npolicies: {policies:#?}",
                if connected { "connected" } else { "was dropped" },
            );
            probed += 1;
            denied += usize::from(!connected);
        }
    }
    println!(
        "{clusters} clusters, {probed} flows ({denied} denied) agreed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
