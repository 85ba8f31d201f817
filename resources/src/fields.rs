//! Validation and conversion of the small values every kind shares: label selectors,
//! protocols, port numbers, port names and CIDRs.

use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use palisade_policy::{LabelSelector, Operator, Protocol, Requirement};

use crate::error::Errors;

/// A label selector, validated: known operators, values exactly where the operator needs them.
pub(crate) fn selector(sel: &meta::LabelSelector, path: &str, errs: &mut Errors) -> LabelSelector {
    let match_labels = sel.match_labels.clone().unwrap_or_default();
    for key in match_labels.keys() {
        if key.is_empty() {
            errs.add(
                format!("{path}.matchLabels"),
                "a label key must not be empty",
            );
        }
    }
    let mut match_expressions = Vec::new();
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{i}]");
        if req.key.is_empty() {
            errs.add(format!("{at}.key"), "must not be empty");
        }
        let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
        let operator = match req.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                errs.add(
                    format!("{at}.operator"),
                    format!(
                        "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                );
                continue;
            }
        };
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => errs.add(
                format!("{at}.values"),
                format!("{} needs at least one value", req.operator),
            ),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => errs.add(
                format!("{at}.values"),
                format!("{} takes no values", req.operator),
            ),
            _ => {}
        }
        match_expressions.push(Requirement {
            key: req.key.clone(),
            operator,
            values,
        });
    }
    LabelSelector {
        match_labels: match_labels.into(),
        match_expressions,
    }
    .canonical()
}

/// A protocol as Kubernetes spells it; absent means TCP.
pub(crate) fn protocol(value: Option<&str>, path: &str, errs: &mut Errors) -> Protocol {
    match value {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            errs.add(
                path,
                format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
            );
            Protocol::Tcp
        }
    }
}

/// A port number in 1..=65535.
pub(crate) fn port_number(value: i64, path: &str, errs: &mut Errors) -> u16 {
    match u16::try_from(value) {
        Ok(p) if p != 0 => p,
        _ => {
            errs.add(path, format!("port {value} is out of range 1..=65535"));
            1
        }
    }
}

/// A container port name (an IANA service name): 1 to 15 lower-case letters, digits and
/// dashes, at least one letter, no dash at either end and no two dashes in a row.
pub(crate) fn port_name(name: &str, path: &str, errs: &mut Errors) {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !valid {
        let hint = if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
            " (a port number must be written without quotes)"
        } else {
            ""
        };
        errs.add(
            path,
            format!("{name:?} is not a valid port name: 1-15 lower-case letters, digits and '-', with at least one letter{hint}"),
        );
    }
}

/// A CIDR (`10.0.0.0/8`, `fd00::/64`). Host bits are cleared: `10.0.0.1/8` means `10.0.0.0/8`.
pub(crate) fn cidr(value: &str, path: &str, errs: &mut Errors) -> Option<IpNet> {
    match value.trim().parse::<IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            errs.add(
                path,
                format!("{value:?} is not a valid CIDR (e.g. 10.0.0.0/8 or fd00::/64)"),
            );
            None
        }
    }
}

/// A rule list may hold at most `max` rules (the CRDs' MaxItems).
pub(crate) fn rule_count(len: usize, max: usize, path: &str, errs: &mut Errors) {
    if len > max {
        errs.add(path, format!("{len} rules; at most {max} are allowed"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meta::LabelSelectorRequirement;

    fn req(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn sel(reqs: Vec<LabelSelectorRequirement>) -> meta::LabelSelector {
        meta::LabelSelector {
            match_labels: None,
            match_expressions: Some(reqs),
        }
    }

    fn messages(errs: Errors) -> Vec<String> {
        let obj = crate::error::ObjectRef::Document {
            index: 1,
            item: None,
        };
        match errs.finish(&obj, ()) {
            Ok(()) => vec![],
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn selector_operators_convert() {
        let mut errs = Errors::default();
        let s = selector(
            &sel(vec![
                req("env", "In", Some(&["a", "b"])),
                req("t", "DoesNotExist", None),
            ]),
            "spec.podSelector",
            &mut errs,
        );
        assert!(errs.is_empty());
        assert_eq!(s.match_expressions.len(), 2);
        let l = [("env".to_string(), "a".to_string())].into();
        assert!(s.matches(&l));
    }

    #[test]
    fn selector_errors_name_the_expression() {
        let mut errs = Errors::default();
        selector(
            &sel(vec![
                req("a", "Like", Some(&["x"])),
                req("b", "In", None),
                req("c", "Exists", Some(&["x"])),
                req("d", "NotIn", Some(&[])),
            ]),
            "spec.podSelector",
            &mut errs,
        );
        assert_eq!(
            messages(errs),
            vec![
                "spec.podSelector.matchExpressions[0].operator: unknown operator \"Like\" (expected In, NotIn, Exists or DoesNotExist)",
                "spec.podSelector.matchExpressions[1].values: In needs at least one value",
                "spec.podSelector.matchExpressions[2].values: Exists takes no values",
                "spec.podSelector.matchExpressions[3].values: NotIn needs at least one value",
            ]
        );
    }

    #[test]
    fn ports_protocols_and_cidrs() {
        let mut errs = Errors::default();
        assert_eq!(port_number(80, "p", &mut errs), 80);
        assert_eq!(port_number(65535, "p", &mut errs), 65535);
        assert_eq!(protocol(None, "x", &mut errs), Protocol::Tcp);
        assert_eq!(protocol(Some("SCTP"), "x", &mut errs), Protocol::Sctp);
        assert_eq!(
            cidr("10.1.2.3/16", "c", &mut errs),
            Some("10.1.0.0/16".parse().unwrap())
        );
        port_name("http-alt", "n", &mut errs);
        assert!(errs.is_empty());

        port_number(0, "a", &mut errs);
        port_number(70000, "b", &mut errs);
        protocol(Some("tcp"), "c", &mut errs);
        cidr("10.0.0.300/8", "d", &mut errs);
        cidr("10.0.0.1", "e", &mut errs);
        port_name("8080", "f", &mut errs);
        port_name("Http", "g", &mut errs);
        let m = messages(errs);
        assert_eq!(m.len(), 7, "{m:?}");
        assert_eq!(m[0], "a: port 0 is out of range 1..=65535");
        assert_eq!(m[1], "b: port 70000 is out of range 1..=65535");
        assert!(m[2].starts_with("c: unknown protocol \"tcp\""));
        assert!(m[3].starts_with("d: \"10.0.0.300/8\" is not a valid CIDR"));
        assert!(m[5].contains("without quotes"));
    }
}
