//! Container faults through the Docker Engine API (bollard over the
//! daemon's unix socket): stop, start, restart, pause, unpause, kill, by
//! name, id or `label:KEY=VALUE`; and the resolution of a container to its
//! init process, so network and resource faults can target `container`.
//!
//! The plan names each container by id with the state it was in, so revert
//! (start after stop/kill, unpause after pause, stop after start, pause
//! after unpause) works from the journal alone after an agent crash. A
//! container that is gone at revert is recorded, not retried.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use async_trait::async_trait;
use bollard::{
    Docker,
    errors::Error as DockerError,
    query_parameters::{
        KillContainerOptionsBuilder, ListContainersOptionsBuilder, RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
    },
};
use chaos_proto::spec::{ContainerVerb, DEFAULT_STOP_GRACE, FaultKind, FaultRequest, SignalName, TargetSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Applied, FaultDriver, Plan, Snapshot};
use crate::{error::AgentError, protect::Protection};

/// One container as the plan saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPlan {
    pub verb: ContainerVerb,
    pub signal: SignalName,
    pub containers: Vec<ContainerRef>,
    /// What a stop (the verb's, or a revert's) waits after SIGTERM before
    /// SIGKILL. Journal records written before the field existed read as
    /// the 5 s every stop waited then.
    #[serde(default = "default_stop_grace")]
    pub stop_grace: Duration,
}

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

/// The state of a container that matters to the verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    running: bool,
    paused: bool,
    pid: u32,
}

pub struct ContainerDriver {
    socket: PathBuf,
    protection: std::sync::Arc<Protection>,
    docker: Mutex<Option<Docker>>,
}

/// How long one call to the daemon may take; a stop or restart may take
/// its grace on top (the daemon answers once the container has exited).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, .. })
}

fn plan_of(plan: &Plan) -> Result<&ContainerPlan, AgentError> {
    match plan {
        Plan::Container(p) => Ok(p),
        other => Err(AgentError::Command { cmd: "container driver".into(), detail: format!("given a foreign plan {other:?}") }),
    }
}

/// Whether the daemon answers on `socket`: its version, or why not.
pub async fn probe(socket: &std::path::Path) -> Result<String, String> {
    let d = connect(socket).await?;
    let v = tokio::time::timeout(Duration::from_secs(2), d.version())
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(format!("Docker Engine {} (API {})", v.version.unwrap_or_default(), v.api_version.unwrap_or_default()))
}

async fn connect(socket: &std::path::Path) -> Result<Docker, String> {
    let path = socket.to_str().ok_or_else(|| format!("socket path {} is not UTF-8", socket.display()))?;
    let d = Docker::connect_with_unix(path, CALL_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION).map_err(|e| e.to_string())?;
    // Debian's dockerd 20.10 speaks API 1.41: agree on what it knows.
    tokio::time::timeout(Duration::from_secs(2), d.negotiate_version())
        .await
        .map_err(|_| format!("no answer on {} within 2 s", socket.display()))?
        .map_err(|e| format!("{}: {e}", socket.display()))
}

impl ContainerDriver {
    pub fn new(socket: PathBuf, protection: std::sync::Arc<Protection>) -> Self {
        Self { socket, protection, docker: Mutex::new(None) }
    }

    async fn docker(&self) -> Result<Docker, AgentError> {
        let mut g = self.docker.lock().await;
        if let Some(d) = g.as_ref() {
            return Ok(d.clone());
        }
        let d = connect(&self.socket).await.map_err(|e| AgentError::MissingFeature(format!("a Docker daemon answering ({e})")))?;
        *g = Some(d.clone());
        Ok(d)
    }

    fn err(what: String) -> impl FnOnce(DockerError) -> AgentError {
        move |e| AgentError::Command { cmd: format!("docker {what}"), detail: e.to_string() }
    }

