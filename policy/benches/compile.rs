//! Compile benchmark: full compile time and peak RSS per workload, and incremental update
//! times with the number of node rule sets each update touches.
//!
//! `cargo bench -p palisade-policy --bench compile` runs every workload, each in a child
//! process of its own so that peak RSS is that workload's alone. `-- WORKLOAD` runs one
//! (scale, scale-tiered, small-namespaces, one-namespace, netpol-per-pod, large-namespaces);
//! `-- WORKLOAD full` only its full compile (for instruction counts under callgrind).

use std::process::Command;
use std::time::{Duration, Instant};

use palisade_policy::workloads as synth;
use palisade_policy::*;

// The controller's allocator, so the figures are the controller's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORKLOADS: [&str; 6] = [
    "scale",
    "scale-tiered",
    "small-namespaces",
    "one-namespace",
    "netpol-per-pod",
    "large-namespaces",
];
const SAMPLES: usize = 201;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Samples {
    times: Vec<Duration>,
    /// Nodes whose rules changed.
    touched: Vec<usize>,
    /// Nodes that only receive group deltas: they reference a changed group.
    group_delta: Vec<usize>,
}

impl Samples {
    fn report(mut self, what: &str) {
        self.times.sort();
        self.touched.sort();
        self.group_delta.sort();
        let n = self.times.len();
        println!(
            "  {what:<22} median {:>8.3} ms  p90 {:>8.3} ms  max {:>8.3} ms  | nodes touched: rules median {} max {}, group deltas median {} max {}  ({n} samples)",
            ms(self.times[n / 2]),
            ms(self.times[n * 9 / 10]),
            ms(self.times[n - 1]),
            self.touched[n / 2],
            self.touched[n - 1],
            self.group_delta[n / 2],
            self.group_delta[n - 1],
        );
    }
}

/// The nodes that receive a group delta and nothing else after `t`.
fn group_delta_nodes(compiler: &Compiler, t: &Touched) -> usize {
    let nodes: std::collections::BTreeSet<&str> = t
        .groups
        .iter()
        .flat_map(|g| compiler.group_nodes(g))
        .filter(|n| !t.nodes.contains(*n))
        .collect();
    nodes.len()
}

fn measure(compiler: &mut Compiler, changes: impl Iterator<Item = (Change, Change)>) -> Samples {
    let mut s = Samples {
        times: Vec::new(),
        touched: Vec::new(),
        group_delta: Vec::new(),
    };
    for (change, undo) in changes {
        let start = Instant::now();
        let t = compiler.apply(change);
        s.times.push(start.elapsed());
        s.touched.push(t.nodes.len());
        s.group_delta.push(group_delta_nodes(compiler, &t));
        compiler.apply(undo);
    }
    s
}

/// A cheap deterministic sequence of indices.
fn picks(n: usize, modulo: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i.wrapping_mul(2_654_435_761) ^ 0x5bd1e995) % modulo)
}

/// The *Scale* workloads' updates: a pod moves to the next app, a pod of the Scale shape
/// is added, a `web-to-api` policy gains a port.
fn incremental_scale(compiler: &mut Compiler, pods: &[Pod]) {
    let relabel = pods.iter().map(|old| {
        let mut new = old.clone();
        let app = new.labels.get("app").cloned().unwrap_or_default();
        let next = format!(
            "app-{}",
            (app.trim_start_matches("app-").parse::<usize>().unwrap_or(0) + 1) % 6
        );
        new.labels.insert("app".into(), next);
        (Change::UpsertPod(new), Change::UpsertPod(old.clone()))
    });
    measure(compiler, relabel).report("(a) pod labels change");

    let nodes = compiler.cluster().nodes.len();
    let add = picks(SAMPLES, 5000).enumerate().map(|(k, i)| {
        let pod = synth::scale_pod(i, 1000 + k, 1_000_000 + k as u32, nodes);
        let key = pod.key();
        (Change::UpsertPod(pod), Change::RemovePod(key))
    });
    measure(compiler, add).report("(b) pod added");

    let nps: Vec<Policy> = compiler
        .policies()
        .filter(|p| p.id.name == "web-to-api")
        .cloned()
        .collect();
    policy_changes(compiler, &nps, SAMPLES);
}

