//! TLS for every connection: one stack, rustls with the ring provider (no OpenSSL at build or
//! run time; docs/design.md 9.3 says why).
//!
//! **What is verified.** [`Verify::Full`] checks the server's chain against the trusted roots
//! (a `ca_file`, or the public CAs of `webpki-roots` without one) and its name (the host the
//! address names, or `server_name`); [`Verify::ChainOnly`] the chain alone (`ssl-mode=VERIFY_CA`,
//! `sslmode=verify-ca`); [`Verify::Nothing`] only encrypts (`ssl-mode=REQUIRED`,
//! `sslmode=require`, as the databases' own clients mean them). Redis is always verified in
//! full.
//!
//! **Redis over TLS** (`rediss://`, [`connect_redis`]): the replication link hands its socket
//! to the snapshot spool's thread, which reads it with blocking calls and timeouts
//! (`replication/spool.rs`), and a rustls stream cannot move between async and blocking code.
//! So a TLS connection to Redis is terminated in a task of its own that relays the plaintext
//! over a loopback TCP connection, and every Redis connection, TLS or not, is a plain
//! `TcpStream` to the code above it. The loopback peer is checked to be our own socket; a TLS
//! failure after the handshake is logged by the relay and ends the connection like a closed
//! socket.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// `[source.tls]`: files for TLS to Redis.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificates of the CAs to trust (default: the public CAs).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for servers that ask for one (`tls-auth-clients yes`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when the address does not (an IP).
    pub server_name: Option<String>,
}

/// How much of the server's certificate is checked (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Full,
    ChainOnly,
    Nothing,
}

/// The server certificate a configuration last accepted: subject and issuer.
pub type Seen = Arc<std::sync::Mutex<Option<(String, String)>>>;

/// A client configuration: `ca_file` (or the public CAs), an optional client identity
/// (`cert_file`, `key_file`), and how much to verify; with the slot where it records the
/// server certificate it accepts. Errors name the file and what is wrong.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    verify: Verify,
) -> Result<(ClientConfig, Seen), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let roots = Arc::new(root_store(ca_file)?);
    let chain = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let seen = Seen::default();
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            chain,
            verify,
            seen: seen.clone(),
        }));
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = certificates(cert_file)?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                format!("cannot read a private key from {}: {e}", key_file.display())
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{} and {}: {e}", cert_file.display(), key_file.display()))?
        }
    };
    Ok((config, seen))
}

fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            for certificate in certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
    }
    Ok(roots)
}

/// The PEM certificates of `path` (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let read = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match read.is_empty() {
        true => Err(format!("{} holds no PEM certificate", path.display())),
        false => Ok(read),
    }
}

/// rustls's own verification, relaxed as `verify` says (handshake signatures are always
/// checked), recording the certificate it accepts.
#[derive(Debug)]
struct Verifier {
    chain: Arc<WebPkiServerVerifier>,
    verify: Verify,
    seen: Seen,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = match self.verify {
            Verify::Nothing => Ok(ServerCertVerified::assertion()),
            Verify::Full => self.chain.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            Verify::ChainOnly => match self.chain.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
        }?;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(names_of(end_entity));
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// TLS settings of the Redis connections (`rediss://`).
#[derive(Debug, Clone)]
pub struct RedisTls {
    config: Arc<ClientConfig>,
    /// The name to verify instead of the address's host.
    server_name: Option<String>,
    /// Where the trusted roots come from, for messages.
    roots: String,
}

impl PartialEq for RedisTls {
    fn eq(&self, other: &RedisTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for RedisTls {}

impl RedisTls {
    /// From `[source.tls]`.
    pub fn from_files(files: &TlsFiles) -> Result<RedisTls, String> {
        let identity = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err("[source.tls]: set both `cert_file` and `key_file`, or neither".into())
            }
        };
        let (config, _) = client_config(files.ca_file.as_deref(), identity, Verify::Full)
            .map_err(|e| format!("[source.tls]: {e}"))?;
        Ok(RedisTls {
            config: Arc::new(config),
            server_name: files.server_name.clone(),
            roots: files
                .ca_file
                .as_ref()
                .map_or_else(|| "the public CAs".to_string(), |p| p.display().to_string()),
        })
    }

