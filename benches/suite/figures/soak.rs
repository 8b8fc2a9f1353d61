//! The soak: for a long while (an hour at full size), a fixed number of
//! clients each mint a token, open a session, and end it, over and over:
//! every other session is closed by its client after a while, the rest run
//! out of their seconds and are cut off by the server with 4001. The
//! server's memory is read under load early in the run and again at its
//! end, and its open files before the load (after a short warm-up, which
//! opens what the server opens only once: its database's log on each
//! connection, say) and once it has settled after; a server that leaks
//! either shows it here.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::suite::api::Api;
use crate::suite::clients::{self, Sources, Ws};
use crate::suite::fds;
use crate::suite::procfs;
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{Tally, thousands};

/// The shortest and longest a session lasts; each client walks through
/// the range so that ends are spread rather than in step.
const SHORTEST: Duration = Duration::from_millis(200);
const LONGEST: Duration = Duration::from_millis(2000);

/// Seconds of a human whose session its client closes: far more than it
/// lasts, so that it is never cut off.
const PLENTY_OF_SECONDS: f64 = 3600.0;

/// How long a cut-off may come after its limit before the client counts it
/// as missed: the figure is leaks, not precision.
const CUT_OFF_GRACE: Duration = Duration::from_secs(5);

/// How long the server rests after the warm-up before its open files are
/// counted: longer than its checkpoints' interval, so that every
/// connection to the database has opened its log.
const REST: Duration = Duration::from_secs(2);

/// How long the server is given, once the load stops, to close what its
/// clients left (keep-alive HTTP connections, sessions in their closing
/// handshake) before its open files are counted.
const SETTLE: Duration = Duration::from_secs(10);

pub struct Config {
    /// Clients, each with one session open at a time.
    pub clients: usize,
    /// The same load, before the run, not measured.
    pub warm_up: Duration,
    pub duration: Duration,
    /// The share of the run after which memory is first read: what the
    /// server holds once its caches and pools have grown to the load.
    pub warm_share: f64,
    pub sources: u32,
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        let (warm_up, duration) = (Duration::from_secs(30), Duration::from_secs(3600));
        Config { clients: 2000, warm_up, duration, warm_share: 0.1, sources: 64, db }
    }

    pub fn small(db: PathBuf) -> Config {
        let (warm_up, duration) = (Duration::from_secs(2), Duration::from_secs(6));
        Config { clients: 50, warm_up, duration, ..Config::full(db) }
    }
}

/// How the sessions of one client, or of all, ended.
#[derive(Debug, Default)]
pub struct Ends {
    pub closed_by_client: u64,
    pub cut_off: u64,
    pub errors: Tally,
}

impl Ends {
    fn merge(&mut self, other: Ends) {
        self.closed_by_client += other.closed_by_client;
        self.cut_off += other.cut_off;
        self.errors.merge(other.errors);
    }

    pub fn sessions(&self) -> u64 {
        self.closed_by_client + self.cut_off
    }
}

pub struct SoakReport {
    pub clients: usize,
    pub duration: Duration,
    /// The sessions of the warm-up, and of the run.
    pub warm_up: Ends,
    pub ends: Ends,
    /// Resident memory under load, early in the run and at its end.
    pub rss_warm_kib: u64,
    pub rss_end_kib: u64,
    /// Open files before the load and once the server has settled after.
    pub fds_before: u64,
    pub fds_after: u64,
    /// The largest the database's write-ahead log was seen during the run,
    /// read once a second: a log that is never emptied grows with the load.
    pub wal_largest_bytes: u64,
}

impl SoakReport {
    /// Growth of resident memory under the same load, as a share of what
    /// it was early on.
    pub fn rss_growth(&self) -> f64 {
        (self.rss_end_kib as f64 - self.rss_warm_kib as f64) / self.rss_warm_kib as f64
    }
}

pub async fn run(config: &Config) -> Result<SoakReport> {
    let what = format!("{} soak clients", config.clients);
    fds::check("this process", &what, config.clients as u64, fds::raise_own_limit())?;
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds: 3600 };
    let server = Server::start(&options).await?;
    fds::check("the server", &what, 2 * config.clients as u64, server.open_files_limit()?)?;
    let warm_up = load(server.addr, server.api.fresh()?, config, config.warm_up).await;
    if !warm_up.errors.is_empty() {
        anyhow::bail!("the warm-up went wrong: {}", warm_up.errors);
    }
    sleep(REST).await;
    let fds_before = procfs::open_fds(server.pid)?;

    let started = Instant::now();
    let memory = async {
        sleep(config.duration.mul_f64(config.warm_share)).await;
        let warm = server.rss_kib()?;
        sleep(config.duration.saturating_sub(started.elapsed())).await;
        anyhow::Ok((warm, server.rss_kib()?))
    };
    let run = load(server.addr, server.api.fresh()?, config, config.duration);
    let wal = largest_wal(&config.db, started + config.duration);
    let (ends, memory, wal_largest_bytes) = tokio::join!(run, memory, wal);
    let (rss_warm_kib, rss_end_kib) = memory?;

    let fds_after = settled_fds(&server, fds_before).await?;
    server.stop().await?;
    let (clients, duration) = (config.clients, config.duration);
    Ok(SoakReport {
        clients,
        duration,
        warm_up,
        ends,
        rss_warm_kib,
        rss_end_kib,
        fds_before,
        fds_after,
        wal_largest_bytes,
    })
}

