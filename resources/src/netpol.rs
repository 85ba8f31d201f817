//! `networking.k8s.io/v1` NetworkPolicy into the model, with its defaulting rules.

use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use palisade_policy::{
    Action, Isolation, LabelSelector, NamespaceScope, Peer, Policy, PolicyId, PolicyKind, PortRule,
    PortSpec, Rule, Subject, Tier,
};

use crate::error::{Errors, ObjectError, ObjectRef};
use crate::fields::{self, HostBits, LabelSyntax::Checked};
use crate::syntax::{self, NameRule};
use crate::Converted;

/// The namespace `kubectl apply` puts a namespaced object without one in.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Converts a NetworkPolicy. `object` names it in errors (see [`crate::object_ref`]).
pub fn network_policy(
    np: &net::NetworkPolicy,
    object: &ObjectRef,
) -> Result<Converted, ObjectError> {
    let mut errs = Errors::default();
    let name = syntax::metadata(&np.metadata, NameRule::Subdomain, true, &mut errs);
    let (enforcement, warning) = crate::enforcement::annotation(&np.metadata);
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let Some(spec) = &np.spec else {
        errs.add("spec", "required");
        return Err(errs.fail(object));
    };

    let pods = match &spec.pod_selector {
        Some(sel) => fields::selector(sel, "spec.podSelector", &mut errs, Checked),
        None => LabelSelector::everything(),
    };

    let isolates = policy_types(spec, &mut errs);
    let ingress = if isolates.ingress {
        rules(
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_deref(), r.ports.as_deref())),
            "spec.ingress",
            "from",
            &namespace,
            &mut errs,
        )
    } else {
        Vec::new()
    };
    let egress = if isolates.egress {
        rules(
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_deref(), r.ports.as_deref())),
            "spec.egress",
            "to",
            &namespace,
            &mut errs,
        )
    } else {
        Vec::new()
    };

    let policy = Policy {
        id: PolicyId {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some(namespace.clone()),
            name,
        },
        tier: Tier::NetworkPolicy,
        priority: 0,
        subject: Subject::Namespace { namespace, pods },
        ingress,
        egress,
        isolates,
        enforcement,
    };
    let warnings = warning
        .map(|(path, message)| palisade_policy::Warning {
            policies: vec![policy.id.clone()],
            message: format!("{path}: {message}"),
        })
        .into_iter()
        .collect();
    errs.finish(object, Converted { policy, warnings })
}

/// `policyTypes` after defaulting: Ingress always, Egress when there are egress rules; or
/// exactly the listed ones. Rules of a direction that is not listed have no effect, so they
/// are left out of the model.
fn policy_types(spec: &net::NetworkPolicySpec, errs: &mut Errors) -> Isolation {
    match spec.policy_types.as_deref() {
        None | Some([]) => Isolation {
            ingress: true,
            egress: spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
        },
        Some(types) => {
            let mut iso = Isolation::default();
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => iso.ingress = true,
                    "Egress" => iso.egress = true,
                    other => errs.add(
                        format!("spec.policyTypes[{i}]"),
                        format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                    ),
                }
            }
            iso
        }
    }
}

fn rules<'a>(
    list: impl Iterator<
        Item = (
            Option<&'a [net::NetworkPolicyPeer]>,
            Option<&'a [net::NetworkPolicyPort]>,
        ),
    >,
    path: &str,
    peers_field: &str,
    namespace: &str,
    errs: &mut Errors,
) -> Vec<Rule> {
    list.enumerate()
        .map(|(i, (peers, ports))| {
            let at = format!("{path}[{i}]");
            // An absent or empty `from`/`to` means any peer; likewise `ports`.
            let peers = match peers {
                None | Some([]) => None,
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .filter_map(|(j, p)| {
                            peer(p, &format!("{at}.{peers_field}[{j}]"), namespace, errs)
                        })
                        .collect(),
                ),
            };
            let ports = match ports {
                None | Some([]) => None,
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(j, p)| port(p, &format!("{at}.ports[{j}]"), errs))
                        .collect(),
                ),
            };
            Rule {
                name: None,
                action: Action::Allow,
                peers,
                ports,
            }
        })
        .collect()
}

