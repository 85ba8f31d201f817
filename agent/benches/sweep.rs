//! Conntrack sweep cost (issue 10.4): what the agent's post-transaction sweep
//! ([`palisade_agent::sweep::Sweeper`]) costs on a node whose conntrack table is large.
//!
//! The agent sweeps after a transaction that starts enforcement for a pod (a new pod, an
//! interface re-created, its first start) and, in strict mode, after every rule change: it
//! dumps the node's whole table, judges every entry against the rules and deletes those
//! they deny. The bench fills the node namespace's table with real forwarded UDP flows
//! from a client pod to a server pod (distinct source and destination ports, so one entry
//! each), then times a sweep at enforcement start in two cases:
//!
//! - **keep all**: the rules allow every flow (the common case: a new pod that breaks
//!   nothing), so the cost is the dump and the judging;
//! - **cut half**: the server's ingress allows two of the four destination ports, so half
//!   the entries are deleted, one netlink request each.
//!
//! Reported per table size: entries found, the sweep's wall time and the thread's CPU time
//! (user + system: the kernel's dump and delete work is charged to the sweeping thread),
//! and per entry, and the user part of that CPU (the rest is the kernel's). The dump alone
//! is timed too.
//!
//! Run (as root): `cargo bench -p palisade-agent --bench sweep`
//! (`PALISADE_BENCH_SWEEP_ENTRIES`, default `10000,50000,200000`, below the kernel's global
//! `nf_conntrack_max`; `PALISADE_BENCH_ROUNDS`, default 3).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::{in_netns, median, ms, print_table, rule_id};
use palisade_agent::nfnl::conntrack::Conntrack;
use palisade_agent::render::entry_chain;
use palisade_agent::sweep::Sweeper;
use palisade_agent::{render, Applier, Interfaces, Nft};
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, NodeRuleSet, PodRules, PortRange, RuleInstance,
};

const SUBNET: u8 = 61;
/// Destination ports of the flows; the "cut half" rules allow the first two.
const PORTS: [u16; 4] = [7_000, 7_001, 7_002, 7_003];
const FIRST_SOURCE_PORT: u16 = 10_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !common::can_run("sweep") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("PALISADE_BENCH_SWEEP_ENTRIES")
        .unwrap_or_else(|_| "10000,50000,200000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("PALISADE_BENCH_SWEEP_ENTRIES: sizes")
        })
        .collect();
    let rounds: usize = env_or("PALISADE_BENCH_ROUNDS", 3);
    let lab = Lab::new(SUBNET, &["bench/client", "bench/server"]);
    // Unreplied UDP entries live 30 s by default: long enough for a fill and a sweep of
    // the largest table, but the cut-half case must not see last round's entries expire
    // under it, so they live longer and each round starts from an emptied table.
    lab.node
        .sysctl("net.netfilter.nf_conntrack_udp_timeout=300");
    let ifaces = lab.interfaces();
    let allow_all = rules(&lab, false);
    let cut_half = rules(&lab, true);
    // Conntrack runs in a namespace only once a table there uses it.
    let table = render(&allow_all, &ifaces).expect("render");
    Applier::new(Nft::in_netns(&lab.node.name))
        .apply(&table)
        .expect("apply palisade table");

    let mut rows = vec![vec![
        "entries".to_string(),
        "case".into(),
        "found".into(),
        "deleted".into(),
        "dump ms".into(),
        "sweep ms".into(),
        "sweep CPU ms".into(),
        "of it user".into(),
        "CPU µs/entry".into(),
    ]];
    for &size in &sizes {
        for (case, rules) in [("keep all", &allow_all), ("cut half", &cut_half)] {
            let mut runs = Vec::new();
            for _ in 0..rounds {
                flush(&lab);
                fill(&lab, size);
                runs.push(sweep_once(&lab, rules, &ifaces));
            }
            let pick = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
            let found = pick(|r| r.found as f64);
            let cpu = pick(|r| r.cpu_ms);
            rows.push(vec![
                size.to_string(),
                case.into(),
                format!("{found:.0}"),
                format!("{:.0}", pick(|r| r.deleted as f64)),
                format!("{:.1}", pick(|r| r.dump_ms)),
                format!("{:.1}", pick(|r| r.sweep_ms)),
                format!("{cpu:.1}"),
                format!("{:.1}", pick(|r| r.user_ms)),
                format!("{:.2}", cpu * 1000.0 / found.max(1.0)),
            ]);
        }
    }
    println!(
        "conntrack sweep at enforcement start, medians of {rounds} rounds (node table filled with forwarded UDP flows):"
    );
    print_table(&rows);
    flush(&lab);
}

struct Run {
    found: usize,
    deleted: usize,
    dump_ms: f64,
    sweep_ms: f64,
    cpu_ms: f64,
    user_ms: f64,
}

