//! Who is calling: user tokens (HS256 with the shared secret, or Supabase Auth), service
//! credentials, and the axum extractors that put them in handlers' hands (SPEC §5).

pub mod dev;
pub mod jwt;
mod lookups;
mod supabase;

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, Query},
    http::{header, request::Parts},
};
use axum_extra::extract::{
    CookieJar,
    cookie::{Cookie, SameSite},
};
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::{AppState, Config, error::ApiError, store};

/// The session cookie set by dev sign-in.
pub const SESSION_COOKIE: &str = "livecredits_session";

/// The session cookie holding `token` until `expires_at`: HttpOnly (page scripts never see
/// it), SameSite=Lax (other sites cannot send it with their requests), and `Secure` when
/// browsers reach us over https (`LIVECREDITS_PUBLIC_URL`), so it never travels in clear.
pub fn session_cookie(token: String, expires_at: DateTime<Utc>, secure: bool) -> Cookie<'static> {
    let max_age = (expires_at - Utc::now()).num_seconds().max(0);
    Cookie::build((SESSION_COOKIE, token))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(secure)
        .max_age(time::Duration::seconds(max_age))
        .build()
}

/// What removes the session cookie.
pub fn session_cookie_removal() -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE).path("/").build()
}

/// Why a caller was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send Authorization: Bearer <token>")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    #[error("token expired")]
    Expired,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the authentication service is unavailable")]
    Unavailable,
    #[error("cannot sign tokens: {0}")]
    Internal(String),
}

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    User(User),
    Service,
}

/// A signed-in user; the user id is the token's `sub`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub user_id: String,
    pub expires_at: DateTime<Utc>,
}

/// Verifies credentials; cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    hs256: Option<jwt::Hs256>,
    supabase: Option<supabase::Supabase>,
    service_key: Option<String>,
}

impl Auth {
    /// Builds the verifiers the configuration asks for; in dev mode without a secret, the
    /// secret is read from (or created in) the data folder.
    ///
    /// # Errors
    /// When the dev secret cannot be read or written.
    pub fn new(config: &Config) -> std::io::Result<Self> {
        let secret = match (&config.jwt_secret, config.dev_login) {
            (Some(secret), _) => Some(secret.clone()),
            (None, true) => Some(dev::load_or_create_secret(&config.data_dir)?),
            (None, false) => None,
        };
        let audience = config.jwt_audience.as_deref();
        Ok(Self {
            inner: Arc::new(Inner {
                hs256: secret.map(|secret| jwt::Hs256::new(secret.as_bytes(), audience)),
                supabase: config.supabase_url.clone().map(|url| {
                    supabase::Supabase::new(
                        url,
                        config.supabase_service_role_key.clone(),
                        config.jwt_audience.clone(),
                    )
                }),
                service_key: config.supabase_service_role_key.clone(),
            }),
        })
    }

