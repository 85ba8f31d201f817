//! The reference evaluator: a deliberately simple, direct reading of the specifications
//! (Kubernetes NetworkPolicy v1, and the Admin / Baseline tiers of ClusterNetworkPolicy,
//! AdminNetworkPolicy and BaselineAdminNetworkPolicy) and of the decisions in
//! `docs/design.md`.
//!
//! It shares nothing with the compiler but the model: it walks the policies for every flow,
//! so it is slow and obviously right, and the property tests hold the compiled rule sets to
//! it. Peers are matched by the address the dataplane sees (the source address for ingress,
//! the destination address for egress), never by pod identity, because that is all a packet
//! carries.

use std::net::IpAddr;

use crate::model::{
    Cluster, Direction, Labels, NamespaceScope, Peer, Pod, Policy, PortRule, PortSpec, Protocol,
    Rule, RuleOrigin, Subject, Tier,
};
use crate::selector::LabelSelector;
use crate::verdict::{
    exemption, verdict_of, DirectionDecision, Endpoints, Flow, FlowDecision, FlowError, Reason,
    Verdict,
};

/// The decision about `flow` under `policies` in `cluster`: egress at the source AND ingress
/// at the destination.
pub fn evaluate(
    cluster: &Cluster,
    policies: &[Policy],
    flow: &Flow,
) -> Result<FlowDecision, FlowError> {
    let ends = flow.endpoints(cluster)?;
    let side = |direction| {
        exemption(&ends, direction).unwrap_or_else(|| {
            let view = DirectionView::new(cluster, flow, &ends, direction);
            decide_direction(policies, &view)
        })
    };
    Ok(FlowDecision::new(
        side(Direction::Egress),
        side(Direction::Ingress),
    ))
}

/// One direction of a flow as the subject pod's enforcement point sees it.
struct DirectionView<'a> {
    cluster: &'a Cluster,
    direction: Direction,
    /// The pod whose policies decide this direction.
    subject: &'a Pod,
    /// The address at the other end: the source for ingress, the destination for egress.
    peer_addr: IpAddr,
    /// The destination address, where named ports are resolved.
    dst_addr: IpAddr,
    protocol: Protocol,
    port: u16,
}

impl<'a> DirectionView<'a> {
    fn new(cluster: &'a Cluster, flow: &Flow, ends: &Endpoints<'a>, direction: Direction) -> Self {
        let (subject, peer_addr) = match direction {
            Direction::Ingress => (ends.dst, ends.src_addr),
            Direction::Egress => (ends.src, ends.dst_addr),
        };
        DirectionView {
            cluster,
            direction,
            subject,
            peer_addr,
            dst_addr: ends.dst_addr,
            protocol: flow.protocol,
            port: flow.port,
        }
    }

    fn decided(
        &self,
        verdict: Verdict,
        reason: Reason,
        passed: Vec<RuleOrigin>,
    ) -> DirectionDecision {
        DirectionDecision {
            direction: self.direction,
            verdict,
            reason,
            passed,
        }
    }
}

fn decide_direction(policies: &[Policy], view: &DirectionView<'_>) -> DirectionDecision {
    let mut passed = Vec::new();

    // Admin tier: first matching rule decides; Pass skips the rest of the tier.
    if let Some((verdict, origin)) = first_tiered_match(policies, Tier::Admin, view, &mut passed) {
        return view.decided(verdict, Reason::Rule(origin), passed);
    }

    // NetworkPolicy tier: the union of the isolating policies' allow rules.
    let mut isolating: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.tier == Tier::NetworkPolicy)
        .filter(|p| p.isolates.get(view.direction) && selects(p, view.cluster, view.subject))
        .collect();
    if !isolating.is_empty() {
        isolating.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        for policy in &isolating {
            for (index, rule) in policy.rules(view.direction).iter().enumerate() {
                if rule_matches(rule, view) {
                    let origin = origin_of(policy, view.direction, index, rule);
                    return view.decided(Verdict::Allow, Reason::Rule(origin), passed);
                }
            }
        }
        let mut isolated_by: Vec<_> = isolating.iter().map(|p| p.id.clone()).collect();
        isolated_by.sort();
        isolated_by.dedup();
        return view.decided(Verdict::Deny, Reason::DefaultDeny { isolated_by }, passed);
    }

    // Baseline tier, only for pods no NetworkPolicy isolates.
    if let Some((verdict, origin)) = first_tiered_match(policies, Tier::Baseline, view, &mut passed)
    {
        return view.decided(verdict, Reason::Rule(origin), passed);
    }
    view.decided(Verdict::Allow, Reason::NotIsolated, passed)
}

