//! Installing the network-policy-api CRDs that `scripts/tools.sh` copied from the project's Go
//! modules, the same files users install, so the apiserver validates as a real cluster does.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::Api;

use crate::error::{io, Error, Result};
use crate::lab::KubeLab;

/// The release channel of the network-policy-api CRDs. Experimental is a superset of standard
/// (for example named ports in ClusterNetworkPolicy egress).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrdChannel {
    Standard,
    Experimental,
}

impl CrdChannel {
    pub fn dir_name(self) -> &'static str {
        match self {
            CrdChannel::Standard => "standard",
            CrdChannel::Experimental => "experimental",
        }
    }
}

/// The field manager of everything the lab applies.
pub const FIELD_MANAGER: &str = "palisade-kubelab";

/// The CRD files of `channel` under `crd_dir`, sorted.
pub fn crd_files(crd_dir: &Path, channel: CrdChannel) -> Result<Vec<PathBuf>> {
    let dir = crd_dir.join(channel.dir_name());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| Error::ToolsMissing(format!("CRDs in {}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::ToolsMissing(format!("no CRDs in {}", dir.display())));
    }
    Ok(files)
}

/// Server-side applies every CRD of `channel` and waits until each is Established.
pub(crate) async fn install(lab: &KubeLab, crd_dir: &Path, channel: CrdChannel) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(lab.client().await?);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for file in crd_files(crd_dir, channel)? {
        let text =
            std::fs::read_to_string(&file).map_err(io(format!("read {}", file.display())))?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).map_err(|e| Error::Yaml {
                source_name: file.display().to_string(),
                index: 0,
                message: e.to_string(),
            })?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        names.push(name);
    }
    let log = lab.log_path("kube-apiserver");
    for name in names {
        lab.wait_for(&format!("CRD {name} to be Established"), &log, || async {
            let crd = api.get(&name).await?;
            Ok(crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await?;
    }
    Ok(())
}
