//! Turns the objects of a cluster file into a complete [`Cluster`]: nodes, pod placement and
//! addresses filled in where the file leaves them out (FORMAT.md).
//!
//! Rules, in order:
//! - Nodes are the Node objects; without any, the nodes the pods' `spec.nodeName` names;
//!   without those, a single node `node-1`.
//! - Pods without `spec.nodeName` are placed round-robin over the nodes, both taken in name
//!   order.
//! - A namespace that pods or services use but no Namespace object declares exists with only
//!   its `kubernetes.io/metadata.name` label.
//! - The scenario is dual-stack when any address it gives (pod or node) is IPv6: then
//!   assigned addresses come in both families, otherwise IPv4 only.
//! - A node without `InternalIP`s takes the addresses of its host-network pods if they give
//!   any, else `172.30.0.<i>` (and `fd00:30::<i>`), `i` being the node's place (from 1) in
//!   name order.
//! - A pod without addresses gets `10.244.<i>.<n>` (and `fd00:244:<i>::<n>`), `n` from 10 up.
//!   These ranges never overlap (172.30.0.0/24 and 10.244.0.0/16), and no address the file
//!   already uses (pods, nodes, service cluster IPs) is ever assigned.
//! - Host-network pods have their node's addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_policy::{Cluster, Family, Labels, Namespace, Node, Pod, PodKey};

use crate::core::{ClusterObjects, PodObject, HOSTNAME_LABEL, NAMESPACE_NAME_LABEL};
use crate::error::{ObjectError, ObjectRef};

/// The node a scenario without nodes runs on.
pub const DEFAULT_NODE: &str = "node-1";
/// Pod addresses assigned per node: `10.244.<node>.<n>` for `n` in this range.
const POD_HOSTS: std::ops::RangeInclusive<u8> = 10..=254;

fn pod_ref(p: &PodObject) -> ObjectRef {
    ObjectRef::Named {
        kind: "Pod".into(),
        namespace: Some(p.namespace.clone()),
        name: p.name.clone(),
    }
}

fn node_ref(name: &str) -> ObjectRef {
    ObjectRef::Named {
        kind: "Node".into(),
        namespace: None,
        name: name.to_string(),
    }
}

/// Completes the cluster, or says what is inconsistent in the objects.
pub fn build_cluster(objects: &ClusterObjects) -> Result<Cluster, Vec<ObjectError>> {
    let mut errors = Vec::new();

    let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
    for ns in &objects.namespaces {
        if namespaces.insert(ns.name.clone(), ns.clone()).is_some() {
            errors.push(ObjectError::new(
                ObjectRef::Named {
                    kind: "Namespace".into(),
                    namespace: None,
                    name: ns.name.clone(),
                },
                "metadata.name",
                "defined more than once",
            ));
        }
    }
    let used_namespaces = objects
        .pods
        .iter()
        .map(|p| &p.namespace)
        .chain(objects.services.iter().map(|s| &s.namespace));
    for ns in used_namespaces {
        namespaces.entry(ns.clone()).or_insert_with(|| Namespace {
            name: ns.clone(),
            labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.clone())]),
        });
    }

    let mut pods: BTreeMap<PodKey, PodObject> = BTreeMap::new();
    for p in &objects.pods {
        match pods.entry(PodKey::new(&p.namespace, &p.name)) {
            std::collections::btree_map::Entry::Occupied(_) => errors.push(ObjectError::new(
                pod_ref(p),
                "metadata.name",
                "defined more than once",
            )),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(p.clone());
            }
        }
    }

    let mut nodes = nodes(objects, &pods, &mut errors);
    let node_names: Vec<String> = nodes.keys().cloned().collect();
    place(&mut pods, &node_names);

    let dual_stack = pods
        .values()
        .flat_map(|p| &p.ips)
        .chain(nodes.values().flat_map(|n| &n.addresses))
        .any(|a| a.is_ipv6());
    let mut used = used_addresses(objects, &pods, &nodes, &mut errors);
    address_nodes(&mut nodes, &pods, dual_stack, &mut used, &mut errors);
    let pods = address_pods(pods, &nodes, dual_stack, &mut used, &mut errors);

    if errors.is_empty() {
        Ok(Cluster {
            namespaces,
            pods,
            nodes,
        })
    } else {
        Err(errors)
    }
}

