//! Root integration tests: real namespaces, real packets. Each prints SKIPPED and passes
//! when not run as root.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use palisade_netlab::{
    exec_in, exec_in_with_input, list_namespaces, Lab, LabOptions, Probe, ProbeResult,
};
use palisade_policy::model::{Family, PodKey, Protocol};

const PORT: u16 = 8080;
const UNSERVED: u16 = 9999;
const TIMEOUT: Duration = Duration::from_millis(1000);

fn lab_namespaces(prefix: &str) -> Vec<String> {
    let dash = format!("{prefix}-");
    list_namespaces()
        .expect("listing namespaces")
        .into_iter()
        .filter(|n| n.starts_with(&dash))
        .collect()
}

/// Every (from, to, family, protocol) of distinct pods where both have the family.
fn all_pairs(lab: &Lab, port: u16) -> Vec<Probe> {
    let pods: Vec<PodKey> = lab.pods().cloned().collect();
    let mut probes = Vec::new();
    for from in &pods {
        for to in &pods {
            if from == to {
                continue;
            }
            for family in [Family::IPv4, Family::IPv6] {
                let (Some(_), Some(to_addr)) = (
                    lab.pod_address(from, family).unwrap(),
                    lab.pod_address(to, family).unwrap(),
                ) else {
                    continue;
                };
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    probes.push(Probe {
                        from: from.clone(),
                        to_addr,
                        protocol,
                        port,
                    });
                }
            }
        }
    }
    probes
}

fn serve_everywhere(lab: &Lab, port: u16) {
    let items: Vec<(PodKey, Protocol, u16)> = lab
        .pods()
        .flat_map(|p| {
            [
                (p.clone(), Protocol::Tcp, port),
                (p.clone(), Protocol::Udp, port),
            ]
        })
        .collect();
    lab.serve_all(&items).expect("serving");
}

#[test]
fn every_pod_reaches_every_other_pod_and_unserved_ports_are_refused() {
    if !common::can_run() {
        return;
    }
    let cluster = common::small_cluster();
    let started = Instant::now();
    let lab = Lab::build(&cluster, LabOptions::default()).expect("building the lab");
    println!(
        "built {} namespaces in {:?}",
        lab.namespaces().len(),
        started.elapsed()
    );
    let prefix = lab.prefix().to_string();

    // The host-network pod lives in its node; the others have their own namespace.
    let exporter = PodKey::new("kube-system", "exporter");
    assert_eq!(
        lab.pod_netns(&exporter).unwrap(),
        lab.node_netns("node-b").unwrap()
    );
    assert_eq!(lab.pod_interface(&exporter).unwrap(), None);
    let web = PodKey::new("shop", "web");
    assert_ne!(
        lab.pod_netns(&web).unwrap(),
        lab.node_netns("node-a").unwrap()
    );

    serve_everywhere(&lab, PORT);
    let probes = all_pairs(&lab, PORT);
    // Pod pairs: web<->cart both families, db<->others IPv4, exporter<->dual-stack both.
    assert!(probes.len() >= 30, "{} probes", probes.len());
    let results = lab.probe_all(&probes, TIMEOUT, 32).expect("probing");
    let failed: Vec<String> = probes
        .iter()
        .zip(&results)
        .filter(|(_, r)| !r.is_connected())
        .map(|(p, r)| format!("{p}: {r}"))
        .collect();
    assert!(
        failed.is_empty(),
        "probes that did not connect:\n{}",
        failed.join("\n")
    );
    let families: BTreeSet<bool> = probes.iter().map(|p| p.to_addr.is_ipv6()).collect();
    assert_eq!(families.len(), 2, "both families were probed");

    // Nothing listens on UNSERVED: an answer that says so, not a time-out.
    let refused = all_pairs(&lab, UNSERVED);
    let results = lab.probe_all(&refused, TIMEOUT, 32).expect("probing");
    for (p, r) in refused.iter().zip(&results) {
        assert_eq!(r, &ProbeResult::Refused, "{p}");
    }

    drop(lab);
    assert!(
        lab_namespaces(&prefix).is_empty(),
        "{:?}",
        lab_namespaces(&prefix)
    );
}

