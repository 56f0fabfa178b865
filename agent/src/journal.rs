//! The on-disk journal: one JSON file per active fault, written and
//! fsync'd *before* the fault touches the host, removed after it is
//! reverted. At start, whatever is in the journal was left applied by a
//! previous run and is reverted.
//!
//! Writes are atomic (temp file, fsync, rename, fsync of the directory).
//! An exclusive `flock` on `DIR/.lock` keeps two agents from sharing one
//! journal (they would revert each other's faults).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use chaos_proto::spec::FaultRequest;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{
    error::AgentError,
    faults::{Before, Plan},
};

/// The record format this agent writes and the newest it reads. Records of
/// an older version decode (fixtures of each under `tests/fixtures`); a
/// record of a newer one is set aside, never half-read.
///
/// 1: request, plan, times, pid. 2: adds `before`, the state read before apply.
pub const JOURNAL_VERSION: u32 = 2;

/// What the journal keeps of one fault: enough to revert it from scratch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// Format version ([`JOURNAL_VERSION`] when written by this agent).
    pub version: u32,
    pub id: String,
    pub request: FaultRequest,
    pub plan: Plan,
    /// Wall-clock times in ms since the epoch (for the operator's eyes).
    pub created_at_unix_ms: u64,
    pub expires_at_unix_ms: u64,
    /// The agent process that wrote it.
    pub agent_pid: u32,
    /// What the fault touches, as read before apply: compared after the
    /// revert (also by a replay). `None` in records of format 1.
    #[serde(default)]
    pub before: Option<Before>,
}

/// A record that could not be read back.
#[derive(Debug)]
pub struct CorruptRecord {
    pub path: PathBuf,
    pub error: String,
    /// Set when the record is well-formed but of a format newer than this agent reads.
    pub future_version: Option<u64>,
}

/// Decode one record, checking its format version first.
pub fn decode(bytes: &[u8]) -> Result<JournalRecord, (String, Option<u64>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| (e.to_string(), None))?;
    let version = v.get("version").and_then(serde_json::Value::as_u64).ok_or_else(|| ("no numeric \"version\" field".to_string(), None))?;
    if version > u64::from(JOURNAL_VERSION) {
        return Err((
            format!("written by a newer agent: format version {version}, this agent reads up to {JOURNAL_VERSION}"),
            Some(version),
        ));
    }
    serde_json::from_value(v).map_err(|e| (format!("format version {version}: {e}"), None))
}

/// Storage of journal records.
pub trait JournalStore: Send + Sync {
    /// Durably store (create or replace) a record.
    fn put(&self, rec: &JournalRecord) -> Result<(), AgentError>;
    /// Durably remove a record; removing a missing record is fine.
    fn remove(&self, id: &str) -> Result<(), AgentError>;
    /// Every stored record, plus those that could not be parsed.
    fn load(&self) -> Result<(Vec<JournalRecord>, Vec<CorruptRecord>), AgentError>;
    /// Where it lives, for reports.
    fn location(&self) -> String;
}

/// The real journal: a directory of JSON files.
pub struct DirJournal {
    dir: PathBuf,
    /// Held for the life of the journal: the exclusive lock on `DIR/.lock`.
    _lock: Flock<File>,
}

impl DirJournal {
    /// Open (creating with mode 0700 if needed) and lock the directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let dir = dir.into();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| AgentError::journal(&dir, e))?;
        let lock_path = dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| AgentError::journal(&lock_path, e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            AgentError::journal(
                &lock_path,
                std::io::Error::other(format!("locked by another agent? ({errno}); each agent needs its own --journal-dir")),
            )
        })?;
        Ok(Self { dir, _lock: lock })
    }

    fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn sync_dir(&self) -> Result<(), AgentError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| AgentError::journal(&self.dir, e))
    }
}

impl JournalStore for DirJournal {
    fn put(&self, rec: &JournalRecord) -> Result<(), AgentError> {
        let path = self.path_of(&rec.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", rec.id));
        let body = serde_json::to_vec_pretty(rec).map_err(|e| AgentError::journal(&path, std::io::Error::other(e)))?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| AgentError::journal(&path, e))?;
        self.sync_dir()
    }

