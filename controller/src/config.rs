//! The controller's configuration: defaults < `--config` YAML file <
//! `PALISADE_CONTROLLER_*` environment variables < command-line flags (figment).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// Kubeconfig to reach the API server; unset: in-cluster config or `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Cluster-state and policies files to read instead of the API server (with
    /// `node_tokens`).
    pub cluster: Option<PathBuf>,
    pub policies: Option<PathBuf>,
    /// `node: token` YAML map authenticating agents when there is no API server.
    pub node_tokens: Option<PathBuf>,
    /// The agents' gRPC stream (TLS).
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// Who may read the metrics: `loopback` (plain HTTP, loopback address only), `secure`
    /// (TLS with the stream's certificate, bearer tokens checked by TokenReview and
    /// SubjectAccessReview) or `insecure` (plain HTTP on any address). Unset: loopback on
    /// a loopback address, else secure.
    pub metrics_mode: Option<palisade_httpd::Mode>,
    /// The only ServiceAccount (`NAMESPACE:NAME`) whose tokens may read node rules.
    pub agent_service_account: String,
    /// The audience agents' tokens must be issued for.
    pub token_audience: String,
    /// The shortest time between two publications: a burst of changes within it is
    /// compiled and sent as one.
    pub min_interval_ms: u64,
    /// Where the status writer's Lease lives.
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the host name).
    pub identity: Option<String>,
    /// Milliseconds between checks of the files, for the file source.
    pub poll_interval_ms: u64,
    /// The mode (`audit` or `enforce`) of a policy that neither its
    /// `palisade.dev/enforcement` annotation nor (NetworkPolicies) its namespace's label
    /// of that name sets.
    pub default_enforcement: palisade_policy::Enforcement,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            kubeconfig: None,
            cluster: None,
            policies: None,
            node_tokens: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 9470)),
            tls_cert: None,
            tls_key: None,
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9471)),
            metrics_mode: None,
            agent_service_account: "palisade-system:palisade-agent".into(),
            token_audience: "palisade".into(),
            min_interval_ms: 100,
            lease_namespace: "palisade-system".into(),
            lease_name: "palisade-controller".into(),
            identity: None,
            poll_interval_ms: 500,
            default_enforcement: palisade_policy::Enforcement::Enforce,
        }
    }
}

#[derive(Clone, Debug, Default, Parser, Serialize)]
#[command(
    name = "palisade-controller",
    version,
    about = "Compiles the cluster's network policies and streams each node its rule set"
)]
pub struct Flags {
    /// YAML configuration file (keys as the long flags, with underscores).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Cluster-state file instead of the API server (with --policies and --node-tokens).
    #[arg(long, requires_all = ["policies", "node_tokens"], conflicts_with = "kubeconfig")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<PathBuf>,
    #[arg(long, requires = "cluster")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<PathBuf>,
    #[arg(long, requires = "cluster")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_tokens: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// loopback, secure or insecure (default: loopback on a loopback --metrics-addr, else
    /// secure).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_mode: Option<palisade_httpd::Mode>,
    #[arg(long, value_name = "NAMESPACE:NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_service_account: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_audience: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_interval_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_namespace: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The mode of policies that do not set one: audit or enforce (default enforce).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_enforcement: Option<palisade_policy::Enforcement>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("the agents' stream is TLS: give --tls-cert and --tls-key")]
    NoTls,
    #[error("agent_service_account must be NAMESPACE:NAME, not {0:?}")]
    ServiceAccount(String),
    #[error("the file source needs cluster, policies and node_tokens together")]
    PartialFileSource,
}

impl ControllerConfig {
    pub fn service_account(&self) -> (&str, &str) {
        self.agent_service_account
            .split_once(':')
            .expect("checked by resolve")
    }

    pub fn files(&self) -> Option<(&PathBuf, &PathBuf, &PathBuf)> {
        Some((
            self.cluster.as_ref()?,
            self.policies.as_ref()?,
            self.node_tokens.as_ref()?,
        ))
    }
}

impl Flags {
    pub fn resolve(&self) -> Result<ControllerConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(ControllerConfig::default()));
        if let Some(path) = &self.config {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.clone()));
            }
            fig = fig.merge(Yaml::file(path));
        }
        let cfg: ControllerConfig = fig
            .merge(Env::prefixed("PALISADE_CONTROLLER_"))
            .merge(Serialized::defaults(self))
            .extract()
            .map_err(Box::new)?;
        if cfg.tls_cert.is_none() || cfg.tls_key.is_none() {
            return Err(ConfigError::NoTls);
        }
        match cfg.agent_service_account.split_once(':') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {}
            _ => return Err(ConfigError::ServiceAccount(cfg.agent_service_account)),
        }
        let some = [&cfg.cluster, &cfg.policies, &cfg.node_tokens]
            .iter()
            .filter(|o| o.is_some())
            .count();
        if some != 0 && some != 3 {
            return Err(ConfigError::PartialFileSource);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use palisade_policy::Enforcement;

    #[test]
    fn default_enforcement_from_file_env_and_flag() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "controller.yaml",
                "tls_cert: c.pem\ntls_key: k.pem\ndefault_enforcement: audit\n",
            )?;
            let flags =
                Flags::try_parse_from(["palisade-controller", "--config", "controller.yaml"])
                    .map_err(|e| e.to_string())?;
            let mode = |f: &Flags| {
                f.resolve()
                    .map(|c| c.default_enforcement)
                    .map_err(|e| e.to_string())
            };
            assert_eq!(mode(&flags)?, Enforcement::Audit);
            jail.set_env("PALISADE_CONTROLLER_DEFAULT_ENFORCEMENT", "enforce");
            assert_eq!(mode(&flags)?, Enforcement::Enforce);
            let flags = Flags::try_parse_from([
                "palisade-controller",
                "--config",
                "controller.yaml",
                "--default-enforcement",
                "audit",
            ])
            .map_err(|e| e.to_string())?;
            assert_eq!(mode(&flags)?, Enforcement::Audit);
            assert!(
                Flags::try_parse_from(["palisade-controller", "--default-enforcement", "on"])
                    .is_err()
            );
            assert_eq!(
                ControllerConfig::default().default_enforcement,
                Enforcement::Enforce
            );
            Ok(())
        });
    }
}
