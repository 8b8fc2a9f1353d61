//! One realtime session once its upgrade has completed: the relay loop.
//! Frames go both ways unchanged between the client and the service behind
//! the session (the upstream), or come straight back when the session's
//! kind has none (the embedded echo). The loop also passes the meter's
//! figures to the client as `usage.*` messages, pings both sides, enforces
//! the session time limit, and closes both sides with the code of whatever
//! ended the session. The meter decides cut-offs; this loop carries them
//! out, and [`frames`] decides what becomes of each frame. A side is read
//! only while the queue its frames go to has room, so a side that reads
//! slowly slows the other down; a client that stops reading altogether is
//! dropped.

pub(crate) mod frames;
mod outbox;
mod patient;
pub mod protocol;

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use futures::stream::SplitStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::{self, Message as UpstreamMessage};
use tracing::{Instrument, Span, info, warn};

use crate::close::EndReason;
use crate::limits::SessionKind;
use crate::meter::{self, MeterHandle, Registration, SessionUpdate, UsageEvents};
use crate::store::{HumanId, SessionKey};
use crate::upstream::{OpenUpstream, UpstreamSocket};
use frames::{UpstreamPart, Verdict};
use outbox::{Backlog, Outbox, Refused, Weight};
use patient::Patient;
use protocol::{ServerMessage, seconds};

/// How long the server waits for each side to take its close frame and
/// answer it before it drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many messages may wait to be sent to either side: about two and a
/// half seconds of 20 ms audio frames.
const QUEUE_MESSAGES: usize = 128;

/// How many bytes may wait to be sent to either side, unless two messages
/// of the largest size allowed need more. Together with the message count
/// this bounds what one session can make the server hold: while a side's
/// queue is full, the loop stops reading whatever feeds it, and TCP slows
/// the sender down.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// How long a client's queue may stay full without the client taking
/// anything from it before the client is dropped as too slow. A phone on a
/// poor link gets through a handover or a burst of loss in a second or two
/// and then catches up; a client that takes nothing for this long has
/// stopped reading, and meanwhile holds up the upstream and is charged.
/// Progress is seen a message at a time, so a client whose link is too slow
/// to take one message of the largest size allowed within this time is
/// dropped although it is still reading.
const CLIENT_STALL: Duration = Duration::from_secs(5);

/// Everything a session needs, gathered by admission.
pub struct SessionContext {
    pub key: SessionKey,
    pub public_id: String,
    pub human: HumanId,
    pub human_name: String,
    pub kind: SessionKind,
    pub remaining: Option<i64>,
    pub revocation_epoch: i64,
    /// Which `usage.*` messages the client asked for (`?events=`).
    pub events: UsageEvents,
    pub ping: Duration,
    pub max_duration: Duration,
    pub max_message_bytes: usize,
    pub meter: MeterHandle,
    pub span: Span,
    /// The connection to the service behind the session, already open;
    /// `None` for the echo. Boxed: it is large (TLS state), and it is taken
    /// out of the context and split as soon as the session starts.
    pub upstream: Option<Box<OpenUpstream>>,
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
    Ended { at: Instant, reason: EndReason, upstream: UpstreamPart },
    /// The meter ended the session and already stopped charging it.
    ClosedByMeter(EndReason),
}

impl Outcome {
    fn ended(reason: EndReason) -> Outcome {
        Outcome::Ended { at: Instant::now(), reason, upstream: UpstreamPart::None }
    }

    fn upstream(at: Instant, part: UpstreamPart) -> Outcome {
        Outcome::Ended { at, reason: EndReason::UpstreamClosed, upstream: part }
    }
}

/// Runs a session from the completed upgrade to its close.
///
/// The future is kept by its task for the whole session, so it is kept
/// small: it holds the relay loop's own state and pointers to the boxed
/// session and registration, and the larger futures of the opening and of
/// the closing handshake are boxed while they run. An `async fn` keeps room
/// for its arguments for as long as it runs, even once they are moved out,
/// so the setup is done here, outside one, and what is handed on is boxed.
pub fn run(
    socket: WebSocket,
    context: Box<SessionContext>,
    ticket: Ticket,
) -> impl Future<Output = ()> + Send {
    let started = Instant::now();
    ticket.redeem();
    let span = context.span.clone();
    let (updates_tx, updates_rx) = watch::channel(SessionUpdate {
        remaining_millis: context.remaining,
        ..SessionUpdate::default()
    });
    let registration = Box::new(registration(&context, started, updates_tx));
    let session = Session::start(socket, *context, updates_rx, started);
    serve_session(session, registration, started).instrument(span)
}