/// One dump alone, then one sweep (a fresh [`Sweeper`] that knows no enforced pod, as at
/// the agent's first start), both inside the node namespace.
fn sweep_once(lab: &Lab, rules: &NodeRuleSet, ifaces: &Interfaces) -> Run {
    let dispatch: BTreeMap<String, String> = lab
        .pods
        .iter()
        .map(|p| (p.veth.clone(), entry_chain(&p.key, Direction::Egress)))
        .collect();
    let (rules, ifaces) = (rules.clone(), ifaces.clone());
    in_netns(&lab.node.name, move || {
        let started = Instant::now();
        let found = Conntrack::open(None)
            .expect("conntrack socket")
            .dump()
            .expect("dump")
            .len();
        let dump_ms = ms(started.elapsed());
        let registry = prometheus::Registry::new();
        let mut sweeper = Sweeper::new(false, BTreeMap::new(), &registry);
        assert!(
            sweeper.due(&rules, &ifaces, &dispatch),
            "enforcement starts"
        );
        let cpu = thread_cpu();
        let started = Instant::now();
        let deleted = sweeper
            .sweep(&rules, &ifaces, &dispatch, &BTreeSet::new())
            .expect("sweep");
        let sweep_ms = ms(started.elapsed());
        let (user, system) = thread_cpu();
        let (user_ms, cpu_ms) = (ms(user - cpu.0), ms(user + system - cpu.0 - cpu.1));
        Run {
            found,
            deleted,
            dump_ms,
            sweep_ms,
            cpu_ms,
            user_ms,
        }
    })
    .join()
    .expect("sweep thread")
}

/// `size` forwarded UDP flows from the client to the server: every (source port,
/// destination port) pair once, so one conntrack entry each. The server has no listener;
/// its port-unreachable answers are rate-limited and do not remove entries.
fn fill(lab: &Lab, size: usize) {
    let (client, server) = (&lab.pods[0], &lab.pods[1]);
    let per_port = size.div_ceil(PORTS.len());
    assert!(
        usize::from(FIRST_SOURCE_PORT) + per_port <= usize::from(u16::MAX),
        "at most {} entries",
        (usize::from(u16::MAX) - usize::from(FIRST_SOURCE_PORT)) * PORTS.len()
    );
    let (client_ip, server_ip) = (client.ip4, server.ip4);
    in_netns(&client.netns.name, move || {
        let mut sent = 0;
        'fill: for i in 0..per_port {
            let source = SocketAddr::new(client_ip, FIRST_SOURCE_PORT + i as u16);
            let socket = UdpSocket::bind(source).expect("bind a client port");
            for port in PORTS {
                if sent == size {
                    break 'fill;
                }
                socket
                    .send_to(b"x", SocketAddr::new(server_ip, port))
                    .expect("send");
                sent += 1;
            }
        }
    })
    .join()
    .expect("fill thread");
    // The last datagrams are still being forwarded when the sender returns.
    std::thread::sleep(Duration::from_millis(200));
}

/// Removes every entry of the node namespace.
fn flush(lab: &Lab) {
    in_netns(&lab.node.name, || {
        let mut ct = Conntrack::open(None).expect("conntrack socket");
        for entry in ct.dump().expect("dump") {
            let _ = ct.delete(&entry);
        }
    })
    .join()
    .expect("flush thread");
}

/// The client without policy; the server open to everything (`cut_half`: false) or, from
/// the client, only to UDP ports of the first half of [`PORTS`].
fn rules(lab: &Lab, cut_half: bool) -> NodeRuleSet {
    let mut rules = NodeRuleSet {
        node: "bench".into(),
        ..NodeRuleSet::default()
    };
    let mut ingress = DirectionRules::default();
    if cut_half {
        let policy = PolicyId {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some("bench".into()),
            name: "half".into(),
        };
        let origin = RuleOrigin {
            policy: policy.clone(),
            tier: Tier::NetworkPolicy,
            priority: 0,
            direction: Direction::Ingress,
            index: 0,
            name: None,
        };
        let id = rule_id(&format!("{origin:?}"));
        std::sync::Arc::make_mut(&mut rules.rules).insert(id.clone(), origin);
        ingress.isolated_by = vec![policy];
        ingress.network_policy = vec![RuleInstance {
            rule: id,
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: None,
                ports: Some(vec![PortRange {
                    protocol: Protocol::Udp,
                    start: PORTS[0],
                    end: PORTS[1],
                }]),
            }],
        }];
    }
    let ingress = Arc::new(ingress);
    rules.pods = lab
        .pods
        .iter()
        .map(|p| PodRules {
            namespace: p.key.namespace.clone(),
            name: p.key.name.clone(),
            ips: vec![p.ip4],
            ingress: if p.key.name == "server" {
                ingress.clone()
            } else {
                Default::default()
            },
            egress: Default::default(),
            audit: Default::default(),
        })
        .collect();
    rules
}

/// CPU time (user, system) of the calling thread.
fn thread_cpu() -> (Duration, Duration) {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    (tv(usage.user_time()), tv(usage.system_time()))
}
