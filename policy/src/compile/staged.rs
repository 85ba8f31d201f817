//! Audit (staged) enforcement: two views of the same cluster, compiled side by side.
//!
//! The enforced view is the compile of the policies in `enforce` mode only; the full view
//! the compile of all of them. The agent enforces the first and reports where the second
//! would deny, so a policy in audit never changes what is enforced.
//!
//! [`StagedCompiler`] wraps two incremental [`Compiler`]s rather than teaching one about
//! modes: the full one exists only while some policy is in audit, so a cluster without
//! audit policies compiles once, as before. A pod's compiled rules carry the full view of a
//! direction ([`crate::ruleset::AuditRules`]) only where it differs from the enforced one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Change, Compiler, Touched, Warning};
use crate::model::{
    Cluster, Enforcement, Namespace, Policy, PolicyId, PolicyKind, ENFORCEMENT_KEY,
};
use crate::ruleset::{Group, NodeRuleSet};

/// The mode a policy is in: its own annotation, else (NetworkPolicies) its namespace's
/// label, else the cluster default. An unknown label value fails closed: `enforce`.
pub fn enforcement_of(policy: &Policy, cluster: &Cluster, default: Enforcement) -> Enforcement {
    if let Some(mode) = policy.enforcement {
        return mode;
    }
    namespace_enforcement(policy, cluster).unwrap_or(default)
}

/// What a NetworkPolicy's namespace label says, if it says anything.
fn namespace_enforcement(policy: &Policy, cluster: &Cluster) -> Option<Enforcement> {
    if policy.id.kind != PolicyKind::NetworkPolicy {
        return None;
    }
    let ns = policy.id.namespace.as_deref()?;
    namespace_label(cluster.namespaces.get(ns)?)
}

fn namespace_label(ns: &Namespace) -> Option<Enforcement> {
    let value = ns.labels.get(ENFORCEMENT_KEY)?;
    Some(Enforcement::parse(value).unwrap_or(Enforcement::Enforce))
}

/// The enforced and the full view of one cluster, incrementally.
pub struct StagedCompiler {
    default: Enforcement,
    /// The policies in `enforce` mode.
    enforced: Compiler,
    /// Every policy; only while some policy is in audit (otherwise it equals `enforced`).
    full: Option<Compiler>,
    /// Every policy's resolved mode.
    modes: BTreeMap<PolicyId, Enforcement>,
    audited: usize,
}

impl StagedCompiler {
    /// A full compile of both views.
    pub fn new(cluster: Cluster, policies: Vec<Policy>, default: Enforcement) -> Self {
        let modes: BTreeMap<PolicyId, Enforcement> = policies
            .iter()
            .map(|p| (p.id.clone(), enforcement_of(p, &cluster, default)))
            .collect();
        let audited = modes.values().filter(|m| **m == Enforcement::Audit).count();
        let (enforced, full) = if audited == 0 {
            (Compiler::new(cluster, policies), None)
        } else {
            let enforce: Vec<Policy> = policies
                .iter()
                .filter(|p| modes[&p.id] == Enforcement::Enforce)
                .cloned()
                .collect();
            let full = Compiler::new(cluster.clone(), policies);
            (Compiler::new(cluster, enforce), Some(full))
        };
        StagedCompiler {
            default,
            enforced,
            full,
            modes,
            audited,
        }
    }

    pub fn default_enforcement(&self) -> Enforcement {
        self.default
    }

    /// Whether some policy is in audit (a second compile is kept).
    pub fn has_audit(&self) -> bool {
        self.full.is_some()
    }

    pub fn cluster(&self) -> &Cluster {
        self.enforced.cluster()
    }

    /// The compiler holding every policy.
    fn all(&self) -> &Compiler {
        self.full.as_ref().unwrap_or(&self.enforced)
    }

