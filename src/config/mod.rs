//! The TOML configuration (docs/design.md section 2), parsed and validated before anything starts.
//!
//! `${VAR}` inside any string value is replaced from the environment (for secrets), after the
//! TOML is parsed, so a secret cannot break the TOML syntax. Validation collects every problem
//! and reports each on its own line; unknown keys are problems too (a typo must not be ignored).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod endpoint;
pub(crate) use endpoint::percent_decode;
pub use endpoint::{redact, EndpointError, RedisEndpoint};

/// The longest backend name: its checkpoint rows (`<name>#<p>/<n>`, up to 6 more characters)
/// must fit the checkpoint table's `backend VARCHAR(191)` (191 characters: the longest
/// utf8mb4 key InnoDB indexes with the old 767-byte limit).
pub const MAX_BACKEND_NAME_CHARS: usize = 185;
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub acks: AcksConfig,
}

/// The `#` op field and acknowledgements (docs/design.md section 4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcksConfig {
    /// Treat `#` as the op field, load the function library, write acks (default true). When
    /// false, `#` is an ordinary field and nothing is written to Redis.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds an ack stream `{key}uuid` lives (its `EXPIRE`).
    #[serde(default = "default_ack_expire_secs")]
    pub expire_secs: u64,
}

impl Default for AcksConfig {
    fn default() -> Self {
        AcksConfig {
            enabled: true,
            expire_secs: default_ack_expire_secs(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_ack_expire_secs() -> u64 {
    3600
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub url: Option<String>,
    pub nodes: Option<Vec<String>>,
    pub sentinels: Option<Vec<String>>,
    /// Seed nodes of a Redis Cluster: every shard is followed (`src/cluster`).
    pub cluster: Option<Vec<String>>,
    pub master_name: Option<String>,
    /// Credentials for data nodes whose address carries none (nodes, or the primary Sentinel
    /// names).
    pub username: Option<String>,
    pub password: Option<String>,
    /// `[source.tls]`: trusted CAs, client certificate, server name for `rediss://` addresses.
    pub tls: Option<crate::tls::TlsFiles>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    #[serde(default = "default_buffer_path")]
    pub path: PathBuf,
    /// Megabytes of mirrored hashes capture keeps in memory in front of RocksDB (0: none).
    #[serde(default = "default_mirror_cache_mb")]
    pub mirror_cache_mb: u64,
    /// Megabytes of mirror updates journaled before they are settled into RocksDB's mirror
    /// (`src/buffer/journal.rs`): memory they hold until then; at least 1.
    #[serde(default = "default_mirror_journal_mb")]
    pub mirror_journal_mb: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            path: default_buffer_path(),
            mirror_cache_mb: default_mirror_cache_mb(),
            mirror_journal_mb: default_mirror_journal_mb(),
        }
    }
}

/// TLS to Redis is all or nothing: every address `rediss://` or none, and `[source.tls]` only
/// with `rediss://` (never a silent fall-back to plain text); its files must load.
fn tls_problems(source: &SourceConfig) -> Vec<String> {
    let addresses: Vec<&String> = source
        .url
        .iter()
        .chain(source.nodes.iter().flatten())
        .chain(source.sentinels.iter().flatten())
        .chain(source.cluster.iter().flatten())
        .collect();
    // By the parsed scheme (`REDISS://` is TLS too); an address that does not parse is
    // reported on its own.
    let secure = addresses
        .iter()
        .filter(|a| RedisEndpoint::parse(a).is_ok_and(|e| e.tls.is_some()))
        .count();
    let mut problems = Vec::new();
    if secure > 0 && secure < addresses.len() {
        problems.push("[source]: some addresses are rediss:// (TLS) and some are not; use rediss:// for all of them or for none".to_string());
    }
    if let Some(files) = &source.tls {
        if secure == 0 && !addresses.is_empty() {
            problems.push("[source.tls] is set but the source addresses are redis:// (plain text); write them as rediss://".to_string());
        }
        if let Err(e) = crate::tls::RedisTls::from_files(files) {
            problems.push(e);
        }
    }
    problems
}

fn default_mirror_cache_mb() -> u64 {
    128
}

fn default_mirror_journal_mb() -> u64 {
    crate::buffer::DEFAULT_JOURNAL_BYTES >> 20
}

fn default_buffer_path() -> PathBuf {
    PathBuf::from("./writebehind-data")
}

/// How the service behaves as a replica.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The port announced with `REPLCONF listening-port`. Nothing must answer there, so that
    /// Sentinel never considers this service a promotable replica.
    #[serde(default = "default_announce_port")]
    pub announce_port: u16,
    /// Seconds of silence from the primary after which the link is considered dead.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// MiB of the command stream spooled to disk (under `<buffer path>/spool`) and not yet
    /// captured, at most, while capture is behind the primary; past it the primary holds the
    /// rest in its output buffer for this replica. 0: never spool the stream.
    #[serde(default = "default_stream_spool_mb")]
    pub stream_spool_mb: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            announce_port: default_announce_port(),
            timeout_secs: default_timeout_secs(),
            stream_spool_mb: default_stream_spool_mb(),
        }
    }
}

