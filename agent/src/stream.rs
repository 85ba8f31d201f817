//! The controller source: one authenticated TLS stream to a palisade-controller replica,
//! a snapshot and then deltas of this node's rule set, each checked against its digest
//! before the agent's loop sees it, and acknowledgements of what the loop enforced.
//!
//! Fail static: when the stream breaks, nothing changes in the kernel. The loop keeps the
//! last rules and the agent redials with back-off, trying the replicas in turn; a new
//! stream starts with a snapshot, which the loop applies like any change (an identical
//! state changes nothing). A restarted agent enforces nothing new until its first snapshot,
//! so the table it finds stays in force meanwhile.
//!
//! With `--netns`, the agent programs a namespace it entered at start; the controller is
//! dialled from the namespace the agent started in (as the metrics listener is bound there).

use std::fs::File;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use palisade_policy::ruleset::NodeRuleSet;
use palisade_wire::pb::rule_stream_client::RuleStreamClient;
use palisade_wire::pb::{agent_message, AgentMessage, Hello, NodeUpdate};
use prometheus::{Gauge, IntGauge};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};

/// The largest update accepted: a snapshot of a very large node is one message.
const MAX_MESSAGE: usize = 256 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Replicas (or one Service) to try in turn.
    pub controllers: Vec<String>,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub node: String,
}

/// A state the loop should enforce: the stream epoch and generation it came with.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub epoch: u64,
    pub generation: u64,
    pub rules: Arc<NodeRuleSet>,
}

/// What the loop did with a delivered state.
#[derive(Clone, Debug)]
pub struct Enforced {
    pub epoch: u64,
    pub generation: u64,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct StreamMetrics {
    pub connected: IntGauge,
    pub last_update: Gauge,
}

impl StreamMetrics {
    pub fn new() -> Self {
        StreamMetrics {
            connected: IntGauge::new(
                "palisade_controller_connected",
                "1 while a stream to a controller is open.",
            )
            .expect("valid metric"),
            last_update: Gauge::new(
                "palisade_controller_last_update_timestamp_seconds",
                "Unix time of the last update received from the controller.",
            )
            .expect("valid metric"),
        }
    }

    pub fn register(&self, registry: &prometheus::Registry) {
        let _ = registry.register(Box::new(self.connected.clone()));
        let _ = registry.register(Box::new(self.last_update.clone()));
    }
}

impl Default for StreamMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The namespace to dial from: the one the process started in, opened before it enters
/// another.
pub struct DialNamespace(pub Option<File>);

impl DialNamespace {
    pub fn current() -> std::io::Result<Self> {
        Ok(DialNamespace(Some(File::open("/proc/thread-self/ns/net")?)))
    }
}

fn resolve_and_connect(
    host: String,
    port: u16,
    home: Option<Arc<File>>,
) -> std::io::Result<std::net::TcpStream> {
    // A thread of its own: setns moves only this thread, which ends right after.
    std::thread::spawn(move || {
        if let Some(ns) = home {
            nix::sched::setns(ns.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
        }
        let addrs: Vec<SocketAddr> = (host.as_str(), port).to_socket_addrs()?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match std::net::TcpStream::connect_timeout(&addr, DIAL_TIMEOUT) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_nonblocking(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    })
    .join()
    .map_err(|_| std::io::Error::other("dialing thread panicked"))?
}

async fn connect(
    url: &str,
    cfg: &StreamConfig,
    home: Option<Arc<File>>,
) -> anyhow::Result<RuleStreamClient<tonic::transport::Channel>> {
    let ca = std::fs::read(&cfg.ca_file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cfg.ca_file.display()))?;
    let uri: Uri = url.parse()?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("{url}: no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(host.clone());
    let endpoint = Endpoint::from(uri)
        .tls_config(tls)?
        .connect_timeout(DIAL_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let connector = tower::service_fn(move |_: Uri| {
        let (host, home) = (host.clone(), home.clone());
        async move {
            let std = tokio::task::spawn_blocking(move || resolve_and_connect(host, port, home))
                .await
                .map_err(std::io::Error::other)??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::TcpStream::from_std(std)?,
            ))
        }
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(RuleStreamClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(1 << 20))
}

/// Keeps a stream open and hands every verified state to `out`. Runs forever.
pub async fn run(
    cfg: StreamConfig,
    home: Option<File>,
    out: watch::Sender<Option<Delivered>>,
    mut enforced: mpsc::UnboundedReceiver<Enforced>,
    metrics: StreamMetrics,
) {
    let home = home.map(Arc::new);
    let mut backoff = Duration::ZERO;
    let mut epoch = 0u64;
    let mut replica = 0usize;
    loop {
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
        epoch += 1;
        let url = cfg.controllers[replica % cfg.controllers.len()].clone();
        match session(
            &url,
            &cfg,
            home.clone(),
            epoch,
            &out,
            &mut enforced,
            &metrics,
        )
        .await
        {
            Ok(()) => {
                tracing::warn!(controller = %url, "the controller closed the stream; the last rules stay in force");
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                tracing::warn!(controller = %url, error = %e, "no stream to the controller; the last rules stay in force");
                backoff = (backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF);
            }
        }
        metrics.connected.set(0);
        replica += 1;
    }
}

async fn session(
    url: &str,
    cfg: &StreamConfig,
    home: Option<Arc<File>>,
    epoch: u64,
    out: &watch::Sender<Option<Delivered>>,
    enforced: &mut mpsc::UnboundedReceiver<Enforced>,
    metrics: &StreamMetrics,
) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cfg.token_file.display()))?;
    let mut client = connect(url, cfg, home).await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let current = out.borrow().as_ref().map(|d| d.rules.clone());
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node: cfg.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            enforced_digest: current
                .as_deref()
                .map(palisade_wire::digest)
                .unwrap_or_default(),
            shared_lists: true,
        })),
    })
    .await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?,
    );
    let mut updates = client.watch(request).await?.into_inner();
    metrics.connected.set(1);
    tracing::info!(controller = %url, "stream open");
    // States are built on the last one this stream delivered, never on one of an earlier
    // stream: the first update of every stream is a snapshot.
    let mut state: Option<Arc<NodeRuleSet>> = None;
    loop {
        tokio::select! {
            update = updates.next() => {
                let update: NodeUpdate = match update {
                    None => return Ok(()),
                    Some(u) => u?,
                };
                metrics.last_update.set(now_secs());
                let generation = update.generation;
                match palisade_wire::apply(&cfg.node, state.as_deref(), &update) {
                    Ok(next) => {
                        let next = Arc::new(next);
                        state = Some(next.clone());
                        out.send_replace(Some(Delivered { epoch, generation, rules: next }));
                    }
                    Err(e) => {
                        // Refuse the update whole and start over with a snapshot.
                        let _ = tx.send(ack(generation, Some(e.to_string()))).await;
                        anyhow::bail!("update {generation} refused: {e}");
                    }
                }
            }
            Some(done) = enforced.recv() => {
                if done.epoch == epoch {
                    let _ = tx.send(ack(done.generation, done.error)).await;
                }
            }
        }
    }
}

fn ack(generation: u64, error: Option<String>) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Ack(palisade_wire::pb::Ack {
            generation,
            ok: error.is_none(),
            error: error.unwrap_or_default(),
        })),
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
