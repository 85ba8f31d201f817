//! The ruleset as `nft -j` commands, built from the `nftables` crate's schema types.
//!
//! The crate's schema has no `verdict` data type for maps, so the dispatch maps are
//! declared with a hand-written object of the same JSON schema; everything else is the
//! crate's types, serialized.

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::expr::{
    BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
    Range, SetItem, CT,
};
use nftables::schema::{self, NfCmd, NfListObject, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{self, Counter, JumpTarget, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use palisade_policy::model::Direction;
use serde_json::{json, Value};

use super::model::*;
use super::text::{mask_text, prefix_len, protocol_name};

/// One `nft -j` command (`{"add": {...}}`, `{"delete": {...}}`, `{"flush": {...}}`).
pub type Command = Value;

fn to_value<T: serde::Serialize>(x: &T) -> Value {
    // Serializing the schema's plain structs cannot fail (no maps with non-string keys).
    serde_json::to_value(x).unwrap_or(Value::Null)
}

pub fn add(obj: NfListObject<'_>) -> Command {
    to_value(&NfCmd::Add(obj))
}

pub fn delete(obj: NfListObject<'_>) -> Command {
    to_value(&NfCmd::Delete(obj))
}

pub fn table() -> NfListObject<'static> {
    NfListObject::Table(schema::Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

pub fn counter(name: &str) -> NfListObject<'_> {
    NfListObject::Counter(schema::Counter {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        handle: None,
        packets: None,
        bytes: None,
    })
}

pub fn set(name: &str, kind: SetKind) -> NfListObject<'_> {
    sized_set(name, kind, None)
}

/// `add set`, or `add map` for a [`SetKind::Classes`] map (hand-written: see module docs).
pub fn add_set(name: &str, kind: SetKind, size: Option<u32>) -> Command {
    match kind {
        SetKind::Classes(f) => json!({"add": {"map": {
            "family": "inet", "table": TABLE, "name": name,
            "type": f.addr_type(), "map": "verdict", "flags": ["interval"],
        }}}),
        SetKind::ClassPrefixes(f, _) => json!({"add": {"map": {
            "family": "inet", "table": TABLE, "name": name,
            "type": f.addr_type(), "map": "verdict",
        }}}),
        _ => add(sized_set(name, kind, size)),
    }
}

/// `delete set`, or `delete map` for a [`SetKind::Classes`] map.
pub fn delete_set(name: &str, kind: SetKind) -> Command {
    match kind {
        SetKind::Classes(_) | SetKind::ClassPrefixes(..) => {
            json!({"delete": {"map": {"family": "inet", "table": TABLE, "name": name}}})
        }
        _ => delete(set(name, kind)),
    }
}

/// A set declaration with the kernel's `size` (see [`SetDef::size`]).
pub fn sized_set(name: &str, kind: SetKind, size: Option<u32>) -> NfListObject<'_> {
    let (set_type, flags) = match kind {
        SetKind::Addresses(f) => (
            SetTypeValue::Single(addr_type(f)),
            Some(HashSet::from([SetFlag::Interval])),
        ),
        SetKind::Hosts(f) | SetKind::Prefixes(f, _) => (SetTypeValue::Single(addr_type(f)), None),
        // Declared by `add_set`; as plain sets here, never sent.
        SetKind::ClassPrefixes(f, _) => (SetTypeValue::Single(addr_type(f)), None),
        SetKind::Classes(f) => (
            SetTypeValue::Single(addr_type(f)),
            Some(HashSet::from([SetFlag::Interval])),
        ),
        SetKind::NamedPorts(f) => (
            SetTypeValue::Concatenated(Cow::Owned(vec![
                addr_type(f),
                SetType::InetProto,
                SetType::InetService,
            ])),
            None,
        ),
    };
    NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        handle: None,
        set_type,
        policy: None,
        flags,
        elem: None,
        timeout: None,
        gc_interval: None,
        size,
        comment: None,
    }))
}

fn addr_type(f: IpFamily) -> SetType {
    match f {
        IpFamily::V4 => SetType::Ipv4Addr,
        IpFamily::V6 => SetType::Ipv6Addr,
    }
}

pub fn element_expr(e: &SetElement) -> Expression<'static> {
    match e {
        SetElement::Addr(r) => addr_range_expr(r),
        SetElement::Endpoint(ep) => Expression::Named(NamedExpression::Concat(vec![
            Expression::String(ep.addr.to_string().into()),
            Expression::String(protocol_name(ep.protocol).into()),
            Expression::Number(u32::from(ep.port)),
        ])),
        SetElement::Class { range, chain } => Expression::List(vec![
            addr_range_expr(range),
            Expression::Verdict(nftables::expr::Verdict::Goto(JumpTarget {
                target: chain.clone().into(),
            })),
        ]),
    }
}

