//! The dashboard and the alerts against a real agent and a real palisade-controller,
//! scraped by a real Prometheus (Debian's `prometheus`): the controller reads the test's
//! cluster and policies files; the agent (`--netns`) streams its node's rules from it and
//! programs a network namespace this test creates. Every dashboard query and every metric
//! the alerts read must return data, and every metric name and label they use must be in
//! a real scrape of the component that exports it.
//!
//! Both serve their metrics in the documented loopback mode (plain HTTP on 127.0.0.1):
//! this lab has no apiserver (file sources), and secure mode needs one for its
//! TokenReviews and SubjectAccessReviews; `httpd/tests/access.rs` proves that mode against
//! a real apiserver. Root, nft, ip and prometheus needed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_deploy_tests::monitoring::{alert_rules, dashboard, dashboard_queries};
use palisade_deploy_tests::{metric_names, promql, repo_root, tools};

const POD_IP: &str = "10.66.1.2";

/// One node with one pod (its address set as a kubelet would), isolated both ways.
const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: db, labels: {app: db}}
spec:
  nodeName: node-1
  containers: [{name: db, ports: [{name: pg, containerPort: 5432}]}]
status: {podIP: 10.66.1.2, podIPs: [{ip: 10.66.1.2}]}
";

/// db accepts only its clients on 5432 and sends only DNS.
const POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: api}}}]
      ports: [{protocol: TCP, port: 5432}]
  egress:
    - ports: [{protocol: UDP, port: 53}]
";

const TEST: &str =
    "agent_and_controller_metrics_answer_the_dashboard_and_alerts_in_a_real_prometheus";

/// Kills and reaps a child process when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace, deleted (with the agent's table in it) when dropped.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        Netns(name)
    }
}

/// Runs `ip ARGS`, panicking with its error output.
fn ip(args: &[&str]) {
    tools::run_ok(Path::new("ip"), args);
}

