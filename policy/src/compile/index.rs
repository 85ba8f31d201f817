//! The incremental compiler's index.
//!
//! State is kept so that every change has a cheap, exact answer to "what does this affect":
//! - policies by namespace (NetworkPolicies) and, per namespace, the tiered policies whose
//!   namespace selector matches it, in evaluation order;
//! - pods by namespace, node and named port;
//! - each pod's compiled rules and the groups they reference;
//! - live groups with their members and the nodes referencing them, indexed by what can
//!   change their membership (a namespace, any namespace's labels, a port name, nodes).
//!
//! A group lives while some pod's rules reference it; its members are computed when it is
//! first referenced and maintained incrementally after that.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap as HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::groups::{node_members, GroupDef, GroupState, Member};
use super::instances::CompiledPolicy;
use super::{Change, Touched, Warning};
use crate::model::{
    Cluster, ContainerPort, Direction, Labels, Namespace, NamespaceScope, Node, Pod, PodKey,
    Policy, PolicyId, RuleOrigin, Subject, Tier,
};
use crate::ruleset::{DirectionRules, GroupId, NodeRuleSet, PodRules, RuleId, RuleInstance};
use crate::selector::LabelSelector;

static NO_LABELS: Labels = Labels::new();

/// What the policies mean for every pod of one namespace with the same labels and ports.
#[derive(PartialEq)]
struct Compiled {
    ingress: Arc<DirectionRules>,
    egress: Arc<DirectionRules>,
    defs: Vec<(GroupId, Arc<GroupDef>)>,
}

/// Pods of a namespace with equal labels and ports share one compilation.
type MemoKey = (Labels, Vec<ContainerPort>);
/// Per namespace: hash of the key → entries with that hash.
type Memo = HashMap<String, HashMap<u64, Vec<(MemoKey, Arc<Compiled>)>>>;

fn memo_hash(labels: &Labels, ports: &[ContainerPort]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    labels.hash(&mut h);
    ports.hash(&mut h);
    h.finish()
}

struct PodEntry {
    /// Shared with the node table, so references cost a count, not a string.
    node: Arc<str>,
    ips: Vec<IpAddr>,
    compiled: Arc<Compiled>,
}

impl PodEntry {
    fn refs(&self) -> impl Iterator<Item = &GroupId> {
        self.compiled.defs.iter().map(|(id, _)| id)
    }
}

impl PodEntry {
    fn same_as(&self, other: &PodEntry) -> bool {
        self.node == other.node
            && self.ips == other.ips
            && (Arc::ptr_eq(&self.compiled, &other.compiled) || self.compiled == other.compiled)
    }
}

/// Cluster state and policies, compiled incrementally into per-node rule sets.
pub struct Compiler {
    cluster: Cluster,
    policies: BTreeMap<PolicyId, CompiledPolicy>,
    rule_origins: HashMap<RuleId, RuleOrigin>,
    np_by_ns: HashMap<String, BTreeSet<PolicyId>>,
    /// Tiered policies in evaluation order.
    tiered: BTreeSet<(Tier, u32, PolicyId)>,
    /// Per namespace, the tiered policies whose subject's namespace selector matches it.
    tiered_by_ns: HashMap<String, Vec<PolicyId>>,
    /// Pods per namespace (a count: the pods themselves are a range of `cluster.pods`).
    pods_by_ns: HashMap<String, usize>,
    pods_by_node: BTreeMap<String, BTreeSet<PodKey>>,
    pod_entries: HashMap<PodKey, PodEntry>,
    groups: HashMap<GroupId, GroupState>,
    groups_by_ns: HashMap<String, BTreeSet<GroupId>>,
    ns_selector_groups: BTreeSet<GroupId>,
    named_groups_by_port: HashMap<String, BTreeSet<GroupId>>,
    node_groups: BTreeSet<GroupId>,
    memo: Memo,
    node_names: HashMap<String, Arc<str>>,
}

