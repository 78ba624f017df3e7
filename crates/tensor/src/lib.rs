//! Hold tensors and read and write them as `.npy`, `.npz`, ONNX `TensorProto` and JSON, within limits.
//!
//! Every decoder here takes [`TensorLimits`]: tensors arrive from users and peers, so rank, element
//! count and the number of tensors in a file are bounded before any buffer is allocated. A tensor's
//! canonical bytes ([`Tensor::canonical_bytes`]) are what Vouch hashes: the ONNX element-type code,
//! the rank, each dimension as a little-endian `u64`, then the elements little-endian.

mod files;
mod json;
mod npy;
mod npz;
mod pb;

use std::fmt;

pub use files::{TensorFormat, read_tensor_file, write_tensor_file};
pub use json::{TensorsJson, from_json, from_json_value, to_json_value};
pub use npy::{read_npy, write_npy};
pub use npz::{read_npz, write_npz};
pub use pb::{read_tensor_proto, write_tensor_proto};
pub use vouch_types::DType;

/// Bounds on what a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLimits {
    /// Most dimensions a tensor may have.
    pub max_rank: usize,
    /// Most elements one tensor may have.
    pub max_elements: usize,
    /// Most elements across all tensors of one file or request.
    pub max_total_elements: usize,
    /// Most tensors in one file or request.
    pub max_tensors: usize,
    /// Longest tensor name, in bytes.
    pub max_name_bytes: usize,
}

impl Default for TensorLimits {
    fn default() -> Self {
        Self {
            max_rank: 8,
            max_elements: 1 << 28,
            max_total_elements: 1 << 28,
            max_tensors: 64,
            max_name_bytes: 256,
        }
    }
}

impl TensorLimits {
    /// Checks a shape against the rank and element limits; returns its element count.
    pub fn check_shape(&self, shape: &[usize]) -> Result<usize, TensorError> {
        if shape.len() > self.max_rank {
            return Err(TensorError::Limit(format!(
                "rank {} is over the limit of {}",
                shape.len(),
                self.max_rank
            )));
        }
        let mut elements: usize = 1;
        for &dim in shape {
            elements = elements
                .checked_mul(dim)
                .filter(|n| *n <= self.max_elements)
                .ok_or_else(|| {
                    TensorError::Limit(format!(
                        "shape {shape:?} has more than the limit of {} elements",
                        self.max_elements
                    ))
                })?;
        }
        Ok(elements)
    }
}

/// Errors from building, reading or writing tensors.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// The bytes are not a valid file of the format.
    #[error("{format}: {reason}")]
    Malformed {
        /// `npy`, `npz`, `TensorProto` or `JSON`.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The element type cannot be held or written.
    #[error("unsupported element type {0}")]
    UnsupportedDType(String),
    /// A limit was exceeded.
    #[error("{0}")]
    Limit(String),
    /// The data does not fill the shape.
    #[error("shape {shape:?} needs {expected} elements but the data has {actual}")]
    ShapeMismatch {
        /// The declared shape.
        shape: Vec<usize>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements supplied.
        actual: usize,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl TensorError {
    pub(crate) fn malformed(format: &'static str, reason: impl Into<String>) -> Self {
        Self::Malformed {
            format,
            reason: reason.into(),
        }
    }
}

/// The elements of a tensor, row-major.
#[derive(Clone, PartialEq)]
#[allow(missing_docs)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl TensorData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::Float32,
            Self::F64(_) => DType::Float64,
            Self::I8(_) => DType::Int8,
            Self::U8(_) => DType::Uint8,
            Self::I16(_) => DType::Int16,
            Self::I32(_) => DType::Int32,
            Self::I64(_) => DType::Int64,
            Self::Bool(_) => DType::Bool,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U8(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::Bool(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per element.
    pub fn element_bytes(dtype: DType) -> Option<usize> {
        Some(match dtype {
            DType::Float32 | DType::Int32 => 4,
            DType::Float64 | DType::Int64 => 8,
            DType::Int8 | DType::Uint8 | DType::Bool => 1,
            DType::Int16 => 2,
            _ => return None,
        })
    }

    /// Decodes `count` little-endian elements of `dtype` from `bytes` (which must hold exactly that many).
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Self, TensorError> {
        fn chunks<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut array = [0u8; N];
                    array.copy_from_slice(c);
                    f(array)
                })
                .collect()
        }
        let size = Self::element_bytes(dtype).ok_or_else(|| TensorError::UnsupportedDType(dtype_name(dtype)))?;
        if !bytes.len().is_multiple_of(size) {
            return Err(TensorError::malformed(
                "tensor",
                format!("{} bytes is not a whole number of {size}-byte elements", bytes.len()),
            ));
        }
        Ok(match dtype {
            DType::Float32 => Self::F32(chunks(bytes, f32::from_le_bytes)),
            DType::Float64 => Self::F64(chunks(bytes, f64::from_le_bytes)),
            DType::Int8 => Self::I8(chunks(bytes, i8::from_le_bytes)),
            DType::Uint8 => Self::U8(bytes.to_vec()),
            DType::Int16 => Self::I16(chunks(bytes, i16::from_le_bytes)),
            DType::Int32 => Self::I32(chunks(bytes, i32::from_le_bytes)),
            DType::Int64 => Self::I64(chunks(bytes, i64::from_le_bytes)),
            DType::Bool => Self::Bool(bytes.iter().map(|b| *b != 0).collect()),
            other => return Err(TensorError::UnsupportedDType(dtype_name(other))),
        })
    }

    /// The elements as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn flat<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(v.len() * N);
            for x in v {
                out.extend_from_slice(&f(*x));
            }
            out
        }
        match self {
            Self::F32(v) => flat(v, f32::to_le_bytes),
            Self::F64(v) => flat(v, f64::to_le_bytes),
            Self::I8(v) => flat(v, i8::to_le_bytes),
            Self::U8(v) => v.clone(),
            Self::I16(v) => flat(v, i16::to_le_bytes),
            Self::I32(v) => flat(v, i32::to_le_bytes),
            Self::I64(v) => flat(v, i64::to_le_bytes),
            Self::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
        }
    }
}

