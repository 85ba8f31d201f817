//! Shared helpers of the root integration tests.
#![allow(dead_code)]

use std::net::IpAddr;

use palisade_policy::model::{Cluster, ContainerPort, Namespace, Node, Pod, Protocol};

/// Whether the lab tests can run here (root, iproute2, nft); see the skip policy in
/// `palisade-testkit`.
pub fn can_run() -> bool {
    use palisade_testkit::{IP, NFT, ROOT};
    palisade_testkit::can_run(&[ROOT, IP, NFT])
}

pub fn ips(addrs: &[&str]) -> Vec<IpAddr> {
    addrs
        .iter()
        .map(|a| a.parse().expect("test address"))
        .collect()
}

pub fn node(name: &str, addrs: &[&str]) -> Node {
    Node {
        name: name.into(),
        labels: Default::default(),
        addresses: ips(addrs),
    }
}

pub fn pod(ns: &str, name: &str, node: &str, addrs: &[&str], host_network: bool) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: Default::default(),
        node: node.into(),
        ips: ips(addrs),
        host_network,
        ports: vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

pub fn cluster(nodes: Vec<Node>, pods: Vec<Pod>) -> Cluster {
    let mut c = Cluster::default();
    for n in nodes {
        c.nodes.insert(n.name.clone(), n);
    }
    for p in pods {
        c.namespaces
            .entry(p.namespace.clone())
            .or_insert(Namespace {
                name: p.namespace.clone(),
                labels: Default::default(),
            });
        c.pods.insert(p.key(), p);
    }
    c
}

/// Two nodes; a dual-stack pod and an IPv4/IPv6 pod on node a, an IPv4-only pod and a
/// host-network pod on node b.
pub fn small_cluster() -> Cluster {
    cluster(
        vec![
            node("node-a", &["10.90.0.1", "fd90::1"]),
            node("node-b", &["10.90.0.2", "fd90::2"]),
        ],
        vec![
            pod("shop", "web", "node-a", &["10.91.0.1", "fd91::1"], false),
            pod("shop", "cart", "node-a", &["10.91.0.3", "fd91::3"], false),
            pod("shop", "db", "node-b", &["10.91.0.2"], false),
            pod(
                "kube-system",
                "exporter",
                "node-b",
                &["10.90.0.2", "fd90::2"],
                true,
            ),
        ],
    )
}

/// A cluster of `nodes` nodes and `pods` pods spread round-robin, IPv4 only.
pub fn generated_cluster(nodes: usize, pods: usize) -> Cluster {
    let node_list: Vec<Node> = (0..nodes)
        .map(|i| node(&format!("node-{i}"), &[&format!("10.80.0.{}", i + 1)]))
        .collect();
    let pod_list: Vec<Pod> = (0..pods)
        .map(|i| {
            let addr = format!("10.81.{}.{}", i / 250, i % 250 + 1);
            pod(
                "bench",
                &format!("pod-{i}"),
                &format!("node-{}", i % nodes),
                &[&addr],
                false,
            )
        })
        .collect();
    cluster(node_list, pod_list)
}
