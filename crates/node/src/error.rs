//! API errors: every failure becomes `{"error":{"code":…,"message":…}}` with the right status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use vouch_store::StoreError;
use vouch_types::ManifestError;
use vouch_types::api::{ErrorBody, ErrorDetail};

use crate::registry::RegistryError;

/// An error answer of the HTTP API.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// One line for people.
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 500 for failures inside the node.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let message = error.to_string();
        match error {
            StoreError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "blob_not_found", message),
            StoreError::Corrupt { .. } => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "blob_corrupt", message),
            StoreError::TooLarge { .. } => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message),
            StoreError::Truncated { .. } => Self::bad_request("upload_incomplete", message),
            StoreError::BadRange { .. } => {
                Self::new(StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable", message)
            }
            StoreError::Output(_) | StoreError::Io(_) => Self::internal(message),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::VersionExists { .. } => Self::new(StatusCode::CONFLICT, "version_exists", message),
            RegistryError::NameOwned { .. } => Self::new(StatusCode::FORBIDDEN, "name_owned", message),
            RegistryError::InUse(_) | RegistryError::Damaged(_) | RegistryError::Database(_) => Self::internal(message),
        }
    }
}

impl From<ManifestError> for ApiError {
    fn from(error: ManifestError) -> Self {
        let message = error.to_string();
        match error {
            ManifestError::TooLarge { .. } => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message),
            ManifestError::Malformed(_) => Self::bad_request("malformed_manifest", message),
            ManifestError::Invalid(_) | ManifestError::Name(_) => Self::bad_request("invalid_manifest", message),
            ManifestError::Signature(_) => Self::bad_request("bad_signature", message),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        Self::internal(format!("a worker task failed: {error}"))
    }
}