async fn serve_session(
    mut session: Box<Session>,
    registration: Box<Registration>,
    started: Instant,
) {
    Box::pin(session.context.meter.open(*registration)).await;
    info!(remaining = session.context.remaining.map(seconds), "session opened");
    let (reason, upstream) = match session.serve(started).await {
        Outcome::Ended { at, reason, upstream } => {
            session.context.meter.end(session.context.key, at, reason).await;
            (reason, upstream)
        }
        Outcome::ClosedByMeter(reason) => (reason, UpstreamPart::None),
    };
    Box::pin(session.close(reason, upstream)).await;
}

impl Session {
    /// Starts the writers of both sides. Boxed: it is what the session's
    /// future holds while the session is open.
    fn start(
        socket: WebSocket,
        mut context: SessionContext,
        updates_rx: watch::Receiver<SessionUpdate>,
        started: Instant,
    ) -> Box<Session> {
        let queue_bytes = QUEUE_BYTES.max(2 * context.max_message_bytes);
        let (to_client, from_client) = Patient::new(socket).split();
        let (to_upstream, from_upstream) = match context.upstream.take().map(|u| u.into_socket()) {
            Some(socket) => {
                let (to, from) = socket.split();
                (Some(Outbox::spawn(to, QUEUE_MESSAGES, queue_bytes)), Some(from))
            }
            None => (None, None),
        };
        Box::new(Session {
            from_client,
            to_client: Outbox::spawn(to_client, QUEUE_MESSAGES, queue_bytes),
            from_upstream,
            to_upstream,
            context,
            updates_rx,
            last_frame: started,
            last_upstream_frame: started,
            client_full_since: None,
            low_sent: false,
            figures_skipped: false,
        })
    }
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
        events: context.events,
        updates_tx,
        span: context.span.clone(),
    }
}

/// The client's connection, which waits rather than fails while its write
/// buffer is full.
type ClientSocket = Patient<WebSocket>;

struct Session {
    from_client: SplitStream<ClientSocket>,
    to_client: Outbox<Message>,
    from_upstream: Option<SplitStream<UpstreamSocket>>,
    to_upstream: Option<Outbox<UpstreamMessage>>,
    context: SessionContext,
    updates_rx: watch::Receiver<SessionUpdate>,
    /// When the client last sent anything, pongs included.
    last_frame: Instant,
    /// When the upstream last sent anything, pongs included.
    last_upstream_frame: Instant,
    /// Since when the client's queue has been full without the client
    /// taking anything from it.
    client_full_since: Option<Instant>,
    /// A warning was sent and the pool has not been topped up since.
    low_sent: bool,
    /// The last figures, or their warning, found no place in the client's
    /// queue; they go out at the next ping, counted down to then. By
    /// default the meter sends figures only when they change, so nothing
    /// else would.
    figures_skipped: bool,
}

/// What one turn of the loop decided.
type Step = Result<(), Outcome>;

