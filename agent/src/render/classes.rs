//! Address classes of a shared tier list: the peer address space cut where the list's
//! peer groups begin and end, so that every piece (an interval) lies inside exactly the
//! same groups. A list with many rules renders as one interval verdict map per family,
//! each interval to the chain of its class: the rules whose peer groups hold the class,
//! in list order, without their peer test, plus those without a peer test. A new flow
//! then walks one lookup and the rules that can match its peer instead of every rule of
//! the list, and the first match is still the first of the list (the class chain keeps
//! the list's order).
//!
//! Pure: groups in, intervals and classes out.

use std::collections::BTreeMap;
use std::sync::Arc;

use palisade_policy::ruleset::{Clause, Group, NodeRuleSet, RuleInstance, TierList};

use super::model::IpFamily;

/// One interval of the address space of a family and the groups (indices into the input)
/// that hold all of it; sorted, disjoint, none with an empty signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub lo: u128,
    pub hi: u128,
    /// Index into [`Partition::signatures`].
    pub class: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Partition {
    pub pieces: Vec<Piece>,
    /// Each class's groups, sorted; classes sorted by signature.
    pub signatures: Vec<Vec<usize>>,
}

/// Cuts the address space of one family (`max`: its highest address) by the ranges of
/// `groups` (each sorted and disjoint, inclusive). Adjacent pieces of the same class are
/// merged.
pub fn partition(groups: &[&[(u128, u128)]], max: u128) -> Partition {
    // (point, group, starts): a group's range starts at `lo` and ends before `hi + 1`.
    let mut events: Vec<(u128, usize, bool)> = Vec::new();
    for (g, ranges) in groups.iter().enumerate() {
        for &(lo, hi) in ranges.iter() {
            let (lo, hi) = (lo.min(hi), hi.max(lo).min(max));
            events.push((lo, g, true));
            if hi < max {
                events.push((hi + 1, g, false));
            }
        }
    }
    events.sort_unstable();
    let mut active: BTreeMap<usize, u32> = BTreeMap::new();
    let mut raw: Vec<(u128, u128, Vec<usize>)> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let point = events[i].0;
        while i < events.len() && events[i].0 == point {
            let (_, g, starts) = events[i];
            let n = active.entry(g).or_insert(0);
            if starts {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    active.remove(&g);
                }
            }
            i += 1;
        }
        if active.is_empty() {
            continue;
        }
        let hi = events.get(i).map_or(max, |e| e.0 - 1);
        let signature: Vec<usize> = active.keys().copied().collect();
        match raw.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(point) && last.2 == signature => {
                last.1 = hi;
            }
            _ => raw.push((point, hi, signature)),
        }
    }
    let mut signatures: Vec<Vec<usize>> = raw.iter().map(|(_, _, s)| s.clone()).collect();
    signatures.sort();
    signatures.dedup();
    let pieces = raw
        .into_iter()
        .map(|(lo, hi, s)| Piece {
            lo,
            hi,
            class: signatures.binary_search(&s).unwrap_or_default(),
        })
        .collect();
    Partition { pieces, signatures }
}

/// Fewest rule instances with a peer test that make a shared list render through its
/// address classes: below, the list's one chain costs about what a lookup does.
pub const CLASSES_FROM: usize = 16;

/// The class chains of a list together hold at most this many copies of each of its
/// instances on average (plus [`SPARE_COPIES`]), or the list renders as one chain: peer
/// groups that overlap in many ways would multiply the table's rules.
const COPIES_PER_INSTANCE: usize = 4;
const SPARE_COPIES: usize = 64;

/// Most address ranges (both families, all its peer groups) a list's classes are cut
/// from: cutting costs time in their number at every change of one of the groups, and
/// groups of scattered pod addresses (a namespace of a large cluster) hold a range per
/// pod. Over it, the list renders as one chain.
pub const MAX_RANGES: usize = 16_384;

/// Most prefix lengths a list's class map may be split into by default: each is a rule
/// and a hash lookup for every new flow.
pub const MAX_MAP_LENGTHS: usize = 3;

