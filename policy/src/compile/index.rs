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

use super::groups::{group_id, node_members, GroupDef, GroupKey, GroupState, Member};
use super::instances::CompiledPolicy;
use super::{Change, Touched, Warning};
use crate::model::{
    Cluster, ContainerPort, Direction, Labels, Namespace, NamespaceScope, Node, Pod, PodKey,
    Policy, PolicyId, RuleOrigin, Subject, Tier,
};
use crate::ruleset::{DirectionRules, NodeRuleSet, PodRules, RuleId, RuleInstance};
use crate::selector::LabelSelector;

static NO_LABELS: Labels = Labels::new();

/// What the policies mean for every pod of one namespace with the same labels and ports.
#[derive(PartialEq)]
struct Compiled {
    ingress: Arc<DirectionRules>,
    egress: Arc<DirectionRules>,
    defs: Vec<(GroupKey, Arc<GroupDef>)>,
}

/// Pods of a namespace with equal labels and ports share one compilation. An entry names a
/// representative pod instead of copying its labels and ports: the pod's current labels
/// and ports are the key, and an entry is dropped when its pod changes them (see
/// `forget_representative`).
/// Per namespace: hash of (labels, ports) → entries with that hash.
type Memo = HashMap<String, HashMap<u64, Vec<MemoEntry>>>;
type MemoEntry = (Arc<PodKey>, Arc<Compiled>);

fn memo_hash(labels: &Labels, ports: &[ContainerPort]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    labels.hash(&mut h);
    ports.hash(&mut h);
    h.finish()
}

/// One namespace's memo, created empty when missing.
fn memo_namespace<'a>(memo: &'a mut Memo, ns: &str) -> &'a mut HashMap<u64, Vec<MemoEntry>> {
    memo.entry(ns.to_string()).or_default()
}

fn same_shape(a: &Pod, b: &Pod) -> bool {
    a.labels == b.labels && a.ports == b.ports
}

struct PodEntry {
    /// Index into the compiler's node table, so references cost a word, not a string.
    node: u32,
    ips: Vec<IpAddr>,
    compiled: Arc<Compiled>,
}

