//! End to end against a real kube-apiserver: objects written to the API → two controller
//! replicas (with the chart's RBAC) → agents in lab nodes → nftables → real packets.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use palisade_agent::stream::{Delivered, StreamConfig, StreamMetrics};
use support::{can_run, System};
use tokio::sync::{mpsc, watch};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: web, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: api, labels: {app: api}}
spec: {nodeName: node-b, containers: [{name: c, ports: [{containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: db, labels: {app: db}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: other, name: x, labels: {app: x}}
spec: {nodeName: node-b, containers: [{name: c}]}
"#;

const DB_FROM_API: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: db-from-api}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: api}}
    - namespaceSelector: {matchLabels: {trusted: "yes"}}
    ports: [{port: pg}]
"#;

const DENY_X_TIERED: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: deny-x-to-web}
spec:
  priority: 10
  subject: {pods: {namespaceSelector: {matchLabels: {team: shop}}, podSelector: {matchLabels: {app: web}}}}
  ingress:
  - name: no-x
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: other}}}]
"#;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_system_enforces_what_the_api_says() {
    if !can_run() {
        return;
    }
    let mut s = System::start("lifecycle", CLUSTER, 2).await;
    let (db, web) = (s.pod_ip("shop", "db"), s.pod_ip("shop", "web"));
    s.serve("shop", "db", 5432);
    s.serve("shop", "web", 8080);
    s.expect("no policy", ("shop", "web"), db, 5432, true).await;

    // A policy created, then a pod relabelled into and out of it.
    s.kube.apply_yaml(DB_FROM_API).await.expect("apply");
    s.expect("web is not api", ("shop", "web"), db, 5432, false)
        .await;
    s.expect("api may", ("shop", "api"), db, 5432, true).await;
    s.kube
        .relabel_pod("shop", "web", &labels(&[("app", "api")]))
        .await
        .unwrap();
    s.expect("web relabelled api", ("shop", "web"), db, 5432, true)
        .await;
    s.kube
        .relabel_pod("shop", "web", &labels(&[("app", "web")]))
        .await
        .unwrap();
    s.expect("web relabelled back", ("shop", "web"), db, 5432, false)
        .await;

    // A namespace relabelled into the policy's namespaceSelector.
    s.expect("other is untrusted", ("other", "x"), db, 5432, false)
        .await;
    s.kube
        .relabel_namespace("other", &labels(&[("trusted", "yes")]))
        .await
        .unwrap();
    s.expect("other trusted", ("other", "x"), db, 5432, true)
        .await;

    // The policy changed to admit web too, and changed back.
    let admits_web = DB_FROM_API.replace(
        "    - podSelector: {matchLabels: {app: api}}\n",
        "    - podSelector: {matchLabels: {app: api}}\n    - podSelector: {matchLabels: {app: web}}\n",
    );
    assert_ne!(admits_web, DB_FROM_API, "the change must change the policy");
    s.kube.apply_yaml(&admits_web).await.expect("apply changed");
    s.expect(
        "policy changed to admit web",
        ("shop", "web"),
        db,
        5432,
        true,
    )
    .await;
    s.kube
        .apply_yaml(DB_FROM_API)
        .await
        .expect("apply original");
    s.expect("policy changed back", ("shop", "web"), db, 5432, false)
        .await;

    // An admin-tier policy (a CRD kind) created and deleted.
    s.expect("x to web, open", ("other", "x"), web, 8080, true)
        .await;
    s.kube.apply_yaml(DENY_X_TIERED).await.expect("apply ANP");
    s.expect("ANP denies x", ("other", "x"), web, 8080, false)
        .await;
    s.kube.delete_yaml(DENY_X_TIERED).await.unwrap();
    s.expect("ANP deleted", ("other", "x"), web, 8080, true)
        .await;

    // A pod deleted and its address reused by a pod that may not reach db.
    let api_ip = s.pod_ip("shop", "api");
    s.kube.delete_pod("shop", "api").await.unwrap();
    s.kube
        .create_pod(
            &palisade_kubelab::LabPod::new("shop", "newcomer", "node-b")
                .label("app", "newcomer")
                .ip(api_ip),
        )
        .await
        .unwrap();
    s.expect(
        "the reused address has none of api's access",
        ("shop", "api"),
        db,
        5432,
        false,
    )
    .await;

    // Killing the replica the agents use moves them to the other, with no kernel change.
    let before: Vec<String> = ["node-a", "node-b"].iter().map(|n| s.table(n)).collect();
    assert!(before[0].contains("table inet palisade"), "{}", before[0]);
    s.replicas[0].process.kill();
    for a in &s.agents {
        let addr = a.metrics;
        let mut reconnected = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let text = support::http_get(addr, "/metrics")
                .await
                .map(|r| r.1)
                .unwrap_or_default();
            let r1 = support::http_get(s.replicas[1].metrics, "/metrics")
                .await
                .map(|r| r.1)
                .unwrap_or_default();
            if support::metric(&text, "palisade_controller_connected") == Some(1.0)
                && support::metric(&r1, "palisade_controller_nodes_connected") == Some(2.0)
            {
                reconnected = true;
                break;
            }
        }
        assert!(
            reconnected,
            "agent of {} did not move to replica 1:\n{}",
            a.node,
            a.process.tail()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: Vec<String> = ["node-a", "node-b"].iter().map(|n| s.table(n)).collect();
    assert_eq!(
        before, after,
        "the kernel's tables changed when the agents moved"
    );
    s.expect("still enforced", ("shop", "web"), db, 5432, false)
        .await;

    // An agent killed and restarted adopts what is there and keeps enforcing.
    s.agents[0].process.kill();
    s.expect(
        "fail static with no agent",
        ("shop", "web"),
        db,
        5432,
        false,
    )
    .await;
    let node = s.agents[0].node.clone();
    s.start_agent(&node).await;
    s.wait_agent_ready(0).await;
    s.expect("restarted agent", ("shop", "web"), db, 5432, false)
        .await;

    // The apiserver restarted: watches resume, and a change after it is enforced.
    s.kube.restart_apiserver().await.expect("restart");
    s.kube.delete_yaml(DB_FROM_API).await.unwrap();
    s.expect(
        "policy deleted after the restart",
        ("shop", "web"),
        db,
        5432,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_of_other_nodes_and_no_token_are_refused() {
    if !can_run() {
        return;
    }
    let s = System::start("auth", CLUSTER, 1).await;
    let node_b_token = s.agent_token("node-b").await;
    let empty = s.dir.join("empty.token");
    std::fs::write(&empty, "").unwrap();
    let mut attempts = Vec::new();
    for (what, token, node) in [
        (
            "node-b's token asking for node-a",
            node_b_token.clone(),
            "node-a",
        ),
        ("no token", empty, "node-a"),
        ("node-b's own", node_b_token, "node-b"),
    ] {
        let (tx, rx) = watch::channel::<Option<Delivered>>(None);
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let metrics = StreamMetrics::new();
        let task = tokio::spawn(palisade_agent::stream::run(
            StreamConfig {
                controllers: vec![s.replicas[0].url.clone()],
                token_file: token,
                ca_file: s.ca.clone(),
                node: node.into(),
            },
            None,
            tx,
            acks_rx,
            metrics,
        ));
        attempts.push((what, rx, acks_tx, task));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (what, rx, _, task) in &attempts {
        let served = rx.borrow().is_some();
        assert_eq!(served, what.ends_with("own"), "{what}: served = {served}");
        task.abort();
    }
    let text = support::http_get(s.replicas[0].metrics, "/metrics")
        .await
        .unwrap()
        .1;
    assert_eq!(
        support::metric(&text, "palisade_controller_is_leader"),
        Some(1.0),
        "the only replica holds the status Lease"
    );
    for reason in ["other_node", "no_token"] {
        assert!(
            text.lines().any(
                |l| l.starts_with("palisade_controller_stream_refused_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            ),
            "{reason} not counted:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_the_apiserver_accepts_and_palisade_rejects_gets_a_warning_event() {
    if !can_run() {
        return;
    }
    let s = System::start("events", CLUSTER, 2).await;
    // Two IPv4 InternalIPs: valid for the apiserver, more than Palisade models.
    s.kube
        .create_node(
            "node-z",
            &["10.99.0.1".parse().unwrap(), "10.99.0.2".parse().unwrap()],
            &BTreeMap::new(),
        )
        .await
        .unwrap();
    let api: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(s.kube.client().await.unwrap(), "default");
    let mut found = Vec::new();
    for _ in 0..100 {
        found = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("node-z")
                    && e.reason.as_deref() == Some("Rejected")
            })
            .collect();
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        found.len(),
        1,
        "one Warning Event, written by the Lease holder only; controllers:\n{}\n--\n{}",
        s.replicas[0].process.tail(),
        s.replicas[1].process.tail()
    );
    let e = &found[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert!(
        e.note
            .as_deref()
            .unwrap_or("")
            .contains("status.addresses[1]"),
        "the Event names the field: {:?}",
        e.note
    );
    // Exactly one replica leads; when it goes, the other takes the Lease.
    let mut leaders = Vec::new();
    for r in &s.replicas {
        let text = support::http_get(r.metrics, "/metrics").await.unwrap().1;
        leaders.push(support::metric(&text, "palisade_controller_is_leader") == Some(1.0));
    }
    assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");
}
