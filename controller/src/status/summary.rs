//! One ConfigMap with the whole picture, for `palisadectl status`: every policy's count and
//! generation, every node's agent. Written by the leader when it changes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use super::enforcement::{NodeState, PolicyState};
use super::report::FIELD_MANAGER;
use super::StatusWriter;

/// The ConfigMap's key holding the summary (JSON).
pub const SUMMARY_KEY: &str = "status.json";
/// ConfigMaps hold 1 MiB; past this, fully enforced policies are left out (and counted).
const MAX_BYTES: usize = 900 << 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub leader: String,
    pub nodes: BTreeMap<String, NodeState>,
    pub policies: Vec<PolicyState>,
    /// Fully enforced policies left out for size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Summary {
    pub fn new(
        leader: &str,
        nodes: BTreeMap<String, NodeState>,
        policies: Vec<PolicyState>,
    ) -> Self {
        Summary {
            leader: leader.to_string(),
            nodes,
            policies,
            omitted: 0,
        }
    }

    /// The summary as stored, within a ConfigMap's size.
    pub fn to_json(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        if json.len() <= MAX_BYTES {
            return json;
        }
        let mut cut = self.clone();
        cut.policies.retain(|p| !p.enforced());
        cut.omitted = self.policies.len() - cut.policies.len();
        serde_json::to_string(&cut).unwrap_or_default()
    }

    /// The summary's ConfigMap name, beside the election Lease.
    pub fn name(lease: &str) -> String {
        format!("{lease}-status")
    }
}

impl StatusWriter {
    pub(super) async fn write_summary(&self, summary: &Summary) -> kube::Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = Summary::name(&self.lease);
        let map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                SUMMARY_KEY.to_string(),
                summary.to_json(),
            )])),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&map).unwrap_or_default();
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(value),
        )
        .await?;
        Ok(())
    }
}
