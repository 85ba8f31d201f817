//! The compiled form to protobuf messages and back. Encoding is total; decoding checks
//! addresses, enums, port numbers and address ranges and names the field that is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use palisade_policy::ruleset::{
    AuditRules, Clause, DirectionRules, Group, PodRules, PortEndpoint, PortRange, RuleInstance,
    TierList,
};
use palisade_policy::{
    Action, AddrSet, Direction, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier,
};

use crate::pb;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid update: {field}: {message}")]
pub struct WireError {
    pub field: String,
    pub message: String,
}

pub(crate) fn err(field: impl Into<String>, message: impl Into<String>) -> WireError {
    WireError {
        field: field.into(),
        message: message.into(),
    }
}

pub fn addr_to_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn addr_from_bytes(b: &[u8], field: &str) -> Result<IpAddr, WireError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap()))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()))),
        n => Err(err(field, format!("an address has 4 or 16 bytes, not {n}"))),
    }
}

fn protocol_to(p: Protocol) -> i32 {
    (match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    }) as i32
}

fn protocol_from(v: i32, field: &str) -> Result<Protocol, WireError> {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
        _ => Err(err(field, format!("unknown protocol {v}"))),
    }
}

fn port_from(v: u32, field: &str) -> Result<u16, WireError> {
    u16::try_from(v).map_err(|_| err(field, format!("port {v} is out of range")))
}

pub fn addrset_to(a: &AddrSet) -> pb::AddrSet {
    pb::AddrSet {
        v4: a
            .v4
            .iter()
            .map(|&(first, last)| pb::Range4 { first, last })
            .collect(),
        v6: a
            .v6
            .iter()
            .map(|&(first, last)| pb::Range6 {
                first: first.to_be_bytes().to_vec(),
                last: last.to_be_bytes().to_vec(),
            })
            .collect(),
    }
}

fn u128_from(b: &[u8], field: &str) -> Result<u128, WireError> {
    <[u8; 16]>::try_from(b)
        .map(u128::from_be_bytes)
        .map_err(|_| {
            err(
                field,
                format!("an IPv6 bound has 16 bytes, not {}", b.len()),
            )
        })
}

/// Ranges must come sorted, disjoint and not adjacent, as the compiler makes them: anything
/// else means the sender is broken, and guessing what it meant could widen a rule.
pub fn addrset_from(a: &pb::AddrSet, field: &str) -> Result<AddrSet, WireError> {
    let mut set = AddrSet::new();
    for (i, r) in a.v4.iter().enumerate() {
        set.v4.push((r.first, r.last));
        check_range(r.first, r.last, &format!("{field}.v4[{i}]"))?;
    }
    for (i, r) in a.v6.iter().enumerate() {
        let f = format!("{field}.v6[{i}]");
        let (first, last) = (u128_from(&r.first, &f)?, u128_from(&r.last, &f)?);
        check_range(first, last, &f)?;
        set.v6.push((first, last));
    }
    let mut normal = set.clone();
    normal.normalize();
    if normal != set {
        return Err(err(field, "ranges are not sorted, disjoint and merged"));
    }
    Ok(set)
}

fn check_range<T: PartialOrd>(first: T, last: T, field: &str) -> Result<(), WireError> {
    if first > last {
        return Err(err(field, "first is after last"));
    }
    Ok(())
}

fn endpoints_to<'a>(eps: impl IntoIterator<Item = &'a PortEndpoint>) -> Vec<pb::PortEndpoint> {
    eps.into_iter()
        .map(|e| pb::PortEndpoint {
            address: addr_to_bytes(&e.addr),
            protocol: protocol_to(e.protocol),
            port: e.port.into(),
        })
        .collect()
}

fn endpoints_from(
    eps: &[pb::PortEndpoint],
    field: &str,
) -> Result<BTreeSet<PortEndpoint>, WireError> {
    let mut out = BTreeSet::new();
    for (i, e) in eps.iter().enumerate() {
        let f = format!("{field}[{i}]");
        out.insert(PortEndpoint {
            addr: addr_from_bytes(&e.address, &format!("{f}.address"))?,
            protocol: protocol_from(e.protocol, &format!("{f}.protocol"))?,
            port: port_from(e.port, &format!("{f}.port"))?,
        });
    }
    Ok(out)
}

pub fn group_to(id: &str, g: &Group) -> pb::AddressGroup {
    use pb::address_group::Body;
    let body = match g {
        Group::Addresses(a) => Body::Addresses(addrset_to(a)),
        Group::Hosts(a) => Body::Hosts(addrset_to(a)),
        Group::NamedPorts(eps) => Body::NamedPorts(pb::NamedPorts {
            endpoints: endpoints_to(eps),
        }),
    };
    pb::AddressGroup {
        id: id.to_string(),
        body: Some(body),
    }
}

