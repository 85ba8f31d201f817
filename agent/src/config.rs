//! The agent's configuration: defaults < `--config` YAML file < `PALISADE_*` environment
//! variables < command-line flags (figment).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The node's rule set (`NodeRuleSet`, JSON or YAML), re-read when it changes.
    pub rules: Option<PathBuf>,
    /// Cluster state (Kubernetes YAML) to compile the node's rule set from, with `policies`
    /// and `node`, instead of `rules`.
    pub cluster: Option<PathBuf>,
    pub policies: Option<PathBuf>,
    pub node: Option<String>,
    /// palisade-controller replicas to stream the node's rules from (`https://HOST:PORT`,
    /// tried in turn), with `token_file`, `ca_file` and `node`, instead of files.
    pub controller: Vec<String>,
    /// The ServiceAccount token presented to the controller (re-read at every connection).
    pub token_file: Option<PathBuf>,
    /// The CA that signed the controller's certificate.
    pub ca_file: Option<PathBuf>,
    /// Network namespace (a name under /var/run/netns) to program instead of our own.
    pub netns: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (bound before entering
    /// `netns`).
    pub metrics_addr: SocketAddr,
    /// Who may read the metrics: `loopback` (plain HTTP, loopback address only), `secure`
    /// (TLS, bearer tokens checked by TokenReview and SubjectAccessReview) or `insecure`
    /// (plain HTTP on any address). Unset: loopback on a loopback address, else secure.
    pub metrics_mode: Option<palisade_httpd::Mode>,
    /// The metrics server's certificate and key (PEM) in secure mode; without them it
    /// makes a self-signed one at start.
    pub metrics_tls_cert: Option<PathBuf>,
    pub metrics_tls_key: Option<PathBuf>,
    /// Credentials for the token and access reviews of secure mode; else `KUBECONFIG` or
    /// the pod's ServiceAccount. Nothing else uses the Kubernetes API.
    pub kubeconfig: Option<PathBuf>,
    /// Seconds between full reconciles (drift repair).
    pub reconcile_interval_secs: u64,
    /// Milliseconds between checks of the rules file's modification time.
    pub poll_interval_ms: u64,
    /// Connections the metrics server serves at once (more wait unaccepted).
    pub metrics_max_connections: usize,
    /// Milliseconds a metrics client has for a request's headers (and an idle keep-alive
    /// connection for its next request) before it is closed.
    pub metrics_header_timeout_ms: u64,
    /// Seconds a metrics connection may stay open at most.
    pub metrics_connection_timeout_secs: u64,
    /// Largest input file read (bytes); a bigger one is refused before parsing.
    pub max_input_bytes: u64,
    /// Deepest nesting of YAML flow collections (`[`, `{`) in an input.
    pub max_nesting_depth: usize,
    /// Most elements of host address sets (pods' and nodes' addresses, summed over the
    /// groups) a rule set may load; a bigger one is refused and the last rules stay.
    pub max_host_addresses: u64,
    /// Repair drift as soon as nf_tables events show another process changed our table
    /// (the periodic reconcile stays either way).
    pub watch_nftables_events: bool,
    /// Strict mode: when a change denies flows that established connections carry, delete
    /// their conntrack entries so that the connections stop (only the flows the change
    /// newly denies). Off: a tighter policy applies to new connections only.
    pub strict_mode: bool,
    /// What happens to a pod interface (a name matching `pod_interface_patterns`) before
    /// the agent enforces it: `drop` (the default) or `allow` (fail open: its traffic
    /// passes unfiltered until the pod's rules are in force).
    pub unknown_pod_interfaces: UnknownPodInterfaces,
    /// Names of pod interfaces (`*` at the end matches any rest), for `unknown_pod_interfaces`.
    pub pod_interface_patterns: Vec<String>,
    /// Log denied flows: each drop rule sends the packet to NFLOG, the agent writes one
    /// JSON line per packet on standard output and keeps the recent ones for `/flows`.
    pub flow_log: bool,
    /// The NFLOG group (one per node; no other program may bind it in the namespace).
    pub flow_log_group: u16,
    /// Packets a second each drop rule may send to the log (a token bucket in the
    /// kernel), and how many at once; what is over is dropped unlogged and counted.
    pub flow_log_per_second: u32,
    pub flow_log_burst: u32,
    /// Recent lines kept for `/flows`.
    pub flow_log_capacity: usize,
    /// With `cluster` and `policies`: the mode (`audit` or `enforce`) of a policy that
    /// neither its `palisade.dev/enforcement` annotation nor (NetworkPolicies) its
    /// namespace's label of that name sets.
    pub default_enforcement: palisade_policy::Enforcement,
}

