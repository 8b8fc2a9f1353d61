//! The command line: `cargo bench --bench suite -- <figure> [options]`.
//! Every figure runs at its full size unless `--small` (the CI test's
//! sizes) or an option says otherwise, against databases in a temporary
//! directory removed at the end; the pair figure against a database it
//! makes in the PostgreSQL server given, dropped at the end.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use crate::suite::figures::{mints, pair, relay, sessions, soak, upgrades};
use crate::suite::postgres::FreshDatabase;
use crate::suite::targets::{self, Row};

#[derive(Parser)]
#[command(name = "suite", about = "Tollgate's load generator and baseline (see BENCHMARKS.md)")]
struct Cli {
    /// Run at the sizes of the CI test rather than the full ones.
    #[arg(long, global = true)]
    small: bool,
    /// Added by `cargo bench` itself; ignored.
    #[arg(long, global = true, hide = true)]
    bench: bool,
    #[command(subcommand)]
    figure: Option<Figure>,
}

#[derive(Subcommand)]
enum Figure {
    /// N idle sessions open together for the hold, then each cut off at its limit.
    Sessions(SessionsArgs),
    /// Authenticated upgrades per second against the baseline's plain ones.
    Upgrades(UpgradesArgs),
    /// Echo relay throughput of 640-byte frames against the baseline's.
    Relay(RelayArgs),
    /// Token mints per second with keep-alive HTTP/1.1 clients.
    Mints(MintsArgs),
    /// Every figure at its default size, then the table of targets.
    All,
    /// Sessions opening and closing for an hour; memory and open files
    /// before and after (not part of `all`).
    Soak(SoakArgs),
    /// Idle sessions on two servers sharing one PostgreSQL database, half
    /// the humans on both (not part of `all`).
    Pair(PairArgs),
}

#[derive(Args, Default)]
struct SessionsArgs {
    /// Sessions to open [full: 19000; small: 500].
    #[arg(long)]
    n: Option<u64>,
    /// Sessions opened per second [full: 500; small: 250].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds every session is open together [full: 300; small: 3].
    #[arg(long)]
    hold_secs: Option<f64>,
    /// Send a 640-byte frame every 20 ms per session and read its echo.
    #[arg(long)]
    frames: bool,
    /// Open the sessions with `events=none`.
    #[arg(long)]
    no_events: bool,
    /// Source addresses to rotate through, from 127.0.0.2 [16].
    #[arg(long)]
    sources: Option<u32>,
}

#[derive(Args, Default)]
struct PairArgs {
    /// The PostgreSQL server to make the run's database in, as a URL of
    /// any of its databases; `.ci/postgres` starts one and sets the variable.
    #[arg(long, value_name = "URL", env = "TOLLGATE_TEST_POSTGRES", hide_env_values = true)]
    postgres: Option<String>,
    /// Sessions to open on the two servers, two a human [full: 2000; small: 200].
    #[arg(long)]
    n: Option<u64>,
    /// Sessions opened per second [full: 500; small: 100].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds every session is open together [full: 300; small: 3].
    #[arg(long)]
    hold_secs: Option<f64>,
    /// Open the sessions with `events=none`.
    #[arg(long)]
    no_events: bool,
    /// Source addresses to rotate through, from 127.0.0.2 [16].
    #[arg(long)]
    sources: Option<u32>,
}

#[derive(Args, Default)]
struct UpgradesArgs {
    /// Upgrades in flight at once [256].
    #[arg(long)]
    in_flight: Option<usize>,
    /// Seconds each server runs in each round [full: 4; small: 1].
    #[arg(long)]
    secs: Option<f64>,
    /// Rounds, an even number [full: 8; small: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// Open Tollgate's sessions with `events=none`.
    #[arg(long)]
    no_events: bool,
}

#[derive(Args, Default)]
struct RelayArgs {
    /// Echo sessions [100].
    #[arg(long)]
    sessions: Option<usize>,
    /// Seconds to run against each server in each round [full: 5; small: 1].
    #[arg(long)]
    secs: Option<f64>,
    /// Rounds, each running against both servers; an even number [full: 8; small: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// Frames each session may have unanswered [16].
    #[arg(long)]
    window: Option<usize>,
}

#[derive(Args, Default)]
struct SoakArgs {
    /// Clients, each with one session open at a time [full: 2000; small: 50].
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds to run [full: 3600; small: 6].
    #[arg(long)]
    secs: Option<f64>,
}

