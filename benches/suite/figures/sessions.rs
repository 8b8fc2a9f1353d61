//! Figure 1, sessions: one human per session, each given a limit of the
//! ramp plus the hold; the sessions open at a steady rate, are all open
//! together for the hold, and are then each cut off by the server at its
//! limit. It measures the server's memory per idle session, its CPU and
//! its ticks during the hold, and how close to its limit each session was
//! closed.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use futures::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, interval, sleep, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::suite::clients::{self, Sources, Ws};
use crate::suite::fds;
use crate::suite::prometheus::Histogram;
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{Tally, millis, percentile, thousands};

/// How long after minting, and again after the last session opened, the
/// server is left alone before its memory is read: long enough for a tick
/// or two to have run over every session.
const SETTLE: Duration = Duration::from_secs(2);

/// How long after its limit a session may still wait for its close before
/// it counts as not cut off at all.
const END_GRACE: Duration = Duration::from_secs(30);

/// A voice client's frame: 20 ms of 16 kHz mono 16-bit PCM.
const FRAME_BYTES: usize = 640;
const FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// The precision BENCHMARKS.md asks of every cut-off.
pub const CUT_OFF_TOLERANCE: Duration = Duration::from_millis(100);

pub struct Config {
    pub sessions: u64,
    /// Sessions opened per second.
    pub rate: f64,
    /// How long every session is open together with all the others.
    pub hold: Duration,
    /// Send a 640-byte frame every 20 ms in every session, and read its echo.
    pub frames: bool,
    /// Leave the server's `usage.*` messages on (the default).
    pub events: bool,
    /// How many source addresses the clients rotate through.
    pub sources: u32,
    /// The server's database file, created by the run.
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        let hold = Duration::from_secs(300);
        Config { sessions: 19_000, rate: 500.0, hold, frames: false, events: true, sources: 16, db }
    }

    pub fn small(db: PathBuf) -> Config {
        Config { sessions: 500, rate: 250.0, hold: Duration::from_secs(3), ..Config::full(db) }
    }

    /// How long opening every session takes at the rate.
    pub fn ramp(&self) -> Duration {
        Duration::from_secs_f64(self.sessions as f64 / self.rate)
    }

    /// Every human's limit: the ramp plus the hold, in whole milliseconds
    /// as the server keeps it.
    pub fn limit(&self) -> Duration {
        Duration::from_millis((self.ramp() + self.hold).as_millis() as u64)
    }

    fn path(&self, token: &str) -> String {
        let events = if self.events { "" } else { "&events=none" };
        format!("/v1/realtime/session?kind=conversational&token={token}{events}")
    }
}

/// How far from its limit sessions were cut off, from the client's view:
/// the time from the 101 response to the 4001 close frame, less the limit.
#[derive(Debug, Default)]
pub struct Precision {
    pub measured: u64,
    pub max: Duration,
    pub p99: Duration,
    pub outside_tolerance: u64,
}

pub struct SessionsReport {
    pub sessions: u64,
    pub rate: f64,
    pub hold: Duration,
    pub frames: bool,
    pub events: bool,
    pub limit: Duration,
    pub opened: u64,
    /// Open at once, as the clients counted.
    pub open_at_peak: u64,
    /// `tollgate_open_sessions` at the end of the hold.
    pub open_at_peak_server: Option<f64>,
    pub rss_before_kib: u64,
    pub rss_full_kib: u64,
    pub rss_per_session_kib: f64,
    /// The server's user and system time over the hold window, as a
    /// percentage of one core.
    pub cpu_percent: f64,
    pub window: Duration,
    pub ticks: u64,
    pub tick_p50: Option<Duration>,
    pub tick_p99: Option<Duration>,
    pub closed_at_limit: u64,
    pub cut_off: Precision,
    /// `usage.*` messages the clients read.
    pub messages: u64,
    /// Echoed frames the clients read, with `frames`.
    pub echoes: u64,
    pub errors: Tally,
}

