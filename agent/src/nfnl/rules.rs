//! Rules, chains, counters and dispatch-map elements over netlink: what an incremental
//! transaction and a first load's regular chains need, without nft. nft 1.0.6 fetches the
//! table's every named object before any rule command (1.2 MB of replies with 10,000
//! counters for a one-rule add) and parses 11,000 rules in ~0.35 s.
//!
//! Each rule is encoded as the expressions nft 1.0.6 generates for its text
//! ([`crate::render::text::rule_text`]); the kernel dumps what it holds, so a rule loaded
//! here reads back byte for byte as the same rule loaded by nft (the kernel tests in
//! `tests/netlink_rules.rs` compare them). A rule with a list (`th dport { 80, 443 }`,
//! `ip saddr != { a, b }`) comes with its anonymous set, declared as nft declares it
//! (flags, key type, size, and the user data nft reads back to print it) and bound to the
//! rule by its id in the batch.

use std::net::IpAddr;

use palisade_policy::model::{Direction, Protocol};

use super::{msg, push_attr, Message, NLA_F_NESTED, NLM_F_CREATE, NLM_F_REQUEST};
use crate::render::{
    BaseChain, BaseStatement, End, IpFamily, Match, RuleDef, Verdict, EGRESS_DISPATCH,
    EGRESS_REST_DISPATCH, INGRESS_DISPATCH, INGRESS_REST_DISPATCH, UNKNOWN_INTERFACE_COUNTER,
};

/// Append the rule at the chain's end.
const NLM_F_APPEND: u16 = 0x800;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// Registers as nft numbers them: the verdict, the first 16-byte register, and the
/// 32-bit registers a concatenation's later fields go to.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
const REG32_05: u32 = 13;

const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFT_CT_STATE: u32 = 0;
/// `established,related` and `new` as conntrack state bits (`NF_CT_STATE_BIT`).
const CT_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
const CT_NEW: u32 = 0x8;
const TCP_SYN: u8 = 0x02;
const IPPROTO_ICMPV6: u8 = 58;
/// nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert.
const ND_TYPES: [u8; 3] = [133, 135, 136];
/// nft's `TYPE_ICMP6_TYPE`, and the protocol and field indexes of `icmpv6 type`.
const TYPE_ICMP6_TYPE: u32 = 29;
const ICMP6_TYPEOF: (u8, u8) = (14, 1);
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// `ifname` keys are `IFNAMSIZ` bytes, NUL-padded.
const IFNAMSIZ: usize = 16;

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
pub(crate) const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// Whether [`add_rule`] encodes this rule: every rule with its lists non-empty (the
/// renderer emits no empty list; nft would refuse one).
pub fn encodable(rule: &RuleDef) -> bool {
    rule.matches.iter().all(|m| match m {
        Match::AddrNotIn { addrs, .. } => !addrs.is_empty(),
        Match::Dports(ranges) => !ranges.is_empty(),
        _ => true,
    })
}

/// Whether an interface name fits a dispatch map's key.
pub fn encodable_ifname(ifname: &str) -> bool {
    ifname.len() < IFNAMSIZ
}

/// Numbers a batch's anonymous sets: a rule finds its set by this id, as the set has no
/// name until the kernel gives it one.
#[derive(Debug, Default)]
pub(crate) struct SetIds(u32);

impl SetIds {
    fn next(&mut self) -> u32 {
        self.0 += 1;
        self.0
    }
}

/// `add rule inet TABLE CHAIN …`, appended, after the messages that create its anonymous
/// sets; `None` if not [`encodable`].
pub(crate) fn add_rule(
    table: &str,
    chain: &str,
    rule: &RuleDef,
    ids: &mut SetIds,
) -> Option<Vec<Message>> {
    let mut e = Exprs {
        out: Vec::new(),
        family: None,
        anonymous: Vec::new(),
        ids,
    };
    e.rule(rule)?;
    let mut out: Vec<Message> = e
        .anonymous
        .iter()
        .flat_map(|set| set.messages(table))
        .collect();
    out.push(rule_message(table, chain, &e.out));
    Some(out)
}

fn rule_message(table: &str, chain: &str, expressions: &[u8]) -> Message {
    let mut m = Message::nftables(msg::NEWRULE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND);
    m.attr_str(NFTA_RULE_TABLE, table)
        .attr_str(NFTA_RULE_CHAIN, chain)
        .attr(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, expressions);
    m
}

