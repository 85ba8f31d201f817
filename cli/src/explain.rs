//! `palisadectl explain`: the decision about one flow and why, from the compiled rule sets,
//! checked against the reference evaluator.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use palisade_policy::evaluate::evaluate;
use palisade_policy::ruleset::decide_flow;
use palisade_policy::{compile, Cluster, Family, Flow, PodKey, Protocol};

use crate::inputs::ClusterArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    inputs: ClusterArgs,
    /// The source pod, as NAMESPACE/POD.
    #[arg(long, value_name = "NS/POD")]
    from: String,
    /// The destination pod, as NAMESPACE/POD.
    #[arg(long, value_name = "NS/POD")]
    to: String,
    /// A port number, or the name of a container port of the destination pod.
    #[arg(long, value_name = "PORT")]
    port: String,
    /// TCP, UDP or SCTP, spelled as in Kubernetes (case-sensitive).
    #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
    protocol: Protocol,
    /// IPv4 or IPv6; default: the destination pod's first address family.
    #[arg(long, value_parser = parse_family)]
    family: Option<Family>,
}

/// The rule of the API files: exactly TCP, UDP or SCTP (case-sensitive, as in Kubernetes).
fn parse_protocol(s: &str) -> Result<Protocol, String> {
    palisade_resources::syntax::protocol(s)
}

fn parse_family(s: &str) -> Result<Family, String> {
    match s.to_ascii_lowercase().as_str() {
        "ipv4" => Ok(Family::IPv4),
        "ipv6" => Ok(Family::IPv6),
        _ => Err(format!("unknown family {s:?} (expected IPv4 or IPv6)")),
    }
}

fn pod_key(cluster: &Cluster, value: &str, flag: &str) -> Result<PodKey> {
    let (ns, name) = value
        .split_once('/')
        .ok_or_else(|| anyhow!("{flag} {value:?}: expected NAMESPACE/POD"))?;
    let key = PodKey::new(ns, name);
    if !cluster.pods.contains_key(&key) {
        bail!("{flag} {value}: no such pod in the cluster");
    }
    Ok(key)
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let inputs = args.inputs.load()?;
    let cluster = &inputs.cluster;
    let src = pod_key(cluster, &args.from, "--from")?;
    let dst = pod_key(cluster, &args.to, "--to")?;
    let dst_pod = &cluster.pods[&dst];
    let port = match args.port.parse::<u16>() {
        Ok(0) => bail!("--port 0: out of range 1..=65535"),
        Ok(p) => p,
        Err(_) if args.port.chars().all(|c| c.is_ascii_digit()) => {
            bail!("--port {}: out of range 1..=65535", args.port)
        }
        Err(_) => dst_pod
            .named_port(&args.port, args.protocol)
            .with_context(|| {
                format!(
                    "--port {}: {dst} has no {} container port of that name",
                    args.port, args.protocol
                )
            })?,
    };
    let family = match args.family {
        Some(f) => f,
        None => dst_pod
            .ips
            .first()
            .map(Family::of)
            .with_context(|| format!("{dst} has no address"))?,
    };
    let flow = Flow {
        src,
        dst,
        protocol: args.protocol,
        port,
        family,
    };

    let rule_sets = compile(cluster, &inputs.policies);
    let compiled = decide_flow(cluster, &rule_sets, &flow)?;
    let reference = evaluate(cluster, &inputs.policies, &flow)?;
    println!("{flow}");
    println!("{compiled}");
    if compiled != reference {
        bail!(
            "INTERNAL ERROR: the compiled rule sets and the reference evaluator disagree about this flow; please report it.\n\
             compiled rule sets: {compiled}\nreference evaluator: {reference}"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12.12: the flag follows the API files' rule (before, `tcp` was accepted here
    /// and refused in YAML).
    #[test]
    fn the_protocol_flag_is_case_sensitive_like_the_api() {
        assert_eq!(parse_protocol("UDP"), Ok(Protocol::Udp));
        let err = parse_protocol("tcp").unwrap_err();
        assert!(
            err.contains("case-sensitive") && err.contains("write TCP"),
            "{err}"
        );
    }
}
