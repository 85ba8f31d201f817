//! Rendering: a node's [`NodeRuleSet`] and the local pods' host-side interfaces in, the
//! content of the table `inet palisade` out. Pure: no I/O.
//!
//! # Layout of the table
//!
//! * Base chains `forward` and `input`, both `type filter`, priority `filter` (0): after
//!   conntrack (-200) so `ct state` is known, and after DNAT in prerouting (-100) so a
//!   Service's traffic is seen with the real pod as destination. Other tables' filter chains
//!   at the same priority do not matter for correctness: an `accept` here never overrides a
//!   `drop` elsewhere, and a `drop` here is final.
//! * Anti-spoofing comes before anything established: `forward` first dispatches by the
//!   incoming interface (`iifname vmap @egress_dispatch`) to the egress entry chain of the
//!   pod behind that veth, which starts with the source check (a source address that is
//!   not one of the pod's is counted, `spoof/NS/NAME`, and dropped; a pod without an
//!   address of a family sends nothing of that family), then `ct state
//!   established,related accept`, then the pod's egress policy. Conntrack keys on the
//!   5-tuple, not the interface, so an established check before the source check would let
//!   a pod (with the default `CAP_NET_RAW`) forge another pod's address into that pod's
//!   live flow, or forge the reply of a flow, past the destination's ingress policy. The
//!   check costs every packet from a pod one verdict-map lookup (a hash on the interface
//!   name) and at most two address comparisons: O(1) in the number of pods and rules.
//!   Packets not from a pod miss the map and meet `ct state established,related accept`
//!   next, so rules only cost the first packet of a connection. There is no `ct state
//!   invalid drop`: invalid packets are simply not "established" and are judged by the
//!   policy like new ones, so the agent never drops traffic its policy allows.
//! * `forward` then dispatches by the outgoing interface (`oifname vmap
//!   @ingress_dispatch`) to the ingress chain of the pod behind it. Pod chains *return* to
//!   allow, so same-node traffic passes both checks; they `drop` to deny.
//! * `input` (a pod talking to its own node) accepts IPv6 neighbour discovery first (the
//!   pods' default IPv6 route is via the node's link-local address; its source is often the
//!   pod's link-local address, and it is never forwarded), then runs the pod's egress
//!   chain: source check, established, policy.
//! * There is no `output` chain: traffic the node itself (kubelet probes, host-network pods)
//!   sends to its local pods is always allowed, as docs/design.md specifies. Replies of pods
//!   to it are `established`.
//! * Per pod and direction an entry chain (`egress/NS/NAME`, `ingress/NS/NAME`). The
//!   egress entry chain starts with the source check and `ct state established,related
//!   accept` (above). Then, if the pod has an Admin list, `goto admin-DIRECTION/<list id>`;
//!   else `goto` where its rest goes: the rest chain `DIRECTION-rest/NS/NAME` if the pod is
//!   isolated (the NetworkPolicy allow rules, then a default-deny counter + drop), else the
//!   Baseline list's chain `baseline-DIRECTION/<list id>`; with neither the chain ends,
//!   which returns (allows).
//! * Tier lists are shared chains (issue 11): the compiler shares each Admin and Baseline
//!   list between every pod that the same tiered policies select alike, and each list
//!   renders once per node and direction, named by its id, whatever the number of pods
//!   that use it, so the table grows with pods plus tiered rules, not their product. An
//!   Admin chain: Allow → counter + `return` (the pod's entry chain went there by `goto`,
//!   so the return goes straight back to the base chain: allowed in this direction), Deny
//!   → counter + drop, Pass → counter + `goto pass-DIRECTION`; at its end, as the only
//!   rule of `pass-DIRECTION`, the rest-dispatch lookup `iifname vmap
//!   @egress_rest_dispatch` (`oifname vmap @ingress_rest_dispatch`), whose elements are
//!   `"IFNAME" : goto <where that pod's rest goes>` (the rest chain, or the Baseline chain).
//!   The lookup is keyed by the interface the base chain dispatched on, so it finds the pod
//!   the chain runs for; a pod with nothing after its Admin tier has no element, the lookup
//!   misses, and the chain's end returns (allowed). That is why Pass has a chain of its
//!   own: a lookup that misses ends only its rule, and a Pass must not go on with the
//!   Admin rules after it. A Baseline chain: Deny → counter + drop, Allow and Pass →
//!   counter + `return`, its end returns. Every step is a `goto` from the `jump` of the
//!   base chain's dispatch, so any `return` lands in the base chain and the jump stack
//!   never grows past one. A direction with an audit list keeps its tiers in the pod's own
//!   chains (Admin rules in the entry chain, Pass → `goto` the rest chain, the Baseline
//!   tier in the rest chain): there an allow is `goto audit-…`, not `return`.
//! * A shared list with at least [`classes::CLASSES_FROM`] peer tests renders through its
//!   address classes ([`classes`]): the list's peer groups cut the address space into
//!   intervals that lie in the same groups, and the list's chain starts with one lookup
//!   per family, `ip daddr vmap @<chain>/classes_4` (`saddr` for ingress), whose elements
//!   are `<interval> : goto <chain>/c-<hash of the class's groups>_4`. A class chain holds
//!   the list's instances that can match a peer of the class, in list order, each without
//!   its peer test (a named port keeps its set test), and ends as the list's chain does; a
//!   peer in no class (or of a family without classes) goes on with the list's chain,
//!   which then holds the instances without a peer test. The first matching instance is
//!   the same as in one chain, so verdicts and counters are too; a new flow walks one
//!   lookup and the rules that can match its peer instead of all of them (2,500 rules a
//!   list: from 6-9 % of the connection rate without policy to 92-96 %). A list renders as
//!   one chain when its groups spell more than [`classes::MAX_RANGES`] ranges (cutting
//!   costs their number at every change of their members) or when its class chains would
//!   hold more than about four copies of each instance (groups overlapping in many ways).
//!   Members joining or leaving change the maps' intervals over netlink, like host sets.
//!   A map of many pieces renders instead as hash maps of prefixes, one per length
//!   (`<chain>/classes_4/32`, `<chain>/classes_4/24`, looked up as `ip daddr vmap @…/32`,
//!   `ip daddr & 255.255.255.0 vmap @…/24`), when fewer lookups than the binary search's
//!   steps cover its pieces ([`classes::prefix_maps`]): the kernel's interval lookup is
//!   a binary search of about 30 ns a step, a hash lookup costs the same at any size.
//! * A pod without a known interface has no chains and no dispatch elements. An interface
//!   whose name matches a pod interface pattern ([`DEFAULT_POD_INTERFACE_PATTERNS`]) and
//!   that is not an enforced pod's (not a key of `egress_dispatch`) is dropped both ways,
//!   counted as `unknown-interface`, before anything established is accepted: a pod whose
//!   interface comes up before the agent has its rules sends and receives nothing until
//!   its rules are in force, and a flow it started earlier does not live on as
//!   `established`. An empty pattern list (`unknown_pod_interfaces: allow`) fails open.
//! * A TCP segment of an enforced pod that conntrack takes as new without a SYN (a
//!   mid-stream pickup, after the agent deleted the entry of a flow the rules deny) is
//!   dropped ([`BaseStatement::TcpPickup`]), so that a cut connection stays cut.
//! * Peers are named sets, one per address group and family (`g-…_4`, `g-…_6`), shared
//!   by every rule and pod that uses them: host groups (pods' and nodes' addresses) are
//!   plain hash sets of single addresses with a `size` ([`host_set_size`]). CIDR groups
//!   (`ipBlock`, `networks`) whose prefix cover has few lengths are one sized hash set of
//!   network addresses per length (`g-…_4/24`), matched through the length's mask, one
//!   rule per length ([`prefixes`]); other CIDR groups are interval sets. A set's name
//!   fixes its kind; if a set's type differs anyway, or a hash set outgrows its size, the
//!   incremental plan gives way to a full replacement. Egress named ports are sets of
//!   `address . inet_proto . inet_service`. Ports are matched per protocol: a clause with
//!   TCP and UDP ports renders one rule per protocol (`meta l4proto tcp … th dport { 80,
//!   8000-8100 }`). A clause with several groups renders one rule per group and family
//!   (sharing the group's set instead of making a per-rule union).
//! * Every compiled rule has a named counter (its rule id, shared across pods); isolated
//!   pods have `deny-ingress/…`/`deny-egress/…` counters. A shared tier chain's rule
//!   counts in that counter exactly what the per-pod copies counted together before:
//!   counters are per policy rule, not per pod. Per-pod attribution of a tier rule's
//!   denials comes from the flow log, whose line names the rule (its `log/RULE` chain's
//!   prefix) and both ends, with the local pod by name.

pub mod classes;
mod counters;
pub mod json;
pub mod model;
pub mod prefixes;
pub mod text;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_policy::model::{Action, Direction, PodKey, Protocol};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortRange, RuleInstance, TierList,
};

pub use model::*;

/// Each local pod's host-side interface name.
pub type Interfaces = BTreeMap<PodKey, String>;

/// Interface names of pods by common CNIs: bridge/ptp/flannel/kindnet `veth…`, Calico
/// `cali…`, Cilium `lxc…`, AWS VPC CNI `eni…`, GKE `gke…`, Azure `azv…`, and the lab's
/// own (`palisade-netlab`) `pv…`.
pub const DEFAULT_POD_INTERFACE_PATTERNS: &[&str] =
    &["veth*", "cali*", "lxc*", "eni*", "gke*", "azv*", "pv*"];

/// Why a pod interface pattern is refused.
pub fn check_pod_interface_pattern(pattern: &str) -> Result<(), String> {
    let stem = pattern.strip_suffix('*').unwrap_or(pattern);
    if stem.is_empty() {
        return Err(format!(
            "pod interface pattern {pattern:?} matches every interface (the node's uplink too)"
        ));
    }
    if pattern.len() > MAX_IFNAME
        || !stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!("pod interface pattern {pattern:?} is not an interface name (letters, digits, '-', '_', '.', at most {MAX_IFNAME} characters) with an optional trailing '*'"));
    }
    Ok(())
}

/// Longest pod part of a chain or counter name before it is replaced by a hash.
const MAX_POD_PART: usize = 48;
/// Longest group or rule id accepted (the contract says `g-`/`r-` + 16 hex digits).
const MAX_ID: usize = 64;
/// Most addresses a host group (pods', nodes') may expand to. Host groups are expanded
/// into single elements; a cluster has far fewer pods than this, so more means a bogus
/// rule set, refused rather than allowed to exhaust memory.
pub const MAX_HOSTS_PER_GROUP: u128 = 1_000_000;
/// Linux interface names are at most 15 bytes.
const MAX_IFNAME: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("group id {0:?} is not a valid nftables name (letters, digits, '-' and '_', at most {MAX_ID} characters)")]
    BadGroupId(String),
    #[error("rule id {0:?} is not a valid nftables name (letters, digits, '-' and '_', at most {MAX_ID} characters)")]
    BadRuleId(String),
    #[error("tier list id {0:?} is not a valid nftables name (letters, digits, '-' and '_', at most {MAX_ID} characters)")]
    BadListId(String),
    #[error("two different tier lists have the same id {0:?}")]
    ListIdCollision(String),
    #[error("host group {group} holds {count} addresses, more than the {MAX_HOSTS_PER_GROUP} one node can load as single elements")]
    TooManyHosts { group: String, count: u128 },
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        // Bytes, not chars: those of a non-ASCII char fail the test alike.
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' && c != '/')
}

/// FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`.
fn fnv64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `NS/NAME` where that is short and made of name characters, else a stable hash.
pub fn pod_part(pod: &PodKey) -> String {
    let plain = format!("{}/{}", pod.namespace, pod.name);
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    };
    if plain.len() <= MAX_POD_PART && ok(&pod.namespace) && ok(&pod.name) {
        plain
    } else {
        format!("h-{:016x}", fnv64(&plain))
    }
}

