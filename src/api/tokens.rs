//! The usage-token endpoints: minting tokens, reading and changing a
//! human's limits, revoking, and checking or moving token expiry.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use super::auth::{self, Backend};
use super::error::ApiError;
use super::extract::{self, JsonBody, LimitInput};
use crate::clock;
use crate::limits::{ChangeMode, Limit, LimitView};
use crate::secret::{Secret, SecretKind};
use crate::store::{MintRequest, ProjectId, StoreResult};

const DEFAULT_TTL_SECONDS: f64 = 86_400.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[serde(alias = "human_id")]
    human: String,
    ttl_seconds: Option<f64>,
    limits: Option<Vec<LimitInput>>,
}

/// A mint request, checked.
#[derive(Debug)]
pub struct Mint {
    pub human: String,
    pub ttl_millis: i64,
    pub limits: Option<Vec<Limit>>,
}

impl CreateToken {
    /// Checks the body against the server's longest token lifetime.
    pub fn check(self, max_ttl_seconds: f64) -> Result<Mint, ApiError> {
        let human = extract::human(self.human, "human")?;
        let ttl_seconds = self.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS.min(max_ttl_seconds));
        Ok(Mint {
            human,
            ttl_millis: extract::ttl_millis(ttl_seconds, max_ttl_seconds)?,
            limits: self.limits.map(extract::limits).transpose()?,
        })
    }
}

#[derive(Serialize)]
pub struct CreatedToken {
    token: String,
    human: String,
    expires_at: String,
    ttl_seconds: f64,
    limits: Vec<LimitView>,
}

/// `POST /v1/usage/token`
pub async fn create(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<CreateToken>,
) -> Result<Json<CreatedToken>, ApiError> {
    let Mint { human, ttl_millis: ttl, limits } = body.check(max_ttl(&state))?;
    let token = Secret::generate(SecretKind::UsageToken);
    let now = clock::now_millis();
    let request = MintRequest {
        project,
        human: human.clone(),
        token_hash: token.hash(),
        now,
        expires_at: now + ttl,
        limits,
    };
    let limits = if request.limits.is_some() {
        settled(&state, project, &human, state.store.mint_token(request)).await?
    } else {
        state.store.mint_token(request).await?
    };
    Ok(Json(CreatedToken {
        token: token.expose().to_owned(),
        human,
        expires_at: clock::rfc3339(now + ttl),
        ttl_seconds: ttl as f64 / 1000.0,
        limits: views(limits),
    }))
}

