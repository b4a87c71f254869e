//! Why a request was refused, and the answer that says so.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::RETRY_AFTER_SECS;

/// Why a request was refused. Each maps to a status and a fixed reason code
/// (the `reason` label of `cdp_collector_events_rejected_total`).
#[derive(Debug, thiserror::Error)]
pub(super) enum CollectError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{at}: event larger than {limit} bytes")]
    EventTooLarge { at: String, limit: usize },
    #[error("batch of {count} events; at most {limit} allowed")]
    TooManyEvents { count: usize, limit: usize },
    #[error("cannot read the request body: {0}")]
    UnreadableBody(String),
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(i64),
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("{at}: {message}")]
    Invalid {
        at: String,
        reason: &'static str,
        message: &'static str,
    },
    /// What the validate stage would dead-letter as `spec_violation`,
    /// refused at the edge instead: `pointer: reason` for each.
    #[error("{at}: breaks the Segment spec: {violations}")]
    SpecViolation { at: String, violations: String },
    #[error("too many requests in flight; retry later")]
    Overloaded,
    #[error("the broker did not take the events: {0}")]
    Broker(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CollectError {
    pub(super) fn invalid(
        at: impl Into<String>,
        reason: &'static str,
        message: &'static str,
    ) -> Self {
        CollectError::Invalid {
            at: at.into(),
            reason,
            message,
        }
    }

    pub(super) fn status(&self) -> StatusCode {
        match self {
            CollectError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            CollectError::BodyTooLarge { .. }
            | CollectError::EventTooLarge { .. }
            | CollectError::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            CollectError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            CollectError::UnreadableBody(_)
            | CollectError::InvalidJson(_)
            | CollectError::Invalid { .. }
            | CollectError::SpecViolation { .. } => StatusCode::BAD_REQUEST,
            CollectError::Overloaded | CollectError::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
            CollectError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(super) fn reason(&self) -> &'static str {
        match self {
            CollectError::Unauthorized(_) => "unauthorized",
            CollectError::BodyTooLarge { .. } => "body_too_large",
            CollectError::EventTooLarge { .. } => "event_too_large",
            CollectError::TooManyEvents { .. } => "too_many_events",
            CollectError::UnreadableBody(_) => "unreadable_body",
            CollectError::BodyTimeout(_) => "body_timeout",
            CollectError::InvalidJson(_) => "invalid_json",
            CollectError::Invalid { reason, .. } => reason,
            CollectError::SpecViolation { .. } => "spec_violation",
            CollectError::Overloaded => "overloaded",
            CollectError::Broker(_) => "broker_unavailable",
            CollectError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for CollectError {
    fn into_response(self) -> Response {
        let status = self.status();
        // `error` for people; `code` and `message` as Segment's and
        // RudderStack's SDKs read them when they log a failed request.
        let message = self.to_string();
        let body = Json(json!({
            "success": false,
            "error": message,
            "code": self.reason(),
            "message": message,
        }));
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}
