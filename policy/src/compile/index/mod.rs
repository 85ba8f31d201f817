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

mod group_refs;
mod pods;
mod policies;
mod selector_index;
mod tier_lists;

use group_refs::{contribution, contribution_with, group_pod_selector, index_slot, Slot};
use policies::{namespace_may_match, NpIndex};
use selector_index::{insert_sorted, remove_sorted, LabelIndex, SelectorIndex};
use std::collections::{BTreeMap, BTreeSet};
use tier_lists::{Defs, TierLists};

use rustc_hash::FxHashMap as HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::groups::{group_id, group_key, node_members, GroupDef, GroupKey, GroupState, Member};
use super::instances::CompiledPolicy;
use super::{Change, Touched, Warning};
use crate::model::{
    Cluster, ContainerPort, Direction, Labels, Namespace, NamespaceScope, Node, Pod, PodKey,
    Policy, PolicyId, RuleOrigin, Subject, Tier,
};
use crate::ruleset::{DirectionRules, Group, NodeRuleSet, PodRules, RuleId, RuleInstance};
use crate::selector::LabelSelector;

static NO_LABELS: Labels = Labels::new();
/// A tiered policy's place in evaluation order.
type TieredRank = (Tier, u32, PolicyId);
/// Whether to scan a namespace of `pods` pods instead of looking up candidates in the pod
/// label index: cheaper for a small one. Debug builds (the property tests') always use
/// the index, whose results are a superset of a scan's, so that every path of it is tested.
fn scan_instead(pods: usize) -> bool {
    !cfg!(debug_assertions) && pods < 64
}
static EVERYTHING: LabelSelector = LabelSelector {
    match_labels: Labels::new(),
    match_expressions: Vec::new(),
};

/// What the policies mean for every pod of one namespace with the same labels and ports.
#[derive(PartialEq)]
struct Compiled {
    ingress: Arc<DirectionRules>,
    egress: Arc<DirectionRules>,
    /// The groups its NetworkPolicy rules reference.
    defs: Defs,
    /// The groups its tier lists reference, shared with every pod that has those lists.
    /// A group of both kinds is referenced twice, and counted (and released) twice.
    tier_defs: Arc<Defs>,
}

impl Compiled {
    fn defs(&self) -> impl Iterator<Item = &(GroupKey, Arc<GroupDef>)> {
        self.tier_defs.iter().chain(&self.defs)
    }
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
        self.compiled.defs().map(|(key, _)| key)
    }
}

/// The last comparison of two compilations that were not the same `Arc`. A policy change
/// recompiles every pod it selects, and those pods share their old and their new
/// compilation: one comparison answers for all of them. The pair is held, so the
/// addresses cannot be reused while the answer is kept.
type LastComparison = Option<(Arc<Compiled>, Arc<Compiled>, bool)>;

impl PodEntry {
    fn same_as(&self, other: &PodEntry, last: &mut LastComparison) -> bool {
        if self.node != other.node || self.ips != other.ips {
            return false;
        }
        let (a, b) = (&self.compiled, &other.compiled);
        if Arc::ptr_eq(a, b) {
            return true;
        }
        if let Some((x, y, equal)) = last {
            if Arc::ptr_eq(a, x) && Arc::ptr_eq(b, y) {
                return *equal;
            }
        }
        let equal = a == b;
        *last = Some((a.clone(), b.clone(), equal));
        equal
    }
}