impl Session {
    async fn serve(&mut self, started: Instant) -> Outcome {
        if let Err(outcome) = self.send_started() {
            return outcome;
        }
        let ping_every = self.context.ping;
        let ping_due = tokio::time::sleep_until(ping_slot(started + ping_every, ping_every));
        tokio::pin!(ping_due);
        let time_limit = started + self.context.max_duration;
        let time_limit_reached = tokio::time::sleep_until(time_limit);
        tokio::pin!(time_limit_reached);
        loop {
            // The meter's word and the time limit come first: a side sending
            // without pause must not delay the session's cut-off. Each side
            // is read only while the queue its frames go to has room, and
            // the loop wakes when that queue has room again.
            let client_has_room = self.to_client.has_room();
            let upstream_has_room = self.upstream_has_room();
            let client_is_read = self.client_is_read();
            let stall_deadline = self.client_stall_deadline(client_has_room);
            let step = tokio::select! {
                biased;
                changed = self.updates_rx.changed() => self.on_update(changed.is_ok()),
                _ = &mut time_limit_reached => Err(Outcome::Ended {
                    at: time_limit,
                    reason: EndReason::SessionTimeLimit,
                    upstream: UpstreamPart::None,
                }),
                _ = room_until(&self.to_client, stall_deadline), if !client_has_room => {
                    self.on_client_room()
                }
                Some(message) = next_from(&mut self.from_upstream), if client_has_room => {
                    self.on_upstream(message)
                }
                _ = room(&self.to_upstream), if !upstream_has_room => Ok(()),
                message = self.from_client.next(), if client_is_read => self.on_client(message),
                () = &mut ping_due => {
                    ping_due.as_mut().reset(ping_slot(Instant::now() + ping_every, ping_every));
                    self.on_ping()
                }
            };
            if let Err(outcome) = step {
                return outcome;
            }
        }
    }

    fn upstream_has_room(&self) -> bool {
        self.to_upstream.as_ref().is_none_or(Outbox::has_room)
    }

    /// Whether the loop reads the client: while the queue its frames go to,
    /// the upstream's or (for the echo) its own, has room.
    fn client_is_read(&self) -> bool {
        match &self.to_upstream {
            Some(to_upstream) => to_upstream.has_room(),
            None => self.to_client.has_room(),
        }
    }

    /// When the client is dropped as too slow if its queue stays full:
    /// [`CLIENT_STALL`] after the queue filled or the client last took
    /// something from it. `None` while the queue has room.
    fn client_stall_deadline(&mut self, client_has_room: bool) -> Option<Instant> {
        if client_has_room {
            self.client_full_since = None;
            return None;
        }
        let full_since = *self.client_full_since.get_or_insert_with(Instant::now);
        Some(full_since + CLIENT_STALL)
    }

    /// The client took something from its full queue, or took nothing for
    /// [`CLIENT_STALL`].
    fn on_client_room(&mut self) -> Step {
        if self.to_client.is_gone() {
            return Err(Outcome::ended(EndReason::ClientDisconnected));
        }
        if self.to_client.has_room() {
            return Ok(());
        }
        let seconds = CLIENT_STALL.as_secs();
        warn!("client took nothing of what the session sends for {seconds} s; dropping it");
        Err(Outcome::ended(EndReason::ClientTooSlow))
    }

    fn send_started(&mut self) -> Step {
        let message = ServerMessage::SessionStarted {
            session_id: &self.context.public_id,
            kind: self.context.kind,
            human: &self.context.human_name,
            remaining: self.context.remaining.map(seconds),
        }
        .to_json();
        self.send_event(message).map(|_| ())
    }

    fn on_client(&mut self, read: Option<Result<Message, axum::Error>>) -> Step {
        if matches!(read, Some(Ok(_))) {
            self.last_frame = Instant::now();
        }
        match frames::from_client(read) {
            Verdict::Relay(message) => self.forward(message),
            Verdict::Alive => Ok(()),
            Verdict::End(reason) => Err(Outcome::ended(reason)),
        }
    }

    /// Passes a client's frame to the upstream, or back to the client when
    /// the session echoes.
    fn forward(&mut self, message: Message) -> Step {
        let Some(to_upstream) = &self.to_upstream else {
            return self.send_to_client(message);
        };
        let Some(message) = frames::to_upstream(message) else {
            return Ok(());
        };
        // The loop reads the client only while the queue has room, so a
        // refusal means the upstream's writer has stopped.
        to_upstream
            .push(message)
            .map_err(|_| Outcome::upstream(Instant::now(), UpstreamPart::Closed(1006)))
    }

