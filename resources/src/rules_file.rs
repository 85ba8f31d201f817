//! The agent's rules file: a compiled `NodeRuleSet` as JSON or YAML, read strictly. It lives
//! here, beside the other strict readers, so that whatever reads it (the agent, the fuzz
//! targets) needs no more than this crate.

use palisade_policy::NodeRuleSet;

use crate::strict;

/// Why a rules file was refused: a path into the document and what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RulesFileError(String);

/// What a rules file may say about itself, so that a file cut short is refused: how many
/// pods, groups and rules it holds. Optional; put it first (a file cut after it then has
/// fewer items than it says).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Integrity {
    pods: Option<usize>,
    groups: Option<usize>,
    rules: Option<usize>,
}

/// Parses a `NodeRuleSet` from JSON (text starting with `{`) or YAML (same shape as the
/// JSON, enums as single-key maps), strictly: a duplicate key or an unknown field is an
/// error naming its path. An `integrity` key (`{pods: N, groups: N, rules: N}`) is
/// checked against the content.
pub fn parse(text: &str) -> Result<NodeRuleSet, RulesFileError> {
    let err = RulesFileError;
    // Through a JSON value: serde_yaml 0.9 wants YAML tags for enums, while the JSON form
    // (`{peerPort: {...}}`) is what people write and what JSON files use.
    let (mut value, duplicates) = if text.trim_start().starts_with('{') {
        strict::json_value(text).map_err(|e| err(e.to_string()))?
    } else {
        strict::yaml_value(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| err(e.to_string()))?
    };
    if let Some(path) = duplicates.first() {
        return Err(err(format!("{path}: duplicate key")));
    }
    let integrity = match value.as_object_mut().and_then(|m| m.remove("integrity")) {
        Some(v) => strict::decode::<Integrity>(&v).map_err(|e| err(format!("integrity.{e}")))?,
        None => Integrity::default(),
    };
    let rules: NodeRuleSet = strict::decode(&value).map_err(|e| err(e.to_string()))?;
    for (what, said, found) in [
        ("pods", integrity.pods, rules.pods.len()),
        ("groups", integrity.groups, rules.groups.len()),
        ("rules", integrity.rules, rules.rules.len()),
    ] {
        if let Some(said) = said.filter(|&n| n != found) {
            return Err(err(format!(
                "integrity.{what}: the file says {said} and holds {found}; refused as incomplete"
            )));
        }
    }
    Ok(rules)
}