pub fn entry_chain(pod: &PodKey, direction: Direction) -> String {
    format!("{}/{}", direction.as_str(), pod_part(pod))
}

pub fn rest_chain(pod: &PodKey, direction: Direction) -> String {
    format!("{}-rest/{}", direction.as_str(), pod_part(pod))
}

/// The shared chain of an Admin tier list in one direction: `admin-egress/l-…`, one per
/// node whatever the number of pods that use the list.
pub fn admin_chain(direction: Direction, list: &str) -> String {
    format!("admin-{}/{list}", direction.as_str())
}

/// The shared chain of a Baseline tier list in one direction: `baseline-ingress/l-…`.
pub fn baseline_chain(direction: Direction, list: &str) -> String {
    format!("baseline-{}/{list}", direction.as_str())
}

/// The chain a Pass of a shared Admin chain goes to: the rest-dispatch lookup alone, so
/// that a pod without a rest chain (the lookup misses) returns, allowed, instead of going
/// on with the Admin rules after the Pass.
pub fn pass_chain(direction: Direction) -> String {
    format!("pass-{}", direction.as_str())
}

/// The chains that evaluate a pod's full view (audit) of one direction where the enforced
/// rules allow: `audit-egress/NS/NAME` and its rest chain.
pub fn audit_entry_chain(pod: &PodKey, direction: Direction) -> String {
    format!("audit-{}", entry_chain(pod, direction))
}

pub fn audit_rest_chain(pod: &PodKey, direction: Direction) -> String {
    format!("audit-{}", rest_chain(pod, direction))
}

/// The counter of the would-deny decisions of `counter` (a rule id or a default deny) in an
/// audit chain.
pub fn audit_counter(counter: &str) -> String {
    format!("{AUDIT_PREFIX}{counter}")
}

pub const AUDIT_PREFIX: &str = "audit/";

pub fn default_deny_counter(pod: &PodKey, direction: Direction) -> String {
    format!("deny-{}/{}", direction.as_str(), pod_part(pod))
}

pub fn spoof_counter(pod: &PodKey) -> String {
    format!("spoof/{}", pod_part(pod))
}

/// The flow log's part of the table: each drop of a compiled rule, a default deny or the
/// source check goes to a chain `log/COUNTER` (the deny rule keeps its own counter) that
/// sends the packet to NFLOG group `group`, at most `per_second` a second and `burst` at
/// once per chain (a token bucket in the kernel, so a flood cannot swamp the agent), and
/// drops it. What the limit holds back is dropped all the same and counted in
/// [`FLOW_LOG_SUPPRESSED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLog {
    pub group: u16,
    pub per_second: u32,
    pub burst: u32,
}

pub const FLOW_LOG_SUPPRESSED: &str = "flow-log-suppressed";

pub fn log_chain(counter: &str) -> String {
    format!("log/{counter}")
}

/// The NFLOG prefix that names `counter` in a logged packet (the kernel keeps 127 bytes).
pub fn log_prefix(counter: &str) -> String {
    if counter.len() <= 127 {
        counter.to_string()
    } else {
        format!("h-{:016x}", fnv64(counter))
    }
}

/// `rules` with each counted drop sent through its flow-log chain, created in `out`.
fn through_flow_log(
    out: &mut Ruleset,
    mut rules: Vec<RuleDef>,
    log: Option<FlowLog>,
) -> Vec<RuleDef> {
    let Some(log) = log else { return rules };
    for rule in &mut rules {
        let (Verdict::Drop, Some(counter)) = (&rule.verdict, &rule.counter) else {
            continue;
        };
        rule.verdict = Verdict::Goto(flow_log_chain(out, counter, log, Verdict::Drop));
    }
    rules
}

/// The chain `log/COUNTER` in `out`: NFLOG within the rate limit, then `end` (drop, or
/// return for an audit chain's would-deny) either way.
fn flow_log_chain(out: &mut Ruleset, counter: &str, log: FlowLog, end: Verdict) -> String {
    let chain = log_chain(counter);
    out.chains.entry(chain.clone()).or_insert_with(|| {
        let (prefix, group) = (log_prefix(counter), log.group);
        let logged = match end {
            Verdict::Drop => Verdict::LogDrop { prefix, group },
            _ => Verdict::LogReturn { prefix, group },
        };
        Arc::new(vec![
            RuleDef {
                matches: vec![Match::Limit {
                    per_second: log.per_second,
                    burst: log.burst,
                }],
                counter: None,
                verdict: logged,
            },
            RuleDef {
                matches: vec![],
                counter: Some(FLOW_LOG_SUPPRESSED.into()),
                verdict: end,
            },
        ])
    });
    chain
}

/// An audit chain's rules as they run: each drop (what the full view would deny) counts in
/// its audit counter (`audit/COUNTER`), goes to the flow log as "would deny" through a
/// chain `log/audit/COUNTER` of its own (rate-limited like the others), and returns, so the
/// enforced decision (allow) stands. Other rules count nothing: their hits are not what
/// the enforced table did.
fn through_audit_log(
    out: &mut Ruleset,
    origins: &BTreeMap<String, palisade_policy::model::RuleOrigin>,
    mut rules: Vec<RuleDef>,
    log: Option<FlowLog>,
) -> Vec<RuleDef> {
    for rule in &mut rules {
        if rule.verdict != Verdict::Drop {
            if rule
                .counter
                .as_ref()
                .is_some_and(|c| !c.starts_with(AUDIT_PREFIX))
            {
                rule.counter = None;
            }
            continue;
        }
        let Some(counter) = rule.counter.clone() else {
            rule.verdict = Verdict::Return;
            continue;
        };
        let counter = if counter.starts_with(AUDIT_PREFIX) {
            counter
        } else {
            let name = audit_counter(&counter);
            let meta = CounterMeta::Rule {
                id: counter.clone(),
                origin: origins.get(&counter).cloned(),
            };
            out.counters_mut()
                .entry(name.clone())
                .or_insert_with(|| CounterMeta::Audit(Box::new(meta)));
            name
        };
        rule.counter = Some(counter.clone());
        let Some(log) = log else {
            rule.verdict = Verdict::Return;
            continue;
        };
        rule.verdict = Verdict::Goto(flow_log_chain(out, &counter, log, Verdict::Return));
    }
    rules
}

pub fn group_set(group: &str, family: IpFamily) -> String {
    format!("{group}{}", family.suffix())
}

/// The set of a CIDR group's prefixes of one length: `g-…_4/24`. A `/` cannot occur in a
/// group id, so these names never collide with another group's sets.
pub fn prefix_set(group: &str, family: IpFamily, len: u8) -> String {
    format!("{}/{len}", group_set(group, family))
}

/// The name of a group's set of this kind.
fn set_name(group: &str, kind: SetKind) -> String {
    match kind {
        SetKind::Prefixes(family, len) => prefix_set(group, family, len),
        _ => group_set(group, kind.family()),
    }
}

/// Renders the table for `rules`, enforcing the pods that have an interface in
/// `interfaces`. A pod whose interface is already taken by an earlier pod (a stale entry
/// while a pod moves) is left out with a warning.
pub fn render(rules: &NodeRuleSet, interfaces: &Interfaces) -> Result<Ruleset, RenderError> {
    Renderer::default().render(rules, interfaces)
}

use counters::{Additions, CounterMap, CounterMaps, Put};

/// The sets a group renders to: (kind, elements) per family, empty ones included.
type GroupSets = Vec<(SetKind, Arc<[SetElement]>)>;

/// Renders repeatedly, keeping each group's rendered sets until the group changes, so a
/// change of one group costs that group (expanding 150,000 addresses every time cost more
/// than the whole kernel transaction of a one-address change). The agent keeps one.
pub struct Renderer {
    /// Pod interface patterns ([`DEFAULT_POD_INTERFACE_PATTERNS`]) whose unenforced
    /// interfaces are dropped; empty: they pass (fail open).
    patterns: Vec<String>,
    /// Group id → (the group it was rendered from, its sets). Holding the `Arc` keeps the
    /// pointer from being reused by another group while the entry lives.
    groups: HashMap<String, (Arc<Group>, GroupSets)>,
    /// Each pod's rendered chains, valid while the sets (names and kinds: what a rule can
    /// refer to) stay as in `shapes`.
    pods: HashMap<PodKey, RenderedPod>,
    /// Each shared tier chain (by name) rendered, valid like `pods`.
    lists: HashMap<String, RenderedList>,
    shapes: BTreeMap<String, SetKind>,
    flow_log: Option<FlowLog>,
    /// The counters of the last render and the rule origins they were labelled from
    /// (whose ids were checked): while none goes and the origins stay, they are handed on,
    /// with what new pods and lists add (rebuilding 10,000 rule counters cost more than
    /// the rest of a one-address render).
    counters: CounterMaps,
    counters_from: Option<Arc<BTreeMap<String, palisade_policy::model::RuleOrigin>>>,
    /// The rules only audit lists referenced in the last render (their origins make no
    /// counter).
    audit_only: BTreeSet<String>,
    /// Shared lists with at least this many peer tests render through address classes
    /// ([`classes`]).
    classes_from: usize,
    /// Most prefix lengths a class map is split into ([`classes::prefix_maps`]).
    class_map_lengths: usize,
}

/// What one shared tier chain rendered to, and from what.
struct RenderedList {
    list: Arc<TierList>,
    /// The chain, its class chains, the flow-log chains their drops go to and the pass
    /// chain they go to.
    chains: Vec<(String, Arc<Vec<RuleDef>>)>,
    /// Its class maps.
    sets: Vec<(String, SetDef)>,
    /// What its classes were cut from, if it is long enough to have them.
    deps: Option<classes::Deps>,
    rule_ids: Vec<String>,
}

impl RenderedList {
    fn copy_into(&self, out: &mut Ruleset) {
        for (name, rules) in &self.chains {
            out.chains.insert(name.clone(), rules.clone());
        }
        for (name, set) in &self.sets {
            out.sets.insert(name.clone(), set.clone());
        }
    }

    fn insert_counters(&self, counters: &mut CounterMap) {
        insert_rule_counters(counters, &self.rule_ids);
    }

    /// Whether this render is still what `list` renders to with `rules`' groups.
    fn holds(&self, list: &Arc<TierList>, rules: &NodeRuleSet) -> bool {
        same_list(&self.list, list) && self.deps.as_ref().is_none_or(|d| d.hold(rules))
    }

    /// What [`render_shared`] put into `out` for the list's chain `name`; `before`: the
    /// list's previous render, whose rule counters hold if its chains all do.
    fn extract(
        out: &Ruleset,
        name: &str,
        list: &Arc<TierList>,
        shared: SharedRender,
        before: Option<&RenderedList>,
    ) -> RenderedList {
        let mut chains = Vec::new();
        let mut sets = Vec::new();
        for map in &shared.maps {
            let Some(set) = out.sets.get(map) else {
                continue;
            };
            let mut targets: Vec<&String> = set
                .elements
                .iter()
                .filter_map(|e| match e {
                    SetElement::Class { chain, .. } => Some(chain),
                    _ => None,
                })
                .collect();
            targets.sort();
            targets.dedup();
            for target in targets {
                chain_with_targets(out, target, &mut chains);
            }
            sets.push((map.clone(), set.clone()));
        }
        chain_with_targets(out, name, &mut chains);
        let same_chains = |b: &RenderedList| {
            b.chains.len() == chains.len()
                && b.chains
                    .iter()
                    .zip(&chains)
                    .all(|((n, r), (m, s))| n == m && Arc::ptr_eq(r, s))
        };
        let rule_ids = match before {
            Some(b) if same_chains(b) => b.rule_ids.clone(),
            // Reused chains count in the rule counters they counted in before.
            Some(b) => rule_counters(out, &chains, &b.rule_ids),
            None => rule_counters(out, &chains, &[]),
        };
        RenderedList {
            list: list.clone(),
            rule_ids,
            chains,
            sets,
            deps: shared.deps,
        }
    }
}

