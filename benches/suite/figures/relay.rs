//! Figure 3, relay: echo sessions that each send 640-byte binary frames
//! as fast as their window allows (a fixed number of frames sent and not
//! yet echoed), against Tollgate with `events=none` and against the
//! baseline; what counts is echoes read per second.
//!
//! On two cores shared with the clients, one stretch of either side's
//! figure moves by several points from one run to the next, more than the
//! gap it is to measure. So both servers stay up while the sides take
//! turns, after a warm-up of each that is not counted, for an even number
//! of rounds, the one going first alternating so that each goes first as
//! often; the figure is the median of the rounds' ratios, reported with
//! their spread: a disturbance during one round moves that round only, and
//! a drift of the machine over the run reaches both sides alike. The
//! spread says how far one run's median can be trusted; it has been wide
//! (BENCHMARKS.md).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use futures::future::join_all;
use futures::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::suite::baseline::Baseline;
use crate::suite::clients::{self, Sources, Ws};
use crate::suite::fds;
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{self, Tally, thousands};

/// A voice client's frame: 20 ms of 16 kHz mono 16-bit PCM.
const FRAME_BYTES: usize = 640;

/// How long an echo may take before the session counts as stuck.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

const PLENTY_OF_SECONDS: f64 = 1e6;

/// How long each side runs before the rounds, uncounted: the first stretch
/// of a run, with caches, allocators and the kernel's socket buffers cold,
/// would otherwise always be the baseline's.
const WARM_UP: Duration = Duration::from_secs(1);

pub struct Config {
    pub sessions: usize,
    /// How long each side runs in each round.
    pub duration: Duration,
    pub rounds: usize,
    /// Frames a session may have sent and not yet seen echoed.
    pub window: usize,
    pub sources: u32,
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        let duration = Duration::from_secs(5);
        Config { sessions: 100, duration, rounds: 8, window: 16, sources: 4, db }
    }

    pub fn small(db: PathBuf) -> Config {
        Config { duration: Duration::from_secs(1), rounds: 2, ..Config::full(db) }
    }
}

/// One side's figures, over one round or summed over all of them.
#[derive(Debug, Default)]
pub struct Side {
    /// Echoes read within the duration, over every session.
    pub echoes: u64,
    pub per_second: f64,
    pub errors: Tally,
}

impl Side {
    /// The sum of `rounds`, each of which ran for `duration`.
    fn total(rounds: Vec<Side>, duration: Duration) -> Side {
        let mut total = Side::default();
        let seconds = duration.as_secs_f64() * rounds.len() as f64;
        for round in rounds {
            total.echoes += round.echoes;
            total.errors.merge(round.errors);
        }
        total.per_second = total.echoes as f64 / seconds;
        total
    }
}

pub struct RelayReport {
    pub sessions: usize,
    pub duration: Duration,
    pub window: usize,
    /// Summed over the rounds.
    pub tollgate: Side,
    pub baseline: Side,
    /// Each round's Tollgate messages per second as a share of the
    /// baseline's, in the order run.
    pub rounds: Vec<f64>,
}

impl RelayReport {
    /// Tollgate's messages per second as a share of the baseline's: the
    /// median of the rounds'.
    pub fn ratio(&self) -> f64 {
        stats::median(&self.rounds)
    }

    /// The lowest and the highest of the rounds' ratios.
    pub fn spread(&self) -> (f64, f64) {
        stats::spread(&self.rounds)
    }
}

pub async fn run(config: &Config) -> Result<RelayReport> {
    let what = format!("{} relay sessions", config.sessions);
    let sockets = 2 * config.sessions as u64;
    fds::check("this process", &what, sockets, fds::raise_own_limit())?;
    anyhow::ensure!(
        config.rounds > 0 && config.rounds.is_multiple_of(2),
        "the relay takes an even number of rounds, so that each side goes first as often"
    );
    let baseline = Baseline::start()?;
    let baseline_paths = vec!["/".to_owned(); config.sessions];
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds: 3600 };
    let server = Server::start(&options).await?;
    let tollgate_paths = tollgate_paths(&server, config.sessions).await?;
    let warm_baseline = load(baseline.addr(), &baseline_paths, config, WARM_UP).await;
    let warm_tollgate = load(server.addr, &tollgate_paths, config, WARM_UP).await;
    let (mut ours, mut theirs, mut rounds) = (Vec::new(), Vec::new(), Vec::new());
    let duration = config.duration;
    for round in 0..config.rounds {
        let (tollgate, baseline) = if round % 2 == 0 {
            let baseline = load(baseline.addr(), &baseline_paths, config, duration).await;
            (load(server.addr, &tollgate_paths, config, duration).await, baseline)
        } else {
            let tollgate = load(server.addr, &tollgate_paths, config, duration).await;
            (tollgate, load(baseline.addr(), &baseline_paths, config, duration).await)
        };
        rounds.push(tollgate.per_second / baseline.per_second);
        ours.push(tollgate);
        theirs.push(baseline);
    }
    server.stop().await?;
    let (sessions, window) = (config.sessions, config.window);
    // The warm-up's echoes are not counted, its errors are.
    let mut tollgate = Side::total(ours, duration);
    tollgate.errors.merge(warm_tollgate.errors);
    let mut baseline = Side::total(theirs, duration);
    baseline.errors.merge(warm_baseline.errors);
    Ok(RelayReport { sessions, duration, window, tollgate, baseline, rounds })
}