pub async fn run(config: &Config) -> Result<SessionsReport> {
    let what = format!("{} sessions", thousands(config.sessions));
    fds::check("this process", &what, config.sessions, fds::raise_own_limit())?;
    let max_session_seconds = config.limit().as_secs() + 60;
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds };
    let server = Server::start(&options).await?;
    let server_files = server.open_files_limit()?;
    fds::check("the server", &what, config.sessions, server_files)?;

    let humans: Vec<String> = (0..config.sessions).map(|i| format!("session-{i}")).collect();
    let tokens = server.api.mint_all(&humans, config.limit().as_secs_f64()).await?;
    sleep(SETTLE).await;
    let rss_before_kib = server.rss_kib()?;

    let shared = Arc::new(Shared::new(server.addr, config));
    let (start, sessions) = open_all(&shared, config, tokens).await;
    let hold = measure_hold(&server, &shared, config, start).await?;
    // The last session may take its connect timeout to open, then wait
    // for its close and for the end of the connection.
    let ending_by = start + config.ramp() + config.limit() + END_GRACE * 3;
    let mut endings = collect(sessions, ending_by).await;
    if server.ran_out_of_files() {
        endings.push(Ending::Failed(format!(
            "the server ran out of file descriptors (it may hold {})",
            thousands(server_files)
        )));
    }
    server.stop().await?;
    Ok(report(config, rss_before_kib, hold, &endings, &shared))
}

/// What the session tasks share: where to connect and what they count.
struct Shared {
    addr: SocketAddr,
    sources: Sources,
    limit: Duration,
    frames: bool,
    opened: AtomicU64,
    open: AtomicI64,
    peak: AtomicI64,
    /// Sessions whose upgrade has succeeded or failed.
    settled: AtomicU64,
    messages: AtomicU64,
    echoes: AtomicU64,
}

impl Shared {
    fn new(addr: SocketAddr, config: &Config) -> Shared {
        Shared {
            addr,
            sources: Sources::new(config.sources),
            limit: config.limit(),
            frames: config.frames,
            opened: AtomicU64::new(0),
            open: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            settled: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
        }
    }

    fn count_open(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }
}

/// How one session ended, as its client saw it.
enum Ending {
    Closed { code: u16, reason: String, after: Duration },
    Failed(String),
}

/// Spawns one session task per token, paced at the rate; returns when the
/// last was spawned, with the instant the first was.
async fn open_all(
    shared: &Arc<Shared>,
    config: &Config,
    tokens: Vec<String>,
) -> (Instant, JoinSet<Ending>) {
    let gap = Duration::from_secs_f64(1.0 / config.rate);
    let start = Instant::now();
    let mut sessions = JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        sleep_until(start + gap.mul_f64(i as f64)).await;
        sessions.spawn(session(shared.clone(), config.path(token)));
    }
    (start, sessions)
}

async fn session(shared: Arc<Shared>, path: String) -> Ending {
    let connected = clients::connect(shared.addr, &path, &shared.sources).await;
    if connected.is_ok() {
        shared.count_open();
    }
    shared.settled.fetch_add(1, Ordering::Relaxed);
    let ws = match connected {
        Ok(ws) => ws,
        Err(failure) => return Ending::Failed(failure),
    };
    // The 101 is seen here a little after the server started metering,
    // and the close a little after it was sent: each cut-off error
    // includes the client's own delays, on a machine the clients share
    // with the server.
    let ending = follow(&shared, ws, Instant::now()).await;
    shared.open.fetch_sub(1, Ordering::Relaxed);
    ending
}

/// Reads the session until its close (sending frames meanwhile, with
/// `frames`), then finishes the closing handshake. While a frame waits to
/// be sent nothing is read, so a server that stops reading until its
/// client does would stall both; at one frame per 20 ms it never comes to
/// that.
async fn follow(shared: &Shared, ws: Ws, opened: Instant) -> Ending {
    let deadline = opened + shared.limit + END_GRACE;
    let mut frames = shared.frames.then(|| interval(FRAME_INTERVAL));
    let frame = clients::frame(FRAME_BYTES);
    let (mut sink, mut stream) = ws.split();
    loop {
        let next = tokio::select! {
            next = timeout_at(deadline, stream.next()) => next,
            _ = next_frame(&mut frames) => match sink.send(frame.clone()).await {
                Ok(()) => continue,
                Err(error) => return Ending::Failed(format!("send failed: {error}")),
            },
        };
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => return Ending::Failed(format!("read failed: {error}")),
            Ok(None) => return Ending::Failed("the connection ended without a close".into()),
            Err(_) => {
                return Ending::Failed(format!("not closed within {END_GRACE:?} of the limit"));
            }
        };
        if let Some(ending) = read(shared, &message, opened) {
            if let Ok(ws) = sink.reunite(stream) {
                clients::finish(ws).await;
            }
            return ending;
        }
    }
}

