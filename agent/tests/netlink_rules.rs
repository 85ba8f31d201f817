//! Issue 11: a first load's rules and incremental transactions of chains, rules,
//! counters and dispatch elements go over netlink, and the rules they write are the rules
//! nft writes for the same text.
//!
//! Root, in a network namespace of its own: a table holding every kind of match, verdict
//! and list the renderer emits is loaded, emptied, filled again and changed; each change
//! must be one netlink transaction, and after each a fresh agent must find the table
//! identical to a full nft load of the same rules (`ApplyKind::Adopted`, compared through
//! the scratch table, byte for byte as the kernel dumps it), and reconcile must find it in
//! sync.

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::{can_run, Netns, IP, NFT, ROOT};
use palisade_agent::apply::phase;
use palisade_agent::render::{
    self, AddrRange, CounterMeta, End, IpFamily, Match, RuleDef, SetDef, SetElement, SetKind,
    Verdict,
};
use palisade_agent::{Applier, ApplyKind, Interfaces, Nft, ReconcileOutcome, Ruleset};
use palisade_policy::model::Direction;
use palisade_policy::model::Protocol::{self, Tcp, Udp};
use palisade_policy::ruleset::NodeRuleSet;

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

fn host(a: &str) -> SetElement {
    SetElement::Addr(AddrRange {
        lo: ip(a),
        hi: ip(a),
    })
}

fn range(lo: &str, hi: &str) -> AddrRange {
    AddrRange {
        lo: ip(lo),
        hi: ip(hi),
    }
}

fn set(kind: SetKind, elements: Vec<SetElement>, size: Option<u32>) -> SetDef {
    SetDef {
        kind,
        elements: elements.into(),
        size,
    }
}

fn rule(matches: Vec<Match>, counter: Option<&str>, verdict: Verdict) -> RuleDef {
    RuleDef {
        matches,
        counter: counter.map(str::to_string),
        verdict,
    }
}

/// The empty node's table (base chains, dispatch maps) with sets of every kind, and the
/// chains class maps go to.
fn base() -> Ruleset {
    let mut rs = render::render(&NodeRuleSet::default(), &Interfaces::default()).unwrap();
    let v4 = IpFamily::V4;
    let v6 = IpFamily::V6;
    rs.sets.insert(
        "h_4".into(),
        set(SetKind::Hosts(v4), vec![host("10.1.0.1")], Some(64)),
    );
    rs.sets.insert(
        "a_6".into(),
        set(
            SetKind::Addresses(v6),
            vec![SetElement::Addr(range("fd00::", "fd00::ffff"))],
            None,
        ),
    );
    rs.sets.insert(
        "p24_4".into(),
        set(SetKind::Prefixes(v4, 24), vec![host("10.2.0.0")], Some(64)),
    );
    rs.sets.insert(
        "p48_6".into(),
        set(SetKind::Prefixes(v6, 48), vec![host("fd01:2::")], Some(64)),
    );
    for (name, family, addr) in [("e_4", v4, "10.3.0.1"), ("e_6", v6, "fd03::1")] {
        rs.sets.insert(
            name.into(),
            set(
                SetKind::NamedPorts(family),
                vec![SetElement::Endpoint(render::Endpoint {
                    addr: ip(addr),
                    protocol: Protocol::Tcp,
                    port: 8080,
                })],
                None,
            ),
        );
    }
    rs.chains.insert("target".into(), Arc::new(vec![]));
    for (name, family, lo, hi) in [
        ("cl_4", v4, "10.4.0.0", "10.4.0.255"),
        ("cl_6", v6, "fd04::", "fd04::ff"),
    ] {
        rs.sets.insert(
            name.into(),
            set(
                SetKind::Classes(family),
                vec![SetElement::Class {
                    range: range(lo, hi),
                    chain: "target".into(),
                }],
                None,
            ),
        );
    }
    for (name, kind, net) in [
        ("cp_4", SetKind::ClassPrefixes(v4, 24), "10.5.0.0"),
        ("cp32_4", SetKind::ClassPrefixes(v4, 32), "10.5.1.1"),
        ("cp_6", SetKind::ClassPrefixes(v6, 64), "fd05::"),
    ] {
        rs.sets.insert(
            name.into(),
            set(
                kind,
                vec![SetElement::Class {
                    range: range(net, net),
                    chain: "target".into(),
                }],
                None,
            ),
        );
    }
    rs
}

