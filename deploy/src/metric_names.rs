//! Metric names: those the code exports (string literals in the crates' sources) and those
//! a PromQL expression uses, so a renamed metric fails a test instead of an empty panel.

use std::collections::BTreeSet;
use std::path::Path;

/// Metrics the team agreed on (helpers' guide) whose code is not merged yet, by the crate
/// that will export them. A group counts as planned only while none of its names appears
/// in any source: once its code lands, every name must be exported for real.
pub const PLANNED: &[(&str, &[&str])] = &[
    (
        "controller",
        &[
            "palisade_controller_watch_events_total",
            "palisade_controller_compile_duration_seconds",
            "palisade_controller_nodes_connected",
            "palisade_controller_node_generation_lag",
            "palisade_controller_bytes_sent_total",
            "palisade_controller_invalid_objects_total",
            "palisade_controller_is_leader",
            "palisade_controller_generation",
        ],
    ),
    (
        "agent's controller stream",
        &[
            "palisade_controller_connected",
            "palisade_controller_last_update_timestamp_seconds",
        ],
    ),
];

/// Suffixes of the series a histogram or summary exposes.
const SERIES_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Every `"palisade_…"` string literal in the `src/` trees of the repository's crates.
pub fn exported(root: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return names;
    };
    for entry in entries.flatten() {
        let src = entry.path().join("src");
        if entry.file_name() != "target" && entry.file_name() != "deploy" && src.is_dir() {
            collect_literals(&src, &mut names);
        }
    }
    names
}

fn collect_literals(dir: &Path, names: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_literals(&path, names);
        } else if path.extension().is_some_and(|e| e == "rs") {
            if let Ok(text) = std::fs::read_to_string(&path) {
                names.extend(literals(&text));
            }
        }
    }
}

/// The string literals of `text` that are whole metric names (`"palisade_[a-z0-9_]+"`).
fn literals(text: &str) -> impl Iterator<Item = String> + '_ {
    text.match_indices("\"palisade_").filter_map(|(at, _)| {
        let rest = &text[at + 1..];
        let end = rest.find('"')?;
        let name = &rest[..end];
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            .then(|| name.to_string())
    })
}

/// The metric names a PromQL expression uses.
pub fn used_in(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find("palisade_") {
        let start = from + found;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let end = start
            + expr[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len() - start);
        if boundary {
            names.insert(expr[start..end].to_string());
        }
        from = end;
    }
    names
}

/// The names a query may use: exported ones, and planned groups none of whose names is
/// exported yet (returned second, for the test to say so).
pub fn known(root: &Path) -> (BTreeSet<String>, Vec<&'static str>) {
    let mut known = exported(root);
    let mut planned = Vec::new();
    for (group, names) in PLANNED {
        if !names.iter().any(|n| known.contains(*n)) {
            planned.push(*group);
            known.extend(names.iter().map(|n| n.to_string()));
        }
    }
    (known, planned)
}

/// Whether `used` is a known metric or one of a known histogram's series.
pub fn is_known(known: &BTreeSet<String>, used: &str) -> bool {
    known.contains(used)
        || SERIES_SUFFIXES.iter().any(|s| {
            used.strip_suffix(s)
                .is_some_and(|base| known.contains(base))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_promql() {
        let got = used_in(
            "histogram_quantile(0.9, rate(palisade_apply_duration_seconds_bucket{x=\"palisade_no\"}[5m])) / my_palisade_x",
        );
        let want: BTreeSet<String> = ["palisade_apply_duration_seconds_bucket", "palisade_no"]
            .map(String::from)
            .into();
        assert_eq!(got, want);
    }

    #[test]
    fn literals_are_whole_names() {
        let got: Vec<String> =
            literals(r#"x("palisade_a_total", "palisade_b {x}", "palisade_c")"#).collect();
        assert_eq!(got, ["palisade_a_total", "palisade_c"]);
    }

    #[test]
    fn histogram_series_are_known() {
        let known: BTreeSet<String> = ["palisade_apply_duration_seconds".to_string()].into();
        assert!(is_known(&known, "palisade_apply_duration_seconds_bucket"));
        assert!(!is_known(&known, "palisade_apply_duration_bucket"));
    }
}