fn default_announce_port() -> u16 {
    // Port 1 (tcpmux) is privileged and unused on practically every host.
    1
}

fn default_timeout_secs() -> u64 {
    60
}

fn default_stream_spool_mb() -> u64 {
    1024
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub url: String,
    /// Connections writing at once, rows spread over them by key, each with its own checkpoint
    /// row (src/sink/partition.rs). 1: a unit (MULTI, script) is one transaction.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_partitions() -> u32 {
    1
}

/// Never print a password: URLs are redacted, passwords replaced.
impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("url", &redact(&self.url))
            .finish()
    }
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact_all = |list: &Option<Vec<String>>| {
            list.as_ref()
                .map(|l| l.iter().map(|u| redact(u)).collect::<Vec<_>>())
        };
        f.debug_struct("SourceConfig")
            .field("url", &self.url.as_deref().map(redact))
            .field("nodes", &redact_all(&self.nodes))
            .field("sentinels", &redact_all(&self.sentinels))
            .field("cluster", &redact_all(&self.cluster))
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The admin listener (`/metrics`, `/health`, `/ready`, `/status`, `/dlq`): on by default on a
/// loopback port, so that `writebehind status` and `dlq` reach a running service; `listen = ""`
/// turns it off. `token` (from the environment: `token = "${WRITEBEHIND_ADMIN_TOKEN}"`) is
/// the bearer token `/dlq` requires; without one, `/dlq` is served on loopback only
/// (`src/admin.rs`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    #[serde(default)]
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The shortest `[admin] token` taken: a guessable token is no protection.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// The admin listener's default address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_string()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

