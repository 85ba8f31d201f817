//! Flows and the decisions about them, shared by the reference evaluator and the matcher of
//! compiled rule sets so that the two can be compared field by field.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{
    Action, Cluster, Direction, Family, Pod, PodKey, PolicyId, Protocol, RuleOrigin,
};

/// A new connection (TCP, SCTP) or a datagram (UDP) from one pod to another's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub src: PodKey,
    pub dst: PodKey,
    pub protocol: Protocol,
    pub port: u16,
    pub family: Family,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{} ({:?})",
            self.src, self.dst, self.protocol, self.port, self.family
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("no pod {0}")]
    NoSuchPod(PodKey),
    #[error("pod {pod} has no {family:?} address")]
    NoAddress { pod: PodKey, family: Family },
}

/// Both ends of a flow, looked up in the cluster.
pub struct Endpoints<'a> {
    pub src: &'a Pod,
    pub dst: &'a Pod,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
}

impl Flow {
    pub fn endpoints<'a>(&self, cluster: &'a Cluster) -> Result<Endpoints<'a>, FlowError> {
        let find = |key: &PodKey| {
            cluster
                .pods
                .get(key)
                .ok_or_else(|| FlowError::NoSuchPod(key.clone()))
        };
        let (src, dst) = (find(&self.src)?, find(&self.dst)?);
        let addr = |pod: &Pod| {
            pod.ip_of(self.family).ok_or_else(|| FlowError::NoAddress {
                pod: pod.key(),
                family: self.family,
            })
        };
        Ok(Endpoints {
            src,
            dst,
            src_addr: addr(src)?,
            dst_addr: addr(dst)?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one direction of a flow got its verdict.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// A rule matched and its action decided (Allow or Deny).
    Rule(RuleOrigin),
    /// NetworkPolicies isolate the pod in this direction and none of their rules matched.
    DefaultDeny { isolated_by: Vec<PolicyId> },
    /// No policy decided: not isolated by any NetworkPolicy and no tiered rule matched.
    NotIsolated,
    /// Host-network pods are never subjects of policy.
    HostNetwork,
    /// Traffic from the destination pod's own node is always allowed (kubelet probes).
    NodeLocal,
    /// A pod's traffic to its own address never leaves its network namespace: no
    /// enforcement point sees it, and it is always allowed.
    ToItself,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirectionDecision {
    pub direction: Direction,
    pub verdict: Verdict,
    pub reason: Reason,
    /// Rules whose `Pass` handed the decision on to a later tier, in order.
    pub passed: Vec<RuleOrigin>,
}

impl fmt::Display for DirectionDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.direction, self.verdict)?;
        match &self.reason {
            Reason::Rule(origin) => write!(f, "by {origin}")?,
            Reason::DefaultDeny { isolated_by } => {
                let names: Vec<String> = isolated_by.iter().map(|p| p.to_string()).collect();
                write!(f, "no rule allows it; isolated by {}", names.join(", "))?
            }
            Reason::NotIsolated => {
                f.write_str("no policy decides; the pod is not isolated in this direction")?
            }
            Reason::HostNetwork => f.write_str("host-network pods are not subject to policy")?,
            Reason::NodeLocal => {
                f.write_str("traffic from the pod's own node is always allowed")?
            }
            Reason::ToItself => f.write_str("a pod's traffic to itself is always allowed")?,
        }
        for p in &self.passed {
            write!(f, "; passed on by {p}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowDecision {
    pub verdict: Verdict,
    pub egress: DirectionDecision,
    pub ingress: DirectionDecision,
}

impl FlowDecision {
    pub fn new(egress: DirectionDecision, ingress: DirectionDecision) -> Self {
        let verdict = if egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        FlowDecision {
            verdict,
            egress,
            ingress,
        }
    }
}

impl fmt::Display for FlowDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.verdict)?;
        writeln!(f, "  {}", self.egress)?;
        write!(f, "  {}", self.ingress)
    }
}

/// A flow under audit: the decision enforced (the policies in `enforce` mode) and the one
/// that would be (every policy). Traffic passes on `enforced`; where it passes and `would`
/// denies, it is reported as "would deny" by the direction that would deny it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditDecision {
    pub enforced: FlowDecision,
    pub would: FlowDecision,
}

impl AuditDecision {
    /// Whether the flow passes and audit would deny it.
    pub fn would_deny(&self) -> bool {
        self.enforced.verdict == Verdict::Allow && self.would.verdict == Verdict::Deny
    }

    /// Whether the two verdicts differ in anything (verdict or reason).
    pub fn differs(&self) -> bool {
        self.enforced != self.would
    }
}

/// The decision for a direction that policy does not govern.
pub fn exempt(direction: Direction, reason: Reason) -> DirectionDecision {
    DirectionDecision {
        direction,
        verdict: Verdict::Allow,
        reason,
        passed: Vec::new(),
    }
}

/// What an action means once a rule matched.
pub fn verdict_of(action: Action) -> Option<Verdict> {
    match action {
        Action::Allow => Some(Verdict::Allow),
        Action::Deny => Some(Verdict::Deny),
        Action::Pass => None,
    }
}

/// The exemptions both the evaluator and the compiled matcher apply before looking at rules:
/// a pod may always reach itself, host-network pods are never subjects, and a pod's own node
/// may always reach it.
pub fn exemption(endpoints: &Endpoints<'_>, direction: Direction) -> Option<DirectionDecision> {
    if endpoints.src.key() == endpoints.dst.key() {
        return Some(exempt(direction, Reason::ToItself));
    }
    match direction {
        Direction::Egress if endpoints.src.host_network => {
            Some(exempt(direction, Reason::HostNetwork))
        }
        Direction::Ingress if endpoints.dst.host_network => {
            Some(exempt(direction, Reason::HostNetwork))
        }
        Direction::Ingress
            if endpoints.src.host_network && endpoints.src.node == endpoints.dst.node =>
        {
            Some(exempt(direction, Reason::NodeLocal))
        }
        _ => None,
    }
}
