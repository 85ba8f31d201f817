//! palisadectl end to end: the built binary on real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/conformance/examples"
);

fn palisadectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .args(args)
        .output()
        .expect("run palisadectl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A directory removed when the test ends, pass or fail.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "palisadectl-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn example(name: &str, file: &str) -> String {
    Path::new(EXAMPLES)
        .join(name)
        .join(file)
        .display()
        .to_string()
}

fn count_probes(scenario: &str) -> usize {
    let text = std::fs::read_to_string(example(scenario, "probes.yaml")).unwrap();
    text.lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .count()
}

#[test]
fn the_shared_examples_pass() {
    let o = palisadectl(&[
        "verify",
        &Path::new(EXAMPLES)
            .join("three-tier-shop")
            .display()
            .to_string(),
        &Path::new(EXAMPLES)
            .join("admin-tiers")
            .display()
            .to_string(),
    ]);
    let total = count_probes("three-tier-shop") + count_probes("admin-tiers");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o), format!("{total} passed, 0 failed\n"));
}

#[test]
fn a_broken_scenario_fails_with_its_reasons() {
    let tmp = TempDir::new();
    for file in ["cluster.yaml", "policies.yaml"] {
        let text = std::fs::read_to_string(example("three-tier-shop", file)).unwrap();
        tmp.write(&format!("broken/{file}"), &text);
    }
    tmp.write(
        "broken/probes.yaml",
        r#"probes:
  - {from: shop/web-1, to: shop/api-1, port: grpc, expect: deny}
  - {from: shop/web-1, to: shop/db-1, port: 5432, expect: allow}
  - {from: monitoring/prom-1, to: shop/web-1, port: 8080, expect: allow}
"#,
    );
    tmp.write("unreadable/cluster.yaml", "kind: [\n");
    let o = palisadectl(&["verify", &tmp.path("broken"), &tmp.path("unreadable")]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "FAIL broken probes[0] (shop/web-1 -> shop/api-1 TCP/grpc): expected deny, got allow: \
         egress allow: no policy decides; the pod is not isolated in this direction; \
         ingress allow: by NetworkPolicy shop/api-from-web ingress[0]"
    );
    assert!(
        lines[1].starts_with(
            "FAIL broken probes[1] (shop/web-1 -> shop/db-1 TCP/5432): expected allow, got deny: ingress deny: no rule allows it; isolated by NetworkPolicy shop/"
        ),
        "{out}"
    );
    assert!(lines[2].starts_with("ERROR "), "{out}");
    assert!(
        lines[2].ends_with("unreadable: cannot read the scenario:"),
        "{out}"
    );
    assert!(
        out.contains("unreadable/cluster.yaml: document 1: unparsable YAML"),
        "{out}"
    );
    assert!(
        out.contains("unreadable/policies.yaml: cannot read"),
        "{out}"
    );
    assert_eq!(*lines.last().unwrap(), "1 passed, 3 failed");
}

