//! Root integration tests: real nftables, real packets, in network namespaces of their own.
//! Without root or nft they print SKIPPED and return.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use palisade_agent::apply::phase;
use palisade_agent::nfnl::setelem::{self, Change, Op};
use palisade_agent::nfnl::NfnlSocket;
use palisade_agent::render::{self, Ruleset};
use palisade_agent::{Applier, ApplyKind, Nft, ReconcileOutcome};
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;

const G_A: &str = "g-00000000000000aa";
const G_B: &str = "g-00000000000000bb";
const R_B_IN: &str = "r-000000000000a001";
const R_A_DENY: &str = "r-000000000000a002";
const R_B_OUT: &str = "r-000000000000a003";

fn tcp(ports: &[u16]) -> Option<Vec<PortRange>> {
    Some(
        ports
            .iter()
            .map(|&p| PortRange {
                protocol: Protocol::Tcp,
                start: p,
                end: p,
            })
            .collect(),
    )
}

fn instance(rule: &str, action: Action, group: &str, ports: &[u16]) -> RuleInstance {
    RuleInstance {
        rule: rule.into(),
        action,
        clauses: vec![Clause::PeerPort {
            peers: Some(vec![group.into()]),
            ports: tcp(ports),
        }],
    }
}

fn origin(kind: PolicyKind, name: &str, tier: Tier, direction: Direction) -> RuleOrigin {
    RuleOrigin {
        policy: PolicyId {
            kind,
            namespace: (kind == PolicyKind::NetworkPolicy).then(|| "default".to_string()),
            name: name.into(),
        },
        tier,
        priority: 0,
        direction,
        index: 0,
        name: None,
    }
}

/// `pod`'s addresses and an unaligned range per family whose prefixes have too many
/// lengths for masked hash sets, so that the group renders as interval sets.
fn interval_block(pod: &LabPod) -> AddrSet {
    let mut set = AddrSet::from_addrs([pod.ip4, pod.ip6]);
    // 10.96.0.1-10.96.0.62 and fd00:96::1-fd00:96::3e: six prefix lengths each.
    set.v4.push((0x0a60_0001, 0x0a60_003e));
    set.v6
        .push((0xfd00_0096_u128 << 96 | 1, 0xfd00_0096_u128 << 96 | 0x3e));
    set.normalize();
    set
}

/// b accepts TCP 8080 and 9090 from a and may only send to a's 8081; an admin rule denies
/// a's egress to b's 9090.
fn rules(lab: &Lab) -> NodeRuleSet {
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let np = |name: &str| PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some("default".into()),
        name: name.into(),
    };
    let pod_a = PodRules {
        namespace: "default".into(),
        name: "a".into(),
        ips: vec![a.ip4, a.ip6],
        ingress: Default::default(),
        egress: DirectionRules {
            admin: palisade_policy::ruleset::TierList::from(vec![instance(
                R_A_DENY,
                Action::Deny,
                G_B,
                &[9090],
            )])
            .into(),
            ..DirectionRules::default()
        }
        .into(),
        audit: Default::default(),
    };
    let pod_b = PodRules {
        namespace: "default".into(),
        name: "b".into(),
        ips: vec![b.ip4, b.ip6],
        ingress: DirectionRules {
            isolated_by: vec![np("b-in")],
            network_policy: vec![instance(R_B_IN, Action::Allow, G_A, &[8080, 9090])],
            ..DirectionRules::default()
        }
        .into(),
        egress: DirectionRules {
            isolated_by: vec![np("b-out")],
            network_policy: vec![instance(R_B_OUT, Action::Allow, G_A, &[8081])],
            ..DirectionRules::default()
        }
        .into(),
        audit: Default::default(),
    };
    NodeRuleSet {
        node: "node-1".into(),
        node_addresses: vec![],
        pods: vec![pod_a, pod_b],
        groups: [
            (
                G_A.to_string(),
                // Pod addresses: a host group (hash sets); G_B stays a CIDR group of
                // interval sets, so both kinds see real packets (masked prefix sets: see
                // `masked_cidr_groups_match_exactly`).
                Group::Hosts(AddrSet::from_addrs([a.ip4, a.ip6])).into(),
            ),
            (G_B.to_string(), Group::Addresses(interval_block(b)).into()),
        ]
        .into_iter()
        .collect(),
        rules: [
            (
                R_B_IN.to_string(),
                origin(
                    PolicyKind::NetworkPolicy,
                    "b-in",
                    Tier::NetworkPolicy,
                    Direction::Ingress,
                ),
            ),
            (
                R_A_DENY.to_string(),
                origin(
                    PolicyKind::ClusterNetworkPolicy,
                    "guard",
                    Tier::Admin,
                    Direction::Egress,
                ),
            ),
            (
                R_B_OUT.to_string(),
                origin(
                    PolicyKind::NetworkPolicy,
                    "b-out",
                    Tier::NetworkPolicy,
                    Direction::Egress,
                ),
            ),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into(),
    }
}

fn counters(nft: &Nft) -> BTreeMap<String, (u64, u64)> {
    nft.counters()
        .unwrap()
        .into_iter()
        .map(|(n, p, b)| (n, (p, b)))
        .collect()
}

fn packets(nft: &Nft, name: &str) -> u64 {
    counters(nft).get(name).map(|c| c.0).unwrap_or(0)
}

