//! Figure 3, relay: echo sessions that each send 640-byte binary frames
//! as fast as their window allows (a fixed number of frames sent and not
//! yet echoed), against Tollgate with `events=none` and against the
//! baseline; what counts is echoes read per second.

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
use crate::suite::stats::{Tally, thousands};

/// A voice client's frame: 20 ms of 16 kHz mono 16-bit PCM.
const FRAME_BYTES: usize = 640;

/// How long an echo may take before the session counts as stuck.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

const PLENTY_OF_SECONDS: f64 = 1e6;

pub struct Config {
    pub sessions: usize,
    pub duration: Duration,
    /// Frames a session may have sent and not yet seen echoed.
    pub window: usize,
    pub sources: u32,
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        Config { sessions: 100, duration: Duration::from_secs(20), window: 16, sources: 4, db }
    }

    pub fn small(db: PathBuf) -> Config {
        Config { duration: Duration::from_secs(2), ..Config::full(db) }
    }
}

#[derive(Debug, Default)]
pub struct Side {
    /// Echoes read within the duration, over every session.
    pub echoes: u64,
    pub per_second: f64,
    pub errors: Tally,
}

pub struct RelayReport {
    pub sessions: usize,
    pub duration: Duration,
    pub window: usize,
    pub tollgate: Side,
    pub baseline: Side,
}

impl RelayReport {
    /// Tollgate's messages per second as a share of the baseline's.
    pub fn ratio(&self) -> f64 {
        self.tollgate.per_second / self.baseline.per_second
    }
}

pub async fn run(config: &Config) -> Result<RelayReport> {
    let what = format!("{} relay sessions", config.sessions);
    let sockets = 2 * config.sessions as u64;
    fds::check("this process", &what, sockets, fds::raise_own_limit())?;
    let baseline = measure_baseline(config).await?;
    let tollgate = measure_tollgate(config).await?;
    let (sessions, duration, window) = (config.sessions, config.duration, config.window);
    Ok(RelayReport { sessions, duration, window, tollgate, baseline })
}

async fn measure_baseline(config: &Config) -> Result<Side> {
    let baseline = Baseline::start()?;
    Ok(load(baseline.addr(), vec!["/".to_owned(); config.sessions], config).await)
}

async fn measure_tollgate(config: &Config) -> Result<Side> {
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds: 3600 };
    let server = Server::start(&options).await?;
    let humans: Vec<String> = (0..config.sessions).map(|i| format!("relay-{i}")).collect();
    let tokens = server.api.mint_all(&humans, PLENTY_OF_SECONDS).await?;
    let paths = tokens
        .iter()
        .map(|token| format!("/v1/realtime/session?kind=conversational&token={token}&events=none"))
        .collect();
    let side = load(server.addr, paths, config).await;
    server.stop().await?;
    Ok(side)
}

/// Opens every session first, then pumps them all for the duration.
async fn load(addr: SocketAddr, paths: Vec<String>, config: &Config) -> Side {
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
    let deadline = Instant::now() + config.duration;
    let pumps = open.into_iter().map(|ws| tokio::spawn(pump(ws, config.window, deadline)));
    let mut echoes = 0;
    for joined in join_all(pumps).await {
        match joined {
            Ok(Ok(echoed)) => echoes += echoed,
            Ok(Err(failure)) => errors.add(failure),
            Err(error) => errors.add(format!("task: {error}")),
        }
    }
    Side { echoes, per_second: echoes as f64 / config.duration.as_secs_f64(), errors }
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
            "relay: {} sessions of {FRAME_BYTES}-byte frames, window {}, for {:?}",
            self.sessions, self.window, self.duration
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
        write!(f, "  ratio     {:.1} % of the baseline's", 100.0 * self.ratio())
    }
}
