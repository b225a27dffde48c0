//! `credits hold`, `credits capture`, `credits release`: the hold API of SPEC §12 from the
//! command line.

use app::wire::{CaptureRequest, HoldRequest, HoldResponse, HoldStatus, paths};
use serde_json::json;

use super::{
    Failure,
    watch::{Output, send},
};

/// What to do with a hold.
pub enum Request<'a> {
    Place(&'a HoldRequest),
    Capture { id: &'a str, amount: Option<i64> },
    Release { id: &'a str },
}

pub async fn run(
    url: &str,
    service_token: &str,
    request: Request<'_>,
    out: Output,
) -> Result<(), Failure> {
    let client = reqwest::Client::new();
    let builder = match request {
        Request::Place(hold) => client.post(format!("{url}{}", paths::HOLDS)).json(hold),
        Request::Capture { id, amount } => client
            .post(format!("{url}{}", paths::with_id(paths::HOLD_CAPTURE, id)))
            .json(&CaptureRequest { amount }),
        Request::Release { id } => {
            client.post(format!("{url}{}", paths::with_id(paths::HOLD_RELEASE, id)))
        }
    }
    .bearer_auth(service_token);
    let response = send(url, builder).await?;
    let replayed = response.headers().contains_key("idempotent-replayed");
    let HoldResponse { hold, event } = response
        .json()
        .await
        .map_err(|err| Failure::other(format!("unexpected answer: {err}")))?;
    let what = match hold.status {
        HoldStatus::Held => format!("{} held until {}", hold.amount, hold.expires_at),
        HoldStatus::Captured => format!("{} captured of {}", hold.captured, hold.amount),
        status => format!("{} {}", hold.amount, status.as_str()),
    };
    let note = if replayed {
        " (replayed: nothing changed)"
    } else {
        ""
    };
    out.line(
        &format!(
            "hold {}: {what}; {} has {} available, {} held, balance {} (v{}){note}",
            hold.id, event.user_id, event.available, event.held, event.balance, event.version
        ),
        &json!({ "hold": hold, "event": event, "replayed": replayed }),
    );
    Ok(())
}