/// The expected verdicts of the policy above, IPv4 and IPv6.
fn assert_enforced(lab: &Lab) {
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    for (ip_a, ip_b) in [(a.ip4, b.ip4), (a.ip6, b.ip6)] {
        assert!(tcp_ok(&a.netns, ip_b, 8080), "a -> b:8080 ({ip_b}) allowed");
        assert!(
            !tcp_ok(&a.netns, ip_b, 9090),
            "a -> b:9090 ({ip_b}) denied by admin egress"
        );
        assert!(
            !tcp_ok(&a.netns, ip_b, 7070),
            "a -> b:7070 ({ip_b}) denied by b's isolation"
        );
        assert!(tcp_ok(&b.netns, ip_a, 8081), "b -> a:8081 ({ip_a}) allowed");
        assert!(
            !tcp_ok(&b.netns, ip_a, 8080),
            "b -> a:8080 ({ip_a}) denied by b's egress isolation"
        );
    }
}

/// Runs `nft ARGS` in the node's namespace, as someone tampering with the table would.
fn nft_in(node: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", node, "nft"];
    all.extend_from_slice(args);
    sh(&all);
}

fn expect_reconcile(applier: &mut Applier, desired: &Ruleset, want: ReconcileOutcome) {
    assert_eq!(applier.reconcile(desired).unwrap(), want);
}

/// A node with pods a and b, each serving the ports the rules of [`rules`] talk about.
fn served_lab(name: &str, subnet: u8) -> (Lab, [Servers; 2]) {
    let lab = Lab::new(name, subnet, &["default/a", "default/b"]);
    let servers = [
        Servers::start(&lab.pod("a").netns, &[8080, 8081], &[]),
        Servers::start(&lab.pod("b").netns, &[7070, 8080, 9090], &[]),
    ];
    (lab, servers)
}

fn render_for(lab: &Lab) -> Ruleset {
    render::render(&rules(lab), &lab.interfaces()).unwrap()
}

#[test]
fn enforcement_counters_and_spoofing() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("e", 11, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sa = Servers::start(&a.netns, &[8080, 8081], &[]);
    let sb = Servers::start(&b.netns, &[7070, 8080, 9090], &[5353]);
    let nft = Nft::in_netns(&lab.node);

    // Without the agent everything flows, so the denials below are the agent's doing.
    assert!(tcp_ok(&a.netns, b.ip4, 7070));
    assert!(tcp_ok(&b.netns, a.ip4, 8080));

    let mut applier = Applier::new(nft.clone());
    let out = applier.apply(&render_for(&lab)).unwrap();
    assert_eq!(out.kind, ApplyKind::Full);
    assert_enforced(&lab);

    // The handshakes above passed only because b's SYN-ACKs (b's egress allows only 8081)
    // were established replies; counters moved for the rules that decided.
    let c = counters(&nft);
    assert!(c[R_B_IN].0 >= 2, "allow rule counted: {c:?}");
    assert!(c[R_A_DENY].0 >= 2, "admin deny counted: {c:?}");
    assert!(
        c["deny-ingress/default/b"].0 >= 2,
        "default deny counted: {c:?}"
    );
    assert!(
        c["deny-egress/default/b"].0 >= 2,
        "egress default deny counted: {c:?}"
    );
    assert!(c[R_B_IN].1 > 0, "bytes counted too");
    // The agent reads counters over netlink in its own namespace; it must see what nft
    // sees (nothing sends traffic between the two reads).
    let mut by_netlink = in_netns(&lab.node, || Nft::local().counters().unwrap())
        .join()
        .unwrap();
    let mut by_nft = nft.counters_by_nft().unwrap();
    by_netlink.sort();
    by_nft.sort();
    assert_eq!(by_netlink, by_nft);
    assert!(by_netlink.len() >= 6, "{by_netlink:?}");

    // Anti-spoofing: a second address in pod a that is not a's.
    sh(&[
        "ip",
        "-n",
        &a.netns,
        "addr",
        "add",
        "10.99.0.1/32",
        "dev",
        "eth0",
    ]);
    let spoof_before = packets(&nft, "spoof/default/a");
    udp_send_from(&a.netns, "10.99.0.1".parse().unwrap(), b.ip4, 5353, 5);
    udp_send_from(&a.netns, a.ip4, "10.77.11.200".parse().unwrap(), 5353, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sb.udp_received.load(Ordering::Relaxed),
        0,
        "spoofed datagrams must not arrive"
    );
    assert_eq!(
        packets(&nft, "spoof/default/a") - spoof_before,
        5,
        "exactly the spoofed ones counted"
    );
}

