//! `palisadectl verify --api`: every scenario through the whole system. One control plane
//! (etcd, kube-apiserver, kube-controller-manager, the network-policy-api CRDs, the chart's
//! RBAC) and one `palisade-controller` watching it serve the whole run; per scenario, its
//! Nodes, Namespaces, Pods (addresses through the status subresource), Services and
//! policies are written to the apiserver, a lab of network namespaces with the same
//! addresses gets one agent per node streaming from the controller with a token bound to
//! its node's agent pod, and each probe is a real connection, judged as in `--dataplane`.
//!
//! A probe counts only after every node has acknowledged a generation that holds all of the
//! scenario's objects. Watches are per kind, so "the controller has seen everything" is
//! established per kind: every write that changes an object is one watch event, and the
//! controller counts the events it has taken in by kind
//! (`palisade_controller_watch_events_total`). Once every kind has reached the count that
//! the writes imply, one more change (a label on a fence namespace) forces a publish that
//! holds all of them; when the generation has passed the one read before the fence and no
//! scenario node lags behind, the kernel holds the scenario. No fixed sleeps.
//!
//! Between scenarios everything the scenario wrote is deleted, and waited for until gone,
//! so each scenario starts from a clean state; only the run's namespaces stay, emptied and
//! unlabelled, for later scenarios to relabel (see `clean`). Namespaces that exist already
//! (`default`, `kube-system`) are borrowed: relabelled, and their labels restored after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use palisade_kubelab::{
    agent_pod_name, lab_pod, parse_objects, string_labels, KubeLab, Options, SYSTEM_NS,
};
use palisade_policy::{Cluster, Compiler, Verdict};
use palisade_resources::Scenario;

use crate::controller::{controller_binary, ControllerProcess};
use crate::dataplane::{self, probe_pass, report, serve_probed, Tally};
use crate::running::{agent_binary, check_prerequisites, http_get, RunningCluster};

/// A namespace of the run's own, whose label changes force the controller to publish.
const FENCE_NS: &str = "palisade-verify-fence";
const FENCE_LABEL: &str = "palisade.dev/verify-fence";
/// How long the controller and agents may take to enforce a scenario's objects.
const SETTLE: Duration = Duration::from_secs(60);
/// Label the apiserver sets on every namespace itself.
const NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub struct ApiArgs {
    pub agent: Option<PathBuf>,
    pub controller: Option<PathBuf>,
    pub kube_bin: PathBuf,
    pub chart: Option<PathBuf>,
}

/// What the control plane needs from `--kube-bin`, with a message a person can act on.
pub fn check_kube_bin(dir: &Path) -> Result<()> {
    let mut needed: Vec<&str> = palisade_kubelab::CONTROL_PLANE_BINARIES.to_vec();
    needed.push("helm");
    if let Some(reason) = palisade_kubelab::missing(dir, &needed) {
        bail!("{reason}: build the kube tools with scripts/tools.sh, or pass --kube-bin DIR");
    }
    let crds = palisade_kubelab::crd_dir_for(dir);
    if !crds.is_dir() {
        bail!(
            "no network-policy-api CRDs in {} (scripts/tools.sh puts them there)",
            crds.display()
        );
    }
    Ok(())
}

/// The chart: `--chart`, else `charts/palisade` here, else the one of the source tree this
/// binary was built from.
pub fn chart_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let here = PathBuf::from("charts/palisade");
    if here.join("Chart.yaml").exists() {
        return Ok(here);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/palisade");
    if built.join("Chart.yaml").exists() {
        return Ok(built);
    }
    bail!("cannot find the Palisade chart (charts/palisade): pass --chart DIR")
}