fn peer(
    p: &net::NetworkPolicyPeer,
    path: &str,
    namespace: &str,
    errs: &mut Errors,
) -> Option<Peer> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (None, None, None) => {
            errs.add(
                path,
                "must specify a peer: podSelector, namespaceSelector or ipBlock",
            );
            None
        }
        (Some(block), None, None) => ip_block(block, &format!("{path}.ipBlock"), errs),
        (Some(_), _, _) => {
            errs.add(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            );
            None
        }
        (None, ns, pods) => {
            let namespaces = match ns {
                Some(sel) => NamespaceScope::Selector(fields::selector(
                    sel,
                    &format!("{path}.namespaceSelector"),
                    errs,
                    Checked,
                )),
                None => NamespaceScope::Named(namespace.to_string()),
            };
            let pods = match pods {
                Some(sel) => fields::selector(sel, &format!("{path}.podSelector"), errs, Checked),
                None => LabelSelector::everything(),
            };
            Some(Peer::Pods { namespaces, pods })
        }
    }
}

fn ip_block(block: &net::IPBlock, path: &str, errs: &mut Errors) -> Option<Peer> {
    let cidr = fields::cidr(
        &block.cidr,
        &format!("{path}.cidr"),
        errs,
        HostBits::Refused,
    )?;
    let mut except = Vec::new();
    for (i, e) in block.except.iter().flatten().enumerate() {
        let at = format!("{path}.except[{i}]");
        let Some(net) = fields::cidr(e, &at, errs, HostBits::Refused) else {
            continue;
        };
        // As the API server checks it: a strict subset of `cidr`, of the same family.
        if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
            errs.add(at, format!("{net} is not a strict subset of cidr {cidr}"));
            continue;
        }
        except.push(net);
    }
    except.sort();
    except.dedup();
    Some(Peer::IpBlock { cidr, except })
}