/// `add chain` of a regular chain.
pub(crate) fn add_chain(table: &str, chain: &str) -> Message {
    let mut m = Message::nftables(msg::NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE);
    m.attr_str(NFTA_CHAIN_TABLE, table)
        .attr_str(NFTA_CHAIN_NAME, chain);
    m
}

const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

/// A base chain (`type filter hook H priority P; policy accept;`) and its statements: what
/// hooks the table into the packet path. `None` for a hook the agent does not use.
pub(crate) fn add_base_chain(table: &str, chain: &BaseChain) -> Option<Vec<Message>> {
    let hooknum: u32 = match chain.hook {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    };
    let mut hook = attr(NFTA_HOOK_HOOKNUM, &hooknum.to_be_bytes());
    push_attr(&mut hook, NFTA_HOOK_PRIORITY, &chain.priority.to_be_bytes());
    let mut m = Message::nftables(msg::NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE);
    m.attr_str(NFTA_CHAIN_TABLE, table)
        .attr_str(NFTA_CHAIN_NAME, chain.name)
        .attr_str(NFTA_CHAIN_TYPE, "filter")
        .attr(NFTA_CHAIN_POLICY, &(NF_ACCEPT as u32).to_be_bytes())
        .attr(NFTA_CHAIN_HOOK | NLA_F_NESTED, &hook);
    let mut out = vec![m];
    let mut ids = SetIds::default();
    for statement in &chain.statements {
        let mut e = Exprs {
            out: Vec::new(),
            family: None,
            anonymous: Vec::new(),
            ids: &mut ids,
        };
        e.base_statement(statement)?;
        out.extend(e.anonymous.iter().flat_map(|set| set.messages(table)));
        out.push(rule_message(table, chain.name, &e.out));
    }
    Some(out)
}

/// `flush chain`: a rule deletion naming the chain and no rule.
pub(crate) fn flush_chain(table: &str, chain: &str) -> Message {
    let mut m = Message::nftables(msg::DELRULE, NLM_F_REQUEST);
    m.attr_str(NFTA_RULE_TABLE, table)
        .attr_str(NFTA_RULE_CHAIN, chain);
    m
}

pub(crate) fn delete_chain(table: &str, chain: &str) -> Message {
    let mut m = Message::nftables(msg::DELCHAIN, NLM_F_REQUEST);
    m.attr_str(NFTA_CHAIN_TABLE, table)
        .attr_str(NFTA_CHAIN_NAME, chain);
    m
}

pub(crate) fn delete_counter(table: &str, name: &str) -> Message {
    let mut m = Message::nftables(msg::DELOBJ, NLM_F_REQUEST);
    m.attr_str(NFTA_OBJ_TABLE, table)
        .attr_str(NFTA_OBJ_NAME, name)
        .attr(NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
    m
}

/// Elements `ifname : jump CHAIN` (`goto` when `goto`) added to or, without their
/// verdicts, deleted from dispatch map `map`; `None` for an interface name longer than
/// the kernel's.
pub(crate) fn dispatch_elements<'a>(
    table: &str,
    map: &str,
    add: bool,
    goto: bool,
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<Message> {
    let code = if goto { NFT_GOTO } else { NFT_JUMP };
    let mut list = Vec::new();
    for (ifname, chain) in entries {
        let mut elem = dispatch_key(ifname)?;
        if add {
            push_attr(
                &mut elem,
                NFTA_SET_ELEM_DATA | NLA_F_NESTED,
                &verdict_data(code, Some(chain)),
            );
        }
        push_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
    }
    let (kind, flags) = if add {
        (msg::NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE)
    } else {
        (msg::DELSETELEM, NLM_F_REQUEST)
    };
    let mut m = Message::nftables(kind, flags);
    m.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, map)
        .attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list);
    Some(m)
}

/// The request for the element of dispatch map `map` keyed `ifname` (`nft get element`);
/// `None` for an interface name longer than the kernel's.
pub(crate) fn dispatch_get(table: &str, map: &str, ifname: &str) -> Option<Message> {
    let mut list = Vec::new();
    push_attr(
        &mut list,
        NFTA_LIST_ELEM | NLA_F_NESTED,
        &dispatch_key(ifname)?,
    );
    let mut m = Message::nftables(msg::GETSETELEM, NLM_F_REQUEST);
    m.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, map)
        .attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list);
    Some(m)
}

