//! Server configuration: the only place that reads the environment (SPEC §2).
//!
//! `Config::from_env` loads `.env`, reads every variable once and checks cross-field rules,
//! so a bad setting stops start-up with one line naming the variable.

use std::{net::SocketAddr, path::PathBuf};

use leptos::config::LeptosOptions;

use crate::realtime::RealtimeConfig;

/// Listen address when `LEPTOS_SITE_ADDR` is unset.
pub const DEFAULT_SITE_ADDR: &str = "127.0.0.1:3000";
/// The embedded database when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/livecredits.db";
/// Prefix of the Redis pub/sub channel when `REDIS_CHANNEL_PREFIX` is unset.
pub const DEFAULT_CHANNEL_PREFIX: &str = "livecredits";
/// Name of the built site's files (`/pkg/livecredits.js`, …), as cargo-leptos names them.
pub const OUTPUT_NAME: &str = "livecredits";
/// Where cargo-leptos puts the built site, relative to the workspace root.
pub const DEFAULT_SITE_ROOT: &str = "target/site";
/// Folder for local state (the generated dev secret) when `LIVECREDITS_DATA_DIR` is unset.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Shortest accepted secret: an HS256 key any shorter can be brute-forced offline from a
/// single token it signed, and then anyone could mint service tokens (SPEC §10).
pub const MIN_SECRET_BYTES: usize = 32;
/// How long a user's channel lingers when `LIVECREDITS_CHANNEL_LINGER_S` is unset, and the
/// most it may (SPEC §6.1).
pub const DEFAULT_CHANNEL_LINGER: std::time::Duration = std::time::Duration::from_secs(10);
pub const MAX_CHANNEL_LINGER: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a dev sign-in lasts when `LIVECREDITS_DEV_SESSION_TTL_S` is unset.
pub const DEFAULT_DEV_SESSION_TTL: chrono::Duration = chrono::Duration::hours(24);

/// A setting that stops start-up; `Display` is the one line shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
    #[error(
        "JWT_SECRET: required (or SUPABASE_JWT_SECRET, SUPABASE_URL, or LIVECREDITS_DEV_LOGIN=1)"
    )]
    MissingSecret,
    #[error("Leptos configuration: {0}")]
    Leptos(String),
}

/// The origin browsers reach the app at, without a trailing slash and default port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl(String);

impl PublicUrl {
    /// `scheme://host[:port]`, as a browser sends it in `Origin`.
    pub fn origin(&self) -> &str {
        &self.0
    }

    /// Whether browsers reach the app over https.
    pub fn is_https(&self) -> bool {
        self.0.starts_with("https://")
    }
}

/// The database the ledger lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(String),
    Postgres(String),
}

/// Everything the server needs to start, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen (`LEPTOS_SITE_ADDR`).
    pub site_addr: SocketAddr,
    /// The ledger database (`DATABASE_URL`).
    pub database_url: DatabaseUrl,
    /// Redis for cross-instance delivery (`REDIS_URL`); `None` means one instance.
    pub redis_url: Option<String>,
    /// Redis password when the URL has none (`REDIS_PASSWORD`).
    pub redis_password: Option<String>,
    /// Prefix of the pub/sub channel (`REDIS_CHANNEL_PREFIX`).
    pub channel_prefix: String,
    /// HS256 secret for user tokens (`JWT_SECRET`, else `SUPABASE_JWT_SECRET`).
    pub jwt_secret: Option<String>,
    /// Required `aud` claim, when set (`JWT_AUDIENCE`).
    pub jwt_audience: Option<String>,
    /// Supabase project whose Auth verifies tokens (`SUPABASE_URL`).
    pub supabase_url: Option<String>,
    /// Supabase `apikey`, also accepted as a service credential (`SUPABASE_SERVICE_ROLE_KEY`).
    pub supabase_service_role_key: Option<String>,
    /// How long a user's Redis channel stays subscribed after their last connection on this
    /// instance closed (`LIVECREDITS_CHANNEL_LINGER_S`), so a reload does not resubscribe.
    pub channel_linger: std::time::Duration,
    /// Dev sign-in and dev credit routes (`LIVECREDITS_DEV_LOGIN=1`).
    pub dev_login: bool,
    /// How long a dev sign-in's token lasts (`LIVECREDITS_DEV_SESSION_TTL_S`); short values
    /// let one watch tokens being refreshed in place.
    pub dev_session_ttl: chrono::Duration,
    /// The URL browsers use (`LIVECREDITS_PUBLIC_URL`); https turns on `Secure` cookies,
    /// HSTS and a strict WebSocket `Origin` check.
    pub public_url: PublicUrl,
    /// Extra origins allowed for CORS and WebSocket cookie auth (`CORS_ORIGINS`, comma-separated).
    pub allowed_origins: Vec<String>,
    /// Folder for local state such as the generated dev secret (`LIVECREDITS_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Open connections this instance accepts (`LIVECREDITS_MAX_CONNECTIONS`); `None`
    /// derives it from the open-files limit at start-up.
    pub max_connections: Option<usize>,
    /// How often browsers on SSE or polling try WebSocket again
    /// (`LIVECREDITS_CLIMB_INTERVAL_MS`).
    pub climb_interval_ms: u32,
    /// Live-connection timings and per-user limits (`LIVECREDITS_MAX_LIVE_PER_USER`,
    /// `LIVECREDITS_MAX_POLLS_PER_USER`).
    pub realtime: RealtimeConfig,
    /// Where the built site lives and how Leptos names its files.
    pub leptos: LeptosOptions,
}

