//! The table as the kernel holds it, read over netlink for drift detection: the table
//! itself, its chains, rules, sets (declarations, not contents), named objects and the
//! elements of the two dispatch maps, with what changes without anyone editing the table
//! (handles, use counts, counter values, the generation id) left out.
//!
//! The image is only ever compared with an earlier image of the same kernel, so it keeps
//! the kernel's attributes as raw bytes instead of decoding them. This replaces `nft -t
//! list table`, which fetches every set element first (~0.35 s with 150,000 addresses).
//!
//! Objects are keyed by name and rules kept per chain, in their order, so that after a
//! transaction only what it touched is read again ([`refresh`]) and the result equals a
//! whole new read when no one else edited the table (re-reading all 11,000 rules of a
//! tiered node after adding one pod cost ~50 ms; the touched chains alone, ~2 ms). Rules
//! are dumped chain by chain.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    attr_text, attrs, msg, Message, NfnlError, NfnlSocket, Reply, NLA_F_NESTED, NLM_F_DUMP,
    NLM_F_REQUEST,
};

/// Attribute 1 names the table in chain, rule, set and object messages alike.
const ATTR_TABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
/// `NFT_OBJECT_COUNTER`: the agent's only kind of named object.
const NFT_OBJECT_COUNTER: u32 = 1;
/// The number of elements of a set (kernels since 6.13; absent before).
const NFTA_SET_COUNT: u16 = 20;

/// Per message type, the attributes that change by themselves.
fn volatile(kind: u16, attr: u16) -> bool {
    match kind {
        // USE, HANDLE, PAD
        msg::NEWTABLE => matches!(attr, 3..=5),
        // HANDLE, USE, COUNTERS, PAD, ID
        msg::NEWCHAIN => matches!(attr, 2 | 6 | 8 | 9 | 11),
        // HANDLE, POSITION (the previous rule's handle), PAD, ID, POSITION_ID, CHAIN_ID
        msg::NEWRULE => matches!(attr, 3 | 6 | 8..=11),
        // ID, PAD, HANDLE, COUNT (kept apart: see `TableImage::set_counts`)
        msg::NEWSET => matches!(attr, 10 | 14 | 16 | NFTA_SET_COUNT),
        // DATA (counter values), USE, HANDLE, PAD
        msg::NEWOBJ => matches!(attr, 4..=7),
        _ => false,
    }
}

/// What drift detection compares: each message's attributes without the volatile ones.
/// Names are raw attribute payloads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableImage {
    table: Vec<Vec<u8>>,
    /// Chain name → the chain.
    chains: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Chain name → its rules, in the kernel's order (rule order matters).
    rules: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
    /// Set name → the set (its declaration).
    sets: BTreeMap<Vec<u8>, Vec<u8>>,
    /// (type, name) → the named object.
    objects: BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>>,
    /// Map name → its elements, sorted.
    maps: BTreeMap<String, Vec<Vec<u8>>>,
    /// Set name → its number of elements, where the kernel reports it: an element added
    /// or deleted by hand shows here without dumping 150,000 elements. Kept apart so that
    /// the agent's own element changes can update it without reading the table again.
    set_counts: BTreeMap<String, u32>,
    /// Set name → digest of its elements ([`super::digest`]), filled in by the caller: the
    /// applier computes host sets' digests from what it loaded and reads the others.
    contents: BTreeMap<String, u64>,
}

