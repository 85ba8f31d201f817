//! Entering a named network namespace (`/var/run/netns/NAME`, as `ip netns` makes them).
//! `setns(2)` moves only the calling thread, so work for another namespace runs on a thread
//! of its own ([`spawn_in`]) unless the whole process is meant to live there.

use std::fs::File;
use std::thread::JoinHandle;

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
#[error("network namespace {path}: {reason}")]
pub struct NetnsError {
    pub path: String,
    pub reason: String,
}

/// Moves the calling thread into namespace `name`; threads and programs it starts later
/// inherit it.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = format!("/var/run/netns/{name}");
    let fail = |reason: String| NetnsError {
        path: path.clone(),
        reason,
    };
    let file = File::open(&path).map_err(|e| fail(e.to_string()))?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| fail(e.to_string()))
}

/// Runs `f` on a new thread inside namespace `name`.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T, NetnsError>> {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter(&name)?;
        Ok(f())
    })
}
