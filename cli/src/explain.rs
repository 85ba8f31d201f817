//! `palisadectl explain`: the decision about one flow and why, from the compiled rule sets,
//! checked against the reference evaluator.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use palisade_policy::evaluate::evaluate_audit;
use std::collections::BTreeMap;

use palisade_policy::ruleset::{decide_flow_audit, NodeRuleSet};
use palisade_policy::{
    compile_staged, AuditDecision, Cluster, Enforcement, Family, Flow, PodKey, Policy, Protocol,
    Verdict,
};
use palisade_resources::core::{Service, TargetPort};

use crate::inputs::ClusterArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    inputs: ClusterArgs,
    /// The source pod, as NAMESPACE/POD.
    #[arg(long, value_name = "NS/POD")]
    from: String,
    /// The destination pod, as NAMESPACE/POD.
    #[arg(long, value_name = "NS/POD", required_unless_present = "to_service")]
    to: Option<String>,
    /// Or a Service, as NAMESPACE/NAME: the flow to each pod it selects, at the target
    /// port of the Service port given by --port.
    #[arg(long, value_name = "NS/NAME", conflicts_with = "to")]
    to_service: Option<String>,
    /// A port number, or the name of a container port of the destination pod (with
    /// --to-service: a port of the Service, by number or name).
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
    let default = args.inputs.default_enforcement;
    let known = Compiled {
        cluster,
        policies: &inputs.policies,
        default,
        rule_sets: compile_staged(cluster, &inputs.policies, default),
    };
    if let Some(service) = &args.to_service {
        let service = find_service(&inputs.services, service)?;
        let port = service_port(service, &args.port, args.protocol)?;
        let backends = backends(cluster, service);
        if backends.is_empty() {
            bail!(
                "--to-service {}/{}: it selects no pod with an address",
                service.namespace,
                service.name
            );
        }
        println!(
            "Service {}/{} port {} ({}) → {} pod(s)",
            service.namespace,
            service.name,
            port.port,
            port.protocol,
            backends.len()
        );
        for dst in backends {
            let target = match &port.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => {
                    match cluster.pods[&dst].named_port(name, port.protocol) {
                        Some(n) => n,
                        None => {
                            println!("{dst}: no {} container port {name:?}: the Service sends it nothing", port.protocol);
                            continue;
                        }
                    }
                }
            };
            explain_flow(&known, &src, &dst, target, port.protocol, args.family)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let to = args
        .to
        .as_deref()
        .context("--to or --to-service is required")?;
    let dst = pod_key(cluster, to, "--to")?;
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
    explain_flow(&known, &src, &dst, port, args.protocol, args.family)?;
    Ok(ExitCode::SUCCESS)
}

fn find_service<'a>(services: &'a [Service], value: &str) -> Result<&'a Service> {
    let (ns, name) = value
        .split_once('/')
        .ok_or_else(|| anyhow!("--to-service {value:?}: expected NAMESPACE/NAME"))?;
    services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
        .ok_or_else(|| anyhow!("--to-service {value}: no such Service in the cluster"))
}

fn service_port<'a>(
    service: &'a Service,
    value: &str,
    protocol: Protocol,
) -> Result<&'a palisade_resources::core::ServicePort> {
    let by_number = value.parse::<u16>().ok();
    service
        .ports
        .iter()
        .find(|p| {
            p.protocol == protocol
                && match by_number {
                    Some(n) => p.port == n,
                    None => p.name.as_deref() == Some(value),
                }
        })
        .ok_or_else(|| {
            let known: Vec<String> = service
                .ports
                .iter()
                .map(|p| match &p.name {
                    Some(n) => format!("{}/{} ({n})", p.port, p.protocol),
                    None => format!("{}/{}", p.port, p.protocol),
                })
                .collect();
            anyhow!(
                "--port {value}: Service {}/{} has no {protocol} port of that number or name (ports: {})",
                service.namespace,
                service.name,
                known.join(", ")
            )
        })
}

/// The pods a Service sends traffic to: its namespace's pods that its selector matches,
/// with an address (as the EndpointSlice controller picks them). A Service without a
/// selector has hand-written endpoints, which Palisade does not read.
fn backends(cluster: &Cluster, service: &Service) -> Vec<PodKey> {
    if service.selector.is_empty() {
        return Vec::new();
    }
    cluster
        .pods
        .iter()
        .filter(|(k, p)| {
            k.namespace == service.namespace
                && !p.ips.is_empty()
                && service
                    .selector
                    .iter()
                    .all(|(key, v)| p.labels.get(key) == Some(v))
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// What every flow is explained against.
struct Compiled<'a> {
    cluster: &'a Cluster,
    policies: &'a [Policy],
    default: Enforcement,
    rule_sets: BTreeMap<String, NodeRuleSet>,
}

fn explain_flow(
    known: &Compiled,
    src: &PodKey,
    dst: &PodKey,
    port: u16,
    protocol: Protocol,
    family: Option<Family>,
) -> Result<()> {
    let Compiled {
        cluster,
        policies,
        default,
        rule_sets,
    } = known;
    let family = match family {
        Some(f) => f,
        None => cluster.pods[dst]
            .ips
            .first()
            .map(Family::of)
            .with_context(|| format!("{dst} has no address"))?,
    };
    let flow = Flow {
        src: src.clone(),
        dst: dst.clone(),
        protocol,
        port,
        family,
    };
    let compiled = decide_flow_audit(cluster, rule_sets, &flow)?;
    let reference = evaluate_audit(cluster, policies, *default, &flow)?;
    println!("{flow}");
    print!("{}", describe(&compiled));
    if compiled != reference {
        bail!(
            "INTERNAL ERROR: the compiled rule sets and the reference evaluator disagree about this flow; please report it.\n\
             compiled rule sets: {}\nreference evaluator: {}",
            describe(&compiled),
            describe(&reference)
        );
    }
    Ok(())
}

/// The enforced decision, and, when policies in audit change it, what would be.
fn describe(d: &AuditDecision) -> String {
    let mut out = format!("{}\n", d.enforced);
    if !d.differs() {
        return out;
    }
    let effect = if d.would_deny() {
        "it passes, and is counted and logged as would-deny"
    } else if d.enforced.verdict == Verdict::Deny && d.would.verdict == Verdict::Allow {
        "it stays denied: audit never allows what is enforced as denied"
    } else {
        "the same verdict, by other rules"
    };
    out.push_str(&format!(
        "would be, with the policies in audit ({effect}): {}\n",
        d.would
    ));
    out
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
