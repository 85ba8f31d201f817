//! Fan-out: one palisade-controller feeds the *Scale* workload of the compile benchmark
//! (5,000 nodes, 150,000 pods, 20,000 NetworkPolicies) to 1,000 simulated agents, each its
//! own node on its own TLS connection (as agents do), authenticated by a static token.
//! A simulated agent is the wire protocol alone: it applies every update with
//! `palisade_wire::apply` (which checks the digest) and acknowledges it; no kernel.
//!
//! The controller runs in a child process (this binary, re-executed), so that its peak RSS
//! is its own and not the clients'. It is the controller's own hub, compile loop and gRPC
//! server (`run::serve_agents`), fed through the file source's events; the child takes
//! changes on stdin and says which connected nodes each publication reached.
//!
//! Reported: time until every agent has applied its snapshot, snapshot bytes per node,
//! controller peak RSS, and for one pod relabelled and one policy changed (each change and
//! its undo, `FANOUT_REPS` times): bytes sent and the time from the change entering the
//! controller until every affected node has applied it. Changes are spaced beyond the
//! controller's minimum interval (100 ms), so each is measured alone, not coalesced.
//!
//! `cargo bench -p palisade-controller --bench fanout`; `FANOUT_QUICK=1` for a small run
//! (500 nodes, 100 agents, 5 repetitions); `FANOUT_AGENTS`, `FANOUT_REPS` override.
//! `FANOUT_TIERED=1` adds *scale-tiered*'s 200 Admin and Baseline policies;
//! `FANOUT_INLINE=1` makes the agents ones from before shared lists (every list inline).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_controller::auth::{Authenticator, StaticTokens};
use palisade_controller::compile_loop::CompileLoop;
use palisade_controller::hub::Hub;
use palisade_controller::metrics::Metrics;
use palisade_controller::objects::{Object, SourceEvent};
use palisade_controller::run::{serve_agents, MAX_MESSAGE};
use palisade_controller::source::files;
use palisade_policy::{NodeRuleSet, PortRule, PortSpec, Protocol};
use palisade_resources::Policies;
use palisade_wire::pb::rule_stream_client::RuleStreamClient;
use palisade_wire::pb::{agent_message, Ack, AgentMessage, Hello};
use prost::Message;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

// The controller's allocator, so the figures are the controller's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHILD_ARG: &str = "--fanout-controller";
const MIN_INTERVAL: Duration = Duration::from_millis(100);

struct Size {
    nodes: usize,
    namespaces: usize,
    per_namespace: usize,
    agents: usize,
    reps: usize,
}

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn size() -> Size {
    let quick = flag("FANOUT_QUICK");
    let mut s = if quick {
        Size {
            nodes: 500,
            namespaces: 500,
            per_namespace: 30,
            agents: 100,
            reps: 5,
        }
    } else {
        Size {
            nodes: 5000,
            namespaces: 5000,
            per_namespace: 30,
            agents: 1000,
            reps: 20,
        }
    };
    s.agents = env_usize("FANOUT_AGENTS").unwrap_or(s.agents).min(s.nodes);
    s.reps = env_usize("FANOUT_REPS").unwrap_or(s.reps).max(1);
    s
}

/// The nodes that get an agent: the first `n` of the workload's.
fn agent_nodes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