impl TableImage {
    /// The number of messages (table, chains, rules, sets, objects, map elements).
    pub fn len(&self) -> usize {
        self.table.len()
            + self.chains.len()
            + self.rules.values().map(Vec::len).sum::<usize>()
            + self.sets.len()
            + self.objects.len()
            + self.maps.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that set `name` now holds `count` elements (after the agent changed them),
    /// if the kernel reports counts at all.
    pub fn set_count(&mut self, name: &str, count: usize) {
        if let Some(c) = self.set_counts.get_mut(name) {
            *c = u32::try_from(count).unwrap_or(u32::MAX);
        }
    }

    pub fn count(&self, name: &str) -> Option<u32> {
        self.set_counts.get(name).copied()
    }

    /// Every set's (and map's) name, sorted.
    pub fn set_names(&self) -> Vec<String> {
        self.sets
            .keys()
            .map(|k| String::from_utf8_lossy(attr_text(k)).into_owned())
            .collect()
    }

    pub fn digest(&self, name: &str) -> Option<u64> {
        self.contents.get(name).copied()
    }

    pub fn set_digest(&mut self, name: &str, digest: u64) {
        self.contents.insert(name.to_string(), digest);
    }
}

/// Attribute 2 of a rule message: its chain's name.
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_HOOK: u16 = 4;

fn attr_of(attrs_raw: &[u8], wanted: u16) -> Option<&[u8]> {
    attrs(attrs_raw)
        .map_while(Result::ok)
        .find(|(k, _)| *k == wanted)
        .map(|(_, p)| p)
}

fn without(attrs_raw: &[u8], drop: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(attrs_raw.len());
    for (kind, payload) in attrs(attrs_raw).map_while(Result::ok) {
        if !drop.contains(&kind) {
            super::push_attr(&mut out, kind, payload);
        }
    }
    out
}

const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_LOOKUP_SET: u16 = 1;

/// The kernel's name of an anonymous set (`__set` and a number) → a name by first use.
#[derive(Default)]
struct AnonymousNames(BTreeMap<Vec<u8>, Vec<u8>>);

impl AnonymousNames {
    fn name_of(&mut self, kernel: &[u8]) -> Vec<u8> {
        let next = self.0.len();
        self.0
            .entry(kernel.to_vec())
            .or_insert_with(|| format!("__anon{next}\0").into_bytes())
            .clone()
    }

    /// `map` keyed by set name with the anonymous sets renamed.
    fn rename_keys<V: Clone>(&self, map: &BTreeMap<String, V>) -> BTreeMap<String, V> {
        map.iter()
            .map(|(k, v)| match self.0.get(k.as_bytes()) {
                Some(name) => (
                    String::from_utf8_lossy(attr_text(name)).into_owned(),
                    v.clone(),
                ),
                None => (k.clone(), v.clone()),
            })
            .collect()
    }

    /// `rule` (its attributes) with its lookups' anonymous sets renamed.
    fn rename_in_rule(&mut self, rule: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(rule.len());
        for (kind, payload) in attrs(rule).map_while(Result::ok) {
            if kind != NFTA_RULE_EXPRESSIONS {
                super::push_attr(&mut out, kind, payload);
                continue;
            }
            let mut list = Vec::with_capacity(payload.len());
            for (elem_kind, expr) in attrs(payload).map_while(Result::ok) {
                let renamed = self.rename_in_expr(expr);
                super::push_attr(&mut list, elem_kind | NLA_F_NESTED, &renamed);
            }
            super::push_attr(&mut out, kind | NLA_F_NESTED, &list);
        }
        out
    }

