//! Hostile WebSocket input against the echo, written frame by frame over a
//! plain TCP socket after a real upgrade (tests/common/raw.rs): frames and
//! messages over the size limit, text that is not UTF-8, unmasked frames,
//! frames after the client's close, a flood of pings. Each case is a row of
//! one table: what the client sends, what it must get back, the close and
//! the end reason. After each, the session must be recorded as ended, and
//! charged for the time it was open: nothing given away.

mod common;

use common::raw::*;
use common::*;
use std::time::Duration;

use tokio::time::Instant;

/// The message size limit of these tests' server, small so that a case
/// goes past it with little traffic.
const LIMIT: usize = 1024;
/// Seconds each case's human is granted.
const GRANT: f64 = 60.0;
/// Pings in the flood: about 16 MiB of them.
const FLOOD_PINGS: usize = 128 * 1024;
/// Most pong bytes a client that did not read during the flood may find
/// waiting afterwards: the server's socket buffer (up to 4 MiB here) and a
/// bounded backlog in the server, far less than the 16 MiB of pongs it
/// was owed.
const MOST_PONG_BYTES: usize = 6 << 20;
/// How long each session is open before the hostile input, so that its
/// charge is a real amount of time.
const HOLD: Duration = Duration::from_millis(300);
/// How far a session's charge may be from the time the client saw it open.
const CHARGE_TOLERANCE: f64 = 0.15;

/// What the client does, in order.
enum Step {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Reads this data frame next, skipping pongs.
    Expect(u8, Vec<u8>),
}

