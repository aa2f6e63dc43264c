//! The leaf's control API and web UI (docs/API.md): HTTP/1.1 and JSON on
//! loopback, served by the same server as `/status`
//! (`servent_net::http`), behind the key and the `Host`/`Origin` checks of
//! [`auth`]. The handlers only carry requests to the leaf's parts (the
//! downloads, the share, the status report) and their answers back.

pub mod auth;
mod ui;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use servent_net::http::{HttpConfig, HttpError, HttpServer, Report};
use servent_proto::msg::QueryKind;
use servent_proto::queue::Command;
use tokio::sync::{broadcast, mpsc, Semaphore};

use crate::downloads::{Downloads, DownloadsError, Event, Place};
use crate::share::Share;
use crate::status::{LeafReport, LeafStatus};

/// Default address of the control API.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7402);
/// Largest request body.
pub const MAX_BODY: usize = 16 * 1024;
/// Searches running at once.
pub const MAX_SEARCHES: usize = 4;
/// Event streams open at once.
pub const MAX_STREAMS: usize = 8;
/// Most words in a search, and bytes in a word.
pub const MAX_WORDS: usize = 16;
pub const MAX_WORD_BYTES: usize = 64;
/// Longest a search may wait for answers.
pub const MAX_SEARCH_SECS: u64 = 30;
/// Most hits a search may ask for.
pub const MAX_SEARCH_RESULTS: u32 = 500;
/// Most shared files in one answer.
pub const MAX_FILES_LISTED: usize = 1000;
/// A connection's longest life (event streams reconnect after it).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// What the handlers reach.
pub(crate) struct Api {
    pub key: String,
    /// The bound address, once bound.
    pub bound: OnceLock<SocketAddr>,
    pub report: Arc<LeafReport>,
    pub downloads: Arc<Downloads>,
    pub share: Arc<Share>,
    pub uploads: Arc<crate::upload::Uploads>,
    pub searches: Arc<Semaphore>,
    pub streams: Arc<Semaphore>,
}

/// An error answer: `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<DownloadsError> for ApiError {
    fn from(e: DownloadsError) -> Self {
        let status = match e {
            DownloadsError::Exists(_) => StatusCode::CONFLICT,
            DownloadsError::NotFound(_) => StatusCode::NOT_FOUND,
            DownloadsError::Full => StatusCode::TOO_MANY_REQUESTS,
            DownloadsError::Refused(_) => StatusCode::CONFLICT,
        };
        ApiError(status, e.to_string())
    }
}

fn unprocessable(what: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, what.into())
}

/// A JSON body of known fields only, its errors answered as JSON.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Serves the API and the UI on `addr` until the server is dropped.
pub(crate) async fn serve(addr: SocketAddr, api: Arc<Api>) -> Result<HttpServer, HttpError> {
    let routes = Router::new()
        .route("/status", get(status))
        .route("/network", get(network))
        .route("/search", post(search))
        .route("/downloads", get(list_downloads).post(add_download))
        .route(
            "/downloads/{hash}",
            get(one_download).delete(remove_download),
        )
        .route("/downloads/{hash}/{command}", post(command_download))
        .route("/shares", get(shares).post(add_share).delete(remove_share))
        .route("/events", get(events))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(api.clone(), require_key));
    let app = Router::new()
        .route("/", get(ui::index))
        .route("/app.js", get(ui::app_js))
        .route("/app.css", get(ui::app_css))
        .nest("/api/v1", routes)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(api.clone(), require_site))
        .with_state(api.clone());
    let config = HttpConfig {
        connection_lifetime: CONNECTION_LIFETIME,
        ..Default::default()
    };
    let server = HttpServer::serve(addr, app, config).await?;
    let _ = api.bound.set(server.addr());
    Ok(server)
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Every request: it names this daemon as its host, and comes from no
/// other site.
async fn require_site(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let Some(bound) = api.bound.get() else {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, "starting".into()).into_response();
    };
    let headers = request.headers();
    let checked = auth::check_site(
        header_str(headers, header::HOST),
        header_str(headers, header::ORIGIN),
        *bound,
    );
    match checked {
        Ok(()) => next.run(request).await,
        Err(e) => ApiError(StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
    }
}

