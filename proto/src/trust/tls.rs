//! TLS for every channel, with rustls (ring) and tokio-rustls:
//!
//! - [`TlsFiles`]: the three PEM files a party holds (`ca.pem`, `cert.pem`,
//!   `key.pem`, as `chaos certs issue --out DIR` writes them);
//! - [`Credentials`]: those files loaded and checked (the key matches the
//!   certificate, the certificate is signed by the CA and carries one chaos
//!   identity);
//! - [`Tls`]: the credentials in force, replaced by [`Tls::reload`] (SIGHUP)
//!   without touching connections already open;
//! - [`incoming`]: a listener's accepted connections after their TLS
//!   handshake, for tonic's `serve_with_incoming_shutdown` (client
//!   certificates are verified when presented; a connection without one
//!   gets UNAUTHENTICATED from the auth layer, per call);
//! - [`Connector`]: the client side, for `Endpoint::connect_with_connector`;
//!   besides the usual chain and host-name checks it checks the server's
//!   identity (role, and name where known), so an agent certificate can
//!   never pass for the coordinator.

use std::{
    future::Future,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::http::Uri;
use tracing::{info, warn};

use super::{
    TrustError,
    identity::{Identity, Role},
};

/// The three PEM files of one party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The fleet's CA certificate: peers are trusted when it signed theirs.
    pub ca: PathBuf,
    /// This party's certificate (with its chain, if any).
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// `DIR/ca.pem`, `DIR/cert.pem`, `DIR/key.pem`.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }
    }
}

/// The crypto provider every config here uses (ring), chosen explicitly so
/// no process-wide default is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let bytes = std::fs::read(path).map_err(|e| TrustError::File { path: path.to_path_buf(), why: format!("reading {what}: {e}") })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::File { path: path.to_path_buf(), why: format!("{what}: not PEM certificates: {e}") })?;
    if certs.is_empty() {
        return Err(TrustError::File { path: path.to_path_buf(), why: format!("{what}: no CERTIFICATE block") });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TrustError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| TrustError::File { path: path.to_path_buf(), why: format!("private key: {e}") })?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "private key readable by group or others: chmod 600 it");
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| TrustError::File { path: path.to_path_buf(), why: format!("private key: {e}") })
}