    /// Verifies a token from any source and says who presented it.
    ///
    /// # Errors
    /// `Invalid`, `Expired`, or `Unavailable` when Supabase Auth cannot be reached.
    pub async fn identify(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(key) = &self.inner.service_key
            && constant_time_eq(token.as_bytes(), key.as_bytes())
        {
            return Ok(Identity::Service);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        if header.alg == Algorithm::HS256
            && let Some(hs256) = &self.inner.hs256
        {
            // With a local secret, HS256 is decided here and never sent to Supabase, so a
            // flood of forged tokens cannot become a flood of remote look-ups (SPEC §10).
            let claims = hs256.verify(token)?;
            return identity(claims.sub, claims.role, claims.exp);
        }
        let Some(supabase) = &self.inner.supabase else {
            return Err(AuthError::Invalid("algorithm not accepted"));
        };
        let verified = supabase.verify(token, &header).await?;
        identity(
            Some(verified.user_id),
            verified.role,
            verified.expires_at.timestamp(),
        )
    }

    /// Signs a user token valid for `ttl`, for dev sign-in and the CLI.
    ///
    /// # Errors
    /// `Internal` when no secret is configured.
    pub fn mint_user_token(
        &self,
        user_id: &str,
        ttl: Duration,
    ) -> Result<(String, DateTime<Utc>), AuthError> {
        let hs256 = self
            .inner
            .hs256
            .as_ref()
            .ok_or_else(|| AuthError::Internal("no JWT secret configured".into()))?;
        let now = Utc::now();
        let expires_at = now + ttl;
        let claims = jwt::Claims {
            sub: Some(user_id.to_owned()),
            exp: expires_at.timestamp(),
            iat: Some(now.timestamp()),
            role: Some(jwt::USER_ROLE.to_owned()),
            aud: None,
        };
        Ok((hs256.mint(&claims)?, expires_at))
    }
}

/// Turns verified claims into an identity: `service_role` is a service, anything else must
/// name a valid user in `sub`.
fn identity(sub: Option<String>, role: Option<String>, exp: i64) -> Result<Identity, AuthError> {
    if role.as_deref() == Some(jwt::SERVICE_ROLE) {
        return Ok(Identity::Service);
    }
    let user_id = sub.ok_or(AuthError::Invalid("token has no sub"))?;
    store::validate_user_id(&user_id).map_err(|_| AuthError::Invalid("sub is not a user id"))?;
    let expires_at =
        DateTime::from_timestamp(exp, 0).ok_or(AuthError::Invalid("exp out of range"))?;
    Ok(Identity::User(User {
        user_id,
        expires_at,
    }))
}

/// Compares secrets without an early exit, so timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where a user's token came from; WebSocket checks `Origin` for cookie-authenticated calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Query,
    Cookie,
}

/// A handler argument that admits only signed-in users: Bearer header, then the `token`
/// query parameter (browsers' WebSocket and EventSource cannot set headers), then the
/// session cookie.
#[derive(Clone, Debug)]
pub struct AuthUser {
    pub user: User,
    pub source: TokenSource,
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn bearer(parts: &Parts) -> Option<String> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn user_token(parts: &Parts) -> Option<(String, TokenSource)> {
    if let Some(token) = bearer(parts) {
        return Some((token, TokenSource::Header));
    }
    if let Ok(Query(TokenQuery { token: Some(token) })) = Query::try_from_uri(&parts.uri) {
        return Some((token, TokenSource::Query));
    }
    let cookie = CookieJar::from_headers(&parts.headers)
        .get(SESSION_COOKIE)?
        .value()
        .to_owned();
    Some((cookie, TokenSource::Cookie))
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (token, source) = user_token(parts).ok_or(AuthError::Missing)?;
        match state.auth.identify(&token).await? {
            Identity::User(user) => Ok(Self { user, source }),
            Identity::Service => {
                Err(AuthError::Forbidden("a service credential is not a user").into())
            }
        }
    }
}

/// A handler argument that admits only services, by Bearer header.
#[derive(Clone, Copy, Debug)]
pub struct ServiceCaller;

impl FromRequestParts<AppState> for ServiceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(AuthError::Missing)?;
        match state.auth.identify(&token).await? {
            Identity::Service => Ok(Self),
            Identity::User(_) => {
                Err(AuthError::Forbidden("this endpoint is for services only").into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal secrets match; any difference in content or length does not.
    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    /// A `service_role` token is a service even without `sub`; a user needs a valid `sub`.
    #[test]
    fn identities_from_claims() {
        assert_eq!(
            identity(None, Some("service_role".into()), 0).unwrap(),
            Identity::Service
        );
        assert!(matches!(
            identity(None, Some("authenticated".into()), 0),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            identity(Some(String::new()), None, 0),
            Err(AuthError::Invalid(_))
        ));
        let Identity::User(user) = identity(Some("alice".into()), None, 1_800_000_000).unwrap()
        else {
            panic!("expected a user");
        };
        assert_eq!(user.user_id, "alice");
        assert_eq!(user.expires_at.timestamp(), 1_800_000_000);
    }
}
