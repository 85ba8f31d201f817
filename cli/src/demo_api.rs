//! `palisadectl demo --api`: the demo on the real architecture. A control plane from the
//! tools directory (etcd, kube-apiserver, kube-controller-manager, the network-policy-api
//! CRDs, the chart's RBAC) holds the demo's cluster as API objects; palisade-controller
//! watches it with its own ServiceAccount's token; each node's agent streams its rules
//! with a token bound to its agent pod. The policies are written to the apiserver, and
//! every edit of the policies file is applied to it (objects gone from the file are
//! deleted), so the matrix follows the file as it would follow `kubectl apply`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_kubelab::DynamicObject;
use palisade_policy::Cluster;

use crate::demo::{self, compile, matrix, print_hits, targets, CLUSTER, POLICIES};
use crate::running::{check_prerequisites, RunningCluster};
use crate::verify::api::{
    chart_dir, check_kube_bin, watch_events, ApiArgs, ApiSystem, Expected, Written,
};

/// An applied object: kind, namespace and name.
type Key = (String, Option<String>, String);

fn key(o: &DynamicObject) -> Key {
    (
        o.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default(),
        o.metadata.namespace.clone(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

/// The policies as the apiserver holds them, by object, with their resourceVersions: a
/// write that leaves an object as it was is no watch event, so only changed versions are
/// counted as events to wait for.
#[derive(Default)]
struct Applied(BTreeMap<Key, (DynamicObject, Option<String>)>);

pub fn run(args: &demo::Args) -> Result<ExitCode> {
    check_prerequisites()?;
    check_kube_bin(&args.kube_bin).context(
        "demo --api needs a real kube-apiserver from the tools directory, and there is none",
    )?;
    let chart = chart_dir(None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (cluster, _) = palisade_resources::parse_cluster_text("demo/cluster.yaml", CLUSTER)?;
        println!(
            "Starting etcd, kube-apiserver and kube-controller-manager from {}…",
            args.kube_bin.display()
        );
        let started = Instant::now();
        let mut system = ApiSystem::start(
            &ApiArgs {
                agent: args.agent.clone(),
                controller: args.controller.clone(),
                kube_bin: args.kube_bin.clone(),
                chart: None,
            },
            &chart,
        )
        .await?;
        println!(
            "API server {} up in {:.0}s; palisade-controller watches it as its ServiceAccount \
             (admin kubeconfig: {}).",
            system.kube.url(),
            started.elapsed().as_secs_f64(),
            system.kube.kubeconfig().display()
        );
        let mut written = Written::default();
        let result = demo(&mut system, &cluster, &mut written, args).await;
        println!("Removing the lab and the API objects…");
        let cleaned = system.clean(&written).await;
        drop(system);
        result?;
        cleaned?;
        println!("Done.");
        Ok(ExitCode::SUCCESS)
    })
}

async fn demo(
    system: &mut ApiSystem,
    cluster: &Cluster,
    written: &mut Written,
    args: &demo::Args,
) -> Result<()> {
    let baseline = watch_events(&system.metrics()?);
    let mut expected = Expected::default();
    println!(
        "Writing the demo's {} Nodes, {} Namespaces and {} Pods to the API server…",
        cluster.nodes.len(),
        cluster.namespaces.len(),
        cluster.pods.len()
    );
    system
        .write_cluster(cluster, CLUSTER, written, &mut expected)
        .await?;
    let nodes: Vec<String> = cluster.nodes.keys().cloned().collect();
    let running = system.start_agents(cluster, written, &mut expected).await?;
    system.settle(&baseline, &expected, &nodes).await?;
    println!(
        "Lab {}: one agent per node streaming its node's rules from the controller (TLS, a \
         ServiceAccount token bound to the node's agent pod).",
        running.lab.prefix()
    );
    let served: BTreeSet<_> = targets(cluster)
        .into_iter()
        .map(|t| (t.pod, t.protocol, t.port))
        .collect();
    tokio::task::block_in_place(|| {
        running
            .lab
            .serve_all(&served.into_iter().collect::<Vec<_>>())
    })?;
    show(
        &running,
        cluster,
        "",
        "Connectivity with no policy (real connections):",
    )?;

    let dir = std::env::temp_dir().join(format!("palisade-demo-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("policies.yaml");
    let _remove = RemoveOnDrop(dir.clone());
    std::fs::write(&file, POLICIES)?;
    println!("\nApplying the sample policies to the API server (server-side apply)…");
    let mut applied = Applied::default();
    apply_file(
        system,
        &mut applied,
        &baseline,
        &mut expected,
        POLICIES,
        written,
        &nodes,
    )
    .await?;
    show(
        &running,
        cluster,
        POLICIES,
        "Connectivity with the policies:",
    )?;
    print_hits(&running);
    println!("\nAgents' metrics, health and readiness:");
    for (node, addr) in running.metrics_addresses() {
        println!("  {node}: http://{addr}/metrics  http://{addr}/healthz  http://{addr}/readyz");
    }
    println!("Controller: http://{}/metrics", system.controller.metrics);
    println!(
        "Try: KUBECONFIG={} kubectl get networkpolicies -A (kubectl from the tools directory).",
        system.kube.kubeconfig().display()
    );
    if !args.no_wait {
        let mut edits = crate::file_edits::FileEdits::new(&file);
        println!(
            "\nEdit {} to change the policies: each edit is applied to the API server, the \
             controller streams the change to the agents and the matrix is shown again. \
             Running until Ctrl-C; everything is removed then.",
            file.display()
        );
        let (tx, rx) = mpsc::channel();
        ctrlc::set_handler(move || {
            let _ = tx.send(());
        })
        .context("installing the Ctrl-C handler")?;
        loop {
            if rx.recv_timeout(Duration::from_millis(300)).is_ok() {
                break;
            }
            let Some(text) = edits.changed() else {
                continue;
            };
            match apply_file(
                system,
                &mut applied,
                &baseline,
                &mut expected,
                &text,
                written,
                &nodes,
            )
            .await
            {
                Ok(()) => show(
                    &running,
                    cluster,
                    &text,
                    "Connectivity with the edited policies:",
                )?,
                Err(e) => println!(
                    "\n{e:#}\nWhat the API server holds stays in force; fix the file to go on."
                ),
            }
        }
    }
    tokio::task::block_in_place(|| drop(running));
    Ok(())
}

/// The matrix, with each cell checked against the offline compile of `policies_text`.
fn show(
    running: &RunningCluster,
    cluster: &Cluster,
    policies_text: &str,
    title: &str,
) -> Result<()> {
    let policies = palisade_resources::parse_policies("policies.yaml", policies_text)
        .map(|p| p.policies)
        .unwrap_or_default();
    let sets = compile(cluster, &policies);
    tokio::task::block_in_place(|| matrix(running, cluster, &sets, title))
}

/// Brings the apiserver's policies to `text`: applies every object of it, deletes the
/// objects applied before and gone from it, and waits until every node enforces the result.
/// A rejected object is reported; what was applied before it stays.
async fn apply_file(
    system: &mut ApiSystem,
    applied: &mut Applied,
    baseline: &BTreeMap<String, u64>,
    expected: &mut Expected,
    text: &str,
    written: &mut Written,
    nodes: &[String],
) -> Result<()> {
    let wanted = palisade_kubelab::parse_objects("policies.yaml", text)?;
    let wanted_keys: BTreeSet<Key> = wanted.iter().map(key).collect();
    let gone: Vec<Key> = applied
        .0
        .keys()
        .filter(|k| {
            // The apiserver fills in the namespace of a namespaced object that names none.
            !wanted_keys.contains(*k) && !wanted_keys.contains(&(k.0.clone(), None, k.2.clone()))
        })
        .cloned()
        .collect();
    let mut result = Ok(());
    for object in &wanted {
        let yaml = serde_yaml::to_string(object)?;
        match system.kube.apply_yaml(&yaml).await {
            Ok(mut objects) => {
                if let Some(stored) = objects.pop() {
                    let k = key(&stored);
                    let version = stored.metadata.resource_version.clone();
                    if applied.0.get(&k).map(|(_, v)| v) != Some(&version) {
                        expected.add(&k.0, 1);
                    }
                    written.yaml.push(yaml);
                    applied.0.insert(k, (stored, version));
                }
            }
            Err(e) => {
                result = Err(anyhow::anyhow!(
                    "the API server rejects {} {}: {e}",
                    key(object).0,
                    key(object).2
                ));
                break;
            }
        }
    }
    for k in gone {
        if let Some((object, _)) = applied.0.remove(&k) {
            system
                .kube
                .delete_yaml(&serde_yaml::to_string(&object)?)
                .await?;
            expected.add(&k.0, 1);
        }
    }
    system.settle(baseline, expected, nodes).await?;
    result
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
