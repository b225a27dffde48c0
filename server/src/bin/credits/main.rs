//! `credits`: the command line of livecredits — watch a user's balance over each transport,
//! apply changes, mint tokens, and benchmark running instances.
#![allow(clippy::print_stdout)] // printing results is this tool's job

mod bench;
mod holds;
mod watch;

use std::{process::ExitCode, time::Duration};

use app::wire::{ChangeRequest, HoldRequest, Metadata};
use clap::{Parser, Subcommand};
use server::auth::jwt::{Claims, Hs256, SERVICE_ROLE, USER_ROLE};

/// Exit code for refused credentials.
const EXIT_AUTH: u8 = 3;
/// Exit code for a server that cannot be reached.
const EXIT_UNREACHABLE: u8 = 4;

#[derive(Parser)]
#[command(
    name = "credits",
    version,
    about = "Watch, change and benchmark livecredits balances"
)]
struct Cli {
    /// Base URL of a livecredits instance.
    #[arg(
        long,
        global = true,
        env = "LIVECREDITS_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    url: String,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every balance update received over WebSocket.
    Ws {
        /// A user token; or --mint.
        #[arg(required_unless_present = "mint")]
        token: Option<String>,
        /// Mint tokens for this user with the secret, each refreshed in place before it
        /// expires, for as long as the command runs.
        #[arg(long, conflicts_with = "token")]
        mint: Option<String>,
        /// Lifetime of each minted token, e.g. 90s, 1h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        secret: Secret,
    },
    /// Print every balance update received over Server-Sent Events.
    Sse { token: String },
    /// Print every balance update found by long-polling.
    Poll {
        token: String,
        /// Seconds each long-poll may be held (0 polls at the suggested interval).
        #[arg(long, default_value_t = 25)]
        wait: u32,
    },
    /// Apply a change through the service API.
    Simulate {
        user_id: String,
        /// Credits to add (negative to spend).
        #[arg(allow_hyphen_values = true)]
        amount: i64,
        /// Change type, e.g. purchase, spend, refund, grant.
        kind: String,
        /// A JSON object stored with the change.
        #[arg(long)]
        metadata: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        service: ServiceAuth,
    },
    /// Reserve credits of a user until captured, released or expired (SPEC §12).
    Hold {
        user_id: String,
        amount: i64,
        /// How long the hold lasts, e.g. 90s, 15m (at most a day).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A JSON object stored with the hold and its capture.
        #[arg(long)]
        metadata: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        service: ServiceAuth,
    },
    /// Take the credits of a hold (all, or `amount`) and release the rest.
    Capture {
        hold_id: String,
        amount: Option<i64>,
        #[command(flatten)]
        service: ServiceAuth,
    },
    /// Release a hold: its credits are available again.
    Release {
        hold_id: String,
        #[command(flatten)]
        service: ServiceAuth,
    },
    /// Mint a token signed with the configured secret.
    Token {
        user_id: String,
        /// A service token (`role: service_role`, no user) instead of a user token.
        #[arg(long)]
        service: bool,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        secret: Secret,
    },
    /// Load and latency benchmarks against running instances (loopback only).
    #[command(subcommand)]
    Bench(bench::Bench),
}

/// The HS256 secret tokens are signed with.
#[derive(clap::Args, Clone)]
pub struct Secret {
    /// HS256 secret (the server's JWT_SECRET).
    #[arg(long = "secret", env = "JWT_SECRET", hide_env_values = true)]
    value: Option<String>,
}

impl Secret {
    /// The signer, or a one-line error when no secret is configured.
    pub fn signer(&self) -> Result<Hs256, Failure> {
        let secret = self
            .value
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Failure::usage("no secret: pass --secret or set JWT_SECRET"))?;
        Ok(Hs256::new(secret.as_bytes(), None))
    }

    /// A user token for `user_id`, valid for `ttl`.
    pub fn user_token(&self, user_id: &str, ttl: Duration) -> Result<String, Failure> {
        mint(&self.signer()?, Some(user_id), USER_ROLE, ttl)
    }
}

