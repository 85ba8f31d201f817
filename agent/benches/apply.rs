//! Apply benchmark (issue 4, benchmark a): one node with 110 isolated pods whose rules
//! reference address groups totalling 150,000 addresses (20 groups of 7,500 pod addresses,
//! plus CIDR-with-except groups and a named-port group), with Admin-tier and NetworkPolicy
//! rules in both directions. Palisade's nftables path is measured side by side with the
//! iptables + ipset rendering of the same rule set (kube-router style, see
//! `common/iptables.rs`), interleaved, in network namespaces of the bench's own:
//!
//! * full apply: fresh namespace, empty table → whole rule set (median of 7): Palisade's
//!   staged first load (nft: table without base chains; netlink: host set elements; nft:
//!   base chains) and the read-back;
//! * replacement: the same rule set applied again by a fresh `Applier` (a restarted agent
//!   adopting the table): one nft transaction `add table; delete table; add table; …`;
//! * incremental: one address added to one group (median of 30) — Palisade: render (with
//!   the agent's `Renderer`, which keeps unchanged groups) and `Applier::apply` (one netlink
//!   set-element batch); iptables: `ipset add`.
//!
//! Run (as root): `cargo bench -p palisade-agent --bench apply`
//! (`PALISADE_BENCH_IPTABLES=legacy` measures iptables-legacy instead of the system's
//! default iptables backend.)
//!
//! Tiered variant (issue 11; `PALISADE_BENCH_VARIANT=tiered` runs it alone,
//! `PALISADE_BENCH_VARIANT=all` after the base bench): the same node with 100 Admin and
//! 100 Baseline ClusterNetworkPolicies of 25 rules each in both directions on top, selecting
//! every pod (modelled on `palisade_policy::workloads::scale_tiered`; the pods of odd
//! namespaces are not isolated, so the Baseline tier decides for them). Palisade only:
//! full apply (median of 3), and incremental applies (render + `Applier::apply`): one
//! address added to one group, and one pod added (medians of 10); then one egress dispatch
//! element alone, whose transaction is the kernel's validation of the table at commit,
//! the floor under a pod's.
//! `PALISADE_BENCH_VARIANT=tiered-render` times its renders alone (no kernel, seconds).

// The agent binary's allocator (src/main.rs), so that renders cost what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use common::{group_id, iptables, median, ms, print_table, rule_id, sh, sh_stdin, unique, Netns};
use palisade_agent::apply::phase;
use palisade_agent::{
    render, Applier, ApplyKind, ApplyOutcome, Interfaces, Nft, ReconcileOutcome, Renderer,
};
use palisade_policy::model::{
    Action, Direction, PodKey, PolicyId, PolicyKind, Protocol, RuleOrigin, Tier,
};
use palisade_policy::ruleset::{
    Clause, DirectionRules, Group, NodeRuleSet, PodRules, PortEndpoint, PortRange, RuleInstance,
    TierList,
};
use palisade_policy::AddrSet;

const NAMESPACES: usize = 10;
const PODS_PER_NAMESPACE: usize = 11;
const POD_GROUPS: usize = 20;
const PER_GROUP: u32 = 7_500;
const FULL_REPS: usize = 7;
const INCREMENTAL_REPS: usize = 30;

/// The `j`-th pod address of the (synthetic) cluster, 10.16.0.0/13.
fn cluster_ip(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + j)
}

/// Group `g`'s pod addresses: every 41st cluster address, so no two are adjacent (the
/// compiler would merge adjacent addresses into one range).
fn pod_group(g: usize) -> AddrSet {
    AddrSet::from_addrs((0..PER_GROUP).map(|i| IpAddr::V4(cluster_ip(i * 41 + g as u32 * 7))))
}

fn block(cidr: &str, except: &[&str]) -> AddrSet {
    let net = cidr.parse().expect("constant CIDR");
    let except: Vec<_> = except
        .iter()
        .map(|e| e.parse().expect("constant CIDR"))
        .collect();
    AddrSet::from_block(&net, &except)
}

fn ports(list: &[(Protocol, u16, u16)]) -> Option<Vec<PortRange>> {
    Some(
        list.iter()
            .map(|&(protocol, start, end)| PortRange {
                protocol,
                start,
                end,
            })
            .collect(),
    )
}

struct Builder {
    rules: NodeRuleSet,
}

impl Builder {
    fn instance(
        &mut self,
        policy: (PolicyKind, Option<String>, &str),
        (tier, priority): (Tier, u32),
        direction: Direction,
        index: usize,
        action: Action,
        clauses: Vec<Clause>,
    ) -> RuleInstance {
        let (kind, namespace, name) = policy;
        let origin = RuleOrigin {
            policy: PolicyId {
                kind,
                namespace,
                name: name.to_string(),
            },
            tier,
            priority,
            direction,
            index,
            name: None,
        };
        let id = rule_id(&format!("{origin:?}"));
        std::sync::Arc::make_mut(&mut self.rules.rules).insert(id.clone(), origin);
        RuleInstance {
            rule: id,
            action,
            clauses,
        }
    }
}

fn peer_port(groups: &[&str], p: Option<Vec<PortRange>>) -> Clause {
    Clause::PeerPort {
        peers: Some(groups.iter().map(|g| g.to_string()).collect()),
        ports: p,
    }
}

/// Names of the groups, in the order `node_rules` creates them.
struct Groups {
    pods: Vec<String>,
    internet: String,
    corp: String,
    quarantine: String,
    metrics: String,
}

