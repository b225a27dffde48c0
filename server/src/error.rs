//! The API's one error type: every failure under `/api/` becomes an `app::wire::ApiError`
//! JSON body with the status from `ErrorCode::status`. Also the one reader of JSON objects,
//! used by every body extractor and the WebSocket frame parser, and the query extractor.

use app::wire::{self, ErrorCode};
use axum::{
    Json,
    body::Bytes,
    extract::{
        FromRequest, FromRequestParts, Query, Request,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderMap, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use crate::{
    auth::AuthError,
    realtime::hub::{OpenError, Refused},
    store::StoreError,
};

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
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::HoldClosed { .. } => ErrorCode::HoldClosed,
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

/// As its cause would be.
impl From<OpenError> for ApiError {
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::Refused(refused) => refused.into(),
            OpenError::Store(err) => err.into(),
        }
    }
}

/// Reads `bytes` as one JSON object into `T`: the only reader of client JSON, for request
/// bodies ([`AppJson`]) and WebSocket frames alike.
///
/// # Errors
/// `bad_json` for malformed JSON or any document other than an object (serde alone would
/// read a struct from an array); `invalid_field` naming the field for an object that does
/// not fit `T`.
pub fn from_json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // A valid JSON document whose first byte after whitespace is `{` can only be an object,
    // so one byte decides it without parsing twice.
    let first = bytes
        .iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(ApiError::new(ErrorCode::BadJson, "expected a JSON object"));
    }
    match Json::<T>::from_bytes(bytes) {
        Ok(Json(value)) => Ok(value),
        Err(JsonRejection::JsonDataError(err)) => Err(ApiError::new(
            ErrorCode::InvalidField,
            err.body_text()
                .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
                .to_owned(),
        )),
        Err(err) => Err(ApiError::new(ErrorCode::BadJson, err.body_text())),
    }
}

/// A JSON body whose rejections are `ApiError`s: a body without a JSON content type,
/// malformed or not an object is 400 `bad_json`, an object with wrong fields is 422
/// `invalid_field`, an oversized body is 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !has_json_content_type(req.headers()) {
            return Err(not_json());
        }
        from_json_object(&body(req, state).await?).map(Self)
    }
}

/// [`AppJson`] for a body that may be left out: an empty body reads as `T::default()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = has_json_content_type(req.headers());
        let bytes = body(req, state).await?;
        match (bytes.is_empty(), is_json) {
            (true, _) => Ok(Self(T::default())),
            (false, true) => from_json_object(&bytes).map(Self),
            (false, false) => Err(not_json()),
        }
    }
}

fn not_json() -> ApiError {
    ApiError::new(
        ErrorCode::BadJson,
        "expected `Content-Type: application/json`",
    )
}

/// The whole body, within [`MAX_BODY_BYTES`].
async fn body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|err| {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(ErrorCode::BadJson, err.body_text())
        }
    })
}

/// `application/json` or any `application/*+json`, parameters aside: what axum's `Json`
/// accepts.
fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
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

/// The answer for an API path asked with a method it does not take; axum adds the `Allow`
/// header.
pub async fn api_method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this endpoint does not take this method; see the Allow header",
    )
}

#[cfg(test)]
mod tests {
    use app::wire::{ChangeRequest, MAX_CREDITS, WsClientMsg};
    use proptest::prelude::*;

    use super::*;
    use crate::store::NewChange;

    /// Change bodies and WebSocket frames as a fuzzer would send them: arbitrary bytes, and
    /// JSON objects with arbitrary values for the known fields.
    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "[0-9]{1,40}",
            "-?[0-9]{1,20}\\.[0-9]{1,5}",
            "\"[ -~]{0,40}\"",
            Just("null".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ];
        let field = prop_oneof![
            Just("user_id".to_owned()),
            Just("amount".to_owned()),
            Just("type".to_owned()),
            Just("metadata".to_owned()),
            Just("idempotency_key".to_owned()),
            "[a-z_]{1,10}",
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec((field, value), 0..8).prop_map(|fields| {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(name, value)| format!("\"{name}\":{value}"))
                    .collect();
                format!("{{{}}}", body.join(",")).into_bytes()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2_000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Whatever a client sends as a change body, the reader and the change's validation
        /// answer without panicking, and nothing out of range is ever accepted.
        #[test]
        fn change_bodies_never_panic(bytes in json_ish()) {
            if let Ok(request) = from_json_object::<ChangeRequest>(&bytes) {
                let change = NewChange::from(request);
                if change.validate().is_ok() {
                    prop_assert!(change.amount != 0 && change.amount.abs() <= MAX_CREDITS);
                }
            }
        }

        /// Whatever a client sends as a WebSocket frame, the reader answers without
        /// panicking, and only a JSON object can be a message.
        #[test]
        fn websocket_frames_never_panic(bytes in json_ish()) {
            if from_json_object::<WsClientMsg>(&bytes).is_ok() {
                prop_assert_eq!(bytes.iter().find(|b| !b.is_ascii_whitespace()), Some(&b'{'));
            }
        }
    }
}
