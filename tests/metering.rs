//! Metering of realtime sessions against the real server: cut-offs,
//! shared pools, top-ups, revocation, disconnects and dead clients.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const CONVERSATIONAL: &str = "conversational_seconds";

/// How close a cut-off must come to the instant the pool runs dry.
const PRECISION: f64 = 0.1;

/// A tick too slow to explain anything a test sees: what happens must come
/// from the cut-off timers and from the API's changes reaching the meter.
const SLOW_TICK: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_session_is_cut_off_when_its_seconds_run_out() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 1.5).await;
    let mut client = server.connect(&token).await;
    let started = client.next_event().await;
    assert_eq!(started["type"], "usage.session_started");
    assert_eq!(started["remaining"], 1.5);

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4001), "usage_limit_exceeded"));
    assert_near(closed.after, 1.5, PRECISION);
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
    let db = server.db();
    assert_ledger_identity(&db);
    let (reason, charged) = session_row(&db, started["session_id"].as_str().unwrap());
    assert_eq!((reason.as_deref(), charged), (Some("usage_limit_exceeded"), 1500));
}

#[tokio::test]
async fn the_cut_off_does_not_wait_for_the_next_tick() {
    let server = TestServer::start_with(|s| s.tick = Duration::from_secs(5)).await;
    let token = server.mint_seconds("ada", 1.3).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 1.3, PRECISION);
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
}

#[tokio::test]
async fn two_sessions_of_one_human_drain_one_pool_together() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 2.0).await;
    let mut first = server.connect(&token).await;
    let mut second = server.connect(&token).await;
    let (first, second) = tokio::join!(first.until_closed(), second.until_closed());
    for closed in [&first, &second] {
        assert_eq!(closed.code, Some(4001));
        assert_near(closed.after, 1.0, PRECISION);
    }
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_session_that_joins_later_shares_what_is_left() {
    // 2 s for one session; a second joins after 0.5 s, when 1.5 s are left,
    // and the two drain those in 0.75 s: both close 1.25 s after the first
    // opened.
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 2.0).await;
    let mut first = server.connect(&token).await;
    sleep(Duration::from_millis(500)).await;
    let mut second = server.connect(&token).await;
    let opened_first = first.opened;
    let (_, second_closed) = tokio::join!(first.until_closed(), second.until_closed());
    assert_eq!(second_closed.code, Some(4001));
    let second_after_first_opened =
        (second.opened - opened_first).as_secs_f64() + second_closed.after;
    assert_near(second_after_first_opened, 1.25, PRECISION);
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
}

#[tokio::test]
async fn a_pool_too_large_to_run_dry_in_years_is_metered_like_any_other() {
    let server = TestServer::start().await;
    let vast = server.mint_seconds("ada", 1e12).await;
    let small = server.mint_seconds("bob", 0.5).await;
    let mut vast = server.connect_ticking(&vast).await;
    assert_eq!(vast.next_event().await["remaining"], 1e12);
    vast.event_of("usage.remaining").await;

    let closed = server.connect(&small).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 0.5, PRECISION);
    // And the vast pool is being charged all the while.
    for _ in 0..100 {
        if vast.event_of("usage.remaining").await["remaining"].as_f64().unwrap() < 1e12 {
            return;
        }
    }
    panic!("the vast pool was never charged");
}

