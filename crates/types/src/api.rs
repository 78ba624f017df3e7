//! The JSON bodies of the HTTP API, shared by the node and the client.

use serde::{Deserialize, Serialize};

use crate::ids::{BlobId, ModelId};
use crate::manifest::Manifest;

/// The body of every error response: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A machine-readable code and a one-line message for people.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, snake_case (`payload_too_large`, `version_exists`, …).
    pub code: String,
    /// One line saying what was wrong.
    pub message: String,
}

/// The answer to a blob upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// The blob's id.
    pub id: BlobId,
    /// Its size in bytes.
    pub size: u64,
    /// Whether this upload stored it (false: it was already there).
    pub created: bool,
}

/// A published model as the node lists and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelView {
    /// The model id.
    pub id: ModelId,
    /// The order in which this node's registry accepted it (1, 2, …).
    pub published_seq: u64,
    /// The signed manifest.
    #[serde(flatten)]
    pub manifest: Manifest,
}

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishInfo {
    /// The model id.
    pub id: ModelId,
    /// Whether this request published it (false: the identical manifest was already published).
    pub created: bool,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"`.
    pub status: String,
    /// The node's software version.
    pub version: String,
}
