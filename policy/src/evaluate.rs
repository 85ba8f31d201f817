//! The reference evaluator: a deliberately plain, direct reading of the specifications
//! (Kubernetes NetworkPolicy v1, and the Admin / Baseline tiers of ClusterNetworkPolicy,
//! AdminNetworkPolicy and BaselineAdminNetworkPolicy) and of the decisions in
//! `docs/design.md`.
//!
//! It shares nothing with the compiler but the model's plain data types: selector matching
//! (`selectors`), named ports and address blocks (`peers`), the exemptions (`ends`) and the
//! order of policies (`order`) are all written here, from the API documents, so that a bug
//! in the compiler's versions makes the agreement property fail instead of hiding on both
//! sides of it (`scripts/mutants.sh` checks this). It walks the policies for every flow, so
//! it is slow and obviously right. Peers are matched by the address the dataplane sees (the
//! source address for ingress, the destination address for egress), never by pod identity,
//! because that is all a packet carries.

mod ends;
mod modes;
mod order;
mod peers;
mod selectors;

use std::net::IpAddr;

use crate::model::{
    Action, Cluster, Direction, Enforcement, Pod, Policy, Protocol, Rule, RuleOrigin, Subject, Tier,
};
use crate::verdict::{
    AuditDecision, DirectionDecision, Flow, FlowDecision, FlowError, Reason, Verdict,
};
use ends::{ends, exempt, Ends};
use order::{evaluation_order, identity_order};
use peers::rule_matches;
use selectors::{namespace_selected, selector_selects};

/// The decision about `flow` under `policies` in `cluster`: egress at the source AND ingress
/// at the destination.
pub fn evaluate(
    cluster: &Cluster,
    policies: &[Policy],
    flow: &Flow,
) -> Result<FlowDecision, FlowError> {
    let ends = ends(cluster, flow)?;
    let side = |direction| {
        exempt(&ends, direction)
            .unwrap_or_else(|| decide(policies, &View::new(cluster, flow, &ends, direction)))
    };
    let egress = side(Direction::Egress);
    let ingress = side(Direction::Ingress);
    let both = egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow;
    Ok(FlowDecision {
        verdict: if both { Verdict::Allow } else { Verdict::Deny },
        egress,
        ingress,
    })
}

/// The decision about `flow` under audit: enforced (only the policies in `enforce` mode,
/// `default` for those that say nothing) and what would be (every policy).
pub fn evaluate_audit(
    cluster: &Cluster,
    policies: &[Policy],
    default: Enforcement,
    flow: &Flow,
) -> Result<AuditDecision, FlowError> {
    let enforced: Vec<Policy> = policies
        .iter()
        .filter(|p| modes::is_enforced(cluster, p, default))
        .cloned()
        .collect();
    Ok(AuditDecision {
        enforced: evaluate(cluster, &enforced, flow)?,
        would: evaluate(cluster, policies, flow)?,
    })
}

/// One direction of a flow as the subject pod's enforcement point sees it.
struct View<'a> {
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

impl<'a> View<'a> {
    fn new(cluster: &'a Cluster, flow: &Flow, ends: &Ends<'a>, direction: Direction) -> Self {
        let (subject, peer_addr) = match direction {
            Direction::Ingress => (ends.dst, ends.src_addr),
            Direction::Egress => (ends.src, ends.dst_addr),
        };
        View {
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

    fn rules_of<'p>(&self, policy: &'p Policy) -> &'p [Rule] {
        match self.direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        }
    }
}

/// What the first matching rule of a tier did.
enum TierOutcome {
    Decided(Verdict, RuleOrigin),
    /// A `Pass` rule matched: the rest of the tier is skipped.
    Passed(RuleOrigin),
    NoMatch,
}

fn decide(policies: &[Policy], view: &View<'_>) -> DirectionDecision {
    let mut passed = Vec::new();

    // Admin tier: the first matching rule decides, unless it passes.
    match tier_outcome(policies, Tier::Admin, view) {
        TierOutcome::Decided(verdict, origin) => {
            return view.decided(verdict, Reason::Rule(origin), passed)
        }
        TierOutcome::Passed(origin) => passed.push(origin),
        TierOutcome::NoMatch => {}
    }

    // NetworkPolicy tier: a pod selected by a policy of this direction's policyType is
    // isolated; then it is allowed exactly what some rule of those policies allows.
    let isolates = |p: &Policy| match view.direction {
        Direction::Ingress => p.isolates.ingress,
        Direction::Egress => p.isolates.egress,
    };
    let mut isolating: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.tier == Tier::NetworkPolicy && isolates(p) && subject_of(p, view))
        .collect();
    if !isolating.is_empty() {
        isolating.sort_by(|a, b| evaluation_order(a, b));
        for policy in &isolating {
            for (index, rule) in view.rules_of(policy).iter().enumerate() {
                if rule_matches(rule, view) {
                    let origin = origin(policy, view.direction, index, rule);
                    return view.decided(Verdict::Allow, Reason::Rule(origin), passed);
                }
            }
        }
        let mut isolated_by: Vec<_> = isolating.iter().map(|p| p.id.clone()).collect();
        isolated_by.sort_by(identity_order);
        isolated_by.dedup();
        return view.decided(Verdict::Deny, Reason::DefaultDeny { isolated_by }, passed);
    }

    // Baseline tier, for pods no NetworkPolicy isolates in this direction.
    match tier_outcome(policies, Tier::Baseline, view) {
        TierOutcome::Decided(verdict, origin) => {
            view.decided(verdict, Reason::Rule(origin), passed)
        }
        TierOutcome::Passed(origin) => {
            passed.push(origin);
            view.decided(Verdict::Allow, Reason::NotIsolated, passed)
        }
        TierOutcome::NoMatch => view.decided(Verdict::Allow, Reason::NotIsolated, passed),
    }
}

/// The first rule of `tier`, in evaluation order of the policies selecting the subject and
/// written order of their rules, that matches.
fn tier_outcome(policies: &[Policy], tier: Tier, view: &View<'_>) -> TierOutcome {
    let mut in_tier: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.tier == tier && subject_of(p, view))
        .collect();
    in_tier.sort_by(|a, b| evaluation_order(a, b));
    for policy in in_tier {
        for (index, rule) in view.rules_of(policy).iter().enumerate() {
            if rule_matches(rule, view) {
                let origin = origin(policy, view.direction, index, rule);
                return match rule.action {
                    Action::Allow => TierOutcome::Decided(Verdict::Allow, origin),
                    Action::Deny => TierOutcome::Decided(Verdict::Deny, origin),
                    Action::Pass => TierOutcome::Passed(origin),
                };
            }
        }
    }
    TierOutcome::NoMatch
}

fn origin(policy: &Policy, direction: Direction, index: usize, rule: &Rule) -> RuleOrigin {
    RuleOrigin {
        policy: policy.id.clone(),
        tier: policy.tier,
        priority: policy.priority,
        direction,
        index,
        name: rule.name.clone(),
    }
}

/// Whether `policy` applies to the view's subject pod. Host-network pods are never
/// subjects (the exemptions already took them out; this is the specification's rule too).
fn subject_of(policy: &Policy, view: &View<'_>) -> bool {
    let pod = view.subject;
    if pod.host_network {
        return false;
    }
    match &policy.subject {
        Subject::Namespace { namespace, pods } => {
            pod.namespace == *namespace && selector_selects(pods, &pod.labels)
        }
        Subject::Cluster { namespaces, pods } => {
            namespace_selected(view.cluster, &pod.namespace, namespaces)
                && selector_selects(pods, &pod.labels)
        }
    }
}

#[cfg(test)]
mod tests;
