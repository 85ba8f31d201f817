//! Issue 12.1: anti-spoofing holds inside established flows. Real packets in network
//! namespaces of their own: pod `a` forges pod `c`'s address, once into `c`'s live flow to
//! `b` and once as the reply of `b`'s flow to `c`, over IPv4 and IPv6. Conntrack keys on the
//! 5-tuple, not the interface, so both forgeries look "established"; they must still be
//! dropped (and counted) as spoofed.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agent::runnable;
use common::*;
use palisade_agent::render;
use palisade_agent::{Applier, Nft};
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;

const G_C: &str = "g-00000000000000cc";
const R_B_IN: &str = "r-000000000000c001";
/// b's service, which only c may reach.
const SERVICE: u16 = 5000;
/// c's echo service, which b uses.
const ECHO: u16 = 6000;
/// Source port of c's flow to b, and of b's flow to c.
const C_SPORT: u16 = 4000;
const B_SPORT: u16 = 4001;

/// b is isolated for ingress and accepts only UDP SERVICE from c; a and c are free.
fn rules(lab: &Lab) -> NodeRuleSet {
    let pod = |name: &str, ingress: DirectionRules| {
        let p = lab.pod(name);
        PodRules {
            namespace: "default".into(),
            name: name.into(),
            ips: vec![p.ip4, p.ip6],
            ingress: ingress.into(),
            egress: DirectionRules::default().into(),
            audit: Default::default(),
        }
    };
    let c = lab.pod("c");
    let b_in = DirectionRules {
        isolated_by: vec![PolicyId {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some("default".into()),
            name: "b-in".into(),
        }],
        network_policy: vec![RuleInstance {
            rule: R_B_IN.into(),
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec![G_C.into()]),
                ports: Some(vec![PortRange {
                    protocol: Protocol::Udp,
                    start: SERVICE,
                    end: SERVICE,
                }]),
            }],
        }],
        ..DirectionRules::default()
    };
    NodeRuleSet {
        node: "node-1".into(),
        node_addresses: vec![],
        pods: vec![
            pod("a", DirectionRules::default()),
            pod("b", b_in),
            pod("c", DirectionRules::default()),
        ],
        groups: [(
            G_C.to_string(),
            Group::Hosts(AddrSet::from_addrs([c.ip4, c.ip6])).into(),
        )]
        .into_iter()
        .collect(),
        rules: [(
            R_B_IN.to_string(),
            RuleOrigin {
                policy: PolicyId {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some("default".into()),
                    name: "b-in".into(),
                },
                tier: Tier::NetworkPolicy,
                priority: 0,
                direction: Direction::Ingress,
                index: 0,
                name: None,
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into(),
    }
}

/// A UDP socket bound in `netns` that answers every datagram with "echo" and records what
/// it received, until the test ends (the thread dies with the process).
fn recorder(netns: &str, bind: SocketAddr) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let seen = got.clone();
    in_netns(netns, move || {
        let s = UdpSocket::bind(bind).expect("bind recorder");
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            seen.lock().unwrap().push(buf[..n].to_vec());
            let _ = s.send_to(b"echo", from);
        }
    });
    rx.recv().unwrap();
    got
}

/// Sends `payload` from `src` in `netns` to `dst` and returns the answer, if one came.
fn exchange(netns: &str, src: SocketAddr, dst: SocketAddr, payload: &'static [u8]) -> bool {
    in_netns(netns, move || {
        let s = UdpSocket::bind(src).expect("bind client");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for _ in 0..3 {
            let _ = s.send_to(payload, dst);
            let mut buf = [0u8; 16];
            if s.recv_from(&mut buf).is_ok() {
                return true;
            }
        }
        false
    })
    .join()
    .unwrap()
}

/// `n` datagrams from `src` (an address of another pod, added to `netns`'s eth0 so the
/// kernel sends from it) to `dst`.
fn forge(netns: &str, src: SocketAddr, dst: SocketAddr, n: usize) {
    in_netns(netns, move || {
        let s = UdpSocket::bind(src).expect("bind forged source");
        for _ in 0..n {
            s.send_to(b"forged", dst).expect("send forged");
        }
    })
    .join()
    .unwrap()
}