#[test]
fn drift_repair_failed_transaction_and_incremental() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let (lab, _servers) = served_lab("d", 12);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let nft = Nft::in_netns(&lab.node);
    let desired = render_for(&lab);

    // A pod without an interface is not enforced; once it has one, an incremental
    // transaction enforces it.
    let mut without_b = lab.interfaces();
    without_b.remove(&b.key);
    let mut applier = Applier::new(nft.clone());
    applier
        .apply(&render::render(&rules(&lab), &without_b).unwrap())
        .unwrap();
    assert!(
        tcp_ok(&a.netns, b.ip4, 7070),
        "b not enforced without its interface"
    );
    let out = applier.apply(&desired).unwrap();
    assert_eq!(out.kind, ApplyKind::Incremental);
    assert_enforced(&lab);

    // In sync: nothing to do.
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);

    // Someone deletes the table.
    nft_in(&lab.node, &["delete", "table", "inet", "palisade"]);
    assert!(tcp_ok(&a.netns, b.ip4, 7070));
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    assert_enforced(&lab);

    // Someone edits a chain.
    nft_in(
        &lab.node,
        &[
            "flush",
            "chain",
            "inet",
            "palisade",
            "ingress-rest/default/b",
        ],
    );
    assert!(tcp_ok(&a.netns, b.ip4, 7070));
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    assert_enforced(&lab);
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);

    // Someone removes a dispatch element: b's ingress is no longer checked.
    let veth_b = format!("{{ \"{}\" }}", b.veth);
    nft_in(
        &lab.node,
        &[
            "delete",
            "element",
            "inet",
            "palisade",
            "ingress_dispatch",
            &veth_b,
        ],
    );
    assert!(tcp_ok(&a.netns, b.ip4, 7070));
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    assert_enforced(&lab);

    // Someone adds a rule that lets everything into b.
    nft_in(
        &lab.node,
        &[
            "insert",
            "rule",
            "inet",
            "palisade",
            "ingress/default/b",
            "return",
        ],
    );
    assert!(tcp_ok(&a.netns, b.ip4, 7070));
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    assert_enforced(&lab);
    // Traffic moved counters meanwhile; that is not drift.
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);

    // A transaction that fails (a rule referencing a set that does not exist) leaves the
    // last good table in force and counts the error.
    let mut bad = desired.clone();
    Arc::make_mut(bad.chains.get_mut("ingress-rest/default/b").unwrap())[0].matches =
        vec![render::Match::AddrInSet {
            family: render::IpFamily::V4,
            end: render::End::Source,
            set: "g-does-not-exist_4".into(),
        }];
    let stats = applier.stats();
    let generation = stats.lock().unwrap().generation;
    assert!(applier.apply(&bad).is_err());
    assert_eq!(stats.lock().unwrap().errors, 1);
    assert_eq!(stats.lock().unwrap().generation, generation);
    assert_enforced(&lab);
    // The retry after a failure compares the kernel's table with the rules (what failed
    // may have been our belief about it): still the last good one, it is adopted.
    assert_eq!(applier.apply(&desired).unwrap().kind, ApplyKind::Adopted);
    assert_enforced(&lab);

    // A group change is an element delta: a loses its allowance when it leaves group A.
    let mut rs = rules(&lab);
    rs.groups.insert(
        G_A.into(),
        Group::Hosts(AddrSet::from_addrs([b.ip4])).into(),
    );
    let out = applier
        .apply(&render::render(&rs, &lab.interfaces()).unwrap())
        .unwrap();
    assert_eq!(out.kind, ApplyKind::Incremental);
    assert!(!tcp_ok(&a.netns, b.ip4, 8080), "a no longer in group A");
    // And back: one single-address element added to the hash set.
    rs.groups.insert(
        G_A.into(),
        Group::Hosts(AddrSet::from_addrs([a.ip4, b.ip4])).into(),
    );
    let out = applier
        .apply(&render::render(&rs, &lab.interfaces()).unwrap())
        .unwrap();
    assert_eq!((out.kind, out.commands), (ApplyKind::Incremental, 1));
    assert_eq!(
        out.phases.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![phase::NETLINK_ELEMENTS],
        "host set elements alone go over netlink"
    );
    assert!(tcp_ok(&a.netns, b.ip4, 8080), "a back in group A");
    let desired = render::render(&rs, &lab.interfaces()).unwrap();
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);

    // Someone adds an address to a host set by hand (the kernel's element count shows
    // it); the repair takes it out again.
    let set_a = format!("{G_A}_4");
    nft_in(
        &lab.node,
        &[
            "add",
            "element",
            "inet",
            "palisade",
            &set_a,
            "{ 10.99.0.7 }",
        ],
    );
    assert_eq!(set_len(&lab.node, &set_a), 3);
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    assert_eq!(set_len(&lab.node, &set_a), 2);
    assert!(tcp_ok(&a.netns, b.ip4, 8080));

    // Someone swaps one address for another (the count stays): the digest of the set's
    // elements shows it. The same for an interval set.
    let a4 = format!("{{ {} }}", a.ip4);
    nft_in(
        &lab.node,
        &["delete", "element", "inet", "palisade", &set_a, &a4],
    );
    nft_in(
        &lab.node,
        &[
            "add",
            "element",
            "inet",
            "palisade",
            &set_a,
            "{ 10.99.0.8 }",
        ],
    );
    assert!(!tcp_ok(&a.netns, b.ip4, 8080));
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    assert!(tcp_ok(&a.netns, b.ip4, 8080));
    let set_b = format!("{G_B}_4");
    nft_in(
        &lab.node,
        &[
            "add",
            "element",
            "inet",
            "palisade",
            &set_b,
            "{ 10.98.0.0/16 }",
        ],
    );
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::Repaired);
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);
}

