//! `kill -9` under load, twenty times over on one database. Each round opens
//! 240 metered sessions, some of whose humans run dry within it, while
//! tokens are minted and limits topped up; at a random moment (seeded, the
//! seed printed) the server is killed and started again. After each start
//! the database must hold everything the server confirmed and nothing half
//! done, no session may be left open or charged more than its client saw,
//! and a session with time to spare must have been charged all its time up
//! to the last tick committed before the kill, which must be recent.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use common::binary::{self, Process};
use common::{Db, TestDatabase, assert_ledger_identity};
use futures::StreamExt;
use rand::prelude::*;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};
use tokio_tungstenite::tungstenite::{self, Message};

const ROUNDS: usize = 20;
const TICK_MS: u64 = 200;
const TICK: f64 = TICK_MS as f64 / 1000.0;

/// Humans whose limit outlasts the test: their sessions run until the kill.
const RICH_HUMANS: usize = 30;
const RICH_MILLIS: i64 = 1_000_000;
/// New humans each round with a few whole seconds, which their sessions
/// use up within the round unless a top-up comes first.
const POOR_HUMANS: usize = 30;
const POOR_SECONDS: std::ops::RangeInclusive<u32> = 1..=6;
/// 60 humans with 4 sessions each: 240 sessions a round, enough to keep
/// the meter and the store busy, few enough for a shared 2-core machine.
const SESSIONS_PER_HUMAN: usize = 4;

/// When the kill comes, after the round's load starts: sometimes while
/// sessions are still being admitted, sometimes once all of them run.
const KILL_AFTER_MS: std::ops::Range<u64> = 150..1500;
/// Tasks topping up and minting, each one request at a time.
const WORKERS: usize = 2;

/// How much later than a tick the last commit before the kill may have
/// been. On a machine this busy a commit came up to half a second late;
/// a meter that stopped committing would go past this.
const STALLED: f64 = 1.0;
/// How far apart the clocks compared here may be: charges are whole
/// milliseconds of the server's monotonic clock, recorded with its wall
/// clock, and the client keeps a monotonic clock of its own.
const CLOCKS: f64 = 0.01;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_confirmed_and_at_most_a_tick_of_usage() {
    let seed = std::env::var("TOLLGATE_CHAOS_SEED")
        .map(|seed| seed.parse().expect("TOLLGATE_CHAOS_SEED is a number"))
        .unwrap_or_else(|_| rand::random());
    println!("chaos seed {seed} (set TOLLGATE_CHAOS_SEED={seed} to run it again)");
    let mut rng = StdRng::seed_from_u64(seed);
    let database = TestDatabase::create().await;
    let mut chaos = Chaos::start(database.db()).await;
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(rng.random_range(KILL_AFTER_MS));
        let outcome = chaos.round(round, kill_after, &mut rng).await;
        chaos.check(round, outcome).await;
    }
    chaos.server().signal("TERM");
}

/// The server and what the test has asked of it so far.
struct Chaos {
    db: Db,
    key: String,
    /// `None` between a kill and the restart.
    process: Option<Process>,
    http: reqwest::Client,
    rich: Vec<(String, String)>,
    top_ups: Vec<TopUp>,
    /// Numbers the top-ups' amounts, across rounds.
    top_up_count: Arc<AtomicI64>,
}

/// How a request ended as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Status(u16),
    /// No answer: the server was killed while the request was in hand.
    Lost,
}

#[derive(Debug)]
struct TopUp {
    human: String,
    amount: i64,
    answer: Answer,
}

#[derive(Debug)]
struct Mint {
    human: String,
    token: Option<String>,
    answer: Answer,
}

/// A session as its client saw it.
#[derive(Debug)]
struct Seen {
    human: String,
    asked: Instant,
    opened: Option<Instant>,
    id: Option<String>,
    end: End,
    ended: Instant,
}

#[derive(Debug, PartialEq)]
enum End {
    Refused(u16, Value),
    Closed(Option<u16>),
    /// The connection broke without a close frame.
    Lost,
}