fn port(p: &net::NetworkPolicyPort, path: &str, errs: &mut Errors) -> PortRule {
    let protocol = fields::protocol(p.protocol.as_deref(), &format!("{path}.protocol"), errs);
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => {
            errs.add(format!("{path}.endPort"), "endPort needs a numeric port");
            PortSpec::Any
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = fields::port_number(i64::from(*n), &format!("{path}.port"), errs);
            let end = match end {
                None => start,
                Some(e) => {
                    let e_path = format!("{path}.endPort");
                    let end = fields::port_number(i64::from(e), &e_path, errs);
                    if i64::from(e) < i64::from(*n) {
                        errs.add(e_path, format!("{e} is below port {n}"));
                    }
                    end.max(start)
                }
            };
            PortSpec::Range { start, end }
        }
        (Some(IntOrString::String(name)), end) => {
            fields::port_name(name, &format!("{path}.port"), errs);
            if end.is_some() {
                errs.add(
                    format!("{path}.endPort"),
                    "endPort cannot be used with a named port",
                );
            }
            PortSpec::Named(name.clone())
        }
    };
    PortRule { protocol, port }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::Protocol;

    fn convert(yaml: &str) -> Result<Policy, ObjectError> {
        let np: net::NetworkPolicy = serde_yaml::from_str(yaml).unwrap();
        let obj = ObjectRef::Named {
            kind: "NetworkPolicy".into(),
            namespace: Some("shop".into()),
            name: "p".into(),
        };
        network_policy(&np, &obj).map(|c| c.policy)
    }

    fn errors(yaml: &str) -> Vec<String> {
        convert(yaml)
            .unwrap_err()
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn policy_types_default_from_rules() {
        let p = convert("metadata: {namespace: shop, name: p}\nspec: {podSelector: {}}").unwrap();
        assert_eq!(
            p.isolates,
            Isolation {
                ingress: true,
                egress: false
            }
        );
        assert_eq!(
            p.subject,
            Subject::Namespace {
                namespace: "shop".into(),
                pods: LabelSelector::everything()
            }
        );

        let p = convert("metadata: {name: p}\nspec: {podSelector: {}, egress: [{}]}").unwrap();
        assert_eq!(
            p.isolates,
            Isolation {
                ingress: true,
                egress: true
            }
        );
        assert_eq!(p.id.namespace.as_deref(), Some("default"));

        // `egress: []` is not "egress rules exist".
        let p = convert("metadata: {name: p}\nspec: {podSelector: {}, egress: []}").unwrap();
        assert_eq!(
            p.isolates,
            Isolation {
                ingress: true,
                egress: false
            }
        );

        let p = convert(
            "metadata: {name: p}\nspec: {podSelector: {}, policyTypes: [Egress], ingress: [{}]}",
        )
        .unwrap();
        assert_eq!(
            p.isolates,
            Isolation {
                ingress: false,
                egress: true
            }
        );
        assert!(
            p.ingress.is_empty(),
            "rules of an unlisted direction have no effect"
        );
        assert!(p.egress.is_empty());
    }

    #[test]
    fn absent_empty_and_allow_all_ingress() {
        for spec in ["{podSelector: {}}", "{podSelector: {}, ingress: []}"] {
            let p = convert(&format!("metadata: {{name: p}}\nspec: {spec}")).unwrap();
            assert!(p.isolates.ingress);
            assert!(p.ingress.is_empty(), "{spec}");
        }
        let p = convert("metadata: {name: p}\nspec: {podSelector: {}, ingress: [{}]}").unwrap();
        assert_eq!(
            p.ingress,
            vec![Rule {
                name: None,
                action: Action::Allow,
                peers: None,
                ports: None
            }]
        );
        let p = convert(
            "metadata: {name: p}\nspec: {podSelector: {}, ingress: [{from: [], ports: []}]}",
        )
        .unwrap();
        assert_eq!(p.ingress[0].peers, None);
        assert_eq!(p.ingress[0].ports, None);
    }

    #[test]
    fn peers() {
        let p = convert(
            r#"
metadata: {namespace: shop, name: p}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: api}}
    - namespaceSelector: {matchLabels: {team: sre}}
    - namespaceSelector: {}
      podSelector: {matchLabels: {app: prom}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    - ipBlock: {cidr: "fd00::/48"}
"#,
        )
        .unwrap();
        let peers = p.ingress[0].peers.clone().unwrap();
        assert_eq!(
            peers,
            vec![
                Peer::Pods {
                    namespaces: NamespaceScope::Named("shop".into()),
                    pods: LabelSelector::with_labels([("app", "api")]),
                },
                Peer::Pods {
                    namespaces: NamespaceScope::Selector(LabelSelector::with_labels([(
                        "team", "sre"
                    )])),
                    pods: LabelSelector::everything(),
                },
                Peer::Pods {
                    namespaces: NamespaceScope::Selector(LabelSelector::everything()),
                    pods: LabelSelector::with_labels([("app", "prom")]),
                },
                Peer::IpBlock {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                },
                Peer::IpBlock {
                    cidr: "fd00::/48".parse().unwrap(),
                    except: vec![]
                },
            ]
        );
    }

    #[test]
    fn ports() {
        let p = convert(
            r#"
metadata: {name: p}
spec:
  podSelector: {}
  egress:
  - ports:
    - {}
    - {port: 53, protocol: UDP}
    - {port: 8000, endPort: 8080}
    - {port: grpc, protocol: SCTP}
    - {protocol: UDP}
"#,
        )
        .unwrap();
        assert_eq!(
            p.egress[0].ports.clone().unwrap(),
            vec![
                PortRule {
                    protocol: Protocol::Tcp,
                    port: PortSpec::Any
                },
                PortRule {
                    protocol: Protocol::Udp,
                    port: PortSpec::Range { start: 53, end: 53 }
                },
                PortRule {
                    protocol: Protocol::Tcp,
                    port: PortSpec::Range {
                        start: 8000,
                        end: 8080
                    }
                },
                PortRule {
                    protocol: Protocol::Sctp,
                    port: PortSpec::Named("grpc".into())
                },
                PortRule {
                    protocol: Protocol::Udp,
                    port: PortSpec::Any
                },
            ]
        );
    }

    #[test]
    fn invalid_fields_are_all_reported() {
        let errs = errors(
            r#"
metadata: {name: p}
spec:
  podSelector: {matchExpressions: [{key: a, operator: Has}]}
  policyTypes: [Ingress, Sideways]
  ingress:
  - from:
    - {}
    - ipBlock: {cidr: 10.0.0.0/8}
      podSelector: {}
    - ipBlock: {cidr: 10.0.0.0/33}
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24, "fd00::/64", 10.0.0.0/16]}
    ports:
    - {port: 0}
    - {port: 80, endPort: 70}
    - {port: 70000}
    - {port: http, endPort: 90}
    - {endPort: 90}
    - {port: 80, protocol: ICMP}
