//! Policy objects of any supported kind into the model, one object at a time (for a
//! controller, which keeps the good ones in force) or a whole file at once (for palisadectl,
//! which refuses a file with any bad object).

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::networking::v1 as net;
use palisade_policy::{Policy, Warning};
use serde_json::Value;

use crate::documents::{self, typed, Document};
use crate::error::{LoadError, ObjectError, ObjectRef};
use crate::{netpol, tiered, Converted};

const NETWORKING_V1: &str = "networking.k8s.io/v1";
const POLICY_GROUP: &str = "policy.networking.k8s.io";
const KINDS: &str = "NetworkPolicy (networking.k8s.io/v1), ClusterNetworkPolicy \
    (policy.networking.k8s.io/v1alpha2 or v1beta1), AdminNetworkPolicy and \
    BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)";

/// The policies of a file, all valid.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub policies: Vec<Policy>,
    pub warnings: Vec<Warning>,
}

/// Converts one policy object of any supported kind, given as JSON (what a Kubernetes watch
/// of a dynamic object yields). Errors name the object by kind and name when it has them.
pub fn policy_from_value(value: &Value) -> Result<Converted, ObjectError> {
    let doc = Document {
        position: ObjectRef::Document {
            index: 1,
            item: None,
        },
        value: value.clone(),
    };
    policy_from_document(&doc)
}

/// Converts a typed NetworkPolicy, as a Kubernetes client hands it over.
pub fn policy_from_network_policy(np: &net::NetworkPolicy) -> Result<Converted, ObjectError> {
    let object = ObjectRef::Named {
        kind: "NetworkPolicy".into(),
        namespace: Some(
            np.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| netpol::DEFAULT_NAMESPACE.into()),
        ),
        name: np.metadata.name.clone().unwrap_or_default(),
    };
    netpol::network_policy(np, &object)
}

pub(crate) fn policy_from_document(doc: &Document) -> Result<Converted, ObjectError> {
    let (api_version, kind) = (doc.api_version(), doc.kind());
    let namespaced = kind == "NetworkPolicy";
    let object = doc.object_ref(namespaced.then_some(netpol::DEFAULT_NAMESPACE));
    if api_version.is_empty() || kind.is_empty() {
        return Err(ObjectError::new(
            object,
            "",
            "apiVersion and kind are required",
        ));
    }
    let version = api_version
        .strip_prefix(POLICY_GROUP)
        .and_then(|v| v.strip_prefix('/'));
    match (kind, api_version, version) {
        ("NetworkPolicy", NETWORKING_V1, _) => {
            let np: net::NetworkPolicy = typed(&doc.value, &object)?;
            netpol::network_policy(&np, &object)
        }
        ("ClusterNetworkPolicy", _, Some("v1alpha2" | "v1beta1")) => {
            tiered::cluster_network_policy(&doc.value, &object)
        }
        ("AdminNetworkPolicy", _, Some("v1alpha1")) => {
            tiered::admin_network_policy(&doc.value, &object)
        }
        ("BaselineAdminNetworkPolicy", _, Some("v1alpha1")) => {
            tiered::baseline_admin_network_policy(&doc.value, &object)
        }
        (
            "NetworkPolicy"
            | "ClusterNetworkPolicy"
            | "AdminNetworkPolicy"
            | "BaselineAdminNetworkPolicy",
            _,
            _,
        ) => Err(ObjectError::new(
            object,
            "apiVersion",
            format!("{kind} is not supported in {api_version:?}; supported: {KINDS}"),
        )),
        _ => Err(ObjectError::new(
            object,
            "kind",
            format!("unknown kind {kind:?} of apiVersion {api_version:?}; a policies file holds {KINDS}"),
        )),
    }
}

/// Converts every object of a policies file separately: the controller's view, where one bad
/// policy is skipped and the others stay in force. YAML that cannot be parsed is an error
/// entry of its own (and ends the reading).
pub fn parse_policies_each(text: &str) -> Vec<Result<Converted, ObjectError>> {
    let (docs, errors) = documents::split(text);
    docs.iter()
        .map(policy_from_document)
        .chain(errors.into_iter().map(Err))
        .collect()
}

/// Reads a whole policies file: every policy, or every error (never a part of the file).
/// `file` names the file in errors.
pub fn parse_policies(file: &str, text: &str) -> Result<Policies, LoadError> {
    let mut out = Policies::default();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for result in parse_policies_each(text) {
        match result {
            Ok(c) => {
                if !seen.insert(c.policy.id.clone()) {
                    errors.push(ObjectError::new(
                        ObjectRef::Named {
                            kind: c.policy.id.kind.to_string(),
                            namespace: c.policy.id.namespace.clone(),
                            name: c.policy.id.name.clone(),
                        },
                        "metadata.name",
                        "defined more than once",
                    ));
                    continue;
                }
                out.warnings.extend(c.warnings);
                out.policies.push(c.policy);
            }
            Err(e) => errors.push(e),
        }
    }
    LoadError::all_or_nothing(file, out, errors)
}

/// [`parse_policies`] of a file on disk; errors name the file as given.
pub fn load_policies(path: &Path) -> Result<Policies, LoadError> {
    LoadError::read_then(path, parse_policies)
}
