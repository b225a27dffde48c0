//! Starts one livecredits instance: configuration, logs, state, listener, then `server::run`.

use std::process::ExitCode;

use server::{AppState, Config, shutdown};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// jemalloc, because connections come and go by the thousand: glibc's malloc grew the heap
/// 60 % over a soak and never returned it, where jemalloc purges freed pages in the
/// background (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => return fail(format_args!("invalid configuration: {err}")),
    };
    let addr = config.site_addr;
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            return fail(format_args!(
                "LEPTOS_SITE_ADDR: cannot listen on {addr}: {err}"
            ));
        }
    };
    let state = match AppState::new(config).await {
        Ok(state) => state,
        Err(err) => return fail(format_args!("cannot start: {err}")),
    };
    let addr = listener.local_addr().unwrap_or(addr);
    let stop = shutdown::signal();
    tracing::info!("livecredits listening on http://{addr}");
    server::run(state, listener, stop).await;
    ExitCode::SUCCESS
}

/// Start-up failures are one line on stderr and a non-zero exit.
fn fail(message: std::fmt::Arguments<'_>) -> ExitCode {
    eprintln!("livecredits: {message}");
    ExitCode::FAILURE
}
