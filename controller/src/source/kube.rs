//! Objects from the Kubernetes API: one watcher per kind (kube-runtime), each relist ending
//! in a `Relisted` so that deletions missed while away are noticed.
//!
//! The network-policy-api kinds are CustomResources that a cluster may not have. The
//! CustomResourceDefinitions are watched too: a kind is watched from when its CRD is
//! established (ClusterNetworkPolicy at v1beta1 when served, else v1alpha2), and its
//! objects are dropped when the CRD goes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use palisade_policy::{PolicyId, PolicyKind};
use palisade_resources::ObjectRef;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::objects::{Kind, Object, ObjectKey, SourceEvent};

pub const POLICY_GROUP: &str = "policy.networking.k8s.io";

/// A network-policy-api kind: (kind, plural, versions we read, most preferred first).
const TIERED: [(PolicyKind, &str, &[&str]); 3] = [
    (
        PolicyKind::ClusterNetworkPolicy,
        "clusternetworkpolicies",
        &["v1beta1", "v1alpha2"],
    ),
    (
        PolicyKind::AdminNetworkPolicy,
        "adminnetworkpolicies",
        &["v1alpha1"],
    ),
    (
        PolicyKind::BaselineAdminNetworkPolicy,
        "baselineadminnetworkpolicies",
        &["v1alpha1"],
    ),
];

/// The plural and versions of a network-policy-api kind (`None`: NetworkPolicy).
pub fn tiered(kind: PolicyKind) -> Option<(&'static str, &'static [&'static str])> {
    TIERED
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, plural, versions)| (*plural, *versions))
}

fn named(kind: &str, namespace: Option<String>, name: String) -> ObjectRef {
    ObjectRef::Named {
        kind: kind.to_string(),
        namespace,
        name,
    }
}

