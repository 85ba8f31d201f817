//! Indexes that let a pod meet only the selectors that can match it, and a selector only
//! the pods it can match, instead of scanning a namespace.
//!
//! A selector is filed under its *anchor*, a label it requires: the first `matchLabels`
//! pair, or else the pairs of its first `In` expression (a pod has one value per key, so
//! it meets one of them at most). Selectors without one (empty, `NotIn`, `Exists` and
//! `DoesNotExist` only) stay in a residual list that every lookup returns.
//!
//! Buckets are keyed by a hash of the pair, so a lookup allocates nothing. Candidates are
//! therefore a superset (a collision only adds some), possibly with repeats: callers test
//! each candidate with the full selector and deduplicate.

use std::hash::{Hash, Hasher};

use rustc_hash::FxHashMap as HashMap;

use crate::model::Labels;
use crate::selector::{LabelSelector, Operator};

/// What a selector requires that a lookup can use; `None`: it needs a scan.
pub(crate) fn anchor(sel: &LabelSelector) -> Option<Vec<(&str, &str)>> {
    if let Some((k, v)) = sel.match_labels.iter().next() {
        return Some(vec![(k.as_str(), v.as_str())]);
    }
    sel.match_expressions
        .iter()
        .find(|r| r.operator == Operator::In)
        .map(|r| {
            r.values
                .iter()
                .map(|v| (r.key.as_str(), v.as_str()))
                .collect()
        })
}

pub(crate) fn pair_hash(scope: &str, key: &str, value: &str) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    (scope, key, value).hash(&mut h);
    h.finish()
}

pub(super) fn insert_sorted<T: Ord>(list: &mut Vec<T>, item: T) {
    if let Err(at) = list.binary_search(&item) {
        list.insert(at, item);
    }
}

pub(super) fn remove_sorted<T: Ord>(list: &mut Vec<T>, item: &T) {
    if let Ok(at) = list.binary_search(item) {
        list.remove(at);
    }
}

/// Items (policies, groups) by the anchor of their selector.
pub(crate) struct SelectorIndex<T> {
    by_pair: HashMap<u64, Vec<T>>,
    residual: Vec<T>,
}

impl<T> Default for SelectorIndex<T> {
    fn default() -> Self {
        SelectorIndex {
            by_pair: HashMap::default(),
            residual: Vec::new(),
        }
    }
}

impl<T: Ord + Clone> SelectorIndex<T> {
    pub(crate) fn insert(&mut self, sel: &LabelSelector, item: T) {
        match anchor(sel) {
            Some(pairs) => {
                for (k, v) in pairs {
                    insert_sorted(
                        self.by_pair.entry(pair_hash("", k, v)).or_default(),
                        item.clone(),
                    );
                }
            }
            None => insert_sorted(&mut self.residual, item),
        }
    }

    pub(crate) fn remove(&mut self, sel: &LabelSelector, item: &T) {
        match anchor(sel) {
            Some(pairs) => {
                for (k, v) in pairs {
                    let h = pair_hash("", k, v);
                    if let Some(list) = self.by_pair.get_mut(&h) {
                        remove_sorted(list, item);
                        if list.is_empty() {
                            self.by_pair.remove(&h);
                        }
                    }
                }
            }
            None => remove_sorted(&mut self.residual, item),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_pair.is_empty() && self.residual.is_empty()
    }

    /// Every item whose selector may match `labels` (a superset, possibly with repeats).
    pub(crate) fn candidates<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = &'a T> {
        let anchored = labels
            .iter()
            .flat_map(|(k, v)| self.by_pair.get(&pair_hash("", k, v)).into_iter().flatten());
        self.residual.iter().chain(anchored)
    }

    /// Every item, possibly with repeats.
    pub(crate) fn all(&self) -> impl Iterator<Item = &T> {
        self.residual.iter().chain(self.by_pair.values().flatten())
    }
}

/// Keys (pods) by the (scope, key, value) of each of their labels, so that a selector
/// with an anchor finds the pods of one namespace that can match it.
pub(crate) struct LabelIndex<K> {
    by_pair: HashMap<u64, Vec<K>>,
}

impl<K> Default for LabelIndex<K> {
    fn default() -> Self {
        LabelIndex {
            by_pair: HashMap::default(),
        }
    }
}

