//! When usage cannot be written the server fails closed: open sessions are
//! cut with 1011, new ones are refused with 503, and once writing works
//! again everything recorded late is still in the ledger.

mod common;

use std::time::Duration;

use common::*;
use tokio::time::sleep;

#[tokio::test]
async fn a_store_that_cannot_be_written_closes_sessions_and_refuses_new_ones_until_it_recovers() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(300)).await;

    // Another process takes the database's write lock and keeps it.
    let blocker = rusqlite::Connection::open(&server.db_path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let locked_at = client.opened.elapsed().as_secs_f64();

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1011), "internal"));
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (503, Some("unavailable")), "{body}");
    let health = server.http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);

    blocker.execute_batch("ROLLBACK").unwrap();
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
}