/// What one round did, for the checks after the restart.
struct Round {
    sessions: Vec<Seen>,
    mints: Vec<Mint>,
    /// Sessions before the round's first have this id or a smaller one.
    last_session_before: i64,
    killed_from: Instant,
    killed_by: Instant,
    /// The last tick the killed server committed.
    last_tick: Instant,
    /// The server's wall clock at `killed_from`, in Unix milliseconds.
    killed_at: i64,
    left_open: i64,
}

impl Chaos {
    async fn start(db: Db) -> Chaos {
        let process = spawn(&db);
        let key = process.api_key();
        let mut chaos = Chaos {
            db,
            key,
            process: Some(process),
            http: reqwest::Client::new(),
            rich: Vec::new(),
            top_ups: Vec::new(),
            top_up_count: Arc::new(AtomicI64::new(0)),
        };
        for i in 0..RICH_HUMANS {
            let human = format!("rich-{i}");
            let token = chaos.mint(&human, RICH_MILLIS).await;
            chaos.rich.push((human, token));
        }
        chaos
    }

    /// Mints a token for `human` setting `millis` of conversation.
    async fn mint(&self, human: &str, millis: i64) -> String {
        let limits = json!([{ "type": "conversational_seconds", "value": millis as f64 / 1e3 }]);
        let body = json!({ "human": human, "limits": limits });
        let request = self.backend(reqwest::Method::POST, "/v1/usage/token").json(&body);
        let (answer, body) = answer_of(request).await;
        assert_eq!(answer, Answer::Status(200), "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    fn backend(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.server().base);
        self.http.request(method, url).header("x-api-key", &self.key)
    }

    /// The round's load until the kill, then the kill.
    async fn round(&mut self, round: usize, kill_after: Duration, rng: &mut StdRng) -> Round {
        let sessions = self.sessions_of(round, rng).await;
        let last_session_before = last_session(&self.db);
        let humans: Vec<String> = sessions.iter().map(|(human, _)| human.clone()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = JoinSet::new();
        for (human, token) in sessions {
            clients.spawn(session(self.server().ws_base.clone(), human, token));
        }
        let top_ups = self.top_up_workers(humans, &stop);
        let mints = self.mint_workers(round, &stop);

        sleep(kill_after).await;
        let (killed_from, killed_at, killed_by) = self.kill();
        let last_tick = instant_of(meter_clock(&self.db), killed_from, killed_at);
        stop.store(true, Ordering::Relaxed);
        for worker in top_ups.join_all().await {
            self.top_ups.extend(worker);
        }
        let mints = mints.join_all().await.into_iter().flatten().collect();
        let sessions = clients.join_all().await;
        let left_open = open_sessions(&self.db);
        self.process = Some(spawn(&self.db));
        Round {
            sessions,
            mints,
            last_session_before,
            killed_from,
            killed_by,
            last_tick,
            killed_at,
            left_open,
        }
    }

    /// The round's sessions, shuffled: four for each rich human and for
    /// each of the round's new poor humans.
    async fn sessions_of(&self, round: usize, rng: &mut StdRng) -> Vec<(String, String)> {
        let mut humans = self.rich.clone();
        for i in 0..POOR_HUMANS {
            let human = format!("poor-{round}-{i}");
            let millis = i64::from(rng.random_range(POOR_SECONDS)) * 1000;
            let token = self.mint(&human, millis).await;
            humans.push((human, token));
        }
        let mut sessions: Vec<(String, String)> = humans
            .iter()
            .flat_map(|h| std::iter::repeat_n(h.clone(), SESSIONS_PER_HUMAN))
            .collect();
        sessions.shuffle(rng);
        sessions
    }

    /// `kill -9`: when it was sent, on both clocks, and when it was done.
    fn kill(&mut self) -> (Instant, i64, Instant) {
        let (killed_from, killed_at) = (Instant::now(), unix_millis());
        self.process.take().expect("the server runs").kill();
        (killed_from, killed_at, Instant::now())
    }

    fn server(&self) -> &Process {
        self.process.as_ref().expect("the server runs")
    }

    fn top_up_workers(&self, humans: Vec<String>, stop: &Arc<AtomicBool>) -> JoinSet<Vec<TopUp>> {
        let humans = Arc::new(humans);
        let mut workers = JoinSet::new();
        for _ in 0..WORKERS {
            let worker = Worker::of(self, stop);
            let (humans, count) = (humans.clone(), self.top_up_count.clone());
            workers.spawn(async move { worker.top_ups(&humans, &count).await });
        }
        workers
    }

    fn mint_workers(&self, round: usize, stop: &Arc<AtomicBool>) -> JoinSet<Vec<Mint>> {
        let count = Arc::new(AtomicI64::new(0));
        let mut workers = JoinSet::new();
        for _ in 0..WORKERS {
            let worker = Worker::of(self, stop);
            let count = count.clone();
            workers.spawn(async move { worker.mints(round, &count).await });
        }
        workers
    }

    /// Everything checked after a restart.
    async fn check(&self, round: usize, outcome: Round) {
        let context = format!("round {round}");
        let db = &self.db;
        if matches!(db, Db::Postgres(_)) {
            // The new run closes out the killed one's sessions once it has
            // been silent for three of its ticks.
            until_closed_out(db, &context).await;
        }
        if outcome.left_open > 0 {
            let line = format!("left open sessions={}", outcome.left_open);
            let logged = self.server().logged(&line, Duration::from_secs(5));
            assert!(logged.is_ok(), "{context}: {line} not logged: {logged:?}");
        }
        assert_eq!(open_sessions(db), 0, "{context}: sessions left open after the restart");
        assert_ledger_identity(db);
        assert_no_pool_below_zero(db, &context);
        assert_sessions_charged_their_ledger(db, &context);
        self.check_top_ups(db, &context);
        self.check_mints(db, &outcome.mints, &context).await;
        check_sessions(db, &outcome, &context);
    }

    /// Every top-up answered 200 is in the ledger once, every one refused
    /// is not, one in flight at the kill is there once or not at all, and
    /// no other grant of a top-up's kind is there.
    fn check_top_ups(&self, db: &Db, context: &str) {
        let mut grants = top_up_grants(db);
        for top_up in &self.top_ups {
            let found = grants.remove(&(top_up.human.clone(), top_up.amount)).unwrap_or(0);
            let expected = match top_up.answer {
                Answer::Status(200) => 1..=1,
                Answer::Status(_) => 0..=0,
                Answer::Lost => 0..=1,
            };
            assert!(expected.contains(&found), "{context}: {top_up:?} is in the ledger {found}×");
        }
        assert!(grants.is_empty(), "{context}: grants nobody asked for: {grants:?}");
    }

    /// Every token minted works after the restart, and every mint is whole
    /// or absent: a human minted for has its token and its limit.
    async fn check_mints(&self, db: &Db, mints: &[Mint], context: &str) {
        let minted = minted_humans(db);
        for mint in mints {
            let stored = minted.get(&mint.human);
            match (mint.answer, &mint.token) {
                (Answer::Status(200), Some(token)) => self.assert_token_works(token, context).await,
                (Answer::Status(_), _) => assert!(stored.is_none(), "{context}: {mint:?} stored"),
                (Answer::Lost, _) => {}
            }
            if let Some(parts) = stored {
                assert_eq!(*parts, (1, 1), "{context}: {mint:?} stored in part: (tokens, limits)");
            }
        }
    }

    async fn assert_token_works(&self, token: &str, context: &str) {
        let url = format!("{}/v1/usage/limits", self.server().base);
        let (answer, body) = answer_of(self.http.get(url).bearer_auth(token)).await;
        assert_eq!(answer, Answer::Status(200), "{context}: a minted token was lost: {body}");
        assert_eq!(body, json!([{ "type": "token_cnt", "value": 100.0 }]), "{context}");
    }
}

/// What a load task needs of the server.
struct Worker {
    base: String,
    key: String,
    http: reqwest::Client,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn of(chaos: &Chaos, stop: &Arc<AtomicBool>) -> Worker {
        Worker {
            base: chaos.server().base.clone(),
            key: chaos.key.clone(),
            http: chaos.http.clone(),
            stop: stop.clone(),
        }
    }

    fn backend(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.base);
        self.http.request(method, url).header("x-api-key", &self.key)
    }

    /// Tops up the humans in turn until told to stop, each top-up with an
    /// amount no other has.
    async fn top_ups(&self, humans: &[String], count: &AtomicI64) -> Vec<TopUp> {
        let mut done = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let n = count.fetch_add(1, Ordering::Relaxed);
            let human = humans[(n as usize * 7919) % humans.len()].clone();
            let amount = top_up_amount(n);
            let limits =
                json!([{ "type": "conversational_seconds", "value": amount as f64 / 1e3 }]);
            let body = json!({ "human": human, "mode": "add", "limits": limits });
            let request = self.backend(reqwest::Method::PUT, "/v1/usage/token").json(&body);
            let (answer, _) = answer_of(request).await;
            done.push(TopUp { human, amount, answer });
        }
        done
    }

