//! One realtime session once its upgrade has completed: the relay loop.
//! Frames go both ways unchanged between the client and the service behind
//! the session (the upstream), or come straight back when the session's
//! kind has none (the embedded echo). The loop also passes the meter's
//! figures to the client as `usage.*` messages, pings the client, enforces
//! the session time limit, and closes both sides with the code of whatever
//! ended the session. The meter decides cut-offs; this loop carries them
//! out.

mod outbox;
pub mod protocol;

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::StreamExt;
use futures::stream::SplitStream;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpstreamCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as UpstreamMessage};
use tracing::{Instrument, Span, info, warn};

use crate::close::EndReason;
use crate::limits::SessionKind;
use crate::meter::{MeterHandle, Registration, SessionUpdate};
use crate::store::{HumanId, SessionKey};
use crate::upstream::UpstreamSocket;
use outbox::{Outbox, Refused};
use protocol::{ServerMessage, seconds};

/// How long the server waits for each side's half of the closing handshake
/// before it drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many messages may wait to be sent to the client: about two and a
/// half seconds of 20 ms audio frames. A client further behind than that
/// is not keeping up, and is dropped rather than buffered for.
const CLIENT_QUEUE: usize = 128;

/// How many messages may wait to be sent upstream. When it is full the
/// loop stops reading the client, which slows the client down instead.
const UPSTREAM_QUEUE: usize = 128;

/// Everything a session needs, gathered by admission.
pub struct SessionContext {
    pub key: SessionKey,
    pub public_id: String,
    pub human: HumanId,
    pub human_name: String,
    pub kind: SessionKind,
    pub remaining: Option<i64>,
    pub revocation_epoch: i64,
    /// Send `usage.*` messages (`?events=none` turns them off).
    pub events: bool,
    pub ping: Duration,
    pub max_duration: Duration,
    pub meter: MeterHandle,
    pub span: Span,
    /// The connection to the service behind the session, already open;
    /// `None` for the echo.
    pub upstream: Option<UpstreamSocket>,
}

/// Held from admission until the upgrade completes. If it is dropped first
/// (the client went away mid-upgrade), the meter records the session as
/// ended with nothing used.
pub struct Ticket {
    key: SessionKey,
    meter: Option<MeterHandle>,
}

impl Ticket {
    pub fn new(key: SessionKey, meter: MeterHandle) -> Ticket {
        Ticket { key, meter: Some(meter) }
    }

    pub fn key(&self) -> SessionKey {
        self.key
    }

    /// The session will not start: records it as ended for `reason`, with
    /// nothing used.
    pub fn cancel(mut self, reason: EndReason) {
        if let Some(meter) = self.meter.take() {
            meter.abandon(self.key, reason);
        }
    }

    fn redeem(mut self) {
        self.meter = None;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.abandon(self.key, EndReason::UpgradeFailed);
        }
    }
}

/// How the loop came to an end.
enum Outcome {
    /// The session ended on this side at `at`; the meter must be told.
    /// `upstream_code` is the code the upstream closed with, if it did.
    Ended { at: Instant, reason: EndReason, upstream_code: Option<u16> },
    /// The meter ended the session and already stopped charging it.
    ClosedByMeter(EndReason),
}

impl Outcome {
    fn ended(reason: EndReason) -> Outcome {
        Outcome::Ended { at: Instant::now(), reason, upstream_code: None }
    }
}

/// Runs a session from the completed upgrade to its close.
pub async fn run(socket: WebSocket, context: SessionContext, ticket: Ticket) {
    let span = context.span.clone();
    serve(socket, context, ticket).instrument(span).await;
}

async fn serve(socket: WebSocket, mut context: SessionContext, ticket: Ticket) {
    let started = Instant::now();
    ticket.redeem();
    let (updates_tx, updates_rx) = watch::channel(SessionUpdate {
        remaining_millis: context.remaining,
        ..SessionUpdate::default()
    });
    context.meter.open(registration(&context, started, updates_tx)).await;
    info!(remaining = context.remaining.map(seconds), "session opened");

    let (to_client, from_client) = socket.split();
    let upstream = context.upstream.take().map(|socket| {
        let (to, from) = socket.split();
        Relay { from, to: Outbox::spawn(to, UPSTREAM_QUEUE) }
    });
    let mut session = Session {
        from_client,
        to_client: Outbox::spawn(to_client, CLIENT_QUEUE),
        upstream,
        context,
        updates_rx,
        last_frame: started,
        low_sent: false,
    };
    let (reason, upstream_code) = match session.serve(started).await {
        Outcome::Ended { at, reason, upstream_code } => {
            session.context.meter.end(session.context.key, at, reason).await;
            (reason, upstream_code)
        }
        Outcome::ClosedByMeter(reason) => (reason, None),
    };
    session.close(reason, upstream_code).await;
}

