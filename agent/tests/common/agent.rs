//! The `palisade-agent` binary as a child process of a test, and plain HTTP to its metrics
//! port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::time::{Duration, Instant};

/// Kills and reaps the agent when dropped, also when the test fails.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `METHOD path` on 127.0.0.1:`port`: (status, whole response).
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path)
}

/// Waits up to `secs` for `f` to hold.
pub fn eventually_within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(10, what, f)
}

/// Whether a root test can run ([`super::can_run`]); with `PALISADE_NO_SKIP=1` a skip is a
/// failure.
pub fn runnable(_test: &str) -> bool {
    super::can_run(&[super::ROOT, super::IP, super::NFT])
}

/// Starts `palisade-agent --netns NODE --rules FILE --metrics-addr 127.0.0.1:PORT` with
/// `extra` arguments, polling its inputs every 100 ms.
pub fn spawn_agent(node: &str, rules: &std::path::Path, port: u16, extra: &[&str]) -> Agent {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .args(["--netns", node, "--rules", rules.to_str().unwrap()])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--poll-interval-ms", "100"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Agent(child)
}

/// Writes `rules` (JSON) to `path` by rename, as the agent expects a finished file.
pub fn write_rules(path: &std::path::Path, rules: &palisade_policy::ruleset::NodeRuleSet) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string(rules).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A directory of its own under the temporary directory, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("palisade-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of `series` on the agent's `/metrics`.
pub fn agent_metric(port: u16, series: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics")?;
    super::metric_value(&text, series)
}

/// The agent's `/flows` on `port`: one JSON value per line (none if it does not answer).
pub fn flow_lines(port: u16) -> Vec<serde_json::Value> {
    let Some((200, text)) = http_get(port, "/flows") else {
        return Vec::new();
    };
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    body.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