/// `name`'s rules in `out` with those of the shared chains its rules go to (flow-log
/// chains, the pass chain), into `chains`.
fn chain_with_targets(out: &Ruleset, name: &str, chains: &mut Vec<(String, Arc<Vec<RuleDef>>)>) {
    let Some(rules) = out.chains.get(name) else {
        return;
    };
    for rule in rules.iter() {
        if let Verdict::Goto(target) = &rule.verdict {
            let shared = target.starts_with("log/") || target.starts_with("pass-");
            if let Some(chain) = out.chains.get(target).filter(|_| shared) {
                chains.push((target.clone(), chain.clone()));
            }
        }
    }
    chains.push((name.to_string(), rules.clone()));
}

/// The rule counters (not audit, not a pod's own) that `chains` count in: those `out`
/// has as rule counters, or that `known` (sorted) names.
fn rule_counters(
    out: &Ruleset,
    chains: &[(String, Arc<Vec<RuleDef>>)],
    known: &[String],
) -> Vec<String> {
    let mut ids: Vec<String> = chains
        .iter()
        .flat_map(|(_, rules)| rules.iter())
        .filter_map(|rule| rule.counter.as_ref())
        .filter(|c| {
            matches!(out.counters.get(*c), Some(CounterMeta::Rule { .. }))
                || known.binary_search(c).is_ok()
        })
        .cloned()
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The counters of `ids` without an origin, where the rule set gave none.
fn insert_rule_counters(counters: &mut CounterMap, ids: &[String]) {
    for id in ids {
        // Looked up first: most are there already, and `entry` would clone the key.
        if !counters.contains_key(id) {
            let meta = CounterMeta::Rule {
                id: id.clone(),
                origin: None,
            };
            counters.insert(id.clone(), meta);
        }
    }
}

/// What one pod rendered to, and from what.
struct RenderedPod {
    ifname: String,
    ips: Vec<IpAddr>,
    ingress: Arc<DirectionRules>,
    egress: Arc<DirectionRules>,
    audit: palisade_policy::AuditRules,
    chains: Vec<(String, Arc<Vec<RuleDef>>)>,
    /// The pod's own counters (anti-spoofing, default deny).
    counters: Vec<(String, CounterMeta)>,
    /// Rule ids whose counters rendering the pod creates when the rule set has no origin
    /// for them.
    rule_ids: Vec<String>,
    /// (direction, entry chain) of the dispatch elements.
    dispatch: Vec<(Direction, String)>,
    /// (direction, rest chain) of the rest-dispatch elements.
    rest_dispatch: Vec<(Direction, String)>,
}

impl RenderedPod {
    fn rendered_from(&self, pod: &PodRules, ifname: &str) -> bool {
        let same = |a: &Arc<DirectionRules>, b: &Arc<DirectionRules>| Arc::ptr_eq(a, b) || a == b;
        self.ifname == ifname
            && self.ips == pod.ips
            && same(&self.ingress, &pod.ingress)
            && same(&self.egress, &pod.egress)
            && self.audit == pod.audit
    }

    fn copy_into(&self, out: &mut Ruleset) {
        for (name, rules) in &self.chains {
            out.chains.insert(name.clone(), rules.clone());
        }
        for (direction, entry) in &self.dispatch {
            out.dispatch_mut(*direction)
                .insert(self.ifname.clone(), entry.clone());
        }
        for (direction, rest) in &self.rest_dispatch {
            out.rest_dispatch_mut(*direction)
                .insert(self.ifname.clone(), rest.clone());
        }
    }

    fn insert_counters(&self, counters: &mut CounterMap) {
        for (name, meta) in &self.counters {
            counters.insert(name.clone(), meta.clone());
        }
        insert_rule_counters(counters, &self.rule_ids);
    }

    /// Reads back what [`render_pod`] put into `out` for this pod (its names are fixed
    /// by the pod's key).
    fn extract(out: &Ruleset, pod: &PodRules, key: &PodKey, ifname: &str) -> RenderedPod {
        let mut chains = Vec::new();
        let mut counters = Vec::new();
        let mut dispatch = Vec::new();
        let mut rest_dispatch = Vec::new();
        for direction in [Direction::Egress, Direction::Ingress] {
            let names = [
                entry_chain(key, direction),
                rest_chain(key, direction),
                audit_entry_chain(key, direction),
                audit_rest_chain(key, direction),
            ];
            for name in names {
                if let Some(rules) = out.chains.get(&name) {
                    // The audit counters its would-deny decisions count in.
                    for rule in rules.iter() {
                        if let Some(c) = rule
                            .counter
                            .as_ref()
                            .filter(|c| c.starts_with(AUDIT_PREFIX))
                        {
                            if let Some(meta) = out.counters.get(c) {
                                counters.push((c.clone(), meta.clone()));
                            }
                        }
                    }
                    // With the flow-log chains its drops go to (shared with other pods).
                    chain_with_targets(out, &name, &mut chains);
                }
            }
            let entry = entry_chain(key, direction);
            if out.dispatch(direction).get(ifname) == Some(&entry) {
                dispatch.push((direction, entry));
            }
            if let Some(rest) = out.rest_dispatch(direction).get(ifname) {
                rest_dispatch.push((direction, rest.clone()));
            }
            let deny = default_deny_counter(key, direction);
            if let Some(meta) = out.counters.get(&deny) {
                counters.push((deny, meta.clone()));
            }
        }
        let spoof = spoof_counter(key);
        if let Some(meta) = out.counters.get(&spoof) {
            counters.push((spoof, meta.clone()));
        }
        RenderedPod {
            rule_ids: rule_counters(out, &chains, &[]),
            ifname: ifname.to_string(),
            ips: pod.ips.clone(),
            ingress: pod.ingress.clone(),
            egress: pod.egress.clone(),
            audit: pod.audit.clone(),
            chains,
            counters,
            dispatch,
            rest_dispatch,
        }
    }
}

impl Default for Renderer {
    fn default() -> Self {
        Renderer::with_pod_interface_patterns(
            DEFAULT_POD_INTERFACE_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect(),
        )
    }
}

impl Renderer {
    /// A renderer dropping unenforced interfaces that match `patterns` (checked with
    /// [`check_pod_interface_pattern`]; the agent's configuration refuses bad ones, and
    /// one that slips through here is left out with a warning).
    pub fn with_pod_interface_patterns(patterns: Vec<String>) -> Renderer {
        let patterns = patterns
            .into_iter()
            .filter(|p| match check_pod_interface_pattern(p) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "pod interface pattern left out");
                    false
                }
            })
            .collect();
        Renderer {
            patterns,
            groups: HashMap::new(),
            pods: HashMap::new(),
            lists: HashMap::new(),
            shapes: BTreeMap::new(),
            flow_log: None,
            counters: CounterMaps::default(),
            counters_from: None,
            audit_only: BTreeSet::new(),
            classes_from: classes::CLASSES_FROM,
            class_map_lengths: classes::MAX_MAP_LENGTHS,
        }
    }

    /// Shared lists with at least `n` rule instances that test the peer render through
    /// address classes (default [`classes::CLASSES_FROM`]; 0 or 1: every list with one;
    /// `usize::MAX`: none).
    pub fn set_classes_from(&mut self, n: usize) {
        if self.classes_from != n {
            self.forget_renders();
            self.classes_from = n;
        }
    }

    /// Class maps are split into hash maps of at most `n` prefix lengths (default
    /// [`classes::MAX_MAP_LENGTHS`]; 0: every class map is one interval map).
    pub fn set_class_map_lengths(&mut self, n: usize) {
        if self.class_map_lengths != n {
            self.forget_renders();
            self.class_map_lengths = n;
        }
    }

    /// The default renderer whose tables send denied packets to the flow log ([`FlowLog`]).
    pub fn with_flow_log(log: FlowLog) -> Renderer {
        let mut r = Renderer::default();
        r.set_flow_log(Some(log));
        r
    }

    /// Turns the flow log on or off for the next renders.
    pub fn set_flow_log(&mut self, log: Option<FlowLog>) {
        if self.flow_log != log {
            self.forget_renders();
            self.flow_log = log;
        }
    }

    /// Drops what the next render could reuse of pods, lists and counters: every pod and
    /// list renders anew, and the counters are rebuilt.
    fn forget_renders(&mut self) {
        self.pods.clear();
        self.lists.clear();
        self.counters_from = None;
    }

    /// As [`render`], reusing the sets of groups that did not change since the last call.
    pub fn render(
        &mut self,
        rules: &NodeRuleSet,
        interfaces: &Interfaces,
    ) -> Result<Ruleset, RenderError> {
        let mut out = Ruleset {
            base_chains: base_chains(&self.patterns),
            ..Ruleset::default()
        };
        let flow_log = self.flow_log;
        let classes_from = (self.classes_from, self.class_map_lengths);
        let mut cache = HashMap::with_capacity(rules.groups.len());
        for (id, group) in &rules.groups {
            if !valid_id(id) {
                return Err(RenderError::BadGroupId(id.clone()));
            }
            let sets = match self.groups.remove(id.as_str()) {
                // Same allocation, or an equal group from a reloaded rule set: comparing
                // ranges is much cheaper than expanding them.
                Some((old, sets)) if Arc::ptr_eq(&old, group) || *old == **group => sets,
                _ => group_sets(id, group)?
                    .into_iter()
                    .map(|(kind, elements)| (kind, Arc::from(elements)))
                    .collect(),
            };
            for (kind, elements) in &sets {
                if elements.is_empty() {
                    continue;
                }
                let size = matches!(kind, SetKind::Hosts(_) | SetKind::Prefixes(..))
                    .then(|| host_set_size(elements.len()));
                out.sets.insert(
                    set_name(id, *kind),
                    SetDef {
                        kind: *kind,
                        elements: elements.clone(),
                        size,
                    },
                );
            }
            cache.insert(id.to_string(), (group.clone(), sets));
        }
        self.groups = cache;
        let shapes: BTreeMap<String, SetKind> =
            out.sets.iter().map(|(n, s)| (n.clone(), s.kind)).collect();
        if shapes != self.shapes {
            // A rule's matches depend on which sets exist: render every pod anew.
            self.forget_renders();
            self.shapes = shapes;
        }
        // Compared once, by pointer first: comparing 10,000 origins costs more than the rest
        // of a one-pod render.
        let same_origins = self
            .counters_from
            .as_ref()
            .is_some_and(|from| Arc::ptr_eq(from, &rules.rules) || **from == *rules.rules);
        let mut pods = HashMap::with_capacity(rules.pods.len());
        let mut lists: HashMap<String, RenderedList> = HashMap::new();
        let mut changes = Changes::default();
        let out = render_rest(
            out,
            rules,
            interfaces,
            !same_origins,
            |out, pod, key, ifname| {
                match self.pods.remove(key) {
                    Some(cached) if cached.rendered_from(pod, ifname) => {
                        cached.copy_into(out);
                        pods.insert(key.clone(), cached);
                    }
                    cached => {
                        if cached.is_some() {
                            changes.replaced = true;
                        } else {
                            changes.pods.push(key.clone());
                        }
                        render_pod(out, rules, pod, key, ifname, flow_log)?;
                        pods.insert(key.clone(), RenderedPod::extract(out, pod, key, ifname));
                    }
                }
                // The shared tier chains it goes to, each rendered once.
                for (tier, direction, list) in shared_lists(pod) {
                    let id = list.id();
                    if !valid_id(id) {
                        return Err(RenderError::BadListId(id.to_string()));
                    }
                    let name = tier.chain(direction, id);
                    if let Some(done) = lists.get(&name) {
                        if !same_list(&done.list, list) {
                            return Err(RenderError::ListIdCollision(id.to_string()));
                        }
                        continue;
                    }
                    let rendered = match self.lists.remove(&name) {
                        Some(cached) if cached.holds(list, rules) => {
                            cached.copy_into(out);
                            cached
                        }
                        cached => {
                            // The same list with other members: its classes' chains hold.
                            let previous: HashMap<&str, &Arc<Vec<RuleDef>>> = cached
                                .iter()
                                .filter(|c| same_list(&c.list, list))
                                .flat_map(|c| c.chains.iter().map(|(n, r)| (n.as_str(), r)))
                                .collect();
                            let shared = render_shared(
                                out,
                                rules,
                                (tier, direction, list),
                                flow_log,
                                classes_from,
                                &previous,
                            )?;
                            let rendered =
                                RenderedList::extract(out, &name, list, shared, cached.as_ref());
                            // Counters change only with the rules a list counts in.
                            match cached {
                                None => changes.lists.push(name.clone()),
                                Some(c) if c.rule_ids != rendered.rule_ids => {
                                    changes.replaced = true
                                }
                                Some(_) => {}
                            }
                            rendered
                        }
                    };
                    lists.insert(name, rendered);
                }
                Ok(())
            },
        );
        let Ok(mut out) = out else {
            self.forget_renders();
            return out;
        };
        // What is left in the caches rendered last time and not now.
        changes.replaced |= !self.pods.is_empty() || !self.lists.is_empty();
        let audit_only = audit_only_rules(rules);
        let same_audit_only = audit_only.iter().eq(self.audit_only.iter());
        out.counters = if same_origins && same_audit_only && !changes.replaced {
            self.counters
                .add(changes.additions(&out.counters, &pods, &lists))
        } else {
            let counters = self.counters_anew(out.counters, rules, &audit_only, &pods, &lists);
            if !same_audit_only {
                self.audit_only = audit_only.iter().map(|id| id.to_string()).collect();
            }
            counters
        };
        // Equal or the same: held, so that the next render of these origins finds them by
        // pointer.
        self.counters_from = Some(rules.rules.clone());
        out.counter_lineage = self.counters.lineage();
        self.pods = pods;
        self.lists = lists;
        Ok(out)
    }

    /// The counters of a render built from its own (`rendered`: those of what rendered
    /// anew) and the cached pods' and lists'.
    fn counters_anew(
        &mut self,
        mut rendered: Arc<CounterMap>,
        rules: &NodeRuleSet,
        audit_only: &BTreeSet<&str>,
        pods: &HashMap<PodKey, RenderedPod>,
        lists: &HashMap<String, RenderedList>,
    ) -> Arc<CounterMap> {
        let counters = Arc::make_mut(&mut rendered);
        if self.flow_log.is_some() {
            counters.insert(FLOW_LOG_SUPPRESSED.into(), CounterMeta::FlowLogSuppressed);
        }
        if !self.patterns.is_empty() {
            counters.insert(
                UNKNOWN_INTERFACE_COUNTER.to_string(),
                CounterMeta::UnknownInterface,
            );
        }
        insert_origin_counters(counters, rules, audit_only);
        for pod in pods.values() {
            pod.insert_counters(counters);
        }
        for list in lists.values() {
            list.insert_counters(counters);
        }
        if *rendered != **self.counters.current() {
            self.counters.replace(rendered);
        }
        self.counters.current().clone()
    }
}

