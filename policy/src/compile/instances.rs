//! From policies to rule instances for one pod: which policies select it, and what each of
//! their rules means for it (named ports resolved on it for ingress).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{Direction, Labels, Pod, Policy, PortSpec, RuleOrigin, Subject};
use crate::ruleset::{Clause, GroupId, PortRange, RuleId, RuleInstance};

use super::groups::{group_id, GroupDef, GroupKey};
use super::stable_hash;

/// A policy with what can be worked out once, independent of any pod.
pub(crate) struct CompiledPolicy {
    pub policy: Policy,
    pub ingress: Vec<CompiledRule>,
    pub egress: Vec<CompiledRule>,
}

pub(crate) struct CompiledRule {
    pub id: RuleId,
    /// Shared with the compiler's table of origins.
    pub origin: Arc<RuleOrigin>,
    /// `None`: any peer; otherwise the groups of the peers that can match something, in
    /// id order.
    pub peers: Option<Vec<PeerGroup>>,
}

pub(crate) struct PeerGroup {
    pub def: Arc<GroupDef>,
    pub key: GroupKey,
    pub id: GroupId,
}

pub(crate) fn rule_id(origin: &RuleOrigin) -> RuleId {
    stable_hash::hex_id("r-", stable_hash::of_rule_origin(origin))
}

impl CompiledPolicy {
    /// `shared` gives the one instance of a group definition the compiler keeps for a key,
    /// so that equal peers of many policies cost one copy.
    pub(crate) fn new(
        policy: Policy,
        shared: &mut impl FnMut(GroupKey, GroupDef) -> Arc<GroupDef>,
    ) -> Self {
        let mut compile_dir = |direction: Direction| {
            policy
                .rules(direction)
                .iter()
                .enumerate()
                .map(|(index, rule)| {
                    let origin = RuleOrigin {
                        policy: policy.id.clone(),
                        tier: policy.tier,
                        priority: policy.priority,
                        direction,
                        index,
                        name: rule.name.clone(),
                    };
                    let peers = rule.peers.as_ref().map(|peers| {
                        let mut defs: Vec<PeerGroup> = peers
                            .iter()
                            .filter_map(GroupDef::of_peer)
                            .map(|d| {
                                let key = d.key();
                                PeerGroup {
                                    def: shared(key, d),
                                    key,
                                    id: group_id(key),
                                }
                            })
                            .collect();
                        // The fixed-width hex ids sort as their keys do.
                        defs.sort_by_key(|p| p.key);
                        defs.dedup_by_key(|p| p.key);
                        defs
                    });
                    CompiledRule {
                        id: rule_id(&origin),
                        origin: Arc::new(origin),
                        peers,
                    }
                })
                .collect()
        };
        let ingress = compile_dir(Direction::Ingress);
        let egress = compile_dir(Direction::Egress);
        CompiledPolicy {
            policy,
            ingress,
            egress,
        }
    }

    pub(crate) fn rules(&self, direction: Direction) -> &[CompiledRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub(crate) fn all_rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.ingress.iter().chain(&self.egress)
    }

    /// Whether the policy applies to `pod` (whose namespace has `ns_labels`).
    pub(crate) fn selects(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        !pod.host_network
            && match &self.policy.subject {
                Subject::Namespace { namespace, pods } => {
                    &pod.namespace == namespace && pods.matches(&pod.labels)
                }
                Subject::Cluster { namespaces, pods } => {
                    namespaces.matches(ns_labels) && pods.matches(&pod.labels)
                }
            }
    }

    /// The instance of rule `index` of `direction` for `pod`, with the group definitions
    /// its clauses reference; `None` when it can match nothing on this pod.
    pub(crate) fn instance(
        &self,
        direction: Direction,
        index: usize,
        pod: &Pod,
        defs: &mut Vec<(GroupKey, Arc<GroupDef>)>,
    ) -> Option<RuleInstance> {
        let compiled = &self.rules(direction)[index];
        let rule = &self.policy.rules(direction)[index];
        let peer_ids: Option<Vec<GroupId>> = compiled
            .peers
            .as_ref()
            .map(|p| p.iter().map(|g| g.id.clone()).collect());
        let no_peer = peer_ids.as_ref().is_some_and(|p| p.is_empty());
        let mut clauses = Vec::new();
        match &rule.ports {
            None => {
                if !no_peer {
                    clauses.push(Clause::PeerPort {
                        peers: peer_ids.clone(),
                        ports: None,
                    });
                }
            }
            Some(ports) => {
                let mut ranges = BTreeSet::new();
                let mut named = BTreeSet::new();
                for p in ports {
                    match &p.port {
                        PortSpec::Any => {
                            ranges.insert(PortRange {
                                protocol: p.protocol,
                                start: 0,
                                end: u16::MAX,
                            });
                        }
                        PortSpec::Range { start, end } => {
                            ranges.insert(PortRange {
                                protocol: p.protocol,
                                start: *start,
                                end: *end,
                            });
                        }
                        PortSpec::Named(name) => match direction {
                            Direction::Ingress => {
                                for port in pod.named_ports(name, p.protocol) {
                                    ranges.insert(PortRange {
                                        protocol: p.protocol,
                                        start: port,
                                        end: port,
                                    });
                                }
                            }
                            Direction::Egress => {
                                named.insert((name.clone(), p.protocol));
                            }
                        },
                    }
                }
                if !ranges.is_empty() && !no_peer {
                    clauses.push(Clause::PeerPort {
                        peers: peer_ids.clone(),
                        ports: Some(ranges.into_iter().collect()),
                    });
                }
                for (name, protocol) in named {
                    let peers: Vec<Option<Box<GroupDef>>> = match &compiled.peers {
                        None => vec![None],
                        Some(p) => p
                            .iter()
                            .map(|g| Some(Box::new(GroupDef::clone(&g.def))))
                            .collect(),
                    };
                    for peer in peers {
                        let def = GroupDef::NamedPorts {
                            peer,
                            name: name.clone(),
                            protocol,
                        };
                        let key = def.key();
                        clauses.push(Clause::NamedPort {
                            group: group_id(key),
                        });
                        defs.push((key, Arc::new(def)));
                    }
                }
            }
        }
        if clauses.is_empty() {
            return None;
        }
        for clause in &clauses {
            if let Clause::PeerPort { peers: Some(_), .. } = clause {
                for g in compiled.peers.iter().flatten() {
                    defs.push((g.key, g.def.clone()));
                }
            }
        }
        Some(RuleInstance {
            rule: compiled.id.clone(),
            action: rule.action,
            clauses,
        })
    }
}