fn token(node: &str) -> String {
    format!("fanout-token-of-{node}")
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::args().any(|a| a == CHILD_ARG) {
        let dir = std::env::args().next_back().expect("the TLS directory");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        if let Err(e) = rt.block_on(controller(PathBuf::from(dir))) {
            eprintln!("fan-out controller: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

// ---- the controller (child process) ----

/// Every change the child can make, done or undone in turn.
struct Changes {
    pods: Vec<Object>,
    policies: Vec<Object>,
    done: BTreeSet<(String, usize)>,
}

impl Changes {
    /// Pods and `web-to-api` policies whose change reaches at least the change's own
    /// connected node: pods on agent nodes, policies of namespaces with an `app-1` pod there.
    fn pick(events: &[SourceEvent], agents: &BTreeSet<String>, reps: usize) -> Changes {
        let mut pods = Vec::new();
        let mut subject_ns = BTreeSet::new();
        for e in events {
            if let SourceEvent::Upsert(o @ Object::Pod(p)) = e {
                if p.node.as_ref().is_some_and(|n| agents.contains(n)) {
                    if p.labels.get("app").map(String::as_str) == Some("app-1") {
                        subject_ns.insert(p.namespace.as_str());
                    }
                    pods.push(o);
                }
            }
        }
        let policies: Vec<&Object> = events
            .iter()
            .filter_map(|e| match e {
                SourceEvent::Upsert(o @ Object::Policy(c))
                    if c.policy.id.name == "web-to-api"
                        && c.policy
                            .id
                            .namespace
                            .as_deref()
                            .is_some_and(|ns| subject_ns.contains(ns)) =>
                {
                    Some(o)
                }
                _ => None,
            })
            .collect();
        let spread = |v: Vec<&Object>| -> Vec<Object> {
            let step = (v.len() / reps).max(1);
            v.into_iter().step_by(step).take(reps).cloned().collect()
        };
        Changes {
            pods: spread(pods),
            policies: spread(policies),
            done: BTreeSet::new(),
        }
    }

    /// The `i`th pod relabelled (`app-k` to `app-k+1`, as the compile benchmark does) or
    /// the `i`th policy given one more port; the second time, back as it was.
    fn toggle(&mut self, kind: &str, i: usize) -> Option<Object> {
        let list = match kind {
            "pod" => &self.pods,
            "policy" => &self.policies,
            _ => return None,
        };
        let original = list.get(i)?.clone();
        if !self.done.insert((kind.to_string(), i)) {
            self.done.remove(&(kind.to_string(), i));
            return Some(original);
        }
        Some(match original {
            Object::Pod(mut p) => {
                let app = p.labels.get("app").cloned().unwrap_or_default();
                let k: usize = app.trim_start_matches("app-").parse().unwrap_or(0);
                p.labels
                    .insert("app".into(), format!("app-{}", (k + 1) % 6));
                Object::Pod(p)
            }
            Object::Policy(mut c) => {
                if let Some(ports) = c.policy.ingress[0].ports.as_mut() {
                    ports.push(PortRule {
                        protocol: Protocol::Tcp,
                        port: PortSpec::Range {
                            start: 8443,
                            end: 8443,
                        },
                    });
                }
                Object::Policy(c)
            }
            other => other,
        })
    }
}

async fn controller(dir: PathBuf) -> anyhow::Result<()> {
    let size = size();
    let agents: BTreeSet<String> = agent_nodes(size.agents).into_iter().collect();
    let started = Instant::now();
    let mut w =
        palisade_policy::workloads::scale_sized(size.nodes, size.namespaces, size.per_namespace);
    if flag("FANOUT_TIERED") {
        w.policies
            .extend(palisade_policy::workloads::tiered_policies());
    }
    let mut events = files::events(
        w.cluster,
        Vec::new(),
        Policies {
            policies: w.policies,
            warnings: Vec::new(),
        },
    );
    events.push(SourceEvent::Synced);
    let generated = started.elapsed();
    let mut changes = Changes::pick(&events, &agents, size.reps);

    let hub = Hub::new(Arc::new(Metrics::new()));
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(CompileLoop::new(hub.clone(), None).run(rx, MIN_INTERVAL));
    let started = Instant::now();
    for e in events {
        tx.send(e).await?;
    }
    hub.wait_ready().await;
    let compiled = started.elapsed();

    let identity = Identity::from_pem(
        std::fs::read(dir.join("tls.crt"))?,
        std::fs::read(dir.join("tls.key"))?,
    );
    let auth = Authenticator::Static(StaticTokens::new(
        agents.iter().map(|n| (n.clone(), token(n))),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(serve_agents(
        listener,
        identity,
        hub.clone(),
        Arc::new(auth),
        std::future::pending(),
    ));
    println!(
        "ready {port} {:.0} {:.0} {} {} {}",
        ms(generated),
        ms(compiled),
        vm_kib("VmHWM:"),
        changes.pods.len(),
        changes.policies.len()
    );

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["stats"] => println!(
                "stats {} {} {}",
                hub.metrics.bytes_sent.get(),
                vm_kib("VmHWM:"),
                vm_kib("VmRSS:")
            ),
            [kind, i] => {
                let object = changes
                    .toggle(kind, i.parse()?)
                    .ok_or_else(|| anyhow::anyhow!("no change {line:?}"))?;
                let before = hub.metrics.generation.get();
                tx.send(SourceEvent::Upsert(object)).await?;
                // The gauge is set after the publication reached every node's channel and
                // status, under the same locks.
                while hub.metrics.generation.get() == before {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                let generation = hub.metrics.generation.get() as u64;
                let reached: Vec<String> = hub
                    .node_status()
                    .into_iter()
                    .filter(|(_, s)| s.connected > 0 && s.published == generation)
                    .map(|(n, _)| n)
                    .collect();
                println!("published {generation} {}", reached.join(","));
            }
            _ => anyhow::bail!("unknown command {line:?}"),
        }
    }
    Ok(())
}

// ---- the simulated agents and the measurement (parent process) ----

/// The controller child; dropping it ends it and removes its directory.
struct ControllerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
}

impl ControllerProcess {
    fn spawn(dir: &Path) -> ControllerProcess {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg(CHILD_ARG)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the controller");
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        ControllerProcess {
            child,
            stdin,
            stdout,
            dir: dir.to_path_buf(),
        }
    }

    /// The next line's words after `tag`.
    fn expect(&mut self, tag: &str) -> Vec<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the controller");
        let mut words = line.split_whitespace().map(str::to_string);
        assert_eq!(
            words.next().as_deref(),
            Some(tag),
            "the controller said {line:?}"
        );
        words.collect()
    }

    fn ask(&mut self, command: &str, tag: &str) -> Vec<String> {
        writeln!(self.stdin, "{command}").expect("write to the controller");
        self.stdin.flush().expect("flush");
        self.expect(tag)
    }

    /// Bytes sent so far and peak RSS (KiB).
    fn stats(&mut self) -> (u64, u64) {
        let w = self.ask("stats", "stats");
        (w[0].parse().unwrap(), w[1].parse().unwrap())
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 1,000 streams plus the controller's side of them: more than the usual 1,024 files.
fn raise_open_files() {
    let want: libc::rlim_t = 65_536;
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: want.max(l.rlim_cur),
            rlim_max: want.max(l.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            // Not allowed to raise the hard limit: go as far as it.
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// One update a simulated agent applied (digest checked), or why it could not.
enum Report {
    Applied {
        agent: usize,
        generation: u64,
        bytes: usize,
        at: Instant,
    },
    Failed(String),
}

async fn agent(
    index: usize,
    node: String,
    url: String,
    ca: Arc<Vec<u8>>,
    out: mpsc::UnboundedSender<Report>,
) {
    if let Err(e) = stream(index, &node, url, &ca, &out).await {
        let _ = out.send(Report::Failed(format!("{node}: {e:#}")));
    }
}

async fn stream(
    index: usize,
    node: &str,
    url: String,
    ca: &[u8],
    out: &mpsc::UnboundedSender<Report>,
) -> anyhow::Result<()> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("127.0.0.1");
    let channel = Endpoint::from_shared(url)?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(60))
        .connect()
        .await?;
    let mut client = RuleStreamClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(16);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node: node.to_string(),
            agent_version: "fanout-bench".into(),
            enforced_digest: Vec::new(),
            shared_lists: !flag("FANOUT_INLINE"),
            group_patches: !flag("FANOUT_INLINE"),
        })),
    })
    .await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", token(node)).parse()?);
    let mut updates = client.watch(request).await?.into_inner();
    let mut state: Option<NodeRuleSet> = None;
    while let Some(update) = updates.message().await? {
        let bytes = update.encoded_len();
        let next = palisade_wire::apply(node, state.as_ref(), &update)?;
        state = Some(next);
        let at = Instant::now();
        let _ = out.send(Report::Applied {
            agent: index,
            generation: update.generation,
            bytes,
            at,
        });
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Ack(Ack {
                generation: update.generation,
                ok: true,
                error: String::new(),
            })),
        })
        .await?;
    }
    anyhow::bail!("the controller ended the stream")
}