    fn rename_in_expr(&mut self, expr: &[u8]) -> Vec<u8> {
        match anonymous_lookup(expr) {
            Some(set) => {
                let name = self.name_of(set);
                let mut out = Vec::with_capacity(expr.len());
                for (kind, payload) in attrs(expr).map_while(Result::ok) {
                    match kind {
                        NFTA_EXPR_DATA => super::push_attr(
                            &mut out,
                            kind | NLA_F_NESTED,
                            &rename_attr(payload, NFTA_LOOKUP_SET, &name),
                        ),
                        _ => super::push_attr(&mut out, kind, payload),
                    }
                }
                out
            }
            _ => expr.to_vec(),
        }
    }
}

/// The kernel's name of the anonymous set `expr` looks up, if it is such a lookup.
fn anonymous_lookup(expr: &[u8]) -> Option<&[u8]> {
    let is_lookup = attr_of(expr, NFTA_EXPR_NAME).is_some_and(|n| attr_text(n) == b"lookup");
    let set = attr_of(expr, NFTA_EXPR_DATA).and_then(|d| attr_of(d, NFTA_LOOKUP_SET))?;
    (is_lookup && attr_text(set).starts_with(b"__set")).then(|| attr_text(set))
}

/// The kernel's names of the anonymous sets `rule` (its attributes) looks up: the kernel
/// creates each with its rule and deletes it with the rule.
fn anonymous_sets(rule: &[u8]) -> impl Iterator<Item = &[u8]> {
    attrs(rule)
        .map_while(Result::ok)
        .filter(|(kind, _)| *kind == NFTA_RULE_EXPRESSIONS)
        .flat_map(|(_, list)| attrs(list).map_while(Result::ok))
        .filter_map(|(_, expr)| anonymous_lookup(expr))
}

/// `attrs_raw` with attribute `which`'s payload replaced by `payload`. Nested attributes
/// are copied without their nesting flag, which the kernel sets on none of the ones
/// renamed here and the comparison ignores either way (both sides are rewritten alike).
fn rename_attr(attrs_raw: &[u8], which: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(attrs_raw.len());
    for (kind, p) in attrs(attrs_raw).map_while(Result::ok) {
        super::push_attr(&mut out, kind, if kind == which { payload } else { p });
    }
    out
}

impl TableImage {
    /// Whether the table has base chains (chains with a hook): without them it filters
    /// nothing (a first load killed between its steps leaves such a table).
    pub fn has_base_chains(&self) -> bool {
        self.chains
            .values()
            .any(|a| attr_of(a, NFTA_CHAIN_HOOK).is_some())
    }

    /// Whether the table's flags are clear (not dormant: a dormant table filters nothing).
    pub fn is_active(&self) -> bool {
        self.table
            .iter()
            .all(|a| attr_of(a, NFTA_TABLE_FLAGS).is_none_or(|f| f.iter().all(|b| *b == 0)))
    }

    /// The image without the table's name and flags, and with anonymous sets named by
    /// where they are first used (chains in name order, rules in order) rather than by
    /// the kernel's `__setN`, which depends on the order of their creation: for comparing
    /// our table, changed incrementally, with a scratch table that loaded the same rules
    /// at once.
    pub fn canonical(&self) -> TableImage {
        let mut names = AnonymousNames::default();
        let rules = self
            .rules
            .iter()
            .map(|(k, rules)| {
                let rules = rules
                    .iter()
                    .map(|r| names.rename_in_rule(&without(r, &[ATTR_TABLE])))
                    .collect();
                (k.clone(), rules)
            })
            .collect();
        let strip = |a: &Vec<u8>| without(a, &[ATTR_TABLE]);
        let sets = self
            .sets
            .iter()
            .map(|(k, a)| match names.0.get(attr_text(k)) {
                Some(name) => (name.clone(), rename_attr(&strip(a), NFTA_SET_NAME, name)),
                None => (k.clone(), strip(a)),
            })
            .collect();
        TableImage {
            table: self
                .table
                .iter()
                .map(|a| without(a, &[NFTA_TABLE_NAME, NFTA_TABLE_FLAGS]))
                .collect(),
            chains: self
                .chains
                .iter()
                .map(|(k, a)| (k.clone(), strip(a)))
                .collect(),
            rules,
            sets,
            objects: self
                .objects
                .iter()
                .map(|(k, a)| (k.clone(), strip(a)))
                .collect(),
            maps: self.maps.clone(),
            set_counts: names.rename_keys(&self.set_counts),
            contents: names.rename_keys(&self.contents),
        }
    }