/// Sets `/proc/sys/net/KEY` inside network namespace `netns`.
fn sysctl(netns: &str, key: &str, value: &str) {
    let set = format!("echo {value} > /proc/sys/net/{key}");
    ip(&["netns", "exec", netns, "sh", "-c", &set]);
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// GET over HTTP/1.0 (no chunked answers): status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result vector of an instant query, or the error Prometheus gave.
fn query(port: u16, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(
        port,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )
    .ok_or_else(|| "Prometheus did not answer".to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("HTTP {status}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The binary `cargo test --workspace` (debug) or `scripts/test.sh` (release) built, the
/// newer of the two.
fn built_binary(name: &str) -> Option<PathBuf> {
    ["debug", "release"]
        .iter()
        .map(|p| repo_root().join("target").join(p).join(name))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The controller on loopback, reading `dir`'s cluster and policies files, with one
/// agent token (for node-1): its gRPC port and metrics port.
fn start_controller(bin: &Path, dir: &Path) -> (Process, u16, u16) {
    let tls = palisade_controller::devtls::generate(dir, &["127.0.0.1"]).expect("dev TLS");
    std::fs::write(dir.join("node-1.token"), "e2e-node-1-token").expect("token");
    std::fs::write(dir.join("node-tokens.yaml"), "node-1: e2e-node-1-token\n").expect("tokens");
    let (grpc, metrics) = (free_port(), free_port());
    let child = Command::new(bin)
        .arg("--cluster")
        .arg(dir.join("cluster.yaml"))
        .arg("--policies")
        .arg(dir.join("policies.yaml"))
        .arg("--node-tokens")
        .arg(dir.join("node-tokens.yaml"))
        .arg("--tls-cert")
        .arg(&tls.cert)
        .arg("--tls-key")
        .arg(&tls.key)
        .arg(format!("--listen=127.0.0.1:{grpc}"))
        .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
        .arg("--metrics-mode=loopback")
        .arg("--min-interval-ms=50")
        .env("PALISADE_CONTROLLER_POLL_INTERVAL_MS", "100")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("controller.log")).expect("controller log"))
        .spawn()
        .expect("start palisade-controller");
    (Process(child), grpc, metrics)
}

#[test]
fn agent_and_controller_metrics_answer_the_dashboard_and_alerts_in_a_real_prometheus() {
    if !is_root() {
        return tools::skip(
            TEST,
            "not root (the agent programs nftables in a network namespace)",
        );
    }
    let (Some(_nft), Some(_ip), Some(prometheus)) = (
        tools::require(TEST, "nft", "apt-get install nftables"),
        tools::require(TEST, "ip", "apt-get install iproute2"),
        tools::require(TEST, "prometheus", "apt-get install prometheus"),
    ) else {
        return;
    };
    let (Some(agent_bin), Some(controller_bin)) = (
        built_binary("palisade-agent"),
        built_binary("palisade-controller"),
    ) else {
        return tools::skip(
            TEST,
            "target/{debug,release}/palisade-{agent,controller} not built (cargo build -p palisade-agent -p palisade-controller)",
        );
    };

    let dir = TempDir(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("prometheus-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let (cluster, policies) = (dir.0.join("cluster.yaml"), dir.0.join("policies.yaml"));
    std::fs::write(&cluster, CLUSTER).expect("write cluster.yaml");
    std::fs::write(&policies, POLICIES).expect("write policies.yaml");

    // A node namespace and one pod joined to it by a veth with a /32 route, as a CNI does.
    let node = Netns::new(format!("pdt-n{}", std::process::id()));
    let pod = Netns::new(format!("pdt-p{}", std::process::id()));
    // The node forwards (the pod's packets reach the forward hook), without reverse-path
    // filtering (the spoofed source must reach the agent's check), towards a veth pair
    // inside the node namespace standing for the rest of the cluster: the agent drops both
    // kinds of test packet there, and nothing leaves the namespaces.
    sysctl(&node.0, "ipv4/ip_forward", "1");
    sysctl(&node.0, "ipv4/conf/all/rp_filter", "0");
    sysctl(&node.0, "ipv4/conf/default/rp_filter", "0");
    ip(&[
        "-n", &node.0, "link", "add", "cluster0", "type", "veth", "peer", "name", "cluster1",
    ]);
    ip(&["-n", &node.0, "link", "set", "cluster0", "up"]);
    ip(&["-n", &node.0, "link", "set", "cluster1", "up"]);
    ip(&[
        "-n",
        &node.0,
        "route",
        "add",
        "10.66.1.96/28",
        "dev",
        "cluster0",
    ]);
    let veth = format!("pdt{}", std::process::id() % 100_000);
    ip(&[
        "-n", &node.0, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
        &pod.0,
    ]);
    ip(&["-n", &node.0, "link", "set", &veth, "up"]);
    // The node answers the pod's ARP for any address it routes (as CNIs do).
    sysctl(&node.0, &format!("ipv4/conf/{veth}/proxy_arp"), "1");
    ip(&[
        "-n",
        &node.0,
        "route",
        "add",
        &format!("{POD_IP}/32"),
        "dev",
        &veth,
    ]);
    ip(&[
        "-n",
        &pod.0,
        "addr",
        "add",
        &format!("{POD_IP}/32"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &pod.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod.0, "route", "add", "default", "dev", "eth0"]);
    // A second address the pod does not own, used as the source towards one peer: spoofed.
    ip(&["-n", &pod.0, "addr", "add", "10.66.1.50/32", "dev", "eth0"]);
    ip(&[
        "-n",
        &pod.0,
        "route",
        "add",
        "10.66.1.98/32",
        "dev",
        "eth0",
        "src",
        "10.66.1.50",
    ]);

    let (_controller, grpc_port, controller_port) = start_controller(&controller_bin, &dir.0);
    eventually("the controller's /readyz", Duration::from_secs(30), || {
        http_get(controller_port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let agent_port = free_port();
    let _agent = Process(
        Command::new(&agent_bin)
            .args(["--netns", &node.0, "--node", "node-1", "--metrics-addr"])
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--metrics-mode=loopback")
            .arg(format!("--controller=https://127.0.0.1:{grpc_port}"))
            .arg("--token-file")
            .arg(dir.0.join("node-1.token"))
            .arg("--ca-file")
            .arg(dir.0.join("ca.crt"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("agent.log")).expect("agent log"))
            .spawn()
            .expect("start palisade-agent"),
    );
    eventually("the agent's /readyz", Duration::from_secs(20), || {
        http_get(agent_port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    // Traffic, all inside the two namespaces: UDP from the isolated pod to an address no
    // rule allows (default deny), and from the address it does not own (spoofed).
    let scrape = || {
        http_get(agent_port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let counted = |text: &str, family: &str| {
        text.lines()
            .filter(|l| l.starts_with(family))
            .any(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"))
    };
    eventually(
        "default-deny and spoof counters above 0",
        Duration::from_secs(20),
        || {
            for peer in ["10.66.1.99", "10.66.1.98"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", &pod.0, "bash", "-c"])
                    .arg(format!("echo x > /dev/udp/{peer}/9"))
                    .output();
            }
            let text = scrape();
            counted(&text, "palisade_default_deny_packets_total{")
                && counted(&text, "palisade_spoofed_packets_total{")
        },
    );
    // The controller sees the agent's acknowledgement: generation lag has data.
    let controller_text = || {
        http_get(controller_port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    eventually(
        "the controller's view of node-1",
        Duration::from_secs(20),
        || {
            let text = controller_text();
            text.contains("palisade_controller_nodes_connected 1")
                && text.contains("palisade_controller_node_generation_lag{node=\"node-1\"} 0")
        },
    );
    // Which job exports each name, and the labels of each, from the real scrapes.
    let mut job_of = std::collections::BTreeMap::new();
    let mut scraped = std::collections::BTreeMap::new();
    for (job, text) in [
        ("palisade-agent", scrape()),
        ("palisade-controller", controller_text()),
    ] {
        for (name, labels) in promql::exposition_labels(&text) {
            job_of.insert(name.clone(), job);
            scraped.insert(name, labels);
        }
    }

    // The labels the chart's PodMonitor gives every agent series.
    let target_labels = ["job", "instance", "node", "le"];
    let prom_port = free_port();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: palisade-agent\n    static_configs:\n      \
             - targets: ['127.0.0.1:{agent_port}']\n        labels: {{node: node-1}}\n  \
             - job_name: palisade-controller\n    static_configs:\n      \
             - targets: ['127.0.0.1:{controller_port}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let _prometheus = Process(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).expect("prometheus log"))
            .spawn()
            .expect("start prometheus"),
    );
    // The first sample comes 5-6 s after start; rate() then needs a few more.
    eventually(
        "Prometheus's first scrape of the agent and the controller",
        Duration::from_secs(60),
        || query(prom_port, "up == 1").is_ok_and(|r| r.len() == 2),
    );
    std::thread::sleep(Duration::from_secs(4));

    // The scraped series a name stands for: itself, or a histogram's `_bucket` series
    // (queries name either the family or its buckets).
    let family = |name: &str| -> Option<String> {
        [name.to_string(), format!("{name}_bucket")]
            .into_iter()
            .find(|n| scraped.contains_key(n))
    };
    // Counters with labels that have no series until their event happens: this lab has
    // no invalid object. They must still be exported by the sources.
    const EVENT_ONLY: [&str; 1] = ["palisade_controller_invalid_objects_total"];
    let exported = metric_names::exported(&repo_root());
    let mut failures = Vec::new();
    let mut checked = 0;
    for q in dashboard_queries(&dashboard()) {
        let names = metric_names::used_in(&q.expr);
        for n in names.iter().filter(|n| EVENT_ONLY.contains(&n.as_str())) {
            if !exported.contains(n.as_str()) {
                failures.push(format!("panel {:?}: {n} is exported by no source", q.panel));
            }
        }
        let names: std::collections::BTreeSet<String> = names
            .into_iter()
            .filter(|n| !EVENT_ONLY.contains(&n.as_str()))
            .collect();
        if names.is_empty() {
            continue;
        }
        if let Some(missing) = names.iter().find(|n| family(n).is_none()) {
            failures.push(format!(
                "panel {:?}: {missing} is in no real scrape",
                q.panel
            ));
            continue;
        }
        let mut allowed: std::collections::BTreeSet<String> =
            target_labels.iter().map(|s| s.to_string()).collect();
        for n in &names {
            allowed.extend(scraped[&family(n).unwrap()].iter().cloned());
        }
        for label in promql::labels_used(&q.expr).union(&promql::legend_labels(&q.legend)) {
            if !allowed.contains(label) {
                failures.push(format!(
                    "panel {:?}: label {label} is on none of {names:?}",
                    q.panel
                ));
            }
        }
        let expr = promql::substitute_grafana_variables(&q.expr, "10s");
        match query(prom_port, &expr) {
            Ok(r) if !r.is_empty() => checked += 1,
            Ok(_) => failures.push(format!("panel {:?}: no data for {expr}", q.panel)),
            Err(e) => failures.push(format!("panel {:?}: {expr}: {e}", q.panel)),
        }
    }
    for rule in alert_rules() {
        let alert = rule["alert"].as_str().unwrap_or("?").to_string();
        let expr = rule["expr"].as_str().expect("expr");
        for name in metric_names::used_in(expr) {
            let Some(fam) = family(&name) else {
                failures.push(format!("alert {alert}: {name} is in no real scrape"));
                continue;
            };
            for label in promql::labels_used(expr) {
                let on_metric = scraped[&fam].contains(&label);
                if !on_metric && !target_labels.contains(&label.as_str()) {
                    failures.push(format!("alert {alert}: label {label} is not on {name}"));
                }
            }
            // The job the alert names must be the one that exports the metric.
            let job = job_of[&fam];
            let named = format!(r#"{name}{{job="{job}"}}"#);
            if expr.contains(&format!("{name}{{job=")) && !expr.contains(&named) {
                failures.push(format!("alert {alert}: {name} is exported by job {job}"));
            }
            let selector = format!(r#"{fam}{{job="{job}"}}"#);
            match query(prom_port, &selector) {
                Ok(r) if !r.is_empty() => checked += 1,
                Ok(_) => failures.push(format!("alert {alert}: no data for {selector}")),
                Err(e) => failures.push(format!("alert {alert}: {selector}: {e}")),
            }
        }
        if metric_names::used_in(expr).is_empty() {
            // Only `up`: the scrape itself.
            let result = query(prom_port, expr);
            assert!(result.is_ok(), "alert {alert}: {result:?}");
        }
    }
    assert!(
        failures.is_empty(),
        "against a real agent, controller and Prometheus:\n{}\nagent log:\n{}\ncontroller log:\n{}",
        failures.join("\n"),
        std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.0.join("controller.log")).unwrap_or_default()
    );
    assert!(
        checked >= 10,
        "only {checked} queries were checked against the agent"
    );
    eprintln!("{checked} queries answered by a real agent and controller through Prometheus");
}
