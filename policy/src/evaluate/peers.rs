//! Whether a rule's peers and ports match one direction of a flow, from the API documents:
//! a rule matches when some peer matches (no peers field: any peer) and some port matches
//! (no ports field: any port), seen by address as a packet is.

use std::net::IpAddr;

use super::selectors::{namespace_selected, selector_selects};
use super::View;
use crate::model::{Direction, NamespaceScope, Peer, Pod, PortRule, PortSpec, Protocol, Rule};

pub(super) fn rule_matches(rule: &Rule, view: &View<'_>) -> bool {
    let peer = rule
        .peers
        .as_ref()
        .is_none_or(|peers| peers.iter().any(|p| peer_matches(p, view)));
    let port = rule
        .ports
        .as_ref()
        .is_none_or(|ports| ports.iter().any(|p| port_matches(p, view)));
    peer && port
}

/// Pods a pod selector can mean at `addr`: host-network pods carry their node's addresses
/// and are never selected as pods.
fn pods_holding<'a>(view: &View<'a>, addr: IpAddr) -> Vec<&'a Pod> {
    view.cluster
        .pods
        .values()
        .filter(|p| !p.host_network && p.ips.contains(&addr))
        .collect()
}

/// `ipBlock` (and a cluster policy's `networks` entry): inside `cidr` and inside none of the
/// `except` blocks, compared bit by bit on the address's family.
fn in_block(addr: IpAddr, cidr: &ipnet::IpNet, except: &[ipnet::IpNet]) -> bool {
    let inside = |net: &ipnet::IpNet| match (net, addr) {
        (ipnet::IpNet::V4(net), IpAddr::V4(a)) => {
            let bits = u32::from(net.prefix_len());
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(net.addr()) & mask
        }
        (ipnet::IpNet::V6(net), IpAddr::V6(a)) => {
            let bits = u32::from(net.prefix_len());
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(net.addr()) & mask
        }
        _ => false,
    };
    inside(cidr) && !except.iter().any(inside)
}

fn peer_matches(peer: &Peer, view: &View<'_>) -> bool {
    let addr = view.peer_addr;
    match peer {
        Peer::Pods { namespaces, pods } => pods_holding(view, addr).into_iter().any(|pod| {
            let namespace_ok = match namespaces {
                NamespaceScope::Named(name) => pod.namespace == *name,
                NamespaceScope::Selector(s) => namespace_selected(view.cluster, &pod.namespace, s),
            };
            namespace_ok && selector_selects(pods, &pod.labels)
        }),
        Peer::IpBlock { cidr, except } => in_block(addr, cidr, except),
        Peer::Nodes(selector) => {
            view.cluster.nodes.values().any(|node| {
                node.addresses.contains(&addr) && selector_selects(selector, &node.labels)
            })
        }
        Peer::Nothing => false,
    }
}

/// Whether `port` is a number the container port name stands for on `pod`. Names are
/// unique within a container, not a pod (as the apiserver checks), so two containers may
/// give one name two numbers: the name means each of them. Host-network pods resolve no
/// names.
fn names_port(pod: &Pod, name: &str, protocol: Protocol, port: u16) -> bool {
    if pod.host_network {
        return false;
    }
    pod.ports.iter().any(|declared| {
        declared.protocol == protocol
            && declared.name.as_deref() == Some(name)
            && declared.port == port
    })
}

fn port_matches(rule: &PortRule, view: &View<'_>) -> bool {
    if rule.protocol != view.protocol {
        return false;
    }
    match &rule.port {
        PortSpec::Any => true,
        PortSpec::Range { start, end } => (*start..=*end).contains(&view.port),
        // The name is the destination pod's: for ingress that is the subject; for egress,
        // whichever pod holds the destination address.
        PortSpec::Named(name) => {
            let destinations = match view.direction {
                Direction::Ingress => vec![view.subject],
                Direction::Egress => pods_holding(view, view.dst_addr),
            };
            destinations
                .into_iter()
                .any(|pod| names_port(pod, name, view.protocol, view.port))
        }
    }
}