/// The explicit choice for pod interfaces that have no rules yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPodInterfaces {
    Drop,
    Allow,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            rules: None,
            cluster: None,
            policies: None,
            node: None,
            controller: Vec::new(),
            token_file: None,
            ca_file: None,
            netns: None,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9469)),
            metrics_mode: None,
            metrics_tls_cert: None,
            metrics_tls_key: None,
            kubeconfig: None,
            reconcile_interval_secs: 60,
            poll_interval_ms: 1000,
            metrics_max_connections: 64,
            metrics_header_timeout_ms: 5000,
            metrics_connection_timeout_secs: 30,
            max_input_bytes: 64 << 20,
            max_nesting_depth: 64,
            max_host_addresses: 2_000_000,
            watch_nftables_events: true,
            strict_mode: false,
            unknown_pod_interfaces: UnknownPodInterfaces::Drop,
            pod_interface_patterns: crate::render::DEFAULT_POD_INTERFACE_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            flow_log: true,
            flow_log_group: 9469,
            flow_log_per_second: 10,
            flow_log_burst: 20,
            flow_log_capacity: 1000,
            default_enforcement: palisade_policy::Enforcement::Enforce,
        }
    }
}

/// Command-line flags; each overrides the file and the environment when given.
#[derive(Clone, Debug, Default, Parser, Serialize)]
#[command(
    name = "palisade-agent",
    version,
    about = "Enforces a node's Palisade rule set in nftables"
)]
pub struct Flags {
    /// YAML configuration file (keys as in AgentConfig: rules, netns, metrics_addr, ...).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// NodeRuleSet file (JSON or YAML), re-read when it changes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<PathBuf>,
    /// Cluster state file to compile the node's rule set from (with --policies and --node).
    #[arg(long, conflicts_with = "rules", requires_all = ["policies", "node"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<PathBuf>,
    /// Policies file (NetworkPolicies and cluster-wide policies), with --cluster.
    #[arg(long, requires = "cluster")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<PathBuf>,
    /// This node's name, with --cluster or --controller.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A palisade-controller replica (`https://HOST:PORT`; repeat or separate with commas
    /// for several), with --token-file, --ca-file and --node.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["rules", "cluster"], requires_all = ["token_file", "ca_file", "node"])]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub controller: Vec<String>,
    /// The token presented to the controller, with --controller.
    #[arg(long, requires = "controller")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) the controller's certificate must chain to.
    #[arg(long, requires = "controller")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Program the named network namespace (/var/run/netns/NAME).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Who may read the metrics: loopback, secure or insecure (default: loopback on a
    /// loopback --metrics-addr, else secure).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_mode: Option<palisade_httpd::Mode>,
    /// Certificate (PEM) of the metrics server in secure mode (default: self-signed).
    #[arg(long, requires = "metrics_tls_key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --metrics-tls-cert.
    #[arg(long, requires = "metrics_tls_cert")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_tls_key: Option<PathBuf>,
    /// Kubeconfig for the token and access reviews of secure metrics (default: KUBECONFIG
    /// or in-cluster).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds between full reconciles (drift repair).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconcile_interval_secs: Option<u64>,
    /// Milliseconds between checks of the rules file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// Delete the conntrack entries of established flows a rule change newly denies.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub strict_mode: bool,
    /// Pod interfaces the agent has no rules for yet: drop (default) or allow (fail open).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_pod_interfaces: Option<UnknownPodInterfaces>,
    /// Pod interface name patterns (`veth*`; repeat or separate with commas), replacing the
    /// defaults.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pod_interface_patterns: Vec<String>,
    /// With --cluster/--policies: the mode of policies that do not set one (audit or
    /// enforce; default enforce).
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
    #[error(
        "no rule source: give --rules FILE, or --cluster FILE --policies FILE --node NAME, or --controller URL --token-file FILE --ca-file FILE --node NAME (or the same keys in the config file, or PALISADE_RULES / PALISADE_CLUSTER / PALISADE_CONTROLLER ...)"
    )]
    NoSource,
    #[error(
        "give one of rules, cluster + policies + node, or controller + token_file + ca_file + node"
    )]
    TwoSources,
    #[error("invalid configuration: pod_interface_patterns: {0}")]
    Pattern(String),
}

