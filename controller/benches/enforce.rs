//! API change → enforced, end to end: a real kube-apiserver, a controller, three lab nodes
//! with agents. For each change (a NetworkPolicy created or deleted, a pod relabelled into
//! or out of it), the time from the API write's response until (a) every connected agent
//! has acknowledged the generation that carries it and (b) a probe with real packets shows
//! the new verdict. p50/p99 over `ENFORCE_CHANGES` changes (default 200).
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

/// The start of the first probe that shows `allowed`.
async fn flipped(s: &System, db: IpAddr, allowed: bool) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
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
                Duration::from_millis(100),
            )
        })
        .expect("probe");
        if matches!(r, ProbeResult::Connected) == allowed {
            return started;
        }
        assert!(Instant::now() < deadline, "the verdict never flipped");
    }
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
        .unwrap_or(200);
    let s = System::start("bench", CLUSTER, 1).await;
    let db = s.pod_ip("shop", "db");
    s.serve("shop", "db", 5432);
    let mut policy: [Vec<(Duration, Duration)>; 2] = [Vec::new(), Vec::new()];
    let label = |v: &str| BTreeMap::from([("app".to_string(), v.to_string())]);
    for i in 0..changes {
        let g = generation(&s).await;
        // Even changes: the policy is created (web denied) or deleted (allowed), with web
        // labelled web. Odd changes: the policy stays and web is relabelled api (allowed)
        // or back (denied).
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
                (1, false)
            }
            _ => {
                s.kube.delete_yaml(POLICY).await.unwrap();
                (0, true)
            }
        };
        let written = Instant::now();
        let acked = acked_after(&s, g).await;
        let seen = flipped(&s, db, allowed).await;
        policy[kind].push((acked - written, seen.saturating_duration_since(written)));
    }
    for (name, runs) in [
        ("policy created/deleted", &policy[0]),
        ("pod relabelled", &policy[1]),
    ] {
        let mut acks: Vec<Duration> = runs.iter().map(|r| r.0).collect();
        let mut flips: Vec<Duration> = runs.iter().map(|r| r.1).collect();
        acks.sort();
        flips.sort();
        println!(
            "{name}: {} changes; all nodes acknowledged p50 {:.1} ms p99 {:.1} ms; probe flipped p50 {:.1} ms p99 {:.1} ms (max {:.1} ms)",
            runs.len(),
            pct(&acks, 0.5).as_secs_f64() * 1e3,
            pct(&acks, 0.99).as_secs_f64() * 1e3,
            pct(&flips, 0.5).as_secs_f64() * 1e3,
            pct(&flips, 0.99).as_secs_f64() * 1e3,
            flips.last().unwrap().as_secs_f64() * 1e3,
        );
    }
}
