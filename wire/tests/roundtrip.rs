//! Every node of every conformance scenario through the wire: a snapshot rebuilds the
//! state exactly, a delta from any node's state to any other's rebuilds the other, and a
//! delta applied to the wrong base, or with a wrong digest, is refused whole; a pod without
//! an address crosses it too.

use std::path::Path;

use palisade_policy::{Compiler, NodeRuleSet};
use palisade_wire::{apply, diff, pb};

fn states() -> Vec<NodeRuleSet> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = Vec::new();
    for base in [
        root.join("tests/conformance"),
        root.join("../shared/conformance/examples"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&base) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    dirs.sort();
    assert!(
        dirs.len() > 50,
        "the conformance scenarios are where they were"
    );
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(s) = palisade_resources::load_scenario(&dir) else {
            continue;
        };
        out.extend(
            Compiler::new(s.cluster, s.policies)
                .node_rule_sets()
                .into_values(),
        );
    }
    out
}

#[test]
fn snapshots_and_deltas_rebuild_every_state() {
    let states = states();
    assert!(states.len() > 100, "{} states", states.len());
    let mut deltas = 0;
    for (i, new) in states.iter().enumerate() {
        let snap = diff(None, new);
        assert!(snap.snapshot);
        let rebuilt = apply(&new.node, None, &snap).expect("a snapshot applies");
        assert_eq!(&rebuilt, new);
        // Deltas from a few other states, including ones of other scenarios.
        for old in states.iter().skip(i % 7).step_by(17).take(8) {
            let mut old = old.clone();
            old.node = new.node.clone();
            let delta = diff(Some(&old), new);
            assert!(!delta.snapshot);
            let rebuilt = apply(&new.node, Some(&old), &delta).expect("a delta applies");
            assert_eq!(&rebuilt, new);
            // Origins that did not change stay the base's allocation, for consumers that
            // tell them unchanged by pointer.
            assert_eq!(
                std::sync::Arc::ptr_eq(&rebuilt.rules, &old.rules),
                old.rules == new.rules,
                "{}: origins shared exactly when unchanged",
                new.node
            );
            deltas += 1;
        }
    }
    assert!(deltas > 500, "{deltas}");
}

#[test]
fn a_delta_on_the_wrong_base_or_with_a_wrong_digest_is_refused() {
    let states = states();
    let with_pods: Vec<&NodeRuleSet> = states.iter().filter(|s| s.pods.len() >= 2).collect();
    let (a, b) = (with_pods[0], with_pods[with_pods.len() - 1]);
    let delta = diff(Some(a), b);
    // A base holding something neither side has: the delta cannot know to remove it.
    let mut wrong_base = a.clone();
    let (id, origin) = a.rules.iter().next().expect("a rule");
    std::sync::Arc::make_mut(&mut wrong_base.rules).insert(format!("{id}0"), origin.clone());
    assert!(!b.rules.contains_key(&format!("{id}0")));
    let err = apply(&b.node, Some(&wrong_base), &delta).unwrap_err();
    assert_eq!(err.field, "digest", "{err}");

    let mut tampered = diff(None, b);
    tampered.digest[0] ^= 1;
    assert_eq!(apply(&b.node, None, &tampered).unwrap_err().field, "digest");

    let mut first_delta = diff(Some(a), b);
    first_delta.snapshot = false;
    assert_eq!(
        apply(&b.node, None, &first_delta).unwrap_err().field,
        "snapshot"
    );
}

