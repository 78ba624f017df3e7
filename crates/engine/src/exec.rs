//! Executes an exact plan with integers only.
//!
//! Every kernel computes exact integer sums, so the order in which a kernel adds (threads, SIMD
//! lanes, blocking) cannot change a single bit; [`ExecOptions`] picks between kernels that add in
//! different orders, and the exactness tests check they agree.

use std::collections::HashMap;

use vouch_tensor::{DType, NamedTensor, Tensor, TensorData};

use crate::fixed::{ACTIVATION_MAX, Multiplier, div_round, quantize_f32_bits, saturate};
use crate::plan::{InputKind, Instr, OutputKind, Plan, PlanDim};

/// Entries of a lookup table: one for each activation from -32767 to 32767.
pub const LOOKUP_ENTRIES: usize = 2 * ACTIVATION_MAX as usize + 1;

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
    /// Worker threads for the large kernels (1 runs everything on the caller's thread).
    pub threads: usize,
    /// Use the lane-blocked kernels that the compiler turns into SIMD instructions; `false` uses
    /// plain one-element-at-a-time loops that add in a different order.
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

/// Runs a plan on named inputs.
pub fn execute(plan: &Plan, inputs: &[NamedTensor], options: &ExecOptions) -> Result<Execution, ExecError> {
    let mut values = bind_inputs(plan, inputs)?;
    for (index, instr) in plan.instrs.iter().enumerate() {
        let operands: Vec<&ITensor> = instr.inputs().iter().map(|v| &values[*v as usize]).collect();
        let value = run_instr(instr, &operands, options).map_err(|reason| ExecError::Instr {
            index,
            op: instr.name(),
            reason,
        })?;
        values.push(value);
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
            },
            shape: input.shape.clone(),
        })
        .collect()
}

/// Matches named tensors to the plan's inputs and converts them to integers.
fn bind_inputs(plan: &Plan, inputs: &[NamedTensor]) -> Result<Vec<ITensor>, ExecError> {
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
                xs.iter()
                    .map(|x| quantize_f32_bits(x.to_bits(), inverse_scale))
                    .collect()
            }
            (InputKind::Integer, TensorData::I64(xs)) => xs
                .iter()
                .map(|x| i32::try_from(*x).map_err(|_| error(format!("element {x} does not fit in 32 bits"))))
                .collect::<Result<_, _>>()?,
            (InputKind::Integer, TensorData::I32(xs)) => xs.clone(),
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
    shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .filter(|n| *n <= options.max_elements)
        .ok_or_else(|| {
            format!(
                "shape {shape:?} has more than the limit of {} elements",
                options.max_elements
            )
        })
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
            ..
        } => dense(operands[0], *k as usize, *n as usize, weights, bias, requant, options),
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
                data: x.data.iter().map(|v| (*v).clamp(*low, *high)).collect(),
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
        Instr::Softmax { axis, exp_table, .. } => softmax(operands[0], *axis as usize, exp_table),
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
    }
}

/// Sums `x[k] * w[k]` exactly, one element at a time.
fn dot_scalar(x: &[i32], w: &[i8]) -> i64 {
    let mut sum = 0i64;
    for (a, b) in x.iter().zip(w) {
        sum += i64::from(*a) * i64::from(*b);
    }
    sum
}

/// Sums `x[k] * w[k]` exactly in 16 independent `i32` lanes over blocks of at most 512 products
/// (each product is below 2^22, so a lane cannot overflow), then widens: the compiler turns the
/// lanes into SIMD instructions.
fn dot_lanes(x: &[i32], w: &[i8]) -> i64 {
    const LANES: usize = 16;
    const BLOCK: usize = 512;
    let mut total = 0i64;
    for (xb, wb) in x.chunks(BLOCK).zip(w.chunks(BLOCK)) {
        let mut lanes = [0i32; LANES];
        let mut xc = xb.chunks_exact(LANES);
        let mut wc = wb.chunks_exact(LANES);
        for (xs, ws) in (&mut xc).zip(&mut wc) {
            for lane in 0..LANES {
                lanes[lane] += xs[lane] * i32::from(ws[lane]);
            }
        }
        for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
            lanes[0] += a * i32::from(*b);
        }
        total += lanes.iter().map(|v| i64::from(*v)).sum::<i64>();
    }
    total
}

