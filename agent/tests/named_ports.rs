//! Issue 8.10: accept what the apiserver accepts. Port names are unique within a
//! container, not within a pod: two containers of one pod may both name a port `web`, and
//! a rule naming `web` then matches each of its numbers (ingress on the pod itself, egress
//! to it). The cluster file loads, compiles for the node, and renders.

use std::path::PathBuf;

use palisade_agent::source::compile_for_node;
use palisade_policy::ruleset::{Clause, Group};

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: web, labels: {app: web}}
spec:
  nodeName: n1
  containers:
  - {name: main, ports: [{name: web, containerPort: 80}]}
  - {name: sidecar, ports: [{name: web, containerPort: 8080}, {name: admin, containerPort: 9000}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: client, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.1.0.3}
";

const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: a, name: web-in}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: web}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: a, name: client-out}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: web}]
";

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_port_name_shared_by_two_containers_means_both_numbers() {
    let d = Dir(std::env::temp_dir().join(format!("palisade-named-{}", std::process::id())));
    std::fs::create_dir_all(&d.0).unwrap();
    let (cluster, policies) = (d.0.join("cluster.yaml"), d.0.join("policies.yaml"));
    std::fs::write(&cluster, CLUSTER).unwrap();
    std::fs::write(&policies, POLICIES).unwrap();
    let rules = compile_for_node(&cluster, &policies, "n1").expect("the apiserver accepts it");

    let web = rules.pod("a", "web").unwrap();
    let ports: Vec<u16> = web.ingress.network_policy[0]
        .clauses
        .iter()
        .flat_map(|c| match c {
            Clause::PeerPort { ports, .. } => ports.clone().unwrap_or_default(),
            Clause::NamedPort { .. } => vec![],
        })
        .map(|r| r.start)
        .collect();
    assert_eq!(ports, [80, 8080], "ingress `web` on web means 80 and 8080");

    let client = rules.pod("a", "client").unwrap();
    let group = client.egress.network_policy[0]
        .clauses
        .iter()
        .find_map(|c| match c {
            Clause::NamedPort { group } => Some(group.clone()),
            Clause::PeerPort { .. } => None,
        })
        .expect("an egress named-port clause");
    let Group::NamedPorts(endpoints) = &*rules.groups[&group] else {
        panic!("not a named-port group");
    };
    let ports: Vec<u16> = endpoints.iter().map(|e| e.port).collect();
    assert_eq!(ports, [80, 8080], "egress `web` to web means 80 and 8080");

    let interfaces = [
        (web_key("web"), "pal-web".to_string()),
        (web_key("client"), "pal-client".to_string()),
    ]
    .into_iter()
    .collect();
    palisade_agent::render(&rules, &interfaces).expect("renders");

    // Within one container a name is still unique: the apiserver refuses that, so do we.
    std::fs::write(
        &cluster,
        CLUSTER.replace(
            "containerPort: 9000",
            "containerPort: 9000}, {name: admin, containerPort: 9001",
        ),
    )
    .unwrap();
    let err = compile_for_node(&cluster, &policies, "n1").unwrap_err();
    assert!(
        err.to_string().contains(
            "spec.containers[1].ports[2].name: port name \"admin\" is used twice in this container"
        ),
        "{err}"
    );
}

fn web_key(name: &str) -> palisade_policy::model::PodKey {
    palisade_policy::model::PodKey::new("a", name)
}
