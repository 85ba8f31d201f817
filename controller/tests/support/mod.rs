//! The whole system on one machine: a real kube-apiserver with etcd (palisade-kubelab), the
//! chart's ServiceAccounts and RBAC (rendered by `helm template`), palisade-controller
//! replicas using the controller's ServiceAccount token, a netlab cluster of namespaces, and
//! one palisade-agent per lab node authenticating with a token bound to its node's agent
//! pod. Dropping it stops everything, agents first.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_kubelab::{lab_pod, string_labels, KubeLab, Options};
use palisade_netlab::{Lab, LabOptions, Probe, ProbeResult};
use palisade_policy::{Cluster, PodKey, Protocol};

pub use palisade_kubelab::SYSTEM_NS;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The agent binary beside this test's controller binary, built if missing.
pub fn agent_binary() -> PathBuf {
    sibling_binary("palisade-agent", "palisade-agent")
}

/// palisadectl, beside this test's controller binary, built if missing.
pub fn palisadectl_binary() -> PathBuf {
    sibling_binary("palisadectl", "palisadectl")
}

/// Another package's binary beside this one, built (or found fresh) once per test process:
/// a binary left from an older tree would speak an older stream (a digest the controller
/// refuses, for one), so existing is not enough.
fn sibling_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_palisade-controller"));
    let sibling = bin.with_file_name(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == package) {
        // Benches run from target/release, tests from target/debug.
        let release = bin.parent().is_some_and(|d| d.ends_with("release"));
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", package])
            .args(release.then_some("--release"))
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {package}");
        built.push(package.to_string());
    }
    sibling
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips (or, under PALISADE_NO_SKIP=1, fails) when the e2e cannot run here.
pub fn can_run() -> bool {
    if !is_root() {
        return palisade_kubelab::skip("needs root for network namespaces and nftables");
    }
    if Command::new("nft").arg("--version").output().is_err() {
        return palisade_kubelab::skip("nft is not installed");
    }
    palisade_kubelab::control_plane_available()
}

pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Process { child, log }
    }

    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Replica {
    pub process: Process,
    pub url: String,
    pub metrics: SocketAddr,
}

pub struct Agent {
    pub node: String,
    pub process: Process,
    pub metrics: SocketAddr,
    pub netns: String,
    pub args: Vec<String>,
}

pub struct System {
    // Field order is drop order: agents, then controllers, then the lab, then the API.
    pub agents: Vec<Agent>,
    pub replicas: Vec<Replica>,
    pub lab: Lab,
    pub kube: KubeLab,
    pub cluster: Cluster,
    pub dir: PathBuf,
    pub controller_kubeconfig: PathBuf,
    pub ca: PathBuf,
    pub tls: (PathBuf, PathBuf),
}