fn addr_range_expr(r: &AddrRange) -> Expression<'static> {
    if r.lo == r.hi {
        return Expression::String(r.lo.to_string().into());
    }
    match prefix_len(r) {
        Some(len) => Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(r.lo.to_string().into())),
            len: u32::from(len),
        })),
        None => Expression::Range(Box::new(Range {
            range: [
                Expression::String(r.lo.to_string().into()),
                Expression::String(r.hi.to_string().into()),
            ],
        })),
    }
}

/// `add element` / `delete element` body for a named set.
pub fn elements<'a>(set: &'a str, elems: &[SetElement]) -> NfListObject<'a> {
    NfListObject::Element(schema::Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.into(),
        elem: Cow::Owned(elems.iter().map(element_expr).collect()),
    })
}

/// `add map` for a dispatch map (`type ifname : verdict`), hand-written: see module docs.
pub fn add_dispatch_map(name: &str) -> Command {
    json!({"add": {"map": {"family": "inet", "table": TABLE, "name": name, "type": "ifname", "map": "verdict"}}})
}

/// `add element` / `delete element` body for a dispatch map: `jump` elements, but `goto`
/// for the rest-dispatch maps (a shared Admin chain goes on at the pod's rest chain, whose
/// `return` must allow, as from the pod's entry chain).
pub fn dispatch_elements<'a>(
    map: &'a str,
    entries: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> NfListObject<'a> {
    NfListObject::Element(schema::Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: map.into(),
        elem: Cow::Owned(
            entries
                .into_iter()
                .map(|(ifname, chain)| {
                    let target = JumpTarget {
                        target: chain.as_str().into(),
                    };
                    let verdict = if is_rest_map(map) {
                        nftables::expr::Verdict::Goto(target)
                    } else {
                        nftables::expr::Verdict::Jump(target)
                    };
                    Expression::List(vec![
                        Expression::String(ifname.as_str().into()),
                        Expression::Verdict(verdict),
                    ])
                })
                .collect(),
        ),
    })
}

pub fn dispatch_map_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => EGRESS_DISPATCH,
        Direction::Ingress => INGRESS_DISPATCH,
    }
}

pub fn rest_dispatch_map_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => EGRESS_REST_DISPATCH,
        Direction::Ingress => INGRESS_REST_DISPATCH,
    }
}

/// Whether `map` is a rest-dispatch map (its elements are `goto`).
pub fn is_rest_map(map: &str) -> bool {
    map == EGRESS_REST_DISPATCH || map == INGRESS_REST_DISPATCH
}

/// The interface a direction's dispatch looks at: the incoming one for egress, the
/// outgoing one for ingress.
fn ifname_key(direction: Direction) -> MetaKey {
    match direction {
        Direction::Egress => MetaKey::Iifname,
        Direction::Ingress => MetaKey::Oifname,
    }
}

pub fn chain(name: &str) -> NfListObject<'_> {
    NfListObject::Chain(schema::Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        newname: None,
        handle: None,
        _type: None,
        hook: None,
        prio: None,
        dev: None,
        policy: None,
    })
}

pub fn base_chain(bc: &BaseChain) -> NfListObject<'static> {
    let hook = match bc.hook {
        "input" => NfHook::Input,
        "output" => NfHook::Output,
        _ => NfHook::Forward,
    };
    NfListObject::Chain(schema::Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: bc.name.into(),
        newname: None,
        handle: None,
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(bc.priority),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    })
}

/// `flush chain` command.
pub fn flush_chain(name: &str) -> Command {
    to_value(&NfCmd::Flush(schema::FlushObject::Chain(
        match chain(name) {
            NfListObject::Chain(c) => c,
            _ => unreachable!("chain() builds a chain"),
        },
    )))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// `ip saddr & 255.255.255.0`: the network of the packet's address at prefix length `len`.
fn masked_address(family: IpFamily, end: End, len: u8) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(
        payload(family.payload(), end.field()),
        Expression::String(mask_text(family, len).into()),
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(stmt::Match { left, right, op })
}

fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(format!("@{name}").into())
}

fn port_expr(&(lo, hi): &(u16, u16)) -> Expression<'static> {
    if lo == hi {
        Expression::Number(u32::from(lo))
    } else {
        Expression::Range(Box::new(Range {
            range: [
                Expression::Number(u32::from(lo)),
                Expression::Number(u32::from(hi)),
            ],
        }))
    }
}

