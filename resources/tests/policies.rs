//! Policy files of every supported kind: conversion and the errors for bad input.

use palisade_policy::{
    Action, LabelSelector, NamespaceScope, Peer, PolicyKind, PortRule, PortSpec, Protocol, Subject,
    Tier,
};
use palisade_resources::{parse_policies, parse_policies_each, policy_from_value};

fn errors(yaml: &str) -> Vec<String> {
    match parse_policies("policies.yaml", yaml) {
        Ok(p) => panic!("expected errors, got {:?}", p.policies),
        Err(e) => e.to_string().lines().map(String::from).collect(),
    }
}

const CNP: &str = r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: cnp}
spec:
  tier: Admin
  priority: 10
  subject:
    pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: db}}}
  ingress:
    - name: from-pci
      action: Accept
      from: [{namespaces: {matchLabels: {pci: "true"}}}]
      protocols: [{tcp: {destinationPort: {number: 5432}}}, {udp: {destinationPort: {range: {start: 1000, end: 2000}}}}]
    - action: Pass
      from: [{pods: {podSelector: {}}}]
  egress:
    - name: out
      action: Deny
      to:
        - networks: [10.0.0.0/8, "fd00::/8"]
        - nodes: {matchLabels: {role: infra}}
        - domainNames: [example.com]
    - action: Accept
      to: [{namespaces: {}}]
      protocols: [{destinationNamedPort: metrics}]
"#;

#[test]
fn cluster_network_policy_converts() {
    let out = parse_policies("policies.yaml", CNP).unwrap();
    let p = &out.policies[0];
    assert_eq!(p.id.kind, PolicyKind::ClusterNetworkPolicy);
    assert_eq!(p.id.namespace, None);
    assert_eq!((p.tier, p.priority), (Tier::Admin, 10));
    assert_eq!(
        p.subject,
        Subject::Cluster {
            namespaces: LabelSelector::with_labels([("env", "prod")]),
            pods: LabelSelector::with_labels([("app", "db")]),
        }
    );
    let r = &p.ingress[0];
    assert_eq!(r.name.as_deref(), Some("from-pci"));
    assert_eq!(r.action, Action::Allow);
    assert_eq!(
        r.peers,
        Some(vec![Peer::Pods {
            namespaces: NamespaceScope::Selector(LabelSelector::with_labels([("pci", "true")])),
            pods: LabelSelector::everything(),
        }])
    );
    assert_eq!(
        r.ports,
        Some(vec![
            PortRule {
                protocol: Protocol::Tcp,
                port: PortSpec::Range {
                    start: 5432,
                    end: 5432
                }
            },
            PortRule {
                protocol: Protocol::Udp,
                port: PortSpec::Range {
                    start: 1000,
                    end: 2000
                }
            },
        ])
    );
    assert_eq!(p.ingress[1].action, Action::Pass);
    assert_eq!(p.ingress[1].name, None);
    assert_eq!(p.ingress[1].ports, None, "no protocols: every port");

    let e = &p.egress[0];
    assert_eq!(
        e.peers,
        Some(vec![
            Peer::IpBlock {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec![]
            },
            Peer::IpBlock {
                cidr: "fd00::/8".parse().unwrap(),
                except: vec![]
            },
            Peer::Nodes(LabelSelector::with_labels([("role", "infra")])),
            Peer::Nothing,
        ])
    );
    assert_eq!(
        p.egress[1].ports,
        Some(
            [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .into_iter()
                .map(|protocol| PortRule {
                    protocol,
                    port: PortSpec::Named("metrics".into())
                })
                .collect()
        )
    );
    assert_eq!(out.warnings.len(), 1);
    assert_eq!(
        out.warnings[0].to_string(),
        "ClusterNetworkPolicy cnp: spec.egress[0].to[2].domainNames: domainNames is not enforced yet; the rule fails closed"
    );
}

#[test]
fn v1alpha2_reads_like_v1beta1() {
    let a = parse_policies("p", &CNP.replace("v1beta1", "v1alpha2")).unwrap();
    let b = parse_policies("p", CNP).unwrap();
    assert_eq!(a.policies, b.policies);
}

#[test]
fn unknown_peer_fields_fail_closed_with_a_warning() {
    let out = parse_policies(
        "p",
        r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: future}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  ingress:
    - action: Pass
      from: [{serviceAccounts: {name: x}}, {networks: [10.0.0.0/8]}]
"#,
    )
    .unwrap();
    let p = &out.policies[0];
    assert_eq!(p.tier, Tier::Baseline);
    assert_eq!(p.ingress[0].peers, Some(vec![Peer::Nothing, Peer::Nothing]));
    let w: Vec<String> = out.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        vec![
            "ClusterNetworkPolicy future: spec.ingress[0].from[0]: no field known to an ingress peer (found serviceAccounts); the peer matches nothing (the rule fails closed)",
            "ClusterNetworkPolicy future: spec.ingress[0].from[1]: no field known to an ingress peer (found networks); the peer matches nothing (the rule fails closed)",
        ]
    );
}