/// What a render added to and changed of the last one's pods and lists.
#[derive(Default)]
struct Changes {
    /// Pods rendered that the last render did not have.
    pods: Vec<PodKey>,
    /// Shared lists rendered that the last render did not have.
    lists: Vec<String>,
    /// Whether a pod or list went, or rendered anew with other counters.
    replaced: bool,
}

impl Changes {
    /// What the new pods and lists add to the last render's counters, in the order a
    /// render anew makes them: those `rendered` made (each holds, as it comes before the
    /// origins), the new pods' own ones (each replaces), then their rule counters.
    fn additions(
        &self,
        rendered: &CounterMap,
        pods: &HashMap<PodKey, RenderedPod>,
        lists: &HashMap<String, RenderedList>,
    ) -> Additions {
        let mut additions = Additions::default();
        for (name, meta) in rendered {
            additions.push(name, meta, Put::IfAbsent);
        }
        let new_pods: Vec<&RenderedPod> = self.pods.iter().map(|key| &pods[key]).collect();
        for pod in &new_pods {
            for (name, meta) in &pod.counters {
                additions.push(name, meta, Put::Over);
            }
        }
        for pod in new_pods {
            additions.push_rule_ids(&pod.rule_ids);
        }
        for name in &self.lists {
            additions.push_rule_ids(&lists[name].rule_ids);
        }
        additions
    }
}

fn same_list(a: &Arc<TierList>, b: &Arc<TierList>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The tier whose lists render as shared chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SharedTier {
    Admin,
    Baseline,
}

impl SharedTier {
    fn chain(self, direction: Direction, list: &str) -> String {
        match self {
            SharedTier::Admin => admin_chain(direction, list),
            SharedTier::Baseline => baseline_chain(direction, list),
        }
    }
}

/// The shared tier lists a pod's enforced chains go to: in each direction without an
/// audit list, its Admin list (if not empty) and, if it is not isolated there, its
/// Baseline list (if not empty). A direction with an audit list renders its tiers into
/// the pod's own chains, whose allow is a `goto` to the audit chain, not a `return`.
fn shared_lists(pod: &PodRules) -> Vec<(SharedTier, Direction, &Arc<TierList>)> {
    let mut out = Vec::new();
    for direction in [Direction::Egress, Direction::Ingress] {
        if pod.audit.direction(direction).is_some() {
            continue;
        }
        let d = pod.direction(direction);
        if !d.admin.is_empty() {
            out.push((SharedTier::Admin, direction, &d.admin));
        }
        if d.isolated_by.is_empty() && !d.baseline.is_empty() {
            out.push((SharedTier::Baseline, direction, &d.baseline));
        }
    }
    out
}

/// Renders a shared tier chain into `out` ([`shared_rules`]): through its address classes
/// when [`classes::plan`] gives them (class maps and chains, then the list's chain with the
/// lookups and what matches a peer in no class), else as one chain. Chains of `previous`
/// (the same list's last render) are taken over where they are what would render.
fn render_shared(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    (tier, direction, list): (SharedTier, Direction, &TierList),
    flow_log: Option<FlowLog>,
    (classes_from, class_map_lengths): (usize, usize),
    previous: &HashMap<&str, &Arc<Vec<RuleDef>>>,
) -> Result<SharedRender, RenderError> {
    let name = tier.chain(direction, list.id());
    let plan = classes::plan(rules, list, classes_from);
    let mut rendered = SharedRender {
        maps: Vec::new(),
        deps: plan.as_ref().map(|p| p.deps.clone()),
    };
    let classed = plan.and_then(|p| {
        let families = p.families?;
        let names = class_chains(&name, &p.ids, &families)?;
        Some((p.ids, families, names))
    });
    let Some((ids, families, names)) = classed else {
        let chain = shared_rules(out, rules, tier, direction, list.iter(), flow_log)?;
        out.chains.insert(name, Arc::new(chain));
        return Ok(rendered);
    };
    // One lookup per family to the peer's class chain; then what matches a peer in none.
    let mut chain = Vec::new();
    for (fp, chains) in families.iter().zip(&names) {
        let map = class_map(&name, fp.family);
        for (signature, (held, class)) in fp
            .partition
            .signatures
            .iter()
            .zip(fp.instances.iter().zip(chains.iter()))
        {
            if reuse_chain(out, previous, class) {
                continue;
            }
            let holds = |id: &str| {
                signature
                    .binary_search_by(|&g| ids[g].as_str().cmp(id))
                    .is_ok()
            };
            let insts: Vec<RuleInstance> = held
                .iter()
                .map(|&i| classes::for_class(&list[i], holds))
                .collect();
            let rules_of_class = shared_rules(out, rules, tier, direction, insts.iter(), flow_log)?;
            out.chains.insert(class.clone(), Arc::new(rules_of_class));
        }
        // (map, kind, mask, elements): one interval map, or a hash map per prefix length,
        // longest first (pod addresses, the most numerous, are /32s or /128s).
        let maps: Vec<(String, SetKind, Option<u8>, Vec<SetElement>)> =
            match classes::prefix_maps(&fp.partition, fp.family, class_map_lengths) {
                Some(by_length) => by_length
                    .iter()
                    .rev()
                    .map(|(&len, nets)| {
                        let elements = nets
                            .iter()
                            .map(|&(net, class)| SetElement::Class {
                                range: addr_range(fp.family, net, net),
                                chain: chains[class].clone(),
                            })
                            .collect();
                        let mask = (u32::from(len) < fp.family.bits()).then_some(len);
                        let kind = SetKind::ClassPrefixes(fp.family, len);
                        (format!("{map}/{len}"), kind, mask, elements)
                    })
                    .collect(),
                None => {
                    let elements = fp
                        .partition
                        .pieces
                        .iter()
                        .map(|piece| SetElement::Class {
                            range: addr_range(fp.family, piece.lo, piece.hi),
                            chain: chains[piece.class].clone(),
                        })
                        .collect();
                    vec![(map, SetKind::Classes(fp.family), None, elements)]
                }
            };
        for (map, kind, prefix, elements) in maps {
            out.sets.insert(
                map.clone(),
                SetDef {
                    kind,
                    elements: elements.into(),
                    size: None,
                },
            );
            chain.push(RuleDef {
                matches: vec![],
                counter: None,
                verdict: Verdict::ClassDispatch {
                    family: fp.family,
                    end: End::peer_of(direction),
                    map: map.clone(),
                    prefix,
                },
            });
            rendered.maps.push(map);
        }
    }
    // The same lookups as before: the rest of the chain is too.
    let same_start = !chain.is_empty()
        && previous.get(name.as_str()).is_some_and(|old| {
            old.starts_with(&chain) && old.get(chain.len()).is_none_or(|r| !is_class_dispatch(r))
        });
    if same_start && reuse_chain(out, previous, &name) {
        return Ok(rendered);
    }
    let misses: Vec<RuleInstance> = list
        .iter()
        .map(|i| classes::for_class(i, |_| false))
        .collect();
    chain.extend(shared_rules(
        out,
        rules,
        tier,
        direction,
        misses.iter(),
        flow_log,
    )?);
    out.chains.insert(name, Arc::new(chain));
    Ok(rendered)
}

fn is_class_dispatch(rule: &RuleDef) -> bool {
    matches!(rule.verdict, Verdict::ClassDispatch { .. })
}

/// Copies `name` from a previous render of the same list, if it has one, with the shared
/// chains its rules go to: a class chain is a function of the list and the class's
/// groups, not of their members. (Its counters are the previous render's: see
/// [`RenderedList::extract`].)
fn reuse_chain(
    out: &mut Ruleset,
    previous: &HashMap<&str, &Arc<Vec<RuleDef>>>,
    name: &str,
) -> bool {
    let Some(&rules) = previous.get(name) else {
        return false;
    };
    for rule in rules.iter() {
        if let Verdict::Goto(target) = &rule.verdict {
            if let Some(&chain) = previous.get(target.as_str()) {
                out.chains.insert(target.clone(), chain.clone());
            }
        }
    }
    out.chains.insert(name.to_string(), rules.clone());
    true
}

/// What [`render_shared`] made besides the list's chain, and from what.
struct SharedRender {
    /// The class maps (their chains are the targets of their elements).
    maps: Vec<String>,
    /// What the classes depend on, when the list is long enough to have classes.
    deps: Option<classes::Deps>,
}

/// The rules of a shared chain for `insts` in order, ending as the tier ends: Admin:
/// Allow → counter + `return` (the chain is reached by `goto` from the pod's entry chain,
/// so this returns to the base chain: allowed in this direction), Deny → counter + drop,
/// Pass → counter + `goto` the pass chain, and at the end the rest-dispatch lookup: on at
/// the rest chain of the pod whose interface this is, or, without one, the end of the
/// chain, which returns (allows). Baseline (reached by `goto` from a pod's entry chain, or
/// as its rest-dispatch element): Deny → counter + drop, Allow and Pass → counter +
/// `return`, the end returns. Class chains end alike: their map's elements are `goto`.
fn shared_rules<'a>(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    tier: SharedTier,
    direction: Direction,
    insts: impl Iterator<Item = &'a RuleInstance>,
    flow_log: Option<FlowLog>,
) -> Result<Vec<RuleDef>, RenderError> {
    let mut chain = Vec::new();
    for inst in insts {
        let verdict = match (tier, inst.action) {
            (_, Action::Deny) => Verdict::Drop,
            (SharedTier::Admin, Action::Pass) => {
                let pass = pass_chain(direction);
                out.chains.entry(pass.clone()).or_insert_with(|| {
                    Arc::new(vec![RuleDef {
                        matches: vec![],
                        counter: None,
                        verdict: Verdict::RestDispatch(direction),
                    }])
                });
                Verdict::Goto(pass)
            }
            // Pass in the last tier goes on to the default, which allows.
            (_, Action::Allow | Action::Pass) => Verdict::Return,
        };
        chain.extend(instance_rules(out, rules, inst, direction, verdict, true)?);
    }
    if tier == SharedTier::Admin {
        chain.push(RuleDef {
            matches: vec![],
            counter: None,
            verdict: Verdict::RestDispatch(direction),
        });
    }
    Ok(through_flow_log(out, chain, flow_log))
}