    /// What differs from `other`, named (for the drift warning): at most `limit` items.
    pub fn differences(&self, other: &TableImage, limit: usize) -> Vec<String> {
        fn keyed<K: Ord + Clone, V: PartialEq>(
            what: &str,
            a: &BTreeMap<K, V>,
            b: &BTreeMap<K, V>,
            name: impl Fn(&K) -> String,
            out: &mut Vec<String>,
        ) {
            let keys: std::collections::BTreeSet<&K> = a.keys().chain(b.keys()).collect();
            for k in keys {
                if a.get(k) != b.get(k) {
                    out.push(format!("{what} {}", name(k)));
                }
            }
        }
        let text = |k: &Vec<u8>| String::from_utf8_lossy(attr_text(k)).into_owned();
        let mut out = Vec::new();
        if self.table != other.table {
            out.push("the table".to_string());
        }
        keyed("chain", &self.chains, &other.chains, text, &mut out);
        keyed("rules of chain", &self.rules, &other.rules, text, &mut out);
        keyed("set", &self.sets, &other.sets, text, &mut out);
        keyed(
            "object",
            &self.objects,
            &other.objects,
            |(_, n)| text(n),
            &mut out,
        );
        keyed("map", &self.maps, &other.maps, String::clone, &mut out);
        keyed(
            "element count of set",
            &self.set_counts,
            &other.set_counts,
            String::clone,
            &mut out,
        );
        keyed(
            "elements of set",
            &self.contents,
            &other.contents,
            String::clone,
            &mut out,
        );
        out.truncate(limit);
        out
    }

    fn insert(&mut self, kind: u16, attrs: Vec<u8>, body: &[u8]) -> Result<(), NfnlError> {
        let name = |attr: u16| attr_of(body, attr).unwrap_or_default().to_vec();
        match kind {
            msg::NEWTABLE => self.table.push(attrs),
            msg::NEWCHAIN => {
                self.chains.insert(name(NFTA_CHAIN_NAME), attrs);
            }
            msg::NEWRULE => self
                .rules
                .entry(name(NFTA_RULE_CHAIN))
                .or_default()
                .push(attrs),
            msg::NEWSET => {
                self.set_counts.extend(set_count(body)?);
                self.sets.insert(name(NFTA_SET_NAME), attrs);
            }
            msg::NEWOBJ => {
                self.objects
                    .insert((name(NFTA_OBJ_TYPE), name(NFTA_OBJ_NAME)), attrs);
            }
            _ => {}
        }
        Ok(())
    }
}

/// (name, element count) of a `NEWSET` message.
fn set_count(body: &[u8]) -> Result<Option<(String, u32)>, NfnlError> {
    let (mut name, mut count) = (None, None);
    for attr in attrs(body) {
        let (kind, payload) = attr?;
        match kind {
            NFTA_SET_NAME => name = Some(String::from_utf8_lossy(attr_text(payload)).into_owned()),
            NFTA_SET_COUNT => {
                let bytes: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| NfnlError::Malformed("set count is not 4 bytes"))?;
                count = Some(u32::from_be_bytes(bytes));
            }
            _ => {}
        }
    }
    Ok(name.zip(count))
}

/// The message's attributes without the volatile ones; `None` if it belongs to another
/// table.
fn normalise(kind: u16, body: &[u8], table: &str) -> Result<Option<Vec<u8>>, NfnlError> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    for attr in attrs(body) {
        let (attr_kind, payload) = attr?;
        let len = (4 + payload.len()).next_multiple_of(4).min(rest.len());
        let (raw, tail) = rest.split_at(len);
        rest = tail;
        if attr_kind == ATTR_TABLE && attr_text(payload) != table.as_bytes() {
            return Ok(None);
        }
        if !volatile(kind, attr_kind) {
            out.extend_from_slice(raw);
        }
    }
    Ok(Some(out))
}

/// Reads the `new` messages that `get` with `req`'s attributes answers into `out`.
fn read_into(
    socket: &mut NfnlSocket,
    table: &str,
    get: u16,
    new: u16,
    flags: u16,
    attrs: &[(u16, &[u8])],
    out: &mut TableImage,
) -> Result<(), NfnlError> {
    let mut req = Message::nftables(get, NLM_F_REQUEST | flags);
    req.attr_str(ATTR_TABLE, table);
    for (kind, payload) in attrs {
        req.attr(*kind, payload);
    }
    for reply in socket.request(req)?.unwrap_or_default() {
        if reply.kind != new {
            continue;
        }
        if let Some(attrs) = normalise(new, &reply.body, table)? {
            out.insert(new, attrs, &reply.body)?;
        }
    }
    Ok(())
}

