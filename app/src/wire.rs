//! The JSON types of the livecredits API (SPEC §4), defined once and shared by the server,
//! the browser, the CLI and the tests. Field names and tags here *are* the wire format.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, de};

/// A JSON object, as carried by a change's `metadata`.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// The largest magnitude of a balance or amount: 2^53 − 1, so JavaScript reads it exactly.
pub const MAX_CREDITS: i64 = 9_007_199_254_740_991;

/// Reads a requested amount: any JSON integer, however long. One beyond `i64` saturates to
/// `i64::MIN` or `i64::MAX` — still beyond [`MAX_CREDITS`] — so it is refused as
/// `out_of_range` with every other too-large amount, not as an unreadable field. A number
/// with a fraction is an error here (`invalid_field`).
fn amount<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Amount;

    impl de::Visitor<'_> for Amount {
        type Value = i64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            Ok(i64::try_from(v).unwrap_or(i64::MAX))
        }

        // serde_json reads integers past `u64` and `i64::MIN` as floats. Every float beyond
        // 2^53 is a whole number, so only those saturate; nearer zero a float is a fraction
        // or written like one (`5.0`).
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            let max = MAX_CREDITS as f64; // 2^53 − 1: exact as an f64
            match v {
                v if v > max => Ok(i64::MAX),
                v if v < -max => Ok(i64::MIN),
                v => Err(E::invalid_type(de::Unexpected::Float(v), &self)),
            }
        }
    }

    deserializer.deserialize_i64(Amount)
}

/// A user's balance at one version. A user who never had a change has version 0 and no
/// `updated_at`. `held` is the sum of the user's active holds (SPEC §12) and `available`
/// what may still be spent or held: `balance − held`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceSnapshot {
    pub user_id: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub version: i64,
    pub updated_at: Option<DateTime<Utc>>,
}

impl BalanceSnapshot {
    /// A snapshot with `available` derived from `balance` and `held`.
    pub fn new(
        user_id: impl Into<String>,
        balance: i64,
        held: i64,
        version: i64,
        updated_at: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            user_id: user_id.into(),
            balance,
            held,
            available: balance - held,
            version,
            updated_at,
        }
    }
}

/// The `type` tag of a [`BalanceEvent`]; it only ever reads `"balance"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceTag {
    #[default]
    Balance,
}

/// A balance as pushed to clients: a snapshot (`change: None`) or the result of one change.
/// Balances are absolute, so a client that missed an event is healed by the next one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceEvent {
    #[serde(rename = "type")]
    pub tag: BalanceTag,
    pub user_id: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub version: i64,
    pub updated_at: Option<DateTime<Utc>>,
    /// The ledger row of this version: a change, or the `capture` row of a capture.
    pub change: Option<Change>,
    /// The hold this version placed, captured, released or expired (boxed: most events
    /// carry none).
    pub hold: Option<Box<Hold>>,
}

impl BalanceEvent {
    /// The event that carries a snapshot and no change.
    pub fn snapshot(snapshot: BalanceSnapshot) -> Self {
        Self {
            tag: BalanceTag::Balance,
            user_id: snapshot.user_id,
            balance: snapshot.balance,
            held: snapshot.held,
            available: snapshot.available,
            version: snapshot.version,
            updated_at: snapshot.updated_at,
            change: None,
            hold: None,
        }
    }

    /// The balance this event leaves, without the change.
    pub fn to_snapshot(&self) -> BalanceSnapshot {
        BalanceSnapshot {
            user_id: self.user_id.clone(),
            balance: self.balance,
            held: self.held,
            available: self.available,
            version: self.version,
            updated_at: self.updated_at,
        }
    }
}

/// Credits reserved before work whose cost is known only after it (SPEC §12).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: String,
    pub user_id: String,
    pub amount: i64,
    /// What a capture took; 0 until then.
    pub captured: i64,
    pub status: HoldStatus,
    pub metadata: Metadata,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Where a hold is in its life: `held` until captured, released or expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Held,
    Captured,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Captured => "captured",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

