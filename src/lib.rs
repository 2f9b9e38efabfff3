//! writebehind keeps SQL tables equal to Redis hashes. It attaches to a Redis primary as a
//! replica, decodes the snapshot and the command stream, and (in later stages) buffers every
//! change durably, writes rows to the database and acknowledges them back to Redis.
//!
//! The modules follow the data flow:
//! - [`replication`]: the replica handshake, the snapshot ([`replication::rdb`]) and the
//!   command stream ([`replication::stream`]), with exact offsets;
//! - [`capture`]: applying the stream to the mirror and deriving row changes;
//! - [`buffer`]: the RocksDB mirror, change log and checkpoints;
//! - [`sink`]: writing the change log to MySQL/MariaDB and SQLite;
//! - [`position`]: offsets and replication IDs;
//! - [`config`]: the TOML configuration;
//! - [`metrics`]: metrics, health and status over the admin HTTP listener;
//! - [`redis_client`]: ordinary request/response commands;
//! - [`cli`]: the `writebehind` command line.

pub mod ack;
pub mod backoff;
pub mod buffer;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod position;
pub mod redis_client;
pub mod replication;
pub mod service;
pub mod sink;
