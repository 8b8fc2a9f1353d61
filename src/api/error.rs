//! The HTTP API's errors and the one place where each becomes a status and
//! a body: `{"type", "message"}` on Tollgate's own endpoints, OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` on the OpenAI-compatible
//! ones. Internal detail is logged, never sent.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::error;

use crate::llm::LlmError;
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
    /// The client's address failed to authenticate too often; it may try
    /// again in `retry_after` seconds.
    #[error("too many failed authentications from this address; try again in {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// An idempotency key was used before by a different request.
    #[error("{0}")]
    Conflict(&'static str),
    /// The service behind the session could not be reached; why is logged.
    #[error("the service behind the session cannot be reached; try again later")]
    UpstreamUnavailable,
    /// Usage cannot be recorded right now, so nothing new is admitted.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The listener holds the most connections it may.
    #[error("the server has as many connections as it takes; try again later")]
    TooManyConnections,
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ApiError {
    /// The `type` the error is answered with.
    pub fn kind(&self) -> &'static str {
        self.status_and_type().1
    }

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
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "idempotency_key_reused"),
            ApiError::UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooManyConnections => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The whole HTTP/1.1 answer, closing the connection, as bytes: for a
    /// connection refused before hyper serves it, which has no other way to
    /// be answered.
    pub fn raw_response(&self) -> Vec<u8> {
        let (status, kind) = self.status_and_type();
        let body = ErrorBody { kind, message: self.to_string() };
        let body = serde_json::to_string(&body).expect("an error body serializes");
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        [head.into_bytes(), body.into_bytes()].concat()
    }

    /// Headers the error's answer carries besides its body.
    fn add_headers(&self, response: &mut Response) {
        if let ApiError::RateLimited { retry_after } = self {
            response.headers_mut().insert(header::RETRY_AFTER, (*retry_after).into());
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
            StoreError::BalanceFloor(limit_type) => ApiError::InvalidInput(format!(
                "value: would take {} below -1e12",
                limit_type.as_str()
            )),
            StoreError::Unavailable(_) | StoreError::Full | StoreError::Superseded => {
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
        let mut response = (status, Json(body)).into_response();
        self.add_headers(&mut response);
        response
    }
}

/// An error of the OpenAI-compatible endpoints (`/chat/completions`,
/// `/models`), answered in OpenAI's shape so that OpenAI SDKs raise it as
/// they raise OpenAI's own: the status says what kind of error it is, and
/// `code` carries the same name Tollgate's other endpoints put in `type`.
#[derive(Debug)]
pub enum OpenAiError {
    Api(ApiError),
    Llm(LlmError),
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> OpenAiError {
        OpenAiError::Api(error)
    }
}

impl From<LlmError> for OpenAiError {
    fn from(error: LlmError) -> OpenAiError {
        OpenAiError::Llm(error)
    }
}

impl From<StoreError> for OpenAiError {
    fn from(error: StoreError) -> OpenAiError {
        OpenAiError::Api(error.into())
    }
}

/// The `error` object of an OpenAI error.
#[derive(Serialize)]
struct OpenAiBody {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'static str>,
    code: &'static str,
}

impl OpenAiError {
    /// The status, the body's `type` and `code`, and the field at fault.
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            OpenAiError::Api(error) => (error.status_and_type().0, error.status_and_type().1, None),
            OpenAiError::Llm(error) => match error {
                LlmError::InvalidRequest { param, .. } => {
                    (StatusCode::BAD_REQUEST, "invalid_input", *param)
                }
                LlmError::ModelNotFound(_) => {
                    (StatusCode::NOT_FOUND, "model_not_found", Some("model"))
                }
                LlmError::LimitExhausted => {
                    (StatusCode::TOO_MANY_REQUESTS, "usage_limit_exceeded", None)
                }
                LlmError::TokenRevoked => (StatusCode::UNAUTHORIZED, "token_revoked", None),
                LlmError::TokenExpired => (StatusCode::UNAUTHORIZED, "token_expired", None),
                LlmError::UpstreamRefused(status) => (*status, "upstream_refused", None),
                LlmError::UpstreamUnavailable | LlmError::Upstream { .. } => {
                    (StatusCode::BAD_GATEWAY, "upstream_unavailable", None)
                }
                LlmError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
                LlmError::Store(store) => match store {
                    StoreError::Unavailable(_) | StoreError::Full | StoreError::Superseded => {
                        (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None)
                    }
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
                },
            },
        }
    }
}

/// OpenAI's `type` for a status and code. OpenAI calls a refusal for
/// sending requests too fast `requests`, apart from a spent quota.
fn openai_kind(status: StatusCode, code: &str) -> &'static str {
    if code == "rate_limited" {
        return "requests";
    }
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "insufficient_quota",
        400..=499 => "invalid_request_error",
        502 => "upstream_error",
        _ => "server_error",
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        match self {
            OpenAiError::Llm(LlmError::Upstream { status, content_type, body }) => {
                let mut response = (status, body).into_response();
                if let Some(content_type) = content_type {
                    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
                }
                response
            }
            other => openai_response(other),
        }
    }
}

fn openai_response(error: OpenAiError) -> Response {
    let (status, code, param) = error.parts();
    let message = match &error {
        OpenAiError::Api(ApiError::Internal(cause)) => {
            error!(error = %cause, "request failed");
            "internal error".to_owned()
        }
        OpenAiError::Llm(LlmError::Store(cause)) => {
            error!(error = %cause, "request failed");
            match cause {
                StoreError::Unavailable(_) | StoreError::Full | StoreError::Superseded => {
                    "usage cannot be recorded right now; try again later"
                }
                _ => "internal error",
            }
            .to_owned()
        }
        OpenAiError::Api(api) => api.to_string(),
        OpenAiError::Llm(llm) => llm.to_string(),
    };
    let body = OpenAiBody { message, kind: openai_kind(status, code), param, code };
    let mut response = (status, Json(serde_json::json!({ "error": body }))).into_response();
    if let OpenAiError::Api(api) = &error {
        api.add_headers(&mut response);
    }
    response
}
