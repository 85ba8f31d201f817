//! Where the node's rule set comes from: a file holding a `NodeRuleSet` (JSON or YAML), or a
//! cluster-state file and a policies file that the agent compiles for its node itself. Either
//! is re-read when a file's modification time changes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use palisade_policy::ruleset::NodeRuleSet;
use palisade_policy::Enforcement;

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
    #[error("input {path} holds {size} bytes, more than the limit of {limit} (max_input_bytes)")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("input {path} nests {depth} levels of [ or {{ deep at line {line}, more than the limit of {limit} (max_nesting_depth)")]
    TooDeep {
        path: PathBuf,
        depth: usize,
        line: usize,
        limit: usize,
    },
}

/// Bounds on one input file, checked before it is parsed: the parser's time and memory
/// grow with the size (a 227 MB cluster file took 51 s and 6.4 GB) and, for YAML, faster
/// with the nesting depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 20,
            max_depth: 64,
        }
    }
}

/// Reads an input within `limits`.
pub fn read_input(path: &Path, limits: &Limits) -> Result<String, SourceError> {
    use std::io::Read;
    let read_err = |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file at the limit from a longer one, whatever
    // its size said a moment ago.
    file.take(limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let size = bytes.len() as u64;
    if size > limits.max_bytes {
        return Err(SourceError::TooLarge {
            path: path.to_path_buf(),
            size: std::fs::metadata(path).map_or(size, |m| m.len().max(size)),
            limit: limits.max_bytes,
        });
    }
    let text = palisade_resources::strict::text_of(bytes).map_err(|message| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            message,
        ))
    })?;
    let (depth, line) = palisade_resources::strict::flow_depth(&text);
    if depth > limits.max_depth {
        return Err(SourceError::TooDeep {
            path: path.to_path_buf(),
            depth,
            line,
            limit: limits.max_depth,
        });
    }
    Ok(text)
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

/// First wait before loading again inputs that failed to load; doubled per failure.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The last failed load: of which inputs, and when to try them again.
#[derive(Debug)]
struct Failure {
    stamps: Vec<Option<Stamp>>,
    backoff: Duration,
    retry_at: Instant,
}

/// A [`RuleSource`] with its retry state: a load that fails stays due, and is tried again
/// with exponential back-off (250 ms doubling to 30 s) until one succeeds, whatever the
/// error. A failure caused by the moment (too many open files, memory) then heals by
/// itself, and one caused by the content costs a log line per back-off step; a new write
/// of an input is tried at once.
pub struct Source {
    inputs: RuleSource,
    failure: Option<Failure>,
    limits: Limits,
    /// The mode of policies that neither their annotation nor their namespace sets, when
    /// compiling from cluster and policy files.
    default_enforcement: Enforcement,
}

impl From<RuleSource> for Source {
    fn from(inputs: RuleSource) -> Self {
        Source {
            inputs,
            failure: None,
            limits: Limits::default(),
            default_enforcement: Enforcement::Enforce,
        }
    }
}

/// What the loading thread reports: the load's result and, after a failure, when it is
/// tried again.
pub type Loaded = (Result<NodeRuleSet, SourceError>, Option<Duration>);

impl Source {
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn with_default_enforcement(mut self, default: Enforcement) -> Self {
        self.default_enforcement = default;
        self
    }

