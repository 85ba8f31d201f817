//! `palisadectl status`: per policy, on how many of its nodes it is enforced and at which
//! generation; per node, whether its agent is connected, in sync, and how far behind. Read
//! from the summary that the controller's status writer keeps, and the cluster's Nodes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::Api;
use palisade_controller::status::enforcement::NodeState;
use palisade_controller::status::{Summary, SUMMARY_KEY};

use crate::inputs::{runtime, KubeArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    kube: KubeArgs,
    /// The namespace Palisade's controller runs in.
    #[arg(long, default_value = "palisade-system")]
    namespace: String,
    /// The controller's election Lease (`controller.leaseName` in the chart).
    #[arg(long, default_value = "palisade-controller")]
    lease: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let rt = runtime()?;
    let client = args.kube.client(&rt)?;
    let (summary, nodes, leader) = rt.block_on(async {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
        let name = Summary::name(&args.lease);
        let map = maps.get_opt(&name).await.with_context(|| {
            format!("cannot read ConfigMap {}/{name}", args.namespace)
        })?;
        let map = map.with_context(|| {
            format!(
                "no status yet: ConfigMap {}/{name} does not exist (is palisade-controller running, and is one replica the leader?)",
                args.namespace
            )
        })?;
        let json = map
            .data
            .as_ref()
            .and_then(|d| d.get(SUMMARY_KEY))
            .with_context(|| format!("ConfigMap {}/{name} has no {SUMMARY_KEY}", args.namespace))?;
        let summary: Summary = serde_json::from_str(json)
            .with_context(|| format!("ConfigMap {}/{name}: {SUMMARY_KEY}", args.namespace))?;
        let nodes: Vec<String> = Api::<Node>::all(client.clone())
            .list(&Default::default())
            .await
            .context("cannot list Nodes")?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let lease = Api::<Lease>::namespaced(client, &args.namespace)
            .get_opt(&args.lease)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        anyhow::Ok((summary, nodes, lease))
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary, &nodes, leader.as_deref()));
    }
    // A policy in audit is in force as its owners chose: not a reason to fail.
    let all_in_force = summary.policies.iter().all(|p| p.in_force());
    Ok(if all_in_force {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// The tables people read.
pub fn render(summary: &Summary, nodes: &[String], leader: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "status writer: {} (Lease holder: {})",
        summary.leader,
        leader.unwrap_or("none")
    );
    let mut rows = vec![[
        "POLICY".to_string(),
        "GENERATION".into(),
        "ENFORCED".into(),
        "STATUS".into(),
    ]];
    for p in &summary.policies {
        rows.push([
            p.policy.to_string(),
            p.generation.to_string(),
            format!("{}/{} nodes", p.count.enforced, p.count.span),
            match &p.rejected {
                Some(e) => format!("Rejected: {e}"),
                None => p.reason().to_string(),
            },
        ]);
    }
    table(&mut out, &rows);
    if summary.omitted > 0 {
        let _ = writeln!(
            out,
            "({} fully enforced policies not listed)",
            summary.omitted
        );
    }
    out.push('\n');
    let mut all: BTreeMap<&str, Option<&NodeState>> =
        nodes.iter().map(|n| (n.as_str(), None)).collect();
    for (n, s) in &summary.nodes {
        all.insert(n, Some(s));
    }
    let mut rows = vec![[
        "NODE".to_string(),
        "AGENT".into(),
        "LAG".into(),
        "REPLICA".into(),
    ]];
    for (node, state) in all {
        rows.push(match state {
            None => [node.into(), "not connected".into(), "-".into(), "-".into()],
            Some(s) => [
                node.into(),
                match &s.error {
                    Some(e) => format!("apply failed: {e}"),
                    None if s.in_sync => "in sync".into(),
                    None => "behind".into(),
                },
                format!("{} generations", s.lag),
                s.replica.clone(),
            ],
        });
    }
    table(&mut out, &rows);
    out
}

fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < N {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            } else {
                line.push_str(cell);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_controller::status::enforcement::{Count, PolicyState};
    use palisade_policy::{PolicyId, PolicyKind};

    #[test]
    fn shows_counts_and_unconnected_nodes() {
        let summary = Summary::new(
            "replica-0",
            BTreeMap::from([(
                "node-a".to_string(),
                NodeState {
                    in_sync: true,
                    lag: 0,
                    error: None,
                    replica: "replica-1".into(),
                },
            )]),
            vec![PolicyState {
                policy: PolicyId {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some("shop".into()),
                    name: "db".into(),
                },
                generation: 2,
                count: Count {
                    enforced: 1,
                    span: 2,
                },
                rejected: None,
                audit: false,
            }],
        );
        let text = render(
            &summary,
            &["node-a".into(), "node-b".into()],
            Some("replica-0"),
        );
        assert!(
            text.contains("NetworkPolicy shop/db  2           1/2 nodes  Pending"),
            "{text}"
        );
        assert!(
            text.contains("node-a  in sync        0 generations  replica-1"),
            "{text}"
        );
        assert!(text.contains("node-b  not connected  -"), "{text}");
    }
}
