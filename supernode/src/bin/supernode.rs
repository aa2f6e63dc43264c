//! `supernode`: parse flags, start tracing, run until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use supernode::{Config, Supernode};

/// A Servent supernode: indexes the files of its leaves and answers their queries.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// UDP address to listen on [default: 0.0.0.0:7400]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Another supernode to mesh with (repeatable)
    #[arg(long = "peer")]
    peers: Vec<SocketAddr>,
    /// Where the identity key and state live [default: platform data dir]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve /status and /metrics over HTTP on this address
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Most leaves registered at once [default: 1000]
    #[arg(long)]
    max_leaves: Option<usize>,
    /// A TOML config file; flags override it
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.peers.extend(args.peers);
    if let Some(dir) = args.data_dir {
        config.data_dir = Some(dir);
    }
    if config.data_dir.is_none() {
        config.data_dir = Some(
            dirs::data_local_dir()
                .ok_or_else(|| anyhow::anyhow!("no platform data directory: pass --data-dir"))?
                .join("servent/supernode"),
        );
    }
    if args.http.is_some() {
        config.http = args.http;
    }
    if let Some(n) = args.max_leaves {
        config.max_leaves = n;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let node = Supernode::spawn(config).await?;
        println!("supernode {} listening on {}", node.id(), node.addr());
        node.run_until_signal().await;
        Ok(())
    })
}
