//! Which conntrack entries must go after a transaction, so that no flow the rules deny
//! lives on as `established` (issue 10.3, 10.4). Pure; [`crate::nfnl::conntrack`] dumps
//! and deletes.
//!
//! A flow is judged as the table judges its first packet: the egress rules of the pod
//! that sent it (the original source) and the ingress rules of the pod it reached (the
//! reply's source, which is the endpoint after a Service's DNAT), each only where that
//! pod is enforced. The node's own traffic to its pods never meets the table (there is no
//! `output` chain), so a flow from a local address has no ingress side.
//!
//! An entry the new rules deny is deleted
//! - always, when a side that denies it was not enforced before: enforcement starts for
//!   that pod (a new pod, an interface re-created, the agent's first start), and whatever
//!   it established unfiltered must not survive;
//! - in strict mode, when the previous rules allowed it (the change newly denies it);
//!   where the previous rules are not known (the first transaction of this agent process)
//!   they count as allowing.
//!
//! Flows the new rules allow are never touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_policy::model::{Direction, PodKey, Protocol};
use palisade_policy::ruleset::{Clause, DirectionRules, Matcher, NodeRuleSet, PodRules, TierList};
use palisade_policy::verdict::Verdict;

use crate::render::{entry_chain, Interfaces};

/// Why an entry is deleted (the metric's label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cut {
    /// Its pod was not enforced before this transaction.
    EnforcementStart,
    /// Strict mode: the previous rules allowed it, these deny it.
    Strict,
}

impl Cut {
    pub fn as_str(self) -> &'static str {
        match self {
            Cut::EnforcementStart => "enforcement_start",
            Cut::Strict => "strict",
        }
    }
}

/// What was in force before a transaction.
#[derive(Clone, Debug, Default)]
pub struct Before {
    /// The rules, when this agent applied them (`None` at its first transaction).
    pub rules: Option<NodeRuleSet>,
    /// The egress dispatch map (interface → entry chain): a pod was enforced iff its
    /// interface led to its own entry chain. Read from the kernel at start, so a restart
    /// that finds the table does not count as the start of enforcement.
    pub dispatch: BTreeMap<String, String>,
}

/// The judge of one transaction's flows.
pub struct Sweep<'a> {
    rules: &'a NodeRuleSet,
    before: &'a Before,
    strict: bool,
    /// Addresses of the node itself.
    local: &'a BTreeSet<IpAddr>,
    /// Address → enforced pod (its rules and whether it was enforced before).
    pods: HashMap<IpAddr, (&'a PodRules, bool)>,
    /// Rules without port-bound clauses, for flows of protocols without ports (ICMP).
    portless: HashMap<(PodKey, Direction, bool), DirectionRules>,
}

