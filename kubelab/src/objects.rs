//! Objects the e2e tests need, written through the API as a kubelet-less cluster allows: pods
//! get their addresses through the status subresource, and are deleted with grace period 0.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, Pod, PodSpec, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::lab::KubeLab;

/// The image of lab pods; never pulled, since no kubelet runs.
pub const POD_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// How long object helpers wait for the cluster to catch up (deletions, the `default`
/// ServiceAccount).
const WAIT: Duration = Duration::from_secs(60);

/// A pod as the e2e tests describe it.
#[derive(Clone, Debug, Default)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    /// Containers as (name, ports). Empty means one container `main` without ports.
    pub containers: Vec<(String, Vec<ContainerPort>)>,
    pub host_network: bool,
    /// `status.podIPs`, the first is `status.podIP`. Empty leaves the status unset.
    pub ips: Vec<IpAddr>,
    /// `status.hostIP(s)`, if known.
    pub host_ip: Option<IpAddr>,
    /// `spec.serviceAccountName`; a token bound to the pod must be for this account.
    pub service_account: Option<String>,
}

impl LabPod {
    pub fn new(namespace: &str, name: &str, node: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            ..Self::default()
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }

    pub fn host_ip(mut self, ip: IpAddr) -> Self {
        self.host_ip = Some(ip);
        self
    }

    pub fn service_account(mut self, name: &str) -> Self {
        self.service_account = Some(name.into());
        self
    }

    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    /// Adds a container with these ports.
    pub fn container(mut self, name: &str, ports: Vec<ContainerPort>) -> Self {
        self.containers.push((name.into(), ports));
        self
    }

    /// Adds a port to the last container (creating `main` if there is none).
    pub fn port(mut self, name: Option<&str>, port: i32, protocol: &str) -> Self {
        if self.containers.is_empty() {
            self.containers.push(("main".into(), Vec::new()));
        }
        if let Some((_, ports)) = self.containers.last_mut() {
            ports.push(container_port(name, port, protocol));
        }
        self
    }

    fn to_pod(&self) -> Pod {
        let mut containers: Vec<Container> = self
            .containers
            .iter()
            .map(|(name, ports)| Container {
                name: name.clone(),
                image: Some(POD_IMAGE.into()),
                ports: (!ports.is_empty()).then(|| ports.clone()),
                ..Container::default()
            })
            .collect();
        if containers.is_empty() {
            containers.push(Container {
                name: "main".into(),
                image: Some(POD_IMAGE.into()),
                ..Container::default()
            });
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.node.clone()),
                host_network: self.host_network.then_some(true),
                service_account_name: self.service_account.clone(),
                containers,
                ..PodSpec::default()
            }),
            status: None,
        }
    }
}

/// A container port; `protocol` is `TCP`, `UDP` or `SCTP`.
pub fn container_port(name: Option<&str>, port: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: name.map(str::to_string),
        container_port: port,
        protocol: Some(protocol.into()),
        ..ContainerPort::default()
    }
}

fn meta(name: &str, labels: &BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    }
}

/// A merge patch that makes `labels` exactly `new`: keys no longer wanted are set to null.
fn labels_patch(old: Option<&BTreeMap<String, String>>, new: &BTreeMap<String, String>) -> Value {
    let mut labels = serde_json::Map::new();
    for key in old.into_iter().flat_map(|m| m.keys()) {
        if !new.contains_key(key) {
            labels.insert(key.clone(), Value::Null);
        }
    }
    for (k, v) in new {
        labels.insert(k.clone(), Value::String(v.clone()));
    }
    json!({ "metadata": { "labels": labels } })
}

