//! What the primary says about its commands (`COMMAND`), so that a write this service does not
//! model is never ignored: its keys are found from the command's key positions, and its data
//! type from its ACL categories.
//!
//! `COMMAND` replies with one array per command: name, arity, flags, first key, last key, step,
//! and (Redis 6.0+) ACL categories. A write whose categories name only non-hash types
//! (`@string`, `@list`, ...) turns a key into "not a hash"; any other write touching a watched
//! key is unknown and the key is refreshed from the primary.

use std::collections::HashMap;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::replication::stream::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub write: bool,
    pub first_key: i64,
    pub last_key: i64,
    pub step: i64,
    pub movable_keys: bool,
    /// Its ACL categories say it works on a data type other than hashes only.
    pub other_type: bool,
    pub hash_type: bool,
}

/// The command table of a primary.
#[derive(Debug, Clone, Default)]
pub struct CommandTable {
    specs: HashMap<String, CommandSpec>,
}

fn text(frame: &BytesFrame) -> Option<String> {
    match frame {
        BytesFrame::SimpleString(b) | BytesFrame::BulkString(b) => {
            Some(String::from_utf8_lossy(b).to_ascii_lowercase())
        }
        _ => None,
    }
}

fn int(frame: &BytesFrame) -> i64 {
    match frame {
        BytesFrame::Integer(i) => *i,
        _ => 0,
    }
}

impl CommandTable {
    /// Parses a `COMMAND` reply; entries it cannot read are left out.
    pub fn from_reply(reply: &BytesFrame) -> CommandTable {
        let mut specs = HashMap::new();
        let BytesFrame::Array(commands) = reply else {
            return CommandTable { specs };
        };
        for command in commands {
            let BytesFrame::Array(parts) = command else {
                continue;
            };
            let Some(name) = parts.first().and_then(text) else {
                continue;
            };
            let words = |index: usize| -> Vec<String> {
                match parts.get(index) {
                    Some(BytesFrame::Array(items)) => items.iter().filter_map(text).collect(),
                    _ => Vec::new(),
                }
            };
            let flags = words(2);
            let categories = words(6);
            let other_type = [
                "@string",
                "@list",
                "@set",
                "@sortedset",
                "@stream",
                "@bitmap",
                "@hyperloglog",
                "@geo",
            ]
            .iter()
            .any(|c| categories.iter().any(|x| x == c));
            specs.insert(
                name,
                CommandSpec {
                    write: flags.iter().any(|f| f == "write"),
                    first_key: parts.get(3).map(int).unwrap_or(0),
                    last_key: parts.get(4).map(int).unwrap_or(0),
                    step: parts.get(5).map(int).unwrap_or(0),
                    movable_keys: flags.iter().any(|f| f == "movablekeys"),
                    other_type,
                    hash_type: categories.iter().any(|c| c == "@hash"),
                },
            );
        }
        CommandTable { specs }
    }

    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.specs.get(&name.to_ascii_lowercase())
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The keys of `command` according to its first/last/step positions (plus the `STORE`
    /// destination of `SORT`, whose position is not fixed).
    pub fn keys(&self, spec: &CommandSpec, command: &Command) -> Vec<Bytes> {
        let args = &command.args;
        let mut keys = Vec::new();
        if spec.first_key > 0 && spec.step > 0 {
            let last = if spec.last_key < 0 {
                args.len() as i64 + spec.last_key
            } else {
                spec.last_key
            };
            let mut i = spec.first_key;
            while i <= last && (i as usize) < args.len() {
                keys.push(args[i as usize].clone());
                i += spec.step;
            }
        }
        if command.is("SORT") || command.is("SORT_RO") {
            if let Some(pos) = args.iter().position(|a| a.eq_ignore_ascii_case(b"STORE")) {
                if let Some(dst) = args.get(pos + 1) {
                    keys.push(dst.clone());
                }
            }
        }
        keys
    }
}
