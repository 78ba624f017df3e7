//! JSON tensors: `{"name": {"shape": [2, 3], "dtype": "float32", "data": [1, 2, 3, 4, 5, 6]}}`.
//!
//! `data` is flat and row-major. Floats are written in their shortest round-trip form, so a tensor
//! written and read back is bit-identical (NaN and infinities have no JSON form and are refused).

use std::collections::BTreeMap;

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::{Budget, DType, NamedTensor, Tensor, TensorData, TensorError, TensorLimits, check_name, dtype_name};

const FORMAT: &str = "JSON";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<Value>,
}

/// Reads named tensors from JSON bytes, in name order.
pub fn from_json(bytes: &[u8], limits: &TensorLimits) -> Result<Vec<NamedTensor>, TensorError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| TensorError::malformed(FORMAT, e.to_string()))?;
    from_json_value(value, limits)
}

/// Reads named tensors from a parsed JSON object, in name order.
pub fn from_json_value(value: Value, limits: &TensorLimits) -> Result<Vec<NamedTensor>, TensorError> {
    let malformed = |reason: String| TensorError::malformed(FORMAT, reason);
    let Value::Object(object) = value else {
        return Err(malformed(
            "expected an object of named tensors: {\"name\": {\"shape\": [..], \"dtype\": \"float32\", \"data\": [..]}}"
                .into(),
        ));
    };
    let mut budget = Budget::new(limits);
    let mut tensors = Vec::with_capacity(object.len());
    let sorted: BTreeMap<String, Value> = object.into_iter().collect();
    for (name, value) in sorted {
        check_name(&name, limits, FORMAT)?;
        let json: JsonTensor = serde_json::from_value(value).map_err(|e| malformed(format!("tensor '{name}': {e}")))?;
        let elements = budget.take(&json.shape)?;
        if json.data.len() != elements {
            return Err(malformed(format!(
                "tensor '{name}': shape {:?} needs {elements} elements but data has {}",
                json.shape,
                json.data.len()
            )));
        }
        let data = convert(json.dtype, &json.data).map_err(|reason| malformed(format!("tensor '{name}': {reason}")))?;
        tensors.push(NamedTensor {
            name: Some(name),
            tensor: Tensor::new(json.shape, data)?,
        });
    }
    Ok(tensors)
}

fn convert(dtype: DType, values: &[Value]) -> Result<TensorData, String> {
    fn ints<T: TryFrom<i64>>(values: &[Value], dtype: DType) -> Result<Vec<T>, String> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .and_then(|n| T::try_from(n).ok())
                    .ok_or_else(|| format!("element {i} ({v}) is not a {}", dtype_name(dtype)))
            })
            .collect()
    }
    fn floats(values: &[Value]) -> Result<Vec<f64>, String> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_f64().ok_or_else(|| format!("element {i} ({v}) is not a number")))
            .collect()
    }
    Ok(match dtype {
        // f64 to f32 rounds to nearest, the same everywhere.
        DType::Float32 => TensorData::F32(floats(values)?.into_iter().map(|x| x as f32).collect()),
        DType::Float64 => TensorData::F64(floats(values)?),
        DType::Int8 => TensorData::I8(ints(values, dtype)?),
        DType::Uint8 => TensorData::U8(ints(values, dtype)?),
        DType::Int16 => TensorData::I16(ints(values, dtype)?),
        DType::Int32 => TensorData::I32(ints(values, dtype)?),
        DType::Int64 => TensorData::I64(ints(values, dtype)?),
        DType::Bool => TensorData::Bool(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Bool(b) => Ok(*b),
                    Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
                    Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
                    _ => Err(format!("element {i} ({v}) is not a bool")),
                })
                .collect::<Result<_, _>>()?,
        ),
        other => return Err(format!("unsupported dtype {}", dtype_name(other))),
    })
}

/// Serializes named tensors as the JSON object [`from_json`] reads, in the given order.
#[derive(Debug, Clone, Copy)]
pub struct TensorsJson<'a>(pub &'a [NamedTensor]);

impl Serialize for TensorsJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (index, named) in self.0.iter().enumerate() {
            let name = named.name.clone().unwrap_or_else(|| format!("output_{index}"));
            map.serialize_entry(&name, &TensorJson(&named.tensor))?;
        }
        map.end()
    }
}

struct TensorJson<'a>(&'a Tensor);

impl Serialize for TensorJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tensor = self.0;
        let mut s = serializer.serialize_struct("Tensor", 3)?;
        s.serialize_field("shape", tensor.shape())?;
        s.serialize_field("dtype", &tensor.dtype())?;
        match tensor.data() {
            TensorData::F32(v) => {
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(serde::ser::Error::custom("a float32 element is NaN or infinite"));
                }
                s.serialize_field("data", v)?
            }
            TensorData::F64(v) => {
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(serde::ser::Error::custom("a float64 element is NaN or infinite"));
                }
                s.serialize_field("data", v)?
            }
            TensorData::I8(v) => s.serialize_field("data", v)?,
            TensorData::U8(v) => s.serialize_field("data", v)?,
            TensorData::I16(v) => s.serialize_field("data", v)?,
            TensorData::I32(v) => s.serialize_field("data", v)?,
            TensorData::I64(v) => s.serialize_field("data", v)?,
            TensorData::Bool(v) => s.serialize_field("data", v)?,
        }
        s.end()
    }
}

/// The JSON value of named tensors (see [`TensorsJson`] to serialize without building a value).
pub fn to_json_value(tensors: &[NamedTensor]) -> Result<Value, TensorError> {
    serde_json::to_value(TensorsJson(tensors)).map_err(|e| TensorError::malformed(FORMAT, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_floats_bit_for_bit() {
        let tensors = vec![NamedTensor {
            name: Some("x".into()),
            tensor: Tensor::new(vec![3], TensorData::F32(vec![0.1, -1.0e-30, 3.4028235e38])).expect("tensor"),
        }];
        let text = serde_json::to_string(&TensorsJson(&tensors)).expect("json");
        assert_eq!(
            from_json(text.as_bytes(), &TensorLimits::default()).expect("read"),
            tensors
        );
    }

    #[test]
    fn names_the_bad_tensor() {
        let body = br#"{"ids": {"shape": [2], "dtype": "int8", "data": [1, 300]}}"#;
        let error = from_json(body, &TensorLimits::default()).expect_err("out of range");
        assert!(
            error
                .to_string()
                .contains("tensor 'ids': element 1 (300) is not a int8"),
            "{error}"
        );
        let body = br#"{"x": {"shape": [2, 2], "dtype": "float32", "data": [1]}}"#;
        let error = from_json(body, &TensorLimits::default()).expect_err("short");
        assert!(error.to_string().contains("needs 4 elements"), "{error}");
    }
}
