//! Conformance scenarios as FORMAT.md defines them.

use std::path::{Path, PathBuf};

use palisade_policy::{Family, PodKey, Protocol, Tier, Verdict};
use palisade_resources::load_scenario;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/examples")
}

#[test]
fn the_shared_examples_load() {
    let s = load_scenario(&examples().join("three-tier-shop")).unwrap();
    assert_eq!(s.name, "three-tier-shop");
    assert_eq!(s.cluster.nodes.len(), 2);
    assert_eq!(s.cluster.pods.len(), 4);
    assert_eq!(s.policies.len(), 4);
    assert_eq!(s.probes.len(), 11);
    // `port: grpc` resolved on the destination.
    assert_eq!(s.probes[0].flow.port, 9000);
    assert_eq!(s.probes[0].flow.dst, PodKey::new("shop", "api-1"));
    assert_eq!(s.probes[0].flow.family, Family::IPv4);
    assert_eq!(s.probes[2].expect, Verdict::Deny);
    assert!(s.warnings.is_empty());

    let s = load_scenario(&examples().join("admin-tiers")).unwrap();
    assert_eq!(
        s.cluster.nodes.keys().collect::<Vec<_>>(),
        ["node-1", "node-2"]
    );
    assert_eq!(
        s.policies.iter().filter(|p| p.tier == Tier::Admin).count(),
        2
    );
    let dns = s
        .probes
        .iter()
        .find(|p| p.text.contains("dns-tcp"))
        .unwrap();
    assert_eq!((dns.flow.port, dns.flow.protocol), (53, Protocol::Tcp));
}

#[test]
fn a_broken_scenario_reports_every_file() {
    let dir =
        std::env::temp_dir().join(format!("palisade-resources-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cluster.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("policies.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {ingress: [{from: [{ipBlock: {cidr: nonsense}}]}]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("probes.yaml"),
        "probes:\n  - {from: x/a, to: x/b, port: 80, expect: allow}\n",
    )
    .unwrap();
    let err = load_scenario(&dir).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].ends_with("policies.yaml: NetworkPolicy x/p: spec.ingress[0].from[0].ipBlock.cidr: \"nonsense\" is not a valid CIDR: expected an address and a prefix length (e.g. 10.0.0.0/8 or fd00::/64)"), "{err}");
    assert!(
        lines[1]
            .ends_with("probes.yaml: probes[0] (x/a -> x/b TCP/80): to: no pod x/b in the cluster"),
        "{err}"
    );
}

#[test]
fn a_missing_directory_is_an_error_per_file() {
    let err = load_scenario(Path::new("/nonexistent/scenario")).unwrap_err();
    assert_eq!(err.errors.len(), 3);
    assert!(err
        .to_string()
        .starts_with("/nonexistent/scenario/cluster.yaml: cannot read: "));
}

/// Issue 12.12: probes.yaml is read like the other files: a leading UTF-8 BOM is dropped
/// (as kubectl does) and a byte that is not UTF-8 is one error with its byte offset and
/// line. Before, a BOM failed and a bad byte gave "stream did not contain valid UTF-8".
#[test]
fn probes_file_encoding_bom_dropped_bad_byte_located() {
    let dir = std::env::temp_dir().join(format!("palisade-resources-enc-{}", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let example = examples().join("three-tier-shop");
    for f in ["cluster.yaml", "policies.yaml"] {
        std::fs::copy(example.join(f), dir.join(f)).unwrap();
    }
    let probes = std::fs::read(example.join("probes.yaml")).unwrap();
    std::fs::write(
        dir.join("probes.yaml"),
        [&b"\xef\xbb\xbf"[..], &probes].concat(),
    )
    .unwrap();
    assert_eq!(load_scenario(&dir).expect("BOM dropped").probes.len(), 11);

    let mut bad = probes.clone();
    let at = bad.iter().position(|&b| b == b'\n').unwrap() + 1;
    bad.insert(at, 0xff);
    std::fs::write(dir.join("probes.yaml"), &bad).unwrap();
    let err = load_scenario(&dir).unwrap_err().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].ends_with(&format!(
            "probes.yaml: cannot read: not UTF-8: byte 0xff at byte offset {at} (line 2)"
        )),
        "{err}"
    );
}