fn dump(
    socket: &mut NfnlSocket,
    table: &str,
    get: u16,
    new: u16,
    out: &mut TableImage,
) -> Result<(), NfnlError> {
    read_into(socket, table, get, new, NLM_F_DUMP, &[], out)
}

/// The raw elements of one set, sorted (hash sets dump in bucket order, which a resize
/// changes).
pub(crate) fn set_elements(
    socket: &mut NfnlSocket,
    table: &str,
    set: &str,
) -> Result<Option<Vec<Vec<u8>>>, NfnlError> {
    let mut req = Message::nftables(msg::GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP);
    req.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, set);
    let Some(replies) = socket.request(req)? else {
        return Ok(None);
    };
    let mut elements = elements_of(replies)?;
    elements.sort_unstable();
    Ok(Some(elements))
}

/// The raw elements of `NEWSETELEM` replies.
fn elements_of(replies: Vec<Reply>) -> Result<Vec<Vec<u8>>, NfnlError> {
    let mut elements = Vec::new();
    for reply in replies {
        if reply.kind != msg::NEWSETELEM {
            continue;
        }
        for attr in attrs(&reply.body) {
            let (kind, payload) = attr?;
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for elem in attrs(payload) {
                elements.push(elem?.1.to_vec());
            }
        }
    }
    Ok(elements)
}

/// The image of `inet TABLE` with the elements of `maps`; `None` when the table does not
/// exist.
pub fn read(
    socket: &mut NfnlSocket,
    table: &str,
    maps: &[&str],
) -> Result<Option<TableImage>, NfnlError> {
    let mut image = TableImage::default();
    if !read_table(socket, table, &mut image)? {
        return Ok(None);
    }
    dump(socket, table, msg::GETCHAIN, msg::NEWCHAIN, &mut image)?;
    let chains: Vec<Vec<u8>> = image.chains.keys().cloned().collect();
    for chain in &chains {
        read_rules(socket, table, chain, &mut image)?;
    }
    dump(socket, table, msg::GETSET, msg::NEWSET, &mut image)?;
    dump(socket, table, msg::GETOBJ, msg::NEWOBJ, &mut image)?;
    read_maps(socket, table, maps, &mut image)?;
    Ok(Some(image))
}

/// What a transaction changed, so that [`refresh`] reads only that again: chains
/// created, changed or deleted, counters created or deleted, sets created or whose
/// elements changed, and the dispatch elements it added or deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub chains: Vec<String>,
    pub counters: Vec<String>,
    pub sets: Vec<String>,
    /// Dispatch map → the interfaces whose elements it added or deleted.
    pub maps: BTreeMap<String, BTreeSet<String>>,
    /// Whether it declared or deleted a set (nft).
    pub declared: bool,
}

