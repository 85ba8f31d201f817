//! The shared lab against the real binaries: CRDs validate for real, pods get addresses,
//! namespaces get their ServiceAccount and finish deleting, Services their EndpointSlices,
//! pod-bound tokens name the node.
//! The project's conformance policies are all admitted by the real apiserver. Each test uses
//! its own namespace and object names, since they share one lab.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use palisade_kubelab::{parse_objects, shared, KubeLab, LabPod};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn lab() -> Option<&'static KubeLab> {
    shared()
}

/// Applies `yaml`, which the CRD schema must reject with 422 naming `field`.
async fn assert_rejected(lab: &KubeLab, yaml: &str, field: &str) {
    match lab.apply_yaml(yaml).await {
        Err(palisade_kubelab::Error::Kube(kube::Error::Api(status))) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains(field), "{}", status.message);
        }
        other => panic!("expected the apiserver to reject {yaml}\ngot {other:?}"),
    }
}

#[tokio::test]
async fn network_policy_api_crds_are_served_and_validate() {
    let Some(lab) = lab() else { return };
    let valid = [
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
         metadata: {name: lab-cnp-alpha}\nspec:\n  tier: Admin\n  priority: 5\n  \
         subject: {namespaces: {matchLabels: {team: a}}}\n  ingress:\n  - name: deny-dev\n    \
         action: Deny\n    from: [{namespaces: {matchLabels: {env: dev}}}]\n",
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\n\
         metadata: {name: lab-cnp-beta}\nspec:\n  tier: Baseline\n  priority: 10\n  \
         subject: {namespaces: {matchLabels: {team: b}}}\n  egress:\n  - name: accept-dev\n    \
         action: Accept\n    to: [{namespaces: {matchLabels: {env: dev}}}]\n",
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
         metadata: {name: lab-anp}\nspec:\n  priority: 10\n  \
         subject: {namespaces: {matchLabels: {team: a}}}\n  ingress:\n  - name: pass-dev\n    \
         action: Pass\n    from: [{namespaces: {matchLabels: {env: dev}}}]\n",
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\n\
         metadata: {name: default}\nspec:\n  \
         subject: {namespaces: {matchLabels: {team: a}}}\n  ingress:\n  - name: deny-all\n    \
         action: Deny\n    from: [{namespaces: {}}]\n",
    ];
    for yaml in valid {
        let applied = lab.apply_yaml(yaml).await.expect(yaml);
        assert_eq!(applied.len(), 1);
        assert!(applied[0].metadata.uid.is_some(), "{yaml}");
    }
    // Rejected by the schema (enum, bounds) and by the CRDs' CEL rules.
    assert_rejected(
        lab,
        &valid[0].replace("action: Deny", "action: Drop"),
        "spec.ingress[0].action",
    )
    .await;
    assert_rejected(
        lab,
        &valid[1].replace("tier: Baseline", "tier: Middle"),
        "spec.tier",
    )
    .await;
    assert_rejected(
        lab,
        &valid[2].replace("priority: 10", "priority: 1001"),
        "spec.priority",
    )
    .await;
    assert_rejected(
        lab,
        &valid[3].replace("name: default}", "name: other}"),
        "default",
    )
    .await;

    let listed = lab
        .kubectl([
            "get",
            "clusternetworkpolicies.v1alpha2.policy.networking.k8s.io",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(
        listed.contains("lab-cnp-alpha") && listed.contains("lab-cnp-beta"),
        "{listed}"
    );
    lab.delete_yaml(valid[0]).await.unwrap();
    let listed = lab
        .kubectl(["get", "clusternetworkpolicies", "-o", "name"])
        .unwrap();
    assert!(!listed.contains("lab-cnp-alpha"), "{listed}");
}

#[tokio::test]
async fn a_pod_gets_its_status_addresses_and_relabels() {
    let Some(lab) = lab() else { return };
    lab.create_namespace("lab-pods", &labels(&[("team", "a")]))
        .await
        .unwrap();
    lab.create_node(
        "lab-node-pods",
        &[ip("10.200.0.1")],
        &labels(&[("zone", "z1")]),
    )
    .await
    .unwrap();
    let pod = LabPod::new("lab-pods", "web", "lab-node-pods")
        .label("app", "web")
        .port(Some("http"), 8080, "TCP")
        .port(Some("dns"), 53, "UDP")
        .ip(ip("10.244.1.5"))
        .ip(ip("fd00::5"))
        .host_ip(ip("10.200.0.1"));
    lab.create_pod(&pod).await.unwrap();

    let client = lab.client().await.unwrap();
    let stored = Api::<Pod>::namespaced(client.clone(), "lab-pods")
        .get("web")
        .await
        .unwrap();
    let status = stored.status.unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
    let ips: Vec<String> = status.pod_ips.unwrap().into_iter().map(|p| p.ip).collect();
    assert_eq!(ips, ["10.244.1.5", "fd00::5"]);
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.host_ip.as_deref(), Some("10.200.0.1"));
    let spec = stored.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("lab-node-pods"));
    let ports = spec.containers[0].ports.clone().unwrap();
    assert_eq!(ports[1].name.as_deref(), Some("dns"));
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));

    let node = lab
        .kubectl([
            "get",
            "node",
            "lab-node-pods",
            "-o",
            "jsonpath={.status.addresses[0].address}",
        ])
        .unwrap();
    assert_eq!(node, "10.200.0.1");

    let relabelled = lab
        .relabel_pod("lab-pods", "web", &labels(&[("app", "api"), ("tier", "1")]))
        .await
        .unwrap();
    assert_eq!(
        relabelled.metadata.labels.unwrap(),
        labels(&[("app", "api"), ("tier", "1")])
    );
    let ns = lab
        .relabel_namespace("lab-pods", &labels(&[("team", "b")]))
        .await
        .unwrap();
    let ns_labels = ns.metadata.labels.unwrap();
    assert_eq!(ns_labels.get("team").map(String::as_str), Some("b"));
    // The apiserver keeps its own name label; everything else is ours.
    assert_eq!(
        ns_labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("lab-pods")
    );

    lab.delete_pod("lab-pods", "web").await.unwrap();
    let gone = Api::<Pod>::namespaced(client, "lab-pods")
        .get_opt("web")
        .await
        .unwrap();
    assert!(gone.is_none());
}

