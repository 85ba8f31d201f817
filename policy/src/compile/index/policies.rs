//! Policies: compiled once, indexed by the namespaces they can select, tiered ones kept
//! in evaluation order per namespace.

use super::*;

/// A NetworkPolicy in a namespace's index, ordered by its id.
#[derive(Clone)]
pub(super) struct ById(pub Arc<CompiledPolicy>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.policy.id == other.0.policy.id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.policy.id.cmp(&other.0.policy.id)
    }
}

/// A namespace's NetworkPolicies: a list while they are few (testing each costs less than
/// a lookup), indexed by what their pod selectors require beyond that. Debug builds (the
/// property tests') always index, so that the index is what they test.
pub(super) enum NpIndex {
    Few(Vec<ById>),
    Many(SelectorIndex<ById>),
}

/// Whether a namespace with `n` NetworkPolicies can take one more into its list.
fn room_for_one_more(n: usize) -> bool {
    !cfg!(debug_assertions) && n < 8
}

impl Default for NpIndex {
    fn default() -> Self {
        NpIndex::Few(Vec::new())
    }
}

impl NpIndex {
    pub(super) fn insert(&mut self, item: ById) {
        match self {
            NpIndex::Few(list) if room_for_one_more(list.len()) => insert_sorted(list, item),
            NpIndex::Few(list) => {
                let mut index = SelectorIndex::default();
                for p in std::mem::take(list).into_iter().chain([item]) {
                    let cp = p.0.clone();
                    index.insert(subject_pods(&cp.policy), p);
                }
                *self = NpIndex::Many(index);
            }
            NpIndex::Many(index) => {
                let cp = item.0.clone();
                index.insert(subject_pods(&cp.policy), item);
            }
        }
    }

    pub(super) fn remove(&mut self, item: &ById) {
        match self {
            NpIndex::Few(list) => remove_sorted(list, item),
            NpIndex::Many(index) => index.remove(subject_pods(&item.0.policy), item),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            NpIndex::Few(list) => list.is_empty(),
            NpIndex::Many(index) => index.is_empty(),
        }
    }

    /// Whether [`NpIndex::candidates`] come in id order, each once.
    pub(super) fn sorted_without_repeats(&self) -> bool {
        matches!(self, NpIndex::Few(_))
    }

    /// Every policy that may select a pod with `labels` (a superset, possibly with
    /// repeats).
    pub(super) fn candidates<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = &'a ById> {
        let (few, many) = match self {
            NpIndex::Few(list) => (&list[..], None),
            NpIndex::Many(index) => (&[][..], Some(index)),
        };
        few.iter()
            .chain(many.into_iter().flat_map(move |i| i.candidates(labels)))
    }
}

/// The pod selector of a policy's subject.
pub(super) fn subject_pods(policy: &Policy) -> &LabelSelector {
    match &policy.subject {
        Subject::Namespace { pods, .. } | Subject::Cluster { pods, .. } => pods,
    }
}

/// The full compile's group definitions, one instance per key. Policies of many
/// namespaces name equal peers that are not one namespace's pods (the cluster DNS, the
/// internet block), and the key of such a definition seen before is looked up instead of
/// hashed again through its `Debug` text.
#[derive(Default)]
struct SharedDefs {
    by_key: HashMap<GroupKey, Arc<GroupDef>>,
    keys: HashMap<Arc<GroupDef>, GroupKey>,
}

/// Whether equal copies of a definition are likely in other namespaces' policies: a peer
/// of one namespace's pods is mostly named by that namespace's policies alone, and the
/// lookup would cost more than it saves.
fn recurs_across_namespaces(def: &GroupDef) -> bool {
    !matches!(
        def,
        GroupDef::Pods {
            namespaces: NamespaceScope::Named(_),
            ..
        }
    )
}

impl SharedDefs {
    fn share(&mut self, def: GroupDef) -> (GroupKey, Arc<GroupDef>) {
        let recurs = recurs_across_namespaces(&def);
        if let Some(&key) = recurs.then(|| self.keys.get(&def)).flatten() {
            return (key, self.by_key[&key].clone());
        }
        let key = def.key();
        let shared = self
            .by_key
            .entry(key)
            .or_insert_with(|| Arc::new(def))
            .clone();
        if recurs {
            self.keys.insert(shared.clone(), key);
        }
        (key, shared)
    }
}

