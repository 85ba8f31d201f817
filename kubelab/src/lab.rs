//! Starting, restarting and stopping the control plane.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::crds::{self, CrdChannel};
use crate::error::{io, Error, Result};
use crate::files::{kubeconfig_yaml, remove_stale_dirs, write, DIR_PREFIX};
use crate::flags::{self, Ports};
use crate::pki::{self, Ca, SigningKey};
use crate::process::{free_ports, log_tail, Proc};
use crate::tools;

/// How to start a lab. `Options::default()` is what the e2e tests use.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory with etcd, kube-apiserver, kube-controller-manager (and kubectl for
    /// [`KubeLab::kubectl`]). Default: `$PALISADE_KUBE_BIN`, else `target/tools/bin`.
    pub bin_dir: Option<PathBuf>,
    /// Directory with `standard/` and `experimental/` CRD YAMLs. Default: `crds/` beside the
    /// bin directory.
    pub crd_dir: Option<PathBuf>,
    /// Which network-policy-api channel to install, or none.
    pub crds: Option<CrdChannel>,
    /// `--service-cluster-ip-range`: where Service ClusterIPs come from.
    pub service_cidr: String,
    /// Audience (besides the issuer) that the apiserver accepts and that tests request.
    pub token_audience: String,
    /// Run kube-controller-manager (namespace, serviceaccount, garbagecollector and
    /// endpointslice controllers).
    pub controller_manager: bool,
    /// How long each component may take to become ready.
    pub startup_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin_dir: None,
            crd_dir: None,
            crds: Some(CrdChannel::Experimental),
            service_cidr: "10.96.0.0/16".into(),
            token_audience: "palisade".into(),
            controller_manager: true,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// The ServiceAccount issuer, the in-cluster name of the apiserver, as on real clusters.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, Default)]
struct Procs {
    // Field order is stop order for Drop: controller-manager, apiserver, etcd.
    controller_manager: Option<Proc>,
    apiserver: Option<Proc>,
    etcd: Option<Proc>,
}

