//! `status.conditions` on the network-policy-api kinds: one condition of Palisade's own
//! type, applied server-side on the status subresource, so it never touches the spec and
//! leaves the conditions of other implementations alone (the list is a map keyed by type).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use palisade_policy::PolicyKind;
use serde_json::json;

use super::enforcement::PolicyState;
use super::report::FIELD_MANAGER;
use super::StatusWriter;
use crate::source::kube::{tiered, POLICY_GROUP};

/// The condition type: domain-prefixed, as the Condition type allows for a controller's own
/// conditions, so that `kubectl wait --for=condition=palisade.dev/Enforced` works.
pub const CONDITION: &str = "palisade.dev/Enforced";

impl StatusWriter {
    /// Sets Palisade's condition; false if the kind has no status conditions (or no CRD).
    pub(super) async fn set_condition(&self, state: &PolicyState, since: &Time) -> bool {
        let Some((plural, versions)) = tiered(state.policy.kind) else {
            return false;
        };
        let condition = json!({
            "type": CONDITION,
            "status": if state.enforced() { "True" } else { "False" },
            "observedGeneration": state.generation,
            "lastTransitionTime": since,
            "reason": state.reason(),
            "message": state.message(),
        });
        for version in versions {
            let gvk = GroupVersionKind::gvk(POLICY_GROUP, version, state.policy.kind.as_str());
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let patch = json!({
                "apiVersion": format!("{POLICY_GROUP}/{version}"),
                "kind": state.policy.kind.as_str(),
                "status": { "conditions": [condition] },
            });
            match api
                .patch_status(
                    &state.policy.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(patch),
                )
                .await
            {
                Ok(_) => return true,
                // This version is not served; the next one may be.
                Err(kube::Error::Api(e)) if e.code == 404 && e.reason == "NotFound" => continue,
                Err(e) => {
                    tracing::warn!(policy = %state.policy, error = %e, "cannot write status.conditions");
                    return true;
                }
            }
        }
        true
    }
}

/// Whether Palisade reports on this kind through conditions rather than Events.
pub fn has_conditions(kind: PolicyKind) -> bool {
    tiered(kind).is_some()
}
