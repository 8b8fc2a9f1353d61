//! A session's handling of what both sides send: arbitrary frames and
//! failed reads from the client and the upstream, taken in turn as the relay
//! loop takes them, until one ends the session (or the meter does, after
//! the last), and then the close frames each side gets. Beyond not
//! panicking: relayed frames arrive unchanged, every end has the reason its
//! cause calls for, and every close frame is one a peer may receive.

#![no_main]

use std::io;

use arbitrary::{Arbitrary, Unstructured};
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message};
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpstreamCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as RawFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Message as UpstreamMessage, Utf8Bytes};
use tollgate::close::EndReason;
use tollgate::fuzzing::{
    Backlog, UpstreamPart, Verdict, client_close, from_client, from_upstream, to_upstream,
    upstream_close,
};

/// The longest reason a close frame may carry: a control frame's payload
/// is at most 125 bytes, two of them the code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The session echoes rather than relays to an upstream.
    echo: bool,
    reads: Vec<Read>,
    /// Why the session ends if no read ends it: the meter's word, the time
    /// limit, a shutdown, a stalled client.
    otherwise: Reason,
}

#[derive(Arbitrary, Debug)]
struct Read {
    from_client: bool,
    what: Frame,
}

#[derive(Arbitrary, Debug)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
    /// A raw frame, which only the upstream's reader hands on.
    Raw(Vec<u8>),
    Failed(Failure),
    /// The stream ended.
    Gone,
}

#[derive(Arbitrary, Debug)]
enum Failure {
    TooLong {
        size: usize,
        max_size: usize,
    },
    Utf8(String),
    Reset,
    UnmaskedFrame,
    InvalidOpcode(u8),
    Attack,
    ConnectionClosed,
    AlreadyClosed,
    Io,
    /// An error that is not tungstenite's.
    Other,
}

/// An end reason, any of them.
#[derive(Debug)]
struct Reason(EndReason);

const REASONS: [EndReason; 16] = [
    EndReason::ClientClosed,
    EndReason::ClientDisconnected,
    EndReason::ClientTimeout,
    EndReason::ClientTooSlow,
    EndReason::ProtocolError,
    EndReason::InvalidPayload,
    EndReason::MessageTooBig,
    EndReason::UsageLimitExceeded,
    EndReason::TokenRevoked,
    EndReason::SessionTimeLimit,
    EndReason::UpstreamClosed,
    EndReason::UpstreamUnavailable,
    EndReason::ServerShutdown,
    EndReason::Internal,
    EndReason::ServerRestart,
    EndReason::UpgradeFailed,
];

impl<'a> Arbitrary<'a> for Reason {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Reason> {
        Ok(Reason(*u.choose(&REASONS)?))
    }
}

fuzz_target!(|input: Input| {
    let mut end = None;
    for read in input.reads {
        end = match (read.from_client, input.echo) {
            (true, echo) => client_read(read.what, echo),
            // An echo has no upstream to read from.
            (false, true) => continue,
            (false, false) => upstream_read(read.what),
        };
        if end.is_some() {
            break;
        }
    }
    let (reason, part) = end.unwrap_or((input.otherwise.0, UpstreamPart::None));
    check_client_close(reason, part);
    if !input.echo {
        check_upstream_close(reason, part);
    }
});

/// One read from the client; the session's end, if it ends it.
fn client_read(frame: Frame, echo: bool) -> Option<(EndReason, UpstreamPart)> {
    let expected = client_reason(&frame);
    let sent = client_message(&frame);
    let read = match frame {
        Frame::Failed(failure) => Some(Err(client_error(failure))),
        Frame::Gone => None,
        _ => Some(Ok(sent.clone()?)),
    };
    match from_client(read) {
        Verdict::Relay(message) => {
            assert!(expected.is_none(), "{message:?} relayed, not an end for {expected:?}");
            assert_eq!(Some(&message), sent.as_ref(), "a client's frame changed");
            if !echo {
                check_to_upstream(message);
            }
            None
        }
        Verdict::Alive => {
            assert!(matches!(sent, Some(Message::Ping(_) | Message::Pong(_))), "{sent:?}");
            None
        }
        Verdict::End(reason) => {
            assert_eq!(Some(reason), expected, "the client's {sent:?} ended the session");
            Some((reason, UpstreamPart::None))
        }
    }
}

