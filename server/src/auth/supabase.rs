//! Supabase Auth verification for tokens the shared secret does not decide: asymmetric
//! tokens (RS256/ES256) against the project's JWKS, anything else through `GET /auth/v1/user`.
//! Supabase is never asked more than these bounds allow (SPEC §10): one JWKS download at a
//! time and at most one per 30 s; at most 16 `/user` look-ups in flight, one per token at a
//! time, with refusals remembered for a minute, outages for 5 s and successes for 5 minutes.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Header, jwk::JwkSet};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{AuthError, jwt, lookups::Lookups};

/// Shortest time between two JWKS downloads, failed ones included, so a flood of made-up
/// `kid`s (or an outage) cannot turn into a flood of requests to Supabase.
const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Age after which cached keys are fetched again, so a revoked key stops verifying.
const JWKS_MAX_AGE: Duration = Duration::from_secs(600);
/// Timeout of each request to Supabase Auth.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most `/auth/v1/user` look-ups in flight per instance, so a burst of distinct tokens
/// reaches Supabase as a bounded trickle.
const MAX_LOOKUPS_IN_FLIGHT: usize = 16;
/// How long a look-up waits for one of those slots before its caller hears `Unavailable`:
/// no longer than one request may take.
const LOOKUP_SLOT_WAIT: Duration = REQUEST_TIMEOUT;
/// How long a success is trusted (never past the token's `exp`), so a session revoked at
/// Supabase stops working here within this time.
const VOUCHED_TTL: Duration = Duration::from_secs(300);
/// How long a refusal is remembered: a refused token does not become valid, and repeating
/// it must not cost another request.
const REFUSED_TTL: Duration = Duration::from_secs(60);
/// How long an outage answer (429, 5xx, no answer) is remembered: short, to recover soon,
/// but a flood of one token during an outage costs one request per this time.
const UNAVAILABLE_TTL: Duration = Duration::from_secs(5);
/// Most look-up outcomes kept; expired ones are dropped first when it fills.
const LOOKUP_CACHE_CAPACITY: usize = 10_000;

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
    // A std mutex for the keys (read on every token, never held across `.await`), and an
    // async one that queues callers behind the one download in flight.
    jwks: std::sync::Mutex<KeyCache>,
    jwks_download: tokio::sync::Mutex<()>,
    lookup_slots: Semaphore,
    lookups: Lookups<Lookup>,
}

#[derive(Default)]
struct KeyCache {
    keys: JwkSet,
    /// When `keys` were downloaded; trusted for `JWKS_MAX_AGE` after.
    fetched_at: Option<Instant>,
    /// When a download was last started, whatever came of it.
    tried_at: Option<Instant>,
    /// Whether that download failed (or never finished).
    failed: bool,
}

/// What `/auth/v1/user` said about one token.
#[derive(Clone)]
enum Lookup {
    Vouched(Verified),
    Refused,
    Unavailable,
}

/// `/auth/v1/user`'s answer.
#[derive(Deserialize)]
struct AuthUser {
    id: String,
    role: Option<String>,
}

