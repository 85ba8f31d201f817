//! The lab a cluster becomes, worked out before anything is created: namespace names,
//! addresses, and the `ip -batch` scripts and sysctls of every namespace. Pure, so the
//! topology contract (docs/design.md, "The lab topology") is unit-tested without root.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

use palisade_policy::model::{Cluster, Family, PodKey};

use crate::error::{LabError, Result};
use crate::names::sanitize;

/// The pods' IPv4 default gateway, answered by proxy ARP on the node side of the veth.
pub const POD_GATEWAY_V4: &str = "169.254.1.1";
/// The pods' IPv6 default gateway, an address on the node side of every pod veth.
pub const POD_GATEWAY_V6: &str = "fe80::1";
/// The pod side of every pod veth.
pub const POD_INTERFACE: &str = "eth0";
/// The node side of the underlay veth.
pub const UNDERLAY_INTERFACE: &str = "ul0";
/// The bridge in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

#[derive(Clone, Debug)]
pub(crate) struct NodePlan {
    pub netns: String,
    pub addresses: Vec<IpAddr>,
    /// The node's port on the underlay bridge (in the underlay namespace).
    pub bridge_port: String,
}

#[derive(Clone, Debug)]
pub(crate) struct PodPlan {
    pub node: String,
    /// Its own namespace, or its node's for a host-network pod.
    pub netns: String,
    pub host_network: bool,
    /// The addresses the pod is reached at and sends from: its own, or for a host-network
    /// pod the node addresses it lists (all of the node's when it lists none).
    pub addresses: Vec<IpAddr>,
    /// The node side of the pod's veth; `None` for host-network pods.
    pub node_interface: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub underlay: String,
    pub nodes: BTreeMap<String, NodePlan>,
    pub pods: BTreeMap<PodKey, PodPlan>,
    /// Whether any address in the lab is IPv6 (IPv6 sysctls are written only then, so a
    /// kernel without IPv6 can still run IPv4 labs).
    pub has_ipv6: bool,
    prefix_len_v4: u8,
    prefix_len_v6: u8,
}

impl Plan {
    pub fn new(cluster: &Cluster, prefix: &str) -> Result<Plan> {
        let mut nodes = BTreeMap::new();
        let mut owner: HashMap<IpAddr, String> = HashMap::new();
        for (index, (name, node)) in cluster.nodes.iter().enumerate() {
            let object = format!("node {name}");
            for addr in &node.addresses {
                claim(&mut owner, *addr, &object)?;
            }
            nodes.insert(
                name.clone(),
                NodePlan {
                    netns: format!("{prefix}-n{index}-{}", sanitize(name)),
                    addresses: node.addresses.clone(),
                    bridge_port: format!("n{index}"),
                },
            );
        }

        let mut pods = BTreeMap::new();
        for (index, (key, pod)) in cluster.pods.iter().enumerate() {
            let object = format!("pod {key}");
            let node = nodes.get(&pod.node).ok_or_else(|| {
                LabError::invalid(
                    &object,
                    "node",
                    format!("node {:?} is not in the cluster", pod.node),
                )
            })?;
            check_one_per_family(&object, &pod.ips)?;
            let plan = if pod.host_network {
                for addr in &pod.ips {
                    if !node.addresses.contains(addr) {
                        return Err(LabError::invalid(
                            &object,
                            "ips",
                            format!(
                                "{addr} is not an address of its node {} (a host-network pod uses its node's addresses)",
                                pod.node
                            ),
                        ));
                    }
                }
                let addresses = if pod.ips.is_empty() {
                    node.addresses.clone()
                } else {
                    pod.ips.clone()
                };
                PodPlan {
                    node: pod.node.clone(),
                    netns: node.netns.clone(),
                    host_network: true,
                    addresses,
                    node_interface: None,
                }
            } else {
                for addr in &pod.ips {
                    claim(&mut owner, *addr, &object)?;
                }
                let interface = format!("pv{index}");
                PodPlan {
                    node: pod.node.clone(),
                    netns: format!(
                        "{prefix}-p{index}-{}.{}",
                        sanitize(&pod.namespace),
                        sanitize(&pod.name)
                    ),
                    host_network: false,
                    addresses: pod.ips.clone(),
                    node_interface: Some(interface),
                }
            };
            pods.insert(key.clone(), plan);
        }

        // Cross-node pod routes go via the pod's node address, so a node carrying a pod of
        // a family needs an address of that family (once there is another node to route).
        if nodes.len() > 1 {
            for (key, pod) in &pods {
                if pod.host_network {
                    continue;
                }
                for addr in &pod.addresses {
                    let family = Family::of(addr);
                    let node = &nodes[&pod.node];
                    if !node.addresses.iter().any(|a| Family::of(a) == family) {
                        return Err(LabError::invalid(
                            format!("node {}", pod.node),
                            "addresses",
                            format!(
                                "has no {family:?} address, so pod {key}'s {addr} cannot be routed from the other nodes"
                            ),
                        ));
                    }
                }
            }
        }

        let all_node_addrs: Vec<IpAddr> = nodes
            .values()
            .flat_map(|n| n.addresses.iter().copied())
            .collect();
        let has_ipv6 = owner.keys().any(IpAddr::is_ipv6);
        Ok(Plan {
            underlay: format!("{prefix}-ul"),
            prefix_len_v4: covering_prefix(&all_node_addrs, Family::IPv4),
            prefix_len_v6: covering_prefix(&all_node_addrs, Family::IPv6),
            nodes,
            pods,
            has_ipv6,
        })
    }