/// `base` with chains of every match and verdict, their counters and dispatch elements.
fn full() -> Ruleset {
    use Match::*;
    let mut rs = base();
    let (v4, v6) = (IpFamily::V4, IpFamily::V6);
    for c in ["c-1", "c-2"] {
        rs.counters_mut().insert(
            c.into(),
            CounterMeta::Rule {
                id: c.into(),
                origin: None,
            },
        );
    }
    let set_name = |s: &str| s.to_string();
    let entry = vec![
        rule(
            vec![
                Family(v4),
                AddrNotIn {
                    family: v4,
                    end: End::Source,
                    addrs: vec![ip("10.9.0.2")],
                },
            ],
            Some("c-1"),
            Verdict::Drop,
        ),
        rule(
            vec![
                Family(v6),
                AddrNotIn {
                    family: v6,
                    end: End::Source,
                    addrs: vec![ip("fd09::2")],
                },
            ],
            None,
            Verdict::Drop,
        ),
        rule(vec![Established], None, Verdict::Accept),
        rule(
            vec![
                Family(v4),
                AddrInSet {
                    family: v4,
                    end: End::Destination,
                    set: set_name("h_4"),
                },
            ],
            Some("c-2"),
            Verdict::Accept,
        ),
        // Without a family match first: nft adds the `meta nfproto` dependency.
        rule(
            vec![AddrInSet {
                family: v6,
                end: End::Source,
                set: set_name("a_6"),
            }],
            None,
            Verdict::Return,
        ),
        rule(
            vec![
                Protocol(Udp),
                MaskedAddrInSet {
                    family: v4,
                    end: End::Destination,
                    len: 24,
                    set: set_name("p24_4"),
                },
            ],
            None,
            Verdict::Jump("target".into()),
        ),
        rule(
            vec![
                Family(v6),
                MaskedAddrInSet {
                    family: v6,
                    end: End::Source,
                    len: 48,
                    set: set_name("p48_6"),
                },
            ],
            None,
            Verdict::Goto("target".into()),
        ),
        rule(
            vec![Protocol(Tcp), Dports(vec![(80, 80)])],
            Some("c-1"),
            Verdict::Accept,
        ),
        rule(
            vec![Protocol(Udp), Dports(vec![(8000, 8100)])],
            None,
            Verdict::Drop,
        ),
        rule(
            vec![
                Family(v4),
                EndpointInSet {
                    family: v4,
                    end: End::Destination,
                    set: set_name("e_4"),
                },
            ],
            None,
            Verdict::Accept,
        ),
        rule(
            vec![
                Family(v6),
                EndpointInSet {
                    family: v6,
                    end: End::Source,
                    set: set_name("e_6"),
                },
            ],
            None,
            Verdict::Accept,
        ),
        rule(
            vec![],
            None,
            Verdict::ClassDispatch {
                family: v4,
                end: End::Destination,
                map: "cl_4".into(),
                prefix: None,
            },
        ),
        rule(
            vec![Family(v6)],
            None,
            Verdict::ClassDispatch {
                family: v6,
                end: End::Source,
                map: "cl_6".into(),
                prefix: None,
            },
        ),
        rule(vec![], None, Verdict::RestDispatch(Direction::Egress)),
        rule(vec![], None, Verdict::RestDispatch(Direction::Ingress)),
        rule(
            vec![Limit {
                per_second: 10,
                burst: 5,
            }],
            Some("c-2"),
            Verdict::LogDrop {
                prefix: "palisade deny: ".into(),
                group: 3,
            },
        ),
        rule(
            vec![],
            None,
            Verdict::LogReturn {
                prefix: "audit".into(),
                group: 3,
            },
        ),
    ];
    // Class maps of prefixes, masked or not.
    let entry: Vec<RuleDef> = entry
        .into_iter()
        .chain(
            [
                (v4, End::Source, "cp_4", Some(24)),
                (v4, End::Destination, "cp32_4", None),
                (v6, End::Destination, "cp_6", Some(64)),
            ]
            .into_iter()
            .map(|(family, end, map, prefix)| {
                let matches = if family == v6 {
                    vec![Family(v6)]
                } else {
                    vec![]
                };
                let verdict = Verdict::ClassDispatch {
                    family,
                    end,
                    map: map.into(),
                    prefix,
                };
                rule(matches, None, verdict)
            }),
        )
        .collect();
    // Lists: anonymous sets of every kind, in a chain of their own.
    let lists = vec![
        rule(
            vec![
                Family(v4),
                AddrNotIn {
                    family: v4,
                    end: End::Source,
                    addrs: vec![ip("10.9.0.2"), ip("10.9.0.3")],
                },
            ],
            None,
            Verdict::Drop,
        ),
        rule(
            vec![AddrNotIn {
                family: v6,
                end: End::Destination,
                addrs: vec![ip("fd09::2"), ip("fd09::3")],
            }],
            None,
            Verdict::Drop,
        ),
        rule(
            vec![Protocol(Tcp), Dports(vec![(5432, 5432), (6379, 6379)])],
            Some("c-1"),
            Verdict::Accept,
        ),
        rule(
            vec![Protocol(Udp), Dports(vec![(53, 53), (8000, 8100)])],
            None,
            Verdict::Accept,
        ),
        rule(
            vec![Protocol(Tcp), Dports(vec![(0, 5), (7, 65535)])],
            None,
            Verdict::Return,
        ),
    ];
    rs.chains.insert("lists".into(), Arc::new(lists));
    rs.chains.insert("entry".into(), Arc::new(entry));
    rs.chains.insert(
        "rest".into(),
        Arc::new(vec![rule(vec![], None, Verdict::Return)]),
    );
    rs.egress_dispatch.insert("veth-x".into(), "entry".into());
    rs.ingress_dispatch.insert("veth-y".into(), "entry".into());
    rs.egress_rest_dispatch
        .insert("veth-x".into(), "rest".into());
    rs
}

