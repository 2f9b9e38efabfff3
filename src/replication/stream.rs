//! The command stream that follows the snapshot (or `+CONTINUE`).
//!
//! Every command is a RESP2 array of bulk strings, exactly as the primary fed it to its
//! replication buffer, so the byte length of each frame is what it adds to the offset. Frames
//! are parsed in one pass (`frame.rs`) from the connection's `BytesMut`; arguments are `Bytes`
//! slices of it, never copies.
//!
//! What the stream holds besides writes, and what is done with it:
//! - `SELECT n` changes the database of the commands after it (also inside `MULTI`);
//! - `MULTI ... EXEC` wraps an execution unit (a transaction, a script's or function's effects)
//!   and is delivered as one [`StreamEvent::Transaction`]; positions never fall inside it. A
//!   long one comes first as [`StreamEvent::TransactionPart`]s of
//!   [`TRANSACTION_PART_COMMANDS`] commands, so that no layer holds a whole transaction of
//!   a million commands (capture applies the parts as they come: `src/capture/long_unit.rs`);
//!   the `Transaction` then holds the commands after the last part;
//! - `PING` (every `repl-ping-replica-period`) and `REPLCONF GETACK *` count toward the offset
//!   like any command; GETACK must be answered with the offset *before* its own frame.
//!
//! Command names arrive in any case (`ping` is lowercase), so they compare case-insensitively.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::frame;
use crate::position::ReplOffset;

/// Argument ranges kept between commands (beyond, the table of one large command is freed).
const MAX_KEPT_RANGES: usize = 1024;

/// Commands of a transaction delivered together before its `EXEC`.
pub const TRANSACTION_PART_COMMANDS: usize = 1024;

/// One replicated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Name and arguments, as sent.
    pub args: Vec<Bytes>,
    /// The database it applies to.
    pub db: u32,
    /// The offset after its last byte.
    pub end: ReplOffset,
}

#[cfg(test)]
impl Command {
    /// A command from its words, for tests.
    pub(crate) fn from_words(words: &[&str], db: u32, end: ReplOffset) -> Command {
        Command {
            args: words
                .iter()
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect(),
            db,
            end,
        }
    }
}

impl Command {
    /// Whether the command name equals `name`, ignoring ASCII case.
    pub fn is(&self, name: &str) -> bool {
        self.args
            .first()
            .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// The command name in upper case, written in `buffer` (no allocation: this runs for every
    /// command); empty when the name is longer than the buffer or not UTF-8.
    pub fn name_in<'b>(&self, buffer: &'b mut [u8]) -> &'b str {
        let name = self.args.first().map_or(&b""[..], |n| &n[..]);
        let Some(upper) = buffer.get_mut(..name.len()) else {
            return "";
        };
        upper.copy_from_slice(name);
        upper.make_ascii_uppercase();
        std::str::from_utf8(upper).unwrap_or("")
    }

    /// The command name in upper case.
    pub fn name(&self) -> String {
        self.args
            .first()
            .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
            .unwrap_or_default()
    }
}

/// What the command stream delivers, in order. Every variant ends at a top-level command
/// boundary, a valid position to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A command outside `MULTI`.
    Command(Command),
    /// The next [`TRANSACTION_PART_COMMANDS`] commands of a transaction whose `EXEC` has not
    /// arrived: not a boundary (`end` is the offset after its last command, inside the unit).
    TransactionPart {
        commands: Vec<Command>,
        end: ReplOffset,
    },
    /// `MULTI`, the commands (those after its last part, if it came in parts), `EXEC`: one
    /// execution unit of the primary.
    Transaction {
        commands: Vec<Command>,
        start: ReplOffset,
        end: ReplOffset,
        db: u32,
    },
    /// `SELECT db` outside a transaction.
    Select { db: u32, end: ReplOffset },
    /// The primary's keepalive `PING`.
    Ping { end: ReplOffset },
    /// `REPLCONF GETACK *`: the primary asks for an ACK, to be answered with `before`.
    GetAck { before: ReplOffset, end: ReplOffset },
    /// Any other `REPLCONF` the primary sends.
    Replconf { args: Vec<Bytes>, end: ReplOffset },
}

impl StreamEvent {
    /// The offset after this event.
    pub fn end(&self) -> ReplOffset {
        match self {
            StreamEvent::Command(c) => c.end,
            StreamEvent::TransactionPart { end, .. }
            | StreamEvent::Transaction { end, .. }
            | StreamEvent::Select { end, .. }
            | StreamEvent::Ping { end }
            | StreamEvent::GetAck { end, .. }
            | StreamEvent::Replconf { end, .. } => *end,
        }
    }
}

