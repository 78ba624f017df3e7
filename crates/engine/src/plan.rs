//! The exact plan: an integer program with a canonical encoding and a content id.
//!
//! Values are numbered: the plan's inputs first, then one value per instruction, in order. Every
//! value is a tensor of `i32` elements. A *quantized* value stands for `q * scale` with `q` in
//! `[-32767, 32767]`; an *integer* value (token ids, say) holds exact integers. Scales never enter
//! execution: every rescaling is a [`Multiplier`] fixed when the plan is built.

use bytes::BufMut;
use vouch_codec::Buf;
use vouch_codec::{Error as CodecError, RangeCfg, Read, ReadExt, Write};
use vouch_types::BlobId;

use crate::fixed::{ACTIVATION_MAX, Multiplier};
pub use crate::ir::{CompareOp, LogicOp, Window};

/// Largest kernel size, stride, dilation or padding a plan may give one spatial axis.
pub const MAX_WINDOW_EXTENT: usize = 1 << 16;
/// Most spatial axes of a convolution or pooling window.
pub const MAX_SPATIAL_RANK: usize = 3;

/// Current encoding version of a plan.
pub const PLAN_FORMAT_VERSION: u8 = 1;

/// Index of a value in a plan: inputs first, then one per instruction.
pub type PlanValue = u32;

/// A dimension of an input's declared shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanDim {
    /// Must be exactly this.
    Fixed(u64),
    /// Any size, the same wherever the same symbol appears.
    Symbol(String),
}

/// How a plan input arrives from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// float32 elements, quantized by `inverse_scale` (`q = floor(x * m / 2^shift + 1/2)`).
    Quantized {
        /// `1 / scale` as a multiplier.
        inverse_scale: Multiplier,
    },
    /// Integer elements (int64 or int32), which must fit in `i32`.
    Integer,
    /// Booleans, held as 1 and 0.
    Boolean,
}

/// A model input as the plan receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    /// The model's name for it.
    pub name: String,
    /// How it is converted.
    pub kind: InputKind,
    /// The shape the model declares.
    pub shape: Vec<PlanDim>,
}

/// How a plan output is handed to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// float32 `q * scale`: one IEEE-754 multiplication, the same on every machine.
    Dequantized {
        /// The scale's float32 bits.
        scale_bits: u32,
    },
    /// The integers themselves, as int64.
    Integer,
    /// Booleans: non-zero is true.
    Boolean,
}

/// A model output and the value that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOutput {
    /// The model's name for it.
    pub name: String,
    /// The value.
    pub value: PlanValue,
    /// How it is handed out.
    pub kind: OutputKind,
}