#[tokio::test]
async fn a_top_up_mid_session_lets_it_go_on() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 1.0).await;
    let mut client = server.connect(&token).await;
    sleep(Duration::from_millis(500)).await;
    let top_up = json!({
        "human": "ada",
        "mode": "add",
        "limits": [{ "type": CONVERSATIONAL, "value": 1.5 }],
    });
    let (status, body) = server.put("/v1/usage/token", top_up).await;
    assert_eq!(status, 200, "{body}");

    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 2.5, PRECISION);
    let most = closed.events.iter().filter_map(|e| e["remaining"].as_f64()).fold(0.0, f64::max);
    assert!(most > 1.0, "the top-up never showed in usage.remaining: {:?}", closed.events);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn setting_the_limit_to_zero_closes_the_session_at_once() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(300)).await;
    let zero = json!({ "human": "ada", "limits": [{ "type": CONVERSATIONAL, "value": 0 }] });
    assert_eq!(server.put("/v1/usage/token", zero).await.0, 200);

    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 0.3, PRECISION);
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
    // The time up to the change was charged against the limit it had.
    let (_, charged) = wait_for_end(&server, &session_id).await;
    assert_near(charged as f64 / 1000.0, 0.3, PRECISION);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn lowering_a_limit_counts_the_time_used_until_then_against_the_old_one() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(600)).await;
    let lower = json!({ "human": "ada", "limits": [{ "type": CONVERSATIONAL, "value": 0.5 }] });
    assert_eq!(server.put("/v1/usage/token", lower).await.0, 200);

    // 0.6 s at the old limit, then the 0.5 s the new one leaves.
    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 1.1, PRECISION);
    let (_, charged) = wait_for_end(&server, &session_id).await;
    assert_near(charged as f64 / 1000.0, closed.after, 0.05);
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn revoking_closes_the_session_at_once_and_the_token_stops_working() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    sleep(Duration::from_millis(300)).await;
    let (status, body) = server.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await;
    assert_eq!((status.as_u16(), &body["revoked_tokens"]), (200, &json!(1)));

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4002), "token_revoked"));
    assert_near(closed.after, 0.3, PRECISION);
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), &body["type"]), (401, &json!("token_revoked")));
}

#[tokio::test]
async fn revoking_also_closes_sessions_opened_with_the_api_key() {
    let server = TestServer::start().await;
    server.mint_seconds("ada", 30.0).await;
    let mut client = connect_with_key(&server, "ada").await;
    client.next_event().await;
    assert_eq!(server.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await.0, 200);
    assert_eq!(client.until_closed().await.code, Some(4002));
}

#[tokio::test]
async fn a_client_that_disconnects_is_charged_up_to_the_moment_it_left() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 10.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(1230)).await;
    let used = client.opened.elapsed().as_secs_f64();
    drop(client);

    let (reason, charged) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_disconnected");
    assert_near(charged as f64 / 1000.0, used, 0.05);
    assert_near(server.remaining("ada", CONVERSATIONAL).await, 10.0 - used, 0.05);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_client_that_closes_is_charged_up_to_its_close_frame() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 10.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(700)).await;
    let used = client.opened.elapsed().as_secs_f64();
    client.close().await;

    let (reason, charged) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_closed");
    assert_near(charged as f64 / 1000.0, used, 0.05);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_dead_client_is_dropped_and_charged_only_up_to_its_last_frame() {
    let server = TestServer::start_with(|s| s.ping = Duration::from_millis(200)).await;
    let token = server.mint_seconds("ada", 10.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(300)).await;
    client.send(Message::Binary(vec![0u8; 640].into())).await;
    let last_frame = client.opened.elapsed().as_secs_f64();

    // From here the client neither reads nor sends: it answers no pings.
    let (reason, charged) = wait_for_end(&server, &session_id).await;
    let dropped_after = client.opened.elapsed().as_secs_f64();
    assert_eq!(reason, "client_timeout");
    assert!(dropped_after >= last_frame + 0.4, "dropped after {dropped_after} s");
    assert_near(charged as f64 / 1000.0, last_frame, 0.05);
    assert_near(server.remaining("ada", CONVERSATIONAL).await, 10.0 - last_frame, 0.05);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_dead_clients_refund_never_lifts_a_pool_above_a_value_set_since() {
    let server = TestServer::start_with(|s| s.ping = Duration::from_millis(500)).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    client.send(Message::Text("last words".into())).await;

    // The client falls silent; while it is, the backend sets the limit.
    sleep(Duration::from_millis(600)).await;
    let set = json!({ "human": "ada", "limits": [{ "type": CONVERSATIONAL, "value": 10 }] });
    assert_eq!(server.put("/v1/usage/token", set).await.0, 200);
    let (reason, _) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_timeout");

    // Everything after the set is given back, nothing from before it (save
    // what the meter had not yet recorded at the set, at most a tick).
    let remaining = server.remaining("ada", CONVERSATIONAL).await;
    let tick = TEST_TICK.as_secs_f64();
    assert!(remaining <= 10.0 + tick + 0.01, "the refund lifted the pool to {remaining}");
    assert!(remaining >= 10.0 - 0.05, "post-set time was not given back: {remaining}");
    assert_ledger_identity(&server.db());
    drop(client);
}

#[tokio::test]
async fn a_client_that_answers_pings_is_kept() {
    let server = TestServer::start_with(|s| s.ping = Duration::from_millis(100)).await;
    let token = server.mint_seconds("ada", 1.0).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!(closed.code, Some(4001), "dropped although it answered every ping");
}

#[tokio::test]
async fn a_session_ends_at_the_server_wide_time_limit() {
    let server = TestServer::start_with(|s| s.max_session = Duration::from_millis(800)).await;
    let token = server.mint("ada", json!([])).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4004), "session_time_limit"));
    assert_near(closed.after, 0.8, PRECISION);
}