#[test]
fn malformed_messages_name_the_field() {
    let states = states();
    let s = states
        .iter()
        .find(|s| !s.groups.is_empty() && !s.pods.is_empty())
        .unwrap();
    let snap = diff(None, s);

    let mut bad_addr = snap.clone();
    bad_addr.upsert_pods[0].ips[0] = vec![1, 2, 3];
    let e = apply(&s.node, None, &bad_addr).unwrap_err();
    assert_eq!(e.field, "upsertPods[0].ips[0]", "{e}");

    let mut unsorted = snap.clone();
    let g = &mut unsorted.upsert_groups[0];
    g.body = Some(pb::address_group::Body::Addresses(pb::AddrSet {
        v4: vec![
            pb::Range4 {
                first: 10,
                last: 20,
            },
            pb::Range4 { first: 1, last: 2 },
        ],
        v6: vec![],
    }));
    let e = apply(&s.node, None, &unsorted).unwrap_err();
    assert_eq!(e.field, "upsertGroups[0].addresses", "{e}");

    let mut dangling = snap.clone();
    dangling.upsert_groups.clear();
    let e = apply(&s.node, None, &dangling).unwrap_err();
    assert!(e.message.contains("missing"), "{e}");

    let mut bad_id = snap;
    bad_id.upsert_groups[0].id = "g-x; flush ruleset".into();
    let e = apply(&s.node, None, &bad_id).unwrap_err();
    assert_eq!(e.field, "upsertGroups[0].id", "{e}");
}

/// A pod without an address (the model has them: a pending pod) crosses the wire like any
/// other; the differential fuzz target found the wire refusing the whole state for it.
#[test]
fn a_pod_without_an_address_crosses_the_wire() {
    let mut state = states()
        .into_iter()
        .find(|s| !s.pods.is_empty())
        .expect("a node with pods");
    state.pods[0].ips.clear();
    let snapshot = diff(None, &state);
    assert_eq!(apply(&state.node, None, &snapshot).expect("applies"), state);
}

/// Every scenario's nodes compiled with every policy in audit (audit lists wherever a
/// policy changes something) and enforced, through snapshots and deltas both ways.
#[test]
fn audit_lists_cross_the_wire() {
    use palisade_policy::{Enforcement, StagedCompiler};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("tests/conformance")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let (mut with_audit, mut refused) = (0, 0);
    for dir in dirs {
        let Ok(s) = palisade_resources::load_scenario(&dir) else {
            continue;
        };
        let audit = StagedCompiler::new(s.cluster.clone(), s.policies.clone(), Enforcement::Audit)
            .node_rule_sets();
        let enforced = Compiler::new(s.cluster, s.policies).node_rule_sets();
        for (node, state) in &audit {
            if !state.pods.iter().any(|p| !p.audit.is_empty()) {
                continue;
            }
            with_audit += 1;
            let rebuilt = apply(node, None, &diff(None, state)).expect("a snapshot applies");
            assert_eq!(&rebuilt, state);
            let plain = &enforced[node];
            assert_ne!(
                diff(None, state).digest,
                diff(None, plain).digest,
                "the digest covers the audit lists"
            );
            for (old, new) in [(plain, state), (state, plain)] {
                let rebuilt = apply(node, Some(old), &diff(Some(old), new)).expect("applies");
                assert_eq!(&rebuilt, new);
            }
            // An audit list naming a rule the node does not hold is refused.
            let enforced_rules: std::collections::BTreeSet<&String> = state
                .pods
                .iter()
                .flat_map(|p| p.ingress.instances().chain(p.egress.instances()))
                .map(|i| &i.rule)
                .collect();
            let audit_only = state
                .pods
                .iter()
                .flat_map(|p| [&p.audit.ingress, &p.audit.egress])
                .flatten()
                .flat_map(|d| d.instances())
                .map(|i| &i.rule)
                .find(|r| !enforced_rules.contains(r));
            if let Some(rule) = audit_only {
                let mut broken = state.clone();
                std::sync::Arc::make_mut(&mut broken.rules).remove(rule);
                let update = diff(None, &broken);
                assert!(apply(node, None, &update).is_err(), "{rule} missing");
                refused += 1;
            }
        }
    }
    assert!(with_audit > 20, "{with_audit} states with audit lists");
    assert!(
        refused > 10,
        "{refused} states refused for a missing audit rule"
    );
}

fn list_count(state: &NodeRuleSet) -> usize {
    palisade_wire::delta::lists_of(state).len()
}

