//! Redis addresses: `redis://[user:password@]host:port` (`rediss://` for TLS), and redaction of
//! secrets in URLs.

use std::fmt;

/// A Redis server address with optional credentials: `redis://[user:password@]host:port`, or
/// `rediss://` for TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisEndpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS settings (`rediss://`): the public CAs until `[source.tls]` is applied
    /// (`Discovery::from_config`).
    pub tls: Option<crate::tls::RedisTls>,
}

/// Why a Redis address cannot be used (the text says which and why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EndpointError(String);

impl RedisEndpoint {
    /// Parses `redis://[user:password@]host[:port]` or `rediss://...` (user and password
    /// percent-decoded; a password alone is `redis://:password@host`). A bare `host:port` is
    /// accepted too (plain TCP).
    pub fn parse(text: &str) -> Result<RedisEndpoint, EndpointError> {
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("redis://{text}")
        };
        let url = url::Url::parse(&with_scheme)
            .map_err(|e| EndpointError(format!("`{}` is not a redis:// URL: {e}", redact(text))))?;
        let tls = match url.scheme() {
            "redis" => None,
            "rediss" => Some(crate::tls::RedisTls::public().map_err(EndpointError)?),
            other => {
                return Err(EndpointError(format!(
                    "`{}` uses scheme `{other}`; use redis:// or rediss:// (TLS)",
                    redact(text),
                )))
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| EndpointError(format!("`{}` has no host", redact(text))))?;
        let decode = |s: &str| percent_decode(s);
        let username = Some(decode(url.username())).filter(|u| !u.is_empty());
        let password = url.password().map(decode);
        if url.path() != "" && url.path() != "/" {
            return Err(EndpointError(format!(
                "`{}`: a database path is not supported; databases are chosen per mapping",
                redact(text)
            )));
        }
        Ok(RedisEndpoint {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: url.port().unwrap_or(6379),
            username,
            password,
            tls,
        })
    }

    /// `host:port`, for connecting and for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Never print a password.
impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("address", &self.address())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

pub(crate) fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}