/// The default lifetime of a hold, in seconds.
pub const DEFAULT_HOLD_TTL_S: i64 = 900;
/// The longest lifetime of a hold, in seconds (a day).
pub const MAX_HOLD_TTL_S: i64 = 86_400;

/// The body of `POST /api/credits/holds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    pub user_id: String,
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    /// Seconds until the hold expires: 1 to [`MAX_HOLD_TTL_S`], default [`DEFAULT_HOLD_TTL_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The body of `POST /api/credits/holds/{id}/capture`: how much to take, all by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    #[serde(
        default,
        deserialize_with = "some_amount",
        skip_serializing_if = "Option::is_none"
    )]
    pub amount: Option<i64>,
}

fn some_amount<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    amount(deserializer).map(Some)
}

/// The answer to every hold operation: the hold as it is now, and the event it caused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldResponse {
    pub hold: Hold,
    pub event: BalanceEvent,
}

/// `GET /api/credits/holds`: the user's active holds, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldList {
    pub items: Vec<Hold>,
}

/// The change that produced a [`BalanceEvent`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub id: String,
    pub amount: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub metadata: Metadata,
    pub created_at: DateTime<Utc>,
}

/// The answer to a poll: the snapshot and the interval the server suggests before the next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollResponse {
    #[serde(flatten)]
    pub snapshot: BalanceSnapshot,
    pub poll_interval_ms: u32,
}

/// One row of a user's ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub id: String,
    pub amount: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub metadata: Metadata,
    pub balance_after: i64,
    pub version: i64,
    pub created_at: DateTime<Utc>,
}

/// A page of the ledger, newest first; pass `next_before` as `before` for the next page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionPage {
    pub items: Vec<Transaction>,
    pub next_before: Option<i64>,
}

/// The body of `POST /api/credits/changes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    pub user_id: String,
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The body of `POST /api/dev/credits`: a change to the caller's own balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevCreditRequest {
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// The body of `POST /api/dev/holds`: a hold on the caller's own credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevHoldRequest {
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<i64>,
}

/// The body of `POST /api/dev/login`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevLoginRequest {
    pub user_id: String,
}

/// The answer to `POST /api/dev/login`; the same token is also set as the session cookie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevLoginResponse {
    pub token: String,
    pub user_id: String,
    pub expires_at: DateTime<Utc>,
}

/// The body of `POST /api/session`: sign in with a JWT from the identity provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    pub token: String,
}

/// The signed-in user of a page, as the server saw the session cookie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub user_id: String,
    pub expires_at: DateTime<Utc>,
    /// The balance at render time; `None` when the ledger could not be read.
    pub balance: Option<BalanceSnapshot>,
}

/// What the server tells a page at render time, so the first paint shows the balance and
/// hydration starts from the same state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageContext {
    pub dev_login: bool,
    pub session: Option<SessionInfo>,
    /// How often a client on SSE or polling tries WebSocket again.
    pub climb_interval_ms: u32,
}

/// The default of [`PageContext::climb_interval_ms`].
pub const DEFAULT_CLIMB_INTERVAL_MS: u32 = 30_000;

impl Default for PageContext {
    fn default() -> Self {
        Self {
            dev_login: false,
            session: None,
            climb_interval_ms: DEFAULT_CLIMB_INTERVAL_MS,
        }
    }
}

/// Machine-readable error codes; each has exactly one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    InvalidField,
    OutOfRange,
    Unauthorized,
    Forbidden,
    NotFound,
    /// The path exists under `/api/` but not for this method; the `Allow` header lists the
    /// methods it takes.
    MethodNotAllowed,
    InsufficientCredits,
    IdempotencyConflict,
    /// The hold is no longer `held`; the message says what it is.
    HoldClosed,
    PayloadTooLarge,
    TooManyConnections,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The HTTP status that carries this code: the single status table of the API.
    pub fn status(self) -> u16 {
        match self {
            Self::BadJson => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::InsufficientCredits | Self::IdempotencyConflict | Self::HoldClosed => 409,
            Self::PayloadTooLarge => 413,
            Self::InvalidField | Self::OutOfRange => 422,
            Self::TooManyConnections => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }
}