/// One integer operation. Inputs are earlier values; the result is the next value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instr {
    /// A constant tensor.
    Const {
        /// Dimensions.
        shape: Vec<u64>,
        /// Elements.
        data: Vec<i32>,
    },
    /// `y[.., j] = rq_j(sum_k x[.., k] * w[j, k] + bias[j])`: a product with constant int8
    /// weights over the last axis, per-output-channel requantization.
    Dense {
        /// The activation, last axis `k`.
        input: PlanValue,
        /// Length of the contracted axis.
        k: u32,
        /// Output channels.
        n: u32,
        /// `n * k` weights, channel-major (`w[j * k + kk]`).
        weights: Vec<i8>,
        /// `n` biases at the accumulator's scale.
        bias: Vec<i64>,
        /// `n` requantization factors, accumulator scale to output scale.
        requant: Vec<Multiplier>,
        /// Lowest output: a ReLU or clip that followed the product, fused into it (encoded under
        /// a tag of its own only when narrower than the activations, so plans without one keep
        /// their bytes).
        low: i32,
        /// Highest output.
        high: i32,
    },
    /// `y = sat(rq_a(a) ± rq_b(b))` with NumPy broadcasting.
    AddSub {
        /// Left operand.
        a: PlanValue,
        /// Right operand.
        b: PlanValue,
        /// Left factor to the output scale.
        scale_a: Multiplier,
        /// Right factor to the output scale.
        scale_b: Multiplier,
        /// `a - b` instead of `a + b`.
        subtract: bool,
    },
    /// `y = sat(rq(a * b))` with NumPy broadcasting.
    Mul {
        /// Left operand.
        a: PlanValue,
        /// Right operand.
        b: PlanValue,
        /// Product scale to output scale.
        requant: Multiplier,
    },
    /// `y = clamp(x, low, high)`, scale unchanged (ReLU, clipping).
    Clamp {
        /// The operand.
        input: PlanValue,
        /// Lowest output.
        low: i32,
        /// Highest output.
        high: i32,
    },
    /// `y = table[x + 32767]`: any function of one quantized value, tabulated at build time.
    Lookup {
        /// The operand.
        input: PlanValue,
        /// 65535 outputs, one for each input from -32767 to 32767.
        table: Vec<i32>,
    },
    /// Softmax over `axis`: `e_i = exp_table[max - x_i]` (0 past the table),
    /// `y_i = floor(e_i * 32767 / sum e + 1/2)`; output scale 1/32767.
    Softmax {
        /// The operand.
        input: PlanValue,
        /// The axis.
        axis: u32,
        /// `floor(2^16 * exp(-d * scale) + 1/2)` for `d = 0, 1, ..` until it reaches 0.
        exp_table: Vec<u32>,
        /// Inputs at the floor, -32767, stand for minus infinity (masked attention) and get
        /// `e_i = 0`, unless the whole row is at the floor.
        masked: bool,
    },
    /// Inserts an axis of size 1.
    AddAxis {
        /// The operand.
        input: PlanValue,
        /// Where.
        axis: u32,
    },
    /// Removes an axis of size 1.
    RemoveAxis {
        /// The operand.
        input: PlanValue,
        /// Which.
        axis: u32,
    },
    /// Moves one axis (a transposition).
    MoveAxis {
        /// The operand.
        input: PlanValue,
        /// Where it is.
        from: u32,
        /// Where it goes.
        to: u32,
    },
    /// Convolution of `[batch, c_in, spatial..]` data with int8 weights
    /// `[c_out][c_in / group][kernel..]`: `y = rq_o(sum w * x + bias_o)`; padding reads 0.
    Conv {
        /// The data.
        input: PlanValue,
        /// The window.
        window: Window,
        /// Channel groups.
        group: u32,
        /// Input channels.
        c_in: u32,
        /// Output channels.
        c_out: u32,
        /// The weights, output channel by output channel.
        weights: Vec<i8>,
        /// `c_out` biases at the accumulator's scale.
        bias: Vec<i64>,
        /// `c_out` requantization factors.
        requant: Vec<Multiplier>,
        /// Lowest output: a ReLU or clip that followed the convolution, fused into it.
        low: i32,
        /// Highest output.
        high: i32,
    },
    /// The largest value of each window over `[batch, channels, spatial..]`; padding is skipped.
    MaxPool {
        /// The data.
        input: PlanValue,
        /// The window.
        window: Window,
    },
    /// The mean of each window, `floor(sum / count + 1/2)`, scale unchanged.
    AvgPool {
        /// The data.
        input: PlanValue,
        /// The window.
        window: Window,
        /// Whether padded positions count in `count`.
        count_include_pad: bool,
    },
    /// `y = sat(rq(sum over axes))`, or of the squares; the axes stay with size 1.
    ReduceSum {
        /// The operand.
        input: PlanValue,
        /// The axes, increasing.
        axes: Vec<u32>,
        /// Sum scale to output scale.
        requant: Multiplier,
        /// Sums `x^2` instead of `x`.
        squares: bool,
    },
    /// The largest (or smallest) value over axes, which stay with size 1; scale unchanged.
    ReduceMinMax {
        /// The operand.
        input: PlanValue,
        /// The axes, increasing.
        axes: Vec<u32>,
        /// `true`: the largest; `false`: the smallest.
        max: bool,
    },
    /// The size of one axis of a value, as an integer scalar.
    Dim {
        /// The value.
        input: PlanValue,
        /// The axis.
        axis: u32,
    },
    /// Entries of `input` along `axis` picked by integer `indices` (negative ones count from the
    /// end); the output's shape is the input's with `axis` replaced by the indices' shape.
    Gather {
        /// The data.
        input: PlanValue,
        /// The indices.
        indices: PlanValue,
        /// The axis.
        axis: u32,
    },
    /// Rows of a constant int8 table picked by integer `indices`, each row requantized by its own
    /// factor: `y[.., j] = sat(rq_r(table[r][j]))` for `r = indices[..]` (an embedding).
    Embedding {
        /// The indices.
        indices: PlanValue,
        /// Rows of the table.
        rows: u32,
        /// Elements per row.
        width: u32,
        /// `rows * width` values, row-major.
        table: Vec<i8>,
        /// One factor per row, row scale to output scale.
        requant: Vec<Multiplier>,
    },
    /// Slices of `input` picked by the index tuples along the last axis of `indices` (ONNX
    /// GatherND without batch dimensions).
    GatherNd {
        /// The data.
        input: PlanValue,
        /// The index tuples.
        indices: PlanValue,
    },
    /// The inputs joined along `axis`; they share a scale (or are all integers).
    Concat {
        /// The values joined.
        inputs: Vec<PlanValue>,
        /// The axis.
        axis: u32,
    },
    /// `input[start..end]` along `axis`, with integer scalar bounds clamped to the axis.
    Slice {
        /// The data.
        input: PlanValue,
        /// The axis.
        axis: u32,
        /// First index kept.
        start: PlanValue,
        /// One past the last index kept.
        end: PlanValue,
    },
    /// `start, start + step, ..` up to `end` (excluded), from three integer scalars.
    Range {
        /// First element.
        start: PlanValue,
        /// Bound, excluded.
        end: PlanValue,
        /// Step, not 0.
        step: PlanValue,
    },
    /// `input` broadcast with the 1-D integer `shape` (ONNX Expand).
    Expand {
        /// The data.
        input: PlanValue,
        /// The shape.
        shape: PlanValue,
    },
    /// `y = sat(rq(x))`: a value moved to another scale.
    Rescale {
        /// The operand.
        input: PlanValue,
        /// Input scale to output scale.
        factor: Multiplier,
    },
    /// `y = cond != 0 ? a : b` with broadcasting; `a` and `b` share the output's scale.
    Where {
        /// The condition.
        cond: PlanValue,
        /// Taken where the condition holds.
        a: PlanValue,
        /// Taken elsewhere.
        b: PlanValue,
    },
    /// `y = rq_a(a) op rq_b(b)` as 1 or 0, with broadcasting; the factors bring both operands to
    /// one scale, without saturating.
    Compare {
        /// Left operand.
        a: PlanValue,
        /// Right operand.
        b: PlanValue,
        /// The comparison.
        op: CompareOp,
        /// Left factor.
        scale_a: Multiplier,
        /// Right factor.
        scale_b: Multiplier,
    },
    /// Logic on values read as booleans (non-zero is true), giving 1 or 0, with broadcasting.
    Logic {
        /// Left operand.
        a: PlanValue,
        /// Right operand.
        b: PlanValue,
        /// The operation.
        op: LogicOp,
    },
    /// `y = sat(rq(x * 2^46 / sqrt(sum x^2 + epsilon)))` along `axis` (exact integer square root,
    /// see the exec module): RMS normalization, the core of layer normalization.
    RmsNorm {
        /// The operand.
        input: PlanValue,
        /// The axis normalized.
        axis: u32,
        /// `eps` in units of the input's scale squared, times the axis length.
        epsilon: u64,
        /// To the output scale.
        requant: Multiplier,
    },
    /// `y[.., m, n] = sat(rq(sum_k a[.., m, k] * b[.., n, k]))`: a product of two activations,
    /// batch axes broadcast.
    MatMul {
        /// Left operand, `[.., m, k]`.
        a: PlanValue,
        /// Right operand, transposed: `[.., n, k]`.
        b: PlanValue,
        /// Product scale to output scale.
        requant: Multiplier,
    },
    /// Replaces `from_rank` axes starting at `at` by `to` (one may be 0: inferred from the count).
    Reshape {
        /// The operand.
        input: PlanValue,
        /// First axis replaced.
        at: u32,
        /// How many axes are replaced.
        from_rank: u32,
        /// The new dimensions; 0 stands for the one inferred.
        to: Vec<u64>,
    },
}

