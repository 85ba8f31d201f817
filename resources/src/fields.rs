//! Validation and conversion of the small values every kind shares: label selectors,
//! protocols, port numbers, port names and CIDRs.

use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use palisade_policy::{LabelSelector, Operator, Protocol, Requirement};

use crate::error::Errors;
use crate::syntax;

/// Where a selector's keys and values are checked for label syntax.
#[derive(Debug)]
pub(crate) enum LabelSyntax<'a> {
    /// As the apiserver's `ValidateLabelSelector` checks a built-in kind's selector
    /// (NetworkPolicy, with `AllowInvalidLabelValueInSelector` false as on create): keys are
    /// label keys and values label values, or the object is invalid.
    Checked,
    /// A custom resource's selector, which only the CRD's OpenAPI schema checks: it accepts
    /// any string as a key or value, so the apiserver stores such a selector and so do we.
    /// It is matched literally (no label can have such a key or value, so `In` matches
    /// nothing and `NotIn` everything); Go implementations cannot even build it
    /// (`LabelSelectorAsSelector` fails), so each such key or value is warned about here.
    Unchecked(&'a mut Vec<(String, String)>),
}

impl LabelSyntax<'_> {
    fn check(&mut self, value: &str, rule: fn(&str) -> Vec<String>, path: &str, errs: &mut Errors) {
        match self {
            LabelSyntax::Checked => {
                syntax::check(value, rule, path, errs);
            }
            LabelSyntax::Unchecked(warnings) => {
                if let Some(problem) = rule(value).into_iter().next() {
                    warnings.push((
                        path.to_string(),
                        format!("{value:?}: {problem}; the CRD accepts it, it is matched literally and no valid label matches it"),
                    ));
                }
            }
        }
    }
}

