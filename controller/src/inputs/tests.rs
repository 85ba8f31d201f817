use std::collections::BTreeSet;
use std::net::IpAddr;

use palisade_policy::{Change, Labels, Namespace, Node, PodKey};
use palisade_resources::core::PodObject;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod(name: &str, node: Option<&str>, ips: &[&str], host_network: bool) -> PodObject {
    PodObject {
        namespace: "a".into(),
        name: name.into(),
        labels: Labels::default(),
        node: node.map(str::to_string),
        ips: ips.iter().map(|s| ip(s)).collect(),
        host_network,
        ports: vec![],
    }
}

fn node(name: &str, addr: &str) -> Node {
    Node {
        name: name.into(),
        labels: Labels::default(),
        addresses: vec![ip(addr)],
    }
}

fn upsert(inputs: &mut Inputs, o: Object) -> Vec<Change> {
    inputs.apply(SourceEvent::Upsert(o)).changes
}

#[test]
fn an_unchanged_object_is_no_change() {
    let mut inputs = Inputs::default();
    let ns = Namespace {
        name: "a".into(),
        labels: Labels::default(),
    };
    assert_eq!(upsert(&mut inputs, Object::Namespace(ns.clone())).len(), 1);
    assert!(upsert(&mut inputs, Object::Namespace(ns)).is_empty());
    let p = pod("web", Some("n1"), &["10.0.0.1"], false);
    assert_eq!(upsert(&mut inputs, Object::Pod(p.clone())).len(), 1);
    assert!(upsert(&mut inputs, Object::Pod(p)).is_empty());
}

#[test]
fn a_pod_is_enforced_once_it_has_a_node_and_an_address_and_until_it_loses_them() {
    let mut inputs = Inputs::default();
    assert!(upsert(&mut inputs, Object::Pod(pod("web", None, &[], false))).is_empty());
    assert!(upsert(&mut inputs, Object::Pod(pod("web", Some("n1"), &[], false))).is_empty());
    let changes = upsert(
        &mut inputs,
        Object::Pod(pod("web", Some("n1"), &["10.0.0.1"], false)),
    );
    assert!(matches!(&changes[..], [Change::UpsertPod(p)] if p.ips == vec![ip("10.0.0.1")]));
    let changes = upsert(&mut inputs, Object::Pod(pod("web", Some("n1"), &[], false)));
    assert_eq!(changes, vec![Change::RemovePod(PodKey::new("a", "web"))]);
}

#[test]
fn host_network_pods_follow_their_nodes_addresses() {
    let mut inputs = Inputs::default();
    upsert(&mut inputs, Object::Node(node("n1", "192.168.0.1")));
    let changes = upsert(
        &mut inputs,
        Object::Pod(pod("agent", Some("n1"), &[], true)),
    );
    assert!(
        matches!(&changes[..], [Change::UpsertPod(p)] if p.ips == vec![ip("192.168.0.1")]),
        "{changes:?}"
    );
    let changes = upsert(&mut inputs, Object::Node(node("n1", "192.168.0.2")));
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::UpsertPod(p) if p.ips == vec![ip("192.168.0.2")])),
        "{changes:?}"
    );
}

#[test]
fn a_relist_removes_what_it_no_longer_lists() {
    let mut inputs = Inputs::default();
    upsert(
        &mut inputs,
        Object::Pod(pod("a1", Some("n1"), &["10.0.0.1"], false)),
    );
    upsert(
        &mut inputs,
        Object::Pod(pod("a2", Some("n1"), &["10.0.0.2"], false)),
    );
    let keys: BTreeSet<ObjectKey> = [ObjectKey::Pod(PodKey::new("a", "a1"))].into();
    let changes = inputs
        .apply(SourceEvent::Relisted {
            kind: Kind::Pod,
            keys,
        })
        .changes;
    assert_eq!(changes, vec![Change::RemovePod(PodKey::new("a", "a2"))]);
    assert_eq!(inputs.cluster().pods.len(), 1);
}

#[test]
fn an_invalid_version_keeps_the_last_good_one_and_is_reported_once() {
    let mut inputs = Inputs::default();
    upsert(
        &mut inputs,
        Object::Pod(pod("web", Some("n1"), &["10.0.0.1"], false)),
    );
    let key = ObjectKey::Pod(PodKey::new("a", "web"));
    let bad = SourceEvent::Invalid {
        key: key.clone(),
        error: "status.podIP: not an IP address".into(),
    };
    let applied = inputs.apply(bad.clone());
    assert!(applied.changes.is_empty());
    assert_eq!(applied.validity.len(), 1);
    assert!(inputs.apply(bad).validity.is_empty(), "reported once");
    assert_eq!(
        inputs.cluster().pods.len(),
        1,
        "the last good version stays"
    );
    // A relist that still lists it keeps it too.
    let keys: BTreeSet<ObjectKey> = [key.clone()].into();
    assert!(inputs
        .apply(SourceEvent::Relisted {
            kind: Kind::Pod,
            keys
        })
        .changes
        .is_empty());
    let applied = inputs.apply(SourceEvent::Upsert(Object::Pod(pod(
        "web",
        Some("n1"),
        &["10.0.0.1"],
        false,
    ))));
    assert_eq!(applied.validity, vec![(key, None)]);
}
