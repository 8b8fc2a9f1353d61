//! Sessions relayed to a real upstream (a WebSocket service written in the
//! tests, plain and TLS): frames both ways, the headers it is given, every
//! close path with the time it charged, an upstream that cannot be reached,
//! bursts faster than a client reads, and a client that stops reading, or
//! sends pings without reading their pongs.

mod common;

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use common::upstream::{TestUpstream, stalling, upstream_at};
use common::*;
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tollgate::config::{Settings, Upstream};

const CONVERSATIONAL: &str = "conversational_seconds";
const UPSTREAM_SECRET: &str = "Bearer upstream-secret";

fn upstream_settings(upstream: &TestUpstream) -> Upstream {
    let mut secret = HeaderValue::from_static(UPSTREAM_SECRET);
    secret.set_sensitive(true);
    let headers = vec![
        (HeaderName::from_static("x-region"), HeaderValue::from_static("eu")),
        (HeaderName::from_static("authorization"), secret),
    ];
    Upstream { headers, ..upstream_at(&upstream.url) }
}

async fn relayed_to(upstream: &TestUpstream, adjust: impl FnOnce(&mut Settings)) -> TestServer {
    let settings = upstream_settings(upstream);
    let ca_file = upstream.ca_file.clone();
    TestServer::start_with(|s| {
        s.upstreams.conversational = Some(settings);
        s.upstream_ca_file = ca_file;
        adjust(s);
    })
    .await
}

/// The next frame that is not one of the server's `usage.*` messages.
async fn next_data(client: &mut Client) -> Message {
    loop {
        match client.next_message().await.expect("connection open") {
            Message::Text(text) if text.starts_with("{\"type\":\"usage.") => continue,
            message @ (Message::Text(_) | Message::Binary(_)) => return message,
            _ => continue,
        }
    }
}

async fn session_id_of(client: &mut Client) -> String {
    client.next_event().await["session_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn frames_go_both_ways_through_the_upstream() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;

    client.send(Message::Text("hello".into())).await;
    assert_eq!(next_data(&mut client).await, Message::Text("upstream: hello".into()));
    client.send(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(next_data(&mut client).await, Message::Binary(vec![3, 2, 1].into()));

    // The server's own messages went to the client only.
    let seen = upstream.connection(0);
    assert_eq!(seen.received.len(), 2, "{:?}", seen.received);
    assert!(seen.received.iter().all(|m| !m.to_text().unwrap_or("").contains("usage.")));
}

#[tokio::test]
async fn the_upstream_is_told_the_human_and_the_session_but_never_sees_the_token() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada@example.com", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;

    let seen = upstream.connection(0);
    assert_eq!(seen.header("x-human-id"), Some("ada@example.com"));
    assert_eq!(seen.header("x-session-id"), Some(session_id.as_str()));
    assert_eq!(seen.header("x-region"), Some("eu"));
    assert_eq!(seen.header("authorization"), Some(UPSTREAM_SECRET));
    assert_eq!(seen.uri, "/agent");
    let everything = format!("{} {:?}", seen.uri, seen.headers);
    assert!(!everything.contains(&token[4..]), "the usage token reached the upstream");
}

#[tokio::test]
async fn events_none_gives_a_pure_relay() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
    let mut client = server.connect_to(&path).await;
    client.send(Message::Text("hi".into())).await;
    match client.next_message().await.unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), "upstream: hi"),
        other => panic!("expected the upstream's answer first, got {other:?}"),
    }
}

#[tokio::test]
async fn a_kind_without_an_upstream_keeps_the_echo() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint("ada", serde_json::json!([])).await;
    let path = format!("/v1/realtime/session?kind=voice_synthesis&events=none&token={token}");
    let mut client = server.connect_to(&path).await;
    client.send(Message::Text("hi".into())).await;
    assert_eq!(next_data(&mut client).await, Message::Text("hi".into()));
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_costs_nothing() {
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/agent", unused.local_addr().unwrap());
    drop(unused);
    let server = TestServer::start_with(|s| {
        let mut gone = upstream_at(&url);
        gone.connect_timeout = Duration::from_millis(500);
        s.upstreams.conversational = Some(gone);
    })
    .await;
    let token = server.mint_seconds("ada", 30.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (502, Some("upstream_unavailable")));

    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows, vec![(Some("upstream_unavailable".to_owned()), 0)]);
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 30.0);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_client_that_closes_closes_the_upstream_and_stops_its_meter() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;
    sleep(Duration::from_millis(600)).await;
    let used = client.opened.elapsed().as_secs_f64();
    client.close().await;

    let seen = upstream.ended(0).await;
    assert_eq!(seen.close.map(|frame| frame.code), Some(CloseCode::Normal));
    let (reason, charged) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_closed");
    assert_near(charged as f64 / 1000.0, used, 0.1);
}

