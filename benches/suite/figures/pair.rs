//! The pair figure: the sessions figure on two servers sharing one
//! PostgreSQL database. Every human has two idle sessions: for half of the
//! humans one on each server, so that their pool is drained from both, and
//! for the other half both on one server (the servers take turns). The
//! first session of every pool opens in the first half of the ramp and the
//! second in the other half; all are open together for the hold, and each
//! pool's two sessions are then cut off where it runs dry. It measures each
//! server's memory per session, CPU and ticks during the hold, the
//! database's commits, rows written and CPU over the same window, and how
//! close to its pool's end each session was closed, for shared pools and
//! the others apart.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::{Instant, sleep};

use crate::suite::fds;
use crate::suite::figures::sessions::{
    self, Ending, Precision, ServerFigures, Shared, Window, check_files, collect, ending_by, judge,
    measure_hold, open_all, out_of_files,
};
use crate::suite::postgres::{Counters, Monitor};
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{Tally, thousands};

pub struct Config {
    /// Sessions on the two servers together, two for every human.
    pub sessions: u64,
    /// Sessions opened per second.
    pub rate: f64,
    /// How long every session is open together with all the others.
    pub hold: Duration,
    /// Leave the servers' `usage.*` messages on (the default).
    pub events: bool,
    /// How many source addresses the clients rotate through.
    pub sources: u32,
    /// The URL of the PostgreSQL database the servers share, made for the
    /// run and empty.
    pub db: String,
}

impl Config {
    pub fn full(db: String) -> Config {
        let hold = Duration::from_secs(300);
        Config { sessions: 2_000, rate: 500.0, hold, events: true, sources: 16, db }
    }

    pub fn small(db: String) -> Config {
        Config { sessions: 200, rate: 100.0, hold: Duration::from_secs(3), ..Config::full(db) }
    }

    /// How long opening every session takes at the rate.
    pub fn ramp(&self) -> Duration {
        Duration::from_secs_f64(self.sessions as f64 / self.rate)
    }

    /// Every human's limit, in whole milliseconds. Two sessions opened at
    /// o1 and o2 drain a pool of L at twice the rate of one, so it is dry
    /// at (L + o1 + o2) / 2. The first pool to run dry, whose sessions open
    /// at 0 and at half the ramp, is to last the ramp and the hold: so
    /// L = 2 (ramp + hold) - ramp / 2.
    pub fn limit(&self) -> Duration {
        let limit = (self.ramp() + self.hold) * 2 - self.ramp() / 2;
        Duration::from_millis(limit.as_millis() as u64)
    }
}

/// Where each session goes. Session `p` is the first of pool `p` and
/// session `pools + p` its second, so that every pool's second session
/// opens half the ramp after its first.
struct Plan {
    pools: usize,
}

impl Plan {
    fn new(config: &Config) -> Result<Plan> {
        if config.sessions < 4 || !config.sessions.is_multiple_of(2) {
            bail!("the pair figure needs an even number of sessions, at least 4: two a human");
        }
        Ok(Plan { pools: config.sessions as usize / 2 })
    }

    fn pool(&self, session: usize) -> usize {
        session % self.pools
    }

    /// The other session of the same pool.
    fn partner(&self, session: usize) -> usize {
        (session + self.pools) % (2 * self.pools)
    }

    /// Whether the pool's two sessions are on different servers: every
    /// other pool's are.
    fn is_shared(pool: usize) -> bool {
        pool.is_multiple_of(2)
    }

    /// The server (0 or 1) the session opens on. The pools whose sessions
    /// are on one server alternate between the two.
    fn server(&self, session: usize) -> usize {
        let pool = self.pool(session);
        if Plan::is_shared(pool) { session / self.pools } else { pool / 2 % 2 }
    }

    /// How many sessions each server holds.
    fn per_server(&self) -> [u64; 2] {
        let mut counts = [0, 0];
        (0..2 * self.pools).for_each(|session| counts[self.server(session)] += 1);
        counts
    }

