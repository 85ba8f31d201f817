//! The desired content of the agent's nftables table, as plain data.
//!
//! Rendering produces a [`Ruleset`]; it is printed as nft text ([`super::text`]), turned
//! into `nft -j` commands ([`super::json`]) and compared with the applied one to plan an
//! incremental transaction ([`crate::diff`]). Every collection is ordered so that the same
//! input always gives the same output.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use palisade_policy::model::{Direction, PodKey, Protocol, RuleOrigin};

/// The only table the agent ever touches.
pub const TABLE: &str = "palisade";
pub const EGRESS_DISPATCH: &str = "egress_dispatch";
pub const INGRESS_DISPATCH: &str = "ingress_dispatch";
/// Interface → the pod's rest chain, for the shared Admin chains' Pass and end
/// ([`Verdict::RestDispatch`]).
pub const EGRESS_REST_DISPATCH: &str = "egress_rest_dispatch";
pub const INGRESS_REST_DISPATCH: &str = "ingress_rest_dispatch";
/// The counter of packets dropped because their pod interface is not enforced yet.
pub const UNKNOWN_INTERFACE_COUNTER: &str = "unknown-interface";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: &IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The payload protocol of the address fields (`ip saddr`, `ip6 daddr`).
    pub fn payload(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    /// The `meta nfproto` value.
    pub fn nfproto(self) -> &'static str {
        match self {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        }
    }

    pub fn addr_type(self) -> &'static str {
        match self {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u32 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    pub fn suffix(self) -> &'static str {
        match self {
            IpFamily::V4 => "_4",
            IpFamily::V6 => "_6",
        }
    }
}

/// One element of an address set: an inclusive range (a single address when `lo == hi`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrRange {
    pub lo: IpAddr,
    pub hi: IpAddr,
}