/// After each incremental transaction the applier re-reads only what it touched: what it
/// then believes must equal a whole read (no false drift), whatever the transaction
/// created or deleted, and drift elsewhere before it must still show.
#[test]
fn incremental_read_back_equals_a_whole_read() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let (lab, _servers) = served_lab("r", 13);
    let b = lab.pod("b");
    let nft = Nft::in_netns(&lab.node);
    let mut rs = rules(&lab);
    let mut applier = Applier::new(nft.clone());
    applier
        .apply(&render::render(&rs, &lab.interfaces()).unwrap())
        .unwrap();
    let step = |applier: &mut Applier, rs: &NodeRuleSet, interfaces: &render::Interfaces| {
        let desired = render::render(rs, interfaces).unwrap();
        let out = applier.apply(&desired).unwrap();
        assert_eq!(out.kind, ApplyKind::Incremental);
        // A transaction of rules and chains, not of set elements alone.
        let whole = [phase::NFT, phase::NETLINK_TRANSACTION];
        assert!(out.phases.iter().any(|(n, _)| whole.contains(n)), "{out:?}");
        expect_reconcile(applier, &desired, ReconcileOutcome::InSync);
        desired
    };

    // b's interface goes: its chains, counters and dispatch elements are deleted.
    let mut without_b = lab.interfaces();
    without_b.remove(&b.key);
    step(&mut applier, &rs, &without_b);
    // And comes back: all created again.
    step(&mut applier, &rs, &lab.interfaces());
    // A rule changes one of its two ports: its anonymous set comes back with other
    // elements, maybe under the name of the one that went.
    Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
        instance(R_B_IN, Action::Allow, G_A, &[8080, 9091]);
    step(&mut applier, &rs, &lab.interfaces());
    // A rule changes its ports: one chain refilled.
    Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
        instance(R_B_IN, Action::Allow, G_A, &[8080]);
    step(&mut applier, &rs, &lab.interfaces());
    // A host group gains an address as a rule changes, in one transaction (the set's
    // declaration, which carries its element count, is read again by name: one port, so
    // no anonymous set makes the read-back dump every declaration), then both go back.
    let a = lab.pod("a");
    let g_a = rs.groups[G_A].clone();
    let more = [a.ip4, a.ip6, "10.99.0.9".parse().unwrap()];
    rs.groups
        .insert(G_A.into(), Group::Hosts(AddrSet::from_addrs(more)).into());
    Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
        instance(R_B_IN, Action::Allow, G_A, &[9090]);
    step(&mut applier, &rs, &lab.interfaces());
    rs.groups.insert(G_A.into(), g_a);
    Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
        instance(R_B_IN, Action::Allow, G_A, &[8080]);
    step(&mut applier, &rs, &lab.interfaces());
    // A group's interval sets go (with the rule that uses them) and come back as new ones.
    let block = rs.groups.remove(G_B).unwrap();
    let a_egress = rs.pods[0].egress.clone();
    Arc::make_mut(&mut rs.pods[0].egress).admin = Arc::default();
    step(&mut applier, &rs, &lab.interfaces());
    rs.groups.insert(G_B.into(), block);
    rs.pods[0].egress = a_egress;
    let desired = step(&mut applier, &rs, &lab.interfaces());

    // Someone edits a's chain; then a transaction touches b only. The next reconcile
    // still sees the edit.
    nft_in(
        &lab.node,
        &[
            "insert",
            "rule",
            "inet",
            "palisade",
            "egress/default/a",
            "accept",
        ],
    );
    Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
        instance(R_B_IN, Action::Allow, G_A, &[8080, 9090]);
    let desired_b = render::render(&rs, &lab.interfaces()).unwrap();
    assert_eq!(
        desired_b.chains["egress/default/a"], desired.chains["egress/default/a"],
        "a's chain is not part of the transaction"
    );
    assert_eq!(
        applier.apply(&desired_b).unwrap().kind,
        ApplyKind::Incremental
    );
    expect_reconcile(&mut applier, &desired_b, ReconcileOutcome::Repaired);
    expect_reconcile(&mut applier, &desired_b, ReconcileOutcome::InSync);

    // Someone adds a chain, or a dispatch element; then a transaction refills b's chain
    // alone. The read-back keeps what the transaction did not touch as it was read, so
    // the next reconcile still sees each.
    let stray_element: &[&str] = &[
        "add",
        "element",
        "inet",
        "palisade",
        "egress_dispatch",
        "{ \"stray0\" : goto egress/default/a }",
    ];
    let edits: [&[&str]; 2] = [
        &["add", "chain", "inet", "palisade", "stray"],
        stray_element,
    ];
    // The transaction after an edit, and the repair the edit still calls for.
    let then_repaired = |applier: &mut Applier, desired: &Ruleset| {
        assert_eq!(applier.apply(desired).unwrap().kind, ApplyKind::Incremental);
        expect_reconcile(applier, desired, ReconcileOutcome::Repaired);
        expect_reconcile(applier, desired, ReconcileOutcome::InSync);
    };
    for (i, edit) in edits.into_iter().enumerate() {
        nft_in(&lab.node, edit);
        let ports: &[u16] = if i == 0 { &[8080] } else { &[8080, 9090] };
        Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
            instance(R_B_IN, Action::Allow, G_A, ports);
        then_repaired(
            &mut applier,
            &render::render(&rs, &lab.interfaces()).unwrap(),
        );
    }

    // Someone adds a dispatch element; then transactions delete and add others (b's
    // interface goes, and comes back). The read-back reads again only the elements they
    // changed, by key, so the next reconcile still sees the stray one. (One port: the
    // maps' declarations, with their element counts, are read again by name.)
    Arc::make_mut(&mut rs.pods[1].ingress).network_policy[0] =
        instance(R_B_IN, Action::Allow, G_A, &[8080]);
    step(&mut applier, &rs, &lab.interfaces());
    for interfaces in [without_b.clone(), lab.interfaces()] {
        nft_in(&lab.node, stray_element);
        then_repaired(&mut applier, &render::render(&rs, &interfaces).unwrap());
    }
    assert_enforced(&lab);
}

