//! Cluster-scoped, tiered policies into the model: `ClusterNetworkPolicy` (v1alpha2 and
//! v1beta1, same fields), and its predecessors `AdminNetworkPolicy` (Admin tier) and
//! `BaselineAdminNetworkPolicy` (Baseline tier) of v1alpha1.

mod types;

use palisade_policy::{
    Action, Direction, Isolation, LabelSelector, NamespaceScope, Peer, Policy, PolicyId,
    PolicyKind, PortRule, PortSpec, Protocol, Rule, Subject, Tier, Warning,
};
use serde_json::Value;

use crate::documents::typed;
use crate::error::{Errors, ObjectError, ObjectRef};
use crate::fields::{self, HostBits, LabelSyntax::Unchecked};
use crate::syntax::{self, NameRule};
use crate::Converted;
use types::*;

/// `ClusterNetworkPolicy` allows 25 rules per direction.
pub const CNP_MAX_RULES: usize = 25;
/// v1alpha1 allows 100 rules per direction.
pub const V1ALPHA1_MAX_RULES: usize = 100;
const MAX_PRIORITY: i64 = 1000;
const MAX_RULE_NAME: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Cnp,
    Anp,
    Banp,
}

impl Flavor {
    fn kind(self) -> PolicyKind {
        match self {
            Flavor::Cnp => PolicyKind::ClusterNetworkPolicy,
            Flavor::Anp => PolicyKind::AdminNetworkPolicy,
            Flavor::Banp => PolicyKind::BaselineAdminNetworkPolicy,
        }
    }

    /// What the CRD's CEL rule on a `networks` CIDR says of host bits.
    fn host_bits(self) -> HostBits {
        match self {
            Flavor::Cnp => HostBits::Refused,
            Flavor::Anp | Flavor::Banp => HostBits::Cleared,
        }
    }

    fn max_rules(self) -> usize {
        match self {
            Flavor::Cnp => CNP_MAX_RULES,
            Flavor::Anp | Flavor::Banp => V1ALPHA1_MAX_RULES,
        }
    }

    fn action(self, action: &str) -> Result<Action, String> {
        match (self, action) {
            (Flavor::Cnp, "Accept") | (Flavor::Anp | Flavor::Banp, "Allow") => Ok(Action::Allow),
            (_, "Deny") => Ok(Action::Deny),
            (Flavor::Cnp | Flavor::Anp, "Pass") => Ok(Action::Pass),
            (Flavor::Banp, "Pass") => Err(
                "Pass is not allowed in a BaselineAdminNetworkPolicy (expected Allow or Deny)"
                    .into(),
            ),
            (Flavor::Cnp, "Allow") => Err(
                "unknown action \"Allow\": ClusterNetworkPolicy says Accept (expected Accept, Deny or Pass)".into(),
            ),
            (Flavor::Anp | Flavor::Banp, "Accept") => Err(format!(
                "unknown action \"Accept\": {} says Allow (expected {})",
                self.kind(),
                self.action_list()
            )),
            (_, other) => Err(format!(
                "unknown action {other:?} (expected {})",
                self.action_list()
            )),
        }
    }

    fn action_list(self) -> &'static str {
        match self {
            Flavor::Cnp => "Accept, Deny or Pass",
            Flavor::Anp => "Allow, Deny or Pass",
            Flavor::Banp => "Allow or Deny",
        }
    }
}

/// One rule, whichever version it came from.
struct RuleIn<'a> {
    name: Option<&'a str>,
    action: Option<&'a str>,
    peers: Option<&'a [PeerDoc]>,
    ports: PortsIn<'a>,
}

