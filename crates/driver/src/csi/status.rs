//! The ONE mapping from domain errors to `tonic::Status`. Handlers return
//! `BackendError`s (or validation messages) and convert here, so a code means the same
//! thing in every RPC.

use tonic::{Code, Status};

use crate::backend::BackendError;

impl From<BackendError> for Status {
    fn from(error: BackendError) -> Self {
        let code = match &error {
            BackendError::NotFound(_) => Code::NotFound,
            BackendError::AlreadyExists(_) => Code::AlreadyExists,
            BackendError::InvalidParameter(_) => Code::InvalidArgument,
            BackendError::OutOfRange(_) => Code::OutOfRange,
            BackendError::PermissionDenied(_) => Code::PermissionDenied,
            BackendError::InUse(_) => Code::FailedPrecondition,
            BackendError::Exhausted(_) => Code::ResourceExhausted,
            BackendError::Unavailable(_) => Code::Unavailable,
            BackendError::Timeout(_) => Code::DeadlineExceeded,
            BackendError::Internal(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

/// A request field is missing or malformed.
pub fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

/// Another operation on the same volume is still running.
pub fn busy(volume_id: &str) -> Status {
    Status::aborted(format!(
        "an operation on volume {volume_id} is already in progress; retry later"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_error_has_its_code_and_keeps_its_message() {
        let cases = [
            (BackendError::NotFound("a".into()), Code::NotFound),
            (BackendError::AlreadyExists("b".into()), Code::AlreadyExists),
            (
                BackendError::InvalidParameter("c".into()),
                Code::InvalidArgument,
            ),
            (BackendError::OutOfRange("d".into()), Code::OutOfRange),
            (
                BackendError::PermissionDenied("e".into()),
                Code::PermissionDenied,
            ),
            (BackendError::Exhausted("f".into()), Code::ResourceExhausted),
            (BackendError::Unavailable("g".into()), Code::Unavailable),
            (BackendError::Timeout("h".into()), Code::DeadlineExceeded),
            (BackendError::Internal("i".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }
}
