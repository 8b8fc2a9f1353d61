//! Who is calling: an app's backend with its API key, or one of its humans
//! with a usage token (or the backend speaking for a human with its key and
//! `x-human-id`). Secrets are checked for shape and checksum before any
//! lookup, and never logged.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use super::extract;
use crate::clock;
use crate::secret::{self, SecretKind};
use crate::store::{ProjectId, UsageTokenRecord};

const API_KEY_HEADER: &str = "x-api-key";
const HUMAN_HEADER: &str = "x-human-id";

/// A caller acting for one human.
pub enum HumanCredential {
    /// A live usage token.
    Token(UsageTokenRecord),
    /// An API key with the human named in `x-human-id`. The human may not
    /// exist yet.
    Key { project: ProjectId, human: String },
}

/// The project of a backend caller, authenticated before the body is read.
pub struct Backend(pub ProjectId);

impl FromRequestParts<AppState> for Backend {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        backend(state, &parts.headers).await.map(Backend)
    }
}

/// Authenticates a backend endpoint: an API key in `x-api-key`. A usage
/// token, wherever it is put, is refused with 403.
async fn backend(state: &AppState, headers: &HeaderMap) -> Result<ProjectId, ApiError> {
    let key = extract::header(headers, API_KEY_HEADER)?;
    let presented = [key, bearer(headers)?];
    if presented.into_iter().flatten().any(|c| secret::parse(c, SecretKind::UsageToken).is_some()) {
        return Err(ApiError::Forbidden(
            "usage tokens cannot call backend endpoints; send an API key in x-api-key",
        ));
    }
    api_key(state, key.ok_or(ApiError::Unauthorized)?).await
}

/// Authenticates an endpoint a human may call: a usage token as a Bearer
/// header or (for WebSockets, where browsers cannot set headers) the
/// `token` query parameter, or an API key with `x-human-id`.
pub async fn human(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<HumanCredential, ApiError> {
    if let Some(key) = extract::header(headers, API_KEY_HEADER)? {
        let project = api_key(state, key).await?;
        let Some(human) = extract::header(headers, HUMAN_HEADER)? else {
            return Err(ApiError::InvalidInput(format!(
                "{HUMAN_HEADER}: required when calling with {API_KEY_HEADER}"
            )));
        };
        let human = extract::human(human.to_owned(), HUMAN_HEADER)?;
        return Ok(HumanCredential::Key { project, human });
    }
    let token = match bearer(headers)? {
        Some(token) => token,
        None => query_token.ok_or(ApiError::Unauthorized)?,
    };
    usage_token(state, token).await.map(HumanCredential::Token)
}

async fn api_key(state: &AppState, presented: &str) -> Result<ProjectId, ApiError> {
    let hash = secret::parse(presented, SecretKind::ApiKey).ok_or(ApiError::Unauthorized)?;
    state.store.find_api_key(hash).await?.ok_or(ApiError::Unauthorized)
}

async fn usage_token(state: &AppState, presented: &str) -> Result<UsageTokenRecord, ApiError> {
    let hash = secret::parse(presented, SecretKind::UsageToken).ok_or(ApiError::Unauthorized)?;
    let record = state.store.find_usage_token(hash).await?.ok_or(ApiError::Unauthorized)?;
    if record.revoked {
        return Err(ApiError::TokenRevoked);
    }
    if record.expires_at <= clock::now_millis() {
        return Err(ApiError::TokenExpired);
    }
    Ok(record)
}

/// The credential of an `Authorization: Bearer` header, if there is one.
/// Other schemes are not ours and are ignored.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = extract::header(headers, AUTHORIZATION.as_str())? else {
        return Ok(None);
    };
    let credential = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credential)| credential.trim())
        .filter(|credential| !credential.is_empty());
    Ok(credential)
}