    /// When the pool of `session`, which opened at `opened`, was due to
    /// run dry: at (L + o1 + o2) / 2 if its partner opened too, at o1 + L
    /// if not. A partner that failed once open drained the pool for a
    /// while and is an error of its own; its pool's end is not known.
    fn pool_end(
        &self,
        endings: &[Ending],
        session: usize,
        opened: Instant,
        limit: Duration,
    ) -> Instant {
        match &endings[self.partner(session)] {
            Ending::Closed { opened: other, .. } => {
                let (first, second) = (opened.min(*other), opened.max(*other));
                first + (limit + (second - first)) / 2
            }
            Ending::Failed(_) => opened + limit,
        }
    }

    fn human(pool: usize) -> String {
        let kind = if Plan::is_shared(pool) { "shared" } else { "one-server" };
        format!("{kind}-{pool}")
    }
}

/// What the database showed over the hold.
#[derive(Debug)]
pub struct DatabaseFigures {
    pub window: Duration,
    pub commits: i64,
    pub commits_per_second: f64,
    /// Rows inserted, updated and deleted.
    pub rows: i64,
    pub rows_per_second: f64,
    /// The CPU time of every process of the PostgreSQL server, as a
    /// percentage of one core; or why it could not be read.
    pub cpu_percent: Result<f64, String>,
}

pub struct PairReport {
    pub sessions: u64,
    pub rate: f64,
    pub hold: Duration,
    pub events: bool,
    pub limit: Duration,
    pub opened: u64,
    /// Open at once, as the clients counted.
    pub open_at_peak: u64,
    pub servers: [ServerFigures; 2],
    pub database: DatabaseFigures,
    pub closed_at_limit: u64,
    /// How far from its pool's end each session was closed, where the
    /// pool's sessions were on both servers.
    pub cut_off_shared: Precision,
    /// The same, where both were on one server.
    pub cut_off_one_server: Precision,
    /// `usage.*` messages the clients read.
    pub messages: u64,
    pub errors: Tally,
}

pub async fn run(config: &Config) -> Result<PairReport> {
    let plan = Plan::new(config)?;
    let [first, second] = start_servers(config, &plan).await?;
    let servers = [&first, &second];
    let humans: Vec<String> = (0..plan.pools).map(Plan::human).collect();
    let tokens = first.api.mint_all(&humans, config.limit().as_secs_f64()).await?;
    sleep(sessions::SETTLE).await;
    let rss_before_kib = [first.rss_kib()?, second.rss_kib()?];
    let monitor = Monitor::connect(&config.db).await?;

    let shared = Arc::new(Shared::new(config.sources, config.limit(), false));
    let targets = (0..config.sessions as usize).map(|session| {
        let token = &tokens[plan.pool(session)];
        (servers[plan.server(session)].addr, sessions::path(token, config.events))
    });
    let (start, sessions) = open_all(&shared, config.rate, targets).await;
    let first_cut_off = start + config.ramp() + config.hold;
    let window = Window { sessions: config.sessions, hold: config.hold, first_cut_off };
    let read = async || monitor.read().await;
    let (holds, (early, late)) = measure_hold(&servers, &shared, window, read).await?;
    let endings = collect(sessions, ending_by(start, config.ramp(), config.limit())).await;
    let mut errors = Tally::default();
    servers.iter().filter_map(|server| out_of_files(server)).for_each(|e| errors.add(e));
    stop_both(first, second).await?;

    let per_server = plan.per_server();
    let servers = [0, 1].map(|i| ServerFigures::of(&holds[i], rss_before_kib[i], per_server[i]));
    let database = DatabaseFigures::between(&early, &late);
    Ok(report(config, &plan, servers, database, &endings, &shared, errors))
}

/// Starts the two servers on the run's database, once this process and
/// each of them are seen to be able to hold their sessions' sockets.
async fn start_servers(config: &Config, plan: &Plan) -> Result<[Server; 2]> {
    let what = format!("{} sessions", thousands(config.sessions));
    fds::check("this process", &what, config.sessions, fds::raise_own_limit())?;
    let max_session_seconds = config.limit().as_secs() + 60;
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds };
    let first = Server::start(&options).await?;
    let second = Server::start_beside(&first, &options).await?;
    for (server, sessions) in [&first, &second].into_iter().zip(plan.per_server()) {
        check_files(server, &what, sessions)?;
    }
    Ok([first, second])
}

/// Stops both servers at once.
async fn stop_both(first: Server, second: Server) -> Result<()> {
    let (first, second) = tokio::join!(first.stop(), second.stop());
    first.and(second)
}

