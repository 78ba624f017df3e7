//! The float path: tract's optimized runner, for the `none` verification level and as the
//! accuracy reference.

use std::sync::Arc;

use tract_onnx::prelude::{IntoRunnable, TValue, TVec, TypedModel, TypedRunnableModel};
use vouch_tensor::{NamedTensor, TensorData};

use crate::EngineError;
use crate::import::{LoadedModel, tensor_from_tract};
use crate::quantize::to_tract;

/// A model ready to run in float32.
#[derive(Debug, Clone)]
pub struct FloatModel {
    runnable: Arc<TypedRunnableModel>,
    input_names: Vec<String>,
    output_names: Vec<String>,
}

impl FloatModel {
    /// Optimizes the model for this machine.
    pub fn new(model: &LoadedModel) -> Result<Self, EngineError> {
        let typed: &TypedModel = &model.typed;
        let name_of = |outlet: &tract_onnx::prelude::OutletId| typed.node(outlet.node).name.clone();
        let input_names = typed
            .input_outlets()
            .map_err(|e| EngineError::Import(format!("{e:#}")))?
            .iter()
            .map(name_of)
            .collect();
        let output_names = typed
            .output_outlets()
            .map_err(|e| EngineError::Import(format!("{e:#}")))?
            .iter()
            .map(name_of)
            .collect();
        let runnable = typed
            .clone()
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| EngineError::Import(format!("{e:#}")))?;
        Ok(Self {
            runnable,
            input_names,
            output_names,
        })
    }

    /// The input names, in the model's order.
    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    /// Runs the model. Inputs are matched by name (or the only tensor to the only input); tract
    /// checks types and shapes against the model.
    pub fn run(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, EngineError> {
        let mut bound: TVec<TValue> = TVec::new();
        for name in &self.input_names {
            let given = if self.input_names.len() == 1 && inputs.len() == 1 && inputs[0].name.is_none() {
                &inputs[0]
            } else {
                inputs
                    .iter()
                    .find(|t| t.name.as_deref() == Some(name.as_str()))
                    .ok_or_else(|| EngineError::Run(format!("input '{name}' is missing")))?
            };
            bound.push(to_tract(&given.tensor).map_err(EngineError::Run)?.into());
        }
        if let Some(extra) = inputs
            .iter()
            .filter_map(|t| t.name.as_ref())
            .find(|n| !self.input_names.contains(n))
        {
            return Err(EngineError::Run(format!(
                "input '{extra}': the model has no such input; it takes {}",
                self.input_names.join(", ")
            )));
        }
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

/// The float32 elements of a tensor, for comparisons.
pub fn float_elements(data: &TensorData) -> Option<&[f32]> {
    match data {
        TensorData::F32(v) => Some(v),
        _ => None,
    }
}
