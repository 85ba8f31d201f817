//! Sets of IP addresses as sorted, disjoint, merged ranges, per family.
//!
//! `ipBlock` with `except` is a CIDR minus other CIDRs, which is not a set of prefixes in
//! general but is always a set of ranges; nftables interval sets take ranges directly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Inclusive ranges, sorted, disjoint and not adjacent (adjacent ranges are merged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrSet {
    pub v4: Vec<(u32, u32)>,
    pub v6: Vec<(u128, u128)>,
}

fn v4_bounds(net: &ipnet::Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()), u32::from(net.broadcast()))
}

fn v6_bounds(net: &ipnet::Ipv6Net) -> (u128, u128) {
    (u128::from(net.network()), u128::from(net.broadcast()))
}

/// Sorts and merges overlapping or adjacent ranges in place.
fn normalize<T: Copy + Ord + num_like::Succ>(ranges: &mut Vec<(T, T)>) {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        match out.last_mut() {
            Some(last) if last.1 >= lo || last.1.succ() == Some(lo) => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    *ranges = out;
}

/// Removes `cut` (normalized) from `ranges` (normalized), in one pass over both: both are
/// sorted, so the cuts that can touch a range start where the last range's ended.
fn subtract<T: Copy + Ord + num_like::Succ>(ranges: &[(T, T)], cut: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::new();
    let mut first = 0;
    for &(lo, hi) in ranges {
        while cut.get(first).is_some_and(|&(_, chi)| chi < lo) {
            first += 1;
        }
        let mut start = Some(lo);
        for &(clo, chi) in &cut[first..] {
            let Some(s) = start else { break };
            if clo > hi {
                break;
            }
            if clo > s {
                out.push((s, clo.pred().expect("clo > s implies a predecessor")));
            }
            start = if chi >= hi { None } else { chi.succ() };
        }
        if let Some(s) = start {
            out.push((s, hi));
        }
    }
    out
}

fn contains_sorted<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|&(lo, _)| lo <= x);
    i > 0 && ranges[i - 1].1 >= x
}

mod num_like {
    pub trait Succ: Sized {
        fn succ(self) -> Option<Self>;
        fn pred(self) -> Option<Self>;
    }
    impl Succ for u32 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
        fn pred(self) -> Option<Self> {
            self.checked_sub(1)
        }
    }
    impl Succ for u128 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
        fn pred(self) -> Option<Self> {
            self.checked_sub(1)
        }
    }
}

impl AddrSet {
    pub fn new() -> Self {
        AddrSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// `cidr` minus every `except` (excepts of the other family are ignored).
    pub fn from_block(cidr: &IpNet, except: &[IpNet]) -> Self {
        let mut set = AddrSet::new();
        set.insert_net(cidr);
        let mut cut = AddrSet::new();
        for e in except {
            cut.insert_net(e);
        }
        cut.normalize();
        set.v4 = subtract(&set.v4, &cut.v4);
        set.v6 = subtract(&set.v6, &cut.v6);
        set
    }

    pub fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut set = AddrSet::new();
        for a in addrs {
            set.push_addr(a);
        }
        set.normalize();
        set
    }

    /// Adds without normalizing; call [`AddrSet::normalize`] after a batch.
    pub fn push_addr(&mut self, addr: IpAddr) {
        match addr {
            IpAddr::V4(a) => self.v4.push((a.into(), a.into())),
            IpAddr::V6(a) => self.v6.push((a.into(), a.into())),
        }
    }

    fn insert_net(&mut self, net: &IpNet) {
        match net {
            IpNet::V4(n) => self.v4.push(v4_bounds(n)),
            IpNet::V6(n) => self.v6.push(v6_bounds(n)),
        }
    }

    pub fn normalize(&mut self) {
        normalize(&mut self.v4);
        normalize(&mut self.v6);
    }

    /// The addresses of `self` that are not in `other`.
    pub fn difference(&self, other: &AddrSet) -> AddrSet {
        AddrSet {
            v4: subtract(&self.v4, &other.v4),
            v6: subtract(&self.v6, &other.v6),
        }
    }

