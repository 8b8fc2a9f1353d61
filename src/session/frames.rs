//! What a session does with each frame it reads from either side (relay
//! it, take it as a sign of life, or end the session, and why), and the
//! close frames both sides get at the end. These are decisions only, with
//! no socket or clock in them; the relay loop in the parent module carries
//! them out.

use axum::extract::ws::{CloseFrame, Message};
use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpstreamCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as UpstreamMessage};

pub use super::outbox::Backlog;
use crate::close::EndReason;

/// What one read from a side asks of the session.
#[derive(Debug)]
pub enum Verdict<E> {
    /// A message for the other side (for the echo, for the client itself),
    /// as the client's socket takes it.
    Relay(Message),
    /// A ping or a pong: the side is alive, and nothing goes further.
    Alive,
    /// The session ends, for this.
    End(E),
}

/// How the upstream figured in the end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamPart {
    None,
    /// It closed with this code, or dropped (1006): it is owed no frame.
    Closed(u16),
    /// It broke the protocol (1002), sent a message over the limit (1009)
    /// or stopped answering (1006): it is closed by the server.
    Failed(u16),
}

/// A read from the client: a message, a failed read, or the end of the
/// stream.
pub fn from_client(read: Option<Result<Message, axum::Error>>) -> Verdict<EndReason> {
    match read {
        None => Verdict::End(EndReason::ClientDisconnected),
        Some(Err(error)) => Verdict::End(classify(error)),
        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => Verdict::Relay(message),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Verdict::Alive,
        Some(Ok(Message::Close(_))) => Verdict::End(EndReason::ClientClosed),
    }
}

/// A client's relayed message as it goes to the upstream; `None` for what
/// is never relayed.
pub fn to_upstream(message: Message) -> Option<UpstreamMessage> {
    match message {
        Message::Text(text) => Some(UpstreamMessage::Text(text.as_str().into())),
        Message::Binary(bytes) => Some(UpstreamMessage::Binary(bytes)),
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) => None,
    }
}

/// A read from the upstream: a message, a failed read, or the end of the
/// stream.
pub fn from_upstream(
    read: Option<Result<UpstreamMessage, tungstenite::Error>>,
) -> Verdict<UpstreamPart> {
    use tungstenite::error::{Error, ProtocolError};

    let part = match read {
        Some(Ok(UpstreamMessage::Text(text))) => {
            return Verdict::Relay(Message::Text(text.as_str().into()));
        }
        Some(Ok(UpstreamMessage::Binary(bytes))) => return Verdict::Relay(Message::Binary(bytes)),
        Some(Ok(UpstreamMessage::Close(frame))) => {
            UpstreamPart::Closed(frame.map_or(1005, |frame| u16::from(frame.code)))
        }
        Some(Ok(_)) => return Verdict::Alive,
        Some(Err(Error::Capacity(_))) => UpstreamPart::Failed(1009),
        Some(Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
            UpstreamPart::Closed(1006)
        }
        Some(Err(Error::Protocol(_) | Error::Utf8(_) | Error::AttackAttempt)) => {
            UpstreamPart::Failed(1002)
        }
        Some(Err(_)) | None => UpstreamPart::Closed(1006),
    };
    Verdict::End(part)
}

/// The end reason for a failed read from the client.
fn classify(error: axum::Error) -> EndReason {
    use tungstenite::error::{Error, ProtocolError};

    let Ok(error) = error.into_inner().downcast::<Error>() else {
        return EndReason::ClientDisconnected;
    };
    match *error {
        Error::Capacity(_) => EndReason::MessageTooBig,
        Error::Utf8(_) => EndReason::InvalidPayload,
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            EndReason::ClientDisconnected
        }
        Error::Protocol(_) | Error::AttackAttempt => EndReason::ProtocolError,
        _ => EndReason::ClientDisconnected,
    }
}

/// The close frame the client gets when the session ends, if it is owed
/// one: the reason's code, and its name, with the upstream's code when the
/// upstream closed or failed.
pub fn client_close(reason: EndReason, upstream: UpstreamPart) -> Option<Message> {
    let code = reason.close_code()?;
    let text = match upstream {
        UpstreamPart::Closed(code) | UpstreamPart::Failed(code) => {
            format!("{} {code}", reason.as_str())
        }
        UpstreamPart::None => reason.as_str().to_owned(),
    };
    Some(Message::Close(Some(CloseFrame { code, reason: text.into() })))
}

/// The close frame the upstream gets when the session ends, if any, and
/// whether what is queued for it goes first: the client's last frames do
/// when the client closed.
pub fn upstream_close(
    reason: EndReason,
    upstream: UpstreamPart,
) -> (Option<UpstreamMessage>, Backlog) {
    let code = match upstream {
        UpstreamPart::Closed(_) => return (None, Backlog::Drop),
        UpstreamPart::Failed(1006) => CloseCode::Away,
        UpstreamPart::Failed(code) => CloseCode::from(code),
        UpstreamPart::None if reason == EndReason::ServerShutdown => CloseCode::Away,
        UpstreamPart::None => CloseCode::Normal,
    };
    let text = match upstream {
        UpstreamPart::Failed(1009) => EndReason::MessageTooBig.as_str(),
        UpstreamPart::Failed(1002) => EndReason::ProtocolError.as_str(),
        _ => reason.as_str(),
    };
    let frame = UpstreamMessage::Close(Some(UpstreamCloseFrame { code, reason: text.into() }));
    let client_left = matches!(reason, EndReason::ClientClosed | EndReason::ClientDisconnected);
    (Some(frame), if client_left { Backlog::Send } else { Backlog::Drop })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_that_closed_is_owed_nothing_and_the_client_hears_its_code() {
        let close = UpstreamMessage::Close(Some(UpstreamCloseFrame {
            code: CloseCode::Library(4321),
            reason: "done".into(),
        }));
        let Verdict::End(part) = from_upstream(Some(Ok(close))) else {
            panic!("the upstream's close did not end the session");
        };
        assert_eq!(part, UpstreamPart::Closed(4321));
        let (frame, _) = upstream_close(EndReason::UpstreamClosed, part);
        assert!(frame.is_none(), "{frame:?}");
        let Some(Message::Close(Some(frame))) = client_close(EndReason::UpstreamClosed, part)
        else {
            panic!("the client got no close frame");
        };
        assert_eq!((frame.code, frame.reason.as_str()), (4006, "upstream_closed 4321"));
    }

    #[test]
    fn a_client_that_left_lets_its_last_frames_reach_the_upstream_first() {
        let (frame, backlog) = upstream_close(EndReason::ClientClosed, UpstreamPart::None);
        assert_eq!(backlog, Backlog::Send);
        let Some(UpstreamMessage::Close(Some(frame))) = frame else {
            panic!("the upstream got no close frame");
        };
        assert_eq!(frame.code, CloseCode::Normal);
        assert!(client_close(EndReason::ClientClosed, UpstreamPart::None).is_none());
    }
}
