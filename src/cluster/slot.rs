//! Hash slots: which of Redis Cluster's 16,384 slots a key belongs to.
//!
//! A key's slot is `CRC16(tag) mod 16384`, CRC16 being the XMODEM variant (polynomial 0x1021,
//! no reflection, initial value 0). The tag is the part between the first `{` and the first `}`
//! after it, when that part is not empty; otherwise the whole key. So `{user1}.name` and
//! `{user1}.mail` share a slot, while `{}x` and `x{` are hashed whole.

use crc::{Crc, CRC_16_XMODEM};

/// Slots in a cluster.
pub const SLOTS: u16 = 16_384;

const XMODEM: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// The slot of `key`.
pub fn slot_of(key: &[u8]) -> u16 {
    XMODEM.checksum(hash_tag(key)) % SLOTS
}

/// The bytes of `key` that are hashed: its hash tag when it has one, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(0) | None => key,
        Some(len) => &key[open + 1..open + 1 + len],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_specification() {
        // The specification's check value: CRC16("123456789") = 0x31C3.
        assert_eq!(XMODEM.checksum(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"123456789"), 0x31C3 % SLOTS);
        // `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"person:1"), slot_of(b"person:1"));
    }

    #[test]
    fn a_hash_tag_is_the_first_non_empty_braces() {
        assert_eq!(hash_tag(b"{user1}.following"), b"user1");
        assert_eq!(slot_of(b"{user1}.following"), slot_of(b"{user1}.followers"));
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no tag"), b"no tag");
        assert_eq!(hash_tag(b"open{only"), b"open{only");
        assert_eq!(hash_tag(b""), b"");
    }
}
