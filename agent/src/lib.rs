//! palisade-agent: enforces a node's compiled rule set in nftables at the pod-veth
//! boundary. See `README.md` in this crate for the table layout and the agent's loop.

pub mod apply;
pub mod config;
pub mod diff;
pub mod flows;
pub mod interfaces;
pub mod metrics;
pub mod netns;
pub mod nfnl;
pub mod nft;
pub mod render;
pub mod run;
pub mod source;
pub mod stream;
pub mod sweep;

pub use apply::{Applier, ApplyKind, ApplyOutcome, ReconcileOutcome};
pub use nft::{Nft, NftError};
pub use render::{render, Interfaces, RenderError, Renderer, Ruleset};

use palisade_policy::ruleset::NodeRuleSet;

/// The nft text of the table a node with these rules and interfaces gets (for
/// `palisadectl compile -o nft`). Pure.
pub fn render_text(rules: &NodeRuleSet, interfaces: &Interfaces) -> Result<String, RenderError> {
    Ok(render::text::to_text(&render(rules, interfaces)?))
}
