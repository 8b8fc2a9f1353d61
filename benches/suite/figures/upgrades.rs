//! Figure 2, upgrades: sessions opened and closed again as fast as a fixed
//! number of clients in flight can, each waiting for its 101 and then
//! closing cleanly; authenticated upgrades against Tollgate, each with a
//! token minted beforehand, and plain ones against the baseline.
//!
//! Both servers stay up while the sides take turns, in rounds, after a
//! warm-up of each that is not counted, for the reason the relay does (see
//! `relay`): one stretch of either side moved by more than the gap between
//! them from one run to the next (Tollgate's share of the baseline's rate
//! from 55 to 67 % in three runs of one build). The rate's figure is the
//! median of the rounds' ratios. The latency's is each side's p99 over all
//! its rounds together, taken as a ratio: a round is a few seconds, and a
//! tail that comes every few seconds would be in some rounds and not in
//! others.

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

/// How long each side runs before the rounds, uncounted: the first stretch
/// of a run, with caches, allocators and the kernel's socket buffers cold,
/// would otherwise always be the baseline's.
const WARM_UP: Duration = Duration::from_secs(1);

pub struct Config {
    pub in_flight: usize,
    /// How long each side runs in each round.
    pub duration: Duration,
    pub rounds: usize,
    /// Leave the server's `usage.*` messages on (the default).
    pub events: bool,
    /// How many source addresses the clients rotate through: each closed
    /// connection may hold a port in TIME_WAIT for a minute.
    pub sources: u32,
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        let duration = Duration::from_secs(4);
        Config { in_flight: 256, duration, rounds: 8, events: true, sources: 64, db }
    }

    pub fn small(db: PathBuf) -> Config {
        Config { duration: Duration::from_secs(1), rounds: 2, ..Config::full(db) }
    }
}

/// What one server did under the load, over one round or all of them.
#[derive(Debug, Default)]
pub struct Side {
    /// Upgrades answered and then closed cleanly within the duration.
    pub completed: u64,
    pub per_second: f64,
    /// From the start of the TCP connection to the 101.
    pub latency: Summary,
    pub errors: Tally,
}

/// One side's latencies and errors in one round.
struct Round {
    latencies: Vec<Duration>,
    errors: Tally,
}

impl Side {
    /// Every round of one side put together, each of which ran for
    /// `duration`.
    fn total(rounds: Vec<Round>, duration: Duration) -> Side {
        let seconds = duration.as_secs_f64() * rounds.len() as f64;
        let (mut latencies, mut errors) = (Vec::new(), Tally::default());
        for mut round in rounds {
            latencies.append(&mut round.latencies);
            errors.merge(round.errors);
        }
        let completed = latencies.len() as u64;
        let per_second = completed as f64 / seconds;
        Side { completed, per_second, latency: Summary::of(latencies), errors }
    }
}

pub struct UpgradesReport {
    pub in_flight: usize,
    pub duration: Duration,
    pub events: bool,
    /// Over every round.
    pub tollgate: Side,
    pub baseline: Side,
    /// Each round's Tollgate upgrades per second as a share of the
    /// baseline's, in the order run.
    pub rounds: Vec<f64>,
}

impl UpgradesReport {
    /// Tollgate's rate as a share of the baseline's: the median of the
    /// rounds'.
    pub fn rate_ratio(&self) -> f64 {
        stats::median(&self.rounds)
    }

    /// The lowest and the highest of the rounds' rate ratios.
    pub fn spread(&self) -> (f64, f64) {
        stats::spread(&self.rounds)
    }

    /// Tollgate's p99 latency over every round as a multiple of the
    /// baseline's.
    pub fn p99_ratio(&self) -> f64 {
        self.tollgate.latency.p99.as_secs_f64() / self.baseline.latency.p99.as_secs_f64()
    }
}

