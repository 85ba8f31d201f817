//! The renderer's counter maps, changed in place where a render only adds counters.
//!
//! A table's counter map is shared (`Arc`) with whoever holds the table, so a render that
//! adds one pod's three counters to 10,000 rule counters would have to copy the map (a few
//! milliseconds of allocation, and as long again to free the old one). Instead the
//! renderer keeps the map before the last one too: once its holders have let it go, the
//! last render's additions and this one's are made to it, and it becomes the new map.

use std::collections::BTreeMap;
use std::mem;
use std::sync::Arc;

use super::model::CounterMeta;

/// Counter name → what it counts (a [`super::Ruleset`]'s counters).
pub(super) type CounterMap = BTreeMap<String, CounterMeta>;

/// How an addition treats a counter the map has already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Put {
    /// Leaves it.
    IfAbsent,
    /// Replaces it.
    Over,
}

/// Additions to a counter map, made in order.
#[derive(Debug, Default)]
pub(super) struct Additions(Vec<(String, CounterMeta, Put)>);

impl Additions {
    pub(super) fn push(&mut self, name: &str, meta: &CounterMeta, put: Put) {
        self.0.push((name.to_string(), meta.clone(), put));
    }

    /// `ids`' counters without an origin, as rendering a pod or list makes them.
    pub(super) fn push_rule_ids(&mut self, ids: &[String]) {
        for id in ids {
            let meta = CounterMeta::Rule {
                id: id.clone(),
                origin: None,
            };
            self.0.push((id.clone(), meta, Put::IfAbsent));
        }
    }

    fn changes(&self, map: &CounterMap) -> bool {
        self.0.iter().any(|(name, meta, put)| match map.get(name) {
            None => true,
            Some(old) => *put == Put::Over && old != meta,
        })
    }

    fn make(&self, map: &mut CounterMap) {
        for (name, meta, put) in &self.0 {
            match map.get_mut(name) {
                None => {
                    map.insert(name.clone(), meta.clone());
                }
                Some(old) if *put == Put::Over => *old = meta.clone(),
                Some(_) => {}
            }
        }
    }
}

/// The last render's counter map and, while no one else holds it, the one before with
/// what turns it into the last.
#[derive(Debug, Default)]
pub(super) struct CounterMaps {
    current: Arc<CounterMap>,
    spare: Option<(Arc<CounterMap>, Additions)>,
}

impl CounterMaps {
    pub(super) fn current(&self) -> &Arc<CounterMap> {
        &self.current
    }

    /// Takes `map` as the last render's (built anew: the spare no longer leads to it).
    pub(super) fn replace(&mut self, map: Arc<CounterMap>) {
        if !Arc::ptr_eq(&map, &self.current) {
            self.spare = None;
            self.current = map;
        }
    }

    /// The last map with `additions`: the same `Arc` if they change nothing.
    pub(super) fn add(&mut self, additions: Additions) -> Arc<CounterMap> {
        if !additions.changes(&self.current) {
            return self.current.clone();
        }
        let mut next = self.take_spare();
        additions.make(Arc::make_mut(&mut next));
        let last = mem::replace(&mut self.current, next);
        self.spare = Some((last, additions));
        self.current.clone()
    }

    /// A map equal to the current one that no one else holds: the spare brought up to
    /// date if it is free, else a copy.
    fn take_spare(&mut self) -> Arc<CounterMap> {
        if let Some((mut map, additions)) = self.spare.take() {
            if let Some(free) = Arc::get_mut(&mut map) {
                additions.make(free);
                return map;
            }
        }
        Arc::new((*self.current).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str) -> CounterMeta {
        CounterMeta::Rule {
            id: id.into(),
            origin: None,
        }
    }

    #[test]
    fn additions_reuse_a_free_spare_and_copy_a_held_one() {
        let mut maps = CounterMaps::default();
        let mut first = Additions::default();
        first.push_rule_ids(&["r-1".to_string()]);
        let one = maps.add(first);
        assert_eq!(one.len(), 1);

        let mut second = Additions::default();
        second.push("d-1", &CounterMeta::UnknownInterface, Put::Over);
        let two = maps.add(second);
        assert!(!Arc::ptr_eq(&one, &two));
        let mut held = Additions::default();
        held.push("d-0", &CounterMeta::UnknownInterface, Put::IfAbsent);
        // `one`, the spare now, is still held: copied.
        let copied = maps.add(held);
        assert!(!Arc::ptr_eq(&one, &copied) && !Arc::ptr_eq(&two, &copied));
        drop(copied);
        let spare = Arc::as_ptr(&two);
        drop(two);

        let mut third = Additions::default();
        third.push("d-2", &CounterMeta::FlowLogSuppressed, Put::IfAbsent);
        let three = maps.add(third);
        assert_eq!(
            Arc::as_ptr(&three),
            spare,
            "the freed map is made the new one"
        );
        let keys: Vec<&str> = three.keys().map(String::as_str).collect();
        assert_eq!(keys, ["d-0", "d-1", "d-2", "r-1"]);
    }

    #[test]
    fn additions_keep_or_replace_as_told_and_nothing_new_keeps_the_map() {
        let mut maps = CounterMaps::default();
        maps.replace(Arc::new(
            [("r-1".to_string(), CounterMeta::UnknownInterface)].into(),
        ));
        let before = maps.current().clone();
        let mut kept = Additions::default();
        kept.push_rule_ids(&["r-1".to_string()]);
        assert!(Arc::ptr_eq(&maps.add(kept), &before));

        let mut over = Additions::default();
        over.push("r-1", &rule("r-1"), Put::Over);
        assert_eq!(maps.add(over)["r-1"], rule("r-1"));
    }
}