pub fn group_from(g: &pb::AddressGroup, field: &str) -> Result<(String, Group), WireError> {
    use pb::address_group::Body;
    check_id(&g.id, "g-", &format!("{field}.id"))?;
    let group = match &g.body {
        Some(Body::Addresses(a)) => {
            Group::Addresses(addrset_from(a, &format!("{field}.addresses"))?)
        }
        Some(Body::Hosts(a)) => Group::Hosts(addrset_from(a, &format!("{field}.hosts"))?),
        Some(Body::NamedPorts(n)) => Group::NamedPorts(endpoints_from(
            &n.endpoints,
            &format!("{field}.namedPorts.endpoints"),
        )?),
        None => return Err(err(field, "a group needs a body")),
    };
    Ok((g.id.clone(), group))
}

/// The patch that turns `old` into `new`, if both are of one kind.
pub fn group_patch(id: &str, old: &Group, new: &Group) -> Option<pb::GroupPatch> {
    let patch = pb::GroupPatch {
        id: id.to_string(),
        ..Default::default()
    };
    match (old, new) {
        (Group::Addresses(o), Group::Addresses(n)) | (Group::Hosts(o), Group::Hosts(n)) => {
            Some(pb::GroupPatch {
                add: Some(addrset_to(&n.difference(o))),
                remove: Some(addrset_to(&o.difference(n))),
                ..patch
            })
        }
        (Group::NamedPorts(o), Group::NamedPorts(n)) => Some(pb::GroupPatch {
            add_endpoints: endpoints_to(n.difference(o)),
            remove_endpoints: endpoints_to(o.difference(n)),
            ..patch
        }),
        _ => None,
    }
}

/// `old` with `patch` applied.
pub fn apply_group_patch(
    old: &Group,
    patch: &pb::GroupPatch,
    field: &str,
) -> Result<Group, WireError> {
    let ranges = |set: &Option<pb::AddrSet>, name: &str| match set {
        Some(s) => addrset_from(s, &format!("{field}.{name}")),
        None => Ok(AddrSet::new()),
    };
    let endpoints_given = !patch.add_endpoints.is_empty() || !patch.remove_endpoints.is_empty();
    let ranges_given = patch
        .add
        .as_ref()
        .is_some_and(|a| !a.v4.is_empty() || !a.v6.is_empty())
        || patch
            .remove
            .as_ref()
            .is_some_and(|r| !r.v4.is_empty() || !r.v6.is_empty());
    let patched = |set: &AddrSet| -> Result<AddrSet, WireError> {
        if endpoints_given {
            return Err(err(field, "endpoints patch an address group"));
        }
        let mut out = set.difference(&ranges(&patch.remove, "remove")?);
        out.union_with(&ranges(&patch.add, "add")?);
        Ok(out)
    };
    Ok(match old {
        Group::Addresses(a) => Group::Addresses(patched(a)?),
        Group::Hosts(a) => Group::Hosts(patched(a)?),
        Group::NamedPorts(eps) => {
            if ranges_given {
                return Err(err(field, "address ranges patch a named-port group"));
            }
            let remove =
                endpoints_from(&patch.remove_endpoints, &format!("{field}.removeEndpoints"))?;
            let mut out: BTreeSet<PortEndpoint> = eps.difference(&remove).copied().collect();
            out.extend(endpoints_from(
                &patch.add_endpoints,
                &format!("{field}.addEndpoints"),
            )?);
            Group::NamedPorts(out)
        }
    })
}

/// Ids end up as nftables object names: keep them to what the compiler makes.
fn check_id(id: &str, prefix: &str, field: &str) -> Result<(), WireError> {
    let ok = id.len() <= 64
        && id.starts_with(prefix)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(err(field, format!("{id:?} is not a {prefix}… id")));
    }
    Ok(())
}

fn action_to(a: Action) -> i32 {
    (match a {
        Action::Allow => pb::Action::Allow,
        Action::Deny => pb::Action::Deny,
        Action::Pass => pb::Action::Pass,
    }) as i32
}

fn action_from(v: i32, field: &str) -> Result<Action, WireError> {
    match pb::Action::try_from(v) {
        Ok(pb::Action::Allow) => Ok(Action::Allow),
        Ok(pb::Action::Deny) => Ok(Action::Deny),
        Ok(pb::Action::Pass) => Ok(Action::Pass),
        _ => Err(err(field, format!("unknown action {v}"))),
    }
}

