//! `palisadectl demo`: a lab cluster with policies at work. Not built yet.

use std::process::ExitCode;

use anyhow::{bail, Result};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> Result<ExitCode> {
    bail!("demo is not built yet: it needs the agent and the lab (netlab)")
}
