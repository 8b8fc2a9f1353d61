//! Several `tollgate` processes sharing one PostgreSQL database, as
//! servers behind a load balancer run: a human's pool drained by sessions
//! on two of them is cut off on both at the shared instant; a revocation
//! or a set-to-zero through one closes the human's session on the other
//! within a tick, and a top-up through one keeps it open; the cap on a
//! human's sessions counts both servers'; a server killed with -9 has its
//! sessions closed out by the other, with reason `instance_lost` and their
//! usage as of its last tick; and with both servers' dispatchers reading
//! one outbox, each webhook event is delivered once. Skipped,
//! saying so, without `TOLLGATE_TEST_POSTGRES` (see tests/common/postgres.rs).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::Api;
use common::binary::{self, Process};
use common::postgres::{self, FreshDatabase};
use common::receiver::Receiver;
use serde_json::json;
use tokio::time::Instant;

/// The servers' tick.
const TICK: Duration = Duration::from_millis(100);

/// What a busy machine may add to an instant the servers aim for: the
/// tests here run two servers and a database on two cores.
const SLACK: Duration = Duration::from_millis(250);

/// Two servers on one fresh database, each with the extra arguments, and
/// the API key the first printed, which works on both.
struct Pair {
    _db: FreshDatabase,
    url: String,
    a: Process,
    b: Process,
    key: String,
}

impl Pair {
    async fn start(server: &str, args: &[&str]) -> Pair {
        let db = FreshDatabase::create(server).await;
        let tick = TICK.as_millis().to_string();
        let args: Vec<&str> = ["--tick-ms", tick.as_str()].iter().chain(args).copied().collect();
        let a = binary::spawn(Path::new(&db.url), &args, "info");
        let key = a.api_key();
        let b = binary::spawn(Path::new(&db.url), &args, "info");
        assert_eq!(b.printed_key(), None, "the second server made a project of its own");
        Pair { url: db.url.clone(), _db: db, a, b, key }
    }

    fn api_a(&self) -> Api {
        api_of(&self.a, &self.key)
    }

    fn api_b(&self) -> Api {
        api_of(&self.b, &self.key)
    }
}

