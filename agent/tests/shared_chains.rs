//! Issue 11: tier lists render as shared chains, once per node, and incremental applies
//! create and delete them as pods come to use them and stop.
//!
//! * Pure: a sequence of rule sets in which pods pick Admin and Baseline lists from a
//!   small pool (shared lists appearing and disappearing, pods coming and going, isolation
//!   changing) renders through one `Renderer` exactly as a fresh render does, and each
//!   list in use is one chain whatever the number of pods using it.
//! * Root (its own network namespace): the same sequence applied incrementally by one
//!   `Applier` — each step one incremental transaction, which the kernel accepts only if
//!   a shared chain is created before and deleted after its references — leaves the
//!   table a fresh agent adopts as identical to what a full load of that step gives
//!   (compared through the scratch table, `ApplyKind::Adopted`).

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use palisade_agent::{render, Applier, ApplyKind, Interfaces, Nft, Renderer};
use palisade_policy::model::{Action, PodKey, PolicyId, PolicyKind, Protocol};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance, TierList,
};
use palisade_policy::AddrSet;

const HOSTS: &str = "g-00000000000hosts";
const BLOCK: &str = "g-00000000000block";

fn instance(rule: &str, action: Action, group: Option<&str>, tcp: Option<u16>) -> RuleInstance {
    RuleInstance {
        rule: rule.into(),
        action,
        clauses: vec![Clause::PeerPort {
            peers: group.map(|g| vec![g.to_string()]),
            ports: tcp.map(|p| {
                vec![PortRange {
                    protocol: Protocol::Tcp,
                    start: p,
                    end: p,
                }]
            }),
        }],
    }
}

/// The pool: index 0 is the empty list.
fn admin_lists() -> Vec<Arc<TierList>> {
    vec![
        TierList::empty(),
        Arc::new(TierList::new(vec![
            instance("r-0000000000000a11", Action::Deny, Some(BLOCK), Some(22)),
            instance("r-0000000000000a12", Action::Pass, Some(HOSTS), None),
            instance("r-0000000000000a13", Action::Allow, None, Some(53)),
        ])),
        Arc::new(TierList::new(vec![instance(
            "r-0000000000000a21",
            Action::Allow,
            Some(HOSTS),
            Some(80),
        )])),
    ]
}

fn baseline_lists() -> Vec<Arc<TierList>> {
    vec![
        TierList::empty(),
        Arc::new(TierList::new(vec![
            instance("r-0000000000000b11", Action::Deny, Some(BLOCK), None),
            instance("r-0000000000000b12", Action::Allow, Some(HOSTS), None),
        ])),
        Arc::new(TierList::new(vec![instance(
            "r-0000000000000b21",
            Action::Pass,
            Some(HOSTS),
            Some(443),
        )])),
    ]
}

/// A small deterministic generator (no dependency on test order or a crate's streams).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

const PODS: usize = 4;

fn key(i: usize) -> PodKey {
    PodKey::new("ns", format!("p{i}"))
}

/// Step `step` of the sequence: which pods exist and which lists each direction uses.
fn state(rng: &mut Lcg) -> (NodeRuleSet, Interfaces) {
    let (admin, baseline) = (admin_lists(), baseline_lists());
    let mut rules = NodeRuleSet {
        node: "n1".into(),
        ..NodeRuleSet::default()
    };
    // Members come and go too: a class map's elements change with them.
    let members = ["10.9.0.2", "10.9.0.3", "10.200.1.1", "10.9.0.9"];
    let keep = rng.below(members.len()) + 1;
    rules.groups.insert(
        HOSTS.into(),
        Arc::new(Group::Hosts(AddrSet::from_addrs(
            members[..keep].iter().map(|a| a.parse::<IpAddr>().unwrap()),
        ))),
    );
    rules.groups.insert(
        BLOCK.into(),
        Arc::new(Group::Addresses(AddrSet::from_block(
            &"10.200.0.0/16".parse().unwrap(),
            &[],
        ))),
    );
    let mut interfaces = Interfaces::new();
    for i in 0..PODS {
        if rng.below(4) == 0 {
            continue;
        }
        let direction = |rng: &mut Lcg| {
            let isolated = rng.below(3) == 0;
            Arc::new(DirectionRules {
                admin: admin[rng.below(admin.len())].clone(),
                isolated_by: if isolated {
                    vec![PolicyId {
                        kind: PolicyKind::NetworkPolicy,
                        namespace: Some("ns".into()),
                        name: "iso".into(),
                    }]
                } else {
                    vec![]
                },
                network_policy: if isolated {
                    vec![instance(
                        "r-00000000000000c1",
                        Action::Allow,
                        Some(HOSTS),
                        Some(8080),
                    )]
                } else {
                    vec![]
                },
                baseline: baseline[rng.below(baseline.len())].clone(),
            })
        };
        let (ingress, egress) = (direction(rng), direction(rng));
        rules.pods.push(PodRules {
            namespace: "ns".into(),
            name: format!("p{i}"),
            ips: vec![format!("10.9.0.{}", i + 2).parse().unwrap()],
            ingress,
            egress,
            audit: Default::default(),
        });
        interfaces.insert(key(i), format!("scv-p{i}"));
    }
    (rules, interfaces)
}