impl AdminConfig {
    /// Where to listen; None when turned off (`listen = ""`).
    pub fn address(&self) -> Option<&str> {
        Some(self.listen.as_str()).filter(|listen| !listen.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnExpire {
    #[default]
    Keep,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitialLoad {
    #[default]
    Upsert,
    Skip,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub name: String,
    pub prefix: String,
    #[serde(default = "default_separator")]
    pub separator: String,
    #[serde(default)]
    pub db: u32,
    pub backend: String,
    pub table: String,
    pub key_column: String,
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default)]
    pub on_expire: OnExpire,
    #[serde(default)]
    pub initial_load: InitialLoad,
    #[serde(default)]
    pub create_table: bool,
}

fn default_separator() -> String {
    ":".into()
}

impl MappingConfig {
    /// The key prefix including the separator: keys starting with it are watched.
    pub fn key_prefix(&self) -> String {
        format!("{}{}", self.prefix, self.separator)
    }
}

/// Every problem found in a configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, substitutes, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![format!(
                "{}: cannot read the configuration: {e}",
                path.display()
            )])
        })?;
        Config::parse(&text, &|name| std::env::var(name).ok()).map_err(|ConfigErrors(problems)| {
            ConfigErrors(
                problems
                    .into_iter()
                    .map(|p| format!("{}: {p}", path.display()))
                    .collect(),
            )
        })
    }

    /// Parses and validates configuration text, resolving `${VAR}` with `env`.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![one_line(&e.to_string())]))?;
        let mut problems = Vec::new();
        substitute(&mut value, env, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![one_line(&e.to_string())]))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        self.validate_source(&mut problems);
        self.validate_sections(&mut problems);
        self.validate_mappings(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// `[source]`: exactly one way to find the primary, every address parseable.
    fn validate_source(&self, problems: &mut Vec<String>) {
        let source = &self.source;
        let given = [
            source.url.is_some(),
            source.nodes.is_some(),
            source.sentinels.is_some(),
            source.cluster.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => problems
                .push("[source]: set one of `url`, `nodes`, `sentinels` or `cluster`".to_string()),
            1 => {}
            _ => problems.push(
                "[source]: set only one of `url`, `nodes`, `sentinels` or `cluster`".to_string(),
            ),
        }
        if let Some(url) = &source.url {
            if let Err(e) = RedisEndpoint::parse(url) {
                problems.push(format!("[source] url: {e}"));
            }
        }
        for (field, list) in [
            ("nodes", &source.nodes),
            ("sentinels", &source.sentinels),
            ("cluster", &source.cluster),
        ] {
            if let Some(list) = list {
                if list.is_empty() {
                    problems.push(format!("[source] {field}: the list is empty"));
                }
                for entry in list {
                    if let Err(e) = RedisEndpoint::parse(entry) {
                        problems.push(format!("[source] {field}: {e}"));
                    }
                }
            }
        }
        problems.extend(tls_problems(source));
        if source.sentinels.is_some() && source.master_name.as_deref().unwrap_or("").is_empty() {
            problems.push("[source]: `sentinels` needs `master_name`".to_string());
        }
        if source.sentinels.is_none() && source.master_name.is_some() {
            problems.push("[source]: `master_name` is only used with `sentinels`".to_string());
        }
    }

    /// `[buffer]`, `[replication]`, `[admin]` and `[backends.*]`.
    fn validate_sections(&self, problems: &mut Vec<String>) {
        if let Some(token) = &self.admin.token {
            if token.len() < MIN_ADMIN_TOKEN_BYTES || token.chars().any(|c| !c.is_ascii_graphic()) {
                problems.push(format!(
                    "[admin] token: use at least {MIN_ADMIN_TOKEN_BYTES} printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)"
                ));
            }
        }
        if self.buffer.path.as_os_str().is_empty() {
            problems.push("[buffer] path: must not be empty".to_string());
        }
        if self.buffer.mirror_journal_mb == 0 {
            problems.push("[buffer] mirror_journal_mb = 0: must be at least 1 (megabytes of mirror updates held before they are settled)".to_string());
        }
        if (1..16).contains(&self.replication.stream_spool_mb) {
            problems.push(format!(
                "[replication] stream_spool_mb = {}: must be 0 (never spool the stream) or at least 16",
                self.replication.stream_spool_mb
            ));
        }
        if self.replication.timeout_secs < 5 {
            problems.push(format!(
                "[replication] timeout_secs = {}: must be at least 5 (the primary pings every 10 s by default)",
                self.replication.timeout_secs
            ));
        }
        for (name, backend) in &self.backends {
            let scheme = backend.url.split("://").next().unwrap_or("");
            if !matches!(
                scheme,
                "mysql" | "mariadb" | "postgres" | "postgresql" | "sqlite"
            ) || !backend.url.contains("://")
            {
                problems.push(format!(
                    "[backends.{name}] url `{}`: use mysql://user:password@host:port/database, postgres://user:password@host:port/database or sqlite://path",
                    redact(&backend.url)
                ));
            }
            let most = crate::sink::partition::MAX_PARTITIONS;
            if backend.partitions == 0 || backend.partitions > most {
                problems.push(format!(
                    "[backends.{name}] partitions = {}: must be between 1 and {most}",
                    backend.partitions
                ));
            } else if scheme == "sqlite" && backend.partitions > 1 {
                problems.push(format!(
                    "[backends.{name}] partitions = {}: SQLite takes one writer at a time; use 1",
                    backend.partitions
                ));
            }
            if name.contains('#') {
                problems.push(format!(
                    "[backends.{name}]: a backend name may not contain `#` (it names checkpoint rows of partitions)"
                ));
            }
            if name.chars().count() > MAX_BACKEND_NAME_CHARS {
                problems.push(format!(
                    "[backends.{name}]: a backend name has at most {MAX_BACKEND_NAME_CHARS} characters (it names the checkpoint rows, `<name>#<p>/<n>`, in a 191-character column); choose a shorter one"
                ));
            }
        }
    }

    /// Every mapping on its own, and no two watching the same keys.
    fn validate_mappings(&self, problems: &mut Vec<String>) {
        let mut names = HashSet::new();
        let mut watched: HashMap<u32, Vec<(String, String)>> = HashMap::new();
        for (i, m) in self.mappings.iter().enumerate() {
            let label = if m.name.is_empty() {
                format!("[[mappings]] #{}", i + 1)
            } else {
                format!("mapping `{}`", m.name)
            };
            if m.name.is_empty() {
                problems.push(format!("{label}: `name` must not be empty"));
            } else if !names.insert(m.name.clone()) {
                problems.push(format!("{label}: the name is used by another mapping"));
            }
            self.validate_mapping(m, &label, problems);
            let prefix = m.key_prefix();
            for (other_name, other_prefix) in watched.get(&m.db).into_iter().flatten() {
                if prefix.starts_with(other_prefix.as_str())
                    || other_prefix.starts_with(prefix.as_str())
                {
                    problems.push(format!(
                        "{label}: keys `{prefix}*` overlap with mapping `{other_name}` (`{other_prefix}*`) in db {}",
                        m.db
                    ));
                }
            }
            watched
                .entry(m.db)
                .or_default()
                .push((m.name.clone(), prefix));
        }
    }

    /// One mapping's own fields.
    fn validate_mapping(&self, m: &MappingConfig, label: &str, problems: &mut Vec<String>) {
        if m.prefix.is_empty() {
            problems.push(format!("{label}: `prefix` must not be empty"));
        }
        if m.separator.is_empty() {
            problems.push(format!("{label}: `separator` must not be empty"));
        }
        if !self.backends.contains_key(&m.backend) {
            let known: Vec<&str> = self.backends.keys().map(String::as_str).collect();
            problems.push(format!(
                "{label}: backend `{}` is not defined (defined: {})",
                m.backend,
                list_or_none(&known)
            ));
        }
        if m.table.is_empty() {
            problems.push(format!("{label}: `table` must not be empty"));
        }
        if m.key_column.is_empty() {
            problems.push(format!("{label}: `key_column` must not be empty"));
        }
        if m.columns.is_empty() {
            problems.push(format!(
                "{label}: [mappings.columns] maps no hash field to a column"
            ));
        }
        let mut columns = HashSet::new();
        for (field, column) in &m.columns {
            if column.is_empty() {
                problems.push(format!(
                    "{label}: field `{field}` maps to an empty column name"
                ));
            } else if !columns.insert(column.as_str()) {
                problems.push(format!(
                    "{label}: column `{column}` is the target of more than one field"
                ));
            }
        }
        for column in &m.required {
            if !columns.contains(column.as_str()) {
                problems.push(format!(
                    "{label}: required column `{column}` is not a target in [mappings.columns]"
                ));
            }
        }
    }
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn substitute(
    value: &mut toml::Value,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) {
    match value {
        toml::Value::String(text) => {
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let Some(len) = rest[start..].find('}') else {
                    problems.push(format!(
                        "unterminated `${{` in a configuration value: `{}`",
                        text
                    ));
                    return;
                };
                let name = &rest[start + 2..start + len];
                match env(name) {
                    Some(v) => out.push_str(&v),
                    None => problems.push(format!(
                        "environment variable `{name}` is not set (used as ${{{name}}})"
                    )),
                }
                rest = &rest[start + len + 1..];
            }
            out.push_str(rest);
            *text = out;
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| substitute(v, env, problems)),
        toml::Value::Table(table) => table
            .iter_mut()
            .for_each(|(_, v)| substitute(v, env, problems)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[source]
url = "redis://127.0.0.1:6379"

[buffer]
path = "./writebehind-data"

[backends.mysql]
url = "mysql://demouser:${DB_PASSWORD}@localhost:3306/test"

[[mappings]]
name = "PersonWriteBehind"
prefix = "person2"
backend = "mysql"
table = "person1"
key_column = "id"
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"

[[mappings]]
name = "CarsWriteBehind"
prefix = "car"
backend = "mysql"
table = "car"
key_column = "id"
[mappings.columns]
id = "id"
color = "color"
"#;

    fn env(name: &str) -> Option<String> {
        (name == "DB_PASSWORD").then(|| "Password123!".to_string())
    }

    #[test]
    fn the_design_example_parses() {
        let config = Config::parse(EXAMPLE, &env).unwrap();
        assert_eq!(config.mappings.len(), 2);
        assert_eq!(config.mappings[0].key_prefix(), "person2:");
        assert_eq!(
            config.backends["mysql"].url,
            "mysql://demouser:Password123!@localhost:3306/test"
        );
        assert_eq!(config.mappings[1].on_expire, OnExpire::Keep);
        assert_eq!(
            RedisEndpoint::parse(config.source.url.as_deref().unwrap())
                .unwrap()
                .port,
            6379
        );
        // No [admin]: the listener is on, on loopback; `listen = ""` turns it off.
        assert_eq!(config.admin.address(), Some(DEFAULT_ADMIN_LISTEN));
        let off = Config::parse(&format!("[admin]\nlisten = \"\"\n{EXAMPLE}"), &env).unwrap();
        assert_eq!(off.admin.address(), None);
    }

    #[test]
    fn the_admin_token_comes_from_the_environment_and_is_never_shown() {
        let secret = "0123456789abcdef0123";
        let env = |name: &str| (name == "ADMIN_TOKEN").then(|| secret.to_string());
        let text = format!("[admin]\ntoken = \"${{ADMIN_TOKEN}}\"\n{EXAMPLE}");
        let config = Config::parse(&text, &|n| {
            env(n).or_else(|| (n == "DB_PASSWORD").then(|| "pw".into()))
        })
        .unwrap();
        assert_eq!(config.admin.token.as_deref(), Some(secret));
        assert!(
            !format!("{config:?}").contains(secret),
            "the token is redacted"
        );
        for weak in ["short", "has a space in it, long enough"] {
            let text = format!("[admin]\ntoken = \"{weak}\"\n{EXAMPLE}");
            let errors = Config::parse(&text, &|n| (n == "DB_PASSWORD").then(|| "pw".into()))
                .unwrap_err()
                .to_string();
            assert!(errors.contains("[admin] token"), "{weak}: {errors}");
        }
    }

    #[test]
    fn tls_to_redis_is_all_or_nothing_and_its_files_must_load() {
        let env = |n: &str| (n == "DB_PASSWORD").then(|| "pw".to_string());
        let with = |source: &str| {
            let text = EXAMPLE.replace("url = \"redis://127.0.0.1:6379\"", source);
            Config::parse(&text, &env).map_err(|e| e.to_string())
        };
        assert!(with("url = \"rediss://127.0.0.1:6379\"").is_ok());
        // The scheme decides, in any case.
        assert!(
            with("url = \"REDISS://127.0.0.1:6379\"\n[source.tls]\nserver_name = \"redis\"")
                .is_ok()
        );
        let cases = [
            (
                "url = \"redis://127.0.0.1:6379\"\n[source.tls]\nserver_name = \"redis\"",
                "write them as rediss://",
            ),
            (
                "sentinels = [\"rediss://a:26379\", \"redis://b:26379\"]\nmaster_name = \"m\"",
                "some addresses are rediss://",
            ),
            (
                "url = \"rediss://127.0.0.1:6379\"\n[source.tls]\nca_file = \"/nonexistent/ca.pem\"",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                "url = \"rediss://127.0.0.1:6379\"\n[source.tls]\ncert_file = \"/x.pem\"",
                "set both `cert_file` and `key_file`",
            ),
            ("url = \"http://127.0.0.1:6379\"", "use redis:// or rediss://"),
        ];
        for (source, expected) in cases {
            let errors = with(source).unwrap_err();
            assert!(errors.contains(expected), "{source}: {errors}");
        }
    }

    #[test]
    fn every_problem_is_reported_on_its_own_line() {
        let text = EXAMPLE
            .replace(
                "backend = \"mysql\"\ntable = \"car\"",
                "backend = \"pg\"\ntable = \"car\"",
            )
            .replace("prefix = \"car\"", "prefix = \"person2\"")
            .replace("${DB_PASSWORD}", "${MISSING_VAR}");
        let errors = Config::parse(&text, &env).unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(errors.0[0].contains("MISSING_VAR"));
        let text = text.replace("${MISSING_VAR}", "x");
        let errors = Config::parse(&text, &env).unwrap_err();
        assert_eq!(errors.0.len(), 2, "{errors}");
        assert!(errors
            .0
            .iter()
            .any(|e| e.contains("backend `pg` is not defined")));
        assert!(errors
            .0
            .iter()
            .any(|e| e.contains("overlap with mapping `PersonWriteBehind`")));
    }

    /// `[buffer] mirror_journal_mb`: 32 by default, at least 1.
    #[test]
    fn the_mirror_journal_is_at_least_1_mb() {
        let config = Config::parse(EXAMPLE, &env).unwrap();
        assert_eq!(config.buffer.mirror_journal_mb, 32);
        let with = |mb: u64| {
            let text = EXAMPLE.replacen(
                "[buffer]",
                &format!("[buffer]\nmirror_journal_mb = {mb}"),
                1,
            );
            assert_ne!(text, EXAMPLE, "the example has a [buffer] section");
            Config::parse(&text, &env)
        };
        assert_eq!(with(8).unwrap().buffer.mirror_journal_mb, 8);
        let errors = with(0).err().unwrap().to_string();
        assert!(errors.contains("mirror_journal_mb"), "{errors}");
    }

    /// `[replication] stream_spool_mb`: 1024 by default; 0 (never) or at least 16.
    #[test]
    fn the_stream_spool_is_0_or_at_least_16_mb() {
        let config = Config::parse(EXAMPLE, &env).unwrap();
        assert_eq!(config.replication.stream_spool_mb, 1024);
        for (mb, refused) in [(0, false), (8, true), (15, true), (16, false)] {
            let text = format!("{EXAMPLE}\n[replication]\nstream_spool_mb = {mb}\n");
            match Config::parse(&text, &env) {
                Ok(config) => {
                    assert!(!refused, "{mb} accepted");
                    assert_eq!(config.replication.stream_spool_mb, mb);
                }
                Err(errors) => {
                    assert!(refused, "{mb} refused: {errors}");
                    assert!(errors.to_string().contains("stream_spool_mb"), "{errors}");
                }
            }
        }
    }

    /// Partitions: 1 by default; a count out of range, several on SQLite, and a backend name
    /// with `#` (which names partition rows) are each refused on a line of their own.
    #[test]
    fn partitions_are_checked() {
        let config = Config::parse(EXAMPLE, &env).unwrap();
        assert_eq!(config.backends["mysql"].partitions, 1);
        let four = EXAMPLE.replace(
            "url = \"mysql://demouser:${DB_PASSWORD}@localhost:3306/test\"",
            "url = \"mysql://demouser:${DB_PASSWORD}@localhost:3306/test\"\npartitions = 4",
        );
        assert_eq!(
            Config::parse(&four, &env).unwrap().backends["mysql"].partitions,
            4
        );
        for (options, expected) in [
            ("partitions = 0", "must be between 1 and 64"),
            ("partitions = 65", "must be between 1 and 64"),
        ] {
            let text = EXAMPLE.replace(
                "url = \"mysql://demouser:${DB_PASSWORD}@localhost:3306/test\"",
                &format!("url = \"mysql://x@h:1/d\"\n{options}"),
            );
            let error = Config::parse(&text, &env).unwrap_err().to_string();
            assert!(error.contains(expected), "{options}: {error}");
        }
        let sqlite = EXAMPLE.replace(
            "url = \"mysql://demouser:${DB_PASSWORD}@localhost:3306/test\"",
            "url = \"sqlite://x.db\"\npartitions = 2",
        );
        let error = Config::parse(&sqlite, &env).unwrap_err().to_string();
        assert!(error.contains("SQLite takes one writer"), "{error}");
        let hash = EXAMPLE
            .replace("[backends.mysql]", "[backends.\"my#sql\"]")
            .replace("backend = \"mysql\"", "backend = \"my#sql\"");
        let error = Config::parse(&hash, &env).unwrap_err().to_string();
        assert!(error.contains("may not contain `#`"), "{error}");
        for (length, refused) in [
            (MAX_BACKEND_NAME_CHARS, false),
            (MAX_BACKEND_NAME_CHARS + 1, true),
        ] {
            let name = "é".repeat(length);
            let long = EXAMPLE
                .replace("[backends.mysql]", &format!("[backends.\"{name}\"]"))
                .replace("backend = \"mysql\"", &format!("backend = \"{name}\""));
            let parsed = Config::parse(&long, &env).map_err(|e| e.to_string());
            match refused {
                true => assert!(parsed.unwrap_err().contains("at most 185 characters")),
                false => assert!(parsed.is_ok(), "{length} characters: {parsed:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = EXAMPLE.replace(
            "key_column = \"id\"\n[mappings.columns]\nid",
            "key_colum = \"id\"\n[mappings.columns]\nid",
        );
        let errors = Config::parse(&text, &env).unwrap_err();
        assert!(errors.0[0].contains("key_colum"), "{errors}");
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let text = EXAMPLE.replace(
            "url = \"redis://127.0.0.1:6379\"",
            "url = \"redis://u:redispw@127.0.0.1:6379\"\npassword = \"otherpw\"",
        );
        let config = Config::parse(&text, &env).unwrap();
        let shown = format!("{config:?}");
        for secret in ["Password123!", "redispw", "otherpw"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn endpoints_with_credentials() {
        let e = RedisEndpoint::parse("redis://writer:p%40ss@10.0.0.1:6380").unwrap();
        assert_eq!(
            (e.username.as_deref(), e.password.as_deref(), e.port),
            (Some("writer"), Some("p@ss"), 6380)
        );
        let e = RedisEndpoint::parse("redis://:secret@localhost").unwrap();
        assert_eq!(
            (e.username.as_deref(), e.password.as_deref(), e.port),
            (None, Some("secret"), 6379)
        );
        assert!(!format!("{e:?}").contains("secret"));
        assert!(RedisEndpoint::parse("http://x:1").is_err());
        assert_eq!(redact("mysql://u:pw@h/db"), "mysql://u:***@h/db");
    }
}
