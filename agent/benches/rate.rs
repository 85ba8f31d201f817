//! Rate benchmark (issue 4, benchmark b): new-connection rate (TCP connect + close) and
//! request/response rate (UDP, a new socket and source port per request) from pod A to
//! pod B on one node (routed veths, docs/design.md's lab topology), with
//!
//! 1. no firewall in the node namespace at all;
//! 2. Palisade with no policy (its table loaded: conntrack on, pods' anti-spoofing chains);
//! 3. Palisade with an ingress policy on B: one rule from a group of 10,000 distinct /24s
//!    that do not hold the client, one rule from the client's group, both with the same
//!    1,000 TCP + 1,000 UDP port ranges, so every new flow makes the address and the
//!    port lookups of both rules before it is allowed;
//! 4. the same rule set as iptables + ipset (kube-router style, `common/iptables.rs`).
//!
//! Variants run interleaved (1 2 3 4 1 2 3 4 …), medians reported. Before each policy run
//! the bench checks that a port outside the ranges is blocked (TCP and UDP) and the
//! allowed one is open; after it, that the allow rule's counter grew by at least the number
//! of successful connections (every one was a conntrack NEW flow that traversed the rules).
//!
//! Run (as root): `cargo bench -p palisade-agent --bench rate`
//! (`PALISADE_BENCH_IPTABLES=legacy` measures iptables-legacy instead of the system's
//! default iptables backend; `PALISADE_BENCH_SECONDS` / `PALISADE_BENCH_ROUNDS` change the
//! run length, default 3 s and 5 rounds; `PALISADE_BENCH_CIDRS` / `PALISADE_BENCH_RANGES`
//! the policy's size, for profiling.)

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::{group_id, in_netns, iptables, median, print_table, rule_id, sh, sh_stdin};
use palisade_agent::{render, Applier, Interfaces, Nft};
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;
use socket2::{Domain, SockAddr, Socket, Type};

const SUBNET: u8 = 50;
/// Inside the first range (2000-2024).
const PORT: u16 = 2_010;
/// In the gap after the first range.
const DENIED_PORT: u16 = 2_030;
const CLIENT_THREADS: usize = 4;
const SERVER_THREADS: usize = 2;
/// UDP servers (all inside the first range); requests go round-robin to them.
const UDP_PORTS: [u16; 4] = [2_010, 2_011, 2_012, 2_013];
/// Each UDP client thread cycles through its own block of source ports and the server
/// ports, so a (source port, server port) pair comes back only after 52,000 requests of
/// that thread — long after its conntrack entry (1 s UDP timeout in the node) expired.
const UDP_PORT_BASE: u16 = 10_000;
const UDP_PORTS_PER_THREAD: u16 = 13_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many CIDRs and port ranges (per protocol) the policy has: 10,000 and 1,000 unless
/// `PALISADE_BENCH_CIDRS` / `PALISADE_BENCH_RANGES` say otherwise (for profiling).
fn sizes() -> (u32, u16) {
    (
        env_or("PALISADE_BENCH_CIDRS", 10_000u32).clamp(1, 100_000),
        env_or("PALISADE_BENCH_RANGES", 1_000u16).clamp(1, 1_200),
    )
}

/// Range `i`: 2000 + 50 i ..= 2000 + 50 i + 24, for TCP and for UDP.
fn port_ranges() -> Vec<PortRange> {
    let ranges = sizes().1;
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .flat_map(|protocol| {
            (0..ranges).map(move |i| PortRange {
                protocol,
                start: 2000 + 50 * i,
                end: 2000 + 50 * i + 24,
            })
        })
        .collect()
}

/// Every other /24 from 11.0.0.0: 10,000 distinct, non-adjacent prefixes.
fn cidr_group() -> AddrSet {
    let mut set = AddrSet::default();
    let base = u32::from(Ipv4Addr::new(11, 0, 0, 0));
    for i in 0..sizes().0 {
        let lo = base + 512 * i;
        set.v4.push((lo, lo + 255));
    }
    set.normalize();
    set
}

