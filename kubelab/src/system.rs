//! Palisade on a lab control plane: the chart's ServiceAccounts and RBAC (rendered by
//! `helm template`), a kubeconfig with the controller's own ServiceAccount token, each
//! node's agent pod with a token bound to it, and the objects of a Palisade cluster model.
//! Shared by the controller's e2e tests and `palisadectl verify --api` / `demo --api`, so
//! that both install and authenticate the system the same way.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use palisade_policy::Labels;

use crate::error::{io, Error, Result};
use crate::lab::KubeLab;
use crate::objects::{container_port, LabPod};

/// Where the chart installs Palisade.
pub const SYSTEM_NS: &str = "palisade-system";
pub const CONTROLLER_ACCOUNT: &str = "palisade-controller";
pub const AGENT_ACCOUNT: &str = "palisade-agent";
/// The Kubernetes version the chart is rendered for (the lab's).
pub const KUBE_VERSION: &str = "v1.37.2";

/// The name of the host-network agent pod on `node`, in [`SYSTEM_NS`].
pub fn agent_pod_name(node: &str) -> String {
    format!("agent-{node}")
}

/// Labels as the API writes them.
pub fn string_labels(labels: &Labels) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The API pod for a model pod. The model keeps a pod's ports but not its containers; port
/// names are unique only within a container, so a port goes into the first container that
/// has neither its name nor its number yet, and two ports sharing a name land in two
/// containers, which the apiserver accepts as it would from a real pod.
pub fn lab_pod(pod: &palisade_policy::Pod) -> LabPod {
    let mut p = LabPod::new(&pod.namespace, &pod.name, &pod.node).host_network(pod.host_network);
    for (k, v) in pod.labels.iter() {
        p = p.label(k, v);
    }
    for ip in &pod.ips {
        p = p.ip(*ip);
    }
    for port in &pod.ports {
        let clashes = |ports: &Vec<k8s_openapi::api::core::v1::ContainerPort>| {
            ports.iter().any(|c| {
                (c.name.is_some() && c.name == port.name)
                    || (c.container_port == i32::from(port.port)
                        && c.protocol.as_deref() == Some(port.protocol.as_str()))
            })
        };
        let api_port = container_port(
            port.name.as_deref(),
            port.port.into(),
            port.protocol.as_str(),
        );
        match p.containers.iter_mut().find(|(_, ports)| !clashes(ports)) {
            Some((_, ports)) => ports.push(api_port),
            None => {
                let name = if p.containers.is_empty() {
                    "main".to_string()
                } else {
                    format!("c{}", p.containers.len())
                };
                p = p.container(&name, vec![api_port]);
            }
        }
    }
    if pod.host_network {
        if let Some(ip) = pod.ips.first() {
            p = p.host_ip(*ip);
        }
    }
    p
}

/// A kubeconfig for `server` that authenticates with a bearer token.
pub fn token_kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubelab\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: kubelab\n  context:\n    cluster: kubelab\n    user: {user}\n\
         current-context: kubelab\n"
    )
}

