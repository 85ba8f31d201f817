//! Live groups: references from nodes, where each group is indexed, and its members.

use super::*;

impl Compiler {
    pub(super) fn acquire_ref(&mut self, node: u32, gkey: GroupKey, def: &Arc<GroupDef>) {
        if !self.groups.contains_key(&gkey) {
            let mut state = GroupState::new(def.clone());
            state.reset(self.compute_members(&state.def));
            self.index_group(gkey, &state.def);
            self.groups.insert(gkey, state);
        }
        self.reference_group(node, gkey, def);
    }

    /// Counts a reference from `node`, creating the group without members if it is new (the
    /// full compile computes all members at the end).
    pub(super) fn reference_group(&mut self, node: u32, gkey: GroupKey, def: &Arc<GroupDef>) {
        self.reference_group_from([(node, 1)], gkey, def);
    }

    /// [`Compiler::reference_group`] for `pods` pods on each `(node, pods)` of `counts`.
    pub(super) fn reference_group_from(
        &mut self,
        counts: impl IntoIterator<Item = (u32, u32)>,
        gkey: GroupKey,
        def: &Arc<GroupDef>,
    ) {
        let g = match self.groups.get_mut(&gkey) {
            Some(g) => g,
            None => {
                self.index_group(gkey, def);
                self.groups
                    .entry(gkey)
                    .or_insert_with(|| GroupState::new(def.clone()))
            }
        };
        for (node, pods) in counts {
            *g.nodes.entry(node).or_insert(0) += pods;
        }
    }

    /// The full compile's references from tier lists: `users` holds each combination of
    /// the lists' groups with the node of every pod that has it. A group of many
    /// combinations (a cluster-wide peer) meets most pods of the cluster but few nodes by
    /// comparison: its pods are counted per node in a dense table first, and its node
    /// table is then written once per node, not once per pod.
    pub(super) fn reference_tier_groups(&mut self, users: &[(Arc<Defs>, Vec<u32>)]) {
        let mut by_group: HashMap<GroupKey, (&Arc<GroupDef>, Vec<&[u32]>)> = HashMap::default();
        for (defs, nodes) in users {
            for (gkey, def) in defs.iter() {
                by_group
                    .entry(*gkey)
                    .or_insert_with(|| (def, Vec::new()))
                    .1
                    .push(nodes);
            }
        }
        let mut pods_on = vec![0u32; self.node_names.len()];
        let mut nodes = Vec::new();
        for (gkey, (def, lists)) in by_group {
            for &node in lists.into_iter().flatten() {
                let pods = &mut pods_on[node as usize];
                if *pods == 0 {
                    nodes.push(node);
                }
                *pods += 1;
            }
            nodes.sort_unstable();
            self.reference_group_from(nodes.iter().map(|&n| (n, pods_on[n as usize])), gkey, def);
            for node in nodes.drain(..) {
                pods_on[node as usize] = 0;
            }
        }
    }

