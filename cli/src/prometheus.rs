//! `palisadectl demo --prometheus`: a real Prometheus (Debian's `prometheus` package) on
//! loopback, scraping the demo's agents and its controller every second, so the dashboard's
//! queries can be tried on live data. Its files live in a temp dir removed with it.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::running::{free_port, http_get, RunningCluster};

/// The query the demo suggests: rule hits by node, policy and rule.
pub const QUERY: &str =
    "sum by (node, kind, namespace, name, rule) (palisade_rule_packets_total) > 0";

/// A running Prometheus; dropping it stops it and removes its files.
pub struct DemoPrometheus {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Drop for DemoPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `prometheus` on PATH, if installed.
fn find_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

/// A scrape configuration: one job per component, with the `node` label the dashboard and
/// the alerts group by (as the chart's PodMonitor gives it).
fn config(agents: &[(String, SocketAddr)], controller: Option<SocketAddr>) -> String {
    let mut text = String::from(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n  - job_name: palisade-agent\n    static_configs:\n",
    );
    for (node, addr) in agents {
        text.push_str(&format!(
            "      - targets: ['{addr}']\n        labels: {{node: {node}}}\n"
        ));
    }
    if let Some(addr) = controller {
        text.push_str(&format!(
            "  - job_name: palisade-controller\n    static_configs:\n      - targets: ['{addr}']\n"
        ));
    }
    text
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How many series `expr` returns now (an error if Prometheus does not answer it).
pub fn series(addr: SocketAddr, expr: &str) -> Result<usize> {
    let (status, body) = http_get(
        addr,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("HTTP {status}: {body}"))?;
    if v["status"] != "success" {
        bail!("HTTP {status}: {body}");
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

impl DemoPrometheus {
    /// Starts Prometheus for `running` and waits until every target is scraped and
    /// [`QUERY`] has data; `None` (with a message) when it is not installed.
    pub fn start(running: &RunningCluster) -> Result<Option<Self>> {
        let Some(bin) = find_binary() else {
            println!(
                "\n--prometheus: no `prometheus` program on PATH (Debian and Ubuntu: \
                 apt-get install prometheus); going on without it."
            );
            return Ok(None);
        };
        let agents = running.metrics_addresses();
        let controller = running.controller.as_ref().map(|c| c.metrics);
        let dir =
            std::env::temp_dir().join(format!("palisade-{}-prometheus", running.lab.prefix()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("prometheus.yml");
        fs::write(&file, config(&agents, controller))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let child = spawn(&bin, &dir, &file, addr)?;
        let prometheus = DemoPrometheus { child, dir, addr };
        let targets = agents.len() + usize::from(controller.is_some());
        prometheus.wait(targets, Duration::from_secs(60))?;
        Ok(Some(prometheus))
    }

    fn wait(&self, targets: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        // The first sample comes some 5 s after start.
        while Instant::now() < deadline {
            let up = series(self.addr, "up == 1").unwrap_or(0);
            if up >= targets && series(self.addr, QUERY).unwrap_or(0) > 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let log = fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        bail!(
            "Prometheus on {} did not scrape all {targets} targets within {within:?}:\n{}",
            self.addr,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// What the demo prints about it.
    pub fn describe(&self) -> String {
        format!(
            "Prometheus: http://{addr}/ (scraping the agents and the controller every second)\n\
             Try in Prometheus: {QUERY}\n  \
             http://{addr}/graph?g0.expr={}&g0.tab=1",
            percent_encode(QUERY),
            addr = self.addr,
        )
    }
}

fn spawn(bin: &Path, dir: &Path, config: &Path, addr: SocketAddr) -> Result<Child> {
    let log = fs::File::create(dir.join("prometheus.log"))?;
    Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_labels_every_agent_with_its_node() {
        let text = config(
            &[
                ("node-1".into(), "127.0.0.1:1".parse().unwrap()),
                ("node-2".into(), "127.0.0.1:2".parse().unwrap()),
            ],
            Some("127.0.0.1:3".parse().unwrap()),
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let jobs = v["scrape_configs"].as_sequence().unwrap();
        assert_eq!(jobs[0]["job_name"], "palisade-agent");
        assert_eq!(jobs[0]["static_configs"][1]["labels"]["node"], "node-2");
        assert_eq!(jobs[0]["static_configs"][1]["targets"][0], "127.0.0.1:2");
        assert_eq!(jobs[1]["static_configs"][0]["targets"][0], "127.0.0.1:3");
    }
}