    /// Every namespace of the lab, the underlay first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut names = vec![self.underlay.clone()];
        names.extend(self.nodes.values().map(|n| n.netns.clone()));
        names.extend(
            self.pods
                .values()
                .filter(|p| !p.host_network)
                .map(|p| p.netns.clone()),
        );
        names
    }

    fn prefix_len(&self, addr: &IpAddr) -> u8 {
        match addr {
            IpAddr::V4(_) => self.prefix_len_v4,
            IpAddr::V6(_) => self.prefix_len_v6,
        }
    }

    /// Sysctls written right after the namespaces exist, before any interface: new
    /// interfaces copy `default`, so DAD and reverse-path filtering are off on them from
    /// the start.
    pub fn early_sysctls(&self) -> Vec<(String, Vec<(String, String)>)> {
        let mut out = Vec::new();
        let common = |v: &mut Vec<(String, String)>| {
            if self.has_ipv6 {
                for scope in ["all", "default"] {
                    v.push((format!("net/ipv6/conf/{scope}/accept_dad"), "0".into()));
                }
            }
        };
        let mut underlay = Vec::new();
        common(&mut underlay);
        out.push((self.underlay.clone(), underlay));
        for node in self.nodes.values() {
            let mut v = Vec::new();
            common(&mut v);
            v.push(("net/ipv4/ip_forward".into(), "1".into()));
            for scope in ["all", "default"] {
                v.push((format!("net/ipv4/conf/{scope}/rp_filter"), "0".into()));
            }
            if self.has_ipv6 {
                v.push(("net/ipv6/conf/all/forwarding".into(), "1".into()));
            }
            out.push((node.netns.clone(), v));
        }
        for pod in self.pods.values().filter(|p| !p.host_network) {
            let mut v = Vec::new();
            common(&mut v);
            out.push((pod.netns.clone(), v));
        }
        out
    }

    /// Sysctls of the node-side pod veths, written once those exist.
    pub fn late_sysctls(&self) -> Vec<(String, Vec<(String, String)>)> {
        let mut per_node: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
        for pod in self.pods.values() {
            if let Some(interface) = &pod.node_interface {
                let v = per_node.entry(&self.nodes[&pod.node].netns).or_default();
                v.push((format!("net/ipv4/conf/{interface}/proxy_arp"), "1".into()));
                v.push((format!("net/ipv4/conf/{interface}/rp_filter"), "0".into()));
            }
        }
        per_node
            .into_iter()
            .map(|(ns, v)| (ns.to_string(), v))
            .collect()
    }

    /// The underlay namespace: a bridge and one veth per node, whose other end is the
    /// node's `ul0`.
    pub fn underlay_script(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "link add {UNDERLAY_BRIDGE} type bridge forward_delay 0 mcast_snooping 0"
        );
        let _ = writeln!(s, "link set {UNDERLAY_BRIDGE} up");
        for node in self.nodes.values() {
            let _ = writeln!(
                s,
                "link add {} type veth peer name {UNDERLAY_INTERFACE} netns {}",
                node.bridge_port, node.netns
            );
            let _ = writeln!(
                s,
                "link set {} master {UNDERLAY_BRIDGE} up",
                node.bridge_port
            );
        }
        s
    }

    /// A node namespace: its underlay address(es), its pods' veths with their host routes,
    /// and routes to every remote pod via that pod's node.
    pub fn node_script(&self, node_name: &str) -> String {
        let node = &self.nodes[node_name];
        let mut s = String::new();
        let _ = writeln!(s, "link set lo up");
        let _ = writeln!(s, "link set {UNDERLAY_INTERFACE} up");
        for addr in &node.addresses {
            let _ = writeln!(
                s,
                "addr add {addr}/{} dev {UNDERLAY_INTERFACE}{}",
                self.prefix_len(addr),
                nodad(addr)
            );
        }
        let local: Vec<(&PodKey, &PodPlan)> = self
            .pods
            .iter()
            .filter(|(_, p)| p.node == node_name && !p.host_network)
            .collect();
        if local
            .iter()
            .any(|(_, p)| p.addresses.iter().any(IpAddr::is_ipv4))
        {
            // Proxy ARP answers only for targets routed out of another interface; this
            // gives the pods' made-up gateway such a route without a default route.
            let _ = writeln!(s, "route add {POD_GATEWAY_V4}/32 dev lo");
        }
        for (_, pod) in &local {
            let Some(interface) = &pod.node_interface else {
                continue;
            };
            let _ = writeln!(
                s,
                "link add {interface} type veth peer name {POD_INTERFACE} netns {}",
                pod.netns
            );
            let _ = writeln!(s, "link set {interface} up");
            if self.has_ipv6 {
                let _ = writeln!(s, "addr add {POD_GATEWAY_V6}/64 dev {interface} nodad");
            }
            for addr in &pod.addresses {
                let _ = writeln!(s, "route add {addr}/{} dev {interface}", host_len(addr));
            }
        }
        for pod in self.pods.values() {
            if pod.node == node_name || pod.host_network {
                continue;
            }
            let remote = &self.nodes[&pod.node];
            for addr in &pod.addresses {
                let via = remote
                    .addresses
                    .iter()
                    .find(|a| Family::of(a) == Family::of(addr));
                if let Some(via) = via {
                    let _ = writeln!(
                        s,
                        "route add {addr}/{} via {via} dev {UNDERLAY_INTERFACE}",
                        host_len(addr)
                    );
                }
            }
        }
        s
    }
}