fn registration(
    context: &SessionContext,
    started: Instant,
    updates_tx: watch::Sender<SessionUpdate>,
) -> Registration {
    Registration {
        key: context.key,
        human: context.human,
        limit_type: context.kind.limit_type(),
        started,
        remaining: context.remaining,
        revocation_epoch: context.revocation_epoch,
        updates_tx,
        span: context.span.clone(),
    }
}

/// The upstream side of a relay.
struct Relay {
    from: SplitStream<UpstreamSocket>,
    to: Outbox<UpstreamMessage>,
}

struct Session {
    from_client: SplitStream<WebSocket>,
    to_client: Outbox<Message>,
    upstream: Option<Relay>,
    context: SessionContext,
    updates_rx: watch::Receiver<SessionUpdate>,
    /// When the client last sent anything, pongs included.
    last_frame: Instant,
    /// A warning was sent and the pool has not been topped up since.
    low_sent: bool,
}

/// What one turn of the loop decided.
type Step = Result<(), Outcome>;

impl Session {
    async fn serve(&mut self, started: Instant) -> Outcome {
        if let Err(outcome) = self.send_started() {
            return outcome;
        }
        let ping_every = self.context.ping;
        let mut ping = tokio::time::interval_at(started + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let time_limit = started + self.context.max_duration;
        let time_limit_reached = tokio::time::sleep_until(time_limit);
        tokio::pin!(time_limit_reached);
        loop {
            // The meter's word and the time limit come first: a side sending
            // without pause must not delay the session's cut-off. The client
            // is read only while the upstream's queue has room.
            let upstream_has_room = self.upstream.as_ref().is_none_or(|relay| relay.to.has_room());
            let step = tokio::select! {
                biased;
                changed = self.updates_rx.changed() => self.on_update(changed.is_ok()),
                _ = &mut time_limit_reached => Err(Outcome::Ended {
                    at: time_limit,
                    reason: EndReason::SessionTimeLimit,
                    upstream_code: None,
                }),
                message = from_upstream(&mut self.upstream), if self.upstream.is_some() => {
                    self.on_upstream(message)
                }
                message = self.from_client.next(), if upstream_has_room => self.on_client(message),
                _ = ping.tick() => self.on_ping(),
            };
            if let Err(outcome) = step {
                return outcome;
            }
        }
    }

    fn send_started(&mut self) -> Step {
        let message = ServerMessage::SessionStarted {
            session_id: &self.context.public_id,
            kind: self.context.kind,
            human: &self.context.human_name,
            remaining: self.context.remaining.map(seconds),
        }
        .to_json();
        self.send_event(message)
    }

    fn on_client(&mut self, message: Option<Result<Message, axum::Error>>) -> Step {
        let message = match message {
            None => return Err(Outcome::ended(EndReason::ClientDisconnected)),
            Some(Err(error)) => return Err(Outcome::ended(classify(error))),
            Some(Ok(message)) => message,
        };
        self.last_frame = Instant::now();
        match message {
            Message::Text(_) | Message::Binary(_) => self.forward(message),
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Outcome::ended(EndReason::ClientClosed)),
        }
    }

    /// Passes a client's frame to the upstream, or back to the client when
    /// the session echoes.
    fn forward(&mut self, message: Message) -> Step {
        let Some(relay) = &self.upstream else {
            return self.send_to_client(message);
        };
        let message = match message {
            Message::Text(text) => UpstreamMessage::Text(text.as_str().into()),
            Message::Binary(bytes) => UpstreamMessage::Binary(bytes),
            _ => return Ok(()),
        };
        // The loop reads the client only while the queue has room, so a
        // refusal means the upstream's writer has stopped.
        relay.to.push(message).map_err(|_| Outcome::Ended {
            at: Instant::now(),
            reason: EndReason::UpstreamClosed,
            upstream_code: Some(1006),
        })
    }