pub fn match_statement(m: &Match) -> Statement<'static> {
    match m {
        Match::Family(f) => matches(
            meta(MetaKey::Nfproto),
            Operator::EQ,
            Expression::String(f.nfproto().into()),
        ),
        Match::AddrNotIn { family, end, addrs } => {
            let items: Vec<Expression<'static>> = addrs
                .iter()
                .map(|a| Expression::String(a.to_string().into()))
                .collect();
            let right = if items.len() == 1 {
                items
                    .into_iter()
                    .next()
                    .unwrap_or(Expression::Boolean(false))
            } else {
                anon_set(items)
            };
            matches(payload(family.payload(), end.field()), Operator::NEQ, right)
        }
        Match::AddrInSet { family, end, set } => matches(
            payload(family.payload(), end.field()),
            Operator::EQ,
            set_ref(set),
        ),
        Match::MaskedAddrInSet {
            family,
            end,
            len,
            set,
        } => matches(
            masked_address(*family, *end, *len),
            Operator::EQ,
            set_ref(set),
        ),
        Match::Protocol(p) => matches(
            meta(MetaKey::L4proto),
            Operator::EQ,
            Expression::String(protocol_name(*p).into()),
        ),
        Match::Dports(ranges) => {
            let mut items: Vec<Expression<'static>> = ranges.iter().map(port_expr).collect();
            let right = match items.len() {
                1 => items.remove(0),
                _ => anon_set(items),
            };
            matches(payload("th", "dport"), Operator::EQ, right)
        }
        Match::EndpointInSet { family, end, set } => matches(
            Expression::Named(NamedExpression::Concat(vec![
                payload(family.payload(), end.field()),
                meta(MetaKey::L4proto),
                payload("th", "dport"),
            ])),
            Operator::EQ,
            set_ref(set),
        ),
        Match::Established => established(),
        Match::Limit { per_second, burst } => Statement::Limit(stmt::Limit {
            rate: *per_second,
            rate_unit: Some("packets".into()),
            per: Some("second".into()),
            burst: Some(*burst),
            burst_unit: Some("packets".into()),
            inv: None,
        }),
    }
}

/// `ct state established,related`.
fn established() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        Expression::List(vec![
            Expression::String("established".into()),
            Expression::String("related".into()),
        ]),
    )
}

/// The statements of a verdict: one, but two for [`Verdict::LogDrop`] and
/// [`Verdict::LogReturn`] (log, then drop or return).
pub fn verdict_statements(v: &Verdict) -> Vec<Statement<'static>> {
    let one = match v {
        Verdict::Accept => Statement::Accept(None),
        Verdict::Drop => Statement::Drop(None),
        Verdict::Return => Statement::Return(None),
        Verdict::Jump(c) => Statement::Jump(JumpTarget {
            target: c.clone().into(),
        }),
        Verdict::Goto(c) => Statement::Goto(JumpTarget {
            target: c.clone().into(),
        }),
        Verdict::RestDispatch(direction) => Statement::VerdictMap(stmt::VerdictMap {
            key: meta(ifname_key(*direction)),
            data: set_ref(rest_dispatch_map_name(*direction)),
        }),
        Verdict::ClassDispatch {
            family,
            end,
            map,
            prefix,
        } => Statement::VerdictMap(stmt::VerdictMap {
            key: match prefix {
                None => payload(family.payload(), end.field()),
                Some(len) => masked_address(*family, *end, *len),
            },
            data: set_ref(map),
        }),
        Verdict::LogDrop { prefix, group } | Verdict::LogReturn { prefix, group } => {
            let end = match v {
                Verdict::LogDrop { .. } => Statement::Drop(None),
                _ => Statement::Return(None),
            };
            return vec![
                Statement::Log(Some(stmt::Log {
                    prefix: Some(prefix.clone().into()),
                    group: Some(u32::from(*group)),
                    ..stmt::Log::new(None)
                })),
                end,
            ];
        }
    };
    vec![one]
}

fn rule_obj<'a>(chain: &'a str, expr: Vec<Statement<'a>>) -> NfListObject<'a> {
    NfListObject::Rule(schema::Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: None,
    })
}

pub fn rule<'a>(chain: &'a str, r: &RuleDef) -> NfListObject<'a> {
    let mut expr: Vec<Statement<'a>> = r.matches.iter().map(match_statement).collect();
    if let Some(c) = &r.counter {
        expr.push(Statement::Counter(Counter::Named(c.clone().into())));
    }
    expr.extend(verdict_statements(&r.verdict));
    rule_obj(chain, expr)
}