/// The class map of a shared chain: `admin-egress/l-…/classes_4`.
fn class_map(chain: &str, family: IpFamily) -> String {
    format!("{chain}/classes{}", family.suffix())
}

/// The chain of one class of a shared chain, named by the class's groups, so that a class
/// keeps its chain when other classes come and go: `admin-egress/l-…/c-<hash>_4`.
fn class_chain(chain: &str, ids: &[String], signature: &[usize], family: IpFamily) -> String {
    let ids: Vec<&str> = signature.iter().map(|&g| ids[g].as_str()).collect();
    format!(
        "{chain}/c-{:016x}{}",
        fnv64(&ids.join(",")),
        family.suffix()
    )
}

/// The names of every family's class chains, as its signatures order them; `None` if two
/// got the same name (a hash collision: the list then renders as one chain).
fn class_chains(
    chain: &str,
    ids: &[String],
    families: &[classes::FamilyPlan],
) -> Option<Vec<Vec<String>>> {
    let mut seen = BTreeSet::new();
    families
        .iter()
        .map(|fp| {
            fp.partition
                .signatures
                .iter()
                .map(|s| {
                    let name = class_chain(chain, ids, s, fp.family);
                    seen.insert(name.clone()).then_some(name)
                })
                .collect()
        })
        .collect()
}

/// Renders the pods of `rules` that have an interface, in order, after checking the
/// rule ids if `check_rule_ids` (not when they are those a render already checked).
fn render_rest(
    mut out: Ruleset,
    rules: &NodeRuleSet,
    interfaces: &Interfaces,
    check_rule_ids: bool,
    mut render_pod: impl FnMut(&mut Ruleset, &PodRules, &PodKey, &str) -> Result<(), RenderError>,
) -> Result<Ruleset, RenderError> {
    if check_rule_ids {
        if let Some(id) = rules.rules.keys().find(|id| !valid_id(id)) {
            return Err(RenderError::BadRuleId(id.clone()));
        }
    }
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    for pod in &rules.pods {
        let key = PodKey::new(&pod.namespace, &pod.name);
        let Some(ifname) = interfaces.get(&key) else {
            continue;
        };
        if !valid_ifname(ifname) {
            tracing::warn!(pod = %key, ifname, "interface name unusable in nftables; pod not enforced");
            continue;
        }
        if !taken.insert(ifname) {
            tracing::warn!(pod = %key, ifname, "interface already used by another pod; pod not enforced until that clears");
            continue;
        }
        render_pod(&mut out, pod, &key, ifname)?;
    }
    Ok(out)
}

/// The labelled counter of every rule of the rule set but those only audit lists
/// reference; over the unlabelled ones that rendering pods and lists made.
fn insert_origin_counters(
    counters: &mut CounterMap,
    rules: &NodeRuleSet,
    audit_only: &BTreeSet<&str>,
) {
    for (id, origin) in rules.rules.iter() {
        if audit_only.contains(id.as_str()) {
            continue;
        }
        counters.insert(
            id.clone(),
            CounterMeta::Rule {
                id: id.clone(),
                origin: Some(origin.clone()),
            },
        );
    }
}

/// Rules that only audit lists reference: they get audit counters (`audit/ID`, for what
/// they would deny), not rule counters, which count what the enforced table did.
fn audit_only_rules(rules: &NodeRuleSet) -> BTreeSet<&str> {
    if rules.pods.iter().all(|p| p.audit.is_empty()) {
        return BTreeSet::new();
    }
    fn ids<'a>(lists: impl Iterator<Item = &'a DirectionRules>) -> BTreeSet<&'a str> {
        lists
            .flat_map(|d| d.instances())
            .map(|i| i.rule.as_str())
            .collect()
    }
    let enforced = ids(rules.pods.iter().flat_map(|p| [&*p.ingress, &*p.egress]));
    let audit = ids(rules
        .pods
        .iter()
        .flat_map(|p| [p.audit.ingress.as_deref(), p.audit.egress.as_deref()])
        .flatten());
    audit.difference(&enforced).copied().collect()
}

fn base_chains(patterns: &[String]) -> Vec<BaseChain> {
    let unknown = |directions: &[Direction]| {
        directions
            .iter()
            .flat_map(|&direction| {
                patterns
                    .iter()
                    .map(move |pattern| BaseStatement::UnknownInterface {
                        direction,
                        pattern: pattern.clone(),
                    })
            })
            .collect::<Vec<_>>()
    };
    let mut forward = vec![BaseStatement::Dispatch(Direction::Egress)];
    forward.extend(unknown(&[Direction::Egress, Direction::Ingress]));
    forward.extend([
        BaseStatement::TcpPickup(Direction::Egress),
        BaseStatement::TcpPickup(Direction::Ingress),
        BaseStatement::Established,
        BaseStatement::Dispatch(Direction::Ingress),
    ]);
    let mut input = vec![
        BaseStatement::NeighbourDiscovery,
        BaseStatement::Dispatch(Direction::Egress),
    ];
    input.extend(unknown(&[Direction::Egress]));
    input.push(BaseStatement::TcpPickup(Direction::Egress));
    vec![
        BaseChain {
            name: "forward",
            hook: "forward",
            priority: 0,
            statements: forward,
        },
        BaseChain {
            name: "input",
            hook: "input",
            priority: 0,
            statements: input,
        },
    ]
}

fn group_sets(id: &str, group: &Group) -> Result<Vec<(SetKind, Vec<SetElement>)>, RenderError> {
    match group {
        Group::Addresses(set) => {
            let v4: Vec<(u128, u128)> = set
                .v4
                .iter()
                .map(|&(lo, hi)| (u128::from(lo), u128::from(hi)))
                .collect();
            let mut sets = cidr_sets(IpFamily::V4, &v4);
            sets.extend(cidr_sets(IpFamily::V6, &set.v6));
            Ok(sets)
        }
        Group::Hosts(set) => {
            // Counted before expanding: a bogus range must fail, not exhaust memory.
            let count = host_count(set);
            if count > MAX_HOSTS_PER_GROUP {
                return Err(RenderError::TooManyHosts {
                    group: id.to_string(),
                    count,
                });
            }
            let v4 = set
                .v4
                .iter()
                .flat_map(|&(lo, hi)| (lo..=hi).map(|a| v4_range(a, a)))
                .collect();
            let v6 = set
                .v6
                .iter()
                .flat_map(|&(lo, hi)| (lo..=hi).map(|a| v6_range(a, a)))
                .collect();
            Ok(vec![
                (SetKind::Hosts(IpFamily::V4), v4),
                (SetKind::Hosts(IpFamily::V6), v6),
            ])
        }
        Group::NamedPorts(endpoints) => Ok([IpFamily::V4, IpFamily::V6]
            .into_iter()
            .map(|family| {
                let elements = endpoints
                    .iter()
                    .filter(|e| IpFamily::of(&e.addr) == family)
                    .map(|e| {
                        SetElement::Endpoint(Endpoint {
                            addr: e.addr,
                            protocol: e.protocol,
                            port: e.port,
                        })
                    })
                    .collect();
                (SetKind::NamedPorts(family), elements)
            })
            .collect()),
    }
}

/// A CIDR group's sets of one family: one hash set per prefix length when the ranges
/// split into few lengths ([`prefixes::by_length`]), else one interval set.
fn cidr_sets(family: IpFamily, ranges: &[(u128, u128)]) -> Vec<(SetKind, Vec<SetElement>)> {
    let element = |lo: u128, hi: u128| SetElement::Addr(addr_range(family, lo, hi));
    match prefixes::by_length(ranges, family.bits()) {
        Some(buckets) => buckets
            .into_iter()
            .map(|(len, nets)| {
                let elements = nets.into_iter().map(|a| element(a, a)).collect();
                (SetKind::Prefixes(family, len), elements)
            })
            .collect(),
        None => vec![(
            SetKind::Addresses(family),
            ranges.iter().map(|&(lo, hi)| element(lo, hi)).collect(),
        )],
    }
}

/// How many single addresses a host group spells, saturating (IPv6 ranges can be huge).
fn host_count(set: &palisade_policy::AddrSet) -> u128 {
    let v4 = set
        .v4
        .iter()
        .map(|&(lo, hi)| u128::from(hi.saturating_sub(lo)) + 1);
    let v6 = set
        .v6
        .iter()
        .map(|&(lo, hi)| hi.saturating_sub(lo).saturating_add(1));
    v4.chain(v6).fold(0u128, u128::saturating_add)
}

/// The range `lo..=hi` of addresses of `family`, given as numbers (within `u32` for IPv4).
fn addr_range(family: IpFamily, lo: u128, hi: u128) -> AddrRange {
    match family {
        IpFamily::V4 => AddrRange {
            lo: IpAddr::V4((lo as u32).into()),
            hi: IpAddr::V4((hi as u32).into()),
        },
        IpFamily::V6 => AddrRange {
            lo: IpAddr::V6(lo.into()),
            hi: IpAddr::V6(hi.into()),
        },
    }
}

fn v4_range(lo: u32, hi: u32) -> SetElement {
    SetElement::Addr(AddrRange {
        lo: IpAddr::V4(lo.into()),
        hi: IpAddr::V4(hi.into()),
    })
}

fn v6_range(lo: u128, hi: u128) -> SetElement {
    SetElement::Addr(AddrRange {
        lo: IpAddr::V6(lo.into()),
        hi: IpAddr::V6(hi.into()),
    })
}

