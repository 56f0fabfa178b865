//! The agent's one error type, and the one place it maps to gRPC codes.

use std::path::PathBuf;

use chaos_proto::spec::SpecError;
use nix::errno::Errno;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("agent is disarmed ({reason}); faults are refused until it is armed again (`chaos arm`)")]
    Disarmed { reason: String },
    #[error("dead-man lease lost: {0}; faults are refused until contact with the coordinator is back")]
    LeaseLost(String),
    #[error("revert of fault {id:?} failed: {error}; its journal record is kept and the revert is retried")]
    RevertFailed { id: String, error: String },
    /// The re-read after a revert (and one more revert) still differs from before the fault.
    #[error("the host is not as it was before the fault, after its revert and one more try: {0}")]
    NotRestored(String),
    #[error("target is protected: {0}")]
    Protected(String),
    #[error("target not found: {0}")]
    TargetNotFound(String),
    #[error("a fault with id {0:?} is already active on this agent")]
    AlreadyExists(String),
    #[error("no fault with id {0:?} on this agent")]
    UnknownFault(String),
    #[error("journal {path}: {source}")]
    Journal { path: PathBuf, source: std::io::Error },
    #[error("{op} on pid {pid}: {errno}")]
    Os { op: String, pid: u32, errno: Errno },
    #[error("reading the process table: {0}")]
    ProcessTable(std::io::Error),
    #[error("agent is shutting down")]
    ShuttingDown,
    /// The fault was reverted while its apply still waited for its turn.
    #[error("{0}")]
    Cancelled(String),
    /// A safety guard of the agent refuses the fault (memory floor, disk cap).
    #[error("refused by a guard: {0}")]
    Guard(String),
    #[error("this host lacks {0}")]
    MissingFeature(String),
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    /// The host refused an operation the agent is entitled to try (EACCES from a kernel interface).
    #[error("{0}")]
    HostDenied(String),
}

impl AgentError {
    pub fn journal(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Journal { path: path.into(), source }
    }

    /// An I/O error while doing `what`, by its kind: a missing kernel
    /// feature, a target gone, a refusal of the host, or (anything else) a
    /// failure of the agent's own.
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::Unsupported => AgentError::MissingFeature(format!("{e} ({what})")),
            K::NotFound => AgentError::TargetNotFound(format!("{what}: {e}")),
            K::PermissionDenied => AgentError::HostDenied(format!("{what}: {e}")),
            _ => AgentError::Command { cmd: what.to_string(), detail: e.to_string() },
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::Spec(SpecError::Invalid { .. }) => Code::InvalidArgument,
            AgentError::Disarmed { .. } | AgentError::LeaseLost(_) | AgentError::MissingFeature(_) | AgentError::Guard(_) => {
                Code::FailedPrecondition
            }
            AgentError::Protected(_) | AgentError::HostDenied(_) => Code::PermissionDenied,
            AgentError::Os { errno: Errno::EPERM, .. } => Code::PermissionDenied,
            AgentError::TargetNotFound(_) | AgentError::UnknownFault(_) => Code::NotFound,
            AgentError::AlreadyExists(_) => Code::AlreadyExists,
            AgentError::ShuttingDown => Code::Unavailable,
            AgentError::Cancelled(_) => Code::Aborted,
            AgentError::Journal { .. }
            | AgentError::Os { .. }
            | AgentError::ProcessTable(_)
            | AgentError::RevertFailed { .. }
            | AgentError::NotRestored(_)
            | AgentError::Command { .. } => Code::Internal,
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