/// Other workloads' updates: a pod takes the labels of another sampled pod, a copy of a
/// sampled pod is added under a new name and address, a NetworkPolicy with an ingress rule
/// gains a port.
fn incremental_generic(compiler: &mut Compiler, pods: &[Pod]) {
    let relabel = pods.iter().enumerate().map(|(k, old)| {
        let mut new = old.clone();
        new.labels = pods[(k + 1) % pods.len()].labels.clone();
        (Change::UpsertPod(new), Change::UpsertPod(old.clone()))
    });
    measure(compiler, relabel).report("(a) pod labels change");

    let add = pods.iter().enumerate().map(|(k, p)| {
        let mut pod = p.clone();
        pod.name = format!("{}-added-{k}", p.name);
        pod.ips = vec![synth::pod_ip(1_000_000 + k as u32)];
        let key = pod.key();
        (Change::UpsertPod(pod), Change::RemovePod(key))
    });
    measure(compiler, add).report("(b) pod added");

    let nps: Vec<Policy> = compiler
        .policies()
        .filter(|p| p.tier == Tier::NetworkPolicy && !p.ingress.is_empty())
        .cloned()
        .collect();
    // A policy of one-namespace selects all of its 10,000 pods: fewer samples.
    policy_changes(compiler, &nps, SAMPLES / 10);
}

fn policy_changes(compiler: &mut Compiler, nps: &[Policy], samples: usize) {
    let edit = picks(samples, nps.len()).map(|i| {
        let old = nps[i].clone();
        let mut new = old.clone();
        new.ingress[0]
            .ports
            .get_or_insert_with(Vec::new)
            .push(PortRule {
                protocol: Protocol::Tcp,
                port: PortSpec::Range {
                    start: 8443,
                    end: 8443,
                },
            });
        (Change::UpsertPolicy(new), Change::UpsertPolicy(old))
    });
    measure(compiler, edit).report("(c) policy changed");
}

fn incremental(compiler: &mut Compiler, scale_shape: bool) {
    let total = compiler.cluster().pods.len();
    let wanted: std::collections::BTreeSet<usize> = picks(SAMPLES, total).collect();
    let pods: Vec<Pod> = compiler
        .cluster()
        .pods
        .values()
        .enumerate()
        .filter(|(i, _)| wanted.contains(i))
        .map(|(_, p)| p.clone())
        .collect();
    if scale_shape {
        incremental_scale(compiler, &pods);
    } else {
        incremental_generic(compiler, &pods);
    }
}

fn run(name: &str, with_incremental: bool) {
    let generate = Instant::now();
    let w = match name {
        "scale" => synth::scale(),
        "scale-tiered" => synth::scale_tiered(),
        "small-namespaces" => synth::small_namespaces(),
        "one-namespace" => synth::one_namespace(),
        "netpol-per-pod" => synth::netpol_per_pod(),
        "large-namespaces" => synth::large_namespaces(),
        other => panic!("unknown workload {other}; expected one of {WORKLOADS:?}"),
    };
    let generated = generate.elapsed();
    let rss_input = peak_rss_mib();
    let (nodes, pods, policies) = (
        w.cluster.nodes.len(),
        w.cluster.pods.len(),
        w.policies.len(),
    );
    let start = Instant::now();
    let mut compiler = Compiler::new(w.cluster, w.policies);
    let compiled = start.elapsed();
    let start = Instant::now();
    let mut instances = 0usize;
    let mut groups = std::collections::BTreeSet::new();
    for n in compiler.nodes() {
        if let Some(set) = compiler.node_rule_set(n) {
            instances += set
                .pods
                .iter()
                .map(|p| p.ingress.instances().count() + p.egress.instances().count())
                .sum::<usize>();
            groups.extend(set.groups.into_keys());
        }
    }
    let materialized = start.elapsed();
    println!("{name}: {nodes} nodes, {pods} pods, {policies} policies (generated in {:.0} ms, input {:.0} MiB)", ms(generated), rss_input);
    println!(
        "  full compile           {:>8.1} ms   all node rule sets materialized {:>8.1} ms  ({} rule instances, {} distinct groups)",
        ms(compiled),
        ms(materialized),
        instances,
        groups.len()
    );
    println!(
        "  peak RSS after full compile and materializing {:>8.1} MiB",
        peak_rss_mib()
    );
    if with_incremental {
        incremental(&mut compiler, name.starts_with("scale"));
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(name) = args.first() {
        return run(name, args.get(1).map(String::as_str) != Some("full"));
    }
    let me = std::env::current_exe().expect("own path");
    for w in WORKLOADS {
        let status = Command::new(&me).arg(w).status().expect("run workload");
        assert!(status.success(), "workload {w} failed");
    }
}
