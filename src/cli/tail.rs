//! `writebehind tail`: one line per replication event, for people and for tests.
//!
//! Line formats (fields and long values are abbreviated):
//!
//! ```text
//! full-sync replid=<id> offset=<n> framing=diskless|length:<bytes>
//! snapshot aux <key>=<value>
//! snapshot function <bytes> bytes
//! snapshot db=<n> <type> <key> [expire_at=<ms>] [fields=<n> {f=v, ...}]
//! full-sync-done replid=<id> offset=<n> db=<n> rdb_bytes=<n>
//! continue replid=<id> offset=<n> db=<n> [previous_replid=<id>]
//! <offset> db=<n> <COMMAND> <key> <args...>
//! <offset> db=<n> MULTI/EXEC <n> commands: <COMMAND> <key> ...; ...
//! <offset> SELECT <n> | PING | REPLCONF GETACK before=<n> | REPLCONF <args>
//! disconnected: <error>; retrying in <ms> ms
//! ```

use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;

use crate::position::StreamPosition;
use crate::replication::rdb::{HashField, RdbEvent, ValueKind};
use crate::replication::stream::{Command, StreamEvent};
use crate::replication::{Framing, ReplicationEvent, Replicator, ReplicatorOptions};

const MAX_ARGS_SHOWN: usize = 6;
const MAX_FIELDS_SHOWN: usize = 4;
const MAX_VALUE_CHARS: usize = 32;

struct PendingKey {
    db: u64,
    key: Bytes,
    kind: ValueKind,
    expire_at_ms: Option<i64>,
    fields: Vec<HashField>,
    field_count: usize,
}

pub(super) async fn tail(options: ReplicatorOptions, resume: Option<StreamPosition>) -> ExitCode {
    let mut replicator = Replicator::new(options, resume);
    let stdout = std::io::stdout();
    let mut pending: Option<PendingKey> = None;
    loop {
        let event = tokio::select! {
            event = replicator.next() => event,
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        };
        let line = match event {
            ReplicationEvent::FullSyncStarted {
                replid,
                offset,
                framing,
            } => {
                let framing = match framing {
                    Framing::Diskless => "diskless".to_string(),
                    Framing::Length(len) => format!("length:{len}"),
                };
                Some(format!(
                    "full-sync replid={replid} offset={offset} framing={framing}"
                ))
            }
            ReplicationEvent::Snapshot(event) => snapshot_line(event, &mut pending),
            ReplicationEvent::FullSyncCompleted {
                position,
                rdb_bytes,
            } => {
                replicator.report_durable(position.offset);
                Some(format!(
                    "full-sync-done replid={} offset={} db={} rdb_bytes={rdb_bytes}",
                    position.replid, position.offset, position.db
                ))
            }
            ReplicationEvent::Continued {
                position,
                previous_replid,
            } => {
                let previous = previous_replid
                    .map(|id| format!(" previous_replid={id}"))
                    .unwrap_or_default();
                Some(format!(
                    "continue replid={} offset={} db={}{previous}",
                    position.replid, position.offset, position.db
                ))
            }
            ReplicationEvent::Stream(event) => {
                replicator.report_durable(event.end());
                Some(stream_line(&event))
            }
            ReplicationEvent::Disconnected { error, retry_in } => {
                pending = None;
                Some(format!(
                    "disconnected: {error}; retrying in {} ms",
                    retry_in.as_millis()
                ))
            }
        };
        if let Some(line) = line {
            let mut out = stdout.lock();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                // The reader went away (a closed pipe): nothing left to do.
                return ExitCode::SUCCESS;
            }
        }
    }
}

