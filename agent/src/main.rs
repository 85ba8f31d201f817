use clap::Parser;
use std::sync::Arc;

use palisade_agent::config::Flags;
use palisade_httpd::{Access, Authorize, KubeAuthorizer, ThreadAuthorizer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = Flags::parse().resolve()?;
    // Bound in our own namespace, before entering the node's (threads spawned later, and
    // nft children, inherit the namespace of this thread).
    let mode = cfg.metrics_mode();
    let listener = palisade_httpd::bind(mode, cfg.metrics_addr)?;
    // Secure metrics ask the apiserver from a thread started here, so its connections
    // leave from this namespace, not the node's.
    let authorizer: Option<Arc<dyn Authorize>> = match mode {
        palisade_httpd::Mode::Secure => {
            let kubeconfig = cfg.kubeconfig.clone();
            let a = ThreadAuthorizer::spawn(move || async move {
                KubeAuthorizer::connect(kubeconfig.as_deref()).await
            })
            .map_err(|e| anyhow::anyhow!("secure metrics: {e}"))?;
            Some(Arc::new(a))
        }
        _ => None,
    };
    let tls = cfg
        .metrics_tls_cert
        .as_deref()
        .zip(cfg.metrics_tls_key.as_deref());
    let access = Access::for_mode(mode, tls, authorizer)?;
    let home = match cfg.netns {
        Some(_) => palisade_agent::stream::DialNamespace::current()?.0,
        None => None,
    };
    if let Some(ns) = &cfg.netns {
        palisade_agent::run::enter_netns(ns)?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(palisade_agent::run::run(cfg, listener, access, home))
}
