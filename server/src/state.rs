//! The state every handler shares: cheap to clone, one `Arc` or pool handle per part.

use std::sync::Arc;

use axum::extract::FromRef;
use leptos::config::LeptosOptions;

use crate::{Config, auth::Auth, store::Store};

/// Handed to axum's `with_state` and, through [`FromRef`], to the Leptos handlers.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub leptos: LeptosOptions,
    pub store: Store,
    pub auth: Auth,
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("DATABASE_URL: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("LIVECREDITS_DATA_DIR: cannot keep the dev secret: {0}")]
    DevSecret(#[from] std::io::Error),
}

impl AppState {
    /// Opens the ledger (running migrations) and sets up authentication.
    ///
    /// # Errors
    /// When the database cannot be opened or the dev secret cannot be kept.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        let auth = Auth::new(&config)?;
        let store = Store::connect(&config.database_url).await?;
        Ok(Self {
            leptos: config.leptos.clone(),
            config: Arc::new(config),
            store,
            auth,
        })
    }
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos.clone()
    }
}
