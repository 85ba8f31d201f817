//! The command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{compile, demo, explain, flows, status, verify};

#[derive(Debug, Parser)]
#[command(
    name = "palisadectl",
    version,
    about = "Compile, explain and verify Palisade policies"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the per-node rule sets compiled from a cluster and its policies.
    Compile(compile::Args),
    /// Say whether a flow is allowed, and which policy and rule decided it.
    Explain(explain::Args),
    /// Check the probes of conformance scenarios (FORMAT.md); exits non-zero on any failure.
    Verify(verify::Args),
    /// Per policy, on how many nodes it is enforced; per node, its agent (live cluster).
    Status(status::Args),
    /// The recent denied flows of agents, with the rule that denied each.
    Flows(flows::Args),
    /// Build a two-node lab cluster in network namespaces and show policies at work.
    Demo(demo::Args),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Compile(args) => compile::run(&args),
            Command::Explain(args) => explain::run(&args),
            Command::Verify(args) => verify::run(&args),
            Command::Demo(args) => demo::run(&args),
            Command::Status(args) => status::run(&args),
            Command::Flows(args) => flows::run(&args),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
