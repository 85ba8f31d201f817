//! Where compiled node states wait for the streams that serve them: one watch channel per
//! node, written by the compile loop only (one writer), read by every stream of that node.
//! A slow agent skips intermediate states and gets one delta to the newest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use palisade_policy::ruleset::{Group, GroupId};
use palisade_policy::{NodeRuleSet, PolicyId};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// One node's state at one generation.
#[derive(Clone, Debug)]
pub struct Published {
    pub generation: u64,
    pub rules: Arc<NodeRuleSet>,
}

/// A changed address group's new members and the nodes that get them as a delta of
/// their own: nodes whose rules did not change otherwise.
#[derive(Clone, Debug)]
pub struct GroupDelta {
    pub group: Arc<Group>,
    pub nodes: Vec<String>,
}

/// What a node's agent last said about what it enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub connected: usize,
    pub published: u64,
    pub acked: Option<u64>,
    pub error: Option<String>,
}

pub struct Hub {
    nodes: Mutex<BTreeMap<String, watch::Sender<Option<Published>>>>,
    status: Mutex<BTreeMap<String, NodeStatus>>,
    ready: watch::Sender<bool>,
    generation: Mutex<u64>,
    /// The compiled state of every node (compile loop's copy), to serve new subscribers.
    states: Mutex<BTreeMap<String, Arc<NodeRuleSet>>>,
    /// The policies each node's current state carries: a policy's span is the nodes that
    /// enforce some part of it, the M of "enforced on N of M nodes".
    spans: Mutex<BTreeMap<String, BTreeSet<PolicyId>>>,
    pub metrics: Arc<Metrics>,
    started: Instant,
}

/// The policies a node's rules come from, and those that isolate its pods (an isolating
/// NetworkPolicy without rules is enforced by the default deny it causes), in audit lists
/// too (a policy in audit is in force as audit there).
fn policies_of(rules: &NodeRuleSet) -> BTreeSet<PolicyId> {
    let mut out: BTreeSet<PolicyId> = rules.rules.values().map(|o| o.policy.clone()).collect();
    for pod in &rules.pods {
        let audit = [&pod.audit.ingress, &pod.audit.egress]
            .into_iter()
            .flatten();
        for d in [&pod.ingress, &pod.egress].into_iter().chain(audit) {
            out.extend(d.isolated_by.iter().cloned());
        }
    }
    out
}

impl NodeStatus {
    /// The node's agent enforces the newest state published for it.
    /// Generations published to the node and not yet acknowledged.
    pub fn lag(&self) -> u64 {
        self.published.saturating_sub(self.acked.unwrap_or(0))
    }