impl Instr {
    /// The values this instruction reads.
    pub fn inputs(&self) -> Vec<PlanValue> {
        match self {
            Self::Const { .. } => vec![],
            Self::Dense { input, .. }
            | Self::Clamp { input, .. }
            | Self::Lookup { input, .. }
            | Self::Softmax { input, .. }
            | Self::AddAxis { input, .. }
            | Self::RemoveAxis { input, .. }
            | Self::MoveAxis { input, .. }
            | Self::Reshape { input, .. }
            | Self::Conv { input, .. }
            | Self::MaxPool { input, .. }
            | Self::AvgPool { input, .. }
            | Self::ReduceSum { input, .. }
            | Self::ReduceMinMax { input, .. }
            | Self::Dim { input, .. }
            | Self::Rescale { input, .. }
            | Self::RmsNorm { input, .. } => vec![*input],
            Self::Embedding { indices, .. } => vec![*indices],
            Self::AddSub { a, b, .. }
            | Self::Mul { a, b, .. }
            | Self::Compare { a, b, .. }
            | Self::Logic { a, b, .. }
            | Self::MatMul { a, b, .. } => vec![*a, *b],
            Self::Gather { input, indices, .. } | Self::GatherNd { input, indices } => vec![*input, *indices],
            Self::Concat { inputs, .. } => inputs.clone(),
            Self::Slice { input, start, end, .. } => vec![*input, *start, *end],
            Self::Range { start, end, step } => vec![*start, *end, *step],
            Self::Expand { input, shape } => vec![*input, *shape],
            Self::Where { cond, a, b } => vec![*cond, *a, *b],
        }
    }

    /// The instruction's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Const { .. } => "Const",
            Self::Dense { .. } => "Dense",
            Self::AddSub { subtract: false, .. } => "Add",
            Self::AddSub { subtract: true, .. } => "Sub",
            Self::Mul { .. } => "Mul",
            Self::Clamp { .. } => "Clamp",
            Self::Lookup { .. } => "Lookup",
            Self::Softmax { .. } => "Softmax",
            Self::AddAxis { .. } => "AddAxis",
            Self::RemoveAxis { .. } => "RemoveAxis",
            Self::MoveAxis { .. } => "MoveAxis",
            Self::Reshape { .. } => "Reshape",
            Self::Conv { .. } => "Conv",
            Self::MaxPool { .. } => "MaxPool",
            Self::AvgPool { .. } => "AvgPool",
            Self::ReduceSum { squares: false, .. } => "ReduceSum",
            Self::ReduceSum { squares: true, .. } => "ReduceSumSquares",
            Self::ReduceMinMax { max: true, .. } => "ReduceMax",
            Self::ReduceMinMax { max: false, .. } => "ReduceMin",
            Self::Dim { .. } => "Dim",
            Self::Gather { .. } => "Gather",
            Self::Embedding { .. } => "Embedding",
            Self::GatherNd { .. } => "GatherNd",
            Self::Concat { .. } => "Concat",
            Self::Slice { .. } => "Slice",
            Self::Range { .. } => "Range",
            Self::Expand { .. } => "Expand",
            Self::Rescale { .. } => "Rescale",
            Self::Where { .. } => "Where",
            Self::Compare { .. } => "Compare",
            Self::Logic { .. } => "Logic",
            Self::RmsNorm { .. } => "RmsNorm",
            Self::MatMul { .. } => "MatMul",
        }
    }
}

/// An exact plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The inputs, in the model's order.
    pub inputs: Vec<PlanInput>,
    /// The program.
    pub instrs: Vec<Instr>,
    /// The outputs, in the model's order.
    pub outputs: Vec<PlanOutput>,
}

/// Bounds on what the plan decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Most instructions.
    pub max_instrs: usize,
    /// Most inputs or outputs.
    pub max_io: usize,
    /// Most dimensions of a shape.
    pub max_rank: usize,
    /// Most elements in one constant, weight matrix or table.
    pub max_elements: usize,
    /// Longest name, in bytes.
    pub max_name_bytes: usize,
    /// Most values one concatenation joins.
    pub max_concat_inputs: usize,
}

impl Default for PlanLimits {
    fn default() -> Self {
        Self {
            max_instrs: 100_000,
            max_io: 64,
            max_rank: 8,
            max_elements: 1 << 28,
            max_name_bytes: 256,
            max_concat_inputs: 1024,
        }
    }
}