/// A running etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1, with its own CA,
/// admin credentials and ServiceAccount token keys in a temp dir that it removes on drop.
#[derive(Debug)]
pub struct KubeLab {
    opts: Options,
    bin_dir: PathBuf,
    url: String,
    ca: Ca,
    ca_pem: String,
    kubeconfig: PathBuf,
    apiserver_args: Vec<String>,
    procs: Mutex<Procs>,
    // Last, so the processes are gone before their files.
    dir: Mutex<Option<tempfile::TempDir>>,
    root: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KubeLab {
    /// Starts etcd, kube-apiserver, kube-controller-manager and installs the CRDs; returns when
    /// all are ready. Takes several seconds.
    pub async fn start(opts: Options) -> Result<Self> {
        let bin_dir = opts.bin_dir.clone().unwrap_or_else(tools::default_bin_dir);
        let mut needed = vec!["etcd", "kube-apiserver"];
        if opts.controller_manager {
            needed.push("kube-controller-manager");
        }
        if let Some(reason) = tools::missing(&bin_dir, &needed) {
            return Err(Error::ToolsMissing(reason));
        }
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(io("create the lab's temp dir"))?;
        let root = dir.path().to_path_buf();
        for sub in ["pki", "logs", "etcd", "apiserver-certs", "kcm-certs"] {
            let path = root.join(sub);
            fs::create_dir(&path).map_err(io(format!("mkdir {}", path.display())))?;
        }
        let [etcd_client, etcd_peer, apiserver_port, kcm_port] = free_ports::<4>()?;
        let url = format!("https://127.0.0.1:{apiserver_port}");

        let ca = Ca::new("palisade-kubelab-ca")?;
        let ca_pem = ca.cert_pem();
        let (names, mut ips) = pki::apiserver_names();
        ips.extend(flags::first_service_ip(&opts.service_cidr));
        let serving = ca.issue_server(&names, &ips)?;
        let admin = ca.issue_client("palisade-admin", &["system:masters"])?;
        let sa_key = SigningKey::generate()?;
        let pki_dir = root.join("pki");
        let path = |name: &str| pki_dir.join(name);
        write(&path("ca.crt"), &ca_pem)?;
        write(&path("apiserver.crt"), &serving.cert_pem)?;
        write(&path("apiserver.key"), &serving.key_pem)?;
        write(&path("sa.key"), &sa_key.private_pem)?;
        write(&path("sa.pub"), &sa_key.public_pem)?;
        let kubeconfig = root.join("admin.kubeconfig");
        write(
            &kubeconfig,
            &kubeconfig_yaml(&url, &ca_pem, "palisade-admin", &admin),
        )?;

        let ports = Ports {
            etcd_client,
            etcd_peer,
            apiserver: apiserver_port,
            controller_manager: kcm_port,
        };
        let etcd_args = flags::etcd(&root, &ports);
        let apiserver_args = flags::apiserver(&root, &ports, &opts);

        let lab = Self {
            bin_dir,
            url,
            ca,
            ca_pem,
            kubeconfig,
            apiserver_args,
            procs: Mutex::new(Procs::default()),
            dir: Mutex::new(Some(dir)),
            root,
            opts,
        };

        let etcd = lab.spawn("etcd", &etcd_args)?;
        let etcd_log = etcd.log.clone();
        lock(&lab.procs).etcd = Some(etcd);
        lab.wait_for("etcd to listen", &etcd_log, || async {
            lab.check_running()?;
            Ok(std::net::TcpStream::connect(("127.0.0.1", etcd_client)).is_ok())
        })
        .await?;

        lab.spawn_apiserver()?;
        lab.wait_apiserver_ready().await?;

        if lab.opts.controller_manager {
            let kcm_args = flags::controller_manager(&lab.root, &ports, &lab.kubeconfig);
            let kcm = lab.spawn("kube-controller-manager", &kcm_args)?;
            let kcm_log = kcm.log.clone();
            lock(&lab.procs).controller_manager = Some(kcm);
            // The serviceaccount controller creating `default` proves it is working.
            let client = lab.client().await?;
            let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
            lab.wait_for("the default ServiceAccount", &kcm_log, || async {
                lab.check_running()?;
                Ok(accounts.get_opt("default").await.ok().flatten().is_some())
            })
            .await?;
        }

        if let Some(channel) = lab.opts.crds {
            let crd_dir = lab
                .opts
                .crd_dir
                .clone()
                .unwrap_or_else(|| tools::crd_dir_for(&lab.bin_dir));
            crds::install(&lab, &crd_dir, channel).await?;
        }
        Ok(lab)
    }

    /// [`KubeLab::start`] for synchronous callers and for labs shared between tests: runs on a
    /// thread of its own with its own runtime, so the lab is tied to no caller's runtime.
    pub fn start_blocking(opts: Options) -> Result<Self> {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io("build a tokio runtime"))?
                .block_on(Self::start(opts))
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Other("the lab's startup thread panicked".into())))
    }

    fn spawn(&self, name: &'static str, args: &[String]) -> Result<Proc> {
        let log = self.root.join("logs").join(format!("{name}.log"));
        Proc::spawn(name, &self.bin_dir.join(name), args, &log)
    }

    fn spawn_apiserver(&self) -> Result<()> {
        let proc = self.spawn("kube-apiserver", &self.apiserver_args)?;
        lock(&self.procs).apiserver = Some(proc);
        Ok(())
    }

    /// Errors with the log tail of the first component that has exited.
    fn check_running(&self) -> Result<()> {
        let mut procs = lock(&self.procs);
        let Procs {
            controller_manager,
            apiserver,
            etcd,
        } = &mut *procs;
        for proc in [etcd, apiserver, controller_manager].into_iter().flatten() {
            proc.check_running()?;
        }
        Ok(())
    }

    async fn wait_apiserver_ready(&self) -> Result<()> {
        let log = self.log_path("kube-apiserver");
        let client = self.client().await?;
        self.wait_for("kube-apiserver /readyz", &log, || async {
            self.check_running()?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| Error::Other(e.to_string()))?;
            Ok(client
                .request_text(req)
                .await
                .is_ok_and(|body| body.trim() == "ok"))
        })
        .await
    }

    /// Polls `ready` every 100 ms until it returns true, it fails, or the startup timeout
    /// passes (then the error carries the tail of `log`).
    pub(crate) async fn wait_for<F, Fut>(&self, what: &str, log: &Path, ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        self.wait_for_within(what, log, self.opts.startup_timeout, ready)
            .await
    }

    pub(crate) async fn wait_for_within<F, Fut>(
        &self,
        what: &str,
        log: &Path,
        timeout: Duration,
        mut ready: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if ready().await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    seconds: timeout.as_secs(),
                    log: log.to_path_buf(),
                    tail: log_tail(log),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops kube-apiserver and starts it again on the same port with the same etcd,
    /// certificates and keys; returns when it is ready again.
    pub async fn restart_apiserver(&self) -> Result<()> {
        let old = lock(&self.procs).apiserver.take();
        if let Some(mut old) = old {
            // SIGTERM stops serving at once, but the process then waits up to a minute for
            // open watches (the controller-manager's) to drain; etcd has everything, so a kill
            // after that is as good as a clean exit.
            old.stop(Duration::from_secs(2));
        }
        self.spawn_apiserver()?;
        self.wait_apiserver_ready().await
    }

    /// The apiserver's URL, `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The lab CA's certificate (PEM); it signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The lab's CA, to sign more certificates (e.g. the controller's serving certificate).
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// A kubeconfig file for the admin user (`system:masters`), valid while the lab runs.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The lab's temp dir (logs in `logs/`, certificates in `pki/`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The directory the lab's binaries come from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The log file of `component` (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.root.join("logs").join(format!("{component}.log"))
    }

    /// The extra audience the apiserver accepts (`palisade` by default).
    pub fn token_audience(&self) -> &str {
        &self.opts.token_audience
    }

    /// Process ids of the running components, for tests that kill them.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let procs = lock(&self.procs);
        [&procs.etcd, &procs.apiserver, &procs.controller_manager]
            .into_iter()
            .flatten()
            .map(|p| (p.name, p.pid()))
            .collect()
    }

    /// kube-rs configuration for the admin user.
    pub async fn config(&self) -> Result<Config> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))
    }

    /// A new admin client. Each call makes its own, bound to the caller's tokio runtime.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// Runs `kubectl --kubeconfig ADMIN args...` and returns its stdout; a non-zero exit is an
    /// error carrying stderr.
    pub fn kubectl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let shown = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let out = std::process::Command::new(self.bin_dir.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(&args)
            .output()
            .map_err(|e| Error::Kubectl {
                args: shown.clone(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(Error::Kubectl {
                args: shown,
                message: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops everything (controller-manager, apiserver, etcd, in that order), waits for the
    /// processes and removes the temp dir. Idempotent; `Drop` calls it.
    pub fn stop(&self) {
        let mut procs = lock(&self.procs);
        for proc in [
            procs.controller_manager.take(),
            procs.apiserver.take(),
            procs.etcd.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut proc = proc;
            proc.stop(Duration::from_secs(5));
        }
        drop(procs);
        if let Some(dir) = lock(&self.dir).take() {
            let _ = dir.close();
        }
    }
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        self.stop();
    }
}