impl fmt::Debug for TensorData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} x{}", dtype_name(self.dtype()), self.len())
    }
}

/// The lower-case name of an element type (`float32`), as in JSON bodies and manifests.
pub fn dtype_name(dtype: DType) -> String {
    serde_json::to_value(dtype)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{dtype:?}"))
}

/// A dense, row-major tensor whose data always fills its shape.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({} {:?})", dtype_name(self.dtype()), self.shape)
    }
}

impl Tensor {
    /// A tensor of `shape` holding `data`; refuses data that does not fill the shape exactly.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, TensorError> {
        let expected = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        match expected {
            Some(expected) if expected == data.len() => Ok(Self { shape, data }),
            _ => Err(TensorError::ShapeMismatch {
                expected: expected.unwrap_or(usize::MAX),
                actual: data.len(),
                shape,
            }),
        }
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Takes the elements out.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The encoding Vouch hashes: element-type code, rank, dimensions and little-endian elements.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 * self.shape.len() + self.len() * 8);
        out.push(self.dtype().onnx_code() as u8);
        out.push(self.shape.len() as u8);
        for dim in &self.shape {
            out.extend_from_slice(&(*dim as u64).to_le_bytes());
        }
        out.extend_from_slice(&self.data.to_le_bytes());
        out
    }
}

/// A tensor with the name it goes by in a file or request; `None` for a bare `.npy`.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The name, if the source gave one.
    pub name: Option<String>,
    /// The tensor.
    pub tensor: Tensor,
}

/// Hashes an ordered list of named tensors: what receipts call an input or output hash.
///
/// The order is the model's, so the same tensors under the same names always hash the same.
pub fn hash_named_tensors<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> [u8; 32] {
    let mut message = Vec::new();
    for (name, tensor) in tensors {
        message.extend_from_slice(&(name.len() as u64).to_le_bytes());
        message.extend_from_slice(name.as_bytes());
        let bytes = tensor.canonical_bytes();
        message.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        message.extend_from_slice(&bytes);
    }
    vouch_crypto::domain_hash("tensors", &message)
}

/// Checks a name from a file or request against the limits.
pub(crate) fn check_name(name: &str, limits: &TensorLimits, format: &'static str) -> Result<(), TensorError> {
    if name.len() > limits.max_name_bytes {
        return Err(TensorError::malformed(
            format,
            format!("a tensor name is longer than {} bytes", limits.max_name_bytes),
        ));
    }
    Ok(())
}

/// Counts tensors and elements across one file or request against the limits.
#[derive(Debug)]
pub(crate) struct Budget<'a> {
    limits: &'a TensorLimits,
    tensors: usize,
    elements: usize,
}

impl<'a> Budget<'a> {
    pub(crate) fn new(limits: &'a TensorLimits) -> Self {
        Self {
            limits,
            tensors: 0,
            elements: 0,
        }
    }

    /// Accounts for one more tensor of `shape`; returns its element count.
    pub(crate) fn take(&mut self, shape: &[usize]) -> Result<usize, TensorError> {
        let elements = self.limits.check_shape(shape)?;
        self.tensors += 1;
        if self.tensors > self.limits.max_tensors {
            return Err(TensorError::Limit(format!(
                "more than the limit of {} tensors",
                self.limits.max_tensors
            )));
        }
        self.elements = self.elements.saturating_add(elements);
        if self.elements > self.limits.max_total_elements {
            return Err(TensorError::Limit(format!(
                "more than the limit of {} elements in all",
                self.limits.max_total_elements
            )));
        }
        Ok(elements)
    }
}
