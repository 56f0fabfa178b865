//! A small certificate authority for one fleet (behind `chaos certs`):
//! make a CA, issue a key pair whose URI SAN carries an identity and role,
//! and describe a certificate. Keys are ECDSA P-256 made by rcgen;
//! certificates are read back with x509-parser; nothing here encodes ASN.1
//! by hand.
//!
//! Files are written atomically (a temporary file renamed over the target),
//! keys with mode 0600, so a daemon reloading on SIGHUP never reads half a
//! file.

use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};

use super::{
    TrustError,
    identity::{Identity, Role, uris},
};

/// The CA's files in its directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// Default lifetime of an issued certificate.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of a CA.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

fn rc(what: &str) -> impl Fn(rcgen::Error) -> TrustError + '_ {
    move |e| TrustError::Certificate(format!("{what}: {e}"))
}

fn random_serial() -> SerialNumber {
    let mut b = uuid::Uuid::new_v4().as_bytes().to_vec();
    // Positive and never starting with a zero byte.
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from(b)
}

/// A self-signed CA named `name`, valid from an hour ago for `valid_for`.
pub fn new_ca(name: &str, valid_for: Duration) -> Result<Issued, TrustError> {
    let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("chaos fleet CA {name}"));
    dn.push(DnType::OrganizationName, "chaos");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + valid_for).into();
    p.serial_number = Some(random_serial());
    let cert = p.self_signed(&key).map_err(rc("signing the CA"))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Request {
    pub identity: Identity,
    /// Extra DNS names and IP addresses (service roles only).
    pub sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Request {
    /// Valid from a minute ago (clock skew) for `valid_for`.
    pub fn new(identity: Identity, sans: Vec<String>, valid_for: Duration) -> Request {
        let now = SystemTime::now();
        Request { identity, sans, not_before: now - Duration::from_secs(60), not_after: now + valid_for }
    }

    /// The DNS and IP names of a service certificate: the given ones, then
    /// the name (when it is a host name), `localhost` and the loopback
    /// addresses; none for people.
    pub fn names(&self) -> Vec<String> {
        if !self.identity.role.is_service() {
            return self.sans.clone();
        }
        let mut out = self.sans.clone();
        let name = &self.identity.name;
        let host_like = name.contains(|c: char| c.is_ascii_alphabetic()) && !name.contains('_');
        let defaults = [host_like.then(|| name.clone()), Some("localhost".into()), Some("127.0.0.1".into()), Some("::1".into())];
        for n in defaults.into_iter().flatten() {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }
}

/// Issue `req` with the CA (its certificate and key, PEM).
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, req: &Request) -> Result<Issued, TrustError> {
    if !req.identity.role.is_service() && !req.sans.is_empty() {
        return Err(TrustError::Invalid {
            field: "san".into(),
            why: format!(
                "a {} certificate is a client certificate: host names and addresses are for agent and coordinator",
                req.identity.role
            ),
        });
    }
    if req.not_after <= req.not_before {
        return Err(TrustError::Invalid { field: "expiry".into(), why: "must be after the start of validity".into() });
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(rc("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(rc("reading the CA certificate"))?;
    let key = KeyPair::generate().map_err(rc("generating a key"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.identity.name.clone());
    dn.push(DnType::OrganizationName, "chaos");
    dn.push(DnType::OrganizationalUnitName, req.identity.role.as_str());
    p.distinguished_name = dn;
    let uri = req.identity.uri().try_into().map_err(rc("identity URI"))?;
    p.subject_alt_names.push(SanType::URI(uri));
    for n in req.names() {
        p.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into().map_err(|e| TrustError::Invalid {
                field: "san".into(),
                why: format!("{n:?} is neither an IP address nor a DNS name: {e}"),
            })?),
        });
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if req.identity.role.is_service() {
        p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    p.use_authority_key_identifier_extension = true;
    p.not_before = req.not_before.into();
    p.not_after = req.not_after.into();
    p.serial_number = Some(random_serial());
    let cert = p.signed_by(&key, &issuer).map_err(rc("signing"))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Write `contents` to `path` atomically with `mode`; an existing file is
/// replaced only with `force`.
pub fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), TrustError> {
    let err = |why: String| TrustError::File { path: path.to_path_buf(), why };
    if path.exists() && !force {
        return Err(err("exists; pass --force to replace it".into()));
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // The mode of an existing temporary file is not changed by open.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(format!("writing: {e}"))
    })
}

fn make_dir(dir: &Path, mode: u32) -> Result<(), TrustError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| TrustError::File { path: dir.to_path_buf(), why: format!("creating the directory: {e}") })
}

fn read(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|e| TrustError::File { path: path.to_path_buf(), why: e.to_string() })
}

