//! Labs of their own (not the shared one): an apiserver restart keeps the objects, dropping a
//! lab stops its processes and removes its files, and a failed start reports the log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use palisade_kubelab::{control_plane_available, Error, KubeLab, LabPod, Options};

fn alive(pid: u32) -> bool {
    // Zombies count as dead: the lab must have reaped them, so /proc has no entry at all.
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Every TCP and UDP socket that the lab's processes listen on is on 127.0.0.1.
fn assert_listens_on_loopback_only(pids: &[(&str, u32)]) {
    let out = std::process::Command::new("ss")
        .args(["-ltunpH"])
        .output()
        .expect("ss (iproute2) is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = 0;
    for (name, pid) in pids {
        for line in text.lines().filter(|l| l.contains(&format!("pid={pid},"))) {
            let local = line.split_whitespace().nth(4).unwrap_or_default();
            assert!(
                local.starts_with("127.0.0.1:"),
                "{name} listens on {local}: {line}"
            );
            seen += 1;
        }
    }
    // etcd (client, peer), apiserver, controller-manager.
    assert!(seen >= 4, "only {seen} listeners found in:\n{text}");
}

#[tokio::test]
async fn apiserver_restart_keeps_objects_and_drop_cleans_up() {
    if !control_plane_available() {
        return;
    }
    let started = Instant::now();
    let lab = KubeLab::start(Options::default()).await.unwrap();
    eprintln!("lab started in {:?}", started.elapsed());
    lab.create_namespace("keep", &BTreeMap::new())
        .await
        .unwrap();
    lab.create_pod(&LabPod::new("keep", "p", "n1").ip("10.244.0.7".parse().unwrap()))
        .await
        .unwrap();
    lab.apply_yaml(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\n\
         metadata: {name: keep}\nspec:\n  tier: Admin\n  priority: 1\n  \
         subject: {namespaces: {}}\n  ingress:\n  - {name: d, action: Deny, from: [{namespaces: {}}]}\n",
    )
    .await
    .unwrap();
    let before: Vec<(&str, u32)> = lab.pids();
    assert_listens_on_loopback_only(&before);
    let old_apiserver = before
        .iter()
        .find(|(n, _)| *n == "kube-apiserver")
        .unwrap()
        .1;

    let restarted = Instant::now();
    lab.restart_apiserver().await.unwrap();
    eprintln!("apiserver restarted in {:?}", restarted.elapsed());

    let new_apiserver = lab
        .pids()
        .into_iter()
        .find(|(n, _)| *n == "kube-apiserver")
        .unwrap()
        .1;
    assert_ne!(old_apiserver, new_apiserver);
    assert!(!alive(old_apiserver));
    let pod = Api::<Pod>::namespaced(lab.client().await.unwrap(), "keep")
        .get("p")
        .await
        .unwrap();
    assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("10.244.0.7"));
    let cnp = lab
        .kubectl([
            "get",
            "clusternetworkpolicy",
            "keep",
            "-o",
            "jsonpath={.spec.tier}",
        ])
        .unwrap();
    assert_eq!(cnp, "Admin");

    let dir = lab.dir().to_path_buf();
    let pids = lab.pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    let dropped = Instant::now();
    drop(lab);
    eprintln!("lab stopped in {:?}", dropped.elapsed());
    for (name, pid) in pids {
        assert!(!alive(pid), "{name} ({pid}) still running after drop");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn a_failed_start_names_the_component_and_shows_its_log() {
    if !control_plane_available() {
        return;
    }
    let opts = Options {
        service_cidr: "not-a-cidr".into(),
        ..Options::default()
    };
    match KubeLab::start(opts).await {
        Err(Error::Exited {
            component, tail, ..
        }) => {
            assert_eq!(component, "kube-apiserver");
            assert!(tail.contains("service-cluster-ip-range"), "{tail}");
        }
        other => panic!("expected the apiserver to exit, got {other:?}"),
    }
}