/// The claims read, unverified, from a token before Supabase is asked about it.
#[derive(Deserialize)]
struct Unverified {
    exp: i64,
    nbf: Option<i64>,
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
            jwks: std::sync::Mutex::default(),
            jwks_download: tokio::sync::Mutex::const_new(()),
            lookup_slots: Semaphore::new(MAX_LOOKUPS_IN_FLIGHT),
            lookups: Lookups::new(LOOKUP_CACHE_CAPACITY),
        }
    }

    /// Verifies `token` with the JWKS when it is asymmetric, else asks `/auth/v1/user`.
    ///
    /// # Errors
    /// `Invalid`/`Expired` when the token or Supabase refuses it, `Unavailable` when
    /// Supabase cannot be reached, is rate-limiting us, or too many look-ups are in flight.
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

    /// Downloads the keys unless a download was started less than `JWKS_REFRESH_INTERVAL`
    /// ago; callers arriving during a download wait for it and share its outcome.
    async fn refresh_keys(&self) -> Result<(), AuthError> {
        let _one_download = self.jwks_download.lock().await;
        {
            let mut cache = self.jwks.lock().expect("JWKS cache lock poisoned");
            if let Some(at) = cache.tried_at
                && at.elapsed() < JWKS_REFRESH_INTERVAL
            {
                // Without keys from the last try, "unknown key" would be a false 401.
                return if cache.failed {
                    Err(AuthError::Unavailable)
                } else {
                    Ok(())
                };
            }
            // Recorded before the outcome, so a failed or cancelled download counts too.
            cache.tried_at = Some(Instant::now());
            cache.failed = true;
        }
        let keys = self.download_keys().await?;
        let mut cache = self.jwks.lock().expect("JWKS cache lock poisoned");
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        cache.failed = false;
        Ok(())
    }

    async fn download_keys(&self) -> Result<JwkSet, AuthError> {
        let url = format!("{}/auth/v1/.well-known/jwks.json", self.base_url);
        self.request(self.http.get(url))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }

    async fn verify_remotely(&self, token: &str) -> Result<Verified, AuthError> {
        // Time claims are checked on every call, before any look-up: a token that is expired
        // or not yet valid never costs a request, and no remembered success outlives `exp`.
        let claims: Unverified = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let expires_at = expiry(claims.exp)?;
        let now = Utc::now();
        if expires_at <= now {
            return Err(AuthError::Expired);
        }
        jwt::check_not_before(claims.nbf, now.timestamp())?;
        let look_up = self.look_up(token, claims.role, expires_at);
        match self.lookups.get_or_look_up(token, look_up).await {
            Lookup::Vouched(verified) => Ok(verified),
            Lookup::Refused => Err(AuthError::Invalid("refused by Supabase Auth")),
            Lookup::Unavailable => Err(AuthError::Unavailable),
        }
    }

    /// Asks `/auth/v1/user` about `token` (whose own claims say `role` and `expires_at`);
    /// returns the answer and until when to remember it.
    async fn look_up(
        &self,
        token: &str,
        role: Option<String>,
        expires_at: DateTime<Utc>,
    ) -> (Lookup, Instant) {
        let (lookup, ttl) = match self.ask_auth_user(token).await {
            Ok(Some(user)) => {
                let until_exp = (expires_at - Utc::now()).to_std().unwrap_or_default();
                let verified = Verified {
                    user_id: user.id,
                    role: user.role.or(role),
                    expires_at,
                };
                (Lookup::Vouched(verified), VOUCHED_TTL.min(until_exp))
            }
            Ok(None) => (Lookup::Refused, REFUSED_TTL),
            Err(_) => (Lookup::Unavailable, UNAVAILABLE_TTL),
        };
        (lookup, Instant::now() + ttl)
    }

    /// One `/auth/v1/user` request within the in-flight bound: the user, or `None` when
    /// Supabase refuses the token.
    ///
    /// # Errors
    /// `Unavailable` on 429, 5xx, no answer, or no free slot in time.
    async fn ask_auth_user(&self, token: &str) -> Result<Option<AuthUser>, AuthError> {
        let Ok(Ok(_slot)) =
            tokio::time::timeout(LOOKUP_SLOT_WAIT, self.lookup_slots.acquire()).await
        else {
            tracing::warn!("too many Supabase Auth look-ups in flight");
            return Err(AuthError::Unavailable);
        };
        let response = self
            .request(self.http.get(format!("{}/auth/v1/user", self.base_url)))
            .bearer_auth(token)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
            return Ok(None);
        }
        let user = response
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        Ok(Some(user))
    }

    fn request(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.apikey {
            Some(key) => request.header("apikey", key),
            None => request,
        }
    }
}

fn expiry(exp: i64) -> Result<DateTime<Utc>, AuthError> {
    DateTime::from_timestamp(exp, 0).ok_or(AuthError::Invalid("exp out of range"))
}

fn unavailable(err: reqwest::Error) -> AuthError {
    tracing::warn!(%err, "Supabase Auth request failed");
    AuthError::Unavailable
}