pub fn verify(dirs: &[PathBuf], opts: &ApiArgs) -> Result<ExitCode> {
    check_prerequisites()?;
    check_kube_bin(&opts.kube_bin)?;
    let chart = chart_dir(opts.chart.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let started = Instant::now();
        let mut system = ApiSystem::start(opts, &chart).await?;
        eprintln!(
            "control plane and controller up in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        let mut tally = Tally::default();
        for dir in dirs {
            let Some(scenario) = dataplane::load(dir, &mut tally) else {
                continue;
            };
            let t = Instant::now();
            let mut written = Written::default();
            let result = system.scenario(&scenario, &mut written, &mut tally).await;
            if let Err(e) = result {
                println!("ERROR {}: {e:#}", scenario.name);
                tally.failed += 1;
            }
            let cleaning = Instant::now();
            let cleaned = system.clean(&written).await;
            if std::env::var_os("PALISADE_VERIFY_TIMING").is_some() {
                eprintln!("  clean {:.2}s", cleaning.elapsed().as_secs_f64());
            }
            if let Err(e) = cleaned {
                // What a scenario leaves behind would change every later one.
                println!(
                    "ERROR {}: cleaning up failed, so the run stops: {e:#}",
                    scenario.name
                );
                tally.failed += 1;
                break;
            }
            if std::env::var_os("PALISADE_VERIFY_TIMING").is_some() {
                eprintln!("{}: {:.2}s", scenario.name, t.elapsed().as_secs_f64());
            }
        }
        Ok(tally.finish())
    })
}

/// The control plane and the controller, for the whole run.
pub(crate) struct ApiSystem {
    // Field order is drop order: the controller before the apiserver it watches.
    pub controller: ControllerProcess,
    pub kube: KubeLab,
    pub dir: PathBuf,
    agent_bin: PathBuf,
    fences: u64,
    /// Namespaces this run created (kept, emptied, between scenarios).
    own: std::collections::BTreeSet<String>,
}

/// What a scenario wrote, to take it all away again.
#[derive(Default)]
pub(crate) struct Written {
    nodes: Vec<String>,
    /// The run's own namespaces that this scenario used.
    namespaces: Vec<String>,
    /// Namespaces that existed already (`default`, `kube-system`), with their labels before.
    borrowed: Vec<(String, BTreeMap<String, String>)>,
    /// The scenario's pods and the agent pods.
    pods: Vec<(String, String)>,
    /// YAML of the Services and policies (deleted by name).
    pub yaml: Vec<String>,
}

/// The watch events that writes imply, by kind (as the controller's metric names kinds).
#[derive(Debug, Default)]
pub(crate) struct Expected(BTreeMap<String, u64>);

impl Expected {
    pub fn add(&mut self, kind: &str, n: u64) {
        *self.0.entry(kind.to_string()).or_default() += n;
    }
}

fn labelled<'a>(text: &'a str, name: &str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    let prefix = format!("{name}{{");
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(&prefix)?;
        let (labels, value) = rest.split_once("} ")?;
        let label_value = labels.split_once("=\"")?.1.strip_suffix('"')?;
        Some((label_value, value.trim().parse().ok()?))
    })
}

/// `palisade_controller_watch_events_total` by kind.
pub(crate) fn watch_events(text: &str) -> BTreeMap<String, u64> {
    labelled(text, "palisade_controller_watch_events_total")
        .map(|(k, v)| (k.to_string(), v as u64))
        .collect()
}

impl ApiSystem {
    pub async fn start(opts: &ApiArgs, chart: &Path) -> Result<Self> {
        let kube = KubeLab::start(Options {
            bin_dir: Some(opts.kube_bin.clone()),
            crd_dir: Some(palisade_kubelab::crd_dir_for(&opts.kube_bin)),
            ..Options::default()
        })
        .await
        .context("starting the control plane")?;
        let dir = kube.dir().join("palisadectl");
        std::fs::create_dir_all(&dir)?;
        kube.install_chart(chart)
            .await
            .context("installing the chart's ServiceAccounts and RBAC")?;
        kube.create_namespace(FENCE_NS, &BTreeMap::new()).await?;
        let kubeconfig = dir.join("controller.kubeconfig");
        kube.write_controller_kubeconfig(&kubeconfig).await?;
        let tls = palisade_controller::devtls::generate(&dir, &["127.0.0.1", "localhost"])?;
        let source = vec![
            "--kubeconfig".into(),
            kubeconfig.into_os_string(),
            "--tls-cert".into(),
            tls.cert.into_os_string(),
            "--tls-key".into(),
            tls.key.into_os_string(),
            "--identity".into(),
            "palisadectl".into(),
            "--lease-namespace".into(),
            SYSTEM_NS.into(),
        ];
        let bin = controller_binary(opts.controller.as_deref());
        let controller =
            tokio::task::block_in_place(|| ControllerProcess::spawn(&dir, &bin, source, tls.ca))?;
        Ok(ApiSystem {
            controller,
            kube,
            dir,
            agent_bin: agent_binary(opts.agent.as_deref()),
            fences: 0,
            own: Default::default(),
        })
    }

