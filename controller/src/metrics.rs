//! The controller's Prometheus metrics.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub watch_events: IntCounterVec,
    pub compile_duration: Histogram,
    pub nodes_connected: IntGauge,
    pub generation_lag: IntGaugeVec,
    pub bytes_sent: IntCounter,
    pub invalid_objects: IntCounterVec,
    pub is_leader: IntGauge,
    pub generation: IntGauge,
    pub auth_failures: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            watch_events: IntCounterVec::new(
                Opts::new(
                    "palisade_controller_watch_events_total",
                    "Objects seen by the watches (and file sources), by kind.",
                ),
                &["kind"],
            )
            .unwrap(),
            compile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "palisade_controller_compile_duration_seconds",
                    "Time to apply a batch of changes to the compiler and publish the nodes it touched.",
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
                ]),
            )
            .unwrap(),
            nodes_connected: IntGauge::new(
                "palisade_controller_nodes_connected",
                "Nodes with at least one agent stream open to this replica.",
            )
            .unwrap(),
            generation_lag: IntGaugeVec::new(
                Opts::new(
                    "palisade_controller_node_generation_lag",
                    "Generations published to a connected node that its agent has not acknowledged as enforced.",
                ),
                &["node"],
            )
            .unwrap(),
            bytes_sent: IntCounter::new(
                "palisade_controller_bytes_sent_total",
                "Bytes of rule updates sent to agents (protobuf encoded).",
            )
            .unwrap(),
            invalid_objects: IntCounterVec::new(
                Opts::new(
                    "palisade_controller_invalid_objects_total",
                    "Object versions Palisade rejected (the last good version stays in force), by kind.",
                ),
                &["kind"],
            )
            .unwrap(),
            is_leader: IntGauge::new(
                "palisade_controller_is_leader",
                "1 when this replica holds the status Lease.",
            )
            .unwrap(),
            generation: IntGauge::new(
                "palisade_controller_generation",
                "The last compile generation this replica published.",
            )
            .unwrap(),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "palisade_controller_stream_refused_total",
                    "Agent streams refused, by reason.",
                ),
                &["reason"],
            )
            .unwrap(),
            registry,
        };
        for c in [
            Box::new(m.watch_events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.compile_duration.clone()),
            Box::new(m.nodes_connected.clone()),
            Box::new(m.generation_lag.clone()),
            Box::new(m.bytes_sent.clone()),
            Box::new(m.invalid_objects.clone()),
            Box::new(m.is_leader.clone()),
            Box::new(m.generation.clone()),
            Box::new(m.auth_failures.clone()),
        ] {
            m.registry.register(c).expect("metric names are distinct");
        }
        m
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = prometheus::Encoder::encode(&encoder, &self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
