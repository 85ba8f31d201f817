//! The chart's alert rules and Grafana dashboard, read from `charts/palisade/files/`.

use serde_yaml::Value;

pub const ALERTS: &str = "charts/palisade/files/alerts.yaml";
pub const ALERT_TESTS: &str = "charts/palisade/tests/alerts.test.yaml";
pub const DASHBOARD: &str = "charts/palisade/files/dashboard.json";

pub fn read(path: &str) -> String {
    std::fs::read_to_string(crate::repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every rule of every group of the alerts file.
pub fn alert_rules() -> Vec<Value> {
    let file: Value = serde_yaml::from_str(&read(ALERTS)).expect("alerts.yaml is YAML");
    file["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter().cloned())
        .collect()
}

pub fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON")
}

/// One query of a dashboard panel.
pub struct Query {
    pub panel: String,
    pub expr: String,
    pub legend: String,
}

/// Every query of the dashboard's panels; panics on a panel without queries.
pub fn dashboard_queries(d: &serde_json::Value) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("panel title").to_string();
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            out.push(Query {
                panel: title.clone(),
                expr: t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{title}: query without expr"))
                    .to_string(),
                legend: t["legendFormat"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
    out
}
