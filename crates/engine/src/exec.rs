//! Executes an exact plan with integers only.
//!
//! Every kernel computes exact integer sums, so the order in which a kernel adds (threads, SIMD
//! lanes, blocking) cannot change a single bit; [`ExecOptions`] picks between kernels that add in
//! different orders, and the exactness tests check they agree.

mod indexing;
mod kernels;
mod rows;

use std::collections::HashMap;

use vouch_tensor::{DType, NamedTensor, Tensor, TensorData};

use crate::fixed::{ACTIVATION_MAX, Multiplier, div_round, quantize_f32_bits, quantize_f32_slice, saturate};
use crate::plan::{InputKind, Instr, OutputKind, Plan, PlanDim, Window};
use kernels::{GatherMap, Lanes, PairedRows, Panels, Rescale, product_sums};

/// Entries of a lookup table: one for each activation from -32767 to 32767.
pub const LOOKUP_ENTRIES: usize = 2 * ACTIVATION_MAX as usize + 1;

/// Below about a quarter of a million products, starting a thread costs more than it saves.
const THREAD_WORTHY_PRODUCTS: usize = 1 << 18;

/// A tensor of the exact plan: `i32` elements, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ITensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: Vec<i32>,
}

impl ITensor {
    /// The bytes the trace commits to: rank, dimensions (`u64` LE), elements (`i32` LE).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 * self.shape.len() + 4 * self.data.len());
        out.push(self.shape.len() as u8);
        for dim in &self.shape {
            out.extend_from_slice(&(*dim as u64).to_le_bytes());
        }
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// How to run a plan. Every choice gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOptions {
    /// Threads: for blocks of batch rows when the plan keeps rows apart, else for the large
    /// kernels (1 runs everything on the caller's thread).
    pub threads: usize,
    /// Use the register-blocked product kernels (AVX2 when the CPU has it, chosen at run time,
    /// else portable code the compiler vectorizes), input quantization over whole tensors and
    /// pooling over all planes at once; `false` uses plain one-product-at-a-time loops that add
    /// in a different order, and quantizes and pools value by value and window by window: the
    /// reference the fast paths must equal bit for bit.
    pub simd: bool,
    /// Most elements any one value may have (broadcasting can multiply sizes).
    pub max_elements: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            simd: true,
            max_elements: 1 << 28,
        }
    }
}