#[tokio::test]
async fn an_upstream_that_closes_closes_the_client_with_4006_and_its_code() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;
    sleep(Duration::from_millis(500)).await;
    client.send(Message::Text("close 4321".into())).await;

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4006), "upstream_closed 4321"));
    let (reason, charged) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "upstream_closed");
    assert_near(charged as f64 / 1000.0, closed.after, 0.1);
    assert!(upstream.ended(0).await.ended);
}

#[tokio::test]
async fn an_upstream_that_drops_closes_the_client_with_4006() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;
    client.send(Message::Text("drop".into())).await;

    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4006), "upstream_closed 1006"));
    let (_, charged) = wait_for_end(&server, &session_id).await;
    assert_near(charged as f64 / 1000.0, closed.after, 0.1);
}

#[tokio::test]
async fn a_cut_off_closes_both_sides() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 1.0).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_near(closed.after, 1.0, 0.1);

    let seen = upstream.ended(0).await;
    let frame = seen.close.expect("the upstream got a close frame");
    assert_eq!((frame.code, frame.reason.as_str()), (CloseCode::Normal, "usage_limit_exceeded"));
    rows_once_all_ended(&server).await;
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 0.0);
}

#[tokio::test]
async fn revocation_and_the_time_limit_close_both_sides_charged_up_to_then() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |s| s.max_session = Duration::from_millis(700)).await;
    let ada = server.mint_seconds("ada", 30.0).await;
    let bob = server.mint_seconds("bob", 30.0).await;
    let mut revoked = server.connect(&ada).await;
    let revoked_id = session_id_of(&mut revoked).await;
    let mut timed = server.connect(&bob).await;
    let timed_id = session_id_of(&mut timed).await;
    sleep(Duration::from_millis(300)).await;
    let revoke = serde_json::json!({ "human": "ada" });
    assert_eq!(server.post("/v1/usage/token/revoke", revoke).await.0, 200);

    let closed = revoked.until_closed().await;
    assert_eq!(closed.code, Some(4002));
    let (_, charged) = wait_for_end(&server, &revoked_id).await;
    assert_near(charged as f64 / 1000.0, closed.after, 0.1);
    let closed = timed.until_closed().await;
    assert_eq!(closed.code, Some(4004));
    assert_near(closed.after, 0.7, 0.1);
    assert_eq!(wait_for_end(&server, &timed_id).await.1, 700);
    for (index, reason) in [(0, "token_revoked"), (1, "session_time_limit")] {
        let seen = upstream.ended(index).await;
        let close = seen.close.unwrap_or_else(|| panic!("connection {index} got no close frame"));
        assert_eq!((close.code, close.reason.as_str()), (CloseCode::Normal, reason));
    }
}

#[tokio::test]
async fn shutting_down_tells_the_upstream_the_server_is_going_away() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;
    sleep(Duration::from_millis(400)).await;
    let used = client.opened.elapsed().as_secs_f64();
    let (closed, database) = tokio::join!(client.until_closed(), server.shutdown());
    assert_eq!(closed.code, Some(1001));
    let seen = upstream.ended(0).await;
    assert_eq!(seen.close.map(|frame| frame.code), Some(CloseCode::Away));
    let rows = session_rows(&database.db());
    assert_eq!(rows[0].0.as_deref(), Some("server_shutdown"));
    assert_near(rows[0].1 as f64 / 1000.0, used, 0.1);
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_dropped_without_memory_growing() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 60.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;

    // The upstream sends 200 MB the client never reads.
    let before = resident_bytes();
    client.send(Message::Text("flood 3200 65536".into())).await;
    let (reason, _) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_too_slow");
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < 48 << 20, "memory grew by {} MiB", grown >> 20);
    assert!(upstream.ended(0).await.ended, "the upstream connection was left open");
    drop(client);
}

#[tokio::test]
async fn messages_over_the_size_limit_close_with_1009() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |s| s.max_message_bytes = 64 * 1024).await;
    let token = server.mint_seconds("ada", 30.0).await;

    let mut client = server.connect(&token).await;
    client.next_event().await;
    client.send(Message::Binary(vec![0u8; 64 * 1024 + 1].into())).await;
    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1009), "message_too_big"));

    let mut client = server.connect(&token).await;
    client.next_event().await;
    client.send(Message::Text(format!("big {}", 64 * 1024 + 1).into())).await;
    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4006), "upstream_closed 1009"));
}