impl KubeLab {
    /// `helm template` of the chart in `chart_dir`, for [`SYSTEM_NS`], with the lab's helm.
    pub fn render_chart(&self, chart_dir: &Path) -> Result<String> {
        let helm = self.bin_dir().join("helm");
        let out = Command::new(&helm)
            .args(["template", "palisade"])
            .arg(chart_dir)
            .args(["--namespace", SYSTEM_NS, "--kube-version", KUBE_VERSION])
            .output()
            .map_err(io(format!("run {}", helm.display())))?;
        if !out.status.success() {
            return Err(Error::Other(format!(
                "helm template {}: {}",
                chart_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8(out.stdout).map_err(|e| Error::Other(format!("helm output: {e}")))
    }

    /// Renders the chart and applies every object of it (all must be accepted) into a fresh
    /// [`SYSTEM_NS`]; returns the rendered text.
    pub async fn install_chart(&self, chart_dir: &Path) -> Result<String> {
        let text = self.render_chart(chart_dir)?;
        self.create_namespace(SYSTEM_NS, &BTreeMap::new()).await?;
        self.apply_yaml(&text).await?;
        Ok(text)
    }

    /// A token of ServiceAccount `namespace/account` for the API itself (not bound to a
    /// pod), valid for `expiration`.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        account: &str,
        expiration: Duration,
    ) -> Result<String> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(expiration.as_secs() as i64),
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
            .ok_or_else(|| Error::Other(format!("no token for {namespace}/{account}")))
    }

    /// Writes `path`: a kubeconfig for this apiserver as the controller's ServiceAccount
    /// (what the chart's RBAC grants, nothing more).
    pub async fn write_controller_kubeconfig(&self, path: &Path) -> Result<()> {
        let token = self
            .service_account_token(
                SYSTEM_NS,
                CONTROLLER_ACCOUNT,
                Duration::from_secs(24 * 3600),
            )
            .await?;
        let text = token_kubeconfig(self.url(), self.ca_pem(), CONTROLLER_ACCOUNT, &token);
        std::fs::write(path, text).map_err(io(format!("write {}", path.display())))
    }

    /// Creates `node`'s agent pod (host network, on `address`) unless it exists, and returns
    /// a token of the agent's ServiceAccount bound to that pod: the controller serves a
    /// stream with it only the rules of that node.
    pub async fn agent_token(&self, node: &str, address: IpAddr) -> Result<String> {
        let pod_name = agent_pod_name(node);
        let api: Api<Pod> = Api::namespaced(self.client().await?, SYSTEM_NS);
        if api.get_opt(&pod_name).await?.is_none() {
            self.create_pod(
                &LabPod::new(SYSTEM_NS, &pod_name, node)
                    .service_account(AGENT_ACCOUNT)
                    .host_network(true)
                    .ip(address)
                    .host_ip(address),
            )
            .await?;
        }
        self.pod_bound_token(
            SYSTEM_NS,
            AGENT_ACCOUNT,
            &pod_name,
            self.token_audience(),
            Duration::from_secs(24 * 3600),
        )
        .await
    }

    /// The namespace, if it exists.
    pub async fn namespace(&self, name: &str) -> Result<Option<Namespace>> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        Ok(api.get_opt(name).await?)
    }

    /// Deletes a Node (nothing holds it: there is no kubelet); a Node already gone is fine.
    pub async fn delete_node(&self, name: &str) -> Result<()> {
        let api: Api<Node> = Api::all(self.client().await?);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        self.wait_until(&format!("node {name} to disappear"), || async {
            Ok(api.get_opt(name).await?.is_none())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::{ContainerPort, Protocol};

    fn port(name: Option<&str>, port: u16, protocol: Protocol) -> ContainerPort {
        ContainerPort {
            name: name.map(str::to_string),
            port,
            protocol,
        }
    }

    #[test]
    fn ports_sharing_a_name_or_number_go_to_separate_containers() {
        let pod = palisade_policy::Pod {
            namespace: "x".into(),
            name: "a".into(),
            labels: Labels::default(),
            node: "node-1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            host_network: false,
            ports: vec![
                port(Some("web"), 80, Protocol::Tcp),
                port(Some("web"), 8080, Protocol::Tcp),
                port(None, 53, Protocol::Udp),
                port(None, 53, Protocol::Tcp),
                port(Some("dns"), 53, Protocol::Udp),
            ],
        };
        let p = lab_pod(&pod);
        type Layout = Vec<(String, Vec<(Option<String>, i32)>)>;
        let layout: Layout = p
            .containers
            .iter()
            .map(|(n, ports)| {
                (
                    n.clone(),
                    ports
                        .iter()
                        .map(|c| (c.name.clone(), c.container_port))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            layout,
            vec![
                (
                    "main".to_string(),
                    vec![(Some("web".into()), 80), (None, 53), (None, 53),]
                ),
                (
                    "c1".to_string(),
                    vec![(Some("web".into()), 8080), (Some("dns".into()), 53)]
                ),
            ]
        );
    }
}
