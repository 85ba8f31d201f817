//! Status where users look, against a real kube-apiserver: on how many nodes each policy
//! is enforced (status.conditions, Events, `palisadectl status`), counted across replicas;
//! `palisadectl compile`/`explain` against the live cluster; and the chart's RBAC proven
//! to be no more than needed.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Api;
use palisade_kubelab::KubeLab;
use support::{can_run, palisadectl_binary, System, SYSTEM_NS};

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
"#;

/// Applies to every pod of `shop`, so to both nodes.
const ADMIN: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: shop-guard}
spec:
  priority: 10
  subject: {namespaces: {matchLabels: {team: shop}}}
  ingress:
  - name: no-outside
    action: Deny
    from: [{namespaces: {matchLabels: {team: outside}}}]
"#;

/// Isolates db only, on node-a.
const DB_FROM_API: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: db-from-api}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: pg}]
"#;

const DB_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: db}
spec:
  selector: {app: db}
  ports: [{name: sql, port: 15432, targetPort: pg}]
"#;

/// Palisade's condition on an AdminNetworkPolicy: (status, message, observedGeneration).
async fn condition(s: &System, name: &str) -> Option<(String, String, i64)> {
    let gvk = GroupVersionKind::gvk("policy.networking.k8s.io", "v1alpha1", "AdminNetworkPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "adminnetworkpolicies");
    let api: Api<DynamicObject> = Api::all_with(s.kube.client().await.unwrap(), &resource);
    let o = api.get(name).await.ok()?;
    let c = o.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == palisade_controller::status::CONDITION)?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
        c["observedGeneration"].as_i64()?,
    ))
}

