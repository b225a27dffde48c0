//! A requested change and the rules it must pass before and inside the database transaction:
//! field validation, the balance arithmetic, and idempotent replay.

use app::wire::{
    BalanceEvent, BalanceTag, Change, ChangeRequest, MAX_CREDITS, Metadata, Transaction,
};

use super::StoreError;

/// Longest accepted `user_id`.
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest accepted idempotency key (SPEC §3).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Largest accepted metadata, as compact JSON (SPEC §3).
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest accepted change type: `[a-z][a-z0-9_]{0,31}`.
pub const MAX_TYPE_LEN: usize = 32;

/// A change as requested, before it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChange {
    pub user_id: String,
    pub amount: i64,
    pub kind: String,
    pub metadata: Metadata,
    pub idempotency_key: Option<String>,
}

impl From<ChangeRequest> for NewChange {
    fn from(request: ChangeRequest) -> Self {
        Self {
            user_id: request.user_id,
            amount: request.amount,
            kind: request.kind,
            metadata: request.metadata.unwrap_or_default(),
            idempotency_key: request.idempotency_key,
        }
    }
}

impl NewChange {
    /// Checks every field against SPEC §3 before any database work, and returns the metadata
    /// as the JSON text that is stored (encoded once, for the size check and the row).
    ///
    /// # Errors
    /// `Invalid` naming the field, or `OutOfRange` for an amount beyond ±(2^53 − 1).
    pub fn validate(&self) -> Result<String, StoreError> {
        validate_user_id(&self.user_id)?;
        if self.amount == 0 {
            return Err(StoreError::invalid("amount", "must not be zero"));
        }
        if self.amount.unsigned_abs() > MAX_CREDITS.unsigned_abs() {
            return Err(StoreError::OutOfRange {
                field: "amount",
                value: requested_amount(self.amount),
            });
        }
        if !is_valid_type(&self.kind) {
            return Err(StoreError::invalid(
                "type",
                "must match [a-z][a-z0-9_]{0,31}, e.g. purchase",
            ));
        }
        if let Some(key) = &self.idempotency_key {
            validate_key(key)?;
        }
        validate_metadata(&self.metadata)
    }

    /// The balance after this change, refusing a spend beyond what is available (the
    /// balance less the `held` credits, SPEC §12) or an out-of-range result.
    ///
    /// # Errors
    /// `InsufficientCredits` or `OutOfRange`.
    pub fn next_balance(&self, balance: i64, held: i64) -> Result<i64, StoreError> {
        let next = balance
            .checked_add(self.amount)
            .filter(|next| *next <= MAX_CREDITS)
            .ok_or_else(|| StoreError::OutOfRange {
                field: "balance",
                value: format!("{balance} + {}", self.amount),
            })?;
        if self.amount < 0 && next < held {
            return Err(StoreError::InsufficientCredits {
                available: balance - held,
                needed: -self.amount,
            });
        }
        Ok(next)
    }

    /// The original result when this change repeats an earlier one with the same key.
    ///
    /// # Errors
    /// `IdempotencyConflict` when the earlier change had another amount, type or metadata.
    pub fn replay(&self, prior: Transaction, held: i64) -> Result<BalanceEvent, StoreError> {
        if prior.amount != self.amount || prior.kind != self.kind || prior.metadata != self.metadata
        {
            return Err(StoreError::IdempotencyConflict);
        }
        Ok(event(&self.user_id, prior, held))
    }
}

/// Checks an idempotency key (SPEC §3).
///
/// # Errors
/// `Invalid` for an empty, over-long or control-character key.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.chars().count() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(StoreError::invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    // Keys end up in logs and operators' terminals; NUL and newlines have no place there.
    if key.chars().any(|c| c.is_ascii_control()) {
        return Err(StoreError::invalid(
            "idempotency_key",
            "must not contain control characters (U+0000–U+001F, U+007F)",
        ));
    }
    Ok(())
}

/// Encodes metadata as stored, once for the size check and the row (SPEC §3).
///
/// # Errors
/// `Invalid` for metadata larger than [`MAX_METADATA_BYTES`] as compact JSON.
pub fn validate_metadata(metadata: &Metadata) -> Result<String, StoreError> {
    let text = serde_json::to_string(metadata)
        .map_err(|err| StoreError::invalid("metadata", err.to_string()))?;
    if text.len() > MAX_METADATA_BYTES {
        return Err(StoreError::invalid(
            "metadata",
            format!(
                "is {} bytes of JSON, more than {MAX_METADATA_BYTES}",
                text.len()
            ),
        ));
    }
    Ok(text)
}