fn dense(
    x: &ITensor,
    k: usize,
    n: usize,
    weights: &[i8],
    bias: &[i64],
    requant: &[Multiplier],
    options: &ExecOptions,
) -> Result<ITensor, String> {
    if x.shape.last() != Some(&k) {
        return Err(format!("input shape {:?} does not end in {k}", x.shape));
    }
    if weights.len() != n * k || bias.len() != n || requant.len() != n {
        return Err("weight, bias and requantization sizes disagree".into());
    }
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    element_count(&shape, options)?;
    // The lane kernel's no-overflow bound assumes activations; a plan that feeds other integers
    // into a product is refused rather than computed differently by different kernels.
    if let Some(v) = x.data.iter().find(|v| v.unsigned_abs() > ACTIVATION_MAX as u32) {
        return Err(format!("operand value {v} is outside the activation range"));
    }
    let rows = x.data.len().checked_div(k).unwrap_or(0);
    let dot = if options.simd { dot_lanes } else { dot_scalar };
    let row = |r: usize, out: &mut [i32]| {
        let xr = &x.data[r * k..(r + 1) * k];
        for (j, slot) in out.iter_mut().enumerate() {
            let acc = dot(xr, &weights[j * k..(j + 1) * k]) + bias[j];
            *slot = saturate(requant[j].apply(acc));
        }
    };
    let mut data = vec![0i32; rows * n];
    let work = rows.saturating_mul(n).saturating_mul(k);
    let threads = options.threads.clamp(1, rows.max(1));
    if threads == 1 || work < (1 << 16) || n == 0 {
        for (r, out) in data.chunks_mut(n.max(1)).enumerate().take(rows) {
            row(r, out);
        }
    } else {
        let rows_per_thread = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (chunk_index, chunk) in data.chunks_mut(rows_per_thread * n).enumerate() {
                let row = &row;
                scope.spawn(move || {
                    for (i, out) in chunk.chunks_mut(n).enumerate() {
                        row(chunk_index * rows_per_thread + i, out);
                    }
                });
            }
        });
    }
    Ok(ITensor { shape, data })
}

/// NumPy broadcasting of two tensors through `f`.
fn broadcast(a: &ITensor, b: &ITensor, options: &ExecOptions, f: impl Fn(i32, i32) -> i32) -> Result<ITensor, String> {
    if a.shape == b.shape {
        return Ok(ITensor {
            shape: a.shape.clone(),
            data: a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect(),
        });
    }
    let rank = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let mut shape = Vec::with_capacity(rank);
    for (x, y) in sa.iter().zip(&sb) {
        shape.push(match (x, y) {
            (x, y) if x == y => *x,
            (1, y) => *y,
            (x, 1) => *x,
            _ => return Err(format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape)),
        });
    }
    let count = element_count(&shape, options)?;
    let strides = |s: &[usize]| -> Vec<usize> {
        let mut strides = vec![0usize; rank];
        let mut step = 1;
        for axis in (0..rank).rev() {
            strides[axis] = if s[axis] == 1 { 0 } else { step };
            step *= s[axis];
        }
        strides
    };
    let (ta, tb) = (strides(&sa), strides(&sb));
    let mut index = vec![0usize; rank];
    let mut data = Vec::with_capacity(count);
    let (mut oa, mut ob) = (0usize, 0usize);
    for _ in 0..count {
        data.push(f(a.data[oa], b.data[ob]));
        for axis in (0..rank).rev() {
            index[axis] += 1;
            oa += ta[axis];
            ob += tb[axis];
            if index[axis] < shape[axis] {
                break;
            }
            oa -= ta[axis] * shape[axis];
            ob -= tb[axis] * shape[axis];
            index[axis] = 0;
        }
    }
    Ok(ITensor { shape, data })
}

fn softmax(x: &ITensor, axis: usize, exp_table: &[u32]) -> Result<ITensor, String> {
    let len = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let mut data = vec![0i32; x.data.len()];
    let mut exps = vec![0u64; len];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * len + j) * inner + i;
            let max = (0..len).map(|j| x.data[at(j)]).max().unwrap_or(0);
            let mut sum = 0u64;
            for (j, e) in exps.iter_mut().enumerate() {
                let distance = (i64::from(max) - i64::from(x.data[at(j)])) as usize;
                *e = u64::from(exp_table.get(distance).copied().unwrap_or(0));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dot_kernels_agree(pairs in proptest::collection::vec((-32767i32..=32767, -127i8..=127), 0..3000)) {
            let (x, w): (Vec<i32>, Vec<i8>) = pairs.into_iter().unzip();
            prop_assert_eq!(dot_scalar(&x, &w), dot_lanes(&x, &w));
        }
    }

    #[test]
    fn softmax_rounds_to_the_rule() {
        // Two equal logits: each gets exactly half of 32767, rounded up.
        let x = ITensor {
            shape: vec![1, 2],
            data: vec![5, 5],
        };
        let y = softmax(&x, 1, &[65536, 30000]).expect("softmax");
        assert_eq!(y.data, vec![16384, 16384]);
    }

    #[test]
    fn products_refuse_operands_outside_the_activation_range() {
        // Only a hostile plan feeds such values to a product; no kernel may compute them.
        let x = ITensor {
            shape: vec![1, 2],
            data: vec![40_000, 1],
        };
        let one = Multiplier { m: 1 << 30, shift: 30 };
        let error = dense(&x, 2, 1, &[1, 1], &[0], &[one], &ExecOptions::default()).expect_err("refused");
        assert!(error.contains("outside the activation range"), "{error}");
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
