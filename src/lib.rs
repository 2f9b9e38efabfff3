//! writebehind keeps SQL tables equal to Redis hashes. It attaches to a Redis primary as a
//! replica, decodes the snapshot and the command stream, buffers every change durably, writes
//! rows to the database exactly once and acknowledges them back to Redis. The behaviour contract
//! is `docs/design.md`; `docs/architecture.md` draws the tasks and what flows between them.
//!
//! The modules follow the data flow:
//! - [`replication`]: the replica handshake, the snapshot ([`replication::rdb`]) and the
//!   command stream ([`replication::stream`]), with exact offsets;
//! - [`capture`]: applying the stream to the mirror and deriving row changes;
//! - [`buffer`]: the RocksDB mirror, change log, checkpoints, dead letters and queued
//!   acknowledgements;
//! - [`sink`]: writing the change log to MySQL/MariaDB and SQLite;
//! - [`ack`]: the `#` op field: completing ops and writing acknowledgements back to Redis;
//! - [`service`]: the pipeline of one process, wired (`Service::start`, `shutdown`, `wait`);
//! - [`cluster`]: Redis Cluster: a pipeline per shard, following the topology;
//! - [`position`]: offsets, change seqs and replication IDs;
//! - [`backoff`]: the one retry pace;
//! - [`config`]: the TOML configuration;
//! - [`metrics`]: metrics, health and status over the admin HTTP listener;
//! - [`redis_client`]: ordinary request/response commands;
//! - [`resp`]: bounded checks of RESP input before it is parsed;
//! - [`clock`]: the local clock;
//! - [`cli`]: the `writebehind` command line.

pub mod ack;
pub mod admin;
pub mod backoff;
pub mod buffer;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod position;
pub mod redis_client;
pub mod replication;
pub mod resp;
pub mod service;
pub mod sink;
pub mod tls;
