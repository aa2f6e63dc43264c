//! The CLI's side of the control API (docs/API.md): finding the daemon
//! that runs on a data dir, and asking it. `leaf get` hands its download
//! to that daemon, so that it goes on when the command exits, `leaf
//! search` asks through the daemon's supernodes, and `leaf downloads`
//! lists and steers the daemon's downloads.
//!
//! The daemon says where it is in `<data-dir>/api.addr` while it runs; the
//! key is `<data-dir>/api.key`. A file left by a daemon that was killed
//! names an address where nothing, or another daemon, answers: then no
//! daemon is found and the CLI works on its own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use servent_proto::queue::{Command, State};

use crate::api::auth::{KEY_FILE, KEY_HEADER};
/// What the daemon's search takes: at most this many results, and
/// timeouts of 1 s up to this many seconds.
pub use crate::api::{MAX_SEARCH_RESULTS, MAX_SEARCH_SECS};
use crate::downloads::View;

/// The file in the data dir that names the daemon's API address.
pub const ADDR_FILE: &str = "api.addr";
/// How long finding the daemon may take.
const FIND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the daemon did not answer: {0}")]
    Unreachable(String),
    #[error("the daemon refused: {error} ({status})")]
    Refused { status: StatusCode, error: String },
    /// What the daemon tried failed, as it says.
    #[error("{0}")]
    Failed(String),
    #[error("the daemon's answer is not what was expected: {0}")]
    Garbled(String),
}

/// A daemon's control API.
pub struct Remote {
    addr: SocketAddr,
    key: String,
    client: Client<HttpConnector, Body>,
}

impl Remote {
    /// The daemon running on `data_dir`, if one answers with its key.
    pub async fn find(data_dir: &Path) -> Option<Self> {
        let addr = std::fs::read_to_string(data_dir.join(ADDR_FILE)).ok()?;
        let addr: SocketAddr = addr.trim().parse().ok()?;
        let key = std::fs::read_to_string(data_dir.join(KEY_FILE)).ok()?;
        let me = Self {
            addr,
            key: key.trim().to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        let status = tokio::time::timeout(FIND_TIMEOUT, me.call(Method::GET, "/status", None));
        match status.await {
            Ok(Ok(_)) => Some(me),
            _ => None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `method /api/v1<path>` with `body`; the JSON answer of a 2xx, else
    /// the daemon's error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, RemoteError> {
        let bytes = self.send(method, path, body, REQUEST_TIMEOUT).await?;
        match bytes.is_empty() {
            true => Ok(serde_json::Value::Null),
            false => {
                serde_json::from_slice(&bytes).map_err(|e| RemoteError::Garbled(e.to_string()))
            }
        }
    }

    /// `method /api/v1<path>` with `body`, answered within `timeout`; the
    /// body of a 2xx, else the daemon's error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<axum::body::Bytes, RemoteError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}/api/v1{path}", self.addr))
            .header(header::HOST, self.addr.to_string())
            .header(KEY_HEADER, &self.key)
            .header(header::CONTENT_TYPE, "application/json");
        let body = match body {
            Some(v) => Body::from(v.to_string()),
            None => Body::empty(),
        };
        let request = request
            .body(body)
            .map_err(|e| RemoteError::Garbled(e.to_string()))?;
        let (status, bytes) = tokio::time::timeout(timeout, async {
            let answer = self
                .client
                .request(request)
                .await
                .map_err(|e| RemoteError::Unreachable(e.to_string()))?;
            let status = answer.status();
            let bytes = axum::body::to_bytes(Body::new(answer.into_body()), MAX_ANSWER)
                .await
                .map_err(|e| RemoteError::Unreachable(e.to_string()))?;
            Ok::<_, RemoteError>((status, bytes))
        })
        .await
        .map_err(|_| RemoteError::Unreachable("timed out".into()))??;
        if !status.is_success() {
            let error: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(RemoteError::Refused {
                status,
                error: error["error"].as_str().unwrap_or("?").to_string(),
            });
        }
        Ok(bytes)
    }

    /// Searches through the daemon's supernodes for files whose names hold
    /// every word: the hits merged by hash, each in the shape of `leaf
    /// search --json` ([`crate::search::hit_json`]).
    pub async fn search(
        &self,
        words: &[String],
        max: u32,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>, RemoteError> {
        let body = serde_json::json!({
            "words": words,
            "max": max,
            "timeout_secs": timeout.as_secs(),
            "merged": true,
        });
        // The daemon waits out `timeout` for answers, then sends them.
        let bytes = self
            .send(
                Method::POST,
                "/search",
                Some(body),
                timeout + REQUEST_TIMEOUT,
            )
            .await?;
        let mut hits = Vec::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut v: serde_json::Value =
                serde_json::from_slice(line).map_err(|e| RemoteError::Garbled(e.to_string()))?;
            match v["event"].as_str() {
                Some("hit") => {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("event");
                    }
                    hits.push(v);
                }
                Some("done") => return Ok(hits),
                Some("error") => {
                    let error = v["error"].as_str().unwrap_or("?");
                    return Err(RemoteError::Failed(error.to_string()));
                }
                _ => return Err(RemoteError::Garbled(format!("an unknown line: {v}"))),
            }
        }
        Err(RemoteError::Garbled(
            "the answer ended before its last line".into(),
        ))
    }

    fn view(value: serde_json::Value) -> Result<View, RemoteError> {
        serde_json::from_value(value).map_err(|e| RemoteError::Garbled(e.to_string()))
    }

    /// Adds a download of `target` (a hash or a link), written at `out` or
    /// into `dir` (absolute paths); one of that hash already in the list
    /// is taken as it is, and started again if it had stopped.
    pub async fn get(
        &self,
        target: &str,
        out: Option<&Path>,
        dir: Option<&Path>,
    ) -> Result<View, RemoteError> {
        let mut body = serde_json::json!({ "target": target });
        if let Some(out) = out {
            body["out"] = out.display().to_string().into();
        } else if let Some(dir) = dir {
            body["dir"] = dir.display().to_string().into();
        }
        match self.call(Method::POST, "/downloads", Some(body)).await {
            Ok(v) => Self::view(v),
            Err(RemoteError::Refused { status, .. }) if status == StatusCode::CONFLICT => {
                let hash = crate::parse_target(target)
                    .map_err(RemoteError::Garbled)?
                    .hash
                    .to_string();
                let view = self.download(&hash).await?;
                match view.state {
                    State::Paused | State::Failed | State::Cancelled => {
                        self.command(&hash, Command::Resume).await
                    }
                    _ => Ok(view),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// One download.
    pub async fn download(&self, hash: &str) -> Result<View, RemoteError> {
        Self::view(
            self.call(Method::GET, &format!("/downloads/{hash}"), None)
                .await?,
        )
    }

    /// Every download, oldest first.
    pub async fn downloads(&self) -> Result<Vec<View>, RemoteError> {
        let v = self.call(Method::GET, "/downloads", None).await?;
        serde_json::from_value(v["downloads"].clone())
            .map_err(|e| RemoteError::Garbled(e.to_string()))
    }

    /// Pauses, resumes or cancels a download.
    pub async fn command(&self, hash: &str, command: Command) -> Result<View, RemoteError> {
        let command = command.name();
        Self::view(
            self.call(Method::POST, &format!("/downloads/{hash}/{command}"), None)
                .await?,
        )
    }

    pub async fn remove(&self, hash: &str) -> Result<(), RemoteError> {
        self.call(Method::DELETE, &format!("/downloads/{hash}"), None)
            .await
            .map(|_| ())
    }
}