impl Compiler {
    /// A full compile of `cluster` and `policies`.
    pub fn new(cluster: Cluster, policies: Vec<Policy>) -> Self {
        let mut c = Compiler {
            cluster: Cluster {
                namespaces: cluster.namespaces,
                pods: BTreeMap::new(),
                nodes: cluster.nodes,
            },
            policies: BTreeMap::new(),
            rule_origins: HashMap::default(),
            np_by_ns: HashMap::default(),
            tiered: BTreeSet::new(),
            tiered_by_ns: HashMap::default(),
            pods_by_ns: HashMap::default(),
            pods_by_node: BTreeMap::new(),
            pod_entries: HashMap::default(),
            groups: HashMap::default(),
            groups_by_ns: HashMap::default(),
            ns_selector_groups: BTreeSet::new(),
            named_groups_by_port: HashMap::default(),
            node_groups: BTreeSet::new(),
            memo: HashMap::default(),
            node_names: HashMap::default(),
        };
        c.cluster.pods = cluster.pods;
        let pods = std::mem::take(&mut c.cluster.pods);
        for pod in pods.values() {
            c.index_pod(pod);
        }
        c.cluster.pods = pods;
        for policy in policies {
            c.index_policy(CompiledPolicy::new(policy));
        }
        let namespaces: Vec<String> = c.known_namespaces().cloned().collect();
        for ns in namespaces {
            c.refresh_tiered_for_namespace(&ns);
        }
        // One pass over the pods, taken out of the cluster so they can be read while the
        // index grows; groups are created empty and their members computed once, after.
        let pods = std::mem::take(&mut c.cluster.pods);
        let mut memo = std::mem::take(&mut c.memo);
        for (key, pod) in pods.iter().filter(|(_, p)| !p.host_network) {
            let compiled = c.compiled_for(&mut memo, pod);
            let node = c.node_name(&pod.node);
            for (gid, def) in &compiled.defs {
                c.reference_group(&node, gid, def);
            }
            let entry = PodEntry {
                node,
                ips: pod.ips.clone(),
                compiled,
            };
            c.pod_entries.insert(key.clone(), entry);
        }
        c.memo = memo;
        c.cluster.pods = pods;
        let ids: Vec<GroupId> = c.groups.keys().cloned().collect();
        for gid in ids {
            let members = c.compute_members(&c.groups[&gid].def);
            if let Some(g) = c.groups.get_mut(&gid) {
                g.reset(members);
            }
        }
        c
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|p| &p.policy)
    }

    /// Applies one change and says which nodes' rule sets it changed.
    pub fn apply(&mut self, change: Change) -> Touched {
        let mut t = Touched::default();
        match change {
            Change::UpsertPod(pod) => self.set_pod(pod.key(), Some(pod), &mut t),
            Change::RemovePod(key) => self.set_pod(key, None, &mut t),
            Change::UpsertNamespace(ns) => self.set_namespace(ns.name.clone(), Some(ns), &mut t),
            Change::RemoveNamespace(name) => self.set_namespace(name, None, &mut t),
            Change::UpsertNode(node) => self.set_node(node.name.clone(), Some(node), &mut t),
            Change::RemoveNode(name) => self.set_node(name, None, &mut t),
            Change::UpsertPolicy(p) => self.set_policy(p.id.clone(), Some(p), &mut t),
            Change::RemovePolicy(id) => self.set_policy(id, None, &mut t),
        }
        t
    }

    /// Every node: those with a Node object and those named by pods.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.cluster
            .nodes
            .keys()
            .map(String::as_str)
            .chain(
                self.pods_by_node
                    .iter()
                    .filter(|(_, p)| !p.is_empty())
                    .map(|(n, _)| n.as_str()),
            )
            .collect()
    }

    fn node_exists(&self, node: &str) -> bool {
        self.cluster.nodes.contains_key(node)
            || self.pods_by_node.get(node).is_some_and(|p| !p.is_empty())
    }

    pub fn node_rule_set(&self, node: &str) -> Option<NodeRuleSet> {
        if !self.node_exists(node) {
            return None;
        }
        let mut set = NodeRuleSet {
            node: node.to_string(),
            node_addresses: self
                .cluster
                .nodes
                .get(node)
                .map(|n| n.addresses.clone())
                .unwrap_or_default(),
            ..NodeRuleSet::default()
        };
        for key in self.pods_by_node.get(node).into_iter().flatten() {
            let Some(entry) = self.pod_entries.get(key) else {
                continue;
            };
            for gid in entry.refs() {
                if !set.groups.contains_key(gid) {
                    if let Some(g) = self.groups.get(gid) {
                        set.groups.insert(gid.clone(), g.group());
                    }
                }
            }
            for rules in [&entry.compiled.ingress, &entry.compiled.egress] {
                for inst in rules.instances() {
                    if !set.rules.contains_key(&inst.rule) {
                        if let Some(origin) = self.rule_origins.get(&inst.rule) {
                            set.rules.insert(inst.rule.clone(), origin.clone());
                        }
                    }
                }
            }
            set.pods.push(PodRules {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                ips: entry.ips.clone(),
                ingress: entry.compiled.ingress.clone(),
                egress: entry.compiled.egress.clone(),
            });
        }
        Some(set)
    }

    pub fn node_rule_sets(&self) -> BTreeMap<String, NodeRuleSet> {
        self.nodes()
            .into_iter()
            .filter_map(|n| self.node_rule_set(n).map(|s| (n.to_string(), s)))
            .collect()
    }

    /// Same-priority pairs within a tier that select a common pod. (Peers that cannot be
    /// enforced are warned about where they are read, with their field path.)
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out = Vec::new();
        let mut by_rank: BTreeMap<(Tier, u32), Vec<&CompiledPolicy>> = BTreeMap::new();
        for (tier, priority, id) in &self.tiered {
            by_rank
                .entry((*tier, *priority))
                .or_default()
                .push(&self.policies[id]);
        }
        for ((tier, priority), ps) in by_rank {
            for (i, a) in ps.iter().enumerate() {
                for b in &ps[i + 1..] {
                    let sa = self.subjects(a);
                    if self.subjects(b).iter().any(|k| sa.contains(k)) {
                        out.push(Warning {
                            policies: vec![a.policy.id.clone(), b.policy.id.clone()],
                            message: format!(
                                "same tier ({tier}) and priority ({priority}) and a common subject pod; \
                                 {} is evaluated first (ties are broken by kind, then name)",
                                a.policy.id.name
                            ),
                        });
                    }
                }
            }
        }
        out.sort();
        out
    }

    // ----- pods -----

    fn ns_labels(&self, ns: &str) -> &Labels {
        self.cluster
            .namespaces
            .get(ns)
            .map(|n| &n.labels)
            .unwrap_or(&NO_LABELS)
    }

    /// The pods of one namespace: a range of the cluster's pods, which are sorted by
    /// namespace first.
    fn pods_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = (&'a PodKey, &'a Pod)> + 'a {
        let from = PodKey::new(ns, "");
        self.cluster
            .pods
            .range(from..)
            .take_while(move |(k, _)| k.namespace == ns)
    }

    /// Namespaces (with or without a Namespace object) whose labels `sel` matches.
    fn namespaces_matching<'a>(&'a self, sel: &LabelSelector) -> Vec<(&'a str, &'a Labels)> {
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

    fn known_namespaces(&self) -> impl Iterator<Item = &String> {
        let extra = self
            .pods_by_ns
            .keys()
            .filter(|n| !self.cluster.namespaces.contains_key(*n));
        self.cluster.namespaces.keys().chain(extra)
    }

    fn index_pod(&mut self, pod: &Pod) {
        let key = pod.key();
        match self.pods_by_ns.get_mut(&pod.namespace) {
            Some(n) => *n += 1,
            None => {
                self.pods_by_ns.insert(pod.namespace.clone(), 1);
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

    fn unindex_pod(&mut self, pod: &Pod) {
        let key = pod.key();
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

    fn set_pod(&mut self, key: PodKey, new: Option<Pod>, t: &mut Touched) {
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
        let mut candidates: BTreeSet<GroupId> = self
            .groups_by_ns
            .get(&key.namespace)
            .cloned()
            .unwrap_or_default();
        candidates.extend(self.ns_selector_groups.iter().cloned());
        for pod in old.iter().chain(new.iter()) {
            for name in pod.ports.iter().filter_map(|p| p.name.as_ref()) {
                candidates.extend(
                    self.named_groups_by_port
                        .get(name)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
        }
        let mut changed = BTreeSet::new();
        for gid in candidates {
            let (before, after) = {
                let g = &self.groups[&gid];
                (
                    contribution(&g.def, old.as_ref(), &labels),
                    contribution(&g.def, new.as_ref(), &labels),
                )
            };
            if self.update_members(&gid, &before, &after) {
                changed.insert(gid);
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

    fn update_members(&mut self, gid: &GroupId, before: &[Member], after: &[Member]) -> bool {
        if before == after {
            return false;
        }
        let Some(g) = self.groups.get_mut(gid) else {
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

    fn touch_groups(&self, changed: &BTreeSet<GroupId>, t: &mut Touched) {
        for gid in changed {
            if let Some(g) = self.groups.get(gid) {
                t.nodes.extend(g.nodes.keys().map(|n| n.to_string()));
            }
        }
    }

    /// Recomputes one pod's rules and the group references that follow from them.
    fn refresh_pod(&mut self, key: &PodKey, t: &mut Touched) {
        let fresh = match self.cluster.pods.get(key) {
            Some(pod) if !pod.host_network => {
                // The memo is taken out so the pod can stay borrowed from the cluster.
                let mut memo = std::mem::take(&mut self.memo);
                let compiled = self.compiled_for(&mut memo, pod);
                self.memo = memo;
                let (node, ips) = (pod.node.clone(), pod.ips.clone());
                Some(PodEntry {
                    node: self.node_name(&node),
                    ips,
                    compiled,
                })
            }
            _ => None,
        };
        let old = self.pod_entries.remove(key);
        match (old, fresh) {
            (Some(o), Some(f)) if o.same_as(&f) => {
                self.pod_entries.insert(key.clone(), o);
            }
            (old, fresh) => {
                if let Some(f) = &fresh {
                    t.nodes.insert(f.node.to_string());
                    for (gid, def) in &f.compiled.defs {
                        self.acquire_ref(&f.node, gid, def);
                    }
                }
                if let Some(o) = old {
                    t.nodes.insert(o.node.to_string());
                    self.release_refs(&o.node, o.refs());
                }
                if let Some(f) = fresh {
                    self.pod_entries.insert(key.clone(), f);
                }
            }
        }
    }

    fn node_name(&mut self, node: &str) -> Arc<str> {
        if let Some(n) = self.node_names.get(node) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(node);
        self.node_names.insert(node.to_string(), n.clone());
        n
    }

    fn compiled_for(&self, memo: &mut Memo, pod: &Pod) -> Arc<Compiled> {
        let hash = memo_hash(&pod.labels, &pod.ports);
        let found = memo
            .get(&pod.namespace)
            .and_then(|m| m.get(&hash))
            .and_then(|entries| {
                entries
                    .iter()
                    .find(|((l, p), _)| l == &pod.labels && p == &pod.ports)
                    .map(|(_, c)| c.clone())
            });
        if let Some(c) = found {
            return c;
        }
        let c = Arc::new(self.pod_rules(pod));
        let pods_here = self.pods_by_ns.get(&pod.namespace).copied().unwrap_or(0);
        let per_ns = memo.entry(pod.namespace.clone()).or_default();
        // Label churn leaves entries no pod uses; a bound relative to the namespace's size
        // keeps the cache from growing without limit.
        if per_ns.len() > 2 * pods_here + 16 {
            per_ns.clear();
        }
        per_ns
            .entry(hash)
            .or_default()
            .push(((pod.labels.clone(), pod.ports.clone()), c.clone()));
        c
    }

    fn pod_rules(&self, pod: &Pod) -> Compiled {
        let labels = self.ns_labels(&pod.namespace);
        let tiered: Vec<&CompiledPolicy> = self
            .tiered_by_ns
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .map(|id| &self.policies[id])
            .filter(|cp| cp.selects(pod, labels))
            .collect();
        let nps: Vec<&CompiledPolicy> = self
            .np_by_ns
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .map(|id| &self.policies[id])
            .filter(|cp| cp.selects(pod, labels))
            .collect();
        let mut defs = Vec::new();
        let mut build = |direction: Direction| {
            let mut rules = DirectionRules::default();
            let mut instances = |cp: &CompiledPolicy, out: &mut Vec<_>| {
                for i in 0..cp.rules(direction).len() {
                    out.extend(cp.instance(direction, i, pod, &mut defs));
                }
            };
            for cp in &tiered {
                match cp.policy.tier {
                    Tier::Admin => instances(cp, &mut rules.admin),
                    Tier::Baseline => instances(cp, &mut rules.baseline),
                    Tier::NetworkPolicy => {}
                }
            }
            for cp in nps.iter().filter(|cp| cp.policy.isolates.get(direction)) {
                rules.isolated_by.push(cp.policy.id.clone());
                instances(cp, &mut rules.network_policy);
            }
            for list in [
                &mut rules.admin,
                &mut rules.network_policy,
                &mut rules.baseline,
            ] {
                drop_unreachable(list);
            }
            rules
        };
        let ingress = build(Direction::Ingress);
        let egress = build(Direction::Egress);
        let mut seen = BTreeSet::new();
        defs.retain(|(id, _)| seen.insert(id.clone()));
        Compiled {
            ingress: Arc::new(ingress),
            egress: Arc::new(egress),
            defs,
        }
    }

    // ----- groups -----

    fn acquire_ref(&mut self, node: &Arc<str>, gid: &GroupId, def: &Arc<GroupDef>) {
        if !self.groups.contains_key(gid) {
            let mut state = GroupState::new(def.clone());
            state.reset(self.compute_members(&state.def));
            self.index_group(gid, &state.def);
            self.groups.insert(gid.clone(), state);
        }
        self.reference_group(node, gid, def);
    }

    /// Counts a reference from `node`, creating the group without members if it is new (the
    /// full compile computes all members at the end).
    fn reference_group(&mut self, node: &Arc<str>, gid: &GroupId, def: &Arc<GroupDef>) {
        let g = match self.groups.get_mut(gid) {
            Some(g) => g,
            None => {
                self.index_group(gid, def);
                self.groups
                    .entry(gid.clone())
                    .or_insert_with(|| GroupState::new(def.clone()))
            }
        };
        match g.nodes.get_mut(node) {
            Some(c) => *c += 1,
            None => {
                g.nodes.insert(node.clone(), 1);
            }
        }
    }

    fn release_refs<'a>(&mut self, node: &str, refs: impl Iterator<Item = &'a GroupId>) {
        for gid in refs {
            let Some(g) = self.groups.get_mut(gid) else {
                continue;
            };
            if let Some(c) = g.nodes.get_mut(node) {
                *c -= 1;
                if *c == 0 {
                    g.nodes.remove(node);
                }
            }
            if g.nodes.is_empty() {
                let g = self.groups.remove(gid).expect("present");
                self.unindex_group(gid, &g.def);
            }
        }
    }

    fn index_group(&mut self, gid: &GroupId, def: &GroupDef) {
        match index_slot(def) {
            Slot::Namespace(ns) => {
                self.groups_by_ns
                    .entry(ns.to_string())
                    .or_default()
                    .insert(gid.clone());
            }
            Slot::NamespaceSelector(_) => {
                self.ns_selector_groups.insert(gid.clone());
            }
            Slot::PortName(name) => {
                self.named_groups_by_port
                    .entry(name.to_string())
                    .or_default()
                    .insert(gid.clone());
            }
            Slot::Nodes => {
                self.node_groups.insert(gid.clone());
            }
            Slot::Static => {}
        }
    }

    fn unindex_group(&mut self, gid: &GroupId, def: &GroupDef) {
        fn take(map: &mut HashMap<String, BTreeSet<GroupId>>, key: &str, gid: &GroupId) {
            if let Some(s) = map.get_mut(key) {
                s.remove(gid);
                if s.is_empty() {
                    map.remove(key);
                }
            }
        }
        match index_slot(def) {
            Slot::Namespace(ns) => take(&mut self.groups_by_ns, ns, gid),
            Slot::NamespaceSelector(_) => {
                self.ns_selector_groups.remove(gid);
            }
            Slot::PortName(name) => take(&mut self.named_groups_by_port, name, gid),
            Slot::Nodes => {
                self.node_groups.remove(gid);
            }
            Slot::Static => {}
        }
    }

    fn compute_members(&self, def: &GroupDef) -> Vec<Member> {
        let mut out = Vec::new();
        match index_slot(def) {
            Slot::Namespace(ns) => {
                let labels = self.ns_labels(ns);
                for (_, pod) in self.pods_in(ns) {
                    def.contribution(pod, labels, &mut out);
                }
            }
            Slot::NamespaceSelector(sel) => {
                for (ns, labels) in self.namespaces_matching(sel) {
                    for (_, pod) in self.pods_in(ns) {
                        def.contribution(pod, labels, &mut out);
                    }
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

    // ----- namespaces -----

    fn refresh_tiered_for_namespace(&mut self, ns: &str) {
        let labels = self.ns_labels(ns);
        let ids: Vec<PolicyId> = self
            .tiered
            .iter()
            .filter(|(_, _, id)| namespace_may_match(&self.policies[id].policy, ns, labels))
            .map(|(_, _, id)| id.clone())
            .collect();
        self.tiered_by_ns.insert(ns.to_string(), ids);
    }

    fn set_namespace(&mut self, name: String, new: Option<Namespace>, t: &mut Touched) {
        let old_labels = self.ns_labels(&name).clone();
        let existed = self.cluster.namespaces.contains_key(&name);
        match new {
            Some(ns) => {
                if existed && self.cluster.namespaces[&name] == ns {
                    return;
                }
                self.cluster.namespaces.insert(name.clone(), ns);
            }
            None => {
                if !existed {
                    return;
                }
                self.cluster.namespaces.remove(&name);
            }
        }
        let new_labels = self.ns_labels(&name).clone();
        if new_labels == old_labels {
            return;
        }
        self.refresh_tiered_for_namespace(&name);
        self.memo.remove(&name);
        if !self.cluster.namespaces.contains_key(&name) && !self.pods_by_ns.contains_key(&name) {
            self.tiered_by_ns.remove(&name);
        }
        let pods: Vec<PodKey> = self.pods_in(&name).map(|(k, _)| k.clone()).collect();
        let dependent: Vec<GroupId> = self.ns_selector_groups.iter().cloned().collect();
        let mut changed = BTreeSet::new();
        for key in &pods {
            let Some(pod) = self.cluster.pods.get(key).cloned() else {
                continue;
            };
            for gid in &dependent {
                let (before, after) = {
                    let def = &self.groups[gid].def;
                    (
                        contribution_with(def, &pod, &old_labels),
                        contribution_with(def, &pod, &new_labels),
                    )
                };
                if self.update_members(gid, &before, &after) {
                    changed.insert(gid.clone());
                }
            }
        }
        for key in &pods {
            self.refresh_pod(key, t);
        }
        self.touch_groups(&changed, t);
    }

    // ----- nodes -----

    fn set_node(&mut self, name: String, new: Option<Node>, t: &mut Touched) {
        let old = self.cluster.nodes.get(&name).cloned();
        if old == new {
            return;
        }
        let existed = self.node_exists(&name);
        if old.as_ref().map(|n| &n.addresses) != new.as_ref().map(|n| &n.addresses) {
            t.nodes.insert(name.clone());
        }
        match new {
            Some(n) => self.cluster.nodes.insert(name.clone(), n),
            None => self.cluster.nodes.remove(&name),
        };
        if self.node_exists(&name) != existed {
            t.nodes.insert(name.clone());
        }
        let mut changed = BTreeSet::new();
        for gid in self.node_groups.clone() {
            let members = self.compute_members(&self.groups[&gid].def);
            if self.groups.get_mut(&gid).is_some_and(|g| g.reset(members)) {
                changed.insert(gid);
            }
        }
        self.touch_groups(&changed, t);
    }

    // ----- policies -----

    fn index_policy(&mut self, cp: CompiledPolicy) {
        let id = cp.policy.id.clone();
        for rule in cp.all_rules() {
            self.rule_origins
                .insert(rule.id.clone(), rule.origin.clone());
        }
        match (&cp.policy.tier, &cp.policy.subject) {
            (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) => {
                self.np_by_ns
                    .entry(namespace.clone())
                    .or_default()
                    .insert(id.clone());
            }
            _ => {
                self.tiered
                    .insert((cp.policy.tier, cp.policy.priority, id.clone()));
            }
        }
        self.policies.insert(id, cp);
    }

    fn unindex_policy(&mut self, id: &PolicyId) -> Option<CompiledPolicy> {
        let cp = self.policies.remove(id)?;
        for rule in cp.all_rules() {
            self.rule_origins.remove(&rule.id);
        }
        if let (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) =
            (&cp.policy.tier, &cp.policy.subject)
        {
            if let Some(s) = self.np_by_ns.get_mut(namespace) {
                s.remove(id);
                if s.is_empty() {
                    self.np_by_ns.remove(namespace);
                }
            }
        } else {
            self.tiered
                .remove(&(cp.policy.tier, cp.policy.priority, id.clone()));
        }
        Some(cp)
    }

    /// The pods a policy selects now.
    fn subjects(&self, cp: &CompiledPolicy) -> BTreeSet<PodKey> {
        let namespaces: Vec<(&str, &Labels)> = match &cp.policy.subject {
            Subject::Namespace { namespace, .. } => {
                vec![(namespace.as_str(), self.ns_labels(namespace))]
            }
            Subject::Cluster { namespaces, .. } => self.namespaces_matching(namespaces),
        };
        let mut out = BTreeSet::new();
        for (ns, labels) in namespaces {
            for (key, pod) in self.pods_in(ns) {
                if cp.selects(pod, labels) {
                    out.insert(key.clone());
                }
            }
        }
        out
    }

    fn set_policy(&mut self, id: PolicyId, new: Option<Policy>, t: &mut Touched) {
        if self.policies.get(&id).map(|cp| &cp.policy) == new.as_ref() {
            return;
        }
        let mut affected = BTreeSet::new();
        let mut tiered_changed = false;
        if let Some(old) = self.unindex_policy(&id) {
            affected.extend(self.subjects(&old));
            tiered_changed |= old.policy.tier != Tier::NetworkPolicy;
        }
        if let Some(policy) = new {
            let cp = CompiledPolicy::new(policy);
            affected.extend(self.subjects(&cp));
            tiered_changed |= cp.policy.tier != Tier::NetworkPolicy;
            self.index_policy(cp);
        }
        if tiered_changed {
            self.reorder_tiered(&id);
            self.memo.clear();
        } else if let Some(ns) = &id.namespace {
            self.memo.remove(ns);
        }
        for key in affected {
            self.refresh_pod(&key, t);
        }
    }

    /// Puts one tiered policy into (or takes it out of) every namespace's ordered list.
    fn reorder_tiered(&mut self, id: &PolicyId) {
        let namespaces: Vec<String> = self.tiered_by_ns.keys().cloned().collect();
        for ns in namespaces {
            let keep = self
                .policies
                .get(id)
                .is_some_and(|cp| namespace_may_match(&cp.policy, &ns, self.ns_labels(&ns)));
            let rank = |pid: &PolicyId| {
                let p = &self.policies[pid].policy;
                (p.tier, p.priority, pid.clone())
            };
            let mut list = self.tiered_by_ns.remove(&ns).unwrap_or_default();
            list.retain(|p| p != id);
            if keep {
                let r = rank(id);
                let at = list.partition_point(|p| rank(p) < r);
                list.insert(at, id.clone());
            }
            self.tiered_by_ns.insert(ns, list);
        }
    }
}

/// Where a group is indexed: by what can change its membership.
enum Slot<'a> {
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

fn index_slot(def: &GroupDef) -> Slot<'_> {
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

/// Drops instances that can never be the first to match: a later instance of a tier with
/// the same clauses as an earlier one. Verdicts and hit attribution are unchanged, and a
/// pod selected by thousands of identical policies gets one rule, not thousands.
fn drop_unreachable(list: &mut Vec<RuleInstance>) {
    let mut seen = BTreeSet::new();
    list.retain(|inst| seen.insert(inst.clauses.clone()));
}

fn namespace_may_match(policy: &Policy, ns: &str, labels: &Labels) -> bool {
    match &policy.subject {
        Subject::Namespace { namespace, .. } => namespace == ns,
        Subject::Cluster { namespaces, .. } => namespaces.matches(labels),
    }
}

fn contribution(def: &GroupDef, pod: Option<&Pod>, ns_labels: &Labels) -> Vec<Member> {
    let mut out = Vec::new();
    if let Some(p) = pod {
        def.contribution(p, ns_labels, &mut out);
    }
    out
}

fn contribution_with(def: &GroupDef, pod: &Pod, ns_labels: &Labels) -> Vec<Member> {
    contribution(def, Some(pod), ns_labels)
}
