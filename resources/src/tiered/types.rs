//! The wire format of the cluster-scoped policy CRDs (kubernetes-sigs/network-policy-api):
//! `ClusterNetworkPolicy` v1alpha2 / v1beta1 and `AdminNetworkPolicy` /
//! `BaselineAdminNetworkPolicy` v1alpha1.
//!
//! Specs reject unknown fields, so a typo (`protocol:` for `protocols:`) is an error instead
//! of a silently wider rule. Peers are the exception: the API asks that a peer whose fields
//! are all unknown (a newer API version) fail closed, so peers keep their unknown fields for
//! the converter to judge.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::Value;

/// Any of the CRD objects; `apiVersion` and `kind` are not needed past dispatch.
#[derive(Debug, Deserialize)]
pub(crate) struct Object<S> {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<S>,
    /// Written by implementations (Palisade's own condition among them), never read: it is
    /// decoded as a value only so that strict decoding accepts it, as the API does.
    #[serde(default)]
    #[allow(dead_code)]
    pub status: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CnpSpec {
    pub tier: Option<String>,
    pub priority: Option<i64>,
    pub subject: Option<SubjectDoc>,
    pub ingress: Option<Vec<CnpIngressRule>>,
    pub egress: Option<Vec<CnpEgressRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AnpSpec {
    pub priority: Option<i64>,
    pub subject: Option<SubjectDoc>,
    pub ingress: Option<Vec<AnpIngressRule>>,
    pub egress: Option<Vec<AnpEgressRule>>,
}

/// BaselineAdminNetworkPolicy: no priority (there is only one, named `default`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct BanpSpec {
    pub subject: Option<SubjectDoc>,
    pub ingress: Option<Vec<AnpIngressRule>>,
    pub egress: Option<Vec<AnpEgressRule>>,
}

/// Exactly one field must be set.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SubjectDoc {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct NamespacedPod {
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CnpIngressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub from: Option<Vec<PeerDoc>>,
    pub protocols: Option<Vec<ProtocolDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CnpEgressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub to: Option<Vec<PeerDoc>>,
    pub protocols: Option<Vec<ProtocolDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AnpIngressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub from: Option<Vec<PeerDoc>>,
    pub ports: Option<Vec<AnpPortDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AnpEgressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub to: Option<Vec<PeerDoc>>,
    pub ports: Option<Vec<AnpPortDoc>>,
}

/// A peer of either direction; which fields a direction knows is the converter's business.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PeerDoc {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    pub nodes: Option<LabelSelector>,
    pub networks: Option<Vec<String>>,
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// ClusterNetworkPolicy `protocols[]`: exactly one field.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ProtocolDoc {
    pub tcp: Option<ProtocolPorts>,
    pub udp: Option<ProtocolPorts>,
    pub sctp: Option<ProtocolPorts>,
    pub destination_named_port: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ProtocolPorts {
    pub destination_port: Option<PortDoc>,
}

/// `number` or `range`, exactly one.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PortDoc {
    pub number: Option<i64>,
    pub range: Option<RangeDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RangeDoc {
    pub start: i64,
    pub end: i64,
}

/// v1alpha1 `ports[]`: exactly one field.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AnpPortDoc {
    pub port_number: Option<AnpPortNumber>,
    pub named_port: Option<String>,
    pub port_range: Option<AnpPortRange>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AnpPortNumber {
    pub protocol: Option<String>,
    pub port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AnpPortRange {
    pub protocol: Option<String>,
    pub start: i64,
    pub end: i64,
}