/// A dispatch element's key attribute: the interface name, NUL-padded as the `ifname`
/// type is.
fn dispatch_key(ifname: &str) -> Option<Vec<u8>> {
    let key = dispatch_key_value(ifname)?;
    let mut elem = Vec::new();
    push_attr(
        &mut elem,
        NFTA_SET_ELEM_KEY | NLA_F_NESTED,
        &attr(NFTA_DATA_VALUE, &key),
    );
    Some(elem)
}

/// The key of dispatch element `ifname` as the kernel dumps it, for finding an element of
/// a dump; `None` as for [`dispatch_get`].
pub(crate) fn dispatch_key_value(ifname: &str) -> Option<[u8; IFNAMSIZ]> {
    encodable_ifname(ifname).then(|| {
        let mut key = [0u8; IFNAMSIZ];
        key[..ifname.len()].copy_from_slice(ifname.as_bytes());
        key
    })
}

/// `NFTA_DATA_VERDICT` with `code` and, for a jump or goto, its chain.
pub(crate) fn verdict_data(code: i32, chain: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    put_verdict(&mut out, code, chain);
    out
}

fn put_verdict(buf: &mut Vec<u8>, code: i32, chain: Option<&str>) {
    nest(buf, NFTA_DATA_VERDICT, |b| {
        push_attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(chain) = chain {
            put_str(b, NFTA_VERDICT_CHAIN, chain);
        }
    });
}

/// A nested attribute whose content `content` appends to `buf`; its length is filled in
/// after.
fn nest(buf: &mut Vec<u8>, kind: u16, content: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    content(buf);
    // Every attribute inside was padded to 4 bytes, so the nest ends aligned.
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// A NUL-terminated string attribute.
fn put_str(buf: &mut Vec<u8>, kind: u16, text: &str) {
    let len = 4 + text.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(text.as_bytes());
    buf.push(0);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    push_attr(&mut out, kind, payload);
    out
}

/// What nft names an anonymous set before the kernel numbers it.
const ANONYMOUS_NAME: &str = "__set%d";
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_LOOKUP_F_INV: u32 = 0x1;
/// nft's data types of the keys (`TYPE_IPADDR`, `TYPE_IP6ADDR`, `TYPE_INET_SERVICE`).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;

/// An anonymous set of one rule, as nft declares and fills it.
struct AnonymousSet {
    id: u32,
    flags: u32,
    key_type: u32,
    key_len: u32,
    /// nft's `NFTA_SET_DESC_SIZE`.
    size: u32,
    /// nft's user data: the key's byte order and the expression it was typed from (the
    /// kernel keeps it, and `nft list` prints the set from it).
    udata: Vec<u8>,
    /// Each element as it sits in `NFTA_SET_ELEM_LIST_ELEMENTS`.
    elements: Vec<u8>,
}

impl AnonymousSet {
    fn messages(&self, table: &str) -> [Message; 2] {
        let mut set = Message::nftables(msg::NEWSET, NLM_F_REQUEST | NLM_F_CREATE);
        set.attr_str(NFTA_SET_TABLE, table)
            .attr_str(NFTA_SET_NAME, ANONYMOUS_NAME)
            .attr(NFTA_SET_FLAGS, &self.flags.to_be_bytes())
            .attr(NFTA_SET_KEY_TYPE, &self.key_type.to_be_bytes())
            .attr(NFTA_SET_KEY_LEN, &self.key_len.to_be_bytes())
            .attr(NFTA_SET_ID, &self.id.to_be_bytes())
            .attr(
                NFTA_SET_DESC | NLA_F_NESTED,
                &attr(NFTA_SET_DESC_SIZE, &self.size.to_be_bytes()),
            )
            .attr(NFTA_SET_USERDATA, &self.udata);
        let mut elements = Message::nftables(msg::NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE);
        elements
            .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            .attr_str(NFTA_SET_ELEM_LIST_SET, ANONYMOUS_NAME)
            .attr(NFTA_SET_ELEM_LIST_SET_ID, &self.id.to_be_bytes())
            .attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &self.elements);
        [set, elements]
    }
}

