//! Persistence in SQLite: scenarios, their transitions and per-agent
//! results, and the audit log. One file (`STATE_DIR/coordinator.db`, WAL),
//! readable with the `sqlite3` CLI; times are RFC 3339 text (UTC). The
//! schema is in [`SCHEMA`] and documented in README.
//!
//! Calls are short synchronous statements under one mutex; the coordinator
//! makes a handful per scenario transition.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_from_pb, timestamp_to_pb},
    pb::{self, FaultState, ScenarioState},
};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

/// Schema version 5: version 1 plus `experiment_runs` (2),
/// `scenario_agents.achieved`/`outcome` and `gamedays` (3), the audit's
/// authenticated actor in parts (4), and the agents' re-read after the
/// revert, `scenario_agents.revert_check`/`revert_check_detail` (5); opening
/// an older file adds them.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS scenarios (
    id            TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL,          -- creation order (queue order)
    name          TEXT NOT NULL,
    scenario_type TEXT NOT NULL,             -- fault family, e.g. network_loss
    fault         TEXT NOT NULL,             -- one-line description of the fault
    severity      INTEGER NOT NULL,
    duration_ms   INTEGER NOT NULL,
    state         TEXT NOT NULL,             -- PENDING QUEUED RUNNING REVERTING COMPLETED STOPPED ABORTED FAILED
    reason        TEXT NOT NULL,             -- reason of the latest transition
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    ends_at       TEXT,
    ended_at      TEXT,
    spec          BLOB NOT NULL,             -- chaos.v1.ScenarioSpec, protobuf
    blast_radius  BLOB                       -- chaos.v1.BlastRadius, protobuf
);
CREATE INDEX IF NOT EXISTS scenarios_state ON scenarios(state);
CREATE TABLE IF NOT EXISTS transitions (
    scenario_id TEXT NOT NULL REFERENCES scenarios(id),
    n           INTEGER NOT NULL,            -- 0, 1, 2, ... per scenario
    at          TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    PRIMARY KEY (scenario_id, n)
);
CREATE TABLE IF NOT EXISTS scenario_agents (
    scenario_id TEXT NOT NULL REFERENCES scenarios(id),
    agent_id    TEXT NOT NULL,
    address     TEXT NOT NULL,
    fault_id    TEXT NOT NULL,
    fault_state TEXT NOT NULL,               -- UNSPECIFIED PENDING APPLIED REVERTING REVERTED FAILED
    summary     TEXT NOT NULL,
    backend     TEXT NOT NULL,
    error       TEXT NOT NULL,
    applied_at  TEXT,
    reverted_at TEXT,
    achieved    TEXT NOT NULL DEFAULT '{}',  -- JSON object: what the fault achieved, by name with its unit
    outcome     TEXT NOT NULL DEFAULT '',    -- what became of the target (e.g. OOM-killed)
    revert_check TEXT NOT NULL DEFAULT '',   -- the agent's re-read after the revert: VERIFIED DIFFERENT NOT_COMPARED, '' before
    revert_check_detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (scenario_id, agent_id)
);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,                   -- certificate identity and peer address, or 'coordinator'
    action  TEXT NOT NULL,                   -- CreateScenario, StopScenario, EmergencyStop, Arm, RegisterAgent, RevertOrphan,
                                             -- StartGameDay, EndGameDay, RecordExperimentRun, alert and stop-condition events
    target  TEXT NOT NULL,
    detail  TEXT NOT NULL,
    outcome TEXT NOT NULL,                   -- ok | refused: ... | error: ...
    actor_name   TEXT NOT NULL DEFAULT '',   -- the certificate's name ('' for the coordinator itself or an insecure server)
    actor_role   TEXT NOT NULL DEFAULT '',   -- its role: viewer operator admin agent coordinator
    peer_address TEXT NOT NULL DEFAULT '',
    client_note  TEXT NOT NULL DEFAULT ''    -- the x-chaos-note header (the CLI sends USER@HOST): declared, not proven
);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE TABLE IF NOT EXISTS experiment_runs (
    id          TEXT PRIMARY KEY,            -- the report directory's name
    seq         INTEGER NOT NULL,            -- recording order
    experiment  TEXT NOT NULL,
    verdict     TEXT NOT NULL,               -- HELD DEVIATED ABORTED
    started_at  TEXT NOT NULL,
    report_dir  TEXT NOT NULL,
    host        TEXT NOT NULL,
    run         BLOB NOT NULL                -- chaos.v1.ExperimentRun, protobuf
);
CREATE INDEX IF NOT EXISTS experiment_runs_name ON experiment_runs(experiment);
CREATE TABLE IF NOT EXISTS gamedays (
    id          TEXT PRIMARY KEY,
    started_at  TEXT NOT NULL,
    state       TEXT NOT NULL,               -- RUNNING COMPLETED STOPPED ABORTED
    record      BLOB NOT NULL                -- chaos.v1.GameDay (with its kept history), protobuf
);
PRAGMA user_version = 4;
";