fn node_rules() -> (NodeRuleSet, Groups, Interfaces) {
    use Protocol::{Tcp, Udp};
    let mut b = Builder {
        rules: NodeRuleSet {
            node: "node-7".into(),
            node_addresses: vec!["192.0.2.7".parse().expect("constant")],
            ..NodeRuleSet::default()
        },
    };
    let add_group = |b: &mut Builder, name: &str, g: Group| {
        let id = group_id(name);
        b.rules.groups.insert(id.clone(), Arc::new(g));
        id
    };
    let pods: Vec<String> = (0..POD_GROUPS)
        .map(|g| add_group(&mut b, &format!("pods-{g}"), Group::Hosts(pod_group(g))))
        .collect();
    let internet = add_group(
        &mut b,
        "internet",
        Group::Addresses(block(
            "0.0.0.0/0",
            &[
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
            ],
        )),
    );
    let corp = add_group(
        &mut b,
        "corp",
        Group::Addresses(block(
            "192.168.0.0/16",
            &["192.168.10.0/24", "192.168.200.0/24"],
        )),
    );
    let quarantine = add_group(
        &mut b,
        "quarantine",
        Group::Addresses(block("172.20.0.0/14", &["172.21.5.0/24"])),
    );
    let metrics = add_group(
        &mut b,
        "metrics",
        Group::NamedPorts(
            (0..200u32)
                .map(|k| PortEndpoint {
                    addr: IpAddr::V4(cluster_ip(k * 97 + 3)),
                    protocol: Tcp,
                    port: 9100 + (k % 3) as u16,
                })
                .collect(),
        ),
    );

    let cnp = |name: &'static str| (PolicyKind::ClusterNetworkPolicy, None, name);
    let admin_in = vec![
        b.instance(
            cnp("security-quarantine"),
            (Tier::Admin, 10),
            Direction::Ingress,
            0,
            Action::Deny,
            vec![peer_port(&[&quarantine], None)],
        ),
        b.instance(
            cnp("monitoring"),
            (Tier::Admin, 20),
            Direction::Ingress,
            0,
            Action::Pass,
            vec![peer_port(&[&pods[19]], ports(&[(Tcp, 9090, 9090)]))],
        ),
    ];
    let admin_out = vec![
        b.instance(
            cnp("dns"),
            (Tier::Admin, 5),
            Direction::Egress,
            0,
            Action::Allow,
            vec![peer_port(
                &[&pods[18]],
                ports(&[(Udp, 53, 53), (Tcp, 53, 53)]),
            )],
        ),
        b.instance(
            cnp("security-quarantine"),
            (Tier::Admin, 10),
            Direction::Egress,
            0,
            Action::Deny,
            vec![peer_port(&[&quarantine], None)],
        ),
    ];

    let mut interfaces = Interfaces::new();
    for n in 0..NAMESPACES {
        let ns = format!("app-{n}");
        let np = |name: &'static str| (PolicyKind::NetworkPolicy, Some(ns.clone()), name);
        let isolated_by = vec![
            PolicyId {
                kind: PolicyKind::NetworkPolicy,
                namespace: Some(ns.clone()),
                name: "default-deny".into(),
            },
            PolicyId {
                kind: PolicyKind::NetworkPolicy,
                namespace: Some(ns.clone()),
                name: "allow-app".into(),
            },
        ];
        let ingress = vec![
            b.instance(
                np("allow-app"),
                (Tier::NetworkPolicy, 0),
                Direction::Ingress,
                0,
                Action::Allow,
                vec![peer_port(
                    &[&pods[2 * n], &pods[2 * n + 1]],
                    ports(&[(Tcp, 8080, 8080), (Tcp, 8443, 8443)]),
                )],
            ),
            b.instance(
                np("allow-app"),
                (Tier::NetworkPolicy, 0),
                Direction::Ingress,
                1,
                Action::Allow,
                vec![peer_port(
                    &[&pods[(2 * n + 2) % 18]],
                    ports(&[(Tcp, 9000, 9100), (Udp, 5000, 5010)]),
                )],
            ),
            b.instance(
                np("allow-app"),
                (Tier::NetworkPolicy, 0),
                Direction::Ingress,
                2,
                Action::Allow,
                vec![peer_port(&[&corp], ports(&[(Tcp, 443, 443)]))],
            ),
        ];
        let egress = vec![
            b.instance(
                np("allow-app"),
                (Tier::NetworkPolicy, 0),
                Direction::Egress,
                0,
                Action::Allow,
                vec![peer_port(
                    &[&pods[(2 * n + 3) % 18]],
                    ports(&[(Tcp, 5432, 5432), (Tcp, 6379, 6379)]),
                )],
            ),
            b.instance(
                np("allow-app"),
                (Tier::NetworkPolicy, 0),
                Direction::Egress,
                1,
                Action::Allow,
                vec![peer_port(
                    &[&internet],
                    ports(&[(Tcp, 80, 80), (Tcp, 443, 443)]),
                )],
            ),
            b.instance(
                np("allow-app"),
                (Tier::NetworkPolicy, 0),
                Direction::Egress,
                2,
                Action::Allow,
                vec![Clause::NamedPort {
                    group: metrics.clone(),
                }],
            ),
        ];
        for k in 0..PODS_PER_NAMESPACE {
            let p = n * PODS_PER_NAMESPACE + k;
            let name = format!("web-{k}");
            b.rules.pods.push(PodRules {
                namespace: ns.clone(),
                name: name.clone(),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, 7, p as u8 + 2))],
                ingress: DirectionRules {
                    admin: TierList::from(admin_in.clone()).into(),
                    isolated_by: isolated_by.clone(),
                    network_policy: ingress.clone(),
                    baseline: Default::default(),
                }
                .into(),
                egress: DirectionRules {
                    admin: TierList::from(admin_out.clone()).into(),
                    isolated_by: isolated_by.clone(),
                    network_policy: egress.clone(),
                    baseline: Default::default(),
                }
                .into(),
                audit: Default::default(),
            });
            interfaces.insert(PodKey::new(&ns, &name), format!("cali{p:08x}"));
        }
    }
    let groups = Groups {
        pods,
        internet,
        corp,
        quarantine,
        metrics,
    };
    (b.rules, groups, interfaces)
}

