//! The web UI in a real browser, end to end, with the real binaries on
//! loopback: a `supernode`, a leaf A sharing two files and a leaf B with an
//! empty share and its control API and web UI. Headless Chromium, driven
//! through chromedriver (WebDriver), opens B's UI with its key, searches
//! for a file of A's, downloads it from the result, pastes a `servent:`
//! link of A's other file into the search box, adds a folder on the shares
//! page (whose file A then finds) and stops sharing it, and looks at the
//! network page. Every check is on the DOM (and on the bytes on disk);
//! the screenshots of each page, in `<target>/tmp/ui-screenshots/`, are
//! for a human to look at.
//!
//! Skipped, saying so, where `chromium` or `chromedriver` is not installed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use servent_tests::bins::{self, Binaries, Process};

const START: Duration = Duration::from_secs(30);
/// How long chromedriver may take to accept connections.
const DRIVER_START: Duration = Duration::from_secs(20);
/// How long the search may take to find A's file (A registers its share
/// with the supernode a little after it starts).
const FIND: Duration = Duration::from_secs(30);
/// How long each search is given before it is submitted again.
const SEARCH_ROUND: Duration = Duration::from_secs(8);
/// How long a download may take to be done.
const DOWNLOAD: Duration = Duration::from_secs(60);
/// How long the UI may take to show what the daemon knows.
const SHOW: Duration = Duration::from_secs(30);
/// The pause between two looks at the page inside a bounded wait.
const POLL: Duration = Duration::from_millis(250);

const SONG: &str = "sunrise session.flac";
const SONG_SIZE: u64 = 2_000_000;
const LINKED: &str = "night drive.ogg";
const LINKED_SIZE: u64 = 700_000;
const EXTRA: &str = "harbour lights.wav";