impl Drop for System {
    fn drop(&mut self) {
        self.agents.clear();
        self.replicas.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Renders the chart and applies every object (all must be accepted); returns the text.
pub async fn install_chart(kube: &KubeLab) -> String {
    kube.install_chart(&workspace().join("charts/palisade"))
        .await
        .expect("every object of the chart is accepted by the apiserver")
}

impl System {
    /// The API objects of `cluster_yaml`, a lab of them, the chart, `replicas`
    /// controllers and an agent per node, all connected.
    pub async fn start(name: &str, cluster_yaml: &str, replicas: usize) -> System {
        let (cluster, _) = palisade_resources::parse_cluster_text("cluster.yaml", cluster_yaml)
            .expect("the test's cluster file");
        let kube = KubeLab::start(Options::default())
            .await
            .expect("the control plane starts");
        let dir = kube.dir().join(format!("e2e-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        install_chart(&kube).await;

        let lab = tokio::task::block_in_place(|| Lab::build(&cluster, LabOptions::default()))
            .expect("the lab builds");
        for node in cluster.nodes.values() {
            kube.create_node(&node.name, &node.addresses, &string_labels(&node.labels))
                .await
                .expect("node");
        }
        for ns in cluster.namespaces.values() {
            let mut l = string_labels(&ns.labels);
            l.remove("kubernetes.io/metadata.name");
            kube.create_namespace(&ns.name, &l)
                .await
                .expect("namespace");
            kube.wait_default_service_account(&ns.name)
                .await
                .expect("default ServiceAccount");
        }
        kube.wait_default_service_account(SYSTEM_NS).await.unwrap();
        for pod in cluster.pods.values() {
            kube.create_pod(&lab_pod(pod)).await.expect("pod");
        }

        // The controller's own ServiceAccount token, in a kubeconfig of its own.
        let controller_kubeconfig = dir.join("controller.kubeconfig");
        kube.write_controller_kubeconfig(&controller_kubeconfig)
            .await
            .expect("a kubeconfig for the controller");
        let tls = palisade_controller::devtls::generate(&dir, &["127.0.0.1", "localhost"])
            .expect("certificates");
        let mut system = System {
            agents: Vec::new(),
            replicas: Vec::new(),
            lab,
            kube,
            cluster,
            dir,
            controller_kubeconfig,
            ca: tls.ca.clone(),
            tls: (tls.cert, tls.key),
        };
        for i in 0..replicas {
            system.start_replica(i);
        }
        for r in 0..replicas {
            system.wait_ready(r).await;
        }
        let nodes: Vec<String> = system.cluster.nodes.keys().cloned().collect();
        for node in nodes {
            system.start_agent(&node).await;
        }
        for a in 0..system.agents.len() {
            system.wait_agent_ready(a).await;
        }
        system
    }

    pub fn start_replica(&mut self, i: usize) {
        let (grpc, metrics) = (free_port(), free_port());
        let process = Process::spawn(
            Command::new(env!("CARGO_BIN_EXE_palisade-controller"))
                .arg("--kubeconfig")
                .arg(&self.controller_kubeconfig)
                .arg("--tls-cert")
                .arg(&self.tls.0)
                .arg("--tls-key")
                .arg(&self.tls.1)
                .args(["--listen", &format!("127.0.0.1:{grpc}")])
                .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
                .args(["--min-interval-ms", "50"])
                .args(["--identity", &format!("replica-{i}")])
                .args(["--lease-namespace", SYSTEM_NS]),
            self.dir.join(format!("controller-{i}.log")),
        );
        let replica = Replica {
            process,
            url: format!("https://127.0.0.1:{grpc}"),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
        };
        if i < self.replicas.len() {
            self.replicas[i] = replica;
        } else {
            self.replicas.push(replica);
        }
    }

    pub async fn wait_ready(&mut self, r: usize) {
        let addr = self.replicas[r].metrics;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(addr, "/readyz").await {
                return;
            }
            if let Some(status) = self.replicas[r].process.child.try_wait().unwrap() {
                panic!(
                    "controller {r} exited ({status}):\n{}",
                    self.replicas[r].process.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "controller {r} not ready:\n{}",
                self.replicas[r].process.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node's agent pod (host network) and a token bound to it.
    pub async fn agent_token(&self, node: &str) -> PathBuf {
        let addr = self.cluster.nodes[node].addresses[0];
        let token = self
            .kube
            .agent_token(node, addr)
            .await
            .expect("the agent pod and a token bound to it");
        let path = self.dir.join(format!("{node}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    pub async fn start_agent(&mut self, node: &str) {
        let all: Vec<usize> = (0..self.replicas.len()).collect();
        self.start_agent_to(node, &all).await;
    }

    /// An agent that knows only these replicas.
    pub async fn start_agent_to(&mut self, node: &str, replicas: &[usize]) {
        let token = self.agent_token(node).await;
        let urls: Vec<String> = replicas
            .iter()
            .map(|r| self.replicas[*r].url.clone())
            .collect();
        let netns = self.lab.node_netns(node).unwrap().to_string();
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let args = vec![
            "--netns".to_string(),
            netns.clone(),
            "--controller".into(),
            urls.join(","),
            "--token-file".into(),
            token.display().to_string(),
            "--ca-file".into(),
            self.ca.display().to_string(),
            "--node".into(),
            node.to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
        ];
        let process = Process::spawn(
            Command::new(agent_binary()).args(&args),
            self.dir.join(format!("agent-{node}.log")),
        );
        let agent = Agent {
            node: node.to_string(),
            process,
            metrics,
            netns,
            args,
        };
        match self.agents.iter().position(|a| a.node == node) {
            Some(i) => self.agents[i] = agent,
            None => self.agents.push(agent),
        }
    }

    pub async fn wait_agent_ready(&mut self, a: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let addr = self.agents[a].metrics;
            if let Ok((200, _)) = http_get(addr, "/readyz").await {
                return;
            }
            if let Some(status) = self.agents[a].process.child.try_wait().unwrap() {
                panic!(
                    "agent of {} exited ({status}):\n{}",
                    self.agents[a].node,
                    self.agents[a].process.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent of {} not ready:\n{}\ncontroller 0:\n{}",
                self.agents[a].node,
                self.agents[a].process.tail(),
                self.replicas[0].process.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pod_ip(&self, ns: &str, name: &str) -> IpAddr {
        self.cluster.pods[&PodKey::new(ns, name)].ips[0]
    }

    pub fn serve(&self, ns: &str, name: &str, port: u16) {
        tokio::task::block_in_place(|| {
            self.lab
                .serve(&PodKey::new(ns, name), Protocol::Tcp, port)
                .expect("serve")
        });
    }

    /// One TCP probe with real packets.
    pub fn probe(&self, from: (&str, &str), to: IpAddr, port: u16) -> ProbeResult {
        let probe = Probe {
            from: PodKey::new(from.0, from.1),
            to_addr: to,
            protocol: Protocol::Tcp,
            port,
        };
        tokio::task::block_in_place(|| {
            self.lab
                .probe(&probe, Duration::from_millis(700))
                .expect("probe")
        })
    }

    /// Waits until the probe connects (`allowed`) or times out (not `allowed`); anything
    /// else is breakage and fails at once.
    pub async fn expect(
        &self,
        what: &str,
        from: (&str, &str),
        to: IpAddr,
        port: u16,
        allowed: bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last;
        loop {
            last = self.probe(from, to, port);
            match (&last, allowed) {
                (ProbeResult::Connected, true) | (ProbeResult::TimedOut, false) => return,
                (ProbeResult::Connected | ProbeResult::TimedOut, _) => {}
                (other, _) => panic!("{what}: the probe broke: {other}"),
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{what}: expected {}, got {last}\nagent logs:\n{}\ncontroller 0:\n{}",
            if allowed { "allowed" } else { "denied" },
            self.agents
                .iter()
                .map(|a| format!("-- {}\n{}", a.node, a.process.tail()))
                .collect::<Vec<_>>()
                .join("\n"),
            self.replicas
                .first()
                .map(|r| r.process.tail())
                .unwrap_or_default()
        );
    }

    /// `nft list table inet palisade` in a node, counters left out: the kernel state.
    pub fn table(&self, node: &str) -> String {
        let netns = self.lab.node_netns(node).unwrap();
        let out = Command::new("ip")
            .args([
                "netns", "exec", netns, "nft", "-s", "list", "table", "inet", "palisade",
            ])
            .output()
            .expect("nft list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
