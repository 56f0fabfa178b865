//! Who is calling: the five roles, the identity a certificate carries, and
//! the caller of one request as the auth layer found it.
//!
//! An identity lives in one URI subject alternative name of the form
//! `spiffe://chaos/ROLE/NAME` (SPIFFE's shape, trust domain `chaos`), so it
//! is read from a verified certificate and never from anything a client
//! writes in a header.

use std::{fmt, str::FromStr};

use super::TrustError;

/// The trust domain in every identity URI.
pub const TRUST_DOMAIN: &str = "chaos";

/// What a certificate's holder may do (README, "Roles"; the table is
/// [`super::roles::RULES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// Read: lists, watches, metrics, the audit.
    Viewer,
    /// Viewer, plus scenarios, experiments, GameDays, validation, emergency stop, an agent's RevertAll.
    Operator,
    /// Operator, plus Arm and the direct `chaos agent` verbs (ApplyFault, RevertFault, SetArmed).
    Admin,
    /// A `chaos-agent`: registers and heartbeats with the coordinator; serves chaos.v1.Agent.
    Agent,
    /// A `chaos-coordinator`: drives agents; serves chaos.v1.Coordinator.
    Coordinator,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Viewer, Role::Operator, Role::Admin, Role::Agent, Role::Coordinator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
        }
    }

    /// Service roles run servers: their certificates are also server
    /// certificates (serverAuth, with DNS and IP names).
    pub fn is_service(self) -> bool {
        matches!(self, Role::Agent | Role::Coordinator)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| TrustError::Invalid {
            field: "role".into(),
            why: format!("{s:?} is not a role (viewer, operator, admin, agent, coordinator)"),
        })
    }
}

/// A name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit
/// (it is a URI path segment, an agent id and a file name).
pub fn check_name(name: &str) -> Result<(), TrustError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(TrustError::Invalid {
            field: "name".into(),
            why: format!("{name:?} must be 1 to 64 of A-Z a-z 0-9 . _ - and start with a letter or digit"),
        })
    }
}

/// The identity a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn new(role: Role, name: &str) -> Result<Self, TrustError> {
        check_name(name)?;
        Ok(Identity { role, name: name.to_string() })
    }

    /// `spiffe://chaos/ROLE/NAME`.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.role, self.name)
    }

    /// The identity in a URI SAN, or None when the URI is not one of ours.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?.strip_prefix('/')?;
        let (role, name) = rest.split_once('/')?;
        let role = role.parse().ok()?;
        check_name(name).ok()?;
        Some(Identity { role, name: name.to_string() })
    }

    /// The identity of a certificate (DER): exactly one `spiffe://chaos/…`
    /// URI among its subject alternative names.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, TrustError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TrustError::Certificate(format!("not X.509: {e}")))?;
        let ids = uris(&cert).into_iter().filter_map(|u| Identity::from_uri(&u)).collect::<Vec<_>>();
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(TrustError::Certificate(format!(
                "certificate of {:?} carries no chaos identity (a URI SAN spiffe://{TRUST_DOMAIN}/ROLE/NAME; make one with `chaos certs issue`)",
                cert.subject().to_string()
            ))),
            _ => Err(TrustError::Certificate(format!(
                "certificate of {:?} carries {} chaos identities",
                cert.subject().to_string(),
                ids.len()
            ))),
        }
    }
}

/// The URI subject alternative names of a parsed certificate.
pub(crate) fn uris(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// How the caller of a request was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A client certificate signed by the fleet's CA, verified in the TLS handshake.
    Certificate,
    /// The agent's root-only Unix socket (break-glass); the kernel vouches
    /// for the peer's uid.
    LocalSocket { uid: u32, pid: Option<i32> },
    /// A server started with `--insecure`: nobody is authenticated and every call is allowed.
    Insecure,
}

/// The caller of one request. The auth layer puts it in the request's
/// extensions; handlers read it with [`Caller::of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// None on an `--insecure` server.
    pub identity: Option<Identity>,
    pub via: Via,
    /// The peer's address (`IP:PORT`, or the socket path).
    pub address: String,
}

impl Caller {
    /// The caller of a request that went through the auth layer; a request
    /// that did not (unit tests calling a service directly) is anonymous.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller {
            identity: None,
            via: Via::Insecure,
            address: req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
        })
    }

    pub fn role(&self) -> Option<Role> {
        self.identity.as_ref().map(|i| i.role)
    }

    /// The name to record (`anonymous` on an insecure server).
    pub fn name(&self) -> &str {
        self.identity.as_ref().map_or("anonymous", |i| i.name.as_str())
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.identity, &self.via) {
            (Some(id), Via::Certificate) => write!(f, "{id} from {}", self.address),
            (Some(id), Via::LocalSocket { uid, pid }) => {
                write!(f, "{id} on {} (uid {uid}", self.address)?;
                if let Some(p) = pid {
                    write!(f, ", pid {p}")?;
                }
                f.write_str(")")
            }
            (_, Via::Insecure) | (None, _) => write!(f, "anonymous (insecure server) from {}", self.address),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip_and_refusals() {
        let id = Identity::new(Role::Operator, "alice").expect("valid");
        assert_eq!(id.uri(), "spiffe://chaos/operator/alice");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        for bad in [
            "spiffe://other/operator/alice",
            "spiffe://chaos/root/alice",
            "spiffe://chaos/operator/",
            "spiffe://chaos/operator/a/b",
            "https://chaos/operator/alice",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            let e = Identity::new(Role::Agent, bad).expect_err("refused").to_string();
            assert!(e.contains("name"), "{e}");
        }
        let e = "root".parse::<Role>().expect_err("no such role").to_string();
        assert!(e.contains("\"root\"") && e.contains("viewer"), "{e}");
    }

    #[test]
    fn caller_display_names_identity_and_address() {
        let c = Caller {
            identity: Some(Identity::new(Role::Viewer, "bob").expect("valid")),
            via: Via::Certificate,
            address: "127.0.0.1:4000".into(),
        };
        assert_eq!(c.to_string(), "bob (viewer) from 127.0.0.1:4000");
        let c = Caller { identity: None, via: Via::Insecure, address: "127.0.0.1:1".into() };
        assert_eq!(c.name(), "anonymous");
        assert!(c.to_string().contains("insecure"));
    }
}
