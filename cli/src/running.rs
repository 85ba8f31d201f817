//! A lab cluster with one `palisade-agent` process per node, each programming its node's
//! network namespace from a rules file — the same process boundary as in production.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use palisade_netlab::{Lab, LabOptions};
use palisade_policy::{Cluster, NodeRuleSet};

use crate::controller::ControllerProcess;

/// Where a Palisade binary is: `explicit`, else beside this executable, else on `PATH`.
pub fn binary(name: &str, explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)));
    match beside {
        Some(p) if p.exists() => p,
        _ => PathBuf::from(name),
    }
}

/// Where the agent binary is: `--agent`, else beside this executable, else on `PATH`.
pub fn agent_binary(explicit: Option<&Path>) -> PathBuf {
    binary("palisade-agent", explicit)
}

/// Checks what a lab needs before anything is created, with a message a person can act on.
pub fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: it creates network namespaces and programs nftables in them (try sudo)");
    }
    let nft = Command::new("nft").arg("--version").output();
    if !nft.is_ok_and(|o| o.status.success()) {
        bail!("nft (nftables) is not installed: apt-get install nftables");
    }
    let ip = Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        bail!("ip (iproute2) is not installed: apt-get install iproute2");
    }
    Ok(())
}

struct Agent {
    node: String,
    /// The rule set last handed to it.
    set: NodeRuleSet,
    child: Child,
    metrics: SocketAddr,
    /// `None` when the agent streams its rules from the controller.
    rules_file: Option<PathBuf>,
    log_file: PathBuf,
}

/// Lab and agents; dropping it stops the agents and removes the namespaces and files.
pub struct RunningCluster {
    agents: Vec<Agent>,
    dir: PathBuf,
    /// Stopped after the agents, before the lab goes.
    pub controller: Option<ControllerProcess>,
    // Dropped last (fields drop in order): agents must be gone before their namespaces.
    pub lab: Lab,
}

pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Writes through a rename, so that no reader ever sees half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_rules(path: &Path, set: &NodeRuleSet) -> Result<()> {
    write_atomic(path, &serde_json::to_vec(set)?)
}

