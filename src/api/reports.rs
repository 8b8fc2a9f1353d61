//! `POST /v1/usage/report`: a backend debits usage it measured itself, of
//! any limit type, once per idempotency key.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AppState;
use super::auth::Backend;
use super::error::ApiError;
use super::extract::{self, JsonBody};
use super::tokens::settled;
use crate::clock;
use crate::limits::LimitType;
use crate::store::{NewReport, ProjectId, Report, ReportOutcome, UnixMillis};

/// Longest idempotency key accepted, in bytes: room for a UUID with a
/// prefix, or a hash, and more.
const MAX_KEY_BYTES: usize = 255;

/// Largest metadata object accepted, as compact JSON.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Set on the answer to a retry, which repeats the first answer.
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBody {
    #[serde(alias = "human_id")]
    human: String,
    #[serde(rename = "type")]
    limit_type: LimitType,
    value: f64,
    idempotency_key: String,
    metadata: Option<Value>,
}

impl ReportBody {
    /// The report the body asks for, checked.
    pub fn check(self, project: ProjectId, now: UnixMillis) -> Result<NewReport, ApiError> {
        Ok(NewReport {
            project,
            human: extract::human(self.human, "human")?,
            limit_type: self.limit_type,
            amount: amount(self.limit_type, self.value)?,
            idempotency_key: idempotency_key(self.idempotency_key)?,
            metadata: metadata(self.metadata)?,
            now,
        })
    }
}

#[derive(Serialize)]
struct ReportView {
    id: i64,
    human: String,
    #[serde(rename = "type")]
    limit_type: LimitType,
    value: f64,
    /// The limit's value right after the report; `null` when the type is
    /// not limited for the human.
    remaining: Option<f64>,
    idempotency_key: String,
    metadata: Option<Value>,
    created_at: String,
}

/// `POST /v1/usage/report`
pub async fn report(
    State(state): State<AppState>,
    Backend(project): Backend,
    JsonBody(body): JsonBody<ReportBody>,
) -> Result<Response, ApiError> {
    let report = body.check(project, clock::now_millis())?;
    let human = report.human.clone();
    // A report of seconds reaches the human's open sessions at once, as a
    // change of limits does.
    let outcome = settled(&state, project, &human, state.store.report_usage(report)).await?;
    match outcome {
        ReportOutcome::Recorded(report) => Ok(Json(view(report)).into_response()),
        ReportOutcome::Repeated(report) => {
            let mut response = Json(view(report)).into_response();
            response.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
            Ok(response)
        }
        ReportOutcome::KeyReused(_) => Err(ApiError::Conflict(
            "idempotency_key: already used by a different report of this project",
        )),
    }
}

/// The value in base units; a report must debit something.
fn amount(limit_type: LimitType, value: f64) -> Result<i64, ApiError> {
    let invalid = |reason: &str| ApiError::InvalidInput(format!("value: {reason}"));
    let amount = limit_type.to_base(value).map_err(invalid)?;
    if amount == 0 {
        return Err(invalid("must be more than 0 (seconds are counted in milliseconds)"));
    }
    Ok(amount)
}

fn idempotency_key(key: String) -> Result<String, ApiError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(ApiError::InvalidInput(format!(
            "idempotency_key: must be 1 to {MAX_KEY_BYTES} bytes with no control characters"
        )));
    }
    Ok(key)
}

fn metadata(metadata: Option<Value>) -> Result<Option<String>, ApiError> {
    match metadata {
        None | Some(Value::Null) => Ok(None),
        Some(object @ Value::Object(_)) => {
            let text = object.to_string();
            if text.len() > MAX_METADATA_BYTES {
                return Err(ApiError::InvalidInput(format!(
                    "metadata: must be at most {MAX_METADATA_BYTES} bytes as JSON"
                )));
            }
            Ok(Some(text))
        }
        Some(_) => Err(ApiError::InvalidInput("metadata: must be an object".into())),
    }
}

fn view(report: Report) -> ReportView {
    ReportView {
        id: report.id,
        human: report.human,
        limit_type: report.limit_type,
        value: report.limit_type.to_value(report.amount),
        remaining: report.remaining.map(|remaining| report.limit_type.to_value(remaining)),
        idempotency_key: report.idempotency_key,
        metadata: report.metadata.and_then(|text| serde_json::from_str(&text).ok()),
        created_at: clock::rfc3339(report.created_at),
    }
}