#[test]
fn v1alpha1_admin_and_baseline_policies() {
    let out = parse_policies(
        "p",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: anp}
spec:
  priority: 3
  subject: {namespaces: {matchLabels: {a: b}}}
  egress:
    - name: e
      action: Pass
      to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {x: y}}}}]
      ports:
        - portNumber: {port: 53, protocol: UDP}
        - portNumber: {port: 80}
        - namedPort: web
        - portRange: {protocol: SCTP, start: 10, end: 20}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {pods: {namespaceSelector: {}, podSelector: {}}}
  ingress:
    - action: Deny
      from: [{namespaces: {}}]
"#,
    )
    .unwrap();
    let anp = &out.policies[0];
    assert_eq!(anp.id.kind, PolicyKind::AdminNetworkPolicy);
    assert_eq!((anp.tier, anp.priority), (Tier::Admin, 3));
    assert_eq!(anp.egress[0].action, Action::Pass);
    let ports = anp.egress[0].ports.clone().unwrap();
    assert_eq!(ports.len(), 6);
    assert_eq!(
        ports[0],
        PortRule {
            protocol: Protocol::Udp,
            port: PortSpec::Range { start: 53, end: 53 }
        }
    );
    assert_eq!(
        ports[1],
        PortRule {
            protocol: Protocol::Tcp,
            port: PortSpec::Range { start: 80, end: 80 }
        }
    );
    assert_eq!(ports[2].port, PortSpec::Named("web".into()));
    assert_eq!(
        ports[5],
        PortRule {
            protocol: Protocol::Sctp,
            port: PortSpec::Range { start: 10, end: 20 }
        }
    );
    let banp = &out.policies[1];
    assert_eq!(banp.id.kind, PolicyKind::BaselineAdminNetworkPolicy);
    assert_eq!((banp.tier, banp.priority), (Tier::Baseline, 0));
    assert_eq!(banp.ingress[0].action, Action::Deny);
}

#[test]
fn tiered_validation_errors() {
    let rules: String = (0..26)
        .map(|_| "    - {action: Deny, from: [{namespaces: {}}]}\n")
        .collect();
    let yaml = format!(
        r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {{name: bad}}
spec:
  tier: Admin
  priority: 1001
  subject: {{namespaces: {{}}}}
  egress:
    - {{action: Allow, to: [{{namespaces: {{}}}}]}}
    - {{action: Deny, to: []}}
    - action: Deny
      to: [{{networks: [10.0.0.0/40]}}, {{namespaces: {{}}, pods: {{podSelector: {{}}}}}}]
      protocols: [{{tcp: {{destinationPort: {{range: {{start: 90, end: 80}}}}}}}}, {{udp: {{destinationPort: {{number: 0}}}}}}, {{tcp: {{}}, udp: {{}}}}]
    - action: Deny
      to: [{{nodes: {{}}}}]
      protocols: [{{destinationNamedPort: web}}]
  ingress:
{rules}"#
    );
    assert_eq!(
        errors(&yaml),
        vec![
            "policies.yaml: ClusterNetworkPolicy bad: spec.priority: 1001 is out of range 0..=1000",
            "policies.yaml: ClusterNetworkPolicy bad: spec.ingress: 26 rules; at most 25 are allowed",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[0].action: unknown action \"Allow\": ClusterNetworkPolicy says Accept (expected Accept, Deny or Pass)",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[1].to: must list at least one peer",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[2].to[0].networks[0]: \"10.0.0.0/40\" is not a valid CIDR: expected e.g. 10.0.0.0/8 or fd00::/64",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[2].to[1]: exactly one of namespaces, pods, nodes, networks and domainNames must be set (found namespaces, pods)",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[2].protocols[0].tcp.destinationPort.range: start 90 must be less than end 80",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[2].protocols[1].udp.destinationPort.number: port 0 is out of range 1..=65535",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[2].protocols[2]: exactly one of tcp, udp, sctp and destinationNamedPort must be set",
            "policies.yaml: ClusterNetworkPolicy bad: spec.egress[3]: a named port cannot be used with networks or nodes peers, which have no named ports",
        ]
    );
}

