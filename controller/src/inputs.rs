//! The controller's view of the cluster: converted objects by key, turned into compiler
//! [`Change`]s. Only a real difference makes a change, so a resync, a relist or an edit of
//! fields Palisade does not read costs nothing downstream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use palisade_policy::{Change, Cluster, Namespace, Node, Pod, PodKey, Policy, PolicyId, Warning};
use palisade_resources::core::{PodObject, Service};

use crate::objects::{Kind, Object, ObjectKey, SourceEvent};

#[derive(Debug, Default)]
pub struct Inputs {
    namespaces: BTreeMap<String, Namespace>,
    nodes: BTreeMap<String, Node>,
    /// Pods as written; a pod is enforced (and in `enforced`) once it has a node and an
    /// address.
    pods: BTreeMap<PodKey, PodObject>,
    enforced: BTreeMap<PodKey, Pod>,
    services: BTreeMap<(String, String), Service>,
    policies: BTreeMap<PolicyId, Policy>,
    warnings: BTreeMap<PolicyId, Vec<Warning>>,
    /// Objects whose current version Palisade rejected, with the reason.
    invalid: BTreeMap<ObjectKey, String>,
}

/// What one event did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub changes: Vec<Change>,
    /// The objects whose validity changed: now invalid (with the error) or valid again.
    pub validity: Vec<(ObjectKey, Option<String>)>,
    /// Policies that no longer exist.
    pub gone: Vec<PolicyId>,
}