    /// Adds every range of `other`.
    pub fn union_with(&mut self, other: &AddrSet) {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
        self.normalize();
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => contains_sorted(&self.v4, u32::from(a)),
            IpAddr::V6(a) => contains_sorted(&self.v6, u128::from(a)),
        }
    }

    /// The number of ranges (what an nftables interval set holds).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Each range as text: an address, a CIDR where the range is exactly one, or `a-b`.
    pub fn to_strings(&self) -> Vec<String> {
        let v4 = self.v4.iter().map(|&(lo, hi)| {
            range_text(
                IpAddr::V4(Ipv4Addr::from(lo)),
                IpAddr::V4(Ipv4Addr::from(hi)),
                (hi - lo).checked_add(1).map(u128::from),
                32,
            )
        });
        let v6 = self.v6.iter().map(|&(lo, hi)| {
            range_text(
                IpAddr::V6(Ipv6Addr::from(lo)),
                IpAddr::V6(Ipv6Addr::from(hi)),
                (hi - lo).checked_add(1),
                128,
            )
        });
        v4.chain(v6).collect()
    }
}

/// `size` is `None` when the range covers the whole family.
fn range_text(lo: IpAddr, hi: IpAddr, size: Option<u128>, bits: u32) -> String {
    if lo == hi {
        return lo.to_string();
    }
    let prefix = match size {
        None => Some(0),
        Some(n) if n.is_power_of_two() => Some(bits - n.trailing_zeros()),
        _ => None,
    };
    if let Some(len) = prefix {
        if let Ok(net) = IpNet::new(lo, len as u8) {
            if net.network() == lo {
                return net.to_string();
            }
        }
    }
    format!("{lo}-{hi}")
}

#[derive(Debug, thiserror::Error)]
#[error("invalid address range {0:?}")]
pub struct ParseRangeError(String);

fn parse_range(text: &str) -> Result<(IpAddr, IpAddr), ParseRangeError> {
    let err = || ParseRangeError(text.to_string());
    if let Some((lo, hi)) = text.split_once('-') {
        let lo = IpAddr::from_str(lo).map_err(|_| err())?;
        let hi = IpAddr::from_str(hi).map_err(|_| err())?;
        // An inverted range is no set of addresses; taking it would break every range
        // computation after it.
        if hi < lo {
            return Err(err());
        }
        return Ok((lo, hi));
    }
    if text.contains('/') {
        let net = IpNet::from_str(text).map_err(|_| err())?;
        return Ok((net.network(), net.broadcast()));
    }
    let a = IpAddr::from_str(text).map_err(|_| err())?;
    Ok((a, a))
}

impl fmt::Display for AddrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.to_strings().join(", "))
    }
}

impl Serialize for AddrSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_strings().serialize(s)
    }
}