/// Errors from executing a plan.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// An input is missing, unknown, or of the wrong type or shape.
    #[error("input '{name}': {reason}")]
    Input {
        /// The input's name.
        name: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// An instruction cannot run on the shapes it was given.
    #[error("instruction {index} ({op}): {reason}")]
    Instr {
        /// The instruction's index.
        index: usize,
        /// Its name.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The result of running a plan: every value (the trace) and the outputs for the caller.
#[derive(Debug, Clone)]
pub struct Execution {
    /// Every value of the plan, inputs first.
    pub values: Vec<ITensor>,
    /// The outputs, dequantized, in the plan's order.
    pub outputs: Vec<NamedTensor>,
}

/// Runs a plan on named inputs. With several threads, a batch whose plan keeps its rows apart
/// is cut into one block of rows per thread (see the `rows` module); otherwise the large kernels
/// share the threads.
pub fn execute(plan: &Plan, inputs: &[NamedTensor], options: &ExecOptions) -> Result<Execution, ExecError> {
    let mut values = bind_inputs(plan, inputs, options.simd)?;
    match rows::run_in_row_blocks(plan, &values, options) {
        Some(computed) => values.extend(computed),
        None => run_undivided(plan, &mut values, options)?,
    }
    let outputs = plan
        .outputs
        .iter()
        .map(|output| {
            let value = &values[output.value as usize];
            let data = match output.kind {
                OutputKind::Dequantized { scale_bits } => {
                    let scale = f32::from_bits(scale_bits);
                    // One IEEE-754 multiplication of an exactly representable integer: correctly
                    // rounded, so identical on every conforming machine.
                    TensorData::F32(value.data.iter().map(|q| *q as f32 * scale).collect())
                }
                OutputKind::Integer => TensorData::I64(value.data.iter().map(|q| i64::from(*q)).collect()),
                OutputKind::Boolean => TensorData::Bool(value.data.iter().map(|q| *q != 0).collect()),
            };
            Tensor::new(value.shape.clone(), data)
                .map(|tensor| NamedTensor {
                    name: Some(output.name.clone()),
                    tensor,
                })
                .map_err(|e| ExecError::Input {
                    name: output.name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Execution { values, outputs })
}

/// Runs every instruction of `plan` in order on one batch, appending each value to `values`
/// (which start with the bound inputs).
fn run_undivided(plan: &Plan, values: &mut Vec<ITensor>, options: &ExecOptions) -> Result<(), ExecError> {
    for (index, instr) in plan.instrs.iter().enumerate() {
        let operands: Vec<&ITensor> = instr.inputs().iter().map(|v| &values[*v as usize]).collect();
        let value = run_instr(instr, &operands, options).map_err(|reason| ExecError::Instr {
            index,
            op: instr.name(),
            reason,
        })?;
        values.push(value);
    }
    Ok(())
}

/// Re-executes one instruction from its operands: the step a dispute settles.
pub fn execute_instr(
    plan: &Plan,
    index: usize,
    operands: &[&ITensor],
    options: &ExecOptions,
) -> Result<ITensor, ExecError> {
    let instr = plan.instrs.get(index).ok_or_else(|| ExecError::Instr {
        index,
        op: "?",
        reason: format!("the plan has {} instructions", plan.instrs.len()),
    })?;
    let error = |reason: String| ExecError::Instr {
        index,
        op: instr.name(),
        reason,
    };
    if operands.len() != instr.inputs().len() {
        return Err(error(format!(
            "needs {} operands, got {}",
            instr.inputs().len(),
            operands.len()
        )));
    }
    run_instr(instr, operands, options).map_err(error)
}

/// What a model expects of one input: the checks both paths make before running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// The input's name.
    pub name: String,
    /// Its element type (`int64` also accepts `int32`).
    pub dtype: DType,
    /// Its shape; symbols must agree across inputs.
    pub shape: Vec<PlanDim>,
}

impl InputSpec {
    fn describe(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| match d {
                PlanDim::Fixed(n) => n.to_string(),
                PlanDim::Symbol(s) => s.clone(),
            })
            .collect();
        format!("{} [{}]", vouch_tensor::dtype_name(self.dtype), dims.join(", "))
    }
}

/// Matches named tensors to a model's inputs (an unnamed tensor fits a model with one input) and
/// checks each one's type and shape, naming the input and what was expected when they differ.
pub fn match_inputs<'a>(specs: &[InputSpec], inputs: &'a [NamedTensor]) -> Result<Vec<&'a Tensor>, ExecError> {
    let expected = || {
        specs
            .iter()
            .map(|i| format!("'{}' {}", i.name, i.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unnamed_single = specs.len() == 1 && inputs.len() == 1 && inputs[0].name.is_none();
    for given in inputs {
        match &given.name {
            Some(name) if !specs.iter().any(|i| &i.name == name) => {
                return Err(ExecError::Input {
                    name: name.clone(),
                    reason: format!("the model has no such input; it takes {}", expected()),
                });
            }
            None if !unnamed_single => {
                return Err(ExecError::Input {
                    name: "(unnamed)".into(),
                    reason: format!(
                        "an unnamed tensor fits only a model with one input; this one takes {}",
                        expected()
                    ),
                });
            }
            _ => {}
        }
    }
    let mut symbols: HashMap<&str, usize> = HashMap::new();
    let mut bound = Vec::with_capacity(specs.len());
    for spec in specs {
        let error = |reason: String| ExecError::Input {
            name: spec.name.clone(),
            reason,
        };
        let given = if unnamed_single {
            &inputs[0]
        } else {
            inputs
                .iter()
                .find(|t| t.name.as_deref() == Some(spec.name.as_str()))
                .ok_or_else(|| error(format!("missing; expected {}", spec.describe())))?
        };
        let tensor = &given.tensor;
        let dtype_ok = tensor.dtype() == spec.dtype || (spec.dtype == DType::Int64 && tensor.dtype() == DType::Int32);
        if !dtype_ok {
            return Err(error(format!(
                "has type {}, expected {}",
                vouch_tensor::dtype_name(tensor.dtype()),
                spec.describe()
            )));
        }
        let shape_ok = tensor.shape().len() == spec.shape.len()
            && tensor.shape().iter().zip(&spec.shape).all(|(dim, want)| match want {
                PlanDim::Fixed(n) => *dim as u64 == *n,
                PlanDim::Symbol(s) => *symbols.entry(s.as_str()).or_insert(*dim) == *dim,
            });
        if !shape_ok {
            return Err(error(format!(
                "has shape {:?}, expected {}",
                tensor.shape(),
                spec.describe()
            )));
        }
        bound.push(tensor);
    }
    Ok(bound)
}

/// The checks a plan makes of its inputs.
pub fn plan_input_specs(plan: &Plan) -> Vec<InputSpec> {
    plan.inputs
        .iter()
        .map(|input| InputSpec {
            name: input.name.clone(),
            dtype: match input.kind {
                InputKind::Quantized { .. } => DType::Float32,
                InputKind::Integer => DType::Int64,
                InputKind::Boolean => DType::Bool,
            },
            shape: input.shape.clone(),
        })
        .collect()
}

/// Matches named tensors to the plan's inputs and converts them to integers.
/// The plan's inputs as integers: float inputs quantized over the whole tensor at once when
/// `whole_tensors`, else value by value (the same integers).
fn bind_inputs(plan: &Plan, inputs: &[NamedTensor], whole_tensors: bool) -> Result<Vec<ITensor>, ExecError> {
    let bound = match_inputs(&plan_input_specs(plan), inputs)?;
    let mut values = Vec::with_capacity(plan.value_count());
    for (spec, tensor) in plan.inputs.iter().zip(bound) {
        let error = |reason: String| ExecError::Input {
            name: spec.name.clone(),
            reason,
        };
        let data = match (spec.kind, tensor.data()) {
            (InputKind::Quantized { inverse_scale }, TensorData::F32(xs)) => {
                if let Some(i) = xs.iter().position(|x| x.is_nan()) {
                    return Err(error(format!("element {i} is NaN")));
                }
                match whole_tensors {
                    true => quantize_f32_slice(xs, inverse_scale),
                    false => xs
                        .iter()
                        .map(|x| quantize_f32_bits(x.to_bits(), inverse_scale))
                        .collect(),
                }
            }
            (InputKind::Integer, TensorData::I64(xs)) => xs
                .iter()
                .map(|x| i32::try_from(*x).map_err(|_| error(format!("element {x} does not fit in 32 bits"))))
                .collect::<Result<_, _>>()?,
            (InputKind::Integer, TensorData::I32(xs)) => xs.clone(),
            (InputKind::Boolean, TensorData::Bool(xs)) => xs.iter().map(|x| i32::from(*x)).collect(),
            (_, data) => return Err(error(format!("cannot take {data:?}"))),
        };
        values.push(ITensor {
            shape: tensor.shape().to_vec(),
            data,
        });
    }
    Ok(values)
}

fn element_count(shape: &[usize], options: &ExecOptions) -> Result<usize, String> {
    Ok(crate::moves::element_count(shape, options.max_elements)?)
}

fn run_instr(instr: &Instr, operands: &[&ITensor], options: &ExecOptions) -> Result<ITensor, String> {
    match instr {
        Instr::Const { shape, data } => {
            let shape: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
            if element_count(&shape, options)? != data.len() {
                return Err("constant data does not fill its shape".into());
            }
            Ok(ITensor {
                shape,
                data: data.clone(),
            })
        }
        Instr::Dense {
            k,
            n,
            weights,
            bias,
            requant,
            low,
            high,
            ..
        } => dense(
            operands[0],
            *k as usize,
            *n as usize,
            &Channels::new(weights, bias, requant, *low, *high)?,
            options,
        ),
        Instr::AddSub {
            scale_a,
            scale_b,
            subtract,
            ..
        } => broadcast(operands[0], operands[1], options, |a, b| {
            let (a, b) = (scale_a.apply(i64::from(a)), scale_b.apply(i64::from(b)));
            saturate(if *subtract { a - b } else { a + b })
        }),
        Instr::Mul { requant, .. } => broadcast(operands[0], operands[1], options, |a, b| {
            saturate(requant.apply(i64::from(a) * i64::from(b)))
        }),
        Instr::Clamp { low, high, .. } => {
            if low > high {
                return Err("clamp bounds are reversed".into());
            }
            let x = operands[0];
            Ok(ITensor {
                shape: x.shape.clone(),
                // `max` then `min` (not `clamp`, whose check stays in the loop) vectorizes.
                data: x.data.iter().map(|v| (*v).max(*low).min(*high)).collect(),
            })
        }
        Instr::Lookup { table, .. } => {
            let x = operands[0];
            let data = x
                .data
                .iter()
                .map(|v| {
                    let index = i64::from(*v) + ACTIVATION_MAX;
                    usize::try_from(index)
                        .ok()
                        .and_then(|i| table.get(i).copied())
                        .ok_or_else(|| format!("{v} is outside the table"))
                })
                .collect::<Result<_, _>>()?;
            Ok(ITensor {
                shape: x.shape.clone(),
                data,
            })
        }
        Instr::Softmax {
            axis,
            exp_table,
            masked,
            ..
        } => softmax(operands[0], *axis as usize, exp_table, *masked),
        Instr::AddAxis { axis, .. } => {
            let x = operands[0];
            let axis = *axis as usize;
            if axis > x.shape.len() {
                return Err(format!("axis {axis} is past rank {}", x.shape.len()));
            }
            let mut shape = x.shape.clone();
            shape.insert(axis, 1);
            Ok(ITensor {
                shape,
                data: x.data.clone(),
            })
        }
        Instr::RemoveAxis { axis, .. } => {
            let x = operands[0];
            let axis = *axis as usize;
            if x.shape.get(axis) != Some(&1) {
                return Err(format!("axis {axis} of shape {:?} is not of size 1", x.shape));
            }
            let mut shape = x.shape.clone();
            shape.remove(axis);
            Ok(ITensor {
                shape,
                data: x.data.clone(),
            })
        }
        Instr::MoveAxis { from, to, .. } => move_axis(operands[0], *from as usize, *to as usize),
        Instr::Reshape { at, from_rank, to, .. } => reshape(operands[0], *at as usize, *from_rank as usize, to),
        Instr::Conv {
            window,
            group,
            c_in,
            c_out,
            weights,
            bias,
            requant,
            low,
            high,
            ..
        } => conv(
            operands[0],
            &ConvWeights {
                window,
                group: *group as usize,
                c_in: *c_in as usize,
                c_out: *c_out as usize,
                channels: Channels::new(weights, bias, requant, *low, *high)?,
            },
            options,
        ),
        Instr::MaxPool { window, .. } => pool(operands[0], window, None, options),
        Instr::AvgPool {
            window,
            count_include_pad,
            ..
        } => pool(operands[0], window, Some(*count_include_pad), options),
        Instr::ReduceSum {
            axes,
            requant,
            squares: false,
            ..
        } => reduce(operands[0], axes, options, |values| {
            saturate(requant.apply(values.map(i64::from).sum()))
        }),
        Instr::ReduceSum {
            axes,
            requant,
            squares: true,
            ..
        } => {
            // Squares of activations stay below 2^30 each; other integers are refused.
            product_operands(&operands[0].data)?;
            reduce(operands[0], axes, options, |values| {
                saturate(requant.apply(values.map(|v| i64::from(v) * i64::from(v)).sum()))
            })
        }
        Instr::ReduceMinMax { axes, max, .. } => reduce(operands[0], axes, options, |values| {
            let extreme = if *max { values.max() } else { values.min() };
            extreme.unwrap_or(0)
        }),
        Instr::Dim { axis, .. } => indexing::dim(operands[0], *axis),
        Instr::Gather { axis, .. } => indexing::gather(operands[0], operands[1], *axis, options),
        Instr::Embedding {
            rows,
            width,
            table,
            requant,
            ..
        } => indexing::embedding(
            operands[0],
            &indexing::EmbeddingTable {
                rows: *rows as usize,
                width: *width as usize,
                table,
                requant,
            },
            options,
        ),
        Instr::GatherNd { .. } => indexing::gather_nd(operands[0], operands[1], options),
        Instr::Concat { axis, .. } => indexing::concat(operands, *axis, options),
        Instr::Slice { axis, .. } => indexing::slice(
            operands[0],
            *axis,
            indexing::scalar(operands[1], "a slice's start")?,
            indexing::scalar(operands[2], "a slice's end")?,
        ),
        Instr::Range { .. } => indexing::range(
            indexing::scalar(operands[0], "a range's start")?,
            indexing::scalar(operands[1], "a range's end")?,
            indexing::scalar(operands[2], "a range's step")?,
            options,
        ),
        Instr::Expand { .. } => indexing::expand(operands[0], operands[1], options),
        Instr::Rescale { factor, .. } => {
            let x = operands[0];
            Ok(ITensor {
                shape: x.shape.clone(),
                data: x.data.iter().map(|v| saturate(factor.apply(i64::from(*v)))).collect(),
            })
        }
        Instr::Where { .. } => indexing::select(operands[0], operands[1], operands[2], options),
        Instr::Compare {
            op, scale_a, scale_b, ..
        } => indexing::compare(operands[0], operands[1], *op, (*scale_a, *scale_b), options),
        Instr::Logic { op, .. } => indexing::logic(operands[0], operands[1], *op, options),
        Instr::RmsNorm {
            axis, epsilon, requant, ..
        } => rms_norm(operands[0], *axis as usize, *epsilon, *requant),
        Instr::MatMul { requant, .. } => matmul(operands[0], operands[1], *requant, options),
    }
}

/// Marks a kernel tap that falls in the padding.
const PADDING: usize = usize::MAX;

/// Where a window slides over `[batch, channels, spatial..]` data.
struct Geometry {
    /// Input positions per channel (the product of the spatial dimensions).
    in_positions: usize,
    /// Output spatial dimensions.
    out_spatial: Vec<usize>,
    /// Output positions per channel.
    out_positions: usize,
    /// Taps of the kernel.
    taps: usize,
    /// For output position `p` and tap `t`, at `p * taps + t`: the input position read, or
    /// [`PADDING`].
    reads: Vec<usize>,
}

/// The window's geometry over data of `shape`; the table of reads only `with_reads` (a stride-1
/// convolution does without it).
fn geometry(shape: &[usize], window: &Window, options: &ExecOptions, with_reads: bool) -> Result<Geometry, String> {
    let rank = window.kernel.len();
    if shape.len() != rank + 2 {
        return Err(format!(
            "data of shape {shape:?} does not have 2 + {rank} axes for a {rank}-D window"
        ));
    }
    let consistent = [
        &window.strides,
        &window.dilations,
        &window.pads_before,
        &window.pads_after,
    ]
    .iter()
    .all(|v| v.len() == rank)
        && [&window.kernel, &window.strides, &window.dilations]
            .iter()
            .all(|v| v.iter().all(|x| *x >= 1));
    if !consistent {
        return Err("the window's kernel, strides, dilations and padding disagree".into());
    }
    let spatial = &shape[2..];
    let mut out_spatial = Vec::with_capacity(rank);
    for (axis, size) in spatial.iter().enumerate() {
        let padded = size + window.pads_before[axis] + window.pads_after[axis];
        let span = window.dilations[axis] * (window.kernel[axis] - 1) + 1;
        if padded < span {
            return Err(format!(
                "spatial axis {axis} of size {size} (padded to {padded}) is smaller than the window's span of {span}"
            ));
        }
        out_spatial.push((padded - span) / window.strides[axis] + 1);
    }
    let out_positions = element_count(&out_spatial, options)?;
    let taps = element_count(&window.kernel, options)?;
    element_count(&[out_positions, taps], options)?;
    let in_positions: usize = spatial.iter().product();
    let mut reads = Vec::with_capacity(if with_reads { out_positions * taps } else { 0 });
    let mut out_index = vec![0usize; rank];
    for _ in 0..if with_reads { out_positions } else { 0 } {
        let mut tap = vec![0usize; rank];
        for _ in 0..taps {
            let mut position = 0usize;
            let mut inside = true;
            for axis in 0..rank {
                let coordinate = (out_index[axis] * window.strides[axis] + tap[axis] * window.dilations[axis])
                    .checked_sub(window.pads_before[axis])
                    .filter(|c| *c < spatial[axis]);
                match coordinate {
                    Some(c) => position = position * spatial[axis] + c,
                    None => inside = false,
                }
            }
            reads.push(if inside { position } else { PADDING });
            increment(&mut tap, &window.kernel);
        }
        increment(&mut out_index, &out_spatial);
    }
    Ok(Geometry {
        in_positions,
        out_spatial,
        out_positions,
        taps,
        reads,
    })
}

/// Advances a row-major multi-index within `dims`.
fn increment(index: &mut [usize], dims: &[usize]) {
    for axis in (0..index.len()).rev() {
        index[axis] += 1;
        if index[axis] < dims[axis] {
            return;
        }
        index[axis] = 0;
    }
}

/// A product layer's constants: int8 weights, a bias and a requantization per output channel,
/// and the range its outputs are clamped to.
#[derive(Clone, Copy)]
struct Channels<'a> {
    weights: &'a [i8],
    bias: &'a [i64],
    requant: &'a [Multiplier],
    low: i32,
    high: i32,
    /// The vector instructions the sums are rescaled with (same bits either way), set from the
    /// execution options by the layer that runs.
    lanes: Lanes,
}

impl<'a> Channels<'a> {
    fn new(weights: &'a [i8], bias: &'a [i64], requant: &'a [Multiplier], low: i32, high: i32) -> Result<Self, String> {
        let limit = ACTIVATION_MAX as i32;
        if !(-limit <= low && low <= high && high <= limit) {
            return Err(format!(
                "output range {low}..={high} is empty or outside the activations"
            ));
        }
        Ok(Self {
            weights,
            bias,
            requant,
            low,
            high,
            lanes: Lanes::default(),
        })
    }
}

/// The constant operands of a convolution.
struct ConvWeights<'a> {
    window: &'a Window,
    group: usize,
    c_in: usize,
    c_out: usize,
    channels: Channels<'a>,
}

fn conv(x: &ITensor, w: &ConvWeights<'_>, options: &ExecOptions) -> Result<ITensor, String> {
    let unit_strides = w.window.strides.iter().all(|s| *s == 1);
    let geometry = geometry(&x.shape, w.window, options, !unit_strides)?;
    let (batch, group) = (x.shape[0], w.group);
    if x.shape[1] != w.c_in || group == 0 || !w.c_in.is_multiple_of(group) || !w.c_out.is_multiple_of(group) {
        return Err(format!(
            "data with {} channels does not fit a convolution of {} input channels in {group} groups",
            x.shape[1], w.c_in
        ));
    }
    let (cig, cog) = (w.c_in / group, w.c_out / group);
    let row = cig * geometry.taps;
    let channels = &w.channels.for_run(options);
    if channels.weights.len() != w.c_out * row || channels.bias.len() != w.c_out || channels.requant.len() != w.c_out {
        return Err("weight, bias and requantization sizes disagree".into());
    }
    check_operands(&x.data)?;
    let mut shape = vec![batch, w.c_out];
    shape.extend_from_slice(&geometry.out_spatial);
    element_count(&shape, options)?;
    element_count(&[geometry.out_positions, row], options)?;
    let group_weights: Vec<PairedRows> = (0..group)
        .map(|g| PairedRows::build(cog, row, |o, kk| i16::from(channels.weights[(g * cog + o) * row + kk])))
        .collect();
    let image_size = w.c_out * geometry.out_positions;
    let mut data = vec![0i32; batch * image_size];
    let work = batch.saturating_mul(image_size).saturating_mul(row);
    if unit_strides {
        let layout = ShiftedLayout::new(&x.shape[2..], w.window, &geometry, options)?;
        // The sums of every padded position, before the ones that are outputs are kept.
        element_count(&[w.c_out, batch, layout.plane], options)?;
        for_each_chunk(&mut data, image_size, work, options.threads, |first_image, chunk| {
            let images = chunk.len() / image_size;
            let inputs = &x.data[first_image * w.c_in * geometry.in_positions..];
            let shifted = layout.chunk(inputs, w.c_in, images);
            let mut padded_out = vec![0i32; w.c_out * shifted.columns];
            // Every group's patches have the same size: one buffer serves them all.
            let mut patches = Panels::zeroed(SHIFTED_BLOCK_COLUMNS.min(shifted.columns), row);
            for (g, weights) in group_weights.iter().enumerate() {
                let out = (&mut patches, &mut padded_out[..]);
                layout.convolve(&shifted, g, weights, (w, channels), out, options.simd);
            }
            layout.keep_outputs(&padded_out, shifted.columns, w.c_out, chunk);
        });
        return Ok(ITensor { shape, data });
    }
    let (positions, taps) = (geometry.out_positions, geometry.taps);
    // Strided: im2col as one gather per image and group. Column `p` holds the `cig * taps`
    // inputs that output position `p` reads, from the group's channels; padding reads 0, which
    // is exact because quantization is symmetric.
    let group_inputs = cig * geometry.in_positions;
    if group_inputs >= u32::MAX as usize {
        return Err(format!("{group_inputs} inputs per group are too many to index"));
    }
    let map = GatherMap::new(positions, row, |p, kk| {
        let read = geometry.reads[p * taps + kk % taps];
        (read != PADDING).then(|| (kk / taps) * geometry.in_positions + read)
    });
    for_each_chunk(&mut data, image_size, work, options.threads, |first_image, chunk| {
        let mut patches = Panels::zeroed(positions, row);
        for (local, out) in chunk.chunks_exact_mut(image_size).enumerate() {
            for (g, weights) in group_weights.iter().enumerate() {
                let first_input = ((first_image + local) * w.c_in + g * cig) * geometry.in_positions;
                patches.gather(&map, &x.data[first_input..first_input + group_inputs]);
                let rows = g * cog..(g + 1) * cog;
                let mut sink = RequantizeInto {
                    out: &mut out[rows.start * positions..rows.end * positions],
                    stride: positions,
                    first_row: 0,
                    channels: channels.select(rows),
                    per_row: true,
                };
                product_sums(weights, 0..cog, &patches, options.simd, &mut sink);
            }
        }
    });
    Ok(ITensor { shape, data })
}

/// Columns of a stride-1 convolution's patch matrix that one gather fills at a time (bounds the
/// packed patches' memory whatever the batch and image size).
const SHIFTED_BLOCK_COLUMNS: usize = 32 * kernels::PANEL;

/// A stride-1 convolution as products over padded images. The data is laid out channel by
/// channel, each channel holding the chunk's images one after another, each image padded; then
/// the input that output column `j` reads at tap `t` is `j + offset[t]` for every `j`. Column `j`
/// stands for the padded position `j` (its image, then its place in the padded image), so the
/// patch matrix is read straight from shifted runs of the data instead of through a gather map,
/// and its columns run on across images. The sums are requantized into the same padded layout,
/// a contiguous run per panel, and the runs that are output rows are then copied out.
struct ShiftedLayout {
    /// Elements of one padded image plane.
    plane: usize,
    /// Elements of one input image plane, and of one of its rows (the last axis).
    in_positions: usize,
    row_width: usize,
    /// Where each input row (all coordinates but the last) starts in a padded plane.
    row_starts: Vec<usize>,
    /// Per tap (row-major over the kernel), its offset in a padded plane.
    tap_offsets: Vec<usize>,
    /// Columns one image spans: through its last output position.
    image_columns: usize,
    /// Where each output row starts in a padded plane (output position `o` is the padded
    /// position with the same coordinates, whose window starts there), and its width.
    out_row_starts: Vec<usize>,
    out_width: usize,
    taps: usize,
    out_positions: usize,
}

impl ShiftedLayout {
    fn new(spatial: &[usize], window: &Window, geometry: &Geometry, options: &ExecOptions) -> Result<Self, String> {
        let rank = spatial.len();
        let padded: Vec<usize> = (0..rank)
            .map(|a| spatial[a] + window.pads_before[a] + window.pads_after[a])
            .collect();
        let plane = element_count(&padded, options)?;
        let mut strides = vec![1usize; rank];
        for axis in (0..rank.saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * padded[axis + 1];
        }
        let mut tap_offsets = Vec::with_capacity(geometry.taps);
        let mut tap = vec![0usize; rank];
        for _ in 0..geometry.taps {
            tap_offsets.push((0..rank).map(|a| tap[a] * window.dilations[a] * strides[a]).sum());
            increment(&mut tap, &window.kernel);
        }
        let row_width = spatial.last().copied().unwrap_or(1);
        let in_positions: usize = spatial.iter().product();
        let mut row_starts = Vec::with_capacity(in_positions / row_width.max(1));
        let mut coordinate = vec![0usize; rank.saturating_sub(1)];
        for _ in 0..in_positions / row_width.max(1) {
            let start = (0..rank)
                .map(|a| (coordinate.get(a).copied().unwrap_or(0) + window.pads_before[a]) * strides[a])
                .sum();
            row_starts.push(start);
            increment(&mut coordinate, &spatial[..rank.saturating_sub(1)]);
        }
        let (out_width, outer) = match geometry.out_spatial.split_last() {
            Some((width, outer)) => (*width, outer),
            None => (1, &[][..]),
        };
        let out_rows: usize = outer.iter().product();
        let mut out_row_starts = Vec::with_capacity(out_rows);
        let mut coordinate = vec![0usize; outer.len()];
        for _ in 0..out_rows {
            out_row_starts.push(coordinate.iter().zip(&strides).map(|(c, s)| c * s).sum::<usize>());
            increment(&mut coordinate, outer);
        }
        let image_columns = out_row_starts.last().map_or(0, |start| start + out_width);
        Ok(Self {
            plane,
            in_positions,
            row_width,
            row_starts,
            tap_offsets,
            image_columns,
            out_row_starts,
            out_width,
            taps: geometry.taps,
            out_positions: geometry.out_positions,
        })
    }

    /// A chunk of `images` images of `channels` channels from `data` (NC + spatial order): the
    /// padded data as `[channel][image][padded plane]`, with one panel of zeros after the end for
    /// the lanes past the last column.
    fn chunk(&self, data: &[i32], channels: usize, images: usize) -> ShiftedChunk {
        let mut padded = vec![0i32; channels * images * self.plane + kernels::PANEL];
        for image in 0..images {
            for channel in 0..channels {
                let source = &data[(image * channels + channel) * self.in_positions..][..self.in_positions];
                let plane = &mut padded[(channel * images + image) * self.plane..][..self.plane];
                if self.plane == self.in_positions {
                    // Nothing padded: the image is the plane.
                    plane.copy_from_slice(source);
                    continue;
                }
                for (input_row, start) in source.chunks_exact(self.row_width.max(1)).zip(&self.row_starts) {
                    copy_run(&mut plane[*start..*start + self.row_width], input_row);
                }
            }
        }
        ShiftedChunk {
            padded,
            images,
            columns: (images - 1) * self.plane + self.image_columns,
        }
    }

    /// Group `group`'s output channels for the chunk's images, requantized into `padded_out`
    /// (`[channel][column]`, `chunk.columns` columns per channel), packing the patches a block
    /// at a time into `patches` (made for the block's columns and the group's row length).
    fn convolve(
        &self,
        chunk: &ShiftedChunk,
        group: usize,
        weights: &PairedRows,
        (w, channels): (&ConvWeights<'_>, &Channels<'_>),
        (patches, padded_out): (&mut Panels, &mut [i32]),
        simd: bool,
    ) {
        let (cig, first_channel) = (w.c_in / w.group, group * weights.rows());
        let channel_stride = chunk.images * self.plane;
        let source = &chunk.padded[group * cig * channel_stride..];
        let columns = chunk.columns;
        let row = cig * self.taps;
        let mut offsets: Vec<usize> = (0..row)
            .map(|kk| (kk / self.taps) * channel_stride + self.tap_offsets[kk % self.taps])
            .collect();
        let rows = first_channel..first_channel + weights.rows();
        // One output channel (a depthwise group): its sums straight from the shifted runs,
        // without packing panels for tiles that would be three quarters empty.
        let mut single_row = (simd && weights.rows() == 1 && row <= kernels::MAX_NARROW_TERMS).then(|| {
            let weight_row: Vec<i32> = channels.weights[first_channel * row..][..row]
                .iter()
                .map(|w| i32::from(*w))
                .collect();
            (weight_row, vec![0i32; SHIFTED_BLOCK_COLUMNS.min(columns)])
        });
        for first_column in (0..columns).step_by(SHIFTED_BLOCK_COLUMNS) {
            let count = SHIFTED_BLOCK_COLUMNS.min(columns - first_column);
            let mut sink = RequantizeInto {
                out: &mut padded_out[first_channel * columns + first_column..],
                stride: columns,
                first_row: 0,
                channels: channels.select(rows.clone()),
                per_row: true,
            };
            match &mut single_row {
                Some((weight_row, sums)) => {
                    kernels::shifted_row_sums(weight_row, &offsets, source, &mut sums[..count], &mut sink);
                }
                None => {
                    patches.fill_shifted(count, &offsets, source);
                    product_sums(weights, 0..weights.rows(), patches, simd, &mut sink);
                }
            }
            for offset in &mut offsets {
                *offset += SHIFTED_BLOCK_COLUMNS;
            }
        }
    }

    /// Copies the output rows of every image and channel from the padded layout into `out`
    /// (NC + spatial order).
    fn keep_outputs(&self, padded_out: &[i32], columns: usize, channels: usize, out: &mut [i32]) {
        let width = self.out_width;
        for (image, out) in out.chunks_exact_mut(channels * self.out_positions).enumerate() {
            for (channel, out) in out.chunks_exact_mut(self.out_positions).enumerate() {
                let plane = &padded_out[channel * columns + image * self.plane..];
                if self.plane == self.out_positions {
                    // Every padded position is an output (no padding, a 1x1 kernel).
                    out.copy_from_slice(&plane[..self.out_positions]);
                    continue;
                }
                for (out_row, start) in out.chunks_exact_mut(width).zip(&self.out_row_starts) {
                    copy_run(out_row, &plane[*start..*start + width]);
                }
            }
        }
    }
}

/// Copies a run as long as an image row. Such runs are short, and a call to `memcpy` per run cost
/// more than the copy; fixed groups of four compile to plain vector moves.
#[inline(always)]
fn copy_run(to: &mut [i32], from: &[i32]) {
    let (to_groups, to_rest) = to.as_chunks_mut::<4>();
    let (from_groups, from_rest) = from.as_chunks::<4>();
    for (to, from) in to_groups.iter_mut().zip(from_groups) {
        *to = *from;
    }
    for (to, from) in to_rest.iter_mut().zip(from_rest) {
        *to = *from;
    }
}

/// A chunk of images in the shifted layout (see [`ShiftedLayout::chunk`]).
struct ShiftedChunk {
    padded: Vec<i32>,
    images: usize,
    /// Columns the products run over: every padded position through the last image's last
    /// output.
    columns: usize,
}

impl<'a> Channels<'a> {
    /// The same constants, rescaled with the instructions `options` allow.
    fn for_run(&self, options: &ExecOptions) -> Channels<'a> {
        Channels {
            lanes: Lanes::new(options.simd),
            ..*self
        }
    }

    /// The output channels in `rows` (a group's).
    fn select(&self, rows: std::ops::Range<usize>) -> Channels<'a> {
        Channels {
            weights: self.weights,
            bias: &self.bias[rows.clone()],
            requant: &self.requant[rows],
            low: self.low,
            high: self.high,
            lanes: self.lanes,
        }
    }

    /// Requantizes the sums of output channel `row` into `out`.
    #[inline(always)]
    fn requantize_row(&self, row: usize, out: &mut [i32], sums: &[i64]) {
        requantize_run(out, sums, self.bias[row], self.requant[row], self.low, self.high);
    }

    /// [`Channels::requantize_row`] for sums below 2^31 in magnitude.
    #[inline(always)]
    fn requantize_row_narrow(&self, row: usize, out: &mut [i32], sums: &[i32]) {
        requantize_narrow(
            self.lanes,
            out,
            sums,
            self.bias[row],
            self.requant[row],
            (self.low, self.high),
        );
    }
}

