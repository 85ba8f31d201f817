//! Planning one incremental transaction from the applied table to the desired one: set
//! elements added and removed, changed chains flushed and refilled, dispatch elements for
//! new and gone pods (in the entry and the rest-dispatch maps), objects created before and
//! deleted after their users: a shared tier chain is created with the first pod that
//! refers to it and deleted in the transaction in which the last reference goes, after it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::nfnl::rules;
use crate::nfnl::setelem::{self, Op};
use crate::render::json::{self, Command};
use crate::render::{RuleDef, Ruleset, SetElement, SetKind, DISPATCH_MAPS};

/// One step of an incremental transaction, kept as data so that a transaction can go to
/// the kernel over netlink ([`crate::nfnl::transaction`]) or, as commands, to nft.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// An `nft -j` command: declaring or deleting a set, and a new set's elements.
    Nft(Command),
    /// Elements added to or deleted from an existing named set.
    Elements {
        set: String,
        kind: SetKind,
        op: Op,
        elements: Vec<SetElement>,
    },
    Counter {
        name: String,
        op: Op,
    },
    Chain {
        name: String,
        op: ChainOp,
    },
    /// A rule appended to a chain.
    Rule {
        chain: String,
        rule: RuleDef,
    },
    /// Interface → chain entries added to or deleted from a dispatch map.
    Dispatch {
        map: &'static str,
        op: Op,
        entries: Vec<(String, String)>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainOp {
    Add,
    /// Delete every rule of the chain.
    Flush,
    Delete,
}

impl Step {
    pub fn to_command(&self) -> Command {
        let verb = |op: Op, obj| match op {
            Op::Add => json::add(obj),
            Op::Delete => json::delete(obj),
        };
        match self {
            Step::Nft(cmd) => cmd.clone(),
            Step::Elements {
                set, op, elements, ..
            } => verb(*op, json::elements(set, elements)),
            Step::Counter { name, op } => verb(*op, json::counter(name)),
            Step::Chain { name, op } => match op {
                ChainOp::Add => json::add(json::chain(name)),
                ChainOp::Flush => json::flush_chain(name),
                ChainOp::Delete => json::delete(json::chain(name)),
            },
            Step::Rule { chain, rule } => json::add(json::rule(chain, rule)),
            Step::Dispatch { map, op, entries } => verb(
                *op,
                json::dispatch_elements(map, entries.iter().map(|(k, v)| (k, v))),
            ),
        }
    }
}

/// The steps as one nft transaction, in order.
pub fn to_commands(steps: &[Step]) -> Vec<Command> {
    steps.iter().map(Step::to_command).collect()
}

/// Whether every step is an element change that [`setelem`] can send over netlink.
pub fn elements_only(steps: &[Step]) -> bool {
    steps.iter().all(|s| match s {
        Step::Elements { kind, elements, .. } => {
            setelem::changes(*kind) && elements.iter().all(setelem::encodable)
        }
        _ => false,
    })
}

/// Whether the whole transaction can go over netlink: no set declared or deleted, and
/// every rule, element and interface name one that netlink encodes here.
pub fn netlink_only(steps: &[Step]) -> bool {
    steps.iter().all(|s| match s {
        Step::Nft(_) => false,
        Step::Elements { .. } => elements_only(std::slice::from_ref(s)),
        Step::Rule { rule, .. } => rules::encodable(rule),
        Step::Dispatch { entries, .. } => entries
            .iter()
            .all(|(ifname, _)| rules::encodable_ifname(ifname)),
        Step::Counter { .. } | Step::Chain { .. } => true,
    })
}

/// What it takes to go from one table to another.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing differs.
    Unchanged,
    /// A transaction that changes only what differs.
    Incremental(Vec<Step>),
    /// The change cannot be made in place (the base chains or a set's type differ, or a
    /// set outgrew the size it was created with).
    Full,
}

/// `desired` with the sizes its sets have in the kernel after `applied` was changed into
/// it incrementally: an existing set keeps the size it was created with.
pub fn carry_sizes(applied: &Ruleset, desired: &Ruleset) -> Ruleset {
    let mut out = desired.clone();
    for (name, set) in out.sets.iter_mut() {
        if let Some(old) = applied.sets.get(name) {
            set.size = old.size;
        }
    }
    out
}