    pub(super) fn release_refs<'a>(&mut self, node: u32, refs: impl Iterator<Item = &'a GroupKey>) {
        for gkey in refs {
            let Some(g) = self.groups.get_mut(gkey) else {
                continue;
            };
            if let Some(c) = g.nodes.get_mut(&node) {
                *c -= 1;
                if *c == 0 {
                    g.nodes.remove(&node);
                }
            }
            if g.nodes.is_empty() {
                if let Some(g) = self.groups.remove(gkey) {
                    self.unindex_group(*gkey, &g.def);
                }
            }
        }
    }

    pub(super) fn index_group(&mut self, gkey: GroupKey, def: &GroupDef) {
        let selector = group_pod_selector(def).unwrap_or(&EVERYTHING);
        match index_slot(def) {
            Slot::Namespace(ns) => {
                self.groups_by_ns
                    .entry(ns.to_string())
                    .or_default()
                    .insert(selector, gkey);
            }
            Slot::NamespaceSelector(_) => {
                self.ns_selector_groups.insert(selector, gkey);
            }
            Slot::PortName(name) => {
                self.named_groups_by_port
                    .entry(name.to_string())
                    .or_default()
                    .insert(gkey);
            }
            Slot::Nodes => {
                self.node_groups.insert(gkey);
            }
            Slot::Static => {}
        }
    }

    pub(super) fn unindex_group(&mut self, gkey: GroupKey, def: &GroupDef) {
        fn take(map: &mut HashMap<String, BTreeSet<GroupKey>>, key: &str, gkey: GroupKey) {
            if let Some(s) = map.get_mut(key) {
                s.remove(&gkey);
                if s.is_empty() {
                    map.remove(key);
                }
            }
        }
        let selector = group_pod_selector(def).unwrap_or(&EVERYTHING);
        match index_slot(def) {
            Slot::Namespace(ns) => {
                if let Some(index) = self.groups_by_ns.get_mut(ns) {
                    index.remove(selector, &gkey);
                    if index.is_empty() {
                        self.groups_by_ns.remove(ns);
                    }
                }
            }
            Slot::NamespaceSelector(_) => {
                self.ns_selector_groups.remove(selector, &gkey);
            }
            Slot::PortName(name) => take(&mut self.named_groups_by_port, name, gkey),
            Slot::Nodes => {
                self.node_groups.remove(&gkey);
            }
            Slot::Static => {}
        }
    }

    pub(super) fn compute_members(&self, def: &GroupDef) -> Vec<Member> {
        let mut out = Vec::new();
        match index_slot(def) {
            Slot::Namespace(ns) => {
                let labels = self.ns_labels(ns);
                let selector = group_pod_selector(def).unwrap_or(&EVERYTHING);
                self.for_pods_maybe_selected(ns, selector, |_, pod| {
                    def.contribution(pod, labels, &mut out);
                });
            }
            Slot::NamespaceSelector(sel) => {
                let selector = group_pod_selector(def).unwrap_or(&EVERYTHING);
                for (ns, labels) in self.namespaces_matching(sel) {
                    self.for_pods_maybe_selected(ns, selector, |_, pod| {
                        def.contribution(pod, labels, &mut out);
                    });
                }
            }
            Slot::PortName(_) => {
                // Named ports on any pod: rare enough (egress to a block or to anyone by port
                // name) that a scan at creation beats indexing every pod by port name.
                for pod in self.cluster.pods.values() {
                    def.contribution(pod, self.ns_labels(&pod.namespace), &mut out);
                }
            }
            Slot::Nodes => {
                if let GroupDef::Nodes(sel) = def {
                    out = node_members(sel, self.cluster.nodes.values());
                }
            }
            Slot::Static => {}
        }
        out
    }
}

/// Where a group is indexed: by what can change its membership.
pub(super) enum Slot<'a> {
    /// Pods of one namespace (and named ports on them).
    Namespace(&'a str),
    /// Pods of the namespaces a selector matches: any namespace's labels matter.
    NamespaceSelector(&'a LabelSelector),
    /// Named ports on any pod (or on pods in a block).
    PortName(&'a str),
    Nodes,
    /// Blocks: their members never change.
    Static,
}

pub(super) fn index_slot(def: &GroupDef) -> Slot<'_> {
    match def {
        GroupDef::Pods {
            namespaces: NamespaceScope::Named(ns),
            ..
        } => Slot::Namespace(ns),
        GroupDef::Pods {
            namespaces: NamespaceScope::Selector(s),
            ..
        } => Slot::NamespaceSelector(s),
        GroupDef::NamedPorts {
            peer: Some(p),
            name,
            ..
        } => match index_slot(p) {
            Slot::Namespace(ns) => Slot::Namespace(ns),
            Slot::NamespaceSelector(s) => Slot::NamespaceSelector(s),
            _ => Slot::PortName(name),
        },
        GroupDef::NamedPorts {
            peer: None, name, ..
        } => Slot::PortName(name),
        GroupDef::Nodes(_) => Slot::Nodes,
        GroupDef::Block { .. } => Slot::Static,
    }
}

/// The pod selector a pod-based group's members must match (for named ports, its peer's).
pub(super) fn group_pod_selector(def: &GroupDef) -> Option<&LabelSelector> {
    match def {
        GroupDef::Pods { pods, .. } => Some(pods),
        GroupDef::NamedPorts { peer: Some(p), .. } => group_pod_selector(p),
        _ => None,
    }
}

pub(super) fn contribution(def: &GroupDef, pod: Option<&Pod>, ns_labels: &Labels) -> Vec<Member> {
    let mut out = Vec::new();
    if let Some(p) = pod {
        def.contribution(p, ns_labels, &mut out);
    }
    out
}

pub(super) fn contribution_with(def: &GroupDef, pod: &Pod, ns_labels: &Labels) -> Vec<Member> {
    contribution(def, Some(pod), ns_labels)
}
