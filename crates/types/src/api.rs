//! The JSON bodies of the HTTP API, shared by the node and the client.

use serde::{Deserialize, Serialize};

use vouch_crypto::PublicKey;

use crate::ids::{BlobId, ModelId};
use crate::manifest::Manifest;
use crate::receipt::{Receipt, VerifyLevel};

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
    /// On a network node: the node checked and holds the manifest, but the model is published
    /// only once a `publish_model` transaction signed by its publisher is finalized.
    #[serde(default)]
    pub staged: bool,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"`.
    pub status: String,
    /// The node's software version.
    pub version: String,
    /// The key the node signs receipts with.
    pub node_key: PublicKey,
}

/// `POST /v1/infer`: run a model on the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferRequest {
    /// A model id, `name@version` or `name`.
    pub model: String,
    /// The inputs, as tensor JSON: `{"name": {"shape": [...], "dtype": "...", "data": [...]}}`.
    pub inputs: serde_json::Value,
    /// `reexec` (the node runs the exact plan and says which, with its trace root) or `none`.
    pub verify: VerifyLevel,
    /// Chosen by the requester so that the receipt answers this request and no other.
    pub nonce: u64,
}

/// The answer to an inference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferResponse {
    /// The outputs, as tensor JSON.
    pub outputs: serde_json::Value,
    /// The node's signed receipt.
    pub receipt: Receipt,
}