/// What the agents have applied, fed from their reports.
struct Applied {
    rx: mpsc::UnboundedReceiver<Report>,
    latest: Vec<Option<(u64, Instant)>>,
    /// Bytes of updates by generation.
    bytes: BTreeMap<u64, u64>,
    first: Vec<usize>,
}

impl Applied {
    async fn next(&mut self, deadline: Instant) {
        let report = tokio::time::timeout_at(deadline.into(), self.rx.recv())
            .await
            .expect("the agents stalled")
            .expect("agents report");
        match report {
            Report::Applied {
                agent,
                generation,
                bytes,
                at,
            } => {
                if self.latest[agent].is_none() {
                    self.first[agent] = bytes;
                }
                self.latest[agent] = Some((generation, at));
                *self.bytes.entry(generation).or_default() += bytes as u64;
            }
            Report::Failed(e) => panic!("a simulated agent failed: {e}"),
        }
    }

    /// Waits until every agent in `agents` has applied `generation` (or later); the latest
    /// time one of them did.
    async fn all(&mut self, agents: &[usize], generation: u64, deadline: Instant) -> Instant {
        loop {
            let mut last = None;
            let done = agents.iter().all(|&a| match self.latest[a] {
                Some((g, at)) if g >= generation => {
                    last = last.max(Some(at));
                    true
                }
                _ => false,
            });
            if done {
                return last.unwrap_or_else(Instant::now);
            }
            self.next(deadline).await;
        }
    }
}

