//! libpq's TLS parameters in a `postgres://` URL, for tokio-postgres with rustls.
//!
//! `sslmode` as libpq means it: `disable` (plain text); `prefer`, the default (TLS when the
//! server offers it, plain text otherwise, the certificate not verified); `require` (TLS or no
//! connection, the certificate not verified, or its chain verified when `sslrootcert` is
//! given); `verify-ca` (the chain verified); `verify-full` (the chain and the host name).
//! `sslrootcert=<file>` names the trusted CAs, which the verifying modes need; `system` (the
//! public CAs) goes only with `verify-full`, as in libpq, since any public certificate would
//! pass a chain-only check;
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
    let (rest, taken) = crate::sink::url_parameters::take(url, |name| {
        matches!(name, "sslmode" | "sslrootcert" | "sslcert" | "sslkey")
    });
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    for (name, value) in taken {
        match name.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root = Some(value),
            "sslcert" => cert = Some(PathBuf::from(value)),
            _ => key = Some(PathBuf::from(value)),
        }
    }
    let mode = mode.unwrap_or_else(|| "prefer".to_string());
    // As libpq: the public CAs (`system`) only with the host name checked too, and the
    // verifying modes only against a named trust anchor.
    match (mode.as_str(), root.as_deref()) {
        ("verify-full", _) | (_, None) => {}
        (_, Some("system")) => {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (not {mode}): any public certificate would pass"
            ))
        }
        _ => {}
    }
    if mode.starts_with("verify-") && root.is_none() {
        return Err(format!(
            "sslmode={mode} needs sslrootcert=<CA file> (or, with verify-full, sslrootcert=system for the public CAs)"
        ));
    }
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
        rest,
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
        let dir = tempfile::tempdir().expect("dir");
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).expect("ca").pem()).expect("write");
        let (url, tls) = split(&format!(
            "postgres://u:p@h:5432/db?application_name=wb&sslmode=verify-ca&sslrootcert={}",
            ca.display()
        ))
        .unwrap();
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
