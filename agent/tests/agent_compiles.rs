//! The agent's `--cluster/--policies/--node` mode with packets: the agent compiles its own
//! node's rule set from Kubernetes YAML, enforces it, and a change to the policies file
//! reaches the running agent (a compiler change, applied without a restart). Its
//! spoofed-packets metric moves when a pod sends from an address that is not its own. Its
//! own loop repairs a table someone tampered with. ipBlocks govern traffic to and from a
//! namespace that stands for the world outside the cluster. Denied flows come back from
//! the flow log naming their rule. Root only.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

fn cluster_yaml(a: &LabPod, b: &LabPod) -> String {
    let pod = |name: &str, ip4: IpAddr, ip6: IpAddr| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: default, name: {name}, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: node-1, containers: [{{name: c}}]}}\n\
             status: {{podIP: {ip4}, podIPs: [{{ip: {ip4}}}, {{ip: \"{ip6}\"}}]}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: default}}\n---\n{}---\n{}",
        pod("a", a.ip4, a.ip6),
        pod("b", b.ip4, b.ip6)
    )
}

/// b accepts only `port` (TCP) from pods labelled app=a.
fn policy_yaml(port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{namespace: default, name: b-in}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  policyTypes: [Ingress]\n\
         \x20 ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: a}}}}}}]\n\
         \x20     ports: [{{port: {port}, protocol: TCP}}]\n"
    )
}

/// Writes by rename, as a configuration manager would, so the agent never reads half.
fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The agent in `--cluster` mode on the lab's node, reconciling every `reconcile` seconds.
fn start_agent(
    lab: &Lab,
    cluster: &std::path::Path,
    policies: &std::path::Path,
    port: u16,
    reconcile: &str,
) -> Agent {
    Agent(
        Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
            .args(["--netns", &lab.node, "--node", "node-1"])
            .arg("--cluster")
            .arg(cluster)
            .arg("--policies")
            .arg(policies)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args([
                "--poll-interval-ms",
                "200",
                "--reconcile-interval-secs",
                reconcile,
            ])
            // The periodic reconcile alone: the event watch would repair drift before the
            // test could see it (`tests/agent_loop.rs` tests that).
            .env("PALISADE_WATCH_NFTABLES_EVENTS", "false")
            .spawn()
            .unwrap(),
    )
}

