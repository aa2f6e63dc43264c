//! `leaf`: parse flags, start tracing, run one command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use leaf::{Client, Config, Leaf};
use servent_proto::name::{refused_class, CharClass, Escaped};
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
        /// UDP address to serve downloads on [default: 0.0.0.0:7401]
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], leaf::DEFAULT_PORT)))]
        listen: SocketAddr,
        /// Serve /status and /metrics over HTTP on this address
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Never become a supernode
        #[arg(long)]
        no_promote: bool,
        /// Do not ask the gateway (NAT-PMP) to map the listening port
        #[arg(long)]
        no_port_mapping: bool,
        /// Supernodes to be attached to at once
        #[arg(long, default_value_t = leaf::attach::DEFAULT_ATTACH)]
        attach: usize,
        /// Cap on the upload rate of all uploads together, shared fairly
        /// among downloaders [default: no cap]
        #[arg(long, value_name = "BYTES_PER_SEC")]
        max_upload_rate: Option<u64>,
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
    /// Download a file by its BLAKE3 hash, verified, then write it
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
        hash: ContentHash,
    },
    /// GET this http:// URL and exit 0 on a 200 answer, 1 otherwise: the
    /// health check of a container image that has no curl
    #[command(hide = true)]
    Probe { url: String },
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
            bar.set_message(format!("{} sources", p.sources));
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
    if let Command::Probe { url } = &args.command {
        return Ok(supernode::probe::probe(url, Duration::from_secs(3))?);
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
                attach,
                max_upload_rate,
            } => {
                let config = Config {
                    data_dir,
                    share,
                    listen,
                    supernodes: args.supernodes,
                    no_promote,
                    attach,
                    attach_rules: Default::default(),
                    http,
                    port_mapping: !no_port_mapping,
                    max_upload_rate,
                    // Should this leaf be elected: the supernode defaults.
                    role: supernode::Config::default(),
                    timings: Default::default(),
                };
                let node = Leaf::spawn(config).await?;
                let signal = servent_net::ShutdownSignal::register();
                println!("leaf {} listening on {}", node.id(), node.addr());
                node.run_until(signal).await;
            }
            Command::Search {
                json,
                timeout,
                max,
                words,
            } => {
                let client = Client::new(&data_dir, args.supernodes)?;
                let hits = client
                    .search(&words, max, Duration::from_secs(timeout))
                    .await?;
                let mut out = std::io::stdout().lock();
                for hit in hits {
                    let support = servent_proto::hits::support(&hit);
                    if json {
                        let line = serde_json::json!({
                            "hash": hit.hash.to_string(),
                            // What most independent sources announce.
                            "name": hit.name(),
                            "size": hit.size(),
                            "sources": hit.sources.len(),
                            // Distinct IP addresses among them.
                            "hosts": servent_proto::hits::hit_support(&hit).ips,
                            // Every name and size announced, best supported first.
                            "names": hit.names.iter().zip(&support).map(|(v, s)| {
                                serde_json::json!({
                                    "name": v.name,
                                    "size": v.size,
                                    "sources": s.ids,
                                    "hosts": s.ips,
                                })
                            }).collect::<Vec<_>>(),
                            // Where each source would be dialled: the
                            // addresses the supernodes saw it connect from.
                            "addrs": hit.sources.iter().map(|s| &s.addr).collect::<Vec<_>>(),
                        });
                        writeln!(out, "{}", json_line(&line))?;
                    } else {
                        let others = match hit.names.len() {
                            0 | 1 => String::new(),
                            n => format!("  (+{} other names)", n - 1),
                        };
                        writeln!(
                            out,
                            "{}  {:>12}  {:>3} src  {}{others}",
                            hit.hash,
                            hit.size(),
                            hit.sources.len(),
                            Escaped(hit.name())
                        )?;
                    }
                }
            }
            Command::Get {
                out,
                json,
                timeout,
                hash,
            } => {
                let client = Client::new(&data_dir, args.supernodes)?;
                let (tx, rx) = tokio::sync::watch::channel(leaf::transfer::Progress::default());
                let shown = tokio::spawn(show_progress(rx, json));
                let result = client
                    .download(hash, out.as_deref(), Duration::from_secs(timeout), Some(tx))
                    .await;
                // The sender is gone with the download: the display ends.
                let _ = shown.await;
                let (path, done) = result?;
                if json {
                    let line = serde_json::json!({
                        "event": "done",
                        "path": path.display().to_string(),
                        "size": done.size,
                        "fetched": done.fetched,
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
            Command::Probe { .. } => unreachable!("handled before the data dir"),
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