/// Applies `desired` incrementally and checks that it went over netlink and left the
/// table a fresh agent adopts.
fn step(applier: &mut Applier, nft: &Nft, desired: &Ruleset, what: &str) {
    let out = applier.apply(desired).unwrap();
    assert_eq!(out.kind, ApplyKind::Incremental, "{what}");
    assert!(
        out.phases
            .iter()
            .any(|(n, _)| *n == phase::NETLINK_TRANSACTION),
        "{what}: {out:?}"
    );
    assert!(
        !out.phases.iter().any(|(n, _)| *n == phase::NFT),
        "{what}: {out:?}"
    );
    let adopted = Applier::new(nft.clone()).apply(desired).unwrap();
    assert_eq!(
        adopted.kind,
        ApplyKind::Adopted,
        "{what}: the table differs from a full nft load"
    );
    assert_eq!(
        applier.reconcile(desired).unwrap(),
        ReconcileOutcome::InSync,
        "{what}"
    );
}

#[test]
fn netlink_rules_read_back_as_nft_loads_them() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let ns = Netns::new("pal-nlrules");
    let nft = Nft::in_netns(&ns.0);
    let mut applier = Applier::new(nft.clone());
    let first = applier.apply(&full()).unwrap();
    assert_eq!(first.kind, ApplyKind::Full);
    for netlink in [phase::NETLINK_RULES, phase::NETLINK_HOOK] {
        assert!(first.phases.iter().any(|(n, _)| *n == netlink), "{first:?}");
    }
    assert!(
        !first.phases.iter().any(|(n, _)| *n == phase::NFT_HOOK),
        "{first:?}"
    );
    assert_eq!(
        Applier::new(nft.clone()).apply(&full()).unwrap().kind,
        ApplyKind::Adopted,
        "the first load differs from a full nft load"
    );

    step(
        &mut applier,
        &nft,
        &base(),
        "chains, rules, counters deleted",
    );
    // The lists' anonymous sets are now created after the base chains' one, so the kernel
    // numbers them (`__setN`) otherwise than a full load does: adoption must see through.
    step(&mut applier, &nft, &full(), "added back");
    // One chain refilled: its rules reversed, one counter gone.
    let mut changed = full();
    let mut entry: Vec<RuleDef> = changed.chains["entry"].as_ref().clone();
    entry.reverse();
    entry.iter_mut().for_each(|r| {
        if r.counter.as_deref() == Some("c-2") {
            r.counter = None;
        }
    });
    changed.chains.insert("entry".into(), Arc::new(entry));
    changed.counters_mut().remove("c-2");
    step(&mut applier, &nft, &changed, "a chain refilled");
}