/// Elements the prefix form of a class map may hold per piece of the partition (plus
/// [`SPARE_ELEMENTS`]), widening prefixes to fewer lengths: the interval map holds two
/// per piece.
const ELEMENTS_PER_PIECE: usize = 4;
const SPARE_ELEMENTS: usize = 64;

/// A family's pieces as prefixes of a few lengths, each with its class (as
/// [`Partition::signatures`]), per length: the class map as hash maps, one per length,
/// when that takes fewer lookups than the interval map's binary search. The kernel's
/// search takes `log2(2 × pieces)` steps (a start and an end element per piece), and a
/// hash lookup costs about two of them (a rule, a mask, a hash); so a map of a few
/// pieces stays one interval map,
/// and one of 1,000 pod addresses and 25 /24s becomes a map of /32s and one of /24s.
pub(super) fn prefix_maps(
    partition: &Partition,
    family: IpFamily,
    max_lengths: usize,
) -> Option<BTreeMap<u8, Vec<(u128, usize)>>> {
    let pieces = partition.pieces.len();
    let steps = usize::BITS - (2 * pieces).saturating_sub(1).leading_zeros();
    // Strictly fewer steps: 2 × lengths < steps.
    let affordable = (steps.saturating_sub(1) as usize / 2).min(max_lengths);
    if affordable == 0 {
        return None;
    }
    let ranges: Vec<(u128, u128, usize)> = partition
        .pieces
        .iter()
        .map(|p| (p.lo, p.hi, p.class))
        .collect();
    let budget = pieces
        .saturating_mul(ELEMENTS_PER_PIECE)
        .saturating_add(SPARE_ELEMENTS);
    super::prefixes::widened(&ranges, family.bits(), affordable, budget)
}

/// What a list with enough peer tests rendered from: while it holds, the render does.
#[derive(Clone, Debug)]
pub(super) enum Deps {
    /// Its peer groups as they were (none: an id the rule set lacks).
    Groups(Vec<(String, Option<Arc<Group>>)>),
    /// Its peer groups, which spelled more than [`MAX_RANGES`] ranges: one chain, which
    /// holds while they still do, whatever their members.
    TooManyRanges(Vec<String>),
}

impl Deps {
    pub fn hold(&self, rules: &NodeRuleSet) -> bool {
        match self {
            Deps::Groups(groups) => {
                groups
                    .iter()
                    .all(|(id, was)| match (was, rules.groups.get(id.as_str())) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                        _ => false,
                    })
            }
            Deps::TooManyRanges(ids) => range_count(rules, ids.iter()) > MAX_RANGES,
        }
    }
}

/// The number of address ranges of the groups `ids` names, over both families.
fn range_count<'a>(rules: &NodeRuleSet, ids: impl Iterator<Item = &'a String>) -> usize {
    ids.filter_map(|id| rules.groups.get(id.as_str()))
        .map(|g| match &**g {
            Group::Addresses(set) | Group::Hosts(set) => set.v4.len() + set.v6.len(),
            Group::NamedPorts(endpoints) => endpoints.len(),
        })
        .fold(0, usize::saturating_add)
}

/// Which instances of a list a class chain holds, per family.
pub(super) struct Plan {
    /// The peer groups' ids, sorted: signatures index them.
    pub ids: Vec<String>,
    pub deps: Deps,
    /// `None`: too many ranges or copies; one chain.
    pub families: Option<Vec<FamilyPlan>>,
}

pub(super) struct FamilyPlan {
    pub family: IpFamily,
    pub partition: Partition,
    /// Per class (as `partition.signatures`), the indices of the instances its chain holds.
    pub instances: Vec<Vec<usize>>,
}

/// The ids of the groups an instance's clauses test the peer against: peer groups, and
/// the groups of named ports (whose endpoints' addresses the peer must have).
fn peer_ids(inst: &RuleInstance) -> impl Iterator<Item = &String> {
    inst.clauses.iter().flat_map(|c| match c {
        Clause::PeerPort {
            peers: Some(ids), ..
        } => ids.as_slice(),
        Clause::PeerPort { peers: None, .. } => &[],
        Clause::NamedPort { group } => std::slice::from_ref(group),
    })
}