    fn remove(&self, id: &str) -> Result<(), AgentError> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::journal(&path, e)),
        }
    }

    fn load(&self) -> Result<(Vec<JournalRecord>, Vec<CorruptRecord>), AgentError> {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        let entries = fs::read_dir(&self.dir).map_err(|e| AgentError::journal(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| AgentError::journal(&self.dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".json.tmp") {
                // A write that never completed: its fault was never applied.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            match fs::read(&path).map_err(|e| (e.to_string(), None)).and_then(|b| decode(&b)) {
                Ok(rec) => good.push(rec),
                Err((error, future_version)) => bad.push(CorruptRecord { path, error, future_version }),
            }
        }
        good.sort_by_key(|r| r.created_at_unix_ms);
        Ok((good, bad))
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Set a record aside so start can go on: `*.json.corrupt`, or
/// `*.json.vN` for a record of a newer format (an agent of that version
/// reads it again once renamed back).
pub fn quarantine(rec: &CorruptRecord) -> std::io::Result<PathBuf> {
    let to = match rec.future_version {
        Some(v) => rec.path.with_extension(format!("json.v{v}")),
        None => rec.path.with_extension("json.corrupt"),
    };
    fs::rename(&rec.path, &to)?;
    Ok(to)
}

/// An in-memory journal that records every operation (for tests) and can
/// be told to fail.
#[derive(Debug, Clone, Default)]
pub struct MemJournal {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Debug, Default)]
struct MemInner {
    records: BTreeMap<String, JournalRecord>,
    ops: Vec<String>,
    fail_puts: bool,
}

impl MemJournal {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Operations so far, as `put ID` / `remove ID`.
    pub fn ops(&self) -> Vec<String> {
        self.lock().ops.clone()
    }

    pub fn ids(&self) -> Vec<String> {
        self.lock().records.keys().cloned().collect()
    }

    pub fn set_fail_puts(&self, fail: bool) {
        self.lock().fail_puts = fail;
    }

    /// Seed a record, as a previous run would have left it.
    pub fn seed(&self, rec: JournalRecord) {
        self.lock().records.insert(rec.id.clone(), rec);
    }
}

impl JournalStore for MemJournal {
    fn put(&self, rec: &JournalRecord) -> Result<(), AgentError> {
        let mut g = self.lock();
        if g.fail_puts {
            return Err(AgentError::journal("mem", std::io::Error::other("injected failure: disk full")));
        }
        g.ops.push(format!("put {}", rec.id));
        g.records.insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), AgentError> {
        let mut g = self.lock();
        g.ops.push(format!("remove {id}"));
        g.records.remove(id);
        Ok(())
    }

    fn load(&self) -> Result<(Vec<JournalRecord>, Vec<CorruptRecord>), AgentError> {
        Ok((self.lock().records.values().cloned().collect(), Vec::new()))
    }

    fn location(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chaos_proto::spec::{FaultKind, TargetSpec};

    use super::*;
    use crate::faults::{
        ProcRef,
        process::{ProcessAction, ProcessPlan},
    };

    fn rec(id: &str) -> JournalRecord {
        JournalRecord {
            version: JOURNAL_VERSION,
            id: id.into(),
            request: FaultRequest {
                id: None,
                target: TargetSpec::Pid(5),
                duration: Duration::from_secs(30),
                labels: Default::default(),
                kind: FaultKind::ProcessPause,
            },
            plan: Plan::Process(ProcessPlan {
                action: ProcessAction::Pause,
                processes: vec![ProcRef { pid: 5, start_time_ticks: 77, name: "sleep".into() }],
                fault_id: String::new(),
            }),
            created_at_unix_ms: 1,
            expires_at_unix_ms: 2,
            before: None,
            agent_pid: 3,
        }
    }

    #[test]
    fn put_load_remove_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = DirJournal::open(dir.path().join("j")).expect("open");
        j.put(&rec("a")).expect("put");
        j.put(&rec("b")).expect("put");
        let (good, bad) = j.load().expect("load");
        assert_eq!(good.len(), 2);
        assert!(bad.is_empty());
        assert_eq!(good[0].plan, rec("a").plan);
        j.remove("a").expect("remove");
        j.remove("a").expect("remove twice is fine");
        assert_eq!(j.load().expect("load").0.len(), 1);
    }

    #[test]
    fn corrupt_records_are_reported_and_quarantined() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = DirJournal::open(dir.path()).expect("open");
        fs::write(dir.path().join("bad.json"), b"{ not json").expect("write");
        fs::write(dir.path().join(".x.json.tmp"), b"half").expect("write");
        let (good, bad) = j.load().expect("load");
        assert!(good.is_empty());
        assert_eq!(bad.len(), 1);
        let moved = quarantine(&bad[0]).expect("quarantine");
        assert!(moved.exists());
        assert!(!dir.path().join(".x.json.tmp").exists(), "incomplete writes are swept");
        assert!(j.load().expect("load").1.is_empty());
    }

    #[test]
    fn two_agents_cannot_share_a_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _a = DirJournal::open(dir.path()).expect("first");
        let e = DirJournal::open(dir.path()).err().expect("second must fail");
        assert!(e.to_string().contains("--journal-dir"), "{e}");
    }

    /// Records as the format-1 agent wrote them (committed once, never regenerated).
    fn fixtures(version: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("journal-{version}"))
    }

    /// A plan's kind, down to the resource plan's. The match has no catch-all:
    /// a new kind of plan does not compile here until it has a fixture.
    fn kind_of(plan: &Plan) -> &'static str {
        use crate::faults::resource::ResourcePlan as R;
        match plan {
            Plan::Process(_) => "process",
            Plan::Network(_) => "network",
            Plan::Latency(_) => "latency",
            Plan::Bandwidth(_) => "bandwidth",
            Plan::Resource(r) => match **r {
                R::Stress { .. } => "resource stress",
                R::CpuThrottle { .. } => "resource cpu_throttle",
                R::MemoryLimit { .. } => "resource memory_limit",
                R::IoThrottle { .. } => "resource io_throttle",
                R::Freeze { .. } => "resource freeze",
                R::DiskFill { .. } => "resource disk_fill",
            },
            Plan::Container(_) => "container",
        }
    }

    #[test]
    fn format_1_fixtures_decode() {
        let dir = tempfile::tempdir().expect("tempdir");
        for e in fs::read_dir(fixtures("v1")).expect("fixtures") {
            let p = e.expect("entry").path();
            fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
        }
        let (good, bad) = DirJournal::open(dir.path()).expect("open").load().expect("load");
        assert!(bad.is_empty(), "{bad:?}");
        let kinds: BTreeMap<&str, &str> = good.iter().map(|r| (r.id.as_str(), kind_of(&r.plan))).collect();
        let want: BTreeMap<&str, &str> = [
            ("fixture-pause", "process"),
            ("fixture-partition", "network"),
            ("fixture-latency", "latency"),
            ("fixture-bandwidth", "bandwidth"),
            ("fixture-cpu-stress", "resource stress"),
            ("fixture-cpu-throttle", "resource cpu_throttle"),
            ("fixture-memory-limit", "resource memory_limit"),
            ("fixture-io-throttle", "resource io_throttle"),
            ("fixture-freeze", "resource freeze"),
            ("fixture-disk-fill", "resource disk_fill"),
            ("fixture-container-stop", "container"),
        ]
        .into();
        assert_eq!(kinds, want, "one fixture of each kind of plan, named by its id");
        assert_eq!(good.len(), want.len(), "every id is distinct");
        assert!(good.iter().all(|r| r.version == 1));
        assert!(good.iter().all(|r| r.request.id.as_deref() == Some(r.id.as_str())), "the request carries the fault's id");
    }

    #[test]
    fn a_record_of_a_newer_format_is_set_aside_by_name_never_half_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = DirJournal::open(dir.path()).expect("open");
        let mut v: serde_json::Value = serde_json::to_value(rec("new")).expect("json");
        v["version"] = serde_json::json!(JOURNAL_VERSION + 1);
        v["plan"] = serde_json::json!({"driver": "from_the_future"});
        fs::write(dir.path().join("new.json"), serde_json::to_vec(&v).expect("json")).expect("write");
        fs::write(dir.path().join("nov.json"), br#"{"id": "x"}"#).expect("write");
        let (good, bad) = j.load().expect("load");
        assert!(good.is_empty());
        let newer = bad.iter().find(|b| b.path.ends_with("new.json")).expect("newer record reported");
        assert_eq!(newer.future_version, Some(u64::from(JOURNAL_VERSION) + 1));
        assert!(newer.error.contains("newer agent"), "{}", newer.error);
        let moved = quarantine(newer).expect("quarantine");
        assert!(moved.to_string_lossy().ends_with(&format!("new.json.v{}", JOURNAL_VERSION + 1)), "{}", moved.display());
        let unversioned = bad.iter().find(|b| b.path.ends_with("nov.json")).expect("unversioned reported");
        assert!(unversioned.error.contains("version"), "{}", unversioned.error);
        assert_eq!(unversioned.future_version, None);
    }
}
