//! Issue 8 item 13, last case: pods reach a Service's ClusterIP through a real kube-proxy
//! (nftables mode) in every lab node, beside the agent; the destination's NetworkPolicy
//! decides, and neither table is touched by the other's owner.
//!
//! Cost: one control plane, one controller replica, two lab nodes with agents and
//! kube-proxies; about 30 s on a loaded 2-core machine (see the timings it prints).

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_kubelab::{kube_proxy_available, KubeProxy, KUBE_PROXY_USER};
use support::{agent_binary, can_run, free_port, Process, System};

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
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: server, labels: {app: server}}
spec: {nodeName: node-b, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: friend, labels: {app: friend}}
spec: {nodeName: node-a, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: stranger, labels: {app: stranger}}
spec: {nodeName: node-a, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: neighbour, labels: {app: friend}}
spec: {nodeName: node-b, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: lurker, labels: {app: stranger}}
spec: {nodeName: node-b, containers: [{name: c}]}
"#;

/// Where netlab puts pod addresses (`10.244.<node>.<n>`): kube-proxy's `--cluster-cidr`,
/// so pod sources are not masqueraded.
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const CLUSTER_IP: &str = "10.96.100.10";
const SERVICE_PORT: u16 = 80;

/// Port 80 of the Service goes to the pods' named port `http` (8080).
const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: server}
spec:
  clusterIP: 10.96.100.10
  selector: {app: server}
  ports: [{name: web, protocol: TCP, port: 80, targetPort: http}]
"#;

/// Names the pod's port (8080), not the Service's (80): it only works if the policy sees
/// the connection after kube-proxy's DNAT.
const SERVER_FROM_FRIENDS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: server-from-friends}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: friend}}}]
    ports: [{port: 8080}]
"#;