fn snapshot_line(event: RdbEvent, pending: &mut Option<PendingKey>) -> Option<String> {
    match event {
        RdbEvent::Aux { key, value } => Some(format!(
            "snapshot aux {}={}",
            printable(&key),
            printable(&value)
        )),
        RdbEvent::Function { code } => Some(format!("snapshot function {} bytes", code.len())),
        RdbEvent::ModuleAux { module } => Some(format!("snapshot module-aux {module}")),
        RdbEvent::KeyStart {
            db,
            key,
            kind,
            expire_at_ms,
            ..
        } => {
            *pending = Some(PendingKey {
                db,
                key,
                kind,
                expire_at_ms,
                fields: Vec::new(),
                field_count: 0,
            });
            None
        }
        RdbEvent::HashField(field) => {
            if let Some(key) = pending.as_mut() {
                key.field_count += 1;
                if key.fields.len() < MAX_FIELDS_SHOWN {
                    key.fields.push(field);
                }
            }
            None
        }
        RdbEvent::KeyEnd { empty } => {
            let key = pending.take()?;
            let mut line = format!(
                "snapshot db={} {} {}",
                key.db,
                key.kind.name(),
                printable(&key.key)
            );
            if let Some(at) = key.expire_at_ms {
                line.push_str(&format!(" expire_at={at}"));
            }
            if key.kind == ValueKind::Hash {
                let shown: Vec<String> = key
                    .fields
                    .iter()
                    .map(|f| match f.expire_at_ms {
                        Some(at) => format!(
                            "{}={} (expire_at={at})",
                            printable(&f.field),
                            printable(&f.value)
                        ),
                        None => format!("{}={}", printable(&f.field), printable(&f.value)),
                    })
                    .collect();
                let more = if key.field_count > shown.len() {
                    ", ..."
                } else {
                    ""
                };
                line.push_str(&format!(
                    " fields={} {{{}{more}}}",
                    key.field_count,
                    shown.join(", ")
                ));
            }
            if empty {
                line.push_str(" (empty, ignored by Redis)");
            }
            Some(line)
        }
        RdbEvent::End { checksum } => Some(format!("snapshot end checksum={checksum:?}")),
        RdbEvent::Header { .. } | RdbEvent::SelectDb { .. } | RdbEvent::ResizeDb { .. } => None,
    }
}

fn stream_line(event: &StreamEvent) -> String {
    match event {
        StreamEvent::Command(command) => format!(
            "{} db={} {}",
            command.end,
            command.db,
            command_text(command)
        ),
        StreamEvent::Transaction {
            commands, end, db, ..
        } => {
            let texts: Vec<String> = commands.iter().map(command_text).collect();
            format!(
                "{end} db={db} MULTI/EXEC {} commands: {}",
                commands.len(),
                texts.join("; ")
            )
        }
        StreamEvent::TransactionPart { commands, end } => {
            let texts: Vec<String> = commands.iter().map(command_text).collect();
            format!(
                "{end} MULTI (continued) {} commands: {}",
                commands.len(),
                texts.join("; ")
            )
        }
        StreamEvent::Select { db, end } => format!("{end} SELECT {db}"),
        StreamEvent::Ping { end } => format!("{end} PING"),
        StreamEvent::GetAck { before, end } => format!("{end} REPLCONF GETACK before={before}"),
        StreamEvent::Replconf { args, end } => {
            let args: Vec<String> = args.iter().map(|a| printable(a)).collect();
            format!("{end} {}", args.join(" "))
        }
    }
}

fn command_text(command: &Command) -> String {
    let mut parts = vec![command.name()];
    parts.extend(
        command
            .args
            .iter()
            .skip(1)
            .take(MAX_ARGS_SHOWN)
            .map(|a| printable(a)),
    );
    let hidden = command.args.len().saturating_sub(1 + MAX_ARGS_SHOWN);
    if hidden > 0 {
        parts.push(format!("... (+{hidden} args)"));
    }
    parts.join(" ")
}

/// Bytes as text: printable ASCII as is, everything else escaped, long values cut.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (shown, &b) in bytes.iter().enumerate() {
        if shown == MAX_VALUE_CHARS {
            out.push_str(&format!("...({} bytes)", bytes.len()));
            break;
        }
        match b {
            b' ' | b'=' | b'\\' | b';' => out.push_str(&format!("\\x{b:02x}")),
            0x21..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.is_empty() {
        out.push_str("\"\"");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_cut() {
        assert_eq!(printable(b"person2:1"), "person2:1");
        assert_eq!(printable(b"a b"), "a\\x20b");
        assert_eq!(printable(b""), "\"\"");
        let long = printable(&[b'x'; 100]);
        assert!(long.ends_with("...(100 bytes)"), "{long}");
    }
}
