//! The coordinator's error type and its one mapping to gRPC codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{field} {message}")]
    Invalid { field: String, message: String },
    #[error("unknown agent {0:?}: register first")]
    UnknownAgent(String),
    #[error("{0}")]
    Unimplemented(String),
}

impl CoordinatorError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        CoordinatorError::Invalid { field: field.to_string(), message: message.into() }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::Invalid { .. } => Code::InvalidArgument,
            CoordinatorError::UnknownAgent(_) => Code::NotFound,
            CoordinatorError::Unimplemented(_) => Code::Unimplemented,
        };
        Status::new(code, e.to_string())
    }
}