impl AgentConfig {
    /// The controller stream the configuration names, if any.
    pub fn stream(&self) -> Option<crate::stream::StreamConfig> {
        if self.controller.is_empty() {
            return None;
        }
        Some(crate::stream::StreamConfig {
            controllers: self.controller.clone(),
            token_file: self.token_file.clone()?,
            ca_file: self.ca_file.clone()?,
            node: self.node.clone()?,
        })
    }

    /// The flow log's rules, when it is on.
    pub fn flow_log(&self) -> Option<crate::render::FlowLog> {
        self.flow_log.then_some(crate::render::FlowLog {
            group: self.flow_log_group,
            per_second: self.flow_log_per_second.max(1),
            burst: self.flow_log_burst.max(1),
        })
    }

    /// The patterns of pod interfaces dropped until enforced: none when failing open.
    pub fn drop_patterns(&self) -> Vec<String> {
        match self.unknown_pod_interfaces {
            UnknownPodInterfaces::Drop => self.pod_interface_patterns.clone(),
            UnknownPodInterfaces::Allow => Vec::new(),
        }
    }

    /// Who may read the metrics.
    pub fn metrics_mode(&self) -> palisade_httpd::Mode {
        self.metrics_mode
            .unwrap_or_else(|| palisade_httpd::Mode::default_for(self.metrics_addr))
    }

    /// The metrics server's limits.
    pub fn http_limits(&self) -> palisade_httpd::Limits {
        palisade_httpd::Limits {
            max_connections: self.metrics_max_connections.max(1),
            header_timeout: std::time::Duration::from_millis(self.metrics_header_timeout_ms.max(1)),
            connection_timeout: std::time::Duration::from_secs(
                self.metrics_connection_timeout_secs.max(1),
            ),
        }
    }

    /// The rule source the configuration names ([`Flags::resolve`] has checked there is
    /// exactly one).
    pub fn source(&self) -> Option<crate::source::Source> {
        use crate::source::{FileWatch, Limits, RuleSource, Source};
        if !self.controller.is_empty() {
            return None;
        }
        let limits = Limits {
            max_bytes: self.max_input_bytes,
            max_depth: self.max_nesting_depth,
        };
        let inputs = match &self.rules {
            Some(rules) => RuleSource::File(FileWatch::new(rules)),
            None => RuleSource::Compile {
                cluster: FileWatch::new(self.cluster.as_ref()?),
                policies: FileWatch::new(self.policies.as_ref()?),
                node: self.node.clone()?,
            },
        };
        Some(
            Source::from(inputs)
                .with_limits(limits)
                .with_default_enforcement(self.default_enforcement),
        )
    }
}

