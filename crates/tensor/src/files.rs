//! Tensor files, with the format taken from the extension.

use std::path::Path;

use crate::{
    NamedTensor, TensorError, TensorLimits, from_json, read_npy, read_npz, read_tensor_proto, write_npy, write_npz,
};

/// The tensor file formats Vouch reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorFormat {
    /// `.npy`: one unnamed tensor.
    Npy,
    /// `.npz`: named tensors.
    Npz,
    /// `.pb`: one ONNX `TensorProto`.
    TensorProto,
    /// `.json`: named tensors.
    Json,
}

impl TensorFormat {
    /// The format a file's extension names.
    pub fn from_path(path: &Path) -> Result<Self, TensorError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("npy") => Ok(Self::Npy),
            Some("npz") => Ok(Self::Npz),
            Some("pb") => Ok(Self::TensorProto),
            Some("json") => Ok(Self::Json),
            _ => Err(TensorError::Malformed {
                format: "tensor file",
                reason: format!("{}: unknown extension (use .npy, .npz, .pb or .json)", path.display()),
            }),
        }
    }

    /// The format of a file's bytes, told by how they start: the `.npy` magic, a zip header, a
    /// JSON object, and otherwise an ONNX `TensorProto`.
    pub fn sniff(bytes: &[u8]) -> Self {
        if bytes.starts_with(b"\x93NUMPY") {
            Self::Npy
        } else if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            Self::Npz
        } else if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            Self::Json
        } else {
            Self::TensorProto
        }
    }

    /// Decodes bytes of this format.
    pub fn decode(self, bytes: &[u8], limits: &TensorLimits) -> Result<Vec<NamedTensor>, TensorError> {
        match self {
            Self::Npy => Ok(vec![NamedTensor {
                name: None,
                tensor: read_npy(bytes, limits)?,
            }]),
            Self::Npz => read_npz(bytes, limits),
            Self::TensorProto => Ok(vec![read_tensor_proto(bytes, limits)?]),
            Self::Json => from_json(bytes, limits),
        }
    }
}

/// Reads the tensors of a file, refusing files larger than the limits allow.
pub fn read_tensor_file(path: &Path, limits: &TensorLimits) -> Result<Vec<NamedTensor>, TensorError> {
    let format = TensorFormat::from_path(path)?;
    let io = |source| TensorError::Io {
        path: path.display().to_string(),
        source,
    };
    // JSON spends the most bytes an element; 32 is generous for any number it holds.
    let max_file_bytes = (limits.max_total_elements as u64)
        .saturating_mul(32)
        .saturating_add(1 << 20);
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > max_file_bytes {
        return Err(TensorError::Limit(format!(
            "{}: {size} bytes is more than the limit of {max_file_bytes}",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    format.decode(&bytes, limits).map_err(|e| match e {
        TensorError::Malformed { format, reason } => TensorError::Malformed {
            format,
            reason: format!("{}: {reason}", path.display()),
        },
        other => other,
    })
}

/// Writes tensors to `.npy` or `.pb` (exactly one tensor), `.npz` or `.json`, as the extension says.
pub fn write_tensor_file(path: &Path, tensors: &[NamedTensor]) -> Result<(), TensorError> {
    let bytes = match TensorFormat::from_path(path)? {
        TensorFormat::Npy => match tensors {
            [one] => write_npy(&one.tensor),
            _ => {
                return Err(TensorError::Malformed {
                    format: "npy",
                    reason: format!(
                        "{}: a .npy file holds one tensor but there are {}; write a .npz",
                        path.display(),
                        tensors.len()
                    ),
                });
            }
        },
        TensorFormat::Npz => write_npz(tensors)?,
        TensorFormat::Json => serde_json::to_vec(&crate::TensorsJson(tensors)).map_err(|e| TensorError::Malformed {
            format: "JSON",
            reason: e.to_string(),
        })?,
        TensorFormat::TensorProto => match tensors {
            [one] => crate::write_tensor_proto(one),
            _ => {
                return Err(TensorError::Malformed {
                    format: "TensorProto",
                    reason: format!(
                        "{}: a .pb file holds one tensor but there are {}; write a .npz",
                        path.display(),
                        tensors.len()
                    ),
                });
            }
        },
    };
    std::fs::write(path, bytes).map_err(|source| TensorError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Tensor, TensorData, to_json_value, write_tensor_proto};

    #[test]
    fn every_format_is_told_from_its_own_bytes() {
        let named = NamedTensor {
            name: Some("x".into()),
            tensor: Tensor::new(vec![2], TensorData::F32(vec![1.0, -2.5])).expect("tensor"),
        };
        let json = serde_json::to_vec(&to_json_value(std::slice::from_ref(&named)).expect("json")).expect("bytes");
        let cases = [
            (write_npy(&named.tensor), TensorFormat::Npy),
            (write_npz(std::slice::from_ref(&named)).expect("npz"), TensorFormat::Npz),
            (write_tensor_proto(&named), TensorFormat::TensorProto),
            ([b"  \n".as_slice(), &json].concat(), TensorFormat::Json),
        ];
        for (bytes, format) in cases {
            assert_eq!(TensorFormat::sniff(&bytes), format);
            let decoded = format.decode(&bytes, &TensorLimits::default()).expect("decodes");
            assert_eq!(decoded[0].tensor, named.tensor);
        }
    }
}