impl Config {
    /// Reads `.env` (if present) and the process environment.
    ///
    /// # Errors
    /// The first invalid or missing setting, naming its variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is a setting error like any other.
        if let Err(err) = dotenvy::dotenv()
            && !err.not_found()
        {
            return Err(ConfigError::Invalid {
                var: ".env",
                reason: err.to_string(),
            });
        }
        // Our own variables first, so a bad LEPTOS_SITE_ADDR is reported in our words.
        let mut config = Self::from_lookup(|name| std::env::var(name).ok())?;
        let mut leptos = leptos::config::get_configuration(None)
            .map_err(|err| ConfigError::Leptos(err.to_string()))?
            .leptos_options;
        leptos.site_addr = config.site_addr;
        config.leptos = leptos;
        Ok(config)
    }

    /// Builds a configuration from any source of variables; tests use a map. The Leptos
    /// options are the defaults for the built site; `from_env` reads Leptos's own variables.
    ///
    /// # Errors
    /// As [`Config::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());

        let site_addr = parse_site_addr(var("LEPTOS_SITE_ADDR").as_deref())?;
        let database_url =
            parse_database_url(&var("DATABASE_URL").unwrap_or(DEFAULT_DATABASE_URL.into()))?;
        let redis_url = var("REDIS_URL").map(parse_redis_url).transpose()?;
        let supabase_url = var("SUPABASE_URL").map(parse_supabase_url).transpose()?;
        let dev_login = parse_flag("LIVECREDITS_DEV_LOGIN", var("LIVECREDITS_DEV_LOGIN"))?;
        let jwt_secret = match var("JWT_SECRET") {
            Some(secret) => Some(strong_secret("JWT_SECRET", secret)?),
            None => var("SUPABASE_JWT_SECRET")
                .map(|secret| strong_secret("SUPABASE_JWT_SECRET", secret))
                .transpose()?,
        };
        if jwt_secret.is_none() && supabase_url.is_none() && !dev_login {
            return Err(ConfigError::MissingSecret);
        }
        let supabase_service_role_key = var("SUPABASE_SERVICE_ROLE_KEY")
            .map(|key| strong_secret("SUPABASE_SERVICE_ROLE_KEY", key))
            .transpose()?;
        if dev_login && !site_addr.ip().is_loopback() {
            return Err(invalid(
                "LIVECREDITS_DEV_LOGIN",
                format!(
                    "dev sign-in lets anyone act as any user, so it only listens on a loopback \
                     address, not {site_addr} (LEPTOS_SITE_ADDR)"
                ),
            ));
        }
        let public_url = match var("LIVECREDITS_PUBLIC_URL") {
            Some(url) => parse_public_url(&url)?,
            None => PublicUrl(format!("http://{site_addr}")),
        };
        let mut realtime = RealtimeConfig::default();
        if let Some(value) = var("LIVECREDITS_MAX_LIVE_PER_USER") {
            realtime.limits.live_per_user = parse_count("LIVECREDITS_MAX_LIVE_PER_USER", &value)?;
        }
        if let Some(value) = var("LIVECREDITS_MAX_POLLS_PER_USER") {
            realtime.limits.polls_per_user = parse_count("LIVECREDITS_MAX_POLLS_PER_USER", &value)?;
        }
        let climb_interval_ms = match var("LIVECREDITS_CLIMB_INTERVAL_MS") {
            Some(value) => u32::try_from(parse_count("LIVECREDITS_CLIMB_INTERVAL_MS", &value)?)
                .map_err(|_| invalid("LIVECREDITS_CLIMB_INTERVAL_MS", "too large"))?,
            None => app::wire::DEFAULT_CLIMB_INTERVAL_MS,
        };
        let dev_session_ttl = match var("LIVECREDITS_DEV_SESSION_TTL_S") {
            Some(value) => i64::try_from(parse_count("LIVECREDITS_DEV_SESSION_TTL_S", &value)?)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .ok_or_else(|| invalid("LIVECREDITS_DEV_SESSION_TTL_S", "too large"))?,
            None => DEFAULT_DEV_SESSION_TTL,
        };
        let channel_linger = match var("LIVECREDITS_CHANNEL_LINGER_S") {
            Some(value) => match value.trim().parse::<u64>() {
                Ok(secs) if secs <= MAX_CHANNEL_LINGER.as_secs() => {
                    std::time::Duration::from_secs(secs)
                }
                _ => {
                    return Err(invalid(
                        "LIVECREDITS_CHANNEL_LINGER_S",
                        format!("{value:?} is not a whole number of seconds from 0 to 30"),
                    ));
                }
            },
            None => DEFAULT_CHANNEL_LINGER,
        };
        let max_connections = var("LIVECREDITS_MAX_CONNECTIONS")
            .map(|value| parse_count("LIVECREDITS_MAX_CONNECTIONS", &value))
            .transpose()?;
        let allowed_origins = var("CORS_ORIGINS")
            .map(|list| parse_origins(&list))
            .transpose()?
            .unwrap_or_default();

        Ok(Self {
            site_addr,
            database_url,
            redis_url,
            redis_password: var("REDIS_PASSWORD"),
            channel_prefix: var("REDIS_CHANNEL_PREFIX").unwrap_or(DEFAULT_CHANNEL_PREFIX.into()),
            jwt_secret,
            jwt_audience: var("JWT_AUDIENCE"),
            supabase_url,
            supabase_service_role_key,
            channel_linger,
            dev_login,
            dev_session_ttl,
            public_url,
            allowed_origins,
            data_dir: var("LIVECREDITS_DATA_DIR")
                .unwrap_or(DEFAULT_DATA_DIR.into())
                .into(),
            max_connections,
            climb_interval_ms,
            realtime,
            leptos: LeptosOptions::builder()
                .output_name(OUTPUT_NAME)
                .site_root(DEFAULT_SITE_ROOT)
                .site_addr(site_addr)
                .build(),
        })
    }
}