    /// Mints tokens for new humans until told to stop.
    async fn mints(&self, round: usize, count: &AtomicI64) -> Vec<Mint> {
        let mut done = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let human = format!("minted-{round}-{}", count.fetch_add(1, Ordering::Relaxed));
            let limits = json!([{ "type": "token_cnt", "value": 100 }]);
            let body = json!({ "human": human, "limits": limits });
            let request = self.backend(reqwest::Method::POST, "/v1/usage/token").json(&body);
            let (answer, body) = answer_of(request).await;
            let token = body["token"].as_str().map(str::to_owned);
            done.push(Mint { human, token, answer });
        }
        done
    }
}

/// The amount of the `n`th top-up, in milliseconds: never a whole second,
/// so that no grant of a mint (whole seconds here) can be taken for one.
fn top_up_amount(n: i64) -> i64 {
    1000 * (1 + n / 999) + 1 + n % 999
}

/// Opens a session and reads it until it ends.
async fn session(ws_base: String, human: String, token: String) -> Seen {
    let asked = Instant::now();
    let url = format!("{ws_base}/v1/realtime/session?kind=conversational&token={token}");
    let ended = |end| Seen {
        human: human.clone(),
        asked,
        opened: None,
        id: None,
        end,
        ended: Instant::now(),
    };
    let mut ws = match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return ended(End::Refused(response.status().as_u16(), body));
        }
        Err(_) => return ended(End::Lost),
    };
    let mut seen = Seen { opened: Some(Instant::now()), ..ended(End::Lost) };
    seen.end = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if seen.id.is_none() => {
                let event: Value = serde_json::from_str(&text).unwrap();
                seen.id = event["session_id"].as_str().map(str::to_owned);
            }
            Some(Ok(Message::Close(frame))) => break End::Closed(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break End::Lost,
        }
    };
    seen.ended = Instant::now();
    seen
}