    /// The container (full id and name) and its state; None when it is gone.
    async fn state(&self, d: &Docker, id: &str) -> Result<Option<(ContainerRef, State)>, AgentError> {
        match d.inspect_container(id, None).await {
            Ok(c) => {
                let s = c.state.unwrap_or_default();
                Ok(Some((
                    ContainerRef {
                        id: c.id.unwrap_or_else(|| id.to_string()),
                        name: c.name.unwrap_or_default().trim_start_matches('/').to_string(),
                    },
                    State {
                        running: s.running.unwrap_or(false),
                        paused: s.paused.unwrap_or(false),
                        pid: u32::try_from(s.pid.unwrap_or(0)).unwrap_or(0),
                    },
                )))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Self::err(format!("inspect {id}"))(e)),
        }
    }

    /// The containers a target names: by name/id, or every one with a label.
    async fn resolve(&self, d: &Docker, target: &str) -> Result<Vec<(ContainerRef, State)>, AgentError> {
        let ids: Vec<String> = match target.strip_prefix("label:") {
            Some(label) => {
                let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
                let list = d
                    .list_containers(Some(ListContainersOptionsBuilder::new().all(true).filters(&filters).build()))
                    .await
                    .map_err(Self::err("ps".into()))?;
                list.into_iter().filter_map(|c| c.id).collect()
            }
            None => vec![target.to_string()],
        };
        let mut out = vec![];
        for id in ids {
            let Some((c, st)) = self.state(d, &id).await? else {
                return Err(AgentError::TargetNotFound(format!("no container {id:?} on this host's Docker daemon")));
            };
            if self.protection.name_is_protected(&c.name) {
                return Err(AgentError::Protected(format!("container {:?} has a name listed in protected.names", c.name)));
            }
            if st.pid != 0 && (st.pid == std::process::id() || self.protection.coordinator_pid() == Some(st.pid)) {
                return Err(AgentError::Protected(format!("container {:?} runs the agent or the coordinator", c.name)));
            }
            out.push((c, st));
        }
        if out.is_empty() {
            return Err(AgentError::TargetNotFound(format!("no container matches {target:?}")));
        }
        Ok(out)
    }

    /// The init process of a running container (its netns and cgroup are the container's).
    pub async fn init_pid(&self, target: &str) -> Result<u32, AgentError> {
        let d = self.docker().await?;
        let found = self.resolve(&d, target).await?;
        let [(c, st)] = found.as_slice() else {
            return Err(AgentError::TargetNotFound(format!("{target:?} names {} containers; name one", found.len())));
        };
        if !st.running || st.pid == 0 {
            return Err(AgentError::TargetNotFound(format!("container {} is not running", c.name)));
        }
        Ok(st.pid)
    }

    /// Do `verb` to one container; a stop or restart waits up to `grace`
    /// after SIGTERM before Docker sends SIGKILL.
    async fn act(&self, d: &Docker, verb: ContainerVerb, signal: SignalName, grace: Duration, id: &str) -> Result<(), AgentError> {
        let what = format!("{} {}", verb.as_str(), short(id));
        let (t, timeout) = stop_timing(grace);
        let patient = || d.clone().with_timeout(timeout);
        match verb {
            ContainerVerb::Stop => patient().stop_container(id, Some(StopContainerOptionsBuilder::new().t(t).build())).await,
            ContainerVerb::Start => d.start_container(id, None).await,
            ContainerVerb::Restart => patient().restart_container(id, Some(RestartContainerOptionsBuilder::new().t(t).build())).await,
            ContainerVerb::Pause => d.pause_container(id).await,
            ContainerVerb::Unpause => d.unpause_container(id).await,
            ContainerVerb::Kill => d.kill_container(id, Some(KillContainerOptionsBuilder::new().signal(signal.0.as_str()).build())).await,
        }
        .map_err(Self::err(what))
    }
}