impl<'a> Sweep<'a> {
    /// `rules` are now in force for the pods whose interface in `interfaces` leads to
    /// their entry chain in `dispatch` (the egress map of the table just applied).
    pub fn new(
        rules: &'a NodeRuleSet,
        interfaces: &Interfaces,
        dispatch: &BTreeMap<String, String>,
        before: &'a Before,
        strict: bool,
        local: &'a BTreeSet<IpAddr>,
    ) -> Sweep<'a> {
        let mut pods = HashMap::new();
        for pod in &rules.pods {
            let key = PodKey::new(&pod.namespace, &pod.name);
            let Some(ifname) = interfaces.get(&key) else {
                continue;
            };
            let chain = entry_chain(&key, Direction::Egress);
            if dispatch.get(ifname) != Some(&chain) {
                continue;
            }
            let was = before.dispatch.get(ifname) == Some(&chain);
            for ip in &pod.ips {
                pods.insert(*ip, (pod, was));
            }
        }
        Sweep {
            rules,
            before,
            strict,
            local,
            pods,
            portless: HashMap::new(),
        }
    }

    /// Whether any pod is newly enforced (then entries must be looked at even without
    /// strict mode).
    pub fn starts_enforcement(&self) -> bool {
        self.pods.values().any(|(_, was)| !was)
    }

    /// Whether the flow `src → dst` (`protocol` number, destination `port`) must go.
    pub fn judge(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        port: Option<u16>,
    ) -> Option<Cut> {
        let protocol = match (protocol, port) {
            (6, Some(p)) => Some((Protocol::Tcp, p)),
            (17, Some(p)) => Some((Protocol::Udp, p)),
            (132, Some(p)) => Some((Protocol::Sctp, p)),
            _ => None,
        };
        // Called for every entry of the table: no allocation.
        let egress = self
            .pods
            .get(&src)
            .map(|&(pod, was)| (pod, was, Direction::Egress, dst));
        let ingress = (!self.local.contains(&src))
            .then(|| self.pods.get(&dst))
            .flatten()
            .map(|&(pod, was)| (pod, was, Direction::Ingress, src));
        let mut denied_unenforced = false;
        let mut denied = false;
        let mut allowed_before = true;
        for (pod, was, direction, peer) in egress.into_iter().chain(ingress) {
            let now = self.decide(self.rules, pod, direction, peer, protocol, false);
            if now == Some(Verdict::Deny) {
                denied = true;
                denied_unenforced |= !was;
            }
            if was {
                let old = self.before.rules.as_ref().and_then(|old| {
                    let pod = old.pod(&pod.namespace, &pod.name)?;
                    self.decide(old, pod, direction, peer, protocol, true)
                });
                allowed_before &= old != Some(Verdict::Deny);
            }
        }
        if !denied {
            None
        } else if denied_unenforced {
            Some(Cut::EnforcementStart)
        } else if self.strict && allowed_before {
            Some(Cut::Strict)
        } else {
            None
        }
    }

    /// The verdict of `pod`'s rules in `rules` for one direction; `None` if undecidable.
    fn decide(
        &mut self,
        rules: &NodeRuleSet,
        pod: &PodRules,
        direction: Direction,
        peer: IpAddr,
        protocol: Option<(Protocol, u16)>,
        old: bool,
    ) -> Option<Verdict> {
        let matcher = Matcher {
            groups: &rules.groups,
            rules: &rules.rules,
        };
        let d = pod.direction(direction);
        let decision = match protocol {
            Some((protocol, port)) => matcher.decide(d, direction, peer, protocol, port),
            None => {
                // Rules with ports match only their protocols; the rest match any.
                let key = (PodKey::new(&pod.namespace, &pod.name), direction, old);
                let portless = self.portless.entry(key).or_insert_with(|| portless(d));
                matcher.decide(portless, direction, peer, Protocol::Tcp, 0)
            }
        };
        Some(decision.verdict)
    }
}

/// The conntrack side of the agent's loop: deletes, after each transaction, the entries
/// [`Sweep::judge`] condemns, and counts them (`palisade_conntrack_deleted_total`).
pub struct Sweeper {
    socket: Option<crate::nfnl::conntrack::Conntrack>,
    strict: bool,
    deleted: prometheus::IntCounterVec,
    /// What was in force before the next transaction.
    before: Before,
}

