//! Flow-log benchmark (issue 10): a flood of denied packets from one lab pod, with the
//! agent's flow log on and off. Pod B is isolated (default deny, no rule allows anything);
//! pod A sends it, as fast as one thread can, for `PALISADE_BENCH_SECONDS` (5) per run,
//! either UDP datagrams each to another port, or TCP SYNs (crafted on a raw socket, each
//! from another source port, as a SYN flood is): every packet a new flow. Runs alternate
//! on and off for `PALISADE_BENCH_ROUNDS` (3) rounds per flood kind. Reported per flood and
//! variant, as medians: the flood's rate, the sender's CPU per packet (the forwarding path
//! and the table's drop, NFLOG included, run in its softirq), the agent process's CPU
//! during the flood, and the lines it wrote. The agent's CPU must follow the kernel's rate
//! limit (10 lines/s and 20 at once per drop rule), not the flood.
//!
//! Run (as root): `cargo bench -p palisade-agent --bench flow_log`
//! (`PALISADE_BENCH_FLOODS`: `udp,syn` by default).

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::{in_netns, median, print_table, sh};
use palisade_policy::model::{PolicyId, PolicyKind};
use palisade_policy::ruleset::{DirectionRules, NodeRuleSet, PodRules};
use socket2::{Domain, Protocol as SocketProtocol, SockAddr, Socket, Type};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rules(lab: &Lab) -> NodeRuleSet {
    let pod = |i: usize, isolated: bool| {
        let p = &lab.pods[i];
        PodRules {
            namespace: p.key.namespace.clone(),
            name: p.key.name.clone(),
            ips: vec![p.ip4],
            ingress: Arc::new(DirectionRules {
                isolated_by: if isolated {
                    vec![PolicyId {
                        kind: PolicyKind::NetworkPolicy,
                        namespace: Some("default".into()),
                        name: "deny-all".into(),
                    }]
                } else {
                    Vec::new()
                },
                ..DirectionRules::default()
            }),
            egress: Arc::default(),
            audit: Default::default(),
        }
    };
    NodeRuleSet {
        node: "node-1".into(),
        pods: vec![pod(0, false), pod(1, true)],
        ..NodeRuleSet::default()
    }
}

struct Agent {
    child: Child,
    port: u16,
}

impl Agent {
    fn start(lab: &Lab, rules_file: &std::path::Path, flow_log: bool, port: u16) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
            .args(["--netns", &lab.node.name, "--rules"])
            .arg(rules_file)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("PALISADE_FLOW_LOG", flow_log.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the agent");
        let agent = Agent { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.metric("palisade_ruleset_generation").unwrap_or(0.0) < 1.0 {
            assert!(Instant::now() < deadline, "the agent applied nothing");
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    fn metric(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// User plus system CPU time of the agent process.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the agent's /proc stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 =
            fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sending thread's own CPU time (softirq work of its sends included).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flood {
    Udp,
    Syn,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::Udp => "udp",
            Flood::Syn => "syn",
        }
    }
}

/// Packets sent from `netns` (address `src`) to `dst` for `secs`: (sent, CPU).
fn flood(kind: Flood, netns: &str, src: IpAddr, dst: IpAddr, secs: f64) -> (u64, Duration) {
    in_netns(netns, move || {
        let mut send: Box<dyn FnMut(u64) -> bool> = match kind {
            Flood::Udp => {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                Box::new(move |n| {
                    let port = 1 + (n % 65_000) as u16;
                    s.send_to(b"x", SocketAddr::new(dst, port)).is_ok()
                })
            }
            Flood::Syn => {
                let s = Socket::new(Domain::IPV4, Type::RAW, Some(SocketProtocol::TCP))
                    .expect("raw TCP socket");
                let to = SockAddr::from(SocketAddr::new(dst, 0));
                Box::new(move |n| {
                    let segment = syn(src, dst, 1024 + (n % 64_000) as u16, 80, n as u32);
                    s.send_to(&segment, &to).is_ok()
                })
            }
        };
        let (start, cpu0) = (Instant::now(), thread_cpu());
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            for _ in 0..256 {
                if send(sent) {
                    sent += 1;
                }
            }
        }
        (sent, thread_cpu() - cpu0)
    })
    .join()
    .expect("flood thread")
}

/// A TCP SYN segment (no options) with its checksum; the kernel adds the IPv4 header.
fn syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seq: u32) -> [u8; 20] {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("the SYN flood is IPv4");
    };
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6, 0, 20]);
    add(&tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    tcp
}