#[tokio::test]
async fn a_tls_upstream_is_reached_with_its_ca_and_refused_without_it() {
    let upstream = TestUpstream::tls().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;
    client.send(Message::Text("over tls".into())).await;
    assert_eq!(next_data(&mut client).await, Message::Text("upstream: over tls".into()));

    let untrusting = relayed_to(&upstream, |s| s.upstream_ca_file = None).await;
    let token = untrusting.mint_seconds("ada", 30.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = untrusting.refused(&path).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (502, Some("upstream_unavailable")));
}

/// The resident memory of this process, which runs the server.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_told_so() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 60.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;
    client.send(Message::Text("flood 400 65536".into())).await;
    let (reason, _) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_too_slow");

    // Once it reads again, the close is among the first things it gets.
    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1008), "client_too_slow"));
}

#[tokio::test]
async fn an_upstream_that_stops_reading_is_not_blamed_on_the_client() {
    let (url, _) = stalling(Duration::from_secs(3)).await;
    let server = TestServer::start_with(|s| {
        s.upstreams.conversational = Some(upstream_at(&url));
        s.ping = Duration::from_millis(300);
    })
    .await;
    let token = server.mint_seconds("ada", 60.0).await;
    let client = server.connect(&token).await;
    let opened = client.opened;
    let (mut tx, mut rx) = futures::StreamExt::split(client.ws);
    // The client keeps sending, and keeps reading (so it answers pings).
    let writer = tokio::spawn(async move {
        let frame = vec![1u8; 256 * 1024];
        while futures::SinkExt::send(&mut tx, Message::Binary(frame.clone().into())).await.is_ok() {
        }
    });
    let mut close = None;
    while let Some(Ok(message)) = futures::StreamExt::next(&mut rx).await {
        if let Message::Close(frame) = message {
            close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
        }
    }
    writer.abort();
    assert_eq!(close, Some((4006, "upstream_closed 1006".to_owned())));
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows[0].0.as_deref(), Some("upstream_closed"), "{rows:?}");
    assert!(opened.elapsed() < Duration::from_secs(3), "noticed only after the stall");
}

#[tokio::test]
async fn a_hung_upstream_is_noticed_and_costs_nothing_after_its_last_frame() {
    let (url, _) = stalling(Duration::from_secs(3600)).await;
    let server = TestServer::start_with(|s| {
        s.upstreams.conversational = Some(upstream_at(&url));
        s.ping = Duration::from_millis(200);
        s.max_session = Duration::from_secs(5);
    })
    .await;
    let token = server.mint_seconds("ada", 60.0).await;
    let mut client = server.connect(&token).await;
    let session_id = session_id_of(&mut client).await;
    let closed = client.until_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4006), "upstream_closed 1006"));
    assert!(closed.after < 1.0, "noticed after {} s", closed.after);
    let (_, charged) = wait_for_end(&server, &session_id).await;
    assert!(charged < 50, "charged {charged} ms for an upstream that never answered");
}

#[tokio::test]
async fn the_client_is_read_again_as_soon_as_the_upstream_drains() {
    let (url, seen) = stalling(Duration::from_secs(1)).await;
    let server = TestServer::start_with(|s| {
        s.upstreams.conversational = Some(upstream_at(&url));
        s.tick = Duration::from_secs(5);
    })
    .await;
    let token = server.mint_seconds("ada", 600.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
    let client = server.connect_to(&path).await;
    let (mut tx, mut rx) = futures::StreamExt::split(client.ws);
    tokio::spawn(async move { while let Some(Ok(_)) = futures::StreamExt::next(&mut rx).await {} });
    const FRAMES: usize = 2000;
    tokio::spawn(async move {
        let frame = vec![1u8; 16 * 1024];
        for _ in 0..FRAMES {
            futures::SinkExt::send(&mut tx, Message::Binary(frame.clone().into())).await.unwrap();
        }
    });
    for _ in 0..400 {
        if seen.lock().unwrap().arrivals.len() >= FRAMES {
            break;
        }
        sleep(Duration::from_millis(25)).await;
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.arrivals.len(), FRAMES);
    let took = *seen.arrivals.last().unwrap() - seen.resumed.unwrap();
    assert!(took < Duration::from_secs(2), "relaying 32 MiB took {took:?} after the stall");
}

#[tokio::test]
async fn a_client_that_does_not_read_its_echo_costs_a_bounded_amount_of_memory() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 60.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
    let client = server.connect_to(&path).await;
    let (mut tx, _rx) = futures::StreamExt::split(client.ws);
    let before = peak_bytes();
    let sending = tokio::spawn(async move {
        let frame = vec![1u8; 1024 * 1024];
        while futures::SinkExt::send(&mut tx, Message::Binary(frame.clone().into())).await.is_ok() {
        }
    });
    let rows = rows_once_all_ended(&server).await;
    sending.abort();
    assert_eq!(rows[0].0.as_deref(), Some("client_too_slow"));
    let grown = peak_bytes().saturating_sub(before);
    assert!(grown < 48 << 20, "peak memory grew by {} MiB", grown >> 20);
}

