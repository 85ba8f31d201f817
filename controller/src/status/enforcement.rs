//! On how many nodes each policy is enforced, from every replica's report of the agents
//! connected to it. Pure: the status writer feeds it what it read from the API.
//!
//! A node counts as enforcing a policy when the policy is in the node's state and the
//! node's agent has acknowledged the newest state published for it. That is conservative
//! for the milliseconds an unrelated change is in flight, and exact at rest; a node whose
//! apply failed enforces none of its policies' current versions, which is what it says.

use std::collections::{BTreeMap, BTreeSet};

use palisade_policy::PolicyId;
use serde::{Deserialize, Serialize};

use crate::hub::NodeStatus;

/// One node as one replica sees it (compact: a report carries every node of a replica).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    #[serde(rename = "s")]
    pub in_sync: bool,
    /// Generations published to the node and not yet acknowledged.
    #[serde(rename = "l")]
    pub lag: u64,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeReport {
    /// This replica's agents: only connected nodes are reported.
    pub fn from_hub(status: &BTreeMap<String, NodeStatus>) -> BTreeMap<String, NodeReport> {
        status
            .iter()
            .filter(|(_, s)| s.connected > 0)
            .map(|(node, s)| {
                (
                    node.clone(),
                    NodeReport {
                        in_sync: s.in_sync(),
                        lag: s.lag(),
                        error: s.error.clone(),
                    },
                )
            })
            .collect()
    }
}

/// A node across replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub in_sync: bool,
    pub lag: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The replica serving it.
    pub replica: String,
}

/// Merges fresh reports. An agent that just moved replicas can appear in two; it counts as
/// in sync if either says so: the old replica's word is at most one report old, and the
/// kernel keeps what it enforced while the agent reconnects.
pub fn merge(
    reports: &BTreeMap<String, BTreeMap<String, NodeReport>>,
) -> BTreeMap<String, NodeState> {
    let mut out: BTreeMap<String, NodeState> = BTreeMap::new();
    for (replica, nodes) in reports {
        for (node, r) in nodes {
            let state = NodeState {
                in_sync: r.in_sync,
                lag: r.lag,
                error: r.error.clone(),
                replica: replica.clone(),
            };
            match out.get(node) {
                Some(have) if have.in_sync || !r.in_sync => {}
                _ => {
                    out.insert(node.clone(), state);
                }
            }
        }
    }
    out
}

/// `enforced` of `span` nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub enforced: usize,
    pub span: usize,
}

impl Count {
    pub fn complete(&self) -> bool {
        self.enforced == self.span
    }
}

pub fn count(span: Option<&BTreeSet<String>>, nodes: &BTreeMap<String, NodeState>) -> Count {
    let Some(span) = span else {
        return Count::default();
    };
    Count {
        enforced: span
            .iter()
            .filter(|n| nodes.get(*n).is_some_and(|s| s.in_sync))
            .count(),
        span: span.len(),
    }
}

/// What the status says about one policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyState {
    pub policy: PolicyId,
    pub generation: i64,
    #[serde(flatten)]
    pub count: Count,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// In audit: what it would deny passes, counted and logged as would-deny.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
}

impl PolicyState {
    pub fn message(&self) -> String {
        let (enforced, span) = (self.count.enforced, self.count.span);
        match &self.rejected {
            Some(error) => format!(
                "not enforced: {error}; its last accepted version stays in force on {enforced} of {span} nodes"
            ),
            None if self.audit => format!(
                "in audit on {enforced} of {span} nodes: nothing is dropped for it, what it would deny is counted and logged as would-deny"
            ),
            None if span == 0 => "enforced on 0 of 0 nodes: no node has a pod it applies to".into(),
            None => format!("enforced on {enforced} of {span} nodes"),
        }
    }

    /// A condition reason (CamelCase).
    pub fn reason(&self) -> &'static str {
        if self.rejected.is_some() {
            "Rejected"
        } else if !self.count.complete() {
            "Pending"
        } else if self.audit {
            "InAudit"
        } else {
            "Enforced"
        }
    }

    /// Accepted and enforced on every node it applies to.
    pub fn enforced(&self) -> bool {
        self.in_force() && !self.audit
    }

    /// Accepted and in force, in its mode (enforced or in audit), on every node it applies
    /// to: nothing is pending.
    pub fn in_force(&self) -> bool {
        self.rejected.is_none() && self.count.complete()
    }
}

