//! `palisadectl verify --dataplane`: real packets through network namespaces. Not built yet.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

pub fn verify(_dirs: &[PathBuf]) -> Result<ExitCode> {
    bail!("verify --dataplane is not built yet: it needs the agent and the lab (netlab)")
}
