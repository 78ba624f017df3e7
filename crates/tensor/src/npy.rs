//! NumPy `.npy` files, versions 1.0 to 3.0 (NEP 1).

use crate::{Budget, DType, Tensor, TensorData, TensorError, TensorLimits, dtype_name};

const MAGIC: &[u8] = b"\x93NUMPY";
const FORMAT: &str = "npy";
/// Headers longer than this are not written by NumPy for any array we accept.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Reads one `.npy` file.
pub fn read_npy(bytes: &[u8], limits: &TensorLimits) -> Result<Tensor, TensorError> {
    read_npy_budgeted(bytes, &mut Budget::new(limits))
}

pub(crate) fn read_npy_budgeted(bytes: &[u8], budget: &mut Budget<'_>) -> Result<Tensor, TensorError> {
    let malformed = |reason: &str| TensorError::malformed(FORMAT, reason);
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Err(malformed("missing the \\x93NUMPY magic"));
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let len = bytes.get(8..12).ok_or_else(|| malformed("truncated header"))?;
            (u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize, 12)
        }
        other => return Err(malformed(&format!("unknown format version {other}"))),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(malformed("header is too long"));
    }
    let header = bytes
        .get(header_start..header_start + header_len)
        .ok_or_else(|| malformed("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| malformed("header is not text"))?;
    let header = parse_header(header)?;
    let (dtype, big_endian) = parse_descr(&header.descr)?;
    let elements = budget.take(&header.shape)?;
    let element_bytes =
        TensorData::element_bytes(dtype).ok_or_else(|| TensorError::UnsupportedDType(header.descr.clone()))?;
    let body = &bytes[header_start + header_len..];
    let expected = elements * element_bytes;
    if body.len() != expected {
        return Err(malformed(&format!(
            "shape {:?} of {} needs {expected} data bytes but the file has {}",
            header.shape,
            dtype_name(dtype),
            body.len()
        )));
    }
    let data = if big_endian && element_bytes > 1 {
        let swapped: Vec<u8> = body
            .chunks_exact(element_bytes)
            .flat_map(|c| c.iter().rev().copied())
            .collect();
        TensorData::from_le_bytes(dtype, &swapped)?
    } else {
        TensorData::from_le_bytes(dtype, body)?
    };
    let data = if header.fortran_order {
        fortran_to_c(&header.shape, data)
    } else {
        data
    };
    Tensor::new(header.shape, data)
}

/// Writes a tensor as a version 1.0 `.npy` file.
pub fn write_npy(tensor: &Tensor) -> Vec<u8> {
    let descr = match tensor.dtype() {
        DType::Float32 => "<f4",
        DType::Float64 => "<f8",
        DType::Int8 => "|i1",
        DType::Uint8 => "|u1",
        DType::Int16 => "<i2",
        DType::Int32 => "<i4",
        DType::Int64 => "<i8",
        _ => "|b1",
    };
    let shape = match tensor.shape() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // NumPy pads the header with spaces and a newline so the data starts 64-byte aligned.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + tensor.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&tensor.data().to_le_bytes());
    out
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the Python dict literal NumPy writes: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_header(text: &str) -> Result<Header, TensorError> {
    let malformed = |reason: String| TensorError::malformed(FORMAT, reason);
    let text = text.trim_end_matches(['\n', ' ', '\0']).trim();
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| malformed("header is not a dict".into()))?;
    let mut descr = None;
    let mut fortran_order = None;
    let mut shape = None;
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let (key, after) = take_quoted(rest).ok_or_else(|| malformed("header keys must be quoted".into()))?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or_else(|| malformed(format!("no ':' after '{key}'")))?
            .trim_start();
        let after = match key {
            "descr" => {
                let (value, after) = take_quoted(after).ok_or_else(|| malformed("descr must be a string".into()))?;
                descr = Some(value.to_owned());
                after
            }
            "fortran_order" => {
                if let Some(after) = after.strip_prefix("True") {
                    fortran_order = Some(true);
                    after
                } else if let Some(after) = after.strip_prefix("False") {
                    fortran_order = Some(false);
                    after
                } else {
                    return Err(malformed("fortran_order must be True or False".into()));
                }
            }
            "shape" => {
                let body = after
                    .strip_prefix('(')
                    .ok_or_else(|| malformed("shape must be a tuple".into()))?;
                let end = body
                    .find(')')
                    .ok_or_else(|| malformed("shape tuple is not closed".into()))?;
                let dims = body[..end]
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(|d| d.trim_end_matches('L').parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| malformed("shape dimensions must be non-negative integers".into()))?;
                shape = Some(dims);
                &body[end + 1..]
            }
            other => return Err(malformed(format!("unknown header key '{other}'"))),
        };
        let after = after.trim_start();
        rest = after.strip_prefix(',').unwrap_or(after).trim_start();
        if !rest.is_empty() && !rest.starts_with(['\'', '"']) {
            return Err(malformed("header entries must be separated by commas".into()));
        }
    }
    Ok(Header {
        descr: descr.ok_or_else(|| malformed("header has no descr".into()))?,
        fortran_order: fortran_order.ok_or_else(|| malformed("header has no fortran_order".into()))?,
        shape: shape.ok_or_else(|| malformed("header has no shape".into()))?,
    })
}