impl Flags {
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(AgentConfig::default()));
        if let Some(path) = &self.config {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.clone()));
            }
            fig = fig.merge(Yaml::file(path));
        }
        let cfg: AgentConfig = fig
            .merge(Env::prefixed("PALISADE_"))
            .merge(Serialized::defaults(self))
            .extract()
            .map_err(Box::new)?;
        for pattern in &cfg.pod_interface_patterns {
            crate::render::check_pod_interface_pattern(pattern).map_err(ConfigError::Pattern)?;
        }
        let files = cfg.rules.is_some();
        let compiled = cfg.cluster.is_some() || cfg.policies.is_some();
        let streamed =
            !cfg.controller.is_empty() || cfg.token_file.is_some() || cfg.ca_file.is_some();
        match (files, compiled, streamed) {
            (true, false, false) if cfg.node.is_none() => Ok(cfg),
            (false, true, false)
                if cfg.cluster.is_some() && cfg.policies.is_some() && cfg.node.is_some() =>
            {
                Ok(cfg)
            }
            (false, false, true)
                if !cfg.controller.is_empty()
                    && cfg.token_file.is_some()
                    && cfg.ca_file.is_some()
                    && cfg.node.is_some() =>
            {
                Ok(cfg)
            }
            (false, false, false) => Err(ConfigError::NoSource),
            (a, b, c) if [a, b, c].iter().filter(|x| **x).count() > 1 => {
                Err(ConfigError::TwoSources)
            }
            _ => Err(ConfigError::NoSource),
        }
    }
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which clippy finds large; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agent.yaml",
                "rules: /from/file.yaml\nreconcile_interval_secs: 5\n",
            )?;
            let flags = Flags {
                config: Some("agent.yaml".into()),
                reconcile_interval_secs: Some(7),
                ..Flags::default()
            };
            let cfg = flags.resolve().map_err(|e| e.to_string())?;
            assert_eq!(cfg.rules, Some(PathBuf::from("/from/file.yaml")));
            assert_eq!(cfg.reconcile_interval_secs, 7);
            assert_eq!(cfg.poll_interval_ms, 1000);
            jail.set_env("PALISADE_METRICS_ADDR", "127.0.0.1:1234");
            let cfg = flags.resolve().map_err(|e| e.to_string())?;
            assert_eq!(cfg.metrics_addr.port(), 1234);
            Ok(())
        });
    }

    #[test]
    fn default_enforcement_from_file_env_and_flag() {
        use palisade_policy::Enforcement;
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agent.yaml",
                "cluster: c.yaml\npolicies: p.yaml\nnode: n1\ndefault_enforcement: audit\n",
            )?;
            let flags = Flags {
                config: Some("agent.yaml".into()),
                ..Flags::default()
            };
            assert_eq!(
                flags
                    .resolve()
                    .map_err(|e| e.to_string())?
                    .default_enforcement,
                Enforcement::Audit
            );
            jail.set_env("PALISADE_DEFAULT_ENFORCEMENT", "enforce");
            assert_eq!(
                flags
                    .resolve()
                    .map_err(|e| e.to_string())?
                    .default_enforcement,
                Enforcement::Enforce
            );
            let flags = Flags::try_parse_from([
                "palisade-agent",
                "--config",
                "agent.yaml",
                "--default-enforcement",
                "audit",
            ])
            .map_err(|e| e.to_string())?;
            assert_eq!(
                flags
                    .resolve()
                    .map_err(|e| e.to_string())?
                    .default_enforcement,
                Enforcement::Audit
            );
            assert!(
                Flags::try_parse_from(["palisade-agent", "--default-enforcement", "off"]).is_err()
            );
            assert_eq!(
                AgentConfig::default().default_enforcement,
                Enforcement::Enforce
            );
            Ok(())
        });
    }

    #[test]
    fn pod_interface_patterns_and_strict_mode_from_file_and_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agent.yaml",
                "rules: r.yaml\nstrict_mode: true\nunknown_pod_interfaces: allow\npod_interface_patterns: [\"tap*\"]\n",
            )?;
            let flags = Flags {
                config: Some("agent.yaml".into()),
                ..Flags::default()
            };
            let cfg = flags.resolve().map_err(|e| e.to_string())?;
            assert!(cfg.strict_mode);
            assert_eq!(cfg.pod_interface_patterns, vec!["tap*".to_string()]);
            assert!(
                cfg.drop_patterns().is_empty(),
                "allow fails open: nothing dropped"
            );
            let flags = Flags {
                unknown_pod_interfaces: Some(UnknownPodInterfaces::Drop),
                ..flags
            };
            let cfg = flags.resolve().map_err(|e| e.to_string())?;
            assert_eq!(cfg.drop_patterns(), vec!["tap*".to_string()]);
            let defaults = AgentConfig::default();
            assert!(!defaults.strict_mode, "strict mode is opt-in");
            assert!(defaults.drop_patterns().contains(&"veth*".to_string()));
            for bad in ["*", "a b*", "much-too-long-name*"] {
                let flags = Flags {
                    rules: Some("r.yaml".into()),
                    pod_interface_patterns: vec![bad.into()],
                    ..Flags::default()
                };
                let err = flags.resolve().unwrap_err().to_string();
                assert!(
                    err.contains("pod_interface_patterns") && err.contains(bad),
                    "{err}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn missing_source_and_bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            assert!(matches!(
                Flags::default().resolve(),
                Err(ConfigError::NoSource)
            ));
            jail.create_file("bad.yaml", "rules: x\nmetrics_addr: nope\n")?;
            let flags = Flags {
                config: Some("bad.yaml".into()),
                ..Flags::default()
            };
            let err = flags.resolve().unwrap_err().to_string();
            assert!(err.contains("metrics_addr"), "{err}");
            Ok(())
        });
    }
}