#[derive(Args, Default)]
struct MintsArgs {
    /// Concurrent keep-alive clients [64].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds to run [full: 10; small: 2].
    #[arg(long)]
    secs: Option<f64>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(figure) = cli.figure else {
        // `cargo bench` with no figure named: say what there is, run nothing.
        println!("{}", Cli::command().render_help());
        return ExitCode::SUCCESS;
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(figure, cli.small)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(figure: Figure, small: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("tollgate.db");
    match figure {
        Figure::Sessions(args) => println!("{}", sessions::run(&args.config(small, db)).await?),
        Figure::Upgrades(args) => println!("{}", upgrades::run(&args.config(small, db)).await?),
        Figure::Relay(args) => println!("{}", relay::run(&args.config(small, db)).await?),
        Figure::Mints(args) => println!("{}", mints::run(&args.config(small, db)).await?),
        Figure::Soak(args) => println!("{}", soak::run(&args.config(small, db)).await?),
        Figure::Pair(args) => println!("{}", run_pair(args, small).await?),
        Figure::All => println!("{}", targets::markdown(&all(small, dir.path()).await)),
    }
    Ok(())
}

/// Runs every figure, each with a database of its own, printing each
/// report as it comes; a figure that fails is a row saying why.
async fn all(small: bool, dir: &Path) -> Vec<Row> {
    let db = |name: &str| dir.join(format!("{name}.db"));
    let mut rows = Vec::new();
    let config = SessionsArgs::default().config(small, db("sessions"));
    let report = sessions::run(&config).await;
    rows.extend(outcome(report, "sessions", &targets::SESSIONS, targets::sessions));
    let config = UpgradesArgs::default().config(small, db("upgrades"));
    let report = upgrades::run(&config).await;
    rows.extend(outcome(report, "upgrades", &targets::UPGRADES, targets::upgrades));
    let config = RelayArgs::default().config(small, db("relay"));
    let report = relay::run(&config).await;
    rows.extend(outcome(report, "relay", &targets::RELAY, targets::relay));
    let config = MintsArgs::default().config(small, db("mints"));
    let report = mints::run(&config).await;
    rows.extend(outcome(report, "mints", &targets::MINTS, targets::mints));
    rows
}

/// The pair figure, on a database made for it and dropped afterwards,
/// even when the run fails or is interrupted: a signal ends the run (and
/// its servers with it) before the database is dropped.
async fn run_pair(args: PairArgs, small: bool) -> Result<pair::PairReport> {
    let Some(server) = args.postgres.clone() else {
        bail!(
            "the pair figure needs a PostgreSQL server: give --postgres URL or set \
             TOLLGATE_TEST_POSTGRES, or run it beside a throw-away one with \
             `.ci/postgres cargo bench --bench suite -- pair`"
        );
    };
    let database = FreshDatabase::create(&server).await?;
    let config = args.config(small, database.url.clone());
    tokio::select! {
        report = pair::run(&config) => report,
        signal = interrupted() => bail!("stopped by {}", signal?),
    }
}

/// Resolves with the signal's name on SIGINT or SIGTERM.
async fn interrupted() -> Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot wait for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot wait for SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}

fn outcome<R: std::fmt::Display>(
    result: Result<R>,
    figure: &'static str,
    names: &[&'static str],
    judge: fn(&R) -> Vec<Row>,
) -> Vec<Row> {
    match result {
        Ok(report) => {
            println!("{report}\n");
            judge(&report)
        }
        Err(error) => {
            eprintln!("{figure} failed: {error:#}\n");
            targets::failed(figure, names, &error)
        }
    }
}

fn seconds(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
}

impl SessionsArgs {
    fn config(self, small: bool, db: std::path::PathBuf) -> sessions::Config {
        let mut config =
            if small { sessions::Config::small(db) } else { sessions::Config::full(db) };
        config.sessions = self.n.unwrap_or(config.sessions);
        config.rate = self.rate.unwrap_or(config.rate);
        config.hold = self.hold_secs.map_or(config.hold, seconds);
        config.frames = self.frames;
        config.events = !self.no_events;
        config.sources = self.sources.unwrap_or(config.sources);
        config
    }
}

impl UpgradesArgs {
    fn config(self, small: bool, db: std::path::PathBuf) -> upgrades::Config {
        let mut config =
            if small { upgrades::Config::small(db) } else { upgrades::Config::full(db) };
        config.in_flight = self.in_flight.unwrap_or(config.in_flight);
        config.duration = self.secs.map_or(config.duration, seconds);
        config.rounds = self.rounds.unwrap_or(config.rounds);
        config.events = !self.no_events;
        config
    }
}

impl RelayArgs {
    fn config(self, small: bool, db: std::path::PathBuf) -> relay::Config {
        let mut config = if small { relay::Config::small(db) } else { relay::Config::full(db) };
        config.sessions = self.sessions.unwrap_or(config.sessions);
        config.duration = self.secs.map_or(config.duration, seconds);
        config.rounds = self.rounds.unwrap_or(config.rounds);
        config.window = self.window.unwrap_or(config.window);
        config
    }
}

impl MintsArgs {
    fn config(self, small: bool, db: std::path::PathBuf) -> mints::Config {
        let mut config = if small { mints::Config::small(db) } else { mints::Config::full(db) };
        config.concurrency = self.concurrency.unwrap_or(config.concurrency);
        config.duration = self.secs.map_or(config.duration, seconds);
        config
    }
}

impl SoakArgs {
    fn config(self, small: bool, db: std::path::PathBuf) -> soak::Config {
        let mut config = if small { soak::Config::small(db) } else { soak::Config::full(db) };
        config.clients = self.clients.unwrap_or(config.clients);
        config.duration = self.secs.map_or(config.duration, seconds);
        config
    }
}

impl PairArgs {
    fn config(self, small: bool, db: String) -> pair::Config {
        let mut config = if small { pair::Config::small(db) } else { pair::Config::full(db) };
        config.sessions = self.n.unwrap_or(config.sessions);
        config.rate = self.rate.unwrap_or(config.rate);
        config.hold = self.hold_secs.map_or(config.hold, seconds);
        config.events = !self.no_events;
        config.sources = self.sources.unwrap_or(config.sources);
        config
    }
}
