//! Each replica's report of the agents connected to it, so that the leader can count
//! nodes it does not serve. A report is a Lease per replica: its renew time says the
//! replica is alive, and an annotation carries its nodes (compact JSON). Only the
//! replica's own nodes: a few tens of bytes per node, within the annotations' 256 KiB
//! up to several thousand nodes per replica.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

use super::enforcement::NodeReport;
use super::now;

pub const FIELD_MANAGER: &str = "palisade-controller";
/// The label that marks reports, valued with the election Lease's name.
pub const REPORT_LABEL: &str = "palisade.dev/report";
pub const NODES_ANNOTATION: &str = "palisade.dev/nodes";
/// A report not renewed for this long is from a replica that is gone.
pub const FRESH: Duration = Duration::from_secs(15);
/// The leader deletes reports this old.
const FORGOTTEN: Duration = Duration::from_secs(300);

/// The report's name: the election Lease's name and the identity, as a valid object name.
pub fn name(lease: &str, identity: &str) -> String {
    let mut out = format!("{lease}-report-");
    for c in identity.to_lowercase().chars() {
        out.push(if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
            c
        } else {
            '-'
        });
    }
    out.truncate(253);
    while out.ends_with(['-', '.']) {
        out.pop();
    }
    out
}

pub struct Reports {
    pub api: Api<Lease>,
    pub lease: String,
    pub identity: String,
}

impl Reports {
    pub async fn write(&self, nodes: &BTreeMap<String, NodeReport>) -> kube::Result<()> {
        let name = name(&self.lease, &self.identity);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    REPORT_LABEL.to_string(),
                    self.lease.clone(),
                )])),
                annotations: Some(BTreeMap::from([(
                    NODES_ANNOTATION.to_string(),
                    serde_json::to_string(nodes).unwrap_or_default(),
                )])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(FRESH.as_secs() as i32),
                renew_time: Some(now()),
                ..Default::default()
            }),
        };
        // Typed objects serialize their apiVersion and kind, as an apply patch needs.
        self.api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await?;
        Ok(())
    }

    /// Every fresh report, by replica; deletes forgotten ones (the leader calls this).
    pub async fn read(&self) -> kube::Result<BTreeMap<String, BTreeMap<String, NodeReport>>> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{REPORT_LABEL}={}", self.lease)))
            .await?;
        let mut out = BTreeMap::new();
        for lease in list {
            let spec = lease.spec.clone().unwrap_or_default();
            let age = spec.renew_time.as_ref().map(|t| {
                k8s_openapi::jiff::Timestamp::now()
                    .duration_since(t.0)
                    .as_secs_f64()
            });
            let name = lease.metadata.name.clone().unwrap_or_default();
            match age {
                Some(a) if a <= FRESH.as_secs_f64() => {}
                Some(a) if a <= FORGOTTEN.as_secs_f64() => continue,
                _ => {
                    let _ = self.api.delete(&name, &DeleteParams::default()).await;
                    continue;
                }
            }
            let nodes = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(NODES_ANNOTATION))
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default();
            out.insert(spec.holder_identity.unwrap_or(name), nodes);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_valid_object_names() {
        assert_eq!(
            super::name("palisade-controller", "Ctl_0.x"),
            "palisade-controller-report-ctl-0.x"
        );
        let long = super::name("l", &"a".repeat(300));
        assert!(long.len() <= 253);
        assert_eq!(super::name("l", "x--"), "l-report-x");
    }
}