enum PortsIn<'a> {
    Protocols(Option<&'a [ProtocolDoc]>),
    Ports(Option<&'a [AnpPortDoc]>),
}

struct Ctx {
    flavor: Flavor,
    errs: Errors,
    /// `(path, message)` of things that do not stop the policy but weaken it.
    warnings: Vec<(String, String)>,
    /// The object's `palisade.dev/enforcement` annotation (read with its name).
    enforcement: Option<palisade_policy::Enforcement>,
}

/// Converts a `ClusterNetworkPolicy` object (v1alpha2 or v1beta1).
pub fn cluster_network_policy(value: &Value, object: &ObjectRef) -> Result<Converted, ObjectError> {
    let obj: Object<CnpSpec> = typed(value, object)?;
    let mut ctx = Ctx::new(Flavor::Cnp);
    let name = ctx.name(&obj.metadata);
    let Some(spec) = obj.spec else {
        return ctx.missing_spec(object);
    };
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            ctx.errs.add(
                "spec.tier",
                format!("unknown tier {other:?} (expected Admin or Baseline)"),
            );
            Tier::Admin
        }
        None => {
            ctx.errs.add("spec.tier", "required (Admin or Baseline)");
            Tier::Admin
        }
    };
    let priority = ctx.priority(spec.priority);
    let subject = ctx.subject(spec.subject.as_ref());
    let ingress: Vec<RuleIn> = spec
        .ingress
        .iter()
        .flatten()
        .map(|r| RuleIn {
            name: r.name.as_deref(),
            action: r.action.as_deref(),
            peers: r.from.as_deref(),
            ports: PortsIn::Protocols(r.protocols.as_deref()),
        })
        .collect();
    let egress: Vec<RuleIn> = spec
        .egress
        .iter()
        .flatten()
        .map(|r| RuleIn {
            name: r.name.as_deref(),
            action: r.action.as_deref(),
            peers: r.to.as_deref(),
            ports: PortsIn::Protocols(r.protocols.as_deref()),
        })
        .collect();
    ctx.finish(object, name, tier, priority, subject, &ingress, &egress)
}

/// Converts a v1alpha1 `AdminNetworkPolicy` (an Admin-tier policy).
pub fn admin_network_policy(value: &Value, object: &ObjectRef) -> Result<Converted, ObjectError> {
    let obj: Object<AnpSpec> = typed(value, object)?;
    let mut ctx = Ctx::new(Flavor::Anp);
    let name = ctx.name(&obj.metadata);
    let Some(spec) = obj.spec else {
        return ctx.missing_spec(object);
    };
    let priority = ctx.priority(spec.priority);
    let subject = ctx.subject(spec.subject.as_ref());
    let (ingress, egress) = anp_rules(spec.ingress.as_deref(), spec.egress.as_deref());
    ctx.finish(
        object,
        name,
        Tier::Admin,
        priority,
        subject,
        &ingress,
        &egress,
    )
}

/// Converts a v1alpha1 `BaselineAdminNetworkPolicy` (the Baseline-tier singleton `default`).
pub fn baseline_admin_network_policy(
    value: &Value,
    object: &ObjectRef,
) -> Result<Converted, ObjectError> {
    let obj: Object<BanpSpec> = typed(value, object)?;
    let mut ctx = Ctx::new(Flavor::Banp);
    let name = ctx.name(&obj.metadata);
    if !name.is_empty() && name != "default" {
        ctx.errs.add(
            "metadata.name",
            format!("{name:?}: the BaselineAdminNetworkPolicy is a singleton named \"default\""),
        );
    }
    let Some(spec) = obj.spec else {
        return ctx.missing_spec(object);
    };
    let subject = ctx.subject(spec.subject.as_ref());
    let (ingress, egress) = anp_rules(spec.ingress.as_deref(), spec.egress.as_deref());
    ctx.finish(object, name, Tier::Baseline, 0, subject, &ingress, &egress)
}

fn anp_rules<'a>(
    ingress: Option<&'a [AnpIngressRule]>,
    egress: Option<&'a [AnpEgressRule]>,
) -> (Vec<RuleIn<'a>>, Vec<RuleIn<'a>>) {
    let ingress = ingress
        .into_iter()
        .flatten()
        .map(|r| RuleIn {
            name: r.name.as_deref(),
            action: r.action.as_deref(),
            peers: r.from.as_deref(),
            ports: PortsIn::Ports(r.ports.as_deref()),
        })
        .collect();
    let egress = egress
        .into_iter()
        .flatten()
        .map(|r| RuleIn {
            name: r.name.as_deref(),
            action: r.action.as_deref(),
            peers: r.to.as_deref(),
            ports: PortsIn::Ports(r.ports.as_deref()),
        })
        .collect();
    (ingress, egress)
}

impl Ctx {
    fn new(flavor: Flavor) -> Self {
        Ctx {
            flavor,
            errs: Errors::default(),
            warnings: Vec::new(),
            enforcement: None,
        }
    }

