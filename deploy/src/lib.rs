//! Helpers for the tests of what installs Palisade on a cluster (`charts/palisade`): the
//! real `helm` and `promtool` binaries, golden files, rendered manifests, and the metric
//! names the code exports.

pub mod golden;
pub mod manifests;
pub mod metric_names;
pub mod monitoring;
pub mod promql;
pub mod tools;

use std::path::PathBuf;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is one level below the repository root")
        .to_path_buf()
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/palisade")
}
