//! The demo in a real browser. Debian's Chromium, driven by playwright-core
//! from `tests/browser/demo.mjs`, opens the page that
//! `examples/demo_backend.rs` serves, talks through Tollgate to an upstream
//! (the test service of `tests/common/upstream.rs`) until Tollgate cuts the
//! session off at the usage limit, buys more time and talks again; then the
//! database and the upstream must show what the page showed.
//!
//! Skipped, saying so, where Chromium, node or the npm packages
//! (`npm ci` in `tests/browser`) are missing. With
//! `TOLLGATE_REQUIRE_BROWSER=1` it fails instead, as CI wants.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::upstream::{TestUpstream, upstream_at};
use common::*;
use tollgate::config::AllowedOrigins;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Seconds the demo backend gives a new visitor: below the server's
/// default warning threshold, so the warning shows at once.
const DEMO_SECONDS: i64 = 4;
const TOP_UP_SECONDS: f64 = 30.0;
const TICK: Duration = Duration::from_millis(200);
/// The script gives up on its own after 90 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_talks_until_the_limit_buys_more_time_and_talks_again() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !prerequisites(&browser_dir) {
        return;
    }
    let demo_backend = demo_backend_binary();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).unwrap();
    for name in ["demo.png", "limit-reached.png", "failure.png"] {
        let _ = std::fs::remove_file(shots.join(name));
    }

    let port = free_port();
    let origin = format!("http://127.0.0.1:{port}");
    let allowed = AllowedOrigins::List(vec![origin.parse().unwrap()]);
    let upstream = TestUpstream::plain().await;
    let relay = upstream_at(&upstream.url);
    let server = TestServer::start_with(|settings| {
        settings.allowed_origins = allowed;
        settings.tick = TICK;
        settings.upstreams.conversational = Some(relay);
    })
    .await;

    let mut backend = Command::new(&demo_backend);
    backend
        .env("DEMO_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_URL", &server.base)
        .env("TOLLGATE_API_KEY", &server.key)
        .env("DEMO_SECONDS", DEMO_SECONDS.to_string());
    let mut backend = Running::spawn("demo_backend", backend);
    let opened = backend.wait_for_line("Open http://", Duration::from_secs(30)).await;
    assert!(opened.contains(&origin), "the backend says to open {opened:?}, not {origin}");

    let mut script = Command::new("node");
    script
        .arg(browser_dir.join("demo.mjs"))
        .current_dir(&browser_dir)
        .env("DEMO_URL", format!("{origin}/"))
        .env("DEMO_SECONDS", DEMO_SECONDS.to_string())
        .env("SCREENSHOT_DIR", &shots)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
    let mut script = Running::spawn("demo.mjs", script);
    let status = script.wait(SCRIPT_TIMEOUT).await;
    assert!(
        status.is_some_and(|status| status.success()),
        "the browser script failed ({}); screenshots in {}:\n{}",
        status.map_or(format!("still running after {SCRIPT_TIMEOUT:?}"), |s| s.to_string()),
        shots.display(),
        script.output().join("\n")
    );
    for name in ["limit-reached.png", "demo.png"] {
        let mut signature = [0u8; 8];
        let file = std::fs::File::open(shots.join(name)).map(|mut f| f.read_exact(&mut signature));
        assert!(
            matches!(file, Ok(Ok(()))) && signature == *b"\x89PNG\r\n\x1a\n",
            "no screenshot {name} in {}",
            shots.display()
        );
    }
    say(&format!("browser test: screenshots in {}", shots.display()));

    // What the page showed is what the database holds: the first session
    // cut off at exactly the seconds granted, the second stopped by the
    // visitor, and the time bought less what that one used.
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0], (Some("usage_limit_exceeded".into()), DEMO_SECONDS * 1000), "{rows:?}");
    assert_eq!(rows[1].0.as_deref(), Some("client_closed"), "{rows:?}");
    assert!(rows[1].1 > 0, "{rows:?}");
    let db = server.db();
    assert_ledger_identity(&db);
    let humans: Vec<String> =
        db.rows("SELECT external_id FROM humans", &[]).iter().map(|row| row.get(0)).collect();
    assert_eq!(humans.len(), 1, "{humans:?}");
    let left = server.remaining(&humans[0], "conversational_seconds").await;
    assert_near(left, TOP_UP_SECONDS - rows[1].1 as f64 / 1000.0, 0.0005);

    // The audio went through the upstream, and both of its connections were
    // closed with the session: the first by the cut-off.
    assert_eq!(upstream.count(), 2);
    for (index, reason) in [(0, "usage_limit_exceeded"), (1, "client_closed")] {
        let seen = upstream.ended(index).await;
        let frames = seen.received.iter().filter(|m| m.is_binary()).count();
        assert!(frames > 10, "upstream connection {index} got {frames} audio frames");
        assert_eq!(seen.close.map(|frame| frame.reason.to_string()).as_deref(), Some(reason));
    }

    drop(script);
    drop(backend);
    server.shutdown().await;
}