    /// `rediss://` without `[source.tls]`: the public CAs, the address's host. Built once.
    pub fn public() -> Result<RedisTls, String> {
        static PUBLIC: OnceLock<Result<RedisTls, String>> = OnceLock::new();
        PUBLIC
            .get_or_init(|| {
                let (config, _) = client_config(None, None, Verify::Full)?;
                Ok(RedisTls {
                    config: Arc::new(config),
                    server_name: None,
                    roots: "the public CAs".into(),
                })
            })
            .clone()
    }
}

/// What a TLS handshake established, for `check`, and how the connection failed since.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub version: String,
    /// The server certificate's subject and issuer.
    pub subject: String,
    pub issuer: String,
    /// The roots it was verified against.
    pub roots: String,
    /// The TLS error that ended the relay, set before it closes the loopback connection (so
    /// whoever sees the connection end finds it here).
    failure: Arc<OnceLock<String>>,
}

impl Negotiated {
    /// The TLS error that ended the connection, if TLS ended it (a server refusing the client
    /// certificate, say: TLS 1.3 tells the client after the handshake).
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

impl std::fmt::Display for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, certificate `{}` issued by `{}`, verified against {}",
            self.version, self.subject, self.issuer, self.roots
        )
    }
}

/// The subject and issuer of a DER certificate (`?` where it cannot be read).
pub fn names_of(certificate: &[u8]) -> (String, String) {
    use x509_cert::der::Decode;
    match x509_cert::Certificate::from_der(certificate) {
        Ok(c) => (
            c.tbs_certificate.subject.to_string(),
            c.tbs_certificate.issuer.to_string(),
        ),
        Err(_) => ("?".into(), "?".into()),
    }
}

/// Connects to Redis at `host:port`, with TLS when `tls` is given (see the module doc), within
/// `timeout`; the connection and, with TLS, what the handshake established.
pub async fn connect_redis(
    host: &str,
    port: u16,
    tls: Option<&RedisTls>,
    timeout: Duration,
) -> io::Result<(TcpStream, Option<Negotiated>)> {
    let connecting = async {
        let address = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        let tcp = TcpStream::connect(&address).await?;
        tcp.set_nodelay(true).ok();
        let Some(tls) = tls else {
            return Ok((tcp, None));
        };
        let name = tls.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{name}` is not a server name: {e}"),
            )
        })?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let stream = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS: {e} (trusted: {})", tls.roots)))?;
        let connection = stream.get_ref().1;
        let (subject, issuer) = connection
            .peer_certificates()
            .and_then(|c| c.first())
            .map_or(("?".into(), "?".into()), |c| names_of(c));
        let negotiated = Negotiated {
            version: connection
                .protocol_version()
                .map_or("TLS".into(), |v| format!("{v:?}").replace('_', ".")),
            subject,
            issuer,
            roots: tls.roots.clone(),
            failure: Arc::default(),
        };
        let ours = relay(stream, address, negotiated.failure.clone()).await?;
        Ok((ours, Some(negotiated)))
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?
}

/// How long the relay waits for the server to close after our side has.
const RELAY_GRACE: Duration = Duration::from_secs(5);

/// Relays `stream` over a loopback connection (see the module doc); our end of it.
async fn relay(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    address: String,
    failure: Arc<OnceLock<String>>,
) -> io::Result<TcpStream> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let ours = TcpStream::connect(listener.local_addr()?).await?;
    let (mut theirs, peer) = listener.accept().await?;
    if peer != ours.local_addr()? {
        return Err(io::Error::other(
            "another process connected to the TLS relay's loopback port",
        ));
    }
    drop(listener);
    ours.set_nodelay(true).ok();
    theirs.set_nodelay(true).ok();
    tokio::spawn(async move {
        let (mut from_server, mut to_server) = tokio::io::split(stream);
        let (mut from_us, mut to_us) = theirs.split();
        let upstream = async {
            tokio::io::copy(&mut from_us, &mut to_server).await?;
            to_server.shutdown().await
        };
        let downstream = tokio::io::copy(&mut from_server, &mut to_us);
        tokio::pin!(upstream, downstream);
        let ended = tokio::select! {
            // The server's side ended (closed, or a TLS error): our end closes with the task.
            down = &mut downstream => down.map(|_| ()),
            // Our side closed: the server has a moment to close too, then the task ends
            // whatever it does (a frozen server must not keep it forever).
            up = &mut upstream => {
                let _ = tokio::time::timeout(RELAY_GRACE, &mut downstream).await;
                up
            }
        };
        if let Err(error) = ended {
            tracing::debug!(redis = %address, %error, "the TLS connection to Redis ended");
            let _ = failure.set(format!("TLS: {error}"));
        }
        // `theirs` closes here, after the failure is recorded.
    });
    Ok(ours)
}