fn spoofed(nft: &Nft, pod: &str) -> u64 {
    let name = format!("spoof/default/{pod}");
    nft.counters()
        .unwrap()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, p, _)| p)
        .unwrap_or(0)
}

fn forged_count(got: &Mutex<Vec<Vec<u8>>>) -> usize {
    got.lock()
        .unwrap()
        .iter()
        .filter(|p| p.as_slice() == b"forged")
        .count()
}

#[test]
fn forged_sources_inside_established_flows_are_dropped() {
    if !runnable("forged_sources_inside_established_flows_are_dropped") {
        return;
    }
    let lab = Lab::new("s", 21, &["default/a", "default/b", "default/c"]);
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    let nft = Nft::in_netns(&lab.node);
    let mut applier = Applier::new(nft.clone());
    applier
        .apply(&render::render(&rules(&lab), &lab.interfaces()).unwrap())
        .unwrap();
    // a holds c's addresses too, so its kernel sends from them: a forgery a pod with
    // CAP_NET_RAW could make byte for byte.
    for (addr, nodad) in [
        (format!("{}/32", c.ip4), ""),
        (format!("{}/128", c.ip6), "nodad"),
    ] {
        let args = [
            "ip", "-n", &a.netns, "addr", "add", &addr, "dev", "eth0", nodad,
        ];
        sh(&args[..if nodad.is_empty() { 8 } else { 9 }]);
    }

    for (ip_b, ip_c) in [(b.ip4, c.ip4), (b.ip6, c.ip6)] {
        let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
        let service = recorder(&b.netns, at(ip_b, SERVICE));
        let _echo = recorder(&c.netns, at(ip_c, ECHO));

        // The policy holds for a: it cannot reach b's service from its own address.
        let a_own = if ip_b.is_ipv4() { a.ip4 } else { a.ip6 };
        assert!(
            !exchange(&a.netns, at(a_own, 0), at(ip_b, SERVICE), b"a"),
            "a -> b:{SERVICE} ({ip_b}) must be denied by b's ingress policy"
        );

        // 1. c's live flow to b's service; a forges c's source into it.
        assert!(
            exchange(&c.netns, at(ip_c, C_SPORT), at(ip_b, SERVICE), b"c"),
            "c -> b:{SERVICE} ({ip_b}) is allowed and answered"
        );
        let before = spoofed(&nft, "a");
        forge(&a.netns, at(ip_c, C_SPORT), at(ip_b, SERVICE), 3);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            forged_count(&service),
            0,
            "a's datagrams forged into c's established flow to b ({ip_b}) must not arrive"
        );
        assert_eq!(
            spoofed(&nft, "a") - before,
            3,
            "each forged datagram is counted as a's spoofing"
        );

        // 2. b's flow to c's echo service; a forges c's reply to b's port, which b's
        // ingress policy does not open to anyone.
        let (tx, rx) = mpsc::channel();
        let client = in_netns(&b.netns, move || {
            let s = UdpSocket::bind(at(ip_b, B_SPORT)).expect("bind b's client");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s.send_to(b"b", at(ip_c, ECHO)).unwrap();
            let mut buf = [0u8; 16];
            let answered = s.recv_from(&mut buf).is_ok();
            tx.send(answered).unwrap();
            // Whatever else arrives on b's client port within a second.
            s.set_read_timeout(Some(Duration::from_millis(1000)))
                .unwrap();
            let mut extra = Vec::new();
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                extra.push(buf[..n].to_vec());
            }
            extra
        });
        assert!(
            rx.recv().unwrap(),
            "b -> c:{ECHO} ({ip_c}) is answered: the reply is established"
        );
        let before = spoofed(&nft, "a");
        forge(&a.netns, at(ip_c, ECHO), at(ip_b, B_SPORT), 3);
        let extra = client.join().unwrap();
        assert!(
            extra.is_empty(),
            "a's forged replies of c ({ip_c}) to b's flow must not arrive: {extra:?}"
        );
        assert_eq!(spoofed(&nft, "a") - before, 3, "forged replies counted");
    }
}