fn api_of(process: &Process, key: &str) -> Api {
    Api::new(process.base.trim_start_matches("http://"), key.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_drained_on_two_servers_is_cut_off_on_both_at_the_shared_instant() {
    let Some(server) = postgres::server("a_pool_drained_on_two_servers") else {
        return;
    };
    let pair = Pair::start(&server, &[]).await;
    let (api_a, api_b) = (pair.api_a(), pair.api_b());
    let token = api_a.mint_seconds("ada", 4.0).await;
    let mut on_a = api_a.connect(&token).await;
    let mut on_b = api_b.connect(&token).await;
    let (opened_a, opened_b) = (on_a.opened, on_b.opened);

    // Two sessions drain 4 s in 2 s: the pool is dry where
    // 4 s = (t - opened_a) + (t - opened_b).
    let dry_at = opened_a + (opened_b - opened_a) / 2 + Duration::from_secs(2);
    let (closed_a, closed_b) = tokio::join!(on_a.until_closed(), on_b.until_closed());
    let now = Instant::now();
    for (name, closed, opened) in [("a", &closed_a, opened_a), ("b", &closed_b, opened_b)] {
        assert_eq!(closed.code, Some(4001), "{name}: {closed:?}");
        let at = opened + Duration::from_secs_f64(closed.after);
        let off = if at > dry_at { at - dry_at } else { dry_at - at };
        assert!(off <= TICK + SLACK, "{name} closed {off:?} away from the pool's end");
    }
    assert!(now < dry_at + Duration::from_secs(1), "the sessions outlived the pool");
    // A session's close may come before its end is recorded (up to 50 ms
    // on): the pool is read once both are.
    let admin = Pair::admin_of(&pair.url).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let open = "SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL";
    while admin.query_one(open, &[]).await.unwrap().get::<_, i64>(0) > 0 {
        assert!(Instant::now() < deadline, "the sessions' ends were never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(api_b.remaining("ada", "conversational_seconds").await, 0.0);
    let db = common::Db::Postgres(pair.url.clone());
    common::assert_ledger_identity(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_or_a_set_to_zero_through_one_server_closes_sessions_on_the_other() {
    let Some(server) = postgres::server("a_revocation_or_a_set_to_zero_through_one") else {
        return;
    };
    let pair = Pair::start(&server, &[]).await;
    let (api_a, api_b) = (pair.api_a(), pair.api_b());
    let revoked = api_a.mint_seconds("ada", 60.0).await;
    let zeroed = api_a.mint_seconds("bob", 60.0).await;
    let mut revoked_on_b = api_b.connect(&revoked).await;
    let mut zeroed_on_b = api_b.connect(&zeroed).await;
    tokio::time::sleep(TICK * 3).await;

    let asked = Instant::now();
    let (status, body) = api_a.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await;
    assert_eq!(status, 200, "{body}");
    let closed = tokio::time::timeout(Duration::from_secs(5), revoked_on_b.until_closed()).await;
    assert_eq!(closed.expect("the revoked session stayed open").code, Some(4002));
    let took = asked.elapsed();
    assert!(took <= TICK + SLACK, "the revocation took {took:?} to reach the other server");

    let asked = Instant::now();
    let limits = json!({ "human": "bob", "mode": "set",
                         "limits": [{ "type": "conversational_seconds", "value": 0 }] });
    let (status, body) = api_a.put("/v1/usage/token", limits).await;
    assert_eq!(status, 200, "{body}");
    let closed = tokio::time::timeout(Duration::from_secs(5), zeroed_on_b.until_closed()).await;
    assert_eq!(closed.expect("the zeroed session stayed open").code, Some(4001));
    let took = asked.elapsed();
    assert!(took <= TICK + SLACK, "the set-to-zero took {took:?} to reach the other server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_through_one_server_keeps_a_session_on_the_other_open() {
    let Some(server) = postgres::server("a_top_up_through_one_server") else {
        return;
    };
    let pair = Pair::start(&server, &[]).await;
    let (api_a, api_b) = (pair.api_a(), pair.api_b());
    let token = api_a.mint_seconds("ada", 1.0).await;
    let mut on_b = api_b.connect(&token).await;
    let top_up = json!({ "human": "ada", "mode": "add",
                         "limits": [{ "type": "conversational_seconds", "value": 60 }] });
    let (status, body) = api_a.put("/v1/usage/token", top_up).await;
    assert_eq!(status, 200, "{body}");
    // Without the top-up the session would close at 1 s.
    let outlived = tokio::time::timeout(Duration::from_secs(2), on_b.until_closed()).await;
    assert!(outlived.is_err(), "closed despite the top-up: {outlived:?}");
    // Read where the session is, which records its usage first.
    let left = api_b.remaining("ada", "conversational_seconds").await;
    assert!((58.0..60.0).contains(&left), "{left} s left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_on_a_humans_sessions_counts_those_on_every_server() {
    let Some(server) = postgres::server("the_cap_on_a_humans_sessions_counts") else {
        return;
    };
    let pair = Pair::start(&server, &["--max-sessions-per-human", "2"]).await;
    let (api_a, api_b) = (pair.api_a(), pair.api_b());
    let token = api_a.mint_seconds("ada", 60.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let first = api_a.connect(&token).await;
    let _second = api_b.connect(&token).await;
    for api in [&api_a, &api_b] {
        let (status, body) = api.refused(&path).await;
        assert_eq!((status.as_u16(), body["type"].as_str()), (429, Some("too_many_sessions")));
    }
    // Once one ends, the other server admits one again.
    first.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let request = format!("{}{path}", api_b.ws_base);
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(request)
                .unwrap();
        if api_b.connect_request(request).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no session was admitted once one had ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_with_9_has_its_sessions_closed_out_by_the_other() {
    let Some(server) = postgres::server("a_server_killed_with_9") else {
        return;
    };
    let pair = Pair::start(&server, &[]).await;
    let (api_a, api_b) = (pair.api_a(), pair.api_b());
    let token = api_a.mint_seconds("ada", 60.0).await;
    let on_a = api_a.connect(&token).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open_for = on_a.opened.elapsed();
    let Pair { a, b, url, _db, .. } = pair;
    a.kill();

    // B closes the session out once A has been silent for three ticks.
    let admin = Pair::admin_of(&url).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let row = loop {
        let sql = "SELECT end_reason, charged FROM sessions WHERE ended_at IS NOT NULL";
        if let Some(row) = admin.query_opt(sql, &[]).await.unwrap() {
            break row;
        }
        assert!(Instant::now() < deadline, "the killed server's session was never closed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (reason, charged): (String, i64) = (row.get(0), row.get(1));
    assert_eq!(reason, "instance_lost");
    let charged = Duration::from_millis(charged as u64);
    assert!(charged <= open_for + SLACK, "charged {charged:?} of {open_for:?}");
    assert!(charged + TICK + SLACK >= open_for, "charged {charged:?} of {open_for:?}");
    let sql = "SELECT lost FROM instances WHERE ended_at IS NOT NULL";
    let lost: Vec<bool> = admin.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(lost, vec![true]);

    // The pool was charged what the session was, and B serves on.
    let left = api_b.remaining("ada", "conversational_seconds").await;
    common::assert_near(left, 60.0 - charged.as_secs_f64(), 0.001);
    let db = common::Db::Postgres(url.clone());
    common::assert_ledger_identity(&db);
    let again = api_b.connect(&token).await;
    again.close().await;
    for line in ["went silent; closing it out", "left open sessions=1 completions=0"] {
        let logged = b.logged(line, Duration::from_secs(5));
        assert!(logged.is_ok(), "{line} not logged: {logged:?}");
    }
}

impl Pair {
    async fn admin_of(url: &str) -> tokio_postgres::Client {
        let (admin, connection) =
            tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        admin
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_dispatchers_on_one_outbox_each_webhook_event_is_delivered_once() {
    let Some(server) = postgres::server("with_two_dispatchers_on_one_outbox") else {
        return;
    };
    let receiver = Receiver::start().await;
    let pair = Pair::start(&server, &[]).await;
    let (api_a, api_b) = (pair.api_a(), pair.api_b());
    let hook = json!({ "url": receiver.url, "events": ["usage_token.revoked"] });
    let (status, body) = api_a.backend(reqwest::Method::PUT, "/v1/webhook", hook).await;
    assert_eq!(status, 201, "{body}");
    // Events made through either server, each read by both dispatchers.
    const EVENTS: usize = 40;
    for n in 0..EVENTS {
        let api = if n % 2 == 0 { &api_a } else { &api_b };
        let human = format!("h{n}");
        api.mint_seconds(&human, 10.0).await;
        let (status, _) = api.post("/v1/usage/token/revoke", json!({ "human": human })).await;
        assert_eq!(status, 200);
    }

    receiver.until(|events| events.len() >= EVENTS).await;
    // A second delivery of any of them would come within a poll or two.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = receiver.got();
    let ids: HashSet<&str> = got.iter().map(|delivered| delivered.header("webhook-id")).collect();
    assert_eq!((got.len(), ids.len()), (EVENTS, EVENTS));
}