impl<'de> Deserialize<'de> for AddrSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        let mut set = AddrSet::new();
        for t in texts {
            match parse_range(&t).map_err(serde::de::Error::custom)? {
                (IpAddr::V4(lo), IpAddr::V4(hi)) => set.v4.push((lo.into(), hi.into())),
                (IpAddr::V6(lo), IpAddr::V6(hi)) => set.v6.push((lo.into(), hi.into())),
                _ => return Err(serde::de::Error::custom(format!("mixed families in {t:?}"))),
            }
        }
        set.normalize();
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn small_set(ranges: Vec<(u32, u32)>) -> AddrSet {
        let mut set = AddrSet::new();
        set.v4 = ranges
            .into_iter()
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
        set.v6 = set
            .v4
            .iter()
            .map(|&(a, b)| (u128::from(a), u128::from(b)))
            .collect();
        set.normalize();
        set
    }

    proptest! {
        /// Set difference, address by address, over a universe small enough to walk, and
        /// the result in normal form (sorted, disjoint, not adjacent).
        #[test]
        fn difference_is_exact(
            a in proptest::collection::vec((0u32..64, 0u32..64), 0..8),
            b in proptest::collection::vec((0u32..64, 0u32..64), 0..8),
        ) {
            let (a, b) = (small_set(a), small_set(b));
            let d = a.difference(&b);
            let mut normal = d.clone();
            normal.normalize();
            prop_assert_eq!(&normal, &d);
            for x in 0u32..66 {
                let v4 = IpAddr::V4(Ipv4Addr::from(x));
                let v6 = IpAddr::V6(Ipv6Addr::from(u128::from(x)));
                prop_assert_eq!(d.contains(v4), a.contains(v4) && !b.contains(v4), "{}", x);
                prop_assert_eq!(d.contains(v6), a.contains(v6) && !b.contains(v6), "{}", x);
            }
        }
    }

    /// The fuzzer found a rules file with a range whose end lay below its start: taken,
    /// it broke the set's invariant and later arithmetic overflowed.
    #[test]
    fn an_inverted_range_is_refused() {
        let err = serde_json::from_str::<AddrSet>(r#"["fd00::9-fd00::1"]"#).unwrap_err();
        assert!(err.to_string().contains("fd00::9-fd00::1"), "{err}");
        assert!(serde_json::from_str::<AddrSet>(r#"["10.0.0.9-10.0.0.1"]"#).is_err());
        let ok: AddrSet = serde_json::from_str(r#"["10.0.0.1-10.0.0.9", "fd00::1"]"#).unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn block_with_except() {
        let s = AddrSet::from_block(
            &net("10.0.0.0/24"),
            &[net("10.0.0.128/25"), net("10.0.0.7/32")],
        );
        assert_eq!(
            s.to_strings(),
            vec!["10.0.0.0-10.0.0.6", "10.0.0.8-10.0.0.127"]
        );
        assert!(s.contains("10.0.0.6".parse().unwrap()));
        assert!(!s.contains("10.0.0.7".parse().unwrap()));
        assert!(!s.contains("10.0.0.200".parse().unwrap()));
        assert!(!s.contains("10.0.1.0".parse().unwrap()));
    }

    #[test]
    fn whole_space_and_v6() {
        let s = AddrSet::from_block(&net("0.0.0.0/0"), &[net("10.0.0.0/8")]);
        assert!(s.contains("11.0.0.0".parse().unwrap()));
        assert!(!s.contains("10.1.2.3".parse().unwrap()));
        assert!(!s.contains("::1".parse().unwrap()));
        let all6 = AddrSet::from_block(&net("::/0"), &[]);
        assert_eq!(all6.to_strings(), vec!["::/0"]);
        assert!(all6.contains("fd00::1".parse().unwrap()));
    }

    #[test]
    fn adjacent_addresses_merge_and_round_trip() {
        let s = AddrSet::from_addrs(
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9"].map(|a| a.parse().unwrap()),
        );
        assert_eq!(s.to_strings(), vec!["10.0.0.1-10.0.0.3", "10.0.0.9"]);
        let json = serde_json::to_string(&s).unwrap();
        let back: AddrSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    /// Addresses worth probing around a block: both ends of the block and of each except,
    /// their outside neighbours, and a few drawn inside the block and anywhere.
    fn probes_around(
        cidr: &ipnet::Ipv4Net,
        ex: &[ipnet::Ipv4Net],
        inside: &[u32],
        anywhere: &[u32],
    ) -> Vec<u32> {
        let mut out = Vec::new();
        for net in std::iter::once(cidr).chain(ex) {
            let (lo, hi) = v4_bounds(net);
            out.extend([lo, hi]);
            out.extend(lo.checked_sub(1));
            out.extend(hi.checked_add(1));
        }
        let (lo, hi) = v4_bounds(cidr);
        out.extend(
            inside
                .iter()
                .map(|x| lo + x % (hi - lo).saturating_add(1).max(1)),
        );
        out.extend(anywhere);
        out
    }

    proptest! {
        #[test]
        fn block_membership_matches_definition(
            base in any::<u32>(),
            len in 8u8..=32,
            // Excepts mostly inside the block (offset and a longer prefix), sometimes anywhere.
            excepts in proptest::collection::vec((any::<bool>(), any::<u32>(), 0u8..=24), 0..4),
            inside in proptest::collection::vec(any::<u32>(), 4),
            anywhere in proptest::collection::vec(any::<u32>(), 2),
        ) {
            let cidr = ipnet::Ipv4Net::new(Ipv4Addr::from(base), len).unwrap().trunc();
            let (lo, hi) = v4_bounds(&cidr);
            let ex: Vec<ipnet::Ipv4Net> = excepts
                .iter()
                .map(|&(within, b, extra)| {
                    let (addr, l) = if within {
                        (lo + b % (hi - lo).saturating_add(1).max(1), (len + extra).min(32))
                    } else {
                        (b, 16 + extra % 17)
                    };
                    ipnet::Ipv4Net::new(Ipv4Addr::from(addr), l).unwrap().trunc()
                })
                .collect();
            let set = AddrSet::from_block(&IpNet::V4(cidr), &ex.iter().copied().map(IpNet::V4).collect::<Vec<_>>());
            let (mut saw_in, mut saw_out) = (false, false);
            for probe in probes_around(&cidr, &ex, &inside, &anywhere) {
                let addr = Ipv4Addr::from(probe);
                let expected = cidr.contains(&addr) && !ex.iter().any(|e| e.contains(&addr));
                prop_assert_eq!(set.contains(IpAddr::V4(addr)), expected, "{}", addr);
                saw_in |= expected;
                saw_out |= !expected;
            }
            // The block's first address is inside unless excepted, and a neighbour of the
            // block is outside unless the block is the whole space.
            prop_assert!(saw_out);
            prop_assert!(saw_in || ex.iter().any(|e| e.contains(&Ipv4Addr::from(lo))));
        }
    }

    proptest! {
        /// A union holds exactly the addresses of either side, in both families, and
        /// stays normalized (what the renderer's interval sets need).
        #[test]
        fn union_holds_either_side(
            a in (any::<u32>(), 8u8..=32),
            b in (any::<u32>(), 8u8..=32),
            b6 in (any::<u128>(), 16u8..=128),
            probes in proptest::collection::vec(any::<u32>(), 4),
        ) {
            let v4 = |(base, len): (u32, u8)| ipnet::Ipv4Net::new(Ipv4Addr::from(base), len).unwrap().trunc();
            let (na, nb) = (v4(a), v4(b));
            let n6 = ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(b6.0), b6.1).unwrap().trunc();
            let mut set = AddrSet::from_block(&IpNet::V4(na), &[]);
            let mut other = AddrSet::from_block(&IpNet::V4(nb), &[]);
            other.union_with(&AddrSet::from_block(&IpNet::V6(n6), &[]));
            set.union_with(&other);
            let mut edges: Vec<u32> = probes;
            for n in [na, nb] {
                let (lo, hi) = v4_bounds(&n);
                edges.extend([lo, hi]);
                edges.extend(lo.checked_sub(1));
                edges.extend(hi.checked_add(1));
            }
            for probe in edges {
                let addr = Ipv4Addr::from(probe);
                prop_assert_eq!(set.contains(IpAddr::V4(addr)), na.contains(&addr) || nb.contains(&addr), "{}", addr);
            }
            prop_assert!(set.contains(IpAddr::V6(n6.network())));
            prop_assert!(set.contains(IpAddr::V6(n6.broadcast())));
            let mut normalized = set.clone();
            normalized.normalize();
            prop_assert_eq!(normalized, set);
        }
    }

    /// The probes of the property really hit inside, edge and outside addresses.
    #[test]
    fn probes_around_reach_inside_edges_and_outside() {
        let cidr: ipnet::Ipv4Net = "10.1.0.0/16".parse().unwrap();
        let ex: ipnet::Ipv4Net = "10.1.2.0/24".parse().unwrap();
        let probes: Vec<Ipv4Addr> = probes_around(&cidr, &[ex], &[5], &[])
            .into_iter()
            .map(Ipv4Addr::from)
            .collect();
        for a in [
            "10.1.0.0",
            "10.1.255.255",
            "10.0.255.255",
            "10.2.0.0",
            "10.1.2.0",
            "10.1.2.255",
            "10.1.1.255",
            "10.1.3.0",
            "10.1.0.5",
        ] {
            assert!(probes.contains(&a.parse().unwrap()), "{a} in {probes:?}");
        }
    }
}
