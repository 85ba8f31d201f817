//! Admin and Baseline lists, compiled once per distinct combination of the tiered policies
//! that select a pod and the pod's facts they depend on (its named ports, for ingress),
//! and shared by every pod with that combination, in any namespace and on any node.
//!
//! A cluster-wide policy selects pods of many namespaces alike; compiling its rules per
//! namespace and label set multiplied the work and the memory by the number of those.

use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use super::*;
use crate::ruleset::TierList;

struct Entry {
    direction: Direction,
    tier: Tier,
    /// The entry holds the policies, so their addresses (the key) stay theirs.
    policies: Vec<Arc<CompiledPolicy>>,
    /// `None` when no rule of the list depends on the pod's named ports.
    ports: Option<Vec<ContainerPort>>,
    list: Arc<TierList>,
    defs: Arc<Defs>,
}

/// Groups a list references, each once.
pub(super) type Defs = Vec<(GroupKey, Arc<GroupDef>)>;

/// The groups of a pod's four lists together, by the lists' groups' addresses. The entry
/// holds those, so the addresses stay theirs.
type Combined = HashMap<[usize; 4], ([Arc<Defs>; 4], Arc<Defs>)>;

/// The shared lists. Valid until a tiered policy changes (then `clear`): a list depends
/// only on its policies and the facts in its key.
#[derive(Default)]
pub(super) struct TierLists {
    entries: Mutex<(usize, HashMap<u64, Vec<Entry>>)>,
    /// Pods with the same four lists share their groups too: one count per pod, not one
    /// per group of each list, and no merging of the lists' groups per pod.
    combined: Mutex<Combined>,
    no_defs: Arc<Defs>,
}

impl TierLists {
    pub(super) fn clear(&self) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        *e = (0, HashMap::default());
        self.combined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The groups of four lists' groups together, each once.
    pub(super) fn combined(&self, parts: [Arc<Defs>; 4], bound: usize) -> Arc<Defs> {
        let mut non_empty = parts.iter().filter(|d| !d.is_empty());
        match (non_empty.next(), non_empty.next()) {
            (None, _) => return self.no_defs.clone(),
            (Some(one), None) => return Arc::clone(one),
            _ => {}
        }
        let key = parts.each_ref().map(|d| Arc::as_ptr(d) as usize);
        let mut map = self.combined.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, defs)) = map.get(&key) {
            return defs.clone();
        }
        let mut seen = rustc_hash::FxHashSet::default();
        let defs: Defs = parts
            .iter()
            .flat_map(|d| d.iter())
            .filter(|(k, _)| seen.insert(*k))
            .cloned()
            .collect();
        let defs = Arc::new(defs);
        if map.len() > bound {
            map.clear();
        }
        map.insert(key, (parts, defs.clone()));
        defs
    }

    /// The list of `tier` in `direction` for `pod`, which `policies` (in evaluation order,
    /// all of them selecting the pod) select; adds the groups it references to `defs`.
    pub(super) fn get(
        &self,
        direction: Direction,
        tier: Tier,
        policies: &[&Arc<CompiledPolicy>],
        pod: &Pod,
        bound: usize,
    ) -> (Arc<TierList>, Arc<Defs>) {
        if !policies.iter().any(|cp| cp.policy.tier == tier) {
            return (TierList::empty(), self.no_defs.clone());
        }
        // Most calls find their list: the tier's policies are collected only to build one.
        let of_tier = || {
            policies
                .iter()
                .copied()
                .filter(move |cp| cp.policy.tier == tier)
        };
        let ports = of_tier()
            .any(|cp| cp.reads_named_ports(direction))
            .then_some(&pod.ports);
        let hash = {
            let mut h = rustc_hash::FxHasher::default();
            (direction, tier).hash(&mut h);
            for cp in of_tier() {
                Arc::as_ptr(cp).hash(&mut h);
            }
            ports.hash(&mut h);
            h.finish()
        };
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (count, map) = &mut *guard;
        let found = map.get(&hash).and_then(|bucket| {
            bucket.iter().find(|e| {
                e.direction == direction
                    && e.tier == tier
                    && e.ports.as_ref() == ports
                    && e.policies.len() == of_tier().count()
                    && e.policies
                        .iter()
                        .zip(of_tier())
                        .all(|(a, b)| Arc::ptr_eq(a, b))
            })
        });
        if let Some(e) = found {
            return (e.list.clone(), e.defs.clone());
        }
        let policies: Vec<&Arc<CompiledPolicy>> = of_tier().collect();
        let mut list = Vec::new();
        let mut own_defs = Vec::new();
        for cp in &policies {
            for i in 0..cp.rules(direction).len() {
                list.extend(cp.instance(direction, i, pod, &mut own_defs));
            }
        }
        drop_unreachable(&mut list);
        let mut seen = rustc_hash::FxHashSet::default();
        own_defs.retain(|(key, _)| seen.insert(*key));
        let list = Arc::new(TierList::new(list));
        let own_defs = Arc::new(own_defs);
        // Label and port churn can leave combinations no pod has; a bound keeps them few.
        if *count > bound {
            map.clear();
            *count = 0;
        }
        *count += 1;
        map.entry(hash).or_default().push(Entry {
            direction,
            tier,
            policies: policies.into_iter().cloned().collect(),
            ports: ports.cloned(),
            list: list.clone(),
            defs: own_defs.clone(),
        });
        (list, own_defs)
    }
}
