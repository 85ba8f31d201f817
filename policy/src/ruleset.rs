//! The compiled form: what one node's agent needs for its local pods.
//!
//! A node rule set names its local pods with their addresses and, per pod and direction,
//! the ordered rule instances of each tier. Peers are referenced by address-group id; the
//! groups themselves are shared between rules, pods and nodes, and a node carries only the
//! groups its rules reference. Ids are derived from content, so the same input always gives
//! the same ids and a small change gives a small diff.
//!
//! [`DirectionRules::decide`] matches a packet the way the agent's nftables chains do; the
//! property tests compare it with the reference evaluator.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::addrset::AddrSet;
use crate::model::{Action, Cluster, Direction, PolicyId, Protocol, RuleOrigin, Tier};
use crate::verdict::{
    exemption, verdict_of, AuditDecision, DirectionDecision, Flow, FlowDecision, FlowError, Reason,
    Verdict,
};

/// `g-` and 16 hex digits of a hash of the group's definition.
pub type GroupId = String;
/// `r-` and 16 hex digits of a hash of the rule's origin.
pub type RuleId = String;
/// `l-` and 16 hex digits of a hash of the list's instances.
pub type ListId = String;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.protocol == protocol && self.start <= port && port <= self.end
    }
}

/// A (destination address, protocol, port) triple: an egress named port resolved on one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortEndpoint {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Group {
    /// Peer address ranges: CIDRs less their exceptions (`ipBlock`, `networks`).
    Addresses(AddrSet),
    /// Individual host addresses: pods' and nodes' addresses. The set is spelled as merged
    /// ranges for compactness, but every address in it is a member in its own right, so an
    /// enforcer may store them as single elements (a hash set rather than an interval set).
    Hosts(AddrSet),
    /// Pod addresses with the port a name means on that pod: egress rules to named ports.
    NamedPorts(BTreeSet<PortEndpoint>),
}

impl Group {
    pub fn len(&self) -> usize {
        match self {
            Group::Addresses(a) | Group::Hosts(a) => a.len(),
            Group::NamedPorts(e) => e.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One way a rule instance can match; a rule instance matches if any clause does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Clause {
    /// The peer's address is in one of `peers` (`None`: any address), and the protocol and
    /// port are in one of `ports` (`None`: any).
    PeerPort {
        peers: Option<Vec<GroupId>>,
        ports: Option<Vec<PortRange>>,
    },
    /// (peer address, protocol, port) is in the `NamedPorts` group.
    NamedPort { group: GroupId },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleInstance {
    pub rule: RuleId,
    pub action: Action,
    pub clauses: Vec<Clause>,
}

/// An Admin or Baseline tier's rule instances for the pods that the same tiered policies
/// select alike. Many pods share one list, so it has an id of its own (derived from its
/// content): the stream sends a list once per node and the agent renders it as one chain.
/// Serialized as the plain sequence of its instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierList {
    id: ListId,
    instances: Vec<RuleInstance>,
}

impl TierList {
    pub fn new(instances: Vec<RuleInstance>) -> Self {
        TierList {
            id: list_id(&instances),
            instances,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn instances(&self) -> &[RuleInstance] {
        &self.instances
    }
}

impl Default for TierList {
    fn default() -> Self {
        TierList::new(Vec::new())
    }
}

impl From<Vec<RuleInstance>> for TierList {
    fn from(instances: Vec<RuleInstance>) -> Self {
        TierList::new(instances)
    }
}

impl std::ops::Deref for TierList {
    type Target = [RuleInstance];

    fn deref(&self) -> &[RuleInstance] {
        &self.instances
    }
}

impl Serialize for TierList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.instances.serialize(s)
    }
}

impl<'de> Deserialize<'de> for TierList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<RuleInstance>::deserialize(d).map(TierList::new)
    }
}

/// FNV-1a over every field of the instances, each field closed by a byte that no field
/// contains (ids are ASCII), so different lists cannot stream the same bytes. Public ids
/// (chain names, the stream) need a hash that is stable across runs, builds and platforms.
fn list_id(instances: &[RuleInstance]) -> ListId {
    use crate::compile::stable_hash::{hex_id, Fnv};
    fn field(h: &mut Fnv, b: &[u8]) {
        h.bytes(b);
        h.bytes(&[0xff]);
    }
    let mut h = Fnv::new();
    for inst in instances {
        field(&mut h, inst.rule.as_bytes());
        field(&mut h, inst.action.as_str().as_bytes());
        for clause in &inst.clauses {
            match clause {
                Clause::PeerPort { peers, ports } => {
                    field(&mut h, b"peer-port");
                    match peers {
                        None => field(&mut h, b"any-peer"),
                        Some(ids) => {
                            for id in ids {
                                field(&mut h, id.as_bytes());
                            }
                            field(&mut h, b"peers-end");
                        }
                    }
                    match ports {
                        None => field(&mut h, b"any-port"),
                        Some(ranges) => {
                            for r in ranges {
                                h.bytes(r.protocol.as_str().as_bytes());
                                h.bytes(&r.start.to_le_bytes());
                                field(&mut h, &r.end.to_le_bytes());
                            }
                            field(&mut h, b"ports-end");
                        }
                    }
                }
                Clause::NamedPort { group } => {
                    field(&mut h, b"named-port");
                    field(&mut h, group.as_bytes());
                }
            }
        }
        field(&mut h, b"instance-end");
    }
    hex_id("l-", h.finish())
}

/// The rules that govern one direction of one pod, in evaluation order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectionRules {
    /// Admin tier, by priority then written order; first match decides (or passes).
    /// Shared (like `baseline`) between every pod that the same tiered policies select
    /// with the same facts (named ports), whatever its namespace or node.
    pub admin: Arc<TierList>,
    /// The NetworkPolicies that isolate the pod in this direction; empty: not isolated, and
    /// the Baseline tier decides.
    pub isolated_by: Vec<PolicyId>,
    /// Allow rules of the isolating NetworkPolicies (any match allows).
    pub network_policy: Vec<RuleInstance>,
    /// Baseline tier, consulted only when the pod is not isolated.
    pub baseline: Arc<TierList>,
}

