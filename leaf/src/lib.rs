//! The Servent leaf: shares a folder, registers it with supernodes, serves
//! downloads of what it announced directly to other leaves, and searches
//! and downloads itself.
//!
//! Module map: [`share`] the folder, its hashes and its changes; [`attach`]
//! which supernodes to be attached to; [`link`] the session with one
//! supernode; [`search`] queries; [`transfer`] fetching files and
//! [`upload`] serving them; [`role`] the supernode role when elected;
//! [`status`] what `--http` serves.
//!
//! Incoming connections go through the endpoint's [`Router`]: it serves
//! `ALPN_TRANSFER` (uploads) always, and `ALPN_LEAF` and `ALPN_MESH` while
//! this leaf holds the supernode role. The plumbing is `servent_net`.

mod api;
pub mod attach;
pub mod downloads;
pub mod lan;
pub mod layer;
pub mod link;
pub mod partial;
mod pio;
pub mod portmap;
pub mod push;
pub mod remote;
pub mod role;
pub mod search;
pub mod share;
pub mod status;
pub mod transfer;
pub mod upload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use servent_net::gate::Gate;
use servent_net::http::{HttpError, HttpServer};
use servent_net::{
    Endpoint, EndpointError, Identity, IdentityError, Peer, ProtocolHandler, Router,
};
use servent_proto::msg::{Hit, QueryKind, ALPN_LEAF, ALPN_MESH, ALPN_PUSH, ALPN_TRANSFER};
use servent_proto::{ContentHash, NodeId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, Instrument};

use role::Role;
use search::SearchError;
use share::{Share, ShareError};
use transfer::GetError;

/// Default UDP port of a leaf.
pub const DEFAULT_PORT: u16 = 7401;
/// Default address of the control API and web UI.
pub const DEFAULT_UI_ADDR: SocketAddr = api::DEFAULT_ADDR;

/// How `leaf serve` runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where identity, hash cache and supernode cache live.
    pub data_dir: PathBuf,
    /// The folder to share.
    pub share: PathBuf,
    /// UDP address for downloads. Default `0.0.0.0:7401`.
    pub listen: SocketAddr,
    /// If `listen`'s port is taken, serve on a free port of the same IP
    /// instead (said in the log and the listening line): what `leaf serve`
    /// does when `--listen` is not given, so that a second leaf of one host
    /// starts too. Default false.
    pub listen_fallback: bool,
    /// Supernodes to register with (`HOST:PORT`). Default: the cache.
    pub supernodes: Vec<String>,
    /// Never become a supernode. Default false.
    pub no_promote: bool,
    /// Supernodes to be attached to at once. Default 3.
    pub attach: usize,
    /// Timings and limits of the attach planner (backoff, `Full` retry,
    /// `Rehome` avoidance, cache size). Default: the planner's defaults.
    pub attach_rules: servent_proto::attach::AttachConfig,
    /// HTTP address for `/status` and `/metrics`. Default none.
    pub http: Option<SocketAddr>,
    /// Address of the control API and web UI (docs/API.md). Default
    /// `127.0.0.1:7402` for `leaf serve`, none in [`Config::localhost`].
    pub ui: Option<SocketAddr>,
    /// If `ui`'s port is taken, serve on a free port of the same IP
    /// instead (said in the log and the printed URL): what `leaf serve`
    /// does when `--ui` is not given, so that several daemons of one host
    /// all start. Default false.
    pub ui_fallback: bool,
    /// Downloads the daemon runs at once; the rest wait. Default
    /// [`downloads::DEFAULT_MAX_ACTIVE`].
    pub max_active_downloads: usize,
    /// Ask the default gateway (NAT-PMP) to map the listening port, when
    /// the socket is reachable beyond this host. Default true for `leaf
    /// serve`, false in [`Config::localhost`].
    pub port_mapping: bool,
    /// Cap on the upload rate of all uploads together, bytes a second.
    /// Default none.
    pub max_upload_rate: Option<u64>,
    /// Announce this leaf on the LAN and use the supernodes announced
    /// there (mDNS, [`lan`]), when it serves beyond loopback; take the
    /// supernode role alone if the LAN has none and no supernode was
    /// given. Default true for `leaf serve`, false in
    /// [`Config::localhost`].
    pub lan: bool,
    /// Settings of the supernode role, should this leaf be elected
    /// (`max_leaves` and `peers` come from the election). Its admission
    /// limits and its `transport` apply to the leaf's endpoint, elected or
    /// not. Default: the supernode defaults.
    pub role: supernode::Config,
    /// How long the leaf waits for what, and how often it does what; not
    /// options of the command line. Default [`Timings::default`].
    pub timings: Timings,
}