/// Cluster state and policies, compiled incrementally into per-node rule sets.
pub struct Compiler {
    cluster: Cluster,
    policies: BTreeMap<PolicyId, Arc<CompiledPolicy>>,
    rule_origins: HashMap<RuleId, Arc<RuleOrigin>>,
    /// NetworkPolicies per namespace, by what their pod selectors require.
    np_by_ns: HashMap<String, NpIndex>,
    /// Tiered policies in evaluation order.
    tiered: BTreeSet<(Tier, u32, PolicyId)>,
    /// Tiered policies by what their subject's namespace selector requires (those naming
    /// one namespace are residual), so a namespace meets only those that can select it.
    tiered_by_ns_selector: SelectorIndex<TieredRank>,
    /// Per namespace, the tiered policies whose subject's namespace selector matches it,
    /// in evaluation order.
    tiered_by_ns: HashMap<String, Vec<Arc<CompiledPolicy>>>,
    /// Pods per namespace (a count: the pods themselves are a range of `cluster.pods`).
    pods_by_ns: HashMap<String, usize>,
    /// Pods by namespace and label, for selectors that require a label.
    pod_labels: LabelIndex<Arc<PodKey>>,
    /// Pod keys are shared between this and `pod_entries`.
    pods_by_node: BTreeMap<String, BTreeSet<Arc<PodKey>>>,
    pod_entries: HashMap<Arc<PodKey>, PodEntry>,
    groups: HashMap<GroupKey, GroupState>,
    /// Groups of one namespace's pods, per namespace, by their pod selectors.
    groups_by_ns: HashMap<String, SelectorIndex<GroupKey>>,
    /// Groups of pods in the namespaces a selector matches, by their pod selectors.
    ns_selector_groups: SelectorIndex<GroupKey>,
    named_groups_by_port: HashMap<String, BTreeSet<GroupKey>>,
    node_groups: BTreeSet<GroupKey>,
    memo: Memo,
    tier_lists: TierLists,
    /// Cleared after every change.
    last_comparison: LastComparison,
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
            tiered_by_ns_selector: SelectorIndex::default(),
            tiered_by_ns: HashMap::default(),
            pods_by_ns: HashMap::default(),
            pod_labels: LabelIndex::default(),
            pods_by_node: BTreeMap::new(),
            pod_entries: HashMap::default(),
            groups: HashMap::default(),
            groups_by_ns: HashMap::default(),
            ns_selector_groups: SelectorIndex::default(),
            named_groups_by_port: HashMap::default(),
            node_groups: BTreeSet::new(),
            memo: HashMap::default(),
            tier_lists: TierLists::default(),
            last_comparison: None,
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
        let mut shapes = ShapeTable::default();
        // The nodes of the pods sharing each combination of tier groups: their references
        // are counted one group at a time (`reference_tier_groups`).
        let mut tier_users: HashMap<usize, (Arc<Defs>, Vec<u32>)> = HashMap::default();
        c.pod_entries.reserve(pods.len());
        for (key, pod) in &pods {
            let key = Arc::new(key.clone());
            if !scan_instead(c.pods_by_ns[&pod.namespace]) {
                c.pod_labels.push(&pod.namespace, &pod.labels, &key);
            }
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
            let hash = memo_hash(&pod.labels, &pod.ports);
            let compiled = shapes.compiled(pod, hash, || {
                let compiled = Arc::new(c.pod_rules(pod));
                memo_namespace(&mut memo, &pod.namespace)
                    .entry(hash)
                    .or_default()
                    .push((key.clone(), compiled.clone()));
                compiled
            });
            let at = Arc::as_ptr(&compiled.tier_defs) as usize;
            match tier_users.get_mut(&at) {
                Some((_, nodes)) => nodes.push(node),
                None if !compiled.tier_defs.is_empty() => {
                    tier_users.insert(at, (compiled.tier_defs.clone(), vec![node]));
                }
                None => {}
            }
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
        let tier_users: Vec<(Arc<Defs>, Vec<u32>)> = tier_users.into_values().collect();
        c.reference_tier_groups(&tier_users);
        // Keys arrive sorted, so each set is built in bulk.
        c.pods_by_node = by_node
            .into_iter()
            .map(|(node, (_, keys))| (node.to_string(), keys.into_iter().collect()))
            .collect();
        let classes = shapes.into_classes();
        c.pod_labels.finish_bulk();
        c.memo = memo;
        c.compute_all_members(&pods, &classes);
        drop(classes);
        c.cluster.pods = pods;
        c
    }