impl KubeLab {
    async fn api<K>(&self, namespace: &str) -> Result<Api<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Ok(Api::namespaced(self.client().await?, namespace))
    }

    /// Creates a namespace and waits for its `default` ServiceAccount (pods need it).
    pub async fn create_namespace(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Namespace> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns = api
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: meta(name, labels),
                    ..Namespace::default()
                },
            )
            .await?;
        self.wait_default_service_account(name).await?;
        Ok(ns)
    }

    /// Waits until the serviceaccount controller has created `default` in `namespace`.
    pub async fn wait_default_service_account(&self, namespace: &str) -> Result<()> {
        let api: Api<ServiceAccount> = self.api(namespace).await?;
        self.wait_until(&format!("ServiceAccount {namespace}/default"), || async {
            Ok(api.get_opt("default").await?.is_some())
        })
        .await
    }

    /// Sets the namespace's labels to exactly `labels`.
    pub async fn relabel_namespace(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Namespace> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let old = api.get(name).await?;
        let patch = labels_patch(old.metadata.labels.as_ref(), labels);
        Ok(api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?)
    }

    /// Deletes a namespace and waits until it is gone. Its pods are deleted first with grace
    /// period 0: the namespace controller deletes them gracefully, and with no kubelet to
    /// confirm, a running pod would stay Terminating and the namespace with it.
    pub async fn delete_namespace(&self, name: &str) -> Result<()> {
        let pods: Api<Pod> = self.api(name).await?;
        for pod in pods.list(&Default::default()).await? {
            self.delete_pod(name, &pod.name_any()).await?;
        }
        let api: Api<Namespace> = Api::all(self.client().await?);
        api.delete(name, &DeleteParams::default()).await?;
        self.wait_until(&format!("namespace {name} to disappear"), || async {
            Ok(api.get_opt(name).await?.is_none())
        })
        .await
    }

    /// Creates a Node with these InternalIP addresses (set through the status subresource,
    /// as a kubelet would) and labels.
    pub async fn create_node(
        &self,
        name: &str,
        internal_ips: &[IpAddr],
        labels: &BTreeMap<String, String>,
    ) -> Result<Node> {
        let api: Api<Node> = Api::all(self.client().await?);
        api.create(
            &PostParams::default(),
            &Node {
                metadata: meta(name, labels),
                ..Node::default()
            },
        )
        .await?;
        let addresses: Vec<Value> = internal_ips
            .iter()
            .map(|ip| json!({ "type": "InternalIP", "address": ip.to_string() }))
            .chain(std::iter::once(
                json!({ "type": "Hostname", "address": name }),
            ))
            .collect();
        let status = json!({ "status": { "addresses": addresses } });
        Ok(api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?)
    }

    /// Creates the pod, then (if it has addresses) sets its IPs and phase Running through the
    /// status subresource.
    pub async fn create_pod(&self, pod: &LabPod) -> Result<Pod> {
        let api: Api<Pod> = self.api(&pod.namespace).await?;
        let created = api.create(&PostParams::default(), &pod.to_pod()).await?;
        if pod.ips.is_empty() {
            return Ok(created);
        }
        self.set_pod_status(&pod.namespace, &pod.name, &pod.ips, pod.host_ip)
            .await
    }

    /// Sets `status.podIP(s)`, `hostIP(s)`, phase Running and the `Ready` condition, as a
    /// kubelet would; the endpointslice controller only lists ready pods as ready endpoints.
    pub async fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        ips: &[IpAddr],
        host_ip: Option<IpAddr>,
    ) -> Result<Pod> {
        let api: Api<Pod> = self.api(namespace).await?;
        let pod_ips: Vec<Value> = ips
            .iter()
            .map(|ip| json!({ "ip": ip.to_string() }))
            .collect();
        let mut status = json!({
            "phase": "Running",
            "podIP": ips.first().map(|ip| ip.to_string()),
            "podIPs": pod_ips,
            "conditions": [
                { "type": "ContainersReady", "status": "True" },
                { "type": "Ready", "status": "True" },
            ],
        });
        if let Some(host) = host_ip {
            status["hostIP"] = json!(host.to_string());
            status["hostIPs"] = json!([{ "ip": host.to_string() }]);
        }
        Ok(api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await?)
    }

    /// Sets the pod's labels to exactly `labels`.
    pub async fn relabel_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Pod> {
        let api: Api<Pod> = self.api(namespace).await?;
        let old = api.get(name).await?;
        let patch = labels_patch(old.metadata.labels.as_ref(), labels);
        Ok(api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?)
    }

    /// Deletes a pod with grace period 0 (nothing else would ever finish it) and waits until
    /// it is gone.
    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let api: Api<Pod> = self.api(namespace).await?;
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        api.delete(name, &params).await?;
        self.wait_until(&format!("pod {namespace}/{name} to disappear"), || async {
            Ok(api.get_opt(name).await?.is_none())
        })
        .await
    }

    pub async fn create_service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceAccount> {
        let api: Api<ServiceAccount> = self.api(namespace).await?;
        Ok(api
            .create(
                &PostParams::default(),
                &ServiceAccount {
                    metadata: meta(name, &BTreeMap::new()),
                    ..ServiceAccount::default()
                },
            )
            .await?)
    }

    /// A token for ServiceAccount `namespace/account`, bound to pod `namespace/pod` (so it
    /// dies with the pod and names the pod's node), for `audience`, valid `expiration`
    /// (at least 10 minutes, the apiserver's minimum).
    pub async fn pod_bound_token(
        &self,
        namespace: &str,
        account: &str,
        pod: &str,
        audience: &str,
        expiration: Duration,
    ) -> Result<String> {
        let pods: Api<Pod> = self.api(namespace).await?;
        let uid = pods.get(pod).await?.metadata.uid;
        let accounts: Api<ServiceAccount> = self.api(namespace).await?;
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.into()]),
                expiration_seconds: Some(expiration.as_secs() as i64),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.into()),
                    uid,
                }),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let response = accounts
            .create_token_request(account, &PostParams::default(), &request)
            .await?;
        response
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Other(format!(
                    "TokenRequest for {namespace}/{account} returned no token"
                ))
            })
    }

    /// Reviews `token` for `audiences` as the controller would, and returns the status.
    pub async fn token_review(&self, token: &str, audiences: &[&str]) -> Result<TokenReviewStatus> {
        let api: Api<TokenReview> = Api::all(self.client().await?);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.into(),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..TokenReview::default()
        };
        let result = api.create(&PostParams::default(), &review).await?;
        Ok(result.status.unwrap_or_default())
    }

    /// Polls `done` every 100 ms for up to a minute.
    pub async fn wait_until<F, Fut>(&self, what: &str, done: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let log = self.log_path("kube-controller-manager");
        self.wait_for_within(what, &log, WAIT, done).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relabel_patch_removes_dropped_keys_and_sets_the_rest() {
        let old: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        let new: BTreeMap<String, String> =
            [("b".into(), "3".into()), ("c".into(), "4".into())].into();
        assert_eq!(
            labels_patch(Some(&old), &new),
            json!({ "metadata": { "labels": { "a": null, "b": "3", "c": "4" } } })
        );
    }

    #[test]
    fn a_pod_without_containers_gets_one_and_ports_land_in_the_last_container() {
        let pod = LabPod::new("ns", "p", "node-1")
            .container("a", vec![])
            .port(Some("http"), 80, "TCP")
            .to_pod();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.containers.len(), 1);
        let ports = spec.containers[0].ports.clone().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(
            LabPod::new("ns", "q", "n")
                .to_pod()
                .spec
                .unwrap()
                .containers[0]
                .name,
            "main"
        );
    }
}