impl Plan {
    /// The number of values: inputs plus instructions.
    pub fn value_count(&self) -> usize {
        self.inputs.len() + self.instrs.len()
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u8(PLAN_FORMAT_VERSION);
        self.inputs.len().write(&mut out);
        for input in &self.inputs {
            vouch_codec::write_str(&input.name, &mut out);
            match input.kind {
                InputKind::Quantized { inverse_scale } => {
                    out.put_u8(0);
                    write_multiplier(inverse_scale, &mut out);
                }
                InputKind::Integer => out.put_u8(1),
                InputKind::Boolean => out.put_u8(2),
            }
            input.shape.len().write(&mut out);
            for dim in &input.shape {
                match dim {
                    PlanDim::Fixed(n) => {
                        out.put_u8(0);
                        out.put_u64(*n);
                    }
                    PlanDim::Symbol(name) => {
                        out.put_u8(1);
                        vouch_codec::write_str(name, &mut out);
                    }
                }
            }
        }
        self.instrs.len().write(&mut out);
        for instr in &self.instrs {
            write_instr(instr, &mut out);
        }
        self.outputs.len().write(&mut out);
        for output in &self.outputs {
            vouch_codec::write_str(&output.name, &mut out);
            out.put_u32(output.value);
            match output.kind {
                OutputKind::Dequantized { scale_bits } => {
                    out.put_u8(0);
                    out.put_u32(scale_bits);
                }
                OutputKind::Integer => out.put_u8(1),
                OutputKind::Boolean => out.put_u8(2),
            }
        }
        out
    }

    /// The plan id: the content id of the canonical encoding.
    pub fn id(&self) -> BlobId {
        BlobId::of(&self.encode())
    }

    /// Decodes a plan, refusing anything over the limits, any value read before it exists, and
    /// any encoding that is not the canonical one.
    pub fn decode(bytes: &[u8], limits: &PlanLimits) -> Result<Self, CodecError> {
        let plan =
            vouch_codec::decode_canonical(bytes, |b| decode_plan(b, limits), Plan::encode).map_err(|e| match e {
                vouch_codec::CanonicalError::Malformed(e) => e,
                vouch_codec::CanonicalError::NotCanonical => CodecError::Invalid("plan", "encoding is not canonical"),
            })?;
        plan.check_references()?;
        Ok(plan)
    }

    /// Checks every instruction reads only earlier values and outputs name existing ones.
    fn check_references(&self) -> Result<(), CodecError> {
        let inputs = self.inputs.len();
        for (index, instr) in self.instrs.iter().enumerate() {
            if instr.inputs().iter().any(|v| *v as usize >= inputs + index) {
                return Err(CodecError::Invalid("plan", "an instruction reads a later value"));
            }
        }
        if self.outputs.iter().any(|o| o.value as usize >= self.value_count()) {
            return Err(CodecError::Invalid("plan", "an output names a missing value"));
        }
        Ok(())
    }
}

fn write_multiplier(m: Multiplier, out: &mut Vec<u8>) {
    out.put_u32(m.m as u32);
    out.put_u8(m.shift as u8);
}

fn read_multiplier(buf: &mut impl Buf) -> Result<Multiplier, CodecError> {
    let m = u32::read(buf)?;
    let shift = u8::read(buf)?;
    if m >= 1 << 31 || u32::from(shift) > Multiplier::MAX_SHIFT {
        return Err(CodecError::Invalid("plan", "multiplier out of range"));
    }
    Ok(Multiplier {
        m: i64::from(m),
        shift: u32::from(shift),
    })
}

fn write_i32s(values: &[i32], out: &mut Vec<u8>) {
    values.len().write(out);
    for v in values {
        out.put_i32(*v);
    }
}

fn read_i32s(buf: &mut impl Buf, max: usize) -> Result<Vec<i32>, CodecError> {
    vouch_codec::read_vec(buf, max, |b| i32::read(b))
}

fn write_u64s(values: &[u64], out: &mut Vec<u8>) {
    values.len().write(out);
    for v in values {
        out.put_u64(*v);
    }
}

