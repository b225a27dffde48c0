//! Supabase Auth verification for tokens the shared secret cannot check: asymmetric tokens
//! (RS256/ES256) against the project's JWKS, anything else through `GET /auth/v1/user`.
//! Keys are cached and refreshed when an unknown `kid` appears; positive `/user` answers are
//! cached until the token expires.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Header, jwk::JwkSet};
use serde::Deserialize;

use super::{AuthError, jwt};

/// Shortest time between two JWKS downloads, so a flood of made-up `kid`s cannot turn into a
/// flood of requests to Supabase.
const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Age after which cached keys are fetched again, so a revoked key stops verifying.
const JWKS_MAX_AGE: Duration = Duration::from_secs(600);
/// Timeout of each request to Supabase Auth.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most `/auth/v1/user` answers kept; expired ones are dropped first when it fills.
const USER_CACHE_CAPACITY: usize = 10_000;

/// A user vouched for by Supabase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub user_id: String,
    pub role: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// Talks to one Supabase project's Auth service.
pub struct Supabase {
    http: reqwest::Client,
    base_url: String,
    apikey: Option<String>,
    audience: Option<String>,
    jwks: Mutex<KeyCache>,
    users: Mutex<HashMap<String, Verified>>,
}

#[derive(Default)]
struct KeyCache {
    keys: JwkSet,
    fetched_at: Option<Instant>,
}

#[derive(Deserialize)]
struct AuthUser {
    id: String,
    role: Option<String>,
}

impl Supabase {
    /// A client for the project at `base_url` (no trailing slash).
    pub fn new(base_url: String, apikey: Option<String>, audience: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            base_url,
            apikey,
            audience,
            jwks: Mutex::default(),
            users: Mutex::default(),
        }
    }

    /// Verifies `token` with the JWKS when it is asymmetric, else asks `/auth/v1/user`.
    ///
    /// # Errors
    /// `Invalid`/`Expired` when Supabase refuses the token, `Unavailable` when it cannot be
    /// reached.
    pub async fn verify(&self, token: &str, header: &Header) -> Result<Verified, AuthError> {
        match header.alg {
            Algorithm::RS256 | Algorithm::ES256 => self.verify_with_jwks(token, header).await,
            _ => self.verify_remotely(token).await,
        }
    }

    async fn verify_with_jwks(&self, token: &str, header: &Header) -> Result<Verified, AuthError> {
        let kid = header
            .kid
            .as_deref()
            .ok_or(AuthError::Invalid("token has no kid"))?;
        let key = match self.cached_key(kid)? {
            Some(key) => key,
            None => {
                self.refresh_keys().await?;
                self.cached_key(kid)?
                    .ok_or(AuthError::Invalid("unknown signing key"))?
            }
        };
        let validation = jwt::validation(header.alg, self.audience.as_deref());
        let claims = jsonwebtoken::decode::<jwt::Claims>(token, &key, &validation)
            .map_err(|err| jwt::rejection(&err))?
            .claims;
        Ok(Verified {
            user_id: claims.sub.ok_or(AuthError::Invalid("token has no sub"))?,
            role: claims.role,
            expires_at: expiry(claims.exp)?,
        })
    }

    fn cached_key(&self, kid: &str) -> Result<Option<DecodingKey>, AuthError> {
        let cache = self.jwks.lock().expect("JWKS cache lock poisoned");
        if cache
            .fetched_at
            .is_none_or(|at| at.elapsed() > JWKS_MAX_AGE)
        {
            return Ok(None);
        }
        cache
            .keys
            .find(kid)
            .map(|jwk| {
                DecodingKey::from_jwk(jwk).map_err(|_| AuthError::Invalid("unusable signing key"))
            })
            .transpose()
    }

    async fn refresh_keys(&self) -> Result<(), AuthError> {
        {
            let cache = self.jwks.lock().expect("JWKS cache lock poisoned");
            if cache
                .fetched_at
                .is_some_and(|at| at.elapsed() < JWKS_REFRESH_INTERVAL)
            {
                return Ok(());
            }
        }
        let url = format!("{}/auth/v1/.well-known/jwks.json", self.base_url);
        let keys: JwkSet = self
            .request(self.http.get(url))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let mut cache = self.jwks.lock().expect("JWKS cache lock poisoned");
        *cache = KeyCache {
            keys,
            fetched_at: Some(Instant::now()),
        };
        Ok(())
    }

    async fn verify_remotely(&self, token: &str) -> Result<Verified, AuthError> {
        if let Some(hit) = self.cached_user(token) {
            return Ok(hit);
        }
        // The expiry comes from the token itself; Supabase vouches for the rest.
        let claims: jwt::Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let expires_at = expiry(claims.exp)?;
        if expires_at <= Utc::now() {
            return Err(AuthError::Expired);
        }
        let response = self
            .request(self.http.get(format!("{}/auth/v1/user", self.base_url)))
            .bearer_auth(token)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if status.is_client_error() {
            return Err(AuthError::Invalid("refused by Supabase Auth"));
        }
        let user: AuthUser = response
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let verified = Verified {
            user_id: user.id,
            role: user.role.or(claims.role),
            expires_at,
        };
        self.remember_user(token, &verified);
        Ok(verified)
    }

    fn request(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.apikey {
            Some(key) => request.header("apikey", key),
            None => request,
        }
    }

    fn cached_user(&self, token: &str) -> Option<Verified> {
        let users = self.users.lock().expect("user cache lock poisoned");
        users
            .get(token)
            .filter(|hit| hit.expires_at > Utc::now())
            .cloned()
    }

    fn remember_user(&self, token: &str, verified: &Verified) {
        let mut users = self.users.lock().expect("user cache lock poisoned");
        if users.len() >= USER_CACHE_CAPACITY {
            let now = Utc::now();
            users.retain(|_, hit| hit.expires_at > now);
            if users.len() >= USER_CACHE_CAPACITY {
                users.clear();
            }
        }
        users.insert(token.to_owned(), verified.clone());
    }
}

fn expiry(exp: i64) -> Result<DateTime<Utc>, AuthError> {
    DateTime::from_timestamp(exp, 0).ok_or(AuthError::Invalid("exp out of range"))
}

fn unavailable(err: reqwest::Error) -> AuthError {
    tracing::warn!(%err, "Supabase Auth request failed");
    AuthError::Unavailable
}
