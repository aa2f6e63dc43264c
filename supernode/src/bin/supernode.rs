//! `supernode`: parse flags, start tracing, run until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use supernode::{Config, Supernode};

/// mimalloc gives freed memory back to the system: after a flood of
/// connections or a purged index, the node shrinks again (glibc's malloc
/// keeps most of it in its per-thread arenas).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Servent supernode: indexes the files of its leaves and answers their queries.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// UDP address to listen on [default: 0.0.0.0:7400]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Another supernode to mesh with, HOST:PORT (repeatable; names are resolved at each dial)
    #[arg(long = "peer", value_parser = host_port)]
    peers: Vec<String>,
    /// Where the identity key and state live [default: platform data dir]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve /status and /metrics over HTTP on this address
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Most leaves registered at once [default: 1000]
    #[arg(long)]
    max_leaves: Option<usize>,
    /// Do not announce this supernode on the LAN (mDNS) nor mesh with the
    /// supernodes announced there
    #[arg(long)]
    no_lan: bool,
    /// A TOML config file; flags override it
    #[arg(long)]
    config: Option<PathBuf>,
    /// GET this http:// URL and exit 0 on a 200 answer, 1 otherwise: the
    /// health check of a container image that has no curl.
    #[arg(long, hide = true, exclusive = true)]
    probe: Option<String>,
}

/// `HOST:PORT`, checked for its form only: the name is resolved at dial time.
fn host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_string()),
        _ => Err(format!("expected HOST:PORT, got {s:?}")),
    }
}

fn main() -> ExitCode {
    servent_net::init_logging("info");
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", servent_net::error_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(url) = &args.probe {
        return Ok(supernode::probe::probe(
            url,
            std::time::Duration::from_secs(3),
        )?);
    }
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.peers.extend(args.peers);
    for peer in &config.peers {
        host_port(peer).map_err(|e| anyhow::anyhow!("invalid peer: {e}"))?;
    }
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
    if args.no_lan {
        config.lan = false;
    }
    if let Some(n) = args.max_leaves {
        config.max_leaves = n;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let node = Supernode::spawn(config).await?;
        let signal = servent_net::ShutdownSignal::register();
        println!("supernode {} listening on {}", node.id(), node.addr());
        node.run_until(signal).await;
        Ok(())
    });
    // A peer's name being resolved (getaddrinfo, on a blocking thread that
    // cannot be cancelled) must not hold up the exit: an unanswered DNS
    // query takes 10 s.
    runtime.shutdown_background();
    result
}
