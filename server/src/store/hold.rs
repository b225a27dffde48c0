//! Holds (SPEC §12): a request to reserve credits, and the rules of a hold's life —
//! placed, then captured, released or expired — written once for both backends. `ledger`
//! applies them under the account lock, beside changes.

use app::wire::{
    BalanceEvent, BalanceTag, Change, DEFAULT_HOLD_TTL_S, Hold, HoldRequest, HoldStatus,
    MAX_CREDITS, MAX_HOLD_TTL_S, Metadata,
};
use chrono::{DateTime, TimeDelta, Utc};

use super::{
    StoreError,
    change::{validate_key, validate_metadata, validate_user_id},
    lane,
};

/// The ledger type of the row a capture writes.
pub const CAPTURE_TYPE: &str = "capture";

/// A hold as requested, before it is placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewHold {
    pub user_id: String,
    pub amount: i64,
    pub ttl_s: i64,
    pub metadata: Metadata,
    pub idempotency_key: Option<String>,
}

impl From<HoldRequest> for NewHold {
    fn from(request: HoldRequest) -> Self {
        Self {
            user_id: request.user_id,
            amount: request.amount,
            ttl_s: request.ttl_s.unwrap_or(DEFAULT_HOLD_TTL_S),
            metadata: request.metadata.unwrap_or_default(),
            idempotency_key: request.idempotency_key,
        }
    }
}

impl NewHold {
    /// Checks every field before any database work; returns the metadata as stored.
    ///
    /// # Errors
    /// `Invalid` naming the field, or `OutOfRange` for an amount beyond 2^53 − 1.
    pub fn validate(&self) -> Result<String, StoreError> {
        validate_user_id(&self.user_id)?;
        validate_amount(self.amount)?;
        if !(1..=MAX_HOLD_TTL_S).contains(&self.ttl_s) {
            return Err(StoreError::invalid(
                "ttl_s",
                format!("must be 1 to {MAX_HOLD_TTL_S} seconds"),
            ));
        }
        if let Some(key) = &self.idempotency_key {
            validate_key(key)?;
        }
        validate_metadata(&self.metadata)
    }

    /// The hold this request placed earlier under the same key, if it asked for the same.
    ///
    /// # Errors
    /// `IdempotencyConflict` when the earlier hold had another amount, lifetime or metadata.
    pub(super) fn replay(&self, prior: &HoldRecord) -> Result<BalanceEvent, StoreError> {
        let hold = &prior.hold;
        let ttl = (hold.expires_at - hold.created_at).num_seconds();
        if hold.amount != self.amount || ttl != self.ttl_s || hold.metadata != self.metadata {
            return Err(StoreError::IdempotencyConflict);
        }
        Ok(prior.placed_event())
    }
}

/// A hold's amount, or a capture's: 1 to 2^53 − 1.
///
/// # Errors
/// `Invalid` below 1, `OutOfRange` above.
pub fn validate_amount(amount: i64) -> Result<(), StoreError> {
    if amount < 1 {
        return Err(StoreError::invalid("amount", "must be at least 1"));
    }
    if amount > MAX_CREDITS {
        return Err(StoreError::OutOfRange {
            field: "amount",
            value: amount.to_string(),
        });
    }
    Ok(())
}

/// What is asked of a hold after it was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Take this much (all by default) and release the rest.
    Capture(Option<i64>),
    Release,
    /// Asked by the sweeper once `expires_at` has passed.
    Expire,
}

/// The account after one operation: kept on the hold so a retry answers the same event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mark {
    pub version: i64,
    pub balance: i64,
    pub held: i64,
    pub at: DateTime<Utc>,
}

/// A hold with what its placing and its closing left.
#[derive(Clone, Debug)]
pub(super) struct HoldRecord {
    pub hold: Hold,
    pub key: Option<String>,
    /// The stored metadata text.
    pub metadata: String,
    pub placed: Mark,
    pub closed: Option<Mark>,
    /// The ledger row of a capture.
    pub capture_id: Option<String>,
}

