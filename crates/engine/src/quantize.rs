//! Post-training quantization: Vouch's IR plus calibration inputs to an exact plan.
//!
//! Calibration runs the float model (tract) on the publisher's inputs and records each value's
//! largest magnitude. Activations then get a symmetric 16-bit scale (`max / 32767`), weights of a
//! product a symmetric 8-bit scale per output channel (`max / 127`), and every operation becomes
//! integer arithmetic with multipliers fixed here. Floats are used only in this module; the plan
//! it produces never evaluates one. Building is deterministic: the same model and calibration
//! give the same plan id.

use tract_onnx::prelude::{IntoRunnable, OutletId, TValue, TVec, TypedModel, TypedRunnableModel};
use vouch_tensor::{DType, NamedTensor, Tensor, TensorData};

use crate::EngineError;
use crate::exec::LOOKUP_ENTRIES;
use crate::fixed::{ACTIVATION_MAX, Multiplier, WEIGHT_MAX};
use crate::import::{LoadedModel, to_tract};
use crate::ir::{BinaryOp, CompareOp, DimFact, Graph, Op, ReduceOp, UnaryOp, ValueId, Window};
use crate::plan::{InputKind, Instr, OutputKind, Plan, PlanDim, PlanInput, PlanOutput, PlanValue};

/// Calibration runs in batches of at most this many samples along axis 0.
const CALIBRATION_BATCH: usize = 256;

/// Magnitudes from here up are "infinity" sentinels (attention masks add `-f32::MAX`): they do not
/// widen a value's range, and quantize to the range's ends.
const SENTINEL: f64 = 1.0e30;

/// The scale of a value that held nothing but zeros and sentinels (a mask): its floor, -32767,
/// stands for `-SENTINEL`, so adding it to anything saturates to the floor.
const MASK_SCALE: f64 = SENTINEL / ACTIVATION_MAX as f64;

/// What calibration saw of each value of the graph.
struct Ranges {
    /// The largest finite magnitude below [`SENTINEL`].
    amax: Vec<f64>,
    /// Whether a sentinel appeared.
    sentinel: Vec<bool>,
}

/// What a value of the IR became in the plan.
#[derive(Debug, Clone)]
enum Quantized {
    /// A quantized activation: plan value and its real scale.
    Activation { value: PlanValue, scale: f64 },
    /// Exact integers.
    Integer { value: PlanValue },
    /// A constant, not yet placed in the plan (most are folded into weights).
    Constant(Tensor),
    /// Folded into the instruction of another value.
    Fused,
}

/// Builds the exact plan of a model from calibration inputs (named as the model's inputs, with the
/// samples stacked along axis 0).
pub fn build_plan(model: &LoadedModel, graph: &Graph, calibration: &[NamedTensor]) -> Result<Plan, EngineError> {
    let ranges = calibrate(model, graph, calibration)?;
    Builder::new(graph, ranges).build()
}

/// The range each float value of the graph takes over the calibration inputs.
fn calibrate(model: &LoadedModel, graph: &Graph, calibration: &[NamedTensor]) -> Result<Ranges, EngineError> {
    let bad = |reason: String| EngineError::Calibration(reason);
    let observed: Vec<ValueId> = (0..graph.values.len())
        .filter(|v| graph.values[*v].dtype == DType::Float32 && graph.constant(*v).is_none())
        .collect();
    let mut typed: TypedModel = model.typed.clone();
    let outlets: Vec<OutletId> = observed
        .iter()
        .map(|v| {
            let (node, slot) = graph.values[*v].tract_outlet;
            OutletId::new(node, slot)
        })
        .collect();
    typed
        .select_output_outlets(&outlets)
        .map_err(|e| bad(format!("{e:#}")))?;
    let runnable = typed.into_runnable().map_err(|e| bad(format!("{e:#}")))?;

    // Bind calibration tensors to inputs by name (or the only tensor to the only input).
    let mut bound: Vec<&Tensor> = Vec::with_capacity(graph.inputs.len());
    for &input in &graph.inputs {
        let name = &graph.values[input].name;
        let tensor = if graph.inputs.len() == 1 && calibration.len() == 1 {
            &calibration[0].tensor
        } else {
            &calibration
                .iter()
                .find(|t| t.name.as_deref() == Some(name.as_str()))
                .ok_or_else(|| bad(format!("no calibration tensor for input '{name}'")))?
                .tensor
        };
        bound.push(tensor);
    }
    // A model whose inputs all have fixed shapes may take one calibration input per input, each
    // of exactly that shape, whatever their first dimensions.
    let exactly_the_inputs = graph.inputs.iter().zip(&bound).all(|(v, t)| {
        let shape = &graph.values[*v].shape;
        shape.len() == t.shape().len()
            && shape
                .iter()
                .zip(t.shape())
                .all(|(d, n)| matches!(d, DimFact::Fixed(f) if f == n))
    });
    if exactly_the_inputs {
        let inputs: TVec<TValue> = bound
            .iter()
            .map(|t| to_tract(t).map(TValue::from))
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let mut ranges = Ranges::new(graph.values.len());
        record_ranges(&runnable, inputs, &observed, &mut ranges)?;
        return Ok(ranges);
    }
    let samples = bound.first().and_then(|t| t.shape().first().copied()).unwrap_or(0);
    if samples == 0 || bound.iter().any(|t| t.shape().first() != Some(&samples)) {
        return Err(bad(
            "every calibration tensor needs the same number of samples (at least one) along axis 0".into(),
        ));
    }
    let batch = graph
        .inputs
        .iter()
        .map(|v| match graph.values[*v].shape.first() {
            Some(DimFact::Fixed(b)) => *b,
            _ => CALIBRATION_BATCH,
        })
        .min()
        .unwrap_or(CALIBRATION_BATCH)
        .max(1);
    if !samples.is_multiple_of(batch) && batch != CALIBRATION_BATCH {
        return Err(bad(format!(
            "the model takes batches of {batch}; {samples} samples do not divide into them"
        )));
    }
    let mut ranges = Ranges::new(graph.values.len());
    let mut start = 0;
    while start < samples {
        let end = (start + batch).min(samples);
        let inputs: TVec<TValue> = bound
            .iter()
            .map(|t| {
                slice_rows(t, start, end)
                    .and_then(|rows| to_tract(&rows))
                    .map(TValue::from)
            })
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        record_ranges(&runnable, inputs, &observed, &mut ranges)?;
        start = end;
    }
    Ok(ranges)
}

