//! Issue 12.4: file input is as strict as `kubectl apply` with its default strict field
//! validation. An unknown field or a duplicate key is an error naming the object and the
//! field path, never a silently wider policy; and nothing the suites hold is refused.

use std::path::Path;

use palisade_resources::{load_scenario, parse_cluster_text, parse_policies};

const NP: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: a, name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: db}}
    ports:
    - {port: 80}
  egress:
  - to:
    - podSelector: {matchLabels: {app: db}}
";

fn error_of(text: &str) -> String {
    match parse_policies("policies.yaml", text) {
        Ok(p) => panic!("accepted: {:?}", p.policies),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_valid_policy_loads() {
    assert_eq!(
        parse_policies("policies.yaml", NP).unwrap().policies.len(),
        1
    );
}

#[test]
fn a_misspelt_selector_field_is_an_error_naming_its_path() {
    let e = error_of(&NP.replace(
        "- podSelector: {matchLabels: {app: db}}\n    ports",
        "- podSelector: {matchLabel: {app: db}}\n    ports",
    ));
    assert_eq!(
        e,
        "policies.yaml: NetworkPolicy a/web: spec.ingress[0].from[0].podSelector.matchLabel: unknown field"
    );
}

#[test]
fn a_rule_level_port_is_an_error_not_every_port() {
    let e = error_of(&NP.replace("    ports:\n    - {port: 80}\n", "    port: 80\n"));
    assert_eq!(
        e,
        "policies.yaml: NetworkPolicy a/web: spec.ingress[0].port: unknown field"
    );
}

#[test]
fn a_second_key_is_an_error_not_a_replacement() {
    let e = error_of(&NP.replace(
        "  policyTypes: [Ingress, Egress]\n",
        "  policyTypes: [Ingress, Egress]\n  policyTypes: [Ingress]\n",
    ));
    assert_eq!(
        e,
        "policies.yaml: NetworkPolicy a/web: spec.policyTypes: duplicate key"
    );
}

#[test]
fn cluster_objects_are_strict_too() {
    let pod = "apiVersion: v1
kind: Pod
metadata: {namespace: a, name: web, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.1.0.2}
";
    assert!(parse_cluster_text("cluster.yaml", pod).is_ok());
    let e = parse_cluster_text("cluster.yaml", &pod.replace("labels:", "label:")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cluster.yaml: Pod a/web: metadata.label: unknown field"
    );
    let e = parse_cluster_text(
        "cluster.yaml",
        &pod.replace("{podIP: 10.1.0.2}", "{podIP: 10.1.0.2, podIP: 10.1.0.3}"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cluster.yaml: Pod a/web: status.podIP: duplicate key"
    );
}

/// Strictness must not refuse what the suites hold (written as users write objects).
#[test]
fn every_conformance_scenario_still_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut loaded = 0;
    for dir in [
        root.join("../tests/conformance"),
        root.join("../../shared/conformance/examples"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.join("policies.yaml").exists() {
                load_scenario(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                loaded += 1;
            }
        }
    }
    assert!(loaded >= 90, "only {loaded} scenarios found");
}

/// The API serves the network-policy-api kinds with the status that implementations write
/// (Palisade's own condition among them): reading it back must not reject the policy.
#[test]
fn a_tiered_policy_with_status_conditions_loads() {
    let text = "apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: guard, generation: 2}
spec:
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - {name: x, action: Deny, from: [{namespaces: {}}]}
status:
  conditions:
  - {type: palisade.dev/Enforced, status: 'True', reason: Enforced, message: m,
     observedGeneration: 2, lastTransitionTime: '2026-12-01T00:00:00Z'}
";
    let loaded = parse_policies("policies.yaml", text).unwrap();
    assert_eq!(loaded.policies.len(), 1);
    let value: serde_json::Value = serde_yaml::from_str(text).unwrap();
    palisade_resources::policy_from_value(&value).expect("as the controller reads it");
}