fn nodes(
    objects: &ClusterObjects,
    pods: &BTreeMap<PodKey, PodObject>,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<String, Node> {
    let mut nodes = BTreeMap::new();
    if objects.nodes.is_empty() {
        let mut names: BTreeSet<String> = pods.values().filter_map(|p| p.node.clone()).collect();
        if names.is_empty() {
            names.insert(DEFAULT_NODE.to_string());
        }
        return names
            .into_iter()
            .map(|name| {
                let node = Node {
                    labels: Labels::from([(HOSTNAME_LABEL.to_string(), name.clone())]),
                    name: name.clone(),
                    addresses: Vec::new(),
                };
                (name, node)
            })
            .collect();
    }
    for n in &objects.nodes {
        if nodes.insert(n.name.clone(), n.clone()).is_some() {
            errors.push(ObjectError::new(
                node_ref(&n.name),
                "metadata.name",
                "defined more than once",
            ));
        }
    }
    for p in pods.values() {
        if let Some(node) = &p.node {
            if !nodes.contains_key(node) {
                errors.push(ObjectError::new(
                    pod_ref(p),
                    "spec.nodeName",
                    format!("no Node {node:?} in the cluster file"),
                ));
            }
        }
    }
    nodes
}

/// Round-robin over the nodes for pods without `spec.nodeName`.
fn place(pods: &mut BTreeMap<PodKey, PodObject>, node_names: &[String]) {
    let mut next = node_names.iter().cycle();
    for p in pods.values_mut().filter(|p| p.node.is_none()) {
        p.node = next.next().cloned();
    }
}

/// Every address the file gives, checking that no two pods (or a pod and a node) share one.
fn used_addresses(
    objects: &ClusterObjects,
    pods: &BTreeMap<PodKey, PodObject>,
    nodes: &BTreeMap<String, Node>,
    errors: &mut Vec<ObjectError>,
) -> BTreeSet<IpAddr> {
    let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
    for n in nodes.values() {
        for a in &n.addresses {
            if let Some(other) = owner.insert(*a, format!("Node {}", n.name)) {
                errors.push(ObjectError::new(
                    node_ref(&n.name),
                    "status.addresses",
                    format!("{a} is also the address of {other}"),
                ));
            }
        }
    }
    for p in pods.values().filter(|p| !p.host_network) {
        for a in &p.ips {
            if let Some(other) = owner.insert(*a, format!("Pod {}/{}", p.namespace, p.name)) {
                errors.push(ObjectError::new(
                    pod_ref(p),
                    "status.podIPs",
                    format!("{a} is also the address of {other}"),
                ));
            }
        }
    }
    let mut used: BTreeSet<IpAddr> = owner.into_keys().collect();
    used.extend(pods.values().flat_map(|p| p.ips.iter().copied()));
    used.extend(objects.services.iter().filter_map(|s| s.cluster_ip));
    used
}

fn address_nodes(
    nodes: &mut BTreeMap<String, Node>,
    pods: &BTreeMap<PodKey, PodObject>,
    dual_stack: bool,
    used: &mut BTreeSet<IpAddr>,
    errors: &mut Vec<ObjectError>,
) {
    for (i, node) in nodes.values_mut().enumerate() {
        let host_pods: Vec<&PodObject> = pods
            .values()
            .filter(|p| p.host_network && p.node.as_deref() == Some(node.name.as_str()))
            .collect();
        if node.addresses.is_empty() {
            // A host-network pod's given addresses are its node's.
            for p in &host_pods {
                if p.ips.is_empty() {
                    continue;
                }
                if node.addresses.is_empty() {
                    node.addresses = p.ips.clone();
                } else if node.addresses != p.ips {
                    errors.push(ObjectError::new(
                        pod_ref(p),
                        "status.podIPs",
                        format!(
                            "a host-network pod has its node's addresses, but another host-network pod on {} gives {}",
                            node.name,
                            join(&node.addresses)
                        ),
                    ));
                }
            }
        } else {
            for p in &host_pods {
                if let Some(a) = p.ips.iter().find(|a| !node.addresses.contains(a)) {
                    errors.push(ObjectError::new(
                        pod_ref(p),
                        "status.podIPs",
                        format!(
                            "{a} is not an address of its node {} ({}); a host-network pod has its node's addresses",
                            node.name,
                            join(&node.addresses)
                        ),
                    ));
                }
            }
        }
        if !node.addresses.is_empty() {
            continue;
        }
        let index = i + 1;
        let v4 = (u8::try_from(index).ok())
            .map(|i| IpAddr::V4(Ipv4Addr::new(172, 30, 0, i)))
            .filter(|a| !used.contains(a));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, index as u16));
        match v4 {
            Some(a) if index <= 254 => node.addresses.push(a),
            _ => {
                errors.push(ObjectError::new(
                    node_ref(&node.name),
                    "status.addresses",
                    "no InternalIP given and none free to assign (172.30.0.1-254); list the node's addresses",
                ));
                continue;
            }
        }
        if dual_stack && !used.contains(&v6) {
            node.addresses.push(v6);
        }
        used.extend(node.addresses.iter().copied());
    }
}

fn address_pods(
    pods: BTreeMap<PodKey, PodObject>,
    nodes: &BTreeMap<String, Node>,
    dual_stack: bool,
    used: &mut BTreeSet<IpAddr>,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<PodKey, Pod> {
    let node_index: BTreeMap<&str, usize> = nodes
        .keys()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i + 1))
        .collect();
    let mut out = BTreeMap::new();
    for (key, mut p) in pods {
        let Some(node_name) = p.node.clone() else {
            continue;
        };
        let Some(node) = nodes.get(&node_name) else {
            continue; // reported by `nodes`
        };
        if !p.host_network && p.ips.is_empty() {
            let index = node_index.get(node_name.as_str()).copied().unwrap_or(1);
            let families: &[Family] = if dual_stack {
                &[Family::IPv4, Family::IPv6]
            } else {
                &[Family::IPv4]
            };
            for family in families {
                match free_pod_address(*family, index, used) {
                    Some(a) => {
                        used.insert(a);
                        p.ips.push(a);
                    }
                    None => errors.push(ObjectError::new(
                        pod_ref(&p),
                        "status.podIP",
                        format!(
                            "no {family:?} address left to assign on node {node_name}; give the pod's address"
                        ),
                    )),
                }
            }
        }
        if let Some(pod) = p.into_model(Some(&node.addresses)) {
            out.insert(key, pod);
        }
    }
    out
}

