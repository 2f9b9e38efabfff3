//! `writebehind check`: the configuration, Redis (reachable, permissions of a replica) and
//! every backend (reachable, tables and columns, grants), one line each; exit 0 only when all
//! is well.

use std::process::ExitCode;
use std::time::Duration;

use super::load_config;
use crate::config::{Config, RedisEndpoint};
use crate::redis_client::RedisClient;
use crate::replication::discovery::Discovery;
use crate::sink::Destination;

/// Whether the connected user may run what a replica runs (`ACL DRYRUN`, Redis 7+). Prints
/// one line; `false` only when a permission is known to be missing.
async fn replica_permissions(
    client: &mut RedisClient,
    endpoint: &RedisEndpoint,
    acks: bool,
) -> bool {
    let user = match client.command(&["ACL", "WHOAMI"]).await {
        Ok(reply) => crate::redis_client::frame_text(&reply),
        Err(_) => endpoint
            .username
            .clone()
            .unwrap_or_else(|| "default".into()),
    };
    let mut missing = Vec::new();
    // What a replica runs, then what capture reads besides the link (the command table, the
    // key count, and keys it must refresh: without DUMP capture waits, it cannot go on), then
    // what the write-back task runs.
    let mut commands: Vec<&[&str]> = vec![
        &["PSYNC", "?", "-1"],
        &["REPLCONF", "ACK", "0"],
        &["PING"],
        &["COMMAND"],
        &["INFO", "replication"],
        &["SELECT", "0"],
        &["DUMP", "writebehind:probe"],
        &["PTTL", "writebehind:probe"],
    ];
    if acks {
        commands.extend([
            &["FUNCTION", "LOAD", "x"][..],
            &["FCALL", "writebehind_ack", "1", "writebehind:probe"],
            &["XADD", "writebehind:probe", "*", "f", "v"],
            &["EXPIRE", "writebehind:probe", "1"],
        ]);
    }
    for command in commands {
        let mut args = vec!["ACL", "DRYRUN", user.as_str()];
        args.extend_from_slice(command);
        match client.command(&args).await {
            Ok(redis_protocol::resp2::types::BytesFrame::SimpleString(ok))
                if ok.as_ref() == b"OK" => {}
            Ok(reply) => missing.push(format!(
                "{} ({})",
                command[0],
                crate::redis_client::frame_text(&reply)
            )),
            Err(crate::redis_client::ClientError::Reply { message, .. })
                if message.contains("NOPERM") || message.contains("unknown") =>
            {
                println!("note: Redis at {}: cannot verify that user `{user}` may run PSYNC (ACL DRYRUN not permitted or not available): {message}", endpoint.address());
                return true;
            }
            Err(e) => missing.push(format!("{} ({e})", command[0])),
        }
    }
    if missing.is_empty() {
        let acks = if acks {
            ", FUNCTION, FCALL, XADD and EXPIRE"
        } else {
            ""
        };
        println!("ok: Redis user `{user}` may run PSYNC, REPLCONF, PING, COMMAND, INFO, SELECT, DUMP, PTTL{acks}");
        true
    } else {
        println!(
            "error: Redis at {}: user `{user}` may not run {}; grant it +psync +replconf +ping +command +info +select +dump +pttl (and, for acks, +function +fcall +xadd +expire)",
            endpoint.address(),
            missing.join(", ")
        );
        false
    }
}

