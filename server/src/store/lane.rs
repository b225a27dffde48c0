//! Which writer queue an operation takes (see `committer`): each user's operations always the
//! same one. A capture or release names only its hold, so a hold's id carries its owner's
//! lane key: the writer then needs no look-up of the owner before queueing it, and reads the
//! owner in the same statement that locks the accounts.

use uuid::Uuid;

/// A user's lane key: FNV-1a, folded to 16 bits. Stable across builds and instances, unlike
/// `std`'s hasher, because an id minted on one instance is routed by another.
pub(super) fn of_user(user_id: &str) -> u16 {
    let hash = user_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    (hash ^ (hash >> 16)) as u16
}

/// The lane key a hold id carries, or for an id without one (not minted by [`hold_id`]), a
/// hash of the id: any lane is correct, since the accounts are locked in the database.
pub(super) fn of_hold(hold_id: &str) -> u16 {
    match Uuid::try_parse(hold_id) {
        Ok(id) if id.get_version_num() == 8 => {
            let bytes = id.as_bytes();
            u16::from_be_bytes([bytes[14], bytes[15]])
        }
        _ => of_user(hold_id),
    }
}

/// A new hold id for `user_id`: a UUIDv7's time-ordered layout (so ids stay index-friendly)
/// with the owner's lane key in its last two bytes, marked version 8 (custom) for that.
pub(super) fn hold_id(user_id: &str) -> String {
    let mut bytes = Uuid::now_v7().into_bytes();
    bytes[14..].copy_from_slice(&of_user(user_id).to_be_bytes());
    Uuid::new_v8(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_takes_its_owners_lane() {
        for user in ["alice", "bob", "user-1234", ""] {
            let id = hold_id(user);
            assert_eq!(of_hold(&id), of_user(user), "{user}: {id}");
            assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 8);
        }
    }

    #[test]
    fn hold_ids_are_unique_and_time_ordered() {
        let ids: Vec<String> = (0..1000).map(|_| hold_id("alice")).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        // The leading 48 bits are the creation time in ms: never decreasing.
        assert!(ids.windows(2).all(|w| w[0][..13] <= w[1][..13]));
    }

    #[test]
    fn users_spread_over_lanes() {
        let lanes: std::collections::HashSet<u16> = (0..1000)
            .map(|u| of_user(&format!("user-{u}")) % 8)
            .collect();
        assert_eq!(lanes.len(), 8);
    }

    #[test]
    fn ids_without_a_key_still_get_a_lane() {
        let v7 = Uuid::now_v7().to_string();
        assert_eq!(of_hold(&v7), of_hold(&v7));
        assert_eq!(of_hold("not-a-uuid"), of_user("not-a-uuid"));
    }
}