/// Writes a product layer's sums, requantized, into rows of `stride` elements (starting at row
/// `first_row`), with one bias and multiplier per row (a convolution's output channels) or per
/// column (a dense layer's).
struct RequantizeInto<'a> {
    out: &'a mut [i32],
    stride: usize,
    first_row: usize,
    channels: Channels<'a>,
    per_row: bool,
}

impl kernels::Sink for RequantizeInto<'_> {
    #[inline(always)]
    fn take(&mut self, row: usize, first_col: usize, sums: &[i64]) {
        let out = &mut self.out[(row - self.first_row) * self.stride + first_col..][..sums.len()];
        if self.per_row {
            self.channels.requantize_row(row, out, sums);
        } else {
            requantize_columns(&self.channels, out, first_col, sums.iter().copied());
        }
    }

    #[inline(always)]
    fn take_narrow(&mut self, row: usize, first_col: usize, sums: &[i32]) {
        let out = &mut self.out[(row - self.first_row) * self.stride + first_col..][..sums.len()];
        if self.per_row {
            self.channels.requantize_row_narrow(row, out, sums);
        } else {
            requantize_columns(&self.channels, out, first_col, sums.iter().map(|s| i64::from(*s)));
        }
    }
}

/// Requantizes sums of consecutive output channels from `first_col` (a dense layer's row), each
/// with its own bias and multiplier.
#[inline(always)]
fn requantize_columns(channels: &Channels<'_>, out: &mut [i32], first_col: usize, sums: impl Iterator<Item = i64>) {
    let columns = first_col..first_col + out.len();
    for (((slot, sum), bias), requant) in out
        .iter_mut()
        .zip(sums)
        .zip(&channels.bias[columns.clone()])
        .zip(&channels.requant[columns])
    {
        *slot = requantize(sum, *bias, *requant).max(channels.low).min(channels.high);
    }
}