impl ContainerDriver {
    /// Do the plan's verb to one container and wait to see its effect.
    async fn act_and_verify(&self, d: &Docker, p: &ContainerPlan, c: &ContainerRef) -> Result<(), AgentError> {
        self.act(d, p.verb, p.signal, p.stop_grace, &c.id).await?;
        // Stop and kill return before the state settles on some daemons.
        for _ in 0..100 {
            if let Some((_, st)) = self.state(d, &c.id).await?
                && reached(p.verb, st)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(AgentError::Command {
            cmd: format!("docker {} {}", p.verb.as_str(), c.name),
            detail: "the container did not reach the expected state within 2 s".into(),
        })
    }
}

/// Docker's `t` (seconds between SIGTERM and SIGKILL) for a stop or restart
/// with `grace`, and how long its call may take: the daemon answers once
/// the container has exited, so the grace comes on top of the usual bound.
fn stop_timing(grace: Duration) -> (i32, Duration) {
    // The spec bounds the grace to 0..=300 s; a record edited by hand is clamped.
    let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
    (t, CALL_TIMEOUT.saturating_add(Duration::from_secs(t.unsigned_abs().into())))
}

/// Whether `verb` applies to a container in state `st`.
fn applies(verb: ContainerVerb, st: State) -> Result<(), &'static str> {
    match verb {
        ContainerVerb::Stop | ContainerVerb::Kill | ContainerVerb::Restart | ContainerVerb::Pause if !st.running => Err("is not running"),
        ContainerVerb::Pause if st.paused => Err("is already paused"),
        ContainerVerb::Start if st.running => Err("is already running"),
        ContainerVerb::Unpause if !st.paused => Err("is not paused"),
        _ => Ok(()),
    }
}

/// The state a verb leaves behind, checked after applying it.
fn reached(verb: ContainerVerb, st: State) -> bool {
    match verb {
        ContainerVerb::Stop | ContainerVerb::Kill => !st.running,
        ContainerVerb::Start | ContainerVerb::Restart => st.running && !st.paused,
        ContainerVerb::Pause => st.paused,
        ContainerVerb::Unpause => st.running && !st.paused,
    }
}

/// The verb that undoes `verb`, if any.
fn inverse(verb: ContainerVerb) -> Option<ContainerVerb> {
    match verb {
        ContainerVerb::Stop | ContainerVerb::Kill => Some(ContainerVerb::Start),
        ContainerVerb::Pause => Some(ContainerVerb::Unpause),
        ContainerVerb::Start => Some(ContainerVerb::Stop),
        ContainerVerb::Unpause => Some(ContainerVerb::Pause),
        ContainerVerb::Restart => None,
    }
}

/// A container's state as a snapshot value: "running", "paused", "not
/// running" (exited, created, dead: a start then a stop may turn "created"
/// into "exited", which is the same to the verbs) or "gone" (removed: not a leftover of ours).
fn state_text(st: Option<State>) -> &'static str {
    match st {
        None => "gone",
        Some(s) if s.paused => "paused",
        Some(s) if s.running => "running",
        Some(_) => "not running",
    }
}

/// The snapshot of `p`'s containers in the states `states` (same order);
/// `None` when the verb is not undone (restart).
fn snapshot_of(p: &ContainerPlan, states: &[Option<State>]) -> Option<Snapshot> {
    inverse(p.verb)?;
    let mut snap = Snapshot::default();
    for (c, st) in p.containers.iter().zip(states) {
        snap.insert(format!("docker container {} ({})", c.name, short(&c.id)), state_text(*st));
    }
    Some(snap)
}