    /// Every group's members at once, for the full compile: a group meets the classes of
    /// the namespaces it can select (or, in a large namespace, the pods its selector's
    /// anchor finds), and namespaces are grouped by label once, instead of searching all
    /// of them for every group.
    fn compute_all_members(&mut self, pods: &BTreeMap<PodKey, Pod>, classes: &ShapeClasses) {
        let classes_by_ns: HashMap<&str, (&Labels, &[Vec<&Pod>])> = classes
            .iter()
            .map(|(ns, list)| (*ns, (self.ns_labels(ns), &list[..])))
            .collect();
        let mut ns_by_label: HashMap<(&str, &str), Vec<&Namespace>> = HashMap::default();
        for ns in self.cluster.namespaces.values() {
            for (k, v) in &ns.labels {
                ns_by_label.entry((k, v)).or_default().push(ns);
            }
        }
        let members_in = |ns: &str, def: &GroupDef, out: &mut Vec<Member>| {
            let Some((labels, classes)) = classes_by_ns.get(ns) else {
                return;
            };
            let selector = group_pod_selector(def).unwrap_or(&EVERYTHING);
            let index = (!scan_instead(self.pods_by_ns[ns]))
                .then(|| self.pod_labels.candidates(ns, selector))
                .flatten();
            match index {
                Some(keys) => {
                    for pod in keys.into_iter().filter_map(|k| pods.get(&**k)) {
                        def.contribution(pod, labels, out);
                    }
                }
                None => class_members(def, labels, classes, out),
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
                    Slot::NamespaceSelector(sel) => {
                        for (ns, _) in self.namespaces_matching(sel) {
                            members_in(ns, &g.def, &mut out);
                        }
                    }
                    // Named ports on any pod: one pass over the namespaces, each one's
                    // labels read once.
                    Slot::PortName(_) => {
                        for (labels, classes) in classes_by_ns.values() {
                            class_members(&g.def, labels, classes, &mut out);
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
        self.last_comparison = None;
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
        let mut seen_lists = rustc_hash::FxHashSet::default();
        // An allocation nothing else holds is this pod's alone: no need to remember it.
        let mut first_read = |p: *const ()| seen_lists.insert(p as usize);
        fn shared<T>(a: &Arc<T>) -> bool {
            Arc::strong_count(a) > 1
        }
        let mut origins = BTreeMap::new();
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
            // Pods share their direction rules and tier lists: each is read once.
            for rules in [&entry.compiled.ingress, &entry.compiled.egress] {
                if shared(rules) && !first_read(Arc::as_ptr(rules).cast()) {
                    continue;
                }
                let tiers = [&rules.admin, &rules.baseline]
                    .into_iter()
                    .filter(|l| !l.is_empty() && (!shared(l) || first_read(Arc::as_ptr(l).cast())))
                    .flat_map(|l| l.iter());
                for inst in tiers.chain(&rules.network_policy) {
                    if !origins.contains_key(&inst.rule) {
                        if let Some(origin) = self.rule_origins.get(&inst.rule) {
                            origins.insert(inst.rule.clone(), RuleOrigin::clone(origin));
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
                audit: Default::default(),
            });
        }
        set.rules = Arc::new(origins);
        Some(set)
    }

    /// A live group's current members, by id: what a node referencing it holds.
    pub fn group(&self, id: &str) -> Option<Arc<Group>> {
        self.groups.get(&group_key(id)?).map(GroupState::group)
    }

    /// The nodes whose rules reference a live group, in no particular order.
    pub fn group_nodes(&self, id: &str) -> impl Iterator<Item = &str> {
        group_key(id)
            .and_then(|key| self.groups.get(&key))
            .into_iter()
            .flat_map(|g| g.nodes.keys())
            .map(|&n| self.node_names[n as usize].as_str())
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

    // ----- namespaces -----

    fn refresh_tiered_for_namespace(&mut self, ns: &str) {
        if self.tiered.is_empty() {
            self.tiered_by_ns.insert(ns.to_string(), Vec::new());
            return;
        }
        let labels = self.ns_labels(ns);
        let mut ranks: Vec<&TieredRank> = self
            .tiered_by_ns_selector
            .candidates(labels)
            .filter(|(_, _, id)| namespace_may_match(&self.policies[id].policy, ns, labels))
            .collect();
        ranks.sort();
        ranks.dedup();
        let list = ranks
            .into_iter()
            .map(|(_, _, id)| self.policies[id].clone())
            .collect();
        self.tiered_by_ns.insert(ns.to_string(), list);
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
        let dependent: BTreeSet<GroupKey> = self.ns_selector_groups.all().copied().collect();
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
}

/// The full compile's non-host-network pods per namespace, in classes of pods with equal
/// labels and ports, the first of each standing for all: whether a group admits a pod
/// depends only on its namespace, labels and ports.
type ShapeClasses<'a> = Vec<(&'a str, Vec<Vec<&'a Pod>>)>;

/// The full compile's table of pod shapes, one namespace at a time (pods come sorted by
/// namespace): each shape's compilation and class.
#[derive(Default)]
struct ShapeTable<'a> {
    /// The namespace of the latest pod, with its classes so far.
    current: Option<(&'a str, Vec<Vec<&'a Pod>>)>,
    /// Hash of (labels, ports) → the current namespace's classes of that hash, by index.
    by_hash: HashMap<u64, Vec<(usize, Arc<Compiled>)>>,
    done: ShapeClasses<'a>,
}

impl<'a> ShapeTable<'a> {
    /// The compilation of `pod`'s shape (`hash` is its `memo_hash`): a pod of its
    /// namespace with that shape had it, or else `compile` makes it. The pod joins the
    /// class of its shape.
    fn compiled(
        &mut self,
        pod: &'a Pod,
        hash: u64,
        compile: impl FnOnce() -> Arc<Compiled>,
    ) -> Arc<Compiled> {
        if self
            .current
            .as_ref()
            .is_some_and(|(ns, _)| *ns != pod.namespace)
        {
            self.done.extend(self.current.take());
            self.by_hash.clear();
        }
        let (_, classes) = self
            .current
            .get_or_insert_with(|| (&pod.namespace, Vec::new()));
        let bucket = self.by_hash.entry(hash).or_default();
        if let Some((class, compiled)) = bucket
            .iter()
            .find(|(class, _)| same_shape(classes[*class][0], pod))
        {
            classes[*class].push(pod);
            return compiled.clone();
        }
        let compiled = compile();
        bucket.push((classes.len(), compiled.clone()));
        classes.push(vec![pod]);
        compiled
    }

    fn into_classes(mut self) -> ShapeClasses<'a> {
        self.done.extend(self.current);
        self.done
    }
}

/// What the pods of `classes` (of a namespace with `ns_labels`) contribute to `def`.
fn class_members(def: &GroupDef, ns_labels: &Labels, classes: &[Vec<&Pod>], out: &mut Vec<Member>) {
    for class in classes {
        if class.first().is_some_and(|rep| def.admits(rep, ns_labels)) {
            for pod in class {
                def.admitted_members(pod, out);
            }
        }
    }
}

/// Drops instances that can never be the first to match: a later instance of a tier with
/// the same clauses as an earlier one. Verdicts and hit attribution are unchanged, and a
/// pod selected by thousands of identical policies gets one rule, not thousands.
pub(super) fn drop_unreachable(list: &mut Vec<RuleInstance>) {
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