/// nft's set user data (libnftnl's TLVs of a type byte and a length byte): key byte order
/// big endian, for interval sets "merge elements", and the key's `typeof`: a payload
/// expression of protocol `proto` and field `field` (indexes of nft's protocol tables).
fn set_udata(interval: bool, proto: u8, field: u8) -> Vec<u8> {
    let tlv = |out: &mut Vec<u8>, kind: u8, value: &[u8]| {
        out.push(kind);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
    };
    let mut out = Vec::new();
    tlv(&mut out, 0, &2u32.to_ne_bytes());
    if interval {
        tlv(&mut out, 2, &1u32.to_ne_bytes());
    }
    let mut payload = Vec::new();
    tlv(&mut payload, 0, &u32::from(proto).to_ne_bytes());
    tlv(&mut payload, 1, &u32::from(field).to_ne_bytes());
    let mut typeof_ = Vec::new();
    // Expression type 7: payload.
    tlv(&mut typeof_, 0, &7u32.to_ne_bytes());
    tlv(&mut typeof_, 1, &payload);
    tlv(&mut out, 3, &typeof_);
    out
}

/// `th dport`'s protocol and field indexes.
const DPORT_TYPEOF: (u8, u8) = (11, 2);

fn push_key(list: &mut Vec<u8>, key: &[u8], flags: u32, udata: Option<&[u8]>) {
    let mut elem = Vec::new();
    if flags != 0 {
        push_attr(&mut elem, NFTA_SET_ELEM_FLAGS, &flags.to_be_bytes());
    }
    push_attr(
        &mut elem,
        NFTA_SET_ELEM_KEY | NLA_F_NESTED,
        &attr(NFTA_DATA_VALUE, key),
    );
    if let Some(udata) = udata {
        push_attr(&mut elem, NFTA_SET_ELEM_USERDATA, udata);
    }
    push_attr(list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
}

/// Port ranges (sorted, disjoint) as nft fills an interval set: an end element before
/// each start (at 0 before the first, unless it starts at 0) and after the last (none
/// when it ends at 65535: that start is flagged open instead). Returns the elements and
/// the size nft declares (two per range, plus the leading end).
fn port_intervals(ranges: &[(u16, u16)]) -> (Vec<u8>, u32) {
    let mut list = Vec::new();
    let mut size = 2 * ranges.len() as u32;
    if ranges.first().is_some_and(|(lo, _)| *lo != 0) {
        push_key(
            &mut list,
            &0u16.to_be_bytes(),
            NFT_SET_ELEM_INTERVAL_END,
            None,
        );
        size += 1;
    }
    for (lo, hi) in ranges {
        match hi.checked_add(1) {
            Some(end) => {
                push_key(&mut list, &lo.to_be_bytes(), 0, None);
                push_key(
                    &mut list,
                    &end.to_be_bytes(),
                    NFT_SET_ELEM_INTERVAL_END,
                    None,
                );
            }
            // nft's element user data: `NFTNL_UDATA_SET_ELEM_FLAGS` = interval open.
            None => push_key(&mut list, &lo.to_be_bytes(), 0, Some(&[1, 4, 1, 0, 0, 0])),
        }
    }
    (list, size)
}

/// Expressions being appended, with what nft's evaluation context would know: the
/// network protocol established so far (nft adds `meta nfproto` before an address match
/// only when nothing established it).
struct Exprs<'a> {
    out: Vec<u8>,
    family: Option<IpFamily>,
    anonymous: Vec<AnonymousSet>,
    ids: &'a mut SetIds,
}