/// Each session the round's clients saw was charged what they saw of it
/// (see [`bounds`]); a session no client learnt of was one whose upgrade
/// the kill cut short; and the last tick before the kill was recent.
fn check_sessions(db: &Db, outcome: &Round, context: &str) {
    let late = outcome.killed_from.saturating_duration_since(outcome.last_tick);
    println!("{context}: the last tick committed {:.3} s before the kill", late.as_secs_f64());
    // The meter commits only while it has sessions, so it is late only
    // from when the round's first session opened: a kill may come before
    // any did (a burst of upgrades is admitted more slowly on PostgreSQL,
    // one transaction each, than on SQLite, many to a commit), and the
    // last tick is then the previous run's.
    let first_opened = outcome.sessions.iter().filter_map(|seen| seen.opened).min();
    let metering_since = first_opened.map_or(outcome.killed_from, |at| at.max(outcome.last_tick));
    let late = outcome.killed_from.saturating_duration_since(metering_since);
    assert!(late.as_secs_f64() <= TICK + STALLED, "{context}: no tick for {late:?}");
    let mut rows = sessions_after(db, outcome.last_session_before);
    for seen in &outcome.sessions {
        check_ending(seen, outcome, context);
        let Some(id) = &seen.id else { continue };
        let row = rows.remove(id).unwrap_or_else(|| panic!("{context}: no {id}"));
        let (reason, charged, from) = row;
        let reasons = ["server_restart", "instance_lost", "usage_limit_exceeded"];
        assert!(reasons.contains(&reason.as_str()), "{context}: {id} ended with {reason}");
        let charged = charged as f64 / 1000.0;
        let from = from.map(|ms| instant_of(ms, outcome.killed_from, outcome.killed_at));
        let (most, least) = bounds(seen, &reason, from, outcome);
        let seen_as = format!("{context}: {id} of {} charged {charged} s", seen.human);
        assert!(charged <= most, "{seen_as}, seen for at most {most} s: {seen:?}");
        assert!(charged >= least, "{seen_as}, less than {least} s: {reason}, {seen:?}");
    }
    check_cut_short(rows, outcome, context);
}