/// Waits for the next frame to send, or forever without frames.
async fn next_frame(frames: &mut Option<Interval>) {
    match frames {
        Some(frames) => drop(frames.tick().await),
        None => std::future::pending().await,
    }
}

/// Counts a message; the ending, when it is the close.
fn read(shared: &Shared, message: &Message, opened: Instant) -> Option<Ending> {
    match message {
        Message::Text(_) => drop(shared.messages.fetch_add(1, Ordering::Relaxed)),
        Message::Binary(data) if data.len() == FRAME_BYTES => {
            shared.echoes.fetch_add(1, Ordering::Relaxed);
        }
        Message::Binary(data) => return Some(Ending::Failed(format!("{}-byte echo", data.len()))),
        Message::Close(_) => {
            let (code, reason) = clients::close_of(message).unwrap_or((1005, String::new()));
            return Some(Ending::Closed { code, reason, after: opened.elapsed() });
        }
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
    }
    None
}

/// What the hold showed: memory at full load, CPU over the window, and
/// the ticks that ran in it.
struct Hold {
    rss_full_kib: u64,
    window: Duration,
    cpu: Duration,
    ticks: Histogram,
    open_gauge: Option<f64>,
}

/// Waits until every upgrade has settled and the server with it, then
/// measures until just before the first session's limit.
async fn measure_hold(
    server: &Server,
    shared: &Shared,
    config: &Config,
    start: Instant,
) -> Result<Hold> {
    let first_cut_off = start + config.limit();
    let end = first_cut_off - (config.hold / 10).min(Duration::from_secs(1));
    wait_until_settled(shared, config.sessions, end).await;
    sleep((config.hold / 4).min(SETTLE)).await;

    let rss_full_kib = server.rss_kib()?;
    let early = server.api.scrape().await?;
    let (cpu_early, at_early) = (server.cpu_time()?, Instant::now());
    if at_early >= end {
        bail!("the sessions opened too slowly: no time of the hold was left to measure");
    }
    sleep_until(end).await;
    let (cpu_late, at_late) = (server.cpu_time()?, Instant::now());
    let late = server.api.scrape().await?;

    let open_sessions = r#"tollgate_open_sessions{kind="conversational"}"#;
    let ticks =
        late.histogram("tollgate_tick_seconds").since(&early.histogram("tollgate_tick_seconds"));
    Ok(Hold {
        rss_full_kib,
        window: at_late - at_early,
        cpu: cpu_late.saturating_sub(cpu_early),
        ticks,
        open_gauge: late.value(open_sessions),
    })
}

async fn wait_until_settled(shared: &Shared, sessions: u64, deadline: Instant) {
    while shared.settled.load(Ordering::Relaxed) < sessions && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
}

/// Every session's ending. Each task ends by itself; one that has not by
/// `deadline` is aborted and counted as a failure.
async fn collect(mut sessions: JoinSet<Ending>, deadline: Instant) -> Vec<Ending> {
    let mut endings = Vec::with_capacity(sessions.len());
    while let Ok(Some(joined)) = timeout_at(deadline, sessions.join_next()).await {
        endings.push(joined.unwrap_or_else(|error| Ending::Failed(format!("task: {error}"))));
    }
    for _ in 0..sessions.len() {
        endings.push(Ending::Failed("the session never ended".into()));
    }
    sessions.abort_all();
    endings
}

