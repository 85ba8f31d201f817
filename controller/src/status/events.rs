//! Events where users look: a Warning on an object Palisade rejects, naming the field, and
//! on kinds without status conditions (NetworkPolicy), a Normal Event when the number of
//! nodes enforcing it settles.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use palisade_policy::PolicyKind;

use super::{now, StatusWriter, REPORTING_CONTROLLER};
use crate::objects::ObjectKey;

impl StatusWriter {
    pub(super) async fn warn(&self, key: &ObjectKey, error: &str) {
        let note = format!("Palisade does not enforce this version: {error}");
        self.event(key, "Warning", "Rejected", note).await;
    }

    pub(super) async fn event(&self, key: &ObjectKey, type_: &str, reason: &str, mut note: String) {
        let (api_version, kind, namespace, name) = regarding(key);
        // Events about cluster-scoped objects live in `default`, as kubectl expects.
        let event_ns = namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &event_ns);
        if note.len() > 1000 {
            let mut cut = 997;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        let event = Event {
            metadata: ObjectMeta {
                // As client-go names them: the object's name and a unique suffix.
                name: Some(format!(
                    "{}.{:x}",
                    name.to_lowercase().chars().take(200).collect::<String>(),
                    k8s_openapi::jiff::Timestamp::now().as_nanosecond()
                )),
                namespace: Some(event_ns),
                ..Default::default()
            },
            event_time: Some(now()),
            action: Some(
                if type_ == "Warning" {
                    "Compile"
                } else {
                    "Enforce"
                }
                .into(),
            ),
            reason: Some(reason.into()),
            note: Some(note),
            type_: Some(type_.into()),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.identity.clone()),
            regarding: Some(ObjectReference {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
                namespace,
                name: Some(name),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(object = %key, error = %e, reason, "cannot write an Event");
        }
    }
}

pub(super) fn regarding(key: &ObjectKey) -> (&'static str, &'static str, Option<String>, String) {
    match key {
        ObjectKey::Namespace(n) => ("v1", "Namespace", None, n.clone()),
        ObjectKey::Node(n) => ("v1", "Node", None, n.clone()),
        ObjectKey::Pod(p) => ("v1", "Pod", Some(p.namespace.clone()), p.name.clone()),
        ObjectKey::Service { namespace, name } => {
            ("v1", "Service", Some(namespace.clone()), name.clone())
        }
        ObjectKey::Policy(id) => {
            let api_version = match id.kind {
                PolicyKind::NetworkPolicy => "networking.k8s.io/v1",
                PolicyKind::ClusterNetworkPolicy => "policy.networking.k8s.io/v1beta1",
                PolicyKind::AdminNetworkPolicy | PolicyKind::BaselineAdminNetworkPolicy => {
                    "policy.networking.k8s.io/v1alpha1"
                }
            };
            (
                api_version,
                id.kind.as_str(),
                id.namespace.clone(),
                id.name.clone(),
            )
        }
    }
}
