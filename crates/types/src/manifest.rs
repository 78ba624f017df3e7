//! The signed model manifest and its canonical encoding.
//!
//! Layout (commonware-codec: big-endian integers, varint lengths):
//!
//! ```text
//! format_version u8 (1, or 2 with plans) | name str | version str | format u8
//! | files vec<path str, blob 32B, size u64> | [v2: plans vec<blob 32B, size u64>]
//! | inputs vec<TensorSpec> | outputs vec<TensorSpec> | license option<str> | description str
//! | publisher 32B | signature 64B
//! TensorSpec = name str | dtype u8 (ONNX TensorProto.DataType) | shape vec<Dim>
//! Dim        = 0 unknown | 1 fixed u64 | 2 named str
//! ```
//!
//! The signature covers every byte before it, under the `"manifest"` domain. The model id is the
//! BLAKE3 CID of the whole encoding, signature included.
//!
//! A manifest without exact plans is written in format 1 and one with plans in format 2, so each
//! manifest still has exactly one encoding and a model published before plans existed keeps its id.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vouch_codec::{
    Buf, CanonicalError, Error as CodecError, ReadExt, Write, decode_canonical, read_str, read_vec, write_str,
    write_vec,
};
use vouch_crypto::{CryptoError, PublicKey, SecretKey, Signature};

use crate::ids::{BlobId, ModelId};
use crate::name::{MAX_NAME_BYTES, MAX_VERSION_BYTES, ModelName, NameError, Version};

/// The signature domain of manifests.
pub const MANIFEST_DOMAIN: &str = "manifest";
/// The manifest encoding of a model without exact plans.
pub const MANIFEST_FORMAT_VERSION: u8 = 1;
/// The manifest encoding of a model with exact plans.
pub const MANIFEST_FORMAT_VERSION_WITH_PLANS: u8 = 2;

/// Limits on a manifest's contents, enforced while decoding.
#[derive(Debug, Clone)]
pub struct ManifestLimits {
    /// Most encoded bytes in one manifest.
    pub max_encoded_bytes: usize,
    /// Most files in one model.
    pub max_files: usize,
    /// Most exact plans in one model.
    pub max_plans: usize,
    /// Longest file path, in bytes.
    pub max_path_bytes: usize,
    /// Most inputs, and most outputs.
    pub max_tensors: usize,
    /// Longest tensor name, in bytes.
    pub max_tensor_name_bytes: usize,
    /// Highest tensor rank.
    pub max_rank: usize,
    /// Longest symbolic dimension name, in bytes.
    pub max_dim_name_bytes: usize,
    /// Longest license string, in bytes.
    pub max_license_bytes: usize,
    /// Longest description, in bytes.
    pub max_description_bytes: usize,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        Self {
            max_encoded_bytes: 1 << 20,
            max_files: 16,
            max_plans: 8,
            max_path_bytes: 256,
            max_tensors: 1024,
            max_tensor_name_bytes: 256,
            max_rank: 16,
            max_dim_name_bytes: 64,
            max_license_bytes: 64,
            max_description_bytes: 4096,
        }
    }
}

/// Why manifest bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Larger than the limit.
    #[error("manifest is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Does not decode, or decodes to a value with another encoding.
    #[error("malformed manifest: {0}")]
    Malformed(#[from] CanonicalError),
    /// A field decodes but breaks a rule.
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// A name or version breaks the naming rules.
    #[error("invalid manifest: {0}")]
    Name(#[from] NameError),
    /// The signature does not verify against the publisher key.
    #[error("manifest signature does not verify against its publisher key: {0}")]
    Signature(#[from] CryptoError),
}

/// The file format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX graph in one file.
    Onnx,
}

impl ModelFormat {
    fn tag(self) -> u8 {
        match self {
            Self::Onnx => 0,
        }
    }
    fn from_tag(tag: u8) -> Result<Self, CodecError> {
        match tag {
            0 => Ok(Self::Onnx),
            other => Err(CodecError::InvalidEnum(other)),
        }
    }
}

/// Element types, numbered as ONNX's `TensorProto.DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum DType {
    Float32,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Int32,
    Int64,
    String,
    Bool,
    Float16,
    Float64,
    Uint32,
    Uint64,
    Complex64,
    Complex128,
    Bfloat16,
    Float8e4m3fn,
    Float8e4m3fnuz,
    Float8e5m2,
    Float8e5m2fnuz,
    Uint4,
    Int4,
    Float4e2m1,
}