/// How a settle request ends.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The hold was already settled this way: answer as then.
    Replay,
    Close {
        status: HoldStatus,
        captured: i64,
    },
}

impl HoldRecord {
    /// A hold placed now by `request`, leaving the account at `placed`.
    pub fn place(request: &NewHold, metadata: String, placed: Mark) -> Self {
        Self {
            hold: Hold {
                id: lane::hold_id(&request.user_id),
                user_id: request.user_id.clone(),
                amount: request.amount,
                captured: 0,
                status: HoldStatus::Held,
                metadata: request.metadata.clone(),
                created_at: placed.at,
                expires_at: placed.at + TimeDelta::seconds(request.ttl_s),
            },
            key: request.idempotency_key.clone(),
            metadata,
            placed,
            closed: None,
            capture_id: None,
        }
    }

    /// What `settle` does to this hold at `now`, without doing it.
    ///
    /// # Errors
    /// `HoldClosed` for a hold no longer held (or past its expiry), `Invalid` for a capture
    /// amount beyond the hold's.
    pub fn settle(&self, settle: Settle, now: DateTime<Utc>) -> Result<Outcome, StoreError> {
        let hold = &self.hold;
        let closed = |status| StoreError::HoldClosed {
            id: hold.id.clone(),
            status,
        };
        let due = now >= hold.expires_at;
        match (hold.status, settle) {
            (HoldStatus::Held, Settle::Expire) if due => Ok(Outcome::Close {
                status: HoldStatus::Expired,
                captured: 0,
            }),
            (HoldStatus::Held, Settle::Expire) => Err(closed(HoldStatus::Held)),
            (HoldStatus::Held, _) if due => Err(closed(HoldStatus::Expired)),
            (HoldStatus::Held, Settle::Capture(amount)) => {
                let captured = amount.unwrap_or(hold.amount);
                if !(1..=hold.amount).contains(&captured) {
                    return Err(StoreError::invalid(
                        "amount",
                        format!("must be 1 to the hold's {}", hold.amount),
                    ));
                }
                Ok(Outcome::Close {
                    status: HoldStatus::Captured,
                    captured,
                })
            }
            (HoldStatus::Held, Settle::Release) => Ok(Outcome::Close {
                status: HoldStatus::Released,
                captured: 0,
            }),
            (HoldStatus::Captured, Settle::Capture(amount))
                if amount.is_none_or(|amount| amount == hold.captured) =>
            {
                Ok(Outcome::Replay)
            }
            (HoldStatus::Released, Settle::Release) => Ok(Outcome::Replay),
            (status, _) => Err(closed(status)),
        }
    }

    /// Closes the hold as `settle` decided, leaving the account at `closed`.
    pub fn close(&mut self, status: HoldStatus, captured: i64, closed: Mark) {
        self.hold.status = status;
        self.hold.captured = captured;
        self.closed = Some(closed);
        if captured > 0 {
            self.capture_id = Some(uuid::Uuid::now_v7().to_string());
        }
    }

    /// The event of placing the hold, with the hold as it was then.
    pub fn placed_event(&self) -> BalanceEvent {
        let hold = Hold {
            status: HoldStatus::Held,
            captured: 0,
            ..self.hold.clone()
        };
        self.event(self.placed, None, hold)
    }

    /// The event of closing the hold.
    ///
    /// # Errors
    /// `Corrupt` for a hold that was never closed.
    pub fn closed_event(&self) -> Result<BalanceEvent, StoreError> {
        let closed = self
            .closed
            .ok_or_else(|| StoreError::Corrupt(format!("hold {} has no closing", self.hold.id)))?;
        Ok(self.event(closed, self.capture_change(), self.hold.clone()))
    }

