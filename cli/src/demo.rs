//! `palisadectl demo`: the whole system on one machine. A two-node cluster of network
//! namespaces runs a small shop; an agent per node enforces its node's rule set; the demo
//! shows who can reach whom with real connections, before and after the sample policies,
//! then serves the agents' metrics on loopback until Ctrl-C.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use palisade_netlab::{Probe as LabProbe, ProbeResult};
use palisade_policy::ruleset::decide_flow;
use palisade_policy::{
    Cluster, Compiler, Family, Flow, NodeRuleSet, PodKey, Policy, Protocol, Verdict,
};

use crate::controller::controller_binary;
use crate::running::{agent_binary, check_prerequisites, http_get, RunningCluster};

pub(crate) const CLUSTER: &str = include_str!("../demo/cluster.yaml");
pub(crate) const POLICIES: &str = include_str!("../demo/policies.yaml");
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show both matrices and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    pub(crate) no_wait: bool,
    /// The palisade-agent binary (default: beside palisadectl, else on PATH).
    #[arg(long, value_name = "PATH")]
    pub(crate) agent: Option<PathBuf>,
    /// The palisade-controller binary (default: beside palisadectl, else on PATH).
    #[arg(long, value_name = "PATH")]
    pub(crate) controller: Option<PathBuf>,
    /// Hold the demo's cluster and policies in a real kube-apiserver (from --kube-bin) that
    /// the controller watches; edits of the policies file are applied to it.
    #[arg(long)]
    pub(crate) api: bool,
    /// For --api: the directory with etcd, kube-apiserver, kube-controller-manager and helm
    /// (scripts/tools.sh builds them).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "target/tools/bin",
        requires = "api"
    )]
    pub(crate) kube_bin: PathBuf,
    /// Also run Prometheus (the `prometheus` program) on loopback, scraping the agents and
    /// the controller, and print a query to try.
    #[arg(long, conflicts_with = "api")]
    pub(crate) prometheus: bool,
}

/// A column of the matrix: a destination pod and the port it serves.
pub(crate) struct Target {
    pub(crate) pod: PodKey,
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
}

pub(crate) fn targets(cluster: &Cluster) -> Vec<Target> {
    let mut out = Vec::new();
    for pod in cluster.pods.values() {
        // Each pod's first declared port is the one the matrix tries.
        if let Some(p) = pod.ports.first() {
            out.push(Target {
                pod: pod.key(),
                protocol: p.protocol,
                port: p.port,
            });
        }
    }
    out
}

pub(crate) fn compile(cluster: &Cluster, policies: &[Policy]) -> BTreeMap<String, NodeRuleSet> {
    Compiler::new(cluster.clone(), policies.to_vec()).node_rule_sets()
}

/// Probes every pod against every target and prints the matrix; a cell disagreeing with
/// the compiled rule sets is flagged (it should never happen).
pub(crate) fn matrix(
    running: &RunningCluster,
    cluster: &Cluster,
    sets: &BTreeMap<String, NodeRuleSet>,
    title: &str,
) -> Result<()> {
    let sources: Vec<PodKey> = cluster.pods.keys().cloned().collect();
    let targets = targets(cluster);
    let mut probes = Vec::new();
    for src in &sources {
        for t in &targets {
            let to_addr = cluster.pods[&t.pod]
                .ip_of(Family::IPv4)
                .context("demo pods have IPv4 addresses")?;
            probes.push(LabProbe {
                from: src.clone(),
                to_addr,
                protocol: t.protocol,
                port: t.port,
            });
        }
    }
    let results = running.lab.probe_all(&probes, PROBE_TIMEOUT, 64)?;
    println!("\n{title}");
    let width = sources
        .iter()
        .map(|s| s.to_string().len())
        .max()
        .unwrap_or(10)
        + 2;
    print!("{:width$}", "from \\ to");
    for t in &targets {
        print!("{:>22}", format!("{}:{}", t.pod.name, t.port));
    }
    println!();
    let mut mismatches = 0;
    for (i, src) in sources.iter().enumerate() {
        print!("{:width$}", src.to_string());
        for (j, t) in targets.iter().enumerate() {
            let result = &results[i * targets.len() + j];
            let flow = Flow {
                src: src.clone(),
                dst: t.pod.clone(),
                protocol: t.protocol,
                port: t.port,
                family: Family::IPv4,
            };
            let expected = decide_flow(cluster, sets, &flow).map(|d| d.verdict).ok();
            // Only a silent drop is a deny: a refusal means the demo's server is missing and
            // an error is breakage; both are flagged, never shown as policy at work.
            let (mark, got) = match result {
                ProbeResult::Connected => ("allow", Some(Verdict::Allow)),
                ProbeResult::TimedOut => ("deny", Some(Verdict::Deny)),
                ProbeResult::Refused => ("refused", None),
                ProbeResult::Error(_) | ProbeResult::Unsupported(_) => ("error", None),
            };
            let agrees = got.is_some() && expected == got;
            if !agrees {
                mismatches += 1;
            }
            print!(
                "{:>22}",
                if agrees {
                    mark.to_string()
                } else {
                    format!("{mark} (!)")
                }
            );
        }
        println!();
    }
    if mismatches > 0 {
        println!("(!) {mismatches} cells differ from the compiled rule sets");
    }
    Ok(())
}

