//! Issue 11: long shared tier lists render through address classes (pure; the kernel side
//! is in `shared_chains.rs`, packets in `random_dataplane.rs`, agreement with the
//! evaluator in `rendered_agreement.rs`).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use palisade_agent::render::{classes, IpFamily, SetElement, SetKind, Verdict};
use palisade_agent::{Interfaces, Renderer, Ruleset};
use palisade_policy::model::{Action, PodKey, Protocol};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance, TierList,
};
use palisade_policy::AddrSet;

fn group_id(i: usize) -> String {
    format!("g-{i:016x}")
}

/// One pod whose egress Admin list has `rules` instances, instance `i` allowing TCP port
/// `1000 + i` to group `i % groups`; group `g` holds `per_group` addresses
/// `10.1.g.(2k + 1)` (scattered: a range each).
fn node(rules: usize, groups: usize, per_group: usize) -> (NodeRuleSet, Interfaces) {
    let mut set = NodeRuleSet {
        node: "n1".into(),
        ..NodeRuleSet::default()
    };
    for g in 0..groups {
        let addrs = (0..per_group).map(|k| {
            let k = k as u32 * 2 + 1;
            IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + ((g as u32) << 16) + k))
        });
        set.groups.insert(
            group_id(g),
            Arc::new(Group::Hosts(AddrSet::from_addrs(addrs))),
        );
    }
    let list: Vec<RuleInstance> = (0..rules)
        .map(|i| RuleInstance {
            rule: format!("r-{i:016x}"),
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec![group_id(i % groups)]),
                ports: Some(vec![PortRange {
                    protocol: Protocol::Tcp,
                    start: 1000 + i as u16,
                    end: 1000 + i as u16,
                }]),
            }],
        })
        .collect();
    set.pods.push(PodRules {
        namespace: "ns".into(),
        name: "a".into(),
        ips: vec!["10.9.0.2".parse().unwrap()],
        ingress: Arc::new(DirectionRules::default()),
        egress: Arc::new(DirectionRules {
            admin: Arc::new(TierList::new(list)),
            ..DirectionRules::default()
        }),
        audit: Default::default(),
    });
    let mut interfaces = Interfaces::new();
    interfaces.insert(PodKey::new("ns", "a"), "veth-a".into());
    (set, interfaces)
}

fn class_maps(table: &Ruleset) -> Vec<(&String, usize)> {
    table
        .sets
        .iter()
        .filter(|(_, s)| s.kind.names_chains())
        .map(|(n, s)| (n, s.elements.len()))
        .collect()
}

/// `rules` with one more address (`10.1.0.200`) in group 0.
fn with_member(rules: &NodeRuleSet) -> NodeRuleSet {
    let mut rules = rules.clone();
    let Group::Hosts(set) = &*rules.groups[&group_id(0)] else {
        unreachable!()
    };
    let mut set = set.clone();
    set.push_addr("10.1.0.200".parse().unwrap());
    set.normalize();
    rules
        .groups
        .insert(group_id(0), Arc::new(Group::Hosts(set)));
    rules
}

#[test]
fn a_long_list_looks_its_peer_up_and_walks_only_its_class() {
    let (rules, interfaces) = node(40, 8, 3);
    let table = Renderer::default().render(&rules, &interfaces).unwrap();
    let maps = class_maps(&table);
    assert_eq!(maps.len(), 1, "one map, IPv4 only: {maps:?}");
    assert_eq!(maps[0].1, 8 * 3, "an element per scattered address");
    assert_eq!(
        table.sets[maps[0].0].kind,
        SetKind::ClassPrefixes(IpFamily::V4, 32),
        "24 single addresses: a hash map of /32s"
    );
    let list = rules.pods[0].egress.admin.id();
    let chain = &table.chains[&format!("admin-egress/{list}")];
    assert!(
        matches!(&chain[0].verdict, Verdict::ClassDispatch { map, prefix: None, .. } if map == maps[0].0),
        "the list's chain starts with the lookup, unmasked: {chain:?}"
    );
    // Each of the 8 classes holds the 5 instances of its group and the rest dispatch.
    let classes: Vec<_> = table
        .chains
        .iter()
        .filter(|(n, _)| n.contains("/c-"))
        .collect();
    assert_eq!(classes.len(), 8);
    for (name, rules) in classes {
        assert_eq!(rules.len(), 5 + 1, "{name}: {rules:?}");
        assert!(
            rules[..5].iter().all(|r| r.matches.len() == 2),
            "{name}: protocol and port only, no peer test"
        );
    }
    let short = node(classes::CLASSES_FROM - 1, 8, 3);
    let table = Renderer::default().render(&short.0, &short.1).unwrap();
    assert!(
        class_maps(&table).is_empty(),
        "a short list stays one chain"
    );
}

