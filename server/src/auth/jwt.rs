//! HS256 tokens signed with the shared secret: verification of user and service tokens, and
//! minting for dev sign-in and the CLI.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use super::AuthError;

/// Clock skew tolerated on `exp` and `nbf` (SPEC §5: at most 5 s, not the library's 60 s).
pub const LEEWAY_SECS: u64 = 5;
/// What a client is told about a token whose `nbf` is still ahead (SPEC §10).
const NOT_YET_VALID: &str = "token not yet valid";
/// The `role` claim of a service credential.
pub const SERVICE_ROLE: &str = "service_role";
/// The `role` claim of a signed-in user, as Supabase issues it.
pub const USER_ROLE: &str = "authenticated";

/// The claims livecredits reads; others are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user; absent on service tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the epoch; required.
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Validation rules shared by every verifier: the one algorithm given, `exp` required and
/// `nbf` (when present) enforced, both with 5 s of leeway, `aud` checked only when configured.
pub fn validation(algorithm: Algorithm, audience: Option<&str>) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp"]);
    match audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    validation
}

/// Maps a verification failure to what the client is told.
pub fn rejection(err: &jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted"),
        ErrorKind::ImmatureSignature => AuthError::Invalid(NOT_YET_VALID),
        ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
        ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing exp claim"),
        _ => AuthError::Invalid("malformed token"),
    }
}

/// The `nbf` rule of [`validation`] for a token read without verifying it, so that one not
/// yet valid is refused before anyone is asked about it.
///
/// # Errors
/// `Invalid` when `nbf` is more than the leeway ahead of `now` (seconds since the epoch).
pub fn check_not_before(nbf: Option<i64>, now: i64) -> Result<(), AuthError> {
    match nbf {
        Some(nbf) if nbf > now.saturating_add(LEEWAY_SECS.cast_signed()) => {
            Err(AuthError::Invalid(NOT_YET_VALID))
        }
        _ => Ok(()),
    }
}

/// Signs and verifies HS256 tokens with one secret.
pub struct Hs256 {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Hs256 {
    /// A verifier pinned to HS256; HS384/HS512 tokens under the same secret are refused.
    pub fn new(secret: &[u8], audience: Option<&str>) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256, audience),
        }
    }

    /// Checks signature, algorithm, `exp`, `nbf` and `aud`.
    ///
    /// # Errors
    /// `Expired` or `Invalid`.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| rejection(&err))
    }

    /// Signs `claims` as an HS256 token.
    ///
    /// # Errors
    /// `Internal` if signing fails, which only a broken key could cause.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|err| AuthError::Internal(err.to_string()))
    }
}