impl TierList {
    /// The empty list, shared: most pods have one in some tier, and making it anew would
    /// cost an allocation and a hash each.
    pub fn empty() -> Arc<TierList> {
        static EMPTY: std::sync::LazyLock<Arc<TierList>> =
            std::sync::LazyLock::new(|| Arc::new(TierList::new(Vec::new())));
        EMPTY.clone()
    }
}

impl Default for DirectionRules {
    fn default() -> Self {
        DirectionRules {
            admin: TierList::empty(),
            isolated_by: Vec::new(),
            network_policy: Vec::new(),
            baseline: TierList::empty(),
        }
    }
}

impl DirectionRules {
    pub fn is_empty(&self) -> bool {
        self.admin.is_empty() && self.isolated_by.is_empty() && self.baseline.is_empty()
    }

    pub fn instances(&self) -> impl Iterator<Item = &RuleInstance> {
        self.admin
            .iter()
            .chain(&self.network_policy)
            .chain(self.baseline.iter())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRules {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Shared between the pods whose policies mean the same for them (a namespace's pods
    /// with equal labels and ports), so a node's rule set costs a count per pod, not a copy.
    pub ingress: Arc<DirectionRules>,
    pub egress: Arc<DirectionRules>,
    /// The full view (policies in audit included) of the directions where it differs from
    /// the enforced rules above; empty when no policy in audit changes this pod.
    #[serde(default, skip_serializing_if = "AuditRules::is_empty")]
    pub audit: AuditRules,
}

impl PodRules {
    pub fn direction(&self, direction: Direction) -> &DirectionRules {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The rules that decide what would be: the audit list where there is one, else the
    /// enforced rules.
    pub fn would(&self, direction: Direction) -> &DirectionRules {
        self.audit
            .direction(direction)
            .unwrap_or_else(|| self.direction(direction))
    }
}

/// Per direction, the rules of every policy, audit mode included, where they differ from
/// the enforced ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Arc<DirectionRules>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Arc<DirectionRules>>,
}

impl AuditRules {
    pub fn is_empty(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }

    pub fn direction(&self, direction: Direction) -> Option<&DirectionRules> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// Everything one node's agent enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRuleSet {
    pub node: String,
    /// The node's own addresses.
    pub node_addresses: Vec<IpAddr>,
    /// Local, non-host-network pods, sorted by namespace and name.
    pub pods: Vec<PodRules>,
    /// Every group a rule instance of this node references.
    pub groups: BTreeMap<GroupId, Arc<Group>>,
    /// Every rule a rule instance of this node references, with its origin. Shared: a
    /// node's 10,000 origins mostly stay from one update to the next, and a consumer that
    /// keeps the last ones tells them unchanged by pointer.
    pub rules: Arc<BTreeMap<RuleId, RuleOrigin>>,
}

impl NodeRuleSet {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodRules> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}

/// Packet-level matching, as the agent's chains do it.
pub struct Matcher<'a> {
    pub groups: &'a BTreeMap<GroupId, Arc<Group>>,
    pub rules: &'a BTreeMap<RuleId, RuleOrigin>,
}

impl Matcher<'_> {
    fn in_group(&self, id: &GroupId, peer: IpAddr) -> bool {
        matches!(self.groups.get(id).map(|g| &**g), Some(Group::Addresses(set) | Group::Hosts(set)) if set.contains(peer))
    }

    pub fn clause_matches(
        &self,
        clause: &Clause,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        match clause {
            Clause::PeerPort { peers, ports } => {
                peers
                    .as_ref()
                    .is_none_or(|ids| ids.iter().any(|id| self.in_group(id, peer)))
                    && ports
                        .as_ref()
                        .is_none_or(|r| r.iter().any(|r| r.contains(protocol, port)))
            }
            Clause::NamedPort { group } => matches!(
                self.groups.get(group).map(|g| &**g),
                Some(Group::NamedPorts(e)) if e.contains(&PortEndpoint { addr: peer, protocol, port })
            ),
        }
    }

    pub fn instance_matches(
        &self,
        instance: &RuleInstance,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        instance
            .clauses
            .iter()
            .any(|c| self.clause_matches(c, peer, protocol, port))
    }

    fn origin(&self, id: &RuleId) -> RuleOrigin {
        self.rules.get(id).cloned().unwrap_or_else(|| RuleOrigin {
            policy: PolicyId {
                kind: crate::model::PolicyKind::NetworkPolicy,
                namespace: None,
                name: id.clone(),
            },
            tier: Tier::NetworkPolicy,
            priority: 0,
            direction: Direction::Ingress,
            index: 0,
            name: None,
        })
    }

    /// The decision for one direction of one pod, given the address at the other end.
    pub fn decide(
        &self,
        rules: &DirectionRules,
        direction: Direction,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> DirectionDecision {
        let mut passed = Vec::new();
        let decided = |verdict, reason, passed| DirectionDecision {
            direction,
            verdict,
            reason,
            passed,
        };
        for inst in rules.admin.iter() {
            if self.instance_matches(inst, peer, protocol, port) {
                match verdict_of(inst.action) {
                    Some(v) => return decided(v, Reason::Rule(self.origin(&inst.rule)), passed),
                    None => {
                        passed.push(self.origin(&inst.rule));
                        break;
                    }
                }
            }
        }
        if !rules.isolated_by.is_empty() {
            return match rules
                .network_policy
                .iter()
                .find(|i| self.instance_matches(i, peer, protocol, port))
            {
                Some(inst) => decided(
                    Verdict::Allow,
                    Reason::Rule(self.origin(&inst.rule)),
                    passed,
                ),
                None => decided(
                    Verdict::Deny,
                    Reason::DefaultDeny {
                        isolated_by: rules.isolated_by.clone(),
                    },
                    passed,
                ),
            };
        }
        for inst in rules.baseline.iter() {
            if self.instance_matches(inst, peer, protocol, port) {
                match verdict_of(inst.action) {
                    Some(v) => return decided(v, Reason::Rule(self.origin(&inst.rule)), passed),
                    None => {
                        passed.push(self.origin(&inst.rule));
                        break;
                    }
                }
            }
        }
        decided(Verdict::Allow, Reason::NotIsolated, passed)
    }
}

/// Decides a flow from compiled node rule sets, the way the agents on the source's and the
/// destination's nodes would.
pub fn decide_flow(
    cluster: &Cluster,
    rule_sets: &BTreeMap<String, NodeRuleSet>,
    flow: &Flow,
) -> Result<FlowDecision, FlowError> {
    decide_flow_with(cluster, rule_sets, flow, PodRules::direction)
}

/// Both verdicts of a flow from compiled rule sets with audit lists: what the enforced
/// rules decide, and what the full view (the audit lists where present) would.
pub fn decide_flow_audit(
    cluster: &Cluster,
    rule_sets: &BTreeMap<String, NodeRuleSet>,
    flow: &Flow,
) -> Result<AuditDecision, FlowError> {
    Ok(AuditDecision {
        enforced: decide_flow_with(cluster, rule_sets, flow, PodRules::direction)?,
        would: decide_flow_with(cluster, rule_sets, flow, PodRules::would)?,
    })
}

fn decide_flow_with(
    cluster: &Cluster,
    rule_sets: &BTreeMap<String, NodeRuleSet>,
    flow: &Flow,
    view: fn(&PodRules, Direction) -> &DirectionRules,
) -> Result<FlowDecision, FlowError> {
    let ends = flow.endpoints(cluster)?;
    let side = |direction: Direction| {
        if let Some(d) = exemption(&ends, direction) {
            return d;
        }
        let (pod, peer) = match direction {
            Direction::Egress => (ends.src, ends.dst_addr),
            Direction::Ingress => (ends.dst, ends.src_addr),
        };
        let Some(set) = rule_sets.get(&pod.node) else {
            return crate::verdict::exempt(direction, Reason::NotIsolated);
        };
        let Some(rules) = set.pod(&pod.namespace, &pod.name) else {
            return crate::verdict::exempt(direction, Reason::NotIsolated);
        };
        let matcher = Matcher {
            groups: &set.groups,
            rules: &set.rules,
        };
        matcher.decide(
            view(rules, direction),
            direction,
            peer,
            flow.protocol,
            flow.port,
        )
    };
    Ok(FlowDecision::new(
        side(Direction::Egress),
        side(Direction::Ingress),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(rule: &str, action: Action, port: u16) -> RuleInstance {
        RuleInstance {
            rule: rule.to_string(),
            action,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec!["g-0000000000000001".into()]),
                ports: Some(vec![PortRange {
                    protocol: Protocol::Tcp,
                    start: port,
                    end: port,
                }]),
            }],
        }
    }

    /// List ids name agents' chains and cross the stream between builds of different
    /// versions: the same list must get the same id everywhere, so the value is pinned.
    #[test]
    fn list_ids_are_pinned_and_follow_content() {
        let a = instance("r-0000000000000001", Action::Allow, 80);
        let b = instance("r-0000000000000002", Action::Deny, 80);
        let list = TierList::new(vec![a.clone(), b.clone()]);
        // FNV-1a of the byte stream `list_id` documents, computed apart from this code.
        assert_eq!(list.id(), "l-813a9356d8c88905");
        let others = [
            TierList::new(vec![b.clone(), a.clone()]),
            TierList::new(vec![a.clone()]),
            TierList::new(vec![
                a.clone(),
                instance("r-0000000000000002", Action::Pass, 80),
            ]),
            TierList::new(vec![
                a.clone(),
                instance("r-0000000000000002", Action::Deny, 81),
            ]),
            TierList::default(),
        ];
        for other in &others {
            assert_ne!(other.id(), list.id(), "{other:?}");
        }
        let mut any_peer = a.clone();
        any_peer.clauses = vec![Clause::PeerPort {
            peers: None,
            ports: None,
        }];
        let mut named = a;
        named.clauses = vec![Clause::NamedPort {
            group: "g-0000000000000001".into(),
        }];
        assert_ne!(
            TierList::new(vec![any_peer]).id(),
            TierList::new(vec![named]).id()
        );
    }

    #[test]
    fn a_list_serializes_as_its_instances() {
        let list = TierList::new(vec![instance("r-0000000000000001", Action::Allow, 80)]);
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json, serde_json::to_value(list.instances()).unwrap());
        let back: TierList = serde_json::from_value(json).unwrap();
        assert_eq!(back, list);
        assert_eq!(back.id(), list.id());
    }
}