/// Every error response under `/api/`: a stable code and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ErrorCode,
    pub message: String,
}

/// The tags of the small WebSocket frames other than balance events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PongTag {
    Pong,
}

/// See [`PongTag`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorTag {
    Error,
}

/// See [`PongTag`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthOkTag {
    AuthOk,
}

/// See [`PongTag`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthExpiringTag {
    AuthExpiring,
}

/// A frame the server sends on `/ws`; every variant carries its own `type` field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WsServerMsg {
    Balance(BalanceEvent),
    Pong {
        #[serde(rename = "type")]
        tag: PongTag,
    },
    Error {
        #[serde(rename = "type")]
        tag: ErrorTag,
        error: ErrorCode,
        message: String,
    },
    /// The token sent in a [`WsClientMsg::Auth`] now authenticates the connection.
    AuthOk {
        #[serde(rename = "type")]
        tag: AuthOkTag,
        expires_at: DateTime<Utc>,
    },
    /// Sent once per credential, a minute before it expires (or at half its lifetime if
    /// that is shorter): send a fresh token with [`WsClientMsg::Auth`] before `expires_at`.
    AuthExpiring {
        #[serde(rename = "type")]
        tag: AuthExpiringTag,
        expires_at: DateTime<Utc>,
    },
}

/// A frame a client may send on `/ws`; fields beyond those named are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsClientMsg {
    Ping,
    /// Replaces the connection's credential with a fresh token for the same user (SPEC §11).
    Auth {
        token: String,
    },
}

/// Every route path of the API and the realtime transports (SPEC §5), written once so the
/// server's routers, the browser, the CLI and the tests cannot drift apart. Paths with an
/// `{id}` segment are axum route patterns; clients fill them in with [`paths::with_id`].
pub mod paths {
    /// WebSocket of balance events.
    pub const WS: &str = "/ws";
    /// Server-Sent Events of balance events; also served on lean connections, by path.
    pub const SSE: &str = "/api/credits/sse";
    /// The snapshot, or a long-poll with `version` and `wait`.
    pub const POLL: &str = "/api/credits/balance/poll";
    /// The user's balance snapshot.
    pub const BALANCE: &str = "/api/credits/balance";
    /// The user's ledger, newest first.
    pub const TRANSACTIONS: &str = "/api/credits/transactions";
    /// Balance changes, by a service.
    pub const CHANGES: &str = "/api/credits/changes";
    /// Holds: placed by a service, listed by their user (SPEC §12).
    pub const HOLDS: &str = "/api/credits/holds";
    /// Captures a hold.
    pub const HOLD_CAPTURE: &str = "/api/credits/holds/{id}/capture";
    /// Releases a hold.
    pub const HOLD_RELEASE: &str = "/api/credits/holds/{id}/release";
    /// Sign in with a token (sets the session cookie), or sign out.
    pub const SESSION: &str = "/api/session";
    /// Dev mode: sign in as anyone.
    pub const DEV_LOGIN: &str = "/api/dev/login";
    /// Dev mode: a change to the caller's own balance.
    pub const DEV_CREDITS: &str = "/api/dev/credits";
    /// Dev mode: a hold on the caller's own credits.
    pub const DEV_HOLDS: &str = "/api/dev/holds";
    /// Dev mode: captures one of the caller's holds.
    pub const DEV_HOLD_CAPTURE: &str = "/api/dev/holds/{id}/capture";
    /// Dev mode: releases one of the caller's holds.
    pub const DEV_HOLD_RELEASE: &str = "/api/dev/holds/{id}/release";
    /// Liveness.
    pub const HEALTHZ: &str = "/healthz";
    /// Readiness, for load balancers.
    pub const READYZ: &str = "/readyz";
    /// Prometheus metrics.
    pub const METRICS: &str = "/metrics";

    /// `route` (one of the `{id}` paths) for the hold `id`.
    pub fn with_id(route: &str, id: &str) -> String {
        route.replace("{id}", id)
    }
}

