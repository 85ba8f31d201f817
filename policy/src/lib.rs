//! Palisade's policy engine: the model of cluster state and policies, the compiler into
//! per-node rule sets, and a reference evaluator of the specifications.
//!
//! Pure by design: plain structs in, plain structs out. No I/O, no async, no Kubernetes
//! client; the shells around it (controller, agent, palisadectl) do that.

pub mod addrset;
pub mod compile;
pub mod evaluate;
mod labels;
pub mod model;
pub mod ruleset;
pub mod selector;
pub mod verdict;
#[cfg(feature = "workloads")]
pub mod workloads;

pub use addrset::AddrSet;
pub use compile::{compile, compile_staged, Change, Compiler, StagedCompiler, Touched, Warning};
pub use model::*;
pub use ruleset::{AuditRules, NodeRuleSet, PodRules};
pub use selector::{LabelSelector, Operator, Requirement};
pub use verdict::{AuditDecision, DirectionDecision, Flow, FlowDecision, Reason, Verdict};