impl Exprs<'_> {
    fn rule(&mut self, rule: &RuleDef) -> Option<()> {
        for m in &rule.matches {
            self.matches(m)?;
        }
        if let Some(counter) = &rule.counter {
            self.expr(b"objref\0", |b| {
                push_attr(b, 1, &NFT_OBJECT_COUNTER.to_be_bytes());
                put_str(b, 2, counter);
            });
        }
        self.verdict(&rule.verdict);
        Some(())
    }

    /// A lookup of reg 1 in a new anonymous set.
    fn lookup_anonymous(&mut self, mut set: AnonymousSet, inverted: bool) {
        set.id = self.ids.next();
        self.expr(b"lookup\0", |b| {
            put_str(b, 1, ANONYMOUS_NAME);
            push_attr(b, 2, &REG_1.to_be_bytes());
            push_attr(b, 4, &set.id.to_be_bytes());
            if inverted {
                push_attr(b, 5, &NFT_LOOKUP_F_INV.to_be_bytes());
            }
        });
        self.anonymous.push(set);
    }

    /// One expression, `name` NUL-terminated, its data written by `data`: in place, as a
    /// first load encodes 11,000 rules.
    fn expr(&mut self, name: &[u8], data: impl FnOnce(&mut Vec<u8>)) {
        nest(&mut self.out, NFTA_LIST_ELEM, |b| {
            push_attr(b, NFTA_EXPR_NAME, name);
            nest(b, NFTA_EXPR_DATA, data);
        });
    }

    fn meta(&mut self, key: u32, dreg: u32) {
        self.expr(b"meta\0", |b| {
            push_attr(b, 2, &key.to_be_bytes());
            push_attr(b, 1, &dreg.to_be_bytes());
        });
    }

    fn cmp(&mut self, op: u32, value: &[u8]) {
        self.expr(b"cmp\0", |b| {
            push_attr(b, 1, &REG_1.to_be_bytes());
            push_attr(b, 2, &op.to_be_bytes());
            nest(b, 3, |b| push_attr(b, NFTA_DATA_VALUE, value));
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr(b"payload\0", |b| {
            push_attr(b, 1, &dreg.to_be_bytes());
            push_attr(b, 2, &base.to_be_bytes());
            push_attr(b, 3, &offset.to_be_bytes());
            push_attr(b, 4, &len.to_be_bytes());
        });
    }

    /// `reg 1 = (reg 1 & mask) ^ 0`.
    fn bitwise(&mut self, mask: &[u8]) {
        let xor = [0u8; 16];
        let xor = &xor[..mask.len().min(16)];
        self.expr(b"bitwise\0", |b| {
            push_attr(b, 1, &REG_1.to_be_bytes());
            push_attr(b, 2, &REG_1.to_be_bytes());
            push_attr(b, 3, &(mask.len() as u32).to_be_bytes());
            nest(b, 4, |b| push_attr(b, NFTA_DATA_VALUE, mask));
            nest(b, 5, |b| push_attr(b, NFTA_DATA_VALUE, xor));
        });
    }

    /// A lookup of reg 1 in `set`; into the verdict register for a verdict map.
    fn lookup(&mut self, set: &str, verdict_map: bool) {
        self.expr(b"lookup\0", |b| {
            put_str(b, 1, set);
            push_attr(b, 2, &REG_1.to_be_bytes());
            if verdict_map {
                push_attr(b, 3, &REG_VERDICT.to_be_bytes());
            }
        });
    }

    fn immediate(&mut self, code: i32, chain: Option<&str>) {
        self.expr(b"immediate\0", |b| {
            push_attr(b, 1, &REG_VERDICT.to_be_bytes());
            nest(b, 2, |b| put_verdict(b, code, chain));
        });
    }

    /// `meta nfproto` for a match of `family`'s addresses, unless established.
    fn family(&mut self, family: IpFamily) {
        if self.family != Some(family) {
            self.meta(NFT_META_NFPROTO, REG_1);
            self.cmp(NFT_CMP_EQ, &[nfproto(family)]);
            self.family = Some(family);
        }
    }

    /// The peer's address loaded into `reg`, after its family's dependency.
    fn address(&mut self, family: IpFamily, end: End, reg: u32) {
        self.family(family);
        let f = address_field(family, end);
        self.payload(NFT_PAYLOAD_NETWORK_HEADER, f.offset, f.len, reg);
    }

    fn dport(&mut self, reg: u32) {
        self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg);
    }

    fn matches(&mut self, m: &Match) -> Option<()> {
        match m {
            Match::Family(f) => self.family(*f),
            Match::AddrNotIn { family, end, addrs } => {
                self.address(*family, *end, REG_1);
                match addrs.as_slice() {
                    [] => return None,
                    [addr] => self.cmp(NFT_CMP_NEQ, &address_bytes(addr)),
                    _ => {
                        let mut elements = Vec::new();
                        for a in addrs {
                            push_key(&mut elements, &address_bytes(a), 0, None);
                        }
                        let f = address_field(*family, *end);
                        let key_type = match family {
                            IpFamily::V4 => TYPE_IPADDR,
                            IpFamily::V6 => TYPE_IP6ADDR,
                        };
                        let set = AnonymousSet {
                            id: 0,
                            flags: NFT_SET_ANONYMOUS | NFT_SET_CONSTANT,
                            key_type,
                            key_len: f.len,
                            size: addrs.len() as u32,
                            udata: set_udata(false, f.proto, f.field),
                            elements,
                        };
                        self.lookup_anonymous(set, true);
                    }
                }
            }
            Match::AddrInSet { family, end, set } => {
                self.address(*family, *end, REG_1);
                self.lookup(set, false);
            }
            Match::MaskedAddrInSet {
                family,
                end,
                len,
                set,
            } => {
                self.address(*family, *end, REG_1);
                self.bitwise(&mask(*family, *len));
                self.lookup(set, false);
            }
            Match::Protocol(p) => {
                self.meta(NFT_META_L4PROTO, REG_1);
                self.cmp(NFT_CMP_EQ, &[protocol_number(*p)]);
            }
            Match::Dports(ranges) => {
                self.dport(REG_1);
                match ranges.as_slice() {
                    [] => return None,
                    [(lo, hi)] if lo == hi => self.cmp(NFT_CMP_EQ, &lo.to_be_bytes()),
                    [(lo, hi)] => {
                        self.cmp(NFT_CMP_GTE, &lo.to_be_bytes());
                        self.cmp(NFT_CMP_LTE, &hi.to_be_bytes());
                    }
                    _ => self.lookup_anonymous(port_set(ranges), false),
                }
            }
            Match::EndpointInSet { family, end, set } => {
                // nft puts a concatenation's later fields in the next free 32-bit
                // registers after the address.
                let (proto_reg, port_reg) = match family {
                    IpFamily::V4 => (REG32_01, REG32_02),
                    IpFamily::V6 => (REG_2, REG32_05),
                };
                self.address(*family, *end, REG_1);
                self.meta(NFT_META_L4PROTO, proto_reg);
                self.dport(port_reg);
                self.lookup(set, false);
            }
            Match::Established => {
                self.expr(b"ct\0", |b| {
                    push_attr(b, 1, &REG_1.to_be_bytes());
                    push_attr(b, 2, &NFT_CT_STATE.to_be_bytes());
                });
                // The ct state is a host-order u32.
                self.bitwise(&CT_ESTABLISHED_RELATED.to_ne_bytes());
                self.cmp(NFT_CMP_NEQ, &0u32.to_ne_bytes());
            }
            Match::Limit { per_second, burst } => self.expr(b"limit\0", |b| {
                push_attr(b, 1, &u64::from(*per_second).to_be_bytes());
                push_attr(b, 2, &1u64.to_be_bytes());
                push_attr(b, 3, &burst.to_be_bytes());
                push_attr(b, 4, &0u32.to_be_bytes());
                push_attr(b, 5, &0u32.to_be_bytes());
            }),
        }
        Some(())
    }

    /// The interface a direction's dispatch looks at (`iifname` for egress).
    fn ifname(&mut self, direction: Direction) {
        let key = match direction {
            Direction::Egress => NFT_META_IIFNAME,
            Direction::Ingress => NFT_META_OIFNAME,
        };
        self.meta(key, REG_1);
    }

    /// `ct state S` for state bits `bits`.
    fn ct_state(&mut self, bits: u32) {
        self.expr(b"ct\0", |b| {
            push_attr(b, 1, &REG_1.to_be_bytes());
            push_attr(b, 2, &NFT_CT_STATE.to_be_bytes());
        });
        // The ct state is a host-order u32.
        self.bitwise(&bits.to_ne_bytes());
        self.cmp(NFT_CMP_NEQ, &0u32.to_ne_bytes());
    }

    fn base_statement(&mut self, statement: &BaseStatement) -> Option<()> {
        match statement {
            BaseStatement::Established => {
                self.ct_state(CT_ESTABLISHED_RELATED);
                self.immediate(NF_ACCEPT, None);
            }
            BaseStatement::NeighbourDiscovery => {
                // `icmpv6 type { nd-router-solicit, nd-neighbor-solicit,
                // nd-neighbor-advert }`, after nft's dependencies.
                self.family(IpFamily::V6);
                self.meta(NFT_META_L4PROTO, REG_1);
                self.cmp(NFT_CMP_EQ, &[IPPROTO_ICMPV6]);
                self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, REG_1);
                let mut elements = Vec::new();
                for t in ND_TYPES {
                    push_key(&mut elements, &[t], 0, None);
                }
                let set = AnonymousSet {
                    id: 0,
                    flags: NFT_SET_ANONYMOUS | NFT_SET_CONSTANT,
                    key_type: TYPE_ICMP6_TYPE,
                    key_len: 1,
                    size: ND_TYPES.len() as u32,
                    udata: set_udata(false, ICMP6_TYPEOF.0, ICMP6_TYPEOF.1),
                    elements,
                };
                self.lookup_anonymous(set, false);
                self.immediate(NF_ACCEPT, None);
            }
            BaseStatement::Dispatch(direction) => {
                self.ifname(*direction);
                let map = match direction {
                    Direction::Egress => EGRESS_DISPATCH,
                    Direction::Ingress => INGRESS_DISPATCH,
                };
                self.lookup(map, true);
            }
            BaseStatement::UnknownInterface { direction, pattern } => {
                // A wildcard compares the name's prefix.
                let prefix = pattern.strip_suffix('*')?;
                if prefix.is_empty() || prefix.len() >= IFNAMSIZ || prefix.contains('*') {
                    return None;
                }
                self.ifname(*direction);
                self.cmp(NFT_CMP_EQ, prefix.as_bytes());
                self.ifname(*direction);
                self.lookup_inverted(EGRESS_DISPATCH);
                self.expr(b"objref\0", |b| {
                    push_attr(b, 1, &NFT_OBJECT_COUNTER.to_be_bytes());
                    put_str(b, 2, UNKNOWN_INTERFACE_COUNTER);
                });
                self.immediate(NF_DROP, None);
            }
            BaseStatement::TcpPickup(direction) => {
                self.ct_state(CT_NEW);
                self.meta(NFT_META_L4PROTO, REG_1);
                self.cmp(NFT_CMP_EQ, &[protocol_number(Protocol::Tcp)]);
                self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 13, 1, REG_1);
                self.bitwise(&[TCP_SYN]);
                self.cmp(NFT_CMP_EQ, &[0]);
                self.ifname(*direction);
                self.lookup(EGRESS_DISPATCH, false);
                self.immediate(NF_DROP, None);
            }
        }
        Some(())
    }

    /// `!= @set` of reg 1.
    fn lookup_inverted(&mut self, set: &str) {
        self.expr(b"lookup\0", |b| {
            put_str(b, 1, set);
            push_attr(b, 2, &REG_1.to_be_bytes());
            push_attr(b, 5, &NFT_LOOKUP_F_INV.to_be_bytes());
        });
    }

    fn log(&mut self, prefix: &str, group: u16) {
        self.expr(b"log\0", |b| {
            push_attr(b, 1, &group.to_be_bytes());
            put_str(b, 2, prefix);
        });
    }

    fn verdict(&mut self, v: &Verdict) {
        match v {
            Verdict::Accept => self.immediate(NF_ACCEPT, None),
            Verdict::Drop => self.immediate(NF_DROP, None),
            Verdict::Return => self.immediate(NFT_RETURN, None),
            Verdict::Jump(chain) => self.immediate(NFT_JUMP, Some(chain)),
            Verdict::Goto(chain) => self.immediate(NFT_GOTO, Some(chain)),
            Verdict::RestDispatch(direction) => {
                let (key, map) = match direction {
                    Direction::Egress => (NFT_META_IIFNAME, EGRESS_REST_DISPATCH),
                    Direction::Ingress => (NFT_META_OIFNAME, INGRESS_REST_DISPATCH),
                };
                self.meta(key, REG_1);
                self.lookup(map, true);
            }
            Verdict::LogDrop { prefix, group } => {
                self.log(prefix, *group);
                self.immediate(NF_DROP, None);
            }
            Verdict::LogReturn { prefix, group } => {
                self.log(prefix, *group);
                self.immediate(NFT_RETURN, None);
            }
            Verdict::ClassDispatch {
                family,
                end,
                map,
                prefix,
            } => {
                self.address(*family, *end, REG_1);
                if let Some(len) = prefix {
                    self.bitwise(&mask(*family, *len));
                }
                self.lookup(map, true);
            }
        }
    }
}

