//! Issue 12.3: a flood of idle, half-sent HTTP requests on the metrics port must not lose a
//! rule update, and an update whose load failed must be retried until it succeeds. Real
//! `palisade-agent` binary with a low descriptor limit (`prlimit`), real connections, real
//! packets in network namespaces of its own.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::agent::*;
use common::*;
use palisade_policy::model::{PolicyId, PolicyKind};
use palisade_policy::ruleset::{DirectionRules, NodeRuleSet, PodRules};

/// The agent's descriptor limit: a few dozen in use normally, the flood is bigger.
const NOFILE: u32 = 160;
const FLOOD: usize = 400;

fn runnable(test: &str) -> bool {
    let prlimit = Command::new("prlimit").arg("--version").output().is_ok();
    if !prlimit {
        println!("SKIPPED {test}: prlimit (util-linux) not installed");
        assert!(
            std::env::var("PALISADE_NO_SKIP").as_deref() != Ok("1"),
            "{test}: prlimit missing and PALISADE_NO_SKIP=1"
        );
    }
    prlimit && common::agent::runnable(test)
}

/// b isolated for ingress with nothing allowed, or (`isolated` false) no rules at all.
fn rules(b_ip: IpAddr, isolated: bool) -> NodeRuleSet {
    let pods = isolated
        .then(|| PodRules {
            namespace: "default".into(),
            name: "b".into(),
            ips: vec![b_ip],
            ingress: DirectionRules {
                isolated_by: vec![PolicyId {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some("default".into()),
                    name: "b".into(),
                }],
                ..DirectionRules::default()
            }
            .into(),
            egress: Default::default(),
            audit: Default::default(),
        })
        .into_iter()
        .collect();
    NodeRuleSet {
        node: "node-1".into(),
        node_addresses: vec![],
        pods,
        groups: Default::default(),
        rules: Default::default(),
    }
}

fn write_rules(path: &Path, rules: &NodeRuleSet) {
    // Renamed into place: a complete write.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string(rules).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the agent under `prlimit --nofile=NOFILE` with `env` settings.
fn start_agent(lab: &Lab, rules_file: &Path, port: u16, env: &[(&str, &str)]) -> Agent {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg(env!("CARGO_BIN_EXE_palisade-agent"))
        .args([
            "--netns",
            &lab.node,
            "--rules",
            rules_file.to_str().unwrap(),
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--poll-interval-ms", "100"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Agent(cmd.spawn().unwrap())
}

/// Up to `n` connections that each send half a request and then say nothing; stops when
/// the listener's backlog is full.
fn flood(port: u16, n: usize) -> Vec<TcpStream> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut idle = Vec::new();
    while idle.len() < n {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            break;
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        idle.push(s);
    }
    idle
}

fn setup(tag: &str, subnet: u8) -> (Lab, Servers, Dir, PathBuf, u16) {
    let lab = Lab::new(tag, subnet, &["default/a", "default/b"]);
    let servers = Servers::start(&lab.pod("b").netns, &[7070], &[]);
    let dir = Dir(std::env::temp_dir().join(format!("palisade-{tag}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let rules_file = dir.0.join("rules.json");
    write_rules(&rules_file, &rules(lab.pod("b").ip4, true));
    let port = 20_000 + (std::process::id() % 20_000) as u16 + u16::from(subnet);
    (lab, servers, dir, rules_file, port)
}

#[test]
fn metrics_flood_neither_starves_updates_nor_stays_open() {
    if !runnable("metrics_flood_neither_starves_updates_nor_stays_open") {
        return;
    }
    let (lab, _servers, _dir, rules_file, port) = setup("f", 22);
    let (a_ns, b_ip) = (lab.pod("a").netns.clone(), lab.pod("b").ip4);
    let _agent = start_agent(
        &lab,
        &rules_file,
        port,
        &[("PALISADE_METRICS_HEADER_TIMEOUT_MS", "1500")],
    );
    eventually("/readyz 200", || {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    });
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "b isolated");

    let mut idle = flood(port, FLOOD);
    assert!(idle.len() > 100, "the flood connected: {}", idle.len());
    // An update during the flood is enforced during the flood.
    write_rules(&rules_file, &rules(b_ip, false));
    eventually("b open after the update, flood still connected", || {
        tcp_ok(&a_ns, b_ip, 7070)
    });
    // The half-sent requests are closed by the server after the header time-out (a read
    // that times out means the connection is still open).
    let closed = idle
        .iter_mut()
        .take(40)
        .filter(|s| {
            let mut s: &TcpStream = s;
            s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(_n) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .count();
    assert_eq!(closed, 40, "idle connections closed by the server");
    drop(idle);
    eventually("/healthz after the flood", || {
        matches!(http_get(port, "/healthz"), Some((200, _)))
    });

    // Only GET is answered.
    for method in ["POST", "PUT", "DELETE"] {
        let (status, text) = http(port, method, "/metrics").expect("an answer");
        assert_eq!(status, 405, "{method}: {text}");
        assert!(text.to_ascii_lowercase().contains("allow: get"), "{text}");
    }
}

#[test]
fn a_load_that_failed_is_retried_until_it_succeeds() {
    if !runnable("a_load_that_failed_is_retried_until_it_succeeds") {
        return;
    }
    let (lab, _servers, _dir, rules_file, port) = setup("g", 23);
    let (a_ns, b_ip) = (lab.pod("a").netns.clone(), lab.pod("b").ip4);
    // No connection cap to speak of, and slow time-outs: the flood takes every descriptor.
    let agent = start_agent(
        &lab,
        &rules_file,
        port,
        &[
            ("PALISADE_METRICS_MAX_CONNECTIONS", "100000"),
            ("PALISADE_METRICS_HEADER_TIMEOUT_MS", "600000"),
            ("PALISADE_METRICS_CONNECTION_TIMEOUT_SECS", "600"),
        ],
    );
    eventually("/readyz 200", || {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    });
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "b isolated");

    let pid = agent.0.id();
    let open = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let mut idle = flood(port, FLOOD);
    eventually("every descriptor of the agent taken", || {
        idle.extend(flood(port, 20));
        open() >= NOFILE as usize - 1
    });
    write_rules(&rules_file, &rules(b_ip, false));
    // The load fails with "Too many open files" while the flood lasts.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "no update without descriptors");
    drop(idle);
    // Nothing changes in the file from here on: only a retry can bring the update in.
    eventually_within(40, "the failed load retried and applied", || {
        tcp_ok(&a_ns, b_ip, 7070)
    });
}
