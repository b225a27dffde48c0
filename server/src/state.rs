//! The state every handler shares: cheap to clone, one `Arc` or pool handle per part.

use std::{ops::Deref, sync::Arc, time::Duration};

use axum::extract::FromRef;
use leptos::config::LeptosOptions;
use tokio::sync::mpsc;

use crate::{
    Config,
    auth::Auth,
    bus::{Bus, RedisSettings},
    metrics::Metrics,
    net,
    realtime::{RealtimeConfig, hub::Hub},
    shutdown::Shutdown,
    store::Store,
};

/// Handed to axum's `with_state` and, through [`FromRef`], to the Leptos handlers. One `Arc`,
/// because axum clones the state for every extractor and layer of every request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The parts of [`AppState`].
pub struct Shared {
    pub config: Arc<Config>,
    pub leptos: LeptosOptions,
    pub store: Store,
    pub auth: Auth,
    pub hub: Hub,
    pub bus: Bus,
    pub metrics: Metrics,
    pub realtime: RealtimeConfig,
    /// Connections this instance accepts at once.
    pub max_connections: usize,
    /// The graceful stop, and the connection tasks it waits for.
    pub shutdown: Shutdown,
}

/// Committed changes that may wait for the bus before commits wait too.
const COMMITS_CAPACITY: usize = 4096;
/// Longest start-up waits for Redis before taking traffic degraded.
const REDIS_START_WAIT: Duration = Duration::from_secs(2);

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("DATABASE_URL: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("LIVECREDITS_DATA_DIR: cannot keep the dev secret: {0}")]
    DevSecret(#[from] std::io::Error),
    #[error("REDIS_URL: {0}")]
    Redis(#[from] fred::error::Error),
}

impl AppState {
    /// Opens the ledger (running migrations), sets up authentication and the live hub.
    ///
    /// # Errors
    /// When the database cannot be opened or the dev secret cannot be kept.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        if config.dev_login {
            tracing::warn!(
                "LIVECREDITS_DEV_LOGIN is on: anyone who can reach this instance may sign in as \
                 any user and change their credits; never turn it on in production"
            );
        }
        let auth = Auth::new(&config)?;
        let (commits, committed) = mpsc::channel(COMMITS_CAPACITY);
        let store = Store::connect(&config.database_url, commits).await?;
        let metrics = Metrics::default();
        let hub = Hub::new(config.realtime.limits, metrics.clone());
        let shutdown = Shutdown::default();
        let bus = match &config.redis_url {
            None => Bus::local(hub.clone(), metrics.clone()),
            Some(url) => {
                let settings = RedisSettings {
                    url,
                    password: config.redis_password.as_deref(),
                    channel_prefix: &config.channel_prefix,
                    linger: config.channel_linger,
                };
                Bus::redis(
                    &settings,
                    hub.clone(),
                    store.clone(),
                    metrics.clone(),
                    shutdown.token(),
                )?
            }
        };
        bus.publish_commits(committed);
        tokio::spawn(crate::store::sweeper::run(store.clone(), shutdown.token()));
        // Changes made before the link is up would reach the other instances only when
        // healed; a moment's wait makes the first ones as prompt as the rest.
        bus.wait_until_live(REDIS_START_WAIT).await;
        let max_connections = config
            .max_connections
            .unwrap_or_else(net::connection_capacity);
        Ok(Self(Arc::new(Shared {
            leptos: config.leptos.clone(),
            realtime: config.realtime,
            config: Arc::new(config),
            store,
            auth,
            hub,
            bus,
            metrics,
            max_connections,
            shutdown,
        })))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos.clone()
    }
}
