//! NumPy `.npz` archives: a zip file of `.npy` files, one per named tensor (stored or deflated).

use std::io::{Cursor, Read, Write};

use zip::write::SimpleFileOptions;

use crate::npy::{read_npy_budgeted, write_npy};
use crate::{Budget, NamedTensor, TensorError, TensorLimits, check_name};

const FORMAT: &str = "npz";

/// Reads every array of an `.npz` archive, named as NumPy names them (the file name less `.npy`).
pub fn read_npz(bytes: &[u8], limits: &TensorLimits) -> Result<Vec<NamedTensor>, TensorError> {
    let malformed = |reason: String| TensorError::malformed(FORMAT, reason);
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| malformed(format!("not a zip archive: {e}")))?;
    if archive.len() > limits.max_tensors {
        return Err(TensorError::Limit(format!(
            "{} arrays is more than the limit of {} tensors",
            archive.len(),
            limits.max_tensors
        )));
    }
    // An entry may not expand past what its largest allowed tensor needs (8 bytes an element) plus a header.
    let max_entry_bytes = (limits.max_elements as u64).saturating_mul(8).saturating_add(1 << 16);
    let mut budget = Budget::new(limits);
    let mut tensors = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| malformed(format!("entry {index}: {e}")))?;
        let file_name = entry
            .name()
            .map_err(|e| malformed(format!("entry {index} has a bad name: {e}")))?
            .into_owned();
        let name = file_name.strip_suffix(".npy").unwrap_or(&file_name).to_owned();
        check_name(&name, limits, FORMAT)?;
        if entry.size() > max_entry_bytes {
            return Err(TensorError::Limit(format!(
                "array '{name}' expands to {} bytes, over the limit of {max_entry_bytes}",
                entry.size()
            )));
        }
        let mut npy = Vec::with_capacity(entry.size() as usize);
        (&mut entry)
            .take(max_entry_bytes + 1)
            .read_to_end(&mut npy)
            .map_err(|e| malformed(format!("array '{name}': {e}")))?;
        if npy.len() as u64 > max_entry_bytes {
            return Err(TensorError::Limit(format!("array '{name}' expands past the limit")));
        }
        let tensor = read_npy_budgeted(&npy, &mut budget).map_err(|e| match e {
            TensorError::Malformed { reason, .. } => malformed(format!("array '{name}': {reason}")),
            other => other,
        })?;
        if tensors
            .iter()
            .any(|t: &NamedTensor| t.name.as_deref() == Some(name.as_str()))
        {
            return Err(malformed(format!("array '{name}' appears twice")));
        }
        tensors.push(NamedTensor {
            name: Some(name),
            tensor,
        });
    }
    Ok(tensors)
}

/// Writes named tensors as an uncompressed `.npz` archive, as `numpy.savez` does.
pub fn write_npz(tensors: &[NamedTensor]) -> Result<Vec<u8>, TensorError> {
    let io_error = |e: &dyn std::fmt::Display| TensorError::malformed(FORMAT, e.to_string());
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for (index, named) in tensors.iter().enumerate() {
        let name = named.name.clone().unwrap_or_else(|| format!("arr_{index}"));
        writer
            .start_file(format!("{name}.npy"), options)
            .map_err(|e| io_error(&e))?;
        writer.write_all(&write_npy(&named.tensor)).map_err(|e| io_error(&e))?;
    }
    Ok(writer.finish().map_err(|e| io_error(&e))?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Tensor, TensorData};

    #[test]
    fn round_trips_named_arrays() {
        let tensors = vec![
            NamedTensor {
                name: Some("input_ids".into()),
                tensor: Tensor::new(vec![1, 3], TensorData::I64(vec![101, 7592, 102])).expect("tensor"),
            },
            NamedTensor {
                name: Some("mask".into()),
                tensor: Tensor::new(vec![3], TensorData::Bool(vec![true, true, false])).expect("tensor"),
            },
        ];
        let bytes = write_npz(&tensors).expect("write");
        assert_eq!(read_npz(&bytes, &TensorLimits::default()).expect("read"), tensors);
        let limits = TensorLimits {
            max_tensors: 1,
            ..TensorLimits::default()
        };
        assert!(matches!(read_npz(&bytes, &limits), Err(TensorError::Limit(_))));
    }
}