/// The rule set with `extra` added to pod group 0.
fn with_extra_address(base: &NodeRuleSet, group: &str, extra: &[IpAddr]) -> NodeRuleSet {
    let mut rules = base.clone();
    let mut set = pod_group(0);
    for &a in extra {
        set.push_addr(a);
    }
    set.normalize();
    rules
        .groups
        .insert(group.to_string(), Arc::new(Group::Hosts(set)));
    rules
}

/// The `i`-th address added by the incremental runs: outside every group, not adjacent.
fn extra_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        250,
        (i / 100) as u8,
        (2 * (i % 100)) as u8 + 1,
    ))
}

#[derive(Default)]
struct Samples(BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    fn push(&mut self, key: &'static str, v: f64) {
        self.0.entry(key).or_default().push(v);
    }
    fn median(&self, key: &str) -> f64 {
        self.0.get(key).map(|v| median(v)).unwrap_or(f64::NAN)
    }
}

/// The duration of `name` in the outcome's phases, in ms (0 when absent).
fn phase_ms(out: &ApplyOutcome, name: &str) -> f64 {
    out.phases
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, d)| ms(*d))
        .sum()
}

/// Full apply into an empty namespace, then the replacement by a fresh applier.
fn palisade_full(
    netns: &str,
    rules: NodeRuleSet,
    interfaces: Interfaces,
) -> Vec<(&'static str, f64)> {
    common::in_netns(netns, move || {
        let t0 = Instant::now();
        let desired = render(&rules, &interfaces).expect("render");
        let t1 = Instant::now();
        let mut applier = Applier::new(Nft::local());
        let out = applier.apply(&desired).expect("full apply");
        let t2 = Instant::now();
        assert_eq!(out.kind, ApplyKind::Full);
        // A restarted agent with changed rules: the table exists, so one replacing nft
        // transaction.
        let t3 = Instant::now();
        let mut fresh = Applier::new(Nft::local());
        let replaced = fresh.apply_replace(&desired).expect("replacement");
        let t4 = Instant::now();
        assert_eq!(replaced.kind, ApplyKind::Full);
        // A restarted agent with the same rules: compared through the scratch table and
        // adopted as it is.
        let t5 = Instant::now();
        let adopted = Applier::new(Nft::local())
            .apply(&desired)
            .expect("adoption");
        let t6 = Instant::now();
        assert_eq!(adopted.kind, ApplyKind::Adopted);
        vec![
            ("p_full_render", ms(t1 - t0)),
            ("p_full_unhooked", phase_ms(&out, phase::NFT_UNHOOKED)),
            ("p_full_elements", phase_ms(&out, phase::NETLINK_ELEMENTS)),
            (
                "p_full_hook",
                phase_ms(&out, phase::NFT_HOOK) + phase_ms(&out, phase::NETLINK_HOOK),
            ),
            ("p_full_kernel", ms(out.duration)),
            ("p_full_readback", phase_ms(&out, phase::READ_BACK)),
            ("p_full_total", ms(t2 - t0)),
            ("p_repl_nft", phase_ms(&replaced, phase::NFT)),
            ("p_repl_readback", phase_ms(&replaced, phase::READ_BACK)),
            ("p_repl_total", ms(t4 - t3)),
            ("p_adopt_total", ms(t6 - t5)),
        ]
    })
    .join()
    .expect("palisade full apply thread")
}

fn iptables_full(netns: &str, rules: NodeRuleSet, interfaces: Interfaces) -> [f64; 4] {
    common::in_netns(netns, move || {
        let t0 = Instant::now();
        let r = iptables::render(&rules, &interfaces);
        let t1 = Instant::now();
        sh_stdin(&["ipset", "restore"], &r.ipset);
        let t2 = Instant::now();
        sh_stdin(&[iptables::restore_program(), "-w"], &r.iptables);
        let t3 = Instant::now();
        [ms(t1 - t0), ms(t2 - t1), ms(t3 - t2), ms(t3 - t0)]
    })
    .join()
    .expect("iptables full apply thread")
}