fn kind_to(k: PolicyKind) -> i32 {
    (match k {
        PolicyKind::NetworkPolicy => pb::PolicyKind::NetworkPolicy,
        PolicyKind::ClusterNetworkPolicy => pb::PolicyKind::ClusterNetworkPolicy,
        PolicyKind::AdminNetworkPolicy => pb::PolicyKind::AdminNetworkPolicy,
        PolicyKind::BaselineAdminNetworkPolicy => pb::PolicyKind::BaselineAdminNetworkPolicy,
    }) as i32
}

fn kind_from(v: i32, field: &str) -> Result<PolicyKind, WireError> {
    match pb::PolicyKind::try_from(v) {
        Ok(pb::PolicyKind::NetworkPolicy) => Ok(PolicyKind::NetworkPolicy),
        Ok(pb::PolicyKind::ClusterNetworkPolicy) => Ok(PolicyKind::ClusterNetworkPolicy),
        Ok(pb::PolicyKind::AdminNetworkPolicy) => Ok(PolicyKind::AdminNetworkPolicy),
        Ok(pb::PolicyKind::BaselineAdminNetworkPolicy) => {
            Ok(PolicyKind::BaselineAdminNetworkPolicy)
        }
        _ => Err(err(field, format!("unknown policy kind {v}"))),
    }
}

pub fn policy_to(p: &PolicyId) -> pb::PolicyRef {
    pb::PolicyRef {
        kind: kind_to(p.kind),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    }
}

pub fn policy_from(p: &pb::PolicyRef, field: &str) -> Result<PolicyId, WireError> {
    Ok(PolicyId {
        kind: kind_from(p.kind, &format!("{field}.kind"))?,
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    })
}

fn clause_to(c: &Clause) -> pb::Clause {
    use pb::clause::Kind;
    let kind = match c {
        Clause::PeerPort { peers, ports } => Kind::PeerPort(pb::PeerPort {
            peers: peers.as_ref().map(|ids| pb::GroupList { ids: ids.clone() }),
            ports: ports.as_ref().map(|r| pb::PortList {
                ranges: r
                    .iter()
                    .map(|p| pb::PortRange {
                        protocol: protocol_to(p.protocol),
                        start: p.start.into(),
                        end: p.end.into(),
                    })
                    .collect(),
            }),
        }),
        Clause::NamedPort { group } => Kind::NamedPort(group.clone()),
    };
    pb::Clause { kind: Some(kind) }
}

fn clause_from(c: &pb::Clause, field: &str) -> Result<Clause, WireError> {
    use pb::clause::Kind;
    match &c.kind {
        Some(Kind::PeerPort(pp)) => {
            let peers = match &pp.peers {
                None => None,
                Some(list) => {
                    for (i, id) in list.ids.iter().enumerate() {
                        check_id(id, "g-", &format!("{field}.peers[{i}]"))?;
                    }
                    Some(list.ids.clone())
                }
            };
            let ports = match &pp.ports {
                None => None,
                Some(list) => {
                    let mut out = Vec::with_capacity(list.ranges.len());
                    for (i, r) in list.ranges.iter().enumerate() {
                        let f = format!("{field}.ports[{i}]");
                        let range = PortRange {
                            protocol: protocol_from(r.protocol, &format!("{f}.protocol"))?,
                            start: port_from(r.start, &format!("{f}.start"))?,
                            end: port_from(r.end, &format!("{f}.end"))?,
                        };
                        check_range(range.start, range.end, &f)?;
                        out.push(range);
                    }
                    Some(out)
                }
            };
            Ok(Clause::PeerPort { peers, ports })
        }
        Some(Kind::NamedPort(group)) => {
            check_id(group, "g-", &format!("{field}.namedPort"))?;
            Ok(Clause::NamedPort {
                group: group.clone(),
            })
        }
        None => Err(err(field, "a clause needs a kind")),
    }
}

fn instance_to(r: &RuleInstance) -> pb::RuleInstance {
    pb::RuleInstance {
        rule: r.rule.clone(),
        action: action_to(r.action),
        clauses: r.clauses.iter().map(clause_to).collect(),
    }
}

