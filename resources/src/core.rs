//! Core objects (Namespace, Pod, Node, Service) into the model.
//!
//! Conversion keeps what policies depend on. A pod is converted into a [`PodObject`] first,
//! because a pod in a file may still lack a node or addresses (the scenario loader fills
//! them in) while a live one is enforced only once it has both ([`PodObject::into_model`]).

use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use palisade_policy::{ContainerPort, Family, Labels, Namespace, Node, Pod, Protocol};

use crate::documents::{self, typed};
use crate::error::{Errors, LoadError, ObjectError, ObjectRef};
use crate::fields;
use crate::netpol::DEFAULT_NAMESPACE;
use crate::syntax::{self, NameRule};

/// The label the API server puts on every namespace, which policies often select on.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The label the kubelet puts on every node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// A pod as written: node and addresses may be missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodObject {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub node: Option<String>,
    /// `status.podIPs` (or `status.podIP`), at most one per family, in the given order.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
}

impl PodObject {
    /// The model's pod, once it has a node and (unless host-network) an address.
    /// Host-network pods take `node_addresses`.
    pub fn into_model(self, node_addresses: Option<&[IpAddr]>) -> Option<Pod> {
        let node = self.node?;
        let ips = if self.host_network {
            node_addresses.map(<[IpAddr]>::to_vec).unwrap_or(self.ips)
        } else {
            self.ips
        };
        if ips.is_empty() {
            return None;
        }
        Some(Pod {
            namespace: self.namespace,
            name: self.name,
            labels: self.labels,
            node,
            ips,
            host_network: self.host_network,
            ports: self.ports,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
}

/// A Service: kept for tools that show or probe services; policies do not use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub selector: Labels,
    /// `None` for a headless service (`clusterIP: None`) or when not set.
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// Everything a cluster file holds, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterObjects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<PodObject>,
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
}

/// The object's name, checked with its namespace and labels (see [`syntax::metadata`]).
fn name_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    rule: NameRule,
    namespaced: bool,
    errs: &mut Errors,
) -> String {
    syntax::metadata(meta, rule, namespaced, errs)
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

fn ip(value: &str, path: &str, errs: &mut Errors) -> Option<IpAddr> {
    match value.trim().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.add(path, format!("{value:?} is not an IP address"));
            None
        }
    }
}

/// A Namespace, with the `kubernetes.io/metadata.name` label the API server adds.
pub fn namespace(ns: &core::Namespace, object: &ObjectRef) -> Result<Namespace, ObjectError> {
    let mut errs = Errors::default();
    let name = name_of(&ns.metadata, NameRule::Label, false, &mut errs);
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    errs.finish(
        object,
        Namespace {
            name,
            labels: labels.into(),
        },
    )
}

/// A Node, with the `kubernetes.io/hostname` label the kubelet adds when it is missing;
/// its addresses are its `InternalIP`s (empty when none are listed).
pub fn node(n: &core::Node, object: &ObjectRef) -> Result<Node, ObjectError> {
    let mut errs = Errors::default();
    let name = name_of(&n.metadata, NameRule::Subdomain, false, &mut errs);
    let mut labels = n.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(HOSTNAME_LABEL.to_string())
        .or_insert_with(|| name.clone());
    let mut addresses = Vec::new();
    let list = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in list.into_iter().flatten().enumerate() {
        if a.type_ != "InternalIP" {
            continue;
        }
        let path = format!("status.addresses[{i}].address");
        if let Some(addr) = ip(&a.address, &path, &mut errs) {
            if addresses.iter().any(|b| Family::of(b) == Family::of(&addr)) {
                errs.add(
                    path,
                    format!(
                        "a second {:?} InternalIP; one per family is supported",
                        Family::of(&addr)
                    ),
                );
            } else {
                addresses.push(addr);
            }
        }
    }
    errs.finish(
        object,
        Node {
            name,
            labels: labels.into(),
            addresses,
        },
    )
}

