//! Certificates for the TLS tests, generated per test (rcgen): a CA, a server certificate for
//! `localhost` (not for `127.0.0.1`: the tests reach the same server by a name its certificate
//! does not carry that way) signed by it, a client certificate signed by it, and a second,
//! unrelated CA (to be refused). PEM files in a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::{free_port, RedisServer, SentinelServer};

pub struct TestCerts {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of the above.
    pub other_ca: PathBuf,
    /// A server certificate for `localhost`, signed by the CA, expired since 2021.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("ca key");
    (params.self_signed(&key).expect("ca"), key)
}

fn leaf(
    names: &[&str],
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, KeyPair),
) -> (String, String) {
    leaf_valid(names, common_name, purpose, issuer, None)
}

/// A certificate valid from January 1st of `years.0` to that of `years.1` (default: rcgen's,
/// 1975 to 4096).
fn leaf_valid(
    names: &[&str],
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, KeyPair),
    years: Option<(i32, i32)>,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    if let Some((from, to)) = years {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![purpose];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer.0, &issuer.1).expect("sign");
    (cert.pem(), key.serialize_pem())
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("dir");
        let path = |name: &str| dir.path().join(name);
        let authority = ca("writebehind test CA");
        let (server_cert, server_key) = leaf(
            &["localhost"],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            &authority,
        );
        let (client_cert, client_key) = leaf(
            &["writebehind"],
            "writebehind",
            ExtendedKeyUsagePurpose::ClientAuth,
            &authority,
        );
        let (expired_cert, expired_key) = leaf_valid(
            &["localhost"],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            &authority,
            Some((2020, 2021)),
        );
        let other = ca("some other CA");
        for (name, text) in [
            ("ca.pem", authority.0.pem()),
            ("server.pem", server_cert),
            ("server.key", server_key),
            ("client.pem", client_cert),
            ("client.key", client_key),
            ("other-ca.pem", other.0.pem()),
            ("expired.pem", expired_cert),
            ("expired.key", expired_key),
        ] {
            std::fs::write(path(name), text).expect("write pem");
        }
        TestCerts {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            client_cert: path("client.pem"),
            client_key: path("client.key"),
            other_ca: path("other-ca.pem"),
            expired_cert: path("expired.pem"),
            expired_key: path("expired.key"),
            dir,
        }
    }

    /// The key files readable by another user (a server run as `postgres` or `mysql`).
    pub fn share_with_servers(&self) {
        use std::os::unix::fs::PermissionsExt;
        for path in [
            &self.dir.path().to_path_buf(),
            &self.server_key,
            &self.server_cert,
            &self.ca,
        ] {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
}

/// A Redis server with a TLS port beside its plain one, or `None` when the server program is
/// built without TLS (the Valkey 8.1.8 of the matrix: the tests then say they were skipped;
/// Debian's Redis and Redis 7.4.1 have it). (the tests' own client and readiness
/// probe use the plain port; the service is given only the TLS one). `client_certificates`:
/// whether clients must present a certificate signed by the CA (`--tls-auth-clients yes`).
pub fn tls_redis(
    certs: &TestCerts,
    client_certificates: bool,
    extra: &[&str],
) -> Option<(RedisServer, u16)> {
    tls_redis_serving(
        certs,
        [&certs.server_cert, &certs.server_key],
        client_certificates,
        extra,
    )
}

/// The same, serving the certificate and key `served`.
pub fn tls_redis_serving(
    certs: &TestCerts,
    served: [&PathBuf; 2],
    client_certificates: bool,
    extra: &[&str],
) -> Option<(RedisServer, u16)> {
    start_with_tls(
        certs,
        served,
        client_certificates,
        extra,
        RedisServer::try_start,
    )
}

/// A server started by `start` with the TLS options (and `extra`), and its TLS port; `None`
/// when the server program is built without TLS.
pub fn start_with_tls(
    certs: &TestCerts,
    served: [&PathBuf; 2],
    client_certificates: bool,
    extra: &[&str],
    start: impl Fn(&[&str]) -> Result<RedisServer, String>,
) -> Option<(RedisServer, u16)> {
    let tls_port = free_port().to_string();
    let file = |p: &PathBuf| p.display().to_string();
    let (cert, key, ca) = (file(served[0]), file(served[1]), file(&certs.ca));
    let mut args = vec![
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        if client_certificates { "yes" } else { "no" },
        "--tls-replication",
        "yes",
    ];
    args.extend(extra);
    match start(&args) {
        Ok(server) => Some((server, tls_port.parse().expect("port"))),
        Err(why) if why.contains("TLS support") => {
            eprintln!("skipped: {} is built without TLS", super::server_program());
            None
        }
        Err(why) => panic!("could not start redis-server with TLS: {why}"),
    }
}

/// A Sentinel monitoring `master_tls_port` over TLS, with a TLS port of its own; that port.
pub fn tls_sentinel(
    certs: &TestCerts,
    master_name: &str,
    master_tls_port: u16,
    quorum: u32,
) -> (SentinelServer, u16) {
    let tls_port = free_port();
    let extra = format!(
        "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes",
        certs.server_cert.display(),
        certs.server_key.display(),
        certs.ca.display()
    );
    let sentinel = SentinelServer::start_with(master_name, master_tls_port, quorum, &extra);
    (sentinel, tls_port)
}