/// Brings `image` (of the table before a transaction) to what [`read`] would read after
/// it if no one else changed the table, reading again the table and only what the
/// transaction `touched`: its chains with their rules, its counters, the declarations of
/// its sets and dispatch maps (a declaration carries the element count) and its dispatch
/// elements, each by name or key, and the anonymous sets of the touched chains' rules
/// before and after it (a refilled rule's anonymous sets come back under new names). The
/// set declarations are dumped whole when it declared or deleted a set. What no one touched is
/// kept as it was read: an edit by hand elsewhere stays a difference for the next
/// reconcile instead of being taken into the image. `Ok(false)` when the table does not
/// exist. Set digests are the caller's: those of the `touched` sets are dropped, to be
/// computed or read again; those of the dispatch maps read again are computed here from
/// their elements.
pub fn refresh(
    socket: &mut NfnlSocket,
    table: &str,
    maps: &[&str],
    image: &mut TableImage,
    touched: &Touched,
) -> Result<bool, NfnlError> {
    let mut fresh = TableImage::default();
    if !read_table(socket, table, &mut fresh)? {
        return Ok(false);
    }
    fresh.chains = std::mem::take(&mut image.chains);
    fresh.rules = std::mem::take(&mut image.rules);
    fresh.objects = std::mem::take(&mut image.objects);
    fresh.maps = std::mem::take(&mut image.maps);
    // The anonymous sets of the touched chains' rules, before and after: they go and come
    // with their rules.
    let (mut gone, mut came): (Vec<String>, Vec<String>) = Default::default();
    let text = |set: &[u8]| String::from_utf8_lossy(set).into_owned();
    for chain in &touched.chains {
        let name = nul_terminated(chain);
        fresh.chains.remove(&name);
        let old = fresh.rules.remove(&name).unwrap_or_default();
        gone.extend(old.iter().flat_map(|r| anonymous_sets(r)).map(text));
        // A chain deleted is not found: it stays out.
        let get = [(NFTA_CHAIN_NAME, name.as_slice())];
        read_into(
            socket,
            table,
            msg::GETCHAIN,
            msg::NEWCHAIN,
            0,
            &get,
            &mut fresh,
        )?;
        if fresh.chains.contains_key(&name) {
            read_rules(socket, table, &name, &mut fresh)?;
            if let Some(new) = fresh.rules.get(&name) {
                came.extend(new.iter().flat_map(|r| anonymous_sets(r)).map(text));
            }
        }
    }
    let counter = NFT_OBJECT_COUNTER.to_be_bytes();
    for name in &touched.counters {
        let name = nul_terminated(name);
        fresh.objects.remove(&(counter.to_vec(), name.clone()));
        let get = [
            (NFTA_OBJ_NAME, name.as_slice()),
            (NFTA_OBJ_TYPE, &counter[..]),
        ];
        read_into(socket, table, msg::GETOBJ, msg::NEWOBJ, 0, &get, &mut fresh)?;
    }
    if touched.declared || image.sets.is_empty() {
        dump(socket, table, msg::GETSET, msg::NEWSET, &mut fresh)?;
    } else {
        fresh.sets = std::mem::take(&mut image.sets);
        fresh.set_counts = std::mem::take(&mut image.set_counts);
        let declarations = touched
            .sets
            .iter()
            .chain(touched.maps.keys())
            .chain(&gone)
            .chain(&came);
        for set in declarations {
            let name = nul_terminated(set);
            fresh.sets.remove(&name);
            fresh.set_counts.remove(set);
            let get = [(NFTA_SET_NAME, name.as_slice())];
            read_into(socket, table, msg::GETSET, msg::NEWSET, 0, &get, &mut fresh)?;
        }
    }
    // The maps read again, by key or whole; the others are kept as they were read.
    let mut read_again = Vec::new();
    let mut whole = Vec::new();
    for map in maps {
        let kept = match (fresh.maps.get_mut(*map), touched.maps.get(*map)) {
            (Some(elements), Some(keys)) => {
                read_again.push(*map);
                refresh_elements(socket, table, map, keys, elements)?
            }
            (Some(_), None) => continue,
            (None, _) => false,
        };
        if !kept {
            whole.push(*map);
        }
    }
    read_maps(socket, table, &whole, &mut fresh)?;
    read_again.extend(&whole);
    fresh.contents = std::mem::take(&mut image.contents);
    let sets = &fresh.sets;
    fresh.contents.retain(|name, _| {
        sets.contains_key(&nul_terminated(name))
            && !touched.sets.contains(name)
            && !read_again.contains(&name.as_str())
            // The kernel may give a new anonymous set the name of one that went.
            && !gone.contains(name)
            && !came.contains(name)
    });
    for map in read_again {
        if let Some(elements) = fresh.maps.get(map) {
            if fresh.sets.contains_key(&nul_terminated(map)) {
                let digest = super::digest::of_elements(elements)?;
                fresh.contents.insert(map.to_string(), digest);
            }
        }
    }
    *image = fresh;
    Ok(true)
}

