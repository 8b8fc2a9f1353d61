//! Who is calling: an app's backend with its API key, or one of its humans
//! with a usage token (or the backend speaking for a human with its key and
//! `x-human-id`). Secrets are checked for shape and checksum before any
//! lookup, and never logged. An address that failed to authenticate too
//! often is refused before its credential is read ([`super::auth_failures`]).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use super::extract;
use crate::clock;
use crate::secret::{self, SecretHash, SecretKind};
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

/// The address a request came from: the TCP peer, which behind a proxy is
/// the proxy. The listener gives every request its peer; a router served
/// some other way, without one, has all its callers counted as one.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

impl<S: Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
        Ok(Peer(peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
    }
}

/// The project of a backend caller, authenticated before the body is read.
pub struct Backend(pub ProjectId);

impl FromRequestParts<AppState> for Backend {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Ok(peer) = Peer::from_request_parts(parts, state).await;
        backend(state, peer, &parts.headers).await.map(Backend)
    }
}

/// Authenticates a backend endpoint: an API key in `x-api-key`. A usage
/// token, wherever it is put, is refused with 403.
async fn backend(state: &AppState, peer: Peer, headers: &HeaderMap) -> Result<ProjectId, ApiError> {
    state.auth_failures.check(peer.0)?;
    let key = given(extract::header(headers, API_KEY_HEADER)?);
    let presented = [key, bearer(headers)?];
    if presented.into_iter().flatten().any(|c| secret::parse(c, SecretKind::UsageToken).is_some()) {
        return Err(ApiError::Forbidden(
            "usage tokens cannot call backend endpoints; send an API key in x-api-key",
        ));
    }
    api_key(state, peer, key.ok_or(ApiError::Unauthorized)?).await
}

/// A caller acting for one human, its usage token not looked up yet.
pub enum Presented {
    /// A usage token of the right shape and checksum, by its hash.
    Token(SecretHash),
    /// An API key with the human named in `x-human-id`, as
    /// [`HumanCredential::Key`].
    Key { project: ProjectId, human: String },
}

/// Authenticates an endpoint a human may call: a usage token as a Bearer
/// header or (for WebSockets, where browsers cannot set headers) the
/// `token` query parameter, or an API key with `x-human-id`.
pub async fn human(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<HumanCredential, ApiError> {
    match presented(state, peer, headers, query_token).await? {
        Presented::Token(hash) => usage_token(state, peer, hash).await.map(HumanCredential::Token),
        Presented::Key { project, human } => Ok(HumanCredential::Key { project, human }),
    }
}

/// As [`human`], but a usage token is only checked for shape and checksum:
/// for a caller that looks it up itself (a session's admission does, in
/// its transaction), and calls [`failed`] when it finds none.
pub async fn presented(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Presented, ApiError> {
    state.auth_failures.check(peer.0)?;
    if let Some(key) = given(extract::header(headers, API_KEY_HEADER)?) {
        let project = api_key(state, peer, key).await?;
        let Some(human) = extract::header(headers, HUMAN_HEADER)? else {
            return Err(ApiError::InvalidInput(format!(
                "{HUMAN_HEADER}: required when calling with {API_KEY_HEADER}"
            )));
        };
        let human = extract::human(human.to_owned(), HUMAN_HEADER)?;
        return Ok(Presented::Key { project, human });
    }
    let token = match bearer(headers)? {
        Some(token) => token,
        None => given(query_token).ok_or(ApiError::Unauthorized)?,
    };
    let hash = secret::parse(token, SecretKind::UsageToken).ok_or_else(|| failed(state, peer))?;
    Ok(Presented::Token(hash))
}

/// The project of a live API key. An unknown or malformed one is a failure
/// of the caller's address; a revoked one is refused too, but not counted,
/// as a revoked usage token is not: a backend still sending the key it is
/// being moved off must not lock its address out for its new key as well.
async fn api_key(state: &AppState, peer: Peer, presented: &str) -> Result<ProjectId, ApiError> {
    let found = match secret::parse(presented, SecretKind::ApiKey) {
        Some(hash) => state.store.find_api_key(hash).await?,
        None => None,
    };
    match found.ok_or_else(|| failed(state, peer))? {
        key if key.revoked => Err(ApiError::Unauthorized),
        key => Ok(key.project),
    }
}

/// A live usage token. An unknown or malformed one is a failure of the
/// caller's address; a revoked or expired one is not, since only a token
/// that was really issued gets those answers, and a client that keeps
/// retrying with a stale token should keep hearing why it is refused.
async fn usage_token(
    state: &AppState,
    peer: Peer,
    hash: SecretHash,
) -> Result<UsageTokenRecord, ApiError> {
    let found = state.store.find_usage_token(hash).await?;
    let record = found.ok_or_else(|| failed(state, peer))?;
    if record.revoked {
        return Err(ApiError::TokenRevoked);
    }
    if record.expires_at <= clock::now_millis() {
        return Err(ApiError::TokenExpired);
    }
    Ok(record)
}

/// Counts a credential that matched nothing against the caller's address.
/// A request that sent no credential at all is not counted: it guessed
/// nothing.
pub fn failed(state: &AppState, peer: Peer) -> ApiError {
    state.auth_failures.record(peer.0);
    ApiError::Unauthorized
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
        .and_then(|(_, credential)| given(Some(credential)));
    Ok(credential)
}

/// A credential as sent, or `None` when it is empty or only spaces: an
/// empty `x-api-key`, `token=` or Bearer sends no credential, guesses
/// nothing, and is not counted as a failure.
fn given(credential: Option<&str>) -> Option<&str> {
    credential.map(str::trim).filter(|credential| !credential.is_empty())
}