pub(super) async fn check(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!(
        "ok: {} is valid ({} mappings)",
        path.display(),
        config.mappings.len()
    );
    let redis_ok = check_redis(&config).await;
    let backends_ok = check_backends(&config).await;
    if redis_ok && backends_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The primary (found as the service would), reachable, and its user's permissions.
async fn check_redis(config: &Config) -> bool {
    let mut failed = false;
    let discovered = match config.source.cluster.is_some() {
        true => cluster_primaries(config).await,
        false => Discovery::from_config(&config.source).map_err(|e| e.to_string()),
    };
    let endpoints: Vec<RedisEndpoint> = match discovered {
        Ok(Discovery::Fixed(endpoint)) => vec![endpoint],
        Ok(Discovery::Nodes(nodes)) => nodes,
        Ok(discovery) => match discovery.primary(Duration::from_secs(5)).await {
            Ok(primary) => {
                println!(
                    "ok: {} names the primary {}",
                    discovery.describe(),
                    primary.address()
                );
                vec![primary]
            }
            Err(e) => {
                failed = true;
                println!("error: {e}");
                Vec::new()
            }
        },
        Err(e) => {
            failed = true;
            println!("error: {e}");
            Vec::new()
        }
    };
    for endpoint in endpoints {
        match RedisClient::connect(&endpoint, Duration::from_secs(5)).await {
            Ok(mut client) => match client.command(&["PING"]).await {
                Ok(_) => {
                    match client.tls() {
                        Some(tls) => {
                            println!("ok: Redis at {} answers over {tls}", endpoint.address())
                        }
                        None => println!(
                            "ok: Redis at {} answers (plain text, no TLS)",
                            endpoint.address()
                        ),
                    }
                    if !replica_permissions(&mut client, &endpoint, config.acks.enabled).await {
                        failed = true;
                    }
                }
                Err(e) => {
                    failed = true;
                    println!("error: {e}{}", tls_hint(&endpoint, &e.to_string()));
                }
            },
            Err(e) => {
                failed = true;
                println!("error: {e}{}", tls_hint(&endpoint, &e.to_string()));
            }
        }
    }
    !failed
}

/// With `[source] cluster`: every shard's primary, as the seeds describe the cluster (as
/// [`Discovery::Nodes`], each then checked like a single primary).
async fn cluster_primaries(config: &Config) -> Result<Discovery, String> {
    let seeds = Discovery::cluster_seeds(&config.source).map_err(|e| e.to_string())?;
    let (topology, template) = crate::cluster::locator::ask_first(&seeds, Duration::from_secs(5))
        .await
        .map_err(|seen| format!("no seed of [source] cluster describes the cluster: {seen}"))?;
    let primaries: Vec<RedisEndpoint> = topology
        .shards
        .iter()
        .filter_map(|s| s.primary())
        .map(|n| crate::cluster::topology::endpoint_of(n, &template))
        .collect();
    println!(
        "ok: the cluster has {} shards with a primary ({} slots unserved)",
        primaries.len(),
        topology.unserved_slots()
    );
    if topology.unserved_slots() > 0 {
        println!("warning: {} of 16384 slots have no primary: their keys cannot be written until one serves them", topology.unserved_slots());
    }
    Ok(Discovery::Nodes(primaries))
}

/// What to do about a Redis connection that failed with `error`, when TLS may be the cause.
fn tls_hint(endpoint: &RedisEndpoint, error: &str) -> &'static str {
    match (&endpoint.tls, error) {
        (Some(_), e) if e.contains("CertificateRequired") || e.contains("certificate required") => {
            "; the server asks for a client certificate: set `cert_file` and `key_file` in [source.tls]"
        }
        (Some(_), e) if e.contains("UnknownIssuer") => {
            "; the server's certificate is not trusted: set [source.tls] `ca_file` to the CA that signed it"
        }
        (Some(_), e) if e.contains("not valid for name") => {
            "; set [source.tls] `server_name` to a name the server's certificate carries"
        }
        (Some(_), e) if e.contains("expired") => "; the server's certificate must be renewed",
        (None, e) if e.contains("connection lost") || e.contains("reset by peer") => {
            "; if this port takes TLS, write the address as rediss://"
        }
        _ => "",
    }
}

/// Every backend: reachable, its tables and columns as the mappings need them, its grants.
async fn check_backends(config: &Config) -> bool {
    let mut failed = false;
    let mappings = crate::capture::mapping::Mappings::new(&config.mappings);
    for (name, backend) in &config.backends {
        // Checked as they are: tables that `create_table` would create are reported as such.
        let mine: Vec<_> = mappings
            .iter()
            .filter(|m| &m.backend == name)
            .map(|m| crate::capture::mapping::Mapping {
                create_table: false,
                ..m.clone()
            })
            .collect();
        let mut sink = match crate::sink::Sink::connect(name, &backend.url).await {
            Ok(sink) => sink,
            Err(e) => {
                failed = true;
                println!("error: {e}");
                continue;
            }
        };
        match sink.transport().await {
            Some(Ok(transport)) => println!("ok: backend `{name}` connected over {transport}"),
            Some(Err(e)) => {
                failed = true;
                println!("error: {e}");
            }
            None => {}
        }
        for note in sink.notes().await {
            println!("note: {note}");
        }
        match sink.prepare(&mine).await {
            Ok(schemas) => println!(
                "ok: backend `{name}` reachable; {} mapped tables match their mappings",
                schemas.len()
            ),
            Err(problems) => {
                for problem in problems {
                    // Checked as they are: a table `create_table` will create is reported as such.
                    let created = problem
                        .missing_table_of()
                        .and_then(|name| mappings.iter().find(|m| &*m.name == name))
                        .filter(|m| m.create_table);
                    match created {
                        Some(mapping) => println!(
                            "ok: table `{}` will be created at start (create_table = true)",
                            mapping.table
                        ),
                        None => {
                            failed = true;
                            println!("error: {problem}");
                        }
                    }
                }
            }
        }
    }
    !failed
}