/// Reads again the elements of dispatch map `map` keyed by `ifnames` into `elements` (its
/// elements as read before, sorted): those found replace the ones read before, those gone
/// go. `Ok(false)` (nothing changed) for a name no element can have: read the map whole.
fn refresh_elements(
    socket: &mut NfnlSocket,
    table: &str,
    map: &str,
    ifnames: &BTreeSet<String>,
    elements: &mut Vec<Vec<u8>>,
) -> Result<bool, NfnlError> {
    let mut found = Vec::new();
    let mut keys = Vec::new();
    for ifname in ifnames {
        let (Some(get), Some(key)) = (
            super::rules::dispatch_get(table, map, ifname),
            super::rules::dispatch_key_value(ifname),
        ) else {
            return Ok(false);
        };
        keys.push(key);
        // Not found (ENOENT): the element is gone.
        found.extend(elements_of(socket.request(get)?.unwrap_or_default())?);
    }
    elements.retain(|e| element_key(e).is_none_or(|k| !keys.iter().any(|key| key[..] == *k)));
    elements.extend(found);
    elements.sort_unstable();
    Ok(true)
}

/// The key value of an element as the kernel dumps it (the payload of `NFTA_LIST_ELEM`).
fn element_key(element: &[u8]) -> Option<&[u8]> {
    attr_of(element, NFTA_SET_ELEM_KEY).and_then(|key| attr_of(key, NFTA_DATA_VALUE))
}

/// The rules of one chain (`chain` NUL-terminated), dumped apart.
fn read_rules(
    socket: &mut NfnlSocket,
    table: &str,
    chain: &[u8],
    out: &mut TableImage,
) -> Result<(), NfnlError> {
    let filter = [(NFTA_RULE_CHAIN, chain)];
    read_into(
        socket,
        table,
        msg::GETRULE,
        msg::NEWRULE,
        NLM_F_DUMP,
        &filter,
        out,
    )
}

/// A name as the kernel sends it back: NUL-terminated.
fn nul_terminated(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 1);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out
}

fn read_table(
    socket: &mut NfnlSocket,
    table: &str,
    out: &mut TableImage,
) -> Result<bool, NfnlError> {
    let mut req = Message::nftables(msg::GETTABLE, NLM_F_REQUEST);
    req.attr_str(NFTA_TABLE_NAME, table);
    let Some(replies) = socket.request(req)? else {
        return Ok(false);
    };
    for reply in replies.iter().filter(|r| r.kind == msg::NEWTABLE) {
        if let Some(attrs) = normalise(msg::NEWTABLE, &reply.body, table)? {
            out.table.push(attrs);
        }
    }
    Ok(true)
}

fn read_maps(
    socket: &mut NfnlSocket,
    table: &str,
    maps: &[&str],
    out: &mut TableImage,
) -> Result<(), NfnlError> {
    for map in maps {
        // A missing map is drift too: it shows as an empty element list.
        let elements = set_elements(socket, table, map)?.unwrap_or_default();
        out.maps.insert(map.to_string(), elements);
    }
    Ok(())
}