fn object_ref<K: Resource>(kind: &str, o: &K) -> ObjectRef {
    named(
        kind,
        o.meta().namespace.clone(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

fn event_of(
    key: ObjectKey,
    converted: Result<Object, palisade_resources::ObjectError>,
) -> SourceEvent {
    match converted {
        Ok(o) => SourceEvent::Upsert(o),
        Err(e) => SourceEvent::Invalid {
            key,
            error: e.to_string(),
        },
    }
}

fn pod_key(p: &core::Pod) -> ObjectKey {
    ObjectKey::Pod(palisade_policy::PodKey::new(
        p.namespace().unwrap_or_default(),
        p.name_any(),
    ))
}

/// A pod that has finished (Succeeded or Failed) keeps `status.podIP` in the API, but its
/// address is free for the next pod: it is a peer of nothing.
fn is_finished(p: &core::Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn convert_pod(p: &core::Pod) -> SourceEvent {
    let converted = palisade_resources::core::pod(p, &object_ref("Pod", p)).map(|mut o| {
        if is_finished(p) {
            o.ips.clear();
        }
        Object::Pod(o)
    });
    event_of(pod_key(p), converted)
}

fn convert_namespace(o: &core::Namespace) -> SourceEvent {
    let r = palisade_resources::core::namespace(o, &object_ref("Namespace", o));
    event_of(ObjectKey::Namespace(o.name_any()), r.map(Object::Namespace))
}

fn convert_node(o: &core::Node) -> SourceEvent {
    let r = palisade_resources::core::node(o, &object_ref("Node", o));
    event_of(ObjectKey::Node(o.name_any()), r.map(Object::Node))
}

fn service_key(o: &core::Service) -> ObjectKey {
    ObjectKey::Service {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
}

fn convert_service(o: &core::Service) -> SourceEvent {
    let r = palisade_resources::core::service(o, &object_ref("Service", o));
    event_of(service_key(o), r.map(Object::Service))
}

fn convert_network_policy(o: &NetworkPolicy) -> SourceEvent {
    let r = palisade_resources::policy_from_network_policy(o);
    event_of(netpol_key(o), r.map(Object::Policy)).at_generation(o.metadata.generation)
}

/// The API resource of a network-policy-api kind at a version, and its converter.
fn tiered_resource(
    (kind, plural, version): (PolicyKind, &'static str, &'static str),
) -> (ApiResource, impl Fn(&DynamicObject) -> SourceEvent + Clone) {
    let gvk = GroupVersionKind::gvk(POLICY_GROUP, version, kind.as_str());
    let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
    let api_version = format!("{POLICY_GROUP}/{version}");
    let convert = move |o: &DynamicObject| {
        // List items may come without apiVersion and kind; the conversion reads them.
        let mut value = serde_json::to_value(o).unwrap_or_default();
        value["apiVersion"] = api_version.clone().into();
        value["kind"] = kind.as_str().into();
        let r = palisade_resources::policy_from_value(&value);
        event_of(policy_key(kind, None, o.name_any()), r.map(Object::Policy))
            .at_generation(o.metadata.generation)
    };
    (resource, convert)
}

fn policy_key(kind: PolicyKind, namespace: Option<String>, name: String) -> ObjectKey {
    ObjectKey::Policy(PolicyId {
        kind,
        namespace,
        name,
    })
}

fn netpol_key(np: &NetworkPolicy) -> ObjectKey {
    policy_key(
        PolicyKind::NetworkPolicy,
        Some(np.namespace().unwrap_or_else(|| "default".into())),
        np.name_any(),
    )
}

/// Watches one kind until the receiver goes away, relist after relist.
async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    key_of: impl Fn(&K) -> ObjectKey,
    convert: impl Fn(&K) -> SourceEvent,
    tx: mpsc::Sender<SourceEvent>,
    synced: mpsc::UnboundedSender<Kind>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<BTreeSet<ObjectKey>> = None;
    while let Some(event) = stream.next().await {
        let out = match event {
            Ok(Event::Init) => {
                listing = Some(BTreeSet::new());
                continue;
            }
            Ok(Event::InitApply(o)) => {
                if let Some(l) = &mut listing {
                    l.insert(key_of(&o));
                }
                convert(&o)
            }
            Ok(Event::InitDone) => {
                let _ = synced.send(kind);
                SourceEvent::Relisted {
                    kind,
                    keys: listing.take().unwrap_or_default(),
                }
            }
            Ok(Event::Apply(o)) => convert(&o),
            Ok(Event::Delete(o)) => SourceEvent::Delete(key_of(&o)),
            Err(e) => {
                tracing::warn!(%kind, error = %e, "watch failed; retrying");
                continue;
            }
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

fn spawn_core(
    client: &Client,
    tx: &mpsc::Sender<SourceEvent>,
    synced: &mpsc::UnboundedSender<Kind>,
) {
    let (c, t, s) = (client.clone(), tx.clone(), synced.clone());
    tokio::spawn(watch_kind(
        Api::<core::Namespace>::all(c),
        Kind::Namespace,
        |o| ObjectKey::Namespace(o.name_any()),
        convert_namespace,
        t,
        s,
    ));
    let (c, t, s) = (client.clone(), tx.clone(), synced.clone());
    tokio::spawn(watch_kind(
        Api::<core::Node>::all(c),
        Kind::Node,
        |o| ObjectKey::Node(o.name_any()),
        convert_node,
        t,
        s,
    ));
    let (c, t, s) = (client.clone(), tx.clone(), synced.clone());
    tokio::spawn(watch_kind(
        Api::<core::Pod>::all(c),
        Kind::Pod,
        pod_key,
        convert_pod,
        t,
        s,
    ));
    let (c, t, s) = (client.clone(), tx.clone(), synced.clone());
    tokio::spawn(watch_kind(
        Api::<core::Service>::all(c),
        Kind::Service,
        service_key,
        convert_service,
        t,
        s,
    ));
    let (c, t, s) = (client.clone(), tx.clone(), synced.clone());
    tokio::spawn(watch_kind(
        Api::<NetworkPolicy>::all(c),
        Kind::Policy(PolicyKind::NetworkPolicy),
        netpol_key,
        convert_network_policy,
        t,
        s,
    ));
}

/// The version of a network-policy-api kind to read, if its CRD is established and serves
/// one we know.
fn served(crd: &CustomResourceDefinition) -> Option<(PolicyKind, &'static str, &'static str)> {
    if crd.spec.group != POLICY_GROUP {
        return None;
    }
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    if !established || crd.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let (kind, plural, versions) = TIERED
        .iter()
        .find(|(_, plural, _)| *plural == crd.spec.names.plural)?;
    let version = versions.iter().find(|v| {
        crd.spec
            .versions
            .iter()
            .any(|cv| cv.name == **v && cv.served)
    })?;
    Some((*kind, plural, version))
}

fn spawn_tiered(
    client: &Client,
    found: (PolicyKind, &'static str, &'static str),
    tx: &mpsc::Sender<SourceEvent>,
    synced: &mpsc::UnboundedSender<Kind>,
) -> JoinHandle<()> {
    let kind = found.0;
    let (resource, convert) = tiered_resource(found);
    let key_of = move |o: &DynamicObject| policy_key(kind, None, o.name_any());
    tokio::spawn(watch_kind(
        Api::<DynamicObject>::all_with(client.clone(), &resource),
        Kind::Policy(kind),
        key_of,
        convert,
        tx.clone(),
        synced.clone(),
    ))
}

async fn list_all<K>(
    api: Api<K>,
    convert: impl Fn(&K) -> SourceEvent,
) -> anyhow::Result<Vec<SourceEvent>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let list = api.list(&Default::default()).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot list {}: {e}",
            std::any::type_name::<K>()
                .rsplit("::")
                .next()
                .unwrap_or("objects")
        )
    })?;
    Ok(list.items.iter().map(convert).collect())
}

/// One list of every kind, converted as the watches convert them and ending in `Synced`:
/// what `palisadectl` compiles and explains against a live cluster.
pub async fn snapshot(client: Client) -> anyhow::Result<Vec<SourceEvent>> {
    let mut out = Vec::new();
    out.extend(
        list_all(
            Api::<core::Namespace>::all(client.clone()),
            convert_namespace,
        )
        .await?,
    );
    out.extend(list_all(Api::<core::Node>::all(client.clone()), convert_node).await?);
    out.extend(list_all(Api::<core::Pod>::all(client.clone()), convert_pod).await?);
    out.extend(list_all(Api::<core::Service>::all(client.clone()), convert_service).await?);
    out.extend(
        list_all(
            Api::<NetworkPolicy>::all(client.clone()),
            convert_network_policy,
        )
        .await?,
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crds = crds
        .list(&Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot list CustomResourceDefinitions: {e}"))?;
    for crd in &crds {
        if let Some(found) = served(crd) {
            let (resource, convert) = tiered_resource(found);
            out.extend(
                list_all(
                    Api::<DynamicObject>::all_with(client.clone(), &resource),
                    convert,
                )
                .await?,
            );
        }
    }
    out.push(SourceEvent::Synced);
    Ok(out)
}

/// Watches everything until `tx`'s receiver goes away. Sends `Synced` once every kind that
/// exists at start has been listed.
pub async fn run(client: Client, tx: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    let (synced_tx, mut synced_rx) = mpsc::unbounded_channel();
    spawn_core(&client, &tx, &synced_tx);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut expected: BTreeSet<Kind> = Kind::CORE.into_iter().collect();
    let mut running: BTreeMap<PolicyKind, (&'static str, JoinHandle<()>)> = BTreeMap::new();
    let initial = crds
        .list(&Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot list CustomResourceDefinitions: {e}"))?;
    for crd in &initial {
        if let Some(found) = served(crd) {
            expected.insert(Kind::Policy(found.0));
            running.insert(
                found.0,
                (found.2, spawn_tiered(&client, found, &tx, &synced_tx)),
            );
        }
    }
    for (kind, _, _) in TIERED {
        if !running.contains_key(&kind) {
            tracing::info!(%kind, "its CRD is not installed (or serves no version Palisade reads); it will be watched when it appears");
        }
    }
    let mut crd_events = watcher(crds, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut synced: BTreeSet<Kind> = BTreeSet::new();
    let mut sent_synced = false;
    loop {
        tokio::select! {
            Some(kind) = synced_rx.recv() => {
                synced.insert(kind);
                if !sent_synced && expected.is_subset(&synced) {
                    sent_synced = true;
                    tracing::info!("every kind listed");
                    if tx.send(SourceEvent::Synced).await.is_err() {
                        return Ok(());
                    }
                }
            }
            event = crd_events.next() => {
                let Some(event) = event else { return Ok(()) };
                let (crd, gone) = match event {
                    Ok(Event::Apply(c) | Event::InitApply(c)) => (c, false),
                    Ok(Event::Delete(c)) => (c, true),
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "CRD watch failed; retrying");
                        continue;
                    }
                };
                let Some((kind, _, versions)) = TIERED
                    .iter()
                    .find(|(_, plural, _)| crd.spec.group == POLICY_GROUP && *plural == crd.spec.names.plural)
                else {
                    continue;
                };
                let _ = versions;
                let want = if gone { None } else { served(&crd) };
                let have = running.get(kind).map(|(v, _)| *v);
                if want.map(|w| w.2) == have {
                    continue;
                }
                if let Some((_, handle)) = running.remove(kind) {
                    handle.abort();
                    if want.is_none() {
                        tracing::info!(%kind, "its CRD is gone; dropping its objects");
                        if tx.send(SourceEvent::Relisted { kind: Kind::Policy(*kind), keys: BTreeSet::new() }).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                if let Some(found) = want {
                    tracing::info!(kind = %found.0, version = found.2, "watching");
                    running.insert(found.0, (found.2, spawn_tiered(&client, found, &tx, &synced_tx)));
                }
            }
        }
    }
}