fn write_instr(instr: &Instr, out: &mut Vec<u8>) {
    match instr {
        Instr::Const { shape, data } => {
            out.put_u8(0);
            write_u64s(shape, out);
            write_i32s(data, out);
        }
        Instr::Dense {
            input,
            k,
            n,
            weights,
            bias,
            requant,
            low,
            high,
        } => {
            // A product with the full output range keeps its original tag and bytes.
            let clamped = (*low, *high) != FULL_RANGE;
            out.put_u8(if clamped { 32 } else { 1 });
            out.put_u32(*input);
            out.put_u32(*k);
            out.put_u32(*n);
            write_channels(weights, bias, requant, out);
            if clamped {
                out.put_i32(*low);
                out.put_i32(*high);
            }
        }
        Instr::AddSub {
            a,
            b,
            scale_a,
            scale_b,
            subtract,
        } => {
            out.put_u8(2);
            out.put_u32(*a);
            out.put_u32(*b);
            write_multiplier(*scale_a, out);
            write_multiplier(*scale_b, out);
            out.put_u8(u8::from(*subtract));
        }
        Instr::Mul { a, b, requant } => {
            out.put_u8(3);
            out.put_u32(*a);
            out.put_u32(*b);
            write_multiplier(*requant, out);
        }
        Instr::Clamp { input, low, high } => {
            out.put_u8(4);
            out.put_u32(*input);
            out.put_i32(*low);
            out.put_i32(*high);
        }
        Instr::Lookup { input, table } => {
            out.put_u8(5);
            out.put_u32(*input);
            write_i32s(table, out);
        }
        Instr::Softmax {
            input,
            axis,
            exp_table,
            masked,
        } => {
            // Tag 6 predates masking; a masked softmax is its own tag, so older plans keep their ids.
            out.put_u8(if *masked { 30 } else { 6 });
            out.put_u32(*input);
            out.put_u32(*axis);
            exp_table.len().write(out);
            for v in exp_table {
                out.put_u32(*v);
            }
        }
        Instr::AddAxis { input, axis } => {
            out.put_u8(7);
            out.put_u32(*input);
            out.put_u32(*axis);
        }
        Instr::RemoveAxis { input, axis } => {
            out.put_u8(8);
            out.put_u32(*input);
            out.put_u32(*axis);
        }
        Instr::MoveAxis { input, from, to } => {
            out.put_u8(9);
            out.put_u32(*input);
            out.put_u32(*from);
            out.put_u32(*to);
        }
        Instr::Reshape {
            input,
            at,
            from_rank,
            to,
        } => {
            out.put_u8(10);
            out.put_u32(*input);
            out.put_u32(*at);
            out.put_u32(*from_rank);
            write_u64s(to, out);
        }
        Instr::Conv {
            input,
            window,
            group,
            c_in,
            c_out,
            weights,
            bias,
            requant,
            low,
            high,
        } => {
            let clamped = (*low, *high) != FULL_RANGE;
            out.put_u8(if clamped { 33 } else { 11 });
            out.put_u32(*input);
            write_window(window, out);
            out.put_u32(*group);
            out.put_u32(*c_in);
            out.put_u32(*c_out);
            write_channels(weights, bias, requant, out);
            if clamped {
                out.put_i32(*low);
                out.put_i32(*high);
            }
        }
        Instr::MaxPool { input, window } => {
            out.put_u8(12);
            out.put_u32(*input);
            write_window(window, out);
        }
        Instr::AvgPool {
            input,
            window,
            count_include_pad,
        } => {
            out.put_u8(13);
            out.put_u32(*input);
            write_window(window, out);
            out.put_u8(u8::from(*count_include_pad));
        }
        Instr::ReduceSum {
            input,
            axes,
            requant,
            squares,
        } => {
            // Tag 14 predates sums of squares, which are their own tag so older plans keep their ids.
            out.put_u8(if *squares { 31 } else { 14 });
            out.put_u32(*input);
            write_u32s(axes, out);
            write_multiplier(*requant, out);
        }
        Instr::ReduceMinMax { input, axes, max } => {
            out.put_u8(15);
            out.put_u32(*input);
            write_u32s(axes, out);
            out.put_u8(u8::from(*max));
        }
        Instr::Dim { input, axis } => {
            out.put_u8(16);
            out.put_u32(*input);
            out.put_u32(*axis);
        }
        Instr::Gather { input, indices, axis } => {
            out.put_u8(17);
            out.put_u32(*input);
            out.put_u32(*indices);
            out.put_u32(*axis);
        }
        Instr::Embedding {
            indices,
            rows,
            width,
            table,
            requant,
        } => {
            out.put_u8(18);
            out.put_u32(*indices);
            out.put_u32(*rows);
            out.put_u32(*width);
            write_channels(table, &[], requant, out);
        }
        Instr::GatherNd { input, indices } => {
            out.put_u8(19);
            out.put_u32(*input);
            out.put_u32(*indices);
        }
        Instr::Concat { inputs, axis } => {
            out.put_u8(20);
            write_u32s(inputs, out);
            out.put_u32(*axis);
        }
        Instr::Slice {
            input,
            axis,
            start,
            end,
        } => {
            out.put_u8(21);
            out.put_u32(*input);
            out.put_u32(*axis);
            out.put_u32(*start);
            out.put_u32(*end);
        }
        Instr::Range { start, end, step } => {
            out.put_u8(22);
            out.put_u32(*start);
            out.put_u32(*end);
            out.put_u32(*step);
        }
        Instr::Expand { input, shape } => {
            out.put_u8(23);
            out.put_u32(*input);
            out.put_u32(*shape);
        }
        Instr::Rescale { input, factor } => {
            out.put_u8(24);
            out.put_u32(*input);
            write_multiplier(*factor, out);
        }
        Instr::Where { cond, a, b } => {
            out.put_u8(25);
            out.put_u32(*cond);
            out.put_u32(*a);
            out.put_u32(*b);
        }
        Instr::Compare {
            a,
            b,
            op,
            scale_a,
            scale_b,
        } => {
            out.put_u8(26);
            out.put_u32(*a);
            out.put_u32(*b);
            out.put_u8(match op {
                CompareOp::Eq => 0,
                CompareOp::Ne => 1,
                CompareOp::Lt => 2,
                CompareOp::Le => 3,
                CompareOp::Gt => 4,
                CompareOp::Ge => 5,
            });
            write_multiplier(*scale_a, out);
            write_multiplier(*scale_b, out);
        }
        Instr::Logic { a, b, op } => {
            out.put_u8(27);
            out.put_u32(*a);
            out.put_u32(*b);
            out.put_u8(match op {
                LogicOp::And => 0,
                LogicOp::Or => 1,
                LogicOp::Xor => 2,
            });
        }
        Instr::RmsNorm {
            input,
            axis,
            epsilon,
            requant,
        } => {
            out.put_u8(28);
            out.put_u32(*input);
            out.put_u32(*axis);
            out.put_u64(*epsilon);
            write_multiplier(*requant, out);
        }
        Instr::MatMul { a, b, requant } => {
            out.put_u8(29);
            out.put_u32(*a);
            out.put_u32(*b);
            write_multiplier(*requant, out);
        }
    }
}

/// Weights, biases and requantization factors of a product with constant weights.
fn write_channels(weights: &[i8], bias: &[i64], requant: &[Multiplier], out: &mut Vec<u8>) {
    let bytes: Vec<u8> = weights.iter().map(|w| *w as u8).collect();
    bytes.write(out);
    bias.len().write(out);
    for b in bias {
        out.put_i64(*b);
    }
    requant.len().write(out);
    for m in requant {
        write_multiplier(*m, out);
    }
}

type ChannelParts = (Vec<i8>, Vec<i64>, Vec<Multiplier>);

fn read_channels(buf: &mut impl Buf, max: usize) -> Result<ChannelParts, CodecError> {
    let weights = Vec::<u8>::read_cfg(buf, &(RangeCfg::from(0..=max), ()))?;
    let bias = vouch_codec::read_vec(buf, max, |b| i64::read(b))?;
    let requant = vouch_codec::read_vec(buf, max, read_multiplier)?;
    Ok((weights.into_iter().map(|w| w as i8).collect(), bias, requant))
}

/// The output range of a product that has none narrower: every activation.
const FULL_RANGE: (i32, i32) = (-(ACTIVATION_MAX as i32), ACTIVATION_MAX as i32);