impl PodEntry {
    fn refs(&self) -> impl Iterator<Item = &GroupKey> {
        self.compiled.defs.iter().map(|(key, _)| key)
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
    policies: BTreeMap<PolicyId, Arc<CompiledPolicy>>,
    rule_origins: HashMap<RuleId, Arc<RuleOrigin>>,
    /// NetworkPolicies per namespace, in id order (the order of `isolated_by`).
    /// (A sorted vector: a namespace has a few, and a map's node would cost more than them.)
    np_by_ns: HashMap<String, Vec<Arc<CompiledPolicy>>>,
    /// Tiered policies in evaluation order.
    tiered: BTreeSet<(Tier, u32, PolicyId)>,
    /// Per namespace, the tiered policies whose subject's namespace selector matches it.
    tiered_by_ns: HashMap<String, Vec<PolicyId>>,
    /// Pods per namespace (a count: the pods themselves are a range of `cluster.pods`).
    pods_by_ns: HashMap<String, usize>,
    /// Pod keys are shared between this and `pod_entries`.
    pods_by_node: BTreeMap<String, BTreeSet<Arc<PodKey>>>,
    pod_entries: HashMap<Arc<PodKey>, PodEntry>,
    groups: HashMap<GroupKey, GroupState>,
    groups_by_ns: HashMap<String, BTreeSet<GroupKey>>,
    ns_selector_groups: BTreeSet<GroupKey>,
    named_groups_by_port: HashMap<String, BTreeSet<GroupKey>>,
    node_groups: BTreeSet<GroupKey>,
    memo: Memo,
    /// Node names seen by pod entries and group references, which name them by index.
    node_index: HashMap<String, u32>,
    node_names: Vec<String>,
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
            node_index: HashMap::default(),
            node_names: Vec::new(),
        };
        // The pods stay out of the cluster until the end, so they can be read while the
        // index grows.
        let pods = cluster.pods;
        for pod in pods.values() {
            c.count_pod_in_namespace(&pod.namespace);
        }
        c.index_policies(policies);
        let namespaces: Vec<String> = c.known_namespaces().cloned().collect();
        for ns in namespaces {
            c.refresh_tiered_for_namespace(&ns);
        }
        // One pass over the pods. Pods sharing a compilation are found in a table of the
        // current namespace (pods come sorted by namespace) keyed by the pods themselves;
        // groups are created empty and their members computed once, after.
        let mut memo = Memo::default();
        let mut by_node: HashMap<&str, (u32, Vec<Arc<PodKey>>)> = HashMap::default();
        let mut shapes: HashMap<u64, Vec<(&Pod, Arc<Compiled>)>> = HashMap::default();
        let mut shapes_ns = "";
        c.pod_entries.reserve(pods.len());
        for (key, pod) in &pods {
            let key = Arc::new(key.clone());
            let node = match by_node.get_mut(pod.node.as_str()) {
                Some((node, keys)) => {
                    keys.push(key.clone());
                    *node
                }
                None => {
                    let node = c.node_index(&pod.node);
                    by_node.insert(&pod.node, (node, vec![key.clone()]));
                    node
                }
            };
            if pod.host_network {
                continue;
            }
            if pod.namespace != shapes_ns {
                shapes.clear();
                shapes_ns = &pod.namespace;
            }
            let hash = memo_hash(&pod.labels, &pod.ports);
            let bucket = shapes.entry(hash).or_default();
            let compiled = match bucket.iter().find(|(rep, _)| same_shape(rep, pod)) {
                Some((_, compiled)) => compiled.clone(),
                None => {
                    let compiled = Arc::new(c.pod_rules(pod));
                    bucket.push((pod, compiled.clone()));
                    memo_namespace(&mut memo, &pod.namespace)
                        .entry(hash)
                        .or_default()
                        .push((key.clone(), compiled.clone()));
                    compiled
                }
            };
            for (gkey, def) in &compiled.defs {
                c.reference_group(node, *gkey, def);
            }
            let entry = PodEntry {
                node,
                ips: pod.ips.clone(),
                compiled,
            };
            c.pod_entries.insert(key, entry);
        }
        // Keys arrive sorted, so each set is built in bulk.
        c.pods_by_node = by_node
            .into_iter()
            .map(|(node, (_, keys))| (node.to_string(), keys.into_iter().collect()))
            .collect();
        drop(shapes);
        c.memo = memo;
        c.cluster.pods = pods;
        c.compute_all_members();
        c
    }

    /// Every group's members at once, for the full compile: pods are grouped by namespace
    /// and namespaces by label once, instead of searching all of them for every group.
    fn compute_all_members(&mut self) {
        let mut pods_by_ns: HashMap<&str, (&Labels, Vec<&Pod>)> = HashMap::default();
        pods_by_ns.reserve(self.pods_by_ns.len());
        for pod in self.cluster.pods.values() {
            match pods_by_ns.get_mut(pod.namespace.as_str()) {
                Some((_, pods)) => pods.push(pod),
                None => {
                    let labels = self.ns_labels(&pod.namespace);
                    pods_by_ns.insert(&pod.namespace, (labels, vec![pod]));
                }
            }
        }
        let mut ns_by_label: HashMap<(&str, &str), Vec<&Namespace>> = HashMap::default();
        for ns in self.cluster.namespaces.values() {
            for (k, v) in &ns.labels {
                ns_by_label.entry((k, v)).or_default().push(ns);
            }
        }
        let members_in = |ns: &str, def: &GroupDef, out: &mut Vec<Member>| {
            if let Some((labels, pods)) = pods_by_ns.get(ns) {
                for pod in pods {
                    def.contribution(pod, labels, out);
                }
            }
        };
        let computed: Vec<(GroupKey, Vec<Member>)> = self
            .groups
            .iter()
            .map(|(&key, g)| {
                let mut out = Vec::new();
                match index_slot(&g.def) {
                    Slot::Namespace(ns) => members_in(ns, &g.def, &mut out),
                    // A namespace without labels (or without an object) cannot match a
                    // selector that requires one: the namespaces carrying any one of its
                    // labels are all the candidates.
                    Slot::NamespaceSelector(sel) if !sel.match_labels.is_empty() => {
                        let candidates = sel
                            .match_labels
                            .iter()
                            .map(|(k, v)| {
                                ns_by_label
                                    .get(&(k.as_str(), v.as_str()))
                                    .map_or(&[][..], Vec::as_slice)
                            })
                            .min_by_key(|c| c.len())
                            .unwrap_or(&[]);
                        for ns in candidates.iter().filter(|ns| sel.matches(&ns.labels)) {
                            members_in(&ns.name, &g.def, &mut out);
                        }
                    }
                    _ => out = self.compute_members(&g.def),
                }
                (key, out)
            })
            .collect();
        for (key, members) in computed {
            if let Some(g) = self.groups.get_mut(&key) {
                g.reset(members);
            }
        }
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
        let mut seen_groups = rustc_hash::FxHashSet::default();
        for key in self.pods_by_node.get(node).into_iter().flatten() {
            let Some(entry) = self.pod_entries.get(key) else {
                continue;
            };
            for gkey in entry.refs() {
                if seen_groups.insert(*gkey) {
                    if let Some(g) = self.groups.get(gkey) {
                        set.groups.insert(group_id(*gkey), g.group());
                    }
                }
            }
            for rules in [&entry.compiled.ingress, &entry.compiled.egress] {
                for inst in rules.instances() {
                    if !set.rules.contains_key(&inst.rule) {
                        if let Some(origin) = self.rule_origins.get(&inst.rule) {
                            set.rules
                                .insert(inst.rule.clone(), RuleOrigin::clone(origin));
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
                .push(&*self.policies[id]);
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

    fn count_pod_in_namespace(&mut self, ns: &str) {
        match self.pods_by_ns.get_mut(ns) {
            Some(n) => *n += 1,
            None => {
                self.pods_by_ns.insert(ns.to_string(), 1);
            }
        }
    }

    fn index_pod(&mut self, pod: &Pod) {
        self.count_pod_in_namespace(&pod.namespace);
        let key = Arc::new(pod.key());
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

    /// Drops the memo entries `pod` represents: they are keyed by its labels and ports,
    /// which are about to change or go.
    fn forget_representative(&mut self, key: &PodKey, pod: &Pod) {
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
        let mut candidates: BTreeSet<GroupKey> = self
            .groups_by_ns
            .get(&key.namespace)
            .cloned()
            .unwrap_or_default();
        candidates.extend(self.ns_selector_groups.iter().copied());
        for pod in old.iter().chain(new.iter()) {
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

    fn update_members(&mut self, gkey: GroupKey, before: &[Member], after: &[Member]) -> bool {
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

    fn touch_groups(&self, changed: &BTreeSet<GroupKey>, t: &mut Touched) {
        for gkey in changed {
            if let Some(g) = self.groups.get(gkey) {
                t.nodes
                    .extend(g.nodes.keys().map(|&n| self.node_names[n as usize].clone()));
            }
        }
    }

    /// Recomputes one pod's rules and the group references that follow from them.
    fn refresh_pod(&mut self, key: &PodKey, t: &mut Touched) {
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
            (Some(o), Some(f)) if o.same_as(&f) => {
                let shared = self.shared_key(key);
                self.pod_entries.insert(shared, o);
            }
            (old, fresh) => {
                if let Some(f) = &fresh {
                    t.nodes.insert(self.node_names[f.node as usize].clone());
                    for (gkey, def) in &f.compiled.defs {
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
    fn shared_key(&self, key: &PodKey) -> Arc<PodKey> {
        self.cluster
            .pods
            .get(key)
            .and_then(|pod| self.pods_by_node.get(&pod.node))
            .and_then(|keys| keys.get(key))
            .cloned()
            .unwrap_or_else(|| Arc::new(key.clone()))
    }

    fn node_index(&mut self, node: &str) -> u32 {
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
    fn compiled_for(&self, memo: &mut Memo, key: &PodKey, pod: &Pod) -> Arc<Compiled> {
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

    fn pod_rules(&self, pod: &Pod) -> Compiled {
        let labels = self.ns_labels(&pod.namespace);
        let tiered: Vec<&CompiledPolicy> = self
            .tiered_by_ns
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .map(|id| &*self.policies[id])
            .filter(|cp| cp.selects(pod, labels))
            .collect();
        let nps: Vec<&CompiledPolicy> = self
            .np_by_ns
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .map(|cp| &**cp)
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
        let mut seen = rustc_hash::FxHashSet::default();
        defs.retain(|(key, _)| seen.insert(*key));
        Compiled {
            ingress: Arc::new(ingress),
            egress: Arc::new(egress),
            defs,
        }
    }

    // ----- groups -----

    fn acquire_ref(&mut self, node: u32, gkey: GroupKey, def: &Arc<GroupDef>) {
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
    fn reference_group(&mut self, node: u32, gkey: GroupKey, def: &Arc<GroupDef>) {
        let g = match self.groups.get_mut(&gkey) {
            Some(g) => g,
            None => {
                self.index_group(gkey, def);
                self.groups
                    .entry(gkey)
                    .or_insert_with(|| GroupState::new(def.clone()))
            }
        };
        *g.nodes.entry(node).or_insert(0) += 1;
    }

    fn release_refs<'a>(&mut self, node: u32, refs: impl Iterator<Item = &'a GroupKey>) {
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

    fn index_group(&mut self, gkey: GroupKey, def: &GroupDef) {
        match index_slot(def) {
            Slot::Namespace(ns) => {
                self.groups_by_ns
                    .entry(ns.to_string())
                    .or_default()
                    .insert(gkey);
            }
            Slot::NamespaceSelector(_) => {
                self.ns_selector_groups.insert(gkey);
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

    fn unindex_group(&mut self, gkey: GroupKey, def: &GroupDef) {
        fn take(map: &mut HashMap<String, BTreeSet<GroupKey>>, key: &str, gkey: GroupKey) {
            if let Some(s) = map.get_mut(key) {
                s.remove(&gkey);
                if s.is_empty() {
                    map.remove(key);
                }
            }
        }
        match index_slot(def) {
            Slot::Namespace(ns) => take(&mut self.groups_by_ns, ns, gkey),
            Slot::NamespaceSelector(_) => {
                self.ns_selector_groups.remove(&gkey);
            }
            Slot::PortName(name) => take(&mut self.named_groups_by_port, name, gkey),
            Slot::Nodes => {
                self.node_groups.remove(&gkey);
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
        let dependent: Vec<GroupKey> = self.ns_selector_groups.iter().copied().collect();
        let mut changed = BTreeSet::new();
        for key in &pods {
            let Some(pod) = self.cluster.pods.get(key).cloned() else {
                continue;
            };
            for &gkey in &dependent {
                let (before, after) = {
                    let def = &self.groups[&gkey].def;
                    (
                        contribution_with(def, &pod, &old_labels),
                        contribution_with(def, &pod, &new_labels),
                    )
                };
                if self.update_members(gkey, &before, &after) {
                    changed.insert(gkey);
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
        for gkey in self.node_groups.clone() {
            let members = self.compute_members(&self.groups[&gkey].def);
            if self.groups.get_mut(&gkey).is_some_and(|g| g.reset(members)) {
                changed.insert(gkey);
            }
        }
        self.touch_groups(&changed, t);
    }

    // ----- policies -----

    /// The full compile's `index_policy` for all policies at once: sorted first, so that
    /// the maps are built in bulk.
    fn index_policies(&mut self, policies: Vec<Policy>) {
        let mut defs: HashMap<GroupKey, Arc<GroupDef>> = HashMap::default();
        let mut compiled: Vec<Arc<CompiledPolicy>> = policies
            .into_iter()
            .map(|policy| {
                Arc::new(CompiledPolicy::new(policy, &mut |key, def| {
                    defs.entry(key).or_insert_with(|| Arc::new(def)).clone()
                }))
            })
            .collect();
        drop(defs);
        // Stable, and the later of two policies with one id wins, as with upserts in turn.
        compiled.sort_by(|a, b| a.policy.id.cmp(&b.policy.id));
        compiled.dedup_by(|later, earlier| {
            let same = later.policy.id == earlier.policy.id;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        let mut np_by_ns: HashMap<&str, Vec<Arc<CompiledPolicy>>> = HashMap::default();
        self.rule_origins
            .reserve(compiled.iter().map(|cp| cp.all_rules().count()).sum());
        for cp in &compiled {
            for rule in cp.all_rules() {
                self.rule_origins
                    .insert(rule.id.clone(), rule.origin.clone());
            }
            match (&cp.policy.tier, &cp.policy.subject) {
                (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) => {
                    np_by_ns.entry(namespace).or_default().push(cp.clone());
                }
                _ => {
                    self.tiered
                        .insert((cp.policy.tier, cp.policy.priority, cp.policy.id.clone()));
                }
            }
        }
        self.np_by_ns = np_by_ns
            .into_iter()
            .map(|(ns, list)| (ns.to_string(), list))
            .collect();
        self.policies = compiled
            .into_iter()
            .map(|cp| (cp.policy.id.clone(), cp))
            .collect();
    }

    fn index_policy(&mut self, cp: CompiledPolicy) {
        let cp = Arc::new(cp);
        let id = cp.policy.id.clone();
        for rule in cp.all_rules() {
            self.rule_origins
                .insert(rule.id.clone(), rule.origin.clone());
        }
        match (&cp.policy.tier, &cp.policy.subject) {
            (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) => {
                let list = self.np_by_ns.entry(namespace.clone()).or_default();
                match list.binary_search_by(|p| p.policy.id.cmp(&id)) {
                    Ok(at) => list[at] = cp.clone(),
                    Err(at) => list.insert(at, cp.clone()),
                }
            }
            _ => {
                self.tiered
                    .insert((cp.policy.tier, cp.policy.priority, id.clone()));
            }
        }
        self.policies.insert(id, cp);
    }

    fn unindex_policy(&mut self, id: &PolicyId) -> Option<Arc<CompiledPolicy>> {
        let cp = self.policies.remove(id)?;
        for rule in cp.all_rules() {
            self.rule_origins.remove(&rule.id);
        }
        if let (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) =
            (&cp.policy.tier, &cp.policy.subject)
        {
            if let Some(s) = self.np_by_ns.get_mut(namespace) {
                s.retain(|p| p.policy.id != *id);
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
            let groups = &self.groups;
            let cp = CompiledPolicy::new(policy, &mut |key, def| {
                groups
                    .get(&key)
                    .map_or_else(|| Arc::new(def), |g| g.def.clone())
            });
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
    if list.len() < 2 {
        return;
    }
    let keep: Vec<bool> = {
        let mut seen = rustc_hash::FxHashSet::default();
        list.iter()
            .map(|inst| seen.insert(&inst.clauses[..]))
            .collect()
    };
    let mut keep = keep.into_iter();
    list.retain(|_| keep.next().unwrap_or(true));
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