#[test]
fn restart_adopts_without_gap() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("r", 13, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sb = Servers::start(&b.netns, &[7070, 8080], &[]);
    let nft = Nft::in_netns(&lab.node);
    let desired = render_for(&lab);
    Applier::new(nft.clone()).apply(&desired).unwrap();

    // Probers run throughout the restarts, each counting the probes that began and ended
    // while restarts were going on: an allowed flow must always connect, a denied one never
    // (a denied handshake in a gap would complete in well under the 50 ms time-out).
    let stop = Arc::new(AtomicBool::new(false));
    let restarting = Arc::new(AtomicBool::new(false));
    let prober = |port: u16, allowed: bool| {
        let (stop, restarting) = (stop.clone(), restarting.clone());
        let (netns, dst) = (a.netns.clone(), b.ip4);
        std::thread::spawn(move || {
            let (mut during, mut wrong) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let began = restarting.load(Ordering::Relaxed);
                // A dropped SYN is not sent again before the 1 s initial RTO, so 900 ms
                // tells a drop from a slow answer on a loaded machine; a denied handshake
                // in a gap would complete in well under 50 ms.
                let timeout = Duration::from_millis(if allowed { 900 } else { 50 });
                let start = Instant::now();
                let result = tcp_connect_within(&netns, dst, port, timeout);
                if result.is_ok() != allowed {
                    wrong.push(format!(
                        "{:?} after {:?} (restarts going on: {began})",
                        result.err(),
                        start.elapsed()
                    ));
                }
                if began && restarting.load(Ordering::Relaxed) {
                    during += 1;
                }
            }
            (during, wrong)
        })
    };
    let allowed = prober(8080, true);
    let denied = prober(7070, false);
    std::thread::sleep(Duration::from_millis(200));
    restarting.store(true, Ordering::Relaxed);
    // Restarts: a new applier adopts the unchanged table (after comparing it through a
    // scratch table), or replaces it in one transaction (as it does when the rules
    // changed).
    for i in 0..25 {
        let mut fresh = Applier::new(nft.clone());
        if i % 2 == 0 {
            assert_eq!(fresh.apply(&desired).unwrap().kind, ApplyKind::Adopted);
        } else {
            assert_eq!(fresh.apply_replace(&desired).unwrap().kind, ApplyKind::Full);
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    restarting.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (allowed_during, allowed_wrong) = allowed.join().unwrap();
    let (denied_during, denied_wrong) = denied.join().unwrap();
    assert!(
        allowed_wrong.is_empty(),
        "allowed probes failed (a gap in the table): {allowed_wrong:?}"
    );
    assert!(
        denied_wrong.is_empty(),
        "denied probes connected (a gap in the table): {denied_wrong:?}"
    );
    // 25 restarts take over a second: both probers must have been at work throughout.
    assert!(
        allowed_during >= 20 && denied_during >= 10,
        "too few probes overlapped the restarts: {allowed_during} allowed, {denied_during} denied"
    );
}

/// The text rendering (for people and `nft -f`) and the JSON one (what the agent applies,
/// with host set elements over netlink) must say the same thing: each is loaded for real,
/// into its own namespace, and the kernel's listings of the two tables are compared.
#[test]
fn text_and_json_renderings_load_the_same_table() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("t", 14, &["default/a", "default/b"]);
    let desired = render_for(&lab);
    Applier::new(Nft::in_netns(&lab.node))
        .apply(&desired)
        .unwrap();

    let other = Netns::add(&format!("pt-{}", std::process::id()));
    let path = std::env::temp_dir().join(format!("palisade-{}.nft", std::process::id()));
    std::fs::write(&path, render::text::to_text(&desired)).unwrap();
    nft_in(&other.0, &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);

    let listing = |netns: &str| {
        let doc = Nft::in_netns(netns).list_table().unwrap().expect("a table");
        canonical(doc)
    };
    let (by_json, by_text) = (listing(&lab.node), listing(&other.0));
    assert!(by_json.len() > 10, "{by_json:#?}");
    assert_eq!(by_json, by_text);
}

/// A namespace of its own, removed on drop.
struct Netns(String);