/// A product's output range: written only by the clamped tags, and then narrower than the full
/// range (one encoding per plan) and within it, lowest first.
fn read_output_range(buf: &mut impl Buf, clamped: bool) -> Result<(i32, i32), CodecError> {
    if !clamped {
        return Ok(FULL_RANGE);
    }
    let (low, high) = (i32::read(buf)?, i32::read(buf)?);
    if (low, high) != FULL_RANGE && FULL_RANGE.0 <= low && low <= high && high <= FULL_RANGE.1 {
        Ok((low, high))
    } else {
        Err(CodecError::Invalid(
            "plan",
            "a clamped product's range is empty, outside the activations or not narrower than them",
        ))
    }
}

fn write_u32s(values: &[u32], out: &mut Vec<u8>) {
    values.len().write(out);
    for v in values {
        out.put_u32(*v);
    }
}

fn write_window(window: &Window, out: &mut Vec<u8>) {
    window.kernel.len().write(out);
    for axis in 0..window.kernel.len() {
        for extent in [
            window.kernel[axis],
            window.strides[axis],
            window.dilations[axis],
            window.pads_before[axis],
            window.pads_after[axis],
        ] {
            out.put_u32(extent as u32);
        }
    }
}

fn read_window(buf: &mut impl Buf) -> Result<Window, CodecError> {
    let rank = usize::read_cfg(buf, &RangeCfg::from(1..=MAX_SPATIAL_RANK))?;
    let mut window = Window {
        kernel: Vec::with_capacity(rank),
        strides: Vec::with_capacity(rank),
        dilations: Vec::with_capacity(rank),
        pads_before: Vec::with_capacity(rank),
        pads_after: Vec::with_capacity(rank),
    };
    for _ in 0..rank {
        let mut extent = |at_least: usize| -> Result<usize, CodecError> {
            let value = u32::read(buf)? as usize;
            if value < at_least || value > MAX_WINDOW_EXTENT {
                return Err(CodecError::Invalid("plan", "window extent out of range"));
            }
            Ok(value)
        };
        window.kernel.push(extent(1)?);
        window.strides.push(extent(1)?);
        window.dilations.push(extent(1)?);
        window.pads_before.push(extent(0)?);
        window.pads_after.push(extent(0)?);
    }
    Ok(window)
}

/// Reads axes, which must be strictly increasing and below the rank limit.
fn read_axes(buf: &mut impl Buf, max_rank: usize) -> Result<Vec<u32>, CodecError> {
    let axes = vouch_codec::read_vec(buf, max_rank, |b| u32::read(b))?;
    if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|a| *a as usize >= max_rank) {
        return Err(CodecError::Invalid("plan", "reduction axes must increase"));
    }
    Ok(axes)
}

