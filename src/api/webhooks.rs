//! The project's webhook: `PUT`, `GET` and `DELETE /v1/webhook`, rotating
//! its secret, and its deliveries.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use super::auth::Backend;
use super::error::ApiError;
use super::extract::{self, BodyBytes, JsonBody, LimitInput};
use crate::clock;
use crate::limits::{Limit, LimitView};
use crate::store::{Delivery, DeliveryStatus, ProjectId, UnixMillis, Webhook, WebhookChange};
use crate::webhooks::events;
use crate::webhooks::signature::WebhookSecret;

/// How long a rotated-out secret still signs, unless the request says.
const DEFAULT_GRACE_SECONDS: f64 = 86_400.0;
/// The longest grace a rotation may give the old secret: a week.
const MAX_GRACE_SECONDS: f64 = 7.0 * 86_400.0;
const MAX_URL_BYTES: usize = 2048;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetWebhook {
    url: String,
    events: Option<Vec<String>>,
    thresholds: Option<Vec<LimitInput>>,
}

impl SetWebhook {
    /// The change the body asks for, checked; `secret` is for a new webhook.
    pub fn check(
        self,
        project: ProjectId,
        secret: String,
        now: UnixMillis,
    ) -> Result<WebhookChange, ApiError> {
        Ok(WebhookChange {
            project,
            url: url(self.url)?,
            events: self.events.map(event_types).transpose()?,
            thresholds: thresholds(self.thresholds.unwrap_or_default())?,
            secret,
            now,
        })
    }
}

#[derive(Serialize)]
pub struct WebhookView {
    url: String,
    /// `null`: every event type.
    events: Option<Vec<String>>,
    thresholds: Vec<LimitView>,
    /// Only in the answer that created the webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    previous_secret_expires_at: Option<String>,
    created_at: String,
    updated_at: String,
}

/// `PUT /v1/webhook`
pub async fn set(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<SetWebhook>,
) -> Result<(StatusCode, Json<WebhookView>), ApiError> {
    let secret = WebhookSecret::generate();
    let change = body.check(project, secret.expose().to_owned(), clock::now_millis())?;
    let (webhook, created) = state.store.set_webhook(change).await?;
    let secret = created.then(|| secret.expose().to_owned());
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view(webhook, secret))))
}

/// `GET /v1/webhook`
pub async fn get(
    State(state): State<AppState>,
    Backend(project): Backend,
) -> Result<Json<WebhookView>, ApiError> {
    let webhook = state.store.webhook(project).await?.ok_or(ApiError::NotFound(NO_WEBHOOK))?;
    Ok(Json(view(webhook, None)))
}

const NO_WEBHOOK: &str = "the project has no webhook";

