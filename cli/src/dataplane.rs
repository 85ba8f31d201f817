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
pub(crate) struct Tally {
    pub(crate) passed: usize,
    /// Of `passed`, those that needed the second, longer chance in one of the two runs.
    retried: usize,
    pub(crate) failed: usize,
    pub(crate) skipped: usize,
}

impl Tally {
    pub(crate) fn summary(&self) -> String {
        let retried = if self.retried > 0 {
            format!(" ({} after a retry)", self.retried)
        } else {
            String::new()
        };
        let skipped = if self.skipped > 0 {
            format!(", {} skipped", self.skipped)
        } else {
            String::new()
        };
        format!(
            "{} passed{retried}, {} failed{skipped}",
            self.passed, self.failed
        )
    }
}

pub fn verify(dirs: &[PathBuf], agent: Option<&Path>) -> Result<ExitCode> {
    check_prerequisites()?;
    let bin = agent_binary(agent);
    let mut tally = Tally::default();
    for dir in dirs {
        if let Some(scenario) = load(dir, &mut tally) {
            if let Err(e) = verify_scenario(&scenario, &bin, &mut tally) {
                println!("ERROR {}: {e:#}", scenario.name);
                tally.failed += 1;
            }
        }
    }
    Ok(tally.finish())
}

/// Loads a scenario; one that cannot be read is reported and counts as one failure.
pub(crate) fn load(dir: &Path, tally: &mut Tally) -> Option<Scenario> {
    match load_scenario(dir) {
        Ok(scenario) => Some(scenario),
        Err(e) => {
            println!("ERROR {}: cannot read the scenario:", dir.display());
            for line in e.to_string().lines() {
                println!("  {line}");
            }
            tally.failed += 1;
            None
        }
    }
}

