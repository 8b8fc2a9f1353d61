//! Reading back what was metered: `GET /v1/usage/events` lists the
//! project's ledger rows and `GET /v1/realtime/sessions` its sessions,
//! oldest first, a page at a time. The client passes the last id it saw as
//! `after` and gets the rows it has not seen, however many were written
//! since (see `store::sqlite::listings`).

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use serde::Serialize;

use super::AppState;
use super::auth::Backend;
use super::error::ApiError;
use super::extract::{self, QueryParams};
use crate::clock;
use crate::limits::{LimitType, SessionKind};
use crate::store::{
    LedgerFilter, LedgerRow, Listing, Page, SessionFilter, SessionRow, SessionState,
};

/// Rows in a page that names no `limit`.
const DEFAULT_LIMIT: u32 = 100;

/// Most rows in one page. It bounds one answer (a few hundred bytes a row)
/// and how long one listing keeps the store's reader thread, on which the
/// next request's credential waits to be checked.
const MAX_LIMIT: u32 = 1000;

/// The query of `GET /v1/usage/events`.
pub struct EventsQuery {
    human: Option<String>,
    limit_type: Option<LimitType>,
    page: Page<i64>,
}

impl<S: Send + Sync> FromRequestParts<S> for EventsQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let mut params = QueryParams::parse(&parts.uri, &["human", "type", "after", "limit"])?;
        Ok(EventsQuery {
            human: params.take("human").map(|name| extract::human(name, "human")).transpose()?,
            limit_type: params.take("type").map(|name| limit_type(&name)).transpose()?,
            page: Page {
                after: params.take("after").map(|id| ledger_id(&id)).transpose()?,
                limit: limit(params.take("limit"))?,
            },
        })
    }
}

/// The query of `GET /v1/realtime/sessions`.
pub struct SessionsQuery {
    human: Option<String>,
    state: Option<SessionState>,
    page: Page<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for SessionsQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let mut params = QueryParams::parse(&parts.uri, &["human", "state", "after", "limit"])?;
        Ok(SessionsQuery {
            human: params.take("human").map(|name| extract::human(name, "human")).transpose()?,
            state: params.take("state").map(|state| session_state(&state)).transpose()?,
            page: Page {
                after: params.take("after").map(session_id).transpose()?,
                limit: limit(params.take("limit"))?,
            },
        })
    }
}

/// A page as the API answers it.
#[derive(Serialize)]
pub struct PageView<T, C> {
    data: Vec<T>,
    has_more: bool,
    /// What to pass as `after` for the next page: the last row's id, or
    /// the `after` asked for when the page is empty.
    next_after: Option<C>,
}

#[derive(Serialize)]
pub struct EventView {
    id: i64,
    human: String,
    #[serde(rename = "type")]
    limit_type: LimitType,
    entry: &'static str,
    /// In API units, negative for a debit.
    value: f64,
    created_at: String,
    updated_at: String,
    session: Option<String>,
    completion: Option<String>,
    report: Option<ReportRefView>,
}

#[derive(Serialize)]
pub struct ReportRefView {
    id: i64,
    idempotency_key: String,
}

#[derive(Serialize)]
pub struct SessionView {
    id: String,
    human: String,
    kind: SessionKind,
    started_at: String,
    ended_at: Option<String>,
    seconds_used: f64,
    end_reason: Option<String>,
}

/// `GET /v1/usage/events`
pub async fn events(
    State(state): State<AppState>,
    Backend(project): Backend,
    query: EventsQuery,
) -> Result<Json<PageView<EventView, i64>>, ApiError> {
    let filter = LedgerFilter { project, human: query.human, limit_type: query.limit_type };
    let after = query.page.after;
    let listing = state.store.ledger(filter, query.page).await?;
    Ok(Json(page_view(listing, after, |row| row.id, event_view)))
}

/// `GET /v1/realtime/sessions`
pub async fn sessions(
    State(state): State<AppState>,
    Backend(project): Backend,
    query: SessionsQuery,
) -> Result<Json<PageView<SessionView, String>>, ApiError> {
    let filter = SessionFilter { project, human: query.human, state: query.state };
    let after = query.page.after.clone();
    let listing = state.store.sessions(filter, query.page).await?.ok_or_else(|| {
        ApiError::InvalidInput("after: the project has no session with this id".into())
    })?;
    Ok(Json(page_view(listing, after, |row| row.public_id.clone(), session_view)))
}

fn page_view<R, T, C>(
    listing: Listing<R>,
    after: Option<C>,
    id_of: impl Fn(&R) -> C,
    view: impl Fn(R) -> T,
) -> PageView<T, C> {
    let next_after = listing.rows.last().map(id_of).or(after);
    let data = listing.rows.into_iter().map(view).collect();
    PageView { data, has_more: listing.has_more, next_after }
}

fn event_view(row: LedgerRow) -> EventView {
    EventView {
        id: row.id,
        human: row.human,
        limit_type: row.limit_type,
        entry: row.entry.as_str(),
        value: row.limit_type.to_value(row.amount),
        created_at: clock::rfc3339(row.created_at),
        updated_at: clock::rfc3339(row.updated_at),
        session: row.session,
        completion: row.completion,
        report: row
            .report
            .map(|report| ReportRefView { id: report.id, idempotency_key: report.idempotency_key }),
    }
}

fn session_view(row: SessionRow) -> SessionView {
    SessionView {
        id: row.public_id,
        human: row.human,
        kind: row.kind,
        started_at: clock::rfc3339(row.started_at),
        ended_at: row.ended_at.map(clock::rfc3339),
        seconds_used: row.kind.limit_type().to_value(row.charged),
        end_reason: row.end_reason,
    }
}

fn limit(value: Option<String>) -> Result<u32, ApiError> {
    let Some(value) = value else {
        return Ok(DEFAULT_LIMIT);
    };
    value.parse().ok().filter(|limit| (1..=MAX_LIMIT).contains(limit)).ok_or_else(|| {
        ApiError::InvalidInput(format!("limit: must be a whole number from 1 to {MAX_LIMIT}"))
    })
}

fn ledger_id(value: &str) -> Result<i64, ApiError> {
    value.parse().ok().filter(|id| *id >= 0).ok_or_else(|| {
        ApiError::InvalidInput("after: must be a ledger row's id, a whole number from 0".into())
    })
}

fn session_id(value: String) -> Result<String, ApiError> {
    if crate::ids::is_public_id("ses", &value) {
        Ok(value)
    } else {
        Err(ApiError::InvalidInput("after: must be a session's id, ses_ and 32 hex digits".into()))
    }
}

fn limit_type(name: &str) -> Result<LimitType, ApiError> {
    LimitType::parse(name).ok_or_else(|| {
        ApiError::InvalidInput(
            "type: must be conversational_seconds, voice_synthesis_seconds or token_cnt".into(),
        )
    })
}

fn session_state(name: &str) -> Result<SessionState, ApiError> {
    match name {
        "open" => Ok(SessionState::Open),
        "ended" => Ok(SessionState::Ended),
        _ => Err(ApiError::InvalidInput("state: must be open or ended".into())),
    }
}