/// Counts what landed in the kernel, once, outside the timings.
fn check_loaded(netns: &str, groups: &Groups, rules: &NodeRuleSet, interfaces: &Interfaces) {
    let nft_json = sh(&[
        "ip",
        "netns",
        "exec",
        netns,
        "nft",
        "-j",
        "list",
        "set",
        "inet",
        "palisade",
        &format!("{}_4", groups.pods[0]),
    ]);
    let doc: serde_json::Value = serde_json::from_str(&nft_json).expect("nft JSON");
    let elems = doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["set"]["elem"].as_array())
        .map(Vec::len)
        .sum::<usize>();
    let expected = PER_GROUP as usize + INCREMENTAL_REPS;
    assert_eq!(
        elems, expected,
        "nft set of pod group 0 holds every address"
    );
    let r = iptables::render(rules, interfaces);
    let listing = sh(&[
        "ip",
        "netns",
        "exec",
        netns,
        "ipset",
        "list",
        "-t",
        &r.sets[&groups.pods[0]],
    ]);
    assert!(
        listing.contains(&format!("Number of entries: {expected}")),
        "ipset of pod group 0: {listing}"
    );
    let saved = sh(&["ip", "netns", "exec", netns, iptables::list_program(), "-S"]);
    let n = saved.lines().filter(|l| l.starts_with("-A ")).count();
    assert_eq!(n, r.rules, "every iptables rule loaded");
}

/// Writes what both sides load, for inspection and for timing the tools by hand.
fn dump(dir: &str, rendered: &palisade_agent::Ruleset, ipt: &iptables::Rendered) {
    let write = |name: &str, text: &str| {
        let path = format!("{dir}/{name}");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{path}: {e}"));
    };
    write(
        "table.nft",
        &palisade_agent::render::text::to_text(rendered),
    );
    write(
        "table.json",
        &palisade_agent::render::json::payload_of(&palisade_agent::render::json::replace_all(
            rendered,
        )),
    );
    write("ipset.restore", &ipt.ipset);
    write("iptables.restore", &ipt.iptables);
    println!("wrote table.nft, table.json, ipset.restore, iptables.restore to {dir}");
}

fn main() {
    if !common::can_run("apply") {
        return;
    }
    let variant = std::env::var("PALISADE_BENCH_VARIANT").unwrap_or_default();
    if variant == "tiered-render" {
        tiered::render_only();
        return;
    }
    if variant != "tiered" {
        base_bench();
    }
    if variant == "tiered" || variant == "all" {
        tiered::run();
    }
}

