//! The float path: tract's optimized runner, for the `none` verification level and as the
//! accuracy reference.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::prelude::{IntoRunnable, Symbol, TDim, TValue, TVec, TypedModel, TypedRunnableModel};
use vouch_tensor::NamedTensor;

use crate::EngineError;
use crate::exec::{InputSpec, match_inputs};
use crate::import::{LoadedModel, dtype_of, tensor_from_tract, to_tract};
use crate::plan::PlanDim;
use crate::pools::{MAX_THREADS, PerThreadCount};
use tract_onnx::tract_core::internal::DimLike;

mod einsum;
mod kernels;
mod program;

use program::{FloatProgram, RunError};

/// How many input shapes a model remembers, each with the plan tract optimized for it once the
/// shape has come back. A caller cycling through more shapes than this runs the general plan
/// and pays no optimization at all.
const REMEMBERED_SHAPES: usize = 8;

/// A shape is given its own optimized plan the second time it is seen: optimizing costs up to
/// a few inferences (about 0.2 s for all-MiniLM-L6-v2), which a shape seen once never repays.
const USES_BEFORE_SPECIALIZING: u32 = 2;

/// A model ready to run in float32.
///
/// tract optimizes far better when every dimension is known (it picks kernels and packs
/// weights for the exact sizes: `scripts/bench-engine` measures 1.9-3.2x on the digit CNN and 2x
/// on all-MiniLM-L6-v2 at batch 32 against tract's general plan), so a model whose
/// inputs have symbolic dimensions keeps, beside the general plan, one plan per recently used
/// concrete shape.
#[derive(Debug, Clone)]
pub struct FloatModel {
    /// Decluttered, still symbolic: what each concrete plan is made from.
    decluttered: Arc<TypedModel>,
    /// Optimized for any shape; runs shapes without (or before) their own plan.
    general: Arc<TypedRunnableModel>,
    /// The plain symbolic dimensions of the inputs: symbol, input index, axis.
    symbols: Vec<(Symbol, usize, usize)>,
    shapes: Arc<Mutex<Vec<RememberedShape>>>,
    /// Per thread count, its executor; most recently used last.
    pools: Arc<PerThreadCount<Executor>>,
    inputs: Vec<InputSpec>,
    output_names: Vec<String>,
    /// Vouch's own executor, for graphs whose every operation it runs.
    program: Option<Arc<FloatProgram>>,
    /// Runs that Vouch's executor handed to tract (shapes it does not handle).
    handed_to_tract: Arc<AtomicU64>,
}

/// One concrete input shape, most recently used last in the list.
#[derive(Debug)]
struct RememberedShape {
    symbol_values: Vec<i64>,
    uses: u32,
    plan: Option<Arc<TypedRunnableModel>>,
}

fn import_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Import(format!("{e:#}"))
}

impl FloatModel {
    /// Optimizes the model for this machine.
    pub fn new(model: &LoadedModel) -> Result<Self, EngineError> {
        let typed: &TypedModel = &model.typed;
        let name_of = |outlet: &tract_onnx::prelude::OutletId| typed.node(outlet.node).name.clone();
        let mut inputs = Vec::new();
        let mut symbols = Vec::new();
        for (input_index, outlet) in typed.input_outlets().map_err(import_error)?.iter().enumerate() {
            let fact = typed.outlet_fact(*outlet).map_err(import_error)?;
            let name = name_of(outlet);
            let dtype = dtype_of(fact.datum_type).ok_or_else(|| EngineError::Unsupported {
                op: "Input".into(),
                node: name.clone(),
                reason: format!("inputs of type {:?} are not supported", fact.datum_type),
            })?;
            let mut shape = Vec::with_capacity(fact.shape.rank());
            for (axis, dim) in fact.shape.iter().enumerate() {
                shape.push(match dim.to_usize() {
                    Ok(n) => PlanDim::Fixed(n as u64),
                    Err(_) => PlanDim::Symbol(dim.to_string()),
                });
                if let TDim::Sym(symbol) = dim
                    && !symbols.iter().any(|(known, _, _)| known == symbol)
                {
                    symbols.push((symbol.clone(), input_index, axis));
                }
            }
            inputs.push(InputSpec { name, dtype, shape });
        }
        let output_names = typed
            .output_outlets()
            .map_err(import_error)?
            .iter()
            .map(|outlet| {
                typed
                    .outlet_label(*outlet)
                    .map_or_else(|| name_of(outlet), str::to_owned)
            })
            .collect();
        let mut decluttered = typed.clone();
        crate::import::declutter(&mut decluttered).map_err(import_error)?;
        let general = optimized(&decluttered).map_err(import_error)?;
        let program = model
            .to_ir()
            .ok()
            .and_then(|graph| FloatProgram::new(&graph))
            .map(Arc::new);
        Ok(Self {
            program,
            handed_to_tract: Arc::default(),
            decluttered: Arc::new(decluttered),
            general,
            symbols,
            shapes: Arc::default(),
            pools: Arc::default(),
            inputs,
            output_names,
        })
    }