fn report(
    config: &Config,
    rss_before_kib: u64,
    hold: Hold,
    endings: &[Ending],
    shared: &Shared,
) -> SessionsReport {
    let (closed_at_limit, cut_off, errors) = judge(endings, config.limit());
    let growth = hold.rss_full_kib as f64 - rss_before_kib as f64;
    let ticks = hold.ticks.quantile(0.5).zip(hold.ticks.quantile(0.99));
    SessionsReport {
        sessions: config.sessions,
        rate: config.rate,
        hold: config.hold,
        frames: config.frames,
        events: config.events,
        limit: config.limit(),
        opened: shared.opened.load(Ordering::Relaxed),
        open_at_peak: shared.peak.load(Ordering::Relaxed).max(0) as u64,
        open_at_peak_server: hold.open_gauge,
        rss_before_kib,
        rss_full_kib: hold.rss_full_kib,
        rss_per_session_kib: growth / config.sessions as f64,
        cpu_percent: 100.0 * hold.cpu.as_secs_f64() / hold.window.as_secs_f64(),
        window: hold.window,
        ticks: hold.ticks.count.max(0.0) as u64,
        tick_p50: ticks.map(|(p50, _)| Duration::from_secs_f64(p50)),
        tick_p99: ticks.map(|(_, p99)| Duration::from_secs_f64(p99)),
        closed_at_limit,
        cut_off,
        messages: shared.messages.load(Ordering::Relaxed),
        echoes: shared.echoes.load(Ordering::Relaxed),
        errors,
    }
}

/// Sessions closed with 4001 at their limit, how precisely, and every
/// other ending as an error.
fn judge(endings: &[Ending], limit: Duration) -> (u64, Precision, Tally) {
    let mut errors = Tally::default();
    let mut misses = Vec::new();
    for ending in endings {
        match ending {
            Ending::Closed { code: 4001, reason, after } if reason == "usage_limit_exceeded" => {
                misses.push(after.abs_diff(limit));
            }
            Ending::Closed { code, reason, .. } => {
                errors.add(format!("closed with {code} {reason}"))
            }
            Ending::Failed(why) => errors.add(why.clone()),
        }
    }
    misses.sort_unstable();
    let precision = Precision {
        measured: misses.len() as u64,
        max: misses.last().copied().unwrap_or_default(),
        p99: percentile(&misses, 0.99),
        outside_tolerance: misses.iter().filter(|miss| **miss > CUT_OFF_TOLERANCE).count() as u64,
    };
    (misses.len() as u64, precision, errors)
}

impl fmt::Display for SessionsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = if self.frames { "a 640-byte frame every 20 ms" } else { "idle" };
        let events = if self.events { "usage messages on" } else { "events=none" };
        writeln!(
            f,
            "sessions: {} at {}/s, held {:?}, {load}, {events}",
            thousands(self.sessions),
            self.rate,
            self.hold
        )?;
        writeln!(f, "  limit per session        {:.3} s", self.limit.as_secs_f64())?;
        writeln!(f, "  opened                   {}", thousands(self.opened))?;
        let gauge = self.open_at_peak_server.map_or("-".into(), |open| format!("{open}"));
        writeln!(
            f,
            "  open at peak             {} (server: {gauge})",
            thousands(self.open_at_peak)
        )?;
        writeln!(
            f,
            "  server RSS               {} KiB before, {} KiB at full load",
            thousands(self.rss_before_kib),
            thousands(self.rss_full_kib)
        )?;
        writeln!(f, "  RSS growth per session   {:.2} KiB", self.rss_per_session_kib)?;
        writeln!(
            f,
            "  server CPU in the hold   {:.2} % of one core over {:.1} s",
            self.cpu_percent,
            self.window.as_secs_f64()
        )?;
        let tick = |quantile: Option<Duration>| {
            quantile.map_or("-".into(), |d| format!("{:.2} ms", millis(d)))
        };
        writeln!(
            f,
            "  ticks in the window      {}: p50 {}, p99 {}",
            self.ticks,
            tick(self.tick_p50),
            tick(self.tick_p99)
        )?;
        writeln!(f, "  closed with 4001         {}", thousands(self.closed_at_limit))?;
        let precision = &self.cut_off;
        writeln!(
            f,
            "  cut-off error            max {:.1} ms, p99 {:.1} ms, {} beyond 100 ms",
            millis(precision.max),
            millis(precision.p99),
            thousands(precision.outside_tolerance)
        )?;
        writeln!(f, "  usage messages read      {}", thousands(self.messages))?;
        if self.frames {
            writeln!(f, "  echoes read              {}", thousands(self.echoes))?;
        }
        write!(f, "  errors                   {}", self.errors)
    }
}