fn render_pod(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    pod: &PodRules,
    key: &PodKey,
    ifname: &str,
    flow_log: Option<FlowLog>,
) -> Result<(), RenderError> {
    for direction in [Direction::Egress, Direction::Ingress] {
        let dir_rules = pod.direction(direction);
        let entry = entry_chain(key, direction);
        let rest = rest_chain(key, direction);
        // Where the enforced rules allow, a pod with an audit list goes on to its audit
        // chain; otherwise it returns (allowed), as without audit.
        let audit = pod.audit.direction(direction);
        let allow = match audit {
            Some(_) => Verdict::Goto(audit_entry_chain(key, direction)),
            None => Verdict::Return,
        };
        let mut entry_rules = Vec::new();
        if direction == Direction::Egress {
            entry_rules.extend(anti_spoofing(out, key, &pod.ips));
            entry_rules.push(RuleDef {
                matches: vec![Match::Established],
                counter: None,
                verdict: Verdict::Accept,
            });
        }
        let (tail, rest_rules) = match audit {
            // The tiers in the pod's own chains: their allow is the audit chain.
            Some(_) => view_chains(
                out,
                rules,
                dir_rules,
                View::Enforced { pod: key },
                direction,
                &rest,
                &allow,
            )?,
            None => shared_view(out, rules, dir_rules, key, ifname, direction)?,
        };
        entry_rules.extend(tail);
        if let Some(rest_rules) = rest_rules {
            let rest_rules = through_flow_log(out, rest_rules, flow_log);
            out.chains.insert(rest, Arc::new(rest_rules));
        }
        let entry_rules = through_flow_log(out, entry_rules, flow_log);
        if let Some(audit) = audit {
            let audit_rest = audit_rest_chain(key, direction);
            let view = View::Audit { pod: key };
            let (audit_entry, audit_rest_rules) = view_chains(
                out,
                rules,
                audit,
                view,
                direction,
                &audit_rest,
                &Verdict::Return,
            )?;
            if let Some(list) = audit_rest_rules {
                let list = through_audit_log(out, &rules.rules, list, flow_log);
                out.chains.insert(audit_rest, Arc::new(list));
            }
            let list = through_audit_log(out, &rules.rules, audit_entry, flow_log);
            out.chains
                .insert(audit_entry_chain(key, direction), Arc::new(list));
        }
        if entry_rules.is_empty() {
            continue;
        }
        out.chains.insert(entry.clone(), Arc::new(entry_rules));
        out.dispatch_mut(direction)
            .insert(ifname.to_string(), entry);
    }
    Ok(())
}

/// A direction's enforced chains with its tier lists shared ([`render_shared`]): the end
/// of the pod's entry chain (`goto` the Admin chain if the list is not empty, else `goto`
/// where the rest goes) and its rest chain, if it is isolated (the NetworkPolicy allow
/// rules, then the default deny). Where the rest goes, `DIRECTION-rest/NS/NAME` or, if the
/// pod is not isolated, the shared Baseline chain, is the pod's rest-dispatch element
/// (`ifname`) when an Admin chain has to find it; without either, allowed.
fn shared_view(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    dir_rules: &DirectionRules,
    key: &PodKey,
    ifname: &str,
    direction: Direction,
) -> Result<(Vec<RuleDef>, Option<Vec<RuleDef>>), RenderError> {
    let (rest, rest_rules) = if !dir_rules.isolated_by.is_empty() {
        let view = View::Enforced { pod: key };
        let list = rest_rules(out, rules, dir_rules, view, direction, &Verdict::Return)?;
        (Some(rest_chain(key, direction)), Some(list))
    } else if !dir_rules.baseline.is_empty() {
        let id = dir_rules.baseline.id();
        (Some(baseline_chain(direction, id)), None)
    } else {
        (None, None)
    };
    let goto = |chain: String| RuleDef {
        matches: vec![],
        counter: None,
        verdict: Verdict::Goto(chain),
    };
    let mut tail = Vec::new();
    if !dir_rules.admin.is_empty() {
        tail.push(goto(admin_chain(direction, dir_rules.admin.id())));
        if let Some(rest) = rest {
            out.rest_dispatch_mut(direction)
                .insert(ifname.to_string(), rest);
        }
    } else if let Some(rest) = rest {
        tail.push(goto(rest));
    }
    Ok((tail, rest_rules))
}

/// Which view of a pod's direction a chain evaluates: the enforced rules, or the full
/// view of an audit list (whose drops [`through_audit_log`] turns into would-deny).
#[derive(Clone, Copy)]
enum View<'a> {
    Enforced { pod: &'a PodKey },
    Audit { pod: &'a PodKey },
}

impl View<'_> {
    /// Whether the view's rules count in their rule counters (an audit chain's do not:
    /// [`through_audit_log`] gives them audit counters).
    fn enforced(self) -> bool {
        matches!(self, View::Enforced { .. })
    }

    /// The default deny's counter, created in `out`.
    fn default_deny(self, out: &mut Ruleset, direction: Direction) -> String {
        let (View::Enforced { pod } | View::Audit { pod }) = self;
        let counter = default_deny_counter(pod, direction);
        let meta = CounterMeta::DefaultDeny {
            pod: pod.clone(),
            direction,
        };
        let (name, meta) = match self {
            View::Enforced { .. } => (counter, meta),
            View::Audit { .. } => (audit_counter(&counter), CounterMeta::Audit(Box::new(meta))),
        };
        out.counters_mut().insert(name.clone(), meta);
        name
    }
}

/// One view's chains of a pod's direction: the entry chain's policy rules (the Admin tier,
/// then a `goto` to the rest chain) and the rest chain (`rest`), if it has rules. A
/// matching allow takes `allow`; without audit that is `return`, and a chain that runs to
/// its end allows too, so with audit the last chain ends with `allow` as well.
fn view_chains(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    dir_rules: &DirectionRules,
    view: View<'_>,
    direction: Direction,
    rest: &str,
    allow: &Verdict,
) -> Result<(Vec<RuleDef>, Option<Vec<RuleDef>>), RenderError> {
    let mut entry_rules = Vec::new();
    let mut rest_rules = rest_rules(out, rules, dir_rules, view, direction, allow)?;
    let rest_target = (!rest_rules.is_empty()).then(|| rest.to_string());
    for inst in dir_rules.admin.iter() {
        let verdict = match inst.action {
            Action::Allow => allow.clone(),
            Action::Deny => Verdict::Drop,
            Action::Pass => match &rest_target {
                Some(chain) => Verdict::Goto(chain.clone()),
                None => allow.clone(),
            },
        };
        entry_rules.extend(instance_rules(
            out,
            rules,
            inst,
            direction,
            verdict,
            view.enforced(),
        )?);
    }
    let falls_through = dir_rules.isolated_by.is_empty();
    let end_with_allow = |list: &mut Vec<RuleDef>| {
        if *allow != Verdict::Return && falls_through {
            list.push(RuleDef {
                matches: vec![],
                counter: None,
                verdict: allow.clone(),
            });
        }
    };
    match &rest_target {
        Some(chain) => {
            entry_rules.push(RuleDef {
                matches: vec![],
                counter: None,
                verdict: Verdict::Goto(chain.clone()),
            });
            end_with_allow(&mut rest_rules);
            Ok((entry_rules, Some(rest_rules)))
        }
        None => {
            end_with_allow(&mut entry_rules);
            Ok((entry_rules, None))
        }
    }
}

fn anti_spoofing(out: &mut Ruleset, pod: &PodKey, ips: &[IpAddr]) -> Vec<RuleDef> {
    let counter = spoof_counter(pod);
    out.counters_mut()
        .insert(counter.clone(), CounterMeta::Spoofed { pod: pod.clone() });
    [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .map(|family| {
            let mut addrs: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|a| IpFamily::of(a) == family)
                .collect();
            addrs.sort();
            addrs.dedup();
            let matcher = if addrs.is_empty() {
                Match::Family(family)
            } else {
                Match::AddrNotIn {
                    family,
                    end: End::Source,
                    addrs,
                }
            };
            RuleDef {
                matches: vec![matcher],
                counter: Some(counter.clone()),
                verdict: Verdict::Drop,
            }
        })
        .collect()
}

fn rest_rules(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    dir_rules: &DirectionRules,
    view: View<'_>,
    direction: Direction,
    allow: &Verdict,
) -> Result<Vec<RuleDef>, RenderError> {
    let mut list = Vec::new();
    if !dir_rules.isolated_by.is_empty() {
        for inst in &dir_rules.network_policy {
            list.extend(instance_rules(
                out,
                rules,
                inst,
                direction,
                allow.clone(),
                view.enforced(),
            )?);
        }
        let counter = view.default_deny(out, direction);
        list.push(RuleDef {
            matches: vec![],
            counter: Some(counter),
            verdict: Verdict::Drop,
        });
    } else {
        for inst in dir_rules.baseline.iter() {
            let verdict = match inst.action {
                Action::Deny => Verdict::Drop,
                // Pass in the last tier goes on to the default, which allows.
                Action::Allow | Action::Pass => allow.clone(),
            };
            list.extend(instance_rules(
                out,
                rules,
                inst,
                direction,
                verdict,
                view.enforced(),
            )?);
        }
    }
    Ok(list)
}

/// The rules of one rule instance: one per clause, group and family (any of them matching
/// means the instance matches; the first match decides, so splitting is exact).
fn instance_rules(
    out: &mut Ruleset,
    rules: &NodeRuleSet,
    inst: &RuleInstance,
    direction: Direction,
    verdict: Verdict,
    enforced: bool,
) -> Result<Vec<RuleDef>, RenderError> {
    if !valid_id(&inst.rule) {
        return Err(RenderError::BadRuleId(inst.rule.clone()));
    }
    // A rule without a known origin still gets its counter, only without labels (in an
    // audit chain, [`through_audit_log`] makes the counters).
    if enforced {
        out.counters_mut()
            .entry(inst.rule.clone())
            .or_insert_with(|| CounterMeta::Rule {
                id: inst.rule.clone(),
                origin: None,
            });
    }
    let peer_end = End::peer_of(direction);
    let mut list = Vec::new();
    let mut emit = |matches: Vec<Match>| {
        let rule = RuleDef {
            matches,
            counter: Some(inst.rule.clone()),
            verdict: verdict.clone(),
        };
        if !list.contains(&rule) {
            list.push(rule);
        }
    };
    for clause in &inst.clauses {
        match clause {
            Clause::PeerPort { peers, ports } => {
                // One (protocol, ports) pair per protocol of the clause; `None`: any port.
                let port_matches: Vec<Option<(Match, Match)>> = match ports {
                    None => vec![None],
                    Some(p) if p.is_empty() => continue,
                    Some(p) => ports_by_protocol(p)
                        .into_iter()
                        .map(|(protocol, ranges)| {
                            Some((Match::Protocol(protocol), Match::Dports(ranges)))
                        })
                        .collect(),
                };
                // The protocol test first (cheapest), then the peer, then the ports.
                let mut with_ports = |peer: Option<Match>| {
                    for pm in &port_matches {
                        let mut m = Vec::new();
                        m.extend(pm.as_ref().map(|(proto, _)| proto.clone()));
                        m.extend(peer.clone());
                        m.extend(pm.as_ref().map(|(_, dports)| dports.clone()));
                        emit(m);
                    }
                };
                let Some(ids) = peers else {
                    with_ports(None);
                    continue;
                };
                for id in ids.iter().collect::<BTreeSet<_>>() {
                    for family in [IpFamily::V4, IpFamily::V6] {
                        let set = group_set(id, family);
                        let is_addresses =
                            out.sets.get(&set).is_some_and(|s| s.kind.is_addresses());
                        if !rules.groups.contains_key(id.as_str()) {
                            continue;
                        }
                        if is_addresses {
                            with_ports(Some(Match::AddrInSet {
                                family,
                                end: peer_end,
                                set,
                            }));
                        }
                        // One rule per prefix length, alike but for the mask: any of
                        // them matching means the peer is in the group.
                        for (set, len) in prefix_sets(out, id, family) {
                            with_ports(Some(if u32::from(len) == family.bits() {
                                Match::AddrInSet {
                                    family,
                                    end: peer_end,
                                    set,
                                }
                            } else {
                                Match::MaskedAddrInSet {
                                    family,
                                    end: peer_end,
                                    len,
                                    set,
                                }
                            }));
                        }
                    }
                }
            }
            Clause::NamedPort { group } => {
                for family in [IpFamily::V4, IpFamily::V6] {
                    let set = group_set(group, family);
                    if matches!(
                        out.sets.get(&set),
                        Some(SetDef {
                            kind: SetKind::NamedPorts(_),
                            ..
                        })
                    ) {
                        emit(vec![Match::EndpointInSet {
                            family,
                            end: peer_end,
                            set,
                        }]);
                    }
                }
            }
        }
    }
    Ok(list)
}