impl Netns {
    fn add(name: &str) -> Netns {
        sh(&["ip", "netns", "add", name]);
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

/// A listing's objects without what differs between two loads of one table (handles, the
/// kernel's order of hash set elements), sorted.
fn canonical(doc: serde_json::Value) -> Vec<String> {
    fn scrub(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("handle");
                for (key, inner) in map.iter_mut() {
                    scrub(inner);
                    if key == "elem" {
                        if let serde_json::Value::Array(items) = inner {
                            items.sort_by_key(|i| i.to_string());
                        }
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    // Objects sorted, but the rules of each chain kept in their order, which is meaning.
    let mut out = Vec::new();
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for object in palisade_agent::nft::objects(&doc).filter(|o| o.get("metainfo").is_none()) {
        let mut object = object.clone();
        scrub(&mut object);
        match object
            .get("rule")
            .and_then(|r| r.get("chain"))
            .and_then(|c| c.as_str())
        {
            Some(chain) => rules
                .entry(chain.to_string())
                .or_default()
                .push(object.to_string()),
            None => out.push(object.to_string()),
        }
    }
    out.sort();
    out.extend(
        rules
            .into_iter()
            .map(|(chain, rules)| format!("{chain}: {}", rules.join("\n"))),
    );
    out
}

/// A clause with TCP and UDP ports renders one rule per protocol; each must admit exactly
/// its own protocol's ports (a TCP port must not open the same number for UDP).
#[test]
fn ports_of_several_protocols_in_one_clause() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("p", 15, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let sb = Servers::start(&b.netns, &[7070, 8080, 9005], &[5353, 8080]);
    let mut rs = rules(&lab);
    let port = |protocol, start, end| PortRange {
        protocol,
        start,
        end,
    };
    std::sync::Arc::make_mut(&mut rs.pods[1].ingress).network_policy = vec![RuleInstance {
        rule: R_B_IN.into(),
        action: Action::Allow,
        clauses: vec![Clause::PeerPort {
            peers: Some(vec![G_A.into()]),
            ports: Some(vec![
                port(Protocol::Tcp, 8080, 8080),
                port(Protocol::Udp, 5353, 5353),
                port(Protocol::Tcp, 9000, 9010),
            ]),
        }],
    }];
    let mut applier = Applier::new(Nft::in_netns(&lab.node));
    applier
        .apply(&render::render(&rs, &lab.interfaces()).unwrap())
        .unwrap();
    for ip_b in [b.ip4, b.ip6] {
        assert!(tcp_ok(&a.netns, ip_b, 8080), "tcp 8080 ({ip_b}) allowed");
        assert!(tcp_ok(&a.netns, ip_b, 9005), "tcp 9005 ({ip_b}) in range");
        assert!(!tcp_ok(&a.netns, ip_b, 7070), "tcp 7070 ({ip_b}) denied");
    }
    let (src4, src6) = (a.ip4, a.ip6);
    udp_send_from(&a.netns, src4, b.ip4, 8080, 3);
    udp_send_from(&a.netns, src6, b.ip6, 8080, 3);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sb.udp_received.load(Ordering::Relaxed),
        0,
        "udp 8080 denied: only tcp 8080 is allowed"
    );
    udp_send_from(&a.netns, src4, b.ip4, 5353, 3);
    udp_send_from(&a.netns, src6, b.ip6, 5353, 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sb.udp_received.load(Ordering::Relaxed),
        5,
        "udp 5353 allowed"
    );
}

/// The number of elements of set `name` in the node's table, as nft lists them.
fn set_len(node: &str, name: &str) -> usize {
    let out = sh_out(&[
        "ip", "netns", "exec", node, "nft", "-j", "list", "set", "inet", "palisade", name,
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["set"]["elem"].as_array())
        .map(Vec::len)
        .sum()
}

fn table_exists(node: &str) -> bool {
    std::process::Command::new("ip")
        .args([
            "netns", "exec", node, "nft", "list", "table", "inet", "palisade",
        ])
        .output()
        .unwrap()
        .status
        .success()
}

fn hosts(first: u32, n: u32) -> Vec<render::SetElement> {
    (first..first + n)
        .map(|a| {
            let ip = std::net::IpAddr::V4(a.into());
            render::SetElement::Addr(render::AddrRange { lo: ip, hi: ip })
        })
        .collect()
}

/// Element batches over netlink are one transaction: a message the kernel refuses (a set
/// that does not exist, a set that is full) leaves every set of the batch as it was, also
/// when the batch spans several messages, and the error names the set.
#[test]
fn netlink_element_batches_are_all_or_nothing() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("n", 16, &[]);
    let mut rules = NodeRuleSet::default();
    let mut group = AddrSet::default();
    group.v4.push((0x0a10_0000, 0x0a10_0000 + 5_999));
    rules.groups.insert(G_A.into(), Group::Hosts(group).into());
    let desired = render::render(&rules, &Default::default()).unwrap();
    let set = format!("{G_A}_4");
    assert_eq!(desired.sets[&set].size, Some(16_384));
    let mut applier = Applier::new(Nft::in_netns(&lab.node));
    let out = applier.apply(&desired).unwrap();
    assert!(
        out.phases
            .iter()
            .any(|(n, _)| *n == phase::NETLINK_ELEMENTS),
        "first load staged: {:?}",
        out.phases
    );
    assert_eq!(set_len(&lab.node, &set), 6_000);

    let mut socket = NfnlSocket::open(Some(&lab.node)).unwrap();
    let more = hosts(0x0a20_0000, 6_000);
    let one = hosts(0x0a30_0000, 1);
    let err = setelem::apply(
        &mut socket,
        "palisade",
        &[
            Change {
                set: &set,
                kind: render::SetKind::Hosts(render::IpFamily::V4),
                op: Op::Add,
                elements: &more,
            },
            Change {
                set: "g-nope_4",
                kind: render::SetKind::Hosts(render::IpFamily::V4),
                op: Op::Add,
                elements: &one,
            },
        ],
    )
    .unwrap_err();
    assert!(err.to_string().contains("g-nope_4"), "{err}");
    assert_eq!(
        set_len(&lab.node, &set),
        6_000,
        "nothing of the batch applied"
    );

    setelem::apply(
        &mut socket,
        "palisade",
        &[Change {
            set: &set,
            kind: render::SetKind::Hosts(render::IpFamily::V4),
            op: Op::Add,
            elements: &more,
        }],
    )
    .unwrap();
    assert_eq!(set_len(&lab.node, &set), 12_000);

    // Beyond the set's size the kernel refuses, and the deletions in the same batch stay
    // undone.
    let too_many = hosts(0x0a40_0000, 5_000);
    let gone = hosts(0x0a10_0000, 10);
    let err = setelem::apply(
        &mut socket,
        "palisade",
        &[
            Change {
                set: &set,
                kind: render::SetKind::Hosts(render::IpFamily::V4),
                op: Op::Delete,
                elements: &gone,
            },
            Change {
                set: &set,
                kind: render::SetKind::Hosts(render::IpFamily::V4),
                op: Op::Add,
                elements: &too_many,
            },
        ],
    )
    .unwrap_err();
    assert!(err.to_string().contains(&set), "{err}");
    assert_eq!(set_len(&lab.node, &set), 12_000);
}

/// A first load that fails leaves no table behind (it never enforced), and packets flow
/// as before; the next attempt loads normally.
#[test]
fn failed_first_load_leaves_no_table() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let (lab, _servers) = served_lab("f", 17);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let nft = Nft::in_netns(&lab.node);
    let desired = render_for(&lab);

    // The host set's elements (step 2) do not fit its size: the kernel refuses them.
    let mut too_small = desired.clone();
    let set = too_small.sets.get_mut(&format!("{G_A}_4")).unwrap();
    set.elements = set
        .elements
        .iter()
        .cloned()
        .chain(hosts(0x0a63_0000, 3))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    set.size = Some(2);
    let mut applier = Applier::new(nft.clone());
    let err = applier.apply(&too_small).unwrap_err();
    assert!(err.to_string().contains(G_A), "{err}");
    assert!(!table_exists(&lab.node), "the half-loaded table is gone");
    assert!(tcp_ok(&a.netns, b.ip4, 7070), "nothing enforced");

    // The rules refused (one names a set that does not exist): the table and counters
    // created for them over netlink are deleted again.
    let mut bad = desired.clone();
    Arc::make_mut(bad.chains.get_mut("ingress-rest/default/b").unwrap())[0].matches =
        vec![render::Match::AddrInSet {
            family: render::IpFamily::V4,
            end: render::End::Source,
            set: "g-does-not-exist_4".into(),
        }];
    assert!(applier.apply(&bad).is_err());
    assert!(!table_exists(&lab.node));
    assert_eq!(applier.stats().lock().unwrap().errors, 2);

    assert_eq!(applier.apply(&desired).unwrap().kind, ApplyKind::Full);
    assert_enforced(&lab);
    // A first load never merges into a table that appeared meanwhile: creating the table
    // is refused, and the table stays as it was.
    let mut socket = NfnlSocket::open(Some(&lab.node)).unwrap();
    let err = palisade_agent::nfnl::counters::create_table(&mut socket, "palisade").unwrap_err();
    assert!(err.to_string().contains("creating table"), "{err}");
    assert_enforced(&lab);
}

/// `cidr except holes` as a CIDR group.
fn block(cidr: &str, except: &[&str]) -> Group {
    let except: Vec<_> = except.iter().map(|e| e.parse().unwrap()).collect();
    Group::Addresses(AddrSet::from_block(&cidr.parse().unwrap(), &except))
}

/// CIDR groups of few prefix lengths are hash sets matched through masks: a peer inside
/// the block is allowed, outside it or in an `except` hole denied, in both families; a
/// change of the group's prefix lengths (sets created and deleted, chains refilled) and
/// of its networks alone (elements over netlink) both apply incrementally.
#[test]
fn masked_cidr_groups_match_exactly() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("m", 17, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sb = Servers::start(&b.netns, &[8080], &[]);
    let mut rs = rules(&lab);
    let mut applier = Applier::new(Nft::in_netns(&lab.node));
    let mut first = true;
    // (group G_A, whether a's addresses are in it). a is 10.77.17.2 and fd00:77:17::2.
    let cases = [
        (block("10.77.0.0/16", &[]), true, false),
        (block("10.77.17.0/30", &["10.77.17.2/32"]), false, false),
        (block("10.77.17.0/30", &["10.77.17.3/32"]), true, false),
        (block("10.77.17.0/30", &["10.77.17.0/31"]), true, false),
        (block("10.77.17.0/24", &["10.77.17.0/25"]), false, false),
        (block("fd00:77:17::/64", &[]), false, true),
        (
            block("fd00:77:17::/126", &["fd00:77:17::2/128"]),
            false,
            false,
        ),
        (
            block("fd00:77:17::/126", &["fd00:77:17::3/128"]),
            false,
            true,
        ),
        (block("fd00:77:17:1::/64", &[]), false, false),
    ];
    for (group, in4, in6) in cases {
        let text = format!("{group:?}");
        rs.groups.insert(G_A.into(), group.into());
        let desired = render::render(&rs, &lab.interfaces()).unwrap();
        assert!(
            desired
                .sets
                .iter()
                .filter(|(n, _)| n.starts_with(G_A))
                .all(|(_, s)| matches!(s.kind, render::SetKind::Prefixes(..))),
            "{text} renders as masked hash sets"
        );
        assert_eq!(
            desired.sets[&format!("{G_B}_4")].kind,
            render::SetKind::Addresses(render::IpFamily::V4),
            "G_B stays an interval set beside them"
        );
        let out = applier.apply(&desired).unwrap();
        let want = if first {
            ApplyKind::Full
        } else {
            ApplyKind::Incremental
        };
        first = false;
        assert_eq!(out.kind, want, "{text}");
        assert_eq!(tcp_ok(&a.netns, b.ip4, 8080), in4, "{text}: IPv4 peer");
        assert_eq!(tcp_ok(&a.netns, b.ip6, 8080), in6, "{text}: IPv6 peer");
        expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);
    }

    // Another network of a length the group already has: elements alone, over netlink.
    rs.groups.insert(
        G_A.into(),
        Group::Addresses(AddrSet {
            v4: vec![(0x0a4d_1000, 0x0a4d_10ff)],
            v6: vec![],
        })
        .into(),
    );
    applier
        .apply(&render::render(&rs, &lab.interfaces()).unwrap())
        .unwrap();
    assert!(!tcp_ok(&a.netns, b.ip4, 8080), "10.77.16.0/24 leaves a out");
    rs.groups.insert(
        G_A.into(),
        Group::Addresses(AddrSet {
            v4: vec![(0x0a4d_1100, 0x0a4d_11ff)],
            v6: vec![],
        })
        .into(),
    );
    let desired = render::render(&rs, &lab.interfaces()).unwrap();
    let out = applier.apply(&desired).unwrap();
    assert_eq!(
        out.phases.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![phase::NETLINK_ELEMENTS],
        "prefix set elements alone go over netlink"
    );
    assert!(tcp_ok(&a.netns, b.ip4, 8080), "10.77.17.0/24 takes a in");
    assert_eq!(set_len(&lab.node, &format!("{G_A}_4/24")), 1);
    expect_reconcile(&mut applier, &desired, ReconcileOutcome::InSync);
}

/// IPv6 anti-spoofing: a pod's datagrams from an IPv6 source that is not its own are
/// counted and dropped, while the same datagrams from its own address reach an open pod
/// (so it is the spoofing check, not policy, that drops them).
#[test]
fn ipv6_anti_spoofing() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    // c has no rules: anything that reaches the node for it passes.
    let lab = Lab::new("s", 18, &["default/a", "default/b", "default/c"]);
    let (a, c) = (lab.pod("a"), lab.pod("c"));
    let sc = Servers::start(&c.netns, &[], &[5353]);
    let nft = Nft::in_netns(&lab.node);
    Applier::new(nft.clone()).apply(&render_for(&lab)).unwrap();

    udp_send_from(&a.netns, a.ip6, c.ip6, 5353, 3);
    let arrived = || sc.udp_received.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while arrived() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(arrived(), 3, "a's own IPv6 datagrams reach c");

    let spoofed: std::net::IpAddr = "fd00:99::1".parse().unwrap();
    sh(&[
        "ip",
        "-n",
        &a.netns,
        "addr",
        "add",
        "fd00:99::1/128",
        "dev",
        "eth0",
        "nodad",
    ]);
    let before = packets(&nft, "spoof/default/a");
    udp_send_from(&a.netns, spoofed, c.ip6, 5353, 5);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(arrived(), 3, "spoofed IPv6 datagrams must not arrive");
    assert_eq!(
        packets(&nft, "spoof/default/a") - before,
        5,
        "exactly the spoofed ones counted"
    );
}

/// By design a policy that tightens applies to new connections only: packets of a
/// connection the old rules allowed are `established` and pass the first rule of the base
/// chains (no conntrack flush), so it keeps working, while a new connection to the same
/// port is dropped.
#[test]
fn an_established_connection_survives_a_policy_that_tightens() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    let lab = Lab::new("w", 20, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let nft = Nft::in_netns(&lab.node);
    let mut applier = Applier::new(nft.clone());
    applier.apply(&render_for(&lab)).unwrap();

    // An echo server on b's allowed port 8080, for one long connection.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(&b.netns, move || {
        let listener = TcpListener::bind(("::", 8080)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    ready_rx.recv().unwrap();
    let (tighten_tx, tighten_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let dst = SocketAddr::new(b.ip4, 8080);
    let client = in_netns(&a.netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).expect("allowed");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut echo = |byte: u8| {
            let mut buf = [0u8; 1];
            s.write_all(&[byte]).is_ok() && s.read_exact(&mut buf).is_ok() && buf[0] == byte
        };
        let before = echo(1);
        done_tx.send(()).unwrap();
        tighten_rx.recv().unwrap();
        (before, echo(2))
    });
    done_rx.recv().unwrap();

    // b's ingress loses its allow rule: isolated, nothing allowed.
    let mut tight = rules(&lab);
    let pod_b = tight.pods.iter_mut().find(|p| p.name == "b").unwrap();
    let mut ingress = (*pod_b.ingress).clone();
    ingress.network_policy.clear();
    pod_b.ingress = ingress.into();
    applier
        .apply(&render::render(&tight, &lab.interfaces()).unwrap())
        .unwrap();
    let deny_before = packets(&nft, "deny-ingress/default/b");
    tighten_tx.send(()).unwrap();
    let (before, after) = client.join().unwrap();
    assert!(before, "the connection worked under the old rules");
    assert!(
        after,
        "the established connection survives the tighter rules"
    );
    server.join().unwrap();

    // The listener is gone, so only the default-deny counter tells a drop from a refusal.
    assert!(
        !tcp_ok(&a.netns, b.ip4, 8080),
        "a new connection to the same port fails"
    );
    assert!(
        packets(&nft, "deny-ingress/default/b") > deny_before,
        "and it is b's default deny that dropped it"
    );
}