/// An element of a named-port set: (address, protocol, port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetElement {
    Addr(AddrRange),
    Endpoint(Endpoint),
    /// An element of a [`SetKind::Classes`] map: addresses of one class, and the class's
    /// chain (`10.0.0.0/24 : goto CHAIN`).
    Class {
        range: AddrRange,
        chain: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetKind {
    /// `type ipv4_addr` / `ipv6_addr`, `flags interval`: CIDR blocks less exceptions.
    Addresses(IpFamily),
    /// `type ipv4_addr` / `ipv6_addr`, a plain hash set of single addresses: pods' and
    /// nodes' addresses. Hash sets cost less to load and look up than interval sets, and
    /// nft 1.0.x adds an element to them without first fetching every element of every
    /// interval set of the table (it does that for interval sets, to check overlaps).
    Hosts(IpFamily),
    /// `type ipv4_addr` / `ipv6_addr`, a plain hash set of the network addresses of a CIDR
    /// group's prefixes of one length, matched through that length's mask
    /// (`ip saddr & 255.255.255.0 @set`): a hash lookup per length instead of the interval
    /// set's binary search ([`super::prefixes`]). Elements are single addresses, as in
    /// [`SetKind::Hosts`].
    Prefixes(IpFamily, u8),
    /// `type ipv4_addr . inet_proto . inet_service`.
    NamedPorts(IpFamily),
    /// A map `type ipv4_addr : verdict`, `flags interval`: a shared tier list's address
    /// classes, each range to the chain of the rules that can match a peer there
    /// ([`super::classes`]). Elements are [`SetElement::Class`].
    Classes(IpFamily),
    /// A map `type ipv4_addr : verdict` without flags (a hash map): a shared tier list's
    /// address classes as the network addresses of prefixes of one length, each to its
    /// class's chain, looked up through the length's mask
    /// (`ip daddr & 255.255.255.0 vmap @map`): a hash lookup per length instead of the
    /// interval map's binary search ([`super::prefixes::widened`]). Elements are
    /// [`SetElement::Class`] of single addresses.
    ClassPrefixes(IpFamily, u8),
}

impl SetKind {
    pub fn family(self) -> IpFamily {
        match self {
            SetKind::Addresses(f)
            | SetKind::Hosts(f)
            | SetKind::Prefixes(f, _)
            | SetKind::NamedPorts(f)
            | SetKind::Classes(f)
            | SetKind::ClassPrefixes(f, _) => f,
        }
    }

    /// Whether the set holds peer addresses matched whole (`ip saddr @set`).
    pub fn is_addresses(self) -> bool {
        matches!(self, SetKind::Addresses(_) | SetKind::Hosts(_))
    }

    /// Whether the elements refer to chains (a map), which must exist before them and
    /// go after them.
    pub fn names_chains(self) -> bool {
        matches!(self, SetKind::Classes(_) | SetKind::ClassPrefixes(..))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDef {
    pub kind: SetKind,
    /// Sorted, no duplicates (and, for address sets, no overlaps). Shared: a group that did
    /// not change keeps the same allocation from render to render, so cloning a table is
    /// cheap and comparing it short-circuits on the pointer (`Arc`'s `Eq` does that).
    pub elements: Arc<[SetElement]>,
    /// The kernel's `size` of the set: most elements it will take. `Some` for hash sets
    /// (hosts, prefixes): with a size the kernel picks a fixed-size hash instead of the resizing one, which
    /// loads about twice as fast. Chosen with room to grow ([`host_set_size`]); a set that
    /// outgrows it is recreated by a full replacement.
    pub size: Option<u32>,
}

/// Fewest slots a host set gets: small groups grow without a replacement.
pub const MIN_HOST_SET_SIZE: u32 = 64;

/// The size a host set of `n` addresses is created with: twice as many, rounded up to a
/// power of two (the kernel rounds its bucket count so anyway), at least
/// [`MIN_HOST_SET_SIZE`].
pub fn host_set_size(n: usize) -> u32 {
    let wanted = u32::try_from(n.saturating_mul(2)).unwrap_or(u32::MAX);
    wanted
        .checked_next_power_of_two()
        .unwrap_or(u32::MAX)
        .max(MIN_HOST_SET_SIZE)
}

/// Which end of the packet a match looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum End {
    Source,
    Destination,
}

impl End {
    pub fn field(self) -> &'static str {
        match self {
            End::Source => "saddr",
            End::Destination => "daddr",
        }
    }

    /// The end of the packet where the peer is, for a subject pod's direction.
    pub fn peer_of(direction: Direction) -> End {
        match direction {
            Direction::Ingress => End::Source,
            Direction::Egress => End::Destination,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// `meta nfproto ipv4`.
    Family(IpFamily),
    /// `ip saddr != { a, b }` (the pod's own addresses, anti-spoofing).
    AddrNotIn {
        family: IpFamily,
        end: End,
        addrs: Vec<IpAddr>,
    },
    /// `ip daddr @set`.
    AddrInSet {
        family: IpFamily,
        end: End,
        set: String,
    },
    /// `ip daddr & 255.255.255.0 @set`: the peer's network of prefix length `len` (less
    /// than the family's full length) in a [`SetKind::Prefixes`] set.
    MaskedAddrInSet {
        family: IpFamily,
        end: End,
        len: u8,
        set: String,
    },
    /// `meta l4proto tcp`: first in a rule, the cheapest test rejects other protocols
    /// before any set lookup.
    Protocol(Protocol),
    /// `th dport 80`, `th dport 8000-8100` or `th dport { 80, 8000-8100 }`: merged, sorted,
    /// inclusive ranges of one protocol (a [`Match::Protocol`] precedes it in the rule).
    Dports(Vec<(u16, u16)>),
    /// `ip daddr . meta l4proto . th dport @set`.
    EndpointInSet {
        family: IpFamily,
        end: End,
        set: String,
    },
    /// `ct state established,related`: in a pod's egress entry chain, right after the
    /// anti-spoofing rules, so established traffic skips the policy but never the
    /// source check.
    Established,
    /// `limit rate R/second burst B packets`: true while the rule's token bucket holds a
    /// token (a flow-log chain's rate limit, in the kernel).
    Limit { per_second: u32, burst: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `iifname vmap @egress_rest_dispatch` (`oifname vmap @ingress_rest_dispatch` for
    /// ingress): a shared Admin chain going on at the rest chain of the pod it runs for,
    /// found by that pod's interface (the maps' elements are `goto`). Not final: a miss
    /// (a pod without a rest chain) goes on with the next rule, or returns at the chain's
    /// end.
    RestDispatch(Direction),
    /// `log prefix "P" group G drop`: the packet goes to NFLOG group `group` (the agent's
    /// flow log), then is dropped.
    LogDrop {
        prefix: String,
        group: u16,
    },
    /// Log, then return: an audit chain's would-deny, which the enforced rules allow.
    LogReturn {
        prefix: String,
        group: u16,
    },
    /// `ip daddr vmap @map` (a [`SetKind::Classes`] map), or `ip daddr & MASK vmap @map`
    /// (a [`SetKind::ClassPrefixes`] map of `prefix`-long networks; `None` for a full-length
    /// one, which needs no mask): on at the chain of the peer's address class (the
    /// elements are `goto`). Not final: a peer in no class goes on with the next rule; a
    /// packet of the other family does too.
    ClassDispatch {
        family: IpFamily,
        end: End,
        map: String,
        prefix: Option<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleDef {
    pub matches: Vec<Match>,
    /// A named counter object.
    pub counter: Option<String>,
    pub verdict: Verdict,
}

/// The fixed statements of the base chains (see the module docs of [`crate::render`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BaseStatement {
    /// `ct state established,related accept`.
    Established,
    /// `icmpv6 type { nd-... } accept`: a pod's neighbour discovery with its node.
    NeighbourDiscovery,
    /// `iifname vmap @egress_dispatch` / `oifname vmap @ingress_dispatch`.
    Dispatch(Direction),
    /// `iifname "veth*" iifname != @egress_dispatch counter name "unknown-interface" drop`
    /// (`oifname` for [`Direction::Ingress`]): a pod interface the agent does not enforce
    /// yet carries nothing. Every enforced pod's interface is a key of the egress map.
    UnknownInterface {
        direction: Direction,
        pattern: String,
    },
    /// `ct state new tcp flags & syn == 0 iifname @egress_dispatch drop` (`oifname` for
    /// [`Direction::Ingress`]): no mid-stream pickup of a TCP connection of an enforced
    /// pod. Once the agent deletes a denied flow's conntrack entry, the kernel (with the
    /// default `nf_conntrack_tcp_loose`) would take the next segment of either end as a
    /// new flow; one from the server would be judged in the reverse direction, where the
    /// policy may allow it, and revive the connection. Every real connection starts with
    /// a SYN.
    TcpPickup(Direction),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub name: &'static str,
    pub hook: &'static str,
    pub priority: i32,
    pub statements: Vec<BaseStatement>,
}

/// What a named counter counts, for the metrics' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CounterMeta {
    Rule {
        id: String,
        origin: Option<RuleOrigin>,
    },
    DefaultDeny {
        pod: PodKey,
        direction: Direction,
    },
    Spoofed {
        pod: PodKey,
    },
    /// Denied packets the flow log's rate limit kept from NFLOG (they were still dropped).
    FlowLogSuppressed,
    /// Packets of pod interfaces not enforced yet ([`BaseStatement::UnknownInterface`]).
    UnknownInterface,
    /// The would-deny decisions, in an audit chain, of a rule or a default deny.
    Audit(Box<CounterMeta>),
}

/// A counter map's place in the renderer's history: its serial and, when a render only
/// added to the map before, that map's serial and the names it added. Bookkeeping, not
/// content: any two compare equal, so tables compare by what they hold.
#[derive(Clone, Debug, Default)]
pub struct CounterLineage {
    /// 0 for a map of unknown history (built or changed outside the renderer).
    serial: u64,
    from: Option<(u64, Arc<[String]>)>,
    /// The map this describes: a lineage copied beside another map describes nothing.
    map: usize,
}

impl CounterLineage {
    pub(crate) fn new(
        serial: u64,
        from: Option<(u64, Arc<[String]>)>,
        map: &Arc<impl Sized>,
    ) -> Self {
        CounterLineage {
            serial,
            from,
            map: Arc::as_ptr(map) as *const () as usize,
        }
    }

    fn describes<T>(&self, map: &Arc<T>) -> bool {
        self.serial != 0 && self.map == Arc::as_ptr(map) as *const () as usize
    }
}

impl PartialEq for CounterLineage {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CounterLineage {}

/// The whole table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub base_chains: Vec<BaseChain>,
    /// Shared: a render that changes no counter hands on the previous map, so comparing
    /// and cloning the table stay cheap with thousands of rule counters (`Arc`'s `Eq`
    /// short-circuits on the pointer). Change it through [`Ruleset::counters_mut`].
    pub counters: Arc<BTreeMap<String, CounterMeta>>,
    /// Where `counters` came from, so that a plan need not compare 10,000 names to find
    /// the few a render added.
    pub counter_lineage: CounterLineage,
    pub sets: BTreeMap<String, SetDef>,
    /// Interface name → chain, per dispatch map.
    pub egress_dispatch: BTreeMap<String, String>,
    pub ingress_dispatch: BTreeMap<String, String>,
    /// Interface name → the pod's rest chain (or shared Baseline chain), per rest-dispatch
    /// map: only for pods whose entry chain goes to a shared Admin chain.
    pub egress_rest_dispatch: BTreeMap<String, String>,
    pub ingress_rest_dispatch: BTreeMap<String, String>,
    /// Regular (non-base) chains. Shared like set elements: a pod whose rules did not
    /// change keeps its chains' allocations from render to render.
    pub chains: BTreeMap<String, Arc<Vec<RuleDef>>>,
}

impl Ruleset {
    pub fn counters_mut(&mut self) -> &mut BTreeMap<String, CounterMeta> {
        self.counter_lineage = CounterLineage::default();
        Arc::make_mut(&mut self.counters)
    }

    /// The counter names `self` has and `base` lacks, sorted, when the renderer's
    /// lineage tells them (`self`'s map is `base`'s or `base`'s with only additions);
    /// `None` when only comparing the maps can.
    pub fn counters_added_to(&self, base: &Ruleset) -> Option<&[String]> {
        let (new, old) = (&self.counter_lineage, &base.counter_lineage);
        if !new.describes(&self.counters) || !old.describes(&base.counters) {
            return None;
        }
        if new.serial == old.serial {
            return Some(&[]);
        }
        match &new.from {
            Some((serial, names)) if *serial == old.serial => Some(names),
            _ => None,
        }
    }

    pub fn dispatch(&self, direction: Direction) -> &BTreeMap<String, String> {
        match direction {
            Direction::Egress => &self.egress_dispatch,
            Direction::Ingress => &self.ingress_dispatch,
        }
    }

    pub fn dispatch_mut(&mut self, direction: Direction) -> &mut BTreeMap<String, String> {
        match direction {
            Direction::Egress => &mut self.egress_dispatch,
            Direction::Ingress => &mut self.ingress_dispatch,
        }
    }

    pub fn rest_dispatch_mut(&mut self, direction: Direction) -> &mut BTreeMap<String, String> {
        match direction {
            Direction::Egress => &mut self.egress_rest_dispatch,
            Direction::Ingress => &mut self.ingress_rest_dispatch,
        }
    }

    pub fn rest_dispatch(&self, direction: Direction) -> &BTreeMap<String, String> {
        match direction {
            Direction::Egress => &self.egress_rest_dispatch,
            Direction::Ingress => &self.ingress_rest_dispatch,
        }
    }

    /// Every dispatch map: (name, elements, whether its elements are `goto` rather than
    /// `jump`), in the order the table declares them.
    pub fn dispatch_maps(&self) -> [(&'static str, &BTreeMap<String, String>, bool); 4] {
        [
            (EGRESS_DISPATCH, &self.egress_dispatch, false),
            (INGRESS_DISPATCH, &self.ingress_dispatch, false),
            (EGRESS_REST_DISPATCH, &self.egress_rest_dispatch, true),
            (INGRESS_REST_DISPATCH, &self.ingress_rest_dispatch, true),
        ]
    }
}

/// The names of every dispatch map, as [`Ruleset::dispatch_maps`] orders them.
pub const DISPATCH_MAPS: [&str; 4] = [
    EGRESS_DISPATCH,
    INGRESS_DISPATCH,
    EGRESS_REST_DISPATCH,
    INGRESS_REST_DISPATCH,
];