fn invalid(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        reason: reason.into(),
    }
}

fn parse_site_addr(value: Option<&str>) -> Result<SocketAddr, ConfigError> {
    let value = value.unwrap_or(DEFAULT_SITE_ADDR);
    value.parse().map_err(|_| {
        invalid(
            "LEPTOS_SITE_ADDR",
            format!("{value:?} is not an address like 127.0.0.1:3000"),
        )
    })
}

/// `url` with the password of its user-info part, if any, replaced by `***`, for error
/// messages and logs. Works on malformed URLs too (`postgres:/u:pw@h`): whatever stands
/// between the first `:` after the scheme and the last `@` is hidden, at worst too much.
pub fn redact(url: &str) -> String {
    let start = url.find("://").map_or(0, |scheme_end| scheme_end + 3);
    let Some(at) = url[start..].rfind('@').map(|at| start + at) else {
        return url.to_owned();
    };
    match url[start..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
        None => url.to_owned(),
    }
}

/// A secret long enough not to be guessed offline.
fn strong_secret(var: &'static str, secret: String) -> Result<String, ConfigError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(invalid(
            var,
            format!(
                "too short ({} bytes; at least {MIN_SECRET_BYTES}, e.g. `openssl rand -hex 32`)",
                secret.len()
            ),
        ));
    }
    Ok(secret)
}

