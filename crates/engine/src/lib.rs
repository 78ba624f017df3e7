//! Import ONNX models, run them in float, quantize them to exact integer plans, and execute and trace those plans.
//!
//! The flow: [`load_onnx`] parses a model through tract (shape inference, decluttering);
//! [`LoadedModel::to_ir`] turns it into Vouch's IR ([`ir::Graph`]); [`build_plan`] calibrates and
//! quantizes the IR into an exact [`Plan`]; [`execute`] runs a plan with integers only, and
//! [`TraceTree`] commits to every value it computed. [`FloatModel`] is the float path.

mod broadcast;
pub mod exec;
pub mod fixed;
mod float;
mod import;
pub mod ir;
mod moves;
pub mod plan;
mod pools;
mod quantize;
pub mod trace;

pub use exec::{ExecError, ExecOptions, Execution, ITensor, InputSpec, execute, execute_instr, match_inputs};
pub use float::FloatModel;
pub use import::{LoadedModel, declutter as declutter_tract_model, load_onnx};
pub use plan::{Plan, PlanLimits};
pub use quantize::build_plan;
pub use trace::{TraceProof, TraceTree};

use tract_onnx::pb;
use tract_onnx::prelude::Framework;
use vouch_types::{DType, Dim, TensorSpec};

/// Errors from reading a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes are not an ONNX model.
    #[error("not a valid ONNX model: {0}")]
    NotOnnx(String),
    /// tract could not type or simplify the model (an unresolvable shape, say).
    #[error("cannot import the model: {0}")]
    Import(String),
    /// An operation the exact engine does not support.
    #[error("node '{node}' ({op}): {reason}")]
    Unsupported {
        /// The operation.
        op: String,
        /// The node's name in the model.
        node: String,
        /// Why.
        reason: String,
    },
    /// Calibration inputs do not fit the model, or the float model failed on them.
    #[error("calibration: {0}")]
    Calibration(String),
    /// The float path failed.
    #[error("{0}")]
    Run(String),
    /// The exact path failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The model parses but its schema cannot be described.
    #[error("ONNX model {side} '{name}': {reason}")]
    Schema {
        /// `input` or `output`.
        side: &'static str,
        /// The tensor's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// The inputs and outputs of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSchema {
    /// The inputs a caller must supply (graph inputs that are not weights).
    pub inputs: Vec<TensorSpec>,
    /// The outputs the model produces.
    pub outputs: Vec<TensorSpec>,
}

/// Reads the input and output schema of an ONNX model.
pub fn read_onnx_schema(model_bytes: &[u8]) -> Result<ModelSchema, EngineError> {
    let mut reader = model_bytes;
    let model = tract_onnx::onnx()
        .proto_model_for_read(&mut reader)
        .map_err(|e| EngineError::NotOnnx(format!("{e:#}")))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| EngineError::NotOnnx("the model has no graph".into()))?;
    // Older exporters list weights as graph inputs too; callers supply only the others.
    let is_weight = |name: &str| graph.initializer.iter().any(|t| t.name == name);
    let inputs = graph
        .input
        .iter()
        .filter(|value| !is_weight(&value.name))
        .map(|value| tensor_spec("input", value))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph
        .output
        .iter()
        .map(|value| tensor_spec("output", value))
        .collect::<Result<Vec<_>, _>>()?;
    if outputs.is_empty() {
        return Err(EngineError::NotOnnx("the graph has no outputs".into()));
    }
    Ok(ModelSchema { inputs, outputs })
}

fn tensor_spec(side: &'static str, value: &pb::ValueInfoProto) -> Result<TensorSpec, EngineError> {
    let error = |reason: String| EngineError::Schema {
        side,
        name: value.name.clone(),
        reason,
    };
    let tensor = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(tensor)) => tensor,
        None => return Err(error("has no type; only tensors are supported".into())),
    };
    let dtype = DType::from_onnx_code(tensor.elem_type)
        .ok_or_else(|| error(format!("has unknown element type {}", tensor.elem_type)))?;
    let shape = match &tensor.shape {
        None => None,
        Some(shape) => Some(
            shape
                .dim
                .iter()
                .map(|dim| match &dim.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(size)) => u64::try_from(*size)
                        .map(Dim::Fixed)
                        .map_err(|_| error(format!("has a negative dimension {size}"))),
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(name)) if !name.is_empty() => {
                        Ok(Dim::Named(name.clone()))
                    }
                    _ => Ok(Dim::Unknown),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(TensorSpec {
        name: value.name.clone(),
        dtype,
        shape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../../fixtures/models/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    #[test]
    fn reads_the_schema_of_a_trained_mlp() {
        let schema = read_onnx_schema(&fixture("digits_mlp_v1.onnx")).expect("schema");
        assert_eq!(
            schema.inputs,
            vec![TensorSpec {
                name: "input".into(),
                dtype: DType::Float32,
                shape: Some(vec![Dim::Named("batch".into()), Dim::Fixed(64)]),
            }]
        );
        assert_eq!(
            schema.outputs,
            vec![TensorSpec {
                name: "probabilities".into(),
                dtype: DType::Float32,
                shape: Some(vec![Dim::Named("batch".into()), Dim::Fixed(10)]),
            }]
        );
    }

    #[test]
    fn garbage_and_truncated_models_are_errors() {
        assert!(matches!(
            read_onnx_schema(b"definitely not onnx"),
            Err(EngineError::NotOnnx(_))
        ));
        assert!(read_onnx_schema(&[]).is_err());
        let model = fixture("digits_mlp_v1.onnx");
        for cut in [1, 10, model.len() / 2, model.len() - 1] {
            assert!(read_onnx_schema(&model[..cut]).is_err(), "cut at {cut}");
        }
    }
}