    /// Polls every `interval` on a thread of its own and sends what loads, so parsing a
    /// big or hostile input never stalls the loop that applies rules, follows interfaces
    /// and answers signals. The thread ends when the receiver is dropped.
    pub fn spawn(mut self, interval: Duration) -> tokio::sync::mpsc::Receiver<Loaded> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let spawned = std::thread::Builder::new()
            .name("rule-source".into())
            .spawn(move || loop {
                if let Some(result) = self.poll() {
                    if tx.blocking_send((result, self.retry_in())).is_err() {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(interval);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the rule source's thread");
        }
        rx
    }

    /// New rules when an input changed since the last successful load (always on the first
    /// call), or a failed load's retry is due; `None` otherwise, and while an input is in
    /// the middle of being written. An error leaves the caller's last rules in force.
    pub fn poll(&mut self) -> Option<Result<NodeRuleSet, SourceError>> {
        let watches: Vec<&mut FileWatch> = match &mut self.inputs {
            RuleSource::File(w) => vec![w],
            RuleSource::Compile {
                cluster, policies, ..
            } => vec![cluster, policies],
        };
        let mut stamps = Vec::new();
        let mut due = false;
        for w in watches {
            // Every watch observes on every call, so none misses a write's events.
            match w.observe() {
                Observed::Writing => return None,
                Observed::Missing => stamps.push(None),
                Observed::Stamp(s) => {
                    due |= w.loaded != Some(s);
                    stamps.push(Some(s));
                }
            }
        }
        if !due {
            return None;
        }
        let now = Instant::now();
        let repeat = self.failure.as_ref().filter(|f| f.stamps == stamps);
        if repeat.is_some_and(|f| now < f.retry_at) {
            return None;
        }
        let backoff = repeat.map_or(FIRST_RETRY, |f| (f.backoff * 2).min(MAX_RETRY));
        let result = self.inputs.load(&self.limits, self.default_enforcement);
        match &result {
            Ok(_) => {
                self.failure = None;
                self.inputs.loaded(&stamps);
            }
            Err(_) => {
                self.failure = Some(Failure {
                    stamps,
                    backoff,
                    retry_at: now + backoff,
                })
            }
        }
        Some(result)
    }

    /// How long until the next retry of a failed load, if one is waiting.
    pub fn retry_in(&self) -> Option<Duration> {
        self.failure
            .as_ref()
            .map(|f| f.retry_at.saturating_duration_since(Instant::now()))
    }
}

impl RuleSource {
    fn load(&self, limits: &Limits, default: Enforcement) -> Result<NodeRuleSet, SourceError> {
        match self {
            RuleSource::File(watch) => {
                parse_rules(&read_input(watch.path(), limits)?, watch.path())
            }
            RuleSource::Compile {
                cluster,
                policies,
                node,
            } => compile_within(cluster.path(), policies.path(), node, limits, default),
        }
    }

    fn loaded(&mut self, stamps: &[Option<Stamp>]) {
        let watches: Vec<&mut FileWatch> = match self {
            RuleSource::File(w) => vec![w],
            RuleSource::Compile {
                cluster, policies, ..
            } => vec![cluster, policies],
        };
        for (w, s) in watches.into_iter().zip(stamps) {
            if s.is_some() {
                w.loaded = *s;
            }
        }
    }
}

/// Loads cluster state and policies (each valid as a whole, or an error) and compiles the
/// rule set of one node, within the default [`Limits`], policies enforced unless they
/// say otherwise.
pub fn compile_for_node(
    cluster: &Path,
    policies: &Path,
    node: &str,
) -> Result<NodeRuleSet, SourceError> {
    compile_within(
        cluster,
        policies,
        node,
        &Limits::default(),
        Enforcement::Enforce,
    )
}

fn compile_within(
    cluster: &Path,
    policies: &Path,
    node: &str,
    limits: &Limits,
    default: Enforcement,
) -> Result<NodeRuleSet, SourceError> {
    let cluster_text = read_input(cluster, limits)?;
    let policies_text = read_input(policies, limits)?;
    let (cluster, _services) =
        palisade_resources::parse_cluster_text(&cluster.display().to_string(), &cluster_text)?;
    drop(cluster_text);
    let policies =
        palisade_resources::parse_policies(&policies.display().to_string(), &policies_text)?;
    for w in &policies.warnings {
        tracing::warn!(warning = %w, "policy warning");
    }
    // Audit lists only where some policy is in audit (else one compile, as without).
    let compiler = palisade_policy::StagedCompiler::new(cluster, policies.policies, default);
    for w in compiler.enforcement_warnings() {
        tracing::warn!(warning = %w, "policy warning");
    }
    compiler
        .node_rule_set(node)
        .ok_or_else(|| SourceError::UnknownNode(node.to_string()))
}

/// Parses a rules file ([`palisade_resources::rules_file::parse`]: JSON or YAML, strict,
/// its `integrity` counts checked); `origin` names the input in errors.
pub fn parse_rules(text: &str, origin: &Path) -> Result<NodeRuleSet, SourceError> {
    palisade_resources::rules_file::parse(text).map_err(|e| SourceError::Parse {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })
}

pub fn load_rules(path: &Path) -> Result<NodeRuleSet, SourceError> {
    parse_rules(&read_input(path, &Limits::default())?, path)
}

/// What identifies one version of a file: modification time, size, inode and change time
/// (a rename into place changes the inode; a rewrite within one mtime tick the ctime or the
/// size).
pub type Stamp = (SystemTime, u64, u64, i64, i64);

/// What a [`FileWatch`] sees of its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Not there (the last rules stay in force).
    Missing,
    /// Being written: modified and not yet closed.
    Writing,
    Stamp(Stamp),
}

/// Follows one input file. A file is acted on only once a write is complete: it was
/// renamed into place (`IN_MOVED_TO`, and the symlink swap of a ConfigMap volume, which
/// never touches the file's own name), or the process writing it closed it
/// (`IN_CLOSE_WRITE` after `IN_MODIFY`), as inotify on the file's directory reports. A
/// file modified and not yet closed is [`Observed::Writing`], however long that lasts, so
/// a writer stalled half-way is never read. Without inotify (no directory, out of
/// watches) only the stamp is compared, with a warning. The file's stamp is compared with
/// the one last loaded successfully, so a failed load stays due.
pub struct FileWatch {
    path: PathBuf,
    /// The stamp of the version last loaded successfully.
    loaded: Option<Stamp>,
    writes: Option<WriteTracker>,
}

impl FileWatch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let writes = WriteTracker::new(&path)
            .map_err(|e| {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot watch the file's directory for complete writes; a file read in the middle of a write may be refused or, in a format that cannot tell, taken as written so far");
            })
            .ok();
        FileWatch {
            path,
            loaded: None,
            writes,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's state now.
    pub fn observe(&mut self) -> Observed {
        if let Some(w) = &mut self.writes {
            if w.writing() {
                return Observed::Writing;
            }
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                Observed::Stamp((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                    meta.ino(),
                    meta.ctime(),
                    meta.ctime_nsec(),
                ))
            }
            Err(_) => Observed::Missing,
        }
    }