const STEPS: usize = 24;

/// A network namespace of the test's own, deleted on drop (also when the test fails).
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        common::sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// The tier chains the rendered table holds, and the distinct non-empty lists the pods
/// use (by chain name).
fn tier_chains(table: &palisade_agent::Ruleset) -> BTreeSet<String> {
    table
        .chains
        .keys()
        .filter(|c| c.starts_with("admin-") || c.starts_with("baseline-"))
        .filter(|c| !c.contains("/c-"))
        .cloned()
        .collect()
}

fn lists_in_use(rules: &NodeRuleSet) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for pod in &rules.pods {
        for (dir, d) in [("egress", &pod.egress), ("ingress", &pod.ingress)] {
            if !d.admin.is_empty() {
                out.insert(format!("admin-{dir}/{}", d.admin.id()));
            }
            if d.isolated_by.is_empty() && !d.baseline.is_empty() {
                out.insert(format!("baseline-{dir}/{}", d.baseline.id()));
            }
        }
    }
    out
}

#[test]
fn shared_lists_render_once_and_the_cache_renders_as_fresh() {
    cache_renders_as_fresh(usize::MAX);
}

/// As above with every shared list through its address classes, whose chains a render
/// after a change of members takes from the render before.
#[test]
fn class_chains_cached_render_as_fresh() {
    cache_renders_as_fresh(1);
}

fn cache_renders_as_fresh(classes_from: usize) {
    let mut rng = Lcg(11);
    let mut renderer = Renderer::default();
    renderer.set_classes_from(classes_from);
    let fresh_renderer = || {
        let mut r = Renderer::default();
        r.set_classes_from(classes_from);
        r
    };
    let mut shared_seen = false;
    for step in 0..STEPS {
        let (rules, interfaces) = state(&mut rng);
        let cached = renderer.render(&rules, &interfaces).unwrap();
        let fresh = fresh_renderer().render(&rules, &interfaces).unwrap();
        assert_eq!(cached, fresh, "step {step}: the cached render differs");
        assert_eq!(
            tier_chains(&fresh),
            lists_in_use(&rules),
            "step {step}: one chain per list in use"
        );
        // No pod chain holds a tier rule: every rule counter in a pod's own chains is
        // the NetworkPolicy rule's.
        for (name, chain) in &fresh.chains {
            if name.starts_with("egress") || name.starts_with("ingress") {
                for rule in chain.iter() {
                    if let Some(c) = rule.counter.as_deref().filter(|c| c.starts_with("r-")) {
                        assert_eq!(c, "r-00000000000000c1", "step {step}: {name} has {c}");
                    }
                }
            }
        }
        let users = |list: &Arc<TierList>| {
            rules
                .pods
                .iter()
                .filter(|p| Arc::ptr_eq(&p.egress.admin, list))
                .count()
        };
        shared_seen |= admin_lists()[1..].iter().any(|l| users(l) >= 2)
            || rules
                .pods
                .iter()
                .filter(|p| !p.egress.admin.is_empty())
                .map(|p| p.egress.admin.id())
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0] == w[1]);
    }
    assert!(shared_seen, "the sequence has a list used by two pods");
}

#[test]
fn incremental_applies_of_shared_chains_equal_a_full_load() {
    incremental_applies_equal_a_full_load("plain", usize::MAX);
}

/// As above with every shared list rendered through its address classes: class maps and
/// chains come and go, and the maps' elements change with the hosts group's members.
#[test]
fn incremental_applies_of_class_maps_equal_a_full_load() {
    incremental_applies_equal_a_full_load("classes", 1);
}