fn read_instr(buf: &mut impl Buf, limits: &PlanLimits) -> Result<Instr, CodecError> {
    let max = limits.max_elements;
    let rank = limits.max_rank;
    Ok(match u8::read(buf)? {
        0 => Instr::Const {
            shape: vouch_codec::read_vec(buf, rank, |b| u64::read(b))?,
            data: read_i32s(buf, max)?,
        },
        tag @ (1 | 32) => {
            let input = u32::read(buf)?;
            let k = u32::read(buf)?;
            let n = u32::read(buf)?;
            let (weights, bias, requant) = read_channels(buf, max)?;
            let (low, high) = read_output_range(buf, tag == 32)?;
            let channels = n as usize;
            if weights.len() != channels.saturating_mul(k as usize)
                || bias.len() != channels
                || requant.len() != channels
            {
                return Err(CodecError::Invalid("plan", "dense sizes disagree"));
            }
            Instr::Dense {
                input,
                k,
                n,
                weights,
                bias,
                requant,
                low,
                high,
            }
        }
        2 => Instr::AddSub {
            a: u32::read(buf)?,
            b: u32::read(buf)?,
            scale_a: read_multiplier(buf)?,
            scale_b: read_multiplier(buf)?,
            subtract: match u8::read(buf)? {
                0 => false,
                1 => true,
                _ => return Err(CodecError::Invalid("plan", "bad flag")),
            },
        },
        3 => Instr::Mul {
            a: u32::read(buf)?,
            b: u32::read(buf)?,
            requant: read_multiplier(buf)?,
        },
        4 => Instr::Clamp {
            input: u32::read(buf)?,
            low: i32::read(buf)?,
            high: i32::read(buf)?,
        },
        5 => {
            let input = u32::read(buf)?;
            let table = read_i32s(buf, crate::exec::LOOKUP_ENTRIES)?;
            if table.len() != crate::exec::LOOKUP_ENTRIES {
                return Err(CodecError::Invalid("plan", "lookup table has the wrong length"));
            }
            Instr::Lookup { input, table }
        }
        tag @ (6 | 30) => Instr::Softmax {
            input: u32::read(buf)?,
            axis: u32::read(buf)?,
            exp_table: vouch_codec::read_vec(buf, crate::exec::LOOKUP_ENTRIES, |b| u32::read(b))?,
            masked: tag == 30,
        },
        7 => Instr::AddAxis {
            input: u32::read(buf)?,
            axis: u32::read(buf)?,
        },
        8 => Instr::RemoveAxis {
            input: u32::read(buf)?,
            axis: u32::read(buf)?,
        },
        9 => Instr::MoveAxis {
            input: u32::read(buf)?,
            from: u32::read(buf)?,
            to: u32::read(buf)?,
        },
        10 => Instr::Reshape {
            input: u32::read(buf)?,
            at: u32::read(buf)?,
            from_rank: u32::read(buf)?,
            to: vouch_codec::read_vec(buf, rank, |b| u64::read(b))?,
        },
        tag @ (11 | 33) => {
            let input = u32::read(buf)?;
            let window = read_window(buf)?;
            let group = u32::read(buf)?;
            let c_in = u32::read(buf)?;
            let c_out = u32::read(buf)?;
            let (weights, bias, requant) = read_channels(buf, max)?;
            let (low, high) = read_output_range(buf, tag == 33)?;
            let taps: usize = window.kernel.iter().product();
            let fits = group > 0
                && c_in.is_multiple_of(group)
                && c_out.is_multiple_of(group)
                && weights.len()
                    == (c_out as usize)
                        .saturating_mul((c_in / group) as usize)
                        .saturating_mul(taps)
                && bias.len() == c_out as usize
                && requant.len() == c_out as usize;
            if !fits {
                return Err(CodecError::Invalid("plan", "convolution sizes disagree"));
            }
            Instr::Conv {
                input,
                window,
                group,
                c_in,
                c_out,
                weights,
                bias,
                requant,
                low,
                high,
            }
        }
        12 => Instr::MaxPool {
            input: u32::read(buf)?,
            window: read_window(buf)?,
        },
        13 => Instr::AvgPool {
            input: u32::read(buf)?,
            window: read_window(buf)?,
            count_include_pad: match u8::read(buf)? {
                0 => false,
                1 => true,
                _ => return Err(CodecError::Invalid("plan", "bad flag")),
            },
        },
        tag @ (14 | 31) => Instr::ReduceSum {
            input: u32::read(buf)?,
            axes: read_axes(buf, rank)?,
            requant: read_multiplier(buf)?,
            squares: tag == 31,
        },
        15 => Instr::ReduceMinMax {
            input: u32::read(buf)?,
            axes: read_axes(buf, rank)?,
            max: match u8::read(buf)? {
                0 => false,
                1 => true,
                _ => return Err(CodecError::Invalid("plan", "bad flag")),
            },
        },
        16 => Instr::Dim {
            input: u32::read(buf)?,
            axis: u32::read(buf)?,
        },
        17 => Instr::Gather {
            input: u32::read(buf)?,
            indices: u32::read(buf)?,
            axis: u32::read(buf)?,
        },
        18 => {
            let indices = u32::read(buf)?;
            let rows = u32::read(buf)?;
            let width = u32::read(buf)?;
            let (table, bias, requant) = read_channels(buf, max)?;
            if table.len() != (rows as usize).saturating_mul(width as usize)
                || !bias.is_empty()
                || requant.len() != rows as usize
            {
                return Err(CodecError::Invalid("plan", "embedding sizes disagree"));
            }
            Instr::Embedding {
                indices,
                rows,
                width,
                table,
                requant,
            }
        }
        19 => Instr::GatherNd {
            input: u32::read(buf)?,
            indices: u32::read(buf)?,
        },
        20 => Instr::Concat {
            inputs: vouch_codec::read_vec(buf, limits.max_concat_inputs, |b| u32::read(b))?,
            axis: u32::read(buf)?,
        },
        21 => Instr::Slice {
            input: u32::read(buf)?,
            axis: u32::read(buf)?,
            start: u32::read(buf)?,
            end: u32::read(buf)?,
        },
        22 => Instr::Range {
            start: u32::read(buf)?,
            end: u32::read(buf)?,
            step: u32::read(buf)?,
        },
        23 => Instr::Expand {
            input: u32::read(buf)?,
            shape: u32::read(buf)?,
        },
        24 => Instr::Rescale {
            input: u32::read(buf)?,
            factor: read_multiplier(buf)?,
        },
        25 => Instr::Where {
            cond: u32::read(buf)?,
            a: u32::read(buf)?,
            b: u32::read(buf)?,
        },
        26 => Instr::Compare {
            a: u32::read(buf)?,
            b: u32::read(buf)?,
            op: match u8::read(buf)? {
                0 => CompareOp::Eq,
                1 => CompareOp::Ne,
                2 => CompareOp::Lt,
                3 => CompareOp::Le,
                4 => CompareOp::Gt,
                5 => CompareOp::Ge,
                other => return Err(CodecError::InvalidEnum(other)),
            },
            scale_a: read_multiplier(buf)?,
            scale_b: read_multiplier(buf)?,
        },
        27 => Instr::Logic {
            a: u32::read(buf)?,
            b: u32::read(buf)?,
            op: match u8::read(buf)? {
                0 => LogicOp::And,
                1 => LogicOp::Or,
                2 => LogicOp::Xor,
                other => return Err(CodecError::InvalidEnum(other)),
            },
        },
        28 => Instr::RmsNorm {
            input: u32::read(buf)?,
            axis: u32::read(buf)?,
            epsilon: u64::read(buf)?,
            requant: read_multiplier(buf)?,
        },
        29 => Instr::MatMul {
            a: u32::read(buf)?,
            b: u32::read(buf)?,
            requant: read_multiplier(buf)?,
        },
        other => return Err(CodecError::InvalidEnum(other)),
    })
}

