//! Just enough PromQL reading for the tests: the label names a query uses, the text
//! exposition's families and labels, and Grafana's variables replaced for Prometheus.

use std::collections::{BTreeMap, BTreeSet};

/// Label names a query uses: in `by (...)` / `without (...)` / `on (...)` /
/// `ignoring (...)` lists and in `{name=...}` matchers (not the values inside quotes).
pub fn labels_used(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let unquoted = strip_strings(expr);
    for keyword in ["by", "without", "on", "ignoring"] {
        let mut rest = unquoted.as_str();
        while let Some(at) = find_word(rest, keyword) {
            let after = rest[at + keyword.len()..].trim_start();
            if let Some(list) = after.strip_prefix('(') {
                let end = list.find(')').unwrap_or(list.len());
                labels.extend(
                    list[..end]
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            rest = &rest[at + keyword.len()..];
        }
    }
    let mut rest = unquoted.as_str();
    while let Some(open) = rest.find('{') {
        let end = rest[open..].find('}').map_or(rest.len(), |e| open + e);
        for matcher in rest[open + 1..end].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                labels.insert(name);
            }
        }
        rest = &rest[end..];
    }
    labels
}

/// `{{label}}` references of a Grafana legend.
pub fn legend_labels(legend: &str) -> BTreeSet<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_string()))
        .collect()
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let j = i + word.len();
        let after = j >= bytes.len() || !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_');
        before && after
    })
}

/// `expr` with the contents of double-quoted strings removed.
fn strip_strings(expr: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in expr.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
                out.push(c);
            }
            continue;
        }
        if c == '"' {
            quoted = true;
        }
        out.push(c);
    }
    out
}

/// The families of a Prometheus text exposition, each with the union of its series'
/// label names (a histogram's series under its own name: `_bucket`, `_sum`, `_count`).
pub fn exposition_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.rfind('}').unwrap_or(line.len())];
            let unquoted = strip_strings(body);
            for pair in unquoted.split(',') {
                if let Some((name, _)) = pair.split_once('=') {
                    labels.insert(name.trim().to_string());
                }
            }
        }
    }
    out
}

/// Grafana's variables replaced by values Prometheus parses (`rate_window` for
/// `$__rate_interval`).
pub fn substitute_grafana_variables(expr: &str, rate_window: &str) -> String {
    expr.replace("$__rate_interval", rate_window)
        .replace("$__range", "1h")
        .replace("$node", ".*")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn labels_of_a_query() {
        let q =
            r#"sum by (node, le) (rate(x_bucket{job="a,b{c}", node=~"$node"}[5m])) and on (job) y"#;
        assert_eq!(labels_used(q), set(&["job", "le", "node"]));
        assert_eq!(
            legend_labels("p99 {{node}} {{ pod }}"),
            set(&["node", "pod"])
        );
    }

    #[test]
    fn labels_of_an_exposition() {
        let text = "# HELP a x\na_total{kind=\"k\",name=\"n,m=\\\"x\\\"\"} 1\nb 2\n";
        let got = exposition_labels(text);
        assert_eq!(got["a_total"], set(&["kind", "name"]));
        assert_eq!(got["b"], set(&[]));
    }
}
