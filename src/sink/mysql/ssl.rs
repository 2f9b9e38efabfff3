//! The TLS parameters of the mysql client and JDBC in a `mysql://` URL, for mysql_async with
//! rustls.
//!
//! `ssl-mode` (also `ssl_mode`, any case) as the mysql client means it: `DISABLED` (plain
//! text); `PREFERRED`, the default (TLS when the server offers it, plain text otherwise, the
//! certificate not verified); `REQUIRED` (TLS or no connection, not verified); `VERIFY_CA` (the
//! chain verified, against `ssl-ca`, which it needs; mysql_async 0.37 with rustls 0.23 checks the
//! host name as well: its test for a name mismatch looks for an error text rustls no longer
//! writes, so this mode is as strict as the next); `VERIFY_IDENTITY` (the chain and the host
//! name). `ssl-ca=<file>` names the trusted CAs (default: the public CAs), `ssl-cert=<file>` and `ssl-key=<file>` a client
//! certificate. mysql_async's own `require_ssl`, `verify_ca` and `verify_identity` are refused:
//! one way to say it. The parameters are taken out of the URL before mysql_async reads the
//! rest.

use std::path::PathBuf;

use mysql_async::{ClientIdentity, SslOpts};

/// The TLS settings of one MySQL backend.
#[derive(Debug, Clone)]
pub struct MyTls {
    /// `None` for `DISABLED`.
    pub ssl: Option<SslOpts>,
    /// `PREFERRED`: a server without TLS is served in plain text.
    pub plain_allowed: bool,
    /// `ssl-mode` and what it verifies against, for `check`.
    pub describe: String,
}

/// Splits the TLS parameters off `url`: the URL for mysql_async, and the settings.
pub fn split(url: &str) -> Result<(String, MyTls), String> {
    let canonical = |name: &str| name.replace('_', "-");
    let (rest, taken) = crate::sink::url_parameters::take(url, |name| {
        matches!(
            canonical(name).as_str(),
            "ssl-mode"
                | "ssl-ca"
                | "ssl-cert"
                | "ssl-key"
                | "require-ssl"
                | "verify-ca"
                | "verify-identity"
        )
    });
    let (mut mode, mut ca, mut cert, mut key) = (None, None, None, None);
    for (name, value) in taken {
        match canonical(&name).as_str() {
            "ssl-mode" => mode = Some(value.to_ascii_uppercase()),
            "ssl-ca" => ca = Some(PathBuf::from(value)),
            "ssl-cert" => cert = Some(PathBuf::from(value)),
            "ssl-key" => key = Some(PathBuf::from(value)),
            _ => return Err(format!("use ssl-mode=... instead of `{name}`")),
        }
    }
    let mode = mode.unwrap_or_else(|| "PREFERRED".to_string());
    let against = ca
        .as_ref()
        .map_or_else(|| "the public CAs".to_string(), |p| p.display().to_string());
    let (verify_chain, verify_name, describe) = match mode.as_str() {
        "DISABLED" => {
            let tls = MyTls {
                ssl: None,
                plain_allowed: true,
                describe: "ssl-mode=DISABLED".into(),
            };
            return Ok((rest, tls));
        }
        "PREFERRED" | "REQUIRED" => (false, false, "the certificate is not verified".into()),
        // mysql_async 0.37 with rustls 0.23 checks the name as well (design 9.6).
        "VERIFY_CA" => (true, false, format!("chain verified against {against} (the name too, by the driver)")),
        "VERIFY_IDENTITY" => (
            true,
            true,
            format!("chain and host name verified against {against}"),
        ),
        other => {
            return Err(format!(
                "ssl-mode={other} is not supported; use DISABLED, PREFERRED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY"
            ))
        }
    };
    if mode == "VERIFY_CA" && ca.is_none() {
        // Any certificate a public CA signed, for any name, would pass.
        return Err("ssl-mode=VERIFY_CA needs ssl-ca=<CA file>".to_string());
    }
    for file in ca.iter().chain(&cert).chain(&key) {
        std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    }
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(ClientIdentity::new(cert.into(), key.into())),
        (None, None) => None,
        _ => return Err("set both ssl-cert and ssl-key, or neither".to_string()),
    };
    let mut ssl = SslOpts::default()
        .with_client_identity(identity)
        .with_danger_accept_invalid_certs(!verify_chain)
        .with_danger_skip_domain_validation(!verify_name);
    if let Some(ca) = ca {
        // The given CAs only, as for the other connections.
        ssl = ssl
            .with_root_certs(vec![ca.into()])
            .with_disable_built_in_roots(true);
    }
    let tls = MyTls {
        ssl: Some(ssl),
        plain_allowed: mode == "PREFERRED",
        describe: format!("ssl-mode={mode}: {describe}"),
    };
    Ok((rest, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_read() {
        let (url, tls) = split(
            "mysql://u:p@h:3306/db?ssl-mode=verify_ca&ssl_ca=/etc/hostname&prefer_socket=false",
        )
        .unwrap();
        assert_eq!(url, "mysql://u:p@h:3306/db?prefer_socket=false");
        assert!(tls.ssl.is_some() && !tls.plain_allowed);
        assert!(
            tls.describe.contains("VERIFY_CA: chain verified"),
            "{}",
            tls.describe
        );
        let (url, tls) = split("mysql://h/db").unwrap();
        assert_eq!(url, "mysql://h/db");
        assert!(
            tls.ssl.is_some() && tls.plain_allowed,
            "PREFERRED by default"
        );
        let (_, tls) = split("mysql://h/db?ssl_mode=DISABLED").unwrap();
        assert!(tls.ssl.is_none());
        for (url, expected) in [
            ("mysql://h/db?ssl-mode=SOMETIMES", "not supported"),
            ("mysql://h/db?require_ssl=true", "use ssl-mode"),
            (
                "mysql://h/db?ssl-mode=REQUIRED&ssl-cert=/",
                "both ssl-cert and ssl-key",
            ),
            (
                "mysql://h/db?ssl-mode=VERIFY_CA&ssl-ca=/none.pem",
                "cannot read /none.pem",
            ),
        ] {
            let error = split(url).err().unwrap_or_default();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
