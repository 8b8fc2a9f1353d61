//! Figure 1, sessions: one human per session, each given a limit of the
//! ramp plus the hold; the sessions open at a steady rate, are all open
//! together for the hold, and are then each cut off by the server at its
//! limit. It measures the server's memory per idle session, its CPU and
//! its ticks during the hold, and how close to its limit each session was
//! closed.
//!
//! What the pair figure shares with it is public here: opening sessions
//! at a pace on any server, following each to its close, measuring
//! servers over the hold, and judging each cut-off against the instant it
//! was due.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use futures::{SinkExt, StreamExt};
use tokio::task::{Id, JoinSet};
use tokio::time::{Instant, Interval, interval, sleep, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::suite::clients::{self, Sources, Ws};
use crate::suite::fds;
use crate::suite::prometheus::{Histogram, Scrape};
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{Tally, millis, percentile, thousands};

/// How long after minting, and again after the last session opened, the
/// server is left alone before its memory is read: long enough for a tick
/// or two to have run over every session.
pub const SETTLE: Duration = Duration::from_secs(2);

/// How long after its limit a session may still wait for its close before
/// it counts as not cut off at all.
pub const END_GRACE: Duration = Duration::from_secs(30);

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
}

/// The path that opens a conversational session with `token`, with the
/// server's `usage.*` messages on or off.
pub fn path(token: &str, events: bool) -> String {
    let events = if events { "" } else { "&events=none" };
    format!("/v1/realtime/session?kind=conversational&token={token}{events}")
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

/// What one server showed over the hold.
#[derive(Debug)]
pub struct ServerFigures {
    /// The sessions it held.
    pub sessions: u64,
    /// `tollgate_open_sessions` at the end of the hold.
    pub open_at_peak: Option<f64>,
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
    pub server: ServerFigures,
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
    check_files(&server, &what, config.sessions)?;

    let humans: Vec<String> = (0..config.sessions).map(|i| format!("session-{i}")).collect();
    let tokens = server.api.mint_all(&humans, config.limit().as_secs_f64()).await?;
    sleep(SETTLE).await;
    let rss_before_kib = server.rss_kib()?;

    let shared = Arc::new(Shared::new(config.sources, config.limit(), config.frames));
    let targets = tokens.iter().map(|token| (server.addr, path(token, config.events)));
    let (start, sessions) = open_all(&shared, config.rate, targets).await;
    let first_cut_off = start + config.limit();
    let window = Window { sessions: config.sessions, hold: config.hold, first_cut_off };
    let (holds, _) = measure_hold(&[&server], &shared, window, async || Ok(())).await?;
    let ending_by = ending_by(start, config.ramp(), config.limit());
    let mut endings = collect(sessions, ending_by).await;
    endings.extend(out_of_files(&server).map(Ending::Failed));
    server.stop().await?;
    let server = ServerFigures::of(&holds[0], rss_before_kib, config.sessions);
    Ok(report(config, server, &endings, &shared))
}

/// Stops before a run in which `server` could not hold `sessions` sockets.
pub fn check_files(server: &Server, what: &str, sessions: u64) -> Result<()> {
    fds::check("the server", what, sessions, server.open_files_limit()?)
}

/// The instant by which every session must have ended: the last may take
/// its connect timeout to open, then wait for its close and for the end
/// of the connection.
pub fn ending_by(start: Instant, ramp: Duration, limit: Duration) -> Instant {
    start + ramp + limit + END_GRACE * 3
}

/// An error of the run if `server` ran out of file descriptors.
pub fn out_of_files(server: &Server) -> Option<String> {
    let limit = || server.open_files_limit().map_or("?".into(), thousands);
    let error = || format!("the server ran out of file descriptors (it may hold {})", limit());
    server.ran_out_of_files().then(error)
}

/// What the session tasks share: their source addresses, how they behave
/// and what they count.
pub struct Shared {
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
    /// `limit` is the longest any session may take to be cut off.
    pub fn new(sources: u32, limit: Duration, frames: bool) -> Shared {
        Shared {
            sources: Sources::new(sources),
            limit,
            frames,
            opened: AtomicU64::new(0),
            open: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            settled: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
        }
    }

    /// Sessions whose upgrade succeeded.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The most that were open at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed).max(0) as u64
    }

    /// `usage.*` messages read.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    fn count_open(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }
}

/// How one session ended, as its client saw it: closed by the server,
/// with the instants of its 101 and of the close frame, or otherwise.
pub enum Ending {
    Closed { code: u16, reason: String, opened: Instant, at: Instant },
    Failed(String),
}

/// The session tasks, each known by its number in the order they were
/// opened; aborted if this is dropped.
pub struct Sessions {
    tasks: JoinSet<Ending>,
    numbers: HashMap<Id, usize>,
}

