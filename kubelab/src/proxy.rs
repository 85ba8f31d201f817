//! A real kube-proxy (nftables mode) in a lab node's network namespace.
//!
//! It runs as `ip netns exec NODE_NETNS kube-proxy ...`, so its nftables tables, its
//! healthz and metrics listeners (127.0.0.1 of the node namespace) and its conntrack
//! cleanups are all the node's; it reaches the apiserver through a [`NetnsForward`] relay on
//! the namespace's own loopback.
//!
//! Its identity is the one kubeadm gives it, with least privilege: the user
//! [`KUBE_PROXY_USER`] (a client certificate from the lab CA), which the apiserver's bootstrap
//! ClusterRoleBinding `system:node-proxier` binds to the ClusterRole of that name (watch
//! Services, EndpointSlices and Nodes; write Events) and to nothing else.
//!
//! Flags that keep it from touching anything outside its namespace (facts, from kube-proxy
//! v1.37.2's `pkg/proxy/conntrack/sysctls.go`):
//! - `--conntrack-max-per-core=0`: by default it raises `net.netfilter.nf_conntrack_max` and,
//!   with it, `/sys/module/nf_conntrack/parameters/hashsize`, which is host-global.
//! - `--conntrack-tcp-timeout-established=0`, `--conntrack-tcp-timeout-close-wait=0`: by
//!   default it sets these per-namespace timeouts to 24 h and 1 h; 0 leaves the node's.
//! - `--oom-score-adj=0`: by default it makes itself nearly unkillable (-999), not a
//!   test's business on a shared machine.
//!
//! In nftables mode it writes no other sysctl (`route_localnet` is for iptables mode's
//! localhost NodePorts), needs the `nft` binary (it feeds `nft -f -`) and no `conntrack`
//! binary (it cleans up stale UDP flows over netlink).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{io, Error, Result};
use crate::files::{kubeconfig_yaml, write};
use crate::forward::NetnsForward;
use crate::lab::KubeLab;
use crate::process::{log_tail, Proc};
use crate::tools;

/// The user kube-proxy authenticates as; the bootstrap `system:node-proxier` binding names it.
pub const KUBE_PROXY_USER: &str = "system:kube-proxy";

/// What kube-proxy logs (at `--v=2`) when a sync is done.
const SYNC_DONE: &str = "SyncProxyRules complete";

/// The nftables tables kube-proxy owns in a node (`family name`).
pub const KUBE_PROXY_TABLES: [&str; 2] = ["ip kube-proxy", "ip6 kube-proxy"];

/// The skip policy for kube-proxy tests: `true` when the binary is in the bin directory.
pub fn kube_proxy_available() -> bool {
    match tools::missing(&tools::default_bin_dir(), &["kube-proxy"]) {
        None => true,
        Some(reason) => tools::skip(&format!("{reason} (run scripts/tools.sh)")),
    }
}

/// A kube-proxy running in a node's network namespace. Dropping it stops the process, then
/// deletes its tables from the namespace, so nothing of it outlives a test, failed or not.
#[derive(Debug)]
pub struct KubeProxy {
    node: String,
    netns: String,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
    // After the process: it must not lose the apiserver while still running.
    _forward: NetnsForward,
}

