//! The stream between palisade-controller and palisade-agent (`proto/palisade/v1/rules.proto`).
//!
//! - [`pb`]: the generated messages and the `RuleStream` service.
//! - [`convert`]: the compiled form ([`NodeRuleSet`]) to messages and back; decoding checks
//!   every field, since a message is input like any other.
//! - [`delta`]: what changed between two states of a node ([`delta::diff`]), applying an
//!   update ([`delta::apply`]), and the digest that proves both sides hold the same state.

pub mod convert;
pub mod delta;

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("palisade.v1");
}

pub use convert::{Form, WireError};
pub use delta::{apply, diff, diff_in, digest, digest_in, snapshot};

pub use palisade_policy::NodeRuleSet;