#[tokio::test]
async fn a_human_without_a_limit_is_metered_but_never_cut_off() {
    let server = TestServer::start().await;
    let token = server.mint("ada", json!([])).await;
    let mut client = server.connect(&token).await;
    let started = client.next_event().await;
    assert_eq!(started["remaining"], Value::Null);
    let remaining = client.event_of("usage.remaining").await;
    assert_eq!(remaining["remaining"], Value::Null);
    sleep(Duration::from_millis(400)).await;
    client.close().await;

    let session_id = started["session_id"].as_str().unwrap();
    let (_, charged) = wait_for_end(&server, session_id).await;
    assert!(charged >= 400, "charged {charged} ms");
    assert_eq!(server.limits_of("ada").await, json!([]));
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_session_starts_with_one_usage_remaining_and_nothing_more_until_a_tick() {
    // Slower than SLOW_TICK: the meter tells a tenth of the sessions their
    // figures at each tenth of a tick, and the twenty sessions may take more
    // than a second to open (on PostgreSQL, one admission per commit, or on
    // a busy machine), after which the first would hear from its turn.
    let server = TestServer::start_with(|s| {
        s.tick = Duration::from_secs(60);
        s.warn = Duration::from_secs(60);
    })
    .await;
    // Each session opens a pool of its own; how the meter's first messages
    // interleave with the session's differs from one to the next.
    let mut clients = Vec::new();
    for human in 0..20 {
        let token = server.mint_seconds(&format!("human {human}"), 30.0).await;
        clients.push(server.connect(&token).await);
    }
    let seen = futures::future::join_all(clients.iter_mut().map(events_until_quiet)).await;
    for events in seen {
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let expected = ["usage.session_started", "usage.remaining", "usage.warning"];
        assert_eq!(types, expected, "{events:?}");
        assert_near(events[1]["remaining"].as_f64().unwrap(), 30.0, 0.05);
    }
}

/// The `usage.*` messages a client gets until none comes for half a second.
async fn events_until_quiet(client: &mut Client) -> Vec<Value> {
    let quiet = Duration::from_millis(500);
    let mut events = Vec::new();
    while let Ok(event) = tokio::time::timeout(quiet, client.next_event()).await {
        events.push(event);
    }
    events
}

#[tokio::test]
async fn usage_messages_count_down_and_warn_once_per_crossing() {
    let server = TestServer::start_with(|s| s.warn = Duration::from_secs(1)).await;
    let token = server.mint_seconds("ada", 1.4).await;
    let mut client = server.connect_ticking(&token).await;
    let warning = client.event_of("usage.warning").await;
    assert!(warning["remaining"].as_f64().unwrap() < 1.0, "{warning}");

    let lift = json!({ "human": "ada", "limits": [{ "type": CONVERSATIONAL, "value": 1.6 }] });
    assert_eq!(server.put("/v1/usage/token", lift).await.0, 200);
    let closed = client.until_closed().await;
    let warnings = closed.events.iter().filter(|e| e["type"] == "usage.warning").count();
    assert_eq!(warnings, 1, "one more warning after the top-up: {:?}", closed.events);

    let remaining: Vec<f64> = closed
        .events
        .iter()
        .filter(|e| e["type"] == "usage.remaining")
        .map(|e| e["remaining"].as_f64().unwrap())
        .collect();
    assert!(remaining.len() >= 10, "too few usage.remaining: {remaining:?}");
    let lifted = remaining.iter().position(|r| *r > 1.0).expect("the top-up shows");
    assert!(remaining[lifted..].windows(2).all(|w| w[1] <= w[0]), "{remaining:?}");
}

#[tokio::test]
async fn by_default_usage_remaining_is_sent_when_the_count_down_would_be_wrong() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut first = server.connect(&token).await;
    let told = first.event_of("usage.remaining").await;
    let told_at = Instant::now();
    assert_eq!(told["sessions"], 1, "{told}");
    let steady = events_until_quiet(&mut first).await;
    assert!(steady.is_empty(), "sent during a steady count-down: {steady:?}");

    // The client's count-down from the last message matches the pool.
    let counted_down = told["remaining"].as_f64().unwrap() - told_at.elapsed().as_secs_f64();
    assert_near(server.remaining("ada", CONVERSATIONAL).await, counted_down, 0.1);

    let second = server.connect(&token).await;
    let joined = first.event_of("usage.remaining").await;
    assert_eq!(joined["sessions"], 2, "{joined}");
    let top_up = json!({
        "human": "ada",
        "mode": "add",
        "limits": [{ "type": CONVERSATIONAL, "value": 100 }],
    });
    assert_eq!(server.put("/v1/usage/token", top_up).await.0, 200);
    let topped_up = first.event_of("usage.remaining").await;
    assert!(topped_up["remaining"].as_f64().unwrap() > 100.0, "{topped_up}");
    second.close().await;
    let left = first.event_of("usage.remaining").await;
    assert_eq!(left["sessions"], 1, "{left}");
}

