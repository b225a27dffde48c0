//! The API's one error type: every failure under `/api/` becomes an `app::wire::ApiError`
//! JSON body with the status from `ErrorCode::status`. Also the JSON and query extractors
//! whose rejections take the same shape.

use app::wire::{self, ErrorCode};
use axum::{
    Json,
    extract::{
        FromRequest, FromRequestParts, Query, Request,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use crate::{auth::AuthError, realtime::hub::Refused, store::StoreError};

/// Largest accepted request body (SPEC §4).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error with its code and a message a client developer can act on.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// An `invalid_field` error naming `field`.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InvalidField, format!("{field}: {reason}"))
    }

    /// Logs `cause` once and answers with a generic message that reveals nothing of it.
    fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = wire::ApiError {
            error: self.code,
            message: self.message,
        };
        (status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let code = match &err {
            StoreError::Invalid { .. } => ErrorCode::InvalidField,
            StoreError::OutOfRange { .. } => ErrorCode::OutOfRange,
            StoreError::InsufficientCredits { .. } => ErrorCode::InsufficientCredits,
            StoreError::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                return Self::new(ErrorCode::Unavailable, "the ledger is unavailable; retry");
            }
            StoreError::Database(_) | StoreError::Migrate(_) | StoreError::Corrupt(_) => {
                return Self::internal(&err);
            }
        };
        Self::new(code, err.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let code = match &err {
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Expired => {
                ErrorCode::Unauthorized
            }
            AuthError::Forbidden(_) => ErrorCode::Forbidden,
            AuthError::Unavailable => ErrorCode::Unavailable,
            AuthError::Internal(_) => return Self::internal(&err),
        };
        Self::new(code, err.to_string())
    }
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        let code = match refused {
            Refused::TooMany { .. } => ErrorCode::TooManyConnections,
            Refused::Closed => ErrorCode::Unavailable,
        };
        Self::new(code, refused.to_string())
    }
}

/// `Json` whose rejections are `ApiError`s: malformed JSON is 400 `bad_json`, a well-formed
/// body with wrong fields is 422 `invalid_field`, an oversized body is 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::JsonDataError(err)) => Err(ApiError::new(
                ErrorCode::InvalidField,
                err.body_text()
                    .trim_start_matches(
                        "Failed to deserialize the JSON body into the target type: ",
                    )
                    .to_owned(),
            )),
            Err(JsonRejection::BytesRejection(err))
                if err.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
                ))
            }
            Err(err) => Err(ApiError::new(ErrorCode::BadJson, err.body_text())),
        }
    }
}

/// `Query` whose rejections are 422 `invalid_field`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for AppQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|err: QueryRejection| {
                ApiError::new(
                    ErrorCode::InvalidField,
                    err.body_text()
                        .trim_start_matches("Failed to deserialize query string: ")
                        .to_owned(),
                )
            })
    }
}

/// The answer for any `/api/` path that no route matches.
pub async fn api_not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such API endpoint")
}