/// A token for each of `sessions` humans, in the path of an echo session.
async fn tollgate_paths(server: &Server, sessions: usize) -> Result<Vec<String>> {
    let humans: Vec<String> = (0..sessions).map(|i| format!("relay-{i}")).collect();
    let tokens = server.api.mint_all(&humans, PLENTY_OF_SECONDS).await?;
    let path =
        |token| format!("/v1/realtime/session?kind=conversational&token={token}&events=none");
    Ok(tokens.iter().map(path).collect())
}

/// Opens every session first, then pumps them all for the duration.
async fn load(addr: SocketAddr, paths: &[String], config: &Config, duration: Duration) -> Side {
    let sources = Sources::new(config.sources);
    let connects = paths.iter().map(|path| clients::connect(addr, path, &sources));
    let mut errors = Tally::default();
    let mut open = Vec::new();
    for connected in join_all(connects).await {
        match connected {
            Ok(ws) => open.push(ws),
            Err(failure) => errors.add(failure),
        }
    }
    let deadline = Instant::now() + duration;
    let pumps = open.into_iter().map(|ws| tokio::spawn(pump(ws, config.window, deadline)));
    let mut echoes = 0;
    for joined in join_all(pumps).await {
        match joined {
            Ok(Ok(echoed)) => echoes += echoed,
            Ok(Err(failure)) => errors.add(failure),
            Err(error) => errors.add(format!("task: {error}")),
        }
    }
    Side { echoes, per_second: echoes as f64 / duration.as_secs_f64(), errors }
}

/// Keeps `window` frames unanswered until the deadline, then waits for
/// the last echoes and closes; returns the echoes read before the deadline.
async fn pump(mut ws: Ws, window: usize, deadline: Instant) -> Result<u64, String> {
    let frame = clients::frame(FRAME_BYTES);
    let (mut unanswered, mut echoed) = (0, 0);
    loop {
        while unanswered < window && Instant::now() < deadline {
            ws.feed(frame.clone()).await.map_err(|error| format!("send failed: {error}"))?;
            unanswered += 1;
        }
        ws.flush().await.map_err(|error| format!("send failed: {error}"))?;
        if unanswered == 0 {
            break;
        }
        if is_echo(next_message(&mut ws).await?)? {
            unanswered -= 1;
            echoed += u64::from(Instant::now() < deadline);
        }
    }
    clients::close(ws).await?;
    Ok(echoed)
}

async fn next_message(ws: &mut Ws) -> Result<Message, String> {
    match timeout(ECHO_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(message))) => Ok(message),
        Ok(Some(Err(error))) => Err(format!("read failed: {error}")),
        Ok(None) => Err("the connection ended".into()),
        Err(_) => Err(format!("no echo within {ECHO_TIMEOUT:?}")),
    }
}

/// Whether `message` is one of the frames echoed; an error for a close or
/// a frame that is not.
fn is_echo(message: Message) -> Result<bool, String> {
    match message {
        Message::Binary(data) if data.len() == FRAME_BYTES => Ok(true),
        Message::Binary(data) => Err(format!("{}-byte echo", data.len())),
        Message::Close(frame) => Err(format!("closed by the server: {frame:?}")),
        Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(false),
    }
}

impl fmt::Display for RelayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "relay: {} sessions of {FRAME_BYTES}-byte frames, window {}, {} rounds of {:?} a side",
            self.sessions,
            self.window,
            self.rounds.len(),
            self.duration
        )?;
        for (name, side) in [("tollgate", &self.tollgate), ("baseline", &self.baseline)] {
            writeln!(
                f,
                "  {name}  {:>9.0} messages/s ({} echoes); errors: {}",
                side.per_second,
                thousands(side.echoes),
                side.errors
            )?;
        }
        let rounds: Vec<String> = self.rounds.iter().map(|r| format!("{:.1}", 100.0 * r)).collect();
        writeln!(f, "  rounds    {} % of the baseline's", rounds.join(", "))?;
        let (low, high) = self.spread();
        writeln!(f, "  spread    {:.1} to {:.1} %", 100.0 * low, 100.0 * high)?;
        write!(
            f,
            "  ratio     {:.1} % of the baseline's (the rounds' median)",
            100.0 * self.ratio()
        )
    }
}