async fn wait_condition(s: &System, name: &str, want: (&str, &str)) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        last = condition(s, name).await;
        if let Some((status, message, generation)) = &last {
            if status == want.0 && message == want.1 {
                return *generation;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agents: Vec<String> = s.agents.iter().map(|a| a.process.tail()).collect();
    panic!(
        "condition of {name}: want {want:?}, last {last:?}\ncontrollers:\n{}\n--\n{}\nagents:\n{}",
        s.replicas[0].process.tail(),
        s.replicas[1].process.tail(),
        agents.join("\n--\n")
    );
}

fn palisadectl(s: &System, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(palisadectl_binary())
        .args(args)
        .arg("--kubeconfig")
        .arg(s.kube.kubeconfig())
        .output()
        .expect("palisadectl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforcement_is_counted_across_replicas_and_shown_where_users_look() {
    if !can_run() {
        return;
    }
    let mut s = System::start("status", CLUSTER, 2).await;
    // node-b's agent talks to the second replica only: whichever replica leads must count
    // a node that the other one serves.
    s.agents[1].process.kill();
    assert_eq!(s.agents[1].node, "node-b");
    s.start_agent_to("node-b", &[1]).await;
    s.wait_agent_ready(1).await;

    s.kube.apply_yaml(ADMIN).await.unwrap();
    s.kube.apply_yaml(DB_FROM_API).await.unwrap();
    s.kube.apply_yaml(DB_SERVICE).await.unwrap();
    let generation = wait_condition(&s, "shop-guard", ("True", "enforced on 2 of 2 nodes")).await;
    assert_eq!(
        generation, 1,
        "observedGeneration is the object's generation"
    );

    // A NetworkPolicy has no status: an Event says it.
    let events: Api<Event> = Api::namespaced(s.kube.client().await.unwrap(), "shop");
    let deadline = Instant::now() + Duration::from_secs(60);
    let note = loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("db-from-api")
                    && e.reason.as_deref() == Some("Enforced")
            });
        if let Some(e) = found {
            assert_eq!(e.type_.as_deref(), Some("Normal"));
            break e.note.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "no Enforced Event on db-from-api"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(note, "enforced on 1 of 1 nodes (generation 1)");

    // palisadectl status reads the same, with each node's replica.
    let (code, out, err) = palisadectl(&s, &["status"]);
    assert_eq!(code, 0, "status: {out}{err}");
    assert!(out.contains("AdminNetworkPolicy shop-guard"), "{out}");
    assert!(out.contains("2/2 nodes"), "{out}");
    assert!(out.contains("NetworkPolicy shop/db-from-api"), "{out}");
    let node_b = out
        .lines()
        .find(|l| l.starts_with("node-b"))
        .unwrap_or_default();
    assert!(
        node_b.contains("in sync") && node_b.ends_with("replica-1"),
        "{out}"
    );

    // A spec change: the condition follows the new generation, until both nodes enforce
    // it (before that, a node still on generation 1 makes it "1 of 2" too, which the next
    // step must not mistake for the node that goes).
    let changed = ADMIN.replace("priority: 10", "priority: 11");
    s.kube.apply_yaml(&changed).await.unwrap();
    let enforced = Some((
        "True".to_string(),
        "enforced on 2 of 2 nodes".to_string(),
        2,
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while condition(&s, "shop-guard").await != enforced {
        assert!(
            Instant::now() < deadline,
            "generation 2 not enforced on both nodes: {:?}",
            condition(&s, "shop-guard").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // node-b's agent gone: the policy is enforced on 1 of 2 nodes, and says so.
    s.agents[1].process.kill();
    wait_condition(&s, "shop-guard", ("False", "enforced on 1 of 2 nodes")).await;
    let (code, out, _) = palisadectl(&s, &["status"]);
    assert_eq!(code, 3, "not everything is enforced: {out}");
    assert!(out.contains("node-b  not connected"), "{out}");
    s.start_agent_to("node-b", &[1]).await;
    wait_condition(&s, "shop-guard", ("True", "enforced on 2 of 2 nodes")).await;

    // In audit, the policy is in force as chosen, and says it enforces nothing.
    let audit = changed.replace(
        "metadata: {name: shop-guard}",
        "metadata: {name: shop-guard, annotations: {palisade.dev/enforcement: audit}}",
    );
    assert_ne!(audit, changed);
    s.kube.apply_yaml(&audit).await.unwrap();
    wait_condition(
        &s,
        "shop-guard",
        (
            "False",
            "in audit on 2 of 2 nodes: nothing is dropped for it, what it would deny is counted and logged as would-deny",
        ),
    )
    .await;
    let (code, out, err) = palisadectl(&s, &["status"]);
    assert_eq!(
        code, 0,
        "a policy in audit is in force as chosen: {out}{err}"
    );
    let line = out
        .lines()
        .find(|l| l.contains("AdminNetworkPolicy shop-guard"))
        .unwrap_or_default();
    assert!(line.ends_with("InAudit"), "{out}");
    s.kube.apply_yaml(&changed).await.unwrap();
    wait_condition(&s, "shop-guard", ("True", "enforced on 2 of 2 nodes")).await;

    // compile and explain against the live cluster, no files.
    let (code, out, err) = palisadectl(
        &s,
        &[
            "explain", "--from", "shop/api", "--to", "shop/db", "--port", "pg",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().nth(1) == Some("allow"), "{out}");
    assert!(out.contains("db-from-api"), "{out}");
    let (code, out, err) = palisadectl(
        &s,
        &[
            "explain",
            "--from",
            "shop/web",
            "--to-service",
            "shop/db",
            "--port",
            "sql",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Service shop/db port 15432 (TCP) → 1 pod(s)"),
        "{out}"
    );
    assert!(
        out.contains("shop/web -> shop/db TCP/5432"),
        "the target port, by name: {out}"
    );
    assert!(out.lines().nth(2) == Some("deny"), "web is not api: {out}");
    let (code, out, err) = palisadectl(&s, &["compile", "--node", "node-a"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("db-from-api") && out.contains("shop-guard"),
        "{out}"
    );
}

/// `kubectl auth can-i` (a SubjectAccessReview) as one of the chart's ServiceAccounts;
/// `resource` may be `kind/name`, or `kind` with `--subresource` given after `#`.
fn can_i(kube: &KubeLab, who: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let subject = format!("--as=system:serviceaccount:{SYSTEM_NS}:{who}");
    let (resource, sub) = match resource.split_once('#') {
        Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, subject.as_str()];
    if let Some(sub) = &sub {
        args.push(sub);
    }
    match ns {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let out = Command::new(kube.bin_dir().join("kubectl"))
        .args(&args)
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .output()
        .expect("kubectl");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// The e2e above proves the chart's roles are enough; this proves they are no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_service_accounts_can_do_nothing_more() {
    if !can_run() {
        return;
    }
    let kube = palisade_kubelab::KubeLab::start(Default::default())
        .await
        .expect("the control plane starts");
    support::install_chart(&kube).await;
    let s = &kube;
    let agent = "palisade-agent";
    let controller = "palisade-controller";
    // The agent reads nothing from the API (its rules come from the controller); it may
    // only ask who a scraper is and whether it may read /metrics (secure metrics).
    for (verb, resource) in [
        ("list", "secrets"),
        ("get", "secrets"),
        ("list", "pods"),
        ("watch", "pods"),
        ("list", "networkpolicies"),
        ("list", "nodes"),
        ("create", "events"),
        ("create", "serviceaccounts/token"),
    ] {
        assert!(
            !can_i(s, agent, verb, resource, None),
            "agent can {verb} {resource}"
        );
    }
    assert!(can_i(s, agent, "create", "tokenreviews", None));
    assert!(can_i(s, agent, "create", "subjectaccessreviews", None));
    // The controller reads what it compiles and writes only status.
    for (verb, resource) in [
        ("list", "pods"),
        ("watch", "networkpolicies"),
        ("create", "tokenreviews"),
    ] {
        assert!(
            can_i(s, controller, verb, resource, None),
            "controller cannot {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("create", "networkpolicies"),
        ("update", "networkpolicies"),
        ("delete", "networkpolicies"),
        ("patch", "adminnetworkpolicies"),
        ("update", "clusternetworkpolicies"),
        ("list", "secrets"),
        ("get", "secrets"),
        ("update", "pods"),
        ("create", "pods"),
        ("update", "nodes"),
        ("create", "serviceaccounts/token"),
    ] {
        assert!(
            !can_i(s, controller, verb, resource, None),
            "controller can {verb} {resource}"
        );
    }
    assert!(can_i(
        s,
        controller,
        "patch",
        "adminnetworkpolicies#status",
        None
    ));
    assert!(!can_i(s, controller, "patch", "pods#status", None));
    // Leases and ConfigMaps only in its own namespace.
    assert!(can_i(s, controller, "patch", "leases", Some(SYSTEM_NS)));
    assert!(!can_i(
        s,
        controller,
        "patch",
        "leases",
        Some("kube-system")
    ));
    assert!(!can_i(
        s,
        controller,
        "create",
        "configmaps",
        Some("kube-system")
    ));
    assert!(!can_i(
        s,
        controller,
        "patch",
        "configmaps/kube-root-ca.crt",
        Some(SYSTEM_NS)
    ));
}
