//! Admission of realtime sessions: `GET /v1/realtime/session`. Everything
//! that can refuse a session is checked before the upgrade, so a refused
//! client gets an HTTP status and an error body, never a socket.

use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::oneshot;
use tracing::{Instrument, info_span, warn};

use super::AppState;
use super::auth::{self, Peer, Presented};
use super::error::ApiError;
use super::extract;
use crate::clock;
use crate::close::EndReason;
use crate::config::AllowedOrigins;
use crate::limits::SessionKind;
use crate::meter::{MeterHandle, UsageEvents};
use crate::session::{self, SessionContext, Ticket};
use crate::store::{Admission, Human, NewSession, SessionCaller, StoreError};
use crate::upstream::OpenUpstream;

/// Read buffer per connection, and the most tungstenite asks for at once.
/// It is filled once and then kept, so it is most of what an idle session
/// costs: tungstenite's default of 128 KiB would cost that much per
/// session. Three 20 ms audio frames of 640 bytes fit in it; larger frames
/// still arrive, in several reads. A client that sends in bulk is not read
/// from the socket in pieces this small: the listener reads ahead beneath
/// tungstenite while the socket stays full (`read_ahead`).
const READ_BUFFER_BYTES: usize = 2 * 1024;

/// What tungstenite gathers for the client before it writes to the socket
/// (its default).
const WRITE_BUFFER_BYTES: usize = 128 * 1024;

/// The longest header of a frame the server sends.
const FRAME_HEADER_BYTES: usize = 10;

#[derive(Deserialize)]
pub struct SessionQuery {
    kind: Option<String>,
    token: Option<String>,
    events: Option<String>,
}

/// `GET /v1/realtime/session?kind=conversational|voice_synthesis`
pub async fn open(
    state: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    query: Result<Query<SessionQuery>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let opened = upgrade_session(state, peer, query, headers, upgrade).await;
    let outcome = match &opened {
        Ok(_) => "accepted",
        Err(error) => error.kind(),
    };
    metrics::counter!(crate::metrics::UPGRADES, "outcome" => outcome).increment(1);
    opened
}

async fn upgrade_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<SessionQuery>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|_| ApiError::InvalidInput("query string: could not be parsed".into()))?;
    let kind = parse_kind(query.kind.as_deref())?;
    let events = parse_events(query.events.as_deref())?;
    let upgrade = upgrade.map_err(|_| {
        ApiError::InvalidInput("this endpoint takes a WebSocket upgrade request".into())
    })?;
    check_origin(&state.settings.allowed_origins, &headers)?;
    let caller = caller(&state, Peer(peer.ip()), &headers, query.token.as_deref()).await?;
    let (admitted, human) = admit(&state, Peer(peer.ip()), caller, kind).await?;
    let span = info_span!(parent: None, "session", id = %admitted.public_id,
                          human = %human.name, kind = kind.as_str(), %peer);
    let (admitted, upstream) =
        connect_upstream(&state, kind, &human, admitted).instrument(span.clone()).await?;

    // Boxed: the upgrade's task keeps what its callback captures for the
    // whole session.
    let context = Box::new(SessionContext {
        key: admitted.ticket.key(),
        public_id: admitted.public_id,
        human: human.id,
        human_name: human.name,
        kind,
        remaining: admitted.remaining,
        revocation_epoch: admitted.revocation_epoch,
        events,
        ping: state.settings.ping,
        max_duration: state.settings.max_session,
        max_message_bytes: state.settings.max_message_bytes,
        meter: state.meter.clone(),
        span,
        upstream,
    });
    let max_message_bytes = state.settings.max_message_bytes;
    // tungstenite answers each ping with a pong, and keeps in its write
    // buffer those the socket will not take. Bounded to what it gathers
    // anyway plus one message, it holds back the pongs of a client that
    // sends pings without reading, and answers only the latest once there
    // is room: a flood of pings costs a bounded amount, and the session
    // waits for the client to read before it sends anything more.
    let max_write_bytes = WRITE_BUFFER_BYTES + max_message_bytes + FRAME_HEADER_BYTES;
    Ok(upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(max_write_bytes)
        .max_message_size(max_message_bytes)
        .max_frame_size(max_message_bytes)
        .on_upgrade(move |socket| session::run(socket, context, admitted.ticket)))
}

/// Opens the connection to the service behind the session, if its kind has
/// one, before the client's upgrade is accepted: a service that cannot be
/// reached is a 502 and costs the client nothing.
async fn connect_upstream(
    state: &AppState,
    kind: SessionKind,
    human: &Human,
    admitted: Admitted,
) -> Result<(Admitted, Option<Box<OpenUpstream>>), ApiError> {
    let (Some(upstream), Some(client)) =
        (state.settings.upstreams.for_kind(kind), state.upstream_client.as_ref())
    else {
        return Ok((admitted, None));
    };
    // Connecting goes on in a task of its own: should the client go away
    // meanwhile, this handler is dropped but the connection is not, and,
    // dropped unsent, it closes with a frame rather than in mid-handshake.
    let (client, upstream) = (client.clone(), upstream.clone());
    let (human, session, max_message_bytes) =
        (human.name.clone(), admitted.public_id.clone(), state.settings.max_message_bytes);
    let (connected_tx, connected_rx) = oneshot::channel();
    tokio::spawn(async move {
        let connected = client.connect(&upstream, &human, &session, max_message_bytes).await;
        let _ = connected_tx.send(connected);
    });
    let connected = connected_rx.await.map_err(|_| ApiError::UpstreamUnavailable)?;
    match connected {
        // Shutdown may have begun while the upstream answered.
        Ok(_) if state.shutdown.is_cancelled() => {
            admitted.ticket.cancel(EndReason::ServerShutdown);
            Err(ApiError::Unavailable("the server is shutting down"))
        }
        Ok(socket) => Ok((admitted, Some(Box::new(socket)))),
        Err(error) => {
            warn!(%error, "cannot reach the upstream");
            admitted.ticket.cancel(EndReason::UpstreamUnavailable);
            Err(ApiError::UpstreamUnavailable)
        }
    }
}