fn base_bench() {
    iptables::self_check();
    let (rules, groups, interfaces) = node_rules();
    let rendered = render(&rules, &interfaces).expect("render");
    let ipt = iptables::render(&rules, &interfaces);
    let nft_elements: usize = rendered.sets.values().map(|s| s.elements.len()).sum();
    let nft_rules: usize = rendered.chains.values().map(|c| c.len()).sum();
    let addresses: usize = groups.pods.len() * PER_GROUP as usize;
    println!(
        "rule set: {} pods (all isolated both ways), {} groups ({} pod addresses in {} pod groups; \
         CIDR-with-except groups {}, {}, {}; named-port group {}), {} rules",
        rules.pods.len(),
        rules.groups.len(),
        addresses,
        groups.pods.len(),
        rules.groups[&groups.internet].len(),
        rules.groups[&groups.corp].len(),
        rules.groups[&groups.quarantine].len(),
        rules.groups[&groups.metrics].len(),
        rules.rules.len()
    );
    println!(
        "nftables: {} sets, {} set elements, {} chains, {} rules",
        rendered.sets.len(),
        nft_elements,
        rendered.chains.len(),
        nft_rules
    );
    println!(
        "iptables: {} ipsets, {} ipset entries, {} iptables rules ({})",
        ipt.sets.len(),
        ipt.set_elements,
        ipt.rules,
        iptables::backend()
    );

    if let Ok(dir) = std::env::var("PALISADE_BENCH_DUMP") {
        dump(&dir, &rendered, &ipt);
    }

    let mut s = Samples::default();
    for rep in 0..FULL_REPS {
        // Alternate which side goes first, so drift in machine load hits both alike.
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let ns = Netns::new(unique("pba-"));
            if side == 0 {
                for (key, v) in palisade_full(&ns.name, rules.clone(), interfaces.clone()) {
                    s.push(key, v);
                }
            } else {
                let [render_ms, ipset_ms, ipt_ms, total] =
                    iptables_full(&ns.name, rules.clone(), interfaces.clone());
                s.push("i_full_render", render_ms);
                s.push("i_full_ipset", ipset_ms);
                s.push("i_full_iptables", ipt_ms);
                s.push("i_full_tools", ipset_ms + ipt_ms);
                s.push("i_full_total", total);
            }
        }
        eprintln!(
            "full apply rep {rep}: palisade {:.1} ms (replacement {:.1} ms, adoption of an unchanged table {:.1} ms), iptables {:.1} ms",
            s.0["p_full_total"].last().copied().unwrap_or(f64::NAN),
            s.0["p_repl_total"].last().copied().unwrap_or(f64::NAN),
            s.0["p_adopt_total"].last().copied().unwrap_or(f64::NAN),
            s.0["i_full_total"].last().copied().unwrap_or(f64::NAN)
        );
    }

    // Incremental: both sides loaded in one namespace, one address added per step.
    let ns = Netns::new(unique("pbi-"));
    let (r0, g0, i0) = (rules.clone(), groups.pods[0].clone(), interfaces.clone());
    let set0 = ipt.sets[&groups.pods[0]].clone();
    let incremental = common::in_netns(&ns.name, move || {
        let mut applier = Applier::new(Nft::local());
        // The agent keeps one renderer: unchanged groups are not expanded again.
        let mut renderer = Renderer::default();
        applier
            .apply(&renderer.render(&r0, &i0).expect("render"))
            .expect("initial apply");
        let r = iptables::render(&r0, &i0);
        sh_stdin(&["ipset", "restore"], &r.ipset);
        sh_stdin(&[iptables::restore_program(), "-w"], &r.iptables);
        let mut out: Vec<[f64; 8]> = Vec::new();
        let mut extra = Vec::new();
        for i in 0..INCREMENTAL_REPS {
            extra.push(extra_address(i));
            // Building the changed rule set is the compiler's work, not the agent's.
            let changed = with_extra_address(&r0, &g0, &extra);
            let t0 = Instant::now();
            let desired = renderer.render(&changed, &i0).expect("render");
            let t1 = Instant::now();
            let outcome = applier.apply(&desired).expect("incremental apply");
            let t2 = Instant::now();
            assert_eq!(outcome.kind, ApplyKind::Incremental);
            assert_eq!(outcome.commands, 1, "one set-element change");
            assert_eq!(
                outcome.phases.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                vec![phase::NETLINK_ELEMENTS],
                "a netlink batch, no read-back"
            );
            let addr = extra_address(i).to_string();
            let t3 = Instant::now();
            sh(&["ipset", "add", &set0, &addr]);
            let t4 = Instant::now();
            // What a /metrics scrape costs: the agent's netlink dump, and `nft list
            // counters` (which fetches every set element first).
            let n_netlink = applier.nft().counters().expect("netlink counters").len();
            let t5 = Instant::now();
            let n_nft = applier.nft().counters_by_nft().expect("nft counters").len();
            let t6 = Instant::now();
            assert_eq!(n_netlink, n_nft, "both readers see every counter");
            out.push([
                ms(t1 - t0),
                ms(outcome.duration),
                ms(t2 - t1),
                ms(t2 - t0),
                ms(t4 - t3),
                ms(t5 - t4),
                ms(t6 - t5),
                phase_ms(&outcome, phase::NETLINK_ELEMENTS),
            ]);
        }
        // A periodic reconcile of the table in force: the netlink read-out with a digest
        // of every set's elements (150,000 read back), compared with the expected image.
        let desired = renderer
            .render(&with_extra_address(&r0, &g0, &extra), &i0)
            .expect("render");
        let reconciles: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let outcome = applier.reconcile(&desired).expect("reconcile");
                assert_eq!(outcome, ReconcileOutcome::InSync);
                ms(t.elapsed())
            })
            .collect();
        (out, reconciles)
    })
    .join()
    .expect("incremental thread");
    let (incremental, reconciles) = incremental;
    for v in reconciles {
        s.push("p_reconcile", v);
    }
    for [render_ms, kernel_ms, apply_ms, total, ipset_ms, netlink_ms, list_ms, batch_ms] in
        incremental
    {
        s.push("p_inc_batch", batch_ms);
        s.push("p_counters_netlink", netlink_ms);
        s.push("p_counters_nft", list_ms);
        s.push("p_inc_render", render_ms);
        s.push("p_inc_kernel", kernel_ms);
        s.push("p_inc_apply", apply_ms);
        s.push("p_inc_total", total);
        s.push("i_inc_ipset", ipset_ms);
    }
    check_loaded(&ns.name, &groups, &rules, &interfaces);
    drop(ns);

    let f = |v: f64| format!("{v:.1}");
    let f2 = |v: f64| format!("{v:.2}");
    let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
    println!();
    println!("Full apply (median of {FULL_REPS}, ms; fresh namespace each time, interleaved):");
    let row = |label: &str, p: Option<&str>, i: Option<&str>, target: &str| -> Vec<String> {
        let pv = p.map(|k| s.median(k));
        let iv = i.map(|k| s.median(k));
        vec![
            label.into(),
            pv.map(f).unwrap_or_default(),
            iv.map(f).unwrap_or_default(),
            match (pv, iv) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => String::new(),
            },
            target.into(),
        ]
    };
    print_table(&[
        vec![
            "step".into(),
            "Palisade nft".into(),
            "iptables+ipset".into(),
            "Palisade/iptables".into(),
            "target".into(),
        ],
        row(
            "render (rule set → table/scripts)",
            Some("p_full_render"),
            Some("i_full_render"),
            "",
        ),
        row(
            "txn 1: nft -f (text), table without base chains and host set elements",
            Some("p_full_unhooked"),
            None,
            "",
        ),
        row(
            "txn 2: netlink batch, 150,000 host set elements",
            Some("p_full_elements"),
            None,
            "",
        ),
        row(
            "txn 3: nft -j -f, base chains (enforcement starts)",
            Some("p_full_hook"),
            None,
            "",
        ),
        row(
            "kernel transactions (txn 1-3 | ipset restore + iptables-restore)",
            Some("p_full_kernel"),
            Some("i_full_tools"),
            "",
        ),
        vec![
            "  of which ipset restore / iptables-restore".into(),
            String::new(),
            format!(
                "{} / {}",
                f(s.median("i_full_ipset")),
                f(s.median("i_full_iptables"))
            ),
            String::new(),
            String::new(),
        ],
        row(
            "read-back for drift detection (netlink dump)",
            Some("p_full_readback"),
            None,
            "",
        ),
        row(
            "total (render + Applier::apply incl. read-back | render + both restores)",
            Some("p_full_total"),
            Some("i_full_total"),
            "≤ 500",
        ),
    ]);
    println!();
    println!(
        "Replacement of an existing table (a restarted agent whose rules changed; one nft transaction; median of {FULL_REPS}, ms):"
    );
    print_table(&[
        vec![
            "step".into(),
            "Palisade nft".into(),
            "iptables+ipset (full apply)".into(),
            "Palisade/iptables".into(),
            "target".into(),
        ],
        row(
            "nft -f (text): add table; delete table; add table; …",
            Some("p_repl_nft"),
            None,
            "",
        ),
        row(
            "read-back (netlink dump)",
            Some("p_repl_readback"),
            None,
            "",
        ),
        row(
            "total Applier::apply",
            Some("p_repl_total"),
            Some("i_full_total"),
            "",
        ),
        row(
            "adoption instead (same rules: compared via a scratch table, kept)",
            Some("p_adopt_total"),
            None,
            "",
        ),
    ]);
    println!();
    println!("Incremental: one address added to one 7,500-address group (median of {INCREMENTAL_REPS}, ms):");
    print_table(&[
        vec![
            "step".into(),
            "Palisade nft".into(),
            "iptables+ipset".into(),
            "Palisade/iptables".into(),
            "target".into(),
        ],
        vec![
            "render (Renderer: only the changed group)".into(),
            f2(s.median("p_inc_render")),
            "-".into(),
            String::new(),
            String::new(),
        ],
        vec![
            "kernel (netlink element batch | ipset add)".into(),
            f2(s.median("p_inc_batch")),
            f2(s.median("i_inc_ipset")),
            ratio(s.median("p_inc_batch"), s.median("i_inc_ipset")),
            String::new(),
        ],
        vec![
            "Applier::apply (plan + batch + bookkeeping; no read-back)".into(),
            f2(s.median("p_inc_apply")),
            String::new(),
            String::new(),
            String::new(),
        ],
        vec![
            "total (render + Applier::apply | ipset add)".into(),
            f2(s.median("p_inc_total")),
            f2(s.median("i_inc_ipset")),
            ratio(s.median("p_inc_total"), s.median("i_inc_ipset")),
            "≤ 5".into(),
        ],
    ]);
    println!();
    println!(
        "Reconcile of the table in force (netlink read-out incl. a digest of all 150,211 set \
         elements; median of 5): {:.1} ms",
        s.median("p_reconcile")
    );
    println!();
    println!(
        "Reading every named counter (one /metrics scrape; median of {INCREMENTAL_REPS}, ms):"
    );
    print_table(&[
        vec!["reader".into(), "ms".into()],
        vec![
            "netlink GETOBJ dump (the agent's)".into(),
            f2(s.median("p_counters_netlink")),
        ],
        vec![
            "nft -j list counters table inet palisade".into(),
            f2(s.median("p_counters_nft")),
        ],
    ]);
}

