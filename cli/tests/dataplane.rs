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

/// The agent binary cargo built beside palisadectl for this test run.
fn agent() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_palisadectl"));
    let agent = bin.with_file_name("palisade-agent");
    if !agent.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "palisade-agent"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building palisade-agent");
    }
    agent
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
    let out = run(&["demo", "--no-wait"]);
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
}