#[test]
fn v1alpha1_validation_errors() {
    let errs = errors(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: other}
spec:
  subject: {namespaces: {}}
  ingress:
    - {action: Pass, from: [{namespaces: {}}]}
    - {action: Deny, from: [{namespaces: {}}], ports: [{portRange: {start: 5, end: 5}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: anp}
spec:
  subject: {namespaces: {}, pods: {podSelector: {}}}
  egress:
    - {action: Accept, to: [{namespaces: {}}]}
    - {action: Deny}
"#,
    );
    assert_eq!(
        errs,
        vec![
            "policies.yaml: BaselineAdminNetworkPolicy other: metadata.name: \"other\": the BaselineAdminNetworkPolicy is a singleton named \"default\"",
            "policies.yaml: BaselineAdminNetworkPolicy other: spec.ingress[0].action: Pass is not allowed in a BaselineAdminNetworkPolicy (expected Allow or Deny)",
            "policies.yaml: BaselineAdminNetworkPolicy other: spec.ingress[1].ports[0].portRange: start 5 must be less than end 5",
            "policies.yaml: AdminNetworkPolicy anp: spec.priority: required (0..=1000)",
            "policies.yaml: AdminNetworkPolicy anp: spec.subject: exactly one of namespaces and pods must be set",
            "policies.yaml: AdminNetworkPolicy anp: spec.egress[0].action: unknown action \"Accept\": AdminNetworkPolicy says Allow (expected Allow, Deny or Pass)",
            "policies.yaml: AdminNetworkPolicy anp: spec.egress[1].to: required: at least one peer",
        ]
    );
}

#[test]
fn unknown_spec_fields_and_type_errors_name_the_path() {
    let errs = errors(
        r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: typo}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress:
    - {action: Deny, from: [{namespaces: {}}], protocol: [{tcp: {destinationPort: {number: 80}}}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: shop}
spec:
  ingress: [{ports: [{port: [80]}]}]
"#,
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("policies.yaml: ClusterNetworkPolicy typo: spec.ingress[0].protocol: unknown field `protocol`"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1]
            .starts_with("policies.yaml: NetworkPolicy shop/np: spec.ingress[0].ports[0].port: "),
        "{}",
        errs[1]
    );
}

#[test]
fn unknown_kinds_and_versions_are_clear_errors() {
    let errs = errors(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: ClusterNetworkPolicy
metadata: {name: c}
---
kind: NetworkPolicy
---
- a list
"#,
    );
    assert!(errs[0].starts_with("policies.yaml: ConfigMap c: kind: unknown kind \"ConfigMap\" of apiVersion \"v1\"; a policies file holds NetworkPolicy"), "{}", errs[0]);
    assert!(errs[1].starts_with("policies.yaml: ClusterNetworkPolicy c: apiVersion: ClusterNetworkPolicy is not supported in \"policy.networking.k8s.io/v1alpha1\""), "{}", errs[1]);
    assert_eq!(
        errs[2],
        "policies.yaml: document 3: apiVersion and kind are required"
    );
    assert!(errs[3].starts_with("policies.yaml: document 4: expected a Kubernetes object"));
}

#[test]
fn unparsable_yaml_names_the_document_and_rejects_the_file() {
    let errs = errors(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ok}\nspec: {}\n---\nspec: {podSelector: [}\n",
    );
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("policies.yaml: document 2: unparsable YAML: "),
        "{}",
        errs[0]
    );
}

#[test]
fn duplicate_policies_are_an_error() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec: {}\n";
    let errs = errors(&format!("{np}---\n{np}"));
    assert_eq!(
        errs,
        vec!["policies.yaml: NetworkPolicy x/a: metadata.name: defined more than once"]
    );
}

#[test]
fn each_object_converts_on_its_own_for_a_controller() {
    let yaml = format!(
        "{CNP}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec: {{ingress: [{{ports: [{{port: 0}}]}}]}}\n"
    );
    let results = parse_policies_each(&yaml);
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(
        err.to_string(),
        "NetworkPolicy x/bad: spec.ingress[0].ports[0].port: port 0 is out of range 1..=65535"
    );

    let value = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "np"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
    });
    let c = policy_from_value(&value).unwrap();
    assert_eq!(c.policy.id.namespace.as_deref(), Some("default"));
    assert!(c.policy.isolates.egress && !c.policy.isolates.ingress);
}