/// Whether Chromium, node and playwright-core are there; says what is
/// missing if not.
fn prerequisites(browser_dir: &Path) -> bool {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).is_file() {
        missing.push(format!("Chromium ({CHROMIUM}; apt-get install chromium)"));
    }
    let node = Command::new("node").arg("--version").stdout(Stdio::null()).status();
    if !node.is_ok_and(|status| status.success()) {
        missing.push("node".to_owned());
    }
    if !browser_dir.join("node_modules/playwright-core/package.json").is_file() {
        missing.push("tests/browser/node_modules/playwright-core (npm ci in tests/browser)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(", ");
    assert!(std::env::var_os("TOLLGATE_REQUIRE_BROWSER").is_none(), "missing: {missing}");
    say(&format!("skipped: {missing}"));
    false
}

/// Writes to the real standard error, past the test harness's capture.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The demo backend next to this test's executable (`cargo test` builds
/// the examples), built now if it is missing or older than its sources.
fn demo_backend_binary() -> PathBuf {
    let test_exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/browser-<hash>
    let profile_dir = test_exe.parent().and_then(Path::parent).unwrap();
    let binary =
        profile_dir.join("examples").join(format!("demo_backend{}", std::env::consts::EXE_SUFFIX));
    if is_newer_than_sources(&binary) {
        return binary;
    }
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "--example", "demo_backend", "--target-dir"]);
    build.arg(profile_dir.parent().unwrap());
    // Cargo sets these for this test; build scripts that read them would
    // otherwise be rebuilt now, and again by the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = ["CARGO_PKG_", "CARGO_BIN_EXE_"].iter().any(|p| name.starts_with(p))
            || CARGO_SETS.contains(&name.as_ref());
        if set_by_cargo {
            build.env_remove(name.as_ref());
        }
    }
    match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(profile) => {
            build.args(["--profile", profile]);
        }
        None => panic!("no profile directory in {}", test_exe.display()),
    }
    let output = build.current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cargo build --example demo_backend failed:\n{stderr}");
    assert!(binary.is_file(), "no {} after building it", binary.display());
    binary
}

fn is_newer_than_sources(binary: &Path) -> bool {
    let modified = |path: &Path| path.metadata().and_then(|m| m.modified()).ok();
    let Some(built) = modified(binary) else {
        return false;
    };
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let web = std::fs::read_dir(examples.join("web")).unwrap().map(|e| e.unwrap().path());
    let newest = std::iter::once(examples.join("demo_backend.rs"))
        .chain(web)
        .filter_map(|path| modified(&path))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    built >= newest
}

/// Variables cargo sets for a test, besides `CARGO_PKG_*` and
/// `CARGO_BIN_EXE_*`.
const CARGO_SETS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process, ended when dropped, on failure too: SIGTERM first, so
/// that playwright closes its browser, then SIGKILL.
struct Running {
    name: &'static str,
    child: Child,
    /// Standard output and error, line by line.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn spawn(name: &'static str, mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(name, child.stdout.take().unwrap(), lines.clone());
        collect(name, child.stderr.take().unwrap(), lines.clone());
        Running { name, child, lines }
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`, and returns it.
    async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.output().into_iter().find(|line| line.contains(needle)) {
                return line;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("{} exited with {status}: {:?}", self.name, self.output());
            }
            assert!(Instant::now() < deadline, "{} never said {needle:?}", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit, at most `limit`.
    async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers take in the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a stream into `lines`, echoing each line to the test's output
/// (shown when the test fails).
fn collect(name: &'static str, stream: impl Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
            lines.lock().unwrap().push(line);
        }
    });
}
