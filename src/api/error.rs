//! The HTTP API's errors and the one place where each becomes a status and
//! a `{"type", "message"}` body. Internal detail is logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::error;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidInput(String),
    #[error("a valid API key or usage token is required")]
    Unauthorized,
    #[error("the usage token has expired")]
    TokenExpired,
    #[error("the usage token has been revoked")]
    TokenRevoked,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("this endpoint does not take that method")]
    MethodNotAllowed,
    #[error("the usage limit for {0} is exhausted")]
    UsageLimitExceeded(&'static str),
    #[error("the human already has the most open sessions allowed")]
    TooManySessions,
    /// The service behind the session could not be reached; why is logged.
    #[error("the service behind the session cannot be reached; try again later")]
    UpstreamUnavailable,
    /// Usage cannot be recorded right now, so nothing new is admitted.
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ApiError {
    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::TokenExpired => (StatusCode::UNAUTHORIZED, "token_expired"),
            ApiError::TokenRevoked => (StatusCode::UNAUTHORIZED, "token_revoked"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::UsageLimitExceeded(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "usage_limit_exceeded")
            }
            ApiError::TooManySessions => (StatusCode::TOO_MANY_REQUESTS, "too_many_sessions"),
            ApiError::UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::LimitOverflow(limit_type) => ApiError::InvalidInput(format!(
                "limits: {} would exceed the largest allowed value, 1e12",
                limit_type.as_str()
            )),
            StoreError::Unavailable(_) => {
                error!(error = %error, "store unavailable");
                ApiError::Unavailable("the store is unavailable right now; try again later")
            }
            other => ApiError::Internal(other),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            error!(error = %cause, "request failed");
        }
        let (status, kind) = self.status_and_type();
        let body = ErrorBody { kind, message: self.to_string() };
        (status, Json(body)).into_response()
    }
}