/// The tiered variant (see the module docs).
mod tiered {
    use super::*;

    const TIERED_POLICIES: usize = 100;
    const RULES_PER_POLICY: usize = 25;
    const FULL_REPS: usize = 3;
    const INCREMENTAL_REPS: usize = 10;

    /// The agent's renderer; with `PALISADE_BENCH_CLASSES=off`, tier lists render as one
    /// plain chain each (as before address classes), for a figure side by side.
    fn renderer() -> Renderer {
        let mut r = Renderer::default();
        if std::env::var("PALISADE_BENCH_CLASSES").as_deref() == Ok("off") {
            r.set_classes_from(usize::MAX);
        }
        r
    }

    /// The base node with the tiered lists on top: one Admin and one Baseline list per
    /// direction, shared (one allocation) by every pod as the compiler shares them.
    pub fn node_rules() -> (NodeRuleSet, Groups, Interfaces) {
        use Protocol::Tcp;
        let (rules, groups, interfaces) = super::node_rules();
        let mut b = Builder { rules };
        // 25 CIDR groups, one /24 per rule index (the workload's `ipBlock` peers).
        let cidrs: Vec<String> = (0..RULES_PER_POLICY)
            .map(|r| {
                let id = group_id(&format!("tier-cidr-{r}"));
                let net = format!("192.168.{}.0/24", 100 + r);
                b.rules
                    .groups
                    .insert(id.clone(), Arc::new(Group::Addresses(block(&net, &[]))));
                id
            })
            .collect();
        let mut lists = BTreeMap::new();
        for (tier, direction) in [
            (Tier::Admin, Direction::Ingress),
            (Tier::Admin, Direction::Egress),
            (Tier::Baseline, Direction::Ingress),
            (Tier::Baseline, Direction::Egress),
        ] {
            let offset = if tier == Tier::Admin {
                0
            } else {
                TIERED_POLICIES
            };
            let mut list = Vec::new();
            for k in offset..offset + TIERED_POLICIES {
                let name: &'static str = Box::leak(format!("cnp-{k}").into_boxed_str());
                for (r, cidr) in cidrs.iter().enumerate() {
                    let action = match (tier, r % 3) {
                        (Tier::Admin, 0) => Action::Pass,
                        (_, 1) => Action::Deny,
                        _ => Action::Allow,
                    };
                    let peer = match r % 4 {
                        0 => groups.pods[(k + r) % POD_GROUPS].clone(),
                        1 => groups.pods[r % 6].clone(),
                        2 => cidr.clone(),
                        _ => groups.corp.clone(),
                    };
                    let clause = match r % 3 {
                        0 => peer_port(&[&peer], ports(&[(Tcp, 8000 + r as u16, 8100)])),
                        1 => Clause::NamedPort {
                            group: groups.metrics.clone(),
                        },
                        _ => peer_port(&[&peer], None),
                    };
                    list.push(b.instance(
                        (PolicyKind::ClusterNetworkPolicy, None, name),
                        (tier, (k % 100 * 10) as u32),
                        direction,
                        r,
                        action,
                        vec![clause],
                    ));
                }
            }
            lists.insert((tier, direction), Arc::new(TierList::new(list)));
        }
        for (i, pod) in b.rules.pods.iter_mut().enumerate() {
            let isolated = (i / PODS_PER_NAMESPACE).is_multiple_of(2);
            for direction in [Direction::Ingress, Direction::Egress] {
                let d = match direction {
                    Direction::Ingress => Arc::make_mut(&mut pod.ingress),
                    Direction::Egress => Arc::make_mut(&mut pod.egress),
                };
                let mut admin = (*d.admin).to_vec();
                admin.extend(lists[&(Tier::Admin, direction)].iter().cloned());
                d.admin = Arc::new(TierList::new(admin));
                d.baseline = lists[&(Tier::Baseline, direction)].clone();
                if !isolated {
                    d.isolated_by.clear();
                    d.network_policy.clear();
                }
            }
        }
        // The base admin rules come first in every pod alike, so the pods of one
        // direction still share one Admin list.
        for direction in [Direction::Ingress, Direction::Egress] {
            let first = match direction {
                Direction::Ingress => b.rules.pods[0].ingress.admin.clone(),
                Direction::Egress => b.rules.pods[0].egress.admin.clone(),
            };
            for pod in &mut b.rules.pods {
                let d = match direction {
                    Direction::Ingress => Arc::make_mut(&mut pod.ingress),
                    Direction::Egress => Arc::make_mut(&mut pod.egress),
                };
                d.admin = first.clone();
            }
        }
        (b.rules, groups, interfaces)
    }