    fn name(
        &mut self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> String {
        let (enforcement, warning) = crate::enforcement::annotation(meta);
        self.enforcement = enforcement;
        self.warnings.extend(warning);
        // Custom resources: apiextensions validates their metadata with NameIsDNSSubdomain.
        syntax::metadata(meta, NameRule::Subdomain, false, &mut self.errs)
    }

    fn missing_spec(mut self, object: &ObjectRef) -> Result<Converted, ObjectError> {
        self.errs.add("spec", "required");
        Err(self.errs.fail(object))
    }

    fn priority(&mut self, priority: Option<i64>) -> u32 {
        match priority {
            None => {
                self.errs.add("spec.priority", "required (0..=1000)");
                0
            }
            Some(p) if (0..=MAX_PRIORITY).contains(&p) => p as u32,
            Some(p) => {
                self.errs.add(
                    "spec.priority",
                    format!("{p} is out of range 0..={MAX_PRIORITY}"),
                );
                0
            }
        }
    }

    fn subject(&mut self, subject: Option<&SubjectDoc>) -> Subject {
        let everything = Subject::Cluster {
            namespaces: LabelSelector::everything(),
            pods: LabelSelector::everything(),
        };
        let Some(subject) = subject else {
            self.errs
                .add("spec.subject", "required (namespaces or pods)");
            return everything;
        };
        match (&subject.namespaces, &subject.pods) {
            (Some(ns), None) => Subject::Cluster {
                namespaces: fields::selector(
                    ns,
                    "spec.subject.namespaces",
                    &mut self.errs,
                    Unchecked(&mut self.warnings),
                ),
                pods: LabelSelector::everything(),
            },
            (None, Some(pods)) => {
                let (namespaces, pods) = self.namespaced_pod(pods, "spec.subject.pods");
                Subject::Cluster { namespaces, pods }
            }
            _ => {
                self.errs.add(
                    "spec.subject",
                    "exactly one of namespaces and pods must be set",
                );
                everything
            }
        }
    }

    fn namespaced_pod(&mut self, p: &NamespacedPod, path: &str) -> (LabelSelector, LabelSelector) {
        let namespaces = match &p.namespace_selector {
            Some(s) => fields::selector(
                s,
                &format!("{path}.namespaceSelector"),
                &mut self.errs,
                Unchecked(&mut self.warnings),
            ),
            None => LabelSelector::everything(),
        };
        let pods = match &p.pod_selector {
            Some(s) => fields::selector(
                s,
                &format!("{path}.podSelector"),
                &mut self.errs,
                Unchecked(&mut self.warnings),
            ),
            None => {
                self.errs.add(
                    format!("{path}.podSelector"),
                    "required ({} selects every pod)",
                );
                LabelSelector::everything()
            }
        };
        (namespaces, pods)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        mut self,
        object: &ObjectRef,
        name: String,
        tier: Tier,
        priority: u32,
        subject: Subject,
        ingress: &[RuleIn],
        egress: &[RuleIn],
    ) -> Result<Converted, ObjectError> {
        let ingress = self.rules(ingress, Direction::Ingress);
        let egress = self.rules(egress, Direction::Egress);
        let id = PolicyId {
            kind: self.flavor.kind(),
            namespace: None,
            name,
        };
        let warnings = self
            .warnings
            .into_iter()
            .map(|(path, message)| Warning {
                policies: vec![id.clone()],
                message: format!("{path}: {message}"),
            })
            .collect();
        let policy = Policy {
            id,
            tier,
            priority,
            subject,
            ingress,
            egress,
            isolates: Isolation::default(),
            enforcement: self.enforcement,
        };
        self.errs.finish(object, Converted { policy, warnings })
    }

    fn rules(&mut self, rules: &[RuleIn], direction: Direction) -> Vec<Rule> {
        let path = format!("spec.{direction}");
        fields::rule_count(rules.len(), self.flavor.max_rules(), &path, &mut self.errs);
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| self.rule(r, direction, &format!("{path}[{i}]")))
            .collect()
    }

    fn rule(&mut self, r: &RuleIn, direction: Direction, path: &str) -> Rule {
        let name = r.name.filter(|n| !n.is_empty()).map(str::to_string);
        if name.as_ref().is_some_and(|n| n.len() > MAX_RULE_NAME) {
            self.errs.add(
                format!("{path}.name"),
                format!("longer than {MAX_RULE_NAME} characters"),
            );
        }
        let action = match r.action {
            None => {
                self.errs.add(
                    format!("{path}.action"),
                    format!("required ({})", self.flavor.action_list()),
                );
                Action::Deny
            }
            Some(a) => self.flavor.action(a).unwrap_or_else(|message| {
                self.errs.add(format!("{path}.action"), message);
                Action::Deny
            }),
        };
        let peers_field = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        let peers_path = format!("{path}.{peers_field}");
        let peers = match r.peers {
            None => {
                self.errs.add(&peers_path, "required: at least one peer");
                Vec::new()
            }
            Some([]) => {
                self.errs.add(&peers_path, "must list at least one peer");
                Vec::new()
            }
            Some(list) => list
                .iter()
                .enumerate()
                .flat_map(|(j, p)| self.peer(p, direction, &format!("{peers_path}[{j}]")))
                .collect(),
        };
        let ports = match &r.ports {
            PortsIn::Protocols(p) => self.protocols(*p, &format!("{path}.protocols")),
            PortsIn::Ports(p) => self.anp_ports(*p, &format!("{path}.ports")),
        };
        let named = ports
            .iter()
            .flatten()
            .any(|p| matches!(p.port, PortSpec::Named(_)));
        let address_peer = peers
            .iter()
            .any(|p| matches!(p, Peer::IpBlock { .. } | Peer::Nodes(_)));
        if named && address_peer {
            self.errs.add(
                path,
                "a named port cannot be used with networks or nodes peers, which have no named ports",
            );
        }
        Rule {
            name,
            action,
            peers: Some(peers),
            ports,
        }
    }

