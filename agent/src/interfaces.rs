//! Finding each local pod's host-side interface with rtnetlink: the interface of the host
//! route to the pod's address (`POD_IP/32 dev VETH`, `POD_IP6/128 dev VETH`, see the lab
//! topology in docs/design.md), and following link and route events so that a pod that
//! appears or moves is enforced as soon as its interface exists.
//!
//! On every event the routes and links are dumped again (small tables, and no partial
//! state to keep right); [`pod_interfaces`] then maps pods to interfaces, purely.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::stream::{Stream, StreamExt, TryStreamExt};
use palisade_policy::model::PodKey;
use palisade_policy::ruleset::NodeRuleSet;
use rtnetlink::constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK};
use rtnetlink::packet_route::address::AddressScope;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{new_connection, Handle, RouteMessageBuilder};

use crate::render::Interfaces;

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink request failed: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

/// Host routes (`/32`, `/128`, unicast) to the interface they leave by.
pub type HostRoutes = BTreeMap<IpAddr, Route>;

/// Where a host route leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub ifname: String,
    /// Whether the interface can be a pod's: a veth whose peer is in another network
    /// namespace, with no address beyond link scope, that no default route leaves by. A
    /// stale route to the node's uplink or underlay must never bind it as a pod's
    /// interface: every packet from off the node would then be dropped as spoofed.
    pub pod_veth: bool,
}

/// Pods whose host route led to an interface that is not a pod veth, at the last mapping
/// (`palisade_pod_interfaces_refused`).
pub static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// The pods' interfaces: the first of a pod's addresses with a host route decides. A route
/// to an interface that is not a pod veth binds nothing (the pod stays unenforced until
/// its route is right), with a warning, and is counted in [`REFUSED`].
pub fn pod_interfaces(rules: &NodeRuleSet, routes: &HostRoutes) -> Interfaces {
    let mut refused = 0;
    let map = rules
        .pods
        .iter()
        .filter_map(|pod| {
            let route = pod.ips.iter().find_map(|ip| routes.get(ip))?;
            if !route.pod_veth {
                refused += 1;
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), ifname = %route.ifname,
                    "the pod's host route leads to an interface that is not a pod veth (uplink, underlay, default route); not binding it");
                return None;
            }
            Some((PodKey::new(&pod.namespace, &pod.name), route.ifname.clone()))
        })
        .collect();
    REFUSED.store(refused, Ordering::Relaxed);
    map
}

/// A netlink handle for dumps in the current network namespace. Must be created inside a
/// tokio runtime.
pub struct Discovery {
    handle: Handle,
}

impl Discovery {
    pub fn new() -> Result<Discovery, InterfaceError> {
        let (connection, handle, _) = new_connection()?;
        tokio::spawn(connection);
        Ok(Discovery { handle })
    }

