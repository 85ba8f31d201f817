//! Audit (staged) enforcement with real packets, the agent compiling its node from YAML:
//! (1) a namespace labelled `palisade.dev/enforcement: audit` with a default-deny
//! NetworkPolicy: flows still connect, and each counts in
//! `palisade_audit_would_deny_packets_total` for the default deny and comes back from the
//! flow log as a `would-deny` line naming it; (2) an AdminNetworkPolicy annotated audit
//! beside an enforced NetworkPolicy: what the enforced one denies stays denied (a
//! time-out), what it allows passes, and is counted and logged as would-deny by the audit
//! rule where that rule denies it; (3) the annotation switched to enforce: the same flow
//! times out. IPv4 and IPv6. Root only.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::agent::{agent_metric, TempDir};
use common::*;

fn cluster_yaml(namespace_labels: &str, a: &LabPod, b: &LabPod) -> String {
    let pod = |name: &str, ip4: IpAddr, ip6: IpAddr| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop, name: {name}, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: node-1, containers: [{{name: c}}]}}\n\
             status: {{podIP: {ip4}, podIPs: [{{ip: {ip4}}}, {{ip: \"{ip6}\"}}]}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{namespace_labels}}}}}\n---\n{}---\n{}",
        pod("a", a.ip4, a.ip6),
        pod("b", b.ip4, b.ip6)
    )
}

const DEFAULT_DENY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {namespace: shop, name: deny-all}\n\
    spec: {podSelector: {}, policyTypes: [Ingress]}\n";

/// b admits 8080 and 9090 from a (enforced); an Admin-tier policy in `mode` denies a's
/// egress to b on 9090.
fn staged_policies(mode: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{namespace: shop, name: b-in}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  policyTypes: [Ingress]\n\
         \x20 ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: a}}}}}}]\n\
         \x20     ports: [{{port: 8080, protocol: TCP}}, {{port: 9090, protocol: TCP}}]\n---\n\
         apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
         metadata: {{name: no-9090, annotations: {{palisade.dev/enforcement: {mode}}}}}\n\
         spec:\n  priority: 10\n\
         \x20 subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a}}}}}}}}\n\
         \x20 egress:\n    - name: block-9090\n      action: Deny\n\
         \x20     to: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: b}}}}}}}}]\n\
         \x20     ports: [{{portNumber: {{port: 9090, protocol: TCP}}}}]\n"
    )
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The sum of a metric's samples whose labels include every one of `labels`
/// (`name="value"`), whatever their order.
fn metric_sum(port: u16, name: &str, labels: &[&str]) -> f64 {
    let Some((200, text)) = http_get(port, "/metrics") else {
        return 0.0;
    };
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (set, value) = rest.split_once("} ")?;
            let have: Vec<&str> = set.split(',').collect();
            labels
                .iter()
                .all(|want| have.contains(want))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

fn flows(port: u16) -> Vec<serde_json::Value> {
    common::agent::flow_lines(port)
}

fn find_flow(port: u16, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut found = None;
    eventually("the flow's line in /flows", || {
        found = flows(port).into_iter().find(|l| want(l));
        found.is_some()
    });
    found.unwrap()
}

const WOULD_DENY: &str = "palisade_audit_would_deny_packets_total";

#[test]
fn audit_mode_counts_and_logs_what_it_would_deny_and_enforces_nothing_more() {
    if !can_run(&[ROOT, IP, NFT]) {
        return;
    }
    let lab = Lab::new("z", 31, &["shop/a", "shop/b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sb = Servers::start(&b.netns, &[7070, 8080, 9090], &[]);
    let timeout = Duration::from_millis(400);
    let connects = |dst: IpAddr, port: u16| tcp_connect_within(&a.netns, dst, port, timeout);
    let times_out = |dst: IpAddr, port: u16| matches!(connects(dst, port), Err(e) if e.kind() == std::io::ErrorKind::TimedOut);
    for dst in [b.ip4, b.ip6] {
        for port in [7070, 8080, 9090] {
            assert!(
                connects(dst, port).is_ok(),
                "{dst}:{port} without the agent"
            );
        }
    }

    let dir = TempDir::new("audit");
    let (cluster, policies) = (dir.0.join("cluster.yaml"), dir.0.join("policies.yaml"));
    // (1) The namespace in audit, a default deny in it. The enforced control first: with
    // the label saying enforce, the default deny bites, so the agent is in force.
    write(
        &cluster,
        &cluster_yaml("palisade.dev/enforcement: enforce", a, b),
    );
    write(&policies, DEFAULT_DENY);
    let port = 20000 + (std::process::id() % 20000) as u16 + 31;
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
            .args(["--netns", &lab.node, "--node", "node-1"])
            .arg("--cluster")
            .arg(&cluster)
            .arg("--policies")
            .arg(&policies)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--poll-interval-ms", "200"])
            .spawn()
            .unwrap(),
    );
    eventually("the default deny enforced", || times_out(b.ip4, 7070));
    write(
        &cluster,
        &cluster_yaml("palisade.dev/enforcement: audit", a, b),
    );
    eventually("the namespace's label puts it in audit", || {
        connects(b.ip4, 7070).is_ok()
    });
    let default_deny = [
        "kind=\"DefaultDeny\"",
        "namespace=\"shop\"",
        "name=\"b\"",
        "direction=\"ingress\"",
    ];
    let before = metric_sum(port, WOULD_DENY, &default_deny);
    for dst in [b.ip4, b.ip6] {
        for port in [7070, 8080] {
            assert!(
                connects(dst, port).is_ok(),
                "audit lets {dst}:{port} through"
            );
        }
    }
    eventually("the would-deny metric counted the default deny", || {
        metric_sum(port, WOULD_DENY, &default_deny) - before >= 4.0
    });
    let line = find_flow(port, |l| {
        l["verdict"] == "would-deny" && l["dst"]["address"] == b.ip6.to_string()
    });
    assert_eq!(line["decided_by"]["kind"], "default-deny", "{line}");
    assert_eq!(line["decided_by"]["pod"], "shop/b", "{line}");
    assert_eq!(line["direction"], "ingress", "{line}");
    assert_eq!(line["src"]["pod"], "shop/a", "{line}");

    // (2) The namespace enforced again; the Admin tier's deny in audit beside an enforced
    // NetworkPolicy.
    write(&cluster, &cluster_yaml("", a, b));
    write(&policies, &staged_policies("audit"));
    eventually("b-in enforced", || times_out(b.ip4, 7070));
    let block = [
        "kind=\"AdminNetworkPolicy\"",
        "name=\"no-9090\"",
        "rule=\"block-9090\"",
        "direction=\"egress\"",
        "tier=\"Admin\"",
    ];
    let before = metric_sum(port, WOULD_DENY, &block);
    for dst in [b.ip4, b.ip6] {
        assert!(
            times_out(dst, 7070),
            "the enforced policy still denies {dst}:7070"
        );
        assert!(
            connects(dst, 8080).is_ok(),
            "{dst}:8080 allowed, not audited"
        );
        assert!(
            connects(dst, 9090).is_ok(),
            "{dst}:9090 allowed; audit would deny"
        );
    }
    eventually("the would-deny metric counted the Admin rule", || {
        metric_sum(port, WOULD_DENY, &block) - before >= 2.0
    });
    let line = find_flow(port, |l| {
        l["verdict"] == "would-deny" && l["dst"]["port"] == 9090
    });
    assert_eq!(line["decided_by"]["kind"], "rule", "{line}");
    assert_eq!(line["decided_by"]["tier"], "Admin", "{line}");
    assert_eq!(line["decided_by"]["policy"], "no-9090", "{line}");
    assert_eq!(line["decided_by"]["rule"], "block-9090", "{line}");
    assert_eq!(line["direction"], "egress", "{line}");
    assert!(
        flows(port).iter().all(|l| !(l["verdict"] == "would-deny"
            && l["dst"]["port"] == 8080
            && l["decided_by"]["kind"] == "rule")),
        "8080 is no would-deny of the Admin rule (phase 1's default deny ones aside)"
    );
    // The audit rule counts only as would-deny: the enforced table's rule counters do
    // not carry it.
    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    assert!(
        !metrics.lines().any(|l| l.starts_with("palisade_rule_packets_total")
            && l.contains("name=\"no-9090\"")),
        "no rule counter for the audit policy"
    );
    let denied = find_flow(port, |l| l["dst"]["port"] == 7070 && l["verdict"] == "deny");
    assert_eq!(denied["decided_by"]["kind"], "default-deny", "{denied}");

    // (3) Enforced: the same flow times out.
    write(&policies, &staged_policies("enforce"));
    eventually("no-9090 enforced", || times_out(b.ip4, 9090));
    assert!(times_out(b.ip6, 9090), "IPv6 too");
    assert!(connects(b.ip4, 8080).is_ok() && connects(b.ip6, 8080).is_ok());
    let line = find_flow(port, |l| l["verdict"] == "deny" && l["dst"]["port"] == 9090);
    assert_eq!(line["decided_by"]["rule"], "block-9090", "{line}");
    // Audit chains came and went as incremental transactions, none refused by the kernel.
    let errors = agent_metric(port, "palisade_apply_errors_total");
    assert_eq!(errors, Some(0.0), "apply errors");
}