impl Compiler {
    /// The full compile's `index_policy` for all policies at once: sorted first, so that
    /// the maps are built in bulk.
    pub(super) fn index_policies(&mut self, policies: Vec<Policy>) {
        let mut defs = SharedDefs::default();
        let mut compiled: Vec<Arc<CompiledPolicy>> = policies
            .into_iter()
            .map(|policy| Arc::new(CompiledPolicy::new(policy, &mut |def| defs.share(def))))
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
        let mut np_by_ns: HashMap<&str, NpIndex> = HashMap::default();
        self.rule_origins
            .reserve(compiled.iter().map(|cp| cp.all_rules().count()).sum());
        for cp in &compiled {
            for rule in cp.all_rules() {
                self.rule_origins
                    .insert(rule.id.clone(), rule.origin.clone());
            }
            match (&cp.policy.tier, &cp.policy.subject) {
                (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) => {
                    np_by_ns
                        .entry(namespace)
                        .or_default()
                        .insert(ById(cp.clone()));
                }
                _ => self.index_tiered(cp),
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

    pub(super) fn index_policy(&mut self, cp: CompiledPolicy) {
        let cp = Arc::new(cp);
        let id = cp.policy.id.clone();
        for rule in cp.all_rules() {
            self.rule_origins
                .insert(rule.id.clone(), rule.origin.clone());
        }
        match (&cp.policy.tier, &cp.policy.subject) {
            (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) => {
                let index = self.np_by_ns.entry(namespace.clone()).or_default();
                // An upsert always follows `unindex_policy`, so there is no older entry.
                index.insert(ById(cp.clone()));
            }
            _ => self.index_tiered(&cp),
        }
        self.policies.insert(id, cp);
    }

    pub(super) fn unindex_policy(&mut self, id: &PolicyId) -> Option<Arc<CompiledPolicy>> {
        let cp = self.policies.remove(id)?;
        for rule in cp.all_rules() {
            self.rule_origins.remove(&rule.id);
        }
        if let (Tier::NetworkPolicy, Subject::Namespace { namespace, .. }) =
            (&cp.policy.tier, &cp.policy.subject)
        {
            if let Some(s) = self.np_by_ns.get_mut(namespace) {
                s.remove(&ById(cp.clone()));
                if s.is_empty() {
                    self.np_by_ns.remove(namespace);
                }
            }
        } else {
            let rank = (cp.policy.tier, cp.policy.priority, id.clone());
            self.tiered_by_ns_selector
                .remove(namespaces_required(&cp.policy), &rank);
            self.tiered.remove(&rank);
        }
        Some(cp)
    }

    fn index_tiered(&mut self, cp: &CompiledPolicy) {
        let rank = (cp.policy.tier, cp.policy.priority, cp.policy.id.clone());
        self.tiered_by_ns_selector
            .insert(namespaces_required(&cp.policy), rank.clone());
        self.tiered.insert(rank);
    }

    /// The pods a policy selects now.
    pub(super) fn subjects(&self, cp: &CompiledPolicy) -> BTreeSet<PodKey> {
        let namespaces: Vec<(&str, &Labels)> = match &cp.policy.subject {
            Subject::Namespace { namespace, .. } => {
                vec![(namespace.as_str(), self.ns_labels(namespace))]
            }
            Subject::Cluster { namespaces, .. } => self.namespaces_matching(namespaces),
        };
        let mut out = BTreeSet::new();
        for (ns, labels) in namespaces {
            self.for_pods_maybe_selected(ns, subject_pods(&cp.policy), |key, pod| {
                if cp.selects(pod, labels) {
                    out.insert(key.clone());
                }
            });
        }
        out
    }

    pub(super) fn set_policy(&mut self, id: PolicyId, new: Option<Policy>, t: &mut Touched) {
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
            let cp = CompiledPolicy::new(policy, &mut |def| {
                let key = def.key();
                let def = groups
                    .get(&key)
                    .map_or_else(|| Arc::new(def), |g| g.def.clone());
                (key, def)
            });
            affected.extend(self.subjects(&cp));
            tiered_changed |= cp.policy.tier != Tier::NetworkPolicy;
            self.index_policy(cp);
        }
        if tiered_changed {
            self.reorder_tiered(&id);
            self.memo.clear();
            self.tier_lists.clear();
        } else if let Some(ns) = &id.namespace {
            self.memo.remove(ns);
        }
        for key in affected {
            self.refresh_pod(&key, t);
        }
    }

    /// Puts one tiered policy into (or takes it out of) every namespace's ordered list.
    pub(super) fn reorder_tiered(&mut self, id: &PolicyId) {
        let namespaces: Vec<String> = self.tiered_by_ns.keys().cloned().collect();
        for ns in namespaces {
            let keep = self
                .policies
                .get(id)
                .filter(|cp| cp.policy.tier != Tier::NetworkPolicy)
                .is_some_and(|cp| namespace_may_match(&cp.policy, &ns, self.ns_labels(&ns)));
            fn rank(p: &Policy) -> (Tier, u32, &PolicyId) {
                (p.tier, p.priority, &p.id)
            }
            let mut list = self.tiered_by_ns.remove(&ns).unwrap_or_default();
            list.retain(|p| p.policy.id != *id);
            if keep {
                let cp = &self.policies[id];
                let r = rank(&cp.policy);
                let at = list.partition_point(|p| rank(&p.policy) < r);
                list.insert(at, cp.clone());
            }
            self.tiered_by_ns.insert(ns, list);
        }
    }
}

/// The selector a namespace's labels must match for a tiered policy to select pods in it
/// (everything, for a policy naming its namespace: it is then found by name).
fn namespaces_required(policy: &Policy) -> &LabelSelector {
    match &policy.subject {
        Subject::Namespace { .. } => &EVERYTHING,
        Subject::Cluster { namespaces, .. } => namespaces,
    }
}

pub(super) fn namespace_may_match(policy: &Policy, ns: &str, labels: &Labels) -> bool {
    match &policy.subject {
        Subject::Namespace { namespace, .. } => namespace == ns,
        Subject::Cluster { namespaces, .. } => namespaces.matches(labels),
    }
}