    /// Every host route of the namespace with its interface and whether that can be a
    /// pod's ([`Route::pod_veth`]).
    pub async fn host_routes(&self) -> Result<HostRoutes, InterfaceError> {
        // Interface index → (name, veth with its peer in another namespace).
        let mut names: BTreeMap<u32, (String, bool)> = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await? {
            let (mut name, mut veth, mut peer_elsewhere) = (None, false, false);
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkInfo(infos) => {
                        veth |= infos
                            .iter()
                            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                    }
                    LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
                    _ => {}
                }
            }
            if let Some(name) = name {
                names.insert(link.header.index, (name, veth && peer_elsewhere));
            }
        }
        // Interfaces that carry an address beyond link scope (the node's own: uplink,
        // underlay) or a default route cannot be pods'.
        let mut not_pods: BTreeSet<u32> = BTreeSet::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(addr) = addrs.try_next().await? {
            if !matches!(addr.header.scope, AddressScope::Link | AddressScope::Host) {
                not_pods.insert(addr.header.index);
            }
        }
        // Default routes come in the same dump, after some host routes: decide at the end.
        let mut host: BTreeMap<IpAddr, u32> = BTreeMap::new();
        let requests = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for request in requests {
            let mut stream = self.handle.route().get(request).execute();
            while let Some(route) = stream.try_next().await? {
                let full = match route.header.address_family {
                    rtnetlink::packet_route::AddressFamily::Inet => 32,
                    rtnetlink::packet_route::AddressFamily::Inet6 => 128,
                    _ => continue,
                };
                if route.header.kind != RouteType::Unicast {
                    continue;
                }
                if route.header.destination_prefix_length == 0 {
                    for attr in &route.attributes {
                        if let RouteAttribute::Oif(i) = attr {
                            not_pods.insert(*i);
                        }
                    }
                    continue;
                }
                if route.header.destination_prefix_length != full {
                    continue;
                }
                let (mut dst, mut oif) = (None, None);
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                            dst = Some(IpAddr::V4(*a))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                            dst = Some(IpAddr::V6(*a))
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                if let (Some(dst), Some(oif)) = (dst, oif) {
                    host.entry(dst).or_insert(oif);
                }
            }
        }
        Ok(host
            .into_iter()
            .filter_map(|(dst, oif)| {
                let (ifname, veth) = names.get(&oif)?;
                let route = Route {
                    ifname: ifname.clone(),
                    pod_veth: *veth && !not_pods.contains(&oif),
                };
                Some((dst, route))
            })
            .collect())
    }
}

impl Discovery {
    /// Every address of the namespace: the node's own, whose traffic to its pods never
    /// meets the table.
    pub async fn local_addresses(&self) -> Result<BTreeSet<IpAddr>, InterfaceError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = BTreeSet::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(addr) = addrs.try_next().await? {
            for attr in &addr.attributes {
                if let AddressAttribute::Address(a) | AddressAttribute::Local(a) = attr {
                    out.insert(*a);
                }
            }
        }
        Ok(out)
    }
}

/// A stream that yields once per link or route event (added, removed, changed) in the
/// current network namespace. Must be created inside a tokio runtime.
pub fn events() -> Result<impl Stream<Item = ()>, InterfaceError> {
    let (mut connection, _, messages) = new_connection()?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))?;
    tokio::spawn(connection);
    Ok(messages.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::ruleset::PodRules;

    #[test]
    fn pods_map_to_the_interface_of_their_host_route() {
        let pod = |name: &str, ips: &[&str]| PodRules {
            namespace: "ns".into(),
            name: name.into(),
            ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
            ingress: Default::default(),
            egress: Default::default(),
            audit: Default::default(),
        };
        let rules = NodeRuleSet {
            pods: vec![
                pod("a", &["10.0.0.2", "fd00::2"]),
                pod("b", &["10.0.0.3"]),
                pod("v6only", &["fd00::4"]),
                pod("stale", &["10.0.0.9"]),
            ],
            ..NodeRuleSet::default()
        };
        let routes: HostRoutes = [
            ("10.0.0.2", "veth-a"),
            ("fd00::2", "veth-a"),
            ("fd00::4", "veth-c"),
            ("10.0.0.9", "uplink"),
        ]
        .into_iter()
        .map(|(a, n)| {
            let route = Route {
                ifname: n.to_string(),
                pod_veth: n != "uplink",
            };
            (a.parse().unwrap(), route)
        })
        .collect();
        let m = pod_interfaces(&rules, &routes);
        assert_eq!(
            m.get(&PodKey::new("ns", "a")).map(String::as_str),
            Some("veth-a")
        );
        assert_eq!(
            m.get(&PodKey::new("ns", "b")),
            None,
            "no route, no interface"
        );
        assert_eq!(
            m.get(&PodKey::new("ns", "v6only")).map(String::as_str),
            Some("veth-c")
        );
        assert_eq!(
            m.get(&PodKey::new("ns", "stale")),
            None,
            "a route to the uplink binds nothing"
        );
        assert_eq!(REFUSED.load(Ordering::Relaxed), 1);
    }
}