fn pct<T: Copy + Ord>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn bench() {
    let size = size();
    raise_open_files();
    let dir = std::env::temp_dir().join(format!("palisade-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let tls = palisade_controller::devtls::generate(&dir, &["127.0.0.1"]).expect("certificates");
    let ca = Arc::new(std::fs::read(&tls.ca).expect("CA"));
    println!(
        "fan-out: Scale workload sized {} nodes, {} namespaces of {} pods; {} agents",
        size.nodes, size.namespaces, size.per_namespace, size.agents
    );
    let mut controller = ControllerProcess::spawn(&dir);
    let ready = controller.expect("ready");
    let (port, pods, policies) = (ready[0].clone(), &ready[4], &ready[5]);
    println!(
        "  controller: workload generated in {} ms, first compile and publication {} ms, peak RSS {:.0} MiB before any agent",
        ready[1],
        ready[2],
        ready[3].parse::<f64>().unwrap() / 1024.0
    );

    let nodes = agent_nodes(size.agents);
    let url = format!("https://127.0.0.1:{port}");
    let (tx, rx) = mpsc::unbounded_channel();
    let mut applied = Applied {
        rx,
        latest: vec![None; nodes.len()],
        bytes: BTreeMap::new(),
        first: vec![0; nodes.len()],
    };
    let started = Instant::now();
    for (i, node) in nodes.iter().enumerate() {
        tokio::spawn(agent(i, node.clone(), url.clone(), ca.clone(), tx.clone()));
    }
    let everyone: Vec<usize> = (0..nodes.len()).collect();
    let snapshots = applied
        .all(&everyone, 0, Instant::now() + Duration::from_secs(300))
        .await
        - started;
    let (sent, hwm) = controller.stats();
    let mut per_node = applied.first.clone();
    per_node.sort();
    println!(
        "  all {} snapshots applied (digest checked) in {:.0} ms; snapshot bytes per node min {} median {} max {} (total {:.1} MiB; controller counted {:.1} MiB)",
        nodes.len(),
        ms(snapshots),
        per_node[0],
        pct(&per_node, 0.5),
        per_node[per_node.len() - 1],
        per_node.iter().sum::<usize>() as f64 / 1048576.0,
        sent as f64 / 1048576.0,
    );
    println!(
        "  controller peak RSS with {} agents: {:.0} MiB",
        nodes.len(),
        hwm as f64 / 1024.0
    );

    for (kind, what, count) in [
        ("pod", "pod relabelled", pods),
        ("policy", "policy changed", policies),
    ] {
        let count: usize = count.parse().unwrap();
        let mut times = Vec::new();
        let mut bytes = Vec::new();
        let mut reached = Vec::new();
        let mut counted = Vec::new();
        for i in 0..count {
            for _ in 0..2 {
                tokio::time::sleep(MIN_INTERVAL + Duration::from_millis(20)).await;
                let (sent_before, _) = controller.stats();
                let t0 = Instant::now();
                let reply = controller.ask(&format!("{kind} {i}"), "published");
                let generation: u64 = reply[0].parse().unwrap();
                let affected: Vec<usize> = reply
                    .get(1)
                    .map(|l| {
                        l.split(',')
                            .map(|n| n.trim_start_matches("node-").parse().unwrap())
                            .collect()
                    })
                    .unwrap_or_default();
                let last = applied
                    .all(
                        &affected,
                        generation,
                        Instant::now() + Duration::from_secs(60),
                    )
                    .await;
                if affected.is_empty() {
                    continue;
                }
                times.push(last.saturating_duration_since(t0));
                bytes.push(applied.bytes.get(&generation).copied().unwrap_or(0));
                reached.push(affected.len());
                counted.push(controller.stats().0 - sent_before);
            }
        }
        times.sort();
        bytes.sort();
        reached.sort();
        counted.sort();
        if times.is_empty() {
            println!("  {what}: no change reached a connected node");
            continue;
        }
        println!(
            "  {what} ({} changes and undos): at every affected node p50 {:.1} ms p99 {:.1} ms max {:.1} ms; nodes affected median {} max {}; bytes sent median {} max {} (controller counted median {})",
            times.len(),
            ms(pct(&times, 0.5)),
            ms(pct(&times, 0.99)),
            ms(times[times.len() - 1]),
            pct(&reached, 0.5),
            reached[reached.len() - 1],
            pct(&bytes, 0.5),
            bytes[bytes.len() - 1],
            pct(&counted, 0.5),
        );
    }
    let (_, hwm) = controller.stats();
    println!(
        "  controller peak RSS at the end: {:.0} MiB (the agents' process: {:.0} MiB)",
        hwm as f64 / 1024.0,
        vm_kib("VmHWM:") as f64 / 1024.0
    );
}
