//! Running `nft`: transactions as `nft -j -f -` documents built from the `nftables` crate's
//! schema types ([`crate::render::json`]), listings read
//! as plain JSON (the crate's schema types hold counters as `u32`, too small for bytes).

use std::io::Write;
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use crate::render::json::{payload_of, Command};
use crate::render::TABLE;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft transaction failed: {0}")]
    Apply(String),
    #[error("cannot run nft: {0}")]
    Exec(String),
    #[error("nft {args}: {stderr}")]
    List { args: String, stderr: String },
    #[error("nft printed invalid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Netlink(String),
}

/// How to reach `nft`: in the current network namespace, or (for tools and tests that stay
/// in theirs) through `ip netns exec NAME nft`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nft {
    pub netns: Option<String>,
}

impl Nft {
    pub fn local() -> Self {
        Nft { netns: None }
    }

    pub fn in_netns(name: impl Into<String>) -> Self {
        Nft {
            netns: Some(name.into()),
        }
    }

    fn program_and_prefix(&self) -> (&str, Vec<&str>) {
        match &self.netns {
            Some(ns) => ("ip", vec!["netns", "exec", ns.as_str(), "nft"]),
            None => ("nft", vec![]),
        }
    }

    /// Runs the commands as one transaction: all or nothing. (Run here rather than with
    /// `nftables::helper::apply_ruleset_raw`, which lets nft's stderr go to ours and so
    /// loses the reason of a failure.)
    pub fn apply(&self, cmds: &[Command]) -> Result<(), NftError> {
        self.run_file(&["-j", "-f", "-"], payload_of(cmds))
    }

    /// Runs nft text ([`crate::render::text`]) as one transaction: all or nothing. For
    /// whole tables: nft 1.0.6 read a tiered node's table (11,000 rules) as text in 0.79 s,
    /// as JSON in 1.34 s.
    pub fn apply_text(&self, text: String) -> Result<(), NftError> {
        self.run_file(&["-f", "-"], text)
    }

    fn run_file(&self, args: &[&str], payload: String) -> Result<(), NftError> {
        let (program, prefix) = self.program_and_prefix();
        let mut child = Process::new(program)
            .args(prefix)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NftError::Exec(format!("{program}: {e}")))?;
        remember_child(child.id());
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| NftError::Exec("nft stdin unavailable".into()))?;
        // Written from a thread: nft may fill its stderr pipe before reading all input.
        let writer = std::thread::spawn(move || stdin.write_all(payload.as_bytes()));
        let out = child
            .wait_with_output()
            .map_err(|e| NftError::Exec(format!("{program}: {e}")))?;
        let written = writer
            .join()
            .map_err(|_| NftError::Exec("writer panicked".into()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(NftError::Apply(stderr));
        }
        written.map_err(|e| NftError::Exec(format!("writing to nft: {e}")))
    }

    /// `nft -j ARGS`, parsed. `Ok(None)` when nft says the object does not exist.
    pub fn list(&self, args: &[&str]) -> Result<Option<Value>, NftError> {
        let (program, prefix) = self.program_and_prefix();
        let out = Process::new(program)
            .args(prefix)
            .arg("-j")
            .args(args)
            .output()
            .map_err(|e| NftError::Exec(format!("{program}: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(NftError::List {
                args: args.join(" "),
                stderr,
            });
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| NftError::Json(e.to_string()))
    }

    /// The table without set contents (`-t`): what drift detection compares.
    pub fn list_table_terse(&self) -> Result<Option<Value>, NftError> {
        self.list(&["-t", "list", "table", "inet", TABLE])
    }

    pub fn list_table(&self) -> Result<Option<Value>, NftError> {
        self.list(&["list", "table", "inet", TABLE])
    }

    pub fn list_map(&self, map: &str) -> Result<Option<Value>, NftError> {
        self.list(&["list", "map", "inet", TABLE, map])
    }

    /// Every named counter of the table: name → (packets, bytes), straight over netlink
    /// ([`crate::nfnl::counters`]: `nft list counters` costs ~0.45 s with 150k set
    /// elements), in this namespace or the named one.
    pub fn counters(&self) -> Result<Vec<(String, u64, u64)>, NftError> {
        crate::nfnl::counters::read(self.netns.as_deref(), TABLE)
            .map_err(|e| NftError::Netlink(e.to_string()))
    }

    /// The same as [`Nft::counters`], always through `nft list counters`.
    pub fn counters_by_nft(&self) -> Result<Vec<(String, u64, u64)>, NftError> {
        let Some(doc) = self.list(&["list", "counters", "table", "inet", TABLE])? else {
            return Ok(Vec::new());
        };
        Ok(objects(&doc)
            .filter_map(|o| o.get("counter"))
            .filter_map(|c| {
                Some((
                    c.get("name")?.as_str()?.to_string(),
                    c.get("packets")?.as_u64()?,
                    c.get("bytes")?.as_u64()?,
                ))
            })
            .collect())
    }

    /// Whether `nft` can be run at all.
    pub fn available(&self) -> bool {
        let (program, prefix) = self.program_and_prefix();
        Process::new(program)
            .args(prefix)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// The last `nft` processes this process started: their transactions are ours, not drift
/// ([`crate::nfnl::events`]). A pid is recorded before the child can commit anything.
static CHILDREN: std::sync::Mutex<std::collections::VecDeque<u32>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const CHILDREN_KEPT: usize = 64;

fn remember_child(pid: u32) {
    let mut kids = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    if kids.len() == CHILDREN_KEPT {
        kids.pop_front();
    }
    kids.push_back(pid);
}

/// Whether `pid` is an `nft` (or `ip netns exec … nft`) this process started recently.
pub fn spawned_by_us(pid: u32) -> bool {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&pid)
}

/// The objects of an `nft -j` document.
pub fn objects(doc: &Value) -> impl Iterator<Item = &Value> {
    doc.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}