    pub fn metrics(&self) -> Result<String> {
        let (status, text) = http_get(self.controller.metrics, "/metrics")?;
        if status != 200 {
            bail!("controller /metrics answered {status}");
        }
        Ok(text)
    }

    /// One scenario: write, enforce without policies (control run), apply the policies,
    /// enforce, probe. `written` records what to take away again, also on failure.
    async fn scenario(
        &mut self,
        scenario: &Scenario,
        written: &mut Written,
        tally: &mut Tally,
    ) -> Result<()> {
        let t0 = Instant::now();
        let phase = |what: &str| {
            if std::env::var_os("PALISADE_VERIFY_TIMING").is_some() {
                eprintln!("  {what} at {:.2}s", t0.elapsed().as_secs_f64());
            }
        };
        let baseline = watch_events(&self.metrics()?);
        let mut expected = Expected::default();
        let cluster_text = std::fs::read_to_string(scenario.dir.join("cluster.yaml"))?;
        self.write_cluster(&scenario.cluster, &cluster_text, written, &mut expected)
            .await?;
        phase("written");
        let nodes: Vec<String> = scenario.cluster.nodes.keys().cloned().collect();
        let running = self
            .start_agents(&scenario.cluster, written, &mut expected)
            .await
            .with_context(|| format!("starting the lab of {}", scenario.name))?;
        phase("agents");
        self.settle(&baseline, &expected, &nodes)
            .await
            .context("enforcing the cluster without policies")?;
        phase("settled");
        let probes = tokio::task::block_in_place(|| serve_probed(scenario, &running))?;
        let control = tokio::task::block_in_place(|| probe_pass(&running, &probes, |_| true))?;
        phase("control");

        let text = std::fs::read_to_string(scenario.dir.join("policies.yaml"))?;
        written.yaml.push(text.clone());
        let applied = self.kube.apply_yaml(&text).await.map_err(|e| {
            anyhow!("the apiserver does not accept policies.yaml as a cluster would: {e}")
        })?;
        for object in &applied {
            let kind = object.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("");
            expected.add(kind, 1);
        }
        self.settle(&baseline, &expected, &nodes)
            .await
            .context("enforcing the policies")?;
        phase("policies");
        let enforced = tokio::task::block_in_place(|| {
            probe_pass(&running, &probes, |i| {
                scenario.probes[i].expect == Verdict::Allow
            })
        })?;
        let rule_sets =
            Compiler::new(scenario.cluster.clone(), scenario.policies.clone()).node_rule_sets();
        report(scenario, &rule_sets, &control, &enforced, tally);
        phase("probed");
        tokio::task::block_in_place(|| drop(running));
        phase("lab gone");
        Ok(())
    }