impl DType {
    const ALL: [DType; 23] = [
        Self::Float32,
        Self::Uint8,
        Self::Int8,
        Self::Uint16,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::String,
        Self::Bool,
        Self::Float16,
        Self::Float64,
        Self::Uint32,
        Self::Uint64,
        Self::Complex64,
        Self::Complex128,
        Self::Bfloat16,
        Self::Float8e4m3fn,
        Self::Float8e4m3fnuz,
        Self::Float8e5m2,
        Self::Float8e5m2fnuz,
        Self::Uint4,
        Self::Int4,
        Self::Float4e2m1,
    ];

    /// The ONNX `TensorProto.DataType` number.
    pub fn onnx_code(self) -> i32 {
        Self::ALL.iter().position(|d| *d == self).map_or(0, |i| i as i32 + 1)
    }

    /// The type for an ONNX `TensorProto.DataType` number, if it names one.
    pub fn from_onnx_code(code: i32) -> Option<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|c| c.checked_sub(1))
            .and_then(|i| Self::ALL.get(i).copied())
    }
}

/// One dimension of a tensor shape in a model's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A size named by the model (`batch`), the same wherever the name appears.
    Named(String),
    /// A size the model leaves open.
    Unknown,
}

/// The name, element type and shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The tensor's name in the graph.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape; `None` when the model declares no shape at all.
    pub shape: Option<Vec<Dim>>,
}

/// A file of a model: where it goes, and the blob that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Relative path, `/`-separated.
    pub path: String,
    /// The blob with the file's bytes.
    pub blob: BlobId,
    /// The file's size in bytes.
    pub size: u64,
}

/// An exact plan of a model: the integer program its publisher derived from the model and
/// calibration data, stored as a blob whose id is the plan id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRef {
    /// The plan id: the blob holding the plan's canonical encoding.
    pub id: BlobId,
    /// The encoding's size in bytes.
    pub size: u64,
}

/// What a publisher signs: everything in a manifest but the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBody {
    /// `namespace/model`.
    pub name: ModelName,
    /// The version this manifest publishes.
    pub version: Version,
    /// The model's file format.
    pub format: ModelFormat,
    /// The model's files.
    pub files: Vec<ModelFile>,
    /// The model's exact plans; the first is the one verifiers re-execute by default.
    #[serde(default)]
    pub plans: Vec<PlanRef>,
    /// The model's inputs, as read from the model file.
    pub inputs: Vec<TensorSpec>,
    /// The model's outputs, as read from the model file.
    pub outputs: Vec<TensorSpec>,
    /// An SPDX license expression.
    pub license: Option<String>,
    /// Free text.
    pub description: String,
    /// The key that signs this manifest and owns the name.
    pub publisher: PublicKey,
}

/// A model manifest signed by its publisher.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The signed content.
    #[serde(flatten)]
    pub body: ManifestBody,
    /// The publisher's signature over the body's encoding.
    pub signature: Signature,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Manifest({}@{} by {})",
            self.body.name, self.body.version, self.body.publisher
        )
    }
}

fn write_spec(spec: &TensorSpec, buf: &mut Vec<u8>) {
    write_str(&spec.name, buf);
    // The tag is the ONNX code, always 1..=23.
    (spec.dtype.onnx_code() as u8).write(buf);
    spec.shape.is_some().write(buf);
    if let Some(shape) = &spec.shape {
        write_vec(shape, buf, |dim, buf| match dim {
            Dim::Unknown => 0u8.write(buf),
            Dim::Fixed(size) => {
                1u8.write(buf);
                size.write(buf);
            }
            Dim::Named(name) => {
                2u8.write(buf);
                write_str(name, buf);
            }
        });
    }
}

fn read_spec(buf: &mut impl Buf, limits: &ManifestLimits) -> Result<TensorSpec, CodecError> {
    let name = read_str(buf, limits.max_tensor_name_bytes, "tensor name")?;
    let code = u8::read(buf)?;
    let dtype = DType::from_onnx_code(i32::from(code)).ok_or(CodecError::InvalidEnum(code))?;
    let shape = if bool::read(buf)? {
        Some(read_vec(buf, limits.max_rank, |buf| match u8::read(buf)? {
            0 => Ok(Dim::Unknown),
            1 => u64::read(buf).map(Dim::Fixed),
            2 => read_str(buf, limits.max_dim_name_bytes, "dimension name").map(Dim::Named),
            other => Err(CodecError::InvalidEnum(other)),
        })?)
    } else {
        None
    };
    Ok(TensorSpec { name, dtype, shape })
}