#[test]
fn compile_prints_rule_sets() {
    let cluster = example("three-tier-shop", "cluster.yaml");
    let policies = example("three-tier-shop", "policies.yaml");
    let o = palisadectl(&["compile", "--cluster", &cluster, "--policies", &policies]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all: serde_yaml::Value = serde_yaml::from_str(&stdout(&o)).unwrap();
    let nodes: Vec<&str> = all
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-1", "node-2"]);

    let o = palisadectl(&[
        "compile",
        "--cluster",
        &cluster,
        "--policies",
        &policies,
        "--node",
        "node-2",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let one: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(one["node"], "node-2");
    let pods: Vec<&str> = one["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pods, ["prom-1", "api-1"]);

    let o = palisadectl(&[
        "compile",
        "--cluster",
        &cluster,
        "--policies",
        &policies,
        "--node",
        "node-9",
    ]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o),
        "error: no node \"node-9\" in the cluster (nodes: node-1, node-2)\n"
    );
}

#[test]
fn explain_names_the_deciding_rule() {
    let cluster = example("admin-tiers", "cluster.yaml");
    let policies = example("admin-tiers", "policies.yaml");
    let explain = |from: &str, to: &str, port: &str, extra: &[&str]| {
        let mut args = vec![
            "explain",
            "--cluster",
            &cluster,
            "--policies",
            &policies,
            "--from",
            from,
            "--to",
            to,
            "--port",
            port,
        ];
        args.extend_from_slice(extra);
        palisadectl(&args)
    };
    let o = explain("blog/wordpress", "payments/ledger", "443", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "blog/wordpress -> payments/ledger TCP/443 (IPv4)\ndeny\n  \
         egress allow: no policy decides; the pod is not isolated in this direction\n  \
         ingress deny: by ClusterNetworkPolicy pci-isolation ingress[1] (everyone-else) tier Admin priority 10\n"
    );

    let o = explain(
        "blog/wordpress",
        "kube-system/coredns",
        "dns",
        &["--protocol", "UDP"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("blog/wordpress -> kube-system/coredns UDP/53 (IPv4)\nallow\n"),
        "{out}"
    );
    assert!(
        out.contains("egress allow: by ClusterNetworkPolicy dns-always egress[0] (to-coredns)"),
        "{out}"
    );

    let o = explain("blog/wordpress", "payments/nobody", "443", &[]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o),
        "error: --to payments/nobody: no such pod in the cluster\n"
    );

    let o = explain(
        "blog/wordpress",
        "payments/ledger",
        "metrics",
        &["--protocol", "UDP"],
    );
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o),
        "error: --port metrics: payments/ledger has no UDP container port of that name\n"
    );
}

#[test]
fn compile_to_nft_prints_each_nodes_table() {
    let cluster = example("admin-tiers", "cluster.yaml");
    let policies = example("admin-tiers", "policies.yaml");
    let o = palisadectl(&[
        "compile",
        "--cluster",
        &cluster,
        "--policies",
        &policies,
        "--node",
        "node-1",
        "-o",
        "nft",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.starts_with("# node node-1: nftables ruleset of palisade-agent\n"),
        "{text}"
    );
    // node-1 runs ledger and wordpress, each with an interface and its own chains.
    assert!(
        text.contains("# pv0: blog/wordpress") && text.contains("# pv1: payments/ledger"),
        "{text}"
    );
    assert!(text.contains("table inet palisade {"), "{text}");
    assert!(text.contains("jump ingress/payments/ledger"), "{text}");
    assert!(
        text.contains("counter name \"deny-ingress/blog/wordpress\" drop"),
        "{text}"
    );
    let all = palisadectl(&[
        "compile",
        "--cluster",
        &cluster,
        "--policies",
        &policies,
        "-o",
        "nft",
    ]);
    assert!(all.status.success());
    assert_eq!(
        stdout(&all).matches("table inet palisade {").count(),
        2,
        "one table per node"
    );
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: web, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
"#;

fn np(spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: shop, name: np}}\nspec: {spec}\n")
}

fn cnp(spec: &str) -> String {
    format!("apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: cnp}}\nspec: {spec}\n")
}

/// Every kind of bad input gets an error naming the file, the object and the field, and
/// nothing is printed on stdout (no partial result).
#[test]
fn bad_policies_are_rejected_with_clear_errors() {
    let valid = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: shop, name: ok}\nspec: {podSelector: {}}\n";
    let rules26: String = (0..26)
        .map(|_| "{action: Deny, from: [{namespaces: {}}]},")
        .collect();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unparsable YAML",
            "spec: [\n".into(),
            "policies.yaml: document 2: unparsable YAML: ",
        ),
        (
            "unknown kind",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n".into(),
            "policies.yaml: Secret s: kind: unknown kind \"Secret\" of apiVersion \"v1\"",
        ),
        (
            "unknown apiVersion",
            "apiVersion: networking.k8s.io/v2\nkind: NetworkPolicy\nmetadata: {name: n}\n".into(),
            "policies.yaml: NetworkPolicy default/n: apiVersion: NetworkPolicy is not supported in \"networking.k8s.io/v2\"",
        ),
        (
            "invalid CIDR",
            np("{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/99}}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.egress[0].to[0].ipBlock.cidr: \"10.0.0.0/99\" is not a valid CIDR",
        ),
        (
            "port 0",
            np("{ingress: [{ports: [{port: 0}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.ingress[0].ports[0].port: port 0 is out of range 1..=65535",
        ),
        (
            "port 70000",
            np("{ingress: [{ports: [{port: 80}, {port: 70000}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.ingress[0].ports[1].port: port 70000 is out of range 1..=65535",
        ),
        (
            "endPort below port",
            np("{ingress: [{ports: [{port: 443}, {port: 80, endPort: 70}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.ingress[0].ports[1].endPort: 70 is below port 80",
        ),
        (
            "unknown protocol",
            np("{ingress: [{ports: [{port: 80, protocol: ICMP}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.ingress[0].ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
        ),
        (
            "unknown operator",
            np("{podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}}"),
            "policies.yaml: NetworkPolicy shop/np: spec.podSelector.matchExpressions[0].operator: unknown operator \"Equals\"",
        ),
        (
            "In without values",
            np("{ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: In}]}}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.ingress[0].from[0].podSelector.matchExpressions[0].values: In needs at least one value",
        ),
        (
            "Exists with values",
            np("{ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}]}]}"),
            "policies.yaml: NetworkPolicy shop/np: spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values: Exists takes no values",
        ),
        (
            "priority out of range",
            cnp("{tier: Admin, priority: -1, subject: {namespaces: {}}}"),
            "policies.yaml: ClusterNetworkPolicy cnp: spec.priority: -1 is out of range 0..=1000",
        ),
        (
            "empty from",
            cnp("{tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Deny, from: []}]}"),
            "policies.yaml: ClusterNetworkPolicy cnp: spec.ingress[0].from: must list at least one peer",
        ),
        (
            "empty to",
            cnp("{tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: []}]}"),
            "policies.yaml: ClusterNetworkPolicy cnp: spec.egress[0].to: must list at least one peer",
        ),
        (
            "port range start >= end",
            cnp("{tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 9000, end: 9000}}}}]}]}"),
            "policies.yaml: ClusterNetworkPolicy cnp: spec.egress[0].protocols[0].tcp.destinationPort.range: start 9000 must be less than end 9000",
        ),
        (
            "more than 25 rules",
            cnp(&format!("{{tier: Baseline, priority: 1, subject: {{namespaces: {{}}}}, ingress: [{rules26}]}}")),
            "policies.yaml: ClusterNetworkPolicy cnp: spec.ingress: 26 rules; at most 25 are allowed",
        ),
        (
            "invalid action for the tier",
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec: {subject: {namespaces: {}}, egress: [{action: Pass, to: [{namespaces: {}}]}]}\n".into(),
            "policies.yaml: BaselineAdminNetworkPolicy default: spec.egress[0].action: Pass is not allowed in a BaselineAdminNetworkPolicy",
        ),
    ];
    for (what, policies, expected) in cases {
        let tmp = TempDir::new();
        let cluster = tmp.write("cluster.yaml", CLUSTER);
        // A valid policy first: the file must still be rejected whole.
        let policies = tmp.write("policies.yaml", &format!("{valid}---\n{policies}"));
        let o = palisadectl(&[
            "compile",
            "--cluster",
            &cluster.display().to_string(),
            "--policies",
            &policies.display().to_string(),
        ]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: accepted");
        assert!(
            stdout(&o).is_empty(),
            "{what}: partial output {}",
            stdout(&o)
        );
        let first = err.lines().next().unwrap_or_default();
        let expected = format!("error: {}", tmp.path(expected));
        assert!(
            first.starts_with(&expected),
            "{what}:\n  got      {first}\n  expected {expected}"
        );
    }
}

#[test]
fn bad_probes_and_cluster_objects_are_named() {
    let tmp = TempDir::new();
    tmp.write("s/cluster.yaml", CLUSTER);
    tmp.write("s/policies.yaml", "");
    tmp.write(
        "s/probes.yaml",
        "probes:\n  - {from: shop/web, to: shop/db, port: 80, expect: deny}\n  - {from: shop/web, to: shop/web, port: grpc, expect: allow}\n",
    );
    tmp.write(
        "c/cluster.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: q}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n",
    );
    tmp.write("c/policies.yaml", "");
    tmp.write("c/probes.yaml", "");
    let o = palisadectl(&["verify", &tmp.path("s"), &tmp.path("c")]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let probes = tmp.path("s/probes.yaml");
    let cluster = tmp.path("c/cluster.yaml");
    for expected in [
        format!("  {probes}: probes[0] (shop/web -> shop/db TCP/80): to: no pod shop/db in the cluster"),
        format!("  {probes}: probes[1] (shop/web -> shop/web TCP/grpc): port: shop/web has no TCP container port named \"grpc\""),
        format!("  {cluster}: Pod default/p: status.podIP: \"10.0.0.300\" is not an IP address"),
        format!("  {cluster}: Pod default/q: spec.containers[0].ports[0].containerPort: port 0 is out of range 1..=65535"),
    ] {
        assert!(out.lines().any(|l| l == expected), "missing {expected:?} in\n{out}");
    }
    assert_eq!(out.lines().last(), Some("0 passed, 2 failed"));
}

/// Audit: with every policy in audit (the default given), explain shows the enforced
/// decision and the one that would be, with its rule; compile carries the audit lists.
#[test]
fn explain_shows_both_verdicts_under_audit() {
    let cluster = example("admin-tiers", "cluster.yaml");
    let policies = example("admin-tiers", "policies.yaml");
    let explain = |default: &str| {
        palisadectl(&[
            "explain",
            "--cluster",
            &cluster,
            "--policies",
            &policies,
            "--from",
            "blog/wordpress",
            "--to",
            "payments/ledger",
            "--port",
            "443",
            "--default-enforcement",
            default,
        ])
    };
    let o = explain("audit");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "blog/wordpress -> payments/ledger TCP/443 (IPv4)\nallow\n  \
         egress allow: no policy decides; the pod is not isolated in this direction\n  \
         ingress allow: no policy decides; the pod is not isolated in this direction\n\
         would be, with the policies in audit (it passes, and is counted and logged as would-deny): deny\n  \
         egress allow: no policy decides; the pod is not isolated in this direction\n  \
         ingress deny: by ClusterNetworkPolicy pci-isolation ingress[1] (everyone-else) tier Admin priority 10\n"
    );
    let o = palisadectl(&[
        "compile",
        "--cluster",
        &cluster,
        "--policies",
        &policies,
        "--default-enforcement",
        "audit",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sets: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let audited = sets
        .as_object()
        .unwrap()
        .values()
        .flat_map(|s| s["pods"].as_array().unwrap())
        .filter(|p| p.get("audit").is_some())
        .count();
    assert!(audited > 0, "no pod has an audit list");
    let o = explain("off");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("audit or enforce"), "{}", stderr(&o));
}
