//! What a client sees when something fails: one code from the contract and a
//! precise message for bad input; a generic message (and a log line with the
//! details) for internal failures.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chat_auth::AuthError;
use chat_protocol::{ErrorBody, ErrorCode, RestError};

/// An error on its way to a client, over REST or WebSocket.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub status: StatusCode,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = match code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Invalid | ErrorCode::TooLarge => StatusCode::BAD_REQUEST,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            code,
            message: message.into(),
            status,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(ErrorCode::Unauthorized, e.to_string())
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let message = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument => Self::invalid(message),
            Code::OutOfRange => Self::new(ErrorCode::TooLarge, message),
            Code::PermissionDenied => Self::new(ErrorCode::Forbidden, message),
            Code::NotFound => Self::new(ErrorCode::NotFound, message),
            Code::FailedPrecondition => Self::invalid(message).with_status(StatusCode::CONFLICT),
            Code::Unauthenticated => Self::new(ErrorCode::Unauthorized, message),
            Code::ResourceExhausted => Self::new(ErrorCode::RateLimited, message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                tracing::warn!(code = ?s.code(), message = %s.message(), "worker call failed");
                Self::new(
                    ErrorCode::Unavailable,
                    "the service is unavailable; retry later",
                )
            }
            // a worker of an earlier release, during a rolling upgrade: the
            // call works once the workers are upgraded
            Code::Unimplemented => {
                tracing::warn!(message = %s.message(), "a worker does not know this call yet (an earlier release?)");
                Self::new(
                    ErrorCode::Unavailable,
                    "the service is being upgraded; retry later",
                )
            }
            _ => {
                tracing::error!(code = ?s.code(), message = %s.message(), "worker call failed");
                Self::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(RestError { error: self.body() })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call an older worker does not know is the upgrade's, not the
    /// client's nor a bug: retry later.
    #[test]
    fn an_unknown_call_is_unavailable_not_internal() {
        let e = ApiError::from(tonic::Status::unimplemented("UpdateGroup"));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(tonic::Status::data_loss("?"));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
