//! The break-glass socket: the Agent service on a Unix socket only root
//! (or the agent's own user) can open, so `chaos agent revert-all --local`
//! works on the host itself when the coordinator, the network or the
//! certificates are gone (chaos-mesh #393). The directory is made 0700,
//! the socket 0600; the auth layer also checks the peer's uid.

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use tokio::net::UnixListener;
use tracing::warn;

/// Removes the socket file when the server ends.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bind the socket at `path`: refused when another process serves it; a
/// stale file left by a crash is replaced.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("local_socket: creating {}", dir.display()))?;
    } else if let Ok(m) = std::fs::metadata(dir)
        && m.permissions().mode() & 0o002 != 0
    {
        warn!(dir = %dir.display(), "the break-glass socket's directory is world-writable: the socket itself stays 0600");
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "local_socket: {} is served by another process (another agent on this host?): give each agent its own --local-socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("local_socket: removing the stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("local_socket: binding {}", path.display()))?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("local_socket: chmod 600 {}", path.display()))?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_is_private_refuses_a_live_twin_and_replaces_a_stale_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/agent.sock");
        let (l, f) = bind(&path).expect("bind");
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join("run")).expect("meta").permissions().mode() & 0o777, 0o700);
        let e = bind(&path).expect_err("live").to_string();
        assert!(e.contains("another process"), "{e}");
        drop(l);
        std::mem::forget(f); // a crash leaves the file behind
        assert!(path.exists());
        let (_l, f) = bind(&path).expect("stale file replaced");
        drop(f);
        assert!(!path.exists(), "removed when the server ends");
    }
}
