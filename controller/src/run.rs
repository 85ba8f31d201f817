//! Wiring: source → compile loop → hub → gRPC streams, and the health server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use palisade_wire::pb::rule_stream_server::RuleStreamServer;
use tokio::sync::mpsc;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::auth::{Authenticator, StaticTokens, TokenReviewer};
use crate::compile_loop::CompileLoop;
use crate::config::ControllerConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::serve::RuleService;
use crate::status::StatusWriter;
use palisade_httpd::KubeAuthorizer;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "palisade-controller".into())
}

/// The largest update an agent accepts and the controller sends; a snapshot of a very
/// large node is one message.
pub const MAX_MESSAGE: usize = 256 << 20;

/// A client from a kubeconfig file, else as kube-rs infers one (`KUBECONFIG`,
/// `~/.kube/config`, in-cluster).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

pub async fn run(cfg: ControllerConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let hub = Hub::new(metrics);
    let (tx, rx) = mpsc::channel(4096);
    let (notes_tx, notes_rx) = mpsc::unbounded_channel();
    let mut notes = Some(notes_tx);

    let mode = cfg
        .metrics_mode
        .unwrap_or_else(|| palisade_httpd::Mode::default_for(cfg.metrics_addr));
    let metrics_listener = palisade_httpd::bind(mode, cfg.metrics_addr)?;
    let mut reviews_client = None;
    let auth = if let Some((cluster, policies, tokens)) = cfg.files() {
        tokio::spawn(crate::source::files::run(
            cluster.clone(),
            policies.clone(),
            Duration::from_millis(cfg.poll_interval_ms.max(50)),
            tx,
        ));
        Authenticator::Static(StaticTokens::load(tokens)?)
    } else {
        let client = kube_client(cfg.kubeconfig.as_deref()).await?;
        reviews_client = Some(client.clone());
        let source_client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::source::kube::run(source_client, tx).await {
                tracing::error!(error = %e, "the Kubernetes source stopped");
                std::process::exit(1);
            }
        });
        let identity = cfg.identity.clone().unwrap_or_else(hostname);
        tokio::spawn(
            StatusWriter {
                client: client.clone(),
                namespace: cfg.lease_namespace.clone(),
                lease: cfg.lease_name.clone(),
                identity,
                metrics: hub.metrics.clone(),
                hub: hub.clone(),
            }
            .run(notes_rx),
        );
        Authenticator::TokenReview(TokenReviewer::new(
            client,
            &cfg.token_audience,
            cfg.service_account(),
        ))
    };
    // Without an API server there is nobody to tell: log lines are the report.
    if cfg.files().is_some() {
        notes = None;
    }
    let compile =
        CompileLoop::new(hub.clone(), notes).with_default_enforcement(cfg.default_enforcement);
    tokio::spawn(compile.run(rx, Duration::from_millis(cfg.min_interval_ms)));

    let authorizer: Option<Arc<dyn palisade_httpd::Authorize>> = match (mode, reviews_client) {
        (palisade_httpd::Mode::Secure, Some(client)) => Some(Arc::new(KubeAuthorizer::new(client))),
        // Files instead of the API: the reviews still need an apiserver (KUBECONFIG).
        (palisade_httpd::Mode::Secure, None) => {
            Some(Arc::new(KubeAuthorizer::connect(None).await.map_err(
                |e| anyhow::anyhow!("secure metrics on {}: {e}", cfg.metrics_addr),
            )?))
        }
        _ => None,
    };
    // The stream's certificate: its names are the Service's, so scrapers can verify it.
    let tls = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
    let access = palisade_httpd::Access::for_mode(mode, tls, authorizer)?;
    metrics_listener.set_nonblocking(true)?;
    let metrics_listener = tokio::net::TcpListener::from_std(metrics_listener)?;
    tracing::info!(addr = %metrics_listener.local_addr()?, %mode, scheme = access.scheme(), "serving /metrics, /healthz, /readyz");
    tokio::spawn(palisade_httpd::serve(
        metrics_listener,
        access,
        palisade_httpd::Limits::default(),
        Arc::new(crate::endpoints::Endpoints(hub.clone())),
    ));

    let (cert, key) = (
        cfg.tls_cert.as_ref().context("no TLS certificate")?,
        cfg.tls_key.as_ref().context("no TLS key")?,
    );
    let identity = Identity::from_pem(
        std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?,
        std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?,
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving the agents' stream (TLS)");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    serve_agents(listener, identity, hub, Arc::new(auth), async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}

/// The agents' stream (TLS) on `listener` until `shutdown`; also what the fan-out
/// benchmark serves its simulated agents with.
pub async fn serve_agents(
    listener: tokio::net::TcpListener,
    identity: Identity,
    hub: Arc<Hub>,
    auth: Arc<Authenticator>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let service = RuleStreamServer::new(RuleService::new(hub, auth))
        .max_decoding_message_size(1 << 20)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