pub(crate) fn print_hits(running: &RunningCluster) {
    println!("\nRule hits so far (palisade_rule_packets_total > 0):");
    for (node, addr) in running.metrics_addresses() {
        let Ok((_, text)) = http_get(addr, "/metrics") else {
            continue;
        };
        for line in text
            .lines()
            .filter(|l| l.starts_with("palisade_rule_packets_total{") && !l.ends_with(" 0"))
        {
            println!("  {node}: {line}");
        }
    }
}

/// The last denied flows the agents logged (their `/flows`), as `palisadectl flows` shows
/// them.
pub(crate) fn print_flows(running: &RunningCluster) {
    let mut lines = Vec::new();
    let mut urls = Vec::new();
    for (_, addr) in running.metrics_addresses() {
        urls.push(format!("http://{addr}"));
        if let Ok((200, text)) = http_get(addr, "/flows") {
            lines.extend(text.lines().map(str::to_string));
        }
    }
    let rows = crate::flows::table(&lines);
    println!(
        "\nDenied flows, as the agents logged them (the last of {}; palisadectl flows {}):",
        rows.len() - 1,
        urls.join(" ")
    );
    let skip = rows.len().saturating_sub(11).max(1);
    println!("  {}", rows[0]);
    for row in rows.iter().skip(skip) {
        println!("  {row}");
    }
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.api {
        return crate::demo_api::run(args);
    }
    check_prerequisites()?;
    let (cluster, _services) =
        palisade_resources::parse_cluster_text("demo/cluster.yaml", CLUSTER)?;
    let policies = palisade_resources::parse_policies("demo/policies.yaml", POLICIES)?.policies;
    let bin = agent_binary(args.agent.as_deref());
    let controller_bin = controller_binary(args.controller.as_deref());

    println!(
        "Building a two-node cluster of network namespaces with {} pods…",
        cluster.pods.len()
    );
    let open = compile(&cluster, &[]);
    let mut running =
        RunningCluster::start_with_controller(&cluster, CLUSTER, "", &bin, &controller_bin)?;
    let controller = running
        .controller
        .as_ref()
        .context("the demo runs a controller")?;
    println!(
        "Lab {}: a palisade-controller reading the demo's files, and one agent per node \
         streaming its node's rules from it (TLS, a token per node).",
        running.lab.prefix()
    );
    let (policies_file, controller_metrics) =
        (controller.policies_file.clone(), controller.metrics);
    let served: BTreeSet<_> = targets(&cluster)
        .into_iter()
        .map(|t| (t.pod, t.protocol, t.port))
        .collect();
    running
        .lab
        .serve_all(&served.into_iter().collect::<Vec<_>>())?;
    matrix(
        &running,
        &cluster,
        &open,
        "Connectivity with no policy (real connections):",
    )?;

    println!("\nApplying the sample policies (demo/policies.yaml: an Admin-tier DNS rule, the shop's NetworkPolicies)…");
    let enforced = compile(&cluster, &policies);
    running.update_policies(POLICIES)?;
    matrix(
        &running,
        &cluster,
        &enforced,
        "Connectivity with the policies:",
    )?;
    print_hits(&running);
    print_flows(&running);

    println!("\nAgents' metrics, health and readiness:");
    for (node, addr) in running.metrics_addresses() {
        println!("  {node}: http://{addr}/metrics  http://{addr}/healthz  http://{addr}/readyz");
    }
    println!("Controller: http://{controller_metrics}/metrics");
    let prometheus = match args.prometheus {
        true => crate::prometheus::DemoPrometheus::start(&running)?,
        false => None,
    };
    if let Some(p) = &prometheus {
        println!("{}", p.describe());
    }
    println!("Try: palisadectl explain --from shop/web --to shop/db --port 5432 (with the demo's files in cli/demo/).");
    if !args.no_wait {
        let edits = crate::file_edits::FileEdits::new(&policies_file);
        println!(
            "\nEdit {} to change the policies: the controller streams the change to the agents \
             and the matrix is shown again. Running until Ctrl-C; everything is removed then.",
            policies_file.display()
        );
        let (tx, rx) = mpsc::channel();
        ctrlc::set_handler(move || {
            let _ = tx.send(());
        })
        .context("installing the Ctrl-C handler")?;
        follow_edits(&mut running, &cluster, edits, &rx)?;
    }
    println!("Removing the lab…");
    drop(prometheus);
    drop(running);
    println!("Done.");
    Ok(ExitCode::SUCCESS)
}

/// Shows the matrix again after every edit of the policies file, until Ctrl-C.
fn follow_edits(
    running: &mut RunningCluster,
    cluster: &Cluster,
    mut edits: crate::file_edits::FileEdits,
    stop: &mpsc::Receiver<()>,
) -> Result<()> {
    loop {
        if stop.recv_timeout(Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        let Some(text) = edits.changed() else {
            continue;
        };
        let policies =
            match palisade_resources::parse_policies(&edits.path().display().to_string(), &text) {
                Ok(p) => p.policies,
                Err(e) => {
                    println!("\n{e}\nThe controller keeps the last good policies in force.");
                    continue;
                }
            };
        let sets = compile(cluster, &policies);
        let nodes = running.metrics_addresses().len();
        if let Some(c) = running.controller.as_mut() {
            let before = c.generation().unwrap_or(0.0);
            // An edit that changes no node's rules publishes nothing: then the wait ends
            // without a new generation, and the matrix is the same as before.
            if c.wait_enforced(before, nodes, Duration::from_secs(3))
                .is_err()
            {
                c.wait_enforced(before - 1.0, nodes, Duration::from_secs(30))?;
            }
        }
        matrix(
            running,
            cluster,
            &sets,
            "Connectivity with the edited policies:",
        )?;
    }
}
