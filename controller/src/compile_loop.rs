//! The one writer: source events into the input store, changes into the incremental
//! compiler, and the nodes they touched into the hub, at most once per `min_interval`.
//! The compiler is the staged one: where policies in audit (their annotation, their
//! namespace's label, or the default) change a pod's rules, its state carries audit lists;
//! a namespace relabel that changes the mode moves its NetworkPolicies between the views.
//!
//! Nothing is published before every source has listed everything once (`Synced`): an
//! agent served from half a cluster would enforce too little.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::{Change, Enforcement, PolicyId, StagedCompiler, Touched};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::hub::{GroupDelta, Hub};
use crate::inputs::Inputs;
use crate::objects::{ObjectKey, SourceEvent};

/// Applies `changes` to the compiler and publishes one generation: the nodes whose rules
/// changed get their state compiled again, the other nodes that hold a changed group get
/// its new members as a delta. Returns the generation and how many nodes it reached.
pub fn publish_changes(
    compiler: &mut StagedCompiler,
    hub: &Hub,
    changes: impl IntoIterator<Item = Change>,
) -> (u64, usize) {
    let mut touched = Touched::default();
    let mut namespaces = false;
    for change in changes {
        namespaces |= matches!(change, Change::UpsertNamespace(_));
        touched.extend(compiler.apply(change));
    }
    if namespaces {
        // A namespace's enforcement label may have a value that means nothing.
        for w in compiler.enforcement_warnings() {
            tracing::warn!(warning = %w, "policy warning");
        }
    }
    let mut rules_changed = touched.nodes;
    let mut groups = BTreeMap::new();
    for id in touched.groups {
        let Some(group) = compiler.group(&id) else {
            // Gone: every node that held it lost its reference, so its rules changed.
            continue;
        };
        let mut nodes = Vec::new();
        for node in compiler.group_nodes(&id) {
            if rules_changed.contains(node) {
                continue;
            }
            if hub.holds(node) {
                nodes.push(node.to_string());
            } else {
                // Nothing to apply the delta to: the node gets its whole state.
                rules_changed.insert(node.to_string());
            }
        }
        groups.insert(id, GroupDelta { group, nodes });
    }
    let changed: BTreeMap<String, _> = rules_changed
        .into_iter()
        .map(|n| {
            let rules = compiler.node_rule_set(&n);
            (n, rules)
        })
        .collect();
    let delta_nodes: BTreeSet<&str> = groups
        .values()
        .flat_map(|d| &d.nodes)
        .map(String::as_str)
        .filter(|n| !changed.contains_key(*n))
        .collect();
    let reached = changed.len() + delta_nodes.len();
    drop(delta_nodes);
    (hub.publish_with_groups(changed, groups), reached)
}

/// A note for whoever reports on objects (the status writer).
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// The object's current version is rejected (`Some`) or accepted again (`None`).
    Validity(ObjectKey, Option<String>),
    /// The policy at this `metadata.generation` is in what the hub has published (sent
    /// only after that publish, so acknowledgements from then on cover it).
    Observed(PolicyId, i64),
    /// The policy's mode, when it is first known and whenever it changes (its annotation,
    /// its namespace's label): the status says "in audit" rather than "enforced".
    Mode(PolicyId, Enforcement),
    /// The policy is gone.
    Gone(PolicyId),
}

pub struct CompileLoop {
    inputs: Inputs,
    compiler: Option<StagedCompiler>,
    /// The mode of policies that neither their annotation nor their namespace sets.
    default_enforcement: Enforcement,
    pending: Vec<Change>,
    hub: Arc<Hub>,
    notes: Option<mpsc::UnboundedSender<Note>>,
    /// Generations seen since the last publish, noted once it is out.
    observed: Vec<(PolicyId, i64)>,
    /// The modes last noted.
    modes: BTreeMap<PolicyId, Enforcement>,
    /// Publish rounds so far (for tests and the bench: bursts must coalesce).
    pub rounds: u64,
}

