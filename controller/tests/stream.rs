//! The controller process with its file source, and the agent's stream client, over real
//! TLS on loopback: snapshots equal what the compiler makes for the node, edits arrive as
//! deltas, and a stream is served only the node its token names. No kernel state: the
//! agent side here is the stream client alone.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_agent::stream::{Delivered, StreamConfig, StreamMetrics};
use palisade_policy::{Compiler, NodeRuleSet};
use tokio::sync::{mpsc, watch};

const CLUSTER: &str = include_str!("../../cli/demo/cluster.yaml");
const POLICIES: &str = include_str!("../../cli/demo/policies.yaml");

struct Controller {
    child: Child,
    dir: PathBuf,
    metrics: SocketAddr,
    url: String,
    ca: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start(name: &str) -> Controller {
    let dir = std::env::temp_dir().join(format!("palisade-ctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tls = palisade_controller::devtls::generate(&dir, &["127.0.0.1", "localhost"]).unwrap();
    write_atomic(&dir.join("cluster.yaml"), CLUSTER);
    write_atomic(&dir.join("policies.yaml"), POLICIES);
    write_atomic(
        &dir.join("tokens.yaml"),
        "node-1: token-of-node-1\nnode-2: token-of-node-2\n",
    );
    let (grpc, metrics) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join("controller.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_palisade-controller"))
        .arg("--cluster")
        .arg(dir.join("cluster.yaml"))
        .arg("--policies")
        .arg(dir.join("policies.yaml"))
        .arg("--node-tokens")
        .arg(dir.join("tokens.yaml"))
        .arg("--tls-cert")
        .arg(&tls.cert)
        .arg("--tls-key")
        .arg(&tls.key)
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--min-interval-ms", "50"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Controller {
        child,
        url: format!("https://127.0.0.1:{grpc}"),
        metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
        ca: tls.ca,
        dir,
    }
}

fn compiled(dir: &Path, node: &str) -> NodeRuleSet {
    let (cluster, _) = palisade_resources::load_cluster(&dir.join("cluster.yaml")).unwrap();
    let policies = palisade_resources::load_policies(&dir.join("policies.yaml")).unwrap();
    Compiler::new(cluster, policies.policies)
        .node_rule_set(node)
        .unwrap()
}

struct Client {
    states: watch::Receiver<Option<Delivered>>,
    metrics: StreamMetrics,
    _task: tokio::task::JoinHandle<()>,
}

fn client(c: &Controller, node: &str, token: &str) -> Client {
    let token_file = c.dir.join(format!("token-{node}-{token}"));
    std::fs::write(&token_file, token).unwrap();
    let cfg = StreamConfig {
        controllers: vec![c.url.clone()],
        token_file,
        ca_file: c.ca.clone(),
        node: node.to_string(),
    };
    let (tx, rx) = watch::channel(None);
    let (_acks_tx, acks_rx) = mpsc::unbounded_channel();
    let metrics = StreamMetrics::new();
    let task = tokio::spawn(palisade_agent::stream::run(
        cfg,
        None,
        tx,
        acks_rx,
        metrics.clone(),
    ));
    std::mem::forget(_acks_tx);
    Client {
        states: rx,
        metrics,
        _task: task,
    }
}

async fn next_state(
    client: &mut Client,
    want: impl Fn(&NodeRuleSet) -> bool,
) -> Option<Arc<NodeRuleSet>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(d) = client.states.borrow_and_update().as_ref() {
            if want(&d.rules) {
                return Some(d.rules.clone());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let _ = tokio::time::timeout(left, client.states.changed()).await;
    }
}

async fn metrics_text(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn a_node_gets_its_compiled_rules_then_deltas_and_nothing_else() {
    let c = start("deltas");
    let mut node1 = client(&c, "node-1", "token-of-node-1");
    let want = compiled(&c.dir, "node-1");
    let got = next_state(&mut node1, |r| *r == want)
        .await
        .unwrap_or_else(|| panic!("node-1 never got its compiled rules; log:\n{}", log(&c)));
    assert!(!got.pods.is_empty(), "the demo has pods on node-1");
    assert_eq!(node1.metrics.connected.get(), 1);

    // An edit of the policies file reaches the agent as the new compile.
    let edited = POLICIES.replace("port: 5432", "port: 5433");
    assert_ne!(edited, POLICIES, "the demo policies name port 5432");
    write_atomic(&c.dir.join("policies.yaml"), &edited);
    let want = compiled(&c.dir, "node-1");
    next_state(&mut node1, |r| *r == want)
        .await
        .unwrap_or_else(|| panic!("the edit never arrived; log:\n{}", log(&c)));

    // A broken policies file changes nothing: the last good state stays in force.
    write_atomic(
        &c.dir.join("policies.yaml"),
        "kind: NetworkPolicy\nspec: [\n",
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        node1.states.borrow().as_ref().map(|d| (*d.rules).clone()),
        Some(want)
    );
    let text = metrics_text(c.metrics).await;
    assert!(
        text.contains("palisade_controller_nodes_connected 1"),
        "{text}"
    );
}

#[tokio::test]
async fn streams_are_refused_without_a_token_or_for_another_node() {
    let c = start("refused");
    // Wait until the controller serves at all.
    let mut good = client(&c, "node-2", "token-of-node-2");
    next_state(&mut good, |r| r.node == "node-2")
        .await
        .unwrap_or_else(|| panic!("node-2 never got rules; log:\n{}", log(&c)));

    let mut other = client(&c, "node-1", "token-of-node-2");
    let mut none = client(&c, "node-1", "");
    let mut forged = client(&c, "node-1", "not-a-token");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (what, cl) in [
        ("another node's token", &mut other),
        ("no token", &mut none),
        ("an unknown token", &mut forged),
    ] {
        assert!(
            cl.states.borrow().is_none(),
            "a stream with {what} was served"
        );
        assert_eq!(cl.metrics.connected.get(), 0, "{what}");
    }
    let text = metrics_text(c.metrics).await;
    for reason in ["other_node", "no_token", "invalid_token"] {
        assert!(
            text.lines().any(
                |l| l.starts_with("palisade_controller_stream_refused_total")
                    && l.contains(&format!("reason=\"{reason}\""))
                    && !l.ends_with(" 0")
            ),
            "no refusal counted for {reason}:\n{text}"
        );
    }
}

fn log(c: &Controller) -> String {
    std::fs::read_to_string(c.dir.join("controller.log")).unwrap_or_default()
}

/// Audit over the stream: a namespace relabelled `palisade.dev/enforcement: audit` moves
/// its NetworkPolicies out of the enforced rules into audit lists, which the agent
/// receives exactly as the staged compile gives them; labelled back, they are enforced.
#[tokio::test]
async fn a_namespace_in_audit_reaches_the_agent_as_audit_lists() {
    let c = start("audit");
    let mut node1 = client(&c, "node-1", "token-of-node-1");
    let plain = compiled(&c.dir, "node-1");
    next_state(&mut node1, |r| *r == plain)
        .await
        .unwrap_or_else(|| panic!("node-1 never got its rules; log:\n{}", log(&c)));
    let shop = "metadata: {name: shop, labels: {team: shop, env: prod}}";
    assert!(CLUSTER.contains(shop), "the demo's shop namespace");
    let audited = CLUSTER.replace(
        shop,
        "metadata: {name: shop, labels: {team: shop, env: prod, palisade.dev/enforcement: audit}}",
    );
    write_atomic(&c.dir.join("cluster.yaml"), &audited);
    let (cluster, _) = palisade_resources::load_cluster(&c.dir.join("cluster.yaml")).unwrap();
    let policies = palisade_resources::load_policies(&c.dir.join("policies.yaml")).unwrap();
    let want = palisade_policy::StagedCompiler::new(
        cluster,
        policies.policies,
        palisade_policy::Enforcement::Enforce,
    )
    .node_rule_set("node-1")
    .unwrap();
    let shop_pods = |r: &NodeRuleSet| r.pods.iter().filter(|p| p.namespace == "shop").count();
    assert!(
        want.pods
            .iter()
            .filter(|p| p.namespace == "shop")
            .all(|p| !p.audit.is_empty() && p.ingress.isolated_by.is_empty()),
        "the shop's pods are not isolated, and audited: {want:#?}"
    );
    assert!(shop_pods(&want) > 0, "the demo has shop pods on node-1");
    next_state(&mut node1, |r| *r == want)
        .await
        .unwrap_or_else(|| panic!("the audit lists never arrived; log:\n{}", log(&c)));
    write_atomic(&c.dir.join("cluster.yaml"), CLUSTER);
    next_state(&mut node1, |r| *r == plain)
        .await
        .unwrap_or_else(|| panic!("enforcing again never arrived; log:\n{}", log(&c)));
}

/// The first update of a stream whose Hello says `shared_lists`, from a bare client.
async fn first_update(
    c: &Controller,
    node: &str,
    token: &str,
    shared_lists: bool,
) -> palisade_wire::pb::NodeUpdate {
    use palisade_wire::pb::{
        agent_message, rule_stream_client::RuleStreamClient, AgentMessage, Hello,
    };
    use tokio_stream::StreamExt as _;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let ca = std::fs::read(&c.ca).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let channel = Endpoint::from_shared(c.url.clone())?
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&ca))
                        .domain_name("localhost"),
                )?
                .connect()
                .await?;
            let hello = AgentMessage {
                kind: Some(agent_message::Kind::Hello(Hello {
                    node: node.to_string(),
                    agent_version: "test".into(),
                    enforced_digest: Vec::new(),
                    shared_lists,
                })),
            };
            let mut request =
                tonic::Request::new(tokio_stream::iter([hello]).chain(tokio_stream::pending()));
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            let mut updates = RuleStreamClient::new(channel)
                .watch(request)
                .await?
                .into_inner();
            updates
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the stream ended"))
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(update)) => return update,
            other if Instant::now() > deadline => {
                panic!("no first update: {other:?}; log:\n{}", log(c))
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// An agent from before shared lists says nothing of them in its Hello, and gets every
/// Admin and Baseline list inline with the inline form's digest; one that reads them gets
/// each list once. Both rebuild the compiled state exactly.
#[tokio::test]
async fn agents_before_shared_lists_get_them_inline() {
    let c = start("forms");
    let want = compiled(&c.dir, "node-1");
    let lists = palisade_wire::delta::lists_of(&want);
    assert!(
        !lists.is_empty(),
        "the demo's ClusterNetworkPolicy gives node-1's pods lists"
    );
    for shared in [false, true] {
        let first = first_update(&c, "node-1", "token-of-node-1", shared).await;
        assert!(first.snapshot);
        assert_eq!(first.shared_lists, shared);
        assert_eq!(
            first.upsert_lists.len(),
            if shared { lists.len() } else { 0 }
        );
        let inline_admin = first
            .upsert_pods
            .iter()
            .flat_map(|p| [&p.ingress, &p.egress])
            .flatten()
            .any(|d| !d.admin.is_empty() || !d.baseline.is_empty());
        assert_eq!(inline_admin, !shared);
        let got = palisade_wire::apply("node-1", None, &first).expect("the update applies");
        assert_eq!(got, want);
    }
}