/// A plain HTTP/1.0 GET on loopback: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status from {addr}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled metric in Prometheus text format.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl RunningCluster {
    /// Builds the lab, writes each node's rule set and starts its agent; returns once every
    /// agent has applied its rules.
    pub fn start(
        cluster: &Cluster,
        rule_sets: &BTreeMap<String, NodeRuleSet>,
        agent_bin: &Path,
    ) -> Result<Self> {
        let lab = Lab::build(cluster, LabOptions::default()).context("building the lab")?;
        let dir = std::env::temp_dir().join(format!("palisade-{}", lab.prefix()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut running = RunningCluster {
            agents: Vec::new(),
            dir,
            controller: None,
            lab,
        };
        let nodes: Vec<String> = running.lab.nodes().map(str::to_string).collect();
        for node in nodes {
            let set = rule_sets
                .get(&node)
                .cloned()
                .unwrap_or_else(|| NodeRuleSet {
                    node: node.clone(),
                    ..Default::default()
                });
            let rules_file = running.dir.join(format!("{node}.json"));
            write_rules(&rules_file, &set)?;
            let mut args = vec!["--rules".to_string(), rules_file.display().to_string()];
            args.extend(["--poll-interval-ms".to_string(), "200".to_string()]);
            running.start_agent(&node, &set, args, Some(rules_file), agent_bin)?;
        }
        running.wait(|_, text| {
            metric(text, "palisade_ruleset_generation").is_some_and(|g| g >= 1.0)
        })?;
        Ok(running)
    }

    /// Builds the lab, starts a controller fed from `cluster_text` and `policies_text`, and
    /// one agent per node streaming from it; returns once every agent enforces its rules.
    pub fn start_with_controller(
        cluster: &Cluster,
        cluster_text: &str,
        policies_text: &str,
        agent_bin: &Path,
        controller_bin: &Path,
    ) -> Result<Self> {
        let lab = Lab::build(cluster, LabOptions::default()).context("building the lab")?;
        let dir = std::env::temp_dir().join(format!("palisade-{}", lab.prefix()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let nodes: Vec<String> = lab.nodes().map(str::to_string).collect();
        let mut running = RunningCluster {
            agents: Vec::new(),
            dir,
            controller: None,
            lab,
        };
        let controller = ControllerProcess::start(
            &running.dir,
            controller_bin,
            &nodes,
            cluster_text,
            policies_text,
        )?;
        let before = controller.generation()?;
        for node in &nodes {
            let args = controller.agent_args(node)?;
            let empty = NodeRuleSet {
                node: node.clone(),
                ..Default::default()
            };
            running.start_agent(node, &empty, args, None, agent_bin)?;
        }
        running.controller = Some(controller);
        running.wait(|_, text| {
            metric(text, "palisade_ruleset_generation").is_some_and(|g| g >= 1.0)
        })?;
        let n = nodes.len();
        if let Some(c) = &mut running.controller {
            c.wait_enforced(before - 1.0, n, Duration::from_secs(30))?;
        }
        Ok(running)
    }

    /// Builds the lab and starts each node's agent with `sources[node]` as the arguments
    /// that say where its rules come from (a controller stream); returns once every agent
    /// has applied its first rules.
    pub fn start_streaming(
        cluster: &Cluster,
        sources: &BTreeMap<String, Vec<String>>,
        agent_bin: &Path,
    ) -> Result<Self> {
        let lab = Lab::build(cluster, LabOptions::default()).context("building the lab")?;
        let dir = std::env::temp_dir().join(format!("palisade-{}", lab.prefix()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut running = RunningCluster {
            agents: Vec::new(),
            dir,
            controller: None,
            lab,
        };
        let nodes: Vec<String> = running.lab.nodes().map(str::to_string).collect();
        for node in &nodes {
            let args = sources
                .get(node)
                .with_context(|| format!("no rule source for node {node}"))?
                .clone();
            let empty = NodeRuleSet {
                node: node.clone(),
                ..Default::default()
            };
            running.start_agent(node, &empty, args, None, agent_bin)?;
        }
        running.wait(|_, text| {
            metric(text, "palisade_ruleset_generation").is_some_and(|g| g >= 1.0)
        })?;
        Ok(running)
    }

    /// With a controller: writes a new policies file and waits until every agent has
    /// acknowledged the generation that carries it.
    pub fn update_policies(&mut self, text: &str) -> Result<()> {
        let n = self.agents.len();
        let c = self
            .controller
            .as_mut()
            .context("this lab has no controller")?;
        let before = c.generation()?;
        c.write_policies(text)?;
        c.wait_enforced(before, n, Duration::from_secs(30))
    }

    fn start_agent(
        &mut self,
        node: &str,
        set: &NodeRuleSet,
        source_args: Vec<String>,
        rules_file: Option<PathBuf>,
        bin: &Path,
    ) -> Result<()> {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log_file = self.dir.join(format!("{node}.log"));
        let log = fs::File::create(&log_file)?;
        let netns = self.lab.node_netns(node)?.to_string();
        let child = Command::new(bin)
            .args(["--netns", &netns])
            .args(&source_args)
            .args(["--metrics-addr", &metrics.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with cargo build -p palisade-agent, or pass --agent)",
                    bin.display()
                )
            })?;
        self.agents.push(Agent {
            node: node.to_string(),
            set: set.clone(),
            child,
            metrics,
            rules_file,
            log_file,
        });
        Ok(())
    }

    /// Waits until `done(agent, /metrics text)` holds for every agent.
    fn wait(&mut self, done: impl Fn(&str, &str) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.agents.len() {
            loop {
                let agent = &mut self.agents[i];
                if let Some(status) = agent.child.try_wait()? {
                    bail!(
                        "the agent of {} exited ({status}):\n{}",
                        agent.node,
                        tail(&agent.log_file)
                    );
                }
                if let Ok((200, text)) = http_get(agent.metrics, "/metrics") {
                    if done(&agent.node, &text) {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "the agent of {} did not apply its rules in time:\n{}",
                        agent.node,
                        tail(&agent.log_file)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Hands every agent its new rule set and waits until each has applied it. An agent
    /// whose rule set is unchanged has nothing to apply (its generation stays), so it is
    /// neither handed the file again nor waited for.
    pub fn update(&mut self, rule_sets: &BTreeMap<String, NodeRuleSet>) -> Result<()> {
        let mut before = BTreeMap::new();
        for a in &mut self.agents {
            let set = rule_sets
                .get(&a.node)
                .cloned()
                .unwrap_or_else(|| NodeRuleSet {
                    node: a.node.clone(),
                    ..Default::default()
                });
            if set == a.set {
                continue;
            }
            let (_, text) = http_get(a.metrics, "/metrics")?;
            let generation = metric(&text, "palisade_ruleset_generation").unwrap_or(0.0);
            before.insert(a.node.clone(), generation);
            let file = a
                .rules_file
                .as_ref()
                .context("these agents stream from a controller: use update_policies")?;
            write_rules(file, &set)?;
            a.set = set;
        }
        self.wait(|node, text| {
            before.get(node).is_none_or(|&g| {
                metric(text, "palisade_ruleset_generation").is_some_and(|now| now > g)
            })
        })
    }

    /// Each node's metrics address.
    pub fn metrics_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.agents
            .iter()
            .map(|a| (a.node.clone(), a.metrics))
            .collect()
    }
}

pub(crate) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            // SIGTERM first so the agent can leave cleanly; then make sure.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
        }
        for a in &mut self.agents {
            let deadline = Instant::now() + Duration::from_secs(2);
            while a.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        self.controller = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}