/// Every timing of a leaf, in one place, so that tests and the simulator
/// can shrink them. The defaults are the reference leaf's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    /// Sessions with supernodes ([`link::LinkTimings`]).
    pub link: link::LinkTimings,
    /// Downloads, the scheduler's included ([`transfer::TransferTimings`]).
    pub transfer: transfer::TransferTimings,
    /// Serving ([`upload::UploadTimings`]).
    pub upload: upload::UploadTimings,
    /// Watching the share ([`share::ShareTimings`]).
    pub share: share::ShareTimings,
    /// Searches ([`search::SearchTimings`]).
    pub search: search::SearchTimings,
    /// How often a running download asks the supernodes again for
    /// sources. Default [`REQUERY_INTERVAL`].
    pub requery: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            link: Default::default(),
            transfer: Default::default(),
            upload: Default::default(),
            share: Default::default(),
            search: Default::default(),
            requery: REQUERY_INTERVAL,
        }
    }
}

impl Config {
    /// A local test configuration on `127.0.0.1:0`.
    pub fn localhost(data_dir: &Path, share: &Path, supernodes: Vec<String>) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            share: share.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_fallback: false,
            supernodes,
            no_promote: false,
            attach: attach::DEFAULT_ATTACH,
            attach_rules: Default::default(),
            http: None,
            ui: None,
            ui_fallback: false,
            max_active_downloads: downloads::DEFAULT_MAX_ACTIVE,
            port_mapping: false,
            max_upload_rate: None,
            lan: false,
            role: supernode::Config::localhost(),
            timings: Timings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("cannot read the bound address: {0}")]
    LocalAddr(std::io::Error),
    #[error("no supernode given: pass --supernode ADDR (none is found on a LAN without --no-lan and an address beyond loopback)")]
    NoSupernodes,
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot read or make the API key in the data dir: {0}")]
    Key(std::io::Error),
}

/// A running `leaf serve`. Dropping it shuts it down.
pub struct Leaf {
    id: NodeId,
    addr: SocketAddr,
    endpoint: Endpoint,
    share: Arc<Share>,
    links: status::Links,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    role: Arc<Role>,
    uploads: Arc<upload::Uploads>,
    router: Router,
    http: Option<HttpServer>,
    /// The control API and web UI, and the downloads it runs.
    ui: Option<(HttpServer, String)>,
    downloads: Option<Arc<downloads::Downloads>>,
    data_dir: PathBuf,
}

impl Leaf {
    pub async fn spawn(config: Config) -> Result<Self, StartError> {
        Self::spawn_inner(config, None).await
    }

    /// Like [`Leaf::spawn`], on a UDP socket the caller provides (tests use
    /// one that can be made to go silent).
    pub async fn spawn_on_socket(
        config: Config,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
    ) -> Result<Self, StartError> {
        Self::spawn_inner(config, Some(socket)).await
    }

