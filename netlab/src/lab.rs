//! [`Lab`]: a cluster turned into network namespaces, with servers and probes in it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_policy::model::{Cluster, Family, PodKey, Protocol};
use tokio::runtime::Runtime;

use crate::error::{LabError, Result};
use crate::names;
use crate::netns;
use crate::plan::{Plan, PodPlan};
use crate::podconf::{self, PodJob};
use crate::probe::{self, Probe, ProbeResult, ResolvedProbe};
use crate::serve;
use crate::sockets::{self, SocketSpec};

/// How to build a lab.
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// The start of every namespace name of the lab; by default a fresh `pl<pid>x<n>`.
    /// A chosen prefix must not be in use by any existing namespace.
    pub prefix: Option<String>,
}

/// A cluster as network namespaces on this machine. Dropping it removes every namespace it
/// created (also while unwinding from a panic); [`Lab::teardown`] does the same and reports
/// errors.
pub struct Lab {
    prefix: String,
    plan: Plan,
    /// Namespaces this lab is responsible for removing.
    created: Vec<String>,
    fds: HashMap<String, Arc<OwnedFd>>,
    runtime: Option<Runtime>,
    served: Mutex<HashSet<(String, SocketAddr, Protocol)>>,
    tokens: AtomicU64,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("namespaces", &self.created)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Builds the lab of docs/design.md, "The lab topology". Needs root.
    pub fn build(cluster: &Cluster, options: LabOptions) -> Result<Lab> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(LabError::NotRoot(euid));
        }
        let prefix = match options.prefix {
            Some(prefix) => {
                names::check_prefix(&prefix)?;
                let dash = format!("{prefix}-");
                if let Some(existing) = netns::list()?.into_iter().find(|n| n.starts_with(&dash)) {
                    return Err(LabError::invalid(
                        "LabOptions",
                        "prefix",
                        format!("{prefix:?} is in use: network namespace {existing} exists"),
                    ));
                }
                prefix
            }
            None => names::fresh_prefix()?,
        };
        let plan = Plan::new(cluster, &prefix)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("netlab")
            .enable_all()
            .build()
            .map_err(|e| LabError::io("starting the lab's runtime", e))?;
        let namespaces = plan.namespaces();
        let mut lab = Lab {
            prefix,
            plan,
            // Recorded before creation: if anything below fails, Drop removes whatever of
            // these exists (the prefix was checked to be unused).
            created: namespaces.clone(),
            fds: HashMap::new(),
            runtime: Some(runtime),
            served: Mutex::new(HashSet::new()),
            tokens: AtomicU64::new(1),
        };
        netns::create_all(&namespaces)?;
        for name in &namespaces {
            lab.fds.insert(name.clone(), Arc::new(netns::open(name)?));
        }
        lab.write_sysctls(&lab.plan.early_sysctls())?;
        lab.run_batches(vec![(
            lab.plan.underlay.clone(),
            lab.plan.underlay_script(),
        )])?;
        let node_scripts = lab
            .plan
            .nodes
            .iter()
            .map(|(name, node)| (node.netns.clone(), lab.plan.node_script(name)))
            .collect();
        lab.run_batches(node_scripts)?;
        let mut pod_jobs = Vec::new();
        for pod in lab.plan.pods.values().filter(|p| !p.host_network) {
            pod_jobs.push(PodJob {
                netns: pod.netns.clone(),
                fd: lab.fd(&pod.netns)?.clone(),
                addresses: pod.addresses.clone(),
            });
        }
        podconf::configure_all(pod_jobs)?;
        lab.write_sysctls(&lab.plan.late_sysctls())?;
        tracing::debug!(prefix = %lab.prefix, namespaces = lab.created.len(), "lab built");
        Ok(lab)
    }

    fn fd(&self, netns: &str) -> Result<&Arc<OwnedFd>> {
        self.fds
            .get(netns)
            .ok_or_else(|| LabError::NotFound(format!("network namespace {netns} is not open")))
    }

    fn write_sysctls(&self, sysctls: &[(String, Vec<(String, String)>)]) -> Result<()> {
        for (ns, values) in sysctls {
            use std::os::fd::AsFd;
            netns::write_sysctls(ns, self.fd(ns)?.as_fd(), values)?;
        }
        Ok(())
    }

    /// Runs one `ip -batch` per namespace. Starting a process costs milliseconds on a busy
    /// machine, so a few threads start them side by side.
    fn run_batches(&self, batches: Vec<(String, String)>) -> Result<()> {
        const SPAWNERS: usize = 4;
        let chunk = batches.len().div_ceil(SPAWNERS).max(1);
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = batches
                .chunks(chunk)
                .map(|part| scope.spawn(move || run_batch_group(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LabError::io(
                            "ip batch",
                            std::io::Error::other("spawner panicked"),
                        ))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// The prefix of every namespace name of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every namespace the lab created, the underlay first.
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// The namespace holding the underlay bridge.
    pub fn underlay_netns(&self) -> &str {
        &self.plan.underlay
    }

    /// The node names, in order.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.plan.nodes.keys().map(String::as_str)
    }

    /// The pods, in order.
    pub fn pods(&self) -> impl Iterator<Item = &PodKey> {
        self.plan.pods.keys()
    }

    /// The namespace of a node.
    pub fn node_netns(&self, node: &str) -> Result<&str> {
        self.plan
            .nodes
            .get(node)
            .map(|n| n.netns.as_str())
            .ok_or_else(|| LabError::NotFound(format!("node {node} is not in the lab")))
    }

    /// A node's addresses (on its `ul0`).
    pub fn node_addresses(&self, node: &str) -> Result<&[IpAddr]> {
        self.plan
            .nodes
            .get(node)
            .map(|n| n.addresses.as_slice())
            .ok_or_else(|| LabError::NotFound(format!("node {node} is not in the lab")))
    }

    fn pod_plan(&self, pod: &PodKey) -> Result<&PodPlan> {
        self.plan
            .pods
            .get(pod)
            .ok_or_else(|| LabError::NotFound(format!("pod {pod} is not in the lab")))
    }

    /// The namespace a pod's processes run in: its own, or its node's for a host-network
    /// pod.
    pub fn pod_netns(&self, pod: &PodKey) -> Result<&str> {
        Ok(self.pod_plan(pod)?.netns.as_str())
    }

    /// The node a pod runs on.
    pub fn pod_node(&self, pod: &PodKey) -> Result<&str> {
        Ok(self.pod_plan(pod)?.node.as_str())
    }

    /// The node side of a pod's veth (in its node's namespace); `None` for a host-network
    /// pod.
    pub fn pod_interface(&self, pod: &PodKey) -> Result<Option<&str>> {
        Ok(self.pod_plan(pod)?.node_interface.as_deref())
    }

    /// The addresses a pod is reached at and sends from (a host-network pod's are node
    /// addresses).
    pub fn pod_addresses(&self, pod: &PodKey) -> Result<&[IpAddr]> {
        Ok(self.pod_plan(pod)?.addresses.as_slice())
    }

    /// A pod's address of one family, if it has one.
    pub fn pod_address(&self, pod: &PodKey, family: Family) -> Result<Option<IpAddr>> {
        Ok(self
            .pod_addresses(pod)?
            .iter()
            .copied()
            .find(|a| Family::of(a) == family))
    }

    fn runtime(&self) -> Result<&Runtime> {
        self.runtime
            .as_ref()
            .ok_or_else(|| LabError::NotFound("the lab has been torn down".into()))
    }

    /// Serves one port of a pod on every address of the pod (see [`Lab::serve_all`]).
    pub fn serve(&self, pod: &PodKey, protocol: Protocol, port: u16) -> Result<()> {
        self.serve_all(&[(pod.clone(), protocol, port)])
    }

    /// Echo servers for `(pod, protocol, port)` triples, on every address of each pod, in
    /// the pod's namespace (a host-network pod's on its node's addresses in the node's
    /// namespace). Serving something already served is a no-op, so two host-network pods of
    /// one node share a listener. SCTP is skipped where the kernel lacks it (probes then
    /// say `Unsupported`).
    pub fn serve_all(&self, items: &[(PodKey, Protocol, u16)]) -> Result<()> {
        let runtime = self.runtime()?;
        let mut served = self
            .served
            .lock()
            .map_err(|_| LabError::NotFound("the lab's server table is poisoned".into()))?;
        let mut by_netns: BTreeMap<&str, Vec<(SocketSpec, &PodKey)>> = BTreeMap::new();
        let mut planned = HashSet::new();
        for (key, protocol, port) in items {
            let pod = self.pod_plan(key)?;
            if *port == 0 {
                return Err(LabError::invalid(
                    format!("serve {key}"),
                    "port",
                    "must be 1..=65535",
                ));
            }
            if pod.addresses.is_empty() {
                return Err(LabError::invalid(
                    format!("pod {key}"),
                    "ips",
                    "the pod has no address to serve on",
                ));
            }
            for addr in &pod.addresses {
                let bind = SocketAddr::new(*addr, *port);
                let id = (pod.netns.clone(), bind, *protocol);
                if served.contains(&id) || !planned.insert(id) {
                    continue;
                }
                let spec = SocketSpec {
                    protocol: *protocol,
                    bind,
                    listen: true,
                    connect: None,
                };
                by_netns
                    .entry(pod.netns.as_str())
                    .or_default()
                    .push((spec, key));
            }
        }
        for (ns, entries) in by_netns {
            let specs: Vec<SocketSpec> = entries.iter().map(|(s, _)| *s).collect();
            let sockets = sockets::create_in(self.fd(ns)?, &specs)
                .map_err(|e| LabError::io(format!("entering network namespace {ns}"), e))?;
            for ((spec, key), socket) in entries.into_iter().zip(sockets) {
                let what = || format!("serving {} {} for pod {key}", spec.protocol, spec.bind);
                match socket {
                    Ok(socket) => {
                        serve::spawn(runtime, spec.protocol, socket)
                            .map_err(|e| LabError::io(what(), e))?;
                    }
                    Err(e) if spec.protocol == Protocol::Sctp && sockets::is_unsupported(&e) => {
                        tracing::debug!("{}: the kernel lacks SCTP", what());
                    }
                    Err(e) => return Err(LabError::io(what(), e)),
                }
                served.insert((ns.to_string(), spec.bind, spec.protocol));
            }
        }
        Ok(())
    }

    /// Runs one probe (see [`Lab::probe_all`]).
    pub fn probe(&self, probe: &Probe, timeout: Duration) -> Result<ProbeResult> {
        let mut results = self.probe_all(std::slice::from_ref(probe), timeout, 1)?;
        results
            .pop()
            .ok_or_else(|| LabError::NotFound("the probe gave no result".into()))
    }

    /// Runs probes, at most `parallelism` at a time, each within `timeout` (TCP/SCTP:
    /// connect and one echoed byte; UDP: an echoed datagram, sent twice within the time-out
    /// if need be). Results are in the order of `probes`. A probe from a pod that does not
    /// exist is an error; one from a pod without an address of the destination's family
    /// is `Unsupported`.
    pub fn probe_all(
        &self,
        probes: &[Probe],
        timeout: Duration,
        parallelism: usize,
    ) -> Result<Vec<ProbeResult>> {
        let runtime = self.runtime()?;
        let mut jobs: Vec<std::result::Result<ResolvedProbe, ProbeResult>> =
            Vec::with_capacity(probes.len());
        for p in probes {
            let pod = self.pod_plan(&p.from).map_err(|_| {
                LabError::NotFound(format!("probe {p}: pod {} is not in the lab", p.from))
            })?;
            if p.port == 0 {
                return Err(LabError::invalid(
                    format!("probe {p}"),
                    "port",
                    "must be 1..=65535",
                ));
            }
            let family = Family::of(&p.to_addr);
            let source = pod
                .addresses
                .iter()
                .copied()
                .find(|a| Family::of(a) == family);
            jobs.push(match source {
                Some(source) => Ok(ResolvedProbe {
                    netns: self.fd(&pod.netns)?.clone(),
                    source,
                    target: SocketAddr::new(p.to_addr, p.port),
                    protocol: p.protocol,
                    token: self.tokens.fetch_add(1, Ordering::Relaxed),
                }),
                None => Err(ProbeResult::Unsupported(format!(
                    "pod {} has no {family:?} address",
                    p.from
                ))),
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let permits = Arc::new(tokio::sync::Semaphore::new(parallelism.max(1)));
        runtime.spawn(async move {
            let mut handles = Vec::with_capacity(jobs.len());
            for job in jobs {
                let permits = permits.clone();
                handles.push(tokio::spawn(async move {
                    match job {
                        Ok(resolved) => {
                            let _permit = permits.acquire_owned().await;
                            probe::run(resolved, timeout).await
                        }
                        Err(result) => result,
                    }
                }));
            }
            let mut results = Vec::with_capacity(handles.len());
            for handle in handles {
                results.push(
                    handle
                        .await
                        .unwrap_or_else(|e| ProbeResult::Error(format!("probe task failed: {e}"))),
                );
            }
            let _ = tx.send(results);
        });
        // A plain channel, not block_on: callers may themselves run inside a runtime.
        rx.recv()
            .map_err(|_| LabError::NotFound("the lab's runtime stopped during the probes".into()))
    }

    /// Stops the servers and removes every namespace of the lab. Also done by `Drop`.
    pub fn teardown(&mut self) -> Result<()> {
        if let Some(runtime) = self.runtime.take() {
            // Not `drop`: that blocks, and panics when called from async code.
            runtime.shutdown_background();
        }
        self.fds.clear();
        let mut first_error = None;
        for name in std::mem::take(&mut self.created) {
            if let Err(e) = netns::delete(&name) {
                first_error.get_or_insert(LabError::io(
                    format!("removing network namespace {name}"),
                    e,
                ));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn run_batch_group(batches: &[(String, String)]) -> Result<()> {
    let mut children = Vec::with_capacity(batches.len());
    for (ns, script) in batches {
        let child = netns::command_in(ns, "ip")?
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io("running ip (is iproute2 installed?)", e))?;
        children.push((ns, script, child));
    }
    let mut first_error = None;
    for (ns, script, child) in children {
        if let Err(e) = netns::finish(child, ns, "ip -batch", script) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("lab {}: {e}", self.prefix);
        }
    }
}