impl CompileLoop {
    pub fn new(hub: Arc<Hub>, notes: Option<mpsc::UnboundedSender<Note>>) -> Self {
        CompileLoop {
            inputs: Inputs::default(),
            compiler: None,
            default_enforcement: Enforcement::Enforce,
            pending: Vec::new(),
            hub,
            notes,
            observed: Vec::new(),
            modes: BTreeMap::new(),
            rounds: 0,
        }
    }

    pub fn with_default_enforcement(mut self, default: Enforcement) -> Self {
        self.default_enforcement = default;
        self
    }

    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    fn handle(&mut self, event: SourceEvent) {
        let event = match event {
            SourceEvent::AtGeneration(inner, generation) => {
                if let Some(ObjectKey::Policy(id)) = inner.key() {
                    self.observed.push((id, generation));
                }
                *inner
            }
            e => e,
        };
        let metrics = &self.hub.metrics;
        match &event {
            SourceEvent::Upsert(o) => metrics
                .watch_events
                .with_label_values(&[o.key().kind().as_str()])
                .inc(),
            SourceEvent::Delete(k) => metrics
                .watch_events
                .with_label_values(&[k.kind().as_str()])
                .inc(),
            SourceEvent::Invalid { key, error } => {
                metrics
                    .watch_events
                    .with_label_values(&[key.kind().as_str()])
                    .inc();
                metrics
                    .invalid_objects
                    .with_label_values(&[key.kind().as_str()])
                    .inc();
                tracing::warn!(object = %key, %error, "rejected; its last good version stays in force");
            }
            SourceEvent::Relisted { .. } | SourceEvent::Synced => {}
            SourceEvent::AtGeneration(..) => unreachable!("unwrapped above"),
        }
        let synced = matches!(event, SourceEvent::Synced);
        let applied = self.inputs.apply(event);
        if let Some(tx) = &self.notes {
            for (key, v) in applied.validity {
                let _ = tx.send(Note::Validity(key, v));
            }
            for id in applied.gone {
                self.observed.retain(|(o, _)| *o != id);
                self.modes.remove(&id);
                let _ = tx.send(Note::Gone(id));
            }
        }
        if self.compiler.is_some() {
            self.pending.extend(applied.changes);
        } else if synced {
            let compiler = StagedCompiler::new(
                self.inputs.cluster(),
                self.inputs.policies(),
                self.default_enforcement,
            );
            self.log_warnings(&compiler);
            let all: BTreeMap<_, _> = compiler
                .node_rule_sets()
                .into_iter()
                .map(|(n, r)| (n, Some(r)))
                .collect();
            tracing::info!(nodes = all.len(), "first compile done");
            self.compiler = Some(compiler);
            self.hub.publish(all);
            self.rounds += 1;
            self.note_modes();
            self.note_observed();
        }
    }

    fn note_observed(&mut self) {
        if self.compiler.is_none() {
            return;
        }
        for (id, generation) in self.observed.drain(..) {
            if let Some(tx) = &self.notes {
                let _ = tx.send(Note::Observed(id, generation));
            }
        }
    }

    /// Notes the modes that changed. Only a compile changes them, so this runs after one,
    /// before [`Self::note_observed`]: a policy is never reported enforced that is in audit.
    fn note_modes(&mut self) {
        let (Some(compiler), Some(tx)) = (&self.compiler, &self.notes) else {
            return;
        };
        for policy in compiler.policies() {
            let mode = compiler.mode(&policy.id).unwrap_or(Enforcement::Enforce);
            if self.modes.get(&policy.id) != Some(&mode) {
                self.modes.insert(policy.id.clone(), mode);
                let _ = tx.send(Note::Mode(policy.id.clone(), mode));
            }
        }
    }

    fn log_warnings(&self, compiler: &StagedCompiler) {
        for w in compiler.warnings() {
            tracing::warn!(warning = %w, "policy warning");
        }
    }