/// Checks a user id taken from a request or token.
///
/// # Errors
/// `Invalid` for an empty, over-long or control-character id.
pub fn validate_user_id(user_id: &str) -> Result<(), StoreError> {
    if user_id.is_empty()
        || user_id.len() > MAX_USER_ID_LEN
        || user_id.chars().any(char::is_control)
    {
        return Err(StoreError::invalid(
            "user_id",
            format!("must be 1 to {MAX_USER_ID_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

fn is_valid_type(kind: &str) -> bool {
    let mut bytes = kind.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && kind.len() <= MAX_TYPE_LEN
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// The balance event a committed ledger row stands for, with the `held` credits of its
/// account then; a replay rebuilds the same event.
pub fn event(user_id: &str, row: Transaction, held: i64) -> BalanceEvent {
    BalanceEvent {
        tag: BalanceTag::Balance,
        user_id: user_id.to_owned(),
        balance: row.balance_after,
        held,
        available: row.balance_after - held,
        version: row.version,
        updated_at: Some(row.created_at),
        change: Some(Change {
            id: row.id,
            amount: row.amount,
            kind: row.kind,
            metadata: row.metadata,
            created_at: row.created_at,
        }),
        hold: None,
    }
}

/// An out-of-range amount as the client is told it. Amounts past `i64` arrive saturated
/// (see `app::wire`), so the two extremes stand for "this far or farther".
fn requested_amount(amount: i64) -> String {
    match amount {
        i64::MAX => format!("at least {amount}"),
        i64::MIN => format!("at most {amount}"),
        _ => amount.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(amount: i64) -> NewChange {
        NewChange {
            user_id: "u1".into(),
            amount,
            kind: "purchase".into(),
            metadata: Metadata::new(),
            idempotency_key: None,
        }
    }

    fn field_of(err: StoreError) -> &'static str {
        match err {
            StoreError::Invalid { field, .. } | StoreError::OutOfRange { field, .. } => field,
            other => panic!("not a field error: {other:?}"),
        }
    }

    /// Change types follow `[a-z][a-z0-9_]{0,31}`.
    #[test]
    fn type_pattern() {
        for good in ["purchase", "a", "top_up_2", &format!("a{}", "b".repeat(31))] {
            assert!(is_valid_type(good), "{good}");
        }
        for bad in [
            "",
            "Purchase",
            "1st",
            "_x",
            "spend-x",
            "spénd",
            &"a".repeat(33),
        ] {
            assert!(!is_valid_type(bad), "{bad}");
        }
    }

    /// Each invalid field is refused and named.
    #[test]
    fn invalid_fields_are_named() {
        let mut c = change(0);
        assert_eq!(field_of(c.validate().unwrap_err()), "amount");
        c = change(MAX_CREDITS + 1);
        assert!(matches!(c.validate(), Err(StoreError::OutOfRange { .. })));
        c = change(-MAX_CREDITS - 1);
        assert!(matches!(c.validate(), Err(StoreError::OutOfRange { .. })));
        c = change(i64::MAX);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("at least 9223372036854775807"), "{err}");
        c = change(1);
        c.kind = "Bad".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "type");
        c = change(1);
        c.user_id = String::new();
        assert_eq!(field_of(c.validate().unwrap_err()), "user_id");
        c = change(1);
        c.idempotency_key = Some("k".repeat(129));
        assert_eq!(field_of(c.validate().unwrap_err()), "idempotency_key");
        for key in ["a\0b", "line\n", "tab\t", "del\u{7f}", "\u{1f}"] {
            c = change(1);
            c.idempotency_key = Some(key.into());
            assert_eq!(
                field_of(c.validate().unwrap_err()),
                "idempotency_key",
                "{key:?}"
            );
        }
        c = change(1);
        c.idempotency_key = Some("order-42 é ✓".into());
        assert!(c.validate().is_ok());
        c = change(1);
        c.metadata
            .insert("blob".into(), json!("x".repeat(MAX_METADATA_BYTES)));
        assert_eq!(field_of(c.validate().unwrap_err()), "metadata");
        assert!(change(MAX_CREDITS).validate().is_ok());
        assert!(change(-MAX_CREDITS).validate().is_ok());
    }

    /// Balances never go negative nor beyond 2^53 − 1.
    #[test]
    fn balance_arithmetic() {
        assert_eq!(change(5).next_balance(10, 0).unwrap(), 15);
        assert_eq!(change(-10).next_balance(10, 0).unwrap(), 0);
        assert!(matches!(
            change(-11).next_balance(10, 0),
            Err(StoreError::InsufficientCredits {
                available: 10,
                needed: 11
            })
        ));
        assert!(matches!(
            change(1).next_balance(MAX_CREDITS, 0),
            Err(StoreError::OutOfRange { .. })
        ));
        assert_eq!(change(MAX_CREDITS).next_balance(0, 0).unwrap(), MAX_CREDITS);
        // Held credits cannot be spent, and a grant is never refused for them.
        assert_eq!(change(-6).next_balance(10, 4).unwrap(), 4);
        assert!(matches!(
            change(-7).next_balance(10, 4),
            Err(StoreError::InsufficientCredits {
                available: 6,
                needed: 7
            })
        ));
        assert_eq!(change(3).next_balance(10, 10).unwrap(), 13);
    }

    /// A replay returns the original event; another body under the same key conflicts.
    #[test]
    fn replay_and_conflict() {
        let prior = Transaction {
            id: "t1".into(),
            amount: 5,
            kind: "purchase".into(),
            metadata: Metadata::new(),
            balance_after: 5,
            version: 1,
            created_at: "2026-11-28T10:00:00Z".parse().unwrap(),
        };
        let event = change(5).replay(prior.clone(), 0).unwrap();
        assert_eq!(event.balance, 5);
        assert_eq!(event.change.unwrap().id, "t1");
        assert!(matches!(
            change(6).replay(prior.clone(), 0),
            Err(StoreError::IdempotencyConflict)
        ));
        let mut other_meta = change(5);
        other_meta.metadata.insert("x".into(), json!(1));
        assert!(matches!(
            other_meta.replay(prior, 0),
            Err(StoreError::IdempotencyConflict)
        ));
    }
}