    /// `rules` with one more pod (like the first one, on a new interface).
    fn with_pod(
        rules: &NodeRuleSet,
        interfaces: &Interfaces,
        i: usize,
    ) -> (NodeRuleSet, Interfaces) {
        let mut rules = rules.clone();
        let mut interfaces = interfaces.clone();
        let mut pod = rules.pods[0].clone();
        pod.name = format!("new-{i}");
        pod.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 244, 8, i as u8 + 2))];
        interfaces.insert(
            PodKey::new(&pod.namespace, &pod.name),
            format!("calinew{i:04}"),
        );
        rules.pods.push(pod);
        (rules, interfaces)
    }

    /// The tiered variant's renders alone, without a namespace or the kernel
    /// (`PALISADE_BENCH_VARIANT=tiered-render`, `PALISADE_BENCH_REPS` steps of each kind,
    /// default 30): a quick loop for the renderer. The last table is held, as an applier
    /// holds it, and the last one-pod render is checked against a fresh one.
    pub fn render_only() {
        let reps: usize = std::env::var("PALISADE_BENCH_REPS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(30);
        let (rules, groups, interfaces) = node_rules();
        let mut s = Samples::default();
        let mut renderer = renderer();
        let t = Instant::now();
        let mut held = renderer.render(&rules, &interfaces).expect("render");
        s.push("full", ms(t.elapsed()));
        let mut extra = Vec::new();
        for i in 0..reps {
            extra.push(extra_address(i));
            let changed = with_extra_address(&rules, &groups.pods[0], &extra);
            let t = Instant::now();
            held = renderer.render(&changed, &interfaces).expect("render");
            s.push("address", ms(t.elapsed()));
        }
        let (mut rules, mut interfaces) = (
            with_extra_address(&rules, &groups.pods[0], &extra),
            interfaces,
        );
        for i in 0..reps {
            (rules, interfaces) = with_pod(&rules, &interfaces, i);
            let t = Instant::now();
            held = renderer.render(&rules, &interfaces).expect("render");
            s.push("pod", ms(t.elapsed()));
        }
        let t = Instant::now();
        let fresh = self::renderer()
            .render(&rules, &interfaces)
            .expect("render");
        s.push("fresh", ms(t.elapsed()));
        assert!(held == fresh, "incremental render differs from a fresh one");
        println!(
            "tiered renders, ms: first {:.1}, fresh {:.1}; medians of {reps}: one address {:.3}, \
             one pod {:.3}",
            s.median("full"),
            s.median("fresh"),
            s.median("address"),
            s.median("pod")
        );
    }

    pub fn run() {
        let (rules, groups, interfaces) = node_rules();
        let t = Instant::now();
        let rendered = renderer().render(&rules, &interfaces).expect("render");
        let render_ms = ms(t.elapsed());
        let nft_rules: usize = rendered.chains.values().map(|c| c.len()).sum();
        let classes: Vec<_> = rendered
            .sets
            .values()
            .filter(|s| matches!(s.kind, palisade_agent::render::SetKind::Classes(_)))
            .collect();
        println!();
        println!(
            "tiered variant: {} pods ({} isolated both ways), {} groups, {} rules; \
             nftables: {} chains, {} rules, {} class maps of {} elements (first render \
             {render_ms:.0} ms)",
            rules.pods.len(),
            rules
                .pods
                .iter()
                .filter(|p| !p.ingress.isolated_by.is_empty())
                .count(),
            rules.groups.len(),
            rules.rules.len(),
            rendered.chains.len(),
            nft_rules,
            classes.len(),
            classes.iter().map(|s| s.elements.len()).sum::<usize>(),
        );
        drop(rendered);
        let mut s = Samples::default();
        for rep in 0..FULL_REPS {
            let ns = Netns::new(unique("pbt-"));
            let (r, i) = (rules.clone(), interfaces.clone());
            let (full, kernel, phases) = common::in_netns(&ns.name, move || {
                let t0 = Instant::now();
                let desired = renderer().render(&r, &i).expect("render");
                let out = Applier::new(Nft::local())
                    .apply(&desired)
                    .expect("full apply");
                assert_eq!(out.kind, ApplyKind::Full);
                let phases: Vec<String> = out
                    .phases
                    .iter()
                    .map(|(name, d)| format!("{name} {:.1}", ms(*d)))
                    .collect();
                (ms(t0.elapsed()), ms(out.duration), phases.join(", "))
            })
            .join()
            .expect("tiered full apply thread");
            eprintln!("tiered full apply rep {rep}: {full:.1} ms ({phases})");
            s.push("full", full);
            s.push("full_kernel", kernel);
        }

        let ns = Netns::new(unique("pbu-"));
        let (r0, g0, i0) = (rules.clone(), groups.pods[0].clone(), interfaces.clone());
        let samples = common::in_netns(&ns.name, move || {
            let mut applier = Applier::new(Nft::local());
            let mut renderer = renderer();
            applier
                .apply(&renderer.render(&r0, &i0).expect("render"))
                .expect("initial apply");
            let mut out = Vec::new();
            let mut extra = Vec::new();
            for i in 0..INCREMENTAL_REPS {
                extra.push(extra_address(i));
                let changed = with_extra_address(&r0, &g0, &extra);
                let t0 = Instant::now();
                let desired = renderer.render(&changed, &i0).expect("render");
                let t1 = Instant::now();
                let outcome = applier.apply(&desired).expect("incremental apply");
                assert_eq!(outcome.kind, ApplyKind::Incremental);
                out.push(("address", ms(t0.elapsed())));
                out.push(("address_render", ms(t1 - t0)));
                out.push(("address_kernel", ms(outcome.duration)));
            }
            let (mut rules, mut interfaces) = (with_extra_address(&r0, &g0, &extra), i0);
            for i in 0..INCREMENTAL_REPS {
                // Each step adds one pod to the table of the previous step.
                let (changed, more) = with_pod(&rules, &interfaces, i);
                (rules, interfaces) = (changed.clone(), more.clone());
                let t0 = Instant::now();
                let desired = renderer.render(&changed, &more).expect("render");
                let t1 = Instant::now();
                let outcome = applier.apply(&desired).expect("incremental apply");
                assert_eq!(outcome.kind, ApplyKind::Incremental);
                out.push(("pod", ms(t0.elapsed())));
                out.push(("pod_render", ms(t1 - t0)));
                // Over netlink, or nft where a rule needs an anonymous set.
                let transaction =
                    phase_ms(&outcome, phase::NETLINK_TRANSACTION) + phase_ms(&outcome, phase::NFT);
                out.push(("pod_transaction", transaction));
                out.push(("pod_readback", phase_ms(&outcome, phase::READ_BACK)));
            }
            // The kernel's share of a pod added: one egress dispatch element (another
            // interface name for a pod's entry chain) and nothing else. A verdict that
            // jumps makes the commit validate every rule reachable from the base chains,
            // which is most of a pod's transaction; measured beside it, in the same table.
            let applied = applier.applied().expect("applied").clone();
            let chain = applied
                .egress_dispatch
                .values()
                .next()
                .expect("a pod")
                .clone();
            for i in 0..INCREMENTAL_REPS {
                let mut more = applied.clone();
                more.egress_dispatch
                    .insert(format!("pfloor{i}"), chain.clone());
                let outcome = applier.apply(&more).expect("one dispatch element");
                assert_eq!(outcome.kind, ApplyKind::Incremental);
                let Some((_, transaction)) = outcome
                    .phases
                    .iter()
                    .find(|(name, _)| *name == phase::NETLINK_TRANSACTION)
                else {
                    panic!(
                        "one dispatch element goes over netlink: {:?}",
                        outcome.phases
                    );
                };
                out.push(("floor_transaction", ms(*transaction)));
                applier.apply(&applied).expect("dispatch element removed");
            }
            out
        })
        .join()
        .expect("tiered incremental thread");
        for (key, v) in samples {
            s.push(key, v);
        }
        drop(ns);
        println!(
            "Tiered variant, ms: full apply (render + Applier::apply incl. read-back; median of \
             {FULL_REPS}) {:.1} (kernel {:.1}; target ≤ 500); incremental, render + \
             Applier::apply (median of {INCREMENTAL_REPS}): one address {:.2}, one pod added \
             {:.2} (target ≤ 5)",
            s.median("full"),
            s.median("full_kernel"),
            s.median("address"),
            s.median("pod")
        );
        println!(
            "  of which: one address: render {:.2}, kernel {:.2}; one pod: render {:.2}, \
             transaction {:.2}, read-back {:.2}; one dispatch element alone (the commit's \
             validation of the table): transaction {:.2}",
            s.median("address_render"),
            s.median("address_kernel"),
            s.median("pod_render"),
            s.median("pod_transaction"),
            s.median("pod_readback"),
            s.median("floor_transaction")
        );
    }
}