#[tokio::test]
async fn an_upstream_that_sends_too_much_is_closed_with_1009() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |s| s.max_message_bytes = 64 * 1024).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;
    client.send(Message::Text(format!("big {}", 64 * 1024 + 1).into())).await;
    assert_eq!(client.until_closed().await.code, Some(4006));
    let close = upstream.ended(0).await.close.expect("the upstream got a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1009, "message_too_big"));
}

#[tokio::test]
async fn an_upgrade_abandoned_by_its_client_still_closes_the_upstream_with_a_frame() {
    // The client gives up while the upstream is still answering.
    let upstream = TestUpstream::slow_to_answer(Duration::from_millis(300)).await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 30.0).await;
    give_up_upgrade(&server, &token, Duration::from_millis(100)).await;
    let seen = upstream.ended(0).await;
    assert!(seen.close.is_some(), "the upstream's connection was dropped without a close");
    rows_once_all_ended(&server).await;
}

/// The peak resident memory of this process, which runs the server.
fn peak_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Reads until the session closes: how many binary frames came, and the
/// close frame's code and reason.
async fn frames_until_closed(client: &mut Client) -> (usize, Option<(u16, String)>) {
    let mut frames = 0;
    loop {
        match client.next_message().await {
            Some(Message::Binary(_)) => frames += 1,
            Some(Message::Close(frame)) => {
                return (frames, frame.map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            Some(_) => continue,
            None => return (frames, None),
        }
    }
}

#[tokio::test]
async fn a_client_that_reads_as_fast_as_it_can_gets_all_of_a_burst() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 60.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;

    // 40 s of 20 ms voice frames at once, then the upstream closes.
    client.send(Message::Text("flood 2000 640".into())).await;
    client.send(Message::Text("close 4000".into())).await;
    let (frames, close) = frames_until_closed(&mut client).await;
    assert_eq!(frames, 2000);
    assert_eq!(close, Some((4006, "upstream_closed 4000".to_owned())));
}

#[tokio::test]
async fn a_client_that_stops_reading_for_a_moment_catches_up_instead_of_being_dropped() {
    let upstream = TestUpstream::plain().await;
    let server = relayed_to(&upstream, |_| {}).await;
    let token = server.mint_seconds("ada", 60.0).await;
    let mut client = server.connect(&token).await;
    client.next_event().await;

    // 32 MiB, far more than the queue and the sockets' buffers hold, sent
    // while the client looks away for two seconds.
    client.send(Message::Text("flood 2000 16384".into())).await;
    client.send(Message::Text("close 4000".into())).await;
    sleep(Duration::from_secs(2)).await;
    let (frames, close) = frames_until_closed(&mut client).await;
    assert_eq!(frames, 2000);
    assert_eq!(close, Some((4006, "upstream_closed 4000".to_owned())));
}

#[tokio::test]
async fn a_client_that_pings_without_reading_is_owed_a_bounded_backlog_of_pongs() {
    use common::raw::*;

    const LIMIT: usize = 64 * 1024;
    let server = TestServer::start_with(|s| s.max_message_bytes = LIMIT).await;
    let token = server.mint_seconds("ada", 60.0).await;
    let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
    let mut client = RawClient::upgrade(&server, &path).await;

    // 16 MiB of pings, each owed a pong, then a message as large as allowed,
    // all before the client reads anything.
    let mut flood = message(PING, &[b'p'; 125]).repeat(128 * 1024);
    flood.extend(message(BINARY, &[9; LIMIT]));
    client.send(&flood).await;
    let mut pong_bytes = 0;
    let echo = loop {
        let frame = client.next_frame().await.expect("the session is open");
        if frame.opcode != PONG {
            break frame;
        }
        pong_bytes += frame.payload.len() + 2;
    };

    // What waited was the server's socket buffer (up to 4 MiB here) and a
    // bounded backlog, not every pong; and the echo waited for room
    // rather than being dropped.
    assert!(pong_bytes < 6 << 20, "{} MiB of pongs waited", pong_bytes >> 20);
    assert_eq!((echo.opcode, echo.payload.len()), (BINARY, LIMIT));
    client.send(&close_frame(1000, "")).await;
    let rows = rows_once_all_ended(&server).await;
    assert_eq!(rows[0].0.as_deref(), Some("client_closed"));
}
