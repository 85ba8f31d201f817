//! Prometheus metrics, read from the kernel at scrape time by a collector (no polling
//! loop), and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Encoder, Gauge, IntCounter, Opts, Registry, TextEncoder};
use tokio::sync::Semaphore;

use crate::apply::{ApplyStats, SharedStats};
use crate::nft::Nft;
use crate::render::CounterMeta;

const RULE_LABELS: [&str; 6] = ["kind", "namespace", "name", "direction", "rule", "tier"];

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    CounterVec::new(Opts::new(name, help), labels).expect("constant metric options are valid")
}

const HOST_ADDRESSES: &str = "palisade_host_addresses";
const HOST_ADDRESSES_HELP: &str =
    "Host set elements (pods' and nodes' addresses, summed over groups) of the last rule set rendered.";
const OVER_CAP: &str = "palisade_host_addresses_over_cap";
const OVER_CAP_HELP: &str =
    "1 while the last rule set is refused for holding more than max_host_addresses.";

/// Reads the table's named counters with `nft` when scraped.
pub struct KernelCollector {
    nft: Nft,
    stats: SharedStats,
    descs: Vec<Desc>,
}

fn families() -> (CounterVec, CounterVec, CounterVec, CounterVec) {
    (
        counter_vec(
            "palisade_rule_packets_total",
            "Packets that matched a compiled rule (first packets of connections).",
            &RULE_LABELS,
        ),
        counter_vec(
            "palisade_rule_bytes_total",
            "Bytes of the packets that matched a compiled rule.",
            &RULE_LABELS,
        ),
        counter_vec(
            "palisade_default_deny_packets_total",
            "Packets dropped because an isolated pod had no rule allowing them.",
            &["namespace", "pod", "direction"],
        ),
        counter_vec(
            "palisade_spoofed_packets_total",
            "Packets dropped because a pod sent them from an address not its own.",
            &["namespace", "pod"],
        ),
    )
}

impl KernelCollector {
    pub fn new(nft: Nft, stats: SharedStats) -> Self {
        let (a, b, c, d) = families();
        let mut descs: Vec<Desc> = Vec::new();
        for v in [&a, &b, &c, &d] {
            descs.extend(v.desc().into_iter().cloned());
        }
        for (name, help) in [
            (
                "palisade_apply_errors_total",
                "Failed nftables transactions.",
            ),
            (
                "palisade_ruleset_generation",
                "Successful transactions so far; 0 before the first.",
            ),
            (
                "palisade_last_apply_success_timestamp_seconds",
                "Unix time of the last successful transaction.",
            ),
            (
                "palisade_pod_interfaces_refused",
                "Pods whose host route leads to an interface that is not a pod veth (not bound).",
            ),
            (HOST_ADDRESSES, HOST_ADDRESSES_HELP),
            (OVER_CAP, OVER_CAP_HELP),
        ] {
            descs.push(
                Desc::new(name.into(), help.into(), vec![], Default::default())
                    .expect("constant descriptions are valid"),
            );
        }
        KernelCollector { nft, stats, descs }
    }
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (packets, bytes, deny, spoof) = families();
        let (metas, errors, generation, last, hosts, over_cap) = {
            let s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            (
                s.counters.clone(),
                s.errors,
                s.generation,
                s.last_success_unix,
                s.host_addresses,
                s.over_cap,
            )
        };
        match self.nft.counters() {
            Ok(list) => {
                for (name, p, b) in list {
                    match metas.get(&name) {
                        Some(CounterMeta::Rule { id, origin }) => {
                            let labels: [String; 6] = match origin {
                                Some(o) => [
                                    o.policy.kind.as_str().to_string(),
                                    o.policy.namespace.clone().unwrap_or_default(),
                                    o.policy.name.clone(),
                                    o.direction.as_str().to_string(),
                                    o.name.clone().unwrap_or_else(|| o.index.to_string()),
                                    o.tier.as_str().to_string(),
                                ],
                                None => Default::default(),
                            };
                            let mut labels = labels;
                            if origin.is_none() {
                                labels[4] = id.clone();
                            }
                            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                            packets.with_label_values(&refs).inc_by(p as f64);
                            bytes.with_label_values(&refs).inc_by(b as f64);
                        }
                        Some(CounterMeta::DefaultDeny { pod, direction }) => deny
                            .with_label_values(&[&pod.namespace, &pod.name, direction.as_str()])
                            .inc_by(p as f64),
                        Some(CounterMeta::Spoofed { pod }) => spoof
                            .with_label_values(&[&pod.namespace, &pod.name])
                            .inc_by(p as f64),
                        None => {}
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read nftables counters for a scrape"),
        }
        let mut out = Vec::new();
        for v in [&packets, &bytes, &deny, &spoof] {
            out.extend(v.collect());
        }
        let err = IntCounter::new(
            "palisade_apply_errors_total",
            "Failed nftables transactions.",
        )
        .expect("constant");
        err.inc_by(errors);
        out.extend(err.collect());
        let generation_g = Gauge::new(
            "palisade_ruleset_generation",
            "Successful transactions so far; 0 before the first.",
        )
        .expect("constant");
        generation_g.set(generation as f64);
        out.extend(generation_g.collect());
        let last_g = Gauge::new(
            "palisade_last_apply_success_timestamp_seconds",
            "Unix time of the last successful transaction.",
        )
        .expect("constant");
        last_g.set(last.unwrap_or(0.0));
        out.extend(last_g.collect());
        let refused = Gauge::new(
            "palisade_pod_interfaces_refused",
            "Pods whose host route leads to an interface that is not a pod veth (not bound).",
        )
        .expect("constant");
        refused.set(crate::interfaces::REFUSED.load(std::sync::atomic::Ordering::Relaxed) as f64);
        out.extend(refused.collect());
        for (name, help, value) in [
            (HOST_ADDRESSES, HOST_ADDRESSES_HELP, hosts as f64),
            (OVER_CAP, OVER_CAP_HELP, f64::from(u8::from(over_cap))),
        ] {
            let g = Gauge::new(name, help).expect("constant");
            g.set(value);
            out.extend(g.collect());
        }
        out
    }
}

/// Collects the apply duration histogram from the shared stats.
struct HistogramCollector(SharedStats, Vec<Desc>);

impl Collector for HistogramCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.1.iter().collect()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.apply_duration.collect()
    }
}

