//! Where the node's rule set comes from: a file holding a `NodeRuleSet` (JSON or YAML), or a
//! cluster-state file and a policies file that the agent compiles for its node itself. Either
//! is re-read when a file's modification time changes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use palisade_policy::ruleset::NodeRuleSet;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rules file {path} is not a valid NodeRuleSet: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Load(#[from] palisade_resources::LoadError),
    #[error("node {0:?} is not in the cluster state")]
    UnknownNode(String),
}

/// The node's rule set as configured: a rules file, or cluster state and policies compiled
/// here for one node.
pub enum RuleSource {
    File(FileWatch),
    Compile {
        cluster: FileWatch,
        policies: FileWatch,
        node: String,
    },
}

impl RuleSource {
    /// New rules when an input changed since the last call (always on the first call);
    /// `None` when nothing changed. An error leaves the caller's last rules in force.
    pub fn poll(&mut self) -> Option<Result<NodeRuleSet, SourceError>> {
        match self {
            RuleSource::File(watch) => watch.changed().then(|| load_rules(watch.path())),
            RuleSource::Compile {
                cluster,
                policies,
                node,
            } => {
                // Both watches must see every change, so neither call may be skipped.
                let (a, b) = (cluster.changed(), policies.changed());
                (a || b).then(|| compile_for_node(cluster.path(), policies.path(), node))
            }
        }
    }
}

/// Loads cluster state and policies (each valid as a whole, or an error) and compiles the
/// rule set of one node.
pub fn compile_for_node(
    cluster: &Path,
    policies: &Path,
    node: &str,
) -> Result<NodeRuleSet, SourceError> {
    let (cluster, _services) = palisade_resources::load_cluster(cluster)?;
    let policies = palisade_resources::load_policies(policies)?;
    for w in &policies.warnings {
        tracing::warn!(warning = %w, "policy warning");
    }
    palisade_policy::Compiler::new(cluster, policies.policies)
        .node_rule_set(node)
        .ok_or_else(|| SourceError::UnknownNode(node.to_string()))
}

/// Parses a `NodeRuleSet` from JSON (text starting with `{`) or YAML (same shape as the
/// JSON, enums as single-key maps). `origin` names the
/// input in errors.
pub fn parse_rules(text: &str, origin: &Path) -> Result<NodeRuleSet, SourceError> {
    let parse_err = |message: String| SourceError::Parse {
        path: origin.to_path_buf(),
        message,
    };
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))
    } else {
        // Through a JSON value: serde_yaml 0.9 wants YAML tags for enums, while the
        // JSON form (`{peerPort: {...}}`) is what people write and what JSON files use.
        let value: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        serde_json::from_value(value).map_err(|e| parse_err(e.to_string()))
    }
}

pub fn load_rules(path: &Path) -> Result<NodeRuleSet, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_rules(&text, path)
}

/// Polls a file's modification time (and size, for writers within one mtime tick).
pub struct FileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileWatch {
            path: path.into(),
            seen: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True the first time and whenever the file changed since the last call that
    /// returned true. A missing file counts as unchanged (the last rules stay in force).
    pub fn changed(&mut self) -> bool {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return false;
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.seen == Some(stamp) {
            return false;
        }
        self.seen = Some(stamp);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_parse_and_errors_name_the_file() {
        let json = r#"{"node":"n1","node_addresses":[],"pods":[],"groups":{},"rules":{}}"#;
        let rs = parse_rules(json, Path::new("a.json")).unwrap();
        assert_eq!(rs.node, "n1");
        let yaml = "node: n2\nnode_addresses: []\npods: []\ngroups: {}\nrules: {}\n";
        assert_eq!(parse_rules(yaml, Path::new("a.yaml")).unwrap().node, "n2");
        let err = parse_rules("node: [", Path::new("bad.yaml")).unwrap_err();
        assert!(err.to_string().contains("bad.yaml"), "{err}");
        let err = parse_rules(r#"{"node": 3}"#, Path::new("bad.json")).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }

    #[test]
    fn watch_reports_changes_once() {
        let dir = std::env::temp_dir().join(format!("palisade-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules.yaml");
        let mut w = FileWatch::new(&file);
        assert!(!w.changed(), "missing file is no change");
        std::fs::write(&file, "a").unwrap();
        assert!(w.changed());
        assert!(!w.changed());
        std::fs::write(&file, "abc").unwrap();
        assert!(w.changed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod compile_source_tests {
    use super::*;

    const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: a, name: web, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}\nstatus: {podIP: 10.1.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: a, name: db, labels: {app: db}}\nspec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIP: 10.1.0.3}\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: a, name: web}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}]}]\n";

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("palisade-source-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn compiles_the_node_and_recompiles_on_change_keeping_errors_out() {
        let d = dir();
        let (cluster, policies) = (d.join("cluster.yaml"), d.join("policies.yaml"));
        std::fs::write(&cluster, CLUSTER).unwrap();
        std::fs::write(&policies, POLICY).unwrap();
        let mut source = RuleSource::Compile {
            cluster: FileWatch::new(&cluster),
            policies: FileWatch::new(&policies),
            node: "n1".into(),
        };
        let rules = source
            .poll()
            .expect("first poll loads")
            .expect("valid inputs");
        assert_eq!(rules.node, "n1");
        let web = rules.pod("a", "web").expect("web runs on n1");
        assert_eq!(web.ingress.isolated_by.len(), 1);
        assert!(rules.pod("a", "db").is_none(), "db runs on n2");
        assert!(source.poll().is_none(), "nothing changed");

        // A broken policies file is an error naming the field; the caller keeps its rules.
        std::fs::write(
            &policies,
            POLICY.replace(
                "podSelector: {matchLabels: {app: web}}",
                "podSelector: {matchExpressions: [{key: app, operator: Near}]}",
            ),
        )
        .unwrap();
        let err = source.poll().expect("changed").expect_err("bad operator");
        assert!(err.to_string().contains("operator"), "{err}");

        let mut other = RuleSource::Compile {
            cluster: FileWatch::new(&cluster),
            policies: FileWatch::new(d.join("missing.yaml")),
            node: "n9".into(),
        };
        let err = other
            .poll()
            .expect("first poll")
            .expect_err("policies file missing");
        assert!(err.to_string().contains("missing.yaml"), "{err}");
        std::fs::write(d.join("missing.yaml"), "").unwrap();
        let err = other
            .poll()
            .expect("now present")
            .expect_err("no such node");
        assert!(matches!(err, SourceError::UnknownNode(n) if n == "n9"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