#[tokio::test]
async fn a_namespace_gets_its_default_service_account_and_deletion_completes() {
    let Some(lab) = lab() else { return };
    // Created without the helper, so nothing here waits on our behalf.
    let client = lab.client().await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("lab-ns-life".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "lab-ns-life");
    lab.wait_until("default ServiceAccount", || async {
        Ok(accounts.get_opt("default").await?.is_some())
    })
    .await
    .unwrap();
    lab.create_pod(&LabPod::new("lab-ns-life", "p", "nowhere").ip(ip("10.244.9.9")))
        .await
        .unwrap();
    lab.create_service_account("lab-ns-life", "extra")
        .await
        .unwrap();

    // The namespace controller must empty it (the ServiceAccounts) and remove its finalizer;
    // without kube-controller-manager it would stay Terminating.
    lab.delete_namespace("lab-ns-life").await.unwrap();
    assert!(namespaces.get_opt("lab-ns-life").await.unwrap().is_none());
}

#[tokio::test]
async fn a_pod_bound_token_review_names_the_pod_and_its_node() {
    let Some(lab) = lab() else { return };
    lab.create_namespace("lab-tokens", &BTreeMap::new())
        .await
        .unwrap();
    lab.create_service_account("lab-tokens", "agent")
        .await
        .unwrap();
    lab.create_node("lab-node-token", &[ip("10.200.0.2")], &BTreeMap::new())
        .await
        .unwrap();
    let pod = lab
        .create_pod(
            &LabPod::new("lab-tokens", "agent-x", "lab-node-token")
                .service_account("agent")
                .ip(ip("10.200.0.2"))
                .host_network(true),
        )
        .await
        .unwrap();
    let audience = lab.token_audience().to_string();
    let token = lab
        .pod_bound_token(
            "lab-tokens",
            "agent",
            "agent-x",
            &audience,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();

    let status = lab.token_review(&token, &[&audience]).await.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(status.audiences.as_deref(), Some(&[audience.clone()][..]));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:lab-tokens:agent")
    );
    let extra = user.extra.unwrap_or_default();
    eprintln!("TokenReview user.extra: {extra:?}");
    let key = |k: &str| {
        extra
            .get(&format!("authentication.kubernetes.io/{k}"))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(key("pod-name"), ["agent-x"]);
    assert_eq!(key("pod-uid"), [pod.metadata.uid.clone().unwrap()]);
    assert_eq!(key("node-name"), ["lab-node-token"]);
    assert_eq!(key("node-uid").len(), 1, "{extra:?}");

    // A token for another audience is not valid for ours.
    let other = lab
        .pod_bound_token(
            "lab-tokens",
            "agent",
            "agent-x",
            "elsewhere",
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let status = lab.token_review(&other, &[&audience]).await.unwrap();
    assert_ne!(status.authenticated, Some(true), "{status:?}");

    // The apiserver itself accepts the `palisade` audience (it is in --api-audiences), and
    // RBAC gives the account nothing: authenticated (not 401) but forbidden.
    let out = std::process::Command::new(lab.bin_dir().join("kubectl"))
        .arg("--kubeconfig=/dev/null")
        .arg(format!("--server={}", lab.url()))
        .arg(format!(
            "--certificate-authority={}",
            lab.dir().join("pki/ca.crt").display()
        ))
        .arg(format!("--token={token}"))
        .args(["get", "pods", "-n", "lab-tokens"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Forbidden") && stderr.contains("system:serviceaccount:lab-tokens:agent"),
        "{stderr}"
    );

    // A token bound to the pod can only be for the pod's own ServiceAccount.
    let err = lab
        .pod_bound_token(
            "lab-tokens",
            "default",
            "agent-x",
            &audience,
            Duration::from_secs(3600),
        )
        .await
        .unwrap_err();
    eprintln!("TokenRequest for another account: {err}");
    assert!(
        matches!(err, palisade_kubelab::Error::Kube(kube::Error::Api(_))),
        "{err}"
    );

    // Bound tokens die with their pod, once the apiserver's 10 s cache of successful token
    // authentications has expired.
    lab.delete_pod("lab-tokens", "agent-x").await.unwrap();
    let deleted = std::time::Instant::now();
    lab.wait_until("the deleted pod's token to be rejected", || async {
        let status = lab.token_review(&token, &[&audience]).await?;
        Ok(status.authenticated != Some(true))
    })
    .await
    .unwrap();
    eprintln!(
        "token rejected {:?} after its pod was deleted",
        deleted.elapsed()
    );
}

fn scenario_policy_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in [
        root.join("tests/conformance"),
        root.join("../shared/conformance/examples"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.path().join("policies.yaml");
            if file.is_file() {
                files.push(file);
            }
        }
    }
    files.sort();
    files
}

/// Every policy in the conformance scenarios (and the shared examples) is admitted with the
/// experimental CRDs: the scenarios only test inputs that a real cluster could send. (With the
/// standard channel, the scenarios that use named ports, nodes peers and domain names are
/// rejected: those fields are experimental.)
#[tokio::test]
async fn conformance_policies_are_admitted_by_the_apiserver() {
    let Some(lab) = shared() else { return };
    let files = scenario_policy_files();
    assert!(files.len() > 10, "found only {files:?}");
    let namespaces: Api<Namespace> = Api::all(lab.client().await.unwrap());
    let mut created = BTreeSet::new();
    let mut failures = Vec::new();
    let mut applied = 0;
    for file in &files {
        let yaml = std::fs::read_to_string(file).unwrap();
        let objects = parse_objects(&file.display().to_string(), &yaml).unwrap();
        for ns in objects.iter().filter_map(|o| o.namespace()) {
            if created.insert(ns.clone()) {
                let mut obj = Namespace::default();
                obj.metadata.name = Some(ns);
                let _ = namespaces.create(&PostParams::default(), &obj).await;
            }
        }
        match lab.apply_yaml(&yaml).await {
            Ok(objects) => applied += objects.len(),
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    eprintln!("{applied} objects from {} files admitted", files.len());
    assert!(
        failures.is_empty(),
        "rejected by the apiserver:\n{}",
        failures.join("\n")
    );
}

/// Removes the network namespace it names, also when the test fails.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ip_cmd(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn the_apiserver_is_reachable_from_inside_a_network_namespace() {
    let Some(lab) = lab() else { return };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        palisade_kubelab::skip("network namespaces need root");
        return;
    }
    let name = format!("kubelab-fwd-{}", std::process::id());
    if !ip_cmd(&["netns", "add", &name]) {
        palisade_kubelab::skip("`ip netns add` failed");
        return;
    }
    let _guard = NetnsGuard(name.clone());
    assert!(ip_cmd(&["-n", &name, "link", "set", "lo", "up"]));
    let forward = lab
        .forward_into_netns(Path::new(&format!("/var/run/netns/{name}")))
        .unwrap();
    let kubectl = lab.bin_dir().join("kubectl");
    let kubeconfig = forward.kubeconfig().to_path_buf();
    let run_inside = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(&kubectl)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
            .output()
            .unwrap()
    };
    let out = run_inside();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    // After drop the relay is gone (the kubeconfig is put back to show it is the port).
    let saved = std::fs::read(&kubeconfig).unwrap();
    let port = forward.port();
    drop(forward);
    std::fs::write(&kubeconfig, saved).unwrap();
    let out = run_inside();
    let _ = std::fs::remove_file(&kubeconfig);
    assert!(
        !out.status.success(),
        "still reachable on port {port} after drop"
    );
}

/// The endpointslice controller writes a Service's slice from the pods it selects, and a pod
/// whose status the lab set counts as ready, as kube-proxy needs.
#[tokio::test]
async fn a_service_gets_an_endpoint_slice_with_its_ready_pod() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let Some(lab) = lab() else { return };
    lab.create_namespace("lab-svc", &BTreeMap::new())
        .await
        .unwrap();
    lab.wait_default_service_account("lab-svc").await.unwrap();
    lab.create_node("lab-node-svc", &[ip("10.200.0.3")], &BTreeMap::new())
        .await
        .unwrap();
    lab.create_pod(
        &LabPod::new("lab-svc", "web", "lab-node-svc")
            .label("app", "web")
            .port(Some("http"), 8080, "TCP")
            .ip(ip("10.244.3.5")),
    )
    .await
    .unwrap();
    lab.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: lab-svc, name: web}\n\
         spec: {selector: {app: web}, ports: [{name: web, port: 80, targetPort: http}]}\n",
    )
    .await
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(lab.client().await.unwrap(), "lab-svc");
    lab.wait_until(
        "the Service's EndpointSlice with a ready endpoint",
        || async {
            let list = slices
                .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=web"))
                .await?;
            Ok(list.items.iter().any(|s| {
                s.ports.iter().flatten().any(|p| p.port == Some(8080))
                    && s.endpoints.iter().flatten().any(|e| {
                        e.addresses == ["10.244.3.5"]
                            && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
                    })
            }))
        },
    )
    .await
    .unwrap();
}
