//! The coordinator's error type and its one mapping to gRPC codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{field} {message}")]
    Invalid { field: String, message: String },
    #[error("unknown agent {0:?}: register first")]
    UnknownAgent(String),
    /// A safety rule refuses the request; the text names the rule and its numbers.
    #[error("{0}")]
    Refused(String),
    /// The queue is full.
    #[error("{0}")]
    Exhausted(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("state store: {0}")]
    Store(String),
    /// Another live process holds this agent id.
    #[error("{0}")]
    Duplicate(String),
    /// The caller's identity may not do this (beyond the roles table).
    #[error("{0}")]
    Denied(String),
}

impl CoordinatorError {
    pub fn store(e: rusqlite::Error) -> Self {
        CoordinatorError::Store(e.to_string())
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        CoordinatorError::Invalid { field: field.to_string(), message: message.into() }
    }
}

impl From<chaos_proto::spec::SpecError> for CoordinatorError {
    fn from(e: chaos_proto::spec::SpecError) -> Self {
        let chaos_proto::spec::SpecError::Invalid { field, message } = e;
        CoordinatorError::Invalid { field, message }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::Invalid { .. } => Code::InvalidArgument,
            CoordinatorError::UnknownAgent(_) => Code::NotFound,
            CoordinatorError::Refused(_) => Code::FailedPrecondition,
            CoordinatorError::Exhausted(_) => Code::ResourceExhausted,
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::Store(_) => Code::Internal,
            CoordinatorError::Duplicate(_) => Code::AlreadyExists,
            CoordinatorError::Denied(_) => Code::PermissionDenied,
        };
        Status::new(code, e.to_string())
    }
}
