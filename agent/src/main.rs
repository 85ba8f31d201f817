use clap::Parser;
use palisade_agent::config::Flags;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = Flags::parse().resolve()?;
    // Bound in our own namespace, before entering the node's (threads spawned later, and
    // nft children, inherit the namespace of this thread).
    let listener = std::net::TcpListener::bind(cfg.metrics_addr)?;
    let home = match cfg.netns {
        Some(_) => palisade_agent::stream::DialNamespace::current()?.0,
        None => None,
    };
    if let Some(ns) = &cfg.netns {
        palisade_agent::run::enter_netns(ns)?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(palisade_agent::run::run(cfg, listener, home))
}
