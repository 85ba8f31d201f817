//! palisadectl with real packets: `verify --dataplane` and `demo`, each building a lab of
//! network namespaces with one agent process per node. Root only.

use std::path::PathBuf;
use std::process::{Command, Output};

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/conformance/examples"
);
const SUITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/conformance");

/// Root, iproute2 and nft, under the project's skip policy (`PALISADE_NO_SKIP=1` fails).
fn can_run() -> bool {
    use palisade_testkit::{IP, NFT, ROOT};
    palisade_testkit::can_run(&[ROOT, IP, NFT])
}

/// The agent binary beside palisadectl, built now (a no-op when fresh) so that a test never
/// runs an agent older than the sources.
fn agent() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_palisadectl"));
    let agent = bin.with_file_name("palisade-agent");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "palisade-agent"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building palisade-agent");
    agent
}

/// The controller binary, built beside palisadectl for the demo (always through cargo, as
/// the agent: one left from older sources would speak an older stream).
fn controller() -> String {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_palisadectl"));
    let controller = bin.with_file_name("palisade-controller");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "palisade-controller"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building palisade-controller");
    controller.display().to_string()
}

/// Runs palisadectl and checks that it left none of its labs' namespaces behind (labs are
/// named after the process that built them).
fn run(args: &[&str]) -> Output {
    let agent = agent();
    let child = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .args(args)
        .arg("--agent")
        .arg(agent)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run palisadectl");
    let prefix = format!("pl{}x", child.id());
    let out = child.wait_with_output().expect("wait for palisadectl");
    let left = namespaces_with_prefix(&prefix);
    assert!(
        left.is_empty(),
        "palisadectl left namespaces behind: {left:?}"
    );
    out
}

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn verify_dataplane_passes_the_shared_examples_and_fails_a_wrong_expectation() {
    if !can_run() {
        return;
    }
    let out = run(&[
        "verify",
        "--dataplane",
        &format!("{EXAMPLES}/three-tier-shop"),
        &format!("{EXAMPLES}/admin-tiers"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A late first packet may pass on its retry; the summary says how many did.
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("22 passed") && last.ends_with(", 0 failed"),
        "{text}"
    );

    // The same scenario with expectations flipped must fail on exactly those probes, with
    // packets: an allow the policies deny (the packet is dropped), and a deny on a flow
    // the policies allow (it connects).
    let dir = std::env::temp_dir().join(format!("palisadectl-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["cluster.yaml", "policies.yaml"] {
        std::fs::copy(format!("{EXAMPLES}/three-tier-shop/{f}"), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("probes.yaml"),
        "probes:\n  - {from: shop/web-1, to: shop/db-1, port: 5432, expect: allow}\n  - {from: shop/api-1, to: shop/db-1, port: pg, expect: allow}\n  - {from: shop/api-1, to: shop/db-1, port: pg, expect: deny}\n",
    )
    .unwrap();
    let out = run(&["verify", "--dataplane", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 2, "{text}");
    assert!(
        fails[0].contains("probes[0]") && fails[0].contains("expected allow, the probe timed out"),
        "{text}"
    );
    assert!(
        fails[1].contains("probes[2]") && fails[1].contains("expected deny, the probe connected"),
        "{text}"
    );
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("1 passed") && last.ends_with(", 2 failed"),
        "{text}"
    );
}

/// SCTP probes are skipped, with the reason, exactly when the kernel lacks SCTP; where it
/// has SCTP they run and pass.
#[test]
fn verify_dataplane_skips_sctp_only_when_the_kernel_lacks_it() {
    if !can_run() {
        return;
    }
    let out = run(&["verify", "--dataplane", &format!("{SUITE}/np-sctp")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(last.contains(" 0 failed"), "{text}");
    let skips: Vec<&str> = text.lines().filter(|l| l.starts_with("SKIP ")).collect();
    if palisade_netlab::kernel_supports_sctp() {
        assert!(skips.is_empty(), "{text}");
    } else {
        assert!(!skips.is_empty(), "{text}");
        assert!(
            skips
                .iter()
                .all(|l| l.ends_with(": the kernel does not support SCTP")),
            "{text}"
        );
        assert!(
            last.ends_with(&format!(", {} skipped", skips.len())),
            "{text}"
        );
    }
}

#[test]
fn demo_shows_the_policies_at_work_and_cleans_up() {
    if !can_run() {
        return;
    }
    let controller = controller();
    let out = run(&["demo", "--no-wait", "--controller", &controller]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (open, enforced) = text
        .split_once("Connectivity with the policies:")
        .expect("two matrices");
    let row = |matrix: &str, src: &str| -> Vec<String> {
        let line = matrix
            .lines()
            .find(|l| l.starts_with(src))
            .unwrap_or_else(|| panic!("no row {src}: {matrix}"));
        line.split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    // Columns: coredns:53, prometheus:9090, api:9000, db:5432, web:8080.
    assert!(row(open, "shop/web").iter().all(|c| c == "allow"), "{open}");
    assert_eq!(
        row(enforced, "shop/web"),
        ["allow", "deny", "allow", "deny", "allow"],
        "{enforced}"
    );
    assert_eq!(
        row(enforced, "shop/api"),
        ["allow", "deny", "allow", "allow", "deny"],
        "{enforced}"
    );
    assert_eq!(
        row(enforced, "monitoring/prometheus"),
        ["allow", "allow", "deny", "deny", "allow"],
        "{enforced}"
    );
    assert!(
        !text.contains("(!)"),
        "the dataplane agrees with the compiled rule sets: {text}"
    );
    assert!(
        text.contains("palisade_rule_packets_total{"),
        "rule hits are shown: {text}"
    );
    assert!(text.contains("/metrics"), "{text}");
    assert!(
        text.contains("Controller: http://127.0.0.1:"),
        "the agents stream from a controller: {text}"
    );
}

/// A small deterministic random source (SplitMix64): the scenarios below must be the same
/// on every run for a given seed.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const PORTS: [u16; 5] = [53, 80, 443, 8080, 9090];

fn labels(r: &mut Rand) -> String {
    let mut pairs = Vec::new();
    for k in KEYS {
        if r.one_in(2) {
            pairs.push(format!("{k}: {}", r.pick(&VALUES)));
        }
    }
    format!("{{{}}}", pairs.join(", "))
}

fn selector(r: &mut Rand) -> String {
    match r.below(3) {
        0 => "{}".to_string(),
        1 => format!("{{matchLabels: {}}}", labels(r)),
        _ => {
            let key = r.pick(&KEYS);
            match r.pick(&["In", "NotIn", "Exists", "DoesNotExist"]) {
                op @ ("In" | "NotIn") => format!(
                    "{{matchExpressions: [{{key: {key}, operator: {op}, values: [{}]}}]}}",
                    r.pick(&VALUES)
                ),
                op => format!("{{matchExpressions: [{{key: {key}, operator: {op}}}]}}"),
            }
        }
    }
}

/// An IPv4 block of the scenario's address plan (10.60.0.x), sometimes with an except.
fn ip_block(r: &mut Rand) -> String {
    let len = [24u32, 27, 28, 29, 30, 32][r.below(6)];
    let size = 1u32 << (32 - len);
    let base = (r.below(32) as u32) / size * size;
    let cidr = format!("10.60.0.{base}/{len}");
    if len < 32 && r.one_in(2) {
        let sub_len = len + 1 + r.below((32 - len) as usize) as u32;
        let sub_size = 1u32 << (32 - sub_len);
        let sub = base + (r.below(size as usize) as u32) / sub_size * sub_size;
        format!("{{cidr: {cidr}, except: [10.60.0.{sub}/{sub_len}]}}")
    } else {
        format!("{{cidr: {cidr}}}")
    }
}

fn np_ports(r: &mut Rand) -> String {
    let one = |r: &mut Rand| {
        let protocol = r.pick(&["TCP", "UDP"]);
        match r.below(3) {
            0 => format!("{{port: {}, protocol: {protocol}}}", PORTS[r.below(5)]),
            1 => format!("{{port: 80, endPort: 8080, protocol: {protocol}}}"),
            _ => format!("{{port: {}, protocol: {protocol}}}", r.pick(&PORT_NAMES)),
        }
    };
    let n = 1 + r.below(2);
    let items: Vec<String> = (0..n).map(|_| one(r)).collect();
    format!("[{}]", items.join(", "))
}

/// `ingress:` and `egress:` sections of 0-2 rules each (`rule(r, field, peers field)`).
fn rule_sections(r: &mut Rand, mut rule: impl FnMut(&mut Rand, &str, &str) -> String) -> String {
    let mut rules = String::new();
    for (field, peers) in [("ingress", "from"), ("egress", "to")] {
        let n = r.below(3);
        if n > 0 {
            rules.push_str(&format!("  {field}:\n"));
        }
        for _ in 0..n {
            rules.push_str(&format!("    - {}\n", rule(r, field, peers)));
        }
    }
    rules
}

fn network_policy(r: &mut Rand, index: usize) -> String {
    let ns = format!("ns{}", r.below(3));
    let types = r.pick(&["[Ingress]", "[Egress]", "[Ingress, Egress]"]);
    let rules = rule_sections(r, |r, _, peers| {
        let mut parts = Vec::new();
        if !r.one_in(3) {
            let m = 1 + r.below(2);
            let list: Vec<String> = (0..m)
                .map(|_| match r.below(3) {
                    0 => format!("{{podSelector: {}}}", selector(r)),
                    1 => format!(
                        "{{namespaceSelector: {}, podSelector: {}}}",
                        selector(r),
                        selector(r)
                    ),
                    _ => format!("{{ipBlock: {}}}", ip_block(r)),
                })
                .collect();
            parts.push(format!("{peers}: [{}]", list.join(", ")));
        }
        if !r.one_in(3) {
            parts.push(format!("ports: {}", np_ports(r)));
        }
        format!("{{{}}}", parts.join(", "))
    });
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: {ns}, name: np{index}}}\n\
         spec:\n  podSelector: {}\n  policyTypes: {types}\n{rules}",
        selector(r)
    )
}

fn cnp_protocols(r: &mut Rand) -> String {
    let n = 1 + r.below(2);
    let items: Vec<String> = (0..n)
        .map(|_| {
            let proto = r.pick(&["tcp", "udp"]);
            match r.below(3) {
                0 => format!(
                    "{{{proto}: {{destinationPort: {{number: {}}}}}}}",
                    PORTS[r.below(5)]
                ),
                1 => {
                    format!("{{{proto}: {{destinationPort: {{range: {{start: 80, end: 443}}}}}}}}")
                }
                _ => format!("{{destinationNamedPort: {}}}", r.pick(&PORT_NAMES)),
            }
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn cluster_network_policy(r: &mut Rand, index: usize) -> String {
    let tier = r.pick(&["Admin", "Baseline"]);
    let subject = if r.one_in(2) {
        format!("{{namespaces: {}}}", selector(r))
    } else {
        format!(
            "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
            selector(r),
            selector(r)
        )
    };
    let rules = rule_sections(r, |r, field, peers| {
        let action = r.pick(&["Accept", "Deny", "Pass"]);
        let protocols = if r.one_in(2) {
            format!(", protocols: {}", cnp_protocols(r))
        } else {
            String::new()
        };
        // The API refuses named ports with nodes or networks peers (they have none).
        let address_peers = field == "egress" && !protocols.contains("NamedPort");
        let m = 1 + r.below(2);
        let list: Vec<String> = (0..m)
            .map(|_| match (address_peers, r.below(4)) {
                (_, 0) => format!("{{namespaces: {}}}", selector(r)),
                (true, 2) => format!("{{nodes: {}}}", selector(r)),
                (true, 3) => {
                    let len = [24u32, 28, 30, 32][r.below(4)];
                    let size = 1u32 << (32 - len);
                    let base = (r.below(32) as u32) / size * size;
                    format!("{{networks: [10.60.0.{base}/{len}]}}")
                }
                _ => format!(
                    "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
                    selector(r),
                    selector(r)
                ),
            })
            .collect();
        format!(
            "{{action: {action}, {peers}: [{}]{protocols}}}",
            list.join(", ")
        )
    });
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: cnp{index}}}\n\
         spec:\n  tier: {tier}\n  priority: {}\n  subject: {subject}\n{rules}",
        r.below(3)
    )
}

/// A random scenario's cluster and policies, and its pods (namespace/name, IPv6 or not).
fn random_cluster(r: &mut Rand) -> (String, String, Vec<(String, bool)>) {
    let mut cluster = String::new();
    for n in 1..=2 {
        cluster.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}, labels: {}}}\n\
             status: {{addresses: [{{type: InternalIP, address: 10.60.0.{n}}}, {{type: InternalIP, address: \"fd60::{n}\"}}]}}\n---\n",
            labels(r)
        ));
    }
    for ns in 0..3 {
        cluster.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{ns}, labels: {}}}\n---\n",
            labels(r)
        ));
    }
    let mut pods = Vec::new();
    for i in 0..3 + r.below(4) {
        let ns = format!("ns{}", r.below(3));
        let host = r.one_in(8);
        let dual = host || !r.one_in(4);
        let mut names: Vec<&str> = PORT_NAMES.to_vec();
        let ports: Vec<String> = (0..r.below(3))
            .map(|_| {
                let protocol = r.pick(&["TCP", "UDP"]);
                let port = PORTS[r.below(5)];
                match names.len() {
                    0 => format!("{{containerPort: {port}, protocol: {protocol}}}"),
                    n => {
                        let name = names.remove(r.below(n));
                        format!("{{name: {name}, containerPort: {port}, protocol: {protocol}}}")
                    }
                }
            })
            .collect();
        let status = if host {
            String::new()
        } else if dual {
            format!(
                "status: {{podIP: 10.60.0.{0}, podIPs: [{{ip: 10.60.0.{0}}}, {{ip: \"fd60::{0:x}\"}}]}}\n",
                16 + i
            )
        } else {
            format!(
                "status: {{podIP: 10.60.0.{0}, podIPs: [{{ip: 10.60.0.{0}}}]}}\n",
                16 + i
            )
        };
        cluster.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: {ns}, name: p{i}, labels: {}}}\n\
             spec: {{nodeName: node-{}, hostNetwork: {host}, containers: [{{name: c, ports: [{}]}}]}}\n{status}---\n",
            labels(r),
            1 + r.below(2),
            ports.join(", ")
        ));
        pods.push((format!("{ns}/p{i}"), dual));
    }
    let mut policies = Vec::new();
    for j in 0..r.below(4) {
        policies.push(network_policy(r, j));
    }
    for j in 0..r.below(4) {
        policies.push(cluster_network_policy(r, j));
    }
    (cluster, policies.join("---\n"), pods)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The randomized dataplane property through the whole agent path: random scenarios in
