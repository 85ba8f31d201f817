//! `palisadectl compile`: the node rule sets, as the agents get them.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::ValueEnum;
use palisade_policy::Compiler;

use crate::inputs::{print_warnings, ClusterArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Yaml,
    Json,
    /// The nftables ruleset a node's agent would install.
    Nft,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    inputs: ClusterArgs,
    /// Only this node's rule set.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
    output: Format,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.output == Format::Nft {
        bail!("-o nft is not built yet: it needs the agent's nftables renderer");
    }
    let inputs = args.inputs.load()?;
    let compiler = Compiler::new(inputs.cluster, inputs.policies);
    print_warnings(&compiler.warnings());
    let text = match &args.node {
        Some(node) => {
            let Some(set) = compiler.node_rule_set(node) else {
                let known: Vec<&str> = compiler.nodes().into_iter().collect();
                bail!(
                    "no node {node:?} in the cluster (nodes: {})",
                    known.join(", ")
                );
            };
            render(&set, args.output)?
        }
        None => render(&compiler.node_rule_sets(), args.output)?,
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn render(value: &impl serde::Serialize, format: Format) -> Result<String> {
    Ok(match format {
        Format::Yaml => serde_yaml::to_string(value)?,
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Nft => bail!("-o nft is not built yet: it needs the agent's nftables renderer"),
    })
}