/// The reason a read from the client should end the session for, if it
/// should.
fn client_reason(frame: &Frame) -> Option<EndReason> {
    Some(match frame {
        Frame::Text(_) | Frame::Binary(_) | Frame::Ping(_) | Frame::Pong(_) | Frame::Raw(_) => {
            return None;
        }
        Frame::Close(_) => EndReason::ClientClosed,
        Frame::Gone => EndReason::ClientDisconnected,
        Frame::Failed(Failure::TooLong { .. }) => EndReason::MessageTooBig,
        Frame::Failed(Failure::Utf8(_)) => EndReason::InvalidPayload,
        Frame::Failed(Failure::UnmaskedFrame | Failure::InvalidOpcode(_) | Failure::Attack) => {
            EndReason::ProtocolError
        }
        Frame::Failed(_) => EndReason::ClientDisconnected,
    })
}

/// A client's frame as axum hands it over; axum has no raw frames, so a
/// raw one comes as binary.
fn client_message(frame: &Frame) -> Option<Message> {
    Some(match frame {
        Frame::Text(text) => Message::Text(text.clone().into()),
        Frame::Binary(bytes) | Frame::Raw(bytes) => Message::Binary(Bytes::from(bytes.clone())),
        Frame::Ping(bytes) => Message::Ping(Bytes::from(bytes.clone())),
        Frame::Pong(bytes) => Message::Pong(Bytes::from(bytes.clone())),
        Frame::Close(frame) => Message::Close(
            frame
                .as_ref()
                .map(|(code, reason)| CloseFrame { code: *code, reason: reason.clone().into() }),
        ),
        Frame::Failed(_) | Frame::Gone => return None,
    })
}

fn client_error(failure: Failure) -> axum::Error {
    match failure {
        Failure::Other => axum::Error::new(io::Error::other("not a WebSocket error")),
        failure => axum::Error::new(upstream_error(failure)),
    }
}

/// What goes to the upstream is what the client sent.
fn check_to_upstream(message: Message) {
    let relayed = to_upstream(message.clone());
    match (&message, &relayed) {
        (Message::Text(text), Some(UpstreamMessage::Text(sent))) => {
            assert_eq!(text.as_str(), sent.as_str())
        }
        (Message::Binary(bytes), Some(UpstreamMessage::Binary(sent))) => assert_eq!(bytes, sent),
        _ => panic!("{message:?} went to the upstream as {relayed:?}"),
    }
}

/// One read from the upstream; the session's end, if it ends it.
fn upstream_read(frame: Frame) -> Option<(EndReason, UpstreamPart)> {
    let expected = upstream_part(&frame);
    let (read, text, binary) = match frame {
        Frame::Text(text) => {
            (Some(Ok(UpstreamMessage::Text(text.clone().into()))), Some(text), None)
        }
        Frame::Binary(bytes) => {
            (Some(Ok(UpstreamMessage::Binary(bytes.clone().into()))), None, Some(bytes))
        }
        Frame::Failed(failure) => (Some(Err(upstream_error(failure))), None, None),
        Frame::Gone => (None, None, None),
        other => (Some(Ok(upstream_message(other))), None, None),
    };
    match from_upstream(read) {
        Verdict::Relay(Message::Text(sent)) => assert_eq!(Some(sent.as_str()), text.as_deref()),
        Verdict::Relay(Message::Binary(sent)) => assert_eq!(Some(&sent[..]), binary.as_deref()),
        Verdict::Relay(other) => panic!("the upstream's frame reached the client as {other:?}"),
        Verdict::Alive => assert_eq!(expected, None, "an end taken as a sign of life"),
        Verdict::End(part) => {
            assert_eq!(Some(part), expected, "the upstream's read ended the session");
            return Some((EndReason::UpstreamClosed, part));
        }
    }
    None
}