impl ManifestBody {
    /// The canonical encoding that the publisher signs.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256);
        let format_version = if self.plans.is_empty() {
            MANIFEST_FORMAT_VERSION
        } else {
            MANIFEST_FORMAT_VERSION_WITH_PLANS
        };
        format_version.write(&mut buf);
        write_str(self.name.as_str(), &mut buf);
        write_str(self.version.as_str(), &mut buf);
        self.format.tag().write(&mut buf);
        write_vec(&self.files, &mut buf, |file, buf| {
            write_str(&file.path, buf);
            file.blob.write(buf);
            file.size.write(buf);
        });
        if !self.plans.is_empty() {
            write_vec(&self.plans, &mut buf, |plan, buf| {
                plan.id.write(buf);
                plan.size.write(buf);
            });
        }
        write_vec(&self.inputs, &mut buf, write_spec);
        write_vec(&self.outputs, &mut buf, write_spec);
        self.license.is_some().write(&mut buf);
        if let Some(license) = &self.license {
            write_str(license, &mut buf);
        }
        write_str(&self.description, &mut buf);
        self.publisher.write(&mut buf);
        buf
    }

    /// Signs the body with `key`, which must be the publisher's.
    pub fn sign(self, key: &SecretKey) -> Result<Manifest, ManifestError> {
        if key.public_key() != self.publisher {
            return Err(ManifestError::Invalid(format!(
                "signing key {} is not the manifest's publisher {}",
                key.public_key(),
                self.publisher
            )));
        }
        let signature = key.sign(MANIFEST_DOMAIN, &self.encode());
        Ok(Manifest { body: self, signature })
    }

    /// Checks the rules that the encoding alone does not: names, paths, limits, uniqueness.
    pub fn validate(&self, limits: &ManifestLimits) -> Result<(), ManifestError> {
        // Re-parse name and version: a body built in code bypasses `FromStr`.
        self.name.as_str().parse::<ModelName>()?;
        self.version.as_str().parse::<Version>()?;
        let invalid = |message: String| Err(ManifestError::Invalid(message));
        match self.format {
            ModelFormat::Onnx if self.files.len() != 1 => {
                return invalid(format!("an onnx model has exactly one file, not {}", self.files.len()));
            }
            ModelFormat::Onnx => {}
        }
        if self.files.len() > limits.max_files {
            return invalid(format!(
                "{} files, more than the limit of {}",
                self.files.len(),
                limits.max_files
            ));
        }
        for (i, file) in self.files.iter().enumerate() {
            let path_ok = !file.path.is_empty()
                && file.path.len() <= limits.max_path_bytes
                && file.path.split('/').all(|part| {
                    !part.is_empty()
                        && part != "."
                        && part != ".."
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                });
            if !path_ok {
                return invalid(format!(
                    "file path '{}' must be relative, with parts of A-Z, a-z, 0-9, '.', '_', '-'",
                    file.path
                ));
            }
            if self.files[..i].iter().any(|other| other.path == file.path) {
                return invalid(format!("file path '{}' appears twice", file.path));
            }
        }
        if self.plans.len() > limits.max_plans {
            return invalid(format!(
                "{} exact plans, more than the limit of {}",
                self.plans.len(),
                limits.max_plans
            ));
        }
        for (i, plan) in self.plans.iter().enumerate() {
            if self.plans[..i].iter().any(|other| other.id == plan.id) {
                return invalid(format!("exact plan {} appears twice", plan.id));
            }
        }
        for (side, specs) in [("input", &self.inputs), ("output", &self.outputs)] {
            if specs.len() > limits.max_tensors {
                return invalid(format!(
                    "{} {side}s, more than the limit of {}",
                    specs.len(),
                    limits.max_tensors
                ));
            }
            for (i, spec) in specs.iter().enumerate() {
                if specs[..i].iter().any(|other| other.name == spec.name) {
                    return invalid(format!("{side} '{}' appears twice", spec.name));
                }
            }
        }
        if let Some(license) = &self.license
            && (license.is_empty()
                || license.len() > limits.max_license_bytes
                || !license
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b" .-+()".contains(&b)))
        {
            return invalid(format!(
                "license '{license}' is not an SPDX expression of at most {} characters",
                limits.max_license_bytes
            ));
        }
        if self.description.len() > limits.max_description_bytes {
            return invalid(format!(
                "description is longer than {} bytes",
                limits.max_description_bytes
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// The canonical encoding: the signed body, then the signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = self.body.encode();
        self.signature.write(&mut buf);
        buf
    }

    /// The model id: the CID of [`Manifest::encode`].
    pub fn id(&self) -> ModelId {
        ModelId(BlobId::of(&self.encode()))
    }

    /// Decodes manifest bytes within `limits`, refusing anything that is not the canonical
    /// encoding of a valid manifest whose signature verifies.
    pub fn decode(bytes: &[u8], limits: &ManifestLimits) -> Result<Self, ManifestError> {
        if bytes.len() > limits.max_encoded_bytes {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                limit: limits.max_encoded_bytes,
            });
        }
        let manifest = decode_canonical(bytes, |b| Self::read(Bytes::copy_from_slice(b), limits), Self::encode)?;
        manifest.body.validate(limits)?;
        manifest
            .body
            .publisher
            .verify(MANIFEST_DOMAIN, &manifest.body.encode(), &manifest.signature)?;
        Ok(manifest)
    }

    fn read(mut buf: Bytes, limits: &ManifestLimits) -> Result<Self, CodecError> {
        let format_version = u8::read(&mut buf)?;
        if format_version != MANIFEST_FORMAT_VERSION && format_version != MANIFEST_FORMAT_VERSION_WITH_PLANS {
            return Err(CodecError::Invalid("manifest", "unknown format version"));
        }
        let name = read_str(&mut buf, MAX_NAME_BYTES, "name")?
            .parse()
            .map_err(|_| CodecError::Invalid("manifest", "invalid model name"))?;
        let version = read_str(&mut buf, MAX_VERSION_BYTES, "version")?
            .parse()
            .map_err(|_| CodecError::Invalid("manifest", "invalid version"))?;
        let format = ModelFormat::from_tag(u8::read(&mut buf)?)?;
        let files = read_vec(&mut buf, limits.max_files, |buf| {
            Ok(ModelFile {
                path: read_str(buf, limits.max_path_bytes, "file path")?,
                blob: BlobId::read(buf)?,
                size: u64::read(buf)?,
            })
        })?;
        let plans = if format_version == MANIFEST_FORMAT_VERSION_WITH_PLANS {
            let plans = read_vec(&mut buf, limits.max_plans, |buf| {
                Ok(PlanRef {
                    id: BlobId::read(buf)?,
                    size: u64::read(buf)?,
                })
            })?;
            // Format 2 exists to carry plans; an empty list has its canonical form in format 1.
            if plans.is_empty() {
                return Err(CodecError::Invalid("manifest", "format 2 with no plans"));
            }
            plans
        } else {
            Vec::new()
        };
        let inputs = read_vec(&mut buf, limits.max_tensors, |buf| read_spec(buf, limits))?;
        let outputs = read_vec(&mut buf, limits.max_tensors, |buf| read_spec(buf, limits))?;
        let license = if bool::read(&mut buf)? {
            Some(read_str(&mut buf, limits.max_license_bytes, "license")?)
        } else {
            None
        };
        let description = read_str(&mut buf, limits.max_description_bytes, "description")?;
        let publisher = PublicKey::read(&mut buf)?;
        let signature = Signature::read(&mut buf)?;
        if bytes::Buf::has_remaining(&buf) {
            return Err(CodecError::ExtraData(bytes::Buf::remaining(&buf)));
        }
        Ok(Self {
            body: ManifestBody {
                name,
                version,
                format,
                files,
                plans,
                inputs,
                outputs,
                license,
                description,
                publisher,
            },
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(key: &SecretKey) -> ManifestBody {
        ManifestBody {
            name: "acme/fraud".parse().expect("name"),
            version: "1.2".parse().expect("version"),
            format: ModelFormat::Onnx,
            files: vec![ModelFile {
                path: "model.onnx".into(),
                blob: BlobId::of(b"onnx bytes"),
                size: 10,
            }],
            plans: Vec::new(),
            inputs: vec![TensorSpec {
                name: "input".into(),
                dtype: DType::Float32,
                shape: Some(vec![Dim::Named("batch".into()), Dim::Fixed(64)]),
            }],
            outputs: vec![TensorSpec {
                name: "probabilities".into(),
                dtype: DType::Float32,
                shape: None,
            }],
            license: Some("Apache-2.0".into()),
            description: "fraud scores".into(),
            publisher: key.public_key(),
        }
    }

    #[test]
    fn manifests_round_trip_and_verify() {
        let key = SecretKey::from_seed([9; 32]);
        let manifest = sample(&key).sign(&key).expect("sign");
        let bytes = manifest.encode();
        let decoded = Manifest::decode(&bytes, &ManifestLimits::default()).expect("decodes");
        assert_eq!(decoded, manifest);
        assert_eq!(decoded.id(), ModelId(BlobId::of(&bytes)));
    }

    #[test]
    fn a_changed_byte_breaks_the_signature_or_the_encoding() {
        let key = SecretKey::from_seed([9; 32]);
        let bytes = sample(&key).sign(&key).expect("sign").encode();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            assert!(
                Manifest::decode(&tampered, &ManifestLimits::default()).is_err(),
                "byte {i} flipped was accepted"
            );
        }
    }

    #[test]
    fn manifests_with_plans_use_format_2_and_round_trip() {
        let key = SecretKey::from_seed([9; 32]);
        let without = sample(&key).sign(&key).expect("sign");
        assert_eq!(without.encode()[0], MANIFEST_FORMAT_VERSION);
        let mut body = sample(&key);
        body.plans = vec![PlanRef {
            id: BlobId::of(b"plan bytes"),
            size: 10,
        }];
        let with = body.sign(&key).expect("sign");
        let bytes = with.encode();
        assert_eq!(bytes[0], MANIFEST_FORMAT_VERSION_WITH_PLANS);
        let decoded = Manifest::decode(&bytes, &ManifestLimits::default()).expect("decodes");
        assert_eq!(decoded, with);
        assert_ne!(decoded.id(), without.id());
    }

    #[test]
    fn format_2_without_plans_and_repeated_plans_are_refused() {
        let key = SecretKey::from_seed([9; 32]);
        // Format 2 with an empty plan list: a second encoding of a plan-less manifest.
        let body = sample(&key);
        let mut encoded = body.encode();
        encoded[0] = MANIFEST_FORMAT_VERSION_WITH_PLANS;
        let mut specs = Vec::new();
        write_vec(&body.inputs, &mut specs, write_spec);
        write_vec(&body.outputs, &mut specs, write_spec);
        let files_end = encoded
            .windows(specs.len())
            .position(|w| w == specs.as_slice())
            .expect("the specs follow the files");
        encoded.insert(files_end, 0);
        let signature = key.sign(MANIFEST_DOMAIN, &encoded);
        let mut bytes = encoded;
        signature.write(&mut bytes);
        assert!(matches!(
            Manifest::decode(&bytes, &ManifestLimits::default()),
            Err(ManifestError::Malformed(_))
        ));
        let mut twice = sample(&key);
        let plan = PlanRef {
            id: BlobId::of(b"plan"),
            size: 4,
        };
        twice.plans = vec![plan.clone(), plan];
        assert!(twice.validate(&ManifestLimits::default()).is_err());
    }

    #[test]
    fn only_the_publisher_can_sign() {
        let key = SecretKey::from_seed([9; 32]);
        let other = SecretKey::from_seed([10; 32]);
        assert!(matches!(sample(&key).sign(&other), Err(ManifestError::Invalid(_))));
    }

    #[test]
    fn limits_are_enforced() {
        let key = SecretKey::from_seed([9; 32]);
        let mut body = sample(&key);
        body.description = "x".repeat(5000);
        let bytes = body.sign(&key).expect("sign").encode();
        assert!(Manifest::decode(&bytes, &ManifestLimits::default()).is_err());
        let tight = ManifestLimits {
            max_encoded_bytes: 100,
            ..ManifestLimits::default()
        };
        let small = sample(&key).sign(&key).expect("sign").encode();
        assert!(matches!(
            Manifest::decode(&small, &tight),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_paths_are_refused() {
        let key = SecretKey::from_seed([9; 32]);
        for path in ["../x.onnx", "/abs.onnx", "a//b", "sp ace", ""] {
            let mut body = sample(&key);
            body.files[0].path = path.into();
            assert!(body.validate(&ManifestLimits::default()).is_err(), "{path}");
        }
    }

    #[test]
    fn dtype_codes_match_onnx() {
        assert_eq!(DType::Float32.onnx_code(), 1);
        assert_eq!(DType::Int64.onnx_code(), 7);
        assert_eq!(DType::Bfloat16.onnx_code(), 16);
        assert_eq!(DType::from_onnx_code(9), Some(DType::Bool));
        assert_eq!(DType::from_onnx_code(0), None);
        assert_eq!(DType::from_onnx_code(24), None);
    }
}