impl Tally {
    /// Prints the summary line; the exit code says whether anything failed.
    pub(crate) fn finish(&self) -> ExitCode {
        println!("{}", self.summary());
        if self.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// The lab probe for a scenario probe: the destination pod's address of the probe's family.
pub(crate) fn lab_probe(scenario: &Scenario, flow: &palisade_policy::Flow) -> Result<LabProbe> {
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

/// Results of one pass over the probes, late connections given a second chance.
pub(crate) struct Pass {
    results: Vec<ProbeResult>,
    /// Which probes got the second chance.
    retried: Vec<bool>,
}

/// Probes everything; probes that timed out or failed and for which `may_retry` holds are
/// probed again with a longer time-out (on a loaded machine a first packet, or a busy echo
/// server's reply, can be late). A real drop times out again and a real error fails again;
/// a connection is never retried, so a deny that leaks is caught.
pub(crate) fn probe_pass(
    running: &RunningCluster,
    probes: &[LabProbe],
    may_retry: impl Fn(usize) -> bool,
) -> Result<Pass> {
    let mut results = running
        .lab
        .probe_all(probes, PROBE_TIMEOUT, PARALLEL_PROBES)?;
    let late: Vec<usize> = (0..results.len())
        .filter(|&i| {
            may_retry(i) && matches!(results[i], ProbeResult::TimedOut | ProbeResult::Error(_))
        })
        .collect();
    let mut retried = vec![false; results.len()];
    if !late.is_empty() {
        let again: Vec<LabProbe> = late.iter().map(|&i| probes[i].clone()).collect();
        let second = running
            .lab
            .probe_all(&again, RETRY_TIMEOUT, PARALLEL_PROBES)?;
        for (i, r) in late.into_iter().zip(second) {
            results[i] = r;
            retried[i] = true;
        }
    }
    Ok(Pass { results, retried })
}

/// Runs a scenario's probes twice: a control run while the agents enforce no policy (every
/// probed flow must connect then: otherwise the lab is broken and a "deny" would prove
/// nothing), then with the scenario's policies, where only a silent drop is a deny.
fn verify_scenario(scenario: &Scenario, bin: &Path, tally: &mut Tally) -> Result<()> {
    let rule_sets =
        Compiler::new(scenario.cluster.clone(), scenario.policies.clone()).node_rule_sets();
    let open = Compiler::new(scenario.cluster.clone(), Vec::new()).node_rule_sets();
    let mut running = RunningCluster::start(&scenario.cluster, &open, bin)
        .with_context(|| format!("starting the lab of {}", scenario.name))?;
    let probes = serve_probed(scenario, &running)?;
    let control = probe_pass(&running, &probes, |_| true)?;
    running
        .update(&rule_sets)
        .with_context(|| format!("enforcing the policies of {}", scenario.name))?;
    // Only probes expected to connect get a second chance: for an expected deny, an error
    // such as a handshake without its echo is itself a leak.
    let enforced = probe_pass(&running, &probes, |i| {
        scenario.probes[i].expect == Verdict::Allow
    })?;
    report(scenario, &rule_sets, &control, &enforced, tally);
    Ok(())
}

/// The scenario's probes as lab probes, with every probed port served at its destination.
pub(crate) fn serve_probed(scenario: &Scenario, running: &RunningCluster) -> Result<Vec<LabProbe>> {
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
    Ok(probes)
}

/// Judges every probe by its control run and its run with the policies, printing a line per
/// failure or skip; `rule_sets` (the offline compile) explain a wrong verdict.
pub(crate) fn report(
    scenario: &Scenario,
    rule_sets: &std::collections::BTreeMap<String, palisade_policy::NodeRuleSet>,
    control: &Pass,
    enforced: &Pass,
    tally: &mut Tally,
) {
    for (i, probe) in scenario.probes.iter().enumerate() {
        let what = format!("{} probes[{}] ({})", scenario.name, probe.index, probe.text);
        match judge(&control.results[i], &enforced.results[i], probe.expect) {
            Judgement::Pass => {
                tally.passed += 1;
                if control.retried[i] || enforced.retried[i] {
                    tally.retried += 1;
                }
            }
            Judgement::Skip(why) => {
                println!("SKIP {what}: {why}");
                tally.skipped += 1;
            }
            Judgement::Broken(why) => {
                println!("FAIL {what}: {why}");
                tally.failed += 1;
            }
            Judgement::Wrong => {
                let compiled = decide_flow(&scenario.cluster, rule_sets, &probe.flow)
                    .map(|d| format!("{} ({}; {})", d.verdict, d.egress, d.ingress))
                    .unwrap_or_else(|e| e.to_string());
                println!(
                    "FAIL {what}: expected {}, the probe {} (compiled rule sets say {compiled})",
                    probe.expect, enforced.results[i]
                );
                tally.failed += 1;
            }
        }
    }
}

/// What one probe's two runs say about its expectation.
#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    Pass,
    /// The probe cannot be carried here at all (the kernel lacks SCTP).
    Skip(String),
    /// The lab, not the policy, decided the outcome: the probe proves nothing and fails.
    Broken(String),
    /// The dataplane contradicts the expectation.
    Wrong,
}

/// Judges a probe by its control run (no policy) and its run with the policies. Only a
/// silent drop counts as a deny, and only for a flow that connected without policy.
fn judge(control: &ProbeResult, enforced: &ProbeResult, expect: Verdict) -> Judgement {
    if let ProbeResult::Unsupported(why) = control {
        return Judgement::Skip(why.clone());
    }
    if !control.is_connected() {
        return Judgement::Broken(format!(
            "broken: the probe {control} even without policy, so it proves nothing"
        ));
    }
    let got = match enforced {
        ProbeResult::Connected => Verdict::Allow,
        ProbeResult::TimedOut => Verdict::Deny,
        ProbeResult::Refused | ProbeResult::Error(_) | ProbeResult::Unsupported(_) => {
            return Judgement::Broken(format!(
                "the probe {enforced} with the policies (it connected without them)"
            ))
        }
    };
    if got == expect {
        Judgement::Pass
    } else {
        Judgement::Wrong
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: Verdict = Verdict::Allow;
    const DENY: Verdict = Verdict::Deny;

    fn error() -> ProbeResult {
        ProbeResult::Error("No route to host (os error 113)".into())
    }

    #[test]
    fn only_a_drop_of_a_flow_that_worked_without_policy_is_a_deny() {
        use ProbeResult::{Connected, Refused, TimedOut};
        assert_eq!(judge(&Connected, &TimedOut, DENY), Judgement::Pass);
        assert_eq!(judge(&Connected, &Connected, ALLOW), Judgement::Pass);
        assert_eq!(judge(&Connected, &Connected, DENY), Judgement::Wrong);
        assert_eq!(judge(&Connected, &TimedOut, ALLOW), Judgement::Wrong);
        for broken in [Refused, error()] {
            for expect in [ALLOW, DENY] {
                let j = judge(&Connected, &broken, expect);
                assert!(
                    matches!(&j, Judgement::Broken(why) if why.contains(&broken.to_string())),
                    "{j:?}"
                );
            }
        }
    }

    #[test]
    fn a_flow_unreachable_without_policy_is_broken_whatever_was_expected() {
        use ProbeResult::{Refused, TimedOut};
        for control in [TimedOut, Refused, error()] {
            for expect in [ALLOW, DENY] {
                let j = judge(&control, &ProbeResult::TimedOut, expect);
                assert!(
                    matches!(&j, Judgement::Broken(why) if why.contains("even without policy")),
                    "{j:?}"
                );
            }
        }
    }

    #[test]
    fn an_unsupported_protocol_is_a_skip_with_its_reason() {
        let sctp = ProbeResult::Unsupported("the kernel does not support SCTP".into());
        assert_eq!(
            judge(&sctp, &sctp, DENY),
            Judgement::Skip("the kernel does not support SCTP".into())
        );
    }

    #[test]
    fn the_summary_names_retried_passes_and_skips() {
        let tally = Tally {
            passed: 12,
            retried: 2,
            failed: 1,
            skipped: 3,
        };
        assert_eq!(
            tally.summary(),
            "12 passed (2 after a retry), 1 failed, 3 skipped"
        );
        let tally = Tally {
            passed: 4,
            ..Tally::default()
        };
        assert_eq!(tally.summary(), "4 passed, 0 failed");
    }
}