/// [`requantize_run`] for sums below 2^31 in magnitude: with a 32-bit multiplier and a bias
/// below 2^30, `sum * m + bias * m + half` stays below 2^63 (2^62 + 2^61 + 2^61), so the rule
/// is computed in 64 bits with no per-value check, in vector lanes where `lanes` allows.
#[inline(always)]
fn requantize_narrow(
    lanes: Lanes,
    out: &mut [i32],
    sums: &[i32],
    bias: i64,
    requant: Multiplier,
    (low, high): (i32, i32),
) {
    if let Ok(m) = i32::try_from(requant.m)
        && (1..63).contains(&requant.shift)
        && bias.unsigned_abs() < 1 << 30
    {
        let rescale = Rescale {
            m,
            offset: bias * i64::from(m) + (1i64 << (requant.shift - 1)),
            shift: requant.shift,
            low,
            high,
        };
        return kernels::rescale_narrow(lanes, out, sums, rescale);
    }
    for (slot, sum) in out.iter_mut().zip(sums) {
        *slot = requantize(i64::from(*sum), bias, requant).max(low).min(high);
    }
}

/// Requantizes sums of one channel (one bias and multiplier) into `out` and clamps them to
/// `low..=high`, as [`requantize`] does; when every value fits the 64-bit form, in one loop the
/// compiler can vectorize.
#[inline(always)]
fn requantize_run(out: &mut [i32], sums: &[i64], bias: i64, requant: Multiplier, low: i32, high: i32) {
    let in_i32 = |s: &i64| i32::try_from(s.saturating_add(bias)).is_ok();
    if let Ok(m) = i32::try_from(requant.m)
        && (1..63).contains(&requant.shift)
        && sums.iter().all(in_i32)
    {
        // The same formula as `Multiplier::apply`'s 64-bit path: |sum * m| < 2^62.
        let (m, shift) = (i64::from(m), requant.shift);
        let half = 1i64 << (shift - 1);
        let (low, high) = (i64::from(low), i64::from(high));
        for (slot, sum) in out.iter_mut().zip(sums) {
            *slot = (((sum + bias) * m + half) >> shift).max(low).min(high) as i32;
        }
        return;
    }
    for (slot, sum) in out.iter_mut().zip(sums) {
        *slot = requantize(*sum, bias, requant).max(low).min(high);
    }
}