/// A session the store has recorded as open.
struct Admitted {
    ticket: Ticket,
    public_id: String,
    remaining: Option<i64>,
    revocation_epoch: i64,
}

/// Records the session as open, or says why it may not be; the human it
/// is for comes with it.
async fn admit(
    state: &AppState,
    peer: Peer,
    caller: SessionCaller,
    kind: SessionKind,
) -> Result<(Admitted, Human), ApiError> {
    state.check_recording()?;
    let public_id = session_id();
    let session = NewSession {
        caller,
        kind,
        public_id: public_id.clone(),
        max_sessions_per_human: state.settings.max_sessions_per_human,
        now: clock::now_millis(),
    };
    // The store is called from a task of its own, which takes a ticket for
    // the session the moment it is admitted. Should the client go away while
    // the store works, this handler is dropped but the task is not, and the
    // ticket, dropped unsent, tells the meter the session never started.
    let (store, meter) = (state.store.clone(), state.meter.clone());
    let (answer_tx, answer_rx) = oneshot::channel();
    tokio::spawn(async move {
        let answer = match store.open_session(session).await {
            Ok(admission) => admitted(admission, public_id, kind, meter),
            Err(error) => Err(Refusal::Api(ApiError::from(error))),
        };
        let _ = answer_tx.send(answer);
    });
    match answer_rx.await.map_err(|_| ApiError::from(StoreError::Closed))? {
        Ok(admitted) => Ok(admitted),
        Err(Refusal::UnknownToken) => Err(auth::failed(state, peer)),
        Err(Refusal::Api(error)) => Err(error),
    }
}

/// Why the store did not admit a session.
enum Refusal {
    /// No usage token has the hash presented: a failure of the caller's
    /// address, counted once the answer is back.
    UnknownToken,
    Api(ApiError),
}

fn admitted(
    admission: Admission,
    public_id: String,
    kind: SessionKind,
    meter: MeterHandle,
) -> Result<(Admitted, Human), Refusal> {
    let refused = match admission {
        Admission::Admitted { key, human, remaining, revocation_epoch } => {
            let ticket = Ticket::new(key, meter);
            return Ok((Admitted { ticket, public_id, remaining, revocation_epoch }, human));
        }
        Admission::UnknownToken => return Err(Refusal::UnknownToken),
        Admission::LimitExhausted => ApiError::UsageLimitExceeded(kind.limit_type().as_str()),
        Admission::TooManySessions => ApiError::TooManySessions,
        Admission::TokenRevoked => ApiError::TokenRevoked,
        Admission::TokenExpired => ApiError::TokenExpired,
    };
    Err(Refusal::Api(refused))
}

/// Who is opening the session: a usage token, looked up by the admission,
/// or the human an API key's caller named, found or made now. A human is
/// made only while usage can be recorded, so that an upgrade refused for
/// that leaves nothing behind.
async fn caller(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<SessionCaller, ApiError> {
    Ok(match auth::presented(state, peer, headers, query_token).await? {
        Presented::Token(hash) => SessionCaller::Token(hash),
        Presented::Key { project, human } => {
            state.check_recording()?;
            SessionCaller::Human(state.store.find_or_create_human(project, &human).await?)
        }
    })
}

/// With a list of allowed origins, a page from any other origin may not
/// open a session. Clients that send no `Origin` (apps, servers) are not
/// browsers and pass; one that sends two is refused, since only the first
/// would be checked.
fn check_origin(allowed: &AllowedOrigins, headers: &HeaderMap) -> Result<(), ApiError> {
    let AllowedOrigins::List(list) = allowed else {
        return Ok(());
    };
    let Some(origin) = extract::header(headers, header::ORIGIN.as_str())? else {
        return Ok(());
    };
    if list.iter().any(|allowed| allowed == origin) {
        Ok(())
    } else {
        Err(ApiError::Forbidden("this origin may not open sessions"))
    }
}

fn parse_kind(kind: Option<&str>) -> Result<SessionKind, ApiError> {
    let kind = kind.ok_or_else(|| {
        ApiError::InvalidInput("kind: required, conversational or voice_synthesis".into())
    })?;
    SessionKind::parse(kind).ok_or_else(|| {
        ApiError::InvalidInput("kind: must be conversational or voice_synthesis".into())
    })
}

fn parse_events(events: Option<&str>) -> Result<UsageEvents, ApiError> {
    match events {
        None | Some("all") => Ok(UsageEvents::Changes),
        Some("ticks") => Ok(UsageEvents::EveryTick),
        Some("none") => Ok(UsageEvents::Off),
        Some(_) => Err(ApiError::InvalidInput("events: must be all, ticks or none".into())),
    }
}

/// A public session id: `ses_` and 32 hex digits (see `crate::ids`).
fn session_id() -> String {
    crate::ids::public_id("ses")
}