fn nft(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args)
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restarts every agent with drift repair each second (the default is a minute), on a fresh
/// metrics port (the old one may linger in TIME_WAIT).
async fn restart_agents_with_fast_reconcile(s: &mut System) {
    for a in 0..s.agents.len() {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut args = s.agents[a].args.clone();
        let at = args.iter().position(|x| x == "--metrics-addr").unwrap() + 1;
        args[at] = metrics.to_string();
        args.extend(["--reconcile-interval-secs".into(), "1".into()]);
        let log = s.dir.join(format!("agent-{}-fast.log", s.agents[a].node));
        s.agents[a].process.stop();
        s.agents[a].process = Process::spawn(Command::new(agent_binary()).args(&args), log);
        s.agents[a].args = args;
        s.agents[a].metrics = metrics;
        s.wait_agent_ready(a).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_ip_through_real_kube_proxy_is_decided_by_the_destinations_policy() {
    if !can_run() || !kube_proxy_available() {
        return;
    }
    let mut s = System::start("kube-proxy", CLUSTER, 1).await;
    let cluster_ip = CLUSTER_IP.parse().unwrap();
    let server_ip = s.pod_ip("shop", "server").to_string();
    s.serve("shop", "server", 8080);

    // kube-proxy's identity may read what it proxies and nothing else.
    let identity = s.kube.kubeconfig_for(KUBE_PROXY_USER, &[]).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&identity).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let as_proxy = kube::Client::try_from(config).unwrap();
    let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        kube::Api::all(as_proxy.clone());
    slices
        .list(&Default::default())
        .await
        .expect("system:node-proxier may list EndpointSlices");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(as_proxy, "shop");
    assert!(
        secrets.list(&Default::default()).await.is_err(),
        "kube-proxy's identity must not read Secrets"
    );

    // Declared after `s`, so they stop (and their tables go) before the lab is torn down.
    let started = Instant::now();
    let mut proxies: Vec<KubeProxy> = ["node-a", "node-b"]
        .iter()
        .map(|node| {
            let netns = s.lab.node_netns(node).unwrap().to_string();
            s.kube
                .start_kube_proxy(node, &netns, CLUSTER_CIDR)
                .expect("kube-proxy starts")
        })
        .collect();
    for p in &mut proxies {
        let took = p
            .wait_for_rules(&["table ip kube-proxy"], Duration::from_secs(60))
            .await
            .expect("kube-proxy creates its table");
        eprintln!(
            "kube-proxy of {}: table after {:.1} s from start",
            p.node(),
            took.max(started.elapsed()).as_secs_f64()
        );
    }

    // The Service; the endpointslice controller writes its slice from the Ready server pod.
    let created = Instant::now();
    s.kube.apply_yaml(SERVICE).await.expect("the Service");
    for p in &mut proxies {
        p.wait_for_rules(&[CLUSTER_IP, &server_ip], Duration::from_secs(60))
            .await
            .expect("kube-proxy programs the Service and its endpoint");
    }
    eprintln!(
        "Service created → programmed by both kube-proxies: {:.1} s",
        created.elapsed().as_secs_f64()
    );

    // No policy: everyone reaches the server through the ClusterIP, across nodes and within.
    for client in ["friend", "stranger", "neighbour", "lurker"] {
        s.expect(
            &format!("{client} → ClusterIP, no policy"),
            ("shop", client),
            cluster_ip,
            SERVICE_PORT,
            true,
        )
        .await;
    }

    // The destination's policy decides: it sees the client's own address (no masquerade)
    // and the pod's port (after DNAT).
    s.kube.apply_yaml(SERVER_FROM_FRIENDS).await.expect("apply");
    for (client, allowed) in [
        ("stranger", false),
        ("friend", true),
        ("lurker", false),
        ("neighbour", true),
    ] {
        let what = format!("{client} → ClusterIP under server-from-friends");
        s.expect(&what, ("shop", client), cluster_ip, SERVICE_PORT, allowed)
            .await;
    }

    // Both tables live side by side in every node.
    let (netns_a, netns_b) = (
        s.lab.node_netns("node-a").unwrap().to_string(),
        s.lab.node_netns("node-b").unwrap().to_string(),
    );
    for (node, netns) in [("node-a", &netns_a), ("node-b", &netns_b)] {
        let tables = nft(netns, &["list", "tables"]);
        for t in ["table inet palisade", "table ip kube-proxy"] {
            assert!(tables.contains(t), "{node} lacks {t}:\n{tables}");
        }
    }

    // The agent's drift repair replaces only its own table: tamper with ours, and watch the
    // repair happen while kube-proxy's stays exactly as it was.
    restart_agents_with_fast_reconcile(&mut s).await;
    let kube_proxy_before = proxies[0].table().unwrap();
    nft(&netns_a, &["add", "chain", "inet", "palisade", "tampered"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.table("node-a").contains("tampered") {
        assert!(
            Instant::now() < deadline,
            "the agent did not repair its table:\n{}",
            s.agents[0].process.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        proxies[0].table().unwrap(),
        kube_proxy_before,
        "the agent's drift repair changed kube-proxy's table"
    );

    // kube-proxy's full resync (a restarted kube-proxy rewrites its whole table) and a
    // partial one (a Service change) leave ours alone.
    let ours_before: Vec<String> = ["node-a", "node-b"].iter().map(|n| s.table(n)).collect();
    let resynced = Instant::now();
    for p in &mut proxies {
        let syncs = p.sync_count();
        p.restart().expect("kube-proxy restarts");
        p.wait_for_syncs(syncs + 1, Duration::from_secs(60))
            .await
            .expect("the restarted kube-proxy syncs");
    }
    eprintln!(
        "kube-proxy restart → first full sync done on both nodes: {:.1} s",
        resynced.elapsed().as_secs_f64()
    );
    s.kube
        .apply_yaml(&SERVICE.replace(
            "ports: [{name: web, protocol: TCP, port: 80, targetPort: http}]",
            "ports: [{name: web, protocol: TCP, port: 80, targetPort: http}, {name: alt, protocol: TCP, port: 81, targetPort: http}]",
        ))
        .await
        .expect("the Service gains a port");
    for p in &mut proxies {
        // The port's entry in the Service map, whose chain DNATs: a port without endpoints
        // yet is in the no-endpoint map instead (`goto reject-chain`).
        let endpoint = format!("{CLUSTER_IP} . tcp . 81 : goto service-");
        if let Err(e) = p
            .wait_for_rules(&[&endpoint], Duration::from_secs(60))
            .await
        {
            panic!(
                "kube-proxy programs the new port: {e}\n{}",
                p.table().unwrap_or_default()
            );
        }
    }
    let ours_after: Vec<String> = ["node-a", "node-b"].iter().map(|n| s.table(n)).collect();
    assert_eq!(
        ours_before, ours_after,
        "kube-proxy's resyncs changed Palisade's table"
    );
    for (client, allowed) in [("stranger", false), ("friend", true)] {
        let what = format!("{client} → ClusterIP:81 after the resyncs");
        s.expect(&what, ("shop", client), cluster_ip, 81, allowed)
            .await;
    }
    for p in &mut proxies {
        p.check_running().expect("kube-proxy is still running");
    }
    drop(proxies);
    for netns in [&netns_a, &netns_b] {
        let tables = nft(netns, &["list", "tables"]);
        assert!(
            !tables.contains("kube-proxy"),
            "kube-proxy's tables outlived it:\n{tables}"
        );
    }
}