/// `GET /v1/usage/limits`
pub async fn limits(
    State(state): State<AppState>,
    peer: auth::Peer,
    headers: HeaderMap,
) -> Result<Json<Vec<LimitView>>, ApiError> {
    let human = match auth::human(&state, peer, &headers, None).await? {
        auth::HumanCredential::Token(token) => Some(token.human),
        auth::HumanCredential::Key { project, human } => {
            state.store.find_human(project, &human).await?
        }
    };
    let Some(human) = human else {
        return Ok(Json(Vec::new()));
    };
    // The meter records open sessions once a minute; this brings the
    // human's up to now. Should that fail, the last recorded figures are
    // shown (and the sessions are being closed).
    state.meter.settle(human.id).await;
    let limits = state.store.limits(human.id).await?;
    Ok(Json(views(limits)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeLimits {
    #[serde(alias = "human_id")]
    human: String,
    limits: Vec<LimitInput>,
    #[serde(default)]
    mode: ChangeMode,
}

/// A change of limits, checked.
#[derive(Debug)]
pub struct LimitChange {
    pub human: String,
    pub limits: Vec<Limit>,
    pub mode: ChangeMode,
}

impl ChangeLimits {
    pub fn check(self) -> Result<LimitChange, ApiError> {
        let human = extract::human(self.human, "human")?;
        if self.limits.is_empty() {
            return Err(ApiError::InvalidInput("limits: must name at least one limit".into()));
        }
        Ok(LimitChange { human, limits: extract::limits(self.limits)?, mode: self.mode })
    }
}

/// `PUT /v1/usage/token`
pub async fn change_limits(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<ChangeLimits>,
) -> Result<Json<Value>, ApiError> {
    let LimitChange { human, limits, mode } = body.check()?;
    let now = clock::now_millis();
    let change = state.store.change_limits(project, &human, limits, mode, now);
    let limits = settled(&state, project, &human, change).await?;
    Ok(Json(json!({ "human": human, "limits": views(limits) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HumanOnly {
    #[serde(alias = "human_id")]
    human: String,
}

impl HumanOnly {
    /// The human named, checked.
    pub fn check(self) -> Result<String, ApiError> {
        extract::human(self.human, "human")
    }
}

/// `POST /v1/usage/token/revoke`
pub async fn revoke(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<HumanOnly>,
) -> Result<Json<Value>, ApiError> {
    let human = body.check()?;
    let revocation = state.store.revoke(project, &human, clock::now_millis());
    let revoked = settled(&state, project, &human, revocation)
        .await?
        .ok_or(ApiError::NotFound("no such human"))?;
    Ok(Json(json!({ "human": human, "revoked_tokens": revoked })))
}

/// `POST /v1/usage/token/check`
pub async fn check(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<HumanOnly>,
) -> Result<Json<Value>, ApiError> {
    let human = body.check()?;
    let now = clock::now_millis();
    let expires_at = state
        .store
        .newest_live_token(project, &human, now)
        .await?
        .ok_or(ApiError::NotFound("the human has no live usage token"))?;
    Ok(Json(expiry(&human, expires_at, now)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTtl {
    #[serde(alias = "human_id")]
    human: String,
    ttl_seconds: f64,
}

/// A new lifetime for a human's live tokens, checked.
#[derive(Debug)]
pub struct TtlChange {
    pub human: String,
    pub ttl_millis: i64,
}

impl UpdateTtl {
    /// Checks the body against the server's longest token lifetime.
    pub fn check(self, max_ttl_seconds: f64) -> Result<TtlChange, ApiError> {
        let human = extract::human(self.human, "human")?;
        let ttl_millis = extract::ttl_millis(self.ttl_seconds, max_ttl_seconds)?;
        Ok(TtlChange { human, ttl_millis })
    }
}

/// `POST /v1/usage/token/update_ttl`
pub async fn update_ttl(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<UpdateTtl>,
) -> Result<Json<Value>, ApiError> {
    let TtlChange { human, ttl_millis: ttl } = body.check(max_ttl(&state))?;
    let now = clock::now_millis();
    let updated = state.store.set_token_expiry(project, &human, now, now + ttl).await?;
    if updated == 0 {
        return Err(ApiError::NotFound("the human has no live usage token"));
    }
    let mut answer = expiry(&human, now + ttl, now);
    answer["updated_tokens"] = json!(updated);
    Ok(Json(answer))
}

/// Runs a change to a human's limits or tokens between two settles of the
/// meter: usage up to the change is charged against the limits as they
/// were, and the change reaches the human's open sessions the moment it is
/// made. A human that does not exist yet has no sessions to settle.
pub(super) async fn settled<T>(
    state: &AppState,
    project: ProjectId,
    human: &str,
    change: impl Future<Output = StoreResult<T>>,
) -> Result<T, ApiError> {
    let found = state.store.find_human(project, human).await?;
    if let Some(found) = &found
        && !state.meter.settle(found.id).await
    {
        // The usage so far could not be recorded: the change would be
        // charged with it.
        return Err(ApiError::Unavailable("usage cannot be recorded right now; try again later"));
    }
    let result = change.await?;
    if let Some(found) = &found {
        state.meter.settle(found.id).await;
    }
    Ok(result)
}

fn expiry(human: &str, expires_at: i64, now: i64) -> Value {
    json!({
        "human": human,
        "ttl_seconds": (expires_at - now) as f64 / 1000.0,
        "expires_at": clock::rfc3339(expires_at),
    })
}

fn max_ttl(state: &AppState) -> f64 {
    state.settings.max_token_ttl.as_secs_f64()
}

fn views(limits: Vec<Limit>) -> Vec<LimitView> {
    limits.into_iter().map(Limit::view).collect()
}