struct Policy {
    rules: NodeRuleSet,
    /// The rule that allows the client: its counter must see every new flow.
    client_rule: String,
}

fn node_rules(lab: &Lab, with_policy: bool) -> Policy {
    let (client, server) = (&lab.pods[0], &lab.pods[1]);
    let pod = |p: &common::lab::LabPod, ingress: DirectionRules| PodRules {
        namespace: p.key.namespace.clone(),
        name: p.key.name.clone(),
        ips: vec![p.ip4],
        ingress: ingress.into(),
        egress: Default::default(),
    };
    let mut rules = NodeRuleSet {
        node: "bench".into(),
        ..NodeRuleSet::default()
    };
    let policy = PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(server.key.namespace.clone()),
        name: "allow-client".into(),
    };
    let mut instance = |index: usize, group: &str| {
        let origin = RuleOrigin {
            policy: policy.clone(),
            tier: Tier::NetworkPolicy,
            priority: 0,
            direction: Direction::Ingress,
            index,
            name: None,
        };
        let id = rule_id(&format!("{origin:?}"));
        rules.rules.insert(id.clone(), origin);
        RuleInstance {
            rule: id,
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec![group.to_string()]),
                ports: Some(port_ranges()),
            }],
        }
    };
    let (cidrs, clients) = (group_id("cidrs"), group_id("client"));
    let far = instance(0, &cidrs);
    let near = instance(1, &clients);
    let client_rule = near.rule.clone();
    let server_ingress = if with_policy {
        rules
            .groups
            .insert(cidrs, Arc::new(Group::Addresses(cidr_group())));
        rules.groups.insert(
            clients,
            Arc::new(Group::Hosts(AddrSet::from_addrs([client.ip4]))),
        );
        DirectionRules {
            isolated_by: vec![policy.clone()],
            network_policy: vec![far, near],
            ..DirectionRules::default()
        }
    } else {
        rules.rules.clear();
        DirectionRules::default()
    };
    rules.pods = vec![
        pod(client, DirectionRules::default()),
        pod(server, server_ingress),
    ];
    Policy { rules, client_rule }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    None,
    PalisadeEmpty,
    Palisade,
    Iptables,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::None,
        Variant::PalisadeEmpty,
        Variant::Palisade,
        Variant::Iptables,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::None => "no firewall",
            Variant::PalisadeEmpty => "Palisade, no policy",
            Variant::Palisade => "Palisade, policy",
            Variant::Iptables => "iptables+ipset, policy",
        }
    }

    fn enforces(self) -> bool {
        matches!(self, Variant::Palisade | Variant::Iptables)
    }
}

/// What is loaded in the node namespace for one variant; unloaded on drop.
struct Loaded<'a> {
    node: &'a str,
    variant: Variant,
    ipt: Option<iptables::Rendered>,
}