/// A registry with the agent's metrics.
pub fn registry(nft: Nft, stats: SharedStats) -> Registry {
    let registry = Registry::new();
    let hist_descs: Vec<Desc> = {
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        s.apply_duration.desc().into_iter().cloned().collect()
    };
    let _ = registry.register(Box::new(HistogramCollector(stats.clone(), hist_descs)));
    let _ = registry.register(Box::new(KernelCollector::new(nft, stats)));
    registry
}

/// The text exposition of everything in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn is_ready(stats: &Mutex<ApplyStats>) -> bool {
    stats.lock().map(|s| s.generation > 0).unwrap_or(false)
}

/// What one client may take of the HTTP server: the agent's file descriptors are shared
/// with netlink sockets and `nft`, so a flood of idle connections must never use them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; more wait in the kernel's backlog (no descriptor).
    pub max_connections: usize,
    /// Time for a request's headers to arrive, and for the next request on an idle
    /// keep-alive connection; then the connection is closed.
    pub header_timeout: Duration,
    /// Longest a connection stays open, whatever it does (a client that never reads).
    pub connection_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (200 once a rule set has been applied)
/// until the task is dropped, within `limits`. Only `GET` is answered (405 otherwise).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    stats: SharedStats,
    limits: HttpLimits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut failing = false;
    loop {
        // A slot first: at the cap, connections wait unaccepted, holding no descriptor.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                // EMFILE and the like: do not spin; the backlog keeps the clients. Said
                // once per episode.
                if !failing {
                    tracing::warn!(error = %e, "metrics listener cannot accept; trying every 100 ms");
                }
                failing = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (registry, stats) = (registry.clone(), stats.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (registry, stats) = (registry.clone(), stats.clone());
                async move { Ok::<_, Infallible>(respond(&req, registry, stats).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_timeout, conn).await;
        });
    }
}

async fn respond<B>(
    req: &Request<B>,
    registry: Arc<Registry>,
    stats: SharedStats,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut resp = Response::new(Full::new(Bytes::from("only GET\n")));
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return resp;
    }
    let (status, body) = match req.uri().path() {
        "/metrics" => {
            // Gathering runs nft: keep it off the async workers.
            let text = tokio::task::spawn_blocking(move || encode(&registry))
                .await
                .unwrap_or_default();
            (StatusCode::OK, text)
        }
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" if is_ready(&stats) => (StatusCode::OK, "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no rule set applied yet\n".to_string(),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