    /// The lab of `cluster` with one agent per node, each streaming from the controller
    /// with a token bound to its node's agent pod (created here).
    pub async fn start_agents(
        &mut self,
        cluster: &Cluster,
        written: &mut Written,
        expected: &mut Expected,
    ) -> Result<RunningCluster> {
        let mut sources = BTreeMap::new();
        for (node, n) in &cluster.nodes {
            let address = *n
                .addresses
                .first()
                .ok_or_else(|| anyhow!("node {node} has no address"))?;
            let token = self.kube.agent_token(node, address).await?;
            written.pods.push((SYSTEM_NS.into(), agent_pod_name(node)));
            expected.add("Pod", 2);
            let path = self.dir.join(format!("{node}.token"));
            std::fs::write(&path, token)?;
            self.controller.set_token(node, path);
            sources.insert(node.clone(), self.controller.agent_args(node)?);
        }
        let bin = self.agent_bin.clone();
        tokio::task::block_in_place(|| RunningCluster::start_streaming(cluster, &sources, &bin))
    }

    /// Nodes, Namespaces, Pods and the Services of `cluster_text`, as a cluster would hold
    /// them.
    pub async fn write_cluster(
        &mut self,
        cluster: &Cluster,
        cluster_text: &str,
        written: &mut Written,
        expected: &mut Expected,
    ) -> Result<()> {
        for node in cluster.nodes.values() {
            written.nodes.push(node.name.clone());
            self.kube
                .create_node(&node.name, &node.addresses, &string_labels(&node.labels))
                .await
                .with_context(|| format!("creating Node {}", node.name))?;
            expected.add("Node", 2);
        }
        for ns in cluster.namespaces.values() {
            let mut labels = string_labels(&ns.labels);
            labels.remove(NAME_LABEL);
            match self.kube.namespace(&ns.name).await? {
                Some(before) => {
                    if self.own.contains(&ns.name) {
                        written.namespaces.push(ns.name.clone());
                    } else {
                        let mut old = before.metadata.labels.clone().unwrap_or_default();
                        old.remove(NAME_LABEL);
                        written.borrowed.push((ns.name.clone(), old));
                    }
                    let after = self.kube.relabel_namespace(&ns.name, &labels).await?;
                    if after.metadata.resource_version != before.metadata.resource_version {
                        expected.add("Namespace", 1);
                    }
                }
                None => {
                    written.namespaces.push(ns.name.clone());
                    self.kube
                        .create_namespace(&ns.name, &labels)
                        .await
                        .with_context(|| format!("creating Namespace {}", ns.name))?;
                    self.own.insert(ns.name.clone());
                    expected.add("Namespace", 1);
                }
            }
        }
        for pod in cluster.pods.values() {
            written.pods.push((pod.namespace.clone(), pod.name.clone()));
            self.kube
                .create_pod(&lab_pod(pod))
                .await
                .with_context(|| format!("creating Pod {}/{}", pod.namespace, pod.name))?;
            expected.add("Pod", if pod.ips.is_empty() { 1 } else { 2 });
        }
        let services: Vec<String> = parse_objects("cluster.yaml", cluster_text)?
            .into_iter()
            .filter(|o| o.types.as_ref().is_some_and(|t| t.kind == "Service"))
            .map(|o| serde_yaml::to_string(&o))
            .collect::<Result<_, _>>()?;
        if !services.is_empty() {
            let text = services.join("---\n");
            written.yaml.push(text.clone());
            let applied = self
                .kube
                .apply_yaml(&text)
                .await
                .context("creating the Services of cluster.yaml")?;
            expected.add("Service", applied.len() as u64);
        }
        Ok(())
    }