impl Inputs {
    pub fn apply(&mut self, event: SourceEvent) -> Applied {
        let mut out = Applied::default();
        match event {
            SourceEvent::Upsert(object) => {
                let key = object.key();
                if self.invalid.remove(&key).is_some() {
                    out.validity.push((key, None));
                }
                self.upsert(object, &mut out.changes);
            }
            SourceEvent::Delete(key) => {
                if self.invalid.remove(&key).is_some() {
                    out.validity.push((key.clone(), None));
                }
                if let ObjectKey::Policy(id) = &key {
                    out.gone.push(id.clone());
                }
                self.delete(&key, &mut out.changes);
            }
            SourceEvent::Invalid { key, error } => {
                if self.invalid.get(&key) != Some(&error) {
                    self.invalid.insert(key.clone(), error.clone());
                    out.validity.push((key, Some(error)));
                }
            }
            SourceEvent::Relisted { kind, keys } => {
                // Also objects that were only ever invalid: their rejection is over too.
                let mut known: BTreeSet<ObjectKey> = self.keys(kind).into_iter().collect();
                known.extend(self.invalid.keys().filter(|k| k.kind() == kind).cloned());
                for key in known {
                    if !keys.contains(&key) {
                        if self.invalid.remove(&key).is_some() {
                            out.validity.push((key.clone(), None));
                        }
                        if let ObjectKey::Policy(id) = &key {
                            out.gone.push(id.clone());
                        }
                        self.delete(&key, &mut out.changes);
                    }
                }
            }
            SourceEvent::Synced => {}
            SourceEvent::AtGeneration(event, _) => return self.apply(*event),
        }
        out
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        match kind {
            Kind::Namespace => self
                .namespaces
                .keys()
                .cloned()
                .map(ObjectKey::Namespace)
                .collect(),
            Kind::Node => self.nodes.keys().cloned().map(ObjectKey::Node).collect(),
            Kind::Pod => self.pods.keys().cloned().map(ObjectKey::Pod).collect(),
            Kind::Service => self
                .services
                .keys()
                .map(|(namespace, name)| ObjectKey::Service {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
                .collect(),
            Kind::Policy(k) => self
                .policies
                .keys()
                .filter(|id| id.kind == k)
                .cloned()
                .map(ObjectKey::Policy)
                .collect(),
        }
    }

    fn upsert(&mut self, object: Object, changes: &mut Vec<Change>) {
        match object {
            Object::Namespace(ns) => {
                if self.namespaces.get(&ns.name) != Some(&ns) {
                    self.namespaces.insert(ns.name.clone(), ns.clone());
                    changes.push(Change::UpsertNamespace(ns));
                }
            }
            Object::Node(node) => {
                if self.nodes.get(&node.name) == Some(&node) {
                    return;
                }
                let name = node.name.clone();
                self.nodes.insert(name.clone(), node.clone());
                changes.push(Change::UpsertNode(node));
                // Host-network pods carry their node's addresses.
                let on_node: Vec<PodKey> = self
                    .pods
                    .iter()
                    .filter(|(_, p)| p.host_network && p.node.as_deref() == Some(&name))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in on_node {
                    self.refresh_pod(&key, changes);
                }
            }
            Object::Pod(pod) => {
                let key = PodKey::new(&pod.namespace, &pod.name);
                if self.pods.get(&key) == Some(&pod) {
                    return;
                }
                self.pods.insert(key.clone(), pod);
                self.refresh_pod(&key, changes);
            }
            Object::Service(s) => {
                self.services
                    .insert((s.namespace.clone(), s.name.clone()), s);
            }
            Object::Policy(converted) => {
                let id = converted.policy.id.clone();
                self.warnings.insert(id.clone(), converted.warnings);
                if self.policies.get(&id) != Some(&converted.policy) {
                    self.policies.insert(id, converted.policy.clone());
                    changes.push(Change::UpsertPolicy(converted.policy));
                }
            }
        }
    }

    fn delete(&mut self, key: &ObjectKey, changes: &mut Vec<Change>) {
        match key {
            ObjectKey::Namespace(name) => {
                if self.namespaces.remove(name).is_some() {
                    changes.push(Change::RemoveNamespace(name.clone()));
                }
            }
            ObjectKey::Node(name) => {
                if self.nodes.remove(name).is_some() {
                    changes.push(Change::RemoveNode(name.clone()));
                }
            }
            ObjectKey::Pod(k) => {
                if self.pods.remove(k).is_some() {
                    self.refresh_pod(k, changes);
                }
            }
            ObjectKey::Service { namespace, name } => {
                self.services.remove(&(namespace.clone(), name.clone()));
            }
            ObjectKey::Policy(id) => {
                self.warnings.remove(id);
                if self.policies.remove(id).is_some() {
                    changes.push(Change::RemovePolicy(id.clone()));
                }
            }
        }
    }

    /// Brings the compiler's version of one pod in line with what is written.
    fn refresh_pod(&mut self, key: &PodKey, changes: &mut Vec<Change>) {
        let model = self.pods.get(key).and_then(|p| {
            let node_addresses: Option<&[IpAddr]> = p
                .node
                .as_deref()
                .and_then(|n| self.nodes.get(n))
                .map(|n| n.addresses.as_slice());
            p.clone().into_model(node_addresses)
        });
        match model {
            Some(pod) if self.enforced.get(key) != Some(&pod) => {
                self.enforced.insert(key.clone(), pod.clone());
                changes.push(Change::UpsertPod(pod));
            }
            Some(_) => {}
            None => {
                if self.enforced.remove(key).is_some() {
                    changes.push(Change::RemovePod(key.clone()));
                }
            }
        }
    }

    /// The compiler's input as a whole, for the first (batch) compile.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            namespaces: self.namespaces.clone(),
            pods: self.enforced.clone(),
            nodes: self.nodes.clone(),
        }
    }

    pub fn policies(&self) -> Vec<Policy> {
        self.policies.values().cloned().collect()
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn invalid(&self) -> &BTreeMap<ObjectKey, String> {
        &self.invalid
    }

    pub fn warnings(&self) -> impl Iterator<Item = (&PolicyId, &Vec<Warning>)> {
        self.warnings.iter()
    }

    pub fn invalid_count(&self, kind: Kind) -> usize {
        self.invalid.keys().filter(|k| k.kind() == kind).count()
    }

    pub fn policy_ids(&self) -> BTreeSet<PolicyId> {
        self.policies.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests;
