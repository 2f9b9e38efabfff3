//! Redirections in a Redis Cluster: a command the shard's primary answers with `-MOVED <slot>
//! <host>:<port>` (the key's slot is another node's: an ack stream `{key}uuid` whose key has a
//! hash tag of its own, or a key that moved) or `-ASK <slot> <host>:<port>` (its slot is being
//! migrated and the key is already there) is sent again to that node, `ASK` preceded by
//! `ASKING`; each node's commands in one pipeline. Connections to other nodes are kept, with
//! the credentials and TLS of the primary's endpoint. A second redirection is left as the
//! command's reply (an error: the caller retries the round later).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::config::RedisEndpoint;
use crate::redis_client::{ClientError, RedisClient};

/// Where a reply redirects its command: (`ASK`?, host, port).
fn redirection(reply: &BytesFrame) -> Option<(bool, String, u16)> {
    let BytesFrame::Error(message) = reply else {
        return None;
    };
    let mut words = message.split(' ');
    let ask = match words.next()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let _slot = words.next()?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    Some((
        ask,
        host.trim_matches(['[', ']']).to_string(),
        port.parse().ok()?,
    ))
}

/// Connections to the other nodes of a cluster.
#[derive(Default)]
pub struct Redirects {
    clients: HashMap<(String, u16), RedisClient>,
}

impl Redirects {
    /// Sends again every command of `commands` whose reply in `replies` redirects it, and puts
    /// the new replies in place. `template` gives the credentials and TLS.
    pub async fn follow(
        &mut self,
        template: &RedisEndpoint,
        commands: &[Vec<Bytes>],
        replies: &mut [BytesFrame],
    ) -> Result<(), ClientError> {
        let mut by_node: HashMap<(String, u16), Vec<(usize, bool)>> = HashMap::new();
        for (index, reply) in replies.iter().enumerate() {
            if let Some((ask, host, port)) = redirection(reply) {
                by_node.entry((host, port)).or_default().push((index, ask));
            }
        }
        for (node, sent) in by_node {
            let client = match self.clients.entry(node.clone()) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let endpoint = RedisEndpoint {
                        host: node.0.clone(),
                        port: node.1,
                        ..template.clone()
                    };
                    entry.insert(RedisClient::connect(&endpoint, Duration::from_secs(5)).await?)
                }
            };
            let asking = [Bytes::from_static(b"ASKING")];
            let mut pipeline: Vec<&[Bytes]> = Vec::new();
            for &(index, ask) in &sent {
                if ask {
                    pipeline.push(&asking);
                }
                pipeline.push(&commands[index]);
            }
            let answers = match client.pipeline(&pipeline).await {
                Ok(answers) => answers,
                Err(error) => {
                    self.clients.remove(&node);
                    return Err(error);
                }
            };
            let mut answers = answers.into_iter();
            for &(index, ask) in &sent {
                if ask {
                    answers.next();
                }
                if let Some(answer) = answers.next() {
                    replies[index] = answer;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_and_ask_name_the_node() {
        let error = |s: &str| BytesFrame::Error(s.into());
        assert_eq!(
            redirection(&error("MOVED 3999 127.0.0.1:6381")),
            Some((false, "127.0.0.1".into(), 6381))
        );
        assert_eq!(
            redirection(&error("ASK 3999 redis-2:6379")),
            Some((true, "redis-2".into(), 6379))
        );
        assert_eq!(
            redirection(&error("MOVED 1 [::1]:7000")),
            Some((false, "::1".into(), 7000))
        );
        for other in ["ERR no", "MOVED", "MOVED 1 host", "ASK 1 h:port"] {
            assert_eq!(redirection(&error(other)), None, "{other}");
        }
        assert_eq!(redirection(&BytesFrame::Integer(1)), None);
    }
}