/// A product layer's output: the sum plus the bias, rescaled and saturated. (A bias that would
/// overflow 64 bits saturates: a plan cannot make a debug and a release build disagree.)
#[inline]
fn requantize(sum: i64, bias: i64, requant: Multiplier) -> i32 {
    saturate(requant.apply(sum.saturating_add(bias)))
}

/// Max pooling (`average: None`) or average pooling (`Some(count_include_pad)`).
fn pool(x: &ITensor, window: &Window, average: Option<bool>, options: &ExecOptions) -> Result<ITensor, String> {
    let tiled = match options.simd {
        true => pool_tiled(x, window, average.is_some(), options)?,
        false => None,
    };
    match tiled {
        Some(pooled) => Ok(pooled),
        None => pool_by_window(x, window, average, options),
    }
}

/// Any pooling, one window after another through the geometry's reads.
fn pool_by_window(
    x: &ITensor,
    window: &Window,
    average: Option<bool>,
    options: &ExecOptions,
) -> Result<ITensor, String> {
    let geometry = geometry(&x.shape, window, options, true)?;
    let planes = x.shape[0] * x.shape[1];
    let mut shape = x.shape[..2].to_vec();
    shape.extend_from_slice(&geometry.out_spatial);
    element_count(&shape, options)?;
    let mut data = Vec::with_capacity(planes * geometry.out_positions);
    if !geometry.reads.contains(&PADDING) {
        // Every window lies inside: no read to skip, and every average divides by the taps.
        let taps = geometry.taps.max(1);
        for plane in x.data.chunks(geometry.in_positions.max(1)).take(planes) {
            for reads in geometry.reads.chunks_exact(taps).take(geometry.out_positions) {
                data.push(match average {
                    None => reads.iter().fold(i32::MIN, |m, r| m.max(plane[*r])),
                    Some(_) => {
                        let sum = reads.iter().fold(0i64, |s, r| s + i64::from(plane[*r]));
                        saturate(div_round(sum, taps as i64))
                    }
                });
            }
        }
        return Ok(ITensor { shape, data });
    }
    for plane in x.data.chunks(geometry.in_positions.max(1)).take(planes) {
        for reads in geometry.reads.chunks(geometry.taps.max(1)).take(geometry.out_positions) {
            let inside = reads.iter().filter(|r| **r != PADDING).map(|r| plane[*r]);
            data.push(match average {
                None => inside.max().unwrap_or(0),
                Some(count_include_pad) => {
                    let (sum, count) = inside.fold((0i64, 0i64), |(s, c), v| (s + i64::from(v), c + 1));
                    let count = if count_include_pad { reads.len() as i64 } else { count };
                    if count == 0 { 0 } else { saturate(div_round(sum, count)) }
                }
            });
        }
    }
    Ok(ITensor { shape, data })
}

/// A 2-D pooling whose windows tile the planes (no padding or dilation, strides equal to the
/// kernel, sides a whole number of windows; the digit CNN's 2x2 pools), over every plane at
/// once: each output row's input rows are combined into one line, then each window's columns.
/// The same values as the window-by-window loop of [`pool`]: a maximum in any order, and sums
/// in 64 bits, exact, divided once by the taps under the plan's rounding rule. `None` for any
/// other window.
fn pool_tiled(x: &ITensor, window: &Window, average: bool, options: &ExecOptions) -> Result<Option<ITensor>, String> {
    let (&[kernel_height, kernel_width], &[batch, channels, height, width]) = (&window.kernel[..], &x.shape[..]) else {
        return Ok(None);
    };
    if !window.tiles(&[height, width]) {
        return Ok(None);
    }
    let geometry = geometry(&x.shape, window, options, false)?;
    let planes = batch * channels;
    if Some(x.data.len()) != planes.checked_mul(height * width) {
        return Ok(None);
    }
    let mut shape = x.shape[..2].to_vec();
    shape.extend_from_slice(&geometry.out_spatial);
    element_count(&shape, options)?;
    let mut data = vec![0i32; planes * (height / kernel_height) * (width / kernel_width)];
    let tiles = TiledPool {
        input: &x.data,
        kernel: [kernel_height, kernel_width],
        width,
        average,
        out: &mut data,
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        v3.vectorize(tiles);
        return Ok(Some(ITensor { shape, data }));
    }
    pulp::NullaryFnOnce::call(tiles);
    Ok(Some(ITensor { shape, data }))
}

/// The loops of [`pool_tiled`], over every plane at once: long loops that vectorize (in a
/// `pulp` instruction-set context where the CPU has AVX2), where one plane of a small image
/// gives loops of a few values.
struct TiledPool<'a> {
    input: &'a [i32],
    kernel: [usize; 2],
    width: usize,
    average: bool,
    out: &'a mut [i32],
}

impl pulp::NullaryFnOnce for TiledPool<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Self {
            input,
            kernel: [kernel_height, kernel_width],
            width,
            average,
            out,
        } = self;
        let rows = input.chunks_exact(kernel_height * width);
        let taps = (kernel_height * kernel_width) as i64;
        if !average {
            let mut line = vec![0i32; rows.len() * width];
            for (dest, rows) in line.chunks_exact_mut(width).zip(rows) {
                dest.copy_from_slice(&rows[..width]);
                for row in rows.chunks_exact(width).skip(1) {
                    dest.iter_mut().zip(row).for_each(|(d, v)| *d = (*d).max(*v));
                }
            }
            let windows = out.iter_mut().zip(line.chunks_exact(kernel_width));
            match kernel_width {
                2 => windows.for_each(|(o, w)| *o = w[0].max(w[1])),
                _ => windows.for_each(|(o, w)| *o = w.iter().copied().fold(i32::MIN, i32::max)),
            }
            return;
        }
        // Sums of at most 2^20 values of 32 bits stay far inside 64 bits, doubled or not.
        let mut line = vec![0i64; rows.len() * width];
        for (dest, rows) in line.chunks_exact_mut(width).zip(rows) {
            dest.iter_mut()
                .zip(&rows[..width])
                .for_each(|(d, v)| *d = i64::from(*v));
            for row in rows.chunks_exact(width).skip(1) {
                dest.iter_mut().zip(row).for_each(|(d, v)| *d += i64::from(*v));
            }
        }
        let windows = out.iter_mut().zip(line.chunks_exact(kernel_width));
        if taps.count_ones() == 1 && taps <= 1 << 20 {
            // floor(sum / taps + 1/2) = (2 sum + taps) >> log2(2 taps), as `div_round` does.
            let shift = (2 * taps).trailing_zeros();
            let rounded = |sum: i64| saturate((2 * sum + taps) >> shift);
            match kernel_width {
                2 => windows.for_each(|(o, w)| *o = rounded(w[0] + w[1])),
                _ => windows.for_each(|(o, w)| *o = rounded(w.iter().sum())),
            }
        } else {
            windows.for_each(|(o, w)| *o = saturate(div_round(w.iter().sum(), taps)));
        }
    }
}

