//! Stable content hashes for group and rule ids: FNV-1a over a value's `Debug` text. List
//! ids (`ruleset::TierList`) stream their own fields into the same [`Fnv`].
//!
//! The ids are public (agents key sets and counters by them, golden files spell them), so
//! their input is fixed: the `Debug` form. Going through `fmt` for it cost a fifth of a full
//! compile, so the common shapes (pod groups by selector, rule origins) stream the very
//! bytes `Debug` would print straight into the hash, and everything else — and any string
//! that `Debug` would escape — still goes through `fmt`. FNV is a byte stream, so mixing
//! the two gives the same hash as formatting the whole value.

use std::fmt::{Debug, Write};

use crate::model::{NamespaceScope, RuleOrigin};
use crate::selector::LabelSelector;

use super::groups::GroupDef;

/// FNV-1a: stable across runs and platforms, unlike `DefaultHasher`.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }

    pub(crate) fn bytes(&mut self, s: &[u8]) {
        for b in s {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn raw(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// What `Debug` prints for `value`.
    fn debug(&mut self, value: &(impl Debug + ?Sized)) {
        // Writing into Fnv cannot fail.
        let _ = write!(self, "{value:?}");
    }

    /// A string as `Debug` quotes it. Characters it would not escape are written as they
    /// are; anything else goes through `fmt`.
    fn quoted(&mut self, s: &str) {
        if s.bytes()
            .all(|b| (b.is_ascii_graphic() && b != b'"' && b != b'\\') || b == b' ')
        {
            self.raw("\"");
            self.raw(s);
            self.raw("\"");
        } else {
            self.debug(s);
        }
    }

    fn decimal(&mut self, mut n: u64) {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.bytes(&buf[at..]);
    }

    fn option_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.raw("Some(");
                self.quoted(s);
                self.raw(")");
            }
            None => self.raw("None"),
        }
    }

    fn selector(&mut self, sel: &LabelSelector) {
        self.raw("LabelSelector { match_labels: {");
        for (i, (k, v)) in sel.match_labels.iter().enumerate() {
            if i > 0 {
                self.raw(", ");
            }
            self.quoted(k);
            self.raw(": ");
            self.quoted(v);
        }
        self.raw("}, match_expressions: ");
        self.debug(&sel.match_expressions);
        self.raw(" }");
    }

    fn group_def(&mut self, def: &GroupDef) {
        match def {
            GroupDef::Pods { namespaces, pods } => {
                self.raw("Pods { namespaces: ");
                match namespaces {
                    NamespaceScope::Named(ns) => {
                        self.raw("Named(");
                        self.quoted(ns);
                        self.raw(")");
                    }
                    NamespaceScope::Selector(sel) => {
                        self.raw("Selector(");
                        self.selector(sel);
                        self.raw(")");
                    }
                }
                self.raw(", pods: ");
                self.selector(pods);
                self.raw(" }");
            }
            GroupDef::NamedPorts {
                peer,
                name,
                protocol,
            } => {
                self.raw("NamedPorts { peer: ");
                match peer {
                    Some(p) => {
                        self.raw("Some(");
                        self.group_def(p);
                        self.raw(")");
                    }
                    None => self.raw("None"),
                }
                self.raw(", name: ");
                self.quoted(name);
                self.raw(", protocol: ");
                self.debug(protocol);
                self.raw(" }");
            }
            GroupDef::Block { .. } | GroupDef::Nodes(_) => self.debug(def),
        }
    }

    fn rule_origin(&mut self, o: &RuleOrigin) {
        self.raw("RuleOrigin { policy: PolicyId { kind: ");
        self.debug(&o.policy.kind);
        self.raw(", namespace: ");
        self.option_str(o.policy.namespace.as_deref());
        self.raw(", name: ");
        self.quoted(&o.policy.name);
        self.raw(" }, tier: ");
        self.debug(&o.tier);
        self.raw(", priority: ");
        self.decimal(u64::from(o.priority));
        self.raw(", direction: ");
        self.debug(&o.direction);
        self.raw(", index: ");
        self.decimal(o.index as u64);
        self.raw(", name: ");
        self.option_str(o.name.as_deref());
        self.raw(" }");
    }
}

