//! `palisadectl demo --api`: the demo with its cluster and policies in a real kube-apiserver
//! (from target/tools), the controller watching it and the agents streaming from it; an edit
//! of the policies file while it runs is applied to the apiserver and changes the matrix.
//! Root and the kube tools only.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn can_run() -> bool {
    use palisade_testkit::{IP, NFT, ROOT};
    palisade_testkit::can_run(&[ROOT, IP, NFT]) && palisade_kubelab::control_plane_available()
}

/// A binary of the workspace beside palisadectl, built now (a no-op when fresh).
fn sibling(package: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_palisadectl"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building {package}");
    bin.with_file_name(package)
}

/// The demo's pods (cli/demo/cluster.yaml), one matrix row each.
const PODS: usize = 5;

fn row(matrix: &str, src: &str) -> Vec<String> {
    let line = matrix
        .lines()
        .find(|l| l.starts_with(src))
        .unwrap_or_else(|| panic!("no row {src}: {matrix}"));
    line.split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// Kills the demo if the test fails half-way (it removes its lab on SIGINT).
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_api_enforces_what_the_apiserver_holds_and_follows_edits() {
    if !can_run() {
        return;
    }
    let (agent, controller) = (sibling("palisade-agent"), sibling("palisade-controller"));
    let kube_bin = palisade_kubelab::default_bin_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .arg("demo")
        .arg("--api")
        .arg("--kube-bin")
        .arg(&kube_bin)
        .arg("--agent")
        .arg(&agent)
        .arg("--controller")
        .arg(&controller)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run palisadectl demo --api");
    let stdout = child.stdout.take().unwrap();
    let mut demo = Demo(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut text = String::new();
    let read_until = |marker: &str, text: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                    if line.contains(marker) {
                        return line;
                    }
                }
                Err(_) => panic!("no {marker:?} from the demo:\n{text}"),
            }
        }
    };
    let edit_line = read_until("to change the policies", &mut text);
    let (open, enforced) = text
        .split_once("Connectivity with the policies:")
        .expect("two matrices");
    assert!(text.contains("API server https://127.0.0.1:"), "{text}");
    // Columns: coredns:53, prometheus:9090, api:9000, db:5432, web:8080.
    assert!(row(open, "shop/web").iter().all(|c| c == "allow"), "{open}");
    assert_eq!(
        row(enforced, "shop/web"),
        ["allow", "deny", "allow", "deny", "allow"],
        "{enforced}"
    );
    assert_eq!(
        row(enforced, "shop/api"),
        ["allow", "deny", "allow", "allow", "deny"],
        "{enforced}"
    );

    // Keep only the DNS rule and shop's default deny: the shop's allow rules go, so the
    // controller must see their deletion through the apiserver.
    let file = edit_line
        .split_whitespace()
        .find(|w| w.ends_with("policies.yaml"))
        .expect("the policies file is named");
    let policies = std::fs::read_to_string(file).unwrap();
    let kept: Vec<&str> = policies
        .split("\n---\n")
        .filter(|doc| doc.contains("name: dns-always") || doc.contains("name: default-deny"))
        .collect();
    assert_eq!(kept.len(), 2, "{policies}");
    std::fs::write(file, kept.join("\n---\n")).unwrap();
    read_until("Connectivity with the edited policies:", &mut text);
    // The header and one row per pod.
    let mut edited = String::new();
    for _ in 0..=PODS {
        edited.push_str(&read_until("", &mut text));
        edited.push('\n');
    }
    // The shop's allow rules are gone: web keeps DNS (the Admin tier) but loses api, and
    // api loses db.
    let web = row(&edited, "shop/web");
    let api = row(&edited, "shop/api");
    assert_eq!(
        [&web[0], &web[2], &web[3], &api[3]],
        ["allow", "deny", "deny", "deny"],
        "{edited}"
    );
    assert!(
        !text.contains("(!)"),
        "the dataplane agrees with the compiled rule sets: {text}"
    );
    drop(demo.0.stdout.take());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(demo.0.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = demo.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}\n{text}");
    assert!(
        !std::path::Path::new(file).exists(),
        "the demo removes its files"
    );
}