pub fn base_rule<'a>(chain: &'a str, s: &BaseStatement) -> NfListObject<'a> {
    let expr = match s {
        BaseStatement::Established => vec![established(), Statement::Accept(None)],
        BaseStatement::NeighbourDiscovery => vec![
            matches(
                payload("icmpv6", "type"),
                Operator::EQ,
                anon_set(
                    [
                        "nd-router-solicit",
                        "nd-neighbor-solicit",
                        "nd-neighbor-advert",
                    ]
                    .into_iter()
                    .map(|t| Expression::String(t.into()))
                    .collect(),
                ),
            ),
            Statement::Accept(None),
        ],
        BaseStatement::Dispatch(direction) => {
            vec![Statement::VerdictMap(stmt::VerdictMap {
                key: meta(ifname_key(*direction)),
                data: set_ref(dispatch_map_name(*direction)),
            })]
        }
        BaseStatement::TcpPickup(direction) => {
            let key = ifname_key(*direction);
            vec![
                matches(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "state".into(),
                        family: None,
                        dir: None,
                    })),
                    Operator::IN,
                    Expression::String("new".into()),
                ),
                matches(
                    Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                        payload("tcp", "flags"),
                        Expression::String("syn".into()),
                    ))),
                    Operator::EQ,
                    Expression::Number(0),
                ),
                matches(meta(key), Operator::EQ, set_ref(EGRESS_DISPATCH)),
                Statement::Drop(None),
            ]
        }
        BaseStatement::UnknownInterface { direction, pattern } => {
            let key = ifname_key(*direction);
            vec![
                matches(
                    meta(key),
                    Operator::EQ,
                    Expression::String(pattern.clone().into()),
                ),
                matches(meta(key), Operator::NEQ, set_ref(EGRESS_DISPATCH)),
                Statement::Counter(Counter::Named(UNKNOWN_INTERFACE_COUNTER.into())),
                Statement::Drop(None),
            ]
        }
    };
    rule_obj(chain, expr)
}

/// Commands that create the table's whole content in an existing, empty table.
pub fn create_all(rs: &Ruleset) -> Vec<Command> {
    let mut cmds = create_unhooked(rs, |_| true);
    cmds.extend(create_base_chains(rs));
    cmds
}

/// Everything but the base chains, in an existing, empty table: nothing of it sees a
/// packet until the base chains hook it in. The elements of sets for which
/// `with_elements(kind)` is false are left out (loaded over netlink instead).
pub fn create_unhooked(rs: &Ruleset, with_elements: impl Fn(SetKind) -> bool) -> Vec<Command> {
    let mut cmds = Vec::new();
    for name in rs.counters.keys() {
        cmds.push(add(counter(name)));
    }
    for (name, s) in rs.sets.iter().filter(|(_, s)| !s.kind.names_chains()) {
        cmds.push(add_set(name, s.kind, s.size));
        if !s.elements.is_empty() && with_elements(s.kind) {
            cmds.push(add(elements(name, &s.elements)));
        }
    }
    for map in DISPATCH_MAPS {
        cmds.push(add_dispatch_map(map));
    }
    for name in rs.chains.keys() {
        cmds.push(add(chain(name)));
    }
    // Class maps once the chains they go to exist (nft 1.0.6 fails an element of an
    // interval map created in the same batch before the chain it names: ENOENT), before
    // the rules that look them up.
    for (name, s) in rs.sets.iter().filter(|(_, s)| s.kind.names_chains()) {
        cmds.push(add_set(name, s.kind, s.size));
        if !s.elements.is_empty() && with_elements(s.kind) {
            cmds.push(add(elements(name, &s.elements)));
        }
    }
    for (name, rules) in &rs.chains {
        for r in rules.iter() {
            cmds.push(add(rule(name, r)));
        }
    }
    for (map, entries, _) in rs.dispatch_maps() {
        if !entries.is_empty() {
            cmds.push(add(dispatch_elements(map, entries)));
        }
    }
    cmds
}

/// The base chains and their rules: what hooks the table into the packet path.
pub fn create_base_chains(rs: &Ruleset) -> Vec<Command> {
    let mut cmds = Vec::new();
    for bc in &rs.base_chains {
        cmds.push(add(base_chain(bc)));
        for st in &bc.statements {
            cmds.push(add(base_rule(bc.name, st)));
        }
    }
    cmds
}

/// One transaction that replaces the table (or creates it): `add table` (so the delete
/// cannot fail), `delete table`, then everything anew. nftables commits a batch
/// atomically, so packets see either the old table or the new one, never none.
pub fn replace_all(rs: &Ruleset) -> Vec<Command> {
    let mut cmds = vec![add(table()), delete(table()), add(table())];
    cmds.extend(create_all(rs));
    cmds
}

/// `create table`: fails if the table exists (the staged first load must not merge into
/// a table that appeared meanwhile).
pub fn create_table() -> Command {
    to_value(&NfCmd::Create(table()))
}

/// `delete table`.
pub fn delete_table() -> Command {
    delete(table())
}

/// The JSON document `nft -j -f -` reads.
pub fn payload_of(cmds: &[Command]) -> String {
    json!({ "nftables": cmds }).to_string()
}
