//! Issue 12.6: hostile YAML must not stall the agent. Deep nesting and oversized inputs are
//! refused before parsing, with errors naming the limit; and an input that parses slowly
//! is parsed off the loop that applies rules and answers signals (real agent binary,
//! SIGTERM while it parses).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::*;
use common::*;
use palisade_agent::source::{read_input, Limits, SourceError};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("palisade-hostile-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn nested(depth: usize) -> String {
    format!("node: {}\n", "[".repeat(depth))
}

#[test]
fn deep_nesting_and_oversized_inputs_are_refused_before_parsing() {
    let d = dir("limits");
    let path = d.0.join("rules.yaml");
    std::fs::write(&path, nested(200_000)).unwrap();
    let started = Instant::now();
    let err = read_input(&path, &Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::TooDeep {
                depth: 200_000,
                line: 1,
                limit: 64,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_nesting_depth"), "{err}");
    println!("refused 200 KB of [ in {:?}", started.elapsed());
    // A deep but allowed file passes the check.
    std::fs::write(&path, nested(10)).unwrap();
    assert!(read_input(&path, &Limits::default()).is_ok());

    std::fs::write(&path, "x".repeat(2_000)).unwrap();
    let small = Limits {
        max_bytes: 1_000,
        max_depth: 64,
    };
    let err = read_input(&path, &small).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::TooLarge {
                size: 2_000,
                limit: 1_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_input_bytes"), "{err}");
}

/// With the depth limit lifted, a slow parse runs while the agent answers SIGTERM at once.
#[test]
fn a_slow_parse_does_not_hold_up_the_agent() {
    if !runnable("a_slow_parse_does_not_hold_up_the_agent") {
        return;
    }
    let lab = Lab::new("h", 25, &["default/a"]);
    let d = dir("slow");
    let rules = d.0.join("rules.yaml");
    std::fs::write(
        &rules,
        "node: n1\nnode_addresses: []\npods: []\ngroups: {}\nrules: {}\n",
    )
    .unwrap();
    let port = 20_000 + (std::process::id() % 20_000) as u16 + 25;
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
            .args(["--netns", &lab.node, "--rules", rules.to_str().unwrap()])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--poll-interval-ms", "100"])
            .env("PALISADE_MAX_NESTING_DEPTH", "100000000")
            .spawn()
            .unwrap(),
    );
    eventually("/readyz 200", || {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    });
    write_renamed(&rules, &nested(200_000));
    // Give the agent time to start parsing, then ask it to stop.
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(
        matches!(http_get(port, "/healthz"), Some((200, _))),
        "the agent answers while it parses"
    );
    let stop = Instant::now();
    let pid = agent.0.id().to_string();
    sh(&["kill", "-TERM", &pid]);
    eventually_within(5, "the agent stopped on SIGTERM", || {
        matches!(agent.0.try_wait(), Ok(Some(_)))
    });
    println!("stopped {:?} after SIGTERM", stop.elapsed());
}

fn write_renamed(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