impl<'a> Loaded<'a> {
    fn load(
        node: &'a str,
        variant: Variant,
        empty: &NodeRuleSet,
        policy: &NodeRuleSet,
        ifaces: &Interfaces,
    ) -> Loaded<'a> {
        let mut loaded = Loaded {
            node,
            variant,
            ipt: None,
        };
        match variant {
            Variant::None => {}
            Variant::PalisadeEmpty | Variant::Palisade => {
                let rules = if variant == Variant::Palisade {
                    policy
                } else {
                    empty
                };
                let table = render(rules, ifaces).expect("render");
                Applier::new(Nft::in_netns(node))
                    .apply(&table)
                    .expect("apply palisade table");
            }
            Variant::Iptables => {
                let r = iptables::render(policy, ifaces);
                sh_stdin(&["ip", "netns", "exec", node, "ipset", "restore"], &r.ipset);
                sh_stdin(
                    &[
                        "ip",
                        "netns",
                        "exec",
                        node,
                        iptables::restore_program(),
                        "-w",
                    ],
                    &r.iptables,
                );
                loaded.ipt = Some(r);
            }
        }
        loaded
    }

    /// Packets that hit the client's allow rule so far.
    fn allowed_packets(&self, client_rule: &str) -> u64 {
        match self.variant {
            Variant::Palisade => {
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    self.node,
                    "nft",
                    "-j",
                    "list",
                    "counter",
                    "inet",
                    "palisade",
                    client_rule,
                ]);
                let doc: serde_json::Value = serde_json::from_str(&out).expect("nft JSON");
                doc["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["counter"]["packets"].as_u64())
                    .sum()
            }
            Variant::Iptables => {
                // The server is pod 1; its ingress rest chain holds the allow rules (the
                // 10k-CIDR ones never match the client, so RETURN hits are the client's).
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    self.node,
                    iptables::list_program(),
                    "-w",
                    "-L",
                    "PAL-IR-1",
                    "-v",
                    "-x",
                    "-n",
                ]);
                out.lines()
                    .skip(2)
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.get(2) == Some(&"RETURN")).then(|| f[0].parse::<u64>().ok())?
                    })
                    .sum()
            }
            _ => 0,
        }
    }
}

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        let run = |args: &[&str], input: Option<&str>| {
            let mut cmd = vec!["ip", "netns", "exec", self.node];
            cmd.extend_from_slice(args);
            match input {
                Some(text) => sh_stdin(&cmd, text),
                None => {
                    let _ = std::process::Command::new(cmd[0]).args(&cmd[1..]).output();
                }
            }
        };
        match self.variant {
            Variant::None => {}
            Variant::PalisadeEmpty | Variant::Palisade => {
                run(&["nft", "delete", "table", "inet", "palisade"], None)
            }
            Variant::Iptables => {
                if let Some(r) = &self.ipt {
                    let (ipt, ipset) = iptables::teardown_scripts(r);
                    run(&[iptables::restore_program(), "-w"], Some(&ipt));
                    run(&["ipset", "restore"], Some(&ipset));
                }
                // iptables-nft leaves an empty `ip filter` table with hooked base chains.
                run(&["nft", "delete", "table", "ip", "filter"], None);
            }
        }
    }
}

/// TCP acceptors and UDP echo servers on PORT and DENIED_PORT in the server pod.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    netns: String,
    addr: IpAddr,
}

