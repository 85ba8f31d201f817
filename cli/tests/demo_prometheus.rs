//! `palisadectl demo --prometheus` with a real Prometheus (Debian's `prometheus`): the
//! query the demo prints is answered with data from the demo's agents, and the
//! controller's metrics are scraped too; the denied flows are shown, also by `palisadectl
//! flows`; Ctrl-C removes everything. Root, nft, ip and prometheus needed (about 30 s).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const QUERY_PREFIX: &str = "Try in Prometheus: ";

/// The agent and controller beside palisadectl, built now together with palisadectl, so
/// that the features are those of this test's build and nothing is rebuilt (built alone,
/// their dependencies' features differ and each build undoes the other's).
fn binaries() -> (PathBuf, PathBuf) {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "palisadectl",
            "-p",
            "palisade-agent",
            "-p",
            "palisade-controller",
        ])
        .status()
        .expect("cargo build");
    assert!(
        status.success(),
        "building palisade-agent and palisade-controller"
    );
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_palisadectl"));
    (
        bin.with_file_name("palisade-agent"),
        bin.with_file_name("palisade-controller"),
    )
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

/// The result vector of an instant query.
fn query(addr: SocketAddr, expr: &str) -> Vec<serde_json::Value> {
    let mut s = TcpStream::connect(addr).expect("Prometheus answers");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let path = format!("/api/v1/query?query={}", percent_encode(expr));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["status"], "success", "{expr}: {text}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn demo_with_prometheus_answers_its_query_with_data_and_shows_denied_flows() {
    use palisade_testkit::{Need, IP, NFT, ROOT};
    if !palisade_testkit::can_run(&[ROOT, IP, NFT, Need::Program("prometheus", "--version")]) {
        return;
    }
    let (agent, controller) = binaries();
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .arg("demo")
        .arg("--prometheus")
        .arg("--agent")
        .arg(&agent)
        .arg("--controller")
        .arg(&controller)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run palisadectl demo");
    // Stops the demo however the test ends (its Ctrl-C handler removes the lab).
    struct Interrupt(u32);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-INT", &self.0.to_string()])
                .status();
        }
    }
    let guard = Interrupt(child.id());
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let (mut url, mut suggested) = (None, None);
    while suggested.is_none() {
        let line = lines
            .recv_timeout(Duration::from_secs(180))
            .unwrap_or_else(|_| panic!("no Prometheus query printed:\n{}", seen.join("\n")));
        if let Some(rest) = line.strip_prefix("Prometheus: http://") {
            url = rest.split('/').next().map(str::to_string);
        }
        if let Some(q) = line.strip_prefix(QUERY_PREFIX) {
            suggested = Some(q.to_string());
        }
        seen.push(line);
    }
    let addr: SocketAddr = url
        .expect("the Prometheus URL is printed")
        .parse()
        .expect("a loopback address");
    assert!(addr.ip().is_loopback(), "{addr}");

    // The denied flows of the policies' matrix, as the agents logged them, and the
    // command that shows them again.
    let flows_at = seen
        .iter()
        .find_map(|l| l.split_once("palisadectl flows ").map(|(_, urls)| urls))
        .unwrap_or_else(|| panic!("no flows section:\n{}", seen.join("\n")))
        .trim_end_matches("):")
        .to_string();
    assert!(
        seen.iter().any(|l| l.contains("default deny of shop/")),
        "a denied flow named by its default deny:\n{}",
        seen.join("\n")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .arg("flows")
        .args(flows_at.split(' '))
        .output()
        .expect("run palisadectl flows");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.starts_with("TIME "), "{table}");
    assert!(table.contains("default deny of shop/"), "{table}");

    let hits = query(addr, &suggested.unwrap());
    assert!(!hits.is_empty(), "the suggested query has no data");
    let nodes: std::collections::BTreeSet<&str> = hits
        .iter()
        .filter_map(|s| s["metric"]["node"].as_str())
        .collect();
    assert!(
        !nodes.is_empty(),
        "rule hits carry the node label: {hits:?}"
    );
    let connected = query(
        addr,
        r#"palisade_controller_nodes_connected{job="palisade-controller"}"#,
    );
    assert_eq!(
        connected.first().and_then(|s| s["value"][1].as_str()),
        Some("2"),
        "the controller is scraped and sees both agents: {connected:?}"
    );

    drop(guard);
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the demo ends after Ctrl-C")
        .expect("wait");
    assert!(status.success(), "{status}");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "Prometheus stopped with the demo"
    );
}
