//! `leaf`: parse flags, start tracing, run one command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use leaf::{Client, Config, Leaf};
use servent_proto::magnet::Link;
use servent_proto::name::{refused_class, CharClass, Escaped};
use servent_proto::queue::{self, State};
use servent_proto::ContentHash;

/// mimalloc gives freed memory back to the system: after a flood of
/// connections or a purged index, the node shrinks again (glibc's malloc
/// keeps most of it in its per-thread arenas).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Servent leaf: share a folder, search the network, download directly from other leaves.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A supernode to use, HOST:PORT (repeatable) [default: those remembered in the data dir]
    #[arg(long = "supernode", global = true)]
    supernodes: Vec<String>,
    /// Where identity, hash cache and state live [default: platform data dir]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Share a folder and serve downloads until stopped
    Serve {
        /// The folder to share
        #[arg(long)]
        share: PathBuf,
        /// UDP address to serve downloads on [default: 0.0.0.0:7401, or a
        /// free port there if another leaf of the host has it]
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve /status and /metrics over HTTP on this address
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Never become a supernode
        #[arg(long)]
        no_promote: bool,
        /// Do not ask the gateway (NAT-PMP) to map the listening port
        #[arg(long)]
        no_port_mapping: bool,
        /// Do not announce this leaf on the LAN (mDNS) nor look for
        /// supernodes there, and never become a supernode alone
        #[arg(long)]
        no_lan: bool,
        /// Supernodes to be attached to at once
        #[arg(long, default_value_t = leaf::attach::DEFAULT_ATTACH)]
        attach: usize,
        /// Cap on the upload rate of all uploads together, shared fairly
        /// among downloaders [default: no cap]
        #[arg(long, value_name = "BYTES_PER_SEC")]
        max_upload_rate: Option<u64>,
        /// Serve the control API and web UI on this address [default:
        /// 127.0.0.1:7402, or a free port there if another daemon has it]
        #[arg(long, value_name = "ADDR")]
        ui: Option<SocketAddr>,
        /// Serve no control API and no web UI
        #[arg(long, conflicts_with = "ui")]
        no_ui: bool,
        /// Downloads the daemon runs at once; the rest wait their turn
        #[arg(long, default_value_t = leaf::downloads::DEFAULT_MAX_ACTIVE)]
        max_active_downloads: usize,
        /// Settings of the supernode role, should this leaf take it: a
        /// supernode TOML file (deploy/config/supernode.toml); its listen,
        /// peers, data_dir, http and lan are the leaf's own [default: the
        /// supernode defaults]
        #[arg(long, value_name = "FILE")]
        role_config: Option<PathBuf>,
    },
    /// Search the network for files whose names hold every WORD
    Search {
        /// One JSON object a line
        #[arg(long)]
        json: bool,
        /// Seconds to wait for answers
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Most results to show
        #[arg(long, default_value_t = 100)]
        max: u32,
        #[arg(required = true)]
        words: Vec<String>,
    },
    /// Download a file by its BLAKE3 hash or a servent: link, verified,
    /// then write it
    Get {
        /// Where to write it [default: its name, in the current folder]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Progress events on stdout, one JSON object a line (no bar)
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the supernodes to answer
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// 64 hex digits, or a link (`servent:?xt=urn:blake3:...`), whose
        /// supernode hints are asked too
        #[arg(value_name = "HASH|LINK", value_parser = leaf::parse_target)]
        target: Link,
    },
    /// List the downloads of the `leaf serve` running on this data dir, or
    /// pause, resume, cancel or remove one
    Downloads {
        /// One JSON object a line
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<DownloadsAction>,
    },
    /// Print a link to a local file, for others to paste into `leaf get`
    /// or the UI (the supernodes given are written into it as hints)
    Link { path: PathBuf },
    /// GET this http:// URL and exit 0 on a 200 answer, 1 otherwise: the
    /// health check of a container image that has no curl
    #[command(hide = true)]
    Probe { url: String },
}

#[derive(Subcommand, Debug)]
enum DownloadsAction {
    /// Stop it, keeping what it verified
    Pause { hash: ContentHash },
    /// Queue it again
    Resume { hash: ContentHash },
    /// Stop it and delete its partial data
    Cancel { hash: ContentHash },
    /// Take it off the list (a finished file stays)
    Remove { hash: ContentHash },
}