/// `/usr/bin/NAME`, or NAME found on `PATH`.
fn installed(name: &str) -> Option<PathBuf> {
    let usual = Path::new("/usr/bin").join(name);
    if usual.is_file() {
        return Some(usual);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A TCP port on loopback that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something accepts connections on `addr`, up to `timeout`.
fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Where the screenshots go: cargo's scratch folder for integration tests.
fn screenshot_dir() -> PathBuf {
    // Cargo sets CARGO_TARGET_TMPDIR when it builds an integration test
    // (so `option_env!`); the run-time variable is there only if set by hand.
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ui-screenshots")
}

/// A chromedriver child process, shut down (and so its browsers with it)
/// and killed when dropped, also when the test panics.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Driver {
    fn start(program: &Path, log: PathBuf) -> Result<Self, String> {
        let port = free_port();
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", program.display()))?;
        let mut me = Self { child, port, log };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if !wait_listening(addr, DRIVER_START) {
            let exited = me.child.try_wait().ok().flatten();
            return Err(format!(
                "chromedriver did not accept connections on {addr} within {DRIVER_START:?} \
                 (exited: {exited:?}); its output:\n{}",
                me.output()
            ));
        }
        Ok(me)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What chromedriver wrote.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // chromedriver's /shutdown quits the browsers of its sessions
            // too, which a kill would leave running.
            let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = write!(
                    s,
                    "GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                );
                let _ = s.read(&mut [0u8; 512]);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn supernode(bins: &Binaries, data: &Path) -> Process {
    bins::loopback_supernode(bins, data, START).expect("supernode starts")
}

/// `leaf --supernode SN --data-dir DATA serve --share SHARE ... UI`.
fn leaf_serve(bins: &Binaries, sn: &str, data: &Path, share: &Path, ui: &[&str]) -> Process {
    bins::loopback_leaf(bins, sn, data, share, ui, START).expect("leaf serve starts")
}

/// The 64 hex digits of `<data>/api.key`, once the daemon has written it.
fn api_key(data: &Path) -> String {
    let file = data.join("api.key");
    let deadline = Instant::now() + START;
    loop {
        if let Ok(key) = std::fs::read_to_string(&file) {
            let key = key.trim().to_string();
            if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return key;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no 64-hex key in {} within {START:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the test knows that the browser part needs.
struct World {
    ui: String,
    song_hash: String,
    linked_hash: String,
    link: String,
    b_id: String,
    b_share: PathBuf,
    sn_id: String,
    shots: PathBuf,
    /// A folder B's user adds in the UI, its file, and what is needed to
    /// search for it from A's data dir.
    extra_dir: PathBuf,
    extra_hash: String,
    leaf_bin: PathBuf,
    a_data: PathBuf,
    sn_addr: String,
}

#[test]
fn a_user_searches_downloads_and_pastes_a_link_in_the_browser() {
    let (Some(chromium), Some(chromedriver)) = (installed("chromium"), installed("chromedriver"))
    else {
        eprintln!(
            "SKIPPED a_user_searches_downloads_and_pastes_a_link_in_the_browser: \
             chromium or chromedriver is not installed (looked in /usr/bin and on PATH)"
        );
        return;
    };
    let started = Instant::now();
    let bins = bins::binaries().expect("binaries");
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |p: &str| dir.path().join(p);
    let (a_share, b_share) = (at("a-share"), at("b-share"));
    std::fs::create_dir_all(&a_share).expect("A's share");
    std::fs::create_dir_all(&b_share).expect("B's share");
    let song_hash = bins::write_random_file(&a_share.join(SONG), SONG_SIZE, 11).expect("A's song");
    let linked_hash =
        bins::write_random_file(&a_share.join(LINKED), LINKED_SIZE, 12).expect("A's other file");

    let extra_dir = at("b-extra");
    std::fs::create_dir_all(&extra_dir).expect("B's other folder");
    let extra_hash =
        bins::write_random_file(&extra_dir.join(EXTRA), 300_000, 13).expect("B's other file");
    let sn = supernode(&bins, &at("sn"));
    let a = leaf_serve(&bins, &sn.addr, &at("a"), &a_share, &["--no-ui"]);
    let ui_port = free_port();
    let ui_addr = format!("127.0.0.1:{ui_port}");
    let b = leaf_serve(&bins, &sn.addr, &at("b"), &b_share, &["--ui", &ui_addr]);
    let key = api_key(&at("b"));
    assert!(
        wait_listening(ui_addr.parse().expect("ui addr"), START),
        "B's UI does not accept connections on {ui_addr}; stderr:\n{}",
        b.stderr()
    );

    // The link a user would copy from A: `leaf link`, as in tests/links.rs.
    let made = bins::run(
        bins::command(
            None,
            &bins.leaf,
            &[
                "--data-dir",
                &bins::path_arg(&at("a")),
                "--supernode",
                &sn.addr,
                "link",
                &bins::path_arg(&a_share.join(LINKED)),
            ],
        ),
        START,
    );
    assert!(made.success(), "leaf link failed: {}", made.stderr);
    let link = made.stdout.trim().to_string();
    assert!(
        link.starts_with(&format!("servent:?xt=urn:blake3:{linked_hash}")),
        "{link}"
    );

    let shots = screenshot_dir();
    // Only this run's pictures (a failure.png from an earlier run would mislead).
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).expect("screenshot folder");
    let driver = Driver::start(&chromedriver, at("chromedriver.log")).expect("chromedriver");
    let world = World {
        ui: format!("http://{ui_addr}/?key={key}"),
        song_hash,
        linked_hash,
        link,
        b_id: b.id.clone(),
        b_share,
        sn_id: sn.id.clone(),
        shots,
        extra_dir: extra_dir.canonicalize().expect("canonical"),
        extra_hash,
        leaf_bin: bins.leaf.clone(),
        a_data: at("a"),
        sn_addr: sn.addr.clone(),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let outcome: Result<()> = rt.block_on(async {
        let client = connect(&driver, &chromium).await?;
        let run = browse(&client, &world).await;
        if run.is_err() {
            let _ = screenshot(&client, &world.shots, "failure").await;
            if let Ok(page) = page_state(&client).await {
                eprintln!("the page when it failed: {page:#}");
            }
        }
        // Close the session whatever happened; the Driver's drop quits the
        // browser anyway should this fail.
        let closed = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        if !matches!(closed, Ok(Ok(()))) {
            eprintln!("closing the WebDriver session: {closed:?}");
        }
        run
    });
    if let Err(e) = outcome {
        panic!(
            "{e:#}\n--- B's stderr:\n{}\n--- A's stderr:\n{}\n--- supernode's stderr:\n{}\n\
             --- chromedriver:\n{}",
            b.stderr(),
            a.stderr(),
            sn.stderr(),
            driver.output()
        );
    }
    eprintln!(
        "ui test done in {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        world.shots.display()
    );
}

async fn connect(driver: &Driver, chromium: &Path) -> Result<Client> {
    let caps = json!({
        "goog:chromeOptions": {
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1200,900",
            ],
            "binary": bins::path_arg(chromium),
        }
    });
    let Value::Object(caps) = caps else {
        unreachable!("a JSON object")
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let mut builder = ClientBuilder::new(connector);
    builder.capabilities(caps);
    let url = driver.url();
    tokio::time::timeout(START, builder.connect(&url))
        .await
        .context("no WebDriver session within the start timeout")?
        .context("WebDriver session")
}

/// What the user does and sees, each step checked on the DOM.
async fn browse(c: &Client, w: &World) -> Result<()> {
    c.goto(&w.ui).await.context("open B's UI")?;
    // The key authorises the page: its event stream goes live.
    wait_until(
        c,
        SHOW,
        "the connection badge to say live",
        |c| async move {
            let state = c
                .find(Locator::Css("#conn"))
                .await?
                .attr("data-state")
                .await?;
            Ok((state.as_deref() == Some("live")).then_some(()))
        },
    )
    .await?;
    // The progress bars grow with a CSS transition, which a screenshot
    // taken just as a download is done catches halfway: turn it off, for
    // the pictures only (the checks read the bars' values, not pixels).
    c.execute(
        "const s = document.createElement('style'); \
         s.textContent = 'progress::-webkit-progress-value { transition: none !important; }'; \
         document.head.append(s);",
        vec![],
    )
    .await?;
    let url = c.current_url().await?;
    ensure!(
        !url.as_str().contains("key="),
        "the key stays in the address bar: {url}"
    );

    // Search, submitting again until A's share has registered.
    let result = format!("li.result[data-hash=\"{}\"]", w.song_hash);
    let deadline = Instant::now() + FIND;
    let mut rounds = 0;
    loop {
        rounds += 1;
        type_into(c, "#search-input", "sunrise").await?;
        c.find(Locator::Css("#search-submit"))
            .await?
            .click()
            .await?;
        let round_end = (Instant::now() + SEARCH_ROUND).min(deadline);
        let mut found = false;
        while Instant::now() < round_end {
            if !c.find_all(Locator::Css(&result)).await?.is_empty() {
                found = true;
                break;
            }
            let status = c.find(Locator::Css("#search-status")).await?.text().await?;
            let error = visible_text(c, "#search-error").await?;
            // Finished without the file: ask again (after a short pause).
            if (!status.is_empty() && status != "Searching…") || !error.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        if found {
            break;
        }
        if Instant::now() >= deadline {
            let status = c.find(Locator::Css("#search-status")).await?.text().await?;
            let error = visible_text(c, "#search-error").await?;
            bail!(
                "no result for {} within {FIND:?} ({rounds} searches); \
                 status {status:?}, error {error:?}",
                w.song_hash
            );
        }
    }
    let hit = c.find(Locator::Css(&result)).await?;
    let name = hit.find(Locator::Css(".name")).await?.text().await?;
    ensure!(name == SONG, "the result is named {name:?}, not {SONG:?}");
    let sources = hit
        .find(Locator::Css(".sources"))
        .await?
        .attr("data-sources")
        .await?;
    ensure!(
        sources.as_deref().and_then(|s| s.parse::<u32>().ok()) >= Some(1),
        "the result shows sources {sources:?}"
    );
    ensure!(
        !hit.find_all(Locator::Css("button.copy-link"))
            .await?
            .is_empty(),
        "the result has no Copy link button"
    );
    screenshot(c, &w.shots, "1-search").await?;

    hit.find(Locator::Css("button.download"))
        .await?
        .click()
        .await?;
    // The result's button says so, and the page stays on the search.
    wait_until(c, SHOW, "the result's button to say In Downloads", |c| {
        let sel = format!("{result} button.download");
        async move {
            let text = c.find(Locator::Css(&sel)).await?.text().await?;
            Ok((text == "In Downloads").then_some(()))
        }
    })
    .await?;
    let error = visible_text(c, "#search-error").await?;
    ensure!(error.is_empty(), "adding the download failed: {error}");
    let search_page = c.find(Locator::Css("#page-search")).await?;
    ensure!(
        search_page.attr("hidden").await?.is_none(),
        "the page left the search after Download was clicked"
    );

    c.find(Locator::Css("#nav-downloads"))
        .await?
        .click()
        .await?;
    let path = wait_done(c, &w.song_hash, SONG_SIZE).await?;
    screenshot(c, &w.shots, "2-downloads").await?;
    check_file(&path, &w.b_share.join(SONG), &w.song_hash)?;

    // Paste a link into the search box: it becomes a download at once.
    c.find(Locator::Css("#nav-search")).await?.click().await?;
    type_into(c, "#search-input", &w.link).await?;
    c.find(Locator::Css("#search-submit"))
        .await?
        .click()
        .await?;
    wait_until(
        c,
        SHOW,
        "the downloads page after the link",
        |c| async move {
            let error = visible_text(&c, "#search-error").await?;
            if !error.is_empty() {
                return Err(anyhow!("the pasted link was refused: {error}"));
            }
            let hidden = c
                .find(Locator::Css("#page-downloads"))
                .await?
                .attr("hidden")
                .await?;
            Ok(hidden.is_none().then_some(()))
        },
    )
    .await?;
    let path = wait_done(c, &w.linked_hash, LINKED_SIZE).await?;
    screenshot(c, &w.shots, "2-downloads-link").await?;
    check_file(&path, &w.b_share.join(LINKED), &w.linked_hash)?;

    // Shares: the finished downloads are in B's share folder, so shared.
    c.find(Locator::Css("#nav-shares")).await?.click().await?;
    wait_until(c, SHOW, "both downloads in the shared files", |c| {
        let want = [w.song_hash.clone(), w.linked_hash.clone()];
        async move {
            let mut shown = Vec::new();
            for li in c
                .find_all(Locator::Css("#shared-files li.shared-file"))
                .await?
            {
                shown.push(li.attr("data-hash").await?.unwrap_or_default());
            }
            Ok(want.iter().all(|h| shown.contains(h)).then_some(()))
        }
    })
    .await?;

    // Adding a folder: it is listed, and its file appears in A's search.
    let folder = w.extra_dir.display().to_string();
    c.find(Locator::Css("#share-input"))
        .await?
        .send_keys(&format!("{folder}\u{E007}"))
        .await?;
    wait_until(c, SHOW, "the added folder listed", |c| {
        let folder = folder.clone();
        async move {
            let error = c.find(Locator::Css("#share-error")).await?.text().await?;
            ensure!(error.trim().is_empty(), "adding the folder failed: {error}");
            let listed = c.find_all(Locator::Css(".share[data-path]")).await?;
            for s in listed {
                if s.attr("data-path").await?.as_deref() == Some(folder.as_str()) {
                    return Ok(Some(()));
                }
            }
            Ok(None)
        }
    })
    .await?;
    screenshot(c, &w.shots, "3-shares").await?;
    let deadline = Instant::now() + FIND;
    loop {
        let (bin, data, sn) = (w.leaf_bin.clone(), w.a_data.clone(), w.sn_addr.clone());
        let found = tokio::task::spawn_blocking(move || {
            let args = [
                "--supernode",
                &sn,
                "--data-dir",
                &bins::path_arg(&data),
                "search",
                "--json",
                "--timeout",
                "2",
                "harbour",
            ];
            bins::run(bins::command(None, &bin, &args), FIND)
        })
        .await?;
        if bins::has_hit(&found.stdout, &w.extra_hash) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "A never found the file of the folder added in B's UI: {}",
            found.stderr
        );
        tokio::time::sleep(POLL).await;
    }

    // ...and stopping sharing it takes it off the page.
    c.find(Locator::Css("#nav-shares")).await?.click().await?;
    let mut removed = false;
    for share in c.find_all(Locator::Css(".share[data-path]")).await? {
        if share.attr("data-path").await?.as_deref() == Some(folder.as_str()) {
            share
                .find(Locator::Css("button.remove-share"))
                .await?
                .click()
                .await?;
            removed = true;
        }
    }
    ensure!(removed, "no Stop sharing button on the added folder");
    wait_until(c, SHOW, "the removed folder gone from the page", |c| {
        let folder = folder.clone();
        async move {
            for s in c.find_all(Locator::Css(".share[data-path]")).await? {
                if s.attr("data-path").await?.as_deref() == Some(folder.as_str()) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;

    // Network: B's id, its supernode, the rate graph drawn.
    c.find(Locator::Css("#nav-network")).await?.click().await?;
    wait_until(
        c,
        SHOW,
        "the network page to show B and its supernode",
        |c| {
            let (b_id, sn_id) = (w.b_id.clone(), w.sn_id.clone());
            async move {
                let id = c.find(Locator::Css("#node-id")).await?.text().await?;
                let role = c.find(Locator::Css("#role")).await?.text().await?;
                let mut supernodes = Vec::new();
                for li in c.find_all(Locator::Css("#supernodes li")).await? {
                    supernodes.push(li.attr("data-id").await?.unwrap_or_default());
                }
                let drawn = c
                    .find(Locator::Css("#rate-graph polyline.down"))
                    .await?
                    .attr("points")
                    .await?
                    .is_some_and(|p| !p.trim().is_empty());
                Ok(
                    (id == b_id && role == "leaf" && supernodes.contains(&sn_id) && drawn)
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    let supernodes = c.find_all(Locator::Css("#supernodes li")).await?.len();
    ensure!(supernodes >= 1, "no supernode listed");
    screenshot(c, &w.shots, "4-network").await?;
    Ok(())
}

/// Waits on the downloads page until the download of `hash` is done at
/// 100 %, its bar full at `size`; returns the path it shows.
async fn wait_done(c: &Client, hash: &str, size: u64) -> Result<PathBuf> {
    let item = format!("li.download-item[data-hash=\"{hash}\"]");
    let mut last = String::new();
    let deadline = Instant::now() + DOWNLOAD;
    loop {
        if let Some(li) = c.find_all(Locator::Css(&item)).await?.into_iter().next() {
            let state = li.attr("data-state").await?.unwrap_or_default();
            let percent = li.find(Locator::Css(".percent")).await?.text().await?;
            let bar = li.find(Locator::Css("progress.progress")).await?;
            // The bar's value and max are numbers, which WebDriver's
            // property read does not give as such: ask the page.
            let bar = c
                .execute(
                    "return [arguments[0].value, arguments[0].max];",
                    vec![serde_json::to_value(&bar)?],
                )
                .await?;
            let (value, max) = (&bar[0], &bar[1]);
            let full = value.as_f64() == Some(size as f64) && max.as_f64() == Some(size as f64);
            if state == "done" && percent == "100 %" && full {
                let path = li.find(Locator::Css("code.path")).await?.text().await?;
                return Ok(PathBuf::from(path));
            }
            if state == "failed" || state == "cancelled" {
                let error = li.find(Locator::Css("p.error")).await?.text().await?;
                bail!("the download of {hash} is {state}: {error}");
            }
            last = format!("state {state:?}, {percent:?}, bar {value}/{max}");
        }
        if Instant::now() >= deadline {
            bail!("the download of {hash} not done within {DOWNLOAD:?}: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The downloaded file is where the page says, in B's share folder, with
/// the bytes A shared.
fn check_file(shown: &Path, expected: &Path, hash: &str) -> Result<()> {
    ensure!(
        shown == expected,
        "the page says the file is at {}, not {}",
        shown.display(),
        expected.display()
    );
    let got = bins::hash_file(expected).with_context(|| format!("{}", expected.display()))?;
    ensure!(
        got == hash,
        "{} hashes to {got}, not {hash}",
        expected.display()
    );
    Ok(())
}

/// Clears the field `sel` and types `text` into it, as a user would.
async fn type_into(c: &Client, sel: &str, text: &str) -> Result<()> {
    let input = c.find(Locator::Css(sel)).await?;
    input.clear().await?;
    input.send_keys(text).await?;
    let value = input.prop("value").await?.unwrap_or_default();
    ensure!(value == text, "{sel} holds {value:?} after typing {text:?}");
    Ok(())
}

/// The text of `sel` if it is shown, else "".
async fn visible_text(c: &Client, sel: &str) -> Result<String> {
    let e = c.find(Locator::Css(sel)).await?;
    Ok(match e.attr("hidden").await? {
        Some(_) => String::new(),
        None => e.text().await?,
    })
}

/// Polls `check` until it gives `Some`, up to `timeout`; an error from it
/// other than WebDriver's (which may be a re-render between two calls)
/// ends the wait at once.
async fn wait_until<T, F, Fut>(c: &Client, timeout: Duration, what: &str, check: F) -> Result<T>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match check(c.clone()).await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if e.is::<fantoccini::error::CmdError>() => last = Some(e),
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            let why = last
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("waited {timeout:?} for {what}{why}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Saves a PNG of the page as `dir/name.png`.
async fn screenshot(c: &Client, dir: &Path, name: &str) -> Result<()> {
    let png = c.screenshot().await.context("screenshot")?;
    let file = dir.join(format!("{name}.png"));
    std::fs::write(&file, png).with_context(|| format!("{}", file.display()))?;
    Ok(())
}

/// What the page shows, for a failure's message.
async fn page_state(c: &Client) -> Result<Value> {
    Ok(c.execute(
        "const t = (s) => { const e = document.querySelector(s); \
               return e ? (e.hidden ? '(hidden) ' : '') + e.textContent : null; };
             return { url: location.href, conn: t('#conn'), notice: t('#notice'),
                      searchError: t('#search-error'), searchStatus: t('#search-status'),
                      results: t('#results'), downloads: t('#downloads') };",
        vec![],
    )
    .await?)
}
