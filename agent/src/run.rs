//! The agent's loop: rules file and interface events in, atomic transactions out, a full
//! reconcile at start and every `reconcile_interval_secs`, exponential back-off after a
//! failed transaction (the last good table stays in force meanwhile).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use palisade_policy::ruleset::NodeRuleSet;
use tokio::time::{sleep_until, Instant};

use crate::apply::Applier;
use crate::config::AgentConfig;
use crate::interfaces::{events, pod_interfaces, Discovery, HostRoutes};
use crate::metrics;
use crate::nft::Nft;
use crate::render::Renderer;
use crate::render::TABLE;
use crate::render::{Interfaces, Ruleset, EGRESS_DISPATCH};
use crate::stream::{Delivered, Enforced, StreamMetrics};
use crate::sweep::Sweeper;
use tokio::sync::{mpsc, watch, Notify};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Enters `/var/run/netns/NAME` with the calling thread. Call before starting any other
/// thread (tokio's workers, nft children inherit it).
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    crate::netns::enter(name).context("cannot enter the network namespace")?;
    Ok(())
}

/// Runs until Ctrl-C / SIGTERM. `listener` was bound, and `home` (the namespace to dial
/// the controller from) opened, before entering the namespace.
pub async fn run(
    cfg: AgentConfig,
    listener: std::net::TcpListener,
    access: palisade_httpd::Access,
    home: Option<std::fs::File>,
) -> anyhow::Result<()> {
    let source = cfg.source();
    let nft = Nft::local();
    let mut applier = Applier::new(nft.clone());
    let mut renderer = Renderer::with_pod_interface_patterns(cfg.drop_patterns());
    renderer.set_flow_log(cfg.flow_log());
    let stats = applier.stats();
    let cap_stats = applier.stats();
    let registry = metrics::registry(nft.clone(), stats.clone());
    let flows = cfg.flow_log.then(|| {
        let log = crate::flows::FlowLog::new(cfg.flow_log_capacity, &registry);
        match crate::nfnl::nflog::open(cfg.flow_log_group, None) {
            Ok(socket) => log.read(socket),
            Err(e) => tracing::error!(error = %e, group = cfg.flow_log_group, "cannot read the flow log (denied packets are still dropped and counted)"),
        }
        log
    });
    let (streamed_tx, mut streamed) = watch::channel::<Option<Delivered>>(None);
    let (enforced_tx, enforced_rx) = mpsc::unbounded_channel::<Enforced>();
    if let Some(stream) = cfg.stream() {
        let stream_metrics = StreamMetrics::new();
        stream_metrics.register(&registry);
        tokio::spawn(crate::stream::run(
            stream,
            home,
            streamed_tx,
            enforced_rx,
            stream_metrics,
        ));
    } else if source.is_none() {
        anyhow::bail!("no rule source configured");
    }
    // The stream generation of the state in `rules`, acknowledged once it is in force.
    let mut pending_ack: Option<(u64, u64)> = None;
    // A restart that finds our table continues enforcement: only pods the kernel's table
    // did not enforce yet start now (issue 10.4).
    let mut sweeper = Sweeper::new(cfg.strict_mode, kernel_dispatch(&nft), &registry);
    let registry = Arc::new(registry);
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!(addr = %listener.local_addr()?, mode = %cfg.metrics_mode(), scheme = access.scheme(), "serving /metrics, /healthz, /readyz, /flows");
    let endpoints = Arc::new(metrics::Endpoints {
        registry,
        stats: stats.clone(),
        flows: flows.clone(),
    });
    tokio::spawn(palisade_httpd::serve(
        listener,
        access,
        cfg.http_limits(),
        endpoints,
    ));

    let discovery = Discovery::new()?;
    let mut link_events = events()?.boxed();
    // Changes to our table by anyone else wake the loop at once (issue 12.5); the
    // periodic reconcile stays as the backstop.
    let drift = Arc::new(Notify::new());
    if !cfg.watch_nftables_events {
        tracing::info!("not watching nftables events: drift is repaired at the periodic reconcile");
    } else {
        match crate::nfnl::events::open(None) {
            Ok(socket) => crate::nfnl::events::watch(socket, TABLE, drift.clone()),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch nftables events; drift is repaired at the periodic reconcile only")
            }
        }
    }
    let mut routes: HostRoutes = discovery.host_routes().await?;
    // A route dump that failed (too many open files, say) is tried again at each poll.
    let mut routes_stale = false;
    let mut rules: Option<NodeRuleSet> = None;
    let poll_interval = Duration::from_millis(cfg.poll_interval_ms.max(50));
    let mut poll = tokio::time::interval(poll_interval);
    // Inputs load on a thread of their own: a hostile file never stalls this loop.
    let (_no_files, mut loads) = mpsc::channel(1);
    if let Some(source) = source {
        loads = source.spawn(poll_interval);
    }
    let mut reconcile =
        tokio::time::interval(Duration::from_secs(cfg.reconcile_interval_secs.max(1)));
    let (mut dirty, mut full_check) = (false, true);
    let mut backoff = Duration::ZERO;
    let mut retry_at = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        tokio::select! {
            Ok(()) = streamed.changed() => {
                if let Some(d) = streamed.borrow_and_update().clone() {
                    tracing::info!(node = %d.rules.node, pods = d.rules.pods.len(), groups = d.rules.groups.len(), generation = d.generation, "rules received");
                    rules = Some((*d.rules).clone());
                    pending_ack = Some((d.epoch, d.generation));
                    dirty = true;
                }
            }
            _ = poll.tick() => {
                if routes_stale {
                    if let Ok(r) = discovery.host_routes().await {
                        routes_stale = false;
                        if r != routes { routes = r; dirty = true; }
                    }
                }
            }
            Some((loaded, retry_in)) = loads.recv() => {
                match loaded {
                    Ok(r) => {
                        tracing::info!(node = %r.node, pods = r.pods.len(), groups = r.groups.len(), "rules loaded");
                        rules = Some(r);
                        dirty = true;
                    }
                    Err(e) => tracing::error!(error = %e, ?retry_in, "keeping the last rules"),
                }
            }
            Some(()) = link_events.next() => {
                // Interfaces come with bursts of events: take them all, then dump once.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while let Some(Some(())) = futures::FutureExt::now_or_never(link_events.next()) {}
                match discovery.host_routes().await {
                    Ok(r) if r != routes => { routes = r; dirty = true; }
                    Ok(_) => {}
                    Err(e) => {
                        routes_stale = true;
                        tracing::warn!(error = %e, "cannot dump routes; trying again at the next poll");
                    }
                }
            }
            _ = reconcile.tick() => full_check = true,
            () = drift.notified() => {
                tracing::info!("table inet palisade changed by another process (or its events were lost); reconciling");
                full_check = true;
            }
            _ = sleep_until(retry_at), if !backoff.is_zero() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        let Some(current) = &rules else { continue };
        if !(dirty || full_check) || Instant::now() < retry_at {
            continue;
        }
        let interfaces = pod_interfaces(current, &routes);
        let desired = match renderer.render(current, &interfaces) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot render the rules; keeping the last table");
                if let Some((epoch, generation)) = pending_ack.take() {
                    let _ = enforced_tx.send(Enforced {
                        epoch,
                        generation,
                        error: Some(e.to_string()),
                    });
                }
                dirty = false;
                continue;
            }
        };
        let capped = crate::apply::check_cap(&desired, cfg.max_host_addresses);
        {
            let mut s = cap_stats.lock().unwrap_or_else(|p| p.into_inner());
            s.host_addresses = crate::apply::host_addresses(&desired);
            s.over_cap = capped.is_err();
        }
        let desired = match capped {
            Ok(_) => desired,
            Err(e) => {
                tracing::error!(error = %e, node = %current.node, "refusing the rule set");
                if let Some((epoch, generation)) = pending_ack.take() {
                    let _ = enforced_tx.send(Enforced {
                        epoch,
                        generation,
                        error: Some(e.to_string()),
                    });
                }
                dirty = false;
                // The periodic check still repairs the last good table.
                match applier.applied() {
                    Some(last) if full_check => last.clone(),
                    _ => {
                        full_check = false;
                        continue;
                    }
                }
            }
        };
        if let Some(log) = &flows {
            log.update(current, &desired.counters);
        }
        let result = tokio::task::block_in_place(|| {
            if full_check {
                applier
                    .reconcile(&desired)
                    .map(|o| format!("reconcile: {o:?}"))
            } else {
                applier
                    .apply(&desired)
                    .map(|o| format!("{:?} ({} commands, {:?})", o.kind, o.commands, o.duration))
            }
        });
        match result {
            Ok(what) => {
                tracing::info!(%what, "applied");
                sweep(&mut sweeper, &discovery, current, &interfaces, &desired).await;
                if let Some((epoch, generation)) = pending_ack.take() {
                    let _ = enforced_tx.send(Enforced {
                        epoch,
                        generation,
                        error: None,
                    });
                }
                dirty = false;
                full_check = false;
                backoff = Duration::ZERO;
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(250), MAX_BACKOFF);
                retry_at = Instant::now() + backoff;
                tracing::error!(error = %e, retry_in = ?backoff, "transaction failed; the last good table stays in force");
                if let Some((epoch, generation)) = pending_ack {
                    let _ = enforced_tx.send(Enforced {
                        epoch,
                        generation,
                        error: Some(e.to_string()),
                    });
                }
            }
        }
    }
    tracing::info!("stopping; the table stays in force");
    Ok(())
}