    /// The model's peers for one API peer: `networks` gives one per CIDR.
    fn peer(&mut self, p: &PeerDoc, direction: Direction, path: &str) -> Vec<Peer> {
        let mut known: Vec<&str> = Vec::new();
        let mut unknown: Vec<String> = p.unknown.keys().cloned().collect();
        let present = [
            ("namespaces", p.namespaces.is_some(), true),
            ("pods", p.pods.is_some(), true),
            ("nodes", p.nodes.is_some(), direction == Direction::Egress),
            (
                "networks",
                p.networks.is_some(),
                direction == Direction::Egress,
            ),
            (
                "domainNames",
                p.domain_names.is_some(),
                direction == Direction::Egress,
            ),
        ];
        for (field, set, allowed) in present {
            match (set, allowed) {
                (true, true) => known.push(field),
                (true, false) => unknown.push(field.to_string()),
                _ => {}
            }
        }
        match known.as_slice() {
            [] => {
                let what = if unknown.is_empty() {
                    "no field set".to_string()
                } else {
                    format!(
                        "no field known to an {direction} peer (found {})",
                        unknown.join(", ")
                    )
                };
                self.warnings.push((
                    path.to_string(),
                    format!("{what}; the peer matches nothing (the rule fails closed)"),
                ));
                vec![Peer::Nothing]
            }
            [one] if unknown.is_empty() => self.known_peer(p, one, path),
            _ => {
                let allowed = match direction {
                    Direction::Ingress => "namespaces and pods",
                    Direction::Egress => "namespaces, pods, nodes, networks and domainNames",
                };
                let mut found: Vec<String> = known.iter().map(|s| s.to_string()).collect();
                found.extend(unknown);
                self.errs.add(
                    path,
                    format!(
                        "exactly one of {allowed} must be set (found {})",
                        found.join(", ")
                    ),
                );
                Vec::new()
            }
        }
    }