    fn on_upstream(&mut self, read: Option<Result<UpstreamMessage, tungstenite::Error>>) -> Step {
        let now = Instant::now();
        self.last_upstream_frame = now;
        match frames::from_upstream(read) {
            Verdict::Relay(message) => self.send_to_client(message),
            Verdict::Alive => Ok(()),
            Verdict::End(part) => Err(Outcome::upstream(now, part)),
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
        self.send_figures(&update)
    }

    /// Sends `usage.remaining`, and `usage.warning` when the pool has just
    /// fallen below the warning line.
    fn send_figures(&mut self, update: &SessionUpdate) -> Step {
        if self.context.events == UsageEvents::Off {
            return Ok(());
        }
        let remaining = update.remaining_millis.map(seconds);
        let used = seconds(update.used_millis);
        let sessions = update.sessions;
        let message = ServerMessage::Remaining { remaining, used, sessions }.to_json();
        self.figures_skipped = !self.send_event(message)?;
        if !update.low {
            self.low_sent = false;
        } else if !self.low_sent {
            // A warning that finds no place goes out with the figures at
            // the next ping, or with the next update if that comes first.
            let remaining = remaining.unwrap_or_default();
            self.low_sent = self.send_event(ServerMessage::Warning { remaining }.to_json())?;
            self.figures_skipped |= !self.low_sent;
        }
        Ok(())
    }

    /// Pings both sides, and ends the session if one of them has been
    /// silent for two intervals.
    fn on_ping(&mut self) -> Step {
        let silent_for = 2 * self.context.ping;
        // While the loop itself has stopped reading a side, waiting for
        // room in the queue its frames go to, that side's silence is not
        // its own.
        if !self.client_is_read() {
            self.last_frame = Instant::now();
        }
        if !self.to_client.has_room() {
            self.last_upstream_frame = Instant::now();
        }
        if self.last_frame.elapsed() >= silent_for {
            warn!("client sent nothing for two ping intervals; dropping it");
            let at = self.last_frame;
            let outcome = Outcome::Ended {
                at,
                reason: EndReason::ClientTimeout,
                upstream: UpstreamPart::None,
            };
            return Err(outcome);
        }
        if let Some(to_upstream) = &self.to_upstream {
            if self.last_upstream_frame.elapsed() >= silent_for {
                warn!("the upstream sent nothing for two ping intervals; closing the session");
                return Err(Outcome::upstream(
                    self.last_upstream_frame,
                    UpstreamPart::Failed(1006),
                ));
            }
            // A full queue needs no ping: the check above will tell.
            let _ = to_upstream.push_own(UpstreamMessage::Ping(Default::default()));
        }
        if self.figures_skipped {
            let update = meter::counted_down(&self.updates_rx.borrow(), Instant::now());
            self.send_figures(&update)?;
        }
        self.send_own(Message::Ping(Default::default())).map(|_| ())
    }

    /// Interleaves one of the server's own messages on the client's side;
    /// they never go upstream. Returns whether it was queued.
    fn send_event(&mut self, json: String) -> Result<bool, Outcome> {
        if self.context.events == UsageEvents::Off {
            return Ok(false);
        }
        self.send_own(Message::Text(json.into()))
    }

    /// Queues one of the server's own messages for the client, or skips it
    /// if even the places kept for them are taken: the stall check decides
    /// what becomes of a client that reads nothing.
    fn send_own(&mut self, message: Message) -> Result<bool, Outcome> {
        match self.to_client.push_own(message) {
            Ok(()) => Ok(true),
            Err(Refused::Full) => Ok(false),
            Err(Refused::Gone) => Err(Outcome::ended(EndReason::ClientDisconnected)),
        }
    }

    /// Queues a relayed or echoed frame for the client. The loop takes
    /// these in only while the client's queue has room.
    fn send_to_client(&mut self, message: Message) -> Step {
        match self.to_client.push(message) {
            Ok(()) => Ok(()),
            Err(Refused::Full) => Err(Outcome::ended(EndReason::ClientTooSlow)),
            Err(Refused::Gone) => Err(Outcome::ended(EndReason::ClientDisconnected)),
        }
    }

    /// Closes both sides, at once: each gets its close frame, if it is
    /// owed one, and a moment for its half of the closing handshake.
    async fn close(self: Box<Self>, reason: EndReason, upstream: UpstreamPart) {
        let client_frame = frames::client_close(reason, upstream);
        // What the upstream said before it closed still reaches the client;
        // otherwise the session was stopped, and the close goes first.
        let client_backlog =
            if reason == EndReason::UpstreamClosed { Backlog::Send } else { Backlog::Drop };
        let Session { to_client, from_client, to_upstream, from_upstream, .. } = *self;
        let client = finish(to_client, client_frame, client_backlog, from_client);
        let upstream_side = async {
            if let (Some(to), Some(from)) = (to_upstream, from_upstream) {
                let (frame, backlog) = frames::upstream_close(reason, upstream);
                finish(to, frame, backlog, from).await;
            }
        };
        tokio::join!(client, upstream_side);
    }
}

/// Sends a side its last frame and reads what it answers, both within
/// [`CLOSE_TIMEOUT`]; then the connection is dropped.
async fn finish<M, S>(outbox: Outbox<M>, last: Option<M>, backlog: Backlog, mut from: S)
where
    M: Weight + Send + 'static,
    S: futures::Stream + Unpin,
{
    let closing = outbox.finish(last, backlog);
    let drain = async { while from.next().await.is_some() {} };
    let _ = timeout(CLOSE_TIMEOUT, async { tokio::join!(closing, drain) }).await;
}

/// The first moment at or after `at` on a grid of instants shared by every
/// session, with a step of a sixteenth of the ping interval and at most
/// 250 ms. Pings fall due on it, so that the timers of the many sessions
/// due in one step fire together: an idle server wakes once per step for
/// all of them rather than once per session. A ping is at most a step late.
fn ping_slot(at: Instant, ping_every: Duration) -> Instant {
    static GRID_START: OnceLock<Instant> = OnceLock::new();
    let start = *GRID_START.get_or_init(Instant::now);
    let step = (ping_every / 16).min(Duration::from_millis(250)).as_nanos().max(1);
    let since = at.saturating_duration_since(start).as_nanos();
    let steps = since.div_ceil(step);
    start + Duration::from_nanos(u64::try_from(steps * step).unwrap_or(u64::MAX))
}

/// The next message from the upstream, if the session has one; `None`
/// (which the loop does not take) for the echo.
async fn next_from(
    from_upstream: &mut Option<SplitStream<UpstreamSocket>>,
) -> Option<Option<Result<UpstreamMessage, tungstenite::Error>>> {
    match from_upstream {
        Some(from) => Some(from.next().await),
        None => None,
    }
}

/// Resolves when the client's queue has room again, or at `deadline`.
async fn room_until(to_client: &Outbox<Message>, deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => {
            let _ = tokio::time::timeout_at(deadline, to_client.room()).await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the upstream's queue has room again.
async fn room(to_upstream: &Option<Outbox<UpstreamMessage>>) {
    match to_upstream {
        Some(outbox) => outbox.room().await,
        None => std::future::pending().await,
    }
}

impl Weight for Message {
    fn weight(&self) -> usize {
        match self {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
            Message::Close(_) => 0,
        }
    }
}

impl Weight for UpstreamMessage {
    fn weight(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_slots_are_shared_by_moments_in_one_step_and_never_early() {
        let every = Duration::from_secs(15);
        let step = Duration::from_millis(250);
        let first = ping_slot(Instant::now(), every);
        for offset_ms in [1, 60, 125, 249, 250] {
            let at = first + Duration::from_millis(offset_ms);
            let slot = ping_slot(at, every);
            assert!(slot >= at, "{offset_ms} ms: the slot is before the moment");
            assert!(slot - at < step, "{offset_ms} ms: the slot is a step or more late");
            assert_eq!(slot, first + step, "{offset_ms} ms: not the step after the first");
        }
        assert_eq!(ping_slot(first, every), first, "a moment on the grid is its own slot");
    }

    #[test]
    fn a_short_ping_interval_has_a_step_of_a_sixteenth_of_it() {
        let every = Duration::from_millis(160);
        let first = ping_slot(Instant::now(), every);
        let next = ping_slot(first + Duration::from_millis(1), every);
        assert_eq!(next - first, Duration::from_millis(10));
    }
}
