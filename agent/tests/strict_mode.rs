//! Strict mode (issue 10.3), with the real agent binary, real TCP connections and the
//! kernel's conntrack in network namespaces of their own:
//! - with `--strict-mode`, an established connection the new rules deny is cut within 1 s
//!   of the rules file being written, and one they still allow is not;
//! - without it, the denied connection lives on (new connections are refused).
//!   Each test costs 2-4 s.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::*;
use common::*;
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;

const GROUP: &str = "g-00000000000000aa";
const RULE: &str = "r-00000000000000a1";

fn np() -> PolicyId {
    PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some("default".into()),
        name: "b".into(),
    }
}

/// b isolated for ingress, allowing TCP `ports` from a (both families).
fn rules(a: [IpAddr; 2], b: [IpAddr; 2], ports: &[u16]) -> NodeRuleSet {
    let allow = RuleInstance {
        rule: RULE.into(),
        action: Action::Allow,
        clauses: vec![Clause::PeerPort {
            peers: Some(vec![GROUP.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|&p| PortRange {
                        protocol: Protocol::Tcp,
                        start: p,
                        end: p,
                    })
                    .collect(),
            ),
        }],
    };
    let pod = |name: &str, ips: [IpAddr; 2], ingress: DirectionRules| PodRules {
        namespace: "default".into(),
        name: name.into(),
        ips: ips.to_vec(),
        ingress: ingress.into(),
        egress: Default::default(),
        audit: Default::default(),
    };
    NodeRuleSet {
        node: "node-1".into(),
        node_addresses: vec![],
        pods: vec![
            pod("a", a, DirectionRules::default()),
            pod(
                "b",
                b,
                DirectionRules {
                    isolated_by: vec![np()],
                    network_policy: vec![allow],
                    ..DirectionRules::default()
                },
            ),
        ],
        groups: [(
            GROUP.to_string(),
            Group::Hosts(AddrSet::from_addrs(a)).into(),
        )]
        .into_iter()
        .collect(),
        rules: [(
            RULE.to_string(),
            RuleOrigin {
                policy: np(),
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

/// Echo servers on TCP ports of one pod, serving any number of connections, until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(netns: &str, ports: &[u16]) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        for &port in ports {
            let stop = stop.clone();
            let (tx, rx) = channel();
            in_netns(netns, move || {
                let l = TcpListener::bind(("::", port)).expect("bind");
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                        let mut buf = [0u8; 1];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(_) => {
                                    if s.write_all(&buf).is_err() {
                                        break;
                                    }
                                }
                                Err(_) => continue,
                            }
                        }
                    });
                }
            });
            rx.recv().unwrap();
        }
        Echo { stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One long TCP connection from a pod; each [`Conn::echo`] sends a byte and says whether
/// its echo came back within 150 ms.
struct Conn {
    ask: Sender<()>,
    answer: Receiver<bool>,
}

impl Conn {
    fn open(netns: &str, dst: SocketAddr) -> Conn {
        let (ask, asked) = channel::<()>();
        let (answered, answer) = channel();
        in_netns(netns, move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(150)))
                .unwrap();
            let mut n = 0u8;
            while asked.recv().is_ok() {
                n = n.wrapping_add(1);
                let mut ok = s.write_all(&[n]).is_ok();
                if ok {
                    // A late echo of an earlier byte is not this one's.
                    let mut buf = [0u8; 1];
                    ok = loop {
                        match s.read(&mut buf) {
                            Ok(1) if buf[0] == n => break true,
                            Ok(1) => continue,
                            _ => break false,
                        }
                    };
                }
                if answered.send(ok).is_err() {
                    break;
                }
            }
        });
        Conn { ask, answer }
    }

    fn echo(&self) -> bool {
        self.ask.send(()).unwrap();
        self.answer.recv().unwrap()
    }
}

fn ips(pod: &LabPod) -> [IpAddr; 2] {
    [pod.ip4, pod.ip6]
}

