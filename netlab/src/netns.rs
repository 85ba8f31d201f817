//! Named network namespaces: creating, entering, running commands in and removing them.
//!
//! Namespaces are the ones `ip netns` knows: bind mounts under [`NETNS_DIR`]. Entering one
//! is always done on a thread of its own (or in a child process before `exec`), because
//! `setns(2)` changes the calling thread only and a thread left in a lab namespace would
//! silently run unrelated code there.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{LabError, Result};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Opens a named namespace; the descriptor is what `setns(2)` takes.
pub(crate) fn open(name: &str) -> Result<OwnedFd> {
    let file = File::open(netns_path(name))
        .map_err(|e| LabError::io(format!("opening network namespace {name}"), e))?;
    Ok(OwnedFd::from(file))
}

pub(crate) fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor, which `fd` keeps open for the call.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` on a new thread inside the namespace and returns its result.
pub(crate) fn run_in<R: Send>(fd: BorrowedFd<'_>, f: impl FnOnce() -> R + Send) -> io::Result<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                enter(fd)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
    })
}

/// A command that runs inside the named namespace (entered between fork and exec, so
/// nothing else is affected). Unlike `ip netns exec`, `/sys` is not remounted, which no
/// networking tool (`ip`, `nft`, `ss`) needs.
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let fd = open(netns)?;
    let mut command = Command::new(program);
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(move || enter(fd.as_fd()));
    }
    Ok(command)
}

/// Runs `argv` inside the named namespace and returns its output; a non-zero exit status
/// is an error carrying the command's standard error.
pub fn exec_in(netns: &str, argv: &[&str]) -> Result<Output> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| LabError::NotFound("exec_in: empty command".to_string()))?;
    let output = command_in(netns, program)?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::io(format!("running {program} in {netns}"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::Command {
            netns: netns.to_string(),
            command: argv.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Like [`exec_in`], with `input` written to the command's standard input (for
/// `nft -f -` and `ip -batch -`).
pub fn exec_in_with_input(netns: &str, argv: &[&str], input: &str) -> Result<Output> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| LabError::NotFound("exec_in: empty command".to_string()))?;
    let child = command_in(netns, program)?
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::io(format!("running {program} in {netns}"), e))?;
    finish(child, netns, &argv.join(" "), input)
}

pub(crate) fn finish(
    mut child: std::process::Child,
    netns: &str,
    command: &str,
    input: &str,
) -> Result<Output> {
    if let Some(mut stdin) = child.stdin.take() {
        // A command that exits early closes its stdin; its exit status tells why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| LabError::io(format!("waiting for {command} in {netns}"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::Command {
            netns: netns.to_string(),
            command: command.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Creates the named namespaces with a few `ip -batch` processes side by side (the kernel
/// work of creating a namespace dominates, and it runs in parallel).
pub(crate) fn create_all(names: &[String]) -> Result<()> {
    const PROCESSES: usize = 4;
    if names.is_empty() {
        return Ok(());
    }
    let chunk = names.len().div_ceil(PROCESSES);
    let mut children = Vec::new();
    for part in names.chunks(chunk) {
        let script: String = part.iter().map(|n| format!("netns add {n}\n")).collect();
        let child = Command::new("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io("running ip (is iproute2 installed?)", e))?;
        children.push((child, script));
    }
    let mut first_error = None;
    for (child, script) in children {
        if let Err(e) = finish(child, "the host namespace", "ip netns add", &script) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Removes a named namespace the way `ip netns delete` does: detach the bind mount and
/// unlink the file. The kernel frees the namespace once nothing uses it any more.
pub(crate) fn delete(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c_path is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // EINVAL: not a mount point (half-created); ENOENT: already gone.
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(err);
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The names of all named network namespaces on the machine.
pub fn list() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LabError::io(format!("listing {NETNS_DIR}"), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LabError::io(format!("listing {NETNS_DIR}"), e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Writes `(path under /proc/sys, value)` pairs inside a namespace. `/proc/sys/net` shows
/// the namespace of the thread that opens it, so a thread that entered the namespace sees
/// that namespace's settings without remounting anything.
pub(crate) fn write_sysctls(
    netns: &str,
    fd: BorrowedFd<'_>,
    sysctls: &[(String, String)],
) -> Result<()> {
    let result = run_in(fd, || {
        for (key, value) in sysctls {
            let path = Path::new("/proc/sys").join(key);
            if let Err(source) = std::fs::write(&path, value) {
                return Err((path, source));
            }
        }
        Ok(())
    })
    .map_err(|e| LabError::io(format!("entering network namespace {netns}"), e))?;
    result.map_err(|(path, source)| LabError::Sysctl {
        netns: netns.to_string(),
        path,
        source,
    })
}