    pub fn in_sync(&self) -> bool {
        self.connected > 0
            && self.error.is_none()
            && self.acked.is_some_and(|a| a >= self.published)
    }
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Hub {
            nodes: Mutex::default(),
            status: Mutex::default(),
            ready: watch::channel(false).0,
            generation: Mutex::new(0),
            states: Mutex::default(),
            spans: Mutex::default(),
            metrics,
            started: Instant::now(),
        })
    }

    /// Publishes a new generation: `changed` nodes get their new state (`None`: the node
    /// has nothing to enforce). Marks the hub ready.
    pub fn publish(&self, changed: BTreeMap<String, Option<NodeRuleSet>>) -> u64 {
        self.publish_with_groups(changed, BTreeMap::new())
    }

    /// Whether the hub holds a state for `node` that a group delta can be applied to.
    pub fn holds(&self, node: &str) -> bool {
        self.states.lock().unwrap().contains_key(node)
    }

    /// Publishes `changed` nodes as [`Hub::publish`] does and, in the same generation,
    /// the new members of changed groups to the other nodes that hold them: their state
    /// is the last one with those groups replaced, nothing compiled again. A node of a
    /// delta that the hub holds no state for is left alone (see [`Hub::holds`]).
    pub fn publish_with_groups(
        &self,
        changed: BTreeMap<String, Option<NodeRuleSet>>,
        groups: BTreeMap<GroupId, GroupDelta>,
    ) -> u64 {
        // Lock order, here and in `subscribe`: states, then nodes. The generation moves
        // under the states lock, so a generation and the states read with it agree.
        let mut states = self.states.lock().unwrap();
        let generation = {
            let mut g = self.generation.lock().unwrap();
            *g += 1;
            *g
        };
        let nodes = self.nodes.lock().unwrap();
        let mut status = self.status.lock().unwrap();
        let mut spans = self.spans.lock().unwrap();
        let mut patches: BTreeMap<&str, Vec<(&GroupId, &Arc<Group>)>> = BTreeMap::new();
        for (id, delta) in &groups {
            for node in delta.nodes.iter().filter(|n| !changed.contains_key(*n)) {
                patches.entry(node).or_default().push((id, &delta.group));
            }
        }
        for (node, patch) in patches {
            let Some(old) = states.get(node) else {
                continue;
            };
            let mut rules = NodeRuleSet::clone(old);
            for (id, group) in patch {
                if let Some(held) = rules.groups.get_mut(id) {
                    *held = group.clone();
                }
            }
            let rules = Arc::new(rules);
            states.insert(node.to_string(), rules.clone());
            if let Some(tx) = nodes.get(node) {
                tx.send_replace(Some(Published { generation, rules }));
            }
            if let Some(s) = status.get_mut(node) {
                s.published = generation;
            }
        }
        for (node, rules) in changed {
            let rules = Arc::new(rules.unwrap_or_else(|| NodeRuleSet {
                node: node.clone(),
                ..Default::default()
            }));
            let carried = policies_of(&rules);
            if carried.is_empty() {
                spans.remove(&node);
            } else {
                spans.insert(node.clone(), carried);
            }
            if rules.pods.is_empty() && rules.node_addresses.is_empty() {
                states.remove(&node);
            } else {
                states.insert(node.clone(), rules.clone());
            }
            if let Some(tx) = nodes.get(&node) {
                tx.send_replace(Some(Published { generation, rules }));
            }
            if let Some(s) = status.get_mut(&node) {
                s.published = generation;
            }
        }
        self.metrics.generation.set(generation as i64);
        self.ready.send_replace(true);
        self.refresh_lag(&status);
        generation
    }

    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// A receiver of one node's states, already holding the current one.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Option<Published>> {
        let states = self.states.lock().unwrap();
        let mut nodes = self.nodes.lock().unwrap();
        let tx = nodes.entry(node.to_string()).or_insert_with(|| {
            let rules = states.get(node).cloned().unwrap_or_else(|| {
                Arc::new(NodeRuleSet {
                    node: node.to_string(),
                    ..Default::default()
                })
            });
            let generation = self.generation();
            watch::channel(Some(Published { generation, rules })).0
        });
        let mut rx = tx.subscribe();
        rx.mark_changed();
        rx
    }

    pub fn connected(&self, node: &str) {
        // What the new stream starts with: the node's last published state, whose generation
        // is older than the current one when later rounds did not touch the node. Counting
        // the current generation as published would show a lag that no ack can clear.
        let sent = self
            .nodes
            .lock()
            .unwrap()
            .get(node)
            .and_then(|tx| tx.borrow().as_ref().map(|p| p.generation));
        let mut status = self.status.lock().unwrap();
        let s = status.entry(node.to_string()).or_default();
        s.connected += 1;
        s.published = sent.unwrap_or_else(|| self.generation());
        self.metrics
            .nodes_connected
            .set(status.values().filter(|s| s.connected > 0).count() as i64);
    }

    pub fn disconnected(&self, node: &str) {
        let mut status = self.status.lock().unwrap();
        if let Some(s) = status.get_mut(node) {
            s.connected = s.connected.saturating_sub(1);
        }
        self.metrics
            .nodes_connected
            .set(status.values().filter(|s| s.connected > 0).count() as i64);
        self.refresh_lag(&status);
    }

    pub fn acked(&self, node: &str, generation: u64, error: Option<String>) {
        let mut status = self.status.lock().unwrap();
        let s = status.entry(node.to_string()).or_default();
        if error.is_none() {
            s.acked = Some(s.acked.map_or(generation, |a| a.max(generation)));
        }
        s.error = error;
        self.refresh_lag(&status);
    }

    /// Generations between what was published for a node and what its agent enforces;
    /// nodes without an agent are not reported.
    fn refresh_lag(&self, status: &BTreeMap<String, NodeStatus>) {
        for (node, s) in status {
            let lag = if s.connected == 0 {
                self.metrics
                    .generation_lag
                    .remove_label_values(&[node])
                    .ok();
                continue;
            } else {
                s.lag()
            };
            self.metrics
                .generation_lag
                .with_label_values(&[node])
                .set(lag as i64);
        }
    }

    /// Every policy that some node's current state carries, with those nodes.
    pub fn spans(&self) -> BTreeMap<PolicyId, BTreeSet<String>> {
        let mut out: BTreeMap<PolicyId, BTreeSet<String>> = BTreeMap::new();
        for (node, policies) in self.spans.lock().unwrap().iter() {
            for p in policies {
                out.entry(p.clone()).or_default().insert(node.clone());
            }
        }
        out
    }

    pub fn node_status(&self) -> BTreeMap<String, NodeStatus> {
        self.status.lock().unwrap().clone()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(node: &str) -> Option<NodeRuleSet> {
        Some(NodeRuleSet {
            node: node.to_string(),
            node_addresses: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        })
    }

    #[test]
    fn a_reconnecting_agent_that_acks_its_snapshot_does_not_lag() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        hub.publish([("a".to_string(), rules("a"))].into());
        let first = hub.subscribe("a");
        hub.connected("a");
        let snapshot = first.borrow().clone().unwrap().generation;
        hub.acked("a", snapshot, None);
        hub.disconnected("a");
        // Rounds that do not touch node a.
        hub.publish([("b".to_string(), rules("b"))].into());
        hub.publish([("b".to_string(), rules("b"))].into());
        hub.connected("a");
        let again = hub.subscribe("a");
        let snapshot = again.borrow().clone().unwrap().generation;
        hub.acked("a", snapshot, None);
        assert_eq!(hub.node_status()["a"].published, snapshot);
        assert_eq!(
            hub.metrics.generation_lag.with_label_values(&["a"]).get(),
            0,
            "the agent enforces everything it was sent"
        );
    }
}