/// A Pod as written (see [`PodObject`]).
pub fn pod(p: &core::Pod, object: &ObjectRef) -> Result<PodObject, ObjectError> {
    let mut errs = Errors::default();
    let name = name_of(&p.metadata, NameRule::Subdomain, true, &mut errs);
    let namespace = namespace_of(&p.metadata);
    let spec = p.spec.as_ref();
    let node = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);

    let mut ports = Vec::new();
    for (c, container) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let container_start = ports.len();
        for (i, port) in container.ports.iter().flatten().enumerate() {
            let at = format!("spec.containers[{c}].ports[{i}]");
            let number = fields::port_number(
                i64::from(port.container_port),
                &format!("{at}.containerPort"),
                &mut errs,
            );
            let protocol = fields::protocol(
                port.protocol.as_deref(),
                &format!("{at}.protocol"),
                &mut errs,
            );
            if let Some(n) = &port.name {
                fields::port_name(n, &format!("{at}.name"), &mut errs);
                // Unique within a container, as the apiserver checks; two containers may
                // share a name (the name then means each of its numbers).
                if ports[container_start..]
                    .iter()
                    .any(|p: &ContainerPort| p.name.as_ref() == Some(n))
                {
                    errs.add(
                        format!("{at}.name"),
                        format!("port name {n:?} is used twice in this container"),
                    );
                }
            }
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: number,
                protocol,
            });
        }
    }

    let mut ips = Vec::new();
    let status = p.status.as_ref();
    let listed = status.and_then(|s| s.pod_ips.as_ref());
    for (i, a) in listed.into_iter().flatten().enumerate() {
        let path = format!("status.podIPs[{i}].ip");
        if let Some(addr) = ip(&a.ip, &path, &mut errs) {
            if ips.iter().any(|b| Family::of(b) == Family::of(&addr)) {
                errs.add(
                    path,
                    format!(
                        "a second {:?} address; a pod has at most one per family",
                        Family::of(&addr)
                    ),
                );
            } else {
                ips.push(addr);
            }
        }
    }
    if let Some(single) = status.and_then(|s| s.pod_ip.as_deref()) {
        if let Some(addr) = ip(single, "status.podIP", &mut errs) {
            match ips.first() {
                None => ips.push(addr),
                Some(first) if *first == addr => {}
                Some(first) => errs.add(
                    "status.podIP",
                    format!("{addr} differs from status.podIPs[0] {first}"),
                ),
            }
        }
    }

    errs.finish(
        object,
        PodObject {
            namespace,
            name,
            labels: p.metadata.labels.clone().unwrap_or_default().into(),
            node,
            ips,
            host_network,
            ports,
        },
    )
}

/// A Service's selector, cluster IP and ports.
pub fn service(s: &core::Service, object: &ObjectRef) -> Result<Service, ObjectError> {
    let mut errs = Errors::default();
    let name = name_of(&s.metadata, NameRule::Label, true, &mut errs);
    let namespace = namespace_of(&s.metadata);
    let spec = s.spec.clone().unwrap_or_default();
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(a) => ip(a, "spec.clusterIP", &mut errs),
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = fields::port_number(i64::from(p.port), &format!("{at}.port"), &mut errs);
        let protocol =
            fields::protocol(p.protocol.as_deref(), &format!("{at}.protocol"), &mut errs);
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(fields::port_number(
                i64::from(*n),
                &format!("{at}.targetPort"),
                &mut errs,
            )),
            Some(IntOrString::String(n)) => {
                fields::port_name(n, &format!("{at}.targetPort"), &mut errs);
                TargetPort::Name(n.clone())
            }
        };
        ports.push(ServicePort {
            name: p.name.clone(),
            protocol,
            port,
            target_port,
        });
    }
    errs.finish(
        object,
        Service {
            namespace,
            name,
            selector: spec.selector.unwrap_or_default().into(),
            cluster_ip,
            ports,
        },
    )
}

/// Reads a cluster file (Namespaces, Pods, Nodes, Services): everything, or every error.
pub fn parse_cluster(file: &str, text: &str) -> Result<ClusterObjects, LoadError> {
    let (docs, mut errors) = documents::split(text);
    let mut out = ClusterObjects::default();
    for doc in &docs {
        let (api_version, kind) = (doc.api_version(), doc.kind());
        let namespaced = matches!(kind, "Pod" | "Service");
        let object = doc.object_ref(namespaced.then_some(DEFAULT_NAMESPACE));
        let result = match (api_version, kind) {
            ("v1", "Namespace") => typed(&doc.value, &object)
                .and_then(|n| namespace(&n, &object))
                .map(|n| out.namespaces.push(n)),
            ("v1", "Pod") => typed(&doc.value, &object)
                .and_then(|p| pod(&p, &object))
                .map(|p| out.pods.push(p)),
            ("v1", "Node") => typed(&doc.value, &object)
                .and_then(|n| node(&n, &object))
                .map(|n| out.nodes.push(n)),
            ("v1", "Service") => typed(&doc.value, &object)
                .and_then(|s| service(&s, &object))
                .map(|s| out.services.push(s)),
            ("", _) | (_, "") => Err(ObjectError::new(
                object,
                "",
                "apiVersion and kind are required",
            )),
            _ => Err(ObjectError::new(
                object,
                "kind",
                format!("unexpected kind {kind:?} of apiVersion {api_version:?}; a cluster file holds v1 Namespace, Pod, Node and Service objects"),
            )),
        };
        if let Err(e) = result {
            errors.push(e);
        }
    }
    LoadError::all_or_nothing(file, out, errors)
}