impl KubeLab {
    /// A kubeconfig on the host's loopback for `user` (client certificate, `groups` as its
    /// organisations), e.g. to check what [`KUBE_PROXY_USER`] may do.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let path = self
            .dir()
            .join(format!("{}.kubeconfig", user.replace(':', "-")));
        let pair = self.ca().issue_client(user, groups)?;
        write(
            &path,
            &kubeconfig_yaml(self.url(), self.ca_pem(), user, &pair),
        )?;
        Ok(path)
    }

    /// Starts kube-proxy for `node` in the network namespace `netns` (a name under
    /// `/var/run/netns`), treating sources in `cluster_cidr` as pod traffic (not masqueraded).
    /// Returns once the process runs; [`KubeProxy::wait_for_rules`] tells when it has
    /// programmed something.
    pub fn start_kube_proxy(
        &self,
        node: &str,
        netns: &str,
        cluster_cidr: &str,
    ) -> Result<KubeProxy> {
        let forward = self.forward_into_netns(&Path::new("/var/run/netns").join(netns))?;
        let pair = self.ca().issue_client(KUBE_PROXY_USER, &[])?;
        let url = format!("https://127.0.0.1:{}", forward.port());
        let kubeconfig = self.dir().join(format!("kube-proxy-{node}.kubeconfig"));
        write(
            &kubeconfig,
            &kubeconfig_yaml(&url, self.ca_pem(), KUBE_PROXY_USER, &pair),
        )?;
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            netns.into(),
            self.bin_dir().join("kube-proxy").display().to_string(),
        ];
        args.extend(kube_proxy_flags(node, &kubeconfig, cluster_cidr));
        let mut proxy = KubeProxy {
            node: node.into(),
            netns: netns.into(),
            args,
            log: self.log_path(&format!("kube-proxy-{node}")),
            proc: None,
            _forward: forward,
        };
        proxy.start()?;
        Ok(proxy)
    }
}

fn kube_proxy_flags(node: &str, kubeconfig: &Path, cluster_cidr: &str) -> Vec<String> {
    vec![
        "--proxy-mode=nftables".to_string(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={node}"),
        format!("--cluster-cidr={cluster_cidr}"),
        // The node namespace's own loopback: nothing listens outside it.
        "--healthz-bind-address=127.0.0.1:10256".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        "--oom-score-adj=0".into(),
        "--profiling=false".into(),
        // Logs every sync ("SyncProxyRules complete"), which [`KubeProxy::sync_count`] counts.
        "--v=2".into(),
    ]
}

/// `ip netns exec NETNS nft ARGS...`; its stdout, or an error with stderr.
fn nft_in(netns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args)
        .output()
        .map_err(io(format!("run nft in {netns}")))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "nft {} in {netns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl KubeProxy {
    fn start(&mut self) -> Result<()> {
        let proc = Proc::spawn("kube-proxy", Path::new("ip"), &self.args, &self.log)?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops kube-proxy and starts it again (its tables stay; the new process's first sync
    /// is a full one, which rewrites them).
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.stop(Duration::from_secs(5));
        }
        self.start()
    }

    /// The node it proxies for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Fails with its log's tail if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            Some(proc) => proc.check_running(),
            None => Err(Error::Other(format!(
                "kube-proxy of {} is stopped",
                self.node
            ))),
        }
    }

    /// How many rule syncs it has completed, over all its runs (its log is appended to).
    pub fn sync_count(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|text| text.matches(SYNC_DONE).count())
            .unwrap_or(0)
    }

    /// Waits until [`KubeProxy::sync_count`] reaches `count`.
    pub async fn wait_for_syncs(&mut self, count: usize, timeout: Duration) -> Result<Duration> {
        self.wait(&format!("{count} syncs"), timeout, |p| {
            Ok(p.sync_count() >= count)
        })
        .await
    }

    /// `nft -s list table ip kube-proxy` in its namespace: its IPv4 rules without counters.
    pub fn table(&self) -> Result<String> {
        nft_in(&self.netns, &["-s", "list", "table", "ip", "kube-proxy"])
    }

    /// Waits until its IPv4 table contains every one of `needles` (e.g. a ClusterIP and an
    /// endpoint's address) and returns how long that took.
    pub async fn wait_for_rules(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<Duration> {
        self.wait(&format!("rules with {needles:?}"), timeout, |p| {
            Ok(p.table()
                .is_ok_and(|table| needles.iter().all(|n| table.contains(n))))
        })
        .await
    }

    /// Polls `done` every 100 ms; fails if kube-proxy exits, or after `timeout`, with its
    /// log's tail.
    async fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if done(self)? {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: format!("kube-proxy of {}: {what}", self.node),
                    seconds: timeout.as_secs(),
                    log: self.log.clone(),
                    tail: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop(Duration::from_secs(5));
        }
        for table in KUBE_PROXY_TABLES {
            let (family, name) = table.split_once(' ').unwrap_or((table, ""));
            // Absent already when the namespace is gone or kube-proxy never got that far.
            let _ = nft_in(&self.netns, &["delete", "table", family, name]);
        }
    }
}
