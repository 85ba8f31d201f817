//! The `--cluster` / `--policies` pair that compile and explain share.

use std::path::PathBuf;

use anyhow::Result;
use palisade_policy::{Cluster, Policy, Warning};

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Cluster state: multi-document YAML of Namespaces, Pods, Nodes and Services.
    #[arg(long, value_name = "FILE")]
    pub cluster: PathBuf,
    /// Policies: multi-document YAML of NetworkPolicies, ClusterNetworkPolicies,
    /// AdminNetworkPolicies and BaselineAdminNetworkPolicies.
    #[arg(long, value_name = "FILE")]
    pub policies: PathBuf,
}

pub struct Inputs {
    pub cluster: Cluster,
    pub policies: Vec<Policy>,
}

impl ClusterArgs {
    /// Both files, each valid as a whole; warnings go to stderr.
    pub fn load(&self) -> Result<Inputs> {
        let (cluster, _services) = palisade_resources::load_cluster(&self.cluster)?;
        let policies = palisade_resources::load_policies(&self.policies)?;
        print_warnings(&policies.warnings);
        Ok(Inputs {
            cluster,
            policies: policies.policies,
        })
    }
}

pub fn print_warnings(warnings: &[Warning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}