/// Spawns one session task for each server and path, paced at `rate` a
/// second; returns when the last was spawned, with the instant the first
/// was.
pub async fn open_all(
    shared: &Arc<Shared>,
    rate: f64,
    targets: impl Iterator<Item = (SocketAddr, String)>,
) -> (Instant, Sessions) {
    let gap = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut sessions = Sessions { tasks: JoinSet::new(), numbers: HashMap::new() };
    for (i, (addr, path)) in targets.enumerate() {
        sleep_until(start + gap.mul_f64(i as f64)).await;
        let task = sessions.tasks.spawn(session(shared.clone(), addr, path));
        sessions.numbers.insert(task.id(), i);
    }
    (start, sessions)
}

async fn session(shared: Arc<Shared>, addr: SocketAddr, path: String) -> Ending {
    let connected = clients::connect(addr, &path, &shared.sources).await;
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
            return Some(Ending::Closed { code, reason, opened, at: Instant::now() });
        }
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
    }
    None
}

/// What one server showed in the hold: memory at full load, CPU over the
/// window, and the ticks that ran in it.
pub struct Hold {
    rss_full_kib: u64,
    window: Duration,
    cpu: Duration,
    ticks: Histogram,
    open_gauge: Option<f64>,
}

/// What places the window measured in the hold: it opens once the
/// sessions have all settled (or are out of time), and ends just before
/// the first cut-off.
#[derive(Clone, Copy)]
pub struct Window {
    pub sessions: u64,
    pub hold: Duration,
    pub first_cut_off: Instant,
}

/// Waits until every upgrade has settled and the servers with it, then
/// measures each of `servers` until just before the first cut-off; and
/// whatever else `read` reads (the database, say), at the same two
/// instants.
pub async fn measure_hold<T>(
    servers: &[&Server],
    shared: &Shared,
    window: Window,
    read: impl AsyncFn() -> Result<T>,
) -> Result<(Vec<Hold>, (T, T))> {
    let end = window.first_cut_off - (window.hold / 10).min(Duration::from_secs(1));
    wait_until_settled(shared, window.sessions, end).await;
    sleep((window.hold / 4).min(SETTLE)).await;

    let mut full = Vec::with_capacity(servers.len());
    for server in servers {
        full.push(server.rss_kib()?);
    }
    let (early, read_early) = (readings(servers).await?, read().await?);
    if Instant::now() >= end {
        bail!("the sessions opened too slowly: no time of the hold was left to measure");
    }
    sleep_until(end).await;
    let (late, read_late) = (readings(servers).await?, read().await?);

    let holds = full.into_iter().zip(early.iter().zip(&late));
    let holds = holds.map(|(rss_full_kib, (early, late))| Hold::between(rss_full_kib, early, late));
    Ok((holds.collect(), (read_early, read_late)))
}

/// A server's CPU time and metrics at an instant. The scrape follows the
/// CPU time, so one scrape's work falls within the window.
struct Reading {
    at: Instant,
    cpu: Duration,
    scrape: Scrape,
}

async fn readings(servers: &[&Server]) -> Result<Vec<Reading>> {
    let mut readings = Vec::with_capacity(servers.len());
    for server in servers {
        let (cpu, at) = (server.cpu_time()?, Instant::now());
        readings.push(Reading { at, cpu, scrape: server.api.scrape().await? });
    }
    Ok(readings)
}

impl Hold {
    fn between(rss_full_kib: u64, early: &Reading, late: &Reading) -> Hold {
        let open_sessions = r#"tollgate_open_sessions{kind="conversational"}"#;
        let ticks = |reading: &Reading| reading.scrape.histogram("tollgate_tick_seconds");
        Hold {
            rss_full_kib,
            window: late.at - early.at,
            cpu: late.cpu.saturating_sub(early.cpu),
            ticks: ticks(late).since(&ticks(early)),
            open_gauge: late.scrape.value(open_sessions),
        }
    }
}

async fn wait_until_settled(shared: &Shared, sessions: u64, deadline: Instant) {
    while shared.settled.load(Ordering::Relaxed) < sessions && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
}

/// Every session's ending, by its number. Each task ends by itself; one
/// that has not by `deadline` is aborted and counted as a failure.
pub async fn collect(mut sessions: Sessions, deadline: Instant) -> Vec<Ending> {
    let mut endings: Vec<Option<Ending>> = (0..sessions.numbers.len()).map(|_| None).collect();
    while let Ok(Some(joined)) = timeout_at(deadline, sessions.tasks.join_next_with_id()).await {
        let (id, ending) =
            joined.unwrap_or_else(|error| (error.id(), Ending::Failed(format!("task: {error}"))));
        endings[sessions.numbers[&id]] = Some(ending);
    }
    sessions.tasks.abort_all();
    let never = || Ending::Failed("the session never ended".into());
    endings.into_iter().map(|ending| ending.unwrap_or_else(never)).collect()
}