/// Agents before shared lists get every list inline, and the inline form rebuilds every
/// state through snapshots and deltas as the shared one does.
#[test]
fn the_inline_form_rebuilds_every_state() {
    use palisade_wire::{diff_in, Form};
    let states = states();
    let mut with_lists = 0;
    for (i, new) in states.iter().enumerate() {
        let snap = diff_in(None, new, Form::INLINE);
        assert!(snap.upsert_lists.is_empty() && !snap.shared_lists);
        assert_eq!(apply(&new.node, None, &snap).expect("applies"), *new);
        if list_count(new) > 0 {
            with_lists += 1;
            assert_ne!(
                snap.digest,
                diff(None, new).digest,
                "the form is in the digest"
            );
        }
        for old in states.iter().skip(i % 5).step_by(23).take(4) {
            let mut old = old.clone();
            old.node = new.node.clone();
            let delta = diff_in(Some(&old), new, Form::INLINE);
            assert_eq!(apply(&new.node, Some(&old), &delta).expect("applies"), *new);
        }
    }
    assert!(with_lists > 30, "{with_lists} states with tier lists");
}

/// A node carries each list once: a snapshot names every list in its pods by id and sends
/// it once; a delta sends only the lists the node does not hold yet.
#[test]
fn shared_lists_cross_once_per_node() {
    use palisade_wire::{diff_in, Form};
    let states = states();
    let shared = states
        .iter()
        .max_by_key(|s| {
            let refs: usize = s
                .pods
                .iter()
                .map(|p| palisade_wire::convert::pod_lists(p).count())
                .sum();
            refs - list_count(s)
        })
        .expect("states");
    let lists = list_count(shared);
    let refs: usize = shared
        .pods
        .iter()
        .map(|p| palisade_wire::convert::pod_lists(p).count())
        .sum();
    assert!(
        refs > lists,
        "some list is shared by pods ({refs} refs, {lists} lists)"
    );
    let snap = diff(None, shared);
    assert_eq!(snap.upsert_lists.len(), lists);
    assert!(snap.shared_lists);
    for p in &snap.upsert_pods {
        for d in [&p.ingress, &p.egress].into_iter().flatten() {
            assert!(
                d.admin.is_empty() && d.baseline.is_empty(),
                "named, not inline"
            );
        }
    }
    let inline = diff_in(None, shared, Form::INLINE);
    use prost::Message;
    assert!(snap.encoded_len() < inline.encoded_len());
    assert_eq!(apply(&shared.node, None, &snap).expect("applies"), *shared);

    // Without one pod, then with it again: the list it shares is held, nothing is resent.
    let (i, pod) = shared
        .pods
        .iter()
        .enumerate()
        .find(|(i, p)| {
            palisade_wire::convert::pod_lists(p).next().is_some()
                && shared.pods.iter().enumerate().any(|(j, q)| {
                    j != *i
                        && palisade_wire::convert::pod_lists(q).any(|l| {
                            l.id() == p.ingress.admin.id() || l.id() == p.egress.admin.id()
                        })
                })
        })
        .expect("a pod sharing a list");
    let mut without = shared.clone();
    without.pods.remove(i);
    let back = diff(Some(&without), shared);
    let own: std::collections::BTreeSet<&str> = palisade_wire::convert::pod_lists(pod)
        .map(|l| l.id())
        .filter(|id| !palisade_wire::delta::lists_of(&without).contains_key(*id))
        .collect();
    let sent: std::collections::BTreeSet<&str> =
        back.upsert_lists.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(sent, own, "only the lists the node lacks");
    assert_eq!(
        apply(&shared.node, Some(&without), &back).expect("applies"),
        *shared
    );

    // The empty node, then everything: every list once.
    let mut empty = shared.clone();
    empty.pods.clear();
    let all = diff(Some(&empty), shared);
    assert_eq!(all.upsert_lists.len(), lists);
}

