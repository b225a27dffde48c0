//! How credits read on screen.

/// `1234567` → `"1,234,567"`; negative numbers keep their sign.
pub fn thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if value < 0 {
        grouped.push('-');
    }
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// A change as `+1,000` or `−250` (with a real minus sign).
pub fn signed(amount: i64) -> String {
    if amount < 0 {
        format!("\u{2212}{}", thousands(amount.saturating_abs()))
    } else {
        format!("+{}", thousands(amount))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digits are grouped by three from the right, at every size.
    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(-1_234), "-1,234");
        assert_eq!(thousands(9_007_199_254_740_991), "9,007,199,254,740,991");
    }

    /// Changes carry an explicit sign.
    #[test]
    fn signs_changes() {
        assert_eq!(signed(5), "+5");
        assert_eq!(signed(-1_500), "\u{2212}1,500");
    }
}
