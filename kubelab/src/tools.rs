//! Where the lab finds its binaries and CRDs (built by `scripts/tools.sh`), and the agreed skip
//! policy for tests that need them.

use std::path::{Path, PathBuf};

/// Binaries the control plane needs.
pub const CONTROL_PLANE_BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// The environment variable naming the directory with the kube binaries.
pub const BIN_ENV: &str = "PALISADE_KUBE_BIN";

/// The workspace's `target/tools`, where `scripts/tools.sh` puts its output.
pub fn default_tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("target/tools")
}

/// `$PALISADE_KUBE_BIN`, else `target/tools/bin` of the workspace.
pub fn default_bin_dir() -> PathBuf {
    match std::env::var_os(BIN_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => default_tools_dir().join("bin"),
    }
}

/// The CRD directory beside a bin directory (`.../tools/bin` → `.../tools/crds`).
pub fn crd_dir_for(bin_dir: &Path) -> PathBuf {
    bin_dir
        .parent()
        .map(|p| p.join("crds"))
        .unwrap_or_else(|| default_tools_dir().join("crds"))
}

/// Which of `names` are missing or not executable in `dir`, as a sentence; `None` if all are
/// there.
pub fn missing(dir: &Path, names: &[&str]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let absent: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            std::fs::metadata(dir.join(name))
                .map(|m| !m.is_file() || m.permissions().mode() & 0o111 == 0)
                .unwrap_or(true)
        })
        .collect();
    (!absent.is_empty()).then(|| format!("{} not in {}", absent.join(", "), dir.display()))
}

/// The skip policy: `true` when the control plane's binaries are present. Otherwise prints why
/// and returns `false`, or panics when `PALISADE_NO_SKIP=1` (CI), because there a skipped test
/// would hide a broken setup.
pub fn control_plane_available() -> bool {
    match missing(&default_bin_dir(), &CONTROL_PLANE_BINARIES) {
        None => true,
        Some(reason) => skip(&format!("{reason} (run scripts/tools.sh)")),
    }
}

/// Applies the skip policy to `reason`: prints it and returns `false`, or panics under
/// `PALISADE_NO_SKIP=1`.
pub fn skip(reason: &str) -> bool {
    if std::env::var("PALISADE_NO_SKIP").is_ok_and(|v| v == "1") {
        panic!("cannot run (PALISADE_NO_SKIP=1): {reason}");
    }
    eprintln!("skipped: {reason}");
    false
}
