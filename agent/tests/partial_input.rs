//! Issue 12.2: file sources never act on a half-written file. Real files and real inotify
//! (no root needed): a writer holds each file open half-written, the way a slow `cp` or a
//! writer that stalls does, and the watch must not report it until the write is complete;
//! a rules file that says how much it holds is refused when it is cut short, even once
//! closed (a writer killed half-way).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use palisade_agent::source::{compile_for_node, load_rules, parse_rules, FileWatch};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("palisade-partial-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const RULES: &str = "node: n1
node_addresses: []
pods:
- {namespace: a, name: p1, ips: [10.1.0.1], ingress: {admin: [], isolatedBy: [], networkPolicy: [], baseline: []}, egress: {admin: [], isolatedBy: [], networkPolicy: [], baseline: []}}
- {namespace: a, name: p2, ips: [10.1.0.2], ingress: {admin: [], isolatedBy: [], networkPolicy: [], baseline: []}, egress: {admin: [], isolatedBy: [], networkPolicy: [], baseline: []}}
- {namespace: a, name: p3, ips: [10.1.0.3], ingress: {admin: [], isolatedBy: [], networkPolicy: [], baseline: []}, egress: {admin: [], isolatedBy: [], networkPolicy: [], baseline: []}}
groups: {}
rules: {}
";

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: client, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: web, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.1.0.2}
";

const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: a, name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
";

/// Writes `text` up to (and including) `cut` and keeps the file open, as a writer in the
/// middle of its work.
fn start_writing(path: &Path, text: &str, cut: &str) -> (File, String) {
    let at = text
        .find(cut)
        .unwrap_or_else(|| panic!("{cut:?} not in text"))
        + cut.len();
    let mut f = File::create(path).unwrap();
    f.write_all(&text.as_bytes()[..at]).unwrap();
    f.flush().unwrap();
    (f, text[at..].to_string())
}

/// The rules file: nothing is reported while it is half-written, then the whole file.
#[test]
fn a_rules_file_cut_at_a_pod_boundary_is_not_taken() {
    let d = Dir::new("rules");
    let path = d.0.join("rules.yaml");
    let mut watch = FileWatch::new(&path);
    let (mut f, rest) = start_writing(&path, RULES, "baseline: []}}\n");
    assert!(
        !watch.changed(),
        "a half-written rules file (one pod of three) must not be reported"
    );
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    assert!(watch.changed(), "the completed file is reported");
    assert_eq!(load_rules(&path).unwrap().pods.len(), 3);
}

/// The cluster file cut at `---`: the pod after it would be missing, left unenforced.
#[test]
fn a_cluster_file_cut_at_a_document_boundary_is_not_taken() {
    let d = Dir::new("cluster");
    let (cluster, policies) = (d.0.join("cluster.yaml"), d.0.join("policies.yaml"));
    std::fs::write(&policies, POLICIES).unwrap();
    let mut watch = FileWatch::new(&cluster);
    let cut = "status: {podIP: 10.1.0.3}\n---\n";
    let (mut f, rest) = start_writing(&cluster, CLUSTER, cut);
    assert!(
        compile_for_node(&cluster, &policies, "n1")
            .unwrap()
            .pod("a", "web")
            .is_none(),
        "what the half-written file says: web is missing"
    );
    assert!(
        !watch.changed(),
        "a cluster file cut at --- must not be reported"
    );
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    assert!(watch.changed());
    let rules = compile_for_node(&cluster, &policies, "n1").unwrap();
    assert_eq!(rules.pod("a", "web").unwrap().ingress.isolated_by.len(), 1);
}

