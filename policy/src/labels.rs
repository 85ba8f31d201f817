//! A label map stored as one sorted vector.
//!
//! Objects carry a handful of labels, and there are hundreds of thousands of objects: a
//! `BTreeMap` spends a whole node (over 500 bytes) on even one entry, while a sorted vector
//! spends one allocation sized to its entries, and a lookup in it is a short scan. The API
//! follows the parts of `BTreeMap` the project uses, and iteration, comparison, hashing,
//! `Debug` and serde see the same (key, value) sequence a `BTreeMap` would show.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels {
    /// Sorted by key; keys unique.
    entries: Vec<(String, String)>,
}

impl Labels {
    pub const fn new() -> Self {
        Labels {
            entries: Vec::new(),
        }
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// Selectors look up a few keys in a few labels, millions of times in a full compile: an
    /// equality scan (length first) beats an ordered search's byte comparisons there.
    pub fn get(&self, key: &str) -> Option<&String> {
        if self.entries.len() <= 8 {
            return self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        }
        self.position(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.position(key).ok().map(|i| self.entries.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> + Clone {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> + Clone {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &String> + Clone {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Builds from entries in any order; a later entry for a key wins, as with repeated
    /// `insert`s.
    fn from_entries(mut entries: Vec<(String, String)>) -> Self {
        // Stable, so equal keys keep their order and the last one can be kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => out.push((k, v)),
            }
        }
        out.shrink_to_fit();
        Labels { entries: out }
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Labels::from_entries(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Labels {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k.into(), v.into());
        }
    }
}

impl<K: Into<String>, V: Into<String>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        Labels {
            entries: map.into_iter().collect(),
        }
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Labels::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut l: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into_iter().collect();
        assert_eq!(l.len(), 2);
        assert_eq!(l.get("b").map(String::as_str), Some("3"));
        assert_eq!(l.insert("c".into(), "4".into()), None);
        assert_eq!(l.insert("a".into(), "0".into()).as_deref(), Some("1"));
        assert_eq!(l.remove("b").as_deref(), Some("3"));
        assert!(!l.contains_key("b"));
        let keys: Vec<&str> = l.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "c"]);
    }

    #[test]
    fn compares_hashes_and_prints_like_a_btree_map() {
        let pairs = [("zone", "a"), ("app", "web")];
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let l = Labels::from(pairs);
        assert_eq!(format!("{l:?}"), format!("{map:?}"));
        assert_eq!(Labels::from(map.clone()), l);
        let other = Labels::from([("app", "web")]);
        let other_map: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert_eq!(l.cmp(&other), map.cmp(&other_map));
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        assert_eq!(serde_json::from_str::<Labels>(&json).unwrap(), l);
    }
}