    fn on_upstream(
        &mut self,
        message: Option<Result<UpstreamMessage, tungstenite::Error>>,
    ) -> Step {
        let gone = |code| Outcome::Ended {
            at: Instant::now(),
            reason: EndReason::UpstreamClosed,
            upstream_code: Some(code),
        };
        match message {
            Some(Ok(UpstreamMessage::Text(text))) => {
                self.send_to_client(Message::Text(text.as_str().into()))
            }
            Some(Ok(UpstreamMessage::Binary(bytes))) => self.send_to_client(Message::Binary(bytes)),
            Some(Ok(UpstreamMessage::Close(frame))) => {
                Err(gone(frame.map_or(1005, |frame| u16::from(frame.code))))
            }
            Some(Ok(_)) => Ok(()),
            Some(Err(tungstenite::Error::Capacity(_))) => Err(gone(1009)),
            Some(Err(_)) | None => Err(gone(1006)),
        }
    }

    fn on_update(&mut self, meter_alive: bool) -> Step {
        if !meter_alive {
            warn!("the meter dropped this session without a reason");
            return Err(Outcome::ClosedByMeter(EndReason::Internal));
        }
        let update = *self.updates_rx.borrow_and_update();
        if let Some(reason) = update.close {
            return Err(Outcome::ClosedByMeter(reason));
        }
        if !self.context.events {
            return Ok(());
        }
        let remaining = update.remaining_millis.map(seconds);
        let used = seconds(update.used_millis);
        self.send_event(ServerMessage::Remaining { remaining, used }.to_json())?;
        if !update.low {
            self.low_sent = false;
        } else if !self.low_sent {
            self.low_sent = true;
            let remaining = remaining.unwrap_or_default();
            self.send_event(ServerMessage::Warning { remaining }.to_json())?;
        }
        Ok(())
    }

    fn on_ping(&mut self) -> Step {
        if self.last_frame.elapsed() >= 2 * self.context.ping {
            warn!("client sent nothing for two ping intervals; dropping it");
            let at = self.last_frame;
            return Err(Outcome::Ended {
                at,
                reason: EndReason::ClientTimeout,
                upstream_code: None,
            });
        }
        self.send_to_client(Message::Ping(Default::default()))
    }

    /// Interleaves one of the server's own messages on the client's side;
    /// they never go upstream.
    fn send_event(&mut self, json: String) -> Step {
        if !self.context.events {
            return Ok(());
        }
        self.send_to_client(Message::Text(json.into()))
    }

    fn send_to_client(&mut self, message: Message) -> Step {
        match self.to_client.push(message) {
            Ok(()) => Ok(()),
            Err(Refused::Full) => {
                warn!("client is not keeping up with what the session sends; dropping it");
                Err(Outcome::ended(EndReason::ClientTooSlow))
            }
            Err(Refused::Gone) => Err(Outcome::ended(EndReason::ClientDisconnected)),
        }
    }

    /// Closes both sides: each gets its close frame, if it is owed one, and
    /// a moment for its half of the closing handshake.
    async fn close(self, reason: EndReason, upstream_code: Option<u16>) {
        let client_frame = reason.close_code().map(|code| {
            let text = match upstream_code {
                Some(upstream_code) => format!("{} {upstream_code}", reason.as_str()),
                None => reason.as_str().to_owned(),
            };
            Message::Close(Some(CloseFrame { code, reason: text.into() }))
        });
        let client = finish(self.to_client, client_frame, self.from_client);
        let upstream = async {
            if let Some(relay) = self.upstream {
                let frame = upstream_close_frame(reason);
                finish(relay.to, frame, relay.from).await;
            }
        };
        tokio::join!(client, upstream);
    }
}

/// The close frame the upstream gets when the session ends for `reason`:
/// none when it closed first.
fn upstream_close_frame(reason: EndReason) -> Option<UpstreamMessage> {
    let code = match reason {
        EndReason::UpstreamClosed => return None,
        EndReason::ServerShutdown => CloseCode::Away,
        _ => CloseCode::Normal,
    };
    let frame = UpstreamCloseFrame { code, reason: reason.as_str().into() };
    Some(UpstreamMessage::Close(Some(frame)))
}

/// Sends a side its last frame and waits, briefly, for the rest of the
/// closing handshake.
async fn finish<M, S>(outbox: Outbox<M>, last: Option<M>, mut from: S)
where
    M: Send + 'static,
    S: futures::Stream + Unpin,
{
    outbox.finish(last, CLOSE_TIMEOUT).await;
    let drain = async { while from.next().await.is_some() {} };
    let _ = timeout(CLOSE_TIMEOUT, drain).await;
}

/// The next message from the upstream; never ready for a session without
/// one (the loop does not ask then).
async fn from_upstream(
    upstream: &mut Option<Relay>,
) -> Option<Result<UpstreamMessage, tungstenite::Error>> {
    match upstream {
        Some(relay) => relay.from.next().await,
        None => std::future::pending().await,
    }
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
