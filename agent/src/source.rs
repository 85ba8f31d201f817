//! Where the node's rule set comes from: a file holding a `NodeRuleSet` (JSON or YAML),
//! re-read when its modification time changes.

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
