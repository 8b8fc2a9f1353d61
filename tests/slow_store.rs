//! The meter while the store is slow: another process holds the database's
//! write lock for less than the store waits for it (SQLite's busy timeout,
//! PostgreSQL's lock timeout), so writes wait but do not fail (one test
//! holds it longer, so that they do). Cut-offs must not wait, and what happens while a commit waits
//! (sessions ending, opening, being refunded) must still be charged right.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::sleep;

const CONVERSATIONAL: &str = "conversational_seconds";

/// A tick too slow to explain anything these tests see.
const SLOW_TICK: Duration = Duration::from_secs(10);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[tokio::test]
async fn a_cut_off_does_not_wait_for_the_store() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 1.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;
    let blocker = hold_write_lock(&server, ms(700), ms(600));

    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 1.0, 0.1);
    blocker.await.unwrap();
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows, vec![(Some("usage_limit_exceeded".to_owned()), 1000)]);
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_session_that_left_while_its_end_waits_for_the_store_is_counted_in_the_cut_off() {
    // 2 s shared by two sessions; one leaves at 0.8 s, its end waiting for
    // the store: the other has 2 - 0.8 - 0.8 = 0.4 s left, and is cut off at
    // 1.2 s, not at 2 s.
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 2.0).await;
    let mut stays = server.connect(&token).await;
    let leaves = server.connect(&token).await;
    stays.next_event().await;
    let blocker = hold_write_lock(&server, ms(700), ms(1000));
    sleep(ms(800)).await;
    let left_at = stays.opened.elapsed().as_secs_f64();
    tokio::spawn(leaves.close());

    let closed = stays.until_closed().await;
    blocker.await.unwrap();
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 2.0 - left_at, 0.1);
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows.iter().map(|(_, charged)| charged).sum::<i64>(), 2000);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_warning_does_not_wait_for_the_store() {
    // 3 s shared by two sessions, the warning line at 1.5 s; one leaves at
    // 0.6 s, its end waiting for the store until 1.5 s. The other is left
    // with 3 - 0.6 - 0.6 = 1.8 s, and crosses the line at 0.9 s, while that
    // commit still waits.
    let server = TestServer::start_with(|s| {
        s.tick = SLOW_TICK;
        s.warn = Duration::from_millis(1500);
    })
    .await;
    let token = server.mint_seconds("ada", 3.0).await;
    let mut stays = server.connect(&token).await;
    let leaves = server.connect(&token).await;
    stays.next_event().await;
    let blocker = hold_write_lock(&server, ms(500), ms(1000));
    sleep(ms(600)).await;
    let left_at = stays.opened.elapsed().as_secs_f64();
    tokio::spawn(leaves.close());

    let warning = stays.event_of("usage.warning").await;
    let warned_at = stays.opened.elapsed().as_secs_f64();
    assert!(warning["remaining"].as_f64().unwrap() < 1.5, "{warning}");
    assert_near(warned_at, 3.0 - left_at - 1.5, 0.15);
    let closed = stays.until_closed().await;
    blocker.await.unwrap();
    assert_eq!(closed.code, Some(4001));
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_session_admitted_as_its_pool_runs_dry_is_closed_on_the_stores_figures() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 1.5).await;
    let mut first = server.connect(&token).await;
    first.next_event().await;

    // The second session's admission waits for the lock while the first
    // runs the pool dry, so the admission read 1.5 s that no longer exist.
    let blocker = hold_write_lock(&server, ms(1200), ms(400));
    sleep(ms(1300)).await;
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("{}{path}", server.ws_base),
    )
    .unwrap();
    let (first_closed, second) =
        tokio::join!(first.until_closed(), server.connect_request(request));
    blocker.await.unwrap();
    assert_eq!(first_closed.code, Some(4001));
    assert_near(first_closed.after, 1.5, 0.1);

    // Admitted or refused, it may not run on time that is gone.
    if let Ok(mut second) = second {
        let second_closed = second.until_closed().await;
        assert_eq!(second_closed.code, Some(4001));
        assert!(second_closed.after < 0.2, "ran {:.3} s on an empty pool", second_closed.after);
    }
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_change_is_refused_when_the_usage_before_it_cannot_be_recorded() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;
    // Held half a second past the store's wait for it, so the writes fail.
    let blocker = hold_write_lock(&server, ms(300), server.db().lock_wait() + ms(500));
    sleep(ms(400)).await;

    let set = json!({ "human": "ada", "limits": [{ "type": CONVERSATIONAL, "value": 10 }] });
    let (status, body) = server.put("/v1/usage/token", set.clone()).await;
    assert_eq!((status.as_u16(), &body["type"]), (503, &json!("unavailable")), "{body}");
    assert_eq!(client.until_closed().await.code, Some(1011));
    blocker.await.unwrap();

    // Once the store works again the change goes through, after the usage
    // from before it was recorded against the old limit.
    let mut status = 0;
    for _ in 0..100 {
        status = server.put("/v1/usage/token", set.clone()).await.0.as_u16();
        if status == 200 {
            break;
        }
        sleep(ms(50)).await;
    }
    assert_eq!(status, 200);
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 10.0);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_session_that_ends_while_a_commit_waits_keeps_its_own_end() {
    // ada's two sessions share 2 s; while bob's end waits for the store,
    // one of ada's leaves at 0.8 s. It must be recorded as the client's
    // close, charged 0.8 s, and the other must get the 0.4 s left.
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let ada = server.mint_seconds("ada", 2.0).await;
    let bob = server.mint_seconds("bob", 30.0).await;
    let mut stays = server.connect(&ada).await;
    let leaves = server.connect(&ada).await;
    let other = server.connect(&bob).await;
    stays.next_event().await;
    let blocker = hold_write_lock(&server, ms(500), ms(900));
    sleep(ms(600)).await;
    tokio::spawn(other.close());
    sleep(ms(200)).await;
    let left_at = stays.opened.elapsed().as_secs_f64();
    tokio::spawn(leaves.close());

    let closed = stays.until_closed().await;
    blocker.await.unwrap();
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows[1].0.as_deref(), Some("client_closed"));
    assert_near(rows[1].1 as f64 / 1000.0, left_at, 0.05);
    assert_near(closed.after, 2.0 - left_at, 0.1);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_refund_still_being_recorded_holds_back_a_cut_off_it_would_undo() {
    // A live session and a dead one share 2 s. The dead one is found at
    // 0.6 s and owed what it was charged since its last frame; while that
    // refund waits for the store, the pool must not be cut off on figures
    // that leave the refund out.
    let server = TestServer::start_with(|s| {
        s.tick = Duration::from_secs(4);
        s.ping = ms(300);
    })
    .await;
    let token = server.mint_seconds("ada", 2.0).await;
    let mut live = server.connect(&token).await;
    let dead = server.connect(&token).await;
    live.next_event().await;
    let live = tokio::spawn(async move { live.until_closed().await });
    let blocker = hold_write_lock(&server, ms(580), ms(1000));
    sleep(ms(450)).await;
    // Charges both sessions up to now, so that the dead one is owed 0.45 s.
    let nothing = json!({ "human": "ada", "mode": "add",
                          "limits": [{ "type": CONVERSATIONAL, "value": 0 }] });
    assert_eq!(server.put("/v1/usage/token", nothing).await.0, 200);

    let closed = live.await.unwrap();
    blocker.await.unwrap();
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows[1].0.as_deref(), Some("client_timeout"));
    assert_eq!(closed.code, Some(4001));
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0, "closed with time left");
    assert_ledger_identity(&server.db());
    drop(dead);
}

#[tokio::test]
async fn a_cut_off_made_while_a_commit_waits_is_recorded_as_soon_as_it_can_be() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let ada = server.mint_seconds("ada", 1.0).await;
    let bob = server.mint_seconds("bob", 30.0).await;
    let mut client = server.connect(&ada).await;
    let other = server.connect(&bob).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    let blocker = hold_write_lock(&server, ms(500), ms(800));
    sleep(ms(600)).await;
    tokio::spawn(other.close());

    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 1.0, 0.1);
    blocker.await.unwrap();
    let mut row = session_row(&server.db(), &session_id);
    for _ in 0..20 {
        if row.0.is_some() {
            break;
        }
        sleep(ms(25)).await;
        row = session_row(&server.db(), &session_id);
    }
    assert_eq!(row, (Some("usage_limit_exceeded".to_owned()), 1000), "not recorded in time");
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
}