/// Issue 12.9, the CRD kinds: names are DNS-1123 subdomains (apiextensions validates custom
/// resources' metadata with NameIsDNSSubdomain); `networks` follow the CRDs' CEL rules
/// (v1beta1/v1alpha2: `isCIDR(self) && cidr(self) == cidr(self).masked()`, v1alpha1: only
/// `isCIDR(self)`; both refuse IPv4-mapped addresses and leading zeros); selectors are
/// checked by the schema only, which takes any string, so bad label syntax is a warning.
#[test]
fn tiered_names_networks_and_selectors_as_the_crds_check_them() {
    let cnp = |name: &str, networks: &str, selector: &str| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name:?}}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {selector}}}\n  egress:\n  - action: Deny\n    to: [{{networks: {networks}}}]\n"
        )
    };
    let ok = parse_policies(
        "p",
        &cnp(
            "deny.example-1",
            "[10.0.0.0/8, \"fd00::/64\"]",
            "{matchLabels: {\"bad key\": x}}",
        ),
    )
    .expect("the apiserver accepts this object");
    let w: Vec<String> = ok.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("ClusterNetworkPolicy deny.example-1: spec.subject.namespaces.matchLabels: \"bad key\": name part must consist of"),
        "{w:?}"
    );

    let errs = errors(&cnp(
        "Deny_All",
        "[10.0.0.1/8, \"::ffff:10.0.0.0/104\", 010.0.0.0/8]",
        "{}",
    ));
    assert_eq!(
        errs,
        vec![
            "policies.yaml: ClusterNetworkPolicy Deny_All: metadata.name: \"Deny_All\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')",
            "policies.yaml: ClusterNetworkPolicy Deny_All: spec.egress[0].to[0].networks[0]: \"10.0.0.1/8\" is not a valid CIDR: must not have bits set beyond the prefix length (the network is 10.0.0.0/8)",
            "policies.yaml: ClusterNetworkPolicy Deny_All: spec.egress[0].to[0].networks[1]: \"::ffff:10.0.0.0/104\" is not a valid CIDR: must not have an IPv4-mapped IPv6 address",
            "policies.yaml: ClusterNetworkPolicy Deny_All: spec.egress[0].to[0].networks[2]: \"010.0.0.0/8\" is not a valid CIDR: must not have leading 0s in IP or prefix length",
        ]
    );

    // v1alpha1's `isCIDR` alone takes host bits: the network is meant.
    let anp = parse_policies(
        "p",
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: a}\nspec:\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - action: Deny\n    to: [{networks: [10.0.0.1/8]}]\n",
    )
    .expect("v1alpha1 networks take host bits");
    assert_eq!(
        anp.policies[0].egress[0].peers,
        Some(vec![Peer::IpBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec![]
        }])
    );
}

/// The enforcement annotation is read on every kind, through files and API objects alike;
/// an unknown value is a warning naming the field and the policy is enforced; other
/// annotations change nothing.
#[test]
fn enforcement_annotation_on_every_kind() {
    use palisade_policy::Enforcement;
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: shop, annotations: {palisade.dev/enforcement: audit, other: x}}
spec: {podSelector: {}}
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: cnp, annotations: {palisade.dev/enforcement: enforce}}
spec: {tier: Admin, priority: 1, subject: {namespaces: {}}}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: anp, annotations: {palisade.dev/enforcement: audit}}
spec: {priority: 1, subject: {namespaces: {}}}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default, annotations: {palisade.dev/enforcement: "off"}}
spec: {subject: {namespaces: {}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: plain, namespace: shop}
spec: {podSelector: {}}
"#;
    let out = parse_policies("p", text).unwrap();
    let modes: Vec<(String, Option<Enforcement>)> = out
        .policies
        .iter()
        .map(|p| (p.id.name.clone(), p.enforcement))
        .collect();
    assert_eq!(
        modes,
        vec![
            ("np".into(), Some(Enforcement::Audit)),
            ("cnp".into(), Some(Enforcement::Enforce)),
            ("anp".into(), Some(Enforcement::Audit)),
            ("default".into(), Some(Enforcement::Enforce)),
            ("plain".into(), None),
        ]
    );
    let w: Vec<String> = out.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        vec![
            "BaselineAdminNetworkPolicy default: metadata.annotations[palisade.dev/enforcement]: unknown value \"off\" (audit or enforce); the policy is enforced"
        ]
    );
    // The API path converts the same objects the same way.
    for doc in text.split("---") {
        let value: serde_json::Value = serde_yaml::from_str(doc).unwrap();
        let converted = policy_from_value(&value).unwrap();
        assert!(out.policies.contains(&converted.policy), "{doc}");
    }
    // Churn in other annotations is no change.
    let churned = text.replace("other: x", "other: y");
    assert_eq!(
        parse_policies("p", &churned).unwrap().policies,
        out.policies
    );
}
