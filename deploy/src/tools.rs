//! Finding the real tools, and the team's skip policy: a test whose tool is missing prints
//! why and returns, unless `PALISADE_NO_SKIP=1` (CI), where it fails instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `name` from `target/tools/bin/` (where `scripts/tools.sh` builds the pinned tools), else
/// from `PATH`.
pub fn find(name: &str) -> Option<PathBuf> {
    let pinned = crate::repo_root().join("target/tools/bin").join(name);
    if pinned.is_file() {
        return Some(pinned);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Applies the skip policy to `reason`: panics under `PALISADE_NO_SKIP=1`, else prints it.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("PALISADE_NO_SKIP").as_deref() == Ok("1") {
        panic!("{test}: cannot run with PALISADE_NO_SKIP=1: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// The tool `name`, or `None` after applying the skip policy (`hint` says how to get it).
pub fn require(test: &str, name: &str, hint: &str) -> Option<PathBuf> {
    let found = find(name);
    if found.is_none() {
        skip(
            test,
            &format!("`{name}` not found in target/tools/bin or PATH ({hint})"),
        );
    }
    found
}

/// Runs `program` with `args` in the repository root.
pub fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(crate::repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// Runs `program` and returns its stdout; panics with its output if it fails.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{}{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}
