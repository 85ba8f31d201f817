//! The renderer's counter maps, changed in place where a render only adds counters.
//!
//! A table's counter map is shared (`Arc`) with whoever holds the table, so a render that
//! adds one pod's three counters to 10,000 rule counters would have to copy the map (a few
//! milliseconds of allocation, and as long again to free the old one). Instead the
//! renderer keeps the map before the last one too: once its holders have let it go, the
//! last render's additions and this one's are made to it, and it becomes the new map.

use std::collections::BTreeMap;
use std::mem;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::model::{CounterLineage, CounterMeta};

/// Serials of counter maps, unique in the process (0 is no serial), so that two
/// renderers' maps are never taken for each other.
static SERIALS: AtomicU64 = AtomicU64::new(1);

fn next_serial() -> u64 {
    SERIALS.fetch_add(1, Ordering::Relaxed)
}

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

    /// The names that `map` lacks, sorted and once each.
    fn new_names(&self, map: &CounterMap) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .iter()
            .filter(|(name, _, _)| !map.contains_key(name))
            .map(|(name, _, _)| name.clone())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
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
    /// The current map's serial and, if it was made by [`CounterMaps::add`], the serial
    /// of the map it was made from and the names it added.
    serial: u64,
    from: Option<(u64, Arc<[String]>)>,
    spare: Option<(Arc<CounterMap>, Additions)>,
}

impl CounterMaps {
    pub(super) fn current(&self) -> &Arc<CounterMap> {
        &self.current
    }

    /// The current map's lineage, for the table that holds it.
    pub(super) fn lineage(&self) -> CounterLineage {
        CounterLineage::new(self.serial, self.from.clone(), &self.current)
    }

    /// Takes `map` as the last render's (built anew: the spare no longer leads to it).
    pub(super) fn replace(&mut self, map: Arc<CounterMap>) {
        if !Arc::ptr_eq(&map, &self.current) || self.serial == 0 {
            self.spare = None;
            self.current = map;
            self.serial = next_serial();
            self.from = None;
        }
    }

    /// The last map with `additions`: the same `Arc` if they change nothing.
    pub(super) fn add(&mut self, additions: Additions) -> Arc<CounterMap> {
        if !additions.changes(&self.current) {
            return self.current.clone();
        }
        let names = additions.new_names(&self.current);
        let mut next = self.take_spare();
        additions.make(Arc::make_mut(&mut next));
        let last = mem::replace(&mut self.current, next);
        self.spare = Some((last, additions));
        let base = mem::replace(&mut self.serial, next_serial());
        // A map of no serial is of unknown history: additions to it tell nothing.
        self.from = (base != 0).then(|| (base, names.into()));
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
    fn a_lineage_names_the_map_grown_from_and_only_the_new_names() {
        let mut maps = CounterMaps::default();
        maps.replace(Arc::new(
            [("r-1".to_string(), CounterMeta::UnknownInterface)].into(),
        ));
        let base = maps.serial;
        assert!(maps.from.is_none() && base != 0);

        let mut additions = Additions::default();
        additions.push_rule_ids(&["r-3".into(), "r-1".into(), "r-2".into(), "r-3".into()]);
        additions.push("r-1", &rule("r-1"), Put::Over);
        maps.add(additions);
        let grown = maps.serial;
        let (from, names) = maps.from.clone().unwrap();
        assert_eq!(from, base);
        assert_eq!(&*names, ["r-2", "r-3"]);

        let mut nothing = Additions::default();
        nothing.push_rule_ids(&["r-2".into()]);
        maps.add(nothing);
        assert_eq!(maps.serial, grown, "the same map");

        let copy = Arc::new((**maps.current()).clone());
        maps.replace(copy);
        assert!(maps.from.is_none() && maps.serial != grown);
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