/// Sessions no client learnt of: no more of them than upgrades the kill
/// cut short, none charged more than the longest of those lasted.
fn check_cut_short(rows: HashMap<String, SessionRow>, outcome: &Round, context: &str) {
    let unknown: Vec<&Seen> = outcome.sessions.iter().filter(|s| cut_short(s)).collect();
    assert!(rows.len() <= unknown.len(), "{context}: sessions no client asked for: {rows:?}");
    let Some(earliest) = unknown.iter().map(|seen| seen.asked).min() else { return };
    let most = (outcome.killed_by - earliest).as_secs_f64() + CLOCKS;
    for (id, (_, charged, _)) in rows {
        let charged = charged as f64 / 1000.0;
        assert!(charged <= most, "{context}: {id} charged {charged} s, more than {most} s");
    }
}

/// A session ends for its limit, or for the kill, or is refused for its
/// limit; nothing else.
fn check_ending(seen: &Seen, outcome: &Round, context: &str) {
    match &seen.end {
        End::Closed(Some(4001)) => {}
        End::Refused(429, body) => assert_eq!(body["type"], "usage_limit_exceeded", "{context}"),
        End::Lost => assert!(seen.ended >= outcome.killed_from, "{context}: {seen:?} before kill"),
        other => panic!("{context}: a session ended with {other:?}"),
    }
}

/// The most and the least a session may have been charged, in seconds. At
/// most the time from asking for it to its end as the client saw it. At
/// least, for a session of a rich human that the restart ended, its time
/// open up to the last tick committed before the kill: a kill loses no
/// more than what came after that tick. Open means from when the client
/// had the answer or the server started charging, whichever was later: the
/// server starts a session's clock when its task sees the upgrade done,
/// which on a busy machine came a quarter of a second after the client
/// had the answer. (A poor human's sessions can run on a moment past the
/// pool's end, when the machine is too busy to cut them off at once, and
/// time past the end is never charged.)
fn bounds(seen: &Seen, reason: &str, from: Option<Instant>, outcome: &Round) -> (f64, f64) {
    let opened = seen.opened.expect("a session with an id was opened");
    let most = (seen.ended.min(outcome.killed_by) - seen.asked).as_secs_f64();
    let rich = seen.human.starts_with("rich-");
    let least = match (reason, from) {
        ("server_restart" | "instance_lost", Some(from)) if rich => {
            outcome.last_tick.saturating_duration_since(opened.max(from))
        }
        _ => return (most + CLOCKS, 0.0),
    };
    (most + CLOCKS, least.as_secs_f64() - CLOCKS)
}

/// The client never learnt its session's id, though it was not refused.
fn cut_short(seen: &Seen) -> bool {
    seen.id.is_none() && !matches!(seen.end, End::Refused(..))
}

fn spawn(db: &Db) -> Process {
    binary::spawn(&db.setting(), &["--tick-ms", &TICK_MS.to_string()], "info")
}

/// Sends a request; its status and body, or `Lost` when no answer came.
async fn answer_of(request: reqwest::RequestBuilder) -> (Answer, Value) {
    let Ok(response) = request.send().await else {
        return (Answer::Lost, Value::Null);
    };
    let status = response.status().as_u16();
    match response.text().await {
        Ok(text) => (Answer::Status(status), serde_json::from_str(&text).unwrap_or(Value::Null)),
        Err(_) => (Answer::Lost, Value::Null),
    }
}

fn unix_millis() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.unwrap().as_millis() as i64
}

fn last_session(db: &Db) -> i64 {
    db.query_i64("SELECT COALESCE(MAX(id), 0) FROM sessions", &[])
}

fn open_sessions(db: &Db) -> i64 {
    db.query_i64("SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL", &[])
}

