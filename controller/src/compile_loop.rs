//! The one writer: source events into the input store, changes into the incremental
//! compiler, and the nodes they touched into the hub, at most once per `min_interval`.
//!
//! Nothing is published before every source has listed everything once (`Synced`): an
//! agent served from half a cluster would enforce too little.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::{Change, Compiler, PolicyId, Touched};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::hub::{GroupDelta, Hub};
use crate::inputs::Inputs;
use crate::objects::{ObjectKey, SourceEvent};

/// Applies `changes` to the compiler and publishes one generation: the nodes whose rules
/// changed get their state compiled again, the other nodes that hold a changed group get
/// its new members as a delta. Returns the generation and how many nodes it reached.
pub fn publish_changes(
    compiler: &mut Compiler,
    hub: &Hub,
    changes: impl IntoIterator<Item = Change>,
) -> (u64, usize) {
    let mut touched = Touched::default();
    for change in changes {
        touched.extend(compiler.apply(change));
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
    /// The policy is gone.
    Gone(PolicyId),
}

pub struct CompileLoop {
    inputs: Inputs,
    compiler: Option<Compiler>,
    pending: Vec<Change>,
    hub: Arc<Hub>,
    notes: Option<mpsc::UnboundedSender<Note>>,
    /// Generations seen since the last publish, noted once it is out.
    observed: Vec<(PolicyId, i64)>,
    /// Publish rounds so far (for tests and the bench: bursts must coalesce).
    pub rounds: u64,
}

impl CompileLoop {
    pub fn new(hub: Arc<Hub>, notes: Option<mpsc::UnboundedSender<Note>>) -> Self {
        CompileLoop {
            inputs: Inputs::default(),
            compiler: None,
            pending: Vec::new(),
            hub,
            notes,
            observed: Vec::new(),
            rounds: 0,
        }
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
                let _ = tx.send(Note::Gone(id));
            }
        }
        if self.compiler.is_some() {
            self.pending.extend(applied.changes);
        } else if synced {
            let compiler = Compiler::new(self.inputs.cluster(), self.inputs.policies());
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

    fn log_warnings(&self, compiler: &Compiler) {
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
