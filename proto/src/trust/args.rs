//! The TLS settings of a daemon (`chaos-agent`, `chaos-coordinator`):
//! flags over the config file's `tls:` section over the default directory.
//! Certificates are on unless `--insecure` (or `tls: {insecure: true}`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::tls::TlsFiles;

/// TLS flags shared by both daemons.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Directory holding ca.pem, cert.pem and key.pem, as `chaos certs issue --out DIR` writes them.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The fleet's CA certificate [default: TLS_DIR/ca.pem].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This daemon's certificate [default: TLS_DIR/cert.pem].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This daemon's private key [default: TLS_DIR/key.pem].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext with no authentication: any caller may do anything. Loopback addresses only (a
    /// non-loopback listen address refuses to start); for a laptop, never a fleet.
    #[arg(long)]
    pub insecure: bool,
}

/// The `tls:` section of a daemon's config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: Option<bool>,
}

impl TlsArgs {
    /// The files to load, or None for `--insecure`.
    pub fn resolve(&self, file: &TlsFile, default_dir: &Path) -> Option<TlsFiles> {
        if self.insecure || file.insecure.unwrap_or(false) {
            return None;
        }
        let dir = self.tls_dir.clone().or_else(|| file.dir.clone()).unwrap_or_else(|| default_dir.to_path_buf());
        let base = TlsFiles::in_dir(&dir);
        Some(TlsFiles {
            ca: self.tls_ca.clone().or_else(|| file.ca.clone()).unwrap_or(base.ca),
            cert: self.tls_cert.clone().or_else(|| file.cert.clone()).unwrap_or(base.cert),
            key: self.tls_key.clone().or_else(|| file.key.clone()).unwrap_or(base.key),
        })
    }
}

/// Load a daemon's credentials and check their role, with an error that
/// says how to make the right ones.
pub fn load_for(files: &TlsFiles, role: super::Role, binary: &str) -> Result<std::sync::Arc<super::Tls>, String> {
    let tls = super::Tls::load(files.clone()).map_err(|e| {
        format!(
            "{binary}: TLS credentials unusable: {e}\n  make them with: chaos certs issue --ca CA_DIR --role {role} --name NAME --out {}\n  \
             (or point at them with --tls-dir DIR; or run --insecure on loopback for a local try-out)",
            files.cert.parent().map(|p| p.display().to_string()).unwrap_or_else(|| "DIR".into())
        )
    })?;
    let id = tls.identity();
    if id.role != role {
        return Err(format!("{binary}: the certificate {} is for {id}, not a {role}: issue one with --role {role}", files.cert.display()));
    }
    Ok(tls)
}