"#,
        );
        assert_eq!(
            errs,
            vec![
                "spec.podSelector.matchExpressions[0].operator: unknown operator \"Has\" (expected In, NotIn, Exists or DoesNotExist)",
                "spec.policyTypes[1]: unknown policy type \"Sideways\" (expected Ingress or Egress)",
                "spec.ingress[0].from[0]: must specify a peer: podSelector, namespaceSelector or ipBlock",
                "spec.ingress[0].from[1]: ipBlock cannot be combined with podSelector or namespaceSelector",
                "spec.ingress[0].from[2].ipBlock.cidr: \"10.0.0.0/33\" is not a valid CIDR: expected e.g. 10.0.0.0/8 or fd00::/64",
                "spec.ingress[0].from[3].ipBlock.except[0]: 10.1.0.0/24 is not a strict subset of cidr 10.0.0.0/16",
                "spec.ingress[0].from[3].ipBlock.except[1]: fd00::/64 is not a strict subset of cidr 10.0.0.0/16",
                "spec.ingress[0].from[3].ipBlock.except[2]: 10.0.0.0/16 is not a strict subset of cidr 10.0.0.0/16",
                "spec.ingress[0].ports[0].port: port 0 is out of range 1..=65535",
                "spec.ingress[0].ports[1].endPort: 70 is below port 80",
                "spec.ingress[0].ports[2].port: port 70000 is out of range 1..=65535",
                "spec.ingress[0].ports[3].endPort: endPort cannot be used with a named port",
                "spec.ingress[0].ports[4].endPort: endPort needs a numeric port",
                "spec.ingress[0].ports[5].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
            ]
        );
    }

    #[test]
    fn spec_and_name_are_required() {
        assert_eq!(errors("metadata: {name: p}"), vec!["spec: required"]);
        assert_eq!(
            errors("metadata: {}\nspec: {}"),
            vec!["metadata.name: required"]
        );
    }

    /// Issue 12.9: names, namespaces and labels as the apiserver checks them. NetworkPolicy
    /// names are DNS-1123 subdomains (`ValidateNetworkPolicyName = NameIsDNSSubdomain`),
    /// so dots and 253 characters are accepted; its namespace is a DNS-1123 label.
    #[test]
    fn names_namespaces_and_labels_as_the_apiserver_checks_them() {
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        for name in ["p", "allow-dns", "web.v1", "0", long.as_str()] {
            let yaml = format!("metadata: {{namespace: shop-1, name: {name:?}, labels: {{example.com/team: A_b.c, tier: \"\"}}}}\nspec: {{podSelector: {{matchLabels: {{k8s.io/app: web}}}}}}");
            assert!(convert(&yaml).is_ok(), "{name}: {:?}", convert(&yaml));
        }
        let errs = errors(&format!(
            "metadata: {{namespace: Shop, name: {:?}, labels: {{-bad: ok, good: \"not ok\"}}}}\nspec: {{podSelector: {{matchLabels: {{\"a/b/c\": x}}}}}}",
            format!("{long}e")
        ));
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(
            errs[0].starts_with("metadata.name: ")
                && errs[0].contains("must be no more than 253 characters"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("metadata.namespace: \"Shop\": a lowercase RFC 1123 label"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("metadata.labels: \"-bad\": name part"),
            "{errs:?}"
        );
        assert!(
            errs[3].starts_with("metadata.labels[good]: \"not ok\""),
            "{errs:?}"
        );
        assert!(
            errs[4].starts_with("spec.podSelector.matchLabels: \"a/b/c\": a valid label key"),
            "{errs:?}"
        );
        for name in ["Web", "web_1", "-web", "web.", "a..b"] {
            let e = errors(&format!(
                "metadata: {{name: {name:?}}}\nspec: {{podSelector: {{}}}}"
            ));
            assert!(
                e[0].starts_with(&format!(
                    "metadata.name: {name:?}: a lowercase RFC 1123 subdomain"
                )),
                "{e:?}"
            );
        }
    }

    /// Issue 12.9: ipBlock CIDRs as the v1.37 apiserver's strict validation checks them.
    #[test]
    fn ip_block_cidrs_are_strict() {
        let errs = errors(
            "metadata: {name: p}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: \"::ffff:10.0.0.0/104\"}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [010.1.0.0/16, 10.2.0.1/16]}\n",
        );
        assert_eq!(
            errs,
            vec![
                "spec.ingress[0].from[0].ipBlock.cidr: \"::ffff:10.0.0.0/104\" is not a valid CIDR: must not have an IPv4-mapped IPv6 address",
                "spec.ingress[0].from[1].ipBlock.except[0]: \"010.1.0.0/16\" is not a valid CIDR: must not have leading 0s in IP or prefix length",
                "spec.ingress[0].from[1].ipBlock.except[1]: \"10.2.0.1/16\" is not a valid CIDR: must not have bits set beyond the prefix length (the network is 10.2.0.0/16)",
            ]
        );
    }
}