    /// True the first time and whenever the file changed since the last call that
    /// returned true (records the new version as loaded).
    pub fn changed(&mut self) -> bool {
        match self.observe() {
            Observed::Stamp(s) if self.loaded != Some(s) => {
                self.loaded = Some(s);
                true
            }
            _ => false,
        }
    }
}

/// inotify on a file's directory: whether a write to the file is in progress.
struct WriteTracker {
    inotify: Inotify,
    dir: PathBuf,
    name: std::ffi::OsString,
    writing: bool,
}

impl WriteTracker {
    fn new(path: &Path) -> nix::Result<WriteTracker> {
        let name = path.file_name().ok_or(nix::Error::EINVAL)?.to_os_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_CREATE,
        )?;
        Ok(WriteTracker {
            inotify,
            dir: dir.to_path_buf(),
            name,
            writing: false,
        })
    }

    /// Takes the events queued so far and says whether a write is in progress.
    fn writing(&mut self) -> bool {
        use std::os::unix::fs::MetadataExt;
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => events,
                Ok(_) | Err(nix::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read inotify events");
                    break;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events lost: the stamp alone decides from here on.
                    self.writing = false;
                    continue;
                }
                if ev.name.as_deref() != Some(self.name.as_os_str()) {
                    continue;
                }
                // A regular file created under the name is being written until closed; a
                // symlink or hard link made there is complete at once.
                let created_file = ev.mask.contains(AddWatchFlags::IN_CREATE)
                    && std::fs::symlink_metadata(self.dir.join(&self.name))
                        .is_ok_and(|m| m.is_file() && m.nlink() == 1);
                if ev.mask.contains(AddWatchFlags::IN_MODIFY) || created_file {
                    self.writing = true;
                }
                if ev.mask.intersects(
                    AddWatchFlags::IN_CLOSE_WRITE
                        | AddWatchFlags::IN_MOVED_TO
                        | AddWatchFlags::IN_MOVED_FROM
                        | AddWatchFlags::IN_DELETE,
                ) {
                    self.writing = false;
                }
            }
        }
        self.writing
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
        let mut source = Source::from(RuleSource::Compile {
            cluster: FileWatch::new(&cluster),
            policies: FileWatch::new(&policies),
            node: "n1".into(),
        });
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

        let mut other = Source::from(RuleSource::Compile {
            cluster: FileWatch::new(&cluster),
            policies: FileWatch::new(d.join("missing.yaml")),
            node: "n9".into(),
        });
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