fn incremental_applies_equal_a_full_load(variant: &str, classes_from: usize) {
    if !common::can_run(&[common::ROOT, common::IP, common::NFT]) {
        return;
    }
    let netns = Netns::new(format!("pal-shared-{variant}-{}", std::process::id()));
    let nft = Nft::in_netns(&netns.0);
    let mut rng = Lcg(11);
    let mut renderer = Renderer::default();
    renderer.set_classes_from(classes_from);
    let mut class_maps = BTreeSet::new();
    let mut netlink_steps = 0;
    let mut applier = Applier::new(nft.clone());
    let (mut created, mut deleted) = (0usize, 0usize);
    let mut before = BTreeSet::new();
    for step in 0..STEPS {
        let (rules, interfaces) = state(&mut rng);
        let desired = renderer.render(&rules, &interfaces).unwrap();
        let outcome = applier
            .apply(&desired)
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        let expected = if step == 0 {
            ApplyKind::Full
        } else {
            ApplyKind::Incremental
        };
        if outcome.kind != ApplyKind::Unchanged {
            assert_eq!(outcome.kind, expected, "step {step}");
        }
        class_maps.extend(
            desired
                .sets
                .iter()
                .filter(|(_, s)| s.kind.names_chains())
                .map(|(name, s)| (name.clone(), s.elements.clone())),
        );
        let now = tier_chains(&desired);
        created += now.difference(&before).count();
        deleted += before.difference(&now).count();
        before = now;
        // A fresh agent compares the kernel's table with a full load of these rules.
        let adopted = Applier::new(nft.clone()).apply(&desired).unwrap();
        assert_eq!(
            adopted.kind,
            ApplyKind::Adopted,
            "step {step}: the incrementally changed table differs from a full load"
        );
        if classes_from == 1 {
            // Members alone change: set and class-map elements, over netlink.
            let mut more = rules.clone();
            let hosts = match &*more.groups[HOSTS] {
                Group::Hosts(set) => set.clone(),
                _ => unreachable!(),
            };
            let mut hosts = hosts;
            hosts.push_addr(format!("10.9.0.{}", 4 + step % 3).parse().unwrap());
            hosts.normalize();
            more.groups
                .insert(HOSTS.into(), Arc::new(Group::Hosts(hosts)));
            let maps = |table: &render::Ruleset| -> Vec<(String, render::SetKind)> {
                table
                    .sets
                    .iter()
                    .filter(|(_, s)| s.kind.names_chains())
                    .map(|(n, s)| (n.clone(), s.kind))
                    .collect()
            };
            let maps_before = maps(&desired);
            let desired = renderer.render(&more, &interfaces).unwrap();
            let outcome = applier.apply(&desired).unwrap();
            // A map of a few pieces can turn into maps per prefix length or back (a
            // declaration, through nft); otherwise only elements change.
            if outcome.kind != ApplyKind::Unchanged && maps(&desired) == maps_before {
                assert_eq!(outcome.kind, ApplyKind::Incremental, "step {step}");
                let phases: Vec<&str> = outcome.phases.iter().map(|(p, _)| *p).collect();
                assert_eq!(
                    phases,
                    [
                        palisade_agent::apply::phase::NETLINK_ELEMENTS,
                        palisade_agent::apply::phase::READ_BACK
                    ],
                    "step {step}: members alone go over netlink"
                );
                netlink_steps += 1;
            }
            let adopted = Applier::new(nft.clone()).apply(&desired).unwrap();
            assert_eq!(
                adopted.kind,
                ApplyKind::Adopted,
                "step {step}: class maps changed over netlink differ from a full load"
            );
        }
    }
    assert!(
        created > 2 && deleted > 0,
        "the sequence creates and deletes shared chains ({created} created, {deleted} deleted)"
    );
    if classes_from == 1 {
        let names: BTreeSet<&String> = class_maps.iter().map(|(n, _)| n).collect();
        assert!(
            names.len() >= 2 && class_maps.len() > names.len(),
            "class maps exist and their elements change: {class_maps:?}"
        );
        assert!(netlink_steps > STEPS / 2, "{netlink_steps} netlink steps");
        assert!(
            names.iter().any(|n| n.ends_with("classes_4"))
                && names.iter().any(|n| n.contains("classes_4/")),
            "interval maps and maps per prefix length: {names:?}"
        );
    }
}
