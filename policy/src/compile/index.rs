//! Placeholder: replaced by the indexed compiler.

use std::collections::BTreeMap;

use super::{Change, Touched, Warning};
use crate::model::{Cluster, Policy};
use crate::ruleset::NodeRuleSet;

pub struct Compiler {
    _cluster: Cluster,
    _policies: Vec<Policy>,
}

impl Compiler {
    /// A full compile of `cluster` and `policies`.
    pub fn new(cluster: Cluster, policies: Vec<Policy>) -> Self {
        Compiler {
            _cluster: cluster,
            _policies: policies,
        }
    }

    /// Applies one change and says which nodes' rule sets it changed.
    pub fn apply(&mut self, _change: Change) -> Touched {
        unimplemented!()
    }

    pub fn node_rule_set(&self, _node: &str) -> Option<NodeRuleSet> {
        unimplemented!()
    }

    pub fn node_rule_sets(&self) -> BTreeMap<String, NodeRuleSet> {
        unimplemented!()
    }

    pub fn warnings(&self) -> Vec<Warning> {
        unimplemented!()
    }

    pub fn cluster(&self) -> &Cluster {
        &self._cluster
    }
}