fn free_pod_address(family: Family, node_index: usize, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let third = u8::try_from(node_index).ok()?;
    POD_HOSTS
        .map(|n| match family {
            Family::IPv4 => IpAddr::V4(Ipv4Addr::new(10, 244, third, n)),
            Family::IPv6 => IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0x244,
                u16::from(third),
                0,
                0,
                0,
                0,
                u16::from(n),
            )),
        })
        .find(|a| !used.contains(a))
}

fn join(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::parse_cluster;

    fn build(yaml: &str) -> Result<Cluster, Vec<String>> {
        let objects = parse_cluster("cluster.yaml", yaml).map_err(|e| vec![e.to_string()])?;
        build_cluster(&objects).map_err(|errs| errs.iter().map(|e| e.to_string()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_nodes_at_all_gives_node_1() {
        let c = build("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n").unwrap();
        assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["node-1"]);
        let a = c.pod("default", "a").unwrap();
        assert_eq!(a.node, "node-1");
        assert_eq!(a.ips, vec![ip("10.244.1.10")]);
        assert_eq!(c.nodes["node-1"].addresses, vec![ip("172.30.0.1")]);
        assert_eq!(
            c.namespace_labels("default")
                .unwrap()
                .get(NAMESPACE_NAME_LABEL),
            Some(&"default".to_string())
        );
    }

    #[test]
    fn nodes_from_pods_and_round_robin_placement() {
        let c = build(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a}
spec: {nodeName: w2}
---
apiVersion: v1
kind: Pod
metadata: {name: b}
spec: {nodeName: w1}
---
apiVersion: v1
kind: Pod
metadata: {name: c}
---
apiVersion: v1
kind: Pod
metadata: {name: d}
---
apiVersion: v1
kind: Pod
metadata: {name: e}
"#,
        )
        .unwrap();
        assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["w1", "w2"]);
        let node = |n: &str| c.pod("default", n).unwrap().node.clone();
        assert_eq!([node("c"), node("d"), node("e")], ["w1", "w2", "w1"]);
        // w1 is node 1, w2 node 2; pods in name order.
        assert_eq!(c.pod("default", "b").unwrap().ips, vec![ip("10.244.1.10")]);
        assert_eq!(c.pod("default", "c").unwrap().ips, vec![ip("10.244.1.11")]);
        assert_eq!(c.pod("default", "a").unwrap().ips, vec![ip("10.244.2.10")]);
    }

    #[test]
    fn assigned_addresses_avoid_used_ones_and_go_dual_stack() {
        let c = build(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: given}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.244.1.10}, {ip: "fd00:244:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: new}
spec: {nodeName: n1}
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.244.1.11, selector: {app: x}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host}
spec: {nodeName: n1, hostNetwork: true}
"#,
        )
        .unwrap();
        assert_eq!(
            c.pod("default", "new").unwrap().ips,
            vec![ip("10.244.1.12"), ip("fd00:244:1::a")]
        );
        let node = &c.nodes["n1"];
        assert_eq!(node.addresses, vec![ip("172.30.0.1"), ip("fd00:30::1")]);
        assert_eq!(c.pod("default", "host").unwrap().ips, node.addresses);
    }

    #[test]
    fn node_objects_and_their_addresses() {
        let c = build(
            r#"
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {zone: b}}
status: {addresses: [{type: Hostname, address: n2}, {type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Pod
metadata: {name: h, namespace: kube-system}
spec: {hostNetwork: true, nodeName: n2}
"#,
        )
        .unwrap();
        assert_eq!(c.nodes["n2"].addresses, vec![ip("192.168.0.2")]);
        assert_eq!(c.nodes["n2"].labels.get(HOSTNAME_LABEL).unwrap(), "n2");
        assert_eq!(c.nodes["n1"].addresses, vec![ip("172.30.0.1")]);
        assert_eq!(
            c.pod("kube-system", "h").unwrap().ips,
            vec![ip("192.168.0.2")]
        );
    }

    #[test]
    fn inconsistent_objects_are_errors() {
        let errs = build(
            r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Pod
metadata: {name: a}
spec: {nodeName: n9}
---
apiVersion: v1
kind: Pod
metadata: {name: b}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: c}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: c}
"#,
        )
        .unwrap_err();
        assert_eq!(
            errs,
            vec![
                "Pod default/c: metadata.name: defined more than once",
                "Pod default/a: spec.nodeName: no Node \"n9\" in the cluster file",
                "Pod default/c: status.podIPs: 10.0.0.1 is also the address of Pod default/b",
            ]
        );
    }
}