pub struct Store {
    conn: Mutex<Connection>,
    /// Tests: runs at the start of every [`Store::save`], before the
    /// connection is taken (to hold a write in flight).
    #[cfg(test)]
    save_hook: Mutex<Option<SaveHook>>,
}

#[cfg(test)]
type SaveHook = std::sync::Arc<dyn Fn(&pb::Scenario) + Send + Sync>;

/// Who did something, as the audit keeps it: one line, and its parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    /// e.g. "alice (operator) from 10.0.0.7:50122".
    pub text: String,
    /// The certificate's name and role ("" when none).
    pub name: String,
    pub role: String,
    pub address: String,
    /// What the client declared in `x-chaos-note` (never the identity).
    pub note: String,
}

fn ts(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_millis(timestamp_from_pb(t)).to_string())
}

fn parse_ts(s: Option<String>) -> Option<prost_types::Timestamp> {
    s.and_then(|s| humantime::parse_rfc3339(&s).ok()).map(timestamp_to_pb)
}

pub fn state_name(s: i32) -> String {
    ScenarioState::try_from(s).unwrap_or(ScenarioState::Unspecified).as_str_name().trim_start_matches("SCENARIO_STATE_").to_string()
}

fn parse_state(s: &str) -> i32 {
    ScenarioState::from_str_name(&format!("SCENARIO_STATE_{s}")).unwrap_or(ScenarioState::Unspecified) as i32
}

fn fault_state_name(s: i32) -> String {
    FaultState::try_from(s).unwrap_or(FaultState::Unspecified).as_str_name().trim_start_matches("FAULT_STATE_").to_string()
}

/// "VERIFIED", "DIFFERENT", "NOT_COMPARED", or "" before any revert.
fn check_name(c: i32) -> &'static str {
    match pb::RevertCheck::try_from(c) {
        Ok(pb::RevertCheck::Unspecified) | Err(_) => "",
        Ok(c) => c.as_str_name().trim_start_matches("REVERT_CHECK_"),
    }
}

fn parse_check(s: &str) -> i32 {
    pb::RevertCheck::from_str_name(&format!("REVERT_CHECK_{s}")).unwrap_or(pb::RevertCheck::Unspecified) as i32
}

pub type StoreResult<T> = Result<T, rusqlite::Error>;

