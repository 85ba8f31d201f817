//! Finding each local pod's host-side interface with rtnetlink: the interface of the host
//! route to the pod's address (`POD_IP/32 dev VETH`, `POD_IP6/128 dev VETH`, see the lab
//! topology in docs/design.md), and following link and route events so that a pod that
//! appears or moves is enforced as soon as its interface exists.
//!
//! On every event the routes and links are dumped again (small tables, and no partial
//! state to keep right); [`pod_interfaces`] then maps pods to interfaces, purely.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::stream::{Stream, StreamExt, TryStreamExt};
use palisade_policy::model::PodKey;
use palisade_policy::ruleset::NodeRuleSet;
use rtnetlink::constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK};
use rtnetlink::packet_route::link::LinkAttribute;
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
pub type HostRoutes = BTreeMap<IpAddr, String>;

/// The pods' interfaces: the first of a pod's addresses with a host route decides.
pub fn pod_interfaces(rules: &NodeRuleSet, routes: &HostRoutes) -> Interfaces {
    rules
        .pods
        .iter()
        .filter_map(|pod| {
            let ifname = pod.ips.iter().find_map(|ip| routes.get(ip))?;
            Some((PodKey::new(&pod.namespace, &pod.name), ifname.clone()))
        })
        .collect()
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

    /// Every host route of the namespace with its interface name.
    pub async fn host_routes(&self) -> Result<HostRoutes, InterfaceError> {
        let mut names = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await? {
            for attr in &link.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.insert(link.header.index, name.clone());
                }
            }
        }
        let mut routes = HostRoutes::new();
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
                if route.header.kind != RouteType::Unicast
                    || route.header.destination_prefix_length != full
                {
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
                if let (Some(dst), Some(name)) = (dst, oif.and_then(|i| names.get(&i))) {
                    routes.entry(dst).or_insert_with(|| name.clone());
                }
            }
        }
        Ok(routes)
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
        };
        let rules = NodeRuleSet {
            pods: vec![
                pod("a", &["10.0.0.2", "fd00::2"]),
                pod("b", &["10.0.0.3"]),
                pod("v6only", &["fd00::4"]),
            ],
            ..NodeRuleSet::default()
        };
        let routes: HostRoutes = [
            ("10.0.0.2", "veth-a"),
            ("fd00::2", "veth-a"),
            ("fd00::4", "veth-c"),
        ]
        .into_iter()
        .map(|(a, n)| (a.parse().unwrap(), n.to_string()))
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
    }
}
