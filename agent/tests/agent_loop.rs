//! The agent's own loop against a real kernel, with the real `palisade-agent` binary in
//! network namespaces of its own:
//! - drift made by another process is repaired at once, not at the periodic reconcile
//!   (issue 12.5), and the agent's own changes do not count as drift;
//! - a restart adopts an unchanged table with its counters, and replaces, saying so, a
//!   table left without base chains (issue 12.10);
//! - a transaction that fails (no file descriptors, the finding of issue 12.3) is counted
//!   and retried until the kernel holds the rules, with no new input (issue 13.5);
//! - `max_host_addresses` refuses a rule set with a clear error and a metric, the last
//!   rules staying in force, and a big host set loads (issue 12.8).

mod common;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::*;
use common::*;
use palisade_policy::model::{Action, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance,
};
use palisade_policy::AddrSet;

const GROUP: &str = "g-00000000000000fa";
const RULE: &str = "r-00000000000000f1";

fn np(name: &str) -> PolicyId {
    PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some("default".into()),
        name: name.into(),
    }
}

/// b isolated for ingress, allowing TCP 7070 from the group's addresses; with `b_isolated`
/// false, no pods at all.
fn rules(b_ip: IpAddr, allowed: Vec<IpAddr>, b_isolated: bool) -> NodeRuleSet {
    let allow = RuleInstance {
        rule: RULE.into(),
        action: Action::Allow,
        clauses: vec![Clause::PeerPort {
            peers: Some(vec![GROUP.into()]),
            ports: Some(vec![PortRange {
                protocol: Protocol::Tcp,
                start: 7070,
                end: 7070,
            }]),
        }],
    };
    let pods = b_isolated
        .then(|| PodRules {
            namespace: "default".into(),
            name: "b".into(),
            ips: vec![b_ip],
            ingress: DirectionRules {
                isolated_by: vec![np("b")],
                network_policy: vec![allow],
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
        groups: [(
            GROUP.to_string(),
            Group::Hosts(AddrSet::from_addrs(allowed)).into(),
        )]
        .into_iter()
        .collect(),
        rules: [(
            RULE.to_string(),
            RuleOrigin {
                policy: np("b"),
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

fn write_rules(path: &Path, rules: &NodeRuleSet) {
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

/// The agent and everything it logged so far.
struct Running {
    agent: Agent,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

fn start(lab: &Lab, rules_file: &Path, port: u16, env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade-agent"));
    cmd.args([
        "--netns",
        &lab.node,
        "--rules",
        rules_file.to_str().unwrap(),
    ])
    .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
    .args(["--poll-interval-ms", "100"])
    // Only the event watch can repair drift within a test's time.
    .args(["--reconcile-interval-secs", "3600"])
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // The agent logs to stdout.
    let output = child.stdout.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    Running {
        agent: Agent(child),
        log,
    }
}

struct Setup {
    lab: Lab,
    _servers: Servers,
    _dir: Dir,
    rules_file: PathBuf,
    port: u16,
}

fn setup(tag: &str, subnet: u8, initial: impl Fn(&Lab) -> NodeRuleSet) -> Setup {
    let lab = Lab::new(tag, subnet, &["default/a", "default/b"]);
    let servers = Servers::start(&lab.pod("b").netns, &[7070], &[]);
    let dir = Dir(std::env::temp_dir().join(format!("palisade-{tag}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let rules_file = dir.0.join("rules.json");
    write_rules(&rules_file, &initial(&lab));
    let port = 20_000 + (std::process::id() % 20_000) as u16 + 100 + u16::from(subnet);
    Setup {
        lab,
        _servers: servers,
        _dir: dir,
        rules_file,
        port,
    }
}

fn ready(port: u16) {
    eventually("/readyz 200", || {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    });
}

fn metric(port: u16, series: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics")?;
    metric_value(&text, series)
}

fn generation(port: u16) -> f64 {
    metric(port, "palisade_ruleset_generation").unwrap_or(-1.0)
}

/// `nft ARGS` in the node namespace: (success, stdout).
fn nft(lab: &Lab, args: &str) -> (bool, String) {
    let mut full = vec!["netns", "exec", &lab.node, "nft"];
    full.extend(args.split_whitespace());
    let out = Command::new("ip").args(&full).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Makes `drift` by hand, then waits (up to a generous 5 s) until `repaired` holds and the
/// agent rewrote the table; prints the time taken.
fn drift_repaired(s: &Setup, what: &str, drift: &str, repaired: impl Fn() -> bool) -> Duration {
    let before = generation(s.port);
    let start = Instant::now();
    let (ok, _) = nft(&s.lab, drift);
    assert!(ok, "nft {drift}");
    let deadline = start + Duration::from_secs(5);
    while !repaired() {
        assert!(Instant::now() < deadline, "{what}: not repaired within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = start.elapsed();
    eventually(&format!("{what}: the agent's generation moved"), || {
        generation(s.port) > before
    });
    println!("drift repair, {what}: {:.0} ms", took.as_secs_f64() * 1e3);
    took
}

#[test]
fn drift_is_repaired_at_once_and_our_own_changes_are_not_drift() {
    if !runnable("drift_is_repaired_at_once_and_our_own_changes_are_not_drift") {
        return;
    }
    let s = setup("v", 40, |lab| {
        rules(lab.pod("b").ip4, vec![lab.pod("a").ip4], true)
    });
    let (a_ns, a_ip, b_ip) = (
        s.lab.pod("a").netns.clone(),
        s.lab.pod("a").ip4,
        s.lab.pod("b").ip4,
    );
    let agent = start(&s.lab, &s.rules_file, s.port, &[]);
    ready(s.port);
    assert!(tcp_ok(&a_ns, b_ip, 7070), "a allowed to b");
    let set = format!("{GROUP}_4");
    let table = || nft(&s.lab, "list table inet palisade");

    // The agent's own changes are not drift: an update is one more generation, no more.
    const WOKEN: &str = "changed by another process";
    let woken = || agent.log().matches(WOKEN).count();
    let g0 = generation(s.port);
    write_rules(
        &s.rules_file,
        &rules(b_ip, vec![a_ip, "10.77.40.201".parse().unwrap()], true),
    );
    eventually("the update applied", || table().1.contains("10.77.40.201"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(generation(s.port), g0 + 1.0, "{}", agent.log());
    assert_eq!(woken(), 0, "our own changes are not drift: {}", agent.log());

    let mut times = Vec::new();
    times.push(drift_repaired(
        &s,
        "deleted table",
        "delete table inet palisade",
        || table().1.contains("hook forward"),
    ));
    times.push(drift_repaired(
        &s,
        "rogue rule in our chain",
        "insert rule inet palisade forward counter accept comment \"rogue\"",
        || !table().1.contains("rogue"),
    ));
    times.push(drift_repaired(
        &s,
        "added set element",
        &format!("add element inet palisade {set} {{ 10.77.40.99 }}"),
        || !table().1.contains("10.77.40.99"),
    ));
    assert!(tcp_ok(&a_ns, b_ip, 7070), "a still allowed");
    // One wake-up per foreign transaction; the repairs themselves are ours.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(woken(), 3, "{}", agent.log());
    println!("drift repair times: {times:?}");
}

fn deny_counter(port: u16) -> f64 {
    metric(
        port,
        r#"palisade_default_deny_packets_total{direction="ingress",namespace="default",pod="b"}"#,
    )
    .unwrap_or(0.0)
}

#[test]
fn a_restart_adopts_an_unchanged_table_with_its_counters() {
    if !runnable("a_restart_adopts_an_unchanged_table_with_its_counters") {
        return;
    }
    // a is not in the group: its connections to b are dropped and counted.
    let s = setup("x", 41, |lab| {
        rules(
            lab.pod("b").ip4,
            vec!["10.77.41.200".parse().unwrap()],
            true,
        )
    });
    let (a_ns, b_ip) = (s.lab.pod("a").netns.clone(), s.lab.pod("b").ip4);
    let first = start(&s.lab, &s.rules_file, s.port, &[]);
    ready(s.port);
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "a denied");
    let counted = deny_counter(s.port);
    assert!(counted > 0.0, "denied SYNs counted");
    drop(first);

    let second = start(&s.lab, &s.rules_file, s.port, &[]);
    ready(s.port);
    let kept = deny_counter(s.port);
    assert!(
        kept >= counted,
        "counter {counted} before the restart, {kept} after: {}",
        second.log()
    );
    assert!(second.log().contains("adopted"), "{}", second.log());
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "a still denied");
    drop(second);

    // Changed rules are not adopted: the table is replaced.
    write_rules(&s.rules_file, &rules(b_ip, vec![s.lab.pod("a").ip4], true));
    let third = start(&s.lab, &s.rules_file, s.port, &[]);
    ready(s.port);
    assert!(tcp_ok(&a_ns, b_ip, 7070), "a allowed by the new rules");
    assert!(third.log().contains("differs"), "{}", third.log());
}

#[test]
fn a_table_without_base_chains_is_replaced_and_the_log_says_so() {
    if !runnable("a_table_without_base_chains_is_replaced_and_the_log_says_so") {
        return;
    }
    let s = setup("y", 42, |lab| {
        rules(
            lab.pod("b").ip4,
            vec!["10.77.42.200".parse().unwrap()],
            true,
        )
    });
    let (a_ns, b_ip) = (s.lab.pod("a").netns.clone(), s.lab.pod("b").ip4);
    // What a first load killed after its first step leaves: chains, no hook.
    for cmd in [
        "add table inet palisade",
        "add chain inet palisade ingress/default/b",
        "add rule inet palisade ingress/default/b drop",
    ] {
        assert!(nft(&s.lab, cmd).0, "{cmd}");
    }
    assert!(
        tcp_ok(&a_ns, b_ip, 7070),
        "the incomplete table filters nothing"
    );
    let agent = start(&s.lab, &s.rules_file, s.port, &[]);
    ready(s.port);
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "enforced after the replacement");
    assert!(
        agent.log().contains("found incomplete (no base chains"),
        "{}",
        agent.log()
    );
}

/// Sets the soft descriptor limit of `pid`, returning the old (soft, hard).
fn set_nofile(pid: u32, soft: u64) -> (u64, u64) {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the old limit into `old`, no new limit.
    let rc = unsafe {
        libc::prlimit64(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit read: {}", std::io::Error::last_os_error());
    let new = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: a valid limit for a live process of ours.
    let rc = unsafe {
        libc::prlimit64(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit set: {}", std::io::Error::last_os_error());
    (old.rlim_cur, old.rlim_max)
}

#[test]
fn a_failed_transaction_is_counted_and_retried_until_the_kernel_holds_the_rules() {
    if !runnable("a_failed_transaction_is_counted_and_retried_until_the_kernel_holds_the_rules") {
        return;
    }
    let s = setup("z", 43, |lab| {
        rules(
            lab.pod("b").ip4,
            vec!["10.77.43.200".parse().unwrap()],
            true,
        )
    });
    let (a_ns, b_ip) = (s.lab.pod("a").netns.clone(), s.lab.pod("b").ip4);
    let agent = start(&s.lab, &s.rules_file, s.port, &[]);
    ready(s.port);
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "b isolated");
    assert_eq!(metric(s.port, "palisade_apply_errors_total"), Some(0.0));
    let generation_before = generation(s.port);

    // Two descriptors to spare: the rules file loads, but `nft` (three pipes) cannot start.
    let pid = agent.agent.0.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let (soft, _) = set_nofile(pid, open + 2);
    // Removing b's chain is an nft transaction, not a netlink element batch.
    write_rules(&s.rules_file, &rules(b_ip, vec![], false));
    eventually("the transaction failed for want of descriptors", || {
        agent.log().contains("transaction failed")
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!tcp_ok(&a_ns, b_ip, 7070), "the last good table stays");
    set_nofile(pid, soft);

    // No new input from here on: only a retry can bring the update in.
    eventually_within(40, "the failed transaction retried and applied", || {
        tcp_ok(&a_ns, b_ip, 7070)
    });
    eventually("apply errors counted", || {
        metric(s.port, "palisade_apply_errors_total").is_some_and(|e| e >= 1.0)
    });
    eventually("a new generation in force", || {
        generation(s.port) > generation_before
    });
    ready(s.port);
    let (_, table) = nft(&s.lab, "list table inet palisade");
    assert!(!table.contains("ingress/default/b"), "{table}");
}

#[test]
fn max_host_addresses_refuses_a_bigger_rule_set_and_keeps_the_last() {
    if !runnable("max_host_addresses_refuses_a_bigger_rule_set_and_keeps_the_last") {
        return;
    }
    let s = setup("c", 44, |lab| {
        rules(lab.pod("b").ip4, vec![lab.pod("a").ip4], true)
    });
    let (a_ns, b_ip) = (s.lab.pod("a").netns.clone(), s.lab.pod("b").ip4);
    let agent = start(
        &s.lab,
        &s.rules_file,
        s.port,
        &[("PALISADE_MAX_HOST_ADDRESSES", "4")],
    );
    ready(s.port);
    assert!(tcp_ok(&a_ns, b_ip, 7070), "a allowed");
    assert_eq!(metric(s.port, "palisade_host_addresses"), Some(1.0));
    assert_eq!(
        metric(s.port, "palisade_host_addresses_over_cap"),
        Some(0.0)
    );

    // Five addresses, a not among them: would deny a, but is over the cap.
    let five = (10..15)
        .map(|i| format!("10.77.44.{i}").parse().unwrap())
        .collect();
    write_rules(&s.rules_file, &rules(b_ip, five, true));
    eventually("the over-cap metric", || {
        metric(s.port, "palisade_host_addresses_over_cap") == Some(1.0)
    });
    assert_eq!(metric(s.port, "palisade_host_addresses"), Some(5.0));
    let log = agent.log();
    assert!(
        log.contains("holds 5 host addresses, more than max_host_addresses (4)"),
        "{log}"
    );
    assert!(
        tcp_ok(&a_ns, b_ip, 7070),
        "the last good rules stay in force"
    );
}

#[test]
fn a_host_set_of_200000_addresses_loads() {
    if !runnable("a_host_set_of_200000_addresses_loads") {
        return;
    }
    let lab = Lab::new("l", 45, &["default/a", "default/b"]);
    let (a_ip, b_ip) = (lab.pod("a").ip4, lab.pod("b").ip4);
    // 200,000 addresses in 10.128.0.0/14, a among them at the end.
    let mut allowed: Vec<IpAddr> = (0..199_999u32)
        .map(|i| IpAddr::V4((0x0a80_0000 + i).into()))
        .collect();
    allowed.push(a_ip);
    let rs = rules(b_ip, allowed, true);
    let mut applier = palisade_agent::Applier::new(palisade_agent::Nft::in_netns(&lab.node));
    let table = palisade_agent::render(&rs, &lab.interfaces()).unwrap();
    let start = Instant::now();
    let out = applier.apply(&table).expect("loads");
    println!(
        "200,000 host addresses: first load {:.0} ms {:?}",
        start.elapsed().as_secs_f64() * 1e3,
        out.phases
    );
    let _servers = Servers::start(&lab.pod("b").netns, &[7070], &[]);
    assert!(
        tcp_ok(&lab.pod("a").netns, b_ip, 7070),
        "the last address loaded"
    );
    // A restart with the same rules compares the digest of the 200,000 elements the kernel
    // holds with the rules' and keeps the table: every element loaded.
    let start = Instant::now();
    let mut restarted = palisade_agent::Applier::new(palisade_agent::Nft::in_netns(&lab.node));
    let adopted = restarted.apply(&table).expect("adopts");
    assert_eq!(adopted.kind, palisade_agent::ApplyKind::Adopted);
    println!(
        "200,000 host addresses: adoption at restart {:.0} ms (debug build)",
        start.elapsed().as_secs_f64() * 1e3
    );
    let _ = nft(&lab, "delete table inet palisade");
}

/// One acknowledgement per message of a netlink batch: 1,500 of them (five groups of a
/// million addresses) overflowed the socket's default receive buffer, and every load
/// failed with "No buffer space available". 2,000 one-element messages reach the same
/// count cheaply.
#[test]
fn a_batch_of_2000_messages_is_acknowledged_without_overflow() {
    if !runnable("a_batch_of_2000_messages_is_acknowledged_without_overflow") {
        return;
    }
    use palisade_agent::nfnl::setelem::{self, Change, Op};
    use palisade_agent::render::{AddrRange, SetElement};
    let lab = Lab::new("o", 46, &[]);
    for cmd in [
        "add table inet palisade",
        "add set inet palisade hosts { type ipv4_addr ; size 4096 ; }",
    ] {
        assert!(nft(&lab, cmd).0, "{cmd}");
    }
    let elements: Vec<SetElement> = (0..2000u32)
        .map(|i| {
            let ip = IpAddr::V4((0x0a80_0000 + i).into());
            SetElement::Addr(AddrRange { lo: ip, hi: ip })
        })
        .collect();
    let changes: Vec<Change<'_>> = elements
        .chunks(1)
        .map(|e| Change {
            set: "hosts",
            kind: palisade_agent::render::SetKind::Hosts(palisade_agent::render::IpFamily::V4),
            op: Op::Add,
            elements: e,
        })
        .collect();
    let mut socket = palisade_agent::nfnl::NfnlSocket::open(Some(&lab.node)).unwrap();
    setelem::apply(&mut socket, "palisade", &changes).expect("2,000 messages in one batch");
    let (_, listed) = nft(&lab, "list set inet palisade hosts");
    assert_eq!(listed.matches("10.1").count(), 2000, "{listed}");
    let _ = nft(&lab, "delete table inet palisade");
}

/// The scratch table a restart compares through is dormant: its base chains, with no host
/// set elements loaded, would otherwise drop allowed traffic while it exists.
#[test]
fn the_scratch_table_filters_nothing() {
    if !runnable("the_scratch_table_filters_nothing") {
        return;
    }
    use palisade_agent::nfnl::scratch;
    let lab = Lab::new("q", 47, &["default/a", "default/b"]);
    let _servers = Servers::start(&lab.pod("b").netns, &[7070], &[]);
    let (a_ns, b_ip) = (lab.pod("a").netns.clone(), lab.pod("b").ip4);
    let mut socket = palisade_agent::nfnl::NfnlSocket::open(Some(&lab.node)).unwrap();
    scratch::create_dormant(&mut socket, scratch::TABLE).unwrap();
    let chain = format!(
        "add chain inet {} forward {{ type filter hook forward priority 0 ; policy drop ; }}",
        scratch::TABLE
    );
    assert!(nft(&lab, &chain).0, "{chain}");
    let (_, listed) = nft(&lab, &format!("list table inet {}", scratch::TABLE));
    assert!(listed.contains("dormant"), "{listed}");
    assert!(
        tcp_ok(&a_ns, b_ip, 7070),
        "a dormant table's base chain drops nothing"
    );
    scratch::delete(&mut socket, scratch::TABLE).unwrap();
    assert!(!nft(&lab, &format!("list table inet {}", scratch::TABLE)).0);
}