/// The anonymous set of `th dport { … }`: a hash set of single ports, an interval set as
/// soon as one element is a range.
fn port_set(ranges: &[(u16, u16)]) -> AnonymousSet {
    let interval = ranges.iter().any(|(lo, hi)| lo != hi);
    let (elements, size) = match interval {
        true => port_intervals(ranges),
        false => {
            let mut list = Vec::new();
            for (port, _) in ranges {
                push_key(&mut list, &port.to_be_bytes(), 0, None);
            }
            (list, ranges.len() as u32)
        }
    };
    let (proto, field) = DPORT_TYPEOF;
    AnonymousSet {
        id: 0,
        flags: NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | if interval { NFT_SET_INTERVAL } else { 0 },
        key_type: TYPE_INET_SERVICE,
        key_len: 2,
        size,
        udata: set_udata(interval, proto, field),
        elements,
    }
}

fn nfproto(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    }
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// The address at `end`: its offset in the network header, its length, and nft's
/// indexes of its protocol and field (for a set's `typeof`).
struct AddressField {
    offset: u32,
    len: u32,
    proto: u8,
    field: u8,
}

fn address_field(family: IpFamily, end: End) -> AddressField {
    let (offset, len, proto, field) = match (family, end) {
        (IpFamily::V4, End::Source) => (12, 4, 12, 11),
        (IpFamily::V4, End::Destination) => (16, 4, 12, 12),
        (IpFamily::V6, End::Source) => (8, 16, 13, 8),
        (IpFamily::V6, End::Destination) => (24, 16, 13, 9),
    };
    AddressField {
        offset,
        len,
        proto,
        field,
    }
}

