//! The client side of the health check: `GET` one plain `http://` URL and
//! tell whether it answered 200. Container images are `FROM scratch`, with
//! no curl or wget to run a health check, so both binaries carry this
//! (`supernode --probe URL`, `leaf probe URL`; hidden from `--help`).
//!
//! Not an HTTP client: no TLS, no redirects, no body is read. Blocking and
//! std-only, so it needs no runtime and every step is bounded by a timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest status line read.
const MAX_STATUS_LINE: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("not a plain http://HOST:PORT/PATH URL: {0}")]
    Url(String),
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("unhealthy: {0}")]
    Status(String),
}

/// `GET url`; Ok only on a `200` status, each step within `timeout`.
pub fn probe(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::Url(url.to_string()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if host.is_empty() || !host.contains(':') {
        return Err(ProbeError::Url(url.to_string()));
    }
    let connect = |source| ProbeError::Connect {
        addr: host.to_string(),
        source,
    };
    let addr = host
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(std::io::ErrorKind::NotFound.into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(connect)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(connect)?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_STATUS_LINE))
        .read_line(&mut line)
        .map_err(connect)?;
    let line = line.trim_end();
    match line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ => Err(ProbeError::Status(format!("{url} answered {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `answer` and returns the URL to probe.
    fn one_answer(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/status", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer.as_bytes());
        });
        url
    }

    #[test]
    fn healthy_only_on_200() {
        let t = Duration::from_secs(5);
        probe(&one_answer("HTTP/1.1 200 OK\r\n\r\n{}"), t).unwrap();
        let err = probe(&one_answer("HTTP/1.1 503 Unavailable\r\n\r\n"), t).unwrap_err();
        assert!(matches!(err, ProbeError::Status(_)), "{err}");
        assert!(matches!(
            probe("https://127.0.0.1:1/status", t),
            Err(ProbeError::Url(_))
        ));
        assert!(matches!(
            probe("http://127.0.0.1:1/status", t),
            Err(ProbeError::Connect { .. })
        ));
    }
}