fn report(
    config: &Config,
    server: ServerFigures,
    endings: &[Ending],
    shared: &Shared,
) -> SessionsReport {
    let due = |_, opened| opened + config.limit();
    let (closed_at_limit, cut_off, errors) = judge(endings.iter().enumerate(), due);
    SessionsReport {
        sessions: config.sessions,
        rate: config.rate,
        hold: config.hold,
        frames: config.frames,
        events: config.events,
        limit: config.limit(),
        opened: shared.opened(),
        open_at_peak: shared.peak(),
        server,
        closed_at_limit,
        cut_off,
        messages: shared.messages(),
        echoes: shared.echoes.load(Ordering::Relaxed),
        errors,
    }
}

impl ServerFigures {
    /// The figures of a server that held `sessions` of them.
    pub fn of(hold: &Hold, rss_before_kib: u64, sessions: u64) -> ServerFigures {
        let growth = hold.rss_full_kib as f64 - rss_before_kib as f64;
        let ticks = hold.ticks.quantile(0.5).zip(hold.ticks.quantile(0.99));
        ServerFigures {
            sessions,
            open_at_peak: hold.open_gauge,
            rss_before_kib,
            rss_full_kib: hold.rss_full_kib,
            rss_per_session_kib: growth / sessions as f64,
            cpu_percent: 100.0 * hold.cpu.as_secs_f64() / hold.window.as_secs_f64(),
            window: hold.window,
            ticks: hold.ticks.count.max(0.0) as u64,
            tick_p50: ticks.map(|(p50, _)| Duration::from_secs_f64(p50)),
            tick_p99: ticks.map(|(_, p99)| Duration::from_secs_f64(p99)),
        }
    }
}

/// Of the sessions given by number, those closed with 4001, how far from
/// the instant each was due to be (`due` of its number and its 101), and
/// every other ending as an error.
pub fn judge<'a>(
    endings: impl Iterator<Item = (usize, &'a Ending)>,
    due: impl Fn(usize, Instant) -> Instant,
) -> (u64, Precision, Tally) {
    let mut errors = Tally::default();
    let mut misses = Vec::new();
    for (number, ending) in endings {
        match ending {
            Ending::Closed { code: 4001, reason, opened, at }
                if reason == "usage_limit_exceeded" =>
            {
                let due = due(number, *opened);
                misses.push(due.max(*at) - due.min(*at));
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
        let gauge = self.server.open_at_peak.map_or("-".into(), |open| format!("{open}"));
        writeln!(
            f,
            "  open at peak             {} (server: {gauge})",
            thousands(self.open_at_peak)
        )?;
        write!(f, "{}", self.server)?;
        writeln!(f, "  closed with 4001         {}", thousands(self.closed_at_limit))?;
        writeln!(f, "  cut-off error            {}", self.cut_off)?;
        writeln!(f, "  usage messages read      {}", thousands(self.messages))?;
        if self.frames {
            writeln!(f, "  echoes read              {}", thousands(self.echoes))?;
        }
        write!(f, "  errors                   {}", self.errors)
    }
}

/// The column where the figures of a report's lines start.
const FIGURE_COLUMN: usize = 27;

/// Four lines, each indented by the width asked for (two spaces unless
/// told), the figures in the column of the report's other lines.
impl fmt::Display for ServerFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let indent = f.width().unwrap_or(2);
        let mut line = |label: &str, figure: String| {
            writeln!(f, "{:indent$}{label:<width$}{figure}", "", width = FIGURE_COLUMN - indent)
        };
        let (before, full) = (thousands(self.rss_before_kib), thousands(self.rss_full_kib));
        line("server RSS", format!("{before} KiB before, {full} KiB at full load"))?;
        line("RSS growth per session", format!("{:.2} KiB", self.rss_per_session_kib))?;
        let window = self.window.as_secs_f64();
        let cpu = format!("{:.2} % of one core over {window:.1} s", self.cpu_percent);
        line("server CPU in the hold", cpu)?;
        let tick = |quantile: Option<Duration>| {
            quantile.map_or("-".into(), |d| format!("{:.2} ms", millis(d)))
        };
        let ticks =
            format!("{}: p50 {}, p99 {}", self.ticks, tick(self.tick_p50), tick(self.tick_p99));
        line("ticks in the window", ticks)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max {:.1} ms, p99 {:.1} ms, {} beyond 100 ms",
            millis(self.max),
            millis(self.p99),
            thousands(self.outside_tolerance)
        )
    }
}
