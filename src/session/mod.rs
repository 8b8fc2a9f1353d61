//! One realtime session once its upgrade has completed: the WebSocket loop.
//! It echoes what the client sends (the embedded default behind a session),
//! passes the meter's figures on as `usage.*` messages, pings the client,
//! enforces the session time limit, and closes with the code of whatever
//! ended the session. The meter decides cut-offs; this loop only carries
//! them out.

pub mod protocol;

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tracing::{Instrument, Span, debug, info, warn};

use crate::close::EndReason;
use crate::limits::SessionKind;
use crate::meter::{MeterHandle, Registration, SessionUpdate};
use crate::store::{HumanId, SessionKey};
use protocol::{ServerMessage, seconds};

/// How long the server waits for the client's side of the closing
/// handshake before it drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

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

    fn redeem(mut self) {
        self.meter = None;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.abandon(self.key);
        }
    }
}

/// How the loop came to an end.
enum Outcome {
    /// The session ended on this side at `at`; the meter must be told.
    Ended { at: Instant, reason: EndReason },
    /// The meter ended the session and already stopped charging it.
    ClosedByMeter(EndReason),
}

/// Runs a session from the completed upgrade to its close.
pub async fn run(socket: WebSocket, context: SessionContext, ticket: Ticket) {
    let span = context.span.clone();
    serve(socket, context, ticket).instrument(span).await;
}

async fn serve(socket: WebSocket, context: SessionContext, ticket: Ticket) {
    let started = Instant::now();
    ticket.redeem();
    let (updates_tx, updates_rx) = watch::channel(SessionUpdate {
        remaining_millis: context.remaining,
        ..SessionUpdate::default()
    });
    context
        .meter
        .open(Registration {
            key: context.key,
            human: context.human,
            limit_type: context.kind.limit_type(),
            started,
            remaining: context.remaining,
            revocation_epoch: context.revocation_epoch,
            updates_tx,
            span: context.span.clone(),
        })
        .await;
    info!(remaining = context.remaining.map(seconds), "session opened");

    let mut session = Session { socket, context, updates_rx, last_frame: started, low_sent: false };
    let reason = match session.serve(started).await {
        Outcome::Ended { at, reason } => {
            session.context.meter.end(session.context.key, at, reason).await;
            reason
        }
        Outcome::ClosedByMeter(reason) => reason,
    };
    session.close(reason).await;
}

struct Session {
    socket: WebSocket,
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
        if let Err(outcome) = self.send_started().await {
            return outcome;
        }
        let ping_every = self.context.ping;
        let mut ping = tokio::time::interval_at(started + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let time_limit = started + self.context.max_duration;
        let time_limit_reached = tokio::time::sleep_until(time_limit);
        tokio::pin!(time_limit_reached);
        loop {
            // The meter's word and the time limit come first: a client
            // sending without pause must not delay its own cut-off.
            let step = tokio::select! {
                biased;
                changed = self.updates_rx.changed() => self.on_update(changed.is_ok()).await,
                _ = &mut time_limit_reached => Err(Outcome::Ended {
                    at: time_limit,
                    reason: EndReason::SessionTimeLimit,
                }),
                message = self.socket.recv() => self.on_message(message).await,
                _ = ping.tick() => self.on_ping().await,
            };
            if let Err(outcome) = step {
                return outcome;
            }
        }
    }

    async fn send_started(&mut self) -> Step {
        let message = ServerMessage::SessionStarted {
            session_id: &self.context.public_id,
            kind: self.context.kind,
            human: &self.context.human_name,
            remaining: self.context.remaining.map(seconds),
        }
        .to_json();
        self.send_event(message).await
    }

    async fn on_message(&mut self, message: Option<Result<Message, axum::Error>>) -> Step {
        let now = Instant::now();
        let message = match message {
            None => {
                return Err(Outcome::Ended { at: now, reason: EndReason::ClientDisconnected });
            }
            Some(Err(error)) => {
                return Err(Outcome::Ended { at: now, reason: classify(error) });
            }
            Some(Ok(message)) => message,
        };
        self.last_frame = now;
        match message {
            Message::Text(_) | Message::Binary(_) => self.send(message).await,
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Outcome::Ended { at: now, reason: EndReason::ClientClosed }),
        }
    }

    async fn on_update(&mut self, meter_alive: bool) -> Step {
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
        self.send_event(ServerMessage::Remaining { remaining, used }.to_json()).await?;
        if !update.low {
            self.low_sent = false;
        } else if !self.low_sent {
            self.low_sent = true;
            let remaining = remaining.unwrap_or_default();
            self.send_event(ServerMessage::Warning { remaining }.to_json()).await?;
        }
        Ok(())
    }

    async fn on_ping(&mut self) -> Step {
        if self.last_frame.elapsed() >= 2 * self.context.ping {
            warn!("client sent nothing for two ping intervals; dropping it");
            let at = self.last_frame;
            return Err(Outcome::Ended { at, reason: EndReason::ClientTimeout });
        }
        self.send(Message::Ping(Default::default())).await
    }

    async fn send_event(&mut self, json: String) -> Step {
        if !self.context.events {
            return Ok(());
        }
        self.send(Message::Text(json.into())).await
    }

    /// Sends a frame. A client that has not taken it within two ping
    /// intervals has stopped reading and is dropped.
    async fn send(&mut self, message: Message) -> Step {
        match timeout(2 * self.context.ping, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                Err(Outcome::Ended { at: Instant::now(), reason: EndReason::ClientDisconnected })
            }
            Err(_) => {
                warn!("client stopped reading; dropping it");
                Err(Outcome::Ended { at: Instant::now(), reason: EndReason::ClientTimeout })
            }
        }
    }

    /// Sends the close frame for `reason`, if the server owes one, and waits
    /// briefly for the client's half of the closing handshake.
    async fn close(mut self, reason: EndReason) {
        if let Some(code) = reason.close_code() {
            let frame = CloseFrame { code, reason: reason.as_str().into() };
            let sent = timeout(CLOSE_TIMEOUT, self.socket.send(Message::Close(Some(frame)))).await;
            debug!(code, sent = matches!(sent, Ok(Ok(()))), "close frame sent");
        }
        let drain = async { while let Some(Ok(_)) = self.socket.recv().await {} };
        let _ = timeout(CLOSE_TIMEOUT, drain).await;
    }
}

/// The end reason for a failed read.
fn classify(error: axum::Error) -> EndReason {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};

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
