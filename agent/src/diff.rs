//! Planning one incremental transaction from the applied table to the desired one: set
//! elements added and removed, changed chains flushed and refilled, dispatch elements for
//! new and gone pods, objects created before and deleted after their users.

use std::collections::BTreeMap;

use palisade_policy::model::Direction;

use crate::render::json::{self, Command};
use crate::render::{Ruleset, SetElement};

/// What it takes to go from one table to another.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing differs.
    Unchanged,
    /// A transaction that changes only what differs.
    Incremental(Vec<Command>),
    /// The change cannot be made in place (the base chains or a set's type differ).
    Full,
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

fn keys_only_in<'a, V>(a: &'a BTreeMap<String, V>, b: &BTreeMap<String, V>) -> Vec<&'a String> {
    a.keys().filter(|k| !b.contains_key(*k)).collect()
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
            if old.kind != set.kind {
                return Plan::Full;
            }
        }
    }

    let mut cmds = Vec::new();
    // Creations first: counters, sets and chains that rules and map elements will use.
    for name in keys_only_in(&desired.counters, &applied.counters) {
        cmds.push(json::add(json::counter(name)));
    }
    for (name, set) in &desired.sets {
        match applied.sets.get(name) {
            None => {
                cmds.push(json::add(json::set(name, set.kind)));
                if !set.elements.is_empty() {
                    cmds.push(json::add(json::elements(name, &set.elements)));
                }
            }
            Some(old) => {
                let (removed, added) = element_delta(&old.elements, &set.elements);
                if !removed.is_empty() {
                    cmds.push(json::delete(json::elements(name, &removed)));
                }
                if !added.is_empty() {
                    cmds.push(json::add(json::elements(name, &added)));
                }
            }
        }
    }
    for name in keys_only_in(&desired.chains, &applied.chains) {
        cmds.push(json::add(json::chain(name)));
    }

    // Dispatch entries that go away or point elsewhere stop steering traffic first.
    let mut to_add: Vec<(Direction, &String, &String)> = Vec::new();
    for direction in [Direction::Egress, Direction::Ingress] {
        let (old, new) = (applied.dispatch(direction), desired.dispatch(direction));
        let map = json::dispatch_map_name(direction);
        let stale: Vec<(&String, &String)> = old
            .iter()
            .filter(|(k, v)| new.get(*k) != Some(*v))
            .collect();
        if !stale.is_empty() {
            cmds.push(json::delete(json::dispatch_elements(map, stale)));
        }
        to_add.extend(
            new.iter()
                .filter(|(k, v)| old.get(*k) != Some(*v))
                .map(|(k, v)| (direction, k, v)),
        );
    }

    // Changed chains are flushed and refilled; gone chains flushed (dropping their
    // references) and deleted at the end.
    for (name, rules) in &desired.chains {
        match applied.chains.get(name) {
            Some(old) if old == rules => {}
            Some(_) => {
                cmds.push(json::flush_chain(name));
                cmds.extend(rules.iter().map(|r| json::add(json::rule(name, r))));
            }
            None => cmds.extend(rules.iter().map(|r| json::add(json::rule(name, r)))),
        }
    }
    let gone_chains = keys_only_in(&applied.chains, &desired.chains);
    for name in &gone_chains {
        cmds.push(json::flush_chain(name));
    }

    for direction in [Direction::Egress, Direction::Ingress] {
        let entries: Vec<(&String, &String)> = to_add
            .iter()
            .filter(|(d, _, _)| *d == direction)
            .map(|(_, k, v)| (*k, *v))
            .collect();
        if !entries.is_empty() {
            cmds.push(json::add(json::dispatch_elements(
                json::dispatch_map_name(direction),
                entries,
            )));
        }
    }

    for name in gone_chains {
        cmds.push(json::delete(json::chain(name)));
    }
    for name in keys_only_in(&applied.sets, &desired.sets) {
        let kind = applied.sets[name].kind;
        cmds.push(json::delete(json::set(name, kind)));
    }
    for name in keys_only_in(&applied.counters, &desired.counters) {
        cmds.push(json::delete(json::counter(name)));
    }
    if cmds.is_empty() {
        // Only counter labels changed (a rule's origin): nothing for the kernel to do.
        return Plan::Unchanged;
    }
    Plan::Incremental(cmds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{AddrRange, CounterMeta, IpFamily, RuleDef, SetDef, SetKind, Verdict};
    use serde_json::Value;

    fn addr(a: &str) -> SetElement {
        let ip = a.parse().unwrap();
        SetElement::Addr(AddrRange { lo: ip, hi: ip })
    }

    fn base() -> Ruleset {
        let mut rs = Ruleset::default();
        rs.counters.insert(
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
                elements: vec![addr("10.0.0.1"), addr("10.0.0.3")],
            },
        );
        rs.chains.insert(
            "egress/ns/a".into(),
            vec![RuleDef {
                matches: vec![],
                counter: Some("r-1".into()),
                verdict: Verdict::Return,
            }],
        );
        rs.egress_dispatch
            .insert("veth-a".into(), "egress/ns/a".into());
        rs
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

    #[test]
    fn group_change_is_element_delta_only() {
        let mut new = base();
        new.sets.get_mut("g-a_4").unwrap().elements = vec![addr("10.0.0.1"), addr("10.0.0.9")];
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
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
        new.counters.insert(
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
            }],
        );
        new.egress_dispatch
            .insert("veth-b".into(), "egress/ns/b".into());
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
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
        new.counters.clear();
        new.sets.clear();
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
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
        new.chains.get_mut("egress/ns/a").unwrap()[0].verdict = Verdict::Drop;
        let Plan::Incremental(cmds) = plan(&base(), &new) else {
            panic!("expected incremental")
        };
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

    #[test]
    fn element_delta_is_exact() {
        let old = vec![addr("10.0.0.1"), addr("10.0.0.2"), addr("10.0.0.5")];
        let new = vec![addr("10.0.0.2"), addr("10.0.0.3"), addr("10.0.0.6")];
        let (removed, added) = element_delta(&old, &new);
        assert_eq!(removed, vec![addr("10.0.0.1"), addr("10.0.0.5")]);
        assert_eq!(added, vec![addr("10.0.0.3"), addr("10.0.0.6")]);
    }
}
