//! Name the things Vouch handles: content ids, model names and references, signed manifests and receipts, and the HTTP API's JSON bodies.

pub mod api;
mod ids;
pub mod manifest;
mod name;
pub mod receipt;

pub use ids::{BlobId, IdError, ModelId};
pub use manifest::{
    DType, Dim, Manifest, ManifestBody, ManifestError, ManifestLimits, ModelFile, ModelFormat, PlanRef, TensorSpec,
};
pub use name::{MAX_NAME_BYTES, MAX_VERSION_BYTES, ModelName, ModelRef, NameError, Version};
pub use receipt::{ExactClaim, Receipt, ReceiptBody, ReceiptError, VerifyLevel, request_hash};
