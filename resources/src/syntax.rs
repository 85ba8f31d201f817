//! The syntax rules of Kubernetes values, exactly as the v1.37 apiserver applies them, no
//! stricter and no looser. Each function returns the problems found (empty: valid), worded
//! as the apiserver words them.
//!
//! Sources (k8s.io/apimachinery v0.37.2, `pkg/api/validate/content`):
//! - `IsLabelKey` (kube.go): an optional prefix that is a DNS-1123 subdomain, a `/`, and a
//!   name of at most 63 characters matching `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
//! - `IsLabelValue` (kube.go): at most 63 characters, empty or the same pattern as a name.
//! - `IsDNS1123Label` (dns.go): at most 63 characters of `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
//! - `IsDNS1123Subdomain` (dns.go): at most 253 characters, DNS-1123 labels joined by `.`.
//!
//! Object names (k8s.io/kubernetes v1.37.2, `pkg/apis/core/validation`,
//! `pkg/apis/networking/validation`, and apiextensions' custom resource validator): Pods,
//! Nodes, NetworkPolicies and custom resources (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy) are DNS-1123 subdomains; Namespaces are DNS-1123 labels
//! (`ValidateNamespaceName = NameIsDNSLabel`), and so is `metadata.namespace` of every
//! namespaced object; Services are DNS-1123 labels since 1.37 (`RelaxedServiceNameValidation`,
//! GA and locked on: `ValidateServiceCreate` uses `NameIsDNSLabel` instead of DNS-1035).

use std::collections::BTreeMap;

use palisade_policy::Protocol;

use crate::error::Errors;

