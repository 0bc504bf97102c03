//! The one error type of the API: a clear 4xx, or a logged 5xx with a generic body.

use axum::{
    Json,
    extract::rejection::PathRejection,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use schema::{InvalidName, StoreError};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidName(#[from] InvalidName),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after: Option<i64>,
    },
    #[error("{0}")]
    InvalidCredentials(String),
    #[error("{0}")]
    Unavailable(String),
    /// Busy right now (503 with `Retry-After`): come back in `retry_after` seconds.
    #[error("{message}")]
    Overloaded { message: String, retry_after: i64 },
    /// A user's server did not answer the proxy.
    #[error("{0}")]
    BadGateway(String),
    /// A user's server did not begin its answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
            }
            ApiError::InvalidCredentials(_) => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            ApiError::Unavailable(_) | ApiError::Overloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ApiError::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "gateway_timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// What the client is told: the message of a 4xx; for a 5xx a generic line,
    /// the error itself going to the log.
    pub fn public_message(self) -> String {
        if !self.status().is_server_error() {
            return self.to_string();
        }
        tracing::error!(error = %self, "request failed");
        match self {
            ApiError::Unavailable(m)
            | ApiError::BadGateway(m)
            | ApiError::GatewayTimeout(m)
            | ApiError::Overloaded { message: m, .. } => m,
            _ => "something went wrong on our side; it has been logged".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after, .. } => *retry_after,
            ApiError::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let message = self.public_message();
        let mut response =
            (status, Json(json!({ "error": code, "message": message }))).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Limit(message) => ApiError::TooManyRequests {
                message,
                retry_after: None,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