/// The largest size of the write-ahead log beside `db`, read every second
/// until `until`.
async fn largest_wal(db: &Path, until: Instant) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let mut largest = 0;
    while Instant::now() < until {
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        sleep(Duration::from_secs(1)).await;
    }
    largest
}

/// The server's open files once they are back to what they were before
/// the load, or after [`SETTLE`] if they never are.
async fn settled_fds(server: &Server, before: u64) -> Result<u64> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = procfs::open_fds(server.pid)?;
        if now <= before || Instant::now() > deadline {
            return Ok(now);
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the clients for `duration`; the API client they mint with is
/// dropped at the end, closing its keep-alive connections.
async fn load(addr: SocketAddr, api: Api, config: &Config, duration: Duration) -> Ends {
    let sources = Arc::new(Sources::new(config.sources));
    let deadline = Instant::now() + duration;
    let tasks = (0..config.clients).map(|index| {
        let client = Client { index, addr, api: api.clone(), sources: sources.clone() };
        tokio::spawn(client.run(deadline))
    });
    let mut ends = Ends::default();
    for joined in futures::future::join_all(tasks).await {
        match joined {
            Ok(theirs) => ends.merge(theirs),
            Err(error) => ends.errors.add(format!("task: {error}")),
        }
    }
    ends
}

struct Client {
    index: usize,
    addr: SocketAddr,
    api: Api,
    sources: Arc<Sources>,
}

impl Client {
    /// Sessions one after another until the deadline: odd turns run out of
    /// their seconds, even ones are closed by the client.
    async fn run(self, deadline: Instant) -> Ends {
        let mut ends = Ends::default();
        let mut turn = 0;
        while Instant::now() < deadline {
            let lasts = self.length(turn);
            let result =
                if turn % 2 == 1 { self.cut_off(lasts).await } else { self.close(lasts).await };
            match result {
                Ok(()) if turn % 2 == 1 => ends.cut_off += 1,
                Ok(()) => ends.closed_by_client += 1,
                Err(failure) => ends.errors.add(failure),
            }
            turn += 1;
        }
        ends
    }

    /// The length of this client's session of `turn`, walking through
    /// [SHORTEST, LONGEST] in ten steps from a start of its own.
    fn length(&self, turn: usize) -> Duration {
        let step = (self.index + turn * 3) % 10;
        SHORTEST + (LONGEST - SHORTEST).mul_f64(step as f64 / 9.0)
    }

    async fn open(&self, seconds: f64) -> Result<Ws, String> {
        let human = format!("soak-{}", self.index);
        let token = self.api.mint(&human, seconds).await.map_err(|error| format!("{error:#}"))?;
        let path = format!("/v1/realtime/session?kind=conversational&token={token}");
        clients::connect(self.addr, &path, &self.sources).await
    }

    /// A session with `lasts` of seconds, read until the server cuts it off.
    async fn cut_off(&self, lasts: Duration) -> Result<(), String> {
        let mut ws = self.open(lasts.as_secs_f64()).await?;
        match timeout(lasts + CUT_OFF_GRACE, next_close(&mut ws)).await {
            Ok(Some((4001, _))) => {
                clients::finish(ws).await;
                Ok(())
            }
            Ok(other) => Err(format!("ended with {other:?} rather than 4001")),
            Err(_) => Err("not cut off at its limit".into()),
        }
    }

    /// A session of plenty of seconds, read for `lasts` and then closed.
    async fn close(&self, lasts: Duration) -> Result<(), String> {
        let mut ws = self.open(PLENTY_OF_SECONDS).await?;
        if let Ok(closed) = timeout(lasts, next_close(&mut ws)).await {
            return Err(format!("closed by the server with {closed:?}"));
        }
        clients::close(ws).await
    }
}

/// Reads the session's messages until its close frame (its code and
/// reason) or the end of the connection (`None`).
async fn next_close(ws: &mut Ws) -> Option<(u16, String)> {
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Close(_) = message {
            return clients::close_of(&message);
        }
    }
    None
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak: {} clients for {:?}", self.clients, self.duration)?;
        writeln!(
            f,
            "  sessions  {} ({} closed by their client, {} cut off at their limit); errors: {}",
            thousands(self.ends.sessions()),
            thousands(self.ends.closed_by_client),
            thousands(self.ends.cut_off),
            self.ends.errors
        )?;
        writeln!(
            f,
            "  memory    {} KiB under load early on, {} KiB at the end ({:+.1} %)",
            thousands(self.rss_warm_kib),
            thousands(self.rss_end_kib),
            100.0 * self.rss_growth()
        )?;
        writeln!(
            f,
            "  files     {} open before the load, {} once it settled",
            self.fds_before, self.fds_after
        )?;
        let mib = self.wal_largest_bytes as f64 / (1024.0 * 1024.0);
        write!(f, "  log       the database's write-ahead log at most {mib:.1} MiB")
    }
}