/// A frame the decoder cannot accept, with the stream offset of its first byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replication stream byte {offset}: {message}")]
pub struct StreamError {
    pub offset: u64,
    pub message: String,
}

struct PendingTransaction {
    commands: Vec<Command>,
    start: ReplOffset,
}

/// Decodes the command stream, tracking offset, database and transactions.
pub struct CommandStream {
    offset: ReplOffset,
    db: u32,
    transaction: Option<PendingTransaction>,
    /// Where the arguments of the frame being parsed lie (kept: no allocation per command).
    ranges: Vec<Range<usize>>,
}

impl CommandStream {
    /// A stream whose last processed byte is `offset`, with `db` selected.
    pub fn new(offset: ReplOffset, db: u32) -> Self {
        CommandStream {
            offset,
            db,
            transaction: None,
            ranges: Vec::new(),
        }
    }

    /// The offset of the last byte consumed (inside a transaction, that is not yet a boundary).
    pub fn offset(&self) -> ReplOffset {
        self.offset
    }

    pub fn db(&self) -> u32 {
        self.db
    }

    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// Decodes the next event from the front of `input`, or returns `None` when the next frame
    /// is not complete yet.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<StreamEvent>, StreamError> {
        loop {
            let len = match frame::parse(input, &mut self.ranges) {
                Ok(frame::Parsed::Incomplete) => return Ok(None),
                Ok(frame::Parsed::Command { len }) => len,
                Err(e) => {
                    return Err(self.error(format!("{} (byte {} of the frame)", e.message, e.at)))
                }
            };
            let frame_start = self.offset;
            let frame = input.split_to(len).freeze();
            self.offset = self.offset.advanced(len as u64);
            let args = self.ranges.iter().map(|r| frame.slice(r.clone())).collect();
            if self.ranges.capacity() > MAX_KEPT_RANGES {
                // One command of many arguments does not keep its table for the link's life.
                self.ranges = Vec::new();
            }
            if let Some(event) = self.handle(args, frame_start)? {
                return Ok(Some(event));
            }
        }
    }

    fn error(&self, message: String) -> StreamError {
        StreamError {
            offset: self.offset.next_byte(),
            message,
        }
    }

    fn handle(
        &mut self,
        args: Vec<Bytes>,
        start: ReplOffset,
    ) -> Result<Option<StreamEvent>, StreamError> {
        let end = self.offset;
        let name = &args[0];
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("SELECT") {
            let db = args
                .get(1)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse::<u32>().ok())
                .ok_or_else(|| StreamError {
                    offset: start.next_byte(),
                    message: "SELECT without a valid database number".into(),
                })?;
            self.db = db;
            return Ok(self
                .transaction
                .is_none()
                .then_some(StreamEvent::Select { db, end }));
        }
        if is("MULTI") {
            if self.transaction.is_some() {
                return Err(StreamError {
                    offset: start.next_byte(),
                    message: "MULTI inside MULTI".into(),
                });
            }
            self.transaction = Some(PendingTransaction {
                commands: Vec::new(),
                start,
            });
            return Ok(None);
        }
        if is("EXEC") {
            let Some(tx) = self.transaction.take() else {
                return Err(StreamError {
                    offset: start.next_byte(),
                    message: "EXEC without MULTI".into(),
                });
            };
            return Ok(Some(StreamEvent::Transaction {
                commands: tx.commands,
                start: tx.start,
                end,
                db: self.db,
            }));
        }
        if self.transaction.is_none() {
            if is("PING") {
                return Ok(Some(StreamEvent::Ping { end }));
            }
            if is("REPLCONF") {
                if args
                    .get(1)
                    .is_some_and(|a| a.eq_ignore_ascii_case(b"GETACK"))
                {
                    return Ok(Some(StreamEvent::GetAck { before: start, end }));
                }
                return Ok(Some(StreamEvent::Replconf { args, end }));
            }
        }
        let command = Command {
            args,
            db: self.db,
            end,
        };
        match &mut self.transaction {
            Some(tx) => {
                tx.commands.push(command);
                if tx.commands.len() < TRANSACTION_PART_COMMANDS {
                    return Ok(None);
                }
                Ok(Some(StreamEvent::TransactionPart {
                    commands: std::mem::take(&mut tx.commands),
                    end,
                }))
            }
            None => Ok(Some(StreamEvent::Command(command))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(args: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        out
    }

    #[test]
    fn offsets_db_and_transactions() {
        let mut bytes = Vec::new();
        bytes.extend(resp(&["SELECT", "2"]));
        bytes.extend(resp(&["MULTI"]));
        bytes.extend(resp(&["HSET", "k", "f", "v"]));
        bytes.extend(resp(&["SELECT", "3"]));
        bytes.extend(resp(&["DEL", "k"]));
        bytes.extend(resp(&["EXEC"]));
        bytes.extend(resp(&["ping"]));
        bytes.extend(resp(&["REPLCONF", "GETACK", "*"]));
        let total = bytes.len() as u64;
        let mut input = BytesMut::from(&bytes[..]);
        let mut stream = CommandStream::new(ReplOffset(100), 0);
        let select = stream.decode(&mut input).unwrap().unwrap();
        assert_eq!(
            select,
            StreamEvent::Select {
                db: 2,
                end: ReplOffset(100 + 23)
            }
        );
        let StreamEvent::Transaction {
            commands,
            start,
            db,
            ..
        } = stream.decode(&mut input).unwrap().unwrap()
        else {
            panic!("expected a transaction")
        };
        assert_eq!(start, ReplOffset(123));
        assert_eq!(commands.len(), 2);
        assert_eq!((commands[0].db, commands[1].db, db), (2, 3, 3));
        assert!(matches!(
            stream.decode(&mut input).unwrap(),
            Some(StreamEvent::Ping { .. })
        ));
        let getack = stream.decode(&mut input).unwrap().unwrap();
        assert_eq!(
            getack,
            StreamEvent::GetAck {
                before: ReplOffset(100 + total - 37),
                end: ReplOffset(100 + total)
            }
        );
        assert_eq!(stream.decode(&mut input).unwrap(), None);
    }

    /// A transaction longer than a part comes as parts of its commands, in order, each ending
    /// inside the unit, then the rest with `EXEC`; no position inside it is a boundary.
    #[test]
    fn a_long_transaction_comes_in_parts() {
        let count = 2 * TRANSACTION_PART_COMMANDS + 5;
        let mut bytes = resp(&["MULTI"]);
        let multi = bytes.len() as u64;
        for i in 0..count {
            bytes.extend(resp(&["HSET", &format!("k{i}"), "f", "v"]));
        }
        bytes.extend(resp(&["EXEC"]));
        let mut input = BytesMut::from(&bytes[..]);
        let mut stream = CommandStream::new(ReplOffset(0), 0);
        let mut seen = Vec::new();
        let mut part_ends = Vec::new();
        let (start, end) = loop {
            match stream.decode(&mut input).unwrap().unwrap() {
                StreamEvent::TransactionPart { commands, end } => {
                    assert_eq!(commands.len(), TRANSACTION_PART_COMMANDS);
                    assert_eq!(end, commands.last().unwrap().end);
                    assert!(stream.in_transaction());
                    part_ends.push(end);
                    seen.extend(commands);
                }
                StreamEvent::Transaction {
                    commands,
                    start,
                    end,
                    ..
                } => {
                    assert_eq!(commands.len(), 5);
                    seen.extend(commands);
                    break (start, end);
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(part_ends.len(), 2);
        assert!(part_ends.iter().all(|e| e.0 > multi && *e < end));
        assert_eq!(
            (start, end),
            (ReplOffset(0), ReplOffset(bytes.len() as u64))
        );
        let keys: Vec<String> = seen
            .iter()
            .map(|c| String::from_utf8_lossy(&c.args[1]).into_owned())
            .collect();
        let expected: Vec<String> = (0..count).map(|i| format!("k{i}")).collect();
        assert_eq!(keys, expected);
        assert!(!stream.in_transaction());
    }

    #[test]
    fn names_are_upper_cased_in_the_buffer_given() {
        let mut buffer = [0u8; 8];
        let command = Command::from_words(&["hSet", "k"], 0, ReplOffset(1));
        assert_eq!(command.name_in(&mut buffer), "HSET");
        let long = Command::from_words(&["function"], 0, ReplOffset(1));
        assert_eq!(long.name_in(&mut buffer), "FUNCTION");
        let longer = Command::from_words(&["functions"], 0, ReplOffset(1));
        assert_eq!(longer.name_in(&mut buffer), "");
    }

    #[test]
    fn partial_frames_wait_and_bad_frames_name_their_offset() {
        let bytes = resp(&["HSET", "key", "field", "value"]);
        let mut stream = CommandStream::new(ReplOffset(0), 0);
        let mut input = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            input.extend_from_slice(&[*b]);
            let event = stream.decode(&mut input).unwrap();
            assert_eq!(event.is_some(), i == bytes.len() - 1);
        }
        let mut bad = BytesMut::from(&b"+OK\r\n"[..]);
        let err = stream.decode(&mut bad).unwrap_err();
        assert_eq!(err.offset, bytes.len() as u64 + 1);
    }
}
