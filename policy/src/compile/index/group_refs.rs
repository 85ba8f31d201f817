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
        self.reference_group_from(&[node], gkey, def);
    }

    /// [`Compiler::reference_group`] for one pod on each of `nodes`.
    pub(super) fn reference_group_from(
        &mut self,
        nodes: &[u32],
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
        for &node in nodes {
            *g.nodes.entry(node).or_insert(0) += 1;
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