/// Every observed policy's state.
pub fn policies(
    observed: &BTreeMap<PolicyId, i64>,
    invalid: &BTreeMap<PolicyId, String>,
    audit: &BTreeSet<PolicyId>,
    spans: &BTreeMap<PolicyId, BTreeSet<String>>,
    nodes: &BTreeMap<String, NodeState>,
) -> Vec<PolicyState> {
    observed
        .iter()
        .map(|(id, generation)| PolicyState {
            policy: id.clone(),
            generation: *generation,
            count: count(spans.get(id), nodes),
            rejected: invalid.get(id).cloned(),
            audit: audit.contains(id),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::PolicyKind;

    fn report(entries: &[(&str, bool)]) -> BTreeMap<String, NodeReport> {
        entries
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    NodeReport {
                        in_sync: *s,
                        lag: u64::from(!*s),
                        error: None,
                    },
                )
            })
            .collect()
    }

    fn id(name: &str) -> PolicyId {
        PolicyId {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some("default".into()),
            name: name.into(),
        }
    }

    #[test]
    fn counts_nodes_of_every_replica_in_the_span() {
        let reports = BTreeMap::from([
            ("a".to_string(), report(&[("n1", true), ("n2", false)])),
            ("b".to_string(), report(&[("n3", true)])),
        ]);
        let nodes = merge(&reports);
        let span: BTreeSet<String> = ["n1", "n2", "n3", "n4"].map(String::from).into();
        assert_eq!(
            count(Some(&span), &nodes),
            Count {
                enforced: 2,
                span: 4
            }
        );
        assert_eq!(count(None, &nodes), Count::default());
    }

    #[test]
    fn a_node_that_moved_counts_once_and_in_sync_if_either_replica_says_so() {
        let reports = BTreeMap::from([
            ("a".to_string(), report(&[("n1", true)])),
            ("b".to_string(), report(&[("n1", false)])),
        ]);
        let nodes = merge(&reports);
        assert_eq!(nodes.len(), 1);
        assert!(nodes["n1"].in_sync);
        assert_eq!(nodes["n1"].replica, "a");
        let reports = BTreeMap::from([
            ("a".to_string(), report(&[("n1", false)])),
            ("b".to_string(), report(&[("n1", true)])),
        ]);
        assert_eq!(merge(&reports)["n1"].replica, "b");
    }

    #[test]
    fn rejected_and_pending_policies_say_why() {
        let nodes = merge(&BTreeMap::from([(
            "a".to_string(),
            report(&[("n1", true), ("n2", false)]),
        )]));
        let spans = BTreeMap::from([
            (id("both"), ["n1", "n2"].map(String::from).into()),
            (id("one"), ["n1"].map(String::from).into()),
        ]);
        let observed = BTreeMap::from([(id("both"), 3), (id("one"), 1), (id("none"), 2)]);
        let invalid = BTreeMap::from([(id("one"), "spec.ingress[0]: bad".to_string())]);
        let states = policies(&observed, &invalid, &BTreeSet::new(), &spans, &nodes);
        let by_name = |n: &str| states.iter().find(|s| s.policy.name == n).unwrap();
        assert_eq!(by_name("both").reason(), "Pending");
        assert_eq!(by_name("both").message(), "enforced on 1 of 2 nodes");
        assert_eq!(by_name("both").generation, 3);
        assert_eq!(by_name("one").reason(), "Rejected");
        assert!(by_name("one").message().contains("spec.ingress[0]"));
        assert!(!by_name("one").enforced());
        assert_eq!(by_name("none").reason(), "Enforced");
        assert!(by_name("none").enforced());
    }

    #[test]
    fn a_policy_in_audit_is_in_force_but_not_enforced() {
        let nodes = merge(&BTreeMap::from([(
            "a".to_string(),
            report(&[("n1", true), ("n2", false)]),
        )]));
        let spans = BTreeMap::from([
            (id("staged"), ["n1"].map(String::from).into()),
            (id("staged-pending"), ["n1", "n2"].map(String::from).into()),
        ]);
        let observed = BTreeMap::from([(id("staged"), 1), (id("staged-pending"), 1)]);
        let audit: BTreeSet<PolicyId> = [id("staged"), id("staged-pending")].into();
        let states = policies(&observed, &BTreeMap::new(), &audit, &spans, &nodes);
        let by_name = |n: &str| states.iter().find(|s| s.policy.name == n).unwrap();
        let staged = by_name("staged");
        assert_eq!(staged.reason(), "InAudit");
        assert!(staged.message().starts_with("in audit on 1 of 1 nodes"));
        assert!(staged.in_force() && !staged.enforced());
        let pending = by_name("staged-pending");
        assert_eq!(pending.reason(), "Pending");
        assert!(!pending.in_force());
        // The summary that palisadectl reads keeps the mode.
        let json = serde_json::to_string(staged).unwrap();
        let back: PolicyState = serde_json::from_str(&json).unwrap();
        assert!(back.audit, "{json}");
    }
}