/// How live connections end (SPEC §5): WebSocket close codes and SSE terminal events, each
/// with what a client should do next. [`advice`] is that meaning in code, so the browser
/// machine and the CLI react alike.
pub mod close {
    /// The client kept sending malformed or unknown frames: fix the client, do not resend
    /// ([`Advice::FixClient`]).
    pub const POLICY: u16 = 1008;
    /// A client frame was over 4 KiB: fix the client, do not resend ([`Advice::FixClient`]).
    pub const TOO_BIG: u16 = 1009;
    /// The server is restarting: reconnect after a short jittered delay, to any instance
    /// ([`Advice::Reconnect`]).
    pub const RESTARTING: u16 = 1012;
    /// The ledger could not be read for the snapshot: reconnect with backoff
    /// ([`Advice::BackOff`]).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The token expired: re-authenticate, then reconnect ([`Advice::SignIn`]).
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The page's origin may not use the session cookie: do not retry from this origin
    /// ([`Advice::Stop`]).
    pub const FORBIDDEN_ORIGIN: u16 = 4003;
    /// A token sent in-band belongs to another user or to a service: do not retry with it;
    /// only a token for the intended user may connect again ([`Advice::Stop`]).
    pub const FORBIDDEN_CREDENTIAL: u16 = 4003;
    /// The user (or instance) has too many connections: back off before retrying
    /// ([`Advice::SlowDown`]).
    pub const TOO_MANY_CONNECTIONS: u16 = 4029;
    /// Never sent by a server: browsers report it when the connection dropped without a
    /// close frame. Reconnect with backoff ([`Advice::BackOff`]).
    pub const ABNORMAL: u16 = 1006;
    /// SSE event sent just before the stream ends because the token expired, with data
    /// `{"error":"token_expired"}`: re-authenticate, then reconnect ([`Advice::SignIn`]).
    pub const SSE_AUTH_EXPIRED: &str = "auth_expired";

