//! Lab timings (root only): build and teardown of a 3-node/8-pod and a 2-node/110-pod lab,
//! and 100 parallel TCP probes. Run with `cargo bench -p palisade-netlab`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use palisade_netlab::{Lab, LabOptions, Probe};
use palisade_policy::model::{Family, PodKey, Protocol};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_build(nodes: usize, pods: usize, runs: usize) {
    let cluster = common::generated_cluster(nodes, pods);
    let mut builds = Vec::new();
    let mut teardowns = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let mut lab = Lab::build(&cluster, LabOptions::default()).expect("building");
        builds.push(started.elapsed());
        let started = Instant::now();
        lab.teardown().expect("teardown");
        teardowns.push(started.elapsed());
    }
    println!(
        "build {nodes} nodes / {pods} pods: median {:?} (min {:?}, max {:?}); teardown median {:?}",
        median(builds.clone()),
        builds.iter().min().unwrap(),
        builds.iter().max().unwrap(),
        median(teardowns)
    );
}

fn time_probes() {
    let cluster = common::generated_cluster(2, 20);
    let lab = Lab::build(&cluster, LabOptions::default()).expect("building");
    let pods: Vec<PodKey> = lab.pods().cloned().collect();
    let items: Vec<(PodKey, Protocol, u16)> = pods
        .iter()
        .flat_map(|p| {
            [
                (p.clone(), Protocol::Tcp, 80),
                (p.clone(), Protocol::Udp, 53),
            ]
        })
        .collect();
    let started = Instant::now();
    lab.serve_all(&items).expect("serving");
    println!("serve {} ports: {:?}", items.len(), started.elapsed());
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let port = if protocol == Protocol::Tcp { 80 } else { 53 };
        let probes: Vec<Probe> = (0..100)
            .map(|i| {
                let from = pods[i % pods.len()].clone();
                let to = &pods[(i * 7 + 3) % pods.len()];
                Probe {
                    from,
                    to_addr: lab.pod_address(to, Family::IPv4).unwrap().unwrap(),
                    protocol,
                    port,
                }
            })
            .collect();
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let results = lab
                .probe_all(&probes, Duration::from_secs(1), 100)
                .expect("probing");
            times.push(started.elapsed());
            assert!(results.iter().all(|r| r.is_connected()), "{results:?}");
        }
        println!("100 parallel {protocol} probes: median {:?}", median(times));
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: the lab benchmarks need root");
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    time_build(3, 8, 5);
    time_build(2, 110, 3);
    time_probes();
}