#[tokio::test]
async fn the_pools_other_sessions_hear_at_once_when_one_opens_or_ends() {
    // Ticks far apart: a message that waited for the first session's turn
    // would come seconds late.
    let server = TestServer::start_with(|s| s.tick = Duration::from_secs(20)).await;
    let token = server.mint_seconds("ada", 300.0).await;
    let mut first = server.connect(&token).await;
    first.event_of("usage.remaining").await;
    let soon = Duration::from_millis(300);

    let second = server.connect(&token).await;
    let joined = tokio::time::timeout(soon, first.event_of("usage.remaining")).await;
    assert_eq!(joined.expect("not told of the second session")["sessions"], 2);
    second.close().await;
    let left = tokio::time::timeout(soon, first.event_of("usage.remaining")).await;
    assert_eq!(left.expect("not told the second session ended")["sessions"], 1);
}

#[tokio::test]
async fn by_default_a_session_is_warned_when_its_pool_crosses_the_line() {
    // Ticks far apart: nothing but the pool's own timer tells the session
    // before its pool runs dry.
    let server = TestServer::start_with(|s| {
        s.tick = Duration::from_secs(20);
        s.warn = Duration::from_secs(1);
    })
    .await;
    let token = server.mint_seconds("ada", 1.5).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));

    let warning = closed.events.iter().find(|e| e["type"] == "usage.warning");
    let warning = warning.expect("no warning before the pool ran dry");
    let remaining = warning["remaining"].as_f64().unwrap();
    assert!(remaining < 1.0 && remaining > 0.5, "warned late or early: {warning}");
    let told: Vec<f64> = closed
        .events
        .iter()
        .filter(|e| e["type"] == "usage.remaining")
        .map(|e| e["remaining"].as_f64().unwrap())
        .collect();
    assert!(told.len() >= 2 && told[0] > 1.0, "{told:?}");
    assert!(told[1..].iter().all(|left| *left < 1.0), "sent above the line: {told:?}");
}

