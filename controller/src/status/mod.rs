//! The status writer: what users are told about policies, from one replica at a time.
//!
//! Every replica compiles and serves, and reports the agents connected to it (a Lease of
//! its own, see [`report`]). The replica holding the election Lease reads every report and
//! writes, for each policy, on how many of its nodes it is enforced: `status.conditions`
//! on the network-policy-api kinds, Events on NetworkPolicies (whose API has no status),
//! and one summary ConfigMap that `palisadectl status` reads. Policies Palisade rejects get
//! a Warning Event naming the field (the other policies stay in force). One writer, so
//! that users see one Event per rejection, not one per replica.

mod conditions;
pub mod enforcement;
mod events;
mod lease;
pub mod report;
mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::Api;
use palisade_policy::{Enforcement, PolicyId};
use tokio::sync::mpsc;

use crate::compile_loop::Note;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::objects::ObjectKey;
use enforcement::{NodeReport, PolicyState};
use report::Reports;

pub use conditions::CONDITION;
pub use summary::{Summary, SUMMARY_KEY};

pub const REPORTING_CONTROLLER: &str = "palisade.dev/controller";
const LEASE_SECONDS: i32 = 15;
const RENEW: Duration = Duration::from_secs(3);
/// A report unchanged is still rewritten this often, to show the replica is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Status writes per round at most, so that a first start with thousands of policies is
/// spread over rounds instead of one burst at the apiserver.
const WRITES_PER_ROUND: usize = 100;

pub struct StatusWriter {
    pub client: kube::Client,
    pub namespace: String,
    pub lease: String,
    pub identity: String,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// What the writer knows and has written.
#[derive(Default)]
struct State {
    invalid: BTreeMap<ObjectKey, String>,
    warned: BTreeMap<ObjectKey, String>,
    /// Policies in the published state, at their `metadata.generation`.
    observed: BTreeMap<PolicyId, i64>,
    /// Policies in audit.
    audit: BTreeSet<PolicyId>,
    /// What was last written per policy, and since when its condition has had its status.
    written: BTreeMap<PolicyId, (PolicyState, Time)>,
    /// The previous round's states: Events are written only for states that held a round.
    previous: BTreeMap<PolicyId, PolicyState>,
    summary: Option<Summary>,
    report: Option<(BTreeMap<String, NodeReport>, Instant)>,
}

impl State {
    fn note(&mut self, note: Note) {
        match note {
            Note::Validity(key, Some(error)) => {
                self.invalid.insert(key, error);
            }
            Note::Validity(key, None) => {
                self.invalid.remove(&key);
                self.warned.remove(&key);
            }
            Note::Observed(id, generation) => {
                self.observed.insert(id, generation);
            }
            Note::Mode(id, mode) => {
                if mode == Enforcement::Audit {
                    self.audit.insert(id);
                } else {
                    self.audit.remove(&id);
                }
            }
            Note::Gone(id) => {
                self.observed.remove(&id);
                self.audit.remove(&id);
                self.written.remove(&id);
                self.previous.remove(&id);
            }
        }
    }
}

impl StatusWriter {
    /// Runs until `notes` closes.
    pub async fn run(self, mut notes: mpsc::UnboundedReceiver<Note>) {
        let mut state = State::default();
        let mut leader = false;
        let mut tick = tokio::time::interval(RENEW);
        let reports = Reports {
            api: Api::namespaced(self.client.clone(), &self.namespace),
            lease: self.lease.clone(),
            identity: self.identity.clone(),
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                note = notes.recv() => match note {
                    None => return,
                    Some(note) => {
                        state.note(note);
                        // Take what else is queued before acting.
                        while let Ok(n) = notes.try_recv() {
                            state.note(n);
                        }
                        if !leader {
                            continue;
                        }
                        self.warn_rejected(&mut state).await;
                        continue;
                    }
                },
            }
            let now_leader = match self.hold_lease().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the status Lease");
                    false
                }
            };
            if now_leader != leader {
                tracing::info!(identity = %self.identity, leader = now_leader, "status writer");
                leader = now_leader;
                self.metrics.is_leader.set(i64::from(leader));
                if !leader {
                    state.written.clear();
                    state.summary = None;
                }
            }
            self.report(&reports, &mut state).await;
            if leader {
                self.warn_rejected(&mut state).await;
                match reports.read().await {
                    Ok(all) => self.write_status(&all, &mut state).await,
                    Err(e) => tracing::warn!(error = %e, "cannot read the replicas' reports"),
                }
            }
        }
    }

    async fn warn_rejected(&self, state: &mut State) {
        for (key, error) in &state.invalid {
            if state.warned.get(key) != Some(error) {
                self.warn(key, error).await;
                state.warned.insert(key.clone(), error.clone());
            }
        }
    }

    async fn report(&self, reports: &Reports, state: &mut State) {
        let nodes = NodeReport::from_hub(&self.hub.node_status());
        let due = match &state.report {
            Some((last, at)) => *last != nodes || at.elapsed() >= HEARTBEAT,
            None => true,
        };
        if !due {
            return;
        }
        match reports.write(&nodes).await {
            Ok(()) => state.report = Some((nodes, Instant::now())),
            Err(e) => tracing::warn!(error = %e, "cannot write this replica's report"),
        }
    }

    async fn write_status(
        &self,
        all: &BTreeMap<String, BTreeMap<String, NodeReport>>,
        state: &mut State,
    ) {
        let nodes = enforcement::merge(all);
        let invalid: BTreeMap<PolicyId, String> = state
            .invalid
            .iter()
            .filter_map(|(k, e)| match k {
                ObjectKey::Policy(id) => Some((id.clone(), e.clone())),
                _ => None,
            })
            .collect();
        let policies = enforcement::policies(
            &state.observed,
            &invalid,
            &state.audit,
            &self.hub.spans(),
            &nodes,
        );
        let mut writes = 0;
        for p in &policies {
            if writes >= WRITES_PER_ROUND {
                break;
            }
            let last = state.written.get(&p.policy);
            if last.map(|(w, _)| w) == Some(p) {
                continue;
            }
            if conditions::has_conditions(p.policy.kind) {
                let since = match last {
                    Some((w, t)) if w.enforced() == p.enforced() => t.clone(),
                    _ => Time(k8s_openapi::jiff::Timestamp::now()),
                };
                writes += 1;
                if self.set_condition(p, &since).await {
                    state.written.insert(p.policy.clone(), (p.clone(), since));
                }
            } else if state.previous.get(&p.policy) == Some(p) && p.rejected.is_none() {
                // NetworkPolicy: an Event once the count has held for a round.
                writes += 1;
                let note = format!("{} (generation {})", p.message(), p.generation);
                let (kind, reason) = if p.enforced() {
                    ("Normal", "Enforced")
                } else if p.in_force() {
                    ("Normal", "InAudit")
                } else {
                    ("Warning", "NotEnforced")
                };
                self.event(&ObjectKey::Policy(p.policy.clone()), kind, reason, note)
                    .await;
                let since = Time(k8s_openapi::jiff::Timestamp::now());
                state.written.insert(p.policy.clone(), (p.clone(), since));
            }
        }
        state.previous = policies
            .iter()
            .map(|p| (p.policy.clone(), p.clone()))
            .collect();
        let summary = Summary::new(&self.identity, nodes, policies);
        if state.summary.as_ref() != Some(&summary) {
            match self.write_summary(&summary).await {
                Ok(()) => state.summary = Some(summary),
                Err(e) => tracing::warn!(error = %e, "cannot write the status summary"),
            }
        }
    }
}