impl Sweeper {
    /// `dispatch`: the egress dispatch map of the table found in the kernel at start.
    pub fn new(
        strict: bool,
        dispatch: BTreeMap<String, String>,
        registry: &prometheus::Registry,
    ) -> Sweeper {
        let deleted = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "palisade_conntrack_deleted_total",
                "Conntrack entries deleted because the rules deny their flow, by reason (enforcement_start, strict).",
            ),
            &["reason"],
        )
        .expect("constant metric options are valid");
        let _ = registry.register(Box::new(deleted.clone()));
        Sweeper {
            socket: None,
            strict,
            deleted,
            before: Before {
                rules: None,
                dispatch,
            },
        }
    }

    /// Whether the transaction that put `rules` with `dispatch` in force needs a look at
    /// the conntrack table.
    pub fn due(
        &self,
        rules: &NodeRuleSet,
        interfaces: &Interfaces,
        dispatch: &BTreeMap<String, String>,
    ) -> bool {
        let local = BTreeSet::new();
        let sweep = Sweep::new(
            rules,
            interfaces,
            dispatch,
            &self.before,
            self.strict,
            &local,
        );
        sweep.starts_enforcement() || (self.strict && self.before.rules.as_ref() != Some(rules))
    }

    /// Deletes the entries the rules now in force condemn and remembers them as in force.
    /// Returns the number deleted. After an error (logged by the caller) the rules are not
    /// remembered, so the next transaction or periodic reconcile sweeps again.
    pub fn sweep(
        &mut self,
        rules: &NodeRuleSet,
        interfaces: &Interfaces,
        dispatch: &BTreeMap<String, String>,
        local: &BTreeSet<IpAddr>,
    ) -> Result<usize, crate::nfnl::NfnlError> {
        let deleted = self.delete(rules, interfaces, dispatch, local)?;
        self.remember(rules, dispatch);
        Ok(deleted)
    }

    /// Remembers `rules` with `dispatch` as in force (after a transaction that needed no
    /// sweep).
    pub fn remember(&mut self, rules: &NodeRuleSet, dispatch: &BTreeMap<String, String>) {
        self.before = Before {
            rules: Some(rules.clone()),
            dispatch: dispatch.clone(),
        };
    }

    fn delete(
        &mut self,
        rules: &NodeRuleSet,
        interfaces: &Interfaces,
        dispatch: &BTreeMap<String, String>,
        local: &BTreeSet<IpAddr>,
    ) -> Result<usize, crate::nfnl::NfnlError> {
        let socket = match &mut self.socket {
            Some(s) => s,
            None => self
                .socket
                .insert(crate::nfnl::conntrack::Conntrack::open(None)?),
        };
        let mut sweep = Sweep::new(
            rules,
            interfaces,
            dispatch,
            &self.before,
            self.strict,
            local,
        );
        let mut deleted = 0;
        for entry in socket.dump()? {
            let (src, dst, protocol, port) = entry.flow();
            let Some(cut) = sweep.judge(src, dst, protocol, port) else {
                continue;
            };
            if socket.delete(&entry)? {
                deleted += 1;
                self.deleted.with_label_values(&[cut.as_str()]).inc();
                tracing::debug!(%src, %dst, protocol, ?port, reason = cut.as_str(), "deleted the conntrack entry of a denied flow");
            }
        }
        Ok(deleted)
    }
}