#[async_trait]
impl FaultDriver for ContainerDriver {
    async fn plan(&self, req: &FaultRequest) -> Result<Plan, AgentError> {
        let (FaultKind::ContainerAction { verb, signal, stop_grace }, TargetSpec::Container(target)) = (&req.kind, &req.target) else {
            return Err(AgentError::Command {
                cmd: "container driver".into(),
                detail: format!("cannot plan {} on {}", req.kind.family(), req.target),
            });
        };
        let d = self.docker().await?;
        let found = self.resolve(&d, target).await?;
        let (fit, unfit): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, st)| applies(*verb, *st).is_ok());
        if fit.is_empty() {
            let why: Vec<String> = unfit.iter().map(|(c, st)| format!("{} {}", c.name, applies(*verb, *st).err().unwrap_or(""))).collect();
            return Err(AgentError::Guard(format!("cannot {} {target:?}: {}", verb.as_str(), why.join(", "))));
        }
        Ok(Plan::Container(ContainerPlan {
            verb: *verb,
            signal: *signal,
            containers: fit.into_iter().map(|(c, _)| c).collect(),
            stop_grace: *stop_grace,
        }))
    }

    async fn apply(&self, plan: &Plan) -> Result<Applied, AgentError> {
        let p = plan_of(plan)?;
        let d = self.docker().await?;
        // All at once: a stop waits out its grace per container.
        let results = futures::future::join_all(p.containers.iter().map(|c| self.act_and_verify(&d, p, c))).await;
        let mut done = vec![];
        for (c, r) in p.containers.iter().zip(results) {
            r?;
            done.push(format!("{} ({})", c.name, short(&c.id)));
        }
        let verb = match p.verb {
            ContainerVerb::Kill => format!("kill -{}", p.signal.0.as_str()),
            v if v.has_stop_grace() => format!("{} (grace {} s)", v.as_str(), p.stop_grace.as_secs()),
            v => v.as_str().to_string(),
        };
        Ok(Applied { backend: "docker", summary: format!("{verb}: {} (state verified)", done.join(", ")), ..Default::default() })
    }

    /// The state Docker reports for each container, for the verbs that are undone.
    async fn snapshot(&self, plan: &Plan) -> Result<Option<Snapshot>, AgentError> {
        let p = plan_of(plan)?;
        if inverse(p.verb).is_none() {
            return Ok(None);
        }
        let d = self.docker().await?;
        let mut states = Vec::with_capacity(p.containers.len());
        for c in &p.containers {
            states.push(self.state(&d, &c.id).await?.map(|(_, st)| st));
        }
        if !states.is_empty() && states.iter().all(Option::is_none) {
            let names: Vec<&str> = p.containers.iter().map(|c| c.name.as_str()).collect();
            return Err(AgentError::TargetNotFound(format!("every container of the fault is gone: {}", names.join(", "))));
        }
        Ok(snapshot_of(p, &states))
    }

    async fn revert(&self, plan: &Plan) -> Result<String, AgentError> {
        let p = plan_of(plan)?;
        let Some(undo) = inverse(p.verb) else { return Ok(format!("nothing to undo for {}", p.verb.as_str())) };
        let d = self.docker().await?;
        let mut parts = vec![];
        for c in &p.containers {
            match self.state(&d, &c.id).await? {
                None => parts.push(format!("{} is gone", c.name)),
                Some((_, st)) if applies(undo, st).is_err() => parts.push(format!("{} needs no {}", c.name, undo.as_str())),
                Some(_) => match self.act(&d, undo, p.signal, p.stop_grace, &c.id).await {
                    Err(AgentError::Command { detail, .. }) if detail.contains("404") => parts.push(format!("{} is gone", c.name)),
                    Err(e) => return Err(e),
                    Ok(()) => parts.push(format!("{} {}", undo.as_str(), c.name)),
                },
            }
        }
        Ok(parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_apply_to_the_right_states_and_undo_each_other() {
        let running = State { running: true, paused: false, pid: 5 };
        let paused = State { running: true, paused: true, pid: 5 };
        let stopped = State { running: false, paused: false, pid: 0 };
        use ContainerVerb::*;
        assert!(applies(Stop, running).is_ok() && applies(Stop, stopped).is_err());
        assert!(applies(Pause, paused).is_err() && applies(Unpause, paused).is_ok());
        assert!(applies(Start, stopped).is_ok() && applies(Start, running).is_err());
        for v in [Stop, Start, Pause, Unpause, Kill] {
            let undo = inverse(v).expect("undo");
            // What the verb leaves is a state its undo applies to.
            let after = match v {
                Stop | Kill => stopped,
                Start | Unpause => running,
                Pause => paused,
                Restart => running,
            };
            assert!(reached(v, after), "{v:?}");
            assert!(applies(undo, after).is_ok(), "{v:?} then {undo:?}");
        }
        assert_eq!(inverse(Restart), None);
    }

    /// A container stop's journal record as the agent wrote it before
    /// `stop_grace` existed (format 1, commit 3b0fcf8), byte for byte.
    const STOP_RECORD_BEFORE_STOP_GRACE: &str = r#"{
  "version": 1,
  "id": "fixture-stop",
  "request": {
    "id": "fixture-stop",
    "target": {
      "container": "web"
    },
    "duration": 300000,
    "labels": {},
    "kind": {
      "family": "container_action",
      "verb": "stop",
      "signal": "SIGKILL"
    }
  },
  "plan": {
    "driver": "container",
    "verb": "stop",
    "signal": "SIGKILL",
    "containers": [
      {
        "id": "4f1c2a9e8b7d6c5b4a3928171605f4e3d2c1b0a99887766554433221100ffee",
        "name": "web"
      }
    ]
  },
  "created_at_unix_ms": 1796299372966,
  "expires_at_unix_ms": 1796299672966,
  "agent_pid": 8873
}"#;

    #[test]
    fn a_stop_journaled_before_stop_grace_existed_reverts_with_the_old_5_s() {
        let rec = crate::journal::decode(STOP_RECORD_BEFORE_STOP_GRACE.as_bytes()).expect("an older record decodes");
        let Plan::Container(p) = &rec.plan else { panic!("a container plan: {:?}", rec.plan) };
        assert_eq!((p.verb, p.stop_grace), (ContainerVerb::Stop, Duration::from_secs(5)));
        assert_eq!(p.containers[0].name, "web");
        assert!(matches!(rec.request.kind, FaultKind::ContainerAction { stop_grace, .. } if stop_grace == DEFAULT_STOP_GRACE));
        // Written again, the record names its grace; read back, it is the same record.
        let again = serde_json::to_vec(&rec).expect("json");
        assert!(String::from_utf8_lossy(&again).contains("\"stop_grace\""));
        assert_eq!(crate::journal::decode(&again).expect("decode"), rec);
    }

    #[test]
    fn a_stop_call_waits_its_grace_on_top_of_the_usual_bound() {
        assert_eq!(stop_timing(Duration::from_secs(20)), (20, Duration::from_secs(50)));
        assert_eq!(stop_timing(Duration::ZERO), (0, CALL_TIMEOUT));
        assert_eq!(stop_timing(chaos_proto::spec::MAX_STOP_GRACE), (300, Duration::from_secs(330)));
        assert_eq!(stop_timing(Duration::from_secs(u64::MAX)).0, i32::MAX, "clamped, never wrapped");
    }

    #[test]
    fn snapshot_names_each_container_state_and_a_pause_left_behind() {
        let running = State { running: true, paused: false, pid: 5 };
        let paused = State { running: true, paused: true, pid: 5 };
        let exited = State { running: false, paused: false, pid: 0 };
        let web = ContainerRef { id: "0123456789abcdef0123".into(), name: "web".into() };
        let db = ContainerRef { id: "fedcba9876543210fedc".into(), name: "db".into() };
        let p = ContainerPlan {
            verb: ContainerVerb::Pause,
            signal: SignalName(nix::sys::signal::Signal::SIGKILL),
            containers: vec![web, db],
            stop_grace: DEFAULT_STOP_GRACE,
        };
        let before = snapshot_of(&p, &[Some(running), Some(running)]).expect("pause is undone");
        assert_eq!(before.items.get("docker container web (0123456789ab)").map(String::as_str), Some("running"), "{before:?}");
        let reverted = snapshot_of(&p, &[Some(running), Some(running)]).expect("some");
        assert!(reverted.differences(&before).is_empty());
        let left = snapshot_of(&p, &[Some(running), Some(paused)]).expect("some");
        assert_eq!(left.differences(&before), vec![r#"docker container db (fedcba987654): was "running", now "paused""#.to_string()]);
        let gone = snapshot_of(&p, &[None, Some(exited)]).expect("some");
        assert_eq!(gone.items.values().map(String::as_str).collect::<Vec<_>>(), vec!["not running", "gone"]);
        let restart = ContainerPlan { verb: ContainerVerb::Restart, ..p };
        assert_eq!(snapshot_of(&restart, &[Some(running), Some(running)]), None, "a restart is not undone");
    }
}
