//! `GET /healthz`: whether the store answers and usage is being recorded.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::store::StoreError;

pub async fn healthz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.store.ping().await.map_err(|error| match error {
        StoreError::Full => ApiError::Unavailable("the database is full; nothing can be recorded"),
        _ => ApiError::Unavailable("the store does not answer"),
    })?;
    if !state.health.is_recording() || !state.meter.is_running() {
        return Err(ApiError::Unavailable("usage cannot be recorded; new sessions are refused"));
    }
    Ok(Json(json!({ "status": "ok" })))
}