#[test]
fn agent_compiles_its_node_from_yaml_and_follows_policy_changes() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("k", 19, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sb = Servers::start(&b.netns, &[7070, 8080], &[5353]);
    // Without the agent both ports connect, so what is denied below is the agent's doing.
    assert!(tcp_ok(&a.netns, b.ip4, 7070) && tcp_ok(&a.netns, b.ip4, 8080));

    let dir = std::env::temp_dir().join(format!("palisade-agent-yaml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cluster, policies) = (dir.join("cluster.yaml"), dir.join("policies.yaml"));
    write(&cluster, &cluster_yaml(a, b));
    write(&policies, &policy_yaml(8080));
    let port = 20000 + (std::process::id() % 20000) as u16 + 7;
    let _agent = start_agent(&lab, &cluster, &policies, port, "60");
    eventually("b's ingress enforced as compiled from the YAML", || {
        tcp_ok(&a.netns, b.ip4, 8080) && !tcp_ok(&a.netns, b.ip4, 7070)
    });
    assert!(tcp_ok(&a.netns, b.ip6, 8080), "IPv6 allowed too");
    assert!(!tcp_ok(&a.netns, b.ip6, 7070), "IPv6 denied too");

    // The policy changes: the running agent recompiles and swaps the ports.
    write(&policies, &policy_yaml(7070));
    eventually("the changed policy enforced without a restart", || {
        tcp_ok(&a.netns, b.ip4, 7070) && !tcp_ok(&a.netns, b.ip4, 8080)
    });

    // Spoofing from a: counted by the agent's metric.
    let spoofed = "10.99.0.7";
    add_address(&a.netns, spoofed);
    let series = r#"palisade_spoofed_packets_total{namespace="default",pod="a"}"#;
    let spoof_count = || {
        http_get(port, "/metrics")
            .and_then(|(_, m)| metric_value(&m, series))
            .unwrap_or(0.0)
    };
    let before = spoof_count();
    udp_send_from(&a.netns, spoofed.parse().unwrap(), b.ip4, 5353, 4);
    eventually(
        "palisade_spoofed_packets_total moved by the 4 spoofed datagrams",
        || spoof_count() - before >= 4.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's periodic reconcile: someone flushes the base chain (all traffic would pass);
/// with nothing else changing, the agent's own loop puts it back within its interval.
#[test]
fn agent_repairs_a_tampered_table_on_its_own() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("d", 21, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sb = Servers::start(&b.netns, &[7070, 8080], &[]);
    let dir = std::env::temp_dir().join(format!("palisade-agent-drift-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cluster, policies) = (dir.join("cluster.yaml"), dir.join("policies.yaml"));
    write(&cluster, &cluster_yaml(a, b));
    write(&policies, &policy_yaml(8080));
    let port = 20000 + (std::process::id() % 20000) as u16 + 9;
    // Every 3 s: the tampered table below is probed within milliseconds of the flush, so
    // a reconcile in between is unlikely, and the repair comes well within `eventually`.
    let _agent = start_agent(&lab, &cluster, &policies, port, "3");
    eventually("enforced", || {
        tcp_ok(&a.netns, b.ip4, 8080) && !tcp_ok(&a.netns, b.ip4, 7070)
    });

    sh(&[
        "ip", "netns", "exec", &lab.node, "nft", "flush", "chain", "inet", "palisade", "forward",
    ]);
    assert!(
        tcp_ok(&a.netns, b.ip4, 7070),
        "the tampered table lets the denied flow through"
    );
    eventually("the agent's reconcile repaired the table", || {
        !tcp_ok(&a.netns, b.ip4, 7070) && tcp_ok(&a.netns, b.ip4, 8080)
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// Traffic across the cluster's edge through ipBlocks: a lab namespace stands for the
/// world outside (two addresses in each family, one of them in an `except` hole). a may
/// reach the block on 8080, but not the hole nor another port; b admits only the block's
/// first half. Every flow connects before the agent starts, and a denial must be a drop
/// (a time-out), not a refusal or a broken route.
#[test]
fn ipblocks_reach_outside_the_cluster_exactly_as_written() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (near4, far4) = (ip("203.0.113.10"), ip("203.0.113.200"));
    let (near6, far6) = (ip("2001:db8:1::10"), ip("2001:db8:1::210"));
    let mut lab = Lab::new("x", 22, &["default/a", "default/b"]);
    let outside = lab.add_outside(&[near4, far4, near6, far6]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _so = Servers::start(&outside, &[8080, 9090], &[]);
    let _sb = Servers::start(&b.netns, &[8080], &[]);
    let timeout = Duration::from_millis(300);
    let out = |dst: IpAddr, port: u16| tcp_connect_within(&a.netns, dst, port, timeout);
    let inward = |src: IpAddr| {
        let dst = if src.is_ipv4() { b.ip4 } else { b.ip6 };
        tcp_connect_from(&outside, src, dst, 8080, timeout)
    };
    let dropped =
        |r: std::io::Result<()>| matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut);
    let flows_out = [
        (near4, 8080),
        (near6, 8080),
        (far4, 8080),
        (far6, 8080),
        (near4, 9090),
    ];
    for (dst, port) in flows_out {
        assert!(out(dst, port).is_ok(), "a → {dst}:{port} without the agent");
    }
    for src in [near4, far4, near6, far6] {
        assert!(inward(src).is_ok(), "{src} → b without the agent");
    }

    let dir = std::env::temp_dir().join(format!("palisade-agent-edge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cluster, policies) = (dir.join("cluster.yaml"), dir.join("policies.yaml"));
    write(&cluster, &cluster_yaml(a, b));
    write(
        &policies,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {namespace: default, name: a-out}\n\
         spec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n\
         \x20 egress:\n    - to:\n\
         \x20       - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}\n\
         \x20       - ipBlock: {cidr: \"2001:db8:1::/64\", except: [\"2001:db8:1::200/120\"]}\n\
         \x20     ports: [{port: 8080, protocol: TCP}]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {namespace: default, name: b-in}\n\
         spec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n\
         \x20 ingress:\n    - from:\n\
         \x20       - ipBlock: {cidr: 203.0.113.0/25}\n\
         \x20       - ipBlock: {cidr: \"2001:db8:1::/120\"}\n",
    );
    let port = 20000 + (std::process::id() % 20000) as u16 + 11;
    let _agent = start_agent(&lab, &cluster, &policies, port, "60");
    eventually("a's egress enforced", || dropped(out(far4, 8080)));

    assert!(out(near4, 8080).is_ok(), "a → the block (IPv4)");
    assert!(out(near6, 8080).is_ok(), "a → the block (IPv6)");
    assert!(dropped(out(far4, 8080)), "a → the except hole (IPv4)");
    assert!(dropped(out(far6, 8080)), "a → the except hole (IPv6)");
    assert!(
        dropped(out(near4, 9090)),
        "a → the block on a port not listed"
    );
    assert!(inward(near4).is_ok(), "the block's first half → b (IPv4)");
    assert!(inward(near6).is_ok(), "the block's first half → b (IPv6)");
    assert!(
        dropped(inward(far4)),
        "outside the admitted half → b (IPv4)"
    );
    assert!(
        dropped(inward(far6)),
        "outside the admitted half → b (IPv6)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The denied-flow log with real packets: a default deny, an Admin-tier Deny rule and a
/// spoofed packet each come back from NFLOG as a line in `/flows` naming the rule (or the
/// default deny, or the source check) and the pods; an allowed flow leaves no line; a
/// flood of denied datagrams is held to the kernel's rate limit, the rest counted.
#[test]
fn denied_flows_are_logged_with_the_rule_that_denied_them() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("f", 23, &["default/a", "default/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sb = Servers::start(&b.netns, &[7070, 8080, 9090], &[7070]);
    let dir = std::env::temp_dir().join(format!("palisade-agent-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cluster, policies) = (dir.join("cluster.yaml"), dir.join("policies.yaml"));
    write(&cluster, &cluster_yaml(a, b));
    // b admits 8080 and 9090 from a; the Admin tier denies a's egress to b on 9090.
    let admin = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
         metadata: {name: no-9090}\n\
         spec:\n  priority: 10\n\
         \x20 subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}\n\
         \x20 egress:\n    - name: block-9090\n      action: Deny\n\
         \x20     to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}}]\n\
         \x20     ports: [{portNumber: {port: 9090, protocol: TCP}}]\n";
    let netpol = policy_yaml(8080).replace(
        "ports: [{port: 8080, protocol: TCP}]",
        "ports: [{port: 8080, protocol: TCP}, {port: 9090, protocol: TCP}]",
    );
    write(&policies, &format!("{admin}---\n{netpol}"));
    let port = 20000 + (std::process::id() % 20000) as u16 + 13;
    let _agent = start_agent(&lab, &cluster, &policies, port, "60");
    eventually("enforced", || {
        tcp_ok(&a.netns, b.ip4, 8080) && !tcp_ok(&a.netns, b.ip4, 7070)
    });

    let flows = || common::agent::flow_lines(port);
    let find = |want: &dyn Fn(&serde_json::Value) -> bool| {
        let mut found = None;
        eventually("the flow's line in /flows", || {
            found = flows().into_iter().find(|l| want(l));
            found.is_some()
        });
        found.unwrap()
    };

    let line = find(&|l| l["dst"]["port"] == 7070 && l["protocol"] == "TCP");
    assert_eq!(line["decided_by"]["kind"], "default-deny", "{line}");
    assert_eq!(line["decided_by"]["pod"], "default/b", "{line}");
    assert_eq!(line["direction"], "ingress", "{line}");
    assert_eq!(line["verdict"], "deny", "{line}");
    assert_eq!(line["node"], "node-1", "{line}");
    assert_eq!(line["src"]["pod"], "default/a", "{line}");
    assert_eq!(line["dst"]["pod"], "default/b", "{line}");
    assert_eq!(line["src"]["address"], a.ip4.to_string(), "{line}");

    assert!(!tcp_ok(&a.netns, b.ip4, 9090), "the Admin tier denies 9090");
    let line = find(&|l| l["dst"]["port"] == 9090);
    assert_eq!(line["decided_by"]["kind"], "rule", "{line}");
    assert_eq!(line["decided_by"]["tier"], "Admin", "{line}");
    assert_eq!(
        line["decided_by"]["policy_kind"], "AdminNetworkPolicy",
        "{line}"
    );
    assert_eq!(line["decided_by"]["policy"], "no-9090", "{line}");
    assert_eq!(line["decided_by"]["rule"], "block-9090", "{line}");
    assert_eq!(line["direction"], "egress", "{line}");

    let spoofed = "10.99.0.9";
    add_address(&a.netns, spoofed);
    udp_send_from(&a.netns, spoofed.parse().unwrap(), b.ip4, 7070, 1);
    let line = find(&|l| l["src"]["address"] == spoofed);
    assert_eq!(line["verdict"], "spoofed", "{line}");
    assert_eq!(line["decided_by"]["kind"], "spoofed", "{line}");
    assert_eq!(line["decided_by"]["pod"], "default/a", "{line}");

    assert!(tcp_ok(&a.netns, b.ip4, 8080));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        flows().iter().all(|l| l["dst"]["port"] != 8080),
        "an allowed flow is not logged"
    );

    // A flood of denied datagrams: the kernel passes at most burst (20) + 10/s of them.
    let metric = |series: &str| {
        http_get(port, "/metrics")
            .and_then(|(_, m)| metric_value(&m, series))
            .unwrap_or(0.0)
    };
    let (lines, suppressed) = (
        "palisade_flow_log_lines_total",
        "palisade_flow_log_suppressed_packets_total",
    );
    std::thread::sleep(Duration::from_millis(1100));
    let (lines_before, suppressed_before) = (metric(lines), metric(suppressed));
    let started = std::time::Instant::now();
    udp_send_from(&a.netns, a.ip4, b.ip4, 7070, 3000);
    let secs = started.elapsed().as_secs_f64();
    eventually("the suppressed packets counted", || {
        metric(suppressed) - suppressed_before >= 3000.0 - 20.0 - 10.0 * (secs + 1.0)
    });
    let logged = metric(lines) - lines_before;
    assert!(
        logged >= 1.0 && logged <= 20.0 + 10.0 * (secs + 1.0),
        "{logged} lines for 3000 denied datagrams in {secs:.2} s"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