    /// What a client should do after a connection ended.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Advice {
        /// Reconnect soon, after a short random delay that spreads clients over the
        /// remaining instances.
        Reconnect,
        /// Reconnect with exponential backoff: the cause may pass.
        BackOff,
        /// The server is at a limit for this user or instance: back off longer than after a
        /// plain failure.
        SlowDown,
        /// Get a fresh token (sign in again), then reconnect.
        SignIn,
        /// Do not reconnect from this origin or with this credential: retrying cannot help.
        Stop,
        /// The client sent a frame the server will not take: never send it again.
        /// Reconnecting without it is allowed, with backoff so a bug cannot become a tight
        /// loop.
        FixClient,
    }

    /// The advice for WebSocket close `code`. A code this server never sends (a proxy's, or
    /// a newer server's) is a failure that may pass: back off.
    pub fn advice(code: u16) -> Advice {
        match code {
            RESTARTING => Advice::Reconnect,
            TOO_MANY_CONNECTIONS => Advice::SlowDown,
            TOKEN_EXPIRED => Advice::SignIn,
            // Also `FORBIDDEN_CREDENTIAL`: one code, and the same advice.
            FORBIDDEN_ORIGIN => Advice::Stop,
            POLICY | TOO_BIG => Advice::FixClient,
            // `TRY_AGAIN_LATER`, `ABNORMAL` and every other code.
            _ => Advice::BackOff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: T,
        expected: serde_json::Value,
    ) {
        let encoded = serde_json::to_value(&value).expect("serialises");
        assert_eq!(encoded, expected);
        let decoded: T = serde_json::from_value(encoded).expect("deserialises");
        assert_eq!(decoded, value);
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("valid RFC 3339")
    }

    fn sample_change() -> Change {
        let mut metadata = Metadata::new();
        metadata.insert("order".into(), json!("A-17"));
        Change {
            id: "0190f5c2-7a00-7000-8000-000000000001".into(),
            amount: -250,
            kind: "spend".into(),
            metadata,
            created_at: at("2026-11-28T10:00:00Z"),
        }
    }

    /// A never-seen user serialises with a null `updated_at`.
    #[test]
    fn snapshot_of_new_user() {
        round_trip(
            BalanceSnapshot::new("u1", 0, 0, 0, None),
            json!({
                "user_id": "u1", "balance": 0, "held": 0, "available": 0, "version": 0,
                "updated_at": null
            }),
        );
    }

    /// A balance event carries `type: "balance"` and its change with `type` as the kind.
    #[test]
    fn balance_event_with_change() {
        round_trip(
            BalanceEvent {
                tag: BalanceTag::Balance,
                user_id: "u1".into(),
                balance: 750,
                held: 50,
                available: 700,
                version: 3,
                updated_at: Some(at("2026-11-28T10:00:00Z")),
                change: Some(sample_change()),
                hold: None,
            },
            json!({
                "type": "balance", "user_id": "u1", "balance": 750, "held": 50,
                "available": 700, "version": 3, "updated_at": "2026-11-28T10:00:00Z", "hold": null,
                "change": {
                    "id": "0190f5c2-7a00-7000-8000-000000000001", "amount": -250,
                    "type": "spend", "metadata": {"order": "A-17"},
                    "created_at": "2026-11-28T10:00:00Z"
                }
            }),
        );
    }

    /// A hold travels with its status as a word; a capture body may leave out the amount.
    #[test]
    fn hold_and_capture() {
        round_trip(
            Hold {
                id: "h1".into(),
                user_id: "u1".into(),
                amount: 30,
                captured: 12,
                status: HoldStatus::Captured,
                metadata: Metadata::new(),
                created_at: at("2026-12-02T10:00:00Z"),
                expires_at: at("2026-12-02T10:15:00Z"),
            },
            json!({
                "id": "h1", "user_id": "u1", "amount": 30, "captured": 12,
                "status": "captured", "metadata": {},
                "created_at": "2026-12-02T10:00:00Z", "expires_at": "2026-12-02T10:15:00Z"
            }),
        );
        round_trip(CaptureRequest::default(), json!({}));
        round_trip(CaptureRequest { amount: Some(7) }, json!({"amount": 7}));
        let request: HoldRequest =
            serde_json::from_value(json!({"user_id": "u1", "amount": 5})).expect("minimal");
        assert_eq!((request.ttl_s, request.metadata), (None, None));
        let huge = json!({"user_id": "u1", "amount": 18446744073709551616u128 as f64});
        let request: HoldRequest = serde_json::from_value(huge).expect("saturates");
        assert_eq!(request.amount, i64::MAX);
    }

    /// Balances at the JavaScript safe-integer limit survive a round trip exactly.
    #[test]
    fn extreme_balance_is_exact() {
        let snapshot =
            BalanceSnapshot::new("rich", MAX_CREDITS, 0, 1, Some(at("2026-11-28T10:00:00Z")));
        let event = BalanceEvent::snapshot(snapshot);
        let text = serde_json::to_string(&event).expect("serialises");
        assert!(text.contains("9007199254740991"));
        assert_eq!(event.change, None);
    }

    /// The poll response is the snapshot's fields plus `poll_interval_ms`, flat.
    #[test]
    fn poll_response_is_flat() {
        round_trip(
            PollResponse {
                snapshot: BalanceSnapshot::new("u1", 5, 2, 1, Some(at("2026-11-28T10:00:00Z"))),
                poll_interval_ms: 5_000,
            },
            json!({
                "user_id": "u1", "balance": 5, "held": 2, "available": 3, "version": 1,
                "updated_at": "2026-11-28T10:00:00Z", "poll_interval_ms": 5000
            }),
        );
    }

    /// A ledger page lists rows and the cursor for the next page.
    #[test]
    fn transaction_page() {
        round_trip(
            TransactionPage {
                items: vec![Transaction {
                    id: "t1".into(),
                    amount: 100,
                    kind: "grant".into(),
                    metadata: Metadata::new(),
                    balance_after: 100,
                    version: 1,
                    created_at: at("2026-11-28T10:00:00Z"),
                }],
                next_before: None,
            },
            json!({
                "items": [{
                    "id": "t1", "amount": 100, "type": "grant", "metadata": {},
                    "balance_after": 100, "version": 1, "created_at": "2026-11-28T10:00:00Z"
                }],
                "next_before": null
            }),
        );
    }

    /// Optional request fields are omitted when absent and unknown fields are refused.
    #[test]
    fn change_request() {
        round_trip(
            ChangeRequest {
                user_id: "u1".into(),
                amount: 10,
                kind: "purchase".into(),
                metadata: None,
                idempotency_key: Some("k1".into()),
            },
            json!({"user_id": "u1", "amount": 10, "type": "purchase", "idempotency_key": "k1"}),
        );
        let unknown = json!({"user_id": "u1", "amount": 10, "type": "x", "balance": 5});
        assert!(serde_json::from_value::<ChangeRequest>(unknown).is_err());
    }

    /// Requested amounts past `i64` saturate, so validation sees them out of range; a
    /// fraction or a string does not read as an amount.
    #[test]
    fn amounts_beyond_i64_saturate() {
        let amount_of = |amount: &str| {
            let body = format!(r#"{{"amount":{amount},"type":"grant"}}"#);
            serde_json::from_str::<DevCreditRequest>(&body).map(|request| request.amount)
        };
        for (text, amount) in [
            ("-9007199254740991", -MAX_CREDITS),
            ("9223372036854775807", i64::MAX),
            ("9223372036854775808", i64::MAX),
            ("18446744073709551616", i64::MAX),
            ("1234567890123456789012345678901", i64::MAX),
            ("1e30", i64::MAX),
            ("-9223372036854775809", i64::MIN),
            ("-1234567890123456789012345678901", i64::MIN),
        ] {
            assert_eq!(amount_of(text).expect(text), amount, "{text}");
        }
        for text in ["1.5", "-0.5", "5.0", "9007199254740991.0", "\"1\"", "null"] {
            assert!(amount_of(text).is_err(), "{text}");
        }
        let change = r#"{"user_id":"u","amount":18446744073709551616,"type":"grant"}"#;
        let request: ChangeRequest = serde_json::from_str(change).expect("reads");
        assert_eq!(request.amount, i64::MAX);
    }

    /// Dev sign-in request and response keep their field names.
    #[test]
    fn dev_login() {
        round_trip(
            DevLoginRequest {
                user_id: "alice".into(),
            },
            json!({"user_id": "alice"}),
        );
        round_trip(
            DevLoginResponse {
                token: "t".into(),
                user_id: "alice".into(),
                expires_at: at("2026-11-29T10:00:00Z"),
            },
            json!({"token": "t", "user_id": "alice", "expires_at": "2026-11-29T10:00:00Z"}),
        );
        round_trip(
            DevCreditRequest {
                amount: -5,
                kind: "spend".into(),
                metadata: None,
            },
            json!({"amount": -5, "type": "spend"}),
        );
    }

    /// Error codes are snake_case and each maps to the status of SPEC §4.
    #[test]
    fn api_error_codes() {
        round_trip(
            ApiError {
                error: ErrorCode::InsufficientCredits,
                message: "balance 5 is less than 10".into(),
            },
            json!({"error": "insufficient_credits", "message": "balance 5 is less than 10"}),
        );
        let table = [
            (ErrorCode::BadJson, "bad_json", 400),
            (ErrorCode::InvalidField, "invalid_field", 422),
            (ErrorCode::OutOfRange, "out_of_range", 422),
            (ErrorCode::Unauthorized, "unauthorized", 401),
            (ErrorCode::Forbidden, "forbidden", 403),
            (ErrorCode::NotFound, "not_found", 404),
            (ErrorCode::MethodNotAllowed, "method_not_allowed", 405),
            (ErrorCode::InsufficientCredits, "insufficient_credits", 409),
            (ErrorCode::IdempotencyConflict, "idempotency_conflict", 409),
            (ErrorCode::HoldClosed, "hold_closed", 409),
            (ErrorCode::PayloadTooLarge, "payload_too_large", 413),
            (ErrorCode::TooManyConnections, "too_many_connections", 429),
            (ErrorCode::Unavailable, "unavailable", 503),
            (ErrorCode::Internal, "internal", 500),
        ];
        for (code, name, status) in table {
            assert_eq!(serde_json::to_value(code).expect("serialises"), json!(name));
            assert_eq!(code.status(), status, "{name}");
        }
    }

    /// Every WebSocket server frame is told apart by its `type` alone.
    #[test]
    fn ws_server_frames() {
        round_trip(
            WsServerMsg::Pong { tag: PongTag::Pong },
            json!({"type": "pong"}),
        );
        round_trip(
            WsServerMsg::Error {
                tag: ErrorTag::Error,
                error: ErrorCode::BadJson,
                message: "expected {\"type\":\"ping\"}".into(),
            },
            json!({"type": "error", "error": "bad_json", "message": "expected {\"type\":\"ping\"}"}),
        );
        let event = BalanceEvent::snapshot(BalanceSnapshot::new("u1", 1, 0, 1, None));
        round_trip(
            WsServerMsg::Balance(event),
            json!({
                "type": "balance", "user_id": "u1", "balance": 1, "held": 0, "available": 1,
                "version": 1, "updated_at": null, "change": null, "hold": null
            }),
        );
        let at: DateTime<Utc> = "2026-12-02T08:00:00Z".parse().expect("RFC 3339");
        round_trip(
            WsServerMsg::AuthOk {
                tag: AuthOkTag::AuthOk,
                expires_at: at,
            },
            json!({"type": "auth_ok", "expires_at": "2026-12-02T08:00:00Z"}),
        );
        round_trip(
            WsServerMsg::AuthExpiring {
                tag: AuthExpiringTag::AuthExpiring,
                expires_at: at,
            },
            json!({"type": "auth_expiring", "expires_at": "2026-12-02T08:00:00Z"}),
        );
        let unknown = json!({"type": "nonsense"});
        assert!(serde_json::from_value::<WsServerMsg>(unknown).is_err());
    }

    /// Clients may only send `ping` and `auth` with a token; anything else fails to parse.
    #[test]
    fn ws_client_frames() {
        round_trip(WsClientMsg::Ping, json!({"type": "ping"}));
        round_trip(
            WsClientMsg::Auth { token: "t".into() },
            json!({"type": "auth", "token": "t"}),
        );
        for bad in [
            json!({"type": "pong"}),
            json!({"kind": "ping"}),
            json!({"type": "auth"}),
            json!(1),
        ] {
            assert!(serde_json::from_value::<WsClientMsg>(bad).is_err());
        }
    }

    /// Every close code maps to the advice its doc comment states; 1006 and codes this
    /// server never sends back off.
    #[test]
    fn close_code_advice() {
        use close::{Advice, advice};
        for (code, expected) in [
            (close::POLICY, Advice::FixClient),
            (close::TOO_BIG, Advice::FixClient),
            (close::RESTARTING, Advice::Reconnect),
            (close::TRY_AGAIN_LATER, Advice::BackOff),
            (close::TOKEN_EXPIRED, Advice::SignIn),
            (close::FORBIDDEN_ORIGIN, Advice::Stop),
            (close::FORBIDDEN_CREDENTIAL, Advice::Stop),
            (close::TOO_MANY_CONNECTIONS, Advice::SlowDown),
            (close::ABNORMAL, Advice::BackOff),
            (1000, Advice::BackOff),
            (1011, Advice::BackOff),
            (4999, Advice::BackOff),
        ] {
            assert_eq!(advice(code), expected, "close code {code}");
        }
    }

    /// A hold's capture and release paths are its route patterns with the id filled in.
    #[test]
    fn hold_paths_with_id() {
        assert_eq!(
            paths::with_id(paths::HOLD_CAPTURE, "h1"),
            "/api/credits/holds/h1/capture"
        );
        assert_eq!(
            paths::with_id(paths::DEV_HOLD_RELEASE, "h2"),
            "/api/dev/holds/h2/release"
        );
    }
}