const LABEL_NAME_MAX: usize = 63;
const LABEL_VALUE_MAX: usize = 63;
const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`: the name part of a label key, and a
/// non-empty label value.
fn is_label_word(s: &str) -> bool {
    let b = s.as_bytes();
    let end = |c: &u8| c.is_ascii_alphanumeric();
    let middle = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    match b {
        [] => false,
        [only] => end(only),
        [first, inner @ .., last] => end(first) && end(last) && inner.iter().all(middle),
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn is_dns_label_word(s: &str) -> bool {
    let b = s.as_bytes();
    let end = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let middle = |c: &u8| end(c) || *c == b'-';
    match b {
        [] => false,
        [only] => end(only),
        [first, inner @ .., last] => end(first) && end(last) && inner.iter().all(middle),
    }
}

fn max_len(max: usize) -> String {
    format!("must be no more than {max} characters")
}

/// A DNS-1123 label: Namespace and Service names, `metadata.namespace`.
pub fn dns1123_label(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        errs.push(max_len(DNS1123_LABEL_MAX));
    }
    if !is_dns_label_word(value) {
        errs.push(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character (e.g. 'my-name')"
                .into(),
        );
    }
    errs
}

/// A DNS-1123 subdomain: names of Pods, Nodes, NetworkPolicies and custom resources, and
/// the prefix of a label key.
pub fn dns1123_subdomain(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(max_len(DNS1123_SUBDOMAIN_MAX));
    }
    if !value.split('.').all(is_dns_label_word) {
        errs.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (e.g. \
             'example.com')"
                .into(),
        );
    }
    errs
}

/// A label key (a "qualified name"): `[prefix/]name`.
pub fn label_key(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let name = match value.split('/').collect::<Vec<_>>()[..] {
        [name] => name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_string());
            } else {
                errs.extend(
                    dns1123_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            name
        }
        _ => {
            return vec![
                "a valid label key must consist of alphanumeric characters, '-', '_' \
                 or '.', and must start and end with an alphanumeric character, with an \
                 optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
                    .into(),
            ]
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".into());
    } else if name.len() > LABEL_NAME_MAX {
        errs.push(format!("name part {}", max_len(LABEL_NAME_MAX)));
    }
    if !is_label_word(name) {
        errs.push(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must \
             start and end with an alphanumeric character (e.g. 'MyName', 'my.name' or \
             '123-abc')"
                .into(),
        );
    }
    errs
}

/// A label value: empty, or at most 63 characters of the label-name pattern.
pub fn label_value(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > LABEL_VALUE_MAX {
        errs.push(max_len(LABEL_VALUE_MAX));
    }
    if !value.is_empty() && !is_label_word(value) {
        errs.push(
            "a valid label must be an empty string or consist of alphanumeric characters, \
             '-', '_' or '.', and must start and end with an alphanumeric character (e.g. \
             'MyValue', 'my_value' or '12345')"
                .into(),
        );
    }
    errs
}

/// A protocol as Kubernetes spells it: exactly `TCP`, `UDP` or `SCTP`. The apiserver
/// compares case-sensitively (`ValidateNetworkPolicyPort`, `validateContainerPorts`: `tcp`
/// is refused), and so does every input of Palisade, files and command-line flags alike.
pub fn protocol(value: &str) -> Result<Protocol, String> {
    match value {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => {
            let upper = other.to_ascii_uppercase();
            let hint = if ["TCP", "UDP", "SCTP"].contains(&upper.as_str()) {
                format!("; protocols are case-sensitive, as in Kubernetes: write {upper}")
            } else {
                String::new()
            };
            Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP{hint})"
            ))
        }
    }
}

/// Adds each problem of `value` (checked by `check`) as an error at `path`, quoting the value.
pub(crate) fn check(
    value: &str,
    check: fn(&str) -> Vec<String>,
    path: &str,
    errs: &mut Errors,
) -> bool {
    let problems = check(value);
    for p in &problems {
        errs.add(path, format!("{value:?}: {p}"));
    }
    problems.is_empty()
}

/// `metadata.labels`, as `ValidateLabels` checks them on every object.
pub(crate) fn labels(labels: Option<&BTreeMap<String, String>>, path: &str, errs: &mut Errors) {
    for (key, value) in labels.into_iter().flatten() {
        check(key, label_key, path, errs);
        check(value, label_value, &format!("{path}[{key}]"), errs);
    }
}

/// How a kind's names are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameRule {
    Subdomain,
    Label,
}

/// `metadata.name` (required, and of the kind's syntax), `metadata.namespace` of a
/// namespaced kind when set (a DNS-1123 label), and `metadata.labels`, as
/// `ValidateObjectMeta` checks them.
pub(crate) fn metadata(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    rule: NameRule,
    namespaced: bool,
    errs: &mut Errors,
) -> String {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        errs.add("metadata.name", "required");
    } else {
        let rule = match rule {
            NameRule::Subdomain => dns1123_subdomain,
            NameRule::Label => dns1123_label,
        };
        check(&name, rule, "metadata.name", errs);
    }
    if let Some(ns) = meta
        .namespace
        .as_deref()
        .filter(|ns| namespaced && !ns.is_empty())
    {
        check(ns, dns1123_label, "metadata.namespace", errs);
    }
    labels(meta.labels.as_ref(), "metadata.labels", errs);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(f: fn(&str) -> Vec<String>, v: &str) -> bool {
        f(v).is_empty()
    }

    #[test]
    fn protocols_are_case_sensitive_with_a_hint() {
        assert_eq!(protocol("TCP"), Ok(Protocol::Tcp));
        assert_eq!(protocol("UDP"), Ok(Protocol::Udp));
        assert_eq!(protocol("SCTP"), Ok(Protocol::Sctp));
        assert_eq!(
            protocol("tcp").unwrap_err(),
            "unknown protocol \"tcp\" (expected TCP, UDP or SCTP; protocols are case-sensitive, as in Kubernetes: write TCP)"
        );
        assert!(protocol("Sctp").unwrap_err().contains("write SCTP"));
        assert_eq!(
            protocol("ICMP").unwrap_err(),
            "unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)"
        );
    }

    #[test]
    fn label_keys_as_the_apiserver_checks_them() {
        let accepted = [
            "app",
            "App",
            "a",
            "9",
            "my.name",
            "my_name",
            "123-abc",
            "A-b_c.D",
            "example.com/MyName",
            "kubernetes.io/metadata.name",
            "a.b-c.d/x",
            "1.2.3/x",
            &"k".repeat(63),
            &format!("{}/{}", "p".repeat(253), "n".repeat(63)),
        ];
        for k in accepted {
            assert!(
                ok(label_key, k),
                "{k:?} must be accepted: {:?}",
                label_key(k)
            );
        }
        let refused = [
            "",
            "-app",
            "app-",
            "_app",
            "app.",
            "a b",
            "a:b",
            "é",
            "/app",
            "example.com/",
            "a/b/c",
            "Example.com/app",
            "exa_mple.com/app",
            "-x.com/app",
            "x..com/app",
            &"k".repeat(64),
            &format!("{}/n", "p".repeat(254)),
        ];
        for k in refused {
            assert!(!ok(label_key, k), "{k:?} must be refused");
        }
        assert_eq!(
            label_key(&"k".repeat(64)),
            ["name part must be no more than 63 characters"]
        );
        assert_eq!(label_key("/app"), ["prefix part must be non-empty"]);
    }

    #[test]
    fn label_values_as_the_apiserver_checks_them() {
        for v in [
            "",
            "a",
            "A",
            "0",
            "my_value",
            "12345",
            "a.b-c_D",
            &"v".repeat(63),
        ] {
            assert!(ok(label_value, v), "{v:?} must be accepted");
        }
        for v in ["-a", "a-", ".a", "a b", "a/b", "ü", "a\n", &"v".repeat(64)] {
            assert!(!ok(label_value, v), "{v:?} must be refused");
        }
    }

    #[test]
    fn dns_labels_and_subdomains() {
        for v in ["a", "0", "my-name", "123-abc", "a1", &"n".repeat(63)] {
            assert!(ok(dns1123_label, v), "{v:?} is a DNS-1123 label");
            assert!(ok(dns1123_subdomain, v), "{v:?} is a DNS-1123 subdomain");
        }
        for v in [
            "a.b",
            "web.v1",
            "0.0",
            &format!("{}.{}", "a".repeat(63), "b".repeat(63)),
        ] {
            assert!(!ok(dns1123_label, v), "{v:?} is not a label");
            assert!(ok(dns1123_subdomain, v), "{v:?} is a subdomain");
        }
        for v in ["", "A", "a_b", "-a", "a-", "a..b", ".a", "a.", "a b", "ä"] {
            assert!(!ok(dns1123_label, v), "{v:?}");
            assert!(!ok(dns1123_subdomain, v), "{v:?}");
        }
        assert!(!ok(dns1123_label, &"n".repeat(64)));
        // The subdomain pattern bounds only the whole (253), not each of its labels.
        assert!(ok(dns1123_subdomain, &"n".repeat(64)));
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), 253);
        assert!(ok(dns1123_subdomain, &long));
        assert!(!ok(dns1123_subdomain, &format!("{long}e")));
    }
}