/// `chaos certs init DIR`: a new CA in `DIR` (`ca.pem`, and `ca.key` with
/// mode 0600; the directory 0700). An existing CA is never replaced.
pub fn init_ca_dir(dir: &Path, name: &str, valid_for: Duration) -> Result<PathBuf, TrustError> {
    let key_path = dir.join(CA_KEY);
    if key_path.exists() {
        return Err(TrustError::File {
            path: key_path,
            why: "a CA already lives here; it is never replaced (certificates it signed would stop working)".into(),
        });
    }
    make_dir(dir, 0o700)?;
    let ca = new_ca(name, valid_for)?;
    write_file(&key_path, ca.key_pem.as_bytes(), 0o600, false)?;
    let cert = dir.join(CA_CERT);
    write_file(&cert, ca.cert_pem.as_bytes(), 0o644, true)?;
    Ok(cert)
}

/// The files `issue_to_dir` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// `chaos certs issue`: issue `req` with the CA in `ca_dir` into `out`
/// (`cert.pem`, `key.pem` 0600, and a copy of `ca.pem`: everything a
/// binary's `--tls-dir` needs).
pub fn issue_to_dir(ca_dir: &Path, req: &Request, out: &Path, force: bool) -> Result<Written, TrustError> {
    let ca_cert = read(&ca_dir.join(CA_CERT))?;
    let ca_key = read(&ca_dir.join(CA_KEY))?;
    let issued = issue(&ca_cert, &ca_key, req)?;
    make_dir(out, 0o700)?;
    let w = Written { cert: out.join("cert.pem"), key: out.join("key.pem"), ca: out.join("ca.pem") };
    for p in [&w.cert, &w.key] {
        if p.exists() && !force {
            return Err(TrustError::File { path: p.clone(), why: "exists; pass --force to replace it".into() });
        }
    }
    // Key first: a reload between the two writes fails the key check and
    // keeps the old pair, never a mismatched one.
    write_file(&w.key, issued.key_pem.as_bytes(), 0o600, true)?;
    write_file(&w.cert, issued.cert_pem.as_bytes(), 0o644, true)?;
    if w.ca != ca_dir.join(CA_CERT) {
        write_file(&w.ca, ca_cert.as_bytes(), 0o644, true)?;
    }
    Ok(w)
}

/// What a certificate says (`chaos certs show`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// The chaos identity, when the certificate carries one.
    pub identity: Option<String>,
    pub role: Option<String>,
    pub name: Option<String>,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    pub is_ca: bool,
    pub client_auth: bool,
    pub server_auth: bool,
    pub serial: String,
    #[serde(serialize_with = "rfc3339")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub not_after: SystemTime,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

fn at(ts: i64) -> SystemTime {
    if ts >= 0 { UNIX_EPOCH + Duration::from_secs(ts as u64) } else { UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs()) }
}

impl CertInfo {
    pub fn expired(&self) -> bool {
        self.not_after <= SystemTime::now()
    }
}