    /// The ledger row of a capture: the hold's metadata plus `hold_id`.
    pub fn capture_change(&self) -> Option<Change> {
        let (id, closed) = (self.capture_id.clone()?, self.closed?);
        let mut metadata = self.hold.metadata.clone();
        metadata.insert("hold_id".to_owned(), self.hold.id.clone().into());
        Some(Change {
            id,
            amount: -self.hold.captured,
            kind: CAPTURE_TYPE.to_owned(),
            metadata,
            created_at: closed.at,
        })
    }

    fn event(&self, mark: Mark, change: Option<Change>, hold: Hold) -> BalanceEvent {
        BalanceEvent {
            tag: BalanceTag::Balance,
            user_id: self.hold.user_id.clone(),
            balance: mark.balance,
            held: mark.held,
            available: mark.balance - mark.held,
            version: mark.version,
            updated_at: Some(mark.at),
            change,
            hold: Some(Box::new(hold)),
        }
    }
}

/// A hold row as both backends read it.
#[derive(sqlx::FromRow)]
pub(super) struct HoldRow {
    id: String,
    user_id: String,
    amount: i64,
    captured: i64,
    status: String,
    metadata: String,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    version: i64,
    balance: i64,
    held: i64,
    closed_at: Option<DateTime<Utc>>,
    closed_version: Option<i64>,
    closed_balance: Option<i64>,
    closed_held: Option<i64>,
    capture_id: Option<String>,
}

