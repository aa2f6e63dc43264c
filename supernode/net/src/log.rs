//! What the binaries print: logs on stderr, and the one `error:` line of
//! the command-line contract.

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), in
/// colour only on a terminal. For the binaries.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

/// The one-line `error: ...` text of an error and its causes, leaving out
/// a cause whose text the line already holds (our messages often quote it).
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.replace('\n', " ")
}
