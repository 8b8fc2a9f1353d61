//! When usage cannot be written the server fails closed: open sessions are
//! cut with 1011, new ones are refused with 503, and once writing works
//! again everything recorded late is still in the ledger; a batch refused
//! again and again is logged at its resends. Two faults are
//! made here: a lock another process holds, on either backend, and a
//! SQLite database grown past the server's cap. A database that turns
//! read-only under a running server is not tested: tests may run as root,
//! whom file modes do not stop, and what does (a read-only remount, an
//! immutable attribute) needs privileges and file systems a test cannot
//! count on; SQLite's answer to it takes the same path in the store as the
//! lock's.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::sleep;

// On more than one thread: taking the lock blocks the test's thread until
// it is held, and on PostgreSQL may wait for a transaction of the server's
// own, which must go on running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_closes_sessions_and_refuses_new_ones_until_it_recovers() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(300)).await;

    // Another process takes the database's write lock and keeps it.
    let blocker = lock::WriteLock::take(&server.db());
    let locked_at = client.opened.elapsed().as_secs_f64();

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1011), "internal"));
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (503, Some("unavailable")), "{body}");
    // A backend opening a session for a human not yet known is refused
    // before the human is made, not once making it has waited on the lock.
    let Err((status, body)) = server.connect_request(server.key_request("newcomer")).await else {
        panic!("a session for a new human was admitted");
    };
    assert_eq!(status.as_u16(), 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.starts_with("usage cannot be recorded"), "{body}");
    let health = server.http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);

    blocker.release();
    let mut recovered = None;
    for _ in 0..100 {
        if server.http.get(server.url("/healthz")).send().await.unwrap().status() == 200 {
            recovered = Some(server.connect(&token).await);
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    let mut again = recovered.expect("the server recovered once the lock was released");
    assert_eq!(again.next_event().await["type"], "usage.session_started");

    // The session was charged for all the time it ran, up to the moment
    // the failure closed it, though that could only be written once the
    // lock was gone.
    let db = server.db();
    assert_ledger_identity(&db);
    let (reason, charged) = session_row(&db, &session_id);
    assert_eq!(reason.as_deref(), Some("internal"));
    assert!(closed.after > locked_at + 0.5, "closed before the busy timeout ran out");
    assert_near(charged as f64 / 1000.0, closed.after, 0.1);
    let made = db.query_i64("SELECT COUNT(*) FROM humans WHERE external_id = 'newcomer'", &[]);
    assert_eq!(made, 0, "a refused upgrade made a human");
}

#[tokio::test]
async fn a_batch_the_store_keeps_refusing_is_logged_at_each_resend_with_its_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let process = binary::spawn(&db, &["--tick-ms", "100"], "info");
    let api = Api::new(process.base.trim_start_matches("http://"), process.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;

    let blocker = lock::WriteLock::take(&Db::Sqlite(db.clone()));
    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(1011));
    let refused = |line: &String| line.contains("sent again was refused");
    let attempts = |n: u32| format!("attempts={n}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !process.stderr().iter().any(|line| refused(line) && line.contains(&attempts(1))) {
        assert!(std::time::Instant::now() < deadline, "{:?}", process.stderr());
        sleep(Duration::from_millis(50)).await;
    }
    blocker.release();
    wait_until_healthy(&api).await;
    assert_ledger_identity(&Db::Sqlite(db.clone()));
    drop(process);
}

/// The cap the full database is given, small enough to fill at once.
const CAP_MB: u64 = 1;

/// A server capped at [`CAP_MB`] with one session open for a while, and
/// the database then grown past the cap by a connection of another
/// process, without the cap, which the caller keeps to free the pages.
struct Filled {
    process: binary::Process,
    api: Api,
    token: String,
    client: Client,
    session_id: String,
    filler: rusqlite::Connection,
}