fn parse_public_url(value: &str) -> Result<PublicUrl, ConfigError> {
    normalize_origin(value.trim().trim_end_matches('/'))
        .map(PublicUrl)
        .ok_or_else(|| {
            invalid(
                "LIVECREDITS_PUBLIC_URL",
                format!(
                    "{:?} is not an http(s) origin like https://app.example.com",
                    redact(value)
                ),
            )
        })
}

/// An http(s) origin as browsers send it in `Origin`: scheme and host in lower case, no
/// default port. `None` for anything that is not an origin (a path, user info, another
/// scheme).
pub fn normalize_origin(value: &str) -> Option<String> {
    let (scheme, authority) = value.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}"))
}

fn parse_database_url(value: &str) -> Result<DatabaseUrl, ConfigError> {
    const VAR: &str = "DATABASE_URL";
    let shown = redact(value);
    let (scheme, rest) = value.split_once("://").ok_or_else(|| {
        invalid(
            VAR,
            format!("{shown:?} is not a URL (expected sqlite://… or postgres://…)"),
        )
    })?;
    if rest.is_empty() {
        return Err(invalid(VAR, format!("{shown:?} names no database")));
    }
    match scheme {
        "sqlite" => Ok(DatabaseUrl::Sqlite(value.into())),
        "postgres" | "postgresql" => Ok(DatabaseUrl::Postgres(value.into())),
        other => Err(invalid(
            VAR,
            format!("unsupported scheme {other:?} (expected sqlite or postgres)"),
        )),
    }
}

fn parse_redis_url(value: String) -> Result<String, ConfigError> {
    match value.split_once("://") {
        Some(("redis" | "rediss" | "redis-cluster" | "rediss-cluster", rest))
            if !rest.is_empty() =>
        {
            Ok(value)
        }
        _ => Err(invalid(
            "REDIS_URL",
            format!(
                "{:?} is not a redis://, rediss://, redis-cluster:// or rediss-cluster:// URL",
                redact(&value)
            ),
        )),
    }
}

fn parse_supabase_url(value: String) -> Result<String, ConfigError> {
    match value.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => {
            Ok(value.trim_end_matches('/').to_owned())
        }
        _ => Err(invalid(
            "SUPABASE_URL",
            format!("{:?} is not an http(s) URL", redact(&value)),
        )),
    }
}

fn parse_flag(var: &'static str, value: Option<String>) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("0" | "false" | "off" | "no") => Ok(false),
        Some("1" | "true" | "on" | "yes") => Ok(true),
        Some(other) => Err(invalid(
            var,
            format!("{other:?} is not a flag (use 1 or 0)"),
        )),
    }
}

fn parse_count(var: &'static str, value: &str) -> Result<usize, ConfigError> {
    match value.trim().parse::<usize>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(invalid(
            var,
            format!("{value:?} is not a positive whole number"),
        )),
    }
}