/// [`parse_cluster`] of a file on disk.
pub fn load_cluster_objects(path: &Path) -> Result<ClusterObjects, LoadError> {
    LoadError::read_then(path, parse_cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_keep_selector_ports_and_cluster_ip() {
        let objs = parse_cluster(
            "c",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}, {port: 53, protocol: UDP}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None}\n",
        )
        .unwrap();
        let s = &objs.services[0];
        assert_eq!((s.namespace.as_str(), s.name.as_str()), ("shop", "web"));
        assert_eq!(s.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(s.selector.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            s.ports,
            vec![
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Name("http".into())
                },
                ServicePort {
                    name: None,
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: TargetPort::Number(53)
                },
            ]
        );
        assert_eq!(objs.services[1].cluster_ip, None);
    }

    #[test]
    fn pod_addresses_and_ports_are_checked() {
        let err = parse_cluster(
            "cluster.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{name: web, containerPort: 80, protocol: QUIC}, {name: web, containerPort: 81}]}]}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}, {ip: 10.0.0.3}]}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        )
        .unwrap_err();
        let lines: Vec<String> = err.to_string().lines().map(String::from).collect();
        assert_eq!(
            lines,
            vec![
                "cluster.yaml: Pod default/p: spec.containers[0].ports[0].protocol: unknown protocol \"QUIC\" (expected TCP, UDP or SCTP)",
                "cluster.yaml: Pod default/p: spec.containers[0].ports[1].name: port name \"web\" is used twice in this container",
                "cluster.yaml: Pod default/p: status.podIPs[1].ip: a second IPv4 address; a pod has at most one per family",
                "cluster.yaml: Pod default/p: status.podIP: 10.0.0.1 differs from status.podIPs[0] 10.0.0.2",
                "cluster.yaml: Deployment d: kind: unexpected kind \"Deployment\" of apiVersion \"apps/v1\"; a cluster file holds v1 Namespace, Pod, Node and Service objects",
            ]
        );
    }

    /// Issue 12.9: each kind's name rule as the v1.37 apiserver has it. Pods and Nodes are
    /// DNS-1123 subdomains (dots, up to 253); Namespaces and Services are DNS-1123 labels
    /// (a Service may start with a digit since RelaxedServiceNameValidation went GA).
    #[test]
    fn names_follow_each_kinds_rule() {
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        let accepted = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: 0shop, labels: {{example.com/t: v}}}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: node-1.example.com}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {long}, namespace: 0shop}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: 1web, namespace: 0shop}}\n"
        );
        let objs = parse_cluster("c", &accepted).expect("the apiserver accepts these");
        assert_eq!(objs.pods[0].name, long);

        let refused = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop.prod}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: Node_1}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: Shop, labels: {app: \"a b\"}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web.v1}\n";
        let err = parse_cluster("c", refused).unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{err}");
        assert!(
            lines[0].starts_with(
                "c: Namespace shop.prod: metadata.name: \"shop.prod\": a lowercase RFC 1123 label"
            ),
            "{err}"
        );
        assert!(
            lines[1].starts_with(
                "c: Node Node_1: metadata.name: \"Node_1\": a lowercase RFC 1123 subdomain"
            ),
            "{err}"
        );
        assert!(
            lines[2].starts_with("c: Pod Shop/web: metadata.namespace: \"Shop\""),
            "{err}"
        );
        assert!(
            lines[3].starts_with("c: Pod Shop/web: metadata.labels[app]: \"a b\""),
            "{err}"
        );
        assert!(
            lines[4].starts_with(
                "c: Service default/web.v1: metadata.name: \"web.v1\": a lowercase RFC 1123 label"
            ),
            "{err}"
        );
    }
}
