//! ONNX `TensorProto` files (`.pb`), as the ONNX test suites store inputs and outputs.
//!
//! A small protobuf reader for just this message, so reading a tensor needs no ONNX library and
//! every length is checked against the input before it is used.

use crate::{DType, NamedTensor, Tensor, TensorData, TensorError, TensorLimits, check_name};

const FORMAT: &str = "TensorProto";

fn malformed(reason: impl Into<String>) -> TensorError {
    TensorError::malformed(FORMAT, reason)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, TensorError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or_else(|| malformed("truncated varint"))?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint is longer than 10 bytes"))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], TensorError> {
        if len > self.bytes.len() {
            return Err(malformed("a field runs past the end of the input"));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn length_delimited(&mut self) -> Result<&'a [u8], TensorError> {
        let len = usize::try_from(self.varint()?).map_err(|_| malformed("field length overflows"))?;
        self.take(len)
    }
}

/// Collects a repeated scalar field that may arrive packed or one element per tag.
fn repeated<T>(
    wire: u64,
    reader: &mut Reader<'_>,
    out: &mut Vec<T>,
    max_items: usize,
    decode: impl Fn(&mut Reader<'_>) -> Result<T, TensorError>,
) -> Result<(), TensorError> {
    let push = |item: T, out: &mut Vec<T>| {
        if out.len() >= max_items {
            return Err(TensorError::Limit(format!(
                "more than the limit of {max_items} elements"
            )));
        }
        out.push(item);
        Ok(())
    };
    if wire == 2 {
        let mut packed = Reader {
            bytes: reader.length_delimited()?,
        };
        while !packed.bytes.is_empty() {
            push(decode(&mut packed)?, out)?;
        }
        Ok(())
    } else {
        push(decode(reader)?, out)
    }
}

fn fixed<const N: usize>(reader: &mut Reader<'_>) -> Result<[u8; N], TensorError> {
    let mut array = [0u8; N];
    array.copy_from_slice(reader.take(N)?);
    Ok(array)
}

/// Reads one serialized `TensorProto`. Its name (field 8), when set, names the tensor.
pub fn read_tensor_proto(bytes: &[u8], limits: &TensorLimits) -> Result<NamedTensor, TensorError> {
    let mut reader = Reader { bytes };
    let mut dims: Vec<i64> = Vec::new();
    let mut data_type: Option<i32> = None;
    let mut name = String::new();
    let mut raw: Option<&[u8]> = None;
    let mut floats: Vec<f32> = Vec::new();
    let mut doubles: Vec<f64> = Vec::new();
    let mut int32s: Vec<i64> = Vec::new();
    let mut int64s: Vec<i64> = Vec::new();
    let max = limits.max_elements;
    while !reader.bytes.is_empty() {
        let key = reader.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        match (field, wire) {
            (1, 0 | 2) => repeated(
                wire,
                &mut reader,
                &mut dims,
                limits.max_rank,
                |r| Ok(r.varint()? as i64),
            )?,
            (2, 0) => data_type = Some(reader.varint()? as i32),
            (4, 5 | 2) => repeated(wire, &mut reader, &mut floats, max, |r| {
                Ok(f32::from_le_bytes(fixed(r)?))
            })?,
            // int32_data holds int8, uint8, int16, int32 and bool as sign-extended varints.
            (5, 0 | 2) => repeated(wire, &mut reader, &mut int32s, max, |r| Ok(r.varint()? as i64))?,
            (6, 2) => return Err(TensorError::UnsupportedDType("string".into())),
            (7, 0 | 2) => repeated(wire, &mut reader, &mut int64s, max, |r| Ok(r.varint()? as i64))?,
            (8, 2) => {
                name = String::from_utf8(reader.length_delimited()?.to_vec())
                    .map_err(|_| malformed("the name is not UTF-8"))?;
            }
            (9, 2) => raw = Some(reader.length_delimited()?),
            (10, 1 | 2) => repeated(wire, &mut reader, &mut doubles, max, |r| {
                Ok(f64::from_le_bytes(fixed(r)?))
            })?,
            (13, 2) => return Err(malformed("tensors with external data are not supported")),
            (14, 0) => {
                if reader.varint()? != 0 {
                    return Err(malformed("tensors with external data are not supported"));
                }
            }
            (_, 0) => {
                reader.varint()?;
            }
            (_, 1) => {
                reader.take(8)?;
            }
            (_, 2) => {
                reader.length_delimited()?;
            }
            (_, 5) => {
                reader.take(4)?;
            }
            (field, wire) => return Err(malformed(format!("field {field} has unknown wire type {wire}"))),
        }
    }
    check_name(&name, limits, FORMAT)?;
    let code = data_type.ok_or_else(|| malformed("no data_type"))?;
    let dtype = DType::from_onnx_code(code).ok_or_else(|| malformed(format!("unknown data_type {code}")))?;
    let shape = dims
        .iter()
        .map(|d| usize::try_from(*d).map_err(|_| malformed(format!("negative dimension {d}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let elements = limits.check_shape(&shape)?;
    let data = match raw {
        Some(raw) => {
            let element_bytes =
                TensorData::element_bytes(dtype).ok_or_else(|| TensorError::UnsupportedDType(format!("{dtype:?}")))?;
            if raw.len() != elements * element_bytes {
                return Err(malformed(format!(
                    "shape {shape:?} needs {} raw bytes but raw_data has {}",
                    elements * element_bytes,
                    raw.len()
                )));
            }
            TensorData::from_le_bytes(dtype, raw)?
        }
        None => typed_fields(dtype, floats, doubles, int32s, int64s)?,
    };
    let tensor = Tensor::new(shape, data)?;
    Ok(NamedTensor {
        name: (!name.is_empty()).then_some(name),
        tensor,
    })
}

/// Writes one tensor as a serialized `TensorProto` (dims, data_type, name, raw_data).
pub fn write_tensor_proto(named: &NamedTensor) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::new();
    for dim in named.tensor.shape() {
        out.push(0x08);
        varint(*dim as u64, &mut out);
    }
    out.push(0x10);
    varint(named.tensor.dtype().onnx_code() as u64, &mut out);
    if let Some(name) = &named.name {
        out.push(0x42);
        varint(name.len() as u64, &mut out);
        out.extend_from_slice(name.as_bytes());
    }
    let raw = named.tensor.data().to_le_bytes();
    out.push(0x4a);
    varint(raw.len() as u64, &mut out);
    out.extend_from_slice(&raw);
    out
}

fn typed_fields(
    dtype: DType,
    floats: Vec<f32>,
    doubles: Vec<f64>,
    int32s: Vec<i64>,
    int64s: Vec<i64>,
) -> Result<TensorData, TensorError> {
    fn narrow<T: TryFrom<i64>>(values: &[i64], what: &str) -> Result<Vec<T>, TensorError> {
        values
            .iter()
            .map(|v| {
                // int32_data stores each value as a sign-extended 64-bit varint.
                T::try_from(*v as i32 as i64).map_err(|_| malformed(format!("{v} does not fit {what}")))
            })
            .collect()
    }
    Ok(match dtype {
        DType::Float32 => TensorData::F32(floats),
        DType::Float64 => TensorData::F64(doubles),
        DType::Int64 => TensorData::I64(int64s),
        DType::Int32 => TensorData::I32(narrow(&int32s, "int32")?),
        DType::Int16 => TensorData::I16(narrow(&int32s, "int16")?),
        DType::Int8 => TensorData::I8(narrow(&int32s, "int8")?),
        DType::Uint8 => TensorData::U8(narrow(&int32s, "uint8")?),
        DType::Bool => TensorData::Bool(int32s.iter().map(|v| *v != 0).collect()),
        other => return Err(TensorError::UnsupportedDType(format!("{other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    #[test]
    fn reads_raw_and_typed_fields() {
        // dims [2], data_type FLOAT, name "x", raw_data two floats.
        let mut bytes = vec![0x08, 2, 0x10, 1, 0x42, 1, b'x', 0x4a, 8];
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
        let named = read_tensor_proto(&bytes, &TensorLimits::default()).expect("read");
        assert_eq!(named.name.as_deref(), Some("x"));
        assert_eq!(named.tensor.data(), &TensorData::F32(vec![1.5, -2.0]));

        // dims [3], data_type INT64, packed int64_data [1, -1, 300].
        let mut bytes = vec![0x08, 3, 0x10, 7, 0x3a];
        let mut packed = Vec::new();
        for v in [1i64, -1, 300] {
            varint(v as u64, &mut packed);
        }
        varint(packed.len() as u64, &mut bytes);
        bytes.extend_from_slice(&packed);
        let named = read_tensor_proto(&bytes, &TensorLimits::default()).expect("read");
        assert_eq!(named.tensor.data(), &TensorData::I64(vec![1, -1, 300]));
        let written = write_tensor_proto(&named);
        assert_eq!(
            read_tensor_proto(&written, &TensorLimits::default()).expect("read"),
            named
        );
    }

    #[test]
    fn refuses_lies_about_lengths() {
        // raw_data claims 100 bytes but the input ends.
        let bytes = [0x08, 2, 0x10, 1, 0x4a, 100, 0, 0];
        assert!(read_tensor_proto(&bytes, &TensorLimits::default()).is_err());
        // dims say 3 elements, raw_data holds 2.
        let mut bytes = vec![0x08, 3, 0x10, 1, 0x4a, 8];
        bytes.extend_from_slice(&[0; 8]);
        let error = read_tensor_proto(&bytes, &TensorLimits::default()).expect_err("short");
        assert!(error.to_string().contains("needs 12 raw bytes"), "{error}");
    }
}
