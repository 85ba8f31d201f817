//! One node namespace and pod namespaces joined to it by routed veth pairs, exactly as
//! docs/design.md's lab topology says (adapted from the agent's `tests/common`). Every
//! namespace is removed on drop, also when the bench panics.

use std::net::IpAddr;

use palisade_agent::Interfaces;
use palisade_policy::model::PodKey;

use super::{sh, unique, Netns};

pub struct LabPod {
    pub key: PodKey,
    pub netns: Netns,
    pub veth: String,
    pub ip4: IpAddr,
}

pub struct Lab {
    // Pods first: dropped (deleted) before the node.
    pub pods: Vec<LabPod>,
    pub node: Netns,
    subnet: u8,
}

impl Lab {
    /// Pods get 10.77.SUBNET.2, .3, …
    pub fn new(subnet: u8, pods: &[&str]) -> Lab {
        let node = Netns::new(unique("pbn-"));
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            node.sysctl(s);
        }
        sh(&[
            "ip",
            "-n",
            &node.name,
            "addr",
            "add",
            "169.254.1.1/32",
            "dev",
            "lo",
        ]);
        let mut lab = Lab {
            pods: Vec::new(),
            node,
            subnet,
        };
        for p in pods {
            lab.add_pod(p);
        }
        lab
    }

    fn add_pod(&mut self, name: &str) {
        let i = self.pods.len();
        let node = self.node.name.clone();
        let netns = Netns::new(unique("pbp-"));
        let veth = format!("vb{}x{i}", std::process::id() % 100_000);
        assert!(veth.len() <= 15);
        let ip4: IpAddr = format!("10.77.{}.{}", self.subnet, i + 2)
            .parse()
            .expect("valid address");
        let pod_ns = netns.name.clone();
        sh(&[
            "ip", "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
            "netns", &pod_ns,
        ]);
        for s in [
            format!("net.ipv4.conf.{veth}.proxy_arp=1"),
            format!("net.ipv4.conf.{veth}.rp_filter=0"),
        ] {
            self.node.sysctl(&s);
        }
        sh(&["ip", "-n", &node, "link", "set", &veth, "up"]);
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            &format!("{ip4}/32"),
            "dev",
            &veth,
        ]);
        sh(&["ip", "-n", &pod_ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &pod_ns,
            "addr",
            "add",
            &format!("{ip4}/32"),
            "dev",
            "eth0",
        ]);
        sh(&[
            "ip",
            "-n",
            &pod_ns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "onlink",
        ]);
        let (ns, pod) = name.split_once('/').expect("NS/NAME");
        self.pods.push(LabPod {
            key: PodKey::new(ns, pod),
            netns,
            veth,
            ip4,
        });
    }

    pub fn interfaces(&self) -> Interfaces {
        self.pods
            .iter()
            .map(|p| (p.key.clone(), p.veth.clone()))
            .collect()
    }
}
