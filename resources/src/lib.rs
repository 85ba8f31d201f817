//! Kubernetes objects into Palisade's policy model, with validation errors that name the
//! file, the object and the field.
//!
//! - Policies: `networking.k8s.io/v1` NetworkPolicy, `policy.networking.k8s.io`
//!   ClusterNetworkPolicy (v1alpha2, v1beta1), AdminNetworkPolicy and
//!   BaselineAdminNetworkPolicy (v1alpha1), all into the single [`palisade_policy::Policy`]
//!   shape. [`parse_policies`] takes a file whole or not at all; [`parse_policies_each`],
//!   [`policy_from_value`] and [`policy_from_network_policy`] convert object by object, so
//!   that a controller can skip a bad policy and keep the others in force.
//! - Cluster state: Namespaces, Pods, Nodes and Services ([`core`]).
//! - Conformance scenarios as `shared/conformance/FORMAT.md` defines them ([`scenario`]).

pub mod core;
pub mod documents;
mod enforcement;
pub mod error;
mod fields;
mod netpol;
mod placement;
mod policies;
pub mod probes;
pub mod rules_file;
pub mod scenario;
pub mod strict;
pub mod syntax;
mod tiered;

pub use error::{FieldError, LoadError, ObjectError, ObjectRef};
pub use netpol::DEFAULT_NAMESPACE;
pub use policies::{
    load_policies, parse_policies, parse_policies_each, policy_from_network_policy,
    policy_from_value, Policies,
};
pub use scenario::{load_cluster, load_scenario, parse_cluster_text, Scenario, ScenarioError};
pub use tiered::{CNP_MAX_RULES, V1ALPHA1_MAX_RULES};

use palisade_policy::{Policy, Warning};

/// One converted policy and what is worth a warning about it (parts that cannot be
/// enforced and therefore fail closed).
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    pub policy: Policy,
    pub warnings: Vec<Warning>,
}