pub(super) fn address_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The network mask of prefix length `len`, in network byte order.
fn mask(family: IpFamily, len: u8) -> Vec<u8> {
    let bits = family.bits();
    let len = u32::from(len).min(bits);
    let value = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    value.to_be_bytes()[..(bits / 8) as usize].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_prefixes_in_network_order() {
        assert_eq!(mask(IpFamily::V4, 24), vec![255, 255, 255, 0]);
        assert_eq!(mask(IpFamily::V4, 0), vec![0, 0, 0, 0]);
        assert_eq!(mask(IpFamily::V4, 9), vec![255, 128, 0, 0]);
        let v6 = mask(IpFamily::V6, 32);
        assert_eq!(v6.len(), 16);
        assert_eq!(&v6[..5], &[255, 255, 255, 255, 0]);
    }

    fn lists(rule: &RuleDef) -> Vec<Message> {
        add_rule("t", "c", rule, &mut SetIds::default()).unwrap()
    }

    #[test]
    fn lists_bring_their_anonymous_sets() {
        let rule = |m: Match| RuleDef {
            matches: vec![m],
            counter: None,
            verdict: Verdict::Accept,
        };
        assert_eq!(lists(&rule(Match::Dports(vec![(80, 80)]))).len(), 1);
        // The set, its elements, the rule.
        assert_eq!(
            lists(&rule(Match::Dports(vec![(80, 80), (443, 443)]))).len(),
            3
        );
        let addrs = |n: usize| Match::AddrNotIn {
            family: IpFamily::V4,
            end: End::Source,
            addrs: (0..n).map(|i| IpAddr::from([10, 0, 0, i as u8])).collect(),
        };
        assert_eq!(lists(&rule(addrs(1))).len(), 1);
        assert_eq!(lists(&rule(addrs(2))).len(), 3);
        assert!(!encodable(&rule(addrs(0))));
        assert!(!encodable(&rule(Match::Dports(vec![]))));
        assert!(add_rule("t", "c", &rule(addrs(0)), &mut SetIds::default()).is_none());
    }

    #[test]
    fn port_intervals_are_ends_around_starts() {
        let keys = |ranges: &[(u16, u16)]| {
            let (list, size) = port_intervals(ranges);
            let elems: Vec<(u16, bool)> = crate::nfnl::attrs(&list)
                .map(|a| {
                    let elem = a.unwrap().1;
                    let mut key = 0;
                    let mut end = false;
                    for (kind, payload) in crate::nfnl::attrs(elem).map(Result::unwrap) {
                        match kind {
                            NFTA_SET_ELEM_FLAGS => end = true,
                            NFTA_SET_ELEM_KEY => {
                                let v = crate::nfnl::attrs(payload).next().unwrap().unwrap().1;
                                key = u16::from_be_bytes([v[0], v[1]]);
                            }
                            _ => {}
                        }
                    }
                    (key, end)
                })
                .collect();
            (elems, size)
        };
        assert_eq!(
            keys(&[(1, 5), (7, 7)]),
            (
                vec![(0, true), (1, false), (6, true), (7, false), (8, true)],
                5
            )
        );
        assert_eq!(
            keys(&[(0, 5), (7, 65535)]),
            (vec![(0, false), (6, true), (7, false)], 4)
        );
    }
}
