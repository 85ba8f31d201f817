//! From policies to rule instances for one pod: which policies select it, and what each of
//! their rules means for it (named ports resolved on it for ingress).

use std::sync::Arc;

use crate::model::{
    Direction, Labels, Pod, Policy, PortRule, PortSpec, Protocol, RuleOrigin, Subject,
};
use crate::ruleset::{Clause, GroupId, PortRange, RuleId, RuleInstance};

use super::groups::{group_id, GroupDef, GroupKey};
use super::stable_hash;

/// A policy with what can be worked out once, independent of any pod.
pub(crate) struct CompiledPolicy {
    pub policy: Policy,
    pub ingress: Vec<CompiledRule>,
    pub egress: Vec<CompiledRule>,
    /// Whether an ingress rule names a port, which then means something on each selected
    /// pod: asked for every pod's tier lists, so worked out once.
    ingress_names_ports: bool,
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
    /// `shared` gives a group definition's key and the one instance of it the compiler
    /// keeps for that key, so that equal peers of many policies cost one copy.
    pub(crate) fn new(
        policy: Policy,
        shared: &mut impl FnMut(GroupDef) -> (GroupKey, Arc<GroupDef>),
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
                                let (key, def) = shared(d);
                                PeerGroup {
                                    def,
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
        let ingress_names_ports = policy.ingress.iter().any(|r| {
            r.ports
                .iter()
                .flatten()
                .any(|p| matches!(p.port, PortSpec::Named(_)))
        });
        CompiledPolicy {
            policy,
            ingress,
            egress,
            ingress_names_ports,
        }
    }

    /// Whether the rules in `direction` mean something different on pods with different
    /// named ports: ingress rules resolve port names on the selected pod.
    pub(crate) fn reads_named_ports(&self, direction: Direction) -> bool {
        direction == Direction::Ingress && self.ingress_names_ports
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
        let no_peer = compiled.peers.as_ref().is_some_and(|p| p.is_empty());
        // At most one clause names the peers.
        let peer_ids = || -> Option<Vec<GroupId>> {
            compiled
                .peers
                .as_ref()
                .map(|p| p.iter().map(|g| g.id.clone()).collect())
        };
        let mut clauses = Vec::new();
        match &rule.ports {
            None => {
                if !no_peer {
                    clauses.push(Clause::PeerPort {
                        peers: peer_ids(),
                        ports: None,
                    });
                }
            }
            Some(ports) => {
                let (ranges, named) = port_ranges_and_names(ports, direction, pod);
                if !ranges.is_empty() && !no_peer {
                    clauses.push(Clause::PeerPort {
                        peers: peer_ids(),
                        ports: Some(ranges),
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
                            name: name.to_string(),
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

/// A rule's ports for `pod`: the ranges (ingress port names resolved on the pod), and the
/// egress port names with their protocols, each sorted and without repeats. Sorted vectors,
/// not sets: a full compile builds one per rule instance, and most hold one or two.
fn port_ranges_and_names<'a>(
    ports: &'a [PortRule],
    direction: Direction,
    pod: &Pod,
) -> (Vec<PortRange>, Vec<(&'a str, Protocol)>) {
    let mut ranges = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        match &p.port {
            PortSpec::Any => ranges.push(PortRange {
                protocol: p.protocol,
                start: 0,
                end: u16::MAX,
            }),
            PortSpec::Range { start, end } => ranges.push(PortRange {
                protocol: p.protocol,
                start: *start,
                end: *end,
            }),
            PortSpec::Named(name) => match direction {
                Direction::Ingress => {
                    ranges.extend(pod.named_ports(name, p.protocol).map(|port| PortRange {
                        protocol: p.protocol,
                        start: port,
                        end: port,
                    }))
                }
                Direction::Egress => named.push((name.as_str(), p.protocol)),
            },
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    named.sort_unstable();
    named.dedup();
    (ranges, named)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPort, Labels};

    fn tcp(port: PortSpec) -> PortRule {
        PortRule {
            protocol: Protocol::Tcp,
            port,
        }
    }

    /// What a set would hold: ranges and names sorted, each once, with ingress names
    /// resolved on the pod (to nothing where it has no such port).
    #[test]
    fn ports_come_sorted_without_repeats() {
        let pod = Pod {
            namespace: "a".into(),
            name: "p".into(),
            labels: Labels::new(),
            node: "n".into(),
            ips: vec![],
            host_network: false,
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        };
        let ports = vec![
            tcp(PortSpec::Named("web".into())),
            tcp(PortSpec::Range {
                start: 9000,
                end: 9010,
            }),
            tcp(PortSpec::Named("http".into())),
            tcp(PortSpec::Any),
            PortRule {
                protocol: Protocol::Udp,
                port: PortSpec::Range { start: 53, end: 53 },
            },
            tcp(PortSpec::Range {
                start: 9000,
                end: 9010,
            }),
            tcp(PortSpec::Named("http".into())),
        ];
        use Protocol::{Tcp, Udp};
        let cases = [
            (
                Direction::Ingress,
                vec![
                    (Tcp, 0, u16::MAX),
                    (Tcp, 8080, 8080),
                    (Tcp, 9000, 9010),
                    (Udp, 53, 53),
                ],
                vec![],
            ),
            (
                Direction::Egress,
                vec![(Tcp, 0, u16::MAX), (Tcp, 9000, 9010), (Udp, 53, 53)],
                vec![("http", Tcp), ("web", Tcp)],
            ),
        ];
        for (direction, ranges, named) in cases {
            let ranges: Vec<PortRange> = ranges
                .into_iter()
                .map(|(protocol, start, end)| PortRange {
                    protocol,
                    start,
                    end,
                })
                .collect();
            assert_eq!(
                port_ranges_and_names(&ports, direction, &pod),
                (ranges, named),
                "{direction:?}"
            );
        }
    }
}