impl<K: Ord + Clone> LabelIndex<K> {
    pub(crate) fn insert(&mut self, scope: &str, labels: &Labels, key: &K) {
        for (k, v) in labels {
            insert_sorted(
                self.by_pair.entry(pair_hash(scope, k, v)).or_default(),
                key.clone(),
            );
        }
    }

    /// For building in bulk: keys pushed in order, sorted by `finish_bulk`.
    pub(crate) fn push(&mut self, scope: &str, labels: &Labels, key: &K) {
        for (k, v) in labels {
            self.by_pair
                .entry(pair_hash(scope, k, v))
                .or_default()
                .push(key.clone());
        }
    }

    pub(crate) fn finish_bulk(&mut self) {
        for list in self.by_pair.values_mut() {
            list.sort();
            list.dedup();
        }
    }

    pub(crate) fn remove(&mut self, scope: &str, labels: &Labels, key: &K) {
        for (k, v) in labels {
            let h = pair_hash(scope, k, v);
            if let Some(list) = self.by_pair.get_mut(&h) {
                remove_sorted(list, key);
                if list.is_empty() {
                    self.by_pair.remove(&h);
                }
            }
        }
    }

    /// The keys in `scope` that `sel` may match, sorted and without repeats; `None` when
    /// the selector has no anchor (the caller scans).
    pub(crate) fn candidates(&self, scope: &str, sel: &LabelSelector) -> Option<Vec<&K>> {
        let pairs = anchor(sel)?;
        let mut out: Vec<&K> = Vec::new();
        for (k, v) in &pairs {
            out.extend(
                self.by_pair
                    .get(&pair_hash(scope, k, v))
                    .into_iter()
                    .flatten(),
            );
        }
        if pairs.len() > 1 {
            out.sort();
            out.dedup();
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::tests::{labels, req};

    fn expr(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::new(),
            match_expressions: vec![req(key, operator, values)],
        }
    }

    /// Whatever the selector, every item that matches is a candidate.
    #[test]
    fn candidates_include_every_match() {
        let sels = [
            LabelSelector::everything(),
            LabelSelector::with_labels([("app", "a")]),
            LabelSelector::with_labels([("app", "b"), ("tier", "x")]),
            expr("app", Operator::In, &["a", "c"]),
            expr("app", Operator::NotIn, &["a"]),
            expr("tier", Operator::Exists, &[]),
            expr("tier", Operator::DoesNotExist, &[]),
        ];
        let mut index = SelectorIndex::default();
        for (i, s) in sels.iter().enumerate() {
            index.insert(s, i);
        }
        let mut pods = LabelIndex::default();
        let all_labels = [
            labels(&[]),
            labels(&[("app", "a")]),
            labels(&[("app", "b"), ("tier", "x")]),
            labels(&[("app", "c"), ("tier", "y")]),
        ];
        for (p, l) in all_labels.iter().enumerate() {
            pods.insert("ns", l, &p);
            pods.insert("other", l, &(p + 100));
        }
        for (p, l) in all_labels.iter().enumerate() {
            let found: Vec<usize> = index.candidates(l).copied().collect();
            for (i, s) in sels.iter().enumerate() {
                if s.matches(l) {
                    assert!(found.contains(&i), "selector {s} for {l:?}");
                }
                match pods.candidates("ns", s) {
                    Some(c) => assert!(!s.matches(l) || c.contains(&&p), "{s} {l:?}"),
                    None => assert!(anchor(s).is_none()),
                }
            }
        }
        // Anchored selectors meet only pods carrying their anchor.
        assert_eq!(
            index.candidates(&labels(&[("app", "a")])).count(),
            // everything, NotIn, DoesNotExist, Exists (residual) + app=a, In(a,c)
            6
        );
        index.remove(&sels[3], &3);
        assert!(!index.candidates(&labels(&[("app", "c")])).any(|&i| i == 3));
        pods.remove("ns", &all_labels[1], &1);
        let app_a = LabelSelector::with_labels([("app", "a")]);
        assert_eq!(pods.candidates("ns", &app_a), Some(vec![]));
        assert_eq!(pods.candidates("other", &app_a), Some(vec![&101]));
    }
}