    /// Waits until the controller has taken in every write (`expected` events by kind since
    /// `baseline`), then forces a publish with the fence and waits until every node in
    /// `nodes` is connected and has acknowledged it.
    pub async fn settle(
        &mut self,
        baseline: &BTreeMap<String, u64>,
        expected: &Expected,
        nodes: &[String],
    ) -> Result<()> {
        let deadline = Instant::now() + SETTLE;
        let mut want: BTreeMap<String, u64> = expected
            .0
            .iter()
            .map(|(k, n)| (k.clone(), baseline.get(k).copied().unwrap_or(0) + n))
            .collect();
        self.wait_events(&want, deadline).await?;
        let before = self.controller.generation()?;
        let seen_namespaces = watch_events(&self.metrics()?)
            .get("Namespace")
            .copied()
            .unwrap_or(0);
        self.fences += 1;
        let fence: BTreeMap<String, String> =
            [(FENCE_LABEL.to_string(), self.fences.to_string())].into();
        self.kube.relabel_namespace(FENCE_NS, &fence).await?;
        let namespaces = want.entry("Namespace".into()).or_default();
        *namespaces = (*namespaces).max(seen_namespaces) + 1;
        self.wait_events(&want, deadline).await?;
        // Two readings in a row: the generation and the lags are separate gauges, so one
        // scrape could fall between a publish and its lag update.
        let mut good = 0;
        loop {
            let text = self.metrics()?;
            let generation =
                crate::running::metric(&text, "palisade_controller_generation").unwrap_or(0.0);
            let connected =
                crate::running::metric(&text, "palisade_controller_nodes_connected").unwrap_or(0.0);
            let lags: BTreeMap<&str, f64> =
                labelled(&text, "palisade_controller_node_generation_lag").collect();
            let all_acked = nodes.iter().all(|n| lags.get(n.as_str()) == Some(&0.0));
            if generation > before && connected as usize == nodes.len() && all_acked {
                good += 1;
                if good == 2 {
                    return Ok(());
                }
            } else {
                good = 0;
            }
            if Instant::now() > deadline {
                bail!(
                    "the nodes did not acknowledge a generation after {before} in {}s \
                     (generation {generation}, {connected} nodes connected, lags {lags:?}); \
                     controller log:\n{}",
                    SETTLE.as_secs(),
                    self.controller.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_events(&self, want: &BTreeMap<String, u64>, deadline: Instant) -> Result<()> {
        loop {
            let seen = watch_events(&self.metrics()?);
            let short: Vec<String> = want
                .iter()
                .filter(|(k, n)| seen.get(*k).copied().unwrap_or(0) < **n)
                .map(|(k, n)| format!("{k}: {} of {n}", seen.get(k).copied().unwrap_or(0)))
                .collect();
            if short.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not see every write in {}s (watch events {}); \
                     controller log:\n{}",
                    SETTLE.as_secs(),
                    short.join(", "),
                    self.controller.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Deletes everything `written` names and waits until it is gone.
    pub async fn clean(&self, written: &Written) -> Result<()> {
        for text in &written.yaml {
            self.kube.delete_yaml(text).await?;
        }
        futures::future::try_join_all(
            written
                .pods
                .iter()
                .map(|(ns, name)| self.kube.delete_pod(ns, name)),
        )
        .await?;
        // The run's own namespaces stay, empty and without labels, for the next scenario
        // to relabel: deleting one takes the namespace controller some five seconds, which
        // would double the run, and a namespace without pods selects, and is, nothing
        // that a rule could name.
        for ns in &written.namespaces {
            self.kube.relabel_namespace(ns, &BTreeMap::new()).await?;
        }
        for (ns, labels) in &written.borrowed {
            self.kube.relabel_namespace(ns, labels).await?;
        }
        for node in &written.nodes {
            self.kube.delete_node(node).await?;
        }
        for text in &written.yaml {
            self.kube.wait_gone_yaml(text).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labelled_counters() {
        let text = "# HELP x\n\
            palisade_controller_watch_events_total{kind=\"Pod\"} 12\n\
            palisade_controller_watch_events_total{kind=\"NetworkPolicy\"} 3\n\
            palisade_controller_node_generation_lag{node=\"node-1\"} 0\n";
        assert_eq!(
            watch_events(text),
            [("NetworkPolicy".to_string(), 3), ("Pod".to_string(), 12)].into()
        );
        let lags: Vec<_> = labelled(text, "palisade_controller_node_generation_lag").collect();
        assert_eq!(lags, vec![("node-1", 0.0)]);
    }

    #[test]
    fn a_missing_tools_dir_says_how_to_get_the_tools() {
        let err = check_kube_bin(Path::new("/nonexistent/bin")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("kube-apiserver") && text.contains("scripts/tools.sh"),
            "{text}"
        );
    }
}
