//! Prometheus metrics, read from the kernel at scrape time by a collector (no polling
//! loop), and what the shared HTTP server (`palisade-httpd`) answers for `/metrics`,
//! `/healthz` and `/readyz`.

use std::sync::{Arc, Mutex};

use palisade_httpd::{Handler, Reply, ReplyFuture, StatusCode};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Encoder, Gauge, IntCounter, Opts, Registry, TextEncoder};

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
const SUPPRESSED: &str = "palisade_flow_log_suppressed_packets_total";
const SUPPRESSED_HELP: &str =
    "Denied packets not sent to the flow log because its rate limit (in the kernel) was exceeded; they were dropped all the same.";

const UNKNOWN_INTERFACE: &str = "palisade_unknown_interface_packets_total";
const UNKNOWN_INTERFACE_HELP: &str =
    "Packets dropped because their pod interface was not enforced yet (no rules for the pod).";

/// Reads the table's named counters with `nft` when scraped.
pub struct KernelCollector {
    nft: Nft,
    stats: SharedStats,
    descs: Vec<Desc>,
}

const AUDIT: &str = "palisade_audit_would_deny_packets_total";
const AUDIT_HELP: &str = "Packets the enforced rules allowed and the full view (policies in audit included) would deny, by the rule that would (for a default deny: kind DefaultDeny, and the pod's namespace and name).";

/// The rule counter labels of a counter's origin: kind, namespace, name (of the policy),
/// direction, rule (its name or index; its id without an origin), tier.
fn rule_labels(id: &str, origin: Option<&palisade_policy::model::RuleOrigin>) -> [String; 6] {
    match origin {
        Some(o) => [
            o.policy.kind.as_str().to_string(),
            o.policy.namespace.clone().unwrap_or_default(),
            o.policy.name.clone(),
            o.direction.as_str().to_string(),
            o.name.clone().unwrap_or_else(|| o.index.to_string()),
            o.tier.as_str().to_string(),
        ],
        None => {
            let mut labels: [String; 6] = Default::default();
            labels[4] = id.to_string();
            labels
        }
    }
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
        let audit = counter_vec(AUDIT, AUDIT_HELP, &RULE_LABELS);
        for v in [&a, &b, &c, &d, &audit] {
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
            (SUPPRESSED, SUPPRESSED_HELP),
            (UNKNOWN_INTERFACE, UNKNOWN_INTERFACE_HELP),
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
        let audit = counter_vec(AUDIT, AUDIT_HELP, &RULE_LABELS);
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
        let mut suppressed = 0u64;
        let unknown = IntCounter::new(UNKNOWN_INTERFACE, UNKNOWN_INTERFACE_HELP).expect("constant");
        match self.nft.counters() {
            Ok(list) => {
                for (name, p, b) in list {
                    match metas.get(&name) {
                        Some(CounterMeta::Rule { id, origin }) => {
                            let labels = rule_labels(id, origin.as_ref());
                            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                            packets.with_label_values(&refs).inc_by(p as f64);
                            bytes.with_label_values(&refs).inc_by(b as f64);
                        }
                        Some(CounterMeta::Audit(inner)) => {
                            let labels = match &**inner {
                                CounterMeta::Rule { id, origin } => {
                                    rule_labels(id, origin.as_ref())
                                }
                                CounterMeta::DefaultDeny { pod, direction } => [
                                    "DefaultDeny".to_string(),
                                    pod.namespace.clone(),
                                    pod.name.clone(),
                                    direction.as_str().to_string(),
                                    String::new(),
                                    String::new(),
                                ],
                                _ => continue,
                            };
                            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                            audit.with_label_values(&refs).inc_by(p as f64);
                        }
                        Some(CounterMeta::DefaultDeny { pod, direction }) => deny
                            .with_label_values(&[&pod.namespace, &pod.name, direction.as_str()])
                            .inc_by(p as f64),
                        Some(CounterMeta::Spoofed { pod }) => spoof
                            .with_label_values(&[&pod.namespace, &pod.name])
                            .inc_by(p as f64),
                        Some(CounterMeta::FlowLogSuppressed) => suppressed += p,
                        Some(CounterMeta::UnknownInterface) => unknown.inc_by(p),
                        None => {}
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read nftables counters for a scrape"),
        }
        let mut out = Vec::new();
        for v in [&packets, &bytes, &deny, &spoof, &audit] {
            out.extend(v.collect());
        }
        out.extend(unknown.collect());
        let err = IntCounter::new(
            "palisade_apply_errors_total",
            "Failed nftables transactions.",
        )
        .expect("constant");
        err.inc_by(errors);
        out.extend(err.collect());
        let suppressed_c = IntCounter::new(SUPPRESSED, SUPPRESSED_HELP).expect("constant");
        suppressed_c.inc_by(suppressed);
        out.extend(suppressed_c.collect());
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

/// `/metrics`, `/healthz` and `/readyz` (200 once a rule set has been applied), served by
/// [`palisade_httpd::serve`].
pub struct Endpoints {
    pub registry: Arc<Registry>,
    pub stats: SharedStats,
    pub flows: Option<Arc<crate::flows::FlowLog>>,
}

impl Handler for Endpoints {
    fn get(&self, path: &str) -> ReplyFuture {
        let (registry, stats) = (self.registry.clone(), self.stats.clone());
        let flows = self.flows.clone();
        let path = path.to_string();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => {
                    // Gathering runs nft: keep it off the async workers.
                    let text = tokio::task::spawn_blocking(move || encode(&registry))
                        .await
                        .unwrap_or_default();
                    Reply::ok(text)
                }
                "/healthz" => Reply::ok("ok\n"),
                "/flows" => match flows {
                    Some(log) => Reply::ok(log.recent()),
                    None => Reply::not_found(),
                },
                "/readyz" if is_ready(&stats) => Reply::ok("ready\n"),
                "/readyz" => {
                    Reply::new(StatusCode::SERVICE_UNAVAILABLE, "no rule set applied yet\n")
                }
                _ => Reply::not_found(),
            }
        })
    }
}
