//! API change → enforced, end to end: a real kube-apiserver, a controller, three lab nodes
//! with agents. For each change (a NetworkPolicy created or deleted, a pod relabelled into
//! or out of it), the time from the API write's response until (a) every connected agent
//! has acknowledged the generation that carries it and (b) a probe with real packets shows
//! the new verdict. p50/p99 over `ENFORCE_CHANGES` changes (default 800: 200 of each of
//! the four, so 400 per kind).
//!
//! Probing starts once every node has acknowledged. A flip is the start of the first probe
//! showing the new verdict. A probe shows "denied" only by timing out, so a denying probe
//! waits `ENFORCE_DENIED_TIMEOUT_MS` (default 300). A probe that should connect is given
//! `ENFORCE_ALLOWED_TIMEOUT_MS` (default 900, below TCP's first SYN retransmission at 1 s,
//! so a SYN dropped before enforcement still shows as a time-out): with a short timeout, a
//! connect that is merely slow on a loaded machine is a time-out plus a retry, which the
//! previous 100 ms setting counted as enforcement time (see the retry counts printed).
//!
//! Run as root after scripts/tools.sh: `cargo bench -p palisade-controller --bench enforce`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use palisade_netlab::ProbeResult;
use support::{http_get, System};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Node
metadata: {name: node-c}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: web, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: api, labels: {app: api}}
spec: {nodeName: node-b, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: db, labels: {app: db}}
spec: {nodeName: node-c, containers: [{name: c, ports: [{containerPort: 5432}]}]}
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: db-from-api}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]
"#;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn acked_after(s: &System, generation: f64) -> Instant {
    loop {
        let text = http_get(s.replicas[0].metrics, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        let g = support::metric(&text, "palisade_controller_generation").unwrap_or(0.0);
        let lagging = text
            .lines()
            .filter(|l| l.starts_with("palisade_controller_node_generation_lag{"))
            .any(|l| !l.ends_with(" 0"));
        if g > generation && !lagging {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// When the verdict flipped (the start of the first probe that shows `allowed`) and how
/// many probes before it did not show it yet.
async fn flipped(s: &System, db: IpAddr, allowed: bool, timeout: Duration) -> (Instant, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut misses = 0;
    loop {
        let started = Instant::now();
        let r = tokio::task::block_in_place(|| {
            s.lab.probe(
                &palisade_netlab::Probe {
                    from: palisade_policy::PodKey::new("shop", "web"),
                    to_addr: db,
                    protocol: palisade_policy::Protocol::Tcp,
                    port: 5432,
                },
                timeout,
            )
        })
        .expect("probe");
        if matches!(r, ProbeResult::Connected) == allowed {
            return (started, misses);
        }
        misses += 1;
        assert!(Instant::now() < deadline, "the verdict never flipped");
    }
}

/// One change: written → every node acknowledged, written → probe flipped, probes missed.
struct Sample {
    ack: Duration,
    flip: Duration,
    misses: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, runs: &[&Sample]) {
    let mut acks: Vec<Duration> = runs.iter().map(|r| r.ack).collect();
    let mut flips: Vec<Duration> = runs.iter().map(|r| r.flip).collect();
    acks.sort();
    flips.sort();
    let retried = runs.iter().filter(|r| r.misses > 0).count();
    println!(
        "{name}: {} changes; all nodes acknowledged p50 {:.1} ms p99 {:.1} ms max {:.1} ms; probe flipped p50 {:.1} ms p99 {:.1} ms max {:.1} ms; {retried} needed more than one probe",
        runs.len(),
        ms(pct(&acks, 0.5)),
        ms(pct(&acks, 0.99)),
        ms(acks[acks.len() - 1]),
        ms(pct(&flips, 0.5)),
        ms(pct(&flips, 0.99)),
        ms(flips[flips.len() - 1]),
    );
}

async fn generation(s: &System) -> f64 {
    let text = http_get(s.replicas[0].metrics, "/metrics").await.unwrap().1;
    support::metric(&text, "palisade_controller_generation").unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !support::can_run() {
        return;
    }
    let changes: usize = std::env::var("ENFORCE_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(800);
    let allowed_timeout = env_ms("ENFORCE_ALLOWED_TIMEOUT_MS", 900);
    let denied_timeout = env_ms("ENFORCE_DENIED_TIMEOUT_MS", 300);
    let s = System::start("bench", CLUSTER, 1).await;
    println!(
        "{} agent nodes; probes wait {} ms for a connection that should succeed, {} ms for one that should not",
        s.agents.len(),
        allowed_timeout.as_millis(),
        denied_timeout.as_millis()
    );
    let db = s.pod_ip("shop", "db");
    s.serve("shop", "db", 5432);
    const KINDS: [&str; 4] = [
        "policy created",
        "pod relabelled into it",
        "pod relabelled out of it",
        "policy deleted",
    ];
    let mut samples: [Vec<Sample>; 4] = Default::default();
    let label = |v: &str| BTreeMap::from([("app".to_string(), v.to_string())]);
    for i in 0..changes {
        let g = generation(&s).await;
        // The policy is created (web denied), web is relabelled api (allowed) and back
        // (denied), the policy is deleted (allowed).
        let (kind, allowed) = match i % 4 {
            0 => {
                s.kube.apply_yaml(POLICY).await.unwrap();
                (0, false)
            }
            1 => {
                s.kube
                    .relabel_pod("shop", "web", &label("api"))
                    .await
                    .unwrap();
                (1, true)
            }
            2 => {
                s.kube
                    .relabel_pod("shop", "web", &label("web"))
                    .await
                    .unwrap();
                (2, false)
            }
            _ => {
                s.kube.delete_yaml(POLICY).await.unwrap();
                (3, true)
            }
        };
        let written = Instant::now();
        let acked = acked_after(&s, g).await;
        let timeout = if allowed {
            allowed_timeout
        } else {
            denied_timeout
        };
        let (seen, misses) = flipped(&s, db, allowed, timeout).await;
        samples[kind].push(Sample {
            ack: acked - written,
            flip: seen.saturating_duration_since(written),
            misses,
        });
    }
    for (name, runs) in KINDS.iter().zip(&samples) {
        if !runs.is_empty() {
            report(name, &runs.iter().collect::<Vec<_>>());
        }
    }
    for (name, (a, b)) in [
        ("policy created or deleted", (0, 3)),
        ("pod relabelled", (1, 2)),
    ] {
        let runs: Vec<&Sample> = samples[a].iter().chain(&samples[b]).collect();
        if !runs.is_empty() {
            report(name, &runs);
        }
    }
}