impl HoldRow {
    pub fn into_record(self) -> Result<HoldRecord, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} of hold {}", self.id));
        let status = match self.status.as_str() {
            "held" => HoldStatus::Held,
            "captured" => HoldStatus::Captured,
            "released" => HoldStatus::Released,
            "expired" => HoldStatus::Expired,
            _ => return Err(corrupt("status")),
        };
        let metadata: Metadata =
            serde_json::from_str(&self.metadata).map_err(|_| corrupt("metadata"))?;
        let closed = match (
            self.closed_at,
            self.closed_version,
            self.closed_balance,
            self.closed_held,
        ) {
            (Some(at), Some(version), Some(balance), Some(held)) => Some(Mark {
                version,
                balance,
                held,
                at,
            }),
            (None, None, None, None) => None,
            _ => return Err(corrupt("closing")),
        };
        Ok(HoldRecord {
            hold: Hold {
                id: self.id,
                user_id: self.user_id,
                amount: self.amount,
                captured: self.captured,
                status,
                metadata,
                created_at: self.created_at,
                expires_at: self.expires_at,
            },
            key: self.idempotency_key,
            metadata: self.metadata,
            placed: Mark {
                version: self.version,
                balance: self.balance,
                held: self.held,
                at: self.created_at,
            },
            closed,
            capture_id: self.capture_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(amount: i64) -> HoldRecord {
        let at = "2026-12-02T10:00:00Z".parse().unwrap();
        let request = NewHold {
            user_id: "u1".into(),
            amount,
            ttl_s: 60,
            metadata: Metadata::new(),
            idempotency_key: None,
        };
        let placed = Mark {
            version: 2,
            balance: 100,
            held: amount,
            at,
        };
        HoldRecord::place(&request, "{}".into(), placed)
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        "2026-12-02T10:00:00Z".parse::<DateTime<Utc>>().unwrap() + TimeDelta::seconds(seconds)
    }

    /// Every request against every state, as SPEC §12 lists them.
    #[test]
    fn settle_rules() {
        let open = record(30);
        let close = |status, captured| Some(Outcome::Close { status, captured });
        assert_eq!(
            open.settle(Settle::Capture(None), at(1)).ok(),
            close(HoldStatus::Captured, 30)
        );
        assert_eq!(
            open.settle(Settle::Capture(Some(12)), at(1)).ok(),
            close(HoldStatus::Captured, 12)
        );
        for bad in [0, 31, -1] {
            assert!(matches!(
                open.settle(Settle::Capture(Some(bad)), at(1)),
                Err(StoreError::Invalid {
                    field: "amount",
                    ..
                })
            ));
        }
        assert_eq!(
            open.settle(Settle::Release, at(1)).ok(),
            close(HoldStatus::Released, 0)
        );
        assert!(matches!(
            open.settle(Settle::Expire, at(59)),
            Err(StoreError::HoldClosed {
                status: HoldStatus::Held,
                ..
            })
        ));
        assert_eq!(
            open.settle(Settle::Expire, at(60)).ok(),
            close(HoldStatus::Expired, 0)
        );
        // Past its expiry a hold can no longer be captured or released, swept or not.
        for settle in [Settle::Capture(None), Settle::Release] {
            assert!(matches!(
                open.settle(settle, at(60)),
                Err(StoreError::HoldClosed {
                    status: HoldStatus::Expired,
                    ..
                })
            ));
        }

        let mut captured = record(30);
        captured.close(HoldStatus::Captured, 12, captured.placed);
        assert_eq!(
            captured.settle(Settle::Capture(None), at(1)).ok(),
            Some(Outcome::Replay)
        );
        assert_eq!(
            captured.settle(Settle::Capture(Some(12)), at(1)).ok(),
            Some(Outcome::Replay)
        );
        for settle in [Settle::Capture(Some(13)), Settle::Release, Settle::Expire] {
            assert!(matches!(
                captured.settle(settle, at(1)),
                Err(StoreError::HoldClosed {
                    status: HoldStatus::Captured,
                    ..
                })
            ));
        }
        let mut released = record(30);
        released.close(HoldStatus::Released, 0, released.placed);
        assert_eq!(
            released.settle(Settle::Release, at(1)).ok(),
            Some(Outcome::Replay)
        );
        assert!(matches!(
            released.settle(Settle::Capture(None), at(1)),
            Err(StoreError::HoldClosed {
                status: HoldStatus::Released,
                ..
            })
        ));
    }

    /// A capture's ledger row takes the captured amount and names its hold; a release
    /// writes no row.
    #[test]
    fn capture_row() {
        let mut hold = record(30);
        let closed = Mark {
            version: 3,
            balance: 88,
            held: 0,
            at: at(5),
        };
        hold.close(HoldStatus::Captured, 12, closed);
        let event = hold.closed_event().unwrap();
        let change = event.change.unwrap();
        assert_eq!((change.amount, change.kind.as_str()), (-12, CAPTURE_TYPE));
        assert_eq!(change.metadata["hold_id"], hold.hold.id.as_str());
        assert_eq!((event.balance, event.available, event.version), (88, 88, 3));

        let mut released = record(30);
        released.close(HoldStatus::Released, 0, closed);
        assert_eq!(released.closed_event().unwrap().change, None);
        assert_eq!(
            released.placed_event().hold.unwrap().status,
            HoldStatus::Held
        );
    }

    #[test]
    fn request_validation() {
        let good = NewHold {
            user_id: "u1".into(),
            amount: 5,
            ttl_s: DEFAULT_HOLD_TTL_S,
            metadata: Metadata::new(),
            idempotency_key: None,
        };
        assert!(good.validate().is_ok());
        let field = |hold: NewHold| match hold.validate() {
            Err(StoreError::Invalid { field, .. } | StoreError::OutOfRange { field, .. }) => field,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(
            field(NewHold {
                amount: 0,
                ..good.clone()
            }),
            "amount"
        );
        assert_eq!(
            field(NewHold {
                amount: MAX_CREDITS + 1,
                ..good.clone()
            }),
            "amount"
        );
        assert_eq!(
            field(NewHold {
                ttl_s: 0,
                ..good.clone()
            }),
            "ttl_s"
        );
        assert_eq!(
            field(NewHold {
                ttl_s: MAX_HOLD_TTL_S + 1,
                ..good.clone()
            }),
            "ttl_s"
        );
        let key = Some("a\nb".to_owned());
        assert_eq!(
            field(NewHold {
                idempotency_key: key,
                ..good
            }),
            "idempotency_key"
        );
    }
}
