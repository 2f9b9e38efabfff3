//! libpq's TLS parameters in a `postgres://` URL, for tokio-postgres with rustls.
//!
//! `sslmode` as libpq means it: `disable` (plain text); `prefer`, the default (TLS when the
//! server offers it, plain text otherwise, the certificate not verified); `require` (TLS or no
//! connection, the certificate not verified, or its chain verified when `sslrootcert` is
//! given); `verify-ca` (the chain verified); `verify-full` (the chain and the host name).
//! `sslrootcert=<file>` names the trusted CAs (default: the public CAs; `system` means them too),
//! `sslcert=<file>` and `sslkey=<file>` a client certificate. `allow` is refused (it would try
//! plain text first). The parameters are taken out of the URL before tokio-postgres reads the
//! rest.

use std::path::{Path, PathBuf};

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{client_config, Seen, Verify};

/// The TLS settings of one PostgreSQL backend.
pub struct PgTls {
    pub mode: SslMode,
    pub connector: MakeRustlsConnect,
    /// The certificate the connector last accepted.
    pub seen: Seen,
    /// `sslmode` and what it verifies against, for `check`.
    pub describe: String,
}

/// Splits the TLS parameters off `url`: the URL for tokio-postgres, and the settings.
pub fn split(url: &str) -> Result<(String, PgTls), String> {
    let mut parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let mut kept = Vec::new();
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    for (name, value) in parsed.query_pairs() {
        match &*name {
            "sslmode" => mode = Some(value.into_owned()),
            "sslrootcert" => root = Some(value.into_owned()),
            "sslcert" => cert = Some(PathBuf::from(&*value)),
            "sslkey" => key = Some(PathBuf::from(&*value)),
            _ => kept.push((name.into_owned(), value.into_owned())),
        }
    }
    parsed.set_query(None);
    if !kept.is_empty() {
        parsed.query_pairs_mut().extend_pairs(kept);
    }
    let mode = mode.unwrap_or_else(|| "prefer".to_string());
    let root = root.filter(|r| r != "system").map(PathBuf::from);
    let (ssl_mode, verify) = match (mode.as_str(), &root) {
        ("disable", _) => (SslMode::Disable, Verify::Nothing),
        ("prefer", _) => (SslMode::Prefer, Verify::Nothing),
        ("require", None) => (SslMode::Require, Verify::Nothing),
        ("require", Some(_)) | ("verify-ca", _) => (SslMode::Require, Verify::ChainOnly),
        ("verify-full", _) => (SslMode::Require, Verify::Full),
        (other, _) => {
            return Err(format!(
                "sslmode={other} is not supported; use disable, prefer, require, verify-ca or verify-full"
            ))
        }
    };
    let identity = match (&cert, &key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        _ => return Err("set both sslcert and sslkey, or neither".to_string()),
    };
    let (config, seen) = client_config(root.as_deref(), identity, verify)?;
    let against = root.as_deref().map_or_else(
        || "the public CAs".to_string(),
        |p: &Path| p.display().to_string(),
    );
    let describe = match verify {
        Verify::Full => format!("sslmode={mode}: chain and host name verified against {against}"),
        Verify::ChainOnly => format!("sslmode={mode}: chain verified against {against}"),
        Verify::Nothing => format!("sslmode={mode}: the certificate is not verified"),
    };
    Ok((
        parsed.to_string(),
        PgTls {
            mode: ssl_mode,
            connector: MakeRustlsConnect::new(config),
            seen,
            describe,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_read() {
        let (url, tls) =
            split("postgres://u:p@h:5432/db?application_name=wb&sslmode=verify-ca").unwrap();
        assert_eq!(url, "postgres://u:p@h:5432/db?application_name=wb");
        assert!(matches!(tls.mode, SslMode::Require));
        assert!(tls.describe.contains("chain verified"), "{}", tls.describe);
        let (url, tls) = split("postgres://h/db").unwrap();
        assert_eq!(url, "postgres://h/db");
        assert!(matches!(tls.mode, SslMode::Prefer));
        let (_, tls) = split("postgres://h/db?sslmode=disable").unwrap();
        assert!(matches!(tls.mode, SslMode::Disable));
        for (url, expected) in [
            ("postgres://h/db?sslmode=allow", "not supported"),
            ("postgres://h/db?sslcert=/c.pem", "both sslcert and sslkey"),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=/none.pem",
                "cannot read /none.pem",
            ),
        ] {
            let error = split(url).err().unwrap_or_default();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
