//! The fleet's armed state on disk, so that an emergency stop survives a
//! coordinator restart: a restarted coordinator that came up armed would
//! re-arm every agent on its next heartbeat.
//!
//! One small JSON file, replaced atomically (temp file, fsync, rename,
//! fsync of the directory).

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::registry::ArmState;

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    armed: bool,
    reason: String,
    /// Milliseconds since the epoch of the last disarm.
    disarmed_at_unix_ms: Option<u64>,
}

/// Where the armed state lives.
#[derive(Debug, Clone)]
pub struct ArmStore {
    path: PathBuf,
}

impl ArmStore {
    /// Create the state directory (mode 0700) if needed.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        Ok(Self { path: dir.join("armed.json") })
    }

    /// The stored state; armed when nothing was ever stored. An unreadable
    /// file is an error: guessing "armed" could undo an emergency stop.
    pub fn load(&self) -> std::io::Result<ArmState> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ArmState { armed: true, ..Default::default() }),
            Err(e) => return Err(e),
        };
        let d: OnDisk = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::other(format!("{}: {e} (fix or delete it to start armed)", self.path.display())))?;
        Ok(ArmState {
            armed: d.armed,
            disarmed_reason: d.reason,
            disarmed_at: d.disarmed_at_unix_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        })
    }

    pub fn save(&self, s: &ArmState) -> std::io::Result<()> {
        let d = OnDisk {
            armed: s.armed,
            reason: s.disarmed_reason.clone(),
            disarmed_at_unix_ms: s
                .disarmed_at
                .map(|t| u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)),
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&d).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_default_armed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = ArmStore::open(&dir.path().join("state")).expect("open");
        assert!(s.load().expect("load").armed, "nothing stored: armed");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        s.save(&ArmState { armed: false, disarmed_reason: "drill".into(), disarmed_at: Some(at) }).expect("save");
        let back = s.load().expect("load");
        assert!(!back.armed);
        assert_eq!(back.disarmed_reason, "drill");
        assert_eq!(back.disarmed_at, Some(at));
    }

    #[test]
    fn corrupt_file_is_an_error_not_armed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = ArmStore::open(dir.path()).expect("open");
        fs::write(dir.path().join("armed.json"), b"{oops").expect("write");
        let e = s.load().expect_err("corrupt");
        assert!(e.to_string().contains("armed.json"), "{e}");
    }
}