/// A session's end reason, what it was charged in milliseconds, and when
/// the server started charging it, in Unix milliseconds: its first debit
/// row runs from then to when it was last written, or when the restart
/// wrote it from the session's start.
type SessionRow = (String, i64, Option<i64>);

/// The sessions after the one with id `id`, by public id.
fn sessions_after(db: &Db, id: i64) -> HashMap<String, SessionRow> {
    db.rows(
        "SELECT public_id, end_reason, charged,
                (SELECT updated_at + amount FROM ledger g WHERE g.session_id = s.id
                 ORDER BY g.id LIMIT 1)
         FROM sessions s WHERE id > ?1",
        &[&id],
    )
    .iter()
    .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
    .collect()
}

/// The last time the meter committed, in Unix milliseconds: on
/// PostgreSQL, the meter of the newest run, which is the one just killed.
fn meter_clock(db: &Db) -> i64 {
    match db {
        Db::Sqlite(_) => db.query_i64("SELECT alive_at FROM meter_clock", &[]),
        Db::Postgres(_) => {
            db.query_i64("SELECT alive_at FROM instances ORDER BY started_at DESC, id LIMIT 1", &[])
        }
    }
}

/// Waits until no session is left open, as the close-out of a run gone
/// silent leaves none, for at most ten seconds.
async fn until_closed_out(db: &Db, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_sessions(db) > 0 {
        assert!(Instant::now() < deadline, "{context}: the killed run was never closed out");
        sleep(Duration::from_millis(50)).await;
    }
}

/// The instant of `unix_ms`, by the instant `at` that was `at_ms`.
fn instant_of(unix_ms: i64, at: Instant, at_ms: i64) -> Instant {
    let offset = Duration::from_millis((at_ms - unix_ms).unsigned_abs());
    if unix_ms <= at_ms { at - offset } else { at + offset }
}

/// How many grants of conversation of each (human, amount) that is not
/// whole seconds.
fn top_up_grants(db: &Db) -> HashMap<(String, i64), i64> {
    db.rows(
        "SELECT h.external_id, g.amount, COUNT(*) FROM ledger g JOIN humans h ON h.id = g.human_id
         WHERE g.entry = 'grant' AND g.limit_type = 'conversational_seconds'
           AND g.amount % 1000 != 0
         GROUP BY 1, 2",
        &[],
    )
    .iter()
    .map(|row| ((row.get(0), row.get(1)), row.get(2)))
    .collect()
}

/// Every human the mint tasks created: (its tokens, its pools).
fn minted_humans(db: &Db) -> HashMap<String, (i64, i64)> {
    db.rows(
        "SELECT external_id,
                (SELECT COUNT(*) FROM usage_tokens t WHERE t.human_id = h.id),
                (SELECT COUNT(*) FROM limits l WHERE l.human_id = h.id)
         FROM humans h WHERE external_id LIKE 'minted-%'",
        &[],
    )
    .iter()
    .map(|row| (row.get(0), (row.get(1), row.get(2))))
    .collect()
}

/// No enforced pool is below zero, but by what usage reports took.
fn assert_no_pool_below_zero(db: &Db, context: &str) {
    let below: Vec<(i64, String, i64)> = db
        .rows(
            "SELECT human_id, limit_type, balance FROM limits l WHERE limited
             AND balance < (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger g
                            WHERE g.human_id = l.human_id AND g.limit_type = l.limit_type
                              AND g.report_id IS NOT NULL)",
            &[],
        )
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert!(below.is_empty(), "{context}: pools below zero: {below:?}");
}

/// What an ended session was charged is what its ledger rows took.
fn assert_sessions_charged_their_ledger(db: &Db, context: &str) {
    let differ: Vec<(String, i64, i64)> = db
        .rows(
            "SELECT public_id, charged, taken FROM (
                 SELECT public_id, charged, ended_at,
                        (SELECT CAST(-COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger g
                         WHERE g.session_id = s.id) AS taken
                 FROM sessions s) AS t
             WHERE ended_at IS NOT NULL AND charged != taken",
            &[],
        )
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert!(differ.is_empty(), "{context}: charged differs from the ledger: {differ:?}");
}