impl Store {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> StoreResult<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> StoreResult<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        // Files made before version 3 lack the fault outcome columns; before
        // version 4, the actor's parts; before 5, the revert check.
        add_columns_if_missing(
            &conn,
            "scenario_agents",
            &[
                ("achieved", "TEXT NOT NULL DEFAULT '{}'"),
                ("outcome", "TEXT NOT NULL DEFAULT ''"),
                ("revert_check", "TEXT NOT NULL DEFAULT ''"),
                ("revert_check_detail", "TEXT NOT NULL DEFAULT ''"),
            ],
        )?;
        add_columns_if_missing(
            &conn,
            "audit",
            &[
                ("actor_name", "TEXT NOT NULL DEFAULT ''"),
                ("actor_role", "TEXT NOT NULL DEFAULT ''"),
                ("peer_address", "TEXT NOT NULL DEFAULT ''"),
                ("client_note", "TEXT NOT NULL DEFAULT ''"),
            ],
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            #[cfg(test)]
            save_hook: Mutex::new(None),
        })
    }

    /// Run `hook` at the start of every scenario save from now on.
    #[cfg(test)]
    pub(crate) fn on_save(&self, hook: impl Fn(&pb::Scenario) + Send + Sync + 'static) {
        *self.save_hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(hook));
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the whole scenario (row, agents, transitions) in one transaction.
    pub fn save(&self, sc: &pb::Scenario) -> StoreResult<()> {
        #[cfg(test)]
        {
            // Cloned out first: the hook runs with no lock of the store held.
            let hook = self.save_hook.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(hook) = hook {
                hook(sc);
            }
        }
        let fault_text = sc.spec.as_ref().and_then(|s| s.fault.as_ref()).map(chaos_proto::spec::describe).unwrap_or_default();
        let mut c = self.lock();
        let tx = c.transaction()?;
        let spec = sc.spec.as_ref().map(|s| s.encode_to_vec()).unwrap_or_default();
        let blast = sc.blast_radius.as_ref().map(|b| b.encode_to_vec());
        let duration_ms = sc.duration.as_ref().and_then(duration_from_pb).unwrap_or_default().as_millis() as i64;
        tx.execute(
            "INSERT INTO scenarios (id, seq, name, scenario_type, fault, severity, duration_ms, state, reason, created_by,
                 created_at, started_at, ends_at, ended_at, spec, blast_radius)
             VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM scenarios), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT(id) DO UPDATE SET state = ?7, reason = ?8, started_at = ?11, ends_at = ?12, ended_at = ?13, blast_radius = ?15",
            params![
                sc.id,
                sc.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                sc.scenario_type,
                fault_text,
                sc.severity,
                duration_ms,
                state_name(sc.state),
                sc.reason,
                sc.created_by,
                ts(sc.created_at.as_ref()).unwrap_or_default(),
                ts(sc.started_at.as_ref()),
                ts(sc.ends_at.as_ref()),
                ts(sc.ended_at.as_ref()),
                spec,
                blast,
            ],
        )?;
        for (n, t) in sc.transitions.iter().enumerate() {
            tx.execute(
                "INSERT OR IGNORE INTO transitions (scenario_id, n, at, state, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![sc.id, n as i64, ts(t.at.as_ref()).unwrap_or_default(), state_name(t.state), t.reason],
            )?;
        }
        for a in &sc.agents {
            tx.execute(
                "INSERT OR REPLACE INTO scenario_agents (scenario_id, agent_id, address, fault_id, fault_state, summary, backend, error,
                     applied_at, reverted_at, achieved, outcome, revert_check, revert_check_detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    sc.id,
                    a.agent_id,
                    a.address,
                    a.fault_id,
                    fault_state_name(a.fault_state),
                    a.summary,
                    a.backend,
                    a.error,
                    ts(a.applied_at.as_ref()),
                    ts(a.reverted_at.as_ref()),
                    serde_json::to_string(&a.achieved).unwrap_or_else(|_| "{}".into()),
                    a.outcome,
                    check_name(a.revert_check),
                    a.revert_check_detail,
                ],
            )?;
        }
        tx.commit()
    }

    fn load_where(&self, clause: &str, args: &[&dyn rusqlite::ToSql]) -> StoreResult<Vec<pb::Scenario>> {
        let c = self.lock();
        let mut stmt = c.prepare(&format!(
            "SELECT id, scenario_type, severity, duration_ms, state, reason, created_by, created_at, started_at, ends_at, ended_at,
                    spec, blast_radius FROM scenarios {clause}"
        ))?;
        let mut out: Vec<pb::Scenario> = stmt
            .query_map(args, |r| {
                let spec: Vec<u8> = r.get(11)?;
                let blast: Option<Vec<u8>> = r.get(12)?;
                Ok(pb::Scenario {
                    id: r.get(0)?,
                    scenario_type: r.get(1)?,
                    severity: r.get(2)?,
                    duration: Some(duration_to_pb(Duration::from_millis(r.get::<_, i64>(3)?.max(0) as u64))),
                    state: parse_state(&r.get::<_, String>(4)?),
                    reason: r.get(5)?,
                    created_by: r.get(6)?,
                    created_at: parse_ts(r.get(7)?),
                    started_at: parse_ts(r.get(8)?),
                    ends_at: parse_ts(r.get(9)?),
                    ended_at: parse_ts(r.get(10)?),
                    spec: pb::ScenarioSpec::decode(spec.as_slice()).ok(),
                    blast_radius: blast.and_then(|b| pb::BlastRadius::decode(b.as_slice()).ok()),
                    ..Default::default()
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut tstmt = c.prepare("SELECT at, state, reason FROM transitions WHERE scenario_id = ?1 ORDER BY n")?;
        let mut astmt = c.prepare(
            "SELECT agent_id, address, fault_id, fault_state, summary, backend, error, applied_at, reverted_at, achieved, outcome,
                    revert_check, revert_check_detail
             FROM scenario_agents WHERE scenario_id = ?1 ORDER BY agent_id",
        )?;
        for sc in &mut out {
            sc.transitions = tstmt
                .query_map([&sc.id], |r| {
                    Ok(pb::ScenarioTransition { at: parse_ts(r.get(0)?), state: parse_state(&r.get::<_, String>(1)?), reason: r.get(2)? })
                })?
                .collect::<Result<_, _>>()?;
            sc.agents = astmt
                .query_map([&sc.id], |r| {
                    Ok(pb::ScenarioAgent {
                        agent_id: r.get(0)?,
                        address: r.get(1)?,
                        fault_id: r.get(2)?,
                        fault_state: FaultState::from_str_name(&format!("FAULT_STATE_{}", r.get::<_, String>(3)?))
                            .unwrap_or(FaultState::Unspecified) as i32,
                        summary: r.get(4)?,
                        backend: r.get(5)?,
                        error: r.get(6)?,
                        applied_at: parse_ts(r.get(7)?),
                        reverted_at: parse_ts(r.get(8)?),
                        achieved: serde_json::from_str(&r.get::<_, String>(9)?).unwrap_or_default(),
                        outcome: r.get(10)?,
                        revert_check: parse_check(&r.get::<_, String>(11)?),
                        revert_check_detail: r.get(12)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
        }
        Ok(out)
    }

    pub fn load(&self, id: &str) -> StoreResult<Option<pb::Scenario>> {
        Ok(self.load_where("WHERE id = ?1", &[&id])?.pop())
    }

    /// Scenarios not in a final state, oldest first.
    pub fn unfinished(&self) -> StoreResult<Vec<pb::Scenario>> {
        self.load_where("WHERE state IN ('PENDING', 'QUEUED', 'RUNNING', 'REVERTING') ORDER BY seq", &[])
    }

    /// The newest `limit` scenarios in `states` (all if empty), oldest first.
    pub fn list(&self, states: &[i32], limit: u32) -> StoreResult<Vec<pb::Scenario>> {
        let names: Vec<String> = states.iter().map(|s| format!("'{}'", state_name(*s))).collect();
        let filter = if names.is_empty() { String::new() } else { format!("WHERE state IN ({})", names.join(",")) };
        let mut v = self.load_where(&format!("{filter} ORDER BY seq DESC LIMIT ?1"), &[&limit])?;
        v.reverse();
        Ok(v)
    }

    /// Record one of the coordinator's own actions (`actor` names the part of it that acted).
    pub fn audit(&self, actor: &str, action: &str, target: &str, detail: &str, outcome: &str) -> StoreResult<()> {
        self.audit_by(&Actor { text: actor.to_string(), ..Default::default() }, action, target, detail, outcome)
    }

    /// Record what an authenticated caller did.
    pub fn audit_by(&self, actor: &Actor, action: &str, target: &str, detail: &str, outcome: &str) -> StoreResult<()> {
        self.lock().execute(
            "INSERT INTO audit (at, actor, action, target, detail, outcome, actor_name, actor_role, peer_address, client_note)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                actor.text,
                action,
                target,
                detail,
                outcome,
                actor.name,
                actor.role,
                actor.address,
                actor.note
            ],
        )?;
        Ok(())
    }

    /// The newest `limit` entries at or after `since`, oldest first.
    pub fn list_audit(&self, since: Option<SystemTime>, limit: u32) -> StoreResult<Vec<pb::AuditEntry>> {
        let since = since.map(|t| humantime::format_rfc3339_millis(t).to_string()).unwrap_or_default();
        let c = self.lock();
        let mut stmt =
            c.prepare("SELECT id, at, actor, action, target, detail, outcome, actor_name, actor_role, peer_address, client_note FROM audit WHERE at >= ?1 ORDER BY id DESC LIMIT ?2")?;
        let mut v: Vec<pb::AuditEntry> = stmt
            .query_map(params![since, limit], |r| {
                Ok(pb::AuditEntry {
                    id: r.get::<_, i64>(0)? as u64,
                    at: parse_ts(r.get(1)?),
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    detail: r.get(5)?,
                    outcome: r.get(6)?,
                    actor_name: r.get(7)?,
                    actor_role: r.get(8)?,
                    peer_address: r.get(9)?,
                    client_note: r.get(10)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Add (or replace, same id) an experiment run in the index.
    pub fn record_run(&self, run: &pb::ExperimentRun) -> StoreResult<()> {
        let started =
            run.started_at.as_ref().map(|t| humantime::format_rfc3339_seconds(timestamp_from_pb(t)).to_string()).unwrap_or_default();
        self.lock().execute(
            "INSERT OR REPLACE INTO experiment_runs (id, seq, experiment, verdict, started_at, report_dir, host, run)
             VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM experiment_runs), ?2, ?3, ?4, ?5, ?6, ?7)",
            params![run.id, run.experiment, run.verdict, started, run.report_dir, run.host, run.encode_to_vec()],
        )?;
        Ok(())
    }

    /// The newest `limit` runs (of `experiment` when not empty), oldest first.
    pub fn list_runs(&self, limit: u32, experiment: &str) -> StoreResult<Vec<pb::ExperimentRun>> {
        let c = self.lock();
        let mut stmt = c.prepare("SELECT run FROM experiment_runs WHERE ?1 = '' OR experiment = ?1 ORDER BY seq DESC LIMIT ?2")?;
        let mut v: Vec<pb::ExperimentRun> = stmt
            .query_map(params![experiment, limit], |r| r.get::<_, Vec<u8>>(0))?
            .filter_map(|b| b.ok().and_then(|b| pb::ExperimentRun::decode(b.as_slice()).ok()))
            .collect();
        v.reverse();
        Ok(v)
    }

    /// Write a GameDay's record (at its start, each pick, and its end).
    pub fn save_gameday(&self, g: &pb::GameDay) -> StoreResult<()> {
        let started = g.started_at.as_ref().map(|t| humantime::format_rfc3339_millis(timestamp_from_pb(t)).to_string()).unwrap_or_default();
        let state = pb::GameDayState::try_from(g.state)
            .unwrap_or(pb::GameDayState::Unspecified)
            .as_str_name()
            .trim_start_matches("GAME_DAY_STATE_");
        self.lock().execute(
            "INSERT OR REPLACE INTO gamedays (id, started_at, state, record) VALUES (?1, ?2, ?3, ?4)",
            params![g.id, started, state, g.encode_to_vec()],
        )?;
        Ok(())
    }

    /// The newest GameDay, if any.
    pub fn last_gameday(&self) -> StoreResult<Option<pb::GameDay>> {
        let blob: Option<Vec<u8>> =
            self.lock().query_row("SELECT record FROM gamedays ORDER BY started_at DESC LIMIT 1", [], |r| r.get(0)).optional()?;
        Ok(blob.and_then(|b| pb::GameDay::decode(b.as_slice()).ok()))
    }

    /// Whether the scenario exists at all (for NOT_FOUND vs final).
    pub fn exists(&self, id: &str) -> StoreResult<bool> {
        Ok(self.lock().query_row("SELECT 1 FROM scenarios WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some())
    }
}

/// Add each of `columns` (name, type) that `table` lacks: the migration of
/// a file made by an older version (the names and types are ours, never input).
fn add_columns_if_missing(conn: &Connection, table: &str, columns: &[(&str, &str)]) -> StoreResult<()> {
    for (name, ty) in columns {
        let has: bool = conn.query_row(&format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"), [name], |r| {
            r.get::<_, i64>(0).map(|n| n > 0)
        })?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {ty};"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiment_runs_are_indexed_newest_last_and_filtered_by_name() {
        let st = Store::in_memory().expect("store");
        for (id, name) in [("a-1", "a"), ("b-1", "b"), ("a-2", "a")] {
            let run = pb::ExperimentRun { id: id.into(), experiment: name.into(), verdict: "HELD".into(), ..Default::default() };
            st.record_run(&run).expect("record");
        }
        let ids = |v: Vec<pb::ExperimentRun>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(st.list_runs(50, "").expect("list")), ["a-1", "b-1", "a-2"]);
        assert_eq!(ids(st.list_runs(50, "a").expect("list")), ["a-1", "a-2"]);
        assert_eq!(ids(st.list_runs(1, "").expect("list")), ["a-2"]);
        // Recording the same id again replaces it and moves it last.
        st.record_run(&pb::ExperimentRun { id: "a-1".into(), experiment: "a".into(), verdict: "ABORTED".into(), ..Default::default() })
            .expect("again");
        let v = st.list_runs(50, "").expect("list");
        assert_eq!((v.len(), v[2].id.as_str(), v[2].verdict.as_str()), (3, "a-1", "ABORTED"));
    }

    #[test]
    fn scenario_round_trips_with_transitions_and_agents() {
        let s = Store::in_memory().expect("store");
        let now = timestamp_to_pb(SystemTime::now());
        let mut sc = pb::Scenario {
            id: "sc-1".into(),
            spec: Some(pb::ScenarioSpec { name: "loss on kafka".into(), severity: 2, ..Default::default() }),
            state: ScenarioState::Queued as i32,
            reason: "slots full".into(),
            scenario_type: "network_loss".into(),
            severity: 2,
            duration: Some(duration_to_pb(Duration::from_secs(30))),
            created_at: Some(now),
            created_by: "me".into(),
            transitions: vec![pb::ScenarioTransition { at: Some(now), state: ScenarioState::Queued as i32, reason: "slots full".into() }],
            ..Default::default()
        };
        s.save(&sc).expect("save");
        sc.state = ScenarioState::Running as i32;
        sc.transitions.push(pb::ScenarioTransition { at: Some(now), state: ScenarioState::Running as i32, reason: "slot free".into() });
        sc.agents.push(pb::ScenarioAgent {
            agent_id: "a".into(),
            address: "http://a:1".into(),
            fault_id: "sc-1".into(),
            fault_state: FaultState::Applied as i32,
            achieved: [("cpu_pct".to_string(), 49.5)].into(),
            outcome: "OOM-killed".into(),
            revert_check: pb::RevertCheck::Different as i32,
            revert_check_detail: "nft tables inet in host netns: was \"(none)\", now \"chaos_sc_1\"".into(),
            ..Default::default()
        });
        s.save(&sc).expect("save again");
        let back = s.load("sc-1").expect("load").expect("exists");
        assert_eq!(back.state, ScenarioState::Running as i32);
        assert_eq!(back.transitions.len(), 2);
        assert_eq!(back.agents[0].fault_state, FaultState::Applied as i32);
        assert_eq!((back.agents[0].achieved.get("cpu_pct"), back.agents[0].outcome.as_str()), (Some(&49.5), "OOM-killed"));
        assert_eq!(back.agents[0].revert_check, pb::RevertCheck::Different as i32);
        assert_eq!(back.agents[0].revert_check_detail, sc.agents[0].revert_check_detail);
        assert_eq!(back.spec.as_ref().map(|s| s.name.as_str()), Some("loss on kafka"));
        assert_eq!(back.duration.as_ref().and_then(duration_from_pb), Some(Duration::from_secs(30)));
        assert_eq!(s.unfinished().expect("unfinished").len(), 1);
        assert_eq!(s.list(&[ScenarioState::Completed as i32], 10).expect("list").len(), 0);
        assert!(s.exists("sc-1").expect("exists") && !s.exists("sc-2").expect("exists"));
    }

    #[test]
    fn the_newest_gameday_is_kept() {
        let st = Store::in_memory().expect("store");
        assert!(st.last_gameday().expect("none").is_none());
        let at = |s: u64| Some(timestamp_to_pb(SystemTime::UNIX_EPOCH + Duration::from_secs(s)));
        let g = |id: &str, s: u64| pb::GameDay {
            id: id.into(),
            started_at: at(s),
            state: pb::GameDayState::Running as i32,
            ..Default::default()
        };
        st.save_gameday(&g("gd-1", 100)).expect("save");
        st.save_gameday(&g("gd-2", 200)).expect("save");
        let mut ended = g("gd-2", 200);
        ended.state = pb::GameDayState::Completed as i32;
        ended.history.push(pb::GameDayTick { n: 1, result: "injected".into(), ..Default::default() });
        st.save_gameday(&ended).expect("again");
        assert_eq!(st.last_gameday().expect("last"), Some(ended));
    }

    #[test]
    fn a_version_1_file_gains_the_new_columns_and_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).expect("open");
            let v1 = SCHEMA
                .replace(
                    "    achieved    TEXT NOT NULL DEFAULT '{}',  -- JSON object: what the fault achieved, by name with its unit\n",
                    "",
                )
                .replace("    outcome     TEXT NOT NULL DEFAULT '',    -- what became of the target (e.g. OOM-killed)\n", "")
                .replace(
                    "    revert_check TEXT NOT NULL DEFAULT '',   -- the agent's re-read after the revert: VERIFIED DIFFERENT NOT_COMPARED, '' before\n",
                    "",
                )
                .replace("    revert_check_detail TEXT NOT NULL DEFAULT '',\n", "");
            let v1 = &v1[..v1.find("CREATE TABLE IF NOT EXISTS experiment_runs").expect("runs table")];
            c.execute_batch(v1).expect("version 1 schema");
            let cols: i64 = c.query_row("SELECT COUNT(*) FROM pragma_table_info('scenario_agents')", [], |r| r.get(0)).expect("cols");
            assert_eq!(cols, 10, "the version 1 table");
        }
        let s = Store::open(&path).expect("migrates");
        s.record_run(&pb::ExperimentRun { id: "r".into(), verdict: "HELD".into(), ..Default::default() }).expect("runs table");
        let cols: i64 = s.lock().query_row("SELECT COUNT(*) FROM pragma_table_info('scenario_agents')", [], |r| r.get(0)).expect("cols");
        assert_eq!(cols, 14);
    }

    #[test]
    fn audit_is_filtered_by_time_and_limited_to_the_newest() {
        let s = Store::in_memory().expect("store");
        for i in 0..5 {
            s.audit("me (127.0.0.1:1)", "CreateScenario", &format!("sc-{i}"), "", "ok").expect("audit");
        }
        let v = s.list_audit(None, 3).expect("list");
        assert_eq!(v.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), vec!["sc-2", "sc-3", "sc-4"]);
        assert!(s.list_audit(Some(SystemTime::now() + Duration::from_secs(5)), 10).expect("list").is_empty());
    }

    #[test]
    fn audit_keeps_the_actor_in_parts_and_old_files_gain_the_columns() {
        let s = Store::in_memory().expect("store");
        let a = Actor {
            text: "alice (operator) from 127.0.0.1:9".into(),
            name: "alice".into(),
            role: "operator".into(),
            address: "127.0.0.1:9".into(),
            note: "alice@laptop".into(),
        };
        s.audit_by(&a, "CreateScenario", "sc-1", "", "ok").expect("audit");
        let e = &s.list_audit(None, 1).expect("list")[0];
        assert_eq!((e.actor_name.as_str(), e.actor_role.as_str(), e.peer_address.as_str()), ("alice", "operator", "127.0.0.1:9"));
        assert_eq!((e.actor.as_str(), e.client_note.as_str()), (a.text.as_str(), "alice@laptop"));
        // A version-3 file: the audit table without the parts.
        let c = Connection::open_in_memory().expect("db");
        c.execute_batch(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
               target TEXT NOT NULL, detail TEXT NOT NULL, outcome TEXT NOT NULL);
             INSERT INTO audit (at, actor, action, target, detail, outcome) VALUES ('2026-01-01T00:00:00Z', 'old', 'Arm', 'fleet', '', 'ok');",
        )
        .expect("old schema");
        let s = Store::init(c).expect("migrated");
        let v = s.list_audit(None, 10).expect("list");
        assert_eq!((v[0].actor.as_str(), v[0].actor_name.as_str()), ("old", ""));
    }
}