impl Servers {
    fn start(netns: &str, addr: IpAddr) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let ports: std::collections::BTreeSet<u16> =
            [PORT, DENIED_PORT].into_iter().chain(UDP_PORTS).collect();
        for port in ports {
            // Sockets belong to the namespace they were created in; serving them from
            // threads outside it is fine.
            let (listener, udp) = in_netns(netns, move || {
                let listener = (port == PORT || port == DENIED_PORT).then(|| {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
                    s.set_reuse_address(true).expect("reuseaddr");
                    s.bind(&SockAddr::from(SocketAddr::new(addr, port)))
                        .expect("bind tcp");
                    s.listen(4096).expect("listen");
                    TcpListener::from(s)
                });
                let udp = UdpSocket::bind(SocketAddr::new(addr, port)).expect("bind udp");
                udp.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                (listener, udp)
            })
            .join()
            .expect("servers bound");
            for _ in 0..SERVER_THREADS {
                let Some(listener) = &listener else { break };
                let l = listener.try_clone().expect("clone listener");
                let stop2 = stop.clone();
                threads.push(std::thread::spawn(move || {
                    // Accepted connections are dropped at once; the client resets them.
                    while !stop2.load(Ordering::Relaxed) {
                        let _ = l.accept();
                    }
                }));
            }
            let stop2 = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Servers {
            stop,
            threads,
            netns: netns.to_string(),
            addr,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking acceptors (from inside the pod: no policy in the way).
        let addr = self.addr;
        let _ = in_netns(&self.netns, move || {
            for port in [PORT, DENIED_PORT] {
                for _ in 0..SERVER_THREADS * 2 {
                    let _ = std::net::TcpStream::connect_timeout(
                        &SocketAddr::new(addr, port),
                        Duration::from_millis(100),
                    );
                }
            }
        })
        .join();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_connect(dst: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
        return false;
    };
    // Closing with a reset leaves no TIME_WAIT behind: ports stay available, and the
    // next SYN from a reused port opens a new conntrack entry.
    let _ = s.set_linger(Some(Duration::ZERO));
    s.connect_timeout(&SockAddr::from(dst), timeout).is_ok()
}

fn udp_request(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = UdpSocket::bind(src) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 16];
    s.send_to(b"ping", dst).is_ok() && s.recv_from(&mut buf).is_ok()
}

/// (successes, failures) per protocol, summed over client threads, for `secs` seconds.
fn run_load(netns: &str, src: IpAddr, dst: IpAddr, udp: bool, secs: f64) -> (u64, u64) {
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            in_netns(netns, move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let base = UDP_PORT_BASE + t as u16 * UDP_PORTS_PER_THREAD;
                let mut i = 0usize;
                while Instant::now() < start {
                    std::hint::spin_loop();
                }
                while Instant::now() < deadline {
                    let success = if udp {
                        let server = UDP_PORTS[(i + t) % UDP_PORTS.len()];
                        let port = base
                            + ((i / UDP_PORTS.len()) % usize::from(UDP_PORTS_PER_THREAD)) as u16;
                        i += 1;
                        udp_request(
                            SocketAddr::new(src, port),
                            SocketAddr::new(dst, server),
                            Duration::from_millis(200),
                        )
                    } else {
                        tcp_connect(SocketAddr::new(dst, PORT), Duration::from_secs(1))
                    };
                    if success {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Allowed port open and denied port blocked, TCP and UDP, from the client.
fn check_enforced(netns: &str, src: IpAddr, dst: IpAddr, expect_blocked: bool) {
    let (ns, t) = (netns.to_string(), Duration::from_millis(300));
    let results = in_netns(&ns, move || {
        [PORT, DENIED_PORT].map(|port| {
            (
                tcp_connect(SocketAddr::new(dst, port), t),
                udp_request(
                    SocketAddr::new(src, 0),
                    SocketAddr::new(dst, port),
                    Duration::from_millis(300),
                ),
            )
        })
    })
    .join()
    .expect("check thread");
    assert_eq!(results[0], (true, true), "allowed port {PORT} must be open");
    let blocked = (!expect_blocked, !expect_blocked);
    assert_eq!(
        results[1],
        blocked,
        "port {DENIED_PORT} must be {}",
        if expect_blocked { "blocked" } else { "open" }
    );
}

fn main() {
    if !common::can_run("rate") {
        return;
    }
    let secs: f64 = env_or("PALISADE_BENCH_SECONDS", 3.0);
    let rounds: usize = env_or("PALISADE_BENCH_ROUNDS", 5);
    let lab = Lab::new(SUBNET, &["bench/client", "bench/server"]);
    let node = lab.node.name.clone();
    for s in [
        "net.netfilter.nf_conntrack_udp_timeout=1",
        "net.netfilter.nf_conntrack_tcp_timeout_close=1",
    ] {
        // The conntrack module may not be loaded yet: loading any ct rule loads it.
        if std::process::Command::new("ip")
            .args(["netns", "exec", &node, "sysctl", "-qw", s])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            sh(&["modprobe", "nf_conntrack"]);
            lab.node.sysctl(s);
        }
    }
    lab.pods[0]
        .netns
        .sysctl("net.ipv4.ip_local_port_range=1024 65535");
    let (client, server) = (&lab.pods[0], &lab.pods[1]);
    let (src, dst) = (client.ip4, server.ip4);
    let ifaces = lab.interfaces();
    let empty = node_rules(&lab, false);
    let policy = node_rules(&lab, true);
    let _servers = Servers::start(&server.netns.name, dst);
    let client_ns = client.netns.name.clone();

    let ipt = iptables::render(&policy.rules, &ifaces);
    let table = render(&policy.rules, &ifaces).expect("render");
    println!(
        "policy: ingress of {} allows {} /24s (not the client) and the client's /32, each on \
         {} TCP + {} UDP port ranges; {} CPUs, {} client threads, {secs} s per run, {rounds} rounds",
        server.key,
        sizes().0,
        sizes().1,
        sizes().1,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        CLIENT_THREADS
    );
    println!(
        "nftables: {} set elements, {} rules; iptables: {} ipset entries, {} rules ({})",
        table.sets.values().map(|s| s.elements.len()).sum::<usize>(),
        table.chains.values().map(Vec::len).sum::<usize>(),
        ipt.set_elements,
        ipt.rules,
        iptables::backend()
    );

    // Warm-up, and the reference check that the denied port is reachable without policy.
    check_enforced(&client_ns, src, dst, false);
    run_load(&client_ns, src, dst, false, 0.5);

    let mut tcp: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut udp: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut traversal: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut failures: BTreeMap<Variant, u64> = BTreeMap::new();
    for round in 0..rounds {
        for variant in Variant::ALL {
            let loaded = Loaded::load(&node, variant, &empty.rules, &policy.rules, &ifaces);
            check_enforced(&client_ns, src, dst, variant.enforces());
            let before = loaded.allowed_packets(&policy.client_rule);
            let (tcp_ok, tcp_failed) = run_load(&client_ns, src, dst, false, secs);
            let mid = loaded.allowed_packets(&policy.client_rule);
            let (udp_ok, udp_failed) = run_load(&client_ns, src, dst, true, secs);
            let after = loaded.allowed_packets(&policy.client_rule);
            drop(loaded);
            if variant.enforces() {
                // Every successful connection's first packet must have passed the rule.
                assert!(
                    mid - before >= tcp_ok && after - mid >= udp_ok,
                    "{}: rule counter grew by {} (TCP) / {} (UDP) for {tcp_ok} / {udp_ok} \
                     successful flows: some flows did not traverse the rules",
                    variant.label(),
                    mid - before,
                    after - mid
                );
                traversal
                    .entry(variant)
                    .or_default()
                    .push((after - before) as f64 / (tcp_ok + udp_ok) as f64);
            }
            *failures.entry(variant).or_default() += tcp_failed + udp_failed;
            tcp.entry(variant).or_default().push(tcp_ok as f64 / secs);
            udp.entry(variant).or_default().push(udp_ok as f64 / secs);
            eprintln!(
                "round {round} {:<40} tcp {:>8.0}/s  udp {:>8.0}/s  failed {}",
                variant.label(),
                tcp_ok as f64 / secs,
                udp_ok as f64 / secs,
                tcp_failed + udp_failed
            );
        }
    }

    let med = |m: &BTreeMap<Variant, Vec<f64>>, v: Variant| median(&m[&v]);
    let pct = |a: f64, b: f64| format!("{:.1} %", 100.0 * a / b);
    let mut rows = vec![vec![
        "variant".to_string(),
        "TCP conn/s".into(),
        "vs no firewall".into(),
        "vs Palisade no policy".into(),
        "UDP req/s".into(),
        "vs no firewall".into(),
        "vs Palisade no policy".into(),
        "rule hits per flow".into(),
        "failed".into(),
    ]];
    for v in Variant::ALL {
        let (t, u) = (med(&tcp, v), med(&udp, v));
        rows.push(vec![
            v.label().to_string(),
            format!("{t:.0}"),
            pct(t, med(&tcp, Variant::None)),
            pct(t, med(&tcp, Variant::PalisadeEmpty)),
            format!("{u:.0}"),
            pct(u, med(&udp, Variant::None)),
            pct(u, med(&udp, Variant::PalisadeEmpty)),
            traversal
                .get(&v)
                .map_or("-".into(), |x| format!("{:.3}", median(x))),
            failures.get(&v).copied().unwrap_or(0).to_string(),
        ]);
    }
    println!();
    println!("Medians of {rounds} interleaved runs of {secs} s (target: Palisade with the policy ≥ 95 % of no policy):");
    print_table(&rows);
    let p = med(&tcp, Variant::Palisade);
    let i = med(&tcp, Variant::Iptables);
    println!(
        "Palisade / iptables+ipset: TCP {:.2}x, UDP {:.2}x",
        p / i,
        med(&udp, Variant::Palisade) / med(&udp, Variant::Iptables)
    );
}
