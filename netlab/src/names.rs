//! Names of labs and of the namespaces and interfaces in them, and cleaning up after labs
//! that did not get to remove themselves.
//!
//! A lab's namespaces are all named `PREFIX-...`. The automatic prefix is
//! `pl<pid>x<counter>`: unique among running processes and within one, so labs built in
//! parallel (tests, benchmarks) never collide, and [`cleanup_dead_labs`] can tell from the
//! pid whether the lab's owner still runs. Interface names are local to a namespace, so they
//! are short fixed patterns (`eth0`, `ul0`, `pv<N>`, `br0`) that fit the kernel's 15
//! characters whatever the cluster's names are.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{LabError, Result};
use crate::netns;

/// The start of every automatic lab prefix.
pub const LAB_PREFIX: &str = "pl";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix no existing namespace uses yet.
pub(crate) fn fresh_prefix() -> Result<String> {
    let existing = netns::list()?;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{LAB_PREFIX}{}x{n}", std::process::id());
        let taken = existing
            .iter()
            .any(|name| name.starts_with(&format!("{prefix}-")));
        if !taken {
            return Ok(prefix);
        }
    }
}

/// A user-chosen prefix must be usable in file names and not be empty.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LabError::invalid(
            "LabOptions",
            "prefix",
            format!("{prefix:?} must be 1 to 64 characters of letters, digits, '-' and '_'"),
        ))
    }
}

/// Keeps a cluster name readable in a namespace name: safe characters only, bounded length.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

/// Removes every network namespace whose name starts with `prefix` (leftovers of a crashed
/// lab) and returns their names. An empty prefix is refused: it would remove every
/// namespace on the machine.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    if prefix.is_empty() {
        return Err(LabError::invalid(
            "cleanup_stale",
            "prefix",
            "must not be empty (it would remove every network namespace on the machine)",
        ));
    }
    remove_matching(|name| name.starts_with(prefix))
}

/// Removes the namespaces of automatically named labs whose owning process no longer runs.
pub fn cleanup_dead_labs() -> Result<Vec<String>> {
    remove_matching(|name| match owner_pid(name) {
        Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    })
}

/// The pid in an automatic lab namespace name `pl<pid>x<n>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(LAB_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, _) = rest.split_once('-')?;
    if counter.is_empty() || !counter.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn remove_matching(matches: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in netns::list()? {
        if matches(&name) {
            netns::delete(&name)
                .map_err(|e| LabError::io(format!("removing network namespace {name}"), e))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_automatic_names_only() {
        assert_eq!(owner_pid("pl1234x0-n0-node-a"), Some(1234));
        assert_eq!(owner_pid("pl77x12-ul"), Some(77));
        assert_eq!(owner_pid("plain-ns"), None);
        assert_eq!(owner_pid("pl12x-ul"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn sanitize_keeps_names_safe_and_short() {
        assert_eq!(sanitize("shop/web-1"), "shop_web-1");
        assert_eq!(sanitize(&"a".repeat(100)).len(), 40);
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("mylab-1").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("a/b").is_err());
    }

    #[test]
    fn empty_cleanup_prefix_is_refused() {
        assert!(cleanup_stale("").is_err());
    }
}