fn instance_from(r: &pb::RuleInstance, field: &str) -> Result<RuleInstance, WireError> {
    check_id(&r.rule, "r-", &format!("{field}.rule"))?;
    Ok(RuleInstance {
        rule: r.rule.clone(),
        action: action_from(r.action, &format!("{field}.action"))?,
        clauses: r
            .clauses
            .iter()
            .enumerate()
            .map(|(i, c)| clause_from(c, &format!("{field}.clauses[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

fn instances_from(list: &[pb::RuleInstance], field: &str) -> Result<Vec<RuleInstance>, WireError> {
    list.iter()
        .enumerate()
        .map(|(i, r)| instance_from(r, &format!("{field}[{i}]")))
        .collect()
}

/// What the receiving agent reads, from its Hello: each newer feature is sent only to
/// agents that say they read it, so controllers and agents can be upgraded in any order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Form {
    /// Admin and Baseline lists named by id, each sent once per node
    /// (`NodeUpdate.upsert_lists`), instead of spelled out in every pod.
    pub shared_lists: bool,
    /// A changed group as the members it gained and lost (`NodeUpdate.patch_groups`).
    pub group_patches: bool,
}

impl Form {
    /// What this version reads.
    pub const CURRENT: Form = Form {
        shared_lists: true,
        group_patches: true,
    };
    /// What agents before either feature read.
    pub const INLINE: Form = Form {
        shared_lists: false,
        group_patches: false,
    };

    pub fn of_hello(hello: &pb::Hello) -> Form {
        Form {
            shared_lists: hello.shared_lists,
            group_patches: hello.group_patches,
        }
    }
}

/// The lists a node holds, by id.
pub type Lists = BTreeMap<String, Arc<TierList>>;

pub fn tier_list_to(l: &TierList) -> pb::TierList {
    pb::TierList {
        id: l.id().to_string(),
        instances: l.iter().map(instance_to).collect(),
    }
}

pub fn tier_list_from(l: &pb::TierList, field: &str) -> Result<TierList, WireError> {
    let list = TierList::new(instances_from(&l.instances, &format!("{field}.instances"))?);
    if list.id() != l.id {
        return Err(err(
            format!("{field}.id"),
            format!("{:?} is not the id of its instances ({})", l.id, list.id()),
        ));
    }
    Ok(list)
}

fn list_to(l: &TierList, form: Form) -> (Vec<pb::RuleInstance>, String) {
    match form {
        Form {
            shared_lists: true, ..
        } if !l.is_empty() => (Vec::new(), l.id().to_string()),
        _ => (l.iter().map(instance_to).collect(), String::new()),
    }
}

fn list_from(
    inline: &[pb::RuleInstance],
    id: &str,
    lists: &Lists,
    field: &str,
) -> Result<Arc<TierList>, WireError> {
    match (inline.is_empty(), id.is_empty()) {
        (true, true) => Ok(TierList::empty()),
        (false, true) => Ok(Arc::new(TierList::new(instances_from(inline, field)?))),
        (true, false) => lists.get(id).cloned().ok_or_else(|| {
            err(
                format!("{field}List"),
                format!("names list {id}, which the node does not hold"),
            )
        }),
        (false, false) => Err(err(
            format!("{field}List"),
            "a list is either inline or named, not both",
        )),
    }
}

fn direction_rules_to(d: &DirectionRules, form: Form) -> pb::DirectionRules {
    let (admin, admin_list) = list_to(&d.admin, form);
    let (baseline, baseline_list) = list_to(&d.baseline, form);
    pb::DirectionRules {
        admin,
        isolated_by: d.isolated_by.iter().map(policy_to).collect(),
        network_policy: d.network_policy.iter().map(instance_to).collect(),
        baseline,
        admin_list,
        baseline_list,
    }
}

fn direction_rules_from(
    d: Option<&pb::DirectionRules>,
    field: &str,
    lists: &Lists,
) -> Result<DirectionRules, WireError> {
    let Some(d) = d else {
        return Ok(DirectionRules::default());
    };
    Ok(DirectionRules {
        admin: list_from(&d.admin, &d.admin_list, lists, &format!("{field}.admin"))?,
        isolated_by: d
            .isolated_by
            .iter()
            .enumerate()
            .map(|(i, p)| policy_from(p, &format!("{field}.isolatedBy[{i}]")))
            .collect::<Result<_, _>>()?,
        network_policy: instances_from(&d.network_policy, &format!("{field}.networkPolicy"))?,
        baseline: list_from(
            &d.baseline,
            &d.baseline_list,
            lists,
            &format!("{field}.baseline"),
        )?,
    })
}

fn audit_from(
    d: Option<&pb::DirectionRules>,
    field: &str,
    lists: &Lists,
) -> Result<Option<Arc<DirectionRules>>, WireError> {
    d.map(|d| direction_rules_from(Some(d), field, lists).map(Arc::new))
        .transpose()
}

/// Every non-empty Admin and Baseline list a pod references, audit lists included.
pub fn pod_lists(p: &PodRules) -> impl Iterator<Item = &Arc<TierList>> {
    [Some(&p.ingress), Some(&p.egress)]
        .into_iter()
        .chain([p.audit.ingress.as_ref(), p.audit.egress.as_ref()])
        .flatten()
        .flat_map(|d| [&d.admin, &d.baseline])
        .filter(|l| !l.is_empty())
}

pub fn pod_to(p: &PodRules, form: Form) -> pb::PodRules {
    pb::PodRules {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        ips: p.ips.iter().map(addr_to_bytes).collect(),
        ingress: Some(direction_rules_to(&p.ingress, form)),
        egress: Some(direction_rules_to(&p.egress, form)),
        audit_ingress: p
            .audit
            .ingress
            .as_deref()
            .map(|d| direction_rules_to(d, form)),
        audit_egress: p
            .audit
            .egress
            .as_deref()
            .map(|d| direction_rules_to(d, form)),
    }
}

pub fn pod_from(p: &pb::PodRules, field: &str, lists: &Lists) -> Result<PodRules, WireError> {
    if p.namespace.is_empty() || p.name.is_empty() {
        return Err(err(field, "a pod needs a namespace and a name"));
    }
    let ips = p
        .ips
        .iter()
        .enumerate()
        .map(|(i, b)| addr_from_bytes(b, &format!("{field}.ips[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    // A pod without an address is one the model allows (a pending pod's rules, should a
    // source keep it): the agent renders it as sending nothing. Refusing it would refuse
    // the node's whole update.
    Ok(PodRules {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        ips,
        ingress: Arc::new(direction_rules_from(
            p.ingress.as_ref(),
            &format!("{field}.ingress"),
            lists,
        )?),
        egress: Arc::new(direction_rules_from(
            p.egress.as_ref(),
            &format!("{field}.egress"),
            lists,
        )?),
        audit: AuditRules {
            ingress: audit_from(
                p.audit_ingress.as_ref(),
                &format!("{field}.auditIngress"),
                lists,
            )?,
            egress: audit_from(
                p.audit_egress.as_ref(),
                &format!("{field}.auditEgress"),
                lists,
            )?,
        },
    })
}

fn tier_to(t: Tier) -> i32 {
    (match t {
        Tier::Admin => pb::Tier::Admin,
        Tier::NetworkPolicy => pb::Tier::NetworkPolicyTier,
        Tier::Baseline => pb::Tier::Baseline,
    }) as i32
}

fn tier_from(v: i32, field: &str) -> Result<Tier, WireError> {
    match pb::Tier::try_from(v) {
        Ok(pb::Tier::Admin) => Ok(Tier::Admin),
        Ok(pb::Tier::NetworkPolicyTier) => Ok(Tier::NetworkPolicy),
        Ok(pb::Tier::Baseline) => Ok(Tier::Baseline),
        _ => Err(err(field, format!("unknown tier {v}"))),
    }
}

pub fn rule_to(id: &str, o: &RuleOrigin) -> pb::Rule {
    pb::Rule {
        id: id.to_string(),
        policy: Some(policy_to(&o.policy)),
        tier: tier_to(o.tier),
        priority: o.priority,
        direction: match o.direction {
            Direction::Ingress => pb::Direction::Ingress,
            Direction::Egress => pb::Direction::Egress,
        } as i32,
        index: u32::try_from(o.index).unwrap_or(u32::MAX),
        name: o.name.clone(),
    }
}

pub fn rule_from(r: &pb::Rule, field: &str) -> Result<(String, RuleOrigin), WireError> {
    check_id(&r.id, "r-", &format!("{field}.id"))?;
    let policy = r
        .policy
        .as_ref()
        .ok_or_else(|| err(format!("{field}.policy"), "required"))?;
    let direction = match pb::Direction::try_from(r.direction) {
        Ok(pb::Direction::Ingress) => Direction::Ingress,
        Ok(pb::Direction::Egress) => Direction::Egress,
        _ => {
            return Err(err(
                format!("{field}.direction"),
                format!("unknown direction {}", r.direction),
            ))
        }
    };
    Ok((
        r.id.clone(),
        RuleOrigin {
            policy: policy_from(policy, &format!("{field}.policy"))?,
            tier: tier_from(r.tier, &format!("{field}.tier"))?,
            priority: r.priority,
            direction,
            index: r.index as usize,
            name: r.name.clone(),
        },
    ))
}