pub async fn run(config: &Config) -> Result<UpgradesReport> {
    // The baseline's end of every connection is in this process too.
    let what = format!("{} upgrades in flight", config.in_flight);
    let sockets = 2 * config.in_flight as u64;
    fds::check("this process", &what, sockets, fds::raise_own_limit())?;
    anyhow::ensure!(
        config.rounds > 0 && config.rounds.is_multiple_of(2),
        "the upgrades take an even number of rounds, so that each side goes first as often"
    );
    let baseline = Baseline::start()?;
    let baseline_paths = vec!["/".to_owned(); config.in_flight];
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds: 3600 };
    let server = Server::start(&options).await?;
    fds::check("the server", &what, config.in_flight as u64, server.open_files_limit()?)?;
    let tollgate_paths = tollgate_paths(&server, config).await?;
    let sides = Sides {
        tollgate: (server.addr, tollgate_paths.as_slice()),
        baseline: (baseline.addr(), baseline_paths.as_slice()),
    };
    let report = sides.take_turns(config).await;
    server.stop().await?;
    Ok(report)
}

/// A token for each client's human, in the path of its session.
async fn tollgate_paths(server: &Server, config: &Config) -> Result<Vec<String>> {
    let humans: Vec<String> = (0..config.in_flight).map(|i| format!("upgrade-{i}")).collect();
    let tokens = server.api.mint_all(&humans, PLENTY_OF_SECONDS).await?;
    let events = if config.events { "" } else { "&events=none" };
    let path = |token| format!("/v1/realtime/session?kind=conversational&token={token}{events}");
    Ok(tokens.iter().map(path).collect())
}

/// Where each side listens, and the paths its clients upgrade on.
struct Sides<'a> {
    tollgate: (SocketAddr, &'a [String]),
    baseline: (SocketAddr, &'a [String]),
}

impl Sides<'_> {
    /// The warm-up, then the rounds, the side going first alternating.
    async fn take_turns(&self, config: &Config) -> UpgradesReport {
        let (tollgate, baseline) = (self.tollgate, self.baseline);
        let warm_baseline = load(baseline, config, WARM_UP).await;
        let warm_tollgate = load(tollgate, config, WARM_UP).await;
        let (mut ours, mut theirs, mut rounds) = (Vec::new(), Vec::new(), Vec::new());
        let duration = config.duration;
        for round in 0..config.rounds {
            let (ours_now, theirs_now) = if round % 2 == 0 {
                let theirs_now = load(baseline, config, duration).await;
                (load(tollgate, config, duration).await, theirs_now)
            } else {
                let ours_now = load(tollgate, config, duration).await;
                (ours_now, load(baseline, config, duration).await)
            };
            rounds.push(ours_now.latencies.len() as f64 / theirs_now.latencies.len() as f64);
            ours.push(ours_now);
            theirs.push(theirs_now);
        }
        // The warm-up's upgrades are not counted, its errors are.
        let mut tollgate = Side::total(ours, duration);
        tollgate.errors.merge(warm_tollgate.errors);
        let mut baseline = Side::total(theirs, duration);
        baseline.errors.merge(warm_baseline.errors);
        let (in_flight, events) = (config.in_flight, config.events);
        UpgradesReport { in_flight, duration, events, tollgate, baseline, rounds }
    }
}

/// One client per path, each upgrading and closing again and again until
/// the duration is up.
async fn load(
    (addr, paths): (SocketAddr, &[String]),
    config: &Config,
    duration: Duration,
) -> Round {
    let sources = Arc::new(Sources::new(config.sources));
    let deadline = Instant::now() + duration;
    let clients = paths
        .iter()
        .map(|path| tokio::spawn(client(addr, path.clone(), sources.clone(), deadline)));
    let (latencies, errors) = stats::gather(clients).await;
    Round { latencies, errors }
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
        writeln!(
            f,
            "upgrades: {} in flight, {} rounds of {:?} a side, {events}",
            self.in_flight,
            self.rounds.len(),
            self.duration
        )?;
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
        let rounds: Vec<String> = self.rounds.iter().map(|r| format!("{:.1}", 100.0 * r)).collect();
        writeln!(f, "  rounds    {} % of the baseline's rate", rounds.join(", "))?;
        let (low, high) = self.spread();
        writeln!(f, "  spread    {:.1} to {:.1} %", 100.0 * low, 100.0 * high)?;
        let p99 = (millis(self.tollgate.latency.p99), millis(self.baseline.latency.p99));
        write!(
            f,
            "  ratios    rate {:.1} % of the baseline's (the rounds' median), \
             p99 {:.2} × ({:.2} ms vs {:.2} ms, over every round)",
            100.0 * self.rate_ratio(),
            self.p99_ratio(),
            p99.0,
            p99.1
        )
    }
}