/// How the upstream should figure in the end of a session that a read from
/// it ends, if it ends it.
fn upstream_part(frame: &Frame) -> Option<UpstreamPart> {
    Some(match frame {
        Frame::Text(_) | Frame::Binary(_) | Frame::Ping(_) | Frame::Pong(_) | Frame::Raw(_) => {
            return None;
        }
        Frame::Close(None) => UpstreamPart::Closed(1005),
        Frame::Close(Some((code, _))) => UpstreamPart::Closed(u16::from(CloseCode::from(*code))),
        Frame::Failed(Failure::TooLong { .. }) => UpstreamPart::Failed(1009),
        Frame::Failed(
            Failure::Utf8(_) | Failure::UnmaskedFrame | Failure::InvalidOpcode(_) | Failure::Attack,
        ) => UpstreamPart::Failed(1002),
        Frame::Failed(_) | Frame::Gone => UpstreamPart::Closed(1006),
    })
}

fn upstream_message(frame: Frame) -> UpstreamMessage {
    match frame {
        Frame::Ping(bytes) => UpstreamMessage::Ping(bytes.into()),
        Frame::Pong(bytes) => UpstreamMessage::Pong(bytes.into()),
        Frame::Close(frame) => UpstreamMessage::Close(frame.map(|(code, reason)| {
            UpstreamCloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason) }
        })),
        Frame::Raw(bytes) => {
            UpstreamMessage::Frame(RawFrame::message(bytes, OpCode::Data(Data::Binary), true))
        }
        other => unreachable!("{other:?} is made elsewhere"),
    }
}

fn upstream_error(failure: Failure) -> Error {
    match failure {
        Failure::TooLong { size, max_size } => {
            Error::Capacity(CapacityError::MessageTooLong { size, max_size })
        }
        Failure::Utf8(text) => Error::Utf8(text),
        Failure::Reset => Error::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        Failure::UnmaskedFrame => Error::Protocol(ProtocolError::UnmaskedFrameFromClient),
        Failure::InvalidOpcode(opcode) => Error::Protocol(ProtocolError::InvalidOpcode(opcode)),
        Failure::Attack => Error::AttackAttempt,
        Failure::ConnectionClosed => Error::ConnectionClosed,
        Failure::AlreadyClosed => Error::AlreadyClosed,
        Failure::Io | Failure::Other => Error::Io(io::Error::other("the connection broke")),
    }
}

/// A code a peer may receive in a close frame (RFC 6455, section 7.4).
fn sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

fn check_client_close(reason: EndReason, part: UpstreamPart) {
    let frame = client_close(reason, part);
    let Some(code) = reason.close_code() else {
        assert!(frame.is_none(), "{reason:?} is owed no close frame, got {frame:?}");
        return;
    };
    let Some(Message::Close(Some(frame))) = frame else {
        panic!("{reason:?} closed the client with {frame:?}");
    };
    assert_eq!(frame.code, code, "{reason:?}");
    assert!(sendable(frame.code), "the client is closed with {}", frame.code);
    assert!(frame.reason.starts_with(reason.as_str()), "{:?}", frame.reason);
    assert!(frame.reason.len() <= MAX_CLOSE_REASON_BYTES, "{:?}", frame.reason);
}

fn check_upstream_close(reason: EndReason, part: UpstreamPart) {
    let (frame, backlog) = upstream_close(reason, part);
    if let UpstreamPart::Closed(_) = part {
        assert!(frame.is_none(), "an upstream that closed got {frame:?}");
        return;
    }
    let Some(UpstreamMessage::Close(Some(frame))) = frame else {
        panic!("the upstream was closed with {frame:?}");
    };
    assert!(frame.code.is_allowed() && sendable(u16::from(frame.code)), "{}", frame.code);
    assert!(frame.reason.len() <= MAX_CLOSE_REASON_BYTES, "{:?}", frame.reason);
    let client_left = matches!(reason, EndReason::ClientClosed | EndReason::ClientDisconnected);
    assert_eq!(backlog == Backlog::Send, client_left, "{reason:?} with {backlog:?}");
}
