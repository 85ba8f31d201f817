//! Golden tests of rendering: each `tests/golden/NAME.yaml` (rules + interfaces) renders to
//! exactly `tests/golden/NAME.nft`. `UPDATE_GOLDEN=1 cargo test` rewrites the expected files.

use std::collections::BTreeMap;
use std::path::Path;

use palisade_agent::render::{text::to_text, FlowLog};
use palisade_agent::{render_text, Interfaces, Renderer};
use palisade_policy::model::PodKey;
use palisade_policy::ruleset::NodeRuleSet;
use serde::Deserialize;

#[derive(Deserialize)]
struct GoldenInput {
    /// "namespace/name" → host-side interface.
    interfaces: BTreeMap<String, String>,
    rules: NodeRuleSet,
    /// The flow log's settings, for inputs that render with it on.
    #[serde(default)]
    flow_log: Option<FlowLogInput>,
    /// Shared lists with this many peer tests render through address classes.
    #[serde(default)]
    classes_from: Option<usize>,
}

#[derive(Deserialize)]
struct FlowLogInput {
    group: u16,
    per_second: u32,
    burst: u32,
}

/// The renderer an input asks for: the flow log on or off, and where address classes
/// start (the default, when it does not say).
fn renderer(path: &Path) -> Option<Renderer> {
    let text = std::fs::read_to_string(path).unwrap();
    let value: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let input: GoldenInput = serde_json::from_value(value).unwrap();
    if input.flow_log.is_none() && input.classes_from.is_none() {
        return None;
    }
    let mut r = Renderer::default();
    r.set_flow_log(input.flow_log.map(|f| FlowLog {
        group: f.group,
        per_second: f.per_second,
        burst: f.burst,
    }));
    if let Some(n) = input.classes_from {
        r.set_classes_from(n);
    }
    Some(r)
}

pub fn load_input(path: &Path) -> (NodeRuleSet, Interfaces) {
    let text = std::fs::read_to_string(path).unwrap();
    let value: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let input: GoldenInput =
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let interfaces = input
        .interfaces
        .into_iter()
        .map(|(k, v)| {
            let (ns, name) = k.split_once('/').expect("interfaces keys are ns/name");
            (PodKey::new(ns, name), v)
        })
        .collect();
    (input.rules, interfaces)
}

#[test]
fn golden_renders() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let (rules, interfaces) = load_input(&path);
        let text = match renderer(&path) {
            Some(mut r) => to_text(&r.render(&rules, &interfaces).unwrap()),
            None => render_text(&rules, &interfaces).unwrap(),
        };
        let expected_path = path.with_extension("nft");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&expected_path, &text).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        assert_eq!(text, expected, "render of {} differs", path.display());
        checked += 1;
    }
    assert!(checked > 0, "no golden inputs found in {}", dir.display());
}
