//! One lab per test process, shared by its tests: each start costs seconds, so a test binary
//! starts one and its tests use distinct namespaces and object names.

use std::sync::OnceLock;

use crate::lab::{KubeLab, Options};

static SHARED: OnceLock<Result<KubeLab, String>> = OnceLock::new();

extern "C" fn stop_shared_lab() {
    if let Some(Ok(lab)) = SHARED.get() {
        lab.stop();
    }
}

/// The process's shared lab with default options, started on first use; `None` (after the
/// skip policy: printed, or a panic under `PALISADE_NO_SKIP=1`) when the binaries are absent.
/// Panics if it is there but fails to start. Statics are never dropped, so the lab stops at
/// process exit (`atexit`); if the process is killed, its children die with it
/// (`PR_SET_PDEATHSIG`) and the next lab to start removes the temp dir left behind.
pub fn shared() -> Option<&'static KubeLab> {
    if !crate::tools::control_plane_available() {
        return None;
    }
    let lab = SHARED.get_or_init(|| {
        let lab = KubeLab::start_blocking(Options::default()).map_err(|e| e.to_string());
        if lab.is_ok() {
            // SAFETY: registers a plain extern "C" function with no arguments.
            unsafe {
                libc::atexit(stop_shared_lab);
            }
        }
        lab
    });
    match lab {
        Ok(lab) => Some(lab),
        Err(e) => panic!("the shared kube lab failed to start: {e}"),
    }
}
