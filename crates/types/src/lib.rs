//! Name the things Vouch handles: content ids, model names and references, signed manifests, and the HTTP API's JSON bodies.

pub mod api;
mod ids;
pub mod manifest;
mod name;

pub use ids::{BlobId, IdError, ModelId};
pub use manifest::{
    DType, Dim, Manifest, ManifestBody, ManifestError, ManifestLimits, ModelFile, ModelFormat, TensorSpec,
};
pub use name::{ModelName, ModelRef, NameError, Version};