/// One party's credentials, loaded and checked.
pub struct Credentials {
    pub files: TlsFiles,
    /// Who this party is (from its certificate).
    pub identity: Identity,
    /// When its certificate expires.
    pub not_after: SystemTime,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Credentials").field("identity", &self.identity).field("files", &self.files).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Load and check `files`.
    pub fn load(files: &TlsFiles) -> Result<Credentials, TrustError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca, "CA certificate")? {
            roots.add(ca).map_err(|e| TrustError::File { path: files.ca.clone(), why: format!("CA certificate unusable: {e}") })?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&files.cert, "certificate")?;
        let key = read_key(&files.key)?;
        let leaf = &chain[0];
        let identity =
            Identity::from_cert_der(leaf.as_ref()).map_err(|e| TrustError::File { path: files.cert.clone(), why: e.to_string() })?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| TrustError::File {
            path: files.key.clone(),
            why: format!("does not match the certificate {}: {e}", files.cert.display()),
        })?;
        let info = super::certs::describe(leaf.as_ref())?;
        // Our own certificate must verify against our CA, as peers will check it.
        let check = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TrustError::Tls(format!("client verifier: {e}")))?;
        check
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(|e| TrustError::File { path: files.cert.clone(), why: format!("not accepted with CA {}: {e}", files.ca.display()) })?;
        let server = server_config(&roots, &chain, &key, &provider)?;
        Ok(Credentials { files: files.clone(), identity, not_after: info.not_after, roots, chain, key, server: Arc::new(server) })
    }

    /// A client config that presents this party's certificate and accepts a
    /// server only with the identity `expect` describes.
    pub fn client_config(&self, expect: &Expect) -> Result<ClientConfig, TrustError> {
        let provider = provider();
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::clone(&self.roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TrustError::Tls(format!("server verifier: {e}")))?;
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExpectVerifier { inner, expect: expect.clone() }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TrustError::Tls(format!("client certificate: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

fn server_config(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &Arc<CryptoProvider>,
) -> Result<ServerConfig, TrustError> {
    // A client certificate is verified when presented; one that is absent
    // is refused per call by the auth layer, with a message a person can use.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider))
        .allow_unauthenticated()
        .build()
        .map_err(|e| TrustError::Tls(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map_err(|e| TrustError::Tls(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The identity a client requires of the server it dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub role: Role,
    /// None: any name with that role.
    pub name: Option<String>,
}

impl Expect {
    pub fn coordinator() -> Expect {
        Expect { role: Role::Coordinator, name: None }
    }
    /// An agent; with a name, that agent only.
    pub fn agent(name: Option<&str>) -> Expect {
        Expect { role: Role::Agent, name: name.map(str::to_string) }
    }
}

/// rustls' own server verification (chain, validity, host name), then the
/// server's chaos identity.
#[derive(Debug)]
struct ExpectVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: Expect,
}

impl ServerCertVerifier for ExpectVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let id = Identity::from_cert_der(end_entity.as_ref()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let name_ok = self.expect.name.as_ref().is_none_or(|n| *n == id.name);
        if id.role != self.expect.role || !name_ok {
            let want = match &self.expect.name {
                Some(n) => format!("{n} ({})", self.expect.role),
                None => format!("a {}", self.expect.role),
            };
            return Err(rustls::Error::General(format!("the server at {server_name:?} is {id}, not {want}")));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The credentials in force; [`Tls::reload`] swaps them for new
/// connections while open ones keep theirs.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<Credentials>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TrustError> {
        let creds = Credentials::load(&files)?;
        Ok(Arc::new(Tls { files, current: RwLock::new(Arc::new(creds)) }))
    }

    /// Load the files again; on any error the credentials in force stay.
    pub fn reload(&self) -> Result<Arc<Credentials>, TrustError> {
        let fresh = Arc::new(Credentials::load(&self.files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        Ok(fresh)
    }

    pub fn current(&self) -> Arc<Credentials> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Reload `tls` on every SIGHUP, logging the identity and expiry now in
/// force, or why the reload failed (the old credentials then stay).
pub async fn reload_on_sighup(tls: Arc<Tls>, what: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("{what}: cannot install the SIGHUP handler; certificates reload only at restart");
        return;
    };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(c) => info!(identity = %c.identity, expires = %humantime::format_rfc3339_seconds(c.not_after),
                cert = %c.files.cert.display(), "{what}: certificates reloaded on SIGHUP; new connections use them"),
            Err(e) => warn!(error = %e, "{what}: certificate reload on SIGHUP failed; the previous certificates stay in force"),
        }
    }
}

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once (beyond it, accepting waits).
const MAX_HANDSHAKES: usize = 256;

/// The server side: accepted connections after their TLS handshake (with
/// the credentials in force when each began). Handshakes run side by side;
/// a failed one is logged with the peer's address and dropped. The accept
/// loop ends, releasing the listener, when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> tokio_stream::wrappers::ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.current().server));
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => info!(peer = %peer, error = %e, "TLS handshake refused"),
                    Err(_) => info!(peer = %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The client side of TLS for `Endpoint::connect_with_connector`: TCP to
/// the URI's host and port, then a handshake with the credentials in force
/// at that moment, requiring the server identity in `expect`.
#[derive(Clone, Debug)]
pub struct Connector {
    pub tls: Arc<Tls>,
    pub expect: Expect,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The host (without IPv6 brackets) and port of a URI; port 443 when absent.
pub fn host_port(uri: &Uri) -> Result<(String, u16), TrustError> {
    let host = uri.host().ok_or_else(|| TrustError::Invalid { field: "url".into(), why: format!("{uri} has no host") })?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

fn server_name(host: &str) -> Result<ServerName<'static>, TrustError> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_string())
            .map_err(|e| TrustError::Invalid { field: "url".into(), why: format!("{host:?} is not a host name: {e}") }),
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (tls, expect) = (Arc::clone(&self.tls), self.expect.clone());
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            let name = server_name(&host)?;
            let config = tls.current().client_config(&expect)?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// What a server presented (`chaos certs show https://HOST:PORT`).
#[derive(Debug, Clone)]
pub struct Presented {
    /// Its chain, leaf first (DER).
    pub chain: Vec<CertificateDer<'static>>,
    /// Why the chain does not verify with our CA and the host name; None
    /// when it does (or when no CA was given to check it with).
    pub rejected: Option<String>,
}

/// Records what the server presents and lets the handshake finish (no
/// request is ever sent on it), with the verdict of rustls' own check.
#[derive(Debug)]
struct Recorder {
    inner: Option<Arc<WebPkiServerVerifier>>,
    seen: std::sync::Mutex<Option<Presented>>,
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let rejected = self
            .inner
            .as_ref()
            .and_then(|v| v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now).err().map(|e| e.to_string()));
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Presented { chain, rejected });
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// Handshake with `host:port` and return what it presented, checked with
/// the CA of `ours` when given. No client certificate is sent and no
/// request is made: this only looks.
pub async fn presented(host: &str, port: u16, ours: Option<&Tls>, timeout: Duration) -> Result<Presented, TrustError> {
    let provider = provider();
    let inner = match ours {
        Some(t) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&t.current().roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TrustError::Tls(format!("server verifier: {e}")))?,
        ),
        None => None,
    };
    let schemes = provider.signature_verification_algorithms.supported_schemes();
    let recorder = Arc::new(Recorder { inner, seen: std::sync::Mutex::new(None), schemes });
    let mut cfg = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = server_name(host)?;
    let work = async {
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| TrustError::Tls(format!("connecting to {host}:{port}: {e}")))?;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| TrustError::Tls(format!("TLS with {host}:{port}: {e}")))
    };
    let handshake = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| TrustError::Tls(format!("no TLS handshake with {host}:{port} within {timeout:?}")));
    let seen = recorder.seen.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (seen, handshake) {
        (Some(p), _) => Ok(p),
        (None, Err(e)) | (None, Ok(Err(e))) => Err(e),
        (None, Ok(Ok(_))) => Err(TrustError::Tls(format!("{host}:{port} presented no certificate"))),
    }
}