/// Whether an instance can match a peer in none of its groups: a clause without a peer
/// test.
fn matches_any_peer(inst: &RuleInstance) -> bool {
    inst.clauses
        .iter()
        .any(|c| matches!(c, Clause::PeerPort { peers: None, .. }))
}

/// The addresses of a group, per family, as sorted disjoint ranges: for a named-port
/// group, its endpoints' addresses.
fn ranges(group: &Group, family: IpFamily) -> Vec<(u128, u128)> {
    match group {
        Group::Addresses(set) | Group::Hosts(set) => match family {
            IpFamily::V4 => set
                .v4
                .iter()
                .map(|&(lo, hi)| (u128::from(lo), u128::from(hi)))
                .collect(),
            IpFamily::V6 => set.v6.clone(),
        },
        Group::NamedPorts(endpoints) => {
            let mut addrs: Vec<u128> = endpoints
                .iter()
                .filter(|e| IpFamily::of(&e.addr) == family)
                .map(|e| match e.addr {
                    std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
                    std::net::IpAddr::V6(a) => u128::from(a),
                })
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            addrs.into_iter().map(|a| (a, a)).collect()
        }
    }
}

pub(super) fn plan(rules: &NodeRuleSet, list: &TierList, classes_from: usize) -> Option<Plan> {
    let with_peers = list.iter().filter(|i| peer_ids(i).next().is_some()).count();
    if with_peers < classes_from.max(1) {
        return None;
    }
    let mut ids: Vec<&String> = list.iter().flat_map(peer_ids).collect();
    ids.sort();
    ids.dedup();
    let owned: Vec<String> = ids.iter().map(|id| (*id).clone()).collect();
    if range_count(rules, ids.iter().copied()) > MAX_RANGES {
        return Some(Plan {
            deps: Deps::TooManyRanges(owned.clone()),
            ids: owned,
            families: None,
        });
    }
    let deps: Vec<(String, Option<Arc<Group>>)> = ids
        .iter()
        .map(|id| ((*id).clone(), rules.groups.get(id.as_str()).cloned()))
        .collect();
    let index: BTreeMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    // Group → the instances naming it; and the instances every class holds.
    let mut naming: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
    let mut always = Vec::new();
    for (i, inst) in list.iter().enumerate() {
        let mut mine: Vec<usize> = peer_ids(inst)
            .filter_map(|id| index.get(id.as_str()).copied())
            .collect();
        mine.sort_unstable();
        mine.dedup();
        for g in mine {
            naming[g].push(i);
        }
        if matches_any_peer(inst) {
            always.push(i);
        }
    }
    let budget = list.len() * COPIES_PER_INSTANCE + SPARE_COPIES;
    let mut copies = 0usize;
    let mut families = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let max = if family == IpFamily::V4 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        let group_ranges: Vec<Vec<(u128, u128)>> = deps
            .iter()
            .map(|(_, g)| g.as_ref().map_or_else(Vec::new, |g| ranges(g, family)))
            .collect();
        let refs: Vec<&[(u128, u128)]> = group_ranges.iter().map(Vec::as_slice).collect();
        let partition = partition(&refs, max);
        let mut instances = Vec::with_capacity(partition.signatures.len());
        for signature in &partition.signatures {
            let mut held: Vec<usize> = signature
                .iter()
                .flat_map(|&g| naming[g].iter().copied())
                .chain(always.iter().copied())
                .collect();
            held.sort_unstable();
            held.dedup();
            copies += held.len();
            if copies > budget {
                return Some(Plan {
                    ids: owned,
                    deps: Deps::Groups(deps),
                    families: None,
                });
            }
            instances.push(held);
        }
        if !partition.pieces.is_empty() {
            families.push(FamilyPlan {
                family,
                partition,
                instances,
            });
        }
    }
    Some(Plan {
        ids: owned,
        deps: Deps::Groups(deps),
        families: Some(families),
    })
}

