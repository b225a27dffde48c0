//! Expires holds past their `expires_at` (SPEC §12: within 5 s, exactly once whichever
//! instance does it). Every instance sweeps; the expiry itself runs under the account lock
//! and checks the hold is still held, so racing sweepers expire each hold once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;

/// How often due holds are looked for: well inside the 5 s SPEC §12 allows.
const EVERY: Duration = Duration::from_secs(1);
/// Holds expired per round; a full round is followed by another at once.
const ROUND: u32 = 512;

/// Sweeps until `stop` is cancelled.
pub async fn run(store: Store, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            match store.expire_due(ROUND).await {
                Ok(expired) if expired == ROUND as usize => continue,
                Ok(_) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot sweep expired holds; retrying");
                    break;
                }
            }
        }
    }
}