/// The group's per-length prefix sets of one family in `out`: (name, length), shortest
/// length first.
fn prefix_sets(out: &Ruleset, group: &str, family: IpFamily) -> Vec<(String, u8)> {
    let start = format!("{}/", group_set(group, family));
    let mut found: Vec<(String, u8)> = out
        .sets
        .range(start.clone()..)
        .take_while(|(name, _)| name.starts_with(&start))
        .filter_map(|(name, def)| match def.kind {
            SetKind::Prefixes(f, len) if f == family => Some((name.clone(), len)),
            _ => None,
        })
        .collect();
    found.sort_by_key(|&(_, len)| len);
    found
}

/// The clause's ports per protocol: sorted, overlapping and adjacent ranges merged.
fn ports_by_protocol(ports: &[PortRange]) -> BTreeMap<Protocol, Vec<(u16, u16)>> {
    let mut by_proto: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    for p in ports {
        let (lo, hi) = if p.start <= p.end {
            (p.start, p.end)
        } else {
            (p.end, p.start)
        };
        by_proto.entry(p.protocol).or_default().push((lo, hi));
    }
    for ranges in by_proto.values_mut() {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for &(lo, hi) in ranges.iter() {
            match merged.last_mut() {
                // Interval sets reject overlapping elements, and nft merges adjacent ones
                // when listing: merging here keeps the render and the kernel's view alike.
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => {
                    last.1 = last.1.max(hi);
                }
                _ => merged.push((lo, hi)),
            }
        }
        *ranges = merged;
    }
    by_proto
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_or_odd_pod_names_are_hashed_stably() {
        let short = PodKey::new("default", "web-1");
        assert_eq!(pod_part(&short), "default/web-1");
        let long = PodKey::new("default", "x".repeat(60));
        let part = pod_part(&long);
        assert!(part.starts_with("h-") && part.len() == 18, "{part}");
        assert_eq!(part, pod_part(&long));
        assert!(pod_part(&PodKey::new("a b", "c")).starts_with("h-"));
    }

    fn one_group(group: Group) -> NodeRuleSet {
        let mut rules = NodeRuleSet::default();
        rules
            .groups
            .insert("g-1".into(), std::sync::Arc::new(group));
        rules
    }

    #[test]
    fn host_groups_are_hash_sets_of_single_addresses() {
        let mut hosts = palisade_policy::AddrSet::default();
        // A merged range of three adjacent pod addresses, and one IPv6 pod.
        hosts.v4.push((
            u32::from(std::net::Ipv4Addr::new(10, 0, 0, 1)),
            u32::from(std::net::Ipv4Addr::new(10, 0, 0, 3)),
        ));
        hosts.v6.push((1, 1));
        let out = render(&one_group(Group::Hosts(hosts)), &Interfaces::new()).unwrap();
        let v4 = &out.sets["g-1_4"];
        assert_eq!(v4.kind, SetKind::Hosts(IpFamily::V4));
        let texts: Vec<String> = v4.elements.iter().map(text::element_text).collect();
        assert_eq!(texts, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(out.sets["g-1_6"].kind, SetKind::Hosts(IpFamily::V6));
        let table = text::to_text(&out);
        assert!(
            table.contains(
                "set g-1_4 {\n\t\ttype ipv4_addr\n\t\tsize 64\n\t\telements = { 10.0.0.1, 10.0.0.2, 10.0.0.3 }"
            ),
            "{table}"
        );
    }

    #[test]
    fn host_sets_are_sized_with_room_to_grow() {
        assert_eq!(host_set_size(0), MIN_HOST_SET_SIZE);
        assert_eq!(host_set_size(7_500), 16_384);
        assert_eq!(host_set_size(8_192), 16_384);
        assert_eq!(host_set_size(8_193), 32_768);
        assert_eq!(host_set_size(usize::MAX), u32::MAX);
    }

    #[test]
    fn unchanged_groups_keep_their_rendered_sets() {
        let hosts = |n: u32| {
            let mut set = palisade_policy::AddrSet::default();
            set.v4.push((0x0a00_0000, 0x0a00_0000 + n));
            std::sync::Arc::new(Group::Hosts(set))
        };
        let mut rules = NodeRuleSet::default();
        rules.groups.insert("g-1".into(), hosts(10));
        rules.groups.insert("g-2".into(), hosts(20));
        let mut renderer = Renderer::default();
        let first = renderer.render(&rules, &Interfaces::new()).unwrap();
        rules.groups.insert("g-2".into(), hosts(21));
        let second = renderer.render(&rules, &Interfaces::new()).unwrap();
        assert!(Arc::ptr_eq(
            &first.sets["g-1_4"].elements,
            &second.sets["g-1_4"].elements
        ));
        assert_eq!(second.sets["g-2_4"].elements.len(), 22);
        // An equal group in a new allocation (a reloaded rule set) is reused too, and the
        // result is what a fresh render gives.
        rules.groups.insert("g-1".into(), hosts(10));
        let third = renderer.render(&rules, &Interfaces::new()).unwrap();
        assert!(Arc::ptr_eq(
            &first.sets["g-1_4"].elements,
            &third.sets["g-1_4"].elements
        ));
        assert_eq!(third, render(&rules, &Interfaces::new()).unwrap());
    }

    #[test]
    fn unchanged_pods_keep_their_chains_and_changes_render_as_fresh() {
        let hosts = |addrs: &[&str]| {
            std::sync::Arc::new(Group::Hosts(palisade_policy::AddrSet::from_addrs(
                addrs.iter().map(|a| a.parse().unwrap()),
            )))
        };
        let instance = RuleInstance {
            rule: "r-1".into(),
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec!["g-1".into()]),
                ports: None,
            }],
        };
        let pod = |name: &str, isolated: bool| PodRules {
            namespace: "ns".into(),
            name: name.into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
            ingress: Arc::new(DirectionRules {
                isolated_by: if isolated {
                    vec![palisade_policy::model::PolicyId {
                        kind: palisade_policy::model::PolicyKind::NetworkPolicy,
                        namespace: Some("ns".into()),
                        name: "p".into(),
                    }]
                } else {
                    vec![]
                },
                network_policy: vec![instance.clone()],
                ..DirectionRules::default()
            }),
            egress: Arc::default(),
            audit: Default::default(),
        };
        let mut rules = NodeRuleSet::default();
        rules.groups.insert("g-1".into(), hosts(&["10.0.0.1"]));
        rules.pods = vec![pod("a", true), pod("b", true)];
        let interfaces: Interfaces = [
            (PodKey::new("ns", "a"), "veth-a".to_string()),
            (PodKey::new("ns", "b"), "veth-b".to_string()),
        ]
        .into_iter()
        .collect();
        let mut renderer = Renderer::default();
        let first = renderer.render(&rules, &interfaces).unwrap();
        assert_eq!(first, render(&rules, &interfaces).unwrap());

        // A group's addresses change: the pods' chains are the same allocations.
        rules
            .groups
            .insert("g-1".into(), hosts(&["10.0.0.1", "10.0.0.2"]));
        let second = renderer.render(&rules, &interfaces).unwrap();
        assert_eq!(second, render(&rules, &interfaces).unwrap());
        let chain = "ingress-rest/ns/a";
        assert!(Arc::ptr_eq(&first.chains[chain], &second.chains[chain]));
        // And no counter changed: the map is handed on, not rebuilt.
        assert!(Arc::ptr_eq(&first.counters, &second.counters));

        // One pod's rules change, another moves to a new interface, and the group gains
        // an IPv6 set (a new set a rule can refer to): all as a fresh render.
        rules.pods[0] = pod("a", false);
        rules
            .groups
            .insert("g-1".into(), hosts(&["10.0.0.1", "fd00::1"]));
        let mut moved = interfaces.clone();
        moved.insert(PodKey::new("ns", "b"), "veth-c".to_string());
        let third = renderer.render(&rules, &moved).unwrap();
        assert_eq!(third, render(&rules, &moved).unwrap());
        assert!(third.chains.contains_key("ingress-rest/ns/b"));
        assert_eq!(
            third.ingress_dispatch.get("veth-c").map(String::as_str),
            Some("ingress/ns/b")
        );

        // A pod that loses its interface disappears, and comes back unchanged.
        let mut gone = moved.clone();
        gone.remove(&PodKey::new("ns", "b"));
        assert_eq!(
            renderer.render(&rules, &gone).unwrap(),
            render(&rules, &gone).unwrap()
        );
        assert_eq!(renderer.render(&rules, &moved).unwrap(), third);

        // The rule gets an origin (labels): the cached pods do not hide it.
        std::sync::Arc::make_mut(&mut rules.rules).insert(
            "r-1".into(),
            palisade_policy::model::RuleOrigin {
                policy: palisade_policy::model::PolicyId {
                    kind: palisade_policy::model::PolicyKind::NetworkPolicy,
                    namespace: Some("ns".into()),
                    name: "p".into(),
                },
                tier: palisade_policy::model::Tier::NetworkPolicy,
                priority: 0,
                direction: Direction::Ingress,
                index: 0,
                name: None,
            },
        );
        let labelled = renderer.render(&rules, &moved).unwrap();
        assert_eq!(labelled, render(&rules, &moved).unwrap());
        assert!(matches!(
            &labelled.counters["r-1"],
            CounterMeta::Rule {
                origin: Some(_),
                ..
            }
        ));

        // The pods go while the group empties (its sets go, so every cache is dropped,
        // and nothing renders anew): their counters go with them.
        rules.pods.clear();
        rules.groups.insert("g-1".into(), hosts(&[]));
        let emptied = renderer.render(&rules, &moved).unwrap();
        assert!(!emptied.counters.contains_key("deny-ingress/ns/b"));
        assert_eq!(emptied, render(&rules, &moved).unwrap());
    }

    /// A pod `ns/a` whose ingress allows TCP 80 from group `g-1`.
    /// Audit chains go through the renderer's cache like the others: a cached render is
    /// the fresh one, and a pod whose audit list goes leaves no audit chain or counter.
    #[test]
    fn audit_chains_come_and_go_through_the_cache() {
        let log = FlowLog {
            group: 1,
            per_second: 10,
            burst: 20,
        };
        let fresh = |rules: &NodeRuleSet, interfaces: &Interfaces| {
            Renderer::with_flow_log(log)
                .render(rules, interfaces)
                .unwrap()
        };
        let isolated = Arc::new(DirectionRules {
            isolated_by: vec![palisade_policy::model::PolicyId {
                kind: palisade_policy::model::PolicyKind::NetworkPolicy,
                namespace: Some("ns".into()),
                name: "audited".into(),
            }],
            ..DirectionRules::default()
        });
        let pod = |name: &str, audited: bool| PodRules {
            namespace: "ns".into(),
            name: name.into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
            ingress: Arc::default(),
            egress: Arc::default(),
            audit: palisade_policy::AuditRules {
                ingress: audited.then(|| isolated.clone()),
                egress: None,
            },
        };
        let mut rules = NodeRuleSet {
            pods: vec![pod("a", true), pod("b", false)],
            ..NodeRuleSet::default()
        };
        let interfaces: Interfaces = [
            (PodKey::new("ns", "a"), "veth-a".to_string()),
            (PodKey::new("ns", "b"), "veth-b".to_string()),
        ]
        .into_iter()
        .collect();
        let mut renderer = Renderer::with_flow_log(log);
        let first = renderer.render(&rules, &interfaces).unwrap();
        assert_eq!(first, fresh(&rules, &interfaces));
        assert_eq!(
            first.chains["ingress/ns/a"][0].verdict,
            Verdict::Goto("audit-ingress/ns/a".into())
        );
        assert!(first.counters.contains_key("audit/deny-ingress/ns/a"));
        assert!(
            !first.chains.contains_key("ingress/ns/b"),
            "b is as without audit"
        );
        // Cached: the same.
        assert_eq!(renderer.render(&rules, &interfaces).unwrap(), first);
        // The audit list goes: nothing of it stays.
        rules.pods[0] = pod("a", false);
        let plain = renderer.render(&rules, &interfaces).unwrap();
        assert_eq!(plain, fresh(&rules, &interfaces));
        assert!(
            plain.chains.keys().all(|c| !c.contains("audit")),
            "{:?}",
            plain.chains.keys()
        );
        assert!(plain.counters.keys().all(|c| !c.starts_with(AUDIT_PREFIX)));
        rules.pods[0] = pod("a", true);
        assert_eq!(renderer.render(&rules, &interfaces).unwrap(), first);
    }

    /// Pods that come render their counters into the last map as a fresh render makes
    /// them, including when a new one changes which rules only audit lists reference.
    #[test]
    fn added_pods_add_to_the_counters_as_a_fresh_render() {
        let instance = |rule: &str| RuleInstance {
            rule: rule.into(),
            action: Action::Allow,
            clauses: vec![Clause::PeerPort {
                peers: Some(vec!["g-1".into()]),
                ports: None,
            }],
        };
        let policy = palisade_policy::model::PolicyId {
            kind: palisade_policy::model::PolicyKind::NetworkPolicy,
            namespace: Some("ns".into()),
            name: "p".into(),
        };
        let isolated = |rule: &str| {
            Arc::new(DirectionRules {
                isolated_by: vec![policy.clone()],
                network_policy: vec![instance(rule)],
                ..DirectionRules::default()
            })
        };
        let admin = Arc::new(DirectionRules {
            admin: Arc::new(TierList::new(vec![instance("r-2")])),
            ..DirectionRules::default()
        });
        let pod = |name: &str, ingress: Arc<DirectionRules>, audit: Option<&str>| PodRules {
            namespace: "ns".into(),
            name: name.into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
            ingress,
            egress: Arc::default(),
            audit: palisade_policy::AuditRules {
                ingress: audit.map(isolated),
                egress: None,
            },
        };
        let mut rules = NodeRuleSet::default();
        rules.groups.insert(
            "g-1".into(),
            Arc::new(Group::Hosts(palisade_policy::AddrSet::from_addrs([
                "10.0.0.1".parse().unwrap(),
            ]))),
        );
        for (index, rule) in ["r-1", "r-3"].into_iter().enumerate() {
            let origin = palisade_policy::model::RuleOrigin {
                policy: policy.clone(),
                tier: palisade_policy::model::Tier::NetworkPolicy,
                priority: 0,
                direction: Direction::Ingress,
                index,
                name: None,
            };
            std::sync::Arc::make_mut(&mut rules.rules).insert(rule.into(), origin);
        }
        rules.pods = vec![pod("a", isolated("r-1"), None)];
        let mut interfaces = Interfaces::new();
        let mut renderer = Renderer::default();
        let mut last = renderer.render(&rules, &interfaces).unwrap();
        let mut maps = vec![Arc::as_ptr(&last.counters)];
        let mut lineage_plans = Vec::new();
        let steps = [
            // A new shared list (r-2 has no origin).
            pod("b", admin.clone(), None),
            // r-3 only in an audit list: its origin makes no counter.
            pod("c", Arc::default(), Some("r-3")),
            // Now enforced too.
            pod("d", isolated("r-3"), None),
            pod("e", isolated("r-1"), Some("r-1")),
            pod("f", admin.clone(), None),
            pod("g", isolated("r-1"), None),
        ];
        for (i, added) in steps.into_iter().enumerate() {
            let key = PodKey::new(&added.namespace, &added.name);
            interfaces.insert(key.clone(), format!("veth-{i}"));
            rules.pods.push(added);
            // Only the last render is held, as an applier holds it.
            let applied = std::mem::take(&mut last);
            last = renderer.render(&rules, &interfaces).unwrap();
            assert_eq!(last, render(&rules, &interfaces).unwrap(), "step {i}");
            assert!(last.counters.contains_key(&spoof_counter(&key)));
            maps.push(Arc::as_ptr(&last.counters));
            lineage_plans.push(plans_agree(&applied, &last));
        }
        // The last two steps only added, after one that did: each made the map before the
        // last (free) the new one, and told the plan what it added.
        assert_eq!(maps[5], maps[3]);
        assert_eq!(maps[6], maps[4]);
        assert_eq!(&lineage_plans[4..], [true, true]);
        assert!(!last.counters.contains_key("audit/r-3"));

        // A pod gone: the map is built anew, and the plan compares the maps.
        let applied = std::mem::take(&mut last);
        rules.pods.remove(1);
        last = renderer.render(&rules, &interfaces).unwrap();
        assert!(!plans_agree(&applied, &last));
        // Changed outside the renderer: its lineage no longer holds.
        let mut edited = last.clone();
        edited
            .counters_mut()
            .remove(&spoof_counter(&PodKey::new("ns", "g")));
        assert!(!plans_agree(&last, &edited));
        assert!(!plans_agree(&edited, &last));
    }

    /// Asserts that the plan from `applied` to `desired` is the one that comparing their
    /// counter maps gives; true if the renderer's lineage told the added counters.
    fn plans_agree(applied: &Ruleset, desired: &Ruleset) -> bool {
        let strip = |table: &Ruleset| Ruleset {
            counter_lineage: CounterLineage::default(),
            ..table.clone()
        };
        let told = desired.counters_added_to(applied).is_some();
        assert_eq!(
            crate::diff::plan(applied, desired),
            crate::diff::plan(&strip(applied), &strip(desired)),
        );
        told
    }

    fn ingress_from(group: Group) -> (NodeRuleSet, Interfaces) {
        let mut rules = one_group(group);
        rules.pods = vec![PodRules {
            namespace: "ns".into(),
            name: "a".into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
            ingress: Arc::new(DirectionRules {
                isolated_by: vec![palisade_policy::model::PolicyId {
                    kind: palisade_policy::model::PolicyKind::NetworkPolicy,
                    namespace: Some("ns".into()),
                    name: "p".into(),
                }],
                network_policy: vec![RuleInstance {
                    rule: "r-1".into(),
                    action: Action::Allow,
                    clauses: vec![Clause::PeerPort {
                        peers: Some(vec!["g-1".into()]),
                        ports: Some(vec![PortRange {
                            protocol: Protocol::Tcp,
                            start: 80,
                            end: 80,
                        }]),
                    }],
                }],
                ..DirectionRules::default()
            }),
            egress: Arc::default(),
            audit: Default::default(),
        }];
        let interfaces = [(PodKey::new("ns", "a"), "veth-a".to_string())].into();
        (rules, interfaces)
    }

    #[test]
    fn cidr_groups_of_few_lengths_are_masked_hash_sets() {
        // Two /24s, a /32 and an IPv6 /64: three hash sets, one rule each.
        let mut block = palisade_policy::AddrSet::from_block(&"10.1.0.0/24".parse().unwrap(), &[]);
        for other in ["10.3.0.0/24", "10.9.9.9/32", "fd00::/64"] {
            block.union_with(&palisade_policy::AddrSet::from_block(
                &other.parse().unwrap(),
                &[],
            ));
        }
        let (rules, interfaces) = ingress_from(Group::Addresses(block));
        let out = render(&rules, &interfaces).unwrap();
        let names: Vec<&str> = out.sets.keys().map(String::as_str).collect();
        assert_eq!(names, ["g-1_4/24", "g-1_4/32", "g-1_6/64"]);
        let v4 = &out.sets["g-1_4/24"];
        assert_eq!(v4.kind, SetKind::Prefixes(IpFamily::V4, 24));
        assert_eq!(v4.size, Some(MIN_HOST_SET_SIZE));
        let text = text::to_text(&out);
        assert!(!text.contains("flags interval"), "{text}");
        assert!(text.contains("elements = { 10.1.0.0, 10.3.0.0 }"), "{text}");
        let rules: Vec<String> = out.chains["ingress-rest/ns/a"]
            .iter()
            .map(text::rule_text)
            .collect();
        assert_eq!(
            rules,
            [
                "meta l4proto tcp ip saddr & 255.255.255.0 @g-1_4/24 th dport 80 counter name \"r-1\" return",
                "meta l4proto tcp ip saddr @g-1_4/32 th dport 80 counter name \"r-1\" return",
                "meta l4proto tcp ip6 saddr & ffff:ffff:ffff:ffff:: @g-1_6/64 th dport 80 counter name \"r-1\" return",
                "counter name \"deny-ingress/ns/a\" drop",
            ]
        );
    }

    #[test]
    fn cidr_groups_of_many_lengths_stay_interval_sets() {
        let block = palisade_policy::AddrSet::from_block(
            &"0.0.0.0/0".parse().unwrap(),
            &["10.0.0.0/8".parse().unwrap()],
        );
        let (rules, interfaces) = ingress_from(Group::Addresses(block));
        let out = render(&rules, &interfaces).unwrap();
        assert_eq!(out.sets["g-1_4"].kind, SetKind::Addresses(IpFamily::V4));
        assert_eq!(out.sets["g-1_4"].size, None);
        assert_eq!(
            text::element_text(&out.sets["g-1_4"].elements[0]),
            "0.0.0.0-9.255.255.255"
        );
        assert!(text::to_text(&out).contains("flags interval"));
        assert_eq!(
            text::rule_text(&out.chains["ingress-rest/ns/a"][0]),
            "meta l4proto tcp ip saddr @g-1_4 th dport 80 counter name \"r-1\" return"
        );
        // The whole family is one interval too, not a /0 mask.
        let all = palisade_policy::AddrSet::from_block(&"::/0".parse().unwrap(), &[]);
        let out = render(&one_group(Group::Addresses(all)), &Interfaces::new()).unwrap();
        assert_eq!(out.sets["g-1_6"].kind, SetKind::Addresses(IpFamily::V6));
    }

    #[test]
    fn oversized_host_groups_are_refused_before_expanding() {
        let mut hosts = palisade_policy::AddrSet::default();
        hosts.v6.push((0, u128::MAX));
        let err = render(&one_group(Group::Hosts(hosts)), &Interfaces::new()).unwrap_err();
        assert_eq!(
            err,
            RenderError::TooManyHosts {
                group: "g-1".into(),
                count: u128::MAX
            }
        );
        assert!(err.to_string().contains("g-1"), "{err}");
        let mut hosts = palisade_policy::AddrSet::default();
        hosts.v4.push((0, MAX_HOSTS_PER_GROUP as u32));
        assert!(matches!(
            render(&one_group(Group::Hosts(hosts)), &Interfaces::new()),
            Err(RenderError::TooManyHosts { count, .. }) if count == MAX_HOSTS_PER_GROUP + 1
        ));
    }

    #[test]
    fn overlapping_and_adjacent_ports_merge_per_protocol() {
        let p = |protocol, start, end| PortRange {
            protocol,
            start,
            end,
        };
        let merged = ports_by_protocol(&[
            p(Protocol::Tcp, 80, 80),
            p(Protocol::Udp, 53, 53),
            p(Protocol::Tcp, 81, 90),
            p(Protocol::Tcp, 85, 85),
            p(Protocol::Tcp, 443, 443),
            p(Protocol::Udp, 60, 54),
        ]);
        assert_eq!(
            merged.into_iter().collect::<Vec<_>>(),
            vec![
                (Protocol::Tcp, vec![(80, 90), (443, 443)]),
                (Protocol::Udp, vec![(53, 60)])
            ]
        );
    }
}