/// The policies file cut after `- from:`: `from` empty means from anywhere.
#[test]
fn a_policies_file_cut_after_from_is_not_taken() {
    let d = Dir::new("policies");
    let (cluster, policies) = (d.0.join("cluster.yaml"), d.0.join("policies.yaml"));
    std::fs::write(&cluster, CLUSTER).unwrap();
    let mut watch = FileWatch::new(&policies);
    let (mut f, rest) = start_writing(&policies, POLICIES, "- from:\n");
    let half = compile_for_node(&cluster, &policies, "n1").unwrap();
    let web = half.pod("a", "web").unwrap();
    assert!(
        web.ingress.network_policy[0]
            .clauses
            .iter()
            .any(|c| matches!(
                c,
                palisade_policy::ruleset::Clause::PeerPort { peers: None, .. }
            )),
        "what the half-written file says: allow from anywhere"
    );
    assert!(
        !watch.changed(),
        "a policies file cut after `- from:` must not be reported"
    );
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    assert!(watch.changed());
    let full = compile_for_node(&cluster, &policies, "n1").unwrap();
    let web = full.pod("a", "web").unwrap();
    assert!(web.ingress.network_policy[0]
        .clauses
        .iter()
        .all(|c| !matches!(
            c,
            palisade_policy::ruleset::Clause::PeerPort { peers: None, .. }
        )));
}

/// A file renamed into place is complete at once (the documented way to write).
#[test]
fn a_file_renamed_into_place_is_taken_at_once() {
    let d = Dir::new("rename");
    let path = d.0.join("rules.yaml");
    let mut watch = FileWatch::new(&path);
    // A temporary file of the same directory held open half-written does not matter.
    let (_tmp, _) = start_writing(&d.0.join(".rules.yaml.tmp"), RULES, "pods:\n");
    std::fs::write(d.0.join("next"), RULES).unwrap();
    std::fs::rename(d.0.join("next"), &path).unwrap();
    assert!(watch.changed());
    assert_eq!(load_rules(&path).unwrap().pods.len(), 3);
}

/// A rules file that says what it holds is refused when it holds less (its writer died
/// half-way and the kernel closed the file), and strictly decoded.
#[test]
fn a_rules_file_with_integrity_counts_is_refused_when_cut_short() {
    let whole = format!("integrity: {{pods: 3, groups: 0, rules: 0}}\n{RULES}");
    assert_eq!(
        parse_rules(&whole, Path::new("rules.yaml"))
            .unwrap()
            .pods
            .len(),
        3
    );
    // Cut after the second pod, closed: YAML that parses, with a pod less.
    let cut = whole.find("- {namespace: a, name: p3").unwrap();
    let short = format!("{}groups: {{}}\nrules: {{}}\n", &whole[..cut]);
    let err = parse_rules(&short, Path::new("rules.yaml")).unwrap_err();
    assert!(
        err.to_string()
            .contains("integrity.pods: the file says 3 and holds 2"),
        "{err}"
    );
    let json = serde_json::to_string(&parse_rules(RULES, Path::new("r")).unwrap()).unwrap();
    let json = json.replacen('{', r#"{"integrity":{"pods":4},"#, 1);
    assert!(parse_rules(&json, Path::new("rules.json")).is_err());
}

/// Issue 12.4 for the rules loader: unknown fields and duplicate keys are errors with their
/// path.
#[test]
fn rules_files_are_decoded_strictly() {
    let typo = RULES.replacen("isolatedBy: []", "isolatedBy: [], isolatedby: [x]", 1);
    let err = parse_rules(&typo, Path::new("rules.yaml")).unwrap_err();
    assert!(
        err.to_string()
            .contains("pods[0].ingress.isolatedby: unknown field"),
        "{err}"
    );
    let dup = RULES.replacen("node: n1\n", "node: n1\nnode: n2\n", 1);
    let err = parse_rules(&dup, Path::new("rules.yaml")).unwrap_err();
    assert!(err.to_string().contains("node: duplicate key"), "{err}");
    let json = r#"{"node":"n1","node_addresses":[],"pods":[],"groups":{"g":{"hosts":{"v4":[],"v6":[]}},"g":{"hosts":{"v4":[],"v6":[]}}},"rules":{}}"#;
    let err = parse_rules(json, Path::new("rules.json")).unwrap_err();
    assert!(err.to_string().contains("groups.g: duplicate key"), "{err}");
}