/// Interval map or hash maps per prefix length, by what a lookup costs: a binary search
/// over few pieces is cheaper than a masked lookup per length.
#[test]
fn a_map_is_split_by_prefix_length_only_where_that_takes_fewer_steps() {
    let kinds = |rules: &NodeRuleSet, interfaces: &Interfaces| -> Vec<SetKind> {
        let table = Renderer::default().render(rules, interfaces).unwrap();
        let mut kinds: Vec<SetKind> = table
            .sets
            .values()
            .filter(|s| s.kind.names_chains())
            .map(|s| s.kind)
            .collect();
        kinds.sort();
        kinds
    };
    let (rules, interfaces) = node(40, 2, 1);
    assert_eq!(
        kinds(&rules, &interfaces),
        vec![SetKind::Classes(IpFamily::V4)],
        "two pieces: one interval map"
    );
    // 8 groups of 3 scattered addresses and 8 /24s: a map of /32s and one of /24s, the
    // latter looked up through the mask.
    let (mut rules, interfaces) = node(40, 16, 3);
    for g in 8..16u8 {
        let net = format!("192.168.{g}.0/24").parse().unwrap();
        rules.groups.insert(
            group_id(usize::from(g)),
            Arc::new(Group::Addresses(AddrSet::from_block(&net, &[]))),
        );
    }
    assert_eq!(
        kinds(&rules, &interfaces),
        vec![
            SetKind::ClassPrefixes(IpFamily::V4, 24),
            SetKind::ClassPrefixes(IpFamily::V4, 32),
        ]
    );
    let table = Renderer::default().render(&rules, &interfaces).unwrap();
    let list = rules.pods[0].egress.admin.id();
    let chain = &table.chains[&format!("admin-egress/{list}")];
    let prefixes: Vec<Option<u8>> = chain
        .iter()
        .filter_map(|r| match &r.verdict {
            Verdict::ClassDispatch { prefix, .. } => Some(*prefix),
            _ => None,
        })
        .collect();
    assert_eq!(
        prefixes,
        vec![None, Some(24)],
        "/32s first, then the masked /24s"
    );
}

#[test]
fn a_member_changes_the_map_and_keeps_the_class_chains() {
    let (rules, interfaces) = node(40, 8, 3);
    let mut renderer = Renderer::default();
    let before = renderer.render(&rules, &interfaces).unwrap();
    let after = renderer.render(&with_member(&rules), &interfaces).unwrap();
    assert_eq!(before.chains, after.chains, "no chain changes");
    let (b, a) = (class_maps(&before), class_maps(&after));
    assert_eq!(b[0].1 + 1, a[0].1, "the map has the new member's interval");
    let added: Vec<&SetElement> = after.sets[a[0].0]
        .elements
        .iter()
        .filter(|e| !before.sets[b[0].0].elements.contains(e))
        .collect();
    assert!(
        matches!(added.as_slice(), [SetElement::Class { range, .. }] if range.lo == "10.1.0.200".parse::<IpAddr>().unwrap()),
        "{added:?}"
    );
    assert_eq!(
        after,
        palisade_agent::render(&with_member(&rules), &interfaces).unwrap(),
        "the cached render equals a fresh one"
    );
}

#[test]
fn lists_with_too_many_ranges_or_copies_stay_one_chain() {
    // 8 groups of scattered addresses, over the range limit together.
    let per_group = classes::MAX_RANGES / 8 + 1;
    let (rules, interfaces) = node(40, 8, per_group);
    let mut renderer = Renderer::default();
    let table = renderer.render(&rules, &interfaces).unwrap();
    assert!(class_maps(&table).is_empty());
    // A member changing does not render the list again: its chain stays the same
    // allocation.
    let list = format!("admin-egress/{}", rules.pods[0].egress.admin.id());
    let again = renderer.render(&with_member(&rules), &interfaces).unwrap();
    assert!(Arc::ptr_eq(&table.chains[&list], &again.chains[&list]));

    // Groups nested in 40 ways (group g holds the addresses of groups 0..=g): every
    // class holds most instances.
    let (mut rules, interfaces) = node(40, 40, 1);
    for g in 0..40 {
        let addrs = (0..=g).map(|h| IpAddr::V4(Ipv4Addr::from(0x0a01_0001 + ((h as u32) << 16))));
        rules.groups.insert(
            group_id(g),
            Arc::new(Group::Hosts(AddrSet::from_addrs(addrs))),
        );
    }
    let table = Renderer::default().render(&rules, &interfaces).unwrap();
    assert!(
        class_maps(&table).is_empty(),
        "40 classes of up to 40 instances exceed the copies"
    );
}