/// Combines the values along `axes` (kept with size 1) with `combine`.
fn reduce(
    x: &ITensor,
    axes: &[u32],
    options: &ExecOptions,
    combine: impl Fn(&mut dyn Iterator<Item = i32>) -> i32,
) -> Result<ITensor, String> {
    let rank = x.shape.len();
    if axes.iter().any(|a| *a as usize >= rank) {
        return Err(format!("reduction axes {axes:?} are past rank {rank}"));
    }
    let reduced = |axis: usize| axes.contains(&(axis as u32));
    let shape: Vec<usize> = (0..rank).map(|a| if reduced(a) { 1 } else { x.shape[a] }).collect();
    let outputs = element_count(&shape, options)?;
    // Move the reduced axes last, so each output reads one contiguous run.
    let kept: Vec<usize> = (0..rank).filter(|a| !reduced(*a)).collect();
    let order: Vec<usize> = kept.iter().copied().chain((0..rank).filter(|a| reduced(*a))).collect();
    let run: usize = (0..rank).filter(|a| reduced(*a)).map(|a| x.shape[a]).product();
    let mut strides = vec![1usize; rank];
    for axis in (0..rank.saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * x.shape[axis + 1];
    }
    let dims: Vec<usize> = order.iter().map(|a| x.shape[*a]).collect();
    let mut index = vec![0usize; rank];
    let mut gathered = Vec::with_capacity(run);
    let mut data = Vec::with_capacity(outputs);
    for _ in 0..outputs {
        gathered.clear();
        for _ in 0..run {
            let offset: usize = index.iter().zip(&order).map(|(i, a)| i * strides[*a]).sum();
            gathered.push(x.data[offset]);
            increment(&mut index, &dims);
        }
        data.push(combine(&mut gathered.iter().copied()));
    }
    Ok(ITensor { shape, data })
}

/// Sums `x[k] * w[k]` exactly, one element at a time, in 64 bits.
fn dot_scalar(x: &[i16], w: &[i16]) -> i64 {
    let mut sum = 0i64;
    for (a, b) in x.iter().zip(w) {
        sum += i64::from(*a) * i64::from(*b);
    }
    sum
}

/// Checks that every value is an activation, as [`product_operands`] does, without converting.
fn check_operands(values: &[i32]) -> Result<(), String> {
    let limit = ACTIVATION_MAX as u32;
    // A reduction without an early exit, which the compiler vectorizes; the slow path below
    // finds the offending value for the message.
    if values.iter().fold(0, |largest, v| v.unsigned_abs().max(largest)) <= limit {
        return Ok(());
    }
    product_operands(values).map(|_| ())
}

/// Activations as 16-bit operands of a product, refusing any value outside the activation range
/// (the kernels' no-overflow bound assumes it; a plan feeding other integers into a product is
/// refused rather than computed differently by different kernels).
fn product_operands(values: &[i32]) -> Result<Vec<i16>, String> {
    values
        .iter()
        .map(|v| {
            i16::try_from(*v)
                .ok()
                .filter(|v| v.unsigned_abs() <= ACTIVATION_MAX as u16)
                .ok_or_else(|| format!("operand value {v} is outside the activation range"))
        })
        .collect()
}

fn dense(x: &ITensor, k: usize, n: usize, channels: &Channels<'_>, options: &ExecOptions) -> Result<ITensor, String> {
    if x.shape.last() != Some(&k) {
        return Err(format!("input shape {:?} does not end in {k}", x.shape));
    }
    if channels.weights.len() != n * k || channels.bias.len() != n || channels.requant.len() != n {
        return Err("weight, bias and requantization sizes disagree".into());
    }
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    element_count(&shape, options)?;
    check_operands(&x.data)?;
    let rows = x.data.len().checked_div(k).unwrap_or(0);
    let (a, b) = (
        PairedRows::from_row_major(&x.data, rows, k),
        Panels::from_weights(channels.weights, n, k),
    );
    let mut data = vec![0i32; rows * n];
    for_each_chunk(&mut data, n, rows * n * k, options.threads, |first, chunk| {
        let count = chunk.len() / n.max(1);
        let mut sink = RequantizeInto {
            out: chunk,
            stride: n,
            first_row: first,
            channels: *channels,
            per_row: false,
        };
        product_sums(&a, first..first + count, &b, options.simd, &mut sink);
    });
    Ok(ITensor { shape, data })
}

/// `rows` rows of `n` outputs, each a sum of `k` products, filled by `row` on up to `threads` threads.
fn product_rows(rows: usize, n: usize, k: usize, threads: usize, row: impl Fn(usize, &mut [i32]) + Sync) -> Vec<i32> {
    let mut data = vec![0i32; rows * n];
    for_each_row(&mut data, n, rows.saturating_mul(n).saturating_mul(k), threads, row);
    data
}

/// Fills `out`, rows of `width` elements, with `fill(row index, row)`, on up to `threads` threads
/// when the `work` (products computed) is worth starting them for. Rows are independent, so the
/// split cannot change a bit.
fn for_each_row(out: &mut [i32], width: usize, work: usize, threads: usize, fill: impl Fn(usize, &mut [i32]) + Sync) {
    for_each_chunk(out, width, work, threads, |first, chunk| {
        for (i, row) in chunk.chunks_mut(width.max(1)).enumerate() {
            fill(first + i, row);
        }
    });
}

/// Fills `out`, rows of `width` elements, with `fill(first row index, whole rows)` over one chunk
/// of rows per thread, on up to `threads` threads when the `work` is worth starting them for.
fn for_each_chunk(out: &mut [i32], width: usize, work: usize, threads: usize, fill: impl Fn(usize, &mut [i32]) + Sync) {
    let rows = out.len().checked_div(width).unwrap_or(0);
    let threads = threads.clamp(1, rows.clamp(1, crate::pools::MAX_THREADS));
    if threads == 1 || work < THREAD_WORTHY_PRODUCTS || width == 0 {
        if width > 0 {
            fill(0, out);
        }
        return;
    }
    let rows_per_thread = rows.div_ceil(threads);
    let fill = &fill;
    let tasks: Vec<_> = out
        .chunks_mut(rows_per_thread * width)
        .enumerate()
        .map(|(chunk_index, chunk)| move || fill(chunk_index * rows_per_thread, chunk))
        .collect();
    crate::pools::run_polling(tasks);
}

/// NumPy broadcasting of two tensors through `f`.
fn broadcast(a: &ITensor, b: &ITensor, options: &ExecOptions, f: impl Fn(i32, i32) -> i32) -> Result<ITensor, String> {
    if a.shape == b.shape {
        return Ok(ITensor {
            shape: a.shape.clone(),
            data: a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect(),
        });
    }
    let shape = crate::broadcast::shape(&[&a.shape, &b.shape])?;
    let count = element_count(&shape, options)?;
    let (ta, tb) = (
        crate::broadcast::strides(&a.shape, &shape),
        crate::broadcast::strides(&b.shape, &shape),
    );
    // Row by row along the last axis, each row one loop over contiguous (or repeated) elements.
    let width = shape.last().copied().unwrap_or(1);
    let steps = (ta.last().copied().unwrap_or(0), tb.last().copied().unwrap_or(0));
    let mut data = Vec::with_capacity(count);
    crate::broadcast::for_each_row(&shape, [&ta, &tb], |[oa, ob]| match steps {
        (0, 0) => data.extend(std::iter::repeat_n(f(a.data[oa], b.data[ob]), width)),
        (0, _) => data.extend(b.data[ob..ob + width].iter().map(|y| f(a.data[oa], *y))),
        (_, 0) => data.extend(a.data[oa..oa + width].iter().map(|x| f(*x, b.data[ob]))),
        _ => data.extend(
            a.data[oa..oa + width]
                .iter()
                .zip(&b.data[ob..ob + width])
                .map(|(x, y)| f(*x, *y)),
        ),
    });
    Ok(ITensor { shape, data })
}

fn softmax(x: &ITensor, axis: usize, exp_table: &[u32], masked: bool) -> Result<ITensor, String> {
    let len = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let mut data = vec![0i32; x.data.len()];
    let mut exps = vec![0u64; len];
    // The activation floor, which a masked softmax reads as minus infinity.
    let floor = -(ACTIVATION_MAX as i32);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * len + j) * inner + i;
            let max = (0..len).map(|j| x.data[at(j)]).max().unwrap_or(0);
            // A row entirely at the floor is all "minus infinity": every entry counts, as in float.
            let skip_floor = masked && max > floor;
            let mut sum = 0u64;
            for (j, e) in exps.iter_mut().enumerate() {
                let value = x.data[at(j)];
                let distance = (i64::from(max) - i64::from(value)) as usize;
                *e = if skip_floor && value <= floor {
                    0
                } else {
                    u64::from(exp_table.get(distance).copied().unwrap_or(0))
                };
                sum += *e;
            }
            if sum == 0 {
                return Err("the exponential table is empty".into());
            }
            for (j, e) in exps.iter().enumerate() {
                data[at(j)] = div_round(*e as i64 * ACTIVATION_MAX, sum as i64) as i32;
            }
        }
    }
    Ok(ITensor {
        shape: x.shape.clone(),
        data,
    })
}

/// RMS normalization along `axis`: for each row `q`, `S = sum q^2 + epsilon`,
/// `root = isqrt(S * 2^32)` (`sqrt(S) * 2^16` rounded down, exactly), `inv = floor(2^62 / root + 1/2)`,
/// and `y = sat(rq(q * inv))`; a row with `root = 0` is all zeros and stays zeros.
fn rms_norm(x: &ITensor, axis: usize, epsilon: u64, requant: Multiplier) -> Result<ITensor, String> {
    let len = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let values = product_operands(&x.data)?;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let mut data = vec![0i32; x.data.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * len + j) * inner + i;
            let squares: u128 = (0..len).map(|j| u128::from(values[at(j)].unsigned_abs()).pow(2)).sum();
            let root = ((squares + u128::from(epsilon)) << 32).isqrt();
            if root == 0 {
                continue;
            }
            let inverse = ((1u128 << 63) + root) / (2 * root);
            let inverse = i64::try_from(inverse).map_err(|_| "normalization factor out of range".to_owned())?;
            for j in 0..len {
                data[at(j)] = saturate(requant.apply(i64::from(values[at(j)]) * inverse));
            }
        }
    }
    Ok(ITensor {
        shape: x.shape.clone(),
        data,
    })
}

