//! The compiler: cluster state and policies in, per-node rule sets out, incrementally.
//!
//! [`Compiler`] keeps an index (labels → selector groups → rules → nodes) so that one change
//! to a pod, namespace, node or policy updates only what it affects and reports which
//! nodes' rule sets changed.

mod groups;
mod index;
mod instances;
pub(crate) mod stable_hash;
pub mod staged;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{Cluster, Enforcement, Namespace, Node, Pod, PodKey, Policy, PolicyId};
use crate::ruleset::{GroupId, NodeRuleSet};

pub use index::Compiler;
pub use staged::{enforcement_of, StagedCompiler};

/// One change to the compiler's input.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    UpsertPod(Pod),
    RemovePod(PodKey),
    UpsertNamespace(Namespace),
    RemoveNamespace(String),
    UpsertNode(Node),
    RemoveNode(String),
    UpsertPolicy(Policy),
    RemovePolicy(PolicyId),
}

/// What a change did: the nodes whose rules differ now, and the address groups whose
/// members differ now.
///
/// A changed group is a change of its own: the nodes that reference it
/// ([`Compiler::group_nodes`]) hold it unchanged in every other respect, so each of them
/// needs the group's new members ([`Compiler::group`]) and nothing else, unless it is
/// also in `nodes`. A node in `nodes` may differ in anything, groups included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub nodes: BTreeSet<String>,
    pub groups: BTreeSet<GroupId>,
}

impl Touched {
    /// Adds what another change did (for a batch of changes published together).
    pub fn extend(&mut self, other: Touched) {
        self.nodes.extend(other.nodes);
        self.groups.extend(other.groups);
    }
}

/// Something worth a human's attention that does not stop compilation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Warning {
    pub policies: Vec<PolicyId>,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.policies.iter().map(|p| p.to_string()).collect();
        write!(f, "{}: {}", names.join(", "), self.message)
    }
}

/// Compiles everything at once: every node's rule set, keyed by node name.
pub fn compile(cluster: &Cluster, policies: &[Policy]) -> BTreeMap<String, NodeRuleSet> {
    Compiler::new(cluster.clone(), policies.to_vec()).node_rule_sets()
}

/// Compiles everything at once with audit: the enforced view, and where it differs the
/// full view ([`StagedCompiler`]), for every node.
pub fn compile_staged(
    cluster: &Cluster,
    policies: &[Policy],
    default: Enforcement,
) -> BTreeMap<String, NodeRuleSet> {
    StagedCompiler::new(cluster.clone(), policies.to_vec(), default).node_rule_sets()
}