/// `inst` as it stands in a class chain: a clause naming peers matches without a peer
/// test if one of its groups `holds` the class, and is left out if none does; a named
/// port's clause keeps its test (the port) if its group holds the class, else is left out.
pub(super) fn for_class(inst: &RuleInstance, holds: impl Fn(&str) -> bool) -> RuleInstance {
    RuleInstance {
        rule: inst.rule.clone(),
        action: inst.action,
        clauses: inst
            .clauses
            .iter()
            .filter_map(|c| match c {
                Clause::PeerPort {
                    peers: Some(ids),
                    ports,
                } => ids.iter().any(|id| holds(id)).then(|| Clause::PeerPort {
                    peers: None,
                    ports: ports.clone(),
                }),
                Clause::NamedPort { group } => holds(group).then(|| c.clone()),
                other => Some(other.clone()),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overlapping_groups_cut_into_pieces_of_one_signature() {
        // a: 10-20, b: 15-30 and 40-40, c: 0-255 (everything).
        let a = [(10, 20)];
        let b = [(15, 30), (40, 40)];
        let p = partition(&[&a, &b], 255);
        let shown: Vec<(u128, u128, Vec<usize>)> = p
            .pieces
            .iter()
            .map(|x| (x.lo, x.hi, p.signatures[x.class].clone()))
            .collect();
        assert_eq!(
            shown,
            vec![
                (10, 14, vec![0]),
                (15, 20, vec![0, 1]),
                (21, 30, vec![1]),
                (40, 40, vec![1]),
            ]
        );
        assert_eq!(p.signatures, vec![vec![0], vec![0, 1], vec![1]]);
        let all = [(0, 255)];
        let p = partition(&[&all, &a], 255);
        assert_eq!(p.pieces.len(), 3);
        assert_eq!(
            p.pieces[2].hi, 255,
            "a range to the family's end stays open"
        );
    }

    #[test]
    fn adjacent_ranges_of_one_class_merge() {
        let a = [(0, 9)];
        let b = [(10, 19)];
        let ab = [(0, 19)];
        let p = partition(&[&a, &b, &ab], 100);
        assert_eq!(p.pieces.len(), 2);
        let p = partition(&[&a, &a], 100);
        assert_eq!(
            p.pieces,
            vec![Piece {
                lo: 0,
                hi: 9,
                class: 0
            }]
        );
    }

    fn ranges() -> impl Strategy<Value = Vec<(u128, u128)>> {
        prop::collection::vec((0u128..64, 0u128..8), 0..4).prop_map(|v| {
            // Sorted and disjoint, as address sets are.
            let mut out: Vec<(u128, u128)> = Vec::new();
            let mut at = 0;
            for (gap, len) in v {
                let lo = at + gap;
                let hi = (lo + len).min(63);
                if lo > 63 {
                    break;
                }
                out.push((lo, hi));
                at = hi + 2;
            }
            out
        })
    }

    proptest! {
        /// Every address is in the piece whose signature is exactly the groups holding it,
        /// or in none when no group holds it.
        #[test]
        fn each_address_lies_in_its_groups_class(groups in prop::collection::vec(ranges(), 0..5)) {
            let refs: Vec<&[(u128, u128)]> = groups.iter().map(Vec::as_slice).collect();
            let p = partition(&refs, 63);
            for w in p.pieces.windows(2) {
                prop_assert!(w[0].hi < w[1].lo);
                prop_assert!(
                    w[0].hi + 1 < w[1].lo || w[0].class != w[1].class,
                    "adjacent pieces of one class are merged"
                );
            }
            for addr in 0..=63u128 {
                let holding: Vec<usize> = (0..groups.len())
                    .filter(|&g| groups[g].iter().any(|&(lo, hi)| lo <= addr && addr <= hi))
                    .collect();
                let piece = p.pieces.iter().find(|x| x.lo <= addr && addr <= x.hi);
                match piece {
                    None => prop_assert!(holding.is_empty(), "{addr} is in {holding:?}"),
                    Some(x) => prop_assert_eq!(&p.signatures[x.class], &holding),
                }
            }
        }
    }
}