    /// What the model expects of its inputs, in the model's order.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// How many input shapes currently have a plan of their own.
    pub fn specialized_shapes(&self) -> usize {
        self.remembered()
            .iter()
            .filter(|shape| {
                shape
                    .plan
                    .as_ref()
                    .is_some_and(|plan| !Arc::ptr_eq(plan, &self.general))
            })
            .count()
    }

    /// Runs the model on up to `threads` threads (clamped to 1..=[`MAX_THREADS`]). Inputs
    /// are matched by name (or the only tensor to the only input) and checked against the
    /// model's types and shapes first.
    pub fn run(&self, inputs: &[NamedTensor], threads: usize) -> Result<Vec<NamedTensor>, EngineError> {
        let matched = match_inputs(&self.inputs, inputs)?;
        if let Some(program) = &self.program {
            match program.run(&matched, threads.clamp(1, MAX_THREADS)) {
                Ok(outputs) => return Ok(self.named(outputs)),
                Err(e @ RunError::TooLarge { .. }) => return Err(EngineError::Run(e.to_string())),
                // Shapes the executor does not handle: tract runs the model (and reports any
                // error in the inputs).
                Err(RunError::Unhandled { .. }) => {
                    self.handed_to_tract.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.run_tract(matched, threads)
    }

    /// Runs the model on tract's optimized plan.
    fn run_tract(&self, matched: Vec<&vouch_tensor::Tensor>, threads: usize) -> Result<Vec<NamedTensor>, EngineError> {
        let symbol_values: Vec<i64> = self
            .symbols
            .iter()
            .map(|&(_, input, axis)| matched[input].shape()[axis] as i64)
            .collect();
        let bound: TVec<TValue> = matched
            .into_iter()
            .map(|t| to_tract(t).map(TValue::from))
            .collect::<Result<_, _>>()
            .map_err(EngineError::Run)?;
        let plan = self.plan_for(symbol_values);
        let outputs = multithread_tract_scope(self.executor(threads)?, || plan.run(bound))
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let tensors = outputs
            .iter()
            .map(|tensor| tensor_from_tract(tensor))
            .collect::<Result<Vec<_>, _>>()
            .map_err(EngineError::Run)?;
        Ok(self.named(tensors))
    }

    /// Whether the model runs on Vouch's own float kernels (else on tract's).
    pub fn runs_on_vouch_kernels(&self) -> bool {
        self.program.is_some()
    }

    /// The same model with every run on tract's plans, Vouch's own kernels set aside: to compare
    /// the two float engines.
    pub fn on_tract_only(mut self) -> Self {
        self.program = None;
        self
    }

    /// How many runs Vouch's own kernels handed to tract because of shapes they do not handle.
    pub fn runs_handed_to_tract(&self) -> u64 {
        self.handed_to_tract.load(Ordering::Relaxed)
    }

    fn named(&self, outputs: Vec<vouch_tensor::Tensor>) -> Vec<NamedTensor> {
        outputs
            .into_iter()
            .zip(&self.output_names)
            .map(|(tensor, name)| NamedTensor {
                name: Some(name.clone()),
                tensor,
            })
            .collect()
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Vec<RememberedShape>> {
        // Losing or reordering remembered shapes only costs speed, so a lock poisoned by a
        // panicking caller is still safe to use.
        self.shapes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The plan for these symbol values: the shape's own once it has earned one, else the
    /// general plan. A shape whose own plan fails to build keeps running the general one.
    fn plan_for(&self, symbol_values: Vec<i64>) -> Arc<TypedRunnableModel> {
        if self.symbols.is_empty() {
            return Arc::clone(&self.general);
        }
        if let Some(plan) = self.note_use(&symbol_values) {
            return plan;
        }
        // Optimized outside the lock, so other shapes keep running meanwhile.
        let substitutions: HashMap<Symbol, TDim> = self
            .symbols
            .iter()
            .zip(&symbol_values)
            .map(|((symbol, _, _), &value)| (symbol.clone(), TDim::Val(value)))
            .collect();
        let plan = self
            .decluttered
            .set_symbols(&substitutions)
            .and_then(|concrete| optimized(&concrete))
            .unwrap_or_else(|_| Arc::clone(&self.general));
        if let Some(shape) = self
            .remembered()
            .iter_mut()
            .find(|shape| shape.symbol_values == symbol_values)
        {
            shape.plan = Some(Arc::clone(&plan));
        }
        plan
    }

    /// Records one use of a shape (most recently used last, the least recently used forgotten
    /// when the list is full) and returns the plan to run, or `None` when this use is the one
    /// that earns the shape its own plan.
    fn note_use(&self, symbol_values: &[i64]) -> Option<Arc<TypedRunnableModel>> {
        let mut shapes = self.remembered();
        let Some(index) = shapes.iter().position(|shape| shape.symbol_values == symbol_values) else {
            if shapes.len() == REMEMBERED_SHAPES {
                shapes.remove(0);
            }
            shapes.push(RememberedShape {
                symbol_values: symbol_values.to_vec(),
                uses: 1,
                plan: None,
            });
            return Some(Arc::clone(&self.general));
        };
        let mut shape = shapes.remove(index);
        shape.uses = shape.uses.saturating_add(1);
        let plan = match &shape.plan {
            Some(plan) => Some(Arc::clone(plan)),
            None if shape.uses == USES_BEFORE_SPECIALIZING => None,
            None => Some(Arc::clone(&self.general)),
        };
        shapes.push(shape);
        plan
    }

    /// The executor for `threads` threads; the model keeps pools for a few counts used last.
    fn executor(&self, threads: usize) -> Result<Executor, EngineError> {
        let threads = threads.clamp(1, MAX_THREADS);
        if threads == 1 {
            return Ok(Executor::SingleThread);
        }
        self.pools.get(threads, || {
            rayon::ThreadPoolBuilder::new()
                .thread_name(|index| format!("vouch-float-{index}"))
                .num_threads(threads)
                .build()
                .map(|pool| Executor::MultiThread(Arc::new(pool)))
                .map_err(|e| EngineError::Run(format!("cannot start {threads} float threads: {e}")))
        })
    }
}

fn optimized(model: &TypedModel) -> tract_onnx::prelude::TractResult<Arc<TypedRunnableModel>> {
    let mut model = model.clone();
    model.optimize()?;
    model.into_runnable()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_tensor::{Tensor, TensorData};

    fn fixture_model(name: &str) -> FloatModel {
        let path = format!("{}/../../fixtures/models/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(path).expect("model");
        FloatModel::new(&crate::load_onnx(&bytes).expect("load")).expect("float")
    }

    /// The first `rows` held-out digits (8x8 images, 64 values each).
    fn digits(rows: usize) -> Tensor {
        let path = format!("{}/../../fixtures/data/digits_test.npz", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(path).expect("digits");
        let inputs = vouch_tensor::read_npz(&bytes, &Default::default()).expect("npz");
        let TensorData::F32(all) = inputs[0].tensor.data() else {
            panic!("float digits")
        };
        Tensor::new(vec![rows, 64], TensorData::F32(all[..rows * 64].to_vec())).expect("tensor")
    }

    fn floats(tensor: &Tensor) -> &[f32] {
        match tensor.data() {
            TensorData::F32(v) => v,
            other => panic!("expected floats, got {:?}", other.dtype()),
        }
    }

    #[test]
    fn the_digit_classifiers_run_on_vouch_kernels_as_tract_runs_them() {
        for name in ["digits_mlp_v1.onnx", "digits_cnn.onnx"] {
            let model = fixture_model(name);
            assert!(model.runs_on_vouch_kernels(), "{name}");
            let program = model.program.as_ref().expect("program");
            for rows in [1, 2, 7, 32, 101] {
                let input = digits(rows);
                let reference = model.run_tract(vec![&input], 1).expect("tract");
                for threads in [1, 2, 3, 8] {
                    let ours = program.run(&[&input], threads).expect("vouch kernels");
                    assert_eq!(ours.len(), reference.len());
                    for (x, r) in ours.iter().zip(&reference) {
                        assert_eq!(x.shape(), r.tensor.shape(), "{name} at {rows} rows");
                        for (a, b) in floats(x).iter().zip(floats(&r.tensor)) {
                            assert!(
                                (a - b).abs() <= 1e-5,
                                "{name}, {rows} rows, {threads} threads: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_model_keeps_pools_for_only_a_few_thread_counts() {
        let model = fixture_model("digits_mlp_v1.onnx");
        for threads in 2..=9 {
            model.executor(threads).expect("pool");
        }
        model.executor(6).expect("pool again");
        assert_eq!(
            model.pools.counts(),
            vec![7, 8, 9, 6],
            "the counts used last, most recent last"
        );
        // Out-of-range counts are clamped, not refused.
        assert!(matches!(model.executor(0), Ok(Executor::SingleThread)));
    }
}
