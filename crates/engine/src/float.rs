//! The float path: tract's optimized runner, for the `none` verification level and as the
//! accuracy reference.

use std::sync::Arc;

use tract_onnx::prelude::{IntoRunnable, TValue, TVec, TypedModel, TypedRunnableModel};
use vouch_tensor::NamedTensor;

use crate::EngineError;
use crate::exec::{InputSpec, match_inputs};
use crate::import::{LoadedModel, dtype_of, tensor_from_tract, to_tract};
use crate::plan::PlanDim;
use tract_onnx::tract_core::internal::DimLike;

/// A model ready to run in float32.
#[derive(Debug, Clone)]
pub struct FloatModel {
    runnable: Arc<TypedRunnableModel>,
    inputs: Vec<InputSpec>,
    output_names: Vec<String>,
}

impl FloatModel {
    /// Optimizes the model for this machine.
    pub fn new(model: &LoadedModel) -> Result<Self, EngineError> {
        let typed: &TypedModel = &model.typed;
        let name_of = |outlet: &tract_onnx::prelude::OutletId| typed.node(outlet.node).name.clone();
        let mut inputs = Vec::new();
        for outlet in typed
            .input_outlets()
            .map_err(|e| EngineError::Import(format!("{e:#}")))?
        {
            let fact = typed
                .outlet_fact(*outlet)
                .map_err(|e| EngineError::Import(format!("{e:#}")))?;
            let name = name_of(outlet);
            let dtype = dtype_of(fact.datum_type).ok_or_else(|| EngineError::Unsupported {
                op: "Input".into(),
                node: name.clone(),
                reason: format!("inputs of type {:?} are not supported", fact.datum_type),
            })?;
            let shape = fact
                .shape
                .iter()
                .map(|d| match d.to_usize() {
                    Ok(n) => PlanDim::Fixed(n as u64),
                    Err(_) => PlanDim::Symbol(d.to_string()),
                })
                .collect();
            inputs.push(InputSpec { name, dtype, shape });
        }
        let output_names = typed
            .output_outlets()
            .map_err(|e| EngineError::Import(format!("{e:#}")))?
            .iter()
            .map(|outlet| {
                typed
                    .outlet_label(*outlet)
                    .map_or_else(|| name_of(outlet), str::to_owned)
            })
            .collect();
        let mut optimized = typed.clone();
        let runnable = crate::import::declutter(&mut optimized)
            .and_then(|()| optimized.optimize())
            .and_then(|()| optimized.into_runnable())
            .map_err(|e| EngineError::Import(format!("{e:#}")))?;
        Ok(Self {
            runnable,
            inputs,
            output_names,
        })
    }

    /// What the model expects of its inputs, in the model's order.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// Runs the model. Inputs are matched by name (or the only tensor to the only input) and
    /// checked against the model's types and shapes first.
    pub fn run(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, EngineError> {
        let bound: TVec<TValue> = match_inputs(&self.inputs, inputs)?
            .into_iter()
            .map(|t| to_tract(t).map(TValue::from))
            .collect::<Result<_, _>>()
            .map_err(EngineError::Run)?;
        let outputs = self
            .runnable
            .run(bound)
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(tensor, name)| {
                let tensor = tensor_from_tract(tensor).map_err(EngineError::Run)?;
                Ok(NamedTensor {
                    name: Some(name.clone()),
                    tensor,
                })
            })
            .collect()
    }
}