fn decode_plan(bytes: &[u8], limits: &PlanLimits) -> Result<Plan, CodecError> {
    let mut buf = bytes::Bytes::copy_from_slice(bytes);
    let version = u8::read(&mut buf)?;
    if version != PLAN_FORMAT_VERSION {
        return Err(CodecError::Invalid("plan", "unknown format version"));
    }
    let names = limits.max_name_bytes;
    let inputs = vouch_codec::read_vec(&mut buf, limits.max_io, |b| {
        let name = vouch_codec::read_str(b, names, "input name")?;
        let kind = match u8::read(b)? {
            0 => InputKind::Quantized {
                inverse_scale: read_multiplier(b)?,
            },
            1 => InputKind::Integer,
            2 => InputKind::Boolean,
            other => return Err(CodecError::InvalidEnum(other)),
        };
        let shape = vouch_codec::read_vec(b, limits.max_rank, |b| {
            Ok(match u8::read(b)? {
                0 => PlanDim::Fixed(u64::read(b)?),
                1 => PlanDim::Symbol(vouch_codec::read_str(b, names, "dimension symbol")?),
                other => return Err(CodecError::InvalidEnum(other)),
            })
        })?;
        Ok(PlanInput { name, kind, shape })
    })?;
    let instrs = vouch_codec::read_vec(&mut buf, limits.max_instrs, |b| read_instr(b, limits))?;
    let outputs = vouch_codec::read_vec(&mut buf, limits.max_io, |b| {
        let name = vouch_codec::read_str(b, names, "output name")?;
        let value = u32::read(b)?;
        let kind = match u8::read(b)? {
            0 => OutputKind::Dequantized {
                scale_bits: u32::read(b)?,
            },
            1 => OutputKind::Integer,
            2 => OutputKind::Boolean,
            other => return Err(CodecError::InvalidEnum(other)),
        };
        Ok(PlanOutput { name, value, kind })
    })?;
    if bytes::Buf::has_remaining(&buf) {
        return Err(CodecError::ExtraData(bytes::Buf::remaining(&buf)));
    }
    Ok(Plan {
        inputs,
        instrs,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with(instrs: Vec<Instr>, output: PlanValue) -> Plan {
        Plan {
            inputs: vec![PlanInput {
                name: "x".into(),
                kind: InputKind::Integer,
                shape: vec![PlanDim::Symbol("batch".into())],
            }],
            instrs,
            outputs: vec![PlanOutput {
                name: "y".into(),
                value: output,
                kind: OutputKind::Integer,
            }],
        }
    }

    #[test]
    fn decoding_refuses_reads_of_values_not_yet_computed() {
        let clamp = |input| Instr::Clamp { input, low: 0, high: 5 };
        let good = plan_with(vec![clamp(0), clamp(1)], 2);
        assert_eq!(
            Plan::decode(&good.encode(), &PlanLimits::default()).expect("decode"),
            good
        );
        let forward = plan_with(vec![clamp(2), clamp(1)], 2);
        assert!(Plan::decode(&forward.encode(), &PlanLimits::default()).is_err());
        let missing_output = plan_with(vec![clamp(0)], 5);
        assert!(Plan::decode(&missing_output.encode(), &PlanLimits::default()).is_err());
    }

    #[test]
    fn decoding_refuses_an_empty_or_oversized_product_range() {
        let dense = |low, high| Instr::Dense {
            input: 0,
            k: 1,
            n: 1,
            weights: vec![1],
            bias: vec![0],
            requant: vec![Multiplier { m: 1 << 30, shift: 30 }],
            low,
            high,
        };
        let good = plan_with(vec![dense(0, 5)], 1);
        assert_eq!(
            Plan::decode(&good.encode(), &PlanLimits::default()).expect("decode"),
            good
        );
        for (low, high) in [(5, 0), (-40_000, 0), (0, 40_000)] {
            let bad = plan_with(vec![dense(low, high)], 1);
            assert!(
                Plan::decode(&bad.encode(), &PlanLimits::default()).is_err(),
                "{low}..={high}"
            );
        }
        // The full range has one encoding: the unclamped tag, with no range written.
        let full = plan_with(vec![dense(FULL_RANGE.0, FULL_RANGE.1)], 1).encode();
        let clamped = good.encode();
        assert_eq!(clamped.len(), full.len() + 8);
        let tag_at = full
            .iter()
            .zip(&clamped)
            .position(|(a, b)| a != b)
            .expect("tags differ");
        assert_eq!((full[tag_at], clamped[tag_at]), (1, 32));
        // The clamped tag carrying the full range is a second encoding of the same plan: refused.
        let range: Vec<u8> = 0i32.to_be_bytes().into_iter().chain(5i32.to_be_bytes()).collect();
        let at = clamped
            .windows(8)
            .position(|w| w == range)
            .expect("the range is written");
        let mut forged = clamped.clone();
        forged.splice(
            at..at + 8,
            FULL_RANGE.0.to_be_bytes().into_iter().chain(FULL_RANGE.1.to_be_bytes()),
        );
        assert!(Plan::decode(&forged, &PlanLimits::default()).is_err());
    }

    /// Every variant that shares an instruction with another under a tag of its own decodes back
    /// to itself (two variants under one tag would decode as the wrong one).
    #[test]
    fn instruction_variants_round_trip() {
        let one = Multiplier { m: 1 << 30, shift: 30 };
        let window = Window {
            kernel: vec![1],
            strides: vec![1],
            dilations: vec![1],
            pads_before: vec![0],
            pads_after: vec![0],
        };
        let mut instrs = Vec::new();
        for clamped in [false, true] {
            let (low, high) = if clamped { (0, 100) } else { FULL_RANGE };
            instrs.push(Instr::Dense {
                input: 0,
                k: 1,
                n: 1,
                weights: vec![1],
                bias: vec![0],
                requant: vec![one],
                low,
                high,
            });
            instrs.push(Instr::Conv {
                input: 0,
                window: window.clone(),
                group: 1,
                c_in: 1,
                c_out: 1,
                weights: vec![1],
                bias: vec![0],
                requant: vec![one],
                low,
                high,
            });
            instrs.push(Instr::Softmax {
                input: 0,
                axis: 0,
                exp_table: vec![65536],
                masked: clamped,
            });
            instrs.push(Instr::ReduceSum {
                input: 0,
                axes: vec![0],
                requant: one,
                squares: clamped,
            });
        }
        let plan = plan_with(instrs, 1);
        assert_eq!(
            Plan::decode(&plan.encode(), &PlanLimits::default()).expect("decode"),
            plan
        );
    }

    #[test]
    fn decoding_respects_limits() {
        let plan = plan_with(
            vec![
                Instr::Clamp {
                    input: 0,
                    low: 0,
                    high: 1
                };
                3
            ],
            1,
        );
        let limits = PlanLimits {
            max_instrs: 2,
            ..PlanLimits::default()
        };
        assert!(Plan::decode(&plan.encode(), &limits).is_err());
    }
}
