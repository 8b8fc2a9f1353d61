//! Figure 2, upgrades: sessions opened and closed again as fast as a fixed
//! number of clients in flight can, each waiting for its 101 and then
//! closing cleanly; authenticated upgrades against Tollgate, each with a
//! token minted beforehand, and plain ones against the baseline.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use crate::suite::baseline::Baseline;
use crate::suite::clients::{self, Sources};
use crate::suite::fds;
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{self, Summary, Tally, millis, thousands};

/// Seconds each in-flight client's human holds: sessions that last a few
/// milliseconds never come near it.
const PLENTY_OF_SECONDS: f64 = 1e6;

pub struct Config {
    pub in_flight: usize,
    pub duration: Duration,
    /// Leave the server's `usage.*` messages on (the default).
    pub events: bool,
    /// How many source addresses the clients rotate through: each closed
    /// connection may hold a port in TIME_WAIT for a minute.
    pub sources: u32,
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        let duration = Duration::from_secs(20);
        Config { in_flight: 256, duration, events: true, sources: 64, db }
    }

    pub fn small(db: PathBuf) -> Config {
        Config { duration: Duration::from_secs(2), ..Config::full(db) }
    }
}

/// What one server did under the load.
#[derive(Debug, Default)]
pub struct Side {
    /// Upgrades answered and then closed cleanly within the duration.
    pub completed: u64,
    pub per_second: f64,
    /// From the start of the TCP connection to the 101.
    pub latency: Summary,
    pub errors: Tally,
}

pub struct UpgradesReport {
    pub in_flight: usize,
    pub duration: Duration,
    pub events: bool,
    pub tollgate: Side,
    pub baseline: Side,
}

impl UpgradesReport {
    /// Tollgate's rate as a share of the baseline's.
    pub fn rate_ratio(&self) -> f64 {
        self.tollgate.per_second / self.baseline.per_second
    }

    /// Tollgate's p99 latency as a multiple of the baseline's.
    pub fn p99_ratio(&self) -> f64 {
        self.tollgate.latency.p99.as_secs_f64() / self.baseline.latency.p99.as_secs_f64()
    }
}

pub async fn run(config: &Config) -> Result<UpgradesReport> {
    // The baseline's end of every connection is in this process too.
    let what = format!("{} upgrades in flight", config.in_flight);
    let sockets = 2 * config.in_flight as u64;
    fds::check("this process", &what, sockets, fds::raise_own_limit())?;
    let baseline = measure_baseline(config).await?;
    let tollgate = measure_tollgate(config).await?;
    let (in_flight, duration, events) = (config.in_flight, config.duration, config.events);
    Ok(UpgradesReport { in_flight, duration, events, tollgate, baseline })
}

async fn measure_baseline(config: &Config) -> Result<Side> {
    let baseline = Baseline::start()?;
    let paths = vec!["/".to_owned(); config.in_flight];
    Ok(load(baseline.addr(), paths, config).await)
}

async fn measure_tollgate(config: &Config) -> Result<Side> {
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds: 3600 };
    let server = Server::start(&options).await?;
    let what = format!("{} upgrades in flight", config.in_flight);
    fds::check("the server", &what, config.in_flight as u64, server.open_files_limit()?)?;
    let humans: Vec<String> = (0..config.in_flight).map(|i| format!("upgrade-{i}")).collect();
    let tokens = server.api.mint_all(&humans, PLENTY_OF_SECONDS).await?;
    let events = if config.events { "" } else { "&events=none" };
    let paths = tokens
        .iter()
        .map(|token| format!("/v1/realtime/session?kind=conversational&token={token}{events}"))
        .collect();
    let side = load(server.addr, paths, config).await;
    server.stop().await?;
    Ok(side)
}

/// One client per path, each upgrading and closing again and again until
/// the duration is up.
async fn load(addr: SocketAddr, paths: Vec<String>, config: &Config) -> Side {
    let sources = Arc::new(Sources::new(config.sources));
    let deadline = Instant::now() + config.duration;
    let clients =
        paths.into_iter().map(|path| tokio::spawn(client(addr, path, sources.clone(), deadline)));
    let (latencies, errors) = stats::gather(clients).await;
    let per_second = latencies.len() as f64 / config.duration.as_secs_f64();
    Side { completed: latencies.len() as u64, per_second, latency: Summary::of(latencies), errors }
}

/// Upgrades, closes, and starts over; returns the latency of each upgrade
/// that was closed cleanly before the deadline.
async fn client(
    addr: SocketAddr,
    path: String,
    sources: Arc<Sources>,
    deadline: Instant,
) -> (Vec<Duration>, Tally) {
    let mut latencies = Vec::new();
    let mut errors = Tally::default();
    while Instant::now() < deadline {
        let began = Instant::now();
        let ws = match clients::connect(addr, &path, &sources).await {
            Ok(ws) => ws,
            Err(failure) => {
                errors.add(failure);
                continue;
            }
        };
        let latency = began.elapsed();
        match clients::close(ws).await {
            Ok(()) if Instant::now() <= deadline => latencies.push(latency),
            Ok(()) => {}
            Err(failure) => errors.add(failure),
        }
    }
    (latencies, errors)
}

impl fmt::Display for UpgradesReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let events = if self.events { "usage messages on" } else { "events=none" };
        writeln!(f, "upgrades: {} in flight for {:?}, {events}", self.in_flight, self.duration)?;
        for (name, side) in [("tollgate", &self.tollgate), ("baseline", &self.baseline)] {
            writeln!(
                f,
                "  {name}  {:>9.0}/s ({} upgrades), {}; errors: {}",
                side.per_second,
                thousands(side.completed),
                side.latency,
                side.errors
            )?;
        }
        let p99 = (millis(self.tollgate.latency.p99), millis(self.baseline.latency.p99));
        write!(
            f,
            "  ratios    rate {:.1} % of the baseline's, p99 {:.2} × ({:.2} ms vs {:.2} ms)",
            100.0 * self.rate_ratio(),
            self.p99_ratio(),
            p99.0,
            p99.1
        )
    }
}