/// `DELETE /v1/webhook`
pub async fn delete(
    State(state): State<AppState>,
    Backend(project): Backend,
) -> Result<Json<Value>, ApiError> {
    if !state.store.delete_webhook(project).await? {
        return Err(ApiError::NotFound(NO_WEBHOOK));
    }
    Ok(Json(json!({ "deleted": true })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    grace_seconds: Option<f64>,
}

/// `POST /v1/webhook/rotate`
pub async fn rotate(
    State(state): State<AppState>,
    Backend(project): Backend,
    BodyBytes(body): BodyBytes,
) -> Result<Json<Value>, ApiError> {
    let grace = grace_millis(&body)?;
    let secret = WebhookSecret::generate();
    let now = clock::now_millis();
    let until = now + grace;
    let rotated =
        state.store.rotate_webhook_secret(project, secret.expose().to_owned(), until, now).await?;
    if !rotated {
        return Err(ApiError::NotFound(NO_WEBHOOK));
    }
    Ok(Json(json!({
        "secret": secret.expose(),
        "previous_secret_expires_at": clock::rfc3339(until),
    })))
}

/// How long, in milliseconds, the body of a rotation asks the old secret
/// to keep signing. The body is optional: an empty one keeps the default.
pub fn grace_millis(body: &[u8]) -> Result<i64, ApiError> {
    let body: Rotate = if body.is_empty() { Rotate::default() } else { extract::parse_json(body)? };
    let grace = body.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    if !(grace.is_finite() && (0.0..=MAX_GRACE_SECONDS).contains(&grace)) {
        return Err(ApiError::InvalidInput(format!(
            "grace_seconds: must be from 0 to {MAX_GRACE_SECONDS}"
        )));
    }
    Ok((grace * 1000.0) as i64)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    status: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

/// `GET /v1/webhook/deliveries`
pub async fn deliveries(
    State(state): State<AppState>,
    Backend(project): Backend,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        let text = rejection.body_text();
        let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
        ApiError::InvalidInput(detail.to_owned())
    })?;
    let status = match query.status.as_deref() {
        None => None,
        Some(name) => Some(DeliveryStatus::parse(name).ok_or_else(|| {
            ApiError::InvalidInput("status: must be pending, failed or delivered".into())
        })?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::InvalidInput(format!("limit: must be from 1 to {MAX_PAGE}")));
    }
    let mut page = state.store.deliveries(project, status, query.after, limit + 1).await?;
    let has_more = page.len() > limit as usize;
    page.truncate(limit as usize);
    // The last row seen, or the cursor given when there is none: a client
    // can keep it and ask again later for what came since.
    let next_after = page.last().map(|delivery| delivery.seq).or(query.after);
    let data: Vec<Value> = page.iter().map(delivery_view).collect();
    Ok(Json(json!({ "data": data, "has_more": has_more, "next_after": next_after })))
}

/// `POST /v1/webhook/deliveries/{id}/retry`
pub async fn retry(
    State(state): State<AppState>,
    Backend(project): Backend,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    const NO_DELIVERY: ApiError = ApiError::NotFound("the project has no such delivery");
    // An id that is not UTF-8 once decoded names no delivery either.
    let Ok(Path(id)) = id else {
        return Err(NO_DELIVERY);
    };
    let delivery =
        state.store.retry_delivery(project, &id, clock::now_millis()).await?.ok_or(NO_DELIVERY)?;
    Ok(Json(delivery_view(&delivery)))
}

fn delivery_view(delivery: &Delivery) -> Value {
    json!({
        "id": delivery.id,
        "cursor": delivery.seq,
        "type": delivery.kind,
        "status": delivery.status.as_str(),
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "created_at": clock::rfc3339(delivery.created_at),
        "next_attempt_at": delivery.next_attempt_at.map(clock::rfc3339),
        "delivered_at": delivery.delivered_at.map(clock::rfc3339),
    })
}

/// An endpoint URL: `http://` or `https://` with a host.
fn url(url: String) -> Result<String, ApiError> {
    let refused = || {
        ApiError::InvalidInput(format!(
            "url: must be an http:// or https:// URL with a host and no credentials or \
             fragment, at most {MAX_URL_BYTES} bytes"
        ))
    };
    let uri: Uri = url.parse().map_err(|_| refused())?;
    let http = matches!(uri.scheme_str(), Some("http" | "https"));
    let Some(authority) = uri.authority() else {
        return Err(refused());
    };
    // Credentials in the URL would not be sent, and a port must be one.
    let names_port = authority.as_str().rsplit(']').next().is_some_and(|rest| rest.contains(':'));
    let port_ok = !names_port || authority.port_u16().is_some();
    let plain = !authority.as_str().contains('@') && !url.contains('#');
    if !http || authority.host().is_empty() || !port_ok || !plain || url.len() > MAX_URL_BYTES {
        return Err(refused());
    }
    Ok(url)
}

fn event_types(names: Vec<String>) -> Result<Vec<String>, ApiError> {
    if names.is_empty() {
        return Err(ApiError::InvalidInput(
            "events: must name at least one event type, or be left out for all".into(),
        ));
    }
    let mut wanted: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        if !events::ALL.contains(&name.as_str()) {
            return Err(ApiError::InvalidInput(format!(
                "events[{i}]: unknown event type {name:?}; known: {}",
                events::ALL.join(", ")
            )));
        }
        if !wanted.contains(&name) {
            wanted.push(name);
        }
    }
    Ok(wanted)
}

fn thresholds(inputs: Vec<LimitInput>) -> Result<Vec<Limit>, ApiError> {
    let thresholds = extract::limits(inputs).map_err(|error| match error {
        ApiError::InvalidInput(message) => {
            ApiError::InvalidInput(message.replacen("limits", "thresholds", 1))
        }
        other => other,
    })?;
    // Nothing is below a line at zero: usage.limit_exhausted marks zero.
    if let Some(i) = thresholds.iter().position(|threshold| threshold.value <= 0) {
        return Err(ApiError::InvalidInput(format!("thresholds[{i}].value: must be more than 0")));
    }
    Ok(thresholds)
}

fn view(webhook: Webhook, secret: Option<String>) -> WebhookView {
    WebhookView {
        url: webhook.url,
        events: webhook.events,
        thresholds: webhook.thresholds.into_iter().map(Limit::view).collect(),
        secret,
        previous_secret_expires_at: webhook
            .previous_secret_until
            .filter(|until| *until > clock::now_millis())
            .map(clock::rfc3339),
        created_at: clock::rfc3339(webhook.created_at),
        updated_at: clock::rfc3339(webhook.updated_at),
    }
}