/// Shows a download's progress until it ends: a bar on a terminal's
/// stderr, JSON lines on stdout with `--json` (at most five a second),
/// nothing otherwise.
async fn show_progress(mut rx: tokio::sync::watch::Receiver<leaf::transfer::Progress>, json: bool) {
    use std::io::IsTerminal;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    if bar.is_none() && !json {
        return;
    }
    while rx.changed().await.is_ok() {
        let p = *rx.borrow_and_update();
        if let Some(bar) = &bar {
            bar.set_length(p.size);
            bar.set_position(p.verified);
            bar.set_message(match p.sources {
                0 => "0 sources".to_string(),
                n => format!("{n} sources: {}", p.routes()),
            });
        } else {
            let line = serde_json::json!({
                "event": "progress",
                "size": p.size,
                "verified": p.verified,
                "fetched": p.fetched,
                "sources": p.sources,
            });
            if writeln!(std::io::stdout().lock(), "{}", json_line(&line)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// How often `leaf get` asks the daemon how its download goes.
const POLL_DAEMON: Duration = Duration::from_millis(200);
/// Failed asks in a row after which `leaf get` gives up on the daemon.
const DAEMON_TRIES: u32 = 25;

/// `leaf get` by the daemon of the data dir: hands it the download (to be
/// written where `get` alone would write it), shows its progress as `get`
/// does, and ends when it is done or has failed. The download stays the
/// daemon's: stopping this command does not stop it.
async fn get_via_daemon(
    remote: &leaf::remote::Remote,
    target: &Link,
    out: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("no current folder")?;
    let out = out.map(|o| cwd.join(o));
    let started = std::time::Instant::now();
    let view = remote
        .get(&target.to_string(), out.as_deref(), Some(&cwd))
        .await?;
    tracing::info!(daemon = %remote.addr(), hash = %view.hash, "the daemon downloads it");
    let (tx, rx) = tokio::sync::watch::channel(leaf::transfer::Progress::default());
    let shown = tokio::spawn(show_progress(rx, json));
    let mut failures = 0;
    let mut first_byte = None;
    let done = loop {
        tokio::time::sleep(POLL_DAEMON).await;
        let view = match remote.download(&view.hash).await {
            Ok(v) => v,
            Err(e @ leaf::remote::RemoteError::Refused { .. }) => return Err(e.into()),
            Err(e) => {
                failures += 1;
                anyhow::ensure!(
                    failures < DAEMON_TRIES,
                    "{e}; the download goes on when the daemon runs again"
                );
                continue;
            }
        };
        failures = 0;
        tx.send_replace(leaf::transfer::Progress {
            size: view.size.unwrap_or(0),
            verified: view.verified,
            fetched: view.fetched,
            sources: view.sources,
            by_route: view.routes.into(),
        });
        if view.fetched > 0 && first_byte.is_none() {
            first_byte = Some(started.elapsed());
        }
        match view.state {
            State::Done => break view,
            State::Failed => anyhow::bail!("{}", view.error.unwrap_or_else(|| "failed".into())),
            State::Paused | State::Cancelled => {
                anyhow::bail!("the download was {} in the daemon", view.state.name())
            }
            State::Queued | State::Running => {}
        }
    };
    drop(tx);
    let _ = shown.await;
    if json {
        let line = serde_json::json!({
            "event": "done",
            "path": done.path.as_ref().map(|p| p.display().to_string()),
            "size": done.size,
            "fetched": done.fetched,
            "route": done.connections.first().map(|c| &c.route),
            "first_byte_secs": done.first_byte_secs.or(first_byte.map(|d| d.as_secs_f64())),
            "routes": done.connections,
        });
        writeln!(std::io::stdout().lock(), "{}", json_line(&line))?;
    }
    Ok(())
}

/// `value` as one line of JSON that a terminal shows as it is: every
/// character `servent_proto::name` refuses (names come from the network)
/// is written as a `\uXXXX` escape, which leaves the JSON value the same.
fn json_line(value: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        match refused_class(c) {
            None | Some(CharClass::PathSeparator) => out.push(c),
            Some(_) => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out
}

fn main() -> ExitCode {
    servent_net::init_logging("warn,leaf=info");
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An error may quote what a supernode or a peer said.
            eprintln!("error: {}", Escaped(&servent_net::error_line(e.as_ref())));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match &args.command {
        Command::Probe { url } => return Ok(supernode::probe::probe(url, Duration::from_secs(3))?),
        Command::Link { path } => {
            let mut link = leaf::link_to(path)?;
            link.supernodes = args.supernodes.clone();
            println!("{link}");
            return Ok(());
        }
        _ => {}
    }
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => dirs::data_local_dir()
            .context("no platform data directory: pass --data-dir")?
            .join("servent/leaf"),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async move {
        match args.command {
            Command::Serve {
                share,
                listen,
                http,
                no_promote,
                no_port_mapping,
                no_lan,
                attach,
                max_upload_rate,
                ui,
                no_ui,
                max_active_downloads,
                role_config,
            } => {
                let role = match &role_config {
                    Some(path) => supernode::Config::from_file(path)?,
                    None => supernode::Config::default(),
                };
                let config = Config {
                    data_dir,
                    share,
                    listen: listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], leaf::DEFAULT_PORT))),
                    listen_fallback: listen.is_none(),
                    supernodes: args.supernodes,
                    no_promote,
                    attach,
                    attach_rules: Default::default(),
                    http,
                    ui: (!no_ui).then_some(ui.unwrap_or(leaf::DEFAULT_UI_ADDR)),
                    ui_fallback: ui.is_none(),
                    max_active_downloads,
                    port_mapping: !no_port_mapping,
                    max_upload_rate,
                    lan: !no_lan,
                    role,
                    timings: Default::default(),
                };
                let node = Leaf::spawn(config).await?;
                let signal = servent_net::ShutdownSignal::register();
                println!("leaf {} listening on {}", node.id(), node.addr());
                if let Some(url) = node.ui_url() {
                    println!("leaf {} ui on {url}", node.id());
                }
                node.run_until(signal).await;
            }
            Command::Search {
                json,
                timeout,
                max,
                words,
            } => {
                // A daemon on this data dir asks its supernodes (the LAN's
                // and its own role's among them) when none is given here
                // and the search is within what its API takes (no more
                // results than any search gets, in any case).
                let max = max.min(leaf::remote::MAX_SEARCH_RESULTS);
                let daemon = args.supernodes.is_empty()
                    && max > 0
                    && (1..=leaf::remote::MAX_SEARCH_SECS).contains(&timeout);
                let timeout = Duration::from_secs(timeout);
                let remote = match daemon {
                    true => leaf::remote::Remote::find(&data_dir).await,
                    false => None,
                };
                let hits = match remote {
                    Some(remote) => remote.search(&words, max, timeout).await?,
                    _ => {
                        let supernodes =
                            leaf::lan::supernodes_or_lan(&data_dir, args.supernodes).await;
                        let client = Client::new(&data_dir, supernodes)?;
                        let hits = client.search(&words, max, timeout).await?;
                        hits.iter().map(leaf::search::hit_json).collect()
                    }
                };
                let mut out = std::io::stdout().lock();
                for hit in hits {
                    if json {
                        writeln!(out, "{}", json_line(&hit))?;
                    } else {
                        let others = match hit["names"].as_array().map_or(0, Vec::len) {
                            0 | 1 => String::new(),
                            n => format!("  (+{} other names)", n - 1),
                        };
                        writeln!(
                            out,
                            "{}  {:>12}  {:>3} src  {}{others}",
                            hit["hash"].as_str().unwrap_or("?"),
                            hit["size"].as_u64().unwrap_or(0),
                            hit["sources"].as_u64().unwrap_or(0),
                            Escaped(hit["name"].as_str().unwrap_or("?"))
                        )?;
                    }
                }
            }
            Command::Get {
                out,
                json,
                timeout,
                target,
            } => {
                // A daemon on this data dir takes the download over: it
                // goes on if this command stops.
                if let Some(remote) = leaf::remote::Remote::find(&data_dir).await {
                    return get_via_daemon(&remote, &target, out.as_deref(), json).await;
                }
                // A link's hints are asked after the supernodes given.
                let supernodes = leaf::with_hints(args.supernodes, &target.supernodes);
                let supernodes = leaf::lan::supernodes_or_lan(&data_dir, supernodes).await;
                let hash = target.hash;
                let client = Client::new(&data_dir, supernodes)?;
                let (tx, rx) = tokio::sync::watch::channel(leaf::transfer::Progress::default());
                // When the first range of the file's data came in, verified.
                let first_byte = {
                    let (mut rx, started) = (rx.clone(), std::time::Instant::now());
                    tokio::spawn(async move {
                        rx.wait_for(|p| p.fetched > 0).await.ok()?;
                        Some(started.elapsed())
                    })
                };
                let shown = tokio::spawn(show_progress(rx, json));
                let result = client
                    .download(hash, out.as_deref(), Duration::from_secs(timeout), Some(tx))
                    .await;
                // The sender is gone with the download: the display ends.
                let _ = shown.await;
                let (path, done) = result?;
                let first_byte = first_byte.await.ok().flatten();
                if json {
                    let line = serde_json::json!({
                        "event": "done",
                        "path": path.display().to_string(),
                        "size": done.size,
                        "fetched": done.fetched,
                        // The route of the source reached first.
                        "route": done.routes.first().map(|(_, r)| r.name()),
                        "first_byte_secs": first_byte.map(|d| d.as_secs_f64()),
                        // How each source was reached: direct, reversed
                        // (it dialled back) or punched.
                        "routes": done.routes.iter().map(|(id, route)| serde_json::json!({
                            "source": id.to_string(),
                            "route": route.name(),
                        })).collect::<Vec<_>>(),
                    });
                    writeln!(std::io::stdout().lock(), "{}", json_line(&line))?;
                }
                tracing::info!(path = ?path, "saved");
            }
            Command::Downloads { json, action } => {
                let remote = leaf::remote::Remote::find(&data_dir)
                    .await
                    .context("no `leaf serve` runs on this data dir")?;
                let (hash, command) = match action {
                    None => {
                        let mut out = std::io::stdout().lock();
                        for v in remote.downloads().await? {
                            if json {
                                writeln!(out, "{}", json_line(&serde_json::to_value(&v)?))?;
                            } else {
                                let percent = match v.size {
                                    Some(size) if size > 0 => {
                                        format!("{:>3} %", v.verified * 100 / size)
                                    }
                                    _ => "  ? %".to_string(),
                                };
                                let name = v.name.as_deref().unwrap_or("?");
                                writeln!(
                                    out,
                                    "{}  {:<9}  {percent}  {}",
                                    v.hash,
                                    v.state.name(),
                                    Escaped(name)
                                )?;
                            }
                        }
                        return Ok(());
                    }
                    Some(DownloadsAction::Pause { hash }) => (hash, queue::Command::Pause),
                    Some(DownloadsAction::Resume { hash }) => (hash, queue::Command::Resume),
                    Some(DownloadsAction::Cancel { hash }) => (hash, queue::Command::Cancel),
                    Some(DownloadsAction::Remove { hash }) => {
                        remote.remove(&hash.to_string()).await?;
                        return Ok(());
                    }
                };
                let v = remote.command(&hash.to_string(), command).await?;
                if json {
                    writeln!(
                        std::io::stdout().lock(),
                        "{}",
                        json_line(&serde_json::to_value(&v)?)
                    )?;
                }
            }
            Command::Probe { .. } | Command::Link { .. } => {
                unreachable!("handled before the data dir")
            }
        }
        Ok(())
    });
    // A supernode's name that `--timeout` gave up resolving is still being
    // looked up on a blocking thread (getaddrinfo cannot be cancelled; an
    // unanswered DNS query takes 10 s): exit without waiting for it.
    runtime.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_escape_what_a_terminal_obeys_and_keep_the_value() {
        let name = "\u{202e}gpj.exe a\u{200b}b\u{2028}\u{7f}\u{85}\u{e0041}/é";
        let value = serde_json::json!({ "name": name });
        let line = json_line(&value);
        assert_eq!(
            line,
            r#"{"name":"\u202egpj.exe a\u200bb\u2028\u007f\u0085\udb40\udc41/é"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn text_output_escapes_names() {
        assert_eq!(
            Escaped("\u{202e}gpj.exe\n").to_string(),
            "\\u{202e}gpj.exe\\u{a}"
        );
    }
}