/// How the CLI authenticates as a service.
#[derive(clap::Args, Clone)]
pub struct ServiceAuth {
    /// Service credential (SUPABASE_SERVICE_ROLE_KEY or a service_role JWT); minted from
    /// the secret when absent.
    #[arg(long, env = "SUPABASE_SERVICE_ROLE_KEY", hide_env_values = true)]
    service_token: Option<String>,
    #[command(flatten)]
    secret: Secret,
}

impl ServiceAuth {
    pub fn token(&self) -> Result<String, Failure> {
        match self.service_token.as_deref().filter(|s| !s.is_empty()) {
            Some(token) => Ok(token.to_owned()),
            None => mint(
                &self.secret.signer()?,
                None,
                SERVICE_ROLE,
                Duration::from_secs(3600),
            ),
        }
    }
}

/// `--metadata`, which must be a JSON object.
fn parse_metadata(text: Option<String>) -> Result<Option<Metadata>, Failure> {
    text.map(|text| serde_json::from_str::<Metadata>(&text))
        .transpose()
        .map_err(|err| Failure::usage(format!("--metadata must be a JSON object: {err}")))
}

fn mint(
    signer: &Hs256,
    user_id: Option<&str>,
    role: &str,
    ttl: Duration,
) -> Result<String, Failure> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(ttl.as_secs()).map_err(|_| Failure::usage("--ttl is too long"))?;
    let claims = Claims {
        sub: user_id.map(str::to_owned),
        exp: now.saturating_add(ttl),
        iat: Some(now),
        role: Some(role.to_owned()),
        aud: None,
    };
    signer
        .mint(&claims)
        .map_err(|err| Failure::other(err.to_string()))
}

/// Why a command failed: one line for the user and the process exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }

    pub fn auth(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_AUTH,
        }
    }

    pub fn unreachable(url: &str, err: impl std::fmt::Display) -> Self {
        Self {
            message: format!("cannot reach {url}: {err}"),
            code: EXIT_UNREACHABLE,
        }
    }

    pub fn other(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // One line, not clap's usage block.
            let rendered = err.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("credits: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("credits: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let url = cli.url.trim_end_matches('/').to_owned();
    let out = watch::Output { json: cli.json };
    match cli.command {
        Command::Ws {
            token: Some(token), ..
        } => watch::websocket(&url, &token, None, out).await,
        Command::Ws {
            mint, ttl, secret, ..
        } => {
            let user_id = mint.ok_or_else(|| Failure::usage("pass a token or --mint <user>"))?;
            let refresh = || secret.user_token(&user_id, ttl);
            watch::websocket(&url, &refresh()?, Some(&refresh), out).await
        }
        Command::Sse { token } => watch::sse(&url, &token, out).await,
        Command::Poll { token, wait } => watch::poll(&url, &token, wait, out).await,
        Command::Simulate {
            user_id,
            amount,
            kind,
            metadata,
            idempotency_key,
            service,
        } => {
            let request = ChangeRequest {
                user_id,
                amount,
                kind,
                metadata: parse_metadata(metadata)?,
                idempotency_key,
            };
            watch::simulate(&url, &service.token()?, &request, out).await
        }
        Command::Hold {
            user_id,
            amount,
            ttl,
            metadata,
            idempotency_key,
            service,
        } => {
            let request = HoldRequest {
                user_id,
                amount,
                ttl_s: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
                metadata: parse_metadata(metadata)?,
                idempotency_key,
            };
            let request = holds::Request::Place(&request);
            holds::run(&url, &service.token()?, request, out).await
        }
        Command::Capture {
            hold_id,
            amount,
            service,
        } => {
            let request = holds::Request::Capture {
                id: &hold_id,
                amount,
            };
            holds::run(&url, &service.token()?, request, out).await
        }
        Command::Release { hold_id, service } => {
            let request = holds::Request::Release { id: &hold_id };
            holds::run(&url, &service.token()?, request, out).await
        }
        Command::Token {
            user_id,
            service,
            ttl,
            secret,
        } => {
            let token = if service {
                mint(&secret.signer()?, None, SERVICE_ROLE, ttl)?
            } else {
                mint(&secret.signer()?, Some(&user_id), USER_ROLE, ttl)?
            };
            out.line(&token, &serde_json::json!({ "token": token }));
            Ok(())
        }
        Command::Bench(bench) => bench.run(&url, out).await,
    }
}
