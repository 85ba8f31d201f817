//! `palisadectl verify`: the probes of conformance scenarios against the compiled rule sets
//! (offline), or against real packets (`--dataplane`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use palisade_policy::evaluate::evaluate;
use palisade_policy::ruleset::decide_flow;
use palisade_policy::{Compiler, FlowDecision, Verdict};
use palisade_resources::probes::Probe;
use palisade_resources::{load_scenario, Scenario};

use crate::dataplane;

pub(crate) mod api;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenario directories (cluster.yaml, policies.yaml, probes.yaml).
    #[arg(value_name = "DIR", required = true)]
    dirs: Vec<PathBuf>,
    /// Send real packets through network namespaces programmed by agents (needs root).
    #[arg(long)]
    dataplane: bool,
    /// Send every scenario through the whole system: objects written to a real
    /// kube-apiserver, palisade-controller watching it, agents streaming from it, real
    /// packets (needs root and the kube tools of scripts/tools.sh).
    #[arg(long, conflicts_with = "dataplane")]
    api: bool,
    /// The palisade-agent binary for --dataplane and --api (default: beside palisadectl,
    /// else on PATH).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// The palisade-controller binary for --api (default: beside palisadectl, else on PATH).
    #[arg(long, value_name = "PATH", requires = "api")]
    controller: Option<PathBuf>,
    /// For --api: the directory with etcd, kube-apiserver, kube-controller-manager and helm
    /// (the network-policy-api CRDs are in `crds/` beside it).
    #[arg(long, value_name = "DIR", default_value = "target/tools/bin")]
    kube_bin: PathBuf,
    /// For --api: the Palisade Helm chart whose RBAC the controller and agents run with
    /// (default: charts/palisade).
    #[arg(long, value_name = "DIR", requires = "api")]
    chart: Option<PathBuf>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.dataplane {
        return dataplane::verify(&args.dirs, args.agent.as_deref());
    }
    if args.api {
        return api::verify(
            &args.dirs,
            &api::ApiArgs {
                agent: args.agent.clone(),
                controller: args.controller.clone(),
                kube_bin: args.kube_bin.clone(),
                chart: args.chart.clone(),
            },
        );
    }
    let mut tally = Tally::default();
    for dir in &args.dirs {
        verify_dir(dir, &mut tally);
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Verifies one scenario, printing a line per failure. A scenario that cannot be read counts
/// as one failure.
fn verify_dir(dir: &Path, tally: &mut Tally) {
    let scenario = match load_scenario(dir) {
        Ok(s) => s,
        Err(e) => {
            println!("ERROR {}: cannot read the scenario:", dir.display());
            for line in e.to_string().lines() {
                println!("  {line}");
            }
            tally.failed += 1;
            return;
        }
    };
    for w in &scenario.warnings {
        eprintln!("warning: {}: {w}", scenario.name);
    }
    let compiler = Compiler::new(scenario.cluster.clone(), scenario.policies.clone());
    for w in compiler.warnings() {
        eprintln!("warning: {}: {w}", scenario.name);
    }
    let rule_sets = compiler.node_rule_sets();
    for probe in &scenario.probes {
        match check(&scenario, &rule_sets, probe) {
            Ok(()) => tally.passed += 1,
            Err(line) => {
                println!("{line}");
                tally.failed += 1;
            }
        }
    }
}

/// `Err` is the failure line: scenario, probe, expected, got and why.
fn check(
    scenario: &Scenario,
    rule_sets: &std::collections::BTreeMap<String, palisade_policy::NodeRuleSet>,
    probe: &Probe,
) -> Result<(), String> {
    let what = format!("{} probes[{}] ({})", scenario.name, probe.index, probe.text);
    let decision = decide_flow(&scenario.cluster, rule_sets, &probe.flow)
        .map_err(|e| format!("FAIL {what}: cannot decide: {e}"))?;
    let reference = evaluate(&scenario.cluster, &scenario.policies, &probe.flow)
        .map_err(|e| format!("FAIL {what}: the reference evaluator cannot decide: {e}"))?;
    if decision != reference {
        return Err(format!(
            "FAIL {what}: INTERNAL ERROR: compiled rule sets say {}, the reference evaluator says {}",
            one_line(&decision),
            one_line(&reference)
        ));
    }
    if decision.verdict != probe.expect {
        return Err(format!(
            "FAIL {what}: expected {}, got {}: {}",
            probe.expect,
            decision.verdict,
            reason(&decision)
        ));
    }
    Ok(())
}

/// Why a decision came out as it did: the denying direction(s) of a deny, both of an allow.
fn reason(d: &FlowDecision) -> String {
    let sides = [&d.egress, &d.ingress];
    let shown: Vec<String> = sides
        .iter()
        .filter(|s| d.verdict == Verdict::Allow || s.verdict == Verdict::Deny)
        .map(|s| s.to_string())
        .collect();
    shown.join("; ")
}

fn one_line(d: &FlowDecision) -> String {
    format!("{} ({}; {})", d.verdict, d.egress, d.ingress)
}
