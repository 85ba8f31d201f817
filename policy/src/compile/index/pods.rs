//! Pods: where they are indexed, the changes to one pod, and its compiled rules (shared
//! between pods of one namespace with equal labels and ports).

use super::*;

impl Compiler {
    pub(super) fn ns_labels(&self, ns: &str) -> &Labels {
        self.cluster
            .namespaces
            .get(ns)
            .map(|n| &n.labels)
            .unwrap_or(&NO_LABELS)
    }

    /// The pods of one namespace: a range of the cluster's pods, which are sorted by
    /// namespace first.
    pub(super) fn pods_in<'a>(
        &'a self,
        ns: &'a str,
    ) -> impl Iterator<Item = (&'a PodKey, &'a Pod)> + 'a {
        let from = PodKey::new(ns, "");
        self.cluster
            .pods
            .range(from..)
            .take_while(move |(k, _)| k.namespace == ns)
    }

    /// Calls `f` on every pod of `ns` that `sel` may select (a superset, without repeats):
    /// those carrying its anchor label, or all of the namespace's when it has none or the
    /// namespace is small.
    pub(super) fn for_pods_maybe_selected<'a>(
        &'a self,
        ns: &'a str,
        sel: &LabelSelector,
        mut f: impl FnMut(&'a PodKey, &'a Pod),
    ) {
        let pods_here = self.pods_by_ns.get(ns).copied().unwrap_or(0);
        let index = (!scan_instead(pods_here))
            .then(|| self.pod_labels.candidates(ns, sel))
            .flatten();
        match index {
            Some(keys) => {
                for key in keys {
                    if let Some((k, pod)) = self.cluster.pods.get_key_value(&**key) {
                        f(k, pod);
                    }
                }
            }
            None => {
                for (k, pod) in self.pods_in(ns) {
                    f(k, pod);
                }
            }
        }
    }

    /// Namespaces (with or without a Namespace object) whose labels `sel` matches.
    pub(super) fn namespaces_matching<'a>(
        &'a self,
        sel: &LabelSelector,
    ) -> Vec<(&'a str, &'a Labels)> {
        let mut out: Vec<(&str, &Labels)> = self
            .cluster
            .namespaces
            .values()
            .filter(|n| sel.matches(&n.labels))
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        if sel.matches(&NO_LABELS) {
            out.extend(
                self.pods_by_ns
                    .keys()
                    .filter(|n| !self.cluster.namespaces.contains_key(*n))
                    .map(|n| (n.as_str(), &NO_LABELS)),
            );
        }
        out
    }

    pub(super) fn known_namespaces(&self) -> impl Iterator<Item = &String> {
        let extra = self
            .pods_by_ns
            .keys()
            .filter(|n| !self.cluster.namespaces.contains_key(*n));
        self.cluster.namespaces.keys().chain(extra)
    }

    pub(super) fn count_pod_in_namespace(&mut self, ns: &str) {
        match self.pods_by_ns.get_mut(ns) {
            Some(n) => *n += 1,
            None => {
                self.pods_by_ns.insert(ns.to_string(), 1);
            }
        }
    }

    pub(super) fn index_pod(&mut self, pod: &Pod) {
        self.count_pod_in_namespace(&pod.namespace);
        let key = Arc::new(pod.key());
        // The label index holds every pod of a namespace it is used for, and only those:
        // when the namespace grows big enough, its other pods join.
        let count = self.pods_by_ns[&pod.namespace];
        if !scan_instead(count) {
            self.pod_labels.insert(&pod.namespace, &pod.labels, &key);
            if scan_instead(count - 1) {
                let others: Vec<(Arc<PodKey>, Labels)> = self
                    .pods_in(&pod.namespace)
                    .map(|(k, p)| (Arc::new(k.clone()), p.labels.clone()))
                    .collect();
                for (k, labels) in others {
                    self.pod_labels.insert(&pod.namespace, &labels, &k);
                }
            }
        }
        match self.pods_by_node.get_mut(&pod.node) {
            Some(s) => {
                s.insert(key);
            }
            None => {
                self.pods_by_node
                    .insert(pod.node.clone(), BTreeSet::from([key]));
            }
        }
    }

    pub(super) fn unindex_pod(&mut self, pod: &Pod) {
        let key = pod.key();
        self.pod_labels
            .remove(&pod.namespace, &pod.labels, &Arc::new(key.clone()));
        if let Some(n) = self.pods_by_ns.get_mut(&pod.namespace) {
            *n -= 1;
            if *n == 0 {
                self.pods_by_ns.remove(&pod.namespace);
            }
        }
        if let Some(s) = self.pods_by_node.get_mut(&pod.node) {
            s.remove(&key);
            if s.is_empty() {
                self.pods_by_node.remove(&pod.node);
            }
        }
    }

    /// Drops the memo entries `pod` represents: they are keyed by its labels and ports,
    /// which are about to change or go.
    pub(super) fn forget_representative(&mut self, key: &PodKey, pod: &Pod) {
        let hash = memo_hash(&pod.labels, &pod.ports);
        if let Some(per_ns) = self.memo.get_mut(&pod.namespace) {
            if let Some(entries) = per_ns.get_mut(&hash) {
                entries.retain(|(rep, _)| **rep != *key);
                if entries.is_empty() {
                    per_ns.remove(&hash);
                }
            }
        }
    }

    pub(super) fn set_pod(&mut self, key: PodKey, new: Option<Pod>, t: &mut Touched) {
        let old = self.cluster.pods.get(&key).cloned();
        if old == new {
            return;
        }
        let first_in_namespace = !self.pods_by_ns.contains_key(&key.namespace);
        let pod_nodes: BTreeSet<String> = old
            .iter()
            .chain(new.iter())
            .map(|p| p.node.clone())
            .collect();
        let nodes_before: Vec<bool> = pod_nodes.iter().map(|n| self.node_exists(n)).collect();
        if let Some(o) = &old {
            self.forget_representative(&key, o);
            self.unindex_pod(o);
            self.cluster.pods.remove(&key);
        }
        if let Some(n) = &new {
            self.index_pod(n);
            self.cluster.pods.insert(key.clone(), n.clone());
        }
        if first_in_namespace && !self.tiered_by_ns.contains_key(&key.namespace) {
            self.refresh_tiered_for_namespace(&key.namespace);
        }
        let labels = self.ns_labels(&key.namespace).clone();
        let mut candidates: BTreeSet<GroupKey> = BTreeSet::new();
        for pod in old.iter().chain(new.iter()) {
            if let Some(index) = self.groups_by_ns.get(&key.namespace) {
                candidates.extend(index.candidates(&pod.labels).copied());
            }
            candidates.extend(self.ns_selector_groups.candidates(&pod.labels).copied());
            for name in pod.ports.iter().filter_map(|p| p.name.as_ref()) {
                candidates.extend(
                    self.named_groups_by_port
                        .get(name)
                        .into_iter()
                        .flatten()
                        .copied(),
                );
            }
        }
        let mut changed = BTreeSet::new();
        for gkey in candidates {
            let (before, after) = {
                let g = &self.groups[&gkey];
                (
                    contribution(&g.def, old.as_ref(), &labels),
                    contribution(&g.def, new.as_ref(), &labels),
                )
            };
            if self.update_members(gkey, &before, &after) {
                changed.insert(gkey);
            }
        }
        self.refresh_pod(&key, t);
        // A node without a Node object exists while pods name it.
        for (n, before) in pod_nodes.iter().zip(nodes_before) {
            if self.node_exists(n) != before {
                t.nodes.insert(n.clone());
            }
        }
        // A pod's addresses are part of its node's rule set even when its rules are unchanged.
        for pod in old.iter().chain(new.iter()).filter(|p| !p.host_network) {
            if old.as_ref().map(|o| (&o.ips, &o.node)) != new.as_ref().map(|n| (&n.ips, &n.node)) {
                t.nodes.insert(pod.node.clone());
            }
        }
        self.touch_groups(&changed, t);
    }

    pub(super) fn update_members(
        &mut self,
        gkey: GroupKey,
        before: &[Member],
        after: &[Member],
    ) -> bool {
        if before == after {
            return false;
        }
        let Some(g) = self.groups.get_mut(&gkey) else {
            return false;
        };
        let mut changed = false;
        for m in after {
            changed |= g.add(*m);
        }
        for m in before {
            changed |= g.remove(*m);
        }
        changed
    }

    /// Reports changed groups as such: the nodes referencing them are found on demand
    /// ([`Compiler::group_nodes`]), not listed on every change.
    pub(super) fn touch_groups(&self, changed: &BTreeSet<GroupKey>, t: &mut Touched) {
        for gkey in changed {
            if self.groups.contains_key(gkey) {
                t.groups.insert(group_id(*gkey));
            }
        }
    }

    /// Recomputes one pod's rules and the group references that follow from them.
    pub(super) fn refresh_pod(&mut self, key: &PodKey, t: &mut Touched) {
        let fresh = match self.cluster.pods.get(key) {
            Some(pod) if !pod.host_network => {
                // The memo is taken out so the pod can stay borrowed from the cluster.
                let mut memo = std::mem::take(&mut self.memo);
                let compiled = self.compiled_for(&mut memo, key, pod);
                self.memo = memo;
                let (node, ips) = (pod.node.clone(), pod.ips.clone());
                Some(PodEntry {
                    node: self.node_index(&node),
                    ips,
                    compiled,
                })
            }
            _ => None,
        };
        let old = self.pod_entries.remove(key);
        match (old, fresh) {
            (Some(o), Some(f)) if o.same_as(&f, &mut self.last_comparison) => {
                let shared = self.shared_key(key);
                self.pod_entries.insert(shared, o);
            }
            (old, fresh) => {
                if let Some(f) = &fresh {
                    t.nodes.insert(self.node_names[f.node as usize].clone());
                    for (gkey, def) in f.compiled.defs() {
                        self.acquire_ref(f.node, *gkey, def);
                    }
                }
                if let Some(o) = old {
                    t.nodes.insert(self.node_names[o.node as usize].clone());
                    self.release_refs(o.node, o.refs());
                }
                if let Some(f) = fresh {
                    let shared = self.shared_key(key);
                    self.pod_entries.insert(shared, f);
                }
            }
        }
    }

    /// The pod's key as the node index holds it, so the entry shares it.
    pub(super) fn shared_key(&self, key: &PodKey) -> Arc<PodKey> {
        self.cluster
            .pods
            .get(key)
            .and_then(|pod| self.pods_by_node.get(&pod.node))
            .and_then(|keys| keys.get(key))
            .cloned()
            .unwrap_or_else(|| Arc::new(key.clone()))
    }

    pub(super) fn node_index(&mut self, node: &str) -> u32 {
        if let Some(&i) = self.node_index.get(node) {
            return i;
        }
        let i = u32::try_from(self.node_names.len()).expect("fewer than 2^32 nodes");
        self.node_names.push(node.to_string());
        self.node_index.insert(node.to_string(), i);
        i
    }

    /// The pod's compilation, shared with the pods of its namespace that have the same
    /// labels and ports.
    pub(super) fn compiled_for(&self, memo: &mut Memo, key: &PodKey, pod: &Pod) -> Arc<Compiled> {
        let hash = memo_hash(&pod.labels, &pod.ports);
        let found = memo
            .get(&pod.namespace)
            .and_then(|m| m.get(&hash))
            .and_then(|entries| {
                entries
                    .iter()
                    .find(|(rep, _)| {
                        self.cluster
                            .pods
                            .get(&**rep)
                            .is_some_and(|r| same_shape(r, pod))
                    })
                    .map(|(_, c)| c.clone())
            });
        if let Some(c) = found {
            return c;
        }
        let c = Arc::new(self.pod_rules(pod));
        let pods_here = self.pods_by_ns.get(&pod.namespace).copied().unwrap_or(0);
        let per_ns = memo_namespace(memo, &pod.namespace);
        // Label churn leaves entries no pod uses; a bound relative to the namespace's size
        // keeps the cache from growing without limit.
        if per_ns.len() > 2 * pods_here + 16 {
            per_ns.clear();
        }
        per_ns
            .entry(hash)
            .or_default()
            .push((self.shared_key(key), c.clone()));
        c
    }

    pub(super) fn pod_rules(&self, pod: &Pod) -> Compiled {
        let labels = self.ns_labels(&pod.namespace);
        let tiered: Vec<&Arc<CompiledPolicy>> = self
            .tiered_by_ns
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .filter(|cp| cp.selects(pod, labels))
            .collect();
        let bound = 2 * self.pod_entries.len().max(self.cluster.pods.len()) + 4096;
        // In id order, the order of `isolated_by`.
        let index = self.np_by_ns.get(&pod.namespace);
        let mut nps: Vec<&CompiledPolicy> = index
            .into_iter()
            .flat_map(|index| index.candidates(&pod.labels))
            .map(|p| &*p.0)
            .filter(|cp| cp.selects(pod, labels))
            .collect();
        if !index.is_some_and(NpIndex::sorted_without_repeats) {
            nps.sort_by(|a, b| a.policy.id.cmp(&b.policy.id));
            nps.dedup_by(|a, b| a.policy.id == b.policy.id);
        }
        let mut defs = Vec::new();
        let mut tier_defs = Vec::with_capacity(4);
        let mut build = |direction: Direction| {
            let mut rules = DirectionRules::default();
            for (tier, list) in [
                (Tier::Admin, &mut rules.admin),
                (Tier::Baseline, &mut rules.baseline),
            ] {
                let (shared, its_defs) = self.tier_lists.get(direction, tier, &tiered, pod, bound);
                *list = shared;
                tier_defs.push(its_defs);
            }
            for cp in nps.iter().filter(|cp| cp.policy.isolates.get(direction)) {
                rules.isolated_by.push(cp.policy.id.clone());
                for i in 0..cp.rules(direction).len() {
                    rules
                        .network_policy
                        .extend(cp.instance(direction, i, pod, &mut defs));
                }
            }
            drop_unreachable(&mut rules.network_policy);
            rules
        };
        let ingress = build(Direction::Ingress);
        let egress = build(Direction::Egress);
        let mut seen = rustc_hash::FxHashSet::default();
        defs.retain(|(key, _)| seen.insert(*key));
        let tier_defs: [Arc<Defs>; 4] = match tier_defs.try_into() {
            Ok(parts) => parts,
            Err(_) => unreachable!("two tiers in two directions"),
        };
        Compiled {
            ingress: Arc::new(ingress),
            egress: Arc::new(egress),
            defs,
            tier_defs: self.tier_lists.combined(tier_defs, bound),
        }
    }
}