/// The first rule of `tier` (policies by `order_key`, rules in written order) that matches
/// with a final action, unless a matching `Pass` rule ends the tier first (it is recorded in
/// `passed`).
fn first_tiered_match(
    policies: &[Policy],
    tier: Tier,
    view: &DirectionView<'_>,
    passed: &mut Vec<RuleOrigin>,
) -> Option<(Verdict, RuleOrigin)> {
    let mut in_tier: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.tier == tier && selects(p, view.cluster, view.subject))
        .collect();
    in_tier.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    for policy in in_tier {
        for (index, rule) in policy.rules(view.direction).iter().enumerate() {
            if !rule_matches(rule, view) {
                continue;
            }
            let origin = origin_of(policy, view.direction, index, rule);
            return match verdict_of(rule.action) {
                Some(verdict) => Some((verdict, origin)),
                None => {
                    passed.push(origin);
                    None
                }
            };
        }
    }
    None
}

fn origin_of(policy: &Policy, direction: Direction, index: usize, rule: &Rule) -> RuleOrigin {
    RuleOrigin {
        policy: policy.id.clone(),
        tier: policy.tier,
        priority: policy.priority,
        direction,
        index,
        name: rule.name.clone(),
    }
}

/// Whether the namespace's labels match; a namespace without an object has no labels.
fn namespace_selected(cluster: &Cluster, namespace: &str, selector: &LabelSelector) -> bool {
    match cluster.namespace_labels(namespace) {
        Some(labels) => selector.matches(labels),
        None => selector.matches(&Labels::new()),
    }
}

/// Whether `policy` applies to `pod`. Host-network pods are never subjects.
fn selects(policy: &Policy, cluster: &Cluster, pod: &Pod) -> bool {
    if pod.host_network {
        return false;
    }
    match &policy.subject {
        Subject::Namespace { namespace, pods } => {
            pod.namespace == *namespace && pods.matches(&pod.labels)
        }
        Subject::Cluster { namespaces, pods } => {
            namespace_selected(cluster, &pod.namespace, namespaces) && pods.matches(&pod.labels)
        }
    }
}

fn rule_matches(rule: &Rule, view: &DirectionView<'_>) -> bool {
    let peer_ok = match &rule.peers {
        None => true,
        Some(peers) => peers.iter().any(|p| peer_matches(p, view)),
    };
    let port_ok = match &rule.ports {
        None => true,
        Some(ports) => ports.iter().any(|p| port_matches(p, view)),
    };
    peer_ok && port_ok
}

/// The non-host-network pods holding `addr`: what a pod peer can be, seen from a packet.
fn pods_at(cluster: &Cluster, addr: IpAddr) -> impl Iterator<Item = &Pod> {
    cluster
        .pods
        .values()
        .filter(move |p| !p.host_network && p.ips.contains(&addr))
}

fn peer_matches(peer: &Peer, view: &DirectionView<'_>) -> bool {
    let addr = view.peer_addr;
    match peer {
        Peer::Pods { namespaces, pods } => pods_at(view.cluster, addr).any(|pod| {
            let in_scope = match namespaces {
                NamespaceScope::Named(name) => pod.namespace == *name,
                NamespaceScope::Selector(selector) => {
                    namespace_selected(view.cluster, &pod.namespace, selector)
                }
            };
            in_scope && pods.matches(&pod.labels)
        }),
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
        }
        Peer::Nodes(selector) => view
            .cluster
            .nodes
            .values()
            .any(|node| selector.matches(&node.labels) && node.addresses.contains(&addr)),
        Peer::Nothing => false,
    }
}

fn port_matches(rule: &PortRule, view: &DirectionView<'_>) -> bool {
    if rule.protocol != view.protocol {
        return false;
    }
    match &rule.port {
        PortSpec::Any => true,
        PortSpec::Range { start, end } => *start <= view.port && view.port <= *end,
        PortSpec::Named(name) => match view.direction {
            // Ingress: the subject is the destination.
            Direction::Ingress => {
                !view.subject.host_network
                    && view.subject.has_named_port(name, view.protocol, view.port)
            }
            // Egress: whichever pod holds the destination address; never a host-network one.
            Direction::Egress => pods_at(view.cluster, view.dst_addr)
                .any(|pod| pod.has_named_port(name, view.protocol, view.port)),
        },
    }
}

#[cfg(test)]
mod tests;