fn report(
    config: &Config,
    plan: &Plan,
    servers: [ServerFigures; 2],
    database: DatabaseFigures,
    endings: &[Ending],
    shared: &Shared,
    mut errors: Tally,
) -> PairReport {
    let due = |session, opened| plan.pool_end(endings, session, opened, config.limit());
    let of_kind = |on_both| {
        let sessions = endings.iter().enumerate();
        sessions.filter(move |(session, _)| Plan::is_shared(plan.pool(*session)) == on_both)
    };
    let (shared_closed, cut_off_shared, shared_errors) = judge(of_kind(true), due);
    let (one_server_closed, cut_off_one_server, one_server_errors) = judge(of_kind(false), due);
    errors.merge(shared_errors);
    errors.merge(one_server_errors);
    PairReport {
        sessions: config.sessions,
        rate: config.rate,
        hold: config.hold,
        events: config.events,
        limit: config.limit(),
        opened: shared.opened(),
        open_at_peak: shared.peak(),
        servers,
        database,
        closed_at_limit: shared_closed + one_server_closed,
        cut_off_shared,
        cut_off_one_server,
        messages: shared.messages(),
        errors,
    }
}

impl DatabaseFigures {
    fn between(early: &Counters, late: &Counters) -> DatabaseFigures {
        let window = late.at - early.at;
        let per_second = |count: i64| count as f64 / window.as_secs_f64();
        let (commits, rows) = (late.commits - early.commits, late.rows - early.rows);
        let cpu = match (&early.cpu, &late.cpu) {
            (Ok(early), Ok(late)) => Ok(100.0 * late.saturating_sub(*early).as_secs_f64()),
            (Err(why), _) | (_, Err(why)) => Err(why.clone()),
        };
        DatabaseFigures {
            window,
            commits,
            commits_per_second: per_second(commits),
            rows,
            rows_per_second: per_second(rows),
            cpu_percent: cpu.map(|percent| percent / window.as_secs_f64()),
        }
    }
}

impl fmt::Display for PairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let events = if self.events { "usage messages on" } else { "events=none" };
        writeln!(
            f,
            "pair: {} sessions on two servers sharing a PostgreSQL database, at {}/s, held {:?}, \
             idle, {events}",
            thousands(self.sessions),
            self.rate,
            self.hold
        )?;
        let limit = self.limit.as_secs_f64();
        writeln!(f, "  limit per human          {limit:.3} s, for two sessions")?;
        writeln!(f, "  opened                   {}", thousands(self.opened))?;
        let gauge = |server: &ServerFigures| {
            server.open_at_peak.map_or("-".into(), |open| format!("{open}"))
        };
        let (a, b) = (gauge(&self.servers[0]), gauge(&self.servers[1]));
        let peak = thousands(self.open_at_peak);
        writeln!(f, "  open at peak             {peak} (servers: {a} and {b})")?;
        for (name, server) in ["a", "b"].iter().zip(&self.servers) {
            writeln!(f, "  server {name}                 {} sessions", thousands(server.sessions))?;
            write!(f, "{server:4}")?;
        }
        write!(f, "{}", self.database)?;
        writeln!(f, "  closed with 4001         {}", thousands(self.closed_at_limit))?;
        writeln!(f, "  cut-off error, shared    {}", self.cut_off_shared)?;
        writeln!(f, "  cut-off error, unshared  {}", self.cut_off_one_server)?;
        writeln!(f, "  usage messages read      {}", thousands(self.messages))?;
        write!(f, "  errors                   {}", self.errors)
    }
}

impl fmt::Display for DatabaseFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = self.window.as_secs_f64();
        writeln!(f, "  database                 over {window:.1} s of the hold")?;
        let cpu = match &self.cpu_percent {
            Ok(percent) => format!("{percent:.2} % of one core, every process of the server"),
            Err(why) => format!("not read: {why}"),
        };
        writeln!(f, "    PostgreSQL CPU         {cpu}")?;
        let (commits, rows) = (self.commits_per_second, self.rows_per_second);
        writeln!(f, "    commits                {commits:.1}/s ({})", self.commits)?;
        writeln!(f, "    rows written           {rows:.1}/s ({})", self.rows)
    }
}
