//! `palisadectl verify --dataplane`: every probe as a real connection through a lab
//! cluster of network namespaces, each node programmed by its own agent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use palisade_netlab::{Probe as LabProbe, ProbeResult};
use palisade_policy::ruleset::decide_flow;
use palisade_policy::{Compiler, Verdict};
use palisade_resources::{load_scenario, Scenario};

use crate::running::{agent_binary, check_prerequisites, RunningCluster};

/// Long enough for a connection on a loaded two-core machine, short enough that a suite of
/// deny probes (which always wait it out) stays quick; probes run in parallel.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
const PARALLEL_PROBES: usize = 64;
/// A second, longer chance for a probe that should have connected but timed out: on a loaded
/// machine a first packet can be late. A real block times out again; a connection is never
/// retried, so a deny that leaks is always caught.
const RETRY_TIMEOUT: Duration = Duration::from_secs(4);

#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

pub fn verify(dirs: &[PathBuf], agent: Option<&Path>) -> Result<ExitCode> {
    check_prerequisites()?;
    let bin = agent_binary(agent);
    let mut tally = Tally::default();
    for dir in dirs {
        match load_scenario(dir) {
            Ok(scenario) => {
                if let Err(e) = verify_scenario(&scenario, &bin, &mut tally) {
                    println!("ERROR {}: {e:#}", scenario.name);
                    tally.failed += 1;
                }
            }
            Err(e) => {
                println!("ERROR {}: cannot read the scenario:", dir.display());
                for line in e.to_string().lines() {
                    println!("  {line}");
                }
                tally.failed += 1;
            }
        }
    }
    let skipped = if tally.skipped > 0 {
        format!(", {} skipped", tally.skipped)
    } else {
        String::new()
    };
    println!("{} passed, {} failed{skipped}", tally.passed, tally.failed);
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The lab probe for a scenario probe: the destination pod's address of the probe's family.
fn lab_probe(scenario: &Scenario, flow: &palisade_policy::Flow) -> Result<LabProbe> {
    let dst = scenario
        .cluster
        .pods
        .get(&flow.dst)
        .ok_or_else(|| anyhow!("no pod {}", flow.dst))?;
    let to_addr = dst
        .ip_of(flow.family)
        .ok_or_else(|| anyhow!("pod {} has no {:?} address", flow.dst, flow.family))?;
    Ok(LabProbe {
        from: flow.src.clone(),
        to_addr,
        protocol: flow.protocol,
        port: flow.port,
    })
}

fn verify_scenario(scenario: &Scenario, bin: &Path, tally: &mut Tally) -> Result<()> {
    let compiler = Compiler::new(scenario.cluster.clone(), scenario.policies.clone());
    let rule_sets = compiler.node_rule_sets();
    let running = RunningCluster::start(&scenario.cluster, &rule_sets, bin)
        .with_context(|| format!("starting the lab of {}", scenario.name))?;
    let probes = scenario
        .probes
        .iter()
        .map(|p| lab_probe(scenario, &p.flow))
        .collect::<Result<Vec<_>>>()?;
    let served: BTreeSet<_> = scenario
        .probes
        .iter()
        .map(|p| (p.flow.dst.clone(), p.flow.protocol, p.flow.port))
        .collect();
    running
        .lab
        .serve_all(&served.into_iter().collect::<Vec<_>>())?;
    let mut results = running
        .lab
        .probe_all(&probes, PROBE_TIMEOUT, PARALLEL_PROBES)?;
    let late: Vec<usize> = (0..results.len())
        .filter(|&i| {
            scenario.probes[i].expect == Verdict::Allow
                && matches!(results[i], ProbeResult::TimedOut)
        })
        .collect();
    if !late.is_empty() {
        let again: Vec<LabProbe> = late.iter().map(|&i| probes[i].clone()).collect();
        let retried = running
            .lab
            .probe_all(&again, RETRY_TIMEOUT, PARALLEL_PROBES)?;
        for (i, r) in late.into_iter().zip(retried) {
            results[i] = r;
        }
    }
    for (probe, result) in scenario.probes.iter().zip(results) {
        let what = format!("{} probes[{}] ({})", scenario.name, probe.index, probe.text);
        let got = match &result {
            ProbeResult::Connected => Verdict::Allow,
            ProbeResult::TimedOut | ProbeResult::Unreachable(_) => Verdict::Deny,
            ProbeResult::Unsupported(why) => {
                println!("SKIP {what}: {why}");
                tally.skipped += 1;
                continue;
            }
            ProbeResult::Refused => {
                println!("FAIL {what}: the connection was refused: the lab's server is missing");
                tally.failed += 1;
                continue;
            }
        };
        if got == probe.expect {
            tally.passed += 1;
        } else {
            let compiled = decide_flow(&scenario.cluster, &rule_sets, &probe.flow)
                .map(|d| format!("{} ({}; {})", d.verdict, d.egress, d.ingress))
                .unwrap_or_else(|e| e.to_string());
            println!(
                "FAIL {what}: expected {}, the packet {result} (compiled rule sets say {compiled})",
                probe.expect
            );
            tally.failed += 1;
        }
    }
    Ok(())
}