#[tokio::test]
async fn every_session_opening_a_pool_hears_its_figures_however_short_the_tick() {
    // Ticks this short often come before the commit that follows an open:
    // the tick's commit must then tell the session its first figures.
    let server = TestServer::start_with(|s| s.tick = Duration::from_millis(10)).await;
    let mut tokens = Vec::new();
    for n in 0..200 {
        tokens.push(server.mint_seconds(&format!("human-{n}"), 30.0).await);
    }
    let clients = futures::future::join_all(tokens.iter().map(|t| server.connect(t))).await;
    let told = clients.into_iter().map(|mut client| async move {
        let first =
            tokio::time::timeout(Duration::from_secs(5), client.event_of("usage.remaining"));
        first.await.is_ok()
    });
    let told = futures::future::join_all(told).await;
    assert_eq!(told.iter().filter(|told| !**told).count(), 0, "sessions never told");
}

#[tokio::test]
async fn events_none_gives_a_pure_echo() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 5.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
    let mut client = server.connect_to(&path).await;
    sleep(Duration::from_millis(200)).await;
    client.send(Message::Text("hello".into())).await;
    assert_eq!(next_data(&mut client).await, Message::Text("hello".into()));
}

#[tokio::test]
async fn the_echo_returns_text_and_binary_frames_unchanged() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 5.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
    let mut client = server.connect_to(&path).await;
    let audio: Vec<u8> = (0..640).map(|i| (i % 251) as u8).collect();
    client.send(Message::Binary(audio.clone().into())).await;
    client.send(Message::Text("héllo".into())).await;
    assert_eq!(next_data(&mut client).await, Message::Binary(audio.into()));
    assert_eq!(next_data(&mut client).await, Message::Text("héllo".into()));
}

#[tokio::test]
async fn a_voice_synthesis_session_debits_voice_synthesis_seconds() {
    let server = TestServer::start().await;
    let limits = json!([
        { "type": "voice_synthesis_seconds", "value": 0.6 },
        { "type": CONVERSATIONAL, "value": 30 },
    ]);
    let token = server.mint("ada", limits).await;
    let path = format!("/v1/realtime/session?kind=voice_synthesis&token={token}");
    let closed = server.connect_to(&path).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 0.6, PRECISION);
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", "voice_synthesis_seconds").await, 0.0);
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 30.0);
}

#[tokio::test]
async fn a_spent_limit_refuses_the_session_before_the_upgrade() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 0.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), &body["type"]), (429, &json!("usage_limit_exceeded")));
    let db = server.db();
    let sessions = db.query_i64("SELECT COUNT(*) FROM sessions", &[]);
    assert_eq!(sessions, 0);
}

#[tokio::test]
async fn sessions_over_the_per_human_cap_are_refused() {
    let server = TestServer::start_with(|s| s.max_sessions_per_human = Some(1)).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let other = server.mint_seconds("bob", 30.0).await;
    let mut first = server.connect(&token).await;
    let started = first.event_of("usage.session_started").await;
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), &body["type"]), (429, &json!("too_many_sessions")));
    server.connect(&other).await;

    first.close().await;
    // The cap counts the sessions the store has open; the end is recorded
    // just after the close.
    wait_for_end(&server, started["session_id"].as_str().unwrap()).await;
    let mut again = server.connect(&token).await;
    assert_eq!(again.next_event().await["type"], "usage.session_started");
}