fn parse_origins(list: &str) -> Result<Vec<String>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(|origin| {
            normalize_origin(origin).ok_or_else(|| {
                invalid(
                    "CORS_ORIGINS",
                    format!(
                        "{:?} is not an origin like https://app.example.com",
                        redact(origin)
                    ),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    /// A secret long enough for the start-up check.
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn error_line(vars: &[(&str, &str)]) -> String {
        load(vars)
            .expect_err("configuration must be refused")
            .to_string()
    }

    /// With only a secret, every other setting takes its documented default.
    #[test]
    fn defaults() {
        let config = load(&[("JWT_SECRET", SECRET)]).expect("valid");
        assert_eq!(config.site_addr.to_string(), DEFAULT_SITE_ADDR);
        assert_eq!(config.leptos.site_addr, config.site_addr);
        assert_eq!(
            config.database_url,
            DatabaseUrl::Sqlite(DEFAULT_DATABASE_URL.into())
        );
        assert_eq!(config.redis_url, None);
        assert_eq!(config.channel_prefix, "livecredits");
        assert!(!config.dev_login);
        assert!(config.allowed_origins.is_empty());
        assert_eq!(config.data_dir, PathBuf::from("data"));
        assert_eq!(config.realtime.limits.live_per_user, 32);
        assert_eq!(config.realtime.limits.polls_per_user, 8);
        assert_eq!(config.max_connections, None);
        assert_eq!(config.dev_session_ttl, DEFAULT_DEV_SESSION_TTL);
    }

    /// Every variable of SPEC §2 is read.
    #[test]
    fn all_variables() {
        let config = load(&[
            ("LEPTOS_SITE_ADDR", "127.0.0.2:8080"),
            ("DATABASE_URL", "postgres://root@127.0.0.1/test"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("REDIS_PASSWORD", "pw"),
            ("REDIS_CHANNEL_PREFIX", "staging"),
            ("SUPABASE_JWT_SECRET", "supa-0123456789abcdef0123456789ab"),
            ("JWT_AUDIENCE", "authenticated"),
            ("SUPABASE_URL", "https://x.supabase.co/"),
            (
                "SUPABASE_SERVICE_ROLE_KEY",
                "key-0123456789abcdef0123456789abc",
            ),
            ("LIVECREDITS_DEV_LOGIN", "1"),
            ("CORS_ORIGINS", "https://a.example, http://localhost:5173"),
            ("LIVECREDITS_MAX_LIVE_PER_USER", "4"),
            ("LIVECREDITS_MAX_POLLS_PER_USER", "2"),
            ("LIVECREDITS_MAX_CONNECTIONS", "1000"),
            ("LIVECREDITS_PUBLIC_URL", "HTTPS://App.Example:443/"),
            ("LIVECREDITS_DEV_SESSION_TTL_S", "90"),
            ("LIVECREDITS_CHANNEL_LINGER_S", "2"),
        ])
        .expect("valid");
        assert_eq!(config.site_addr.port(), 8080);
        assert!(matches!(config.database_url, DatabaseUrl::Postgres(_)));
        assert_eq!(config.redis_password.as_deref(), Some("pw"));
        assert_eq!(config.channel_prefix, "staging");
        assert_eq!(
            config.jwt_secret.as_deref(),
            Some("supa-0123456789abcdef0123456789ab")
        );
        assert_eq!(config.public_url.origin(), "https://app.example");
        assert!(config.public_url.is_https());
        assert_eq!(config.jwt_audience.as_deref(), Some("authenticated"));
        assert_eq!(
            config.supabase_url.as_deref(),
            Some("https://x.supabase.co")
        );
        assert!(config.dev_login);
        assert_eq!(config.realtime.limits.live_per_user, 4);
        assert_eq!(config.realtime.limits.polls_per_user, 2);
        assert_eq!(config.max_connections, Some(1000));
        assert_eq!(config.dev_session_ttl, chrono::Duration::seconds(90));
        assert_eq!(config.channel_linger, std::time::Duration::from_secs(2));
        assert_eq!(
            config.allowed_origins,
            ["https://a.example", "http://localhost:5173"]
        );
    }

    /// A Redis Cluster is named by `redis-cluster://` (SPEC §6.1); one seed node suffices.
    #[test]
    fn redis_cluster_url() {
        let url = "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001";
        let config = load(&[("JWT_SECRET", SECRET), ("REDIS_URL", url)]).expect("valid");
        assert_eq!(config.redis_url.as_deref(), Some(url));
        assert_eq!(config.channel_linger, DEFAULT_CHANNEL_LINGER);
    }

    /// `JWT_SECRET` wins over `SUPABASE_JWT_SECRET`.
    #[test]
    fn jwt_secret_precedence() {
        let other = "b".repeat(MIN_SECRET_BYTES);
        let config =
            load(&[("JWT_SECRET", SECRET), ("SUPABASE_JWT_SECRET", &other)]).expect("valid");
        assert_eq!(config.jwt_secret.as_deref(), Some(SECRET));
    }

    /// Without a secret, start-up needs dev mode or Supabase mode.
    #[test]
    fn secret_required_unless_dev_or_supabase() {
        assert!(error_line(&[]).starts_with("JWT_SECRET:"));
        assert!(load(&[("LIVECREDITS_DEV_LOGIN", "1")]).is_ok());
        assert!(load(&[("SUPABASE_URL", "https://x.supabase.co")]).is_ok());
    }

    /// Each invalid value is refused with a line that starts with its variable's name.
    #[test]
    fn invalid_values_name_their_variable() {
        let cases = [
            ("DATABASE_URL", "nonsense://x"),
            ("DATABASE_URL", "sqlite://"),
            ("DATABASE_URL", "no-scheme"),
            ("LEPTOS_SITE_ADDR", "abc"),
            ("REDIS_URL", "http://x"),
            ("SUPABASE_URL", "x.supabase.co"),
            ("LIVECREDITS_DEV_LOGIN", "maybe"),
            ("CORS_ORIGINS", "https://a.example/path"),
            ("LIVECREDITS_MAX_LIVE_PER_USER", "0"),
            ("LIVECREDITS_MAX_CONNECTIONS", "lots"),
            ("LIVECREDITS_DEV_SESSION_TTL_S", "0"),
            ("LIVECREDITS_CHANNEL_LINGER_S", "31"),
            ("REDIS_URL", "redis+cluster://x"),
            ("LIVECREDITS_DEV_SESSION_TTL_S", "99999999999999999999"),
            ("LIVECREDITS_PUBLIC_URL", "https://app.example/path"),
            ("LIVECREDITS_PUBLIC_URL", "ftp://app.example"),
            ("SUPABASE_SERVICE_ROLE_KEY", "short-key"),
        ];
        for (var, value) in cases {
            let line = error_line(&[("JWT_SECRET", SECRET), (var, value)]);
            assert!(
                line.starts_with(&format!("{var}: ")),
                "{var}={value}: {line}"
            );
            assert!(!line.contains('\n'), "one line: {line}");
        }
    }

    /// Blank values count as unset.
    #[test]
    fn blank_is_unset() {
        let config = load(&[("JWT_SECRET", SECRET), ("REDIS_URL", "  ")]).expect("valid");
        assert_eq!(config.redis_url, None);
    }

    /// Secrets shorter than 32 bytes stop start-up, naming the variable that held them.
    #[test]
    fn short_secrets_are_refused() {
        let short = "change-me-please";
        assert!(error_line(&[("JWT_SECRET", short)]).starts_with("JWT_SECRET: too short"));
        assert!(
            error_line(&[("SUPABASE_JWT_SECRET", short)])
                .starts_with("SUPABASE_JWT_SECRET: too short")
        );
        assert!(
            error_line(&[("JWT_SECRET", SECRET), ("SUPABASE_SERVICE_ROLE_KEY", short)])
                .starts_with("SUPABASE_SERVICE_ROLE_KEY: too short")
        );
        assert!(load(&[("JWT_SECRET", &"x".repeat(MIN_SECRET_BYTES))]).is_ok());
    }

    /// Dev sign-in only listens on loopback addresses, IPv4 or IPv6.
    #[test]
    fn dev_login_needs_loopback() {
        for addr in ["0.0.0.0:3000", "[::]:3000", "192.0.2.1:3000"] {
            let line = error_line(&[("LIVECREDITS_DEV_LOGIN", "1"), ("LEPTOS_SITE_ADDR", addr)]);
            assert!(
                line.starts_with("LIVECREDITS_DEV_LOGIN: "),
                "{addr}: {line}"
            );
        }
        for addr in ["127.0.0.1:3000", "[::1]:3000"] {
            assert!(load(&[("LIVECREDITS_DEV_LOGIN", "1"), ("LEPTOS_SITE_ADDR", addr)]).is_ok());
        }
        assert!(load(&[("JWT_SECRET", SECRET), ("LEPTOS_SITE_ADDR", "0.0.0.0:3000")]).is_ok());
    }

    /// Without `LIVECREDITS_PUBLIC_URL`, browsers are assumed to use the listen address.
    #[test]
    fn public_url_defaults_to_listen_address() {
        let config = load(&[
            ("JWT_SECRET", SECRET),
            ("LEPTOS_SITE_ADDR", "127.0.0.1:4000"),
        ])
        .expect("valid");
        assert_eq!(config.public_url.origin(), "http://127.0.0.1:4000");
        assert!(!config.public_url.is_https());
    }

    /// Passwords in URLs never reach an error line or a log.
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:hunter2@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact("redis://:hunter2@cache:6379"),
            "redis://:***@cache:6379"
        );
        assert_eq!(redact("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redact("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(redact("u:hunter2@h/x"), "u:***@h/x");
        assert_eq!(redact("postgres:/u:hunter2@h"), "postgres:***@h");
        let line = error_line(&[
            ("JWT_SECRET", SECRET),
            ("DATABASE_URL", "mysql://u:hunter2@h/x"),
        ]);
        assert!(!line.contains("hunter2"), "{line}");
        let line = error_line(&[("JWT_SECRET", SECRET), ("REDIS_URL", "http://u:hunter2@h")]);
        assert!(!line.contains("hunter2"), "{line}");
    }
}
