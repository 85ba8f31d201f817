//! The skip policy agreed across the project, in one place.
//!
//! A test that cannot run here (not root, `nft` or `ip` missing, kube binaries missing)
//! prints why and returns, so that `cargo test` works on a developer's machine; but when
//! `PALISADE_NO_SKIP=1` is set (CI sets it, on a machine that has everything), a skip is a
//! failure with the same reason, so a missing prerequisite can never pass as green.

use std::fmt;
use std::process::Command;

/// The environment variable that turns skips into failures.
pub const NO_SKIP: &str = "PALISADE_NO_SKIP";

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Effective user id 0 (network namespaces, nftables).
    Root,
    /// A program that must run successfully with the given argument (e.g. `--version`).
    Program(&'static str, &'static str),
}

/// Root, for network namespaces and nftables.
pub const ROOT: Need = Need::Root;
/// The nft command line tool.
pub const NFT: Need = Need::Program("nft", "--version");
/// iproute2.
pub const IP: Need = Need::Program("ip", "-V");

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Root => f.write_str("root"),
            Need::Program(program, _) => write!(f, "`{program}`"),
        }
    }
}

impl Need {
    /// Why the need is not met here, or `None` if it is.
    pub fn unmet(&self) -> Option<String> {
        match self {
            Need::Root => {
                // SAFETY: geteuid has no preconditions.
                let euid = unsafe { libc::geteuid() };
                (euid != 0).then(|| format!("not root (euid {euid})"))
            }
            Need::Program(program, arg) => match Command::new(program).arg(arg).output() {
                Ok(out) if out.status.success() => None,
                Ok(out) => Some(format!("`{program} {arg}` failed: {}", out.status)),
                Err(e) => Some(format!("`{program}` cannot run: {e}")),
            },
        }
    }
}

/// Whether skips are failures in this run (`PALISADE_NO_SKIP=1`).
pub fn skips_fail() -> bool {
    std::env::var(NO_SKIP).is_ok_and(|v| v == "1")
}

/// The name of the running test (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string()
}

/// Skips the running test for `reason`: prints `SKIPPED <test>: <reason>` and returns
/// `false`, or panics with the reason when skips fail (`PALISADE_NO_SKIP=1`).
pub fn skip(reason: impl fmt::Display) -> bool {
    let test = test_name();
    if skips_fail() {
        panic!("{test} cannot run: {reason} ({NO_SKIP}=1 makes a skip a failure)");
    }
    println!("SKIPPED {test}: {reason}");
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// Whether every need is met; otherwise skips (see [`skip`]) with the first unmet one. A
/// test begins `if !can_run(&[ROOT, NFT]) { return; }`.
pub fn can_run(needs: &[Need]) -> bool {
    match needs.iter().find_map(Need::unmet) {
        None => true,
        Some(reason) => skip(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_unmet_with_its_name() {
        let need = Need::Program("palisade-no-such-program", "--version");
        let why = need.unmet().expect("unmet");
        assert!(why.contains("palisade-no-such-program"), "{why}");
    }

    #[test]
    fn a_program_that_fails_is_unmet() {
        assert!(Need::Program("false", "x").unmet().is_some());
        assert_eq!(Need::Program("true", "x").unmet(), None);
    }

    /// In a child process so that the environment variable is its own.
    #[test]
    fn a_skip_panics_only_when_skips_fail() {
        if std::env::var("TESTKIT_CHILD").is_ok() {
            skip("a reason");
            return;
        }
        let run = |no_skip: &str| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "tests::a_skip_panics_only_when_skips_fail"])
                .args(["--nocapture", "--test-threads=1"])
                .env("TESTKIT_CHILD", "1")
                .env(NO_SKIP, no_skip)
                .output()
                .unwrap()
        };
        let quiet = run("0");
        assert!(quiet.status.success());
        let text = String::from_utf8_lossy(&quiet.stdout);
        assert!(
            text.contains("SKIPPED tests::a_skip_panics_only_when_skips_fail: a reason"),
            "{text}"
        );
        let strict = run("1");
        assert!(!strict.status.success());
        let text = String::from_utf8_lossy(&strict.stderr);
        assert!(text.contains("cannot run: a reason"), "{text}");
    }
}