/// One run: (flood, flow log on, packets/s, sender ns per packet, agent CPU ms, lines,
/// suppressed, seconds).
type Run = (Flood, bool, f64, f64, f64, f64, f64, f64);

fn main() {
    if !common::can_run("flow_log") {
        return;
    }
    let secs: f64 = env_or("PALISADE_BENCH_SECONDS", 5.0);
    let rounds: usize = env_or("PALISADE_BENCH_ROUNDS", 3);
    let lab = Lab::new(61, &["default/a", "default/b"]);
    let dir = std::env::temp_dir().join(format!("palisade-bench-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rules_file = dir.join("node.json");
    std::fs::write(
        &rules_file,
        serde_json::to_string(&rules(&lab)).expect("json"),
    )
    .expect("write");
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let port = 20_000 + (std::process::id() % 20_000) as u16;

    let floods: Vec<Flood> = std::env::var("PALISADE_BENCH_FLOODS")
        .unwrap_or_else(|_| "udp,syn".into())
        .split(',')
        .map(|k| match k.trim() {
            "udp" => Flood::Udp,
            "syn" => Flood::Syn,
            other => panic!("PALISADE_BENCH_FLOODS: {other:?} is neither udp nor syn"),
        })
        .collect();

    let mut results: Vec<Run> = Vec::new();
    for &kind in &floods {
        for round in 0..rounds {
            for flow_log in [round % 2 == 0, round % 2 != 0] {
                let agent = Agent::start(&lab, &rules_file, flow_log, port);
                let lines0 = agent.metric("palisade_flow_log_lines_total").unwrap_or(0.0);
                let supp0 = agent
                    .metric("palisade_flow_log_suppressed_packets_total")
                    .unwrap_or(0.0);
                let cpu0 = agent.cpu();
                let (sent, sender_cpu) = flood(kind, &a.netns.name, a.ip4, b.ip4, secs);
                // Lines still in flight reach the agent within its next reads.
                std::thread::sleep(Duration::from_millis(300));
                let agent_cpu = agent.cpu() - cpu0;
                let lines = agent.metric("palisade_flow_log_lines_total").unwrap_or(0.0) - lines0;
                let suppressed = agent
                    .metric("palisade_flow_log_suppressed_packets_total")
                    .unwrap_or(0.0)
                    - supp0;
                results.push((
                    kind,
                    flow_log,
                    sent as f64 / secs,
                    sender_cpu.as_nanos() as f64 / sent.max(1) as f64,
                    agent_cpu.as_secs_f64() * 1000.0,
                    lines,
                    suppressed,
                    secs,
                ));
                drop(agent);
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &lab.node.name,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    "palisade",
                ]);
            }
        }
    }
    let mut rows = vec![vec![
        "flood".to_string(),
        "flow log".into(),
        "packets/s".into(),
        "sender ns/packet".into(),
        "agent CPU ms".into(),
        "lines".into(),
        "suppressed".into(),
        "met the log chain".into(),
    ]];
    for &kind in &floods {
        for on in [false, true] {
            let of = |f: fn(&Run) -> f64| {
                median(
                    &results
                        .iter()
                        .filter(|r| r.0 == kind && r.1 == on)
                        .map(f)
                        .collect::<Vec<_>>(),
                )
            };
            rows.push(vec![
                kind.name().to_string(),
                if on { "on" } else { "off" }.to_string(),
                format!("{:.0}", of(|r| r.2)),
                format!("{:.0}", of(|r| r.3)),
                format!("{:.1}", of(|r| r.4)),
                format!("{:.0}", of(|r| r.5)),
                format!("{:.0}", of(|r| r.6)),
                if on {
                    // Each packet is logged or counted as suppressed: its share of those
                    // sent shows the flood reached the table (veth queues drop the rest).
                    format!("{:.1} %", of(|r| 100.0 * (r.5 + r.6) / (r.2 * r.7)))
                } else {
                    "-".into()
                },
            ]);
        }
    }
    println!("Floods of denied packets from one pod, {secs} s per run, {rounds} rounds (medians):");
    print_table(&rows);
    let _ = std::fs::remove_dir_all(&dir);
}
