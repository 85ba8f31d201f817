//! The status writer: the one replica holding the Lease tells users about objects Palisade
//! rejects, with a Warning Event on the object naming the field (the other policies stay in
//! force). Every replica compiles and serves; only this writing needs a single writer, so
//! that users see one Event per rejection, not one per replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use palisade_policy::PolicyKind;
use tokio::sync::mpsc;

use crate::compile_loop::Note;
use crate::metrics::Metrics;
use crate::objects::ObjectKey;

pub const REPORTING_CONTROLLER: &str = "palisade.dev/controller";
const LEASE_SECONDS: i32 = 15;
const RENEW: Duration = Duration::from_secs(3);

pub struct StatusWriter {
    pub client: kube::Client,
    pub namespace: String,
    pub lease: String,
    pub identity: String,
    pub metrics: Arc<Metrics>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl StatusWriter {
    /// Takes or renews the Lease; true while this replica holds it.
    async fn hold_lease(&self) -> kube::Result<bool> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let mine = |lease: Option<Lease>| Lease {
            metadata: ObjectMeta {
                name: Some(self.lease.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: lease
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: lease
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .filter(|s| s.holder_identity.as_deref() == Some(&self.identity))
                    .and_then(|s| s.acquire_time.clone())
                    .or_else(|| Some(now())),
                renew_time: Some(now()),
                ..Default::default()
            }),
        };
        let Some(current) = api.get_opt(&self.lease).await? else {
            return match api.create(&PostParams::default(), &mine(None)).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(&self.identity);
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            age.as_secs_f64() > f64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
        });
        if !held_by_me && !expired {
            return Ok(false);
        }
        // The resourceVersion makes this a compare-and-swap: of two replicas taking an
        // expired Lease at once, one gets a conflict.
        match api
            .replace(&self.lease, &PostParams::default(), &mine(Some(current)))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn warn(&self, key: &ObjectKey, error: &str) {
        let (api_version, kind, namespace, name) = regarding(key);
        // Events about cluster-scoped objects live in `default`, as kubectl expects.
        let event_ns = namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &event_ns);
        let mut note = format!("Palisade does not enforce this version: {error}");
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
            action: Some("Compile".into()),
            reason: Some("Rejected".into()),
            note: Some(note),
            type_: Some("Warning".into()),
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
            tracing::warn!(object = %key, error = %e, "cannot write the Warning Event");
        }
    }

    /// Runs until `notes` closes.
    pub async fn run(self, mut notes: mpsc::UnboundedReceiver<Note>) {
        let mut invalid: BTreeMap<ObjectKey, String> = BTreeMap::new();
        let mut reported: BTreeMap<ObjectKey, String> = BTreeMap::new();
        let mut leader = false;
        let mut tick = tokio::time::interval(RENEW);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now_leader = match self.hold_lease().await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot reach the status Lease");
                            false
                        }
                    };
                    if now_leader != leader {
                        tracing::info!(identity = %self.identity, leader = now_leader, "status writer");
                        leader = now_leader;
                        self.metrics.is_leader.set(i64::from(leader));
                    }
                }
                note = notes.recv() => match note {
                    None => return,
                    Some(Note::Validity(key, Some(error))) => { invalid.insert(key, error); }
                    Some(Note::Validity(key, None)) => { invalid.remove(&key); reported.remove(&key); }
                },
            }
            if leader {
                for (key, error) in &invalid {
                    if reported.get(key) != Some(error) {
                        self.warn(key, error).await;
                        reported.insert(key.clone(), error.clone());
                    }
                }
            }
        }
    }
}

fn regarding(key: &ObjectKey) -> (&'static str, &'static str, Option<String>, String) {
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
