//! `palisadectl compile`: the node rule sets, as the agents get them.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::ValueEnum;
use palisade_policy::StagedCompiler;

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
    let inputs = args.inputs.load()?;
    // The enforced rules, with audit lists where policies in audit change them.
    let compiler = StagedCompiler::new(
        inputs.cluster,
        inputs.policies,
        args.inputs.default_enforcement,
    );
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
            match args.output {
                Format::Nft => nft(&set)?,
                _ => render(&set, args.output)?,
            }
        }
        None => match args.output {
            Format::Nft => {
                let sets = compiler.node_rule_sets();
                let texts: Vec<String> = sets.values().map(nft).collect::<Result<_>>()?;
                texts.join("\n")
            }
            _ => render(&compiler.node_rule_sets(), args.output)?,
        },
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn render(value: &impl serde::Serialize, format: Format) -> Result<String> {
    Ok(match format {
        Format::Yaml => serde_yaml::to_string(value)?,
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Nft => bail!("nft output is rendered per node"),
    })
}

/// The table a node's agent would install. The agent learns each pod's host-side interface
/// from the kernel; offline, the pods get placeholder names `pv0`, `pv1`, … listed in the
/// header so the output reads (and loads with `nft -f`) like the real thing.
fn nft(set: &palisade_policy::NodeRuleSet) -> Result<String> {
    let interfaces: palisade_agent::Interfaces = set
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                palisade_policy::PodKey::new(&p.namespace, &p.name),
                format!("pv{i}"),
            )
        })
        .collect();
    let mut out = format!("# node {}: nftables ruleset of palisade-agent\n", set.node);
    for (pod, iface) in &interfaces {
        out.push_str(&format!("# {iface}: {pod}\n"));
    }
    out.push_str(&palisade_agent::render_text(set, &interfaces)?);
    Ok(out)
}