/// FORMAT.md (nodes, namespaces, pods with named ports and host-network ones,
/// NetworkPolicies with ipBlocks, Admin and Baseline ClusterNetworkPolicies with Pass),
/// their probes' expectations set by the reference evaluator, then `verify --dataplane`:
/// one agent per node in a netlab cluster, real packets. A failing scenario's directory is
/// kept and named, so it reproduces with `palisadectl verify --dataplane DIR`.
///
/// `PALISADE_DATAPLANE_SCENARIOS` (default 30) × `PALISADE_DATAPLANE_PROBES` (default 50),
/// `PALISADE_DATAPLANE_SEED` (default 1).
#[test]
fn random_scenarios_agree_with_the_evaluator_through_agents() {
    if !can_run() {
        return;
    }
    let scenarios = env_or("PALISADE_DATAPLANE_SCENARIOS", 30);
    let per = env_or("PALISADE_DATAPLANE_PROBES", 50);
    let seed = env_or("PALISADE_DATAPLANE_SEED", 1) as u64;
    let root = std::env::temp_dir().join(format!("palisade-random-{}", std::process::id()));
    let mut r = Rand(seed);
    let (mut dirs, mut denies) = (Vec::new(), 0);
    for case in 0..scenarios {
        let dir = root.join(format!("seed{seed}-case{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cluster, policies, pods) = random_cluster(&mut r);
        std::fs::write(dir.join("cluster.yaml"), cluster).unwrap();
        std::fs::write(dir.join("policies.yaml"), policies).unwrap();
        let mut probes = Vec::new();
        for _ in 0..per {
            let (from, from6) = &pods[r.below(pods.len())];
            let (to, to6) = &pods[r.below(pods.len())];
            let family = if *from6 && *to6 && r.one_in(2) {
                "IPv6"
            } else {
                "IPv4"
            };
            let protocol = r.pick(&["TCP", "UDP"]);
            let port = [53u16, 80, 443, 8080, 9090, 1234][r.below(6)];
            probes.push((from.clone(), to.clone(), port, protocol, family));
        }
        let text = |expect: &dyn Fn(usize) -> &'static str| {
            let lines: Vec<String> = probes
                .iter()
                .enumerate()
                .map(|(i, (from, to, port, protocol, family))| {
                    format!(
                        "  - {{from: {from}, to: {to}, port: {port}, protocol: {protocol}, family: {family}, expect: {}}}",
                        expect(i)
                    )
                })
                .collect();
            format!("probes:\n{}\n", lines.join("\n"))
        };
        std::fs::write(dir.join("probes.yaml"), text(&|_| "allow")).unwrap();
        let scenario = palisade_resources::load_scenario(&dir)
            .unwrap_or_else(|e| panic!("case {case} ({}): {e}", dir.display()));
        let verdicts: Vec<&'static str> = scenario
            .probes
            .iter()
            .map(|p| {
                let d = palisade_policy::evaluate::evaluate(
                    &scenario.cluster,
                    &scenario.policies,
                    &p.flow,
                )
                .expect("probe flow");
                match d.verdict {
                    palisade_policy::Verdict::Allow => "allow",
                    palisade_policy::Verdict::Deny => "deny",
                }
            })
            .collect();
        std::fs::write(dir.join("probes.yaml"), text(&|i| verdicts[i])).unwrap();
        denies += verdicts.iter().filter(|v| **v == "deny").count();
        dirs.push(dir);
    }
    let mut args = vec!["verify".to_string(), "--dataplane".to_string()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let out = run(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let fails: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("FAIL") || l.starts_with("ERROR"))
        .collect();
    assert!(
        out.status.success() && fails.is_empty(),
        "the dataplane disagrees with the evaluator; the scenarios are kept under {} \
         (rerun one with palisadectl verify --dataplane DIR):\n{}\n{}",
        root.display(),
        fails.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{scenarios} scenarios x {per} probes ({denies} expected denies): {} in {:.0} s",
        text.lines().last().unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&root).unwrap();
}
