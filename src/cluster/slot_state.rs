//! Which slots a primary serves steadily: owned and not being migrated away. Read from its
//! own line of `CLUSTER NODES` (the line flagged `myself`), the only place a node shows its
//! migrations:
//!
//! `<id> <ip:port@bus[,hostname]> myself,master - 0 0 <epoch> connected 0-5460 7000 [5461->-<id>] [7001-<-<id>]`
//!
//! After the eight fixed fields come slot ranges (`first-last` or a single slot) and, in
//! brackets, the slots being migrated to another node (`[slot->-id]`) or imported from one
//! (`[slot-<-id]`). A reply is from the network: anything unexpected is an error, never a panic.

use super::slot::SLOTS;
use crate::redis_client::{frame_text, ClientError, RedisClient};

/// The slots a primary serves steadily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteadySlots {
    /// One bit per slot: owned and not migrating away.
    bits: Vec<u64>,
}

impl SteadySlots {
    pub fn none() -> SteadySlots {
        SteadySlots {
            bits: vec![0; usize::from(SLOTS) / 64],
        }
    }

    pub fn contains(&self, slot: u16) -> bool {
        let slot = usize::from(slot);
        self.bits
            .get(slot / 64)
            .is_some_and(|word| word & (1 << (slot % 64)) != 0)
    }

    fn set(&mut self, slot: u16, on: bool) {
        let slot = usize::from(slot);
        if let Some(word) = self.bits.get_mut(slot / 64) {
            match on {
                true => *word |= 1 << (slot % 64),
                false => *word &= !(1 << (slot % 64)),
            }
        }
    }

    /// How many slots.
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|w| w.count_ones()).sum()
    }
}

fn slot(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|&s| s < SLOTS)
        .ok_or_else(|| format!("`{text}` is not a slot"))
}

/// Parses the `myself` line of a `CLUSTER NODES` reply.
pub fn parse_cluster_nodes(text: &str) -> Result<SteadySlots, String> {
    let line = text
        .lines()
        .find(|line| {
            line.split(' ')
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
        })
        .ok_or("CLUSTER NODES has no line flagged myself")?;
    let mut steady = SteadySlots::none();
    let mut migrating = Vec::new();
    for field in line.split(' ').skip(8).filter(|f| !f.is_empty()) {
        if let Some(inner) = field.strip_prefix('[').and_then(|f| f.strip_suffix(']')) {
            if let Some((from, _)) = inner.split_once("->-") {
                migrating.push(slot(from)?);
            } else if inner.split_once("-<-").is_none() {
                return Err(format!("unexpected `{field}` in CLUSTER NODES"));
            }
            continue;
        }
        let (first, last) = match field.split_once('-') {
            Some((first, last)) => (slot(first)?, slot(last)?),
            None => (slot(field)?, slot(field)?),
        };
        if first > last {
            return Err(format!("slot range `{field}`"));
        }
        for s in first..=last {
            steady.set(s, true);
        }
    }
    for s in migrating {
        steady.set(s, false);
    }
    Ok(steady)
}

/// Asks `client`'s node which slots it serves steadily.
pub async fn read(client: &mut RedisClient) -> Result<SteadySlots, String> {
    let reply = client
        .command(&["CLUSTER", "NODES"])
        .await
        .map_err(|e: ClientError| e.to_string())?;
    parse_cluster_nodes(&frame_text(&reply)).map_err(|e| format!("{}: {e}", client.address()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_slots_less_those_migrating_away() {
        let text = "aaa 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922\n\
                    bbb 127.0.0.1:30001@40001,host myself,master - 0 0 1 connected 0-99 150 [50->-aaa] [200-<-aaa]\n";
        let steady = parse_cluster_nodes(text).unwrap();
        assert!(steady.contains(0) && steady.contains(99) && steady.contains(150));
        assert!(!steady.contains(50), "being migrated away");
        assert!(!steady.contains(200), "being imported: not served yet");
        assert!(!steady.contains(5461), "another node's");
        assert_eq!(steady.count(), 100);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for text in [
            "",
            "x y master - 0 0 1 connected 1",
            "x y myself,master - 0 0 1 connected 16384",
            "x y myself,master - 0 0 1 connected 9-3",
            "x y myself,master - 0 0 1 connected [1-?-x]",
            "x y myself,master - 0 0 1 connected a-b",
        ] {
            assert!(parse_cluster_nodes(text).is_err(), "{text:?}");
        }
        let empty = parse_cluster_nodes("x y myself,master - 0 0 1 connected").unwrap();
        assert_eq!(empty.count(), 0);
    }
}
