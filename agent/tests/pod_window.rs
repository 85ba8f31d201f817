//! No unprotected window (issue 10.4), with the real agent binary and real datagrams in
//! network namespaces of their own. Pod c may send UDP to a's port 5001 only (egress
//! isolated) and receives no new flow (ingress isolated); from the moment its interface is up it sends to a's 5000 (denied) and 5001
//! (allowed) in turn, and a echoes what it gets, so that a flow the kernel let through
//! becomes `established`. No datagram to 5000 may arrive:
//! - when c's rules arrive late (its interface is dropped as unknown until then), and the
//!   fail-open control, where they do arrive in the window and stop once c is enforced
//!   (its conntrack entries are deleted when enforcement starts);
//! - when c's rules are known before its interface appears;
//! - when c's interface is deleted and created again;
//! - while the agent restarts and pods keep coming;
//! - and a flow established before the agent's first start on the node does not survive
//!   its first transaction.
//!
//! Each test prints its window figures and costs 1-3 s.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::*;
use common::*;
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;

const GROUP: &str = "g-00000000000000ab";
const RULE: &str = "r-00000000000000b1";
const DENIED: u16 = 5000;
const ALLOWED: u16 = 5001;

fn np(name: &str) -> PolicyId {
    PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some("default".into()),
        name: name.into(),
    }
}