#[test]
fn a_list_that_is_missing_or_misnamed_is_refused() {
    let states = states();
    let s = states
        .iter()
        .find(|s| list_count(s) > 0)
        .expect("a state with lists");
    let snap = diff(None, s);

    let mut missing = snap.clone();
    missing.upsert_lists.remove(0);
    let e = apply(&s.node, None, &missing).unwrap_err();
    assert!(e.field.ends_with("List"), "{e}");
    assert!(e.message.contains("does not hold"), "{e}");

    let mut misnamed = snap.clone();
    misnamed.upsert_lists[0].instances.pop();
    let e = apply(&s.node, None, &misnamed).unwrap_err();
    assert_eq!(e.field, "upsertLists[0].id", "{e}");

    let mut both = snap.clone();
    let pod = both
        .upsert_pods
        .iter_mut()
        .find(|p| {
            p.ingress.as_ref().is_some_and(|d| !d.admin_list.is_empty())
                || p.egress.as_ref().is_some_and(|d| !d.admin_list.is_empty())
        })
        .expect("a pod naming an admin list");
    for d in [&mut pod.ingress, &mut pod.egress].into_iter().flatten() {
        if !d.admin_list.is_empty() {
            d.admin = snap.upsert_lists[0].instances.clone();
        }
    }
    let e = apply(&s.node, None, &both).unwrap_err();
    assert!(e.message.contains("not both"), "{e}");

    let mut old_form = snap;
    old_form.shared_lists = false;
    let e = apply(&s.node, None, &old_form).unwrap_err();
    assert_eq!(e.field, "upsertLists", "{e}");
}

/// A group that gains and loses a member crosses as a patch of those two, not whole;
/// agents that do not read patches get it whole; a patch of a group the node does not
/// hold, or of the wrong kind, is refused.
#[test]
fn changed_groups_cross_as_patches() {
    use palisade_policy::ruleset::Group;
    use palisade_wire::{diff_in, Form};
    use std::sync::Arc;
    let states = states();
    let (s, id) = states
        .iter()
        .find_map(|s| {
            s.groups
                .iter()
                .find(|(_, g)| matches!(&***g, Group::Hosts(_)))
                .map(|(id, _)| (s, id.clone()))
        })
        .expect("a state with a host group");
    // The group with 50 members (every other address: none merge), then one fewer and
    // one more.
    let host = |i: u32| std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a63_0000 + 2 * i));
    let members = |range: std::ops::Range<u32>| {
        Arc::new(Group::Hosts(palisade_policy::AddrSet::from_addrs(
            range.map(host),
        )))
    };
    let mut base = s.clone();
    base.groups.insert(id.clone(), members(0..50));
    let s = &base;
    let mut changed = s.clone();
    changed.groups.insert(id.clone(), members(1..51));
    let delta = diff(Some(s), &changed);
    assert!(delta.upsert_groups.is_empty(), "{delta:?}");
    assert_eq!(delta.patch_groups.len(), 1);
    let patch = &delta.patch_groups[0];
    assert_eq!(patch.id, id);
    assert_eq!(patch.add.as_ref().map(|a| a.v4.len()), Some(1));
    assert_eq!(patch.remove.as_ref().map(|r| r.v4.len()), Some(1));
    assert_eq!(apply(&s.node, Some(s), &delta).expect("applies"), changed);

    let whole = diff_in(Some(s), &changed, Form::INLINE);
    assert!(whole.patch_groups.is_empty());
    assert_eq!(whole.upsert_groups.len(), 1);
    assert_eq!(apply(&s.node, Some(s), &whole).expect("applies"), changed);

    let mut unheld = delta.clone();
    unheld.patch_groups[0].id = "g-00000000000000ff".into();
    let e = apply(&s.node, Some(s), &unheld).unwrap_err();
    assert_eq!(e.field, "patchGroups[0].id", "{e}");

    let mut wrong_kind = delta;
    wrong_kind.patch_groups[0].add_endpoints = vec![pb::PortEndpoint {
        address: vec![10, 0, 0, 1],
        protocol: pb::Protocol::Tcp as i32,
        port: 80,
    }];
    let e = apply(&s.node, Some(s), &wrong_kind).unwrap_err();
    assert_eq!(e.field, "patchGroups[0]", "{e}");
}
