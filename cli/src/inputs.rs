//! What compile and explain read: the `--cluster` / `--policies` pair, or with neither, the
//! live cluster of the kubeconfig, read and converted exactly as the controller does.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use palisade_controller::inputs::Inputs as ControllerInputs;
use palisade_policy::{Cluster, Policy, Warning};
use palisade_resources::core::Service;

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Cluster state: multi-document YAML of Namespaces, Pods, Nodes and Services.
    /// Without --cluster and --policies, the live cluster is read.
    #[arg(
        long,
        value_name = "FILE",
        requires = "policies",
        conflicts_with = "kubeconfig"
    )]
    pub cluster: Option<PathBuf>,
    /// Policies: multi-document YAML of NetworkPolicies, ClusterNetworkPolicies,
    /// AdminNetworkPolicies and BaselineAdminNetworkPolicies.
    #[arg(
        long,
        value_name = "FILE",
        requires = "cluster",
        conflicts_with = "kubeconfig"
    )]
    pub policies: Option<PathBuf>,
    /// The mode of policies that neither their `palisade.dev/enforcement` annotation nor
    /// (NetworkPolicies) their namespace's label of that name sets: audit or enforce.
    #[arg(long, value_name = "MODE", default_value = "enforce")]
    pub default_enforcement: palisade_policy::Enforcement,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Where the live cluster is.
#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    /// The kubeconfig to read the live cluster with (default: KUBECONFIG, ~/.kube/config,
    /// or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

impl KubeArgs {
    pub fn client(&self, rt: &tokio::runtime::Runtime) -> Result<kube::Client> {
        rt.block_on(palisade_controller::run::kube_client(
            self.kubeconfig.as_deref(),
        ))
        .context("cannot reach the cluster (give --kubeconfig, or --cluster and --policies files)")
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub struct Inputs {
    pub cluster: Cluster,
    pub policies: Vec<Policy>,
    pub services: Vec<Service>,
}

impl ClusterArgs {
    /// Both files, each valid as a whole, or the live cluster; warnings go to stderr.
    pub fn load(&self) -> Result<Inputs> {
        match (&self.cluster, &self.policies) {
            (Some(cluster), Some(policies)) => {
                let (cluster, services) = palisade_resources::load_cluster(cluster)?;
                let policies = palisade_resources::load_policies(policies)?;
                print_warnings(&policies.warnings);
                Ok(Inputs {
                    cluster,
                    policies: policies.policies,
                    services,
                })
            }
            (None, None) => self.live(),
            _ => bail!("give both --cluster and --policies, or neither to read the live cluster"),
        }
    }

    fn live(&self) -> Result<Inputs> {
        let rt = runtime()?;
        let client = self.kube.client(&rt)?;
        let events = rt.block_on(palisade_controller::source::kube::snapshot(client))?;
        let mut inputs = ControllerInputs::default();
        for event in events {
            inputs.apply(event);
        }
        // As on the controller: a rejected object is not enforced (its last good version
        // would be, but a one-off read has none).
        for (key, error) in inputs.invalid() {
            eprintln!("warning: {key} is rejected and not enforced: {error}");
        }
        for (_, warnings) in inputs.warnings() {
            print_warnings(warnings);
        }
        Ok(Inputs {
            cluster: inputs.cluster(),
            policies: inputs.policies(),
            services: inputs.services().cloned().collect(),
        })
    }
}

pub fn print_warnings(warnings: &[Warning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}
