//! A `palisade-controller` process fed from files (the demo's), for a lab whose agents
//! take their rules over the controller's stream: the same architecture as on a cluster,
//! with a file source instead of the API server and per-node static tokens instead of
//! ServiceAccount tokens.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::running::{free_port, http_get, metric, tail, write_atomic};

/// Where the controller binary is: `--controller`, else beside this executable, else on
/// `PATH`.
pub fn controller_binary(explicit: Option<&Path>) -> PathBuf {
    crate::running::binary("palisade-controller", explicit)
}

pub struct ControllerProcess {
    child: Child,
    pub url: String,
    pub metrics: SocketAddr,
    pub ca: PathBuf,
    pub policies_file: PathBuf,
    tokens: BTreeMap<String, PathBuf>,
    log_file: PathBuf,
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl ControllerProcess {
    /// Writes the files into `dir` and starts the controller on loopback.
    pub fn start(
        dir: &Path,
        bin: &Path,
        nodes: &[String],
        cluster_text: &str,
        policies_text: &str,
    ) -> Result<Self> {
        let tls = palisade_controller::devtls::generate(dir, &["127.0.0.1", "localhost"])?;
        let cluster_file = dir.join("cluster.yaml");
        let policies_file = dir.join("policies.yaml");
        write_atomic(&cluster_file, cluster_text.as_bytes())?;
        write_atomic(&policies_file, policies_text.as_bytes())?;
        let mut tokens = BTreeMap::new();
        let mut map = String::new();
        for node in nodes {
            let token = random_token()?;
            let path = dir.join(format!("{node}.token"));
            write_atomic(&path, token.as_bytes())?;
            map.push_str(&format!("{node}: {token}\n"));
            tokens.insert(node.clone(), path);
        }
        let tokens_file = dir.join("node-tokens.yaml");
        write_atomic(&tokens_file, map.as_bytes())?;
        let source = vec![
            "--cluster".into(),
            cluster_file.into_os_string(),
            "--policies".into(),
            policies_file.clone().into_os_string(),
            "--node-tokens".into(),
            tokens_file.into_os_string(),
            "--tls-cert".into(),
            tls.cert.into_os_string(),
            "--tls-key".into(),
            tls.key.into_os_string(),
        ];
        let mut c = Self::spawn(dir, bin, source, tls.ca)?;
        c.policies_file = policies_file;
        c.tokens = tokens;
        Ok(c)
    }

    /// Starts the controller on loopback with `source` (its source and TLS arguments) and
    /// returns once it has published its first compile.
    pub fn spawn(
        dir: &Path,
        bin: &Path,
        source: Vec<std::ffi::OsString>,
        ca: PathBuf,
    ) -> Result<Self> {
        let (grpc, metrics) = (free_port()?, free_port()?);
        let log_file = dir.join("controller.log");
        let log = fs::File::create(&log_file)?;
        let child = Command::new(bin)
            .args(&source)
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--min-interval-ms", "50"])
            .env("PALISADE_CONTROLLER_POLL_INTERVAL_MS", "100")
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
                    "starting {} (build it with cargo build -p palisade-controller)",
                    bin.display()
                )
            })?;
        let mut c = ControllerProcess {
            child,
            url: format!("https://127.0.0.1:{grpc}"),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
            ca,
            policies_file: PathBuf::new(),
            tokens: BTreeMap::new(),
            log_file,
        };
        c.wait(
            |text| metric(text, "palisade_controller_generation").is_some_and(|g| g >= 1.0),
            Duration::from_secs(60),
        )?;
        Ok(c)
    }

    /// Lets node `node`'s agent authenticate with the token in `path`.
    pub fn set_token(&mut self, node: &str, path: PathBuf) {
        self.tokens.insert(node.to_string(), path);
    }

    /// The last lines of the controller's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log_file)
    }

    /// The agent arguments that connect node `node` to this controller.
    pub fn agent_args(&self, node: &str) -> Result<Vec<String>> {
        let token = self
            .tokens
            .get(node)
            .with_context(|| format!("no token for node {node}"))?;
        Ok(vec![
            "--controller".into(),
            self.url.clone(),
            "--token-file".into(),
            token.display().to_string(),
            "--ca-file".into(),
            self.ca.display().to_string(),
            "--node".into(),
            node.to_string(),
        ])
    }

    pub fn metrics_text(&self) -> Result<String> {
        Ok(http_get(self.metrics, "/metrics")?.1)
    }

    /// The compile generation now.
    pub fn generation(&self) -> Result<f64> {
        Ok(metric(&self.metrics_text()?, "palisade_controller_generation").unwrap_or(0.0))
    }

    /// Waits until `done(/metrics text)` holds; fails early if the controller exits.
    pub(crate) fn wait(&mut self, done: impl Fn(&str) -> bool, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the controller exited ({status}):\n{}",
                    tail(&self.log_file)
                );
            }
            if let Ok((200, text)) = http_get(self.metrics, "/metrics") {
                if done(&text) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not get there in time:\n{}",
                    tail(&self.log_file)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the controller has published a generation after `after` and all
    /// `nodes` agents are connected and have acknowledged everything published to them.
    pub fn wait_enforced(&mut self, after: f64, nodes: usize, within: Duration) -> Result<()> {
        self.wait(
            |text| {
                let generation = metric(text, "palisade_controller_generation").unwrap_or(0.0);
                let connected = metric(text, "palisade_controller_nodes_connected").unwrap_or(0.0);
                let lagging = text
                    .lines()
                    .filter(|l| l.starts_with("palisade_controller_node_generation_lag{"))
                    .filter(|l| !l.ends_with(" 0"))
                    .count();
                let lags = text
                    .lines()
                    .filter(|l| l.starts_with("palisade_controller_node_generation_lag{"))
                    .count();
                generation > after && connected as usize == nodes && lags == nodes && lagging == 0
            },
            within,
        )
    }

    /// Replaces the policies file (atomically, so the controller never reads half of it).
    pub fn write_policies(&self, text: &str) -> Result<()> {
        write_atomic(&self.policies_file, text.as_bytes())
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
