//! The OpenAI-compatible endpoints, `POST /v1/chat/completions` and
//! `GET /v1/models`, for frontends that use an OpenAI SDK with a usage
//! token as its API key. The caller is authenticated before the body is
//! read; the proxy in [`crate::llm`] does the rest.

use axum::body::to_bytes;
use axum::extract::{FromRequestParts, Request, State};
use axum::response::Response;

use super::AppState;
use super::auth::{self, HumanCredential, Peer};
use super::error::{ApiError, OpenAiError};
use crate::llm::{Caller, LlmError};

/// `POST /v1/chat/completions`
pub async fn chat(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, OpenAiError> {
    let (mut parts, body) = request.into_parts();
    let Ok(peer) = Peer::from_request_parts(&mut parts, &state).await;
    let caller = caller(&state, peer, &parts.headers).await?;
    state.check_recording()?;
    let limit = state.llm.max_request_bytes();
    let body = to_bytes(body, limit).await.map_err(|_| {
        let message =
            format!("the request body could not be read, or is larger than {limit} bytes");
        LlmError::InvalidRequest { param: None, message }
    })?;
    Ok(state.llm.chat(caller, body).await?)
}

/// `GET /v1/models`
pub async fn models(
    State(state): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
) -> Result<Response, OpenAiError> {
    caller(&state, peer, &headers).await?;
    Ok(state.llm.models().await?)
}

/// A method these endpoints do not take, answered in OpenAI's shape.
pub async fn wrong_method() -> OpenAiError {
    OpenAiError::Api(ApiError::MethodNotAllowed)
}

/// The human a request is for. With an API key and `x-human-id`, a human
/// met for the first time is created, unlimited until its backend sets a
/// limit.
async fn caller(
    state: &AppState,
    peer: Peer,
    headers: &axum::http::HeaderMap,
) -> Result<Caller, OpenAiError> {
    match auth::human(state, peer, headers, None).await? {
        HumanCredential::Token(token) => Ok(Caller { human: token.human, token: Some(token.id) }),
        HumanCredential::Key { project, human } => {
            let human =
                state.store.find_or_create_human(project, &human).await.map_err(ApiError::from)?;
            Ok(Caller { human, token: None })
        }
    }
}