/// One hostile case.
struct Case {
    name: &'static str,
    steps: fn() -> Vec<Step>,
    /// The code and reason of the server's close frame.
    close: (u16, &'static str),
    /// The end reason recorded for the session.
    reason: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "a single frame over the limit",
        steps: || vec![Step::Send(message(BINARY, &[7; LIMIT + 1]))],
        close: (1009, "message_too_big"),
        reason: "message_too_big",
    },
    Case {
        name: "a message over the limit in many tiny continuation frames",
        steps: || {
            let mut bytes = frame(BINARY, false, true, &[7]);
            for _ in 0..LIMIT {
                bytes.extend(frame(CONTINUATION, false, true, &[7]));
            }
            vec![Step::Send(bytes)]
        },
        close: (1009, "message_too_big"),
        reason: "message_too_big",
    },
    Case {
        name: "text that is not UTF-8",
        steps: || vec![Step::Send(message(TEXT, b"caf\xc3\xa9 \xed\xa0\x80 bar"))],
        close: (1007, "invalid_payload"),
        reason: "invalid_payload",
    },
    Case {
        name: "an unmasked frame",
        steps: || vec![Step::Send(frame(TEXT, true, false, b"hello"))],
        close: (1002, "protocol_error"),
        reason: "protocol_error",
    },
    Case {
        name: "frames after the client's close",
        steps: || {
            let mut after_close = close_frame(1000, "bye");
            after_close.extend(message(TEXT, b"after"));
            after_close.extend(message(BINARY, b"after"));
            after_close.extend(message(PING, b"after"));
            vec![
                Step::Send(message(TEXT, b"before")),
                Step::Expect(TEXT, b"before".to_vec()),
                Step::Send(after_close),
            ]
        },
        close: (1000, "bye"),
        reason: "client_closed",
    },
    Case {
        name: "a close frame with a code no endpoint may send",
        steps: || vec![Step::Send(close_frame(1005, ""))],
        close: (1002, "Protocol violation"),
        reason: "client_closed",
    },
    Case {
        name: "a flood of pings from a client that reads only afterwards",
        steps: || {
            let ping = message(PING, &[b'p'; 125]);
            let mut flood = ping.repeat(FLOOD_PINGS);
            // As large as allowed: it finds no room beside the pongs.
            flood.extend(message(BINARY, &[9; LIMIT]));
            vec![
                Step::Send(flood),
                Step::Expect(BINARY, vec![9; LIMIT]),
                Step::Send(close_frame(1000, "done")),
            ]
        },
        close: (1000, "done"),
        reason: "client_closed",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_closed_with_its_code_and_charged_as_used() {
    let server = TestServer::start_with(|s| s.max_message_bytes = LIMIT).await;
    for (index, case) in CASES.iter().enumerate() {
        let human = format!("hostile-{index}");
        let token = server.mint_seconds(&human, GRANT).await;
        let path = format!("/v1/realtime/session?kind=conversational&events=none&token={token}");
        let mut client = RawClient::upgrade(&server, &path).await;
        tokio::time::sleep(HOLD).await;
        let pong_bytes = run_steps(&mut client, case).await;
        let (close, after) = until_closed(&mut client, case.name).await;
        let open_for = client.opened.elapsed().as_secs_f64();

        assert_eq!(close.as_ref(), Some(&(case.close.0, case.close.1.to_owned())), "{}", case.name);
        assert!(after.is_empty(), "{}: frames after the close: {after:?}", case.name);
        assert!(pong_bytes <= MOST_PONG_BYTES, "{}: {pong_bytes} bytes of pongs", case.name);
        assert_ended_and_charged(&server, &human, case, open_for).await;
    }
    assert_ledger_identity(&server.db());
}

/// Carries out the case's steps; returns the pong bytes read meanwhile.
async fn run_steps(client: &mut RawClient, case: &Case) -> usize {
    let mut pong_bytes = 0;
    for step in (case.steps)() {
        match step {
            Step::Send(bytes) => client.send(&bytes).await,
            Step::Expect(opcode, payload) => loop {
                let frame = client.next_frame().await;
                let frame = frame.unwrap_or_else(|| panic!("{}: connection ended", case.name));
                if frame.opcode == PONG {
                    pong_bytes += frame.payload.len() + 2;
                    continue;
                }
                let expected = Frame { opcode, fin: true, payload };
                assert_eq!(frame, expected, "{}", case.name);
                break;
            },
        }
    }
    pong_bytes
}

/// Reads up to the server's close frame and on to the end of the
/// connection: the close's code and reason, and any frame after it.
async fn until_closed(client: &mut RawClient, name: &str) -> (Option<(u16, String)>, Vec<Frame>) {
    let close = loop {
        match client.next_frame().await {
            Some(frame) if frame.opcode == CLOSE => break frame.close(),
            Some(frame) if frame.opcode == PONG => continue,
            Some(frame) => panic!("{name}: {frame:?} before the close"),
            None => panic!("{name}: the connection ended without a close frame"),
        }
    };
    let mut after = Vec::new();
    while let Some(frame) = client.next_frame().await {
        after.push(frame);
    }
    (close, after)
}

/// The human's only session ended for the case's reason, charged within
/// [`CHARGE_TOLERANCE`] of the time the client saw it open, and the human
/// has exactly what was granted less that charge.
async fn assert_ended_and_charged(server: &TestServer, human: &str, case: &Case, open_for: f64) {
    let (ended_at, reason, charged) = session_of(server, human).await;
    assert!(ended_at.is_some(), "{}: no ended_at", case.name);
    assert_eq!(reason.as_deref(), Some(case.reason), "{}", case.name);
    let charged = charged as f64 / 1000.0;
    assert!(
        (charged - open_for).abs() <= CHARGE_TOLERANCE,
        "{}: charged {charged} s for a session open {open_for} s",
        case.name
    );
    let remaining = server.remaining(human, "conversational_seconds").await;
    assert_near(remaining, GRANT - charged, 0.0005);
}

/// The human's session once its end is recorded: ended_at, end_reason and
/// charged milliseconds.
async fn session_of(server: &TestServer, human: &str) -> (Option<i64>, Option<String>, i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = server.db().row(
            "SELECT s.ended_at, s.end_reason, s.charged FROM sessions s
             JOIN humans h ON h.id = s.human_id WHERE h.external_id = ?1",
            &[&human],
        );
        let row: (Option<i64>, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
        if row.1.is_some() || Instant::now() > deadline {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
