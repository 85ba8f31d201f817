//! Objects from a cluster-state file and a policies file (the demo, and clusters without an
//! API server). Each complete read is a relist of every kind, so an edit is turned into
//! exactly the changes it makes, as a watch would.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use palisade_policy::{Cluster, PolicyKind, Warning};
use palisade_resources::core::{PodObject, Service};
use palisade_resources::{Converted, Policies};
use tokio::sync::mpsc;

use crate::objects::{Kind, Object, SourceEvent};

pub const KINDS: [Kind; 8] = [
    Kind::Namespace,
    Kind::Node,
    Kind::Pod,
    Kind::Service,
    Kind::Policy(PolicyKind::NetworkPolicy),
    Kind::Policy(PolicyKind::ClusterNetworkPolicy),
    Kind::Policy(PolicyKind::AdminNetworkPolicy),
    Kind::Policy(PolicyKind::BaselineAdminNetworkPolicy),
];

/// Every object of both files as events, ending with a relist of every kind.
pub fn read(cluster: &Path, policies: &Path) -> anyhow::Result<Vec<SourceEvent>> {
    let (cluster, services) = palisade_resources::load_cluster(cluster)?;
    let policies = palisade_resources::load_policies(policies)?;
    Ok(events(cluster, services, policies))
}

/// Loaded objects as the events of one complete read (also what the fan-out benchmark
/// feeds the controller with).
pub fn events(cluster: Cluster, services: Vec<Service>, policies: Policies) -> Vec<SourceEvent> {
    let mut objects: Vec<Object> = Vec::new();
    objects.extend(cluster.namespaces.into_values().map(Object::Namespace));
    objects.extend(cluster.nodes.into_values().map(Object::Node));
    objects.extend(cluster.pods.into_values().map(|p| {
        Object::Pod(PodObject {
            namespace: p.namespace,
            name: p.name,
            labels: p.labels,
            node: Some(p.node),
            ips: p.ips,
            host_network: p.host_network,
            ports: p.ports,
        })
    }));
    objects.extend(services.into_iter().map(Object::Service));
    for policy in policies.policies {
        let warnings: Vec<Warning> = policies
            .warnings
            .iter()
            .filter(|w| w.policies.contains(&policy.id))
            .cloned()
            .collect();
        objects.push(Object::Policy(Converted { policy, warnings }));
    }
    let mut events = Vec::with_capacity(objects.len() + KINDS.len());
    let mut keys: Vec<BTreeSet<_>> = vec![BTreeSet::new(); KINDS.len()];
    for o in objects {
        let key = o.key();
        if let Some(i) = KINDS.iter().position(|k| *k == key.kind()) {
            keys[i].insert(key);
        }
        events.push(SourceEvent::Upsert(o));
    }
    for (kind, keys) in KINDS.into_iter().zip(keys) {
        events.push(SourceEvent::Relisted { kind, keys });
    }
    events
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads both files at start and whenever either changes. A file that cannot be read or is
/// invalid is reported and the last good state stays in force; it is tried again at the
/// next change.
pub async fn run(
    cluster: PathBuf,
    policies: PathBuf,
    poll: Duration,
    tx: mpsc::Sender<SourceEvent>,
) {
    let mut seen = None;
    let mut synced = false;
    loop {
        let now = (stamp(&cluster), stamp(&policies));
        if seen.as_ref() != Some(&now) {
            // Let a writer finish before reading: a file that still changes is read later.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let settled = (stamp(&cluster), stamp(&policies));
            if settled == now {
                seen = Some(now);
                match read(&cluster, &policies) {
                    Ok(events) => {
                        for e in events {
                            if tx.send(e).await.is_err() {
                                return;
                            }
                        }
                        if !synced {
                            synced = true;
                            if tx.send(SourceEvent::Synced).await.is_err() {
                                return;
                            }
                        }
                        tracing::info!("read the cluster and policies files");
                    }
                    Err(e) => tracing::error!(error = %e, "keeping the last good state"),
                }
            }
            continue;
        }
        tokio::time::sleep(poll).await;
    }
}
