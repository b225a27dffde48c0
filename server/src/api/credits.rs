//! A user's own balance and ledger.

use app::wire::{BalanceSnapshot, TransactionPage, paths};
use axum::{Json, Router, extract::State, routing::get};
use serde::Deserialize;

use crate::{
    AppState,
    auth::AuthUser,
    error::{ApiError, AppQuery},
    store::DEFAULT_PAGE_LIMIT,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::BALANCE, get(balance))
        .route(paths::TRANSACTIONS, get(transactions))
}

async fn balance(
    State(state): State<AppState>,
    caller: AuthUser,
) -> Result<Json<BalanceSnapshot>, ApiError> {
    Ok(Json(state.store.snapshot(&caller.user.user_id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<u32>,
    before: Option<u64>,
    /// Accepted so browsers can authenticate by query string; read by `AuthUser`.
    #[serde(rename = "token")]
    _token: Option<String>,
}

async fn transactions(
    State(state): State<AppState>,
    caller: AuthUser,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<TransactionPage>, ApiError> {
    let before = query
        .before
        .map(|before| i64::try_from(before).map_err(|_| ApiError::invalid("before", "too large")))
        .transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    let page = state
        .store
        .transactions(&caller.user.user_id, limit, before)
        .await?;
    Ok(Json(page))
}