/// Sums `x[k] * y[k]` of two activations exactly: a product is below 2^30, so two of them fit in
/// `i32` (the pairwise multiply-add SIMD units do) before widening to 64 bits.
fn dot_pairs(x: &[i16], y: &[i16]) -> i64 {
    let mut total = 0i64;
    let (xp, yp) = (x.chunks_exact(2), y.chunks_exact(2));
    let (xr, yr) = (xp.remainder(), yp.remainder());
    for (a, b) in xp.zip(yp) {
        total += i64::from(i32::from(a[0]) * i32::from(b[0]) + i32::from(a[1]) * i32::from(b[1]));
    }
    total + dot_scalar(xr, yr)
}

/// The batch offsets (in rows) of an operand whose batch dimensions broadcast to `batch`.
fn batch_offsets(dims: &[usize], batch: &[usize]) -> Vec<usize> {
    let rank = batch.len();
    let mut strides = vec![0usize; rank];
    let mut step = 1;
    for axis in (0..rank).rev() {
        strides[axis] = if dims[axis] == 1 { 0 } else { step };
        step *= dims[axis];
    }
    let count: usize = batch.iter().product();
    let mut index = vec![0usize; rank];
    let mut offsets = Vec::with_capacity(count);
    for _ in 0..count {
        offsets.push(index.iter().zip(&strides).map(|(i, s)| i * s).sum());
        increment(&mut index, batch);
    }
    offsets
}

/// `y[.., m, n] = sat(rq(sum_k a[.., m, k] * b[.., n, k]))` with the batch axes broadcast.
fn matmul(a: &ITensor, b: &ITensor, requant: Multiplier, options: &ExecOptions) -> Result<ITensor, String> {
    let rank = a.shape.len().max(b.shape.len());
    if rank < 2 || a.shape.len() < 2 || b.shape.len() < 2 {
        return Err("a product needs two operands of rank 2 or more".into());
    }
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let (m, k) = (sa[rank - 2], sa[rank - 1]);
    let n = sb[rank - 2];
    if sb[rank - 1] != k {
        return Err(format!(
            "shapes {:?} and {:?} do not share the last axis",
            a.shape, b.shape
        ));
    }
    let mut batch = Vec::with_capacity(rank - 2);
    for (x, y) in sa[..rank - 2].iter().zip(&sb[..rank - 2]) {
        batch.push(match (x, y) {
            (x, y) if x == y => *x,
            (1, y) => *y,
            (x, 1) => *x,
            _ => return Err(format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape)),
        });
    }
    let mut shape = batch.clone();
    shape.extend([m, n]);
    element_count(&shape, options)?;
    let (xa, xb) = (product_operands(&a.data)?, product_operands(&b.data)?);
    let (offsets_a, offsets_b) = (
        batch_offsets(&sa[..rank - 2], &batch),
        batch_offsets(&sb[..rank - 2], &batch),
    );
    let dot = if options.simd { dot_pairs } else { dot_scalar };
    let row = |r: usize, out: &mut [i32]| {
        let (item, i) = (r / m.max(1), r % m.max(1));
        let ar = (offsets_a[item] * m + i) * k;
        let x = &xa[ar..ar + k];
        for (j, slot) in out.iter_mut().enumerate() {
            let br = (offsets_b[item] * n + j) * k;
            *slot = saturate(requant.apply(dot(x, &xb[br..br + k])));
        }
    };
    let rows = batch.iter().product::<usize>() * m;
    Ok(ITensor {
        shape,
        data: product_rows(rows, n, k, options.threads, row),
    })
}

fn move_axis(x: &ITensor, from: usize, to: usize) -> Result<ITensor, String> {
    let rank = x.shape.len();
    if from >= rank || to >= rank {
        return Err(format!("cannot move axis {from} to {to} in rank {rank}"));
    }
    let mut order: Vec<usize> = (0..rank).collect();
    let moved = order.remove(from);
    order.insert(to, moved);
    let shape: Vec<usize> = order.iter().map(|a| x.shape[*a]).collect();
    let mut in_strides = vec![1usize; rank];
    for axis in (0..rank.saturating_sub(1)).rev() {
        in_strides[axis] = in_strides[axis + 1] * x.shape[axis + 1];
    }
    let strides: Vec<usize> = order.iter().map(|a| in_strides[*a]).collect();
    let mut index = vec![0usize; rank];
    let mut data = Vec::with_capacity(x.data.len());
    let mut offset = 0usize;
    for _ in 0..x.data.len() {
        data.push(x.data[offset]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            offset += strides[axis];
            if index[axis] < shape[axis] {
                break;
            }
            offset -= strides[axis] * shape[axis];
            index[axis] = 0;
        }
    }
    Ok(ITensor { shape, data })
}

fn reshape(x: &ITensor, at: usize, from_rank: usize, to: &[u64]) -> Result<ITensor, String> {
    let end = at
        .checked_add(from_rank)
        .filter(|e| *e <= x.shape.len())
        .ok_or_else(|| format!("axes {at}..{} are past rank {}", at + from_rank, x.shape.len()))?;
    let count: usize = x.shape[at..end].iter().product();
    let known: usize = to.iter().filter(|d| **d != 0).map(|d| *d as usize).product();
    let inferred = to.iter().filter(|d| **d == 0).count();
    let mut dims: Vec<usize> = to.iter().map(|d| *d as usize).collect();
    match inferred {
        0 if known == count => {}
        1 if known != 0 && count.is_multiple_of(known) => {
            for d in dims.iter_mut().filter(|d| **d == 0) {
                *d = count / known;
            }
        }
        _ => return Err(format!("cannot reshape {:?} (axes {at}..{end}) to {to:?}", x.shape)),
    }
    let mut shape = x.shape[..at].to_vec();
    shape.extend(dims);
    shape.extend_from_slice(&x.shape[end..]);
    Ok(ITensor {
        shape,
        data: x.data.clone(),
    })
}