    /// Every policy, in either mode.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.all().policies()
    }

    /// A policy's resolved mode, if the policy is known.
    pub fn mode(&self, id: &PolicyId) -> Option<Enforcement> {
        self.modes.get(id).copied()
    }

    pub fn nodes(&self) -> BTreeSet<&str> {
        self.enforced.nodes()
    }

    /// Applies one change to both views; the nodes touched are those of either view.
    pub fn apply(&mut self, change: Change) -> Touched {
        let mut t = Touched::default();
        match change {
            Change::UpsertPolicy(p) => self.upsert_policy(p, &mut t),
            Change::RemovePolicy(id) => self.remove_policy(id, &mut t),
            Change::UpsertNamespace(ns) => {
                let name = ns.name.clone();
                self.namespace_changed(&name, Change::UpsertNamespace(ns), &mut t);
            }
            Change::RemoveNamespace(name) => {
                self.namespace_changed(&name.clone(), Change::RemoveNamespace(name), &mut t);
            }
            other => self.forward(other, &mut t),
        }
        t
    }

    fn forward(&mut self, change: Change, t: &mut Touched) {
        if let Some(full) = &mut self.full {
            t.extend(full.apply(change.clone()));
        }
        t.extend(self.enforced.apply(change));
    }

    fn set_mode(&mut self, id: &PolicyId, mode: Option<Enforcement>) -> Option<Enforcement> {
        let old = match mode {
            Some(m) => self.modes.insert(id.clone(), m),
            None => self.modes.remove(id),
        };
        let audit = |m: Option<Enforcement>| usize::from(m == Some(Enforcement::Audit));
        self.audited = self.audited + audit(mode) - audit(old);
        old
    }

    /// Before the first policy goes into audit, the full view starts as a copy of the
    /// enforced one (they are equal while nothing is in audit), so the change that follows
    /// reports exactly the nodes it makes differ.
    fn ensure_full(&mut self) {
        if self.full.is_none() {
            let policies = self.enforced.policies().cloned().collect();
            self.full = Some(Compiler::new(self.enforced.cluster().clone(), policies));
        }
    }

    /// With no policy left in audit the views are equal again: the second compile goes.
    fn drop_full_if_unused(&mut self) {
        if self.audited == 0 {
            self.full = None;
        }
    }

    fn upsert_policy(&mut self, policy: Policy, t: &mut Touched) {
        let mode = enforcement_of(&policy, self.cluster(), self.default);
        let id = policy.id.clone();
        let old = self.set_mode(&id, Some(mode));
        if mode == Enforcement::Audit {
            self.ensure_full();
        }
        if let Some(full) = &mut self.full {
            t.extend(full.apply(Change::UpsertPolicy(policy.clone())));
        }
        match mode {
            Enforcement::Enforce => {
                t.extend(self.enforced.apply(Change::UpsertPolicy(policy)));
            }
            Enforcement::Audit if old == Some(Enforcement::Enforce) => {
                t.extend(self.enforced.apply(Change::RemovePolicy(id)));
            }
            Enforcement::Audit => {}
        }
        self.drop_full_if_unused();
    }

    fn remove_policy(&mut self, id: PolicyId, t: &mut Touched) {
        let old = self.set_mode(&id, None);
        if let Some(full) = &mut self.full {
            t.extend(full.apply(Change::RemovePolicy(id.clone())));
        }
        if old == Some(Enforcement::Enforce) {
            t.extend(self.enforced.apply(Change::RemovePolicy(id)));
        }
        self.drop_full_if_unused();
    }

    /// A namespace's label may move its NetworkPolicies between the views.
    fn namespace_changed(&mut self, name: &str, change: Change, t: &mut Touched) {
        self.forward(change, t);
        let moved: Vec<(Policy, Enforcement)> = self
            .policies()
            .filter(|p| {
                p.id.kind == PolicyKind::NetworkPolicy && p.id.namespace.as_deref() == Some(name)
            })
            .filter_map(|p| {
                let mode = enforcement_of(p, self.cluster(), self.default);
                (self.modes.get(&p.id) != Some(&mode)).then(|| (p.clone(), mode))
            })
            .collect();
        for (policy, mode) in moved {
            self.set_mode(&policy.id, Some(mode));
            match mode {
                Enforcement::Audit => {
                    self.ensure_full();
                    let id = policy.id;
                    t.extend(self.enforced.apply(Change::RemovePolicy(id)));
                }
                Enforcement::Enforce => {
                    t.extend(self.enforced.apply(Change::UpsertPolicy(policy)));
                }
            }
        }
        self.drop_full_if_unused();
    }

    /// A live group's members. Ids name definitions, and members follow from the cluster
    /// alone, so a group both views hold is the same in each.
    pub fn group(&self, id: &str) -> Option<Arc<Group>> {
        self.enforced
            .group(id)
            .or_else(|| self.full.as_ref()?.group(id))
    }

    /// The nodes whose rules (enforced or audit lists) reference a live group, each once.
    pub fn group_nodes(&self, id: &str) -> BTreeSet<&str> {
        let mut nodes: BTreeSet<&str> = self.enforced.group_nodes(id).collect();
        if let Some(full) = &self.full {
            nodes.extend(full.group_nodes(id));
        }
        nodes
    }

    /// One node's enforced rule set, with the full view of each pod's direction where it
    /// differs (and the groups and rules that view references).
    pub fn node_rule_set(&self, node: &str) -> Option<NodeRuleSet> {
        let mut set = self.enforced.node_rule_set(node)?;
        let Some(full) = self.full.as_ref().and_then(|f| f.node_rule_set(node)) else {
            return Some(set);
        };
        let mut differs = false;
        for pod in &mut set.pods {
            let Some(would) = full
                .pods
                .binary_search_by(|p| {
                    (p.namespace.as_str(), p.name.as_str())
                        .cmp(&(pod.namespace.as_str(), pod.name.as_str()))
                })
                .ok()
                .map(|i| &full.pods[i])
            else {
                continue;
            };
            if *would.ingress != *pod.ingress {
                pod.audit.ingress = Some(would.ingress.clone());
                differs = true;
            }
            if *would.egress != *pod.egress {
                pod.audit.egress = Some(would.egress.clone());
                differs = true;
            }
        }
        if differs {
            // The full view's groups and rules are the enforced view's (same definitions,
            // same ids) and those its differing lists reference.
            for (id, group) in full.groups {
                set.groups.entry(id).or_insert(group);
            }
            let rules = Arc::make_mut(&mut set.rules);
            for (id, origin) in full.rules.iter() {
                rules.entry(id.clone()).or_insert_with(|| origin.clone());
            }
        }
        Some(set)
    }

    pub fn node_rule_sets(&self) -> BTreeMap<String, NodeRuleSet> {
        self.nodes()
            .into_iter()
            .filter_map(|n| self.node_rule_set(n).map(|s| (n.to_string(), s)))
            .collect()
    }

    /// The compilers' warnings (of the full view: they are about policies, in either mode),
    /// and [`Self::enforcement_warnings`].
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out = self.all().warnings();
        out.extend(self.enforcement_warnings());
        out
    }

    /// Namespaces whose enforcement label has a value that means nothing.
    pub fn enforcement_warnings(&self) -> Vec<Warning> {
        let mut out = Vec::new();
        for ns in self.cluster().namespaces.values() {
            let Some(value) = ns.labels.get(ENFORCEMENT_KEY) else {
                continue;
            };
            if Enforcement::parse(value).is_none() {
                let policies = self
                    .policies()
                    .filter(|p| namespace_enforcement(p, self.cluster()).is_some())
                    .filter(|p| p.enforcement.is_none())
                    .filter(|p| p.id.namespace.as_deref() == Some(ns.name.as_str()))
                    .map(|p| p.id.clone())
                    .collect();
                out.push(Warning {
                    policies,
                    message: format!(
                        "Namespace {}: metadata.labels[{ENFORCEMENT_KEY}]: unknown value {value:?} \
                         (audit or enforce); its NetworkPolicies are enforced",
                        ns.name
                    ),
                });
            }
        }
        out
    }
}