/// Sorted-list difference: (only in `old`, only in `new`).
fn element_delta(old: &[SetElement], new: &[SetElement]) -> (Vec<SetElement>, Vec<SetElement>) {
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                removed.push(a.clone());
                i += 1;
            }
            (Some(_), Some(b)) => {
                added.push(b.clone());
                j += 1;
            }
            (Some(a), None) => {
                removed.push(a.clone());
                i += 1;
            }
            (None, Some(b)) => {
                added.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    (removed, added)
}

/// The keys of `a` that `b` lacks, in order: one walk of both sorted maps (a lookup per
/// key costs ~3 ms over two maps of 10,000 counters; the walk, a tenth of that).
fn keys_only_in<'a, V>(a: &'a BTreeMap<String, V>, b: &BTreeMap<String, V>) -> Vec<&'a String> {
    if std::ptr::eq(a, b) {
        // A render that changed no counter hands on the applied map itself.
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut others = b.keys().peekable();
    for key in a.keys() {
        while others.next_if(|other| *other < key).is_some() {}
        if others.peek() != Some(&key) {
            out.push(key);
        }
    }
    out
}

pub fn plan(applied: &Ruleset, desired: &Ruleset) -> Plan {
    if applied == desired {
        return Plan::Unchanged;
    }
    if applied.base_chains != desired.base_chains {
        return Plan::Full;
    }
    for (name, set) in &desired.sets {
        if let Some(old) = applied.sets.get(name) {
            let outgrown = old
                .size
                .is_some_and(|size| set.elements.len() > size as usize);
            if old.kind != set.kind || outgrown {
                return Plan::Full;
            }
        }
    }

    let mut steps: Vec<Step> = Vec::new();
    // Creations first: counters, sets and chains that rules and map elements will use.
    // The renderer tells which counters it added, when it only added: comparing two maps
    // of 10,000 names costs more than the rest of a pod's plan.
    let added_counters = desired.counters_added_to(applied);
    let (counters_added, counters_gone) = match added_counters {
        Some(names) => (names.iter().collect(), Vec::new()),
        None => (
            keys_only_in(&desired.counters, &applied.counters),
            keys_only_in(&applied.counters, &desired.counters),
        ),
    };
    for name in counters_added {
        steps.push(Step::Counter {
            name: name.clone(),
            op: Op::Add,
        });
    }
    // Maps whose elements name chains, and their element changes: once those chains exist.
    let mut chain_elements: Vec<Step> = Vec::new();
    for (name, set) in &desired.sets {
        let later = set.kind.names_chains();
        let out = if later {
            &mut chain_elements
        } else {
            &mut steps
        };
        match applied.sets.get(name) {
            None => {
                // A map after the chains too: nft 1.0.6 fails an element of an interval
                // map created in the same batch before the chain it names (ENOENT).
                out.push(Step::Nft(json::add_set(name, set.kind, set.size)));
                if !set.elements.is_empty() {
                    out.push(Step::Nft(json::add(json::elements(name, &set.elements))));
                }
            }
            // The same allocation: the group did not change (the usual case).
            Some(old) if Arc::ptr_eq(&old.elements, &set.elements) => {}
            Some(old) => {
                let (removed, added) = element_delta(&old.elements, &set.elements);
                for (op, elements) in [(Op::Delete, removed), (Op::Add, added)] {
                    if !elements.is_empty() {
                        out.push(Step::Elements {
                            set: name.clone(),
                            kind: set.kind,
                            op,
                            elements,
                        });
                    }
                }
            }
        }
    }
    for name in keys_only_in(&desired.chains, &applied.chains) {
        steps.push(Step::Chain {
            name: name.clone(),
            op: ChainOp::Add,
        });
    }
    steps.append(&mut chain_elements);

    // Dispatch entries (of the entry and the rest-dispatch maps) that go away or point
    // elsewhere stop steering traffic first.
    let mut to_add: Vec<(&'static str, &String, &String)> = Vec::new();
    for ((map, old, _), (_, new, _)) in applied
        .dispatch_maps()
        .into_iter()
        .zip(desired.dispatch_maps())
    {
        let stale: Vec<(String, String)> = old
            .iter()
            .filter(|(k, v)| new.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !stale.is_empty() {
            steps.push(Step::Dispatch {
                map,
                op: Op::Delete,
                entries: stale,
            });
        }
        to_add.extend(
            new.iter()
                .filter(|(k, v)| old.get(*k) != Some(*v))
                .map(|(k, v)| (map, k, v)),
        );
    }

    // Changed chains are flushed and refilled; gone chains flushed (dropping their
    // references) and deleted at the end.
    for (name, rules) in &desired.chains {
        match applied.chains.get(name) {
            Some(old) if old == rules => {}
            Some(_) => {
                steps.push(Step::Chain {
                    name: name.clone(),
                    op: ChainOp::Flush,
                });
                push_rules(&mut steps, name, rules);
            }
            None => push_rules(&mut steps, name, rules),
        }
    }
    let gone_chains = keys_only_in(&applied.chains, &desired.chains);
    for name in &gone_chains {
        steps.push(Step::Chain {
            name: (*name).clone(),
            op: ChainOp::Flush,
        });
    }

    // New elements once the chains they go to hold their rules.
    for map in DISPATCH_MAPS {
        let entries: Vec<(String, String)> = to_add
            .iter()
            .filter(|(m, _, _)| *m == map)
            .map(|(_, k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        if !entries.is_empty() {
            steps.push(Step::Dispatch {
                map,
                op: Op::Add,
                entries,
            });
        }
    }

    // Gone maps whose elements name chains, now that no rule refers to them (their rules
    // were refilled or flushed), before those chains.
    let gone_sets = keys_only_in(&applied.sets, &desired.sets);
    let (gone_maps, gone_sets): (Vec<&String>, Vec<&String>) = gone_sets
        .into_iter()
        .partition(|name| applied.sets[*name].kind.names_chains());
    for name in gone_maps {
        steps.push(Step::Nft(json::delete_set(name, applied.sets[name].kind)));
    }
    // Gone chains last: a chain that a rule or a map element refers to cannot be deleted,
    // and every reference to them is gone by now (stale elements deleted, referring
    // chains refilled or flushed).
    for name in gone_chains {
        steps.push(Step::Chain {
            name: name.clone(),
            op: ChainOp::Delete,
        });
    }
    for name in gone_sets {
        let kind = applied.sets[name].kind;
        steps.push(Step::Nft(json::delete_set(name, kind)));
    }
    for name in counters_gone {
        steps.push(Step::Counter {
            name: name.clone(),
            op: Op::Delete,
        });
    }
    if steps.is_empty() {
        // Only counter labels or set sizes changed: nothing for the kernel to do.
        return Plan::Unchanged;
    }
    Plan::Incremental(steps)
}

fn push_rules(steps: &mut Vec<Step>, chain: &str, rules: &[RuleDef]) {
    steps.extend(rules.iter().map(|r| Step::Rule {
        chain: chain.to_string(),
        rule: r.clone(),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{AddrRange, CounterMeta, End, IpFamily, Match, RuleDef, SetDef, Verdict};
    use serde_json::Value;

    fn addr(a: &str) -> SetElement {
        let ip = a.parse().unwrap();
        SetElement::Addr(AddrRange { lo: ip, hi: ip })
    }

    fn base() -> Ruleset {
        let mut rs = Ruleset::default();
        rs.counters_mut().insert(
            "r-1".into(),
            CounterMeta::Rule {
                id: "r-1".into(),
                origin: None,
            },
        );
        rs.sets.insert(
            "g-a_4".into(),
            SetDef {
                kind: SetKind::Addresses(IpFamily::V4),
                elements: vec![addr("10.0.0.1"), addr("10.0.0.3")].into(),
                size: None,
            },
        );
        rs.chains.insert(
            "egress/ns/a".into(),
            vec![RuleDef {
                matches: vec![],
                counter: Some("r-1".into()),
                verdict: Verdict::Return,
            }]
            .into(),
        );
        rs.egress_dispatch
            .insert("veth-a".into(), "egress/ns/a".into());
        rs
    }

    #[test]
    fn keys_only_in_walks_both_maps() {
        let map = |keys: &[&str]| -> BTreeMap<String, ()> {
            keys.iter().map(|k| (k.to_string(), ())).collect()
        };
        let only = |a: &[&str], b: &[&str]| -> Vec<String> {
            keys_only_in(&map(a), &map(b))
                .into_iter()
                .cloned()
                .collect()
        };
        assert_eq!(only(&["a", "c", "e"], &["b", "c", "d"]), ["a", "e"]);
        assert_eq!(only(&["b", "c", "d"], &["a", "c", "e"]), ["b", "d"]);
        assert_eq!(only(&["a", "b"], &[]), ["a", "b"]);
        assert!(only(&[], &["a"]).is_empty());
        assert!(only(&["a", "z"], &["a", "m", "z"]).is_empty());
        let same = map(&["x"]);
        assert!(keys_only_in(&same, &same).is_empty());
    }

    /// The commands as (verb, object kind, object name) for readable assertions.
    fn summary(cmds: &[Command]) -> Vec<String> {
        cmds.iter()
            .map(|c| {
                let (verb, body) = c.as_object().unwrap().iter().next().unwrap();
                let (kind, obj) = body.as_object().unwrap().iter().next().unwrap();
                let name = obj
                    .get("name")
                    .or_else(|| obj.get("chain"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                format!("{verb} {kind} {name}")
            })
            .collect()
    }

    #[test]
    fn identical_is_unchanged() {
        assert_eq!(plan(&base(), &base()), Plan::Unchanged);
    }

    /// `base` with group `g-a` as one prefix set of length `len` (network `net`), which
    /// the chain's rule matches through the mask.
    fn with_prefixes(len: u8, net: &str) -> Ruleset {
        let mut rs = base();
        rs.sets.clear();
        let name = format!("g-a_4/{len}");
        rs.sets.insert(
            name.clone(),
            SetDef {
                kind: SetKind::Prefixes(IpFamily::V4, len),
                elements: vec![addr(net)].into(),
                size: Some(64),
            },
        );
        rs.chains.insert(
            "egress/ns/a".into(),
            vec![RuleDef {
                matches: vec![Match::MaskedAddrInSet {
                    family: IpFamily::V4,
                    end: End::Destination,
                    len,
                    set: name,
                }],
                counter: Some("r-1".into()),
                verdict: Verdict::Return,
            }]
            .into(),
        );
        rs
    }

    #[test]
    fn prefix_length_change_creates_before_and_deletes_after_use() {
        let Plan::Incremental(steps) = plan(
            &with_prefixes(24, "10.0.1.0"),
            &with_prefixes(16, "10.0.0.0"),
        ) else {
            panic!("expected incremental")
        };
        assert_eq!(
            summary(&to_commands(&steps)),
            vec![
                "add set g-a_4/16",
                "add element g-a_4/16",
                "flush chain egress/ns/a",
                "add rule egress/ns/a",
                "delete set g-a_4/24",
            ]
        );
        // Networks of the same length change elements only, which netlink can carry.
        let Plan::Incremental(steps) = plan(
            &with_prefixes(24, "10.0.1.0"),
            &with_prefixes(24, "10.0.2.0"),
        ) else {
            panic!("expected incremental")
        };
        assert!(elements_only(&steps));
    }

    #[test]
    fn group_change_is_element_delta_only() {
        let mut new = base();
        new.sets.get_mut("g-a_4").unwrap().elements =
            vec![addr("10.0.0.1"), addr("10.0.0.9")].into();
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
        let cmds = to_commands(&cmds);
        assert_eq!(
            summary(&cmds),
            vec!["delete element g-a_4", "add element g-a_4"]
        );
        assert_eq!(
            cmds[0]["delete"]["element"]["elem"],
            serde_json::json!(["10.0.0.3"])
        );
        assert_eq!(
            cmds[1]["add"]["element"]["elem"],
            serde_json::json!(["10.0.0.9"])
        );
    }

    #[test]
    fn new_pod_adds_chain_rules_and_dispatch_in_order() {
        let mut new = base();
        new.counters_mut().insert(
            "spoof/ns/b".into(),
            CounterMeta::Spoofed {
                pod: palisade_policy::model::PodKey::new("ns", "b"),
            },
        );
        new.chains.insert(
            "egress/ns/b".into(),
            vec![RuleDef {
                matches: vec![],
                counter: Some("spoof/ns/b".into()),
                verdict: Verdict::Drop,
            }]
            .into(),
        );
        new.egress_dispatch
            .insert("veth-b".into(), "egress/ns/b".into());
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
        let cmds = to_commands(&cmds);
        assert_eq!(
            summary(&cmds),
            vec![
                "add counter spoof/ns/b",
                "add chain egress/ns/b",
                "add rule egress/ns/b",
                "add element egress_dispatch"
            ]
        );
    }

    #[test]
    fn removed_pod_unhooks_before_deleting() {
        let mut new = base();
        new.chains.clear();
        new.egress_dispatch.clear();
        new.counters_mut().clear();
        new.sets.clear();
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
        let cmds = to_commands(&cmds);
        assert_eq!(
            summary(&cmds),
            vec![
                "delete element egress_dispatch",
                "flush chain egress/ns/a",
                "delete chain egress/ns/a",
                "delete set g-a_4",
                "delete counter r-1"
            ]
        );
    }

    #[test]
    fn changed_chain_is_flushed_and_refilled() {
        let mut new = base();
        Arc::make_mut(new.chains.get_mut("egress/ns/a").unwrap())[0].verdict = Verdict::Drop;
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
        let cmds = to_commands(&cmds);
        assert_eq!(
            summary(&cmds),
            vec!["flush chain egress/ns/a", "add rule egress/ns/a"]
        );
    }

    #[test]
    fn moved_pod_repoints_dispatch() {
        let mut new = base();
        new.egress_dispatch.clear();
        new.egress_dispatch
            .insert("veth-z".into(), "egress/ns/a".into());
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
        let cmds = to_commands(&cmds);
        assert_eq!(
            summary(&cmds),
            vec![
                "delete element egress_dispatch",
                "add element egress_dispatch"
            ]
        );
        assert_eq!(cmds[0]["delete"]["element"]["elem"][0][0], "veth-a");
        assert_eq!(cmds[1]["add"]["element"]["elem"][0][0], "veth-z");
    }

    #[test]
    fn set_type_change_needs_full() {
        let mut new = base();
        new.sets.get_mut("g-a_4").unwrap().kind = SetKind::NamedPorts(IpFamily::V4);
        assert_eq!(plan(&base(), &new), Plan::Full);
    }

    fn with_hosts(elements: &[&str], size: u32) -> Ruleset {
        let mut rs = base();
        rs.sets.insert(
            "g-h_4".into(),
            SetDef {
                kind: SetKind::Hosts(IpFamily::V4),
                elements: elements.iter().map(|a| addr(a)).collect(),
                size: Some(size),
            },
        );
        rs
    }

    #[test]
    fn host_set_changes_alone_can_go_over_netlink() {
        let old = with_hosts(&["10.0.0.1", "10.0.0.2"], 4);
        let new = with_hosts(&["10.0.0.1", "10.0.0.5"], 4);
        let Plan::Incremental(steps) = plan(&old, &new) else {
            panic!("expected incremental")
        };
        assert!(elements_only(&steps));
        assert_eq!(
            summary(&to_commands(&steps)),
            vec!["delete element g-h_4", "add element g-h_4"]
        );
        // With an interval set's change in the same transaction, all of it goes to nft.
        let mut both = new.clone();
        both.sets.get_mut("g-a_4").unwrap().elements = vec![addr("10.0.0.1")].into();
        let Plan::Incremental(steps) = plan(&old, &both) else {
            panic!("expected incremental")
        };
        assert!(!elements_only(&steps));
    }

    #[test]
    fn a_set_that_outgrows_its_size_is_recreated() {
        let old = with_hosts(&["10.0.0.1"], 2);
        let fits = with_hosts(&["10.0.0.1", "10.0.0.2"], 64);
        assert!(matches!(plan(&old, &fits), Plan::Incremental(_)));
        let too_many = with_hosts(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 64);
        assert_eq!(plan(&old, &too_many), Plan::Full);
        // A different wanted size alone changes nothing, and the kernel's size stays.
        assert_eq!(plan(&old, &with_hosts(&["10.0.0.1"], 64)), Plan::Unchanged);
        assert_eq!(carry_sizes(&old, &fits).sets["g-h_4"].size, Some(2));
    }

    #[test]
    fn element_delta_is_exact() {
        let old = vec![addr("10.0.0.1"), addr("10.0.0.2"), addr("10.0.0.5")];
        let new = vec![addr("10.0.0.2"), addr("10.0.0.3"), addr("10.0.0.6")];
        let (removed, added) = element_delta(&old, &new);
        assert_eq!(removed, vec![addr("10.0.0.1"), addr("10.0.0.5")]);
        assert_eq!(added, vec![addr("10.0.0.3"), addr("10.0.0.6")]);
    }
}