    /// Applies what is pending and publishes the nodes it touched.
    pub fn flush(&mut self) {
        let Some(compiler) = &mut self.compiler else {
            return;
        };
        if self.pending.is_empty() {
            // An edit of fields Palisade does not read: the published state already holds
            // the new generation.
            self.note_observed();
            return;
        }
        let started = std::time::Instant::now();
        let (generation, nodes) = publish_changes(compiler, &self.hub, self.pending.drain(..));
        self.rounds += 1;
        self.hub
            .metrics
            .compile_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(generation, nodes, took = ?started.elapsed(), "published");
        self.note_modes();
        self.note_observed();
    }

    /// Runs until every sender of `events` is gone.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>, min_interval: Duration) {
        let mut last = Instant::now() - min_interval;
        while let Some(event) = events.recv().await {
            self.handle(event);
            // Take the whole burst, for at least the rest of the interval.
            let deadline = (last + min_interval).max(Instant::now());
            loop {
                tokio::select! {
                    biased;
                    e = events.recv() => match e {
                        Some(e) => self.handle(e),
                        None => break,
                    },
                    _ = sleep_until(deadline) => break,
                }
            }
            if !self.pending.is_empty() {
                self.flush();
                last = Instant::now();
            } else {
                self.note_observed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::objects::Object;
    use palisade_policy::{Labels, Namespace, Node, ENFORCEMENT_KEY};
    use palisade_resources::core::PodObject;

    fn namespace(mode: Option<&str>) -> SourceEvent {
        let mut labels = Labels::new();
        if let Some(m) = mode {
            labels.insert(ENFORCEMENT_KEY.into(), m.into());
        }
        SourceEvent::Upsert(Object::Namespace(Namespace {
            name: "shop".into(),
            labels,
        }))
    }

    fn state(hub: &Hub) -> Arc<palisade_policy::NodeRuleSet> {
        let published = hub.subscribe("n1").borrow().clone();
        published.expect("n1 published").rules
    }

    /// The stream carries audit lists: a namespace labelled audit puts its default deny in
    /// the audit list of its pod, and relabelling it enforce moves the policy into the
    /// enforced rules (and back), each a publish of the node.
    #[test]
    fn namespace_relabel_moves_its_policies_between_the_views() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let mut compile = CompileLoop::new(hub.clone(), None);
        compile.handle(namespace(Some("audit")));
        compile.handle(SourceEvent::Upsert(Object::Node(Node {
            name: "n1".into(),
            labels: Labels::new(),
            addresses: vec!["192.168.0.1".parse().unwrap()],
        })));
        compile.handle(SourceEvent::Upsert(Object::Pod(PodObject {
            namespace: "shop".into(),
            name: "b".into(),
            labels: Labels::new(),
            node: Some("n1".into()),
            ips: vec!["10.0.0.2".parse().unwrap()],
            host_network: false,
            ports: Vec::new(),
        })));
        let deny_all: serde_json::Value = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "deny-all"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        });
        let converted = palisade_resources::policy_from_value(&deny_all).unwrap();
        compile.handle(SourceEvent::Upsert(Object::Policy(converted)));
        compile.handle(SourceEvent::Synced);

        let pod = |s: &palisade_policy::NodeRuleSet| s.pods[0].clone();
        let audited = pod(&state(&hub));
        assert!(audited.ingress.isolated_by.is_empty(), "not enforced");
        let audit = audited.audit.ingress.as_ref().expect("an audit list");
        assert_eq!(audit.isolated_by[0].name, "deny-all");
        assert!(hub.spans().keys().any(|id| id.name == "deny-all"));

        compile.handle(namespace(Some("enforce")));
        compile.flush();
        let enforced = pod(&state(&hub));
        assert_eq!(enforced.ingress.isolated_by[0].name, "deny-all");
        assert!(enforced.audit.is_empty());

        compile.handle(namespace(None));
        compile.flush();
        assert_eq!(
            pod(&state(&hub)),
            enforced,
            "unlabelled: the default, enforce"
        );
    }
}