    fn known_peer(&mut self, p: &PeerDoc, field: &str, path: &str) -> Vec<Peer> {
        let at = format!("{path}.{field}");
        match (field, p) {
            (
                "namespaces",
                PeerDoc {
                    namespaces: Some(sel),
                    ..
                },
            ) => vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(fields::selector(
                    sel,
                    &at,
                    &mut self.errs,
                    Unchecked(&mut self.warnings),
                )),
                pods: LabelSelector::everything(),
            }],
            (
                "pods",
                PeerDoc {
                    pods: Some(pods), ..
                },
            ) => {
                let (namespaces, pods) = self.namespaced_pod(pods, &at);
                vec![Peer::Pods {
                    namespaces: NamespaceScope::Selector(namespaces),
                    pods,
                }]
            }
            (
                "nodes",
                PeerDoc {
                    nodes: Some(sel), ..
                },
            ) => {
                vec![Peer::Nodes(fields::selector(
                    sel,
                    &at,
                    &mut self.errs,
                    Unchecked(&mut self.warnings),
                ))]
            }
            (
                "networks",
                PeerDoc {
                    networks: Some(list),
                    ..
                },
            ) => {
                if list.is_empty() {
                    self.errs.add(&at, "must list at least one CIDR");
                }
                let host_bits = self.flavor.host_bits();
                list.iter()
                    .enumerate()
                    .filter_map(|(k, c)| {
                        let at = format!("{at}[{k}]");
                        if c.len() > fields::CRD_CIDR_MAX_LEN {
                            let max = fields::CRD_CIDR_MAX_LEN;
                            self.errs
                                .add(&at, format!("may not be more than {max} bytes"));
                            return None;
                        }
                        fields::cidr(c, &at, &mut self.errs, host_bits)
                    })
                    .map(|cidr| Peer::IpBlock {
                        cidr,
                        except: Vec::new(),
                    })
                    .collect()
            }
            _ => {
                self.warnings.push((
                    at,
                    "domainNames is not enforced yet; the rule fails closed".to_string(),
                ));
                vec![Peer::Nothing]
            }
        }
    }

    /// `protocols`: absent means every port of every protocol.
    fn protocols(&mut self, list: Option<&[ProtocolDoc]>, path: &str) -> Option<Vec<PortRule>> {
        let list = list?;
        if list.is_empty() {
            self.errs
                .add(path, "must list at least one protocol, or be left out");
        }
        let mut out = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let set = [
                ("tcp", Protocol::Tcp, &p.tcp),
                ("udp", Protocol::Udp, &p.udp),
                ("sctp", Protocol::Sctp, &p.sctp),
            ];
            let count = set.iter().filter(|(_, _, v)| v.is_some()).count()
                + usize::from(p.destination_named_port.is_some());
            if count != 1 {
                self.errs.add(
                    &at,
                    "exactly one of tcp, udp, sctp and destinationNamedPort must be set",
                );
                continue;
            }
            if let Some(name) = &p.destination_named_port {
                fields::port_name(name, &format!("{at}.destinationNamedPort"), &mut self.errs);
                out.extend(named_everywhere(name));
                continue;
            }
            for (field, protocol, ports) in set {
                let Some(ports) = ports else { continue };
                let at = format!("{at}.{field}.destinationPort");
                let Some(port) = &ports.destination_port else {
                    self.errs.add(at, "required (number or range)");
                    continue;
                };
                let spec = match (port.number, &port.range) {
                    (Some(n), None) => {
                        let n = fields::port_number(n, &format!("{at}.number"), &mut self.errs);
                        Some(PortSpec::Range { start: n, end: n })
                    }
                    (None, Some(r)) => self.range(r.start, r.end, &format!("{at}.range")),
                    _ => {
                        self.errs
                            .add(&at, "exactly one of number and range must be set");
                        None
                    }
                };
                out.extend(spec.map(|port| PortRule { protocol, port }));
            }
        }
        Some(out)
    }

    /// v1alpha1 `ports`: absent means every port of every protocol.
    fn anp_ports(&mut self, list: Option<&[AnpPortDoc]>, path: &str) -> Option<Vec<PortRule>> {
        let list = list?;
        if list.is_empty() {
            self.errs
                .add(path, "must list at least one port, or be left out");
        }
        let mut out = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let at = format!("{path}[{i}]");
            match (&p.port_number, &p.named_port, &p.port_range) {
                (Some(n), None, None) => {
                    let at = format!("{at}.portNumber");
                    let protocol = fields::protocol(
                        n.protocol.as_deref(),
                        &format!("{at}.protocol"),
                        &mut self.errs,
                    );
                    let port = fields::port_number(n.port, &format!("{at}.port"), &mut self.errs);
                    out.push(PortRule {
                        protocol,
                        port: PortSpec::Range {
                            start: port,
                            end: port,
                        },
                    });
                }
                (None, Some(name), None) => {
                    fields::port_name(name, &format!("{at}.namedPort"), &mut self.errs);
                    out.extend(named_everywhere(name));
                }
                (None, None, Some(r)) => {
                    let at = format!("{at}.portRange");
                    let protocol = fields::protocol(
                        r.protocol.as_deref(),
                        &format!("{at}.protocol"),
                        &mut self.errs,
                    );
                    if let Some(port) = self.range(r.start, r.end, &at) {
                        out.push(PortRule { protocol, port });
                    }
                }
                _ => self.errs.add(
                    &at,
                    "exactly one of portNumber, namedPort and portRange must be set",
                ),
            }
        }
        Some(out)
    }

    /// A port range as the CRDs define it: both ends in 1..=65535, `start < end`.
    fn range(&mut self, start: i64, end: i64, path: &str) -> Option<PortSpec> {
        let errors_before = self.errs.len();
        let s = fields::port_number(start, &format!("{path}.start"), &mut self.errs);
        let e = fields::port_number(end, &format!("{path}.end"), &mut self.errs);
        if start >= end {
            self.errs
                .add(path, format!("start {start} must be less than end {end}"));
        }
        (self.errs.len() == errors_before).then_some(PortSpec::Range { start: s, end: e })
    }
}

/// A named port in a cluster policy has no protocol of its own: it means the container port
/// of that name, whatever its protocol, so it stands for the name under each protocol.
fn named_everywhere(name: &str) -> impl Iterator<Item = PortRule> + '_ {
    Protocol::ALL.into_iter().map(move |protocol| PortRule {
        protocol,
        port: PortSpec::Named(name.to_string()),
    })
}