/// `rules` with only the clauses that match a packet whatever its protocol and port.
fn portless(rules: &DirectionRules) -> DirectionRules {
    let keep = |instances: &[palisade_policy::ruleset::RuleInstance]| {
        instances
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.clauses
                    .retain(|c| matches!(c, Clause::PeerPort { ports: None, .. }));
                i
            })
            .collect::<Vec<_>>()
    };
    DirectionRules {
        admin: Arc::new(TierList::new(keep(&rules.admin))),
        isolated_by: rules.isolated_by.clone(),
        network_policy: keep(&rules.network_policy),
        baseline: Arc::new(TierList::new(keep(&rules.baseline))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::model::{Action, PolicyId, PolicyKind};
    use palisade_policy::ruleset::{Group, PortRange, RuleInstance};
    use palisade_policy::AddrSet;

    const A: &str = "10.0.0.2";
    const B: &str = "10.0.0.3";
    const NODE: &str = "169.254.1.1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// b isolated for ingress, allowing TCP `ports` from a.
    fn rules(ports: &[u16]) -> NodeRuleSet {
        let allow = RuleInstance {
            rule: "r-1".into(),
            action: Action::Allow,
            clauses: ports
                .iter()
                .map(|&p| Clause::PeerPort {
                    peers: Some(vec!["g-a".into()]),
                    ports: Some(vec![PortRange {
                        protocol: Protocol::Tcp,
                        start: p,
                        end: p,
                    }]),
                })
                .collect(),
        };
        let pod = |name: &str, addr: &str, ingress: DirectionRules| PodRules {
            namespace: "ns".into(),
            name: name.into(),
            ips: vec![ip(addr)],
            ingress: ingress.into(),
            egress: Default::default(),
            audit: Default::default(),
        };
        NodeRuleSet {
            node: "n".into(),
            node_addresses: vec![],
            pods: vec![
                pod("a", A, DirectionRules::default()),
                pod(
                    "b",
                    B,
                    DirectionRules {
                        isolated_by: vec![PolicyId {
                            kind: PolicyKind::NetworkPolicy,
                            namespace: Some("ns".into()),
                            name: "b".into(),
                        }],
                        network_policy: vec![allow],
                        ..Default::default()
                    },
                ),
            ],
            groups: [(
                "g-a".to_string(),
                Group::Hosts(AddrSet::from_addrs([ip(A)])).into(),
            )]
            .into_iter()
            .collect(),
            rules: Default::default(),
        }
    }

    fn interfaces() -> Interfaces {
        [("a", "va"), ("b", "vb")]
            .into_iter()
            .map(|(p, i)| (PodKey::new("ns", p), i.to_string()))
            .collect()
    }

    fn dispatch(pods: &[&str]) -> BTreeMap<String, String> {
        pods.iter()
            .map(|p| {
                let key = PodKey::new("ns", *p);
                (
                    interfaces()[&key].clone(),
                    entry_chain(&key, Direction::Egress),
                )
            })
            .collect()
    }

    #[test]
    fn strict_cuts_only_what_the_change_newly_denies() {
        let local = [ip(NODE)].into_iter().collect();
        let (old, new) = (rules(&[80, 443]), rules(&[443]));
        let before = Before {
            rules: Some(old),
            dispatch: dispatch(&["a", "b"]),
        };
        let both = dispatch(&["a", "b"]);
        let mut strict = Sweep::new(&new, &interfaces(), &both, &before, true, &local);
        assert!(!strict.starts_enforcement());
        assert_eq!(strict.judge(ip(A), ip(B), 6, Some(80)), Some(Cut::Strict));
        assert_eq!(
            strict.judge(ip(A), ip(B), 6, Some(443)),
            None,
            "still allowed"
        );
        assert_eq!(
            strict.judge(ip(A), ip(B), 6, Some(22)),
            None,
            "denied before too: not newly denied"
        );
        assert_eq!(
            strict.judge(ip(NODE), ip(B), 6, Some(80)),
            None,
            "the node's own"
        );
        assert_eq!(
            strict.judge(ip(B), ip(A), 6, Some(80)),
            None,
            "a's ingress is open"
        );
        let mut lax = Sweep::new(&new, &interfaces(), &both, &before, false, &local);
        assert_eq!(
            lax.judge(ip(A), ip(B), 6, Some(80)),
            None,
            "strict mode off"
        );
    }

    #[test]
    fn a_newly_enforced_pod_loses_what_its_rules_deny() {
        let local = BTreeSet::new();
        let new = rules(&[443]);
        let before = Before {
            rules: None,
            dispatch: dispatch(&["a"]),
        };
        let both = dispatch(&["a", "b"]);
        let mut sweep = Sweep::new(&new, &interfaces(), &both, &before, false, &local);
        assert!(sweep.starts_enforcement());
        assert_eq!(
            sweep.judge(ip(A), ip(B), 17, Some(53)),
            Some(Cut::EnforcementStart)
        );
        assert_eq!(sweep.judge(ip(A), ip(B), 6, Some(443)), None);
        // ICMP: only rules without ports could allow it, and b has none.
        assert_eq!(
            sweep.judge(ip(A), ip(B), 1, None),
            Some(Cut::EnforcementStart)
        );
        assert_eq!(sweep.judge(ip(B), ip(A), 1, None), None);
    }
}