// On more than one thread: taking the lock blocks the test's thread until
// it is held, and on PostgreSQL may wait for a transaction of the server's
// own, which must go on running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_session_is_being_recorded_leaves_nothing_open() {
    let server = TestServer::start_with(|s| s.max_sessions_per_human = Some(1)).await;
    let token = server.mint_seconds("ada", 60.0).await;

    // Another process holds the write lock for a moment, so that the
    // upgrade request waits in the store while its client gives up.
    let blocker = lock::WriteLock::take(&server.db());
    give_up_upgrade(&server, &token, Duration::from_millis(100)).await;
    sleep(Duration::from_millis(100)).await;
    blocker.release();

    // The session is recorded once the lock is gone, then ended as
    // abandoned; it must not stay open.
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows, vec![(Some("upgrade_failed".to_owned()), 0)]);
    let mut again = server.connect(&token).await;
    assert_eq!(again.next_event().await["type"], "usage.session_started");
}

#[tokio::test]
async fn refusals_before_the_upgrade_carry_their_error() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let cases = [
        (format!("/v1/realtime/session?kind=video&token={token}"), 400, "invalid_input"),
        (format!("/v1/realtime/session?token={token}"), 400, "invalid_input"),
        (
            format!("/v1/realtime/session?kind=conversational&events=x&token={token}"),
            400,
            "invalid_input",
        ),
        ("/v1/realtime/session?kind=conversational".to_owned(), 401, "unauthorized"),
        ("/v1/realtime/session?kind=conversational&token=tgu_nope".to_owned(), 401, "unauthorized"),
    ];
    for (path, status, kind) in cases {
        let (got, body) = server.refused(&path).await;
        assert_eq!((got.as_u16(), body["type"].as_str()), (status, Some(kind)), "{path}");
    }
}

#[tokio::test]
async fn an_expired_token_opens_no_session() {
    let server = TestServer::start().await;
    let body = json!({ "human": "ada", "ttl_seconds": 0.2 });
    let (_, minted) = server.post("/v1/usage/token", body).await;
    sleep(Duration::from_millis(300)).await;
    let token = minted["token"].as_str().unwrap();
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), &body["type"]), (401, &json!("token_expired")));
}

#[tokio::test]
async fn a_bearer_header_or_an_api_key_with_a_human_opens_a_session() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let url = format!("{}/v1/realtime/session?kind=conversational", server.ws_base);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut bearer = server.connect_request(request).await.expect("bearer admitted");
    assert_eq!(bearer.next_event().await["human"], "ada");

    let mut keyed = connect_with_key(&server, "carol").await;
    let started = keyed.next_event().await;
    assert_eq!((&started["human"], &started["remaining"]), (&json!("carol"), &Value::Null));
}

#[tokio::test]
async fn shutting_down_closes_sessions_with_1001_and_records_their_usage() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(600)).await;
    let used = client.opened.elapsed().as_secs_f64();
    let (closed, database) = tokio::join!(client.until_closed(), server.shutdown());
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1001), "server_shutdown"));

    let db = database.db();
    let (reason, charged) = session_row(&db, &session_id);
    assert_eq!(reason.as_deref(), Some("server_shutdown"));
    assert_near(charged as f64 / 1000.0, used, 0.05);
    assert_ledger_identity(&db);
}

/// Opens a session with the API key, for `human`.
async fn connect_with_key(server: &TestServer, human: &str) -> Client {
    server.connect_request(server.key_request(human)).await.expect("key and human admitted")
}

/// The next text or binary frame that is not a `usage.*` message.
async fn next_data(client: &mut Client) -> Message {
    loop {
        match client.next_message().await.expect("connection open") {
            Message::Text(text) if text.starts_with("{\"type\":\"usage.") => continue,
            message @ (Message::Text(_) | Message::Binary(_)) => return message,
            _ => continue,
        }
    }
}