struct Setup {
    lab: Lab,
    _echo: Echo,
    dir: TempDir,
    port: u16,
    _agent: Agent,
}

impl Setup {
    fn new(tag: &str, subnet: u8, extra: &[&str]) -> Setup {
        let lab = Lab::new(tag, subnet, &["default/a", "default/b"]);
        let echo = Echo::start(&lab.pod("b").netns, &[8080, 9090]);
        let dir = TempDir::new(tag);
        let file = dir.0.join("rules.json");
        write_rules(
            &file,
            &rules(ips(lab.pod("a")), ips(lab.pod("b")), &[8080, 9090]),
        );
        let port = 20_000 + (std::process::id() % 20_000) as u16 + 300 + u16::from(subnet);
        let agent = spawn_agent(&lab.node, &file, port, extra);
        eventually("/readyz 200", || {
            matches!(http_get(port, "/readyz"), Some((200, _)))
        });
        Setup {
            lab,
            _echo: echo,
            dir,
            port,
            _agent: agent,
        }
    }

    /// A connection from a to b's `port`, over IPv4 or IPv6.
    fn conn(&self, port: u16, v6: bool) -> Conn {
        let b = self.lab.pod("b");
        let dst = SocketAddr::new(if v6 { b.ip6 } else { b.ip4 }, port);
        let c = Conn::open(&self.lab.pod("a").netns, dst);
        assert!(
            c.echo(),
            "the connection to {dst} works under the first rules"
        );
        c
    }

    /// Allows only 9090 from now on; returns when the file was written.
    fn deny_8080(&self) -> Instant {
        let (a, b) = (ips(self.lab.pod("a")), ips(self.lab.pod("b")));
        write_rules(&self.dir.0.join("rules.json"), &rules(a, b, &[9090]));
        Instant::now()
    }
}

#[test]
fn strict_mode_cuts_what_a_change_denies_within_a_second_and_nothing_else() {
    if !runnable("strict_mode") {
        return;
    }
    let s = Setup::new("sm", 41, &["--strict-mode"]);
    let denied = [s.conn(8080, false), s.conn(8080, true)];
    let allowed = [s.conn(9090, false), s.conn(9090, true)];
    let written = s.deny_8080();
    for (family, conn) in ["IPv4", "IPv6"].iter().zip(&denied) {
        let cut = loop {
            if !conn.echo() {
                break written.elapsed();
            }
            assert!(
                written.elapsed() < Duration::from_secs(3),
                "the denied {family} connection still echoes 3 s after the change"
            );
        };
        println!(
            "strict mode: denied {family} connection cut {cut:?} after the rules file was written"
        );
        assert!(cut < Duration::from_secs(1), "{family} cut after {cut:?}");
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        for conn in &allowed {
            assert!(
                conn.echo(),
                "a connection the rules still allow is never cut"
            );
        }
        for conn in &denied {
            assert!(!conn.echo(), "a cut connection stays cut");
        }
    }
    assert!(
        agent_metric(
            s.port,
            r#"palisade_conntrack_deleted_total{reason="strict"}"#
        )
        .is_some_and(|n| n >= 2.0),
        "the deletions are counted"
    );
}
#[test]
fn without_strict_mode_an_established_connection_survives_a_deny() {
    if !runnable("strict_mode") {
        return;
    }
    let s = Setup::new("so", 42, &[]);
    let denied = s.conn(8080, false);
    let generation = agent_metric(s.port, "palisade_ruleset_generation").unwrap();
    s.deny_8080();
    eventually("the change applied", || {
        agent_metric(s.port, "palisade_ruleset_generation").is_some_and(|g| g > generation)
    });
    assert!(
        !tcp_ok(&s.lab.pod("a").netns, s.lab.pod("b").ip4, 8080),
        "a new connection to 8080 is denied"
    );
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(denied.echo(), "without strict mode the connection lives on");
    }
}
