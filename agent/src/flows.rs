//! The denied-flow log: each packet our drop rules send to NFLOG ([`crate::nfnl::nflog`])
//! becomes one JSON line naming the rule that decided it (tier, policy and rule, or the
//! pod's default deny, or the source check), printed on standard output and kept in a
//! bounded ring that `/flows` serves (most recent last).
//!
//! Which rule: the log prefix is the name of the dropping rule's counter, looked up in the
//! counters of the table in force. An audit chain's counter (`audit/COUNTER`) names what
//! would have denied a packet the enforced rules let through: verdict `would-deny`. Which pods: local pods by their addresses in the node's
//! rule set; any other address is shown as it is.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use palisade_policy::model::PodKey;
use palisade_policy::NodeRuleSet;
use prometheus::{IntCounter, Registry};
use serde::Serialize;

use crate::nfnl::nflog::{self, Logged};
use crate::render::{log_prefix, CounterMeta};

/// What turns a logged packet into a line: the names in force.
#[derive(Default)]
struct Names {
    node: String,
    rules: HashMap<String, CounterMeta>,
    pods: HashMap<IpAddr, PodKey>,
}

/// The flow log: names, ring and counters, shared by the reader thread, the agent's loop
/// (which gives it the names of each table before applying it) and `/flows`.
pub struct FlowLog {
    /// The names of the table being applied, then of the one before it: a packet logged
    /// by either, around the moment one replaces the other, is still named.
    names: Mutex<[Names; 2]>,
    ring: Mutex<VecDeque<String>>,
    capacity: usize,
    lines: IntCounter,
    lost: IntCounter,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Line {
    pub time: String,
    pub node: String,
    pub direction: &'static str,
    pub verdict: &'static str,
    pub protocol: String,
    pub src: End,
    pub dst: End,
    pub decided_by: DecidedBy,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct End {
    pub address: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `namespace/name` of a pod on this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DecidedBy {
    Rule {
        tier: String,
        policy_kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        policy: String,
        rule: String,
    },
    /// The subject pod is isolated and no rule allowed the flow.
    DefaultDeny { pod: String },
    /// The pod sent from an address that is not its own.
    Spoofed { pod: String },
    /// A rule of a table no longer in force (the line came after a change).
    Unknown { prefix: String },
}

impl FlowLog {
    pub fn new(capacity: usize, registry: &Registry) -> Arc<FlowLog> {
        let lines = IntCounter::new(
            "palisade_flow_log_lines_total",
            "Denied flows written to the flow log.",
        )
        .expect("constant");
        let lost = IntCounter::new(
            "palisade_flow_log_lost_total",
            "Times the kernel could not hand the agent logged packets (its socket buffer was full): lines lost.",
        )
        .expect("constant");
        let _ = registry.register(Box::new(lines.clone()));
        let _ = registry.register(Box::new(lost.clone()));
        Arc::new(FlowLog {
            names: Mutex::default(),
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            lines,
            lost,
        })
    }

    /// The names of the table about to be applied (those of the last one are kept).
    pub fn update(&self, rules: &NodeRuleSet, counters: &BTreeMap<String, CounterMeta>) {
        let names = Names {
            node: rules.node.clone(),
            rules: counters
                .iter()
                .map(|(name, meta)| (log_prefix(name), meta.clone()))
                .collect(),
            pods: rules
                .pods
                .iter()
                .flat_map(|p| {
                    let key = PodKey::new(&p.namespace, &p.name);
                    p.ips.iter().map(move |ip| (*ip, key.clone()))
                })
                .collect(),
        };
        let mut both = self.names.lock().unwrap_or_else(|p| p.into_inner());
        both[1] = std::mem::replace(&mut both[0], names);
    }

    /// The line of one logged packet.
    pub fn line(&self, logged: &Logged) -> Line {
        let both = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let pod = |addr: Option<IpAddr>| {
            let a = addr?;
            both.iter()
                .find_map(|n| n.pods.get(&a))
                .map(|k| k.to_string())
        };
        let rule = both.iter().find_map(|n| n.rules.get(&logged.prefix));
        // An audit counter names what would have denied a packet the table let through.
        let (rule, denied) = match rule {
            Some(CounterMeta::Audit(inner)) => (Some(&**inner), "would-deny"),
            other => (other, "deny"),
        };
        let (direction, verdict, decided_by) = match rule {
            Some(CounterMeta::Rule {
                origin: Some(o), ..
            }) => (
                o.direction.as_str(),
                denied,
                DecidedBy::Rule {
                    tier: o.tier.as_str().to_string(),
                    policy_kind: o.policy.kind.as_str().to_string(),
                    namespace: o.policy.namespace.clone(),
                    policy: o.policy.name.clone(),
                    rule: o.name.clone().unwrap_or_else(|| o.index.to_string()),
                },
            ),
            Some(CounterMeta::DefaultDeny { pod, direction }) => (
                direction.as_str(),
                denied,
                DecidedBy::DefaultDeny {
                    pod: pod.to_string(),
                },
            ),
            Some(CounterMeta::Spoofed { pod }) => (
                "egress",
                "spoofed",
                DecidedBy::Spoofed {
                    pod: pod.to_string(),
                },
            ),
            _ => (
                "unknown",
                denied,
                DecidedBy::Unknown {
                    prefix: logged.prefix.clone(),
                },
            ),
        };
        let h = logged.packet.as_ref();
        let (src, dst) = (h.map(|h| h.src), h.map(|h| h.dst));
        Line {
            time: logged.time.map(rfc3339).unwrap_or_default(),
            node: both[0].node.clone(),
            direction,
            verdict,
            protocol: h.map(|h| protocol_name(h.protocol)).unwrap_or_default(),
            src: End {
                address: src,
                port: h.and_then(|h| h.ports).map(|p| p.0),
                pod: pod(src),
            },
            dst: End {
                address: dst,
                port: h.and_then(|h| h.ports).map(|p| p.1),
                pod: pod(dst),
            },
            decided_by,
        }
    }

    fn record(&self, logged: &Logged) {
        let text = serde_json::to_string(&self.line(logged)).unwrap_or_default();
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(text);
        self.lines.inc();
    }

    /// The recent lines, oldest first, one JSON object per line.
    pub fn recent(&self) -> String {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for line in ring.iter() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Reads `socket` (bound by [`nflog::open`]) on a thread of its own until the process
    /// ends; an error other than an overflow ends the log with a log line.
    pub fn read(self: &Arc<FlowLog>, socket: netlink_sys::Socket) {
        let log = self.clone();
        let spawned = std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || {
                let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
                loop {
                    buf.clear();
                    match socket.recv(&mut buf, 0) {
                        Ok(n) => nflog::decode(&buf[..n]).iter().for_each(|l| log.record(l)),
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => log.lost.inc(),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::error!(error = %e, "the flow log stopped reading");
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the flow log");
        }
    }
}

fn protocol_name(number: u8) -> String {
    match number {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` of (seconds, microseconds) since the epoch.
fn rfc3339((secs, micros): (u64, u32)) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::nflog::Headers;
    use palisade_policy::model::{Direction, PolicyId, PolicyKind, RuleOrigin, Tier};

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339((0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339((1_796_136_900, 250_000)),
            "2026-12-01T14:55:00.250000Z"
        );
        assert_eq!(rfc3339((951_782_400, 1)), "2000-02-29T00:00:00.000001Z");
    }

    #[test]
    fn lines_name_the_rule_and_the_pods() {
        let log = FlowLog::new(2, &Registry::new());
        let rules = NodeRuleSet {
            node: "n1".into(),
            pods: vec![palisade_policy::PodRules {
                namespace: "ns".into(),
                name: "a".into(),
                ips: vec!["10.0.0.1".parse().unwrap()],
                ingress: Default::default(),
                egress: Default::default(),
                audit: Default::default(),
            }],
            ..NodeRuleSet::default()
        };
        let origin = RuleOrigin {
            policy: PolicyId {
                kind: PolicyKind::AdminNetworkPolicy,
                namespace: None,
                name: "lockdown".into(),
            },
            tier: Tier::Admin,
            priority: 5,
            direction: Direction::Egress,
            index: 0,
            name: Some("no-db".into()),
        };
        let counters = BTreeMap::from([
            (
                "r-1".to_string(),
                CounterMeta::Rule {
                    id: "r-1".into(),
                    origin: Some(origin.clone()),
                },
            ),
            (
                "audit/r-1".to_string(),
                CounterMeta::Audit(Box::new(CounterMeta::Rule {
                    id: "r-1".into(),
                    origin: Some(origin),
                })),
            ),
            (
                "audit/deny-ingress/ns/a".to_string(),
                CounterMeta::Audit(Box::new(CounterMeta::DefaultDeny {
                    pod: PodKey::new("ns", "a"),
                    direction: Direction::Ingress,
                })),
            ),
            (
                "deny-ingress/ns/a".to_string(),
                CounterMeta::DefaultDeny {
                    pod: PodKey::new("ns", "a"),
                    direction: Direction::Ingress,
                },
            ),
        ]);
        log.update(&rules, &counters);
        let logged = |prefix: &str| Logged {
            prefix: prefix.into(),
            time: Some((0, 0)),
            packet: Some(Headers {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.9.0.9".parse().unwrap(),
                protocol: 6,
                ports: Some((40000, 5432)),
            }),
        };
        let line = log.line(&logged("r-1"));
        assert_eq!((line.direction, line.verdict), ("egress", "deny"));
        assert_eq!(line.src.pod.as_deref(), Some("ns/a"));
        assert_eq!(line.dst.pod, None);
        assert_eq!(line.dst.port, Some(5432));
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["decided_by"]["kind"], "rule");
        assert_eq!(json["decided_by"]["policy"], "lockdown");
        assert_eq!(json["decided_by"]["rule"], "no-db");
        assert_eq!(json["decided_by"]["tier"], "Admin");
        assert_eq!(json["protocol"], "TCP");
        let line = log.line(&logged("deny-ingress/ns/a"));
        assert_eq!(line.direction, "ingress");
        assert_eq!(
            line.decided_by,
            DecidedBy::DefaultDeny { pod: "ns/a".into() }
        );
        assert!(matches!(
            log.line(&logged("gone")).decided_by,
            DecidedBy::Unknown { .. }
        ));
        // Audit: the same attribution, verdict "would-deny".
        let line = log.line(&logged("audit/r-1"));
        assert_eq!((line.direction, line.verdict), ("egress", "would-deny"));
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["verdict"], "would-deny");
        assert_eq!(json["decided_by"]["policy"], "lockdown");
        let line = log.line(&logged("audit/deny-ingress/ns/a"));
        assert_eq!((line.direction, line.verdict), ("ingress", "would-deny"));
        assert_eq!(
            line.decided_by,
            DecidedBy::DefaultDeny { pod: "ns/a".into() }
        );

        // The ring keeps the last `capacity` lines.
        for p in ["r-1", "deny-ingress/ns/a", "gone"] {
            log.record(&logged(p));
        }
        let recent = log.recent();
        assert_eq!(recent.lines().count(), 2);
        assert!(recent.lines().last().unwrap().contains("\"gone\""));
        assert_eq!(log.lines.get(), 3);
    }
}
