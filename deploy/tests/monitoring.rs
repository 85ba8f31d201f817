//! The alert rules and the Grafana dashboard: checked and unit-tested by the real
//! `promtool`, embedded unchanged in the chart, and using only metrics the code exports.

use std::collections::BTreeSet;
use std::path::PathBuf;

use palisade_deploy_tests::manifests::{self, find};
use palisade_deploy_tests::monitoring::{
    alert_rules, dashboard, dashboard_queries, read, ALERTS, ALERT_TESTS,
};
use palisade_deploy_tests::{metric_names, promql, repo_root, tools};
use serde_yaml::Value;

const PROMTOOL_HINT: &str = "apt-get install prometheus";

#[test]
fn promtool_checks_the_alert_rules() {
    let Some(promtool) =
        tools::require("promtool_checks_the_alert_rules", "promtool", PROMTOOL_HINT)
    else {
        return;
    };
    let out = tools::run_ok(&promtool, &["check", "rules", ALERTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_unit_tests_fire_each_alert_and_keep_it_silent_otherwise() {
    // Every alert has a scenario where it fires and an evaluation where it must not.
    let tests: Value = serde_yaml::from_str(&read(ALERT_TESTS)).expect("alert tests are YAML");
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let expected = case["exp_alerts"].as_sequence().map_or(0, |a| a.len());
            if expected == 0 {
                &mut silent
            } else {
                &mut fired
            }
            .insert(name);
        }
    }
    for rule in alert_rules() {
        let name = rule["alert"].as_str().expect("every rule is an alert");
        assert!(fired.contains(name), "no unit test fires {name}");
        assert!(silent.contains(name), "no unit test keeps {name} silent");
    }

    let Some(promtool) = tools::require(
        "promtool_unit_tests_fire_each_alert_and_keep_it_silent_otherwise",
        "promtool",
        PROMTOOL_HINT,
    ) else {
        return;
    };
    let out = tools::run_ok(&promtool, &["test", "rules", ALERT_TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheus_rule_is_the_rules_file_verbatim() {
    let Some(helm) = tools::require(
        "prometheus_rule_is_the_rules_file_verbatim",
        "helm",
        "scripts/tools.sh builds it",
    ) else {
        return;
    };
    let out = tools::run_ok(
        &helm,
        &[
            "template",
            "palisade",
            "charts/palisade",
            "--api-versions",
            "monitoring.coreos.com/v1",
        ],
    );
    let objects = manifests::parse(&out);
    let rule = find(&objects, "PrometheusRule", "palisade");
    let file: Value = serde_yaml::from_str(&read(ALERTS)).expect("alerts.yaml");
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule's spec is not files/alerts.yaml"
    );
    let map = find(&objects, "ConfigMap", "palisade-dashboard");
    assert_eq!(
        map["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let shipped: serde_json::Value = serde_json::from_str(
        map["data"]["palisade.json"]
            .as_str()
            .expect("dashboard data"),
    )
    .expect("JSON");
    assert_eq!(
        shipped,
        dashboard(),
        "the ConfigMap's dashboard is not files/dashboard.json"
    );
    // Without the operator's API there are no operator objects, but the dashboard stays.
    let plain = manifests::parse(&tools::run_ok(
        &helm,
        &["template", "palisade", "charts/palisade"],
    ));
    for kind in ["PrometheusRule", "ServiceMonitor", "PodMonitor"] {
        assert_eq!(
            manifests::all(&plain, kind).count(),
            0,
            "{kind} rendered without monitoring.coreos.com/v1"
        );
    }
    find(&plain, "ConfigMap", "palisade-dashboard");
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let d = dashboard();
    let panels = d["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    let queries = dashboard_queries(&d);
    let Some(promtool) = tools::require(
        "dashboard_queries_are_valid_promql",
        "promtool",
        PROMTOOL_HINT,
    ) else {
        return;
    };
    // promtool parses rule expressions: each query becomes a recording rule.
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": promql::substitute_grafana_variables(&q.expr, "2m")})
        })
        .collect();
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-queries.rules.yaml");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_yaml::to_string(&doc).expect("YAML")).expect("write rules");
    let out = tools::run(&promtool, &["check", "rules", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "a dashboard query does not parse:\n{}{}\nqueries: {:#?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        queries.iter().map(|q| &q.expr).collect::<Vec<_>>()
    );
}

#[test]
fn dashboard_and_alerts_use_only_metrics_the_code_exports() {
    let root = repo_root();
    let (known, planned) = metric_names::known(&root);
    if !planned.is_empty() {
        eprintln!(
            "note: metrics of {planned:?} are not in the sources yet; their agreed names are accepted until they are"
        );
    }
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    let exprs = dashboard_queries(&dashboard())
        .into_iter()
        .map(|q| (format!("dashboard panel {:?}", q.panel), q.expr))
        .chain(alert_rules().into_iter().map(|r| {
            (
                format!("alert {}", r["alert"].as_str().unwrap_or("?")),
                r["expr"].as_str().expect("alert expr").to_string(),
            )
        }));
    for (place, expr) in exprs {
        for name in metric_names::used_in(&expr) {
            if !metric_names::is_known(&known, &name) {
                unknown.push(format!("{place}: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(unknown.is_empty(), "metrics no code exports: {unknown:#?}");
    // What the dashboard must show (issue 9): each of these is queried somewhere.
    for required in [
        "palisade_rule_packets_total",
        "palisade_default_deny_packets_total",
        "palisade_spoofed_packets_total",
        "palisade_apply_duration_seconds_bucket",
        "palisade_apply_errors_total",
        "palisade_controller_compile_duration_seconds_bucket",
        "palisade_controller_nodes_connected",
        "palisade_controller_node_generation_lag",
        "palisade_controller_is_leader",
    ] {
        assert!(
            used.contains(required),
            "neither the dashboard nor the alerts use {required}"
        );
    }
    // The agent's metrics are found in its sources today: a rename there fails this test.
    assert!(
        known.contains("palisade_rule_packets_total"),
        "agent metrics not found in {}",
        root.display()
    );
}