/// Describe one certificate (DER).
pub fn describe(der: &[u8]) -> Result<CertInfo, TrustError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TrustError::Certificate(format!("not X.509: {e}")))?;
    let identity = Identity::from_cert_der(der).ok();
    let (mut dns, mut ips) = (vec![], vec![]);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for g in &san.value.general_names {
            match g {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string()),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let eku = cert.extended_key_usage().ok().flatten().map(|e| (e.value.client_auth, e.value.server_auth));
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        role: identity.as_ref().map(|i| i.role.to_string()),
        name: identity.as_ref().map(|i| i.name.clone()),
        identity: identity.as_ref().map(Identity::uri),
        uris: uris(&cert),
        dns_names: dns,
        ip_addresses: ips,
        is_ca: cert.is_ca(),
        client_auth: eku.is_some_and(|e| e.0),
        server_auth: eku.is_some_and(|e| e.1),
        serial: cert.raw_serial_as_string(),
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
        sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// Describe every certificate in a PEM file.
pub fn describe_file(path: &Path) -> Result<Vec<CertInfo>, TrustError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let bytes = std::fs::read(path).map_err(|e| TrustError::File { path: path.to_path_buf(), why: e.to_string() })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::File { path: path.to_path_buf(), why: format!("not PEM certificates: {e}") })?;
    if certs.is_empty() {
        return Err(TrustError::File { path: path.to_path_buf(), why: "no CERTIFICATE block".into() });
    }
    certs.iter().map(|c| describe(c.as_ref())).collect()
}

/// A role's allowed use, for `chaos certs issue --help` and errors.
pub fn role_help(role: Role) -> &'static str {
    match role {
        Role::Viewer => "read: lists, watches, metrics, audit",
        Role::Operator => "viewer + scenarios, experiments, GameDays, validation, emergency stop, an agent's RevertAll",
        Role::Admin => "operator + arm and the direct `chaos agent` verbs",
        Role::Agent => "a chaos-agent (server certificate; registers under its name)",
        Role::Coordinator => "a chaos-coordinator (server certificate)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_identity_names_and_usages() {
        let ca = new_ca("t", DEFAULT_CA_VALIDITY).expect("ca");
        let id = Identity::new(Role::Agent, "kafka-1").expect("id");
        let req = Request::new(id.clone(), vec!["198.18.200.2".into()], Duration::from_secs(3600));
        let out = issue(&ca.cert_pem, &ca.key_pem, &req).expect("issue");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(out.cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
            .expect("pem");
        let info = describe(&der).expect("describe");
        assert_eq!(info.identity.as_deref(), Some("spiffe://chaos/agent/kafka-1"));
        assert_eq!(Identity::from_cert_der(&der).expect("identity"), id);
        assert!(info.ip_addresses.contains(&"198.18.200.2".to_string()) && info.ip_addresses.contains(&"127.0.0.1".to_string()));
        assert!(info.dns_names.contains(&"kafka-1".to_string()) && info.dns_names.contains(&"localhost".to_string()));
        assert!(info.client_auth && info.server_auth && !info.is_ca);
        let left = info.not_after.duration_since(SystemTime::now()).expect("future");
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600), "{left:?}");

        // People get client certificates without host names.
        let alice = Request::new(Identity::new(Role::Viewer, "alice").expect("id"), vec![], DEFAULT_VALIDITY);
        let out = issue(&ca.cert_pem, &ca.key_pem, &alice).expect("issue");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(out.cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
            .expect("pem");
        let info = describe(&der).expect("describe");
        assert!(info.client_auth && !info.server_auth && info.dns_names.is_empty() && info.ip_addresses.is_empty());
        let bad = Request { sans: vec!["h".into()], ..alice };
        assert!(issue(&ca.cert_pem, &ca.key_pem, &bad).expect_err("no SAN for people").to_string().contains("san"));
    }

    #[test]
    fn directories_keep_keys_private_and_never_replace_a_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init_ca_dir(&ca, "t", DEFAULT_CA_VALIDITY).expect("init");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca), 0o700);
        let e = init_ca_dir(&ca, "t", DEFAULT_CA_VALIDITY).expect_err("second init").to_string();
        assert!(e.contains("never replaced"), "{e}");
        let out = dir.path().join("alice");
        let req = Request::new(Identity::new(Role::Admin, "alice").expect("id"), vec![], DEFAULT_VALIDITY);
        let w = issue_to_dir(&ca, &req, &out, false).expect("issue");
        assert_eq!(mode(&w.key), 0o600);
        assert!(issue_to_dir(&ca, &req, &out, false).expect_err("exists").to_string().contains("--force"));
        issue_to_dir(&ca, &req, &out, true).expect("forced");
        // What was written loads as credentials, and its identity is read back.
        let creds = super::super::tls::Credentials::load(&super::super::tls::TlsFiles::in_dir(&out)).expect("load");
        assert_eq!(creds.identity.to_string(), "alice (admin)");
    }
}