/// a open; each of `isolated` (name, address) may send UDP to a's [`ALLOWED`] only.
fn rules(a: IpAddr, isolated: &[(&str, IpAddr)]) -> NodeRuleSet {
    let allow = RuleInstance {
        rule: RULE.into(),
        action: Action::Allow,
        clauses: vec![Clause::PeerPort {
            peers: Some(vec![GROUP.into()]),
            ports: Some(vec![PortRange {
                protocol: Protocol::Udp,
                start: ALLOWED,
                end: ALLOWED,
            }]),
        }],
    };
    let mut pods = vec![PodRules {
        namespace: "default".into(),
        name: "a".into(),
        ips: vec![a],
        ingress: Default::default(),
        egress: Default::default(),
        audit: Default::default(),
    }];
    pods.extend(isolated.iter().map(|(name, ip)| {
        PodRules {
            namespace: "default".into(),
            name: name.to_string(),
            ips: vec![*ip],
            // Ingress isolated too: when the sweep deletes c → a:5000, an echo still in
            // flight from a:5000 would otherwise open the reversed flow a → c (which the
            // rules allow), and c's datagrams to 5000 would pass as its replies.
            ingress: DirectionRules {
                isolated_by: vec![np("ingress")],
                ..DirectionRules::default()
            }
            .into(),
            egress: DirectionRules {
                isolated_by: vec![np("egress")],
                network_policy: vec![allow.clone()],
                ..DirectionRules::default()
            }
            .into(),
            audit: Default::default(),
        }
    }));
    NodeRuleSet {
        node: "node-1".into(),
        node_addresses: vec![],
        pods,
        groups: [(
            GROUP.to_string(),
            Group::Hosts(AddrSet::from_addrs([a])).into(),
        )]
        .into_iter()
        .collect(),
        rules: [(
            RULE.to_string(),
            RuleOrigin {
                policy: np("egress"),
                tier: Tier::NetworkPolicy,
                priority: 0,
                direction: Direction::Egress,
                index: 0,
                name: None,
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into(),
    }
}

/// UDP servers in pod a that count and echo every datagram, per port, until dropped.
struct EchoCount {
    stop: Arc<AtomicBool>,
    denied: Arc<AtomicUsize>,
    allowed: Arc<AtomicUsize>,
}

impl EchoCount {
    fn start(netns: &str) -> EchoCount {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = [DENIED, ALLOWED].map(|port| {
            let (count, stop) = (Arc::new(AtomicUsize::new(0)), stop.clone());
            let counted = count.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            in_netns(netns, move || {
                let s = UdpSocket::bind(("::", port)).expect("bind udp");
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        counted.fetch_add(1, Ordering::Relaxed);
                        let _ = s.send_to(&buf[..n], from);
                    }
                }
            });
            rx.recv().unwrap();
            count
        });
        let [denied, allowed] = counts;
        EchoCount {
            stop,
            denied,
            allowed,
        }
    }

    fn denied(&self) -> usize {
        self.denied.load(Ordering::Relaxed)
    }

    fn allowed(&self) -> usize {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Waits up to 5 s for the next allowed datagram; the time it took.
    fn first_allowed_after(&self, since: Instant) -> Duration {
        let before = self.allowed();
        while self.allowed() == before {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "no allowed datagram arrived within 5 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        since.elapsed()
    }
}

impl Drop for EchoCount {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Datagrams from a pod to both ports in turn, one every 0.5 ms, from one socket per
/// port (one flow each), until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
}

impl Flood {
    fn start(netns: &str, src: IpAddr, dst: IpAddr) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (halt, count) = (stop.clone(), sent.clone());
        in_netns(netns, move || {
            let sockets = [DENIED, ALLOWED].map(|port| {
                let s = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind source");
                s.connect(SocketAddr::new(dst, port)).unwrap();
                s
            });
            while !halt.load(Ordering::Relaxed) {
                for s in &sockets {
                    if s.send(b"x").is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        Flood { stop, sent }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Setup {
    lab: Lab,
    echo: EchoCount,
    dir: TempDir,
    port: u16,
    pattern: String,
}

impl Setup {
    /// Pod a alone; the rules file holds `isolated` (planned pods by index and name).
    fn new(tag: &str, subnet: u8, isolated: &[(&str, usize)]) -> Setup {
        let lab = Lab::new(tag, subnet, &["default/a"]);
        let echo = EchoCount::start(&lab.pod("a").netns);
        let dir = TempDir::new(tag);
        let port = 20_000 + (std::process::id() % 20_000) as u16 + 400 + u16::from(subnet);
        let s = Setup {
            pattern: format!("v{tag}*"),
            lab,
            echo,
            dir,
            port,
        };
        s.write(isolated);
        s
    }

    fn rules_file(&self) -> std::path::PathBuf {
        self.dir.0.join("rules.json")
    }

    fn write(&self, isolated: &[(&str, usize)]) {
        let pods: Vec<(&str, IpAddr)> = isolated
            .iter()
            .map(|&(name, i)| (name, self.lab.planned_ip4(i)))
            .collect();
        write_rules(&self.rules_file(), &rules(self.lab.pod("a").ip4, &pods));
    }

    /// The agent, with the lab's veths as pod interfaces and `extra` arguments.
    fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec!["--pod-interface-patterns", &self.pattern];
        args.extend_from_slice(extra);
        let agent = spawn_agent(&self.lab.node, &self.rules_file(), self.port, &args);
        eventually("/readyz 200", || {
            matches!(http_get(self.port, "/readyz"), Some((200, _)))
        });
        agent
    }

    /// Adds pod `name` and starts its flood: (flood, when its interface could carry
    /// traffic, how long creating it took).
    fn add_flooding(&mut self, name: &str) -> (Flood, Instant, Duration) {
        self.add_flooding_ordered(name, false)
    }

    /// [`Setup::add_flooding`]; with `routes_last`, the host routes come last, and the
    /// flood starts as they appear.
    fn add_flooding_ordered(
        &mut self,
        name: &str,
        routes_last: bool,
    ) -> (Flood, Instant, Duration) {
        let started = Instant::now();
        let (ns, ip) = {
            let name = format!("default/{name}");
            let pod = match routes_last {
                true => self.lab.add_pod_host_routes_last(&name),
                false => self.lab.add_pod(&name),
            };
            (pod.netns.clone(), pod.ip4)
        };
        let up = Instant::now();
        let flood = Flood::start(&ns, ip, self.lab.pod("a").ip4);
        (flood, up, up - started)
    }

    fn metric(&self, series: &str) -> f64 {
        agent_metric(self.port, series).unwrap_or(0.0)
    }
}

#[test]
fn a_pod_whose_rules_arrive_late_sends_nothing_unfiltered() {
    if !runnable("pod_window") {
        return;
    }
    let mut s = Setup::new("wl", 51, &[]);
    let _agent = s.agent(&[]);
    let (flood, _up, _) = s.add_flooding("c");
    std::thread::sleep(Duration::from_millis(300));
    assert!(flood.sent() > 100, "c was sending");
    assert_eq!(
        s.echo.allowed(),
        0,
        "an unknown pod interface carries nothing"
    );
    // Read now: a later full replacement of the table (counters start again) may come.
    let dropped_unknown = s.metric("palisade_unknown_interface_packets_total");
    let written = Instant::now();
    s.write(&[("c", 1)]);
    let enforced = s.echo.first_allowed_after(written);
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "late rules: c enforced {enforced:?} after its rules were written; {} datagrams sent, {} to the denied port arrived",
        flood.sent(),
        s.echo.denied()
    );
    assert_eq!(s.echo.denied(), 0, "no datagram to the denied port passed");
    assert!(dropped_unknown > 0.0, "the drops were counted");
}

#[test]
fn failing_open_passes_the_window_and_enforcement_cuts_what_it_established() {
    if !runnable("pod_window") {
        return;
    }
    let mut s = Setup::new("wo", 52, &[]);
    let _agent = s.agent(&["--unknown-pod-interfaces", "allow"]);
    let (flood, _up, _) = s.add_flooding("c");
    std::thread::sleep(Duration::from_millis(300));
    let in_window = s.echo.denied();
    assert!(in_window > 0, "failing open, the window passes c's traffic");
    s.write(&[("c", 1)]);
    s.echo.first_allowed_after(Instant::now());
    // The denied flow was established in the window; enforcement deletes its entry, in
    // the sweep after the transaction (later than the rules on a loaded machine).
    let deleted = r#"palisade_conntrack_deleted_total{reason="enforcement_start"}"#;
    eventually("the sweep at enforcement start", || {
        s.metric(deleted) >= 1.0
    });
    // Datagrams the echo sent before the sweep may still be on their way.
    std::thread::sleep(Duration::from_millis(100));
    let at_enforcement = s.echo.denied();
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "fail open: {in_window} datagrams to the denied port passed in 300 ms of window, {} in all of {} sent",
        s.echo.denied(),
        flood.sent()
    );
    assert_eq!(
        s.echo.denied(),
        at_enforcement,
        "nothing established in the window survives enforcement"
    );
    assert!(s.metric(deleted) >= 1.0, "the deleted entry is counted");
}

#[test]
fn a_known_pods_interface_is_enforced_before_it_carries_traffic() {
    if !runnable("pod_window") {
        return;
    }
    let mut s = Setup::new("wk", 53, &[("c", 1)]);
    let _agent = s.agent(&[]);
    // The pod's routes come last: it can send the moment the agent can know it.
    let (flood, up, created) = s.add_flooding_ordered("c", true);
    let window = s.echo.first_allowed_after(up);
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "known pod: interface created in {created:?}; first allowed datagram {window:?} after it was up; {} sent, {} to the denied port arrived",
        flood.sent(),
        s.echo.denied()
    );
    assert_eq!(s.echo.denied(), 0, "no datagram to the denied port passed");
}

#[test]
fn an_interface_deleted_and_recreated_carries_nothing_unfiltered() {
    if !runnable("pod_window") {
        return;
    }
    let mut s = Setup::new("wr", 54, &[("c", 1)]);
    let _agent = s.agent(&[]);
    let (flood, up, _) = s.add_flooding("c");
    s.echo.first_allowed_after(up);
    s.lab.recreate_veth("c");
    let again = Instant::now();
    let window = s.echo.first_allowed_after(again);
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "re-created interface: first allowed datagram {window:?} after it was up again; {} sent, {} to the denied port arrived",
        flood.sent(),
        s.echo.denied()
    );
    assert_eq!(s.echo.denied(), 0, "no datagram to the denied port passed");
}

#[test]
fn an_agent_restart_while_pods_keep_coming() {
    if !runnable("pod_window") {
        return;
    }
    let mut s = Setup::new("wa", 55, &[("c", 1), ("d", 2)]);
    let agent = s.agent(&[]);
    drop(agent);
    // The agent is down; its table stays in force, and c arrives.
    let (c, _, _) = s.add_flooding("c");
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.sent() > 100, "c was sending");
    assert_eq!(
        s.echo.allowed(),
        0,
        "c's interface is unknown to the table in force"
    );
    let restarted = Instant::now();
    let _agent = s.agent(&[]);
    let enforced = s.echo.first_allowed_after(restarted);
    // And d arrives while the new agent runs.
    let (d, up, _) = s.add_flooding("d");
    let before = s.echo.allowed();
    let window = s.echo.first_allowed_after(up);
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "restart: c enforced {enforced:?} after the agent started again; d's first allowed datagram {window:?} after its interface was up; {} sent, {} to the denied port arrived",
        c.sent() + d.sent(),
        s.echo.denied()
    );
    assert!(s.echo.allowed() > before);
    assert_eq!(s.echo.denied(), 0, "no datagram to the denied port passed");
}

#[test]
fn the_agents_first_start_cuts_what_pods_established_before_it() {
    if !runnable("pod_window") {
        return;
    }
    let mut s = Setup::new("wf", 56, &[("c", 1)]);
    // No agent has run on this node yet: nothing filters, and c's denied flow becomes
    // established.
    let (flood, _, _) = s.add_flooding("c");
    std::thread::sleep(Duration::from_millis(200));
    let before_agent = s.echo.denied();
    assert!(before_agent > 0, "without a table nothing filters");
    let started = Instant::now();
    let _agent = s.agent(&[]);
    let ready = started.elapsed();
    // The sweep follows the first transaction (later than readiness on a loaded machine).
    // What counts is that the established flow stops: the sweep deletes its entry when
    // the dump holds it, and a packet without an entry meets the rules. (With the first
    // load over netlink the sweep may come before the entry shows in the dump: then it
    // deletes nothing, and nothing passes either.)
    eventually("the established flow to the denied port to stop", || {
        let seen = s.echo.denied();
        std::thread::sleep(Duration::from_millis(300));
        s.echo.denied() == seen
    });
    let at_enforcement = s.echo.denied();
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "first start: ready {ready:?} after the agent started; {before_agent} datagrams to the denied port passed before it, {} while it started, none after ({} sent)",
        at_enforcement - before_agent,
        flood.sent()
    );
    assert_eq!(
        s.echo.denied(),
        at_enforcement,
        "the flow established before the agent started does not survive enforcement"
    );
    let allowed = s.echo.allowed();
    s.echo.first_allowed_after(Instant::now());
    assert!(s.echo.allowed() > allowed, "the allowed flow goes on");
}