impl Write for Fnv {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.raw(s);
        Ok(())
    }
}

/// The stable hash of a value's `Debug` form, through `fmt`.
#[cfg(test)]
pub(crate) fn of_debug(value: &impl Debug) -> u64 {
    let mut h = Fnv::new();
    h.debug(value);
    h.finish()
}

/// `of_debug(def)`, without `fmt` for the common shapes.
pub(crate) fn of_group_def(def: &GroupDef) -> u64 {
    let mut h = Fnv::new();
    h.group_def(def);
    h.finish()
}

/// `of_debug(origin)`, without `fmt`.
pub(crate) fn of_rule_origin(origin: &RuleOrigin) -> u64 {
    let mut h = Fnv::new();
    h.rule_origin(origin);
    h.finish()
}

/// `prefix` and the 16 lower-case hex digits of `value`, as `format!("{prefix}{value:016x}")`.
pub(crate) fn hex_id(prefix: &str, value: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(prefix.len() + 16);
    s.push_str(prefix);
    for shift in (0..16).rev() {
        s.push(char::from(DIGITS[((value >> (shift * 4)) & 0xf) as usize]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Direction, PolicyId, PolicyKind, Protocol, Tier};
    use crate::selector::{Operator, Requirement};

    fn selectors() -> Vec<LabelSelector> {
        vec![
            LabelSelector::everything(),
            LabelSelector::with_labels([("app", "web"), ("tier", "fe")]),
            LabelSelector::with_labels([("we\"ird", "va\\l ü\n")]),
            LabelSelector {
                match_labels: [("a", "b")].into_iter().collect(),
                match_expressions: vec![Requirement {
                    key: "env".into(),
                    operator: Operator::NotIn,
                    values: ["dev".to_string(), "qa".to_string()].into(),
                }],
            },
        ]
    }

    #[test]
    fn group_hashes_equal_the_debug_text_hash() {
        let mut defs = Vec::new();
        for pods in selectors() {
            defs.push(GroupDef::Pods {
                namespaces: NamespaceScope::Named("ns-1".into()),
                pods: pods.clone(),
            });
            for ns in selectors() {
                defs.push(GroupDef::Pods {
                    namespaces: NamespaceScope::Selector(ns),
                    pods: pods.clone(),
                });
            }
            defs.push(GroupDef::Nodes(pods));
        }
        defs.push(GroupDef::Block {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()],
        });
        for peer in defs.clone() {
            defs.push(GroupDef::NamedPorts {
                peer: Some(Box::new(peer)),
                name: "http".into(),
                protocol: Protocol::Sctp,
            });
        }
        defs.push(GroupDef::NamedPorts {
            peer: None,
            name: "mé\"tric".into(),
            protocol: Protocol::Tcp,
        });
        for def in &defs {
            assert_eq!(of_group_def(def), of_debug(def), "{def:?}");
        }
    }

    #[test]
    fn rule_hashes_equal_the_debug_text_hash() {
        for (namespace, name, rule_name) in [
            (Some("ns-1"), "allow", None),
            (None, "cnp \"x\"", Some("rule-7")),
            (Some("ü"), "a", Some("")),
        ] {
            let origin = RuleOrigin {
                policy: PolicyId {
                    kind: PolicyKind::AdminNetworkPolicy,
                    namespace: namespace.map(String::from),
                    name: name.into(),
                },
                tier: Tier::Admin,
                priority: 1000,
                direction: Direction::Egress,
                index: 12,
                name: rule_name.map(String::from),
            };
            assert_eq!(of_rule_origin(&origin), of_debug(&origin), "{origin:?}");
        }
    }

    #[test]
    fn hex_ids_match_format() {
        for v in [0, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(hex_id("g-", v), format!("g-{v:016x}"));
        }
    }
}