fn take_quoted(text: &str) -> Option<(&str, &str)> {
    let quote = text.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &text[1..];
    let end = body.find(quote)?;
    Some((&body[..end], &body[end + 1..]))
}

/// Maps a NumPy type string to an element type and whether it is big-endian.
fn parse_descr(descr: &str) -> Result<(DType, bool), TensorError> {
    let unsupported = || TensorError::UnsupportedDType(format!("'{descr}' (supported: f4 f8 i1 u1 i2 i4 i8 b1)"));
    let (order, code) = descr.split_at_checked(1).ok_or_else(unsupported)?;
    let big_endian = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(unsupported()),
    };
    let dtype = match code {
        "f4" => DType::Float32,
        "f8" => DType::Float64,
        "i1" => DType::Int8,
        "u1" => DType::Uint8,
        "i2" => DType::Int16,
        "i4" => DType::Int32,
        "i8" => DType::Int64,
        "b1" => DType::Bool,
        _ => return Err(unsupported()),
    };
    Ok((dtype, big_endian))
}

/// Reorders column-major elements to row-major.
fn fortran_to_c(shape: &[usize], data: TensorData) -> TensorData {
    fn reorder<T: Copy>(shape: &[usize], src: &[T]) -> Vec<T> {
        let rank = shape.len();
        // Column-major strides: the first index moves fastest.
        let mut strides = vec![1usize; rank];
        for axis in 1..rank {
            strides[axis] = strides[axis - 1] * shape[axis - 1];
        }
        let mut index = vec![0usize; rank];
        let mut out = Vec::with_capacity(src.len());
        for _ in 0..src.len() {
            let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
            out.push(src[offset]);
            for axis in (0..rank).rev() {
                index[axis] += 1;
                if index[axis] < shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        out
    }
    match data {
        TensorData::F32(v) => TensorData::F32(reorder(shape, &v)),
        TensorData::F64(v) => TensorData::F64(reorder(shape, &v)),
        TensorData::I8(v) => TensorData::I8(reorder(shape, &v)),
        TensorData::U8(v) => TensorData::U8(reorder(shape, &v)),
        TensorData::I16(v) => TensorData::I16(reorder(shape, &v)),
        TensorData::I32(v) => TensorData::I32(reorder(shape, &v)),
        TensorData::I64(v) => TensorData::I64(reorder(shape, &v)),
        TensorData::Bool(v) => TensorData::Bool(reorder(shape, &v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_aligns_data() {
        let tensor = Tensor::new(vec![2, 3], TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).expect("tensor");
        let bytes = write_npy(&tensor);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(read_npy(&bytes, &TensorLimits::default()).expect("read"), tensor);
    }

    #[test]
    fn reads_fortran_order_and_big_endian() {
        let mut bytes = MAGIC.to_vec();
        let header = "{'descr': '>i2', 'fortran_order': True, 'shape': (2, 3), }\n";
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        // Column-major [[1,2,3],[4,5,6]] is 1,4,2,5,3,6.
        for v in [1i16, 4, 2, 5, 3, 6] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        let tensor = read_npy(&bytes, &TensorLimits::default()).expect("read");
        assert_eq!(tensor.data(), &TensorData::I16(vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn refuses_short_data_and_huge_shapes() {
        let tensor = Tensor::new(vec![4], TensorData::I32(vec![1, 2, 3, 4])).expect("tensor");
        let bytes = write_npy(&tensor);
        let error = read_npy(&bytes[..bytes.len() - 1], &TensorLimits::default()).expect_err("short");
        assert!(error.to_string().contains("needs 16 data bytes"), "{error}");
        let limits = TensorLimits {
            max_elements: 3,
            ..TensorLimits::default()
        };
        let error = read_npy(&bytes, &limits).expect_err("limit");
        assert!(matches!(error, TensorError::Limit(_)), "{error}");
    }
}