/// Whether `inet TABLE` exists.
pub fn table_exists(socket: &mut NfnlSocket, table: &str) -> Result<bool, NfnlError> {
    let mut req = Message::nftables(msg::GETTABLE, NLM_F_REQUEST);
    req.attr_str(NFTA_TABLE_NAME, table);
    Ok(socket.request(req)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::push_attr;

    #[test]
    fn volatile_attributes_and_other_tables_are_dropped() {
        let mut body = Vec::new();
        push_attr(&mut body, 1, b"palisade\0");
        push_attr(&mut body, 2, &7u64.to_be_bytes()); // handle
        push_attr(&mut body, 3, b"egress/ns/a\0");
        push_attr(&mut body, 6, &3u32.to_be_bytes()); // use
        let mut want = Vec::new();
        push_attr(&mut want, 1, b"palisade\0");
        push_attr(&mut want, 3, b"egress/ns/a\0");
        assert_eq!(
            normalise(msg::NEWCHAIN, &body, "palisade").unwrap(),
            Some(want)
        );
        assert_eq!(normalise(msg::NEWCHAIN, &body, "other").unwrap(), None);
    }

    #[test]
    fn set_counts_are_kept_apart() {
        let set = |count: u32| {
            let mut body = Vec::new();
            push_attr(&mut body, 1, b"palisade\0");
            push_attr(&mut body, NFTA_SET_NAME, b"g-1_4\0");
            push_attr(&mut body, NFTA_SET_COUNT, &count.to_be_bytes());
            body
        };
        assert_eq!(
            normalise(msg::NEWSET, &set(1), "palisade").unwrap(),
            normalise(msg::NEWSET, &set(2), "palisade").unwrap()
        );
        assert_eq!(set_count(&set(7)).unwrap(), Some(("g-1_4".into(), 7)));
        let mut image = TableImage::default();
        image.set_counts.insert("g-1_4".into(), 7);
        image.set_count("g-1_4", 8);
        image.set_count("g-2_4", 8);
        assert_eq!(
            (image.count("g-1_4"), image.count("g-2_4")),
            (Some(8), None)
        );
    }

    #[test]
    fn chain_order_does_not_count_rule_order_does() {
        let chain = |name: &[u8]| {
            let mut body = Vec::new();
            push_attr(&mut body, 1, b"palisade\0");
            push_attr(&mut body, NFTA_CHAIN_NAME, name);
            body
        };
        let rule = |chain: &[u8], verdict: u8| {
            let mut body = Vec::new();
            push_attr(&mut body, 1, b"palisade\0");
            push_attr(&mut body, NFTA_RULE_CHAIN, chain);
            push_attr(&mut body, 4, &[verdict]);
            body
        };
        let image = |messages: &[(u16, Vec<u8>)]| {
            let mut image = TableImage::default();
            for (kind, body) in messages {
                let attrs = normalise(*kind, body, "palisade").unwrap().unwrap();
                image.insert(*kind, attrs, body).unwrap();
            }
            image
        };
        let (a, b) = (&b"a\0"[..], &b"b\0"[..]);
        let one = image(&[
            (msg::NEWCHAIN, chain(a)),
            (msg::NEWCHAIN, chain(b)),
            (msg::NEWRULE, rule(a, 1)),
            (msg::NEWRULE, rule(a, 2)),
            (msg::NEWRULE, rule(b, 3)),
        ]);
        // Chains created in the other order: the same table.
        let other = image(&[
            (msg::NEWCHAIN, chain(b)),
            (msg::NEWCHAIN, chain(a)),
            (msg::NEWRULE, rule(b, 3)),
            (msg::NEWRULE, rule(a, 1)),
            (msg::NEWRULE, rule(a, 2)),
        ]);
        assert_eq!(one, other);
        // a's rules swapped: another table, and the difference names the chain.
        let swapped = image(&[
            (msg::NEWCHAIN, chain(a)),
            (msg::NEWCHAIN, chain(b)),
            (msg::NEWRULE, rule(a, 2)),
            (msg::NEWRULE, rule(a, 1)),
            (msg::NEWRULE, rule(b, 3)),
        ]);
        assert_ne!(one, swapped);
        assert_eq!(one.differences(&swapped, 5), vec!["rules of chain a"]);
    }

    #[test]
    fn counter_values_do_not_count_as_drift() {
        let obj = |packets: u64| {
            let mut body = Vec::new();
            push_attr(&mut body, 1, b"palisade\0");
            push_attr(&mut body, 2, b"r-1\0");
            push_attr(&mut body, 4, &packets.to_be_bytes());
            body
        };
        assert_eq!(
            normalise(msg::NEWOBJ, &obj(1), "palisade").unwrap(),
            normalise(msg::NEWOBJ, &obj(99), "palisade").unwrap()
        );
    }
}