/// The egress dispatch map of the table in the kernel (empty without one): which pods an
/// earlier run of the agent enforces.
fn kernel_dispatch(nft: &Nft) -> std::collections::BTreeMap<String, String> {
    let listed = match nft.list_map(EGRESS_DISPATCH) {
        Ok(Some(v)) => v,
        Ok(None) => return Default::default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the dispatch map of an existing table; every pod counts as newly enforced");
            return Default::default();
        }
    };
    let elements = listed["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["map"]["elem"].as_array())
        .flatten();
    elements
        .filter_map(|e| {
            let ifname = e[0].as_str()?;
            let chain = e[1]["jump"]["target"].as_str()?;
            Some((ifname.to_string(), chain.to_string()))
        })
        .collect()
}

/// After a transaction: the conntrack entries of flows the rules now deny, where
/// enforcement starts or (strict mode) where the change denies them, are deleted.
async fn sweep(
    sweeper: &mut Sweeper,
    discovery: &Discovery,
    rules: &NodeRuleSet,
    interfaces: &Interfaces,
    table: &Ruleset,
) {
    let dispatch = &table.egress_dispatch;
    if !sweeper.due(rules, interfaces, dispatch) {
        sweeper.remember(rules, dispatch);
        return;
    }
    let local = match discovery.local_addresses().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the node's addresses; its own flows count as from elsewhere");
            Default::default()
        }
    };
    let started = Instant::now();
    match tokio::task::block_in_place(|| sweeper.sweep(rules, interfaces, dispatch, &local)) {
        Ok(n) => {
            tracing::info!(deleted = n, took = ?started.elapsed(), "conntrack entries of denied flows deleted")
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot sweep the conntrack table; established flows the rules deny live on until the next try (next transaction or reconcile)")
        }
    }
}
