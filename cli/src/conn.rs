//! How the CLI reaches servers: mTLS with the user's certificate (the
//! default), or plaintext with `--insecure`; the agent's Unix socket for
//! `--local`. Set once from the global flags in `main`; every verb dials
//! through [`coordinator_channel`] or [`agent_channel`].

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use chaos_proto::trust::{ClientTls, Dial, Expect, Tls, TlsFiles};
use tonic::transport::Channel;

use crate::output::{CliError, exit};

/// The global TLS flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    /// Directory with your ca.pem, cert.pem and key.pem (what `chaos certs issue --out DIR` writes)
    /// [default: ~/.config/chaos/tls].
    #[arg(long, global = true, env = "CHAOS_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The fleet's CA certificate [default: TLS_DIR/ca.pem].
    #[arg(long, global = true, env = "CHAOS_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Your certificate [default: TLS_DIR/cert.pem].
    #[arg(long, global = true, env = "CHAOS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Your private key [default: TLS_DIR/key.pem].
    #[arg(long, global = true, env = "CHAOS_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext, no certificate: only for servers run with --insecure on loopback.
    #[arg(long, global = true, env = "CHAOS_INSECURE")]
    pub insecure: bool,
}

impl TlsFlags {
    /// The files to use, or None for --insecure.
    pub fn files(&self) -> Option<TlsFiles> {
        if self.insecure {
            return None;
        }
        let dir = self.tls_dir.clone().unwrap_or_else(default_dir);
        let base = TlsFiles::in_dir(&dir);
        Some(TlsFiles {
            ca: self.tls_ca.clone().unwrap_or(base.ca),
            cert: self.tls_cert.clone().unwrap_or(base.cert),
            key: self.tls_key.clone().unwrap_or(base.key),
        })
    }
}

/// `$XDG_CONFIG_HOME/chaos/tls`, else `~/.config/chaos/tls`.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"));
    base.join("chaos/tls")
}

static FLAGS: OnceLock<TlsFlags> = OnceLock::new();
/// Set by the lab verbs: the lab's own admin certificate, whatever the flags say.
static LAB_DIR: OnceLock<PathBuf> = OnceLock::new();
static LOADED: OnceLock<Result<ClientTls, String>> = OnceLock::new();

/// Set the flags (once, from `main`).
pub fn init(flags: TlsFlags) {
    let _ = FLAGS.set(flags);
}

/// The lab verbs talk only to the lab, with the lab's admin certificate
/// (call before the first dial).
pub fn use_lab_certificates(dir: PathBuf) {
    let _ = LAB_DIR.set(dir);
}

fn flags() -> TlsFlags {
    match LAB_DIR.get() {
        Some(dir) => TlsFlags { tls_dir: Some(dir.clone()), ..TlsFlags::default() },
        None => FLAGS.get().cloned().unwrap_or_default(),
    }
}

/// Whether servers are dialed with TLS.
pub fn tls_on() -> bool {
    !flags().insecure
}

/// The client credentials, loaded on first use (commands that dial nothing never need them).
pub fn client_tls() -> Result<ClientTls, CliError> {
    LOADED
        .get_or_init(|| match flags().files() {
            None => Ok(ClientTls::Insecure),
            Some(files) => Tls::load(files.clone()).map(ClientTls::Tls).map_err(|e| {
                format!(
                    "no usable client certificate: {e}\n  make one: chaos certs issue --ca CA_DIR --role operator --name $USER --out {}\n  \
                     or point at yours with --tls-dir DIR (env CHAOS_TLS_DIR); --insecure only for servers run with --insecure",
                    files.cert.parent().map(|p| p.display().to_string()).unwrap_or_default()
                )
            }),
        })
        .clone()
        .map_err(|m| CliError::new(exit::USAGE, m))
}

/// The credentials in force, for `chaos certs show https://…`.
pub fn client_credentials() -> Result<Option<Arc<Tls>>, CliError> {
    Ok(match client_tls()? {
        ClientTls::Tls(t) => Some(t),
        ClientTls::Insecure => None,
    })
}

/// `HOST:PORT` or a URL, with the scheme of the mode (for messages and dialing).
pub fn url(s: &str) -> String {
    chaos_proto::trust::normalize_url(s, tls_on()).unwrap_or_else(|_| s.to_string())
}

fn dial(target: &str, timeout: Duration, expect: Expect) -> Result<Channel, CliError> {
    let tls = client_tls()?;
    chaos_proto::trust::channel(target, &tls, expect, Dial { connect_timeout: Duration::from_secs(2).min(timeout), timeout: Some(timeout) })
        .map_err(|e| CliError::new(exit::USAGE, format!("--coordinator/--agent {target:?}: {e}")))
}

/// A channel to the coordinator (which must present a coordinator certificate).
pub fn coordinator_channel(target: &str, timeout: Duration) -> Result<Channel, CliError> {
    dial(target, timeout, Expect::coordinator())
}

/// A channel to an agent (which must present an agent certificate).
pub fn agent_channel(target: &str, timeout: Duration) -> Result<Channel, CliError> {
    dial(target, timeout, Expect::agent(None))
}

/// A channel to the agent's break-glass Unix socket (no certificate: the
/// socket is root-only).
pub fn local_channel(socket: &Path, timeout: Duration) -> Channel {
    chaos_proto::trust::local_channel(socket.to_path_buf(), Some(timeout))
}

/// Metadata key of the note the CLI adds to audited calls (its login).
pub const NOTE_HEADER: &str = "x-chaos-note";

/// A request carrying the note header: who is at the keyboard, recorded
/// beside (never instead of) the certificate's identity.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = login().parse() {
        r.metadata_mut().insert(NOTE_HEADER, v);
    }
    r
}

/// USER@HOST of this process.
pub fn login() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(user_of_uid)
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{user}@{host}")
}

/// The login name of this process's uid, from /proc and /etc/passwd.
fn user_of_uid() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
    })
}