#[test]
fn a_forward_drop_in_a_node_times_out_exactly_that_flow() {
    if !common::can_run() {
        return;
    }
    let lab = Lab::build(&common::small_cluster(), LabOptions::default()).expect("building");
    serve_everywhere(&lab, PORT);
    let db = PodKey::new("shop", "db");
    let web = PodKey::new("shop", "web");
    let db_ip = lab.pod_address(&db, Family::IPv4).unwrap().unwrap();
    let web_ip = lab.pod_address(&web, Family::IPv4).unwrap().unwrap();

    // Dropped in node-a's forward path: db (on node-b) -> web (on node-a), TCP only.
    let rules = format!(
        "table inet netlabtest {{\n chain filter_forward {{\n  type filter hook forward priority 0; policy accept;\n  ip saddr {db_ip} ip daddr {web_ip} tcp dport {PORT} drop\n }}\n}}\n"
    );
    let node_a = lab.node_netns("node-a").unwrap().to_string();
    exec_in_with_input(&node_a, &["nft", "-f", "-"], &rules).expect("loading nft rules");

    let probes = all_pairs(&lab, PORT);
    let results = lab.probe_all(&probes, TIMEOUT, 32).expect("probing");
    let blocked = |p: &Probe| p.from == db && p.to_addr == web_ip && p.protocol == Protocol::Tcp;
    assert!(probes.iter().any(blocked));
    for (p, r) in probes.iter().zip(&results) {
        if blocked(p) {
            assert_eq!(r, &ProbeResult::TimedOut, "{p}");
        } else {
            assert_eq!(r, &ProbeResult::Connected, "{p}");
        }
    }

    // The rule's counter-less drop is in the node's own ruleset, not the host's.
    let listing = exec_in(&node_a, &["nft", "list", "table", "inet", "netlabtest"]).unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("drop"));
}

#[test]
fn sctp_is_unsupported_or_connects() {
    if !common::can_run() {
        return;
    }
    let lab = Lab::build(&common::small_cluster(), LabOptions::default()).expect("building");
    let web = PodKey::new("shop", "web");
    let db = PodKey::new("shop", "db");
    lab.serve(&web, Protocol::Sctp, PORT).expect("serving SCTP");
    let to_addr = lab.pod_address(&web, Family::IPv4).unwrap().unwrap();
    let probe = Probe {
        from: db,
        to_addr,
        protocol: Protocol::Sctp,
        port: PORT,
    };
    let result = lab.probe(&probe, TIMEOUT).expect("probing");
    if palisade_netlab::kernel_supports_sctp() {
        assert_eq!(result, ProbeResult::Connected);
    } else {
        assert!(matches!(result, ProbeResult::Unsupported(_)), "{result}");
    }
}

#[test]
fn probes_from_a_pod_without_the_family_are_unsupported_and_unknown_pods_are_errors() {
    if !common::can_run() {
        return;
    }
    let lab = Lab::build(&common::small_cluster(), LabOptions::default()).expect("building");
    let to_addr: IpAddr = "fd91::1".parse().unwrap();
    let probe = Probe {
        from: PodKey::new("shop", "db"),
        to_addr,
        protocol: Protocol::Tcp,
        port: PORT,
    };
    let result = lab.probe(&probe, TIMEOUT).unwrap();
    assert!(matches!(result, ProbeResult::Unsupported(_)), "{result}");
    let ghost = Probe {
        from: PodKey::new("shop", "ghost"),
        ..probe
    };
    let err = lab.probe(&ghost, TIMEOUT).unwrap_err().to_string();
    assert!(err.contains("shop/ghost"), "{err}");
    assert!(lab
        .serve(&PodKey::new("shop", "ghost"), Protocol::Tcp, 80)
        .is_err());
}

#[test]
fn namespaces_are_removed_on_panic_and_parallel_labs_do_not_collide() {
    if !common::can_run() {
        return;
    }
    let labs: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let lab = Lab::build(&common::small_cluster(), LabOptions::default())
                        .expect("building");
                    (lab.prefix().to_string(), lab.namespaces().to_vec())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(labs[0].0, labs[1].0);
    for (prefix, _) in &labs {
        assert!(lab_namespaces(prefix).is_empty());
    }

    let prefix = std::sync::Mutex::new(String::new());
    let outcome = std::panic::catch_unwind(|| {
        let lab = Lab::build(&common::small_cluster(), LabOptions::default()).expect("building");
        *prefix.lock().unwrap() = lab.prefix().to_string();
        assert!(!lab_namespaces(lab.prefix()).is_empty());
        panic!("test panic with a live lab");
    });
    assert!(outcome.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert!(
        lab_namespaces(&prefix).is_empty(),
        "{:?}",
        lab_namespaces(&prefix)
    );
}

#[test]
fn stale_labs_are_cleaned_up_by_prefix() {
    if !common::can_run() {
        return;
    }
    let options = LabOptions {
        prefix: Some(format!("plstale{}", std::process::id())),
    };
    let mut lab = Lab::build(&common::small_cluster(), options.clone()).expect("building");
    // A second lab with a prefix in use is refused rather than sharing namespaces.
    let err = Lab::build(&common::small_cluster(), options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefix"), "{err}");
    let prefix = lab.prefix().to_string();
    let expected = lab.namespaces().len();
    // As if the process had died: the namespaces outlive the lab's bookkeeping.
    let removed = palisade_netlab::cleanup_stale(&format!("{prefix}-")).unwrap();
    assert_eq!(removed.len(), expected);
    assert!(lab_namespaces(&prefix).is_empty());
    lab.teardown()
        .expect("teardown after cleanup finds nothing left to fail on");
}