/// Reproducible test values in `[-range, range]` from `seed` (a linear congruential generator:
/// enough to spread values, and the same on every machine).
#[cfg(test)]
pub(crate) fn test_values(seed: u64) -> impl FnMut(i64) -> i64 {
    let mut state = seed;
    move |range: i64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as i64 % (2 * range + 1) - range
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Windows that tile the planes take the fast path, which must give the window-by-window
    /// values, on values up to the ends of 32 bits and on several window shapes (a 2-wide
    /// window's own loops, a power-of-two count of taps and not).
    #[test]
    fn tiled_pools_give_the_window_by_window_values() {
        let mut value = test_values(5);
        let options = ExecOptions::default();
        for (kernel, spatial) in [([2, 2], [8, 8]), ([3, 3], [6, 9]), ([2, 4], [4, 8]), ([1, 3], [2, 6])] {
            let window = Window::tiling(&kernel);
            for range in [30_000, i64::from(i32::MAX)] {
                let shape = vec![3, 5, spatial[0], spatial[1]];
                let data = (0..shape.iter().product()).map(|_| value(range) as i32).collect();
                let x = ITensor { shape, data };
                for average in [None, Some(false)] {
                    let tiled = pool_tiled(&x, &window, average.is_some(), &options)
                        .expect("pooled")
                        .expect("windows that tile the planes");
                    let by_window = pool_by_window(&x, &window, average, &options).expect("pooled");
                    assert_eq!(tiled, by_window, "{kernel:?} over {spatial:?}, average {average:?}");
                }
            }
        }
        // A padded window, or one that does not tile, is left to the window-by-window loop.
        let x = ITensor {
            shape: vec![1, 1, 5, 5],
            data: vec![1; 25],
        };
        let window = |pads: usize| Window {
            pads_before: vec![pads, pads],
            ..Window::tiling(&[2, 2])
        };
        assert_eq!(pool_tiled(&x, &window(0), false, &options), Ok(None));
        assert_eq!(pool_tiled(&x, &window(1), false, &options), Ok(None));
    }

    proptest! {
        #[test]
        fn activation_dot_kernels_agree(pairs in proptest::collection::vec((-32767i16..=32767, -32767i16..=32767), 0..3000)) {
            let (x, y): (Vec<i16>, Vec<i16>) = pairs.into_iter().unzip();
            prop_assert_eq!(dot_scalar(&x, &y), dot_pairs(&x, &y));
        }
    }

    /// Grouped, dilated, padded convolutions, strided (gathered patches) and not (shifted runs of
    /// padded data), with and without a fused output range, with sums long enough to widen past
    /// 32 bits and biases too large for the 32-bit requantization, large enough to start threads:
    /// every thread count and kernel gives the direct formula's bits.
    #[test]
    fn convolution_matches_the_direct_formula_on_every_path() {
        let (batch, h, w, c_out) = (2usize, 17usize, 15usize, 64usize);
        let limit = ACTIVATION_MAX as i32;
        // (vertical stride, input channels, groups, bias range, output range)
        let cases = [
            (2, 32, 2, 1i64 << 20, (-limit, limit)),
            (1, 32, 2, 1 << 32, (-1000, 20000)),
            (1, 32, 32, 1 << 20, (0, limit)),
            (1, 64, 64, 1 << 20, (-limit, limit)),
            (1, 96, 1, 1 << 20, (-limit, limit)),
        ];
        let mut next = test_values(12345);
        for (stride, c_in, group, bias_range, (low, high)) in cases {
            let window = Window {
                kernel: vec![3, 2],
                strides: vec![stride, 1],
                dilations: vec![1, 2],
                pads_before: vec![1, 0],
                pads_after: vec![2, 1],
            };
            let x = ITensor {
                shape: vec![batch, c_in, h, w],
                data: (0..batch * c_in * h * w).map(|_| next(32767) as i32).collect(),
            };
            let cig = c_in / group;
            let row = cig * 6;
            let weights: Vec<i8> = (0..c_out * row).map(|_| next(127) as i8).collect();
            let bias: Vec<i64> = (0..c_out).map(|_| next(bias_range)).collect();
            let requant: Vec<Multiplier> = (0..c_out)
                .map(|o| Multiplier::from_f64(1.0 / (3000.0 + o as f64)))
                .collect();
            let conv_weights = ConvWeights {
                window: &window,
                group,
                c_in,
                c_out,
                channels: Channels::new(&weights, &bias, &requant, low, high).expect("range"),
            };
            let (out_h, out_w) = ((h + 3 - 3) / stride + 1, (w + 1 - 3) + 1);
            let mut expected = Vec::new();
            for n in 0..batch {
                for oc in 0..c_out {
                    let g = oc / (c_out / group);
                    for oy in 0..out_h {
                        for ox in 0..out_w {
                            let mut acc = bias[oc];
                            for ci in 0..cig {
                                for ky in 0..3 {
                                    for kx in 0..2 {
                                        let y = (oy * stride + ky) as i64 - 1;
                                        let xx = (ox + kx * 2) as i64;
                                        if y < 0 || y >= h as i64 || xx >= w as i64 {
                                            continue;
                                        }
                                        let input =
                                            x.data[((n * c_in + g * cig + ci) * h + y as usize) * w + xx as usize];
                                        let weight = weights[oc * row + ci * 6 + ky * 2 + kx];
                                        acc += i64::from(input) * i64::from(weight);
                                    }
                                }
                            }
                            expected.push(saturate(requant[oc].apply(acc)).clamp(low, high));
                        }
                    }
                }
            }
            for threads in [1, 2, 3] {
                for simd in [false, true] {
                    let options = ExecOptions {
                        threads,
                        simd,
                        ..ExecOptions::default()
                    };
                    let y = conv(&x, &conv_weights, &options).expect("conv");
                    assert_eq!(y.shape, vec![batch, c_out, out_h, out_w]);
                    assert!(
                        y.data == expected,
                        "stride {stride} groups {group} threads {threads} simd {simd}"
                    );
                }
            }
        }
    }

    #[test]
    fn unpadded_pointwise_convolution_is_a_product_per_position() {
        // Every padded position is an output here, so the layout copies whole planes.
        let (batch, c_in, c_out, positions) = (3usize, 8usize, 16usize, 15usize);
        let mut next = test_values(777);
        let x = ITensor {
            shape: vec![batch, c_in, 3, 5],
            data: (0..batch * c_in * positions).map(|_| next(32767) as i32).collect(),
        };
        let window = Window {
            kernel: vec![1, 1],
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_before: vec![0, 0],
            pads_after: vec![0, 0],
        };
        for group in [1, 2, 8] {
            let cig = c_in / group;
            let weights: Vec<i8> = (0..c_out * cig).map(|_| next(127) as i8).collect();
            let bias: Vec<i64> = (0..c_out).map(|_| next(1 << 20)).collect();
            // Odd channels rescale by nearly 1 (a shift below 33, many values clamped).
            let requant: Vec<Multiplier> = (0..c_out)
                .map(|o| Multiplier::from_f64(if o % 2 == 0 { 1.0 / (50.0 + o as f64) } else { 0.9 }))
                .collect();
            let conv_weights = ConvWeights {
                window: &window,
                group,
                c_in,
                c_out,
                channels: Channels::new(&weights, &bias, &requant, -32767, 32767).expect("range"),
            };
            let mut expected = Vec::new();
            for n in 0..batch {
                for oc in 0..c_out {
                    let g = oc / (c_out / group);
                    for p in 0..positions {
                        let sum: i64 = (0..cig)
                            .map(|ci| {
                                let input = x.data[(n * c_in + g * cig + ci) * positions + p];
                                i64::from(input) * i64::from(weights[oc * cig + ci])
                            })
                            .sum();
                        expected.push(requantize(sum, bias[oc], requant[oc]));
                    }
                }
            }
            for simd in [false, true] {
                let options = ExecOptions {
                    simd,
                    ..ExecOptions::default()
                };
                let y = conv(&x, &conv_weights, &options).expect("conv");
                assert_eq!(y.shape, vec![batch, c_out, 3, 5]);
                assert!(y.data == expected, "groups {group} simd {simd}");
            }
        }
    }

    proptest! {
        /// The 32-bit requantization gives [`requantize`]'s bits then the clamp, for any sums,
        /// biases (inside and outside its fast range) and multipliers.
        #[test]
        fn narrow_requantization_follows_the_rule(
            sums in proptest::collection::vec(
                prop_oneof![any::<i32>(), Just(i32::MIN), Just(i32::MAX), -100i32..100],
                0..17,
            ),
            bias in prop_oneof![-(1i64 << 30)..(1i64 << 30), any::<i64>()],
            m in prop_oneof![0i64..(1 << 31), Just(i64::from(i32::MIN)), any::<i32>().prop_map(i64::from), any::<i64>()],
            shift in prop_oneof![0u32..=Multiplier::MAX_SHIFT, Just(1u32), Just(62u32)],
            (low, high) in (-32767i32..=32767).prop_flat_map(|low| (Just(low), low..=32767)),
        ) {
            let requant = Multiplier { m, shift };
            let expected: Vec<i32> = sums
                .iter()
                .map(|s| requantize(i64::from(*s), bias, requant).clamp(low, high))
                .collect();
            for simd in [false, true] {
                let mut out = vec![0i32; sums.len()];
                requantize_narrow(Lanes::new(simd), &mut out, &sums, bias, requant, (low, high));
                prop_assert_eq!(&out, &expected, "simd {}", simd);
            }
        }
    }

    #[test]
    fn activation_dot_kernels_do_not_overflow_at_the_extremes() {
        for len in [1, 2, 511, 5000] {
            let (x, y) = (vec![-32767i16; len], vec![32767i16; len]);
            let expected = -32767i64 * 32767 * len as i64;
            assert_eq!(dot_pairs(&x, &y), expected);
            assert_eq!(dot_scalar(&x, &y), expected);
        }
    }

    #[test]
    fn softmax_rounds_to_the_rule() {
        // Two equal logits: each gets exactly half of 32767, rounded up.
        let x = ITensor {
            shape: vec![1, 2],
            data: vec![5, 5],
        };
        let y = softmax(&x, 1, &[65536, 30000], false).expect("softmax");
        assert_eq!(y.data, vec![16384, 16384]);
    }

    #[test]
    fn masked_softmax_gives_the_floor_no_weight_unless_the_whole_row_is_there() {
        let table: Vec<u32> = (0..LOOKUP_ENTRIES as u32).map(|d| 65536 >> d.min(16)).collect();
        let floor = -(ACTIVATION_MAX as i32);
        let x = ITensor {
            shape: vec![2, 3],
            data: vec![5, 5, floor, floor, floor, floor],
        };
        let masked = softmax(&x, 1, &table, true).expect("softmax");
        // Row 1: the floor entry gets nothing; row 2, all at the floor: equal thirds.
        assert_eq!(masked.data, vec![16384, 16384, 0, 10922, 10922, 10922]);
        // Unmasked, the floor is just a very small value: here past the table, so also 0.
        let plain = softmax(&x, 1, &[65536, 30000], false).expect("softmax");
        assert_eq!(plain.data[..3], [16384, 16384, 0]);
        // A masked entry inside the table's reach still gets nothing.
        let near = ITensor {
            shape: vec![1, 2],
            data: vec![floor + 1, floor],
        };
        assert_eq!(softmax(&near, 1, &table, true).expect("softmax").data, vec![32767, 0]);
        assert_eq!(
            softmax(&near, 1, &table, false).expect("softmax").data,
            vec![21845, 10922]
        );
    }

    #[test]
    fn products_refuse_operands_outside_the_activation_range() {
        // Only a hostile plan feeds such values to a product; no kernel may compute them.
        let x = ITensor {
            shape: vec![1, 2],
            data: vec![40_000, 1],
        };
        let one = Multiplier { m: 1 << 30, shift: 30 };
        let (weights, bias, requant) = ([1, 1], [0], [one]);
        let channels = Channels::new(&weights, &bias, &requant, -32767, 32767).expect("range");
        let error = dense(&x, 2, 1, &channels, &ExecOptions::default()).expect_err("refused");
        assert!(error.contains("outside the activation range"), "{error}");
    }

    #[test]
    fn products_refuse_an_empty_or_oversized_output_range() {
        let one = Multiplier { m: 1 << 30, shift: 30 };
        for (low, high) in [(5, 4), (-40_000, 0), (0, 32768)] {
            let error = Channels::new(&[1], &[0], &[one], low, high).err().expect("refused");
            assert!(error.contains("output range"), "{error}");
        }
    }

    #[test]
    fn nan_inputs_are_refused() {
        let plan = Plan {
            inputs: vec![crate::plan::PlanInput {
                name: "x".into(),
                kind: InputKind::Quantized {
                    inverse_scale: Multiplier { m: 1 << 30, shift: 30 },
                },
                shape: vec![PlanDim::Fixed(2)],
            }],
            instrs: vec![],
            outputs: vec![],
        };
        let input = NamedTensor {
            name: None,
            tensor: Tensor::new(vec![2], TensorData::F32(vec![1.0, f32::NAN])).expect("tensor"),
        };
        let error = execute(&plan, &[input], &ExecOptions::default())
            .expect_err("NaN")
            .to_string();
        assert!(error.contains("input 'x': element 1 is NaN"), "{error}");
    }

    #[test]
    fn move_axis_transposes() {
        let x = ITensor {
            shape: vec![2, 3],
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let y = move_axis(&x, 0, 1).expect("move");
        assert_eq!(y.shape, vec![3, 2]);
        assert_eq!(y.data, vec![1, 4, 2, 5, 3, 6]);
    }
}
