//! A conformance scenario directory (FORMAT.md): `cluster.yaml`, `policies.yaml`,
//! `probes.yaml`.

use std::fmt;
use std::path::{Path, PathBuf};

use palisade_policy::{Cluster, Policy, Warning};

use crate::core::Service;
use crate::error::LoadError;
use crate::placement::build_cluster;
use crate::policies::load_policies;
use crate::probes::{parse_probes, Probe};

pub use crate::placement::DEFAULT_NODE;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub dir: PathBuf,
    /// The directory's name.
    pub name: String,
    pub cluster: Cluster,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    pub probes: Vec<Probe>,
    /// From the conversion of the policies (parts that fail closed).
    pub warnings: Vec<Warning>,
}

/// Everything that keeps a scenario from loading, file by file.
#[derive(Debug, thiserror::Error)]
pub struct ScenarioError {
    pub dir: PathBuf,
    pub errors: Vec<LoadError>,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// A cluster file, completed with nodes, placement and addresses where it leaves them out
/// (see the `placement` module): the cluster and its services.
pub fn load_cluster(path: &Path) -> Result<(Cluster, Vec<Service>), LoadError> {
    LoadError::read_then(path, parse_cluster_text)
}

/// Cluster state from YAML text (`file` names it in errors), as [`load_cluster`] reads it.
pub fn parse_cluster_text(file: &str, text: &str) -> Result<(Cluster, Vec<Service>), LoadError> {
    let objects = crate::core::parse_cluster(file, text)?;
    let cluster = build_cluster(&objects).map_err(|errors| LoadError::Invalid {
        file: file.to_string(),
        errors,
    })?;
    Ok((cluster, objects.services))
}

/// Loads a scenario directory; every file is read and every error reported.
pub fn load_scenario(dir: &Path) -> Result<Scenario, ScenarioError> {
    let mut errors = Vec::new();
    let cluster = load_cluster(&dir.join("cluster.yaml"))
        .map_err(|e| errors.push(e))
        .ok();
    let policies = load_policies(&dir.join("policies.yaml"))
        .map_err(|e| errors.push(e))
        .ok();
    let probes_path = dir.join("probes.yaml");
    let probes = match (&cluster, LoadError::read_text(&probes_path)) {
        (_, Err(e)) => {
            errors.push(e);
            None
        }
        // Probes name pods, so they can only be checked against a readable cluster.
        (None, Ok(_)) => None,
        (Some((cluster, _)), Ok(text)) => {
            parse_probes(&probes_path.display().to_string(), &text, cluster)
                .map_err(|e| errors.push(e))
                .ok()
        }
    };
    match (cluster, policies, probes) {
        (Some((cluster, services)), Some(policies), Some(probes)) if errors.is_empty() => {
            Ok(Scenario {
                name: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string()),
                dir: dir.to_path_buf(),
                cluster,
                services,
                policies: policies.policies,
                probes,
                warnings: policies.warnings,
            })
        }
        _ => Err(ScenarioError {
            dir: dir.to_path_buf(),
            errors,
        }),
    }
}