/// Runs the float model once and widens each observed value's range to what it took.
fn record_ranges(
    runnable: &std::sync::Arc<TypedRunnableModel>,
    inputs: TVec<TValue>,
    observed: &[ValueId],
    ranges: &mut Ranges,
) -> Result<(), EngineError> {
    let bad = |reason: String| EngineError::Calibration(reason);
    let outputs = runnable
        .run(inputs)
        .map_err(|e| bad(format!("the float model failed: {e:#}")))?;
    for (value, output) in observed.iter().zip(outputs.iter()) {
        let cast = output.cast_to::<f32>().map_err(|e| bad(format!("{e:#}")))?;
        let view = cast.to_plain_array_view::<f32>().map_err(|e| bad(format!("{e:#}")))?;
        for x in view.iter().map(|x| f64::from(x.abs())) {
            if x >= SENTINEL {
                ranges.sentinel[*value] = true;
            } else if x > ranges.amax[*value] {
                ranges.amax[*value] = x;
            }
        }
    }
    Ok(())
}

impl Ranges {
    fn new(values: usize) -> Self {
        Self {
            amax: vec![0.0; values],
            sentinel: vec![false; values],
        }
    }
}

/// Rows `start..end` along axis 0.
fn slice_rows(tensor: &Tensor, start: usize, end: usize) -> Result<Tensor, String> {
    let row: usize = tensor.shape()[1..].iter().product();
    let mut shape = tensor.shape().to_vec();
    shape[0] = end - start;
    let (a, b) = (start * row, end * row);
    let data = match tensor.data() {
        TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
        TensorData::F64(v) => TensorData::F64(v[a..b].to_vec()),
        TensorData::I8(v) => TensorData::I8(v[a..b].to_vec()),
        TensorData::U8(v) => TensorData::U8(v[a..b].to_vec()),
        TensorData::I16(v) => TensorData::I16(v[a..b].to_vec()),
        TensorData::I32(v) => TensorData::I32(v[a..b].to_vec()),
        TensorData::I64(v) => TensorData::I64(v[a..b].to_vec()),
        TensorData::Bool(v) => TensorData::Bool(v[a..b].to_vec()),
    };
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

fn f32_data(tensor: &Tensor) -> Vec<f64> {
    match tensor.data() {
        TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::F64(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
        TensorData::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::I16(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::I8(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::U8(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::Bool(v) => v.iter().map(|x| f64::from(u8::from(*x))).collect(),
    }
}

/// `round(x)` with ties away from zero, saturated to `±max` (build time only).
fn round_saturate(x: f64, max: i64) -> i64 {
    if x.is_nan() {
        return 0;
    }
    (x.round() as i64).clamp(-max, max)
}

fn activation_scale(amax: f64) -> f64 {
    // An all-zero value still needs a positive scale; any will do.
    if amax > 0.0 {
        amax / ACTIVATION_MAX as f64
    } else {
        1.0 / ACTIVATION_MAX as f64
    }
}

struct Builder<'a> {
    graph: &'a Graph,
    ranges: Ranges,
    readers: Vec<Vec<usize>>,
    quantized: Vec<Option<Quantized>>,
    instrs: Vec<Instr>,
    inputs: Vec<PlanInput>,
}

impl<'a> Builder<'a> {
    fn new(graph: &'a Graph, ranges: Ranges) -> Self {
        let mut readers = vec![Vec::new(); graph.values.len()];
        for (index, node) in graph.nodes.iter().enumerate() {
            for input in &node.inputs {
                readers[*input].push(index);
            }
        }
        Self {
            graph,
            ranges,
            readers,
            quantized: vec![None; graph.values.len()],
            instrs: Vec::new(),
            inputs: Vec::new(),
        }
    }

    fn push(&mut self, instr: Instr) -> PlanValue {
        self.instrs.push(instr);
        (self.inputs.len() + self.instrs.len() - 1) as PlanValue
    }

    fn scale_of(&self, value: ValueId) -> f64 {
        if self.ranges.sentinel[value] && self.ranges.amax[value] == 0.0 {
            return MASK_SCALE;
        }
        activation_scale(self.ranges.amax[value])
    }

    fn build(mut self) -> Result<Plan, EngineError> {
        let graph = self.graph;
        for (index, &value) in graph.inputs.iter().enumerate() {
            let info = &graph.values[value];
            let shape = info
                .shape
                .iter()
                .map(|d| match d {
                    DimFact::Fixed(n) => PlanDim::Fixed(*n as u64),
                    DimFact::Symbol(s) => PlanDim::Symbol(s.clone()),
                })
                .collect();
            let (kind, quantized) = match info.dtype {
                DType::Float32 => {
                    let scale = self.scale_of(value);
                    (
                        InputKind::Quantized {
                            inverse_scale: Multiplier::from_f64(1.0 / scale),
                        },
                        Quantized::Activation {
                            value: index as PlanValue,
                            scale,
                        },
                    )
                }
                DType::Int64 | DType::Int32 | DType::Bool => (
                    if info.dtype == DType::Bool {
                        InputKind::Boolean
                    } else {
                        InputKind::Integer
                    },
                    Quantized::Integer {
                        value: index as PlanValue,
                    },
                ),
                other => {
                    return Err(EngineError::Unsupported {
                        op: "Input".into(),
                        node: info.name.clone(),
                        reason: format!("inputs of type {other:?} are not supported"),
                    });
                }
            };
            self.inputs.push(PlanInput {
                name: info.name.clone(),
                kind,
                shape,
            });
            self.quantized[value] = Some(quantized);
        }
        // Constants are known before any node runs: a node folds a constant it reads (a bias into
        // a product, a bound into a clamp) even where the topological order lists it later.
        for node in &graph.nodes {
            if let Op::Const(tensor) = &node.op {
                self.quantized[node.output] = Some(Quantized::Constant(tensor.clone()));
            }
        }
        for index in 0..graph.nodes.len() {
            if self.quantized[graph.nodes[index].output].is_some() {
                continue; // an input, or fused into an earlier instruction
            }
            let quantized = self.node(index).map_err(|reason| {
                let node = &graph.nodes[index];
                EngineError::Unsupported {
                    op: node.op.name(),
                    node: node.name.clone(),
                    reason,
                }
            })?;
            // A fused einsum has already marked its own value; keep that mark.
            self.quantized[graph.nodes[index].output].get_or_insert(quantized);
        }
        let mut outputs = Vec::with_capacity(graph.outputs.len());
        for &value_id in &graph.outputs {
            let name = graph.values[value_id].name.clone();
            let (value, kind) = match self.operand(value_id).map_err(|reason| EngineError::Unsupported {
                op: "Output".into(),
                node: name.clone(),
                reason,
            })? {
                Quantized::Activation { value, scale } => (
                    value,
                    OutputKind::Dequantized {
                        scale_bits: (scale as f32).to_bits(),
                    },
                ),
                Quantized::Integer { value } if graph.values[value_id].dtype == DType::Bool => {
                    (value, OutputKind::Boolean)
                }
                Quantized::Integer { value } => (value, OutputKind::Integer),
                _ => {
                    return Err(EngineError::Unsupported {
                        op: "Output".into(),
                        node: name,
                        reason: "constant outputs are not supported".into(),
                    });
                }
            };
            outputs.push(PlanOutput { name, value, kind });
        }
        Ok(Plan {
            inputs: self.inputs,
            instrs: self.instrs,
            outputs,
        })
    }

    /// What an IR value became; constants are placed in the plan when an activation needs them.
    fn operand(&mut self, value: ValueId) -> Result<Quantized, String> {
        match self.quantized[value].clone() {
            Some(Quantized::Constant(tensor)) if tensor.dtype() != DType::Float32 => {
                let data = f32_data(&tensor)
                    .iter()
                    .map(|x| {
                        let fits = x.fract() == 0.0 && x.abs() <= f64::from(i32::MAX);
                        fits.then_some(*x as i32)
                            .ok_or_else(|| format!("integer constant {x} does not fit in 32 bits"))
                    })
                    .collect::<Result<_, _>>()?;
                let placed = self.push(Instr::Const {
                    shape: tensor.shape().iter().map(|d| *d as u64).collect(),
                    data,
                });
                let quantized = Quantized::Integer { value: placed };
                self.quantized[value] = Some(quantized.clone());
                Ok(quantized)
            }
            Some(Quantized::Constant(tensor)) => {
                let data = f32_data(&tensor);
                let amax = data.iter().fold(0f64, |m, x| m.max(x.abs()));
                let scale = activation_scale(amax);
                let placed = self.push(Instr::Const {
                    shape: tensor.shape().iter().map(|d| *d as u64).collect(),
                    data: data
                        .iter()
                        .map(|x| round_saturate(x / scale, ACTIVATION_MAX) as i32)
                        .collect(),
                });
                let quantized = Quantized::Activation { value: placed, scale };
                self.quantized[value] = Some(quantized.clone());
                Ok(quantized)
            }
            Some(Quantized::Fused) => Err("reads a value folded into another operation".into()),
            Some(other) => Ok(other),
            None => Err("reads a value computed later".into()),
        }
    }

    fn activation(&mut self, value: ValueId) -> Result<(PlanValue, f64), String> {
        match self.operand(value)? {
            Quantized::Activation { value, scale } => Ok((value, scale)),
            _ => Err("needs a float operand".into()),
        }
    }

    fn integer(&mut self, value: ValueId) -> Result<PlanValue, String> {
        match self.operand(value)? {
            Quantized::Integer { value } => Ok(value),
            _ => Err("needs an integer operand".into()),
        }
    }

    /// A plan value holding an activation at `scale`: itself, or rescaled to it.
    fn rescaled(&mut self, value: PlanValue, from: f64, to: f64) -> PlanValue {
        if from == to {
            return value;
        }
        self.push(Instr::Rescale {
            input: value,
            factor: Multiplier::from_f64(from / to),
        })
    }

    /// An integer scalar holding a dimension: a constant, or the size of the model input axis
    /// that carries the symbol.
    fn dimension(&mut self, dim: &DimFact) -> Result<PlanValue, String> {
        match dim {
            DimFact::Fixed(n) => {
                let n = i32::try_from(*n).map_err(|_| format!("dimension {n} does not fit in 32 bits"))?;
                Ok(self.push(Instr::Const {
                    shape: vec![],
                    data: vec![n],
                }))
            }
            DimFact::Symbol(symbol) => {
                let graph = self.graph;
                let found = graph.inputs.iter().enumerate().find_map(|(index, value)| {
                    let axis = graph.values[*value]
                        .shape
                        .iter()
                        .position(|d| matches!(d, DimFact::Symbol(s) if s == symbol))?;
                    Some((index, axis))
                });
                let (input, axis) = found.ok_or_else(|| {
                    format!("dimension '{symbol}' is not an axis of a model input (expressions are not supported)")
                })?;
                Ok(self.push(Instr::Dim {
                    input: input as PlanValue,
                    axis: axis as u32,
                }))
            }
        }
    }

    /// A 1-D integer value holding dimensions.
    fn dimensions(&mut self, dims: &[DimFact]) -> Result<PlanValue, String> {
        if dims.iter().all(|d| matches!(d, DimFact::Fixed(_))) {
            let data = dims
                .iter()
                .map(|d| match d {
                    DimFact::Fixed(n) => {
                        i32::try_from(*n).map_err(|_| format!("dimension {n} does not fit in 32 bits"))
                    }
                    DimFact::Symbol(_) => Ok(0),
                })
                .collect::<Result<_, _>>()?;
            return Ok(self.push(Instr::Const {
                shape: vec![dims.len() as u64],
                data,
            }));
        }
        let mut parts = Vec::with_capacity(dims.len());
        for dim in dims {
            let scalar = self.dimension(dim)?;
            parts.push(self.push(Instr::AddAxis { input: scalar, axis: 0 }));
        }
        Ok(self.push(Instr::Concat { inputs: parts, axis: 0 }))
    }

    fn node(&mut self, index: usize) -> Result<Quantized, String> {
        let graph = self.graph;
        let node = &graph.nodes[index];
        let output = node.output;
        match &node.op {
            Op::Input(_) => Err("input not bound".into()),
            Op::Const(tensor) => Ok(Quantized::Constant(tensor.clone())),
            Op::EinSum { expr } => self.einsum(index, expr),
            Op::Binary(op) => self.binary(*op, node.inputs[0], node.inputs[1], output),
            Op::Unary(op) => {
                let (input, scale) = self.activation(node.inputs[0])?;
                let out_scale = self.scale_of(output);
                let table = lookup_table(*op, scale, out_scale);
                let value = self.push(Instr::Lookup { input, table });
                Ok(Quantized::Activation {
                    value,
                    scale: out_scale,
                })
            }
            Op::Softmax { axis } => {
                let (input, scale) = self.activation(node.inputs[0])?;
                let mut exp_table = Vec::new();
                for distance in 0..LOOKUP_ENTRIES {
                    let e = (65536.0 * libm::exp(-(distance as f64) * scale)).round();
                    if e < 1.0 {
                        break;
                    }
                    exp_table.push(e as u32);
                }
                let value = self.push(Instr::Softmax {
                    input,
                    axis: *axis as u32,
                    exp_table,
                    masked: self.ranges.sentinel[node.inputs[0]],
                });
                Ok(Quantized::Activation {
                    value,
                    scale: 1.0 / ACTIVATION_MAX as f64,
                })
            }
            Op::AddAxis(axis) => self.reshaping(node.inputs[0], |input| Instr::AddAxis {
                input,
                axis: *axis as u32,
            }),
            Op::RemoveAxis(axis) => self.reshaping(node.inputs[0], |input| Instr::RemoveAxis {
                input,
                axis: *axis as u32,
            }),
            Op::MoveAxis { from, to } => self.reshaping(node.inputs[0], |input| Instr::MoveAxis {
                input,
                from: *from as u32,
                to: *to as u32,
            }),
            Op::Conv { window, group } => self.conv(index, window, *group),
            Op::MaxPool(window) => self.reshaping(node.inputs[0], |input| Instr::MaxPool {
                input,
                window: window.clone(),
            }),
            Op::AvgPool {
                window,
                count_include_pad,
            } => {
                let (input, scale) = self.activation(node.inputs[0])?;
                let value = self.push(Instr::AvgPool {
                    input,
                    window: window.clone(),
                    count_include_pad: *count_include_pad,
                });
                Ok(Quantized::Activation { value, scale })
            }
            Op::Reduce { op, axes } => {
                let axes: Vec<u32> = axes.iter().map(|a| *a as u32).collect();
                if matches!(op, ReduceOp::Sum | ReduceOp::MeanOfSquares) {
                    let squares = *op == ReduceOp::MeanOfSquares;
                    let (input, scale) = self.activation(node.inputs[0])?;
                    let out_scale = self.scale_of(output);
                    // The mean of squares: the sum of `q^2` at `scale^2`, divided by the count.
                    let factor = if squares {
                        let shape = &graph.values[node.inputs[0]].shape;
                        let mut count = 1f64;
                        for axis in &axes {
                            match shape.get(*axis as usize) {
                                Some(DimFact::Fixed(n)) => count *= *n as f64,
                                _ => return Err("a mean over an axis of unknown size is not supported".into()),
                            }
                        }
                        scale * scale / count
                    } else {
                        scale
                    };
                    let value = self.push(Instr::ReduceSum {
                        input,
                        axes,
                        requant: Multiplier::from_f64(factor / out_scale),
                        squares,
                    });
                    return Ok(Quantized::Activation {
                        value,
                        scale: out_scale,
                    });
                }
                let max = *op == ReduceOp::Max;
                self.reshaping(node.inputs[0], |input| Instr::ReduceMinMax { input, axes, max })
            }
            Op::Dims { shape, dims } => match shape[..] {
                [] if dims.len() == 1 => Ok(Quantized::Integer {
                    value: self.dimension(&dims[0])?,
                }),
                [_] => Ok(Quantized::Integer {
                    value: self.dimensions(dims)?,
                }),
                _ => Err("dimension constants of rank over 1 are not supported".into()),
            },
            Op::Gather { axis } => self.gather(node.inputs[0], node.inputs[1], *axis, output),
            Op::GatherNd => {
                let indices = self.integer(node.inputs[1])?;
                self.reshaping(node.inputs[0], |input| Instr::GatherNd { input, indices })
            }
            Op::Concat { axis } => self.concat(&node.inputs, *axis),
            Op::Slice { axis, start, end } => {
                let (start, end) = (self.dimension(start)?, self.dimension(end)?);
                self.reshaping(node.inputs[0], |input| Instr::Slice {
                    input,
                    axis: *axis as u32,
                    start,
                    end,
                })
            }
            Op::Range => {
                let start = self.integer(node.inputs[0])?;
                let end = self.integer(node.inputs[1])?;
                let step = self.integer(node.inputs[2])?;
                let value = self.push(Instr::Range { start, end, step });
                Ok(Quantized::Integer { value })
            }
            Op::Broadcast { shape } => {
                let shape = self.dimensions(shape)?;
                self.reshaping(node.inputs[0], |input| Instr::Expand { input, shape })
            }
            Op::Cast { to } => self.cast(node.inputs[0], *to, output),
            Op::Where => self.select(node.inputs[0], node.inputs[1], node.inputs[2], output),
            Op::Compare(op) => {
                let (a, sa) = self.comparable(node.inputs[0])?;
                let (b, sb) = self.comparable(node.inputs[1])?;
                // Both sides to the finer scale, exactly where it is an integer multiple.
                let common = sa.min(sb);
                let value = self.push(Instr::Compare {
                    a,
                    b,
                    op: *op,
                    scale_a: Multiplier::from_f64(sa / common),
                    scale_b: Multiplier::from_f64(sb / common),
                });
                Ok(Quantized::Integer { value })
            }
            Op::Logic(op) => {
                let a = self.integer(node.inputs[0])?;
                let b = self.integer(node.inputs[1])?;
                let value = self.push(Instr::Logic { a, b, op: *op });
                Ok(Quantized::Integer { value })
            }
            Op::Not => {
                let a = self.integer(node.inputs[0])?;
                let value = self.compare_with_zero(a, CompareOp::Eq);
                Ok(Quantized::Integer { value })
            }
            // A quantized value is an integer, never NaN: the answer is zeros of the input's shape.
            Op::IsNan => {
                let input = match self.operand(node.inputs[0])? {
                    Quantized::Activation { value, .. } | Quantized::Integer { value } => value,
                    _ => return Err("cannot test this operand".into()),
                };
                let value = self.push(Instr::Clamp { input, low: 0, high: 0 });
                Ok(Quantized::Integer { value })
            }
            Op::RmsNorm { axis, eps } => self.rms_norm(node.inputs[0], *axis, *eps, output),
            Op::Reshape { at, from, to } => {
                let to_dims: Vec<u64> = to
                    .iter()
                    .map(|d| match d {
                        DimFact::Fixed(n) => *n as u64,
                        DimFact::Symbol(_) => 0,
                    })
                    .collect();
                if to_dims.iter().filter(|d| **d == 0).count() > 1 {
                    return Err("a reshape with more than one symbolic dimension".into());
                }
                let (at, from_rank) = (*at as u32, from.len() as u32);
                self.reshaping(node.inputs[0], |input| Instr::Reshape {
                    input,
                    at,
                    from_rank,
                    to: to_dims.clone(),
                })
            }
        }
    }

    /// Data movement: the value keeps its kind and scale.
    fn reshaping(&mut self, input: ValueId, make: impl FnOnce(PlanValue) -> Instr) -> Result<Quantized, String> {
        match self.operand(input)? {
            Quantized::Activation { value, scale } => {
                let value = self.push(make(value));
                Ok(Quantized::Activation { value, scale })
            }
            Quantized::Integer { value } => {
                let value = self.push(make(value));
                Ok(Quantized::Integer { value })
            }
            _ => Err("cannot reshape this operand".into()),
        }
    }

    fn binary(&mut self, op: BinaryOp, left: ValueId, right: ValueId, output: ValueId) -> Result<Quantized, String> {
        let out_scale = self.scale_of(output);
        match op {
            BinaryOp::Add | BinaryOp::Sub => {
                let (a, sa) = self.activation(left)?;
                let (b, sb) = self.activation(right)?;
                let value = self.push(Instr::AddSub {
                    a,
                    b,
                    scale_a: Multiplier::from_f64(sa / out_scale),
                    scale_b: Multiplier::from_f64(sb / out_scale),
                    subtract: op == BinaryOp::Sub,
                });
                Ok(Quantized::Activation {
                    value,
                    scale: out_scale,
                })
            }
            BinaryOp::Mul | BinaryOp::Div => {
                let right = if op == BinaryOp::Div {
                    // x / c is x * (1 / c); dividing by an activation needs a reciprocal table.
                    let Some(Quantized::Constant(divisor)) = self.quantized[right].clone() else {
                        return Err("division by a computed value is not supported yet".into());
                    };
                    let reciprocal: Vec<f32> = f32_data(&divisor).iter().map(|d| (1.0 / d) as f32).collect();
                    let tensor = Tensor::new(divisor.shape().to_vec(), TensorData::F32(reciprocal))
                        .map_err(|e| e.to_string())?;
                    self.quantized[right] = Some(Quantized::Constant(tensor));
                    right
                } else {
                    right
                };
                let (a, sa) = self.activation(left)?;
                let (b, sb) = self.activation(right)?;
                let value = self.push(Instr::Mul {
                    a,
                    b,
                    requant: Multiplier::from_f64(sa * sb / out_scale),
                });
                Ok(Quantized::Activation {
                    value,
                    scale: out_scale,
                })
            }
            BinaryOp::Max | BinaryOp::Min => {
                // max(x, c) and min(x, c) with one constant c: a clamp in x's own scale (ReLU, Clip).
                let (x, c) = match (&self.quantized[left], &self.quantized[right]) {
                    (_, Some(Quantized::Constant(c))) => (left, c.clone()),
                    (Some(Quantized::Constant(c)), _) => (right, c.clone()),
                    _ => return Err("max or min of two computed values is not supported yet".into()),
                };
                let bound = f32_data(&c);
                let Some(first) = bound.first().copied().filter(|f| bound.iter().all(|b| b == f)) else {
                    return Err("max or min against a constant that varies is not supported yet".into());
                };
                let (input, scale) = self.activation(x)?;
                let q = round_saturate(first / scale, ACTIVATION_MAX) as i32;
                let max = ACTIVATION_MAX as i32;
                let (low, high) = if op == BinaryOp::Max { (q, max) } else { (-max, q) };
                if self.fuse_clamp(x, input, low, high) {
                    self.quantized[x] = Some(Quantized::Fused);
                    return Ok(Quantized::Activation { value: input, scale });
                }
                let value = self.push(Instr::Clamp { input, low, high });
                Ok(Quantized::Activation { value, scale })
            }
        }
    }

    /// Narrows the output range of the instruction that computes `value` (the plan's value for
    /// `x`) to `low..=high` when a clamp there gives the same bits as one after it: the
    /// instruction is a product or a clamp, the last one pushed, and nothing else reads `x`.
    fn fuse_clamp(&mut self, x: ValueId, value: PlanValue, low: i32, high: i32) -> bool {
        let last = (self.inputs.len() + self.instrs.len()).checked_sub(1);
        if last != Some(value as usize) || self.readers[x].len() != 1 || self.graph.outputs.contains(&x) {
            return false;
        }
        let range = match self.instrs.last_mut() {
            Some(Instr::Dense { low, high, .. } | Instr::Conv { low, high, .. } | Instr::Clamp { low, high, .. }) => {
                (low, high)
            }
            _ => return false,
        };
        let (new_low, new_high) = ((*range.0).max(low), (*range.1).min(high));
        if new_low > new_high {
            return false;
        }
        (*range.0, *range.1) = (new_low, new_high);
        true
    }

    /// `value op 0` on integers: 1 or 0.
    fn compare_with_zero(&mut self, value: PlanValue, op: CompareOp) -> PlanValue {
        let zero = self.push(Instr::Const {
            shape: vec![],
            data: vec![0],
        });
        let identity = Multiplier::from_f64(1.0);
        self.push(Instr::Compare {
            a: value,
            b: zero,
            op,
            scale_a: identity,
            scale_b: identity,
        })
    }

    /// An activation, or an integer at scale 1, for comparing.
    fn comparable(&mut self, value: ValueId) -> Result<(PlanValue, f64), String> {
        match self.operand(value)? {
            Quantized::Activation { value, scale } => Ok((value, scale)),
            Quantized::Integer { value } => Ok((value, 1.0)),
            _ => Err("cannot compare this operand".into()),
        }
    }

    /// Rows of a constant table become an `Embedding` with int8 rows; anything else a `Gather`.
    fn gather(&mut self, data: ValueId, indices: ValueId, axis: usize, output: ValueId) -> Result<Quantized, String> {
        let indices = self.integer(indices)?;
        if let Some(Quantized::Constant(table)) = self.quantized[data].clone()
            && table.dtype() == DType::Float32
            && table.shape().len() == 2
            && axis == 0
        {
            let (rows, width) = (table.shape()[0], table.shape()[1]);
            let values = f32_data(&table);
            // The output's scale fits the whole table, not just the rows calibration picked.
            let amax = values.iter().fold(0f64, |m, x| m.max(x.abs()));
            let scale_y = activation_scale(amax.max(self.ranges.amax[output]));
            let row_vectors: Vec<Vec<f64>> = values.chunks(width.max(1)).map(<[f64]>::to_vec).collect();
            // Each row to int8 with its own scale; the "input" scale is 1 and there is no bias.
            let channels = quantize_channels(&row_vectors, &vec![0.0; rows], 1.0, scale_y);
            let value = self.push(Instr::Embedding {
                indices,
                rows: rows as u32,
                width: width as u32,
                table: channels.weights,
                requant: channels.requant,
            });
            return Ok(Quantized::Activation { value, scale: scale_y });
        }
        self.reshaping(data, |input| Instr::Gather {
            input,
            indices,
            axis: axis as u32,
        })
    }

    /// Joins integers as they are, or activations at the coarsest of their scales (which none of
    /// them saturates).
    fn concat(&mut self, inputs: &[ValueId], axis: usize) -> Result<Quantized, String> {
        let operands = inputs.iter().map(|v| self.operand(*v)).collect::<Result<Vec<_>, _>>()?;
        if operands.iter().all(|q| matches!(q, Quantized::Integer { .. })) {
            let inputs = operands
                .iter()
                .filter_map(|q| match q {
                    Quantized::Integer { value } => Some(*value),
                    _ => None,
                })
                .collect();
            let value = self.push(Instr::Concat {
                inputs,
                axis: axis as u32,
            });
            return Ok(Quantized::Integer { value });
        }
        let activations: Vec<(PlanValue, f64)> = operands
            .iter()
            .map(|q| match q {
                Quantized::Activation { value, scale } => Ok((*value, *scale)),
                _ => Err("cannot join integers and floats".to_owned()),
            })
            .collect::<Result<_, _>>()?;
        let scale = activations.iter().fold(0f64, |m, (_, s)| m.max(*s));
        let inputs = activations
            .iter()
            .map(|(value, from)| self.rescaled(*value, *from, scale))
            .collect();
        let value = self.push(Instr::Concat {
            inputs,
            axis: axis as u32,
        });
        Ok(Quantized::Activation { value, scale })
    }

    fn cast(&mut self, input: ValueId, to: DType, output: ValueId) -> Result<Quantized, String> {
        match (self.operand(input)?, to) {
            (Quantized::Integer { value }, DType::Bool) => Ok(Quantized::Integer {
                value: self.compare_with_zero(value, CompareOp::Ne),
            }),
            (Quantized::Integer { value }, DType::Int64 | DType::Int32) => Ok(Quantized::Integer { value }),
            (Quantized::Integer { value }, DType::Float32) => {
                let scale = self.scale_of(output);
                let value = self.rescaled(value, 1.0, scale);
                Ok(Quantized::Activation { value, scale })
            }
            (Quantized::Activation { value, scale }, DType::Float32) => Ok(Quantized::Activation { value, scale }),
            (_, to) => Err(format!("this cast to {to:?} is not supported by the exact engine")),
        }
    }

    /// `cond ? a : b`. Activations meet at the output's scale, widened to each computed branch's
    /// own so that passing a value through never saturates it.
    fn select(&mut self, cond: ValueId, a: ValueId, b: ValueId, output: ValueId) -> Result<Quantized, String> {
        let cond = self.integer(cond)?;
        // Whether a branch is a constant is a fact of the graph, whatever the builder has placed.
        let (a_computed, b_computed) = (self.graph.constant(a).is_none(), self.graph.constant(b).is_none());
        match (self.operand(a)?, self.operand(b)?) {
            (Quantized::Integer { value: a }, Quantized::Integer { value: b }) => {
                let value = self.push(Instr::Where { cond, a, b });
                Ok(Quantized::Integer { value })
            }
            (Quantized::Activation { value: a, scale: sa }, Quantized::Activation { value: b, scale: sb }) => {
                let mut scale = self.scale_of(output);
                if a_computed {
                    scale = scale.max(sa);
                }
                if b_computed {
                    scale = scale.max(sb);
                }
                let a = self.rescaled(a, sa, scale);
                let b = self.rescaled(b, sb, scale);
                let value = self.push(Instr::Where { cond, a, b });
                Ok(Quantized::Activation { value, scale })
            }
            _ => Err("cannot choose between an integer and a float".into()),
        }
    }

    /// RMS normalization: with `q` at scale `s` along an axis of `n`, `mean(x^2) + eps` is
    /// `s^2 / n * (sum q^2 + n * eps / s^2)`, so the plan adds `epsilon = n * eps / s^2` to the
    /// sum of squares and folds `sqrt(n)` into the requantization.
    fn rms_norm(&mut self, input: ValueId, axis: usize, eps: f32, output: ValueId) -> Result<Quantized, String> {
        let n = match self.graph.values[input].shape.get(axis) {
            Some(DimFact::Fixed(n)) if *n > 0 => *n as f64,
            _ => return Err("normalization over an axis of unknown size is not supported".into()),
        };
        let (value, scale) = self.activation(input)?;
        let scale_y = self.scale_of(output);
        let epsilon = (n * f64::from(eps) / (scale * scale))
            .round()
            .clamp(0.0, (1u64 << 62) as f64) as u64;
        let value = self.push(Instr::RmsNorm {
            input: value,
            axis: axis as u32,
            epsilon,
            requant: Multiplier::from_f64(n.sqrt() / (scale_y * (1u64 << 46) as f64)),
        });
        Ok(Quantized::Activation { value, scale: scale_y })
    }

    /// Moves the axes of a value from the order `from` (one letter each) to `to`.
    fn permute(&mut self, mut value: PlanValue, from: &[char], to: &[char]) -> PlanValue {
        let mut current = from.to_vec();
        for (position, axis) in to.iter().enumerate() {
            let at = current.iter().position(|c| c == axis).unwrap_or(position);
            if at != position {
                value = self.push(Instr::MoveAxis {
                    input: value,
                    from: at as u32,
                    to: position as u32,
                });
                let moved = current.remove(at);
                current.insert(position, moved);
            }
        }
        value
    }

    /// A product of two activations (attention): both are laid out as `[batch.., m, k]` and
    /// `[batch.., n, k]`, multiplied by one `MatMul`, and the result moved to the einsum's order.
    fn activation_product(
        &mut self,
        index: usize,
        a_axes: &str,
        b_axes: &str,
        out_axes: &str,
    ) -> Result<Quantized, String> {
        let node = &self.graph.nodes[index];
        let (a_chars, b_chars, out_chars): (Vec<char>, Vec<char>, Vec<char>) = (
            a_axes.chars().collect(),
            b_axes.chars().collect(),
            out_axes.chars().collect(),
        );
        let unsupported = || format!("einsum {a_axes},{b_axes}->{out_axes} of two computed values is not supported");
        let batch: Vec<char> = out_chars
            .iter()
            .copied()
            .filter(|c| a_chars.contains(c) && b_chars.contains(c))
            .collect();
        let only = |side: &[char], other: &[char]| -> Vec<char> {
            side.iter()
                .copied()
                .filter(|c| out_chars.contains(c) && !other.contains(c))
                .collect()
        };
        let (m_axes, n_axes) = (only(&a_chars, &b_chars), only(&b_chars, &a_chars));
        let k_axes: Vec<char> = a_chars
            .iter()
            .copied()
            .filter(|c| b_chars.contains(c) && !out_chars.contains(c))
            .collect();
        let ([m], [n], [k]) = (&m_axes[..], &n_axes[..], &k_axes[..]) else {
            return Err(unsupported());
        };
        let covered = |side: &[char]| side.len() == batch.len() + 2;
        if !covered(&a_chars) || !covered(&b_chars) || out_chars.len() != batch.len() + 2 {
            return Err(unsupported());
        }
        let (a, sa) = self.activation(node.inputs[0])?;
        let (b, sb) = self.activation(node.inputs[1])?;
        let a_order: Vec<char> = batch.iter().copied().chain([*m, *k]).collect();
        let b_order: Vec<char> = batch.iter().copied().chain([*n, *k]).collect();
        let a = self.permute(a, &a_chars, &a_order);
        let b = self.permute(b, &b_chars, &b_order);
        let scale = self.scale_of(node.output);
        let product = self.push(Instr::MatMul {
            a,
            b,
            requant: Multiplier::from_f64(sa * sb / scale),
        });
        let product_order: Vec<char> = batch.iter().copied().chain([*m, *n]).collect();
        let value = self.permute(product, &product_order, &out_chars);
        Ok(Quantized::Activation { value, scale })
    }

    /// A convolution with constant weights (input 1) and bias (input 2).
    fn conv(&mut self, index: usize, window: &Window, group: usize) -> Result<Quantized, String> {
        let graph = self.graph;
        let node = &graph.nodes[index];
        let Some(Quantized::Constant(kernel)) = self.quantized[node.inputs[1]].clone() else {
            return Err("convolution weights that are not constant are not supported".into());
        };
        let shape = kernel.shape();
        if shape.len() != window.kernel.len() + 2 || shape[2..] != window.kernel[..] || group == 0 {
            return Err(format!("kernel of shape {shape:?} does not match the window"));
        }
        let (c_out, cig) = (shape[0], shape[1]);
        if !c_out.is_multiple_of(group) {
            return Err(format!("{c_out} output channels do not divide into {group} groups"));
        }
        let bias = match node.inputs.get(2) {
            None => vec![0.0; c_out],
            Some(b) => match &self.quantized[*b] {
                Some(Quantized::Constant(b)) if b.len() == c_out => f32_data(b),
                Some(Quantized::Constant(b)) if b.len() == 1 => vec![f32_data(b)[0]; c_out],
                _ => return Err("a bias that is not one constant per output channel is not supported".into()),
            },
        };
        let row = kernel.len() / c_out.max(1);
        let w_data = f32_data(&kernel);
        let rows: Vec<Vec<f64>> = w_data.chunks(row.max(1)).map(<[f64]>::to_vec).collect();
        let (input, scale_x) = self.activation(node.inputs[0])?;
        let scale_y = self.scale_of(node.output);
        let channels = quantize_channels(&rows, &bias, scale_x, scale_y);
        let value = self.push(Instr::Conv {
            input,
            window: window.clone(),
            group: group as u32,
            c_in: (cig * group) as u32,
            c_out: c_out as u32,
            weights: channels.weights,
            bias: channels.bias,
            requant: channels.requant,
            low: -ACTIVATION_MAX as i32,
            high: ACTIVATION_MAX as i32,
        });
        Ok(Quantized::Activation { value, scale: scale_y })
    }

    /// A product with a constant 2-D operand becomes one `Dense`, with a following bias add folded in.
    fn einsum(&mut self, index: usize, expr: &str) -> Result<Quantized, String> {
        let graph = self.graph;
        let node = &graph.nodes[index];
        let parse = || -> Option<(String, String, String)> {
            let (ins, out) = expr.split_once("->")?;
            let (a, b) = ins.split_once(',')?;
            Some((a.to_owned(), b.to_owned(), out.to_owned()))
        };
        let (a_axes, b_axes, out_axes) = parse().ok_or_else(|| format!("cannot read einsum expression {expr}"))?;
        let (act, weights_value, act_axes, w_axes) =
            match (&self.quantized[node.inputs[0]], &self.quantized[node.inputs[1]]) {
                (_, Some(Quantized::Constant(_))) => (node.inputs[0], node.inputs[1], a_axes, b_axes),
                (Some(Quantized::Constant(_)), _) => (node.inputs[1], node.inputs[0], b_axes, a_axes),
                _ => return self.activation_product(index, &a_axes, &b_axes, &out_axes),
            };
        let Some(Quantized::Constant(w)) = self.quantized[weights_value].clone() else {
            return Err("weights are not constant".into());
        };
        // The activation's contracted axes must be its last ones; the weights hold those axes
        // (in any order) and one output axis `n`.
        let w_chars: Vec<char> = w_axes.chars().collect();
        let contracted: Vec<char> = act_axes.chars().filter(|c| !out_axes.contains(*c)).collect();
        let n_axes: Vec<char> = w_chars.iter().copied().filter(|c| !contracted.contains(c)).collect();
        let [n_axis] = n_axes[..] else {
            return Err(format!("einsum {expr}: the weights must have exactly one output axis"));
        };
        let kept = act_axes.len() - contracted.len();
        let trailing = act_axes.chars().skip(kept).eq(contracted.iter().copied());
        if contracted.is_empty() || !trailing || w_chars.len() != contracted.len() + 1 {
            return Err(format!(
                "einsum {expr}: the contracted axes must be the last of the activation and all in the weights"
            ));
        }
        let expected_out: String = act_axes.chars().take(kept).chain(std::iter::once(n_axis)).collect();
        if out_axes != expected_out {
            return Err(format!(
                "einsum {expr}: output axes must be the activation's, then the weights'"
            ));
        }
        let w_shape = w.shape();
        let position = |axis: char| w_chars.iter().position(|c| *c == axis).unwrap_or(0);
        let mut w_strides = vec![1usize; w_shape.len()];
        for axis in (0..w_shape.len().saturating_sub(1)).rev() {
            w_strides[axis] = w_strides[axis + 1] * w_shape[axis + 1];
        }
        let k_dims: Vec<usize> = contracted.iter().map(|c| w_shape[position(*c)]).collect();
        let k_strides: Vec<usize> = contracted.iter().map(|c| w_strides[position(*c)]).collect();
        let k: usize = k_dims.iter().product();
        let (n, n_stride) = (w_shape[position(n_axis)], w_strides[position(n_axis)]);
        let w_data = f32_data(&w);
        // Element `kk` of the flattened contracted axes (activation order) for output `j`.
        let weight = |j: usize, kk: usize| {
            let mut rest = kk;
            let mut offset = j * n_stride;
            for (dim, stride) in k_dims.iter().zip(&k_strides).rev() {
                offset += (rest % dim) * stride;
                rest /= dim;
            }
            w_data[offset]
        };

        // A bias: the only reader is an Add with a constant that varies along the last axis only.
        let mut output = node.output;
        let mut bias = vec![0f64; n];
        if let [reader] = self.readers[node.output][..] {
            let add = &graph.nodes[reader];
            if matches!(add.op, Op::Binary(BinaryOp::Add)) && !graph.outputs.contains(&node.output) {
                let other = if add.inputs[0] == node.output {
                    add.inputs[1]
                } else {
                    add.inputs[0]
                };
                if let Some(Quantized::Constant(b)) = &self.quantized[other] {
                    let shape = b.shape();
                    let along_last =
                        shape.last().copied() == Some(n) && shape[..shape.len() - 1].iter().all(|d| *d == 1);
                    if along_last && b.dtype() == DType::Float32 && add.inputs[0] != add.inputs[1] {
                        bias = f32_data(b);
                        output = add.output;
                    }
                }
            }
        }
        let (mut input, scale_x) = self.activation(act)?;
        if contracted.len() > 1 {
            // Several contracted axes: flatten them into one, which is what `Dense` contracts.
            input = self.push(Instr::Reshape {
                input,
                at: kept as u32,
                from_rank: contracted.len() as u32,
                to: vec![k as u64],
            });
        }
        let scale_y = self.scale_of(output);
        let rows: Vec<Vec<f64>> = (0..n).map(|j| (0..k).map(|kk| weight(j, kk)).collect()).collect();
        let channels = quantize_channels(&rows, &bias, scale_x, scale_y);
        let value = self.push(Instr::Dense {
            input,
            k: k as u32,
            n: n as u32,
            weights: channels.weights,
            bias: channels.bias,
            requant: channels.requant,
            low: -ACTIVATION_MAX as i32,
            high: ACTIVATION_MAX as i32,
        });
        let quantized = Quantized::Activation { value, scale: scale_y };
        if output != node.output {
            self.quantized[node.output] = Some(Quantized::Fused);
            self.quantized[output] = Some(quantized.clone());
        }
        Ok(quantized)
    }
}

/// Weights quantized per output channel, with biases and requantization to match.
struct Channels {
    weights: Vec<i8>,
    bias: Vec<i64>,
    requant: Vec<Multiplier>,
}

/// Quantizes one row of weights per output channel to int8 with its own scale; the bias goes to
/// the accumulator's scale (`scale_x * scale_w`) and the requantization from there to `scale_y`.
fn quantize_channels(rows: &[Vec<f64>], bias: &[f64], scale_x: f64, scale_y: f64) -> Channels {
    let mut channels = Channels {
        weights: Vec::with_capacity(rows.iter().map(Vec::len).sum()),
        bias: Vec::with_capacity(rows.len()),
        requant: Vec::with_capacity(rows.len()),
    };
    for (row, b) in rows.iter().zip(bias) {
        let amax = row.iter().fold(0f64, |m, w| m.max(w.abs()));
        let scale_w = if amax > 0.0 { amax / f64::from(WEIGHT_MAX) } else { 1.0 };
        channels.weights.extend(
            row.iter()
                .map(|w| round_saturate(w / scale_w, i64::from(WEIGHT_MAX)) as i8),
        );
        let accumulator = scale_x * scale_w;
        channels.bias.push(round_saturate(b / accumulator, i64::MAX / 4));
        channels.requant.push(Multiplier::from_f64(accumulator / scale_y));
    }
    channels
}

/// The lookup table of `f` from input scale to output scale.
fn lookup_table(op: UnaryOp, in_scale: f64, out_scale: f64) -> Vec<i32> {
    (-ACTIVATION_MAX..=ACTIVATION_MAX)
        .map(|q| round_saturate(op.eval(q as f64 * in_scale) / out_scale, ACTIVATION_MAX) as i32)
        .collect()
}
