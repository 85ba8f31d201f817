//! Both ends of a flow and the exemptions `docs/design.md` decides before any rule is
//! looked at. Written here rather than taken from `crate::verdict`, which the compiled side
//! uses.

use std::net::IpAddr;

use crate::model::{Cluster, Direction, Family, Pod, PodKey};
use crate::verdict::{DirectionDecision, Flow, FlowError, Reason, Verdict};

/// The pods at both ends and the addresses the packets carry.
pub(super) struct Ends<'a> {
    pub src: &'a Pod,
    pub dst: &'a Pod,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
}

fn same_key(pod: &Pod, key: &PodKey) -> bool {
    pod.namespace == key.namespace && pod.name == key.name
}

/// The pod's first address of the flow's family.
fn address(pod: &Pod, family: Family) -> Option<IpAddr> {
    pod.ips.iter().copied().find(|a| match family {
        Family::IPv4 => a.is_ipv4(),
        Family::IPv6 => a.is_ipv6(),
    })
}

/// Looks up the source, then the destination, then their addresses, reporting the first
/// that is missing.
pub(super) fn ends<'a>(cluster: &'a Cluster, flow: &Flow) -> Result<Ends<'a>, FlowError> {
    let find = |key: &PodKey| {
        cluster
            .pods
            .values()
            .find(|p| same_key(p, key))
            .ok_or_else(|| FlowError::NoSuchPod(key.clone()))
    };
    let src = find(&flow.src)?;
    let dst = find(&flow.dst)?;
    let addr = |pod: &Pod| {
        address(pod, flow.family).ok_or_else(|| FlowError::NoAddress {
            pod: PodKey::new(&pod.namespace, &pod.name),
            family: flow.family,
        })
    };
    Ok(Ends {
        src,
        dst,
        src_addr: addr(src)?,
        dst_addr: addr(dst)?,
    })
}

fn allowed(direction: Direction, reason: Reason) -> DirectionDecision {
    DirectionDecision {
        direction,
        verdict: Verdict::Allow,
        reason,
        passed: Vec::new(),
    }
}

/// The decision for a direction that no policy governs, if this is one:
/// 1. a pod's traffic to itself never leaves its network namespace;
/// 2. host-network pods are never subjects: not of egress policy as a source, not of
///    ingress policy as a destination;
/// 3. a node (its host-network pods) may always reach the pods on that node: ingress of a
///    pod from a host-network pod of the same node (kubelet probes). The other way, a pod
///    to its own node, egress policy applies.
pub(super) fn exempt(ends: &Ends<'_>, direction: Direction) -> Option<DirectionDecision> {
    let (src, dst) = (ends.src, ends.dst);
    if src.namespace == dst.namespace && src.name == dst.name {
        return Some(allowed(direction, Reason::ToItself));
    }
    let subject = match direction {
        Direction::Egress => src,
        Direction::Ingress => dst,
    };
    if subject.host_network {
        return Some(allowed(direction, Reason::HostNetwork));
    }
    let from_own_node = src.host_network && src.node == dst.node;
    if direction == Direction::Ingress && from_own_node {
        return Some(allowed(direction, Reason::NodeLocal));
    }
    None
}