/// Every `/api/v1/` request: it sends the key.
async fn require_key(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let sent = request
        .headers()
        .get(auth::KEY_HEADER)
        .map(|v| v.as_bytes());
    match auth::check_key(sent, &api.key) {
        Ok(()) => next.run(request).await,
        Err(e) => ApiError(StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such path".into())
}

async fn status(State(api): State<Arc<Api>>) -> Json<LeafStatus> {
    Json(api.report.status())
}

/// `GET /network`.
#[derive(Serialize)]
struct Network {
    #[serde(flatten)]
    status: LeafStatus,
    uploaded_bytes: u64,
    downloaded_bytes: u64,
    uploads_active: usize,
    downloads_active: usize,
}

fn network_of(api: &Api) -> Network {
    Network {
        status: api.report.status(),
        uploaded_bytes: api.uploads.bytes.get(),
        uploads_active: api.uploads.active(),
        downloaded_bytes: api.downloads.downloaded_bytes(),
        downloads_active: api.downloads.active(),
    }
}

async fn network(State(api): State<Arc<Api>>) -> Json<Network> {
    Json(network_of(&api))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    words: Vec<String>,
    #[serde(default = "default_max")]
    max: u32,
    #[serde(default = "default_timeout")]
    timeout_secs: u64,
    /// Hits merged by hash, all at the end, as `leaf search` prints them
    /// (instead of each supernode's as it arrives).
    #[serde(default)]
    merged: bool,
}

fn default_max() -> u32 {
    100
}

fn default_timeout() -> u64 {
    5
}

/// One NDJSON line.
fn line(value: &serde_json::Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// `POST /search`: hits streamed as they arrive, one JSON object a line.
async fn search(State(api): State<Arc<Api>>, body: Bytes) -> Result<Response, ApiError> {
    let body: SearchBody = parse(&body)?;
    if body.words.is_empty() || body.words.len() > MAX_WORDS {
        return Err(unprocessable(format!("1 to {MAX_WORDS} words")));
    }
    if body
        .words
        .iter()
        .any(|w| w.trim().is_empty() || w.len() > MAX_WORD_BYTES)
    {
        return Err(unprocessable(format!(
            "each word 1 to {MAX_WORD_BYTES} bytes"
        )));
    }
    if !(1..=MAX_SEARCH_SECS).contains(&body.timeout_secs) {
        return Err(unprocessable(format!(
            "timeout_secs from 1 to {MAX_SEARCH_SECS}"
        )));
    }
    if !(1..=MAX_SEARCH_RESULTS).contains(&body.max) {
        return Err(unprocessable(format!("max from 1 to {MAX_SEARCH_RESULTS}")));
    }
    let permit = api.searches.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_SEARCHES} searches are running"),
        )
    })?;
    let client = api
        .downloads
        .context()
        .client(&[])
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (lines, body_lines) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let (batches, mut arriving) = mpsc::unbounded_channel();
        let (words, max, merged) = (body.words, body.max, body.merged);
        let asked = crate::search::query_streaming(
            client.endpoint(),
            &client.supernodes,
            QueryKind::Keywords(words),
            max,
            Duration::from_secs(body.timeout_secs),
            &client.timings.search,
            (!merged).then_some(batches),
        );
        let hit_line = |hit: &servent_proto::msg::Hit| {
            let mut v = crate::search::hit_json(hit);
            v["event"] = "hit".into();
            line(&v)
        };
        let forward = async {
            let mut sent = 0u32;
            while let Some(batch) = arriving.recv().await {
                for hit in batch.iter().take(max.saturating_sub(sent) as usize) {
                    sent += 1;
                    if lines.send(hit_line(hit)).await.is_err() {
                        return sent;
                    }
                }
            }
            sent
        };
        let (result, mut sent) = tokio::join!(asked, forward);
        let last = match result {
            Ok(hits) if merged => {
                for hit in hits.iter().take(max as usize) {
                    sent += 1;
                    if lines.send(hit_line(hit)).await.is_err() {
                        return;
                    }
                }
                serde_json::json!({"event": "done", "hits": sent})
            }
            Ok(_) => serde_json::json!({"event": "done", "hits": sent}),
            Err(e) => serde_json::json!({"event": "error", "error": e.to_string()}),
        };
        let _ = lines.send(line(&last)).await;
    });
    let stream = futures_util::stream::unfold(body_lines, |mut rx| async move {
        rx.recv().await.map(|l| (Ok::<_, Infallible>(l), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn list_downloads(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "downloads": api.downloads.list() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    target: String,
    /// An absolute folder to write it into, under the sources' name.
    dir: Option<PathBuf>,
    /// An absolute path to write it at.
    out: Option<PathBuf>,
}

/// Where a download asked for is to be written: the shared folder, or a
/// folder or file the user named (absolute, in a folder that exists).
fn place_of(body: &AddBody) -> Result<Place, ApiError> {
    match (&body.dir, &body.out) {
        (None, None) => Ok(Place::Share),
        (Some(_), Some(_)) => Err(unprocessable("either dir or out, not both")),
        (Some(dir), None) => match dir.is_absolute() && dir.is_dir() {
            true => Ok(Place::Dir(dir.clone())),
            false => Err(unprocessable("dir must be an absolute path to a folder")),
        },
        (None, Some(out)) => {
            let parent_is_dir = out.parent().is_some_and(|p| p.is_dir());
            match out.is_absolute() && out.file_name().is_some() && parent_is_dir && !out.is_dir() {
                true => Ok(Place::File(out.clone())),
                false => Err(unprocessable(
                    "out must be an absolute path to a file in a folder that exists",
                )),
            }
        }
    }
}

async fn add_download(State(api): State<Arc<Api>>, body: Bytes) -> Result<Response, ApiError> {
    let body: AddBody = parse(&body)?;
    let link = crate::parse_target(body.target.trim()).map_err(unprocessable)?;
    let view = api.downloads.add(&link, place_of(&body)?)?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn one_download(
    State(api): State<Arc<Api>>,
    UrlPath(hash): UrlPath<String>,
) -> Result<Response, ApiError> {
    let view = api
        .downloads
        .get(&hash.to_ascii_lowercase())
        .ok_or(DownloadsError::NotFound(hash))?;
    Ok(Json(view).into_response())
}

async fn command_download(
    State(api): State<Arc<Api>>,
    UrlPath((hash, command)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let command = match command.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "cancel" => Command::Cancel,
        _ => return Err(not_found().await),
    };
    let view = api.downloads.command(&hash.to_ascii_lowercase(), command)?;
    Ok(Json(view).into_response())
}

async fn remove_download(
    State(api): State<Arc<Api>>,
    UrlPath(hash): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    api.downloads.remove(&hash.to_ascii_lowercase())?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_page")]
    max: usize,
}

fn default_page() -> usize {
    200
}

/// The shares, without their files.
fn shares_of(share: &Share) -> serde_json::Value {
    let shares: Vec<_> = share
        .folders()
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            serde_json::json!({
                "path": f.path,
                "files": f.files,
                "bytes": f.bytes,
                // `--share`'s folder stays; the others can be removed.
                "removable": i > 0,
                "hashing": crate::status::Hashing::from(f.hashing),
            })
        })
        .collect();
    serde_json::json!({ "shares": shares })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareBody {
    path: PathBuf,
}

fn share_error(e: crate::share::ShareError) -> ApiError {
    use crate::share::ShareError::*;
    let status = match e {
        AlreadyShared(_) | Primary(_) => StatusCode::CONFLICT,
        NotShared(_) => StatusCode::NOT_FOUND,
        TooMany => StatusCode::TOO_MANY_REQUESTS,
        Root { .. } | NotADir(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Record(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

/// `POST /shares {"path"}`: shares one more folder.
async fn add_share(State(api): State<Arc<Api>>, body: Bytes) -> Result<Response, ApiError> {
    let body: ShareBody = parse(&body)?;
    if !body.path.is_absolute() {
        return Err(unprocessable("path must be an absolute path to a folder"));
    }
    let share = api.share.clone();
    tokio::task::spawn_blocking(move || share.add_root(&body.path))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(share_error)?;
    Ok((StatusCode::CREATED, Json(shares_of(&api.share))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareQuery {
    path: PathBuf,
}

/// `DELETE /shares?path=`: stops sharing a folder that was added.
async fn remove_share(
    State(api): State<Arc<Api>>,
    query: Result<Query<ShareQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    api.share.remove_root(&query.path).map_err(share_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn shares(
    State(api): State<Arc<Api>>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if page.max == 0 || page.max > MAX_FILES_LISTED {
        return Err(unprocessable(format!("max from 1 to {MAX_FILES_LISTED}")));
    }
    let mut entries = api.share.entries();
    entries.sort_by(|a, b| a.name.cmp(&b.name).then(a.hash.0.cmp(&b.hash.0)));
    let more = entries.len() > page.offset.saturating_add(page.max);
    let files: Vec<_> = entries
        .iter()
        .skip(page.offset)
        .take(page.max)
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "size": e.size,
                "hash": e.hash.to_string(),
                "link": servent_proto::magnet::Link::new(e.hash, &e.name, e.size).to_string(),
            })
        })
        .collect();
    let mut v = shares_of(&api.share);
    v["files"] = files.into();
    v["more"] = more.into();
    Ok(Json(v))
}

fn sse(event: &str, data: &impl Serialize) -> SseEvent {
    SseEvent::default()
        .event(event)
        .json_data(data)
        .unwrap_or_else(|_| SseEvent::default().comment("unencodable"))
}

/// `GET /events`: the downloads as they change, the network every second,
/// the shares as they change.
async fn events(State(api): State<Arc<Api>>) -> Result<Response, ApiError> {
    let permit = api.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_STREAMS} event streams are open"),
        )
    })?;
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    let mut changes = api.downloads.subscribe();
    tokio::spawn(async move {
        let _permit = permit;
        let everything = |api: &Api| {
            api.downloads
                .list()
                .iter()
                .map(|v| sse("download", v))
                .collect::<Vec<_>>()
        };
        for e in everything(&api) {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut shares_tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_shares = serde_json::Value::Null;
        loop {
            let event = tokio::select! {
                _ = tick.tick() => sse("network", &network_of(&api)),
                _ = shares_tick.tick() => {
                    let now = shares_of(&api.share);
                    if now == last_shares {
                        continue;
                    }
                    last_shares = now.clone();
                    sse("shares", &now)
                }
                change = changes.recv() => match change {
                    Ok(Event::Changed(v)) => sse("download", &v),
                    Ok(Event::Removed(hash)) => sse("removed", &serde_json::json!({ "hash": hash })),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let mut sent = true;
                        for e in everything(&api) {
                            sent &= tx.send(e).await.is_ok();
                        }
                        if !sent {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream).into_response())
}
