//! Executing any plan that decodes never panics: plans come from peers, so every instruction must
//! refuse operands it cannot run on (wrong shapes, out-of-range indices or values) with an error.
//! Inputs are small tensors of the shapes the plan declares (symbols are 2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_engine::plan::{InputKind, PlanDim};
use vouch_engine::{ExecOptions, Plan, PlanLimits, execute};
use vouch_tensor::{NamedTensor, Tensor, TensorData};

fuzz_target!(|data: &[u8]| {
    let limits = PlanLimits {
        max_instrs: 64,
        max_elements: 1 << 12,
        ..PlanLimits::default()
    };
    let Ok(plan) = Plan::decode(data, &limits) else {
        return;
    };
    let mut inputs = Vec::new();
    for input in &plan.inputs {
        let shape: Option<Vec<usize>> = input
            .shape
            .iter()
            .map(|d| match d {
                PlanDim::Fixed(n) if *n <= 8 => Some(*n as usize),
                PlanDim::Fixed(_) => None,
                PlanDim::Symbol(_) => Some(2),
            })
            .collect();
        let Some(shape) = shape else {
            return;
        };
        let count: usize = shape.iter().product();
        let data = match input.kind {
            InputKind::Quantized { .. } => TensorData::F32((0..count).map(|i| (i % 11) as f32 - 5.0).collect()),
            InputKind::Integer => TensorData::I64((0..count).map(|i| (i % 3) as i64).collect()),
            InputKind::Boolean => TensorData::Bool((0..count).map(|i| i % 2 == 0).collect()),
        };
        let Ok(tensor) = Tensor::new(shape, data) else {
            return;
        };
        inputs.push(NamedTensor {
            name: Some(input.name.clone()),
            tensor,
        });
    }
    let options = ExecOptions {
        threads: 2,
        simd: true,
        max_elements: 1 << 16,
    };
    let _ = execute(&plan, &inputs, &options);
});