    async fn spawn_inner(
        config: Config,
        socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    ) -> Result<Self, StartError> {
        let identity = Arc::new(Identity::load_or_create(&config.data_dir)?);
        let id = identity.id();
        let lan = config.lan && servent_net::lan::wanted(config.listen);
        if !lan && config.supernodes.is_empty() && attach::load_cache(&config.data_dir).is_empty() {
            return Err(StartError::NoSupernodes);
        }
        let share = Share::open(&config.share, &config.data_dir)?;
        // The supernode ALPNs are accepted too, for when this leaf is elected.
        let alpns: &[&[u8]] = &[ALPN_TRANSFER, ALPN_LEAF, ALPN_MESH];
        // The role's timings: the endpoint carries the role's connections.
        let transport = config.role.transport.clone();
        let endpoint = match socket {
            Some(socket) => Endpoint::bind_socket_with(identity, socket, alpns, transport)?,
            None => {
                match Endpoint::bind_with(identity.clone(), config.listen, alpns, transport.clone())
                {
                    Err(EndpointError::Bind { source, .. })
                        if config.listen_fallback
                            && source.kind() == std::io::ErrorKind::AddrInUse =>
                    {
                        let any = SocketAddr::new(config.listen.ip(), 0);
                        tracing::warn!(at = %config.listen, "the port is taken; serving on a free one");
                        Endpoint::bind_with(identity, any, alpns, transport)?
                    }
                    other => other?,
                }
            }
        };
        let addr = endpoint.local_addr().map_err(StartError::LocalAddr)?;
        let (stop, stop_rx) = watch::channel(false);
        let span = info_span!("leaf", id = %id.short());
        let links: status::Links = Arc::new(Mutex::new(Vec::new()));
        let mapped: portmap::Published = Arc::new(watch::Sender::new(None));
        let uploads = Arc::new(
            upload::Uploads::new(
                config.max_upload_rate,
                servent_proto::upload::UploadLimits {
                    exempt: config.role.exempt_ips.clone(),
                    ..Default::default()
                },
            )
            .with_timings(config.timings.upload.clone()),
        );
        // Downloaders and, while elected, leaves and supernodes: all
        // admitted by one gate, with the supernode role's settings.
        let gate = Gate::new(supernode::gate_config(&config.role));
        let uploader = Uploader {
            share: share.clone(),
            uploads: uploads.clone(),
            gate: gate.clone(),
        };
        // A downloader we dial back is served as one that dialled us.
        let pusher = {
            let uploader = uploader.clone();
            push::Pusher::new(endpoint.clone(), move |peer| {
                let uploader = uploader.clone();
                Box::pin(async move { uploader.accept(peer).await })
            })
        };
        let router = span.in_scope(|| {
            Router::builder(endpoint.clone(), gate)
                .accept(ALPN_TRANSFER, uploader)
                // Leaf and mesh connections while not elected (section 4).
                .unserved_reason(b"not a supernode")
                .spawn()
        });
        let port = portmap::Announced::new(addr.port(), mapped.subscribe());
        let role = Role::new(
            router.clone(),
            config.role.clone(),
            config.no_promote,
            port.clone(),
        );
        let report = Arc::new(status::LeafReport::new(
            id,
            addr,
            share.clone(),
            links.clone(),
            mapped.clone(),
            &uploads,
            role.clone(),
        ));
        // Before the other tasks start, so that a bad address leaves nothing
        // running (the router's loop ends with the endpoint, closed below).
        let http = match config.http {
            Some(at) => match HttpServer::bind(at, report.clone())
                .instrument(span.clone())
                .await
            {
                Ok(server) => Some(server),
                Err(e) => {
                    endpoint.close();
                    return Err(e.into());
                }
            },
            None => None,
        };
        let (ui, downloads) = match config.ui {
            Some(at) => {
                match Self::start_ui(&config, at, report, &share, &uploads, &links, (&role, addr))
                    .instrument(span.clone())
                    .await
                {
                    Ok((server, url, downloads)) => (Some((server, url)), Some(downloads)),
                    Err(e) => {
                        endpoint.close();
                        return Err(e);
                    }
                }
            }
            None => (None, None),
        };
        let mut tasks = Vec::new();

        tasks.push(tokio::spawn(
            share::watch(share.clone(), config.timings.share.clone(), stop_rx.clone())
                .instrument(span.clone()),
        ));
        let (lan_hints, lan_heard) = watch::channel(Vec::new());
        let manager = attach::Attach {
            lan: lan_heard,
            endpoint: endpoint.clone(),
            bootstrap: config.supernodes.clone(),
            data_dir: config.data_dir.clone(),
            port,
            share: share.clone(),
            attach: config.attach.max(1),
            rules: config.attach_rules.clone(),
            link_timings: config.timings.link.clone(),
            links: links.clone(),
            role: role.clone(),
            pusher,
        };
        tasks.push(tokio::spawn(
            attach::run(manager, stop_rx.clone()).instrument(span.clone()),
        ));
        if config.port_mapping && portmap::wanted(addr) {
            match portmap::default_gateway() {
                Some(gateway) => tasks.push(tokio::spawn(
                    portmap::run(gateway, addr.port(), mapped.clone(), stop_rx.clone())
                        .instrument(span.clone()),
                )),
                None => debug!(parent: &span, "no default IPv4 gateway: no port mapping"),
            }
        }
        if lan {
            let lan = lan::LanConfig {
                id,
                listen: addr,
                given: !config.supernodes.is_empty(),
                role: role.clone(),
                share: share.clone(),
                links: links.clone(),
                hints: lan_hints,
            };
            tasks.extend(span.in_scope(|| lan::start(lan, stop_rx.clone())));
        }
        info!(parent: &span, %addr, share = %share.root().display(), "serving");
        Ok(Self {
            id,
            addr,
            endpoint,
            share,
            links,
            role,
            uploads,
            router,
            stop,
            tasks,
            http,
            ui,
            downloads,
            data_dir: config.data_dir.clone(),
        })
    }

