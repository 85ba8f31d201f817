//! The compact internal model of cluster state and policies.
//!
//! Objects are converted into these types at the boundary (see the `palisade-resources`
//! crate), keeping only the fields that change what the policies mean, so that churn in
//! anything else (pod status, annotations) compares equal and is a no-op.
//!
//! The model is already validated: every value here is in range (ports 1..=65535, port ranges
//! ordered, CIDRs parsed). Validation errors are the boundary's business.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;

pub use crate::labels::Labels;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IANA protocol number, as nftables' `meta l4proto` sees it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    IPv4,
    IPv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::IPv4,
            IpAddr::V6(_) => Family::IPv6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// The node the pod runs on. Always set in the model: the boundary places unscheduled
    /// pods (or leaves them out, for a live cluster, until they are scheduled).
    pub node: String,
    /// The pod's addresses, one per family at most. For a host-network pod these are its
    /// node's addresses.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }

    /// The port numbers a named port means on this pod, for one protocol: port names are
    /// unique within a container, not within a pod, so two containers may give one name
    /// two numbers, and the name means all of them.
    pub fn named_ports<'a>(
        &'a self,
        name: &'a str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.ports
            .iter()
            .filter(move |p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    /// The first number the named port means on this pod (what a probe or `explain` naming
    /// the port tries).
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports(name, protocol).next()
    }

    /// Whether `port` is one of the numbers the named port means on this pod.
    pub fn has_named_port(&self, name: &str, protocol: Protocol, port: u16) -> bool {
        self.named_ports(name, protocol).any(|p| p == port)
    }

    pub fn ip_of(&self, family: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|a| Family::of(a) == family)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// The node's `InternalIP` addresses (what host-network pods and the node itself use).
    pub addresses: Vec<IpAddr>,
}

/// The cluster state policies act on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<PodKey, Pod>,
    pub nodes: BTreeMap<String, Node>,
}

impl Cluster {
    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace).map(|n| &n.labels)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&PodKey::new(namespace, name))
    }
}

/// Which API object a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyKind {
    NetworkPolicy,
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            PolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            PolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Evaluation order per direction: Admin, then NetworkPolicy, then Baseline, then the
/// default (allow). The derived `Ord` follows that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    NetworkPolicy,
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::NetworkPolicy => "NetworkPolicy",
            Tier::Baseline => "Baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    /// Set for namespaced kinds (NetworkPolicy) only.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// The pods a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Subject {
    /// NetworkPolicy: pods of one namespace matching a selector.
    Namespace {
        namespace: String,
        pods: LabelSelector,
    },
    /// Cluster-scoped policies: pods matching `pods` in namespaces matching `namespaces`
    /// (`subject.namespaces: S` is `namespaces: S, pods: {}`).
    Cluster {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    /// NetworkPolicy rules, `Accept` (v1alpha2/v1beta1) and `Allow` (v1alpha1): final for
    /// this direction.
    Allow,
    Deny,
    /// Skip the rest of this tier; go on to the next one.
    Pass,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "Allow",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NamespaceScope {
    /// NetworkPolicy `podSelector` without `namespaceSelector`: the policy's own namespace.
    Named(String),
    Selector(LabelSelector),
}

/// Who is on the other end of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Peer {
    /// Non-host-network pods matching `pods` in the namespaces of `namespaces`, by their
    /// pod addresses.
    Pods {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    /// Any address in `cidr` and not in `except` (NetworkPolicy `ipBlock`, and one entry of
    /// a cluster policy's `networks`). Pod addresses match too.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
    /// The addresses of nodes matching the selector.
    Nodes(LabelSelector),
    /// Matches nothing: a peer that cannot be enforced (`domainNames`, or no known field),
    /// kept so that the rule fails closed instead of widening to "any peer".
    Nothing,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PortSpec {
    /// Every port of the protocol.
    Any,
    /// `start..=end` (a single port is `start == end`).
    Range { start: u16, end: u16 },
    /// A container port name, resolved per destination pod and protocol.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// The rule's name where the API has one (cluster policies); its origin otherwise is
    /// its index.
    pub name: Option<String>,
    pub action: Action,
    /// `None`: any peer. `Some(v)`: a peer matching any entry of `v` (an empty `v` matches
    /// nothing).
    pub peers: Option<Vec<Peer>>,
    /// `None`: any port and protocol. `Some(v)`: any entry of `v` (an empty `v` matches
    /// nothing).
    pub ports: Option<Vec<PortRule>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Isolation {
    pub ingress: bool,
    pub egress: bool,
}

impl Isolation {
    pub fn get(self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// A policy of any kind, in one shape. A NetworkPolicy is a policy of tier `NetworkPolicy`,
/// priority 0, whose rules are all `Allow` and which isolates its subjects in the
/// directions of its `policyTypes`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub id: PolicyId,
    pub tier: Tier,
    /// 0..=1000 for tiered policies, lower first; 0 for NetworkPolicies.
    pub priority: u32,
    pub subject: Subject,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// NetworkPolicy `policyTypes` (after defaulting). Unused by tiered policies.
    pub isolates: Isolation,
    /// The object's own `palisade.dev/enforcement` annotation, if it has one; otherwise
    /// its namespace's label (NetworkPolicies) or the cluster default decides
    /// ([`crate::compile::staged::enforcement_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
}

/// The annotation (on a policy object) and the Namespace label that set a policy's
/// enforcement mode.
pub const ENFORCEMENT_KEY: &str = "palisade.dev/enforcement";

/// Whether a policy's decisions are enforced, or only reported as what it would do.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Evaluated beside the enforced policies; what it would deny passes and is counted and
    /// logged as "would deny".
    Audit,
    #[default]
    Enforce,
}

impl Enforcement {
    /// `audit` or `enforce`, exactly as written; anything else is `None`.
    pub fn parse(value: &str) -> Option<Enforcement> {
        match value {
            "audit" => Some(Enforcement::Audit),
            "enforce" => Some(Enforcement::Enforce),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Audit => "audit",
            Enforcement::Enforce => "enforce",
        }
    }
}

impl std::str::FromStr for Enforcement {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        Enforcement::parse(value).ok_or_else(|| format!("{value:?}: audit or enforce"))
    }
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Whether the policy isolates its subjects in this direction (NetworkPolicy tier), or
    /// has rules for it (tiered policies).
    pub fn applies_to(&self, direction: Direction) -> bool {
        match self.tier {
            Tier::NetworkPolicy => self.isolates.get(direction),
            Tier::Admin | Tier::Baseline => !self.rules(direction).is_empty(),
        }
    }

    /// The deterministic order of tiered policies within a tier: priority, then kind, then
    /// name. Two policies of one tier and priority are thus ordered by name; the compiler
    /// warns about such pairs.
    pub fn order_key(&self) -> (Tier, u32, &PolicyId) {
        (self.tier, self.priority, &self.id)
    }
}

/// Where a rule came from, carried into the compiled form for attribution of hits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleOrigin {
    pub policy: PolicyId,
    pub tier: Tier,
    pub priority: u32,
    pub direction: Direction,
    pub index: usize,
    pub name: Option<String>,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        if self.tier != Tier::NetworkPolicy {
            write!(f, " tier {} priority {}", self.tier, self.priority)?;
        }
        Ok(())
    }
}