async fn filled(db: &std::path::Path) -> Filled {
    let process = binary::spawn(db, &CAPPED, "info");
    let api = Api::new(process.base.trim_start_matches("http://"), process.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(300)).await;

    let filler = rusqlite::Connection::open(db).unwrap();
    let blob = CAP_MB * 1024 * 1024;
    let fill =
        format!("CREATE TABLE filler (b BLOB); INSERT INTO filler VALUES (zeroblob({blob}))");
    filler.execute_batch(&fill).unwrap();
    Filled { process, api, token, client, session_id, filler }
}

/// The server's arguments: the cap of [`CAP_MB`] and a quick tick.
const CAPPED: [&str; 4] = ["--max-db-mb", "1", "--tick-ms", "50"];

/// Whether a test of a full database runs: the cap is a SQLite file's, and
/// a PostgreSQL server refuses it (`a_cap_on_the_database_is_refused_with_
/// postgres` in tests/postgres_process.rs); the nearest PostgreSQL fault,
/// a database that refuses connections, is
/// `sessions_are_closed_and_refused_while_postgres_refuses_connections`
/// there.
fn full_database_tested(test: &str) -> bool {
    sqlite_only(test, "the cap on a database's size (--max-db-mb) is SQLite's")
}

#[tokio::test]
async fn a_full_database_closes_sessions_and_refuses_new_ones_and_mints_until_pages_are_freed() {
    if !full_database_tested("a_full_database_closes_sessions_and_refuses_new_ones") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let Filled { process, api, token, mut client, session_id, filler } = filled(&db).await;

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1011), "internal"));
    assert_refused_while_full(&api, &token).await;
    let logged = process.stderr().join("\n");
    assert!(logged.contains("cannot record usage"), "{logged}");
    assert!(logged.contains("the database is full"), "{logged}");

    filler.execute_batch("DELETE FROM filler").unwrap();
    wait_until_healthy(&api).await;
    let mut again = api.connect(&token).await;
    assert_eq!(again.next_event().await["type"], "usage.session_started");
    assert_eq!(api.post("/v1/usage/token", json!({ "human": "bob" })).await.0, 200);

    // Everything before the fault is kept, and the session was charged
    // for all the time it ran, though that was written only once there
    // was room.
    let db = Db::Sqlite(db);
    assert_ledger_identity(&db);
    let (reason, charged) = session_row(&db, &session_id);
    assert_eq!(reason.as_deref(), Some("internal"));
    assert_near(charged as f64 / 1000.0, closed.after, 0.1);
    let left_after_it = 30.0 - charged as f64 / 1000.0;
    assert!(api.remaining("ada", "conversational_seconds").await <= left_after_it);
}

/// While the database is full: sessions refused with 503, mints with 503
/// `unavailable`, and `/healthz` says why.
async fn assert_refused_while_full(api: &Api, token: &str) {
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = api.refused(&path).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (503, Some("unavailable")), "{body}");
    let (status, body) = api.post("/v1/usage/token", json!({ "human": "bob" })).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (503, Some("unavailable")), "{body}");
    let health = api.http.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("the database is full"), "{body}");
}

/// Waits until `/healthz` answers 200, for at most five seconds.
async fn wait_until_healthy(api: &Api) {
    for _ in 0..100 {
        if api.http.get(api.url("/healthz")).send().await.unwrap().status() == 200 {
            return;
        }
        sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not recover once pages were freed");
}

#[tokio::test]
async fn a_server_killed_while_its_database_is_full_starts_again_and_closes_what_was_open() {
    if !full_database_tested("a_server_killed_while_its_database_is_full_starts_again") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let Filled { process, mut client, session_id, filler, .. } = filled(&db).await;
    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(1011));

    // Killed before the session's end could be written, and started again
    // on the database while it is still past its cap.
    process.kill();
    let restarted = binary::spawn(&db, &CAPPED, "info");
    let logged = restarted.stderr().join("\n");
    assert!(logged.contains("left open sessions=1"), "{logged}");
    let db = Db::Sqlite(db);
    let (reason, charged) = session_row(&db, &session_id);
    assert_eq!(reason.as_deref(), Some("server_restart"));
    assert!(charged > 0 && charged as f64 / 1000.0 <= closed.after + 0.05, "{charged} ms");
    assert_ledger_identity(&db);
    drop(filler);
}