    /// The control API and the downloads it owns.
    async fn start_ui(
        config: &Config,
        at: SocketAddr,
        report: Arc<status::LeafReport>,
        share: &Arc<Share>,
        uploads: &Arc<upload::Uploads>,
        links: &status::Links,
        (role, addr): (&Arc<Role>, SocketAddr),
    ) -> Result<(HttpServer, String, Arc<downloads::Downloads>), StartError> {
        let key = api::auth::load_or_create_key(&config.data_dir).map_err(StartError::Key)?;
        // This leaf while it holds the supernode role (on loopback if it
        // serves every address), those attached, those given, the cache.
        let supernodes: Arc<dyn Fn() -> Vec<String> + Send + Sync> = {
            let (links, data_dir, given, role) = (
                links.clone(),
                config.data_dir.clone(),
                config.supernodes.clone(),
                role.clone(),
            );
            let me = match addr.ip().is_unspecified() {
                true => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()),
                false => addr,
            };
            Arc::new(move || {
                let mut all: Vec<String> = Vec::new();
                if role.is_supernode() {
                    all.push(me.to_string());
                }
                all.extend(
                    status::attached(&links)
                        .into_iter()
                        .map(|(_, a)| a.to_string()),
                );
                all.extend(given.iter().cloned());
                all.extend(attach::load_cache(&data_dir).into_iter().map(|c| c.addr));
                let mut seen = std::collections::HashSet::new();
                all.retain(|a| seen.insert(a.clone()));
                all
            })
        };
        let downloads = downloads::Downloads::open(downloads::Context {
            data_dir: config.data_dir.clone(),
            dir: share.root(),
            supernodes,
            timings: config.timings.clone(),
            max_active: config.max_active_downloads.max(1),
        });
        let api = Arc::new(api::Api {
            key: key.clone(),
            bound: Default::default(),
            report,
            downloads: downloads.clone(),
            share: share.clone(),
            uploads: uploads.clone(),
            searches: Arc::new(tokio::sync::Semaphore::new(api::MAX_SEARCHES)),
            streams: Arc::new(tokio::sync::Semaphore::new(api::MAX_STREAMS)),
        });
        let served = match api::serve(at, api.clone()).await {
            Err(HttpError::Bind { source, .. })
                if config.ui_fallback && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                let any = SocketAddr::new(at.ip(), 0);
                tracing::warn!(%at, "the UI's address is taken; serving it on a free port");
                api::serve(any, api).await
            }
            other => other,
        };
        let server = match served {
            Ok(s) => s,
            Err(e) => {
                downloads.shutdown();
                return Err(e.into());
            }
        };
        let url = format!("http://{}/?key={key}", server.addr());
        // Where the CLI finds this daemon (remote.rs).
        let named = replace_file(
            &config.data_dir.join(remote::ADDR_FILE),
            server.addr().to_string().as_bytes(),
        );
        if let Err(e) = named {
            tracing::warn!(error = %e, "cannot record the API's address: the CLI will not find this daemon");
        }
        Ok((server, url, downloads))
    }

    /// Removes the file that tells the CLI where this daemon is, if it
    /// still names this one.
    fn unname_ui(&self) {
        let Some((server, _)) = &self.ui else { return };
        let path = self.data_dir.join(remote::ADDR_FILE);
        let ours =
            std::fs::read_to_string(&path).is_ok_and(|a| a.trim() == server.addr().to_string());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The bound address of the control API and web UI, if served.
    pub fn ui_addr(&self) -> Option<SocketAddr> {
        self.ui.as_ref().map(|(server, _)| server.addr())
    }

    /// The URL that opens the web UI, authorised, if it is served.
    pub fn ui_url(&self) -> Option<&str> {
        self.ui.as_ref().map(|(_, url)| url.as_str())
    }

    /// The daemon's downloads, if it runs the control API.
    pub fn downloads(&self) -> Option<&Arc<downloads::Downloads>> {
        self.downloads.as_ref()
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The supernode role: held while this leaf is elected.
    pub fn role(&self) -> &Arc<Role> {
        &self.role
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound HTTP address of `/status` and `/metrics`, if served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(HttpServer::addr)
    }

    pub fn share(&self) -> &Arc<Share> {
        &self.share
    }

    /// What this leaf has uploaded.
    pub fn uploads(&self) -> &Arc<upload::Uploads> {
        &self.uploads
    }

    /// Supernodes this leaf is registered with now.
    pub fn supernodes(&self) -> Vec<(NodeId, SocketAddr)> {
        status::attached(&self.links)
    }

    /// For each registered link, how many files its supernode holds for this leaf.
    pub fn indexed(&self) -> Vec<u32> {
        let links = self.links.lock().expect("links");
        links
            .iter()
            .filter_map(|l| {
                let l = l.lock().expect("link status");
                l.supernode.map(|_| l.indexed)
            })
            .collect()
    }

    /// Stops serving and closes every connection.
    pub async fn shutdown(mut self) {
        self.role.step_down();
        let _ = self.stop.send(true);
        if let Some(downloads) = &self.downloads {
            downloads.shutdown();
        }
        self.unname_ui();
        if let Some((ui, _)) = self.ui.take() {
            ui.shutdown().await;
        }
        if let Some(http) = self.http.take() {
            http.shutdown().await;
        }
        self.endpoint.close();
        self.router.shutdown().await;
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.endpoint.quinn().wait_idle().await;
    }

    pub async fn run_until(self, signal: servent_net::ShutdownSignal) {
        signal.wait().await;
        self.shutdown().await;
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        self.role.step_down();
        let _ = self.stop.send(true);
        if let Some(downloads) = &self.downloads {
            downloads.shutdown();
        }
        self.unname_ui();
        self.endpoint.close();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves `ALPN_TRANSFER`: another leaf downloading from this one.
#[derive(Clone)]
struct Uploader {
    share: Arc<Share>,
    uploads: Arc<upload::Uploads>,
    gate: Arc<Gate>,
}

impl ProtocolHandler for Uploader {
    async fn accept(&self, peer: Peer) {
        let remote = peer.conn.remote_address();
        let span = info_span!("upload", peer = %peer.id.short(), %remote);
        let inbound = self.gate.inbound(&peer.conn);
        upload::serve(self.share.clone(), self.uploads.clone(), peer, inbound)
            .instrument(span)
            .await;
    }
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file of
/// a unique name beside it, synced to disk, then renamed over `path`. A
/// crash never leaves half a file, and writers of the same file at once
/// (a `leaf serve`, a `leaf get`, an older process on the data dir) never
/// write into each other's: the last rename wins whole.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".servent-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// `supernodes`, then each of a link's `hints` not among them: the
/// supernodes a download of that link asks, in order.
pub fn with_hints(mut supernodes: Vec<String>, hints: &[String]) -> Vec<String> {
    for hint in hints {
        if !supernodes.contains(hint) {
            supernodes.push(hint.clone());
        }
    }
    supernodes
}

/// What `leaf get` and the API download: a link, or a bare hash (a link
/// of a hash alone).
pub fn parse_target(text: &str) -> Result<servent_proto::magnet::Link, String> {
    use servent_proto::magnet::Link;
    if Link::is_link(text) {
        return Link::parse(text).map_err(|e| e.to_string());
    }
    let hash: ContentHash = text
        .parse()
        .map_err(|_| "neither 64 hex digits nor a servent: link".to_string())?;
    Ok(Link {
        hash,
        name: None,
        size: None,
        supernodes: Vec::new(),
    })
}

/// Why `leaf link` made no link.
#[derive(Debug, thiserror::Error)]
pub enum LinkToError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} is not a file")]
    NotAFile(PathBuf),
    #[error("its name cannot be shared: {0}")]
    Name(#[from] servent_proto::name::NameError),
}

/// A link to the file at `path` (`leaf link`): its BLAKE3 hash, its name,
/// its size, no hints.
pub fn link_to(path: &Path) -> Result<servent_proto::magnet::Link, LinkToError> {
    let io = |error| LinkToError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(LinkToError::NotAFile(path.to_path_buf()));
    }
    let raw = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = servent_proto::name::sanitise(&raw)?;
    let (hash, _) = layer::hash_reader(&file, meta.len()).map_err(io)?;
    Ok(servent_proto::magnet::Link::new(hash, &name, meta.len()))
}

/// The supernodes a one-shot command asks: those given, else the cache.
pub(crate) fn known_supernodes(data_dir: &Path, given: Vec<String>) -> Vec<String> {
    if !given.is_empty() {
        return given;
    }
    attach::load_cache(data_dir)
        .into_iter()
        .map(|c| c.addr)
        .collect()
}

/// A client for one-shot commands (`search`, `get`): the node's identity on
/// an ephemeral port, so that it never disturbs a `leaf serve` of the same
/// data dir.
pub struct Client {
    endpoint: Endpoint,
    /// Downloads waiting for sources to dial back (`servent-push/1`).
    awaiting: Arc<push::Awaiting>,
    /// Serves those dial-backs; stopped with the client.
    _router: Router,
    data_dir: PathBuf,
    supernodes: Vec<String>,
    timings: Timings,
}

/// How often a running download asks the supernodes again for sources, by
/// default ([`Timings::requery`]).
pub const REQUERY_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Get(#[from] GetError),
    #[error("no source for {0}: no supernode knows of it")]
    NotFound(ContentHash),
}

impl Client {
    pub fn new(data_dir: &Path, supernodes: Vec<String>) -> Result<Self, ClientError> {
        let identity = Arc::new(Identity::load_or_create(data_dir)?);
        let supernodes = known_supernodes(data_dir, supernodes);
        // Sources behind NATs dial back to this port (docs/PROTOCOL.md 10.5).
        let endpoint = Endpoint::server_any(identity, &[ALPN_PUSH])?;
        let awaiting = Arc::new(push::Awaiting::default());
        let gate = Gate::new(supernode::gate_config(&supernode::Config::default()));
        let router = Router::builder(endpoint.clone(), gate)
            .accept(ALPN_PUSH, push::PushHandler(awaiting.clone()))
            .spawn();
        Ok(Self {
            endpoint,
            awaiting,
            _router: router,
            data_dir: data_dir.to_path_buf(),
            supernodes,
            timings: Timings::default(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.endpoint.id()
    }

    /// How often a running download looks for new sources. Default
    /// [`REQUERY_INTERVAL`].
    pub fn set_requery_interval(&mut self, every: Duration) {
        self.timings.requery = every;
    }

    /// The timings of searches and downloads (its `search`, `transfer` and
    /// `requery`). Default [`Timings::default`].
    pub fn set_timings(&mut self, timings: Timings) {
        self.timings = timings;
    }

    pub async fn search(
        &self,
        words: &[String],
        max: u32,
        timeout: Duration,
    ) -> Result<Vec<Hit>, ClientError> {
        Ok(search::query(
            &self.endpoint,
            &self.supernodes,
            QueryKind::Keywords(words.to_vec()),
            max,
            timeout,
            &self.timings.search,
        )
        .await?)
    }

    /// Every known source of `hash`.
    pub async fn locate(
        &self,
        hash: ContentHash,
        timeout: Duration,
    ) -> Result<Option<Hit>, ClientError> {
        let hits = search::query(
            &self.endpoint,
            &self.supernodes,
            QueryKind::Hash(hash),
            1,
            timeout,
            &self.timings.search,
        )
        .await?;
        Ok(hits.into_iter().find(|h| h.hash == hash))
    }

    /// Finds `hash`, downloads it and verifies it into `out` (or, without
    /// one, a file named as the hit says in the current folder).
    pub async fn get(
        &self,
        hash: ContentHash,
        out: Option<&Path>,
        timeout: Duration,
    ) -> Result<PathBuf, ClientError> {
        Ok(self.download(hash, out, timeout, None).await?.0)
    }

    /// [`Client::get`], reporting progress on `progress` and what was
    /// fetched.
    pub async fn download(
        &self,
        hash: ContentHash,
        out: Option<&Path>,
        timeout: Duration,
        progress: Option<watch::Sender<transfer::Progress>>,
    ) -> Result<(PathBuf, transfer::Downloaded), ClientError> {
        let hit = self
            .locate(hash, timeout)
            .await?
            .ok_or(ClientError::NotFound(hash))?;
        let target = match out {
            Some(p) => p.to_path_buf(),
            // The name most independent sources announce.
            None => PathBuf::from(safe_file_name(hit.name()).unwrap_or_else(|| hash.to_string())),
        };
        // Sources that appear during a long download join in.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (endpoint, supernodes, every) = (
            self.endpoint.clone(),
            self.supernodes.clone(),
            self.timings.requery,
        );
        let search = self.timings.search.clone();
        let requery = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let query = QueryKind::Hash(hash);
                let Ok(hits) =
                    search::query(&endpoint, &supernodes, query, 1, every, &search).await
                else {
                    continue;
                };
                let sources = hits
                    .into_iter()
                    .filter(|h| h.hash == hash)
                    .flat_map(|h| h.sources);
                if tx.send(sources.collect()).await.is_err() {
                    return;
                }
            }
        });
        // A `leaf serve` of this data dir shares the download while it runs.
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(safe_file_name)
            .unwrap_or_else(|| hash.to_string());
        let done = transfer::Download {
            endpoint: &self.endpoint,
            hash,
            sources: &hit.sources,
            target: &target,
            progress,
            more: Some(rx),
            share_as: Some((self.data_dir.clone(), name)),
            timings: self.timings.transfer.clone(),
            awaiting: Some(self.awaiting.clone()),
        }
        .run()
        .await;
        requery.abort();
        Ok((target, done?))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// Longest name (UTF-8 bytes) `get` creates: below every common file
/// system's 255, leaving room for the partial file's prefix and suffix.
pub const MAX_SAFE_NAME_BYTES: usize = 200;

/// A name from the network made safe to create in the current folder, on
/// any platform: its last component only, in NFC; none of the characters
/// `servent_proto::name` refuses (controls, bidi controls, zero-width and
/// other invisible characters; a name from a hostile supernode is
/// neutralised here, not refused, since the download goes on) and none
/// that Windows forbids (`<>:"|?*`); not hidden, not `.`/`..`; no trailing
/// dots or spaces; not a Windows device name (`CON`, `NUL`, `COM1`, ... with
/// any extension), which gets a `_` prefix; at most
/// [`MAX_SAFE_NAME_BYTES`].
pub fn safe_file_name(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next()?;
    let kept: String = last
        .chars()
        .filter(|&c| {
            servent_proto::name::refused_class(c).is_none()
                && !matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*')
        })
        .collect();
    // Normalised after the filter: what it dropped may have kept a letter
    // and its accent apart.
    let clean = servent_proto::name::nfc(&kept);
    let mut clean = clean
        .trim()
        .trim_start_matches('.')
        .trim_end_matches(['.', ' '])
        .to_string();
    let stem = clean
        .split('.')
        .next()
        .unwrap_or("")
        .trim_end()
        .to_ascii_uppercase();
    const DEVICES: &[&str] = &["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"];
    let numbered = ["COM", "LPT"].iter().any(|p| {
        stem.strip_prefix(p).is_some_and(|n| {
            n.chars().count() == 1 && n.chars().all(|c| c.is_ascii_digit() || "¹²³".contains(c))
        })
    });
    if DEVICES.contains(&stem.as_str()) || numbered {
        clean.insert(0, '_');
    }
    servent_proto::msg::truncate_utf8(&mut clean, MAX_SAFE_NAME_BYTES);
    let clean = clean.trim_end_matches(['.', ' ']).to_string();
    (!clean.is_empty()).then_some(clean)
}

#[cfg(test)]
mod tests {
    use super::safe_file_name;

    #[test]
    fn hostile_names_stay_in_the_folder() {
        assert_eq!(
            safe_file_name("../../etc/passwd").as_deref(),
            Some("passwd")
        );
        assert_eq!(safe_file_name("/abs/x.txt").as_deref(), Some("x.txt"));
        assert_eq!(safe_file_name("a\\b\\c.exe").as_deref(), Some("c.exe"));
        assert_eq!(safe_file_name(".."), None);
        assert_eq!(safe_file_name("a/"), None);
        assert_eq!(safe_file_name("x\0y\n").as_deref(), Some("xy"));
        assert!(safe_file_name(&"é".repeat(300)).unwrap().len() <= 200);
        assert_eq!(safe_file_name("CON").as_deref(), Some("_CON"));
        assert_eq!(safe_file_name("nul.txt").as_deref(), Some("_nul.txt"));
        assert_eq!(
            safe_file_name("Com1.tar.gz").as_deref(),
            Some("_Com1.tar.gz")
        );
        assert_eq!(safe_file_name("lpt9").as_deref(), Some("_lpt9"));
        assert_eq!(
            safe_file_name("console.log").as_deref(),
            Some("console.log")
        );
        assert_eq!(safe_file_name("COM10").as_deref(), Some("COM10"));
        assert_eq!(safe_file_name("a:b?c*.txt").as_deref(), Some("abc.txt"));
        assert_eq!(safe_file_name("trail. . ").as_deref(), Some("trail"));
        assert_eq!(safe_file_name("\0"), None);
        assert_eq!(safe_file_name("\0\0/.."), None);
        assert_eq!(
            safe_file_name("C:\\Windows\\evil.dll").as_deref(),
            Some("evil.dll")
        );
        assert_eq!(safe_file_name("C:evil").as_deref(), Some("Cevil"));
        // What disguises a name is dropped: "\u{202e}gpj.exe" shows as "exe.jpg".
        assert_eq!(
            safe_file_name("\u{202e}gpj.exe").as_deref(),
            Some("gpj.exe")
        );
        assert_eq!(
            safe_file_name("a\u{200b}b\u{feff}\u{2028}c\u{fffe}").as_deref(),
            Some("abc")
        );
        assert_eq!(safe_file_name("cafe\u{301}").as_deref(), Some("caf\u{e9}"));
        assert_eq!(
            safe_file_name("cafe\u{200b}\u{301}").as_deref(),
            Some("caf\u{e9}")
        );
    }
}