fn claim(owner: &mut HashMap<IpAddr, String>, addr: IpAddr, object: &str) -> Result<()> {
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
        return Err(LabError::invalid(
            object,
            if object.starts_with("node") {
                "addresses"
            } else {
                "ips"
            },
            format!("{addr} cannot be a lab address"),
        ));
    }
    if let Some(previous) = owner.insert(addr, object.to_string()) {
        return Err(LabError::invalid(
            object,
            if object.starts_with("node") {
                "addresses"
            } else {
                "ips"
            },
            format!("{addr} is also the address of {previous}"),
        ));
    }
    Ok(())
}

fn check_one_per_family(object: &str, ips: &[IpAddr]) -> Result<()> {
    for family in [Family::IPv4, Family::IPv6] {
        if ips.iter().filter(|a| Family::of(a) == family).count() > 1 {
            return Err(LabError::invalid(
                object,
                "ips",
                format!("more than one {family:?} address"),
            ));
        }
    }
    Ok(())
}

fn host_len(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn nodad(addr: &IpAddr) -> &'static str {
    if addr.is_ipv6() {
        " nodad"
    } else {
        ""
    }
}

/// The longest prefix that covers all node addresses of a family, but no longer than /24
/// (IPv4) or /64 (IPv6), so every node address is on-link on the underlay.
fn covering_prefix(addrs: &[IpAddr], family: Family) -> u8 {
    let bits: Vec<u128> = addrs
        .iter()
        .filter_map(|a| match (a, family) {
            (IpAddr::V4(v4), Family::IPv4) => Some(u128::from(u32::from(*v4)) << 96),
            (IpAddr::V6(v6), Family::IPv6) => Some(u128::from(*v6)),
            _ => None,
        })
        .collect();
    let cap: u8 = match family {
        Family::IPv4 => 24,
        Family::IPv6 => 64,
    };
    let Some(first) = bits.first() else {
        return cap;
    };
    let common = bits
        .iter()
        .map(|b| (b ^ first).leading_zeros())
        .min()
        .unwrap_or(128);
    u8::try_from(common).map_or(cap, |c| c.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::model::{Node, Pod};

    fn node(name: &str, addrs: &[&str]) -> Node {
        Node {
            name: name.into(),
            labels: Default::default(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn pod(ns: &str, name: &str, node: &str, ips: &[&str], host: bool) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: Default::default(),
            node: node.into(),
            ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
            host_network: host,
            ports: vec![],
        }
    }

    fn cluster(nodes: Vec<Node>, pods: Vec<Pod>) -> Cluster {
        let mut c = Cluster::default();
        for n in nodes {
            c.nodes.insert(n.name.clone(), n);
        }
        for p in pods {
            c.pods.insert(p.key(), p);
        }
        c
    }

    fn sample() -> Cluster {
        cluster(
            vec![
                node("a", &["10.0.0.1", "fd00::1"]),
                node("b", &["10.0.0.2", "fd00::2"]),
            ],
            vec![
                pod("x", "web", "a", &["10.1.0.1", "fd01::1"], false),
                pod("x", "db", "b", &["10.1.0.2"], false),
                pod("kube", "agent", "b", &["10.0.0.2"], true),
            ],
        )
    }

    #[test]
    fn node_script_has_veths_host_routes_and_remote_routes() {
        let plan = Plan::new(&sample(), "t").unwrap();
        let a = plan.node_script("a");
        assert!(a.contains("addr add 10.0.0.1/24 dev ul0\n"), "{a}");
        assert!(a.contains("addr add fd00::1/64 dev ul0 nodad\n"), "{a}");
        assert!(
            a.contains("link add pv2 type veth peer name eth0 netns t-p2-x.web\n"),
            "{a}"
        );
        assert!(a.contains("addr add fe80::1/64 dev pv2 nodad\n"), "{a}");
        assert!(a.contains("route add 10.1.0.1/32 dev pv2\n"), "{a}");
        assert!(a.contains("route add fd01::1/128 dev pv2\n"), "{a}");
        assert!(
            a.contains("route add 10.1.0.2/32 via 10.0.0.2 dev ul0\n"),
            "{a}"
        );
        assert!(a.contains("route add 169.254.1.1/32 dev lo\n"), "{a}");
        // The host-network pod has no route of its own: it is its node.
        assert!(!a.contains("10.0.0.2/32"), "{a}");
        let b = plan.node_script("b");
        assert!(
            b.contains("route add fd01::1/128 via fd00::1 dev ul0\n"),
            "{b}"
        );
        assert!(
            b.contains("route add 10.1.0.1/32 via 10.0.0.1 dev ul0\n"),
            "{b}"
        );
    }

    #[test]
    fn host_network_pods_live_in_their_node() {
        let plan = Plan::new(&sample(), "t").unwrap();
        let agent = &plan.pods[&PodKey::new("kube", "agent")];
        assert_eq!(agent.netns, plan.nodes["b"].netns);
        assert!(agent.node_interface.is_none());
        assert_eq!(plan.namespaces().len(), 1 + 2 + 2);
    }

    #[test]
    fn late_sysctls_turn_on_proxy_arp_per_pod_veth() {
        let plan = Plan::new(&sample(), "t").unwrap();
        let late = plan.late_sysctls();
        let a = late
            .iter()
            .find(|(ns, _)| ns == &plan.nodes["a"].netns)
            .unwrap();
        assert!(a
            .1
            .contains(&("net/ipv4/conf/pv2/proxy_arp".to_string(), "1".to_string())));
    }

    #[test]
    fn bad_clusters_name_object_and_field() {
        let c = cluster(
            vec![node("a", &["10.0.0.1"])],
            vec![pod("x", "p", "nowhere", &["10.1.0.1"], false)],
        );
        let e = Plan::new(&c, "t").unwrap_err().to_string();
        assert!(e.contains("pod x/p: field node"), "{e}");

        let c = cluster(
            vec![node("a", &["10.0.0.1"])],
            vec![
                pod("x", "p", "a", &["10.1.0.1"], false),
                pod("x", "q", "a", &["10.1.0.1"], false),
            ],
        );
        let e = Plan::new(&c, "t").unwrap_err().to_string();
        assert!(
            e.contains("pod x/q: field ips") && e.contains("pod x/p"),
            "{e}"
        );

        let c = cluster(
            vec![node("a", &["10.0.0.1"])],
            vec![pod("x", "h", "a", &["10.0.0.9"], true)],
        );
        let e = Plan::new(&c, "t").unwrap_err().to_string();
        assert!(e.contains("pod x/h: field ips"), "{e}");

        let c = cluster(
            vec![node("a", &["10.0.0.1"]), node("b", &["10.0.0.2"])],
            vec![pod("x", "p", "a", &["fd01::1"], false)],
        );
        let e = Plan::new(&c, "t").unwrap_err().to_string();
        assert!(e.contains("node a: field addresses"), "{e}");
    }

    #[test]
    fn covering_prefix_is_capped_and_covers() {
        let addrs: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(covering_prefix(&addrs, Family::IPv4), 24);
        let addrs: Vec<IpAddr> = ["10.0.1.5", "10.1.0.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(covering_prefix(&addrs, Family::IPv4), 15);
        let addrs: Vec<IpAddr> = ["fd00::1", "fd00:0:0:1::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(covering_prefix(&addrs, Family::IPv6), 63);
        assert_eq!(covering_prefix(&[], Family::IPv6), 64);
    }
}
