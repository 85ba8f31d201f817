//! `palisadectl flows`: the recent denied flows of agents (their `/flows`: one JSON line per
//! flow, naming the rule that denied it), as a table or as the lines themselves.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::inputs::runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Agents' metrics addresses (`http://127.0.0.1:9469` in loopback mode,
    /// `https://NODE:9469` in secure mode).
    #[arg(required = true)]
    agents: Vec<String>,
    /// A bearer token (file) allowed to `get` the non-resource URL /flows (secure mode).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA (PEM) of the agents' metrics certificates (secure mode).
    #[arg(long, conflicts_with = "insecure_skip_tls_verify")]
    ca_file: Option<PathBuf>,
    /// Do not verify the agents' certificates (their self-signed default).
    #[arg(long)]
    insecure_skip_tls_verify: bool,
    /// Print the JSON lines as the agents serve them.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let rt = runtime()?;
    let mut lines = Vec::new();
    for agent in &args.agents {
        let text = rt
            .block_on(fetch(args, agent))
            .with_context(|| format!("cannot read {agent}/flows"))?;
        lines.extend(text.lines().map(str::to_string));
    }
    if args.json {
        for line in &lines {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    for row in table(&lines) {
        println!("{row}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The flows of `lines` (JSON, one per line) as rows under a header, oldest first.
pub fn table(lines: &[String]) -> Vec<String> {
    let mut flows: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    flows.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    let row = |cells: [&str; 8]| {
        format!(
            "{:<27} {:<8} {:<8} {:<7} {:<6} {:<32} {:<32} {}",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
        )
    };
    let mut out = vec![row([
        "TIME",
        "NODE",
        "DIR",
        "VERDICT",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "DECIDED BY",
    ])];
    for f in &flows {
        out.push(row([
            &text(&f["time"]),
            &text(&f["node"]),
            &text(&f["direction"]),
            &text(&f["verdict"]),
            &text(&f["protocol"]),
            &end(&f["src"]),
            &end(&f["dst"]),
            &decided_by(&f["decided_by"]),
        ]));
    }
    out
}

async fn fetch(args: &Args, agent: &str) -> Result<String> {
    let url: http::Uri = agent.parse().context("not a URL")?;
    let mut config = kube::Config::new(url);
    config.accept_invalid_certs = args.insecure_skip_tls_verify;
    config.root_cert_file = args.ca_file.clone();
    config.auth_info.token_file = args
        .token_file
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    let client = kube::Client::try_from(config)?;
    let request = http::Request::get("/flows").body(Vec::new())?;
    Ok(client.request_text(request).await?)
}

fn text(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or("-").to_string()
}

/// `ns/pod (address:port)`, or the address alone.
fn end(v: &serde_json::Value) -> String {
    let addr = match (&v["address"], &v["port"]) {
        (a, serde_json::Value::Number(p)) => format!("{}:{p}", text(a)),
        (a, _) => text(a),
    };
    match v["pod"].as_str() {
        Some(pod) => format!("{pod} ({addr})"),
        None => addr,
    }
}

fn decided_by(v: &serde_json::Value) -> String {
    match v["kind"].as_str() {
        Some("rule") => {
            let ns = v["namespace"]
                .as_str()
                .map(|n| format!("{n}/"))
                .unwrap_or_default();
            format!(
                "{} {}{} rule {} ({} tier)",
                text(&v["policy_kind"]),
                ns,
                text(&v["policy"]),
                text(&v["rule"]),
                text(&v["tier"])
            )
        }
        Some("default-deny") => format!("default deny of {}", text(&v["pod"])),
        Some("spoofed") => format!("source check of {}", text(&v["pod"])),
        _ => format!("unknown rule {}", text(&v["prefix"])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_say_who_and_why() {
        let line: serde_json::Value = serde_json::from_str(
            r#"{"src":{"address":"10.0.0.1","port":4000,"pod":"ns/a"},"dst":{"address":"10.9.9.9","port":53},
               "decided_by":{"kind":"rule","tier":"NetworkPolicy","policy_kind":"NetworkPolicy","namespace":"ns","policy":"p","rule":"0"}}"#,
        )
        .unwrap();
        assert_eq!(end(&line["src"]), "ns/a (10.0.0.1:4000)");
        assert_eq!(end(&line["dst"]), "10.9.9.9:53");
        assert_eq!(
            decided_by(&line["decided_by"]),
            "NetworkPolicy ns/p rule 0 (NetworkPolicy tier)"
        );
        let spoof: serde_json::Value =
            serde_json::from_str(r#"{"kind":"spoofed","pod":"ns/a"}"#).unwrap();
        assert_eq!(decided_by(&spoof), "source check of ns/a");
    }
}