/// A label selector, validated: known operators, values exactly where the operator needs
/// them, keys and values of label syntax as `syntax` says.
pub(crate) fn selector(
    sel: &meta::LabelSelector,
    path: &str,
    errs: &mut Errors,
    mut syntax: LabelSyntax,
) -> LabelSelector {
    let match_labels = sel.match_labels.clone().unwrap_or_default();
    for (key, value) in &match_labels {
        let at = format!("{path}.matchLabels");
        syntax.check(key, syntax::label_key, &at, errs);
        syntax.check(value, syntax::label_value, &format!("{at}[{key}]"), errs);
    }
    let mut match_expressions = Vec::new();
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{i}]");
        syntax.check(&req.key, syntax::label_key, &format!("{at}.key"), errs);
        for (j, v) in req.values.iter().flatten().enumerate() {
            syntax.check(v, syntax::label_value, &format!("{at}.values[{j}]"), errs);
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

/// A protocol as Kubernetes spells it ([`syntax::protocol`]); absent means TCP.
pub(crate) fn protocol(value: Option<&str>, path: &str, errs: &mut Errors) -> Protocol {
    match value.map(syntax::protocol) {
        None => Protocol::Tcp,
        Some(Ok(p)) => p,
        Some(Err(message)) => {
            errs.add(path, message);
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

/// Which CIDRs a field takes beyond the strict syntax every field shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostBits {
    /// `10.0.0.1/8` is refused: NetworkPolicy `ipBlock` (strict legacy-field validation) and
    /// ClusterNetworkPolicy `networks` (the CRD's `cidr(self) == cidr(self).masked()`).
    Refused,
    /// `10.0.0.1/8` means `10.0.0.0/8`: v1alpha1 Admin/BaselineAdminNetworkPolicy
    /// `networks`, whose CRD checks only `isCIDR(self)`.
    Cleared,
}

/// The CRDs' `maxLength` of a CIDR in `networks`; NetworkPolicy's `ipBlock` has none.
pub(crate) const CRD_CIDR_MAX_LEN: usize = 43;

/// A CIDR (`10.0.0.0/8`, `fd00::/64`), as the v1.37 apiserver accepts it. NetworkPolicy's
/// `ipBlock.cidr` and `except` go through `IsValidCIDRForLegacyField` with strict validation
/// (apimachinery `pkg/util/validation/ip.go`, `parseCIDR`; the `StrictIPCIDRValidation` gate
/// is beta and on by default since 1.36), and the CRDs' CEL `isCIDR` is `netip.ParsePrefix`
/// refusing IPv4-mapped addresses (apiserver `pkg/cel/library/cidr.go`). Both refuse:
/// leading zeros in an octet or in the prefix length (`010.0.0.0/8`, `10.0.0.0/08`; libc
/// reads such octets as octal), an IPv4-mapped IPv6 address (`::ffff:10.0.0.0/104`, which
/// some software reads as IPv4 and some as IPv6), zones and surrounding spaces. Objects
/// stored before strict validation are ratcheted by the apiserver and refused here, with
/// the error naming the field (their last good version stays in force).
pub(crate) fn cidr(
    value: &str,
    path: &str,
    errs: &mut Errors,
    host_bits: HostBits,
) -> Option<IpNet> {
    let refuse = |errs: &mut Errors, why: &str| {
        errs.add(path, format!("{value:?} is not a valid CIDR: {why}"));
        None
    };
    let Some((addr, len)) = value.split_once('/') else {
        return refuse(
            errs,
            "expected an address and a prefix length (e.g. 10.0.0.0/8 or fd00::/64)",
        );
    };
    if len.len() > 1 && len.starts_with('0') {
        return refuse(errs, "must not have leading 0s in the prefix length");
    }
    if !len.bytes().all(|b| b.is_ascii_digit()) || len.is_empty() {
        return refuse(errs, "the prefix length must be a decimal number");
    }
    if addr.contains('.')
        && !addr.contains(':')
        && addr.split('.').any(|o| o.len() > 1 && o.starts_with('0'))
    {
        return refuse(errs, "must not have leading 0s in IP or prefix length");
    }
    let Ok(net) = value.parse::<IpNet>() else {
        return refuse(errs, "expected e.g. 10.0.0.0/8 or fd00::/64");
    };
    if let IpNet::V6(v6) = net {
        if v6.addr().to_ipv4_mapped().is_some() {
            return refuse(errs, "must not have an IPv4-mapped IPv6 address");
        }
    }
    if net != net.trunc() && host_bits == HostBits::Refused {
        return refuse(
            errs,
            &format!(
                "must not have bits set beyond the prefix length (the network is {})",
                net.trunc()
            ),
        );
    }
    Some(net.trunc())
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
            LabelSyntax::Checked,
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
            LabelSyntax::Checked,
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
            cidr("10.1.2.3/16", "c", &mut errs, HostBits::Cleared),
            Some("10.1.0.0/16".parse().unwrap())
        );
        port_name("http-alt", "n", &mut errs);
        assert!(errs.is_empty());

        port_number(0, "a", &mut errs);
        port_number(70000, "b", &mut errs);
        protocol(Some("tcp"), "c", &mut errs);
        cidr("10.0.0.300/8", "d", &mut errs, HostBits::Refused);
        cidr("10.0.0.1", "e", &mut errs, HostBits::Refused);
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

    fn cidr_problems(value: &str, host_bits: HostBits) -> Vec<String> {
        let mut errs = Errors::default();
        cidr(value, "cidr", &mut errs, host_bits);
        messages(errs)
    }

    /// What the v1.37 apiserver accepts in `ipBlock.cidr` (strict legacy-field validation)
    /// must load; issue 12.9.
    #[test]
    fn cidrs_the_apiserver_accepts_load() {
        for (value, net) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("192.168.1.7/32", "192.168.1.7/32"),
            ("::/0", "::/0"),
            ("fd00::/64", "fd00::/64"),
            // Legacy fields allow non-canonical IPv6 text.
            ("FD00:0000::/64", "fd00::/64"),
            ("fd00:0:0:0:0:0:0:0/48", "fd00::/48"),
            ("2001:db8::1/128", "2001:db8::1/128"),
            // An IPv4-compatible (not mapped) address is plain IPv6 to netip and to us.
            ("::10.0.0.0/104", "::a00:0/104"),
            ("0.0.0.0/32", "0.0.0.0/32"),
        ] {
            let mut errs = Errors::default();
            let got = cidr(value, "cidr", &mut errs, HostBits::Refused);
            assert_eq!(
                got,
                Some(net.parse().unwrap()),
                "{value}: {:?}",
                messages(errs)
            );
        }
        // v1alpha1 networks (`isCIDR` only) take host bits; the network is meant.
        assert_eq!(
            cidr(
                "10.1.2.3/16",
                "c",
                &mut Errors::default(),
                HostBits::Cleared
            ),
            Some("10.1.0.0/16".parse().unwrap())
        );
    }

    /// Failed before the fix: mapped addresses and host bits were accepted, surrounding
    /// spaces trimmed, and leading zeros refused without saying why.
    #[test]
    fn cidrs_the_apiserver_refuses_are_refused_with_its_reason() {
        for (value, why) in [
            (
                "::ffff:10.0.0.0/104",
                "must not have an IPv4-mapped IPv6 address",
            ),
            ("::ffff:0:0/96", "must not have an IPv4-mapped IPv6 address"),
            (
                "::FFFF:1.2.3.4/128",
                "must not have an IPv4-mapped IPv6 address",
            ),
            (
                "010.0.0.0/8",
                "must not have leading 0s in IP or prefix length",
            ),
            (
                "10.0.0.01/32",
                "must not have leading 0s in IP or prefix length",
            ),
            (
                "10.0.0.0/08",
                "must not have leading 0s in the prefix length",
            ),
            (
                "10.0.0.1/8",
                "must not have bits set beyond the prefix length (the network is 10.0.0.0/8)",
            ),
            (
                "fd00::1/64",
                "must not have bits set beyond the prefix length",
            ),
            (" 10.0.0.0/8", "expected e.g."),
            ("10.0.0.0/8 ", "the prefix length must be a decimal number"),
            ("10.0.0.0/+8", "the prefix length must be a decimal number"),
            ("10.0.0.0/33", "expected e.g."),
            ("fe80::1%eth0/64", "expected e.g."),
            ("10.0.0.0", "expected an address and a prefix length"),
        ] {
            let m = cidr_problems(value, HostBits::Refused);
            assert_eq!(m.len(), 1, "{value}: {m:?}");
            assert!(
                m[0].starts_with(&format!("cidr: {value:?} is not a valid CIDR: "))
                    && m[0].contains(why),
                "{value}: {m:?}"
            );
        }
        assert!(cidr_problems("::ffff:10.0.0.0/104", HostBits::Cleared)[0].contains("IPv4-mapped"));
    }

    /// Issue 12.9: selector keys and values of a NetworkPolicy are label syntax, checked as
    /// `ValidateLabelSelector` checks them; a CRD's selector only warns.
    #[test]
    fn selector_label_syntax_checked_or_warned() {
        let bad = meta::LabelSelector {
            match_labels: Some(
                [
                    ("-app".to_string(), "ok".to_string()),
                    ("tier".into(), "x".repeat(64)),
                ]
                .into(),
            ),
            match_expressions: Some(vec![req("a b", "In", Some(&["v", "bad value"]))]),
        };
        let mut errs = Errors::default();
        selector(&bad, "s", &mut errs, LabelSyntax::Checked);
        let m = messages(errs);
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(
            m[0].starts_with("s.matchLabels: \"-app\": name part must consist of"),
            "{m:?}"
        );
        assert!(
            m[1].starts_with("s.matchLabels[tier]: ")
                && m[1].contains("must be no more than 63 characters"),
            "{m:?}"
        );
        assert!(
            m[2].starts_with("s.matchExpressions[0].key: \"a b\""),
            "{m:?}"
        );
        assert!(
            m[3].starts_with("s.matchExpressions[0].values[1]: \"bad value\""),
            "{m:?}"
        );

        let mut errs = Errors::default();
        let mut warnings = Vec::new();
        let literal = selector(&bad, "s", &mut errs, LabelSyntax::Unchecked(&mut warnings));
        assert!(errs.is_empty());
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        let labels = [("tier".to_string(), "x".to_string())].into();
        assert!(!literal.matches(&labels), "no valid label matches it");

        let good = meta::LabelSelector {
            match_labels: Some(
                [
                    ("example.com/App_1".to_string(), String::new()),
                    ("kubernetes.io/metadata.name".into(), "shop".into()),
                ]
                .into(),
            ),
            match_expressions: Some(vec![req("x.y/z", "NotIn", Some(&["A.b_c-9", ""]))]),
        };
        let mut errs = Errors::default();
        selector(&good, "s", &mut errs, LabelSyntax::Checked);
        assert!(errs.is_empty(), "{:?}", messages(errs));
    }
}
