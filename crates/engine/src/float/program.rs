//! Vouch's own float executor: the IR run step by step over `f32` tensors, with the element-wise
//! operations that follow a product folded into it, and a batch cut into one block of rows per
//! thread when no step mixes rows.
//!
//! It covers the float operations of MLPs and CNNs; a graph with anything else (integer values,
//! gathers, comparisons) is left to tract, and so is a run whose shapes it cannot handle.

use std::borrow::Cow;
use std::ops::Range;

use vouch_tensor::{Tensor, TensorData};

use super::kernels::{self, ChannelOp, ConvLayout, ConvScratch, PackedMatrix};
use crate::broadcast;
use crate::ir::{BinaryOp, DimFact, Graph, Op, ReduceOp, UnaryOp, ValueId, Window};
use crate::pools::{BLOCK_WORTHY_PRODUCTS, Rows, row_blocks, run_polling};
use vouch_tensor::DType;

/// Most elements any one value may have.
const MAX_ELEMENTS: usize = 1 << 28;

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
    /// Per value: the constant it holds, if any.
    consts: Vec<Option<Const>>,
    /// Per value: the node's name, for messages.
    names: Vec<String>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    /// Per value: the last step that reads it (`usize::MAX` for outputs, which are kept).
    last_reader: Vec<usize>,
    /// Per value, whether it holds batch rows, when the program may run in row blocks.
    rows: Option<Vec<Rows>>,
    /// Multiply-adds per batch row, when every shape but the batch is known.
    products_per_row: Option<usize>,
}

#[derive(Debug)]
struct Const {
    shape: Vec<usize>,
    data: Vec<f32>,
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
    Concat(usize),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
}

/// An einsum that is a (batched) matrix product: `A = batch ++ rows ++ sum`,
/// `B = batch ++ sum ++ cols` (or `batch ++ cols ++ sum` when transposed),
/// output `batch ++ rows ++ cols`; counts of axes in each group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EinsumForm {
    batch: usize,
    rows: usize,
    sum: usize,
    cols: usize,
    transposed: bool,
}

impl EinsumForm {
    fn parse(expr: &str) -> Option<Self> {
        let (operands, out) = expr.split_once("->")?;
        let (a, b) = operands.split_once(',')?;
        if b.contains(',') {
            return None;
        }
        let [a, b, out]: [Vec<char>; 3] = [a, b, out].map(|s| s.chars().collect());
        let distinct = |s: &[char]| s.iter().enumerate().all(|(i, c)| !s[..i].contains(c));
        if !distinct(&a) || !distinct(&b) || !distinct(&out) {
            return None;
        }
        let batch = out.iter().take_while(|c| a.contains(c) && b.contains(c)).count();
        let rows = out[batch..]
            .iter()
            .take_while(|c| a.contains(c) && !b.contains(c))
            .count();
        let cols = out.len() - batch - rows;
        let sum = a.len().checked_sub(batch + rows)?;
        let (a_batch, a_rows, a_sum) = (&a[..batch], &a[batch..batch + rows], &a[batch + rows..]);
        let out_cols = &out[batch + rows..];
        if a_batch != &out[..batch]
            || b.get(..batch) != Some(&out[..batch])
            || a_rows != &out[batch..batch + rows]
            || b.len() != batch + sum + cols
            || a_sum.iter().any(|c| out.contains(c))
        {
            return None;
        }
        let b_rest = &b[batch..];
        let transposed = if b_rest[..sum] == *a_sum && b_rest[sum..] == *out_cols {
            false
        } else if b_rest[..cols] == *out_cols && b_rest[cols..] == *a_sum {
            true
        } else {
            return None;
        };
        Some(Self {
            batch,
            rows,
            sum,
            cols,
            transposed,
        })
    }

    /// The sizes of the products and the output shape for these operand shapes, or why they
    /// do not fit.
    fn sizes(&self, a: &[usize], b: &[usize]) -> Result<(ProductSizes, Vec<usize>), String> {
        if a.len() != self.batch + self.rows + self.sum || b.len() != self.batch + self.sum + self.cols {
            return Err(format!("operands of shapes {a:?} and {b:?} do not fit the product"));
        }
        let (b_sum, b_cols) = if self.transposed {
            (&b[self.batch + self.cols..], &b[self.batch..self.batch + self.cols])
        } else {
            (&b[self.batch..self.batch + self.sum], &b[self.batch + self.sum..])
        };
        if a[..self.batch] != b[..self.batch] || a[self.batch + self.rows..] != *b_sum {
            return Err(format!("operands of shapes {a:?} and {b:?} do not line up"));
        }
        let product = |dims: &[usize]| dims.iter().product::<usize>();
        let out: Vec<usize> = a[..self.batch + self.rows].iter().chain(b_cols).copied().collect();
        let sizes = ProductSizes {
            batches: product(&a[..self.batch]),
            m: product(&a[self.batch..self.batch + self.rows]),
            k: product(b_sum),
            n: product(b_cols),
        };
        Ok((sizes, out))
    }
}

/// A batch of matrix products: `batches` times `m x k` by `k x n`.
#[derive(Debug, Clone, Copy)]
struct ProductSizes {
    batches: usize,
    m: usize,
    k: usize,
    n: usize,
}

/// A value while a program runs: borrowed from the caller or the program, or computed.
#[derive(Debug, Clone)]
struct Val<'a> {
    shape: Vec<usize>,
    data: Cow<'a, [f32]>,
}

impl FloatProgram {
    /// The program for a graph, or `None` when some value is not `f32` or some operation is
    /// not one this executor runs.
    pub(crate) fn new(graph: &Graph) -> Option<Self> {
        let count = graph.values.len();
        let mut consts: Vec<Option<Const>> = (0..count).map(|_| None).collect();
        let mut steps = Vec::new();
        for node in &graph.nodes {
            if graph.values[node.output].dtype != DType::Float32 {
                return None;
            }
            let kernel = match &node.op {
                Op::Input(_) => continue,
                Op::Const(tensor) => {
                    let TensorData::F32(data) = tensor.data() else {
                        return None;
                    };
                    consts[node.output] = Some(Const {
                        shape: tensor.shape().to_vec(),
                        data: data.clone(),
                    });
                    continue;
                }
                Op::EinSum { expr } => {
                    let form = EinsumForm::parse(expr)?;
                    if node.inputs.len() != 2 {
                        return None;
                    }
                    let packed = consts[node.inputs[1]].as_ref().and_then(|b| pack_constant(&form, b));
                    Kernel::MatMul { form, packed }
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
                Op::Slice {
                    axis,
                    start: DimFact::Fixed(start),
                    end: DimFact::Fixed(end),
                } => Kernel::Slice {
                    axis: *axis,
                    start: *start,
                    end: *end,
                },
                _ => return None,
            };
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
            outputs: graph.outputs.clone(),
            last_reader: Vec::new(),
            rows: None,
            products_per_row: None,
        };
        program.fold_channel_ops(graph);
        program.last_reader = vec![0; count];
        for (index, step) in program.steps.iter().enumerate() {
            for input in &step.inputs {
                program.last_reader[*input] = index;
            }
        }
        for output in &program.outputs {
            program.last_reader[*output] = usize::MAX;
        }
        program.rows = program.row_kinds(graph);
        program.products_per_row = products_per_row(graph);
        Some(program)
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
                (None, Some(c)) => (first, c),
                (Some(c), None) if commutes => (second, c),
                _ => {
                    index += 1;
                    continue;
                }
            };
            let producer = self.steps[..index].iter().rposition(|s| s.output == operand);
            let folded = producer.filter(|_| readers[operand] == 1).and_then(|p| {
                let channel_axis = match &self.steps[p].kernel {
                    Kernel::MatMul { form, .. } if form.cols == 1 => form.batch + form.rows + form.cols - 1,
                    Kernel::Conv { .. } => 1,
                    _ => return None,
                };
                let rank = graph.values[operand].shape.len();
                per_channel(&constant.shape, rank, channel_axis).map(|()| (p, constant.data.clone()))
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

    /// Which values hold batch rows, or `None` when some step mixes rows (or there is no batch
    /// symbol), so the program must run undivided.
    fn row_kinds(&self, graph: &Graph) -> Option<Vec<Rows>> {
        let batch_symbol = self
            .inputs
            .iter()
            .find_map(|input| match graph.values[*input].shape.first() {
                Some(DimFact::Symbol(symbol)) => Some(symbol),
                _ => None,
            })?;
        let mut kinds = vec![Rows::Shared; graph.values.len()];
        for input in &self.inputs {
            if graph.values[*input].shape.first() == Some(&DimFact::Symbol(batch_symbol.clone())) {
                kinds[*input] = Rows::Batched;
            }
        }
        let rank = |v: ValueId| graph.values[v].shape.len();
        // A shared operand broadcast against batched ones must not have rows of its own.
        let broadcasts = |v: ValueId, out_rank: usize| {
            rank(v) < out_rank || graph.values[v].shape.first() == Some(&DimFact::Fixed(1))
        };
        for step in &self.steps {
            let batched: Vec<bool> = step.inputs.iter().map(|v| kinds[*v] == Rows::Batched).collect();
            if !batched.contains(&true) {
                continue;
            }
            let out_rank = rank(step.output);
            let keeps_rows = match &step.kernel {
                Kernel::MatMul { form, .. } => {
                    // The rows are `A`'s first axis, which must not index the other operand.
                    batched[0] && (form.batch == 0 && form.rows > 0 && !batched[1])
                }
                Kernel::Conv { .. } => batched[0] && !batched[1..].contains(&true),
                Kernel::Binary(_) => step.inputs.iter().zip(&batched).all(|(v, b)| {
                    if *b {
                        rank(*v) == out_rank
                    } else {
                        broadcasts(*v, out_rank)
                    }
                }),
                Kernel::Unary(_) | Kernel::Pool { .. } => true,
                Kernel::Softmax(axis) | Kernel::RmsNorm { axis, .. } => *axis != 0,
                Kernel::AddAxis(axis) | Kernel::RemoveAxis(axis) => *axis != 0,
                Kernel::MoveAxis { from, to } => *from != 0 && *to != 0,
                Kernel::Reshape { at, .. } => *at != 0,
                Kernel::Reduce { axes, .. } => !axes.contains(&0),
                Kernel::Concat(axis) => *axis != 0 && !batched.contains(&false),
                Kernel::Slice { axis, .. } => *axis != 0,
            };
            if !keeps_rows {
                return None;
            }
            kinds[step.output] = Rows::Batched;
        }
        Some(kinds)
    }

    /// Runs the program on `f32` inputs (in the graph's order, already checked against the
    /// model's shapes) on up to `threads` threads.
    pub(crate) fn run(&self, inputs: &[&Tensor], threads: usize) -> Result<Vec<Tensor>, RunError> {
        let given: Vec<Val<'_>> = inputs
            .iter()
            .zip(&self.inputs)
            .map(|(tensor, value)| match tensor.data() {
                TensorData::F32(data) => Ok(Val {
                    shape: tensor.shape().to_vec(),
                    data: Cow::Borrowed(data.as_slice()),
                }),
                other => Err(self.unhandled(*value, format!("input of type {:?}", other.dtype()))),
            })
            .collect::<Result<_, _>>()?;
        let outputs = match self.row_blocks(&given, threads) {
            Some(blocks) => self.run_in_blocks(&given, blocks)?,
            None => self.run_values(given)?,
        };
        outputs
            .into_iter()
            .zip(&self.outputs)
            .map(|(value, id)| {
                Tensor::new(value.shape, TensorData::F32(value.data.into_owned()))
                    .map_err(|e| self.unhandled(*id, e.to_string()))
            })
            .collect()
    }

    /// The row ranges of the blocks to cut the batch into, or `None` to run it undivided.
    fn row_blocks(&self, given: &[Val<'_>], threads: usize) -> Option<Vec<Range<usize>>> {
        let kinds = self.rows.as_ref()?;
        let batched = self.inputs.iter().position(|v| kinds[*v] == Rows::Batched)?;
        let rows = *given[batched].shape.first()?;
        row_blocks(
            rows,
            threads,
            self.products_per_row.unwrap_or(usize::MAX),
            BLOCK_WORTHY_PRODUCTS,
        )
    }

    /// Runs each block of rows on its own thread and joins the outputs.
    fn run_in_blocks<'a>(&'a self, given: &[Val<'a>], blocks: Vec<Range<usize>>) -> Result<Vec<Val<'a>>, RunError> {
        let kinds = self.rows.as_deref().unwrap_or_default();
        let block_inputs = |range: &Range<usize>| -> Vec<Val<'a>> {
            given
                .iter()
                .zip(&self.inputs)
                .map(|(value, id)| {
                    if kinds.get(*id) != Some(&Rows::Batched) {
                        return value.clone();
                    }
                    let per_row = value.shape[1..].iter().product::<usize>();
                    let mut shape = value.shape.clone();
                    shape[0] = range.len();
                    let data = match &value.data {
                        Cow::Borrowed(data) => Cow::Borrowed(&data[range.start * per_row..range.end * per_row]),
                        Cow::Owned(data) => Cow::Owned(data[range.start * per_row..range.end * per_row].to_vec()),
                    };
                    Val { shape, data }
                })
                .collect()
        };
        let tasks: Vec<_> = blocks
            .iter()
            .map(|range| {
                let inputs = block_inputs(range);
                move || self.run_values(inputs)
            })
            .collect();
        let mut results = run_polling(tasks).into_iter();
        let mut joined = results.next().unwrap_or_else(|| Ok(Vec::new()))?;
        for block in results {
            for ((value, part), id) in joined.iter_mut().zip(block?).zip(&self.outputs) {
                if kinds.get(*id) == Some(&Rows::Batched) {
                    value.shape[0] += part.shape[0];
                    value.data.to_mut().extend_from_slice(&part.data);
                }
            }
        }
        Ok(joined)
    }

    fn unhandled(&self, value: ValueId, reason: String) -> RunError {
        RunError::Unhandled {
            node: self.names[value].clone(),
            reason,
        }
    }

    /// The steps one after another on one thread.
    fn run_values<'a>(&'a self, given: Vec<Val<'a>>) -> Result<Vec<Val<'a>>, RunError> {
        let mut values: Vec<Option<Val<'a>>> = vec![None; self.names.len()];
        for (id, value) in self.inputs.iter().zip(given) {
            values[*id] = Some(value);
        }
        let mut scratch = ConvScratch::default();
        for (index, step) in self.steps.iter().enumerate() {
            let result = self.run_step(index, step, &mut values, &mut scratch)?;
            for input in &step.inputs {
                if self.last_reader[*input] == index {
                    values[*input] = None;
                }
            }
            values[step.output] = Some(result);
        }
        self.outputs.iter().map(|id| self.operand(&values, *id)).collect()
    }

    /// A value given or computed so far, or a constant lent as a borrowed value.
    fn operand<'a>(&'a self, values: &[Option<Val<'a>>], id: ValueId) -> Result<Val<'a>, RunError> {
        if let Some(c) = &self.consts[id] {
            return Ok(Val {
                shape: c.shape.clone(),
                data: Cow::Borrowed(&c.data),
            });
        }
        values[id]
            .clone()
            .ok_or_else(|| self.unhandled(id, "read before it was computed".into()))
    }

    fn run_step<'a>(
        &'a self,
        index: usize,
        step: &'a Step,
        values: &mut [Option<Val<'a>>],
        scratch: &mut ConvScratch,
    ) -> Result<Val<'a>, RunError> {
        let fail = |reason: String| self.unhandled(step.output, reason);
        let refuse = |error: StepError| match error {
            StepError::TooLarge(elements) => RunError::TooLarge {
                node: self.names[step.output].clone(),
                elements,
                limit: MAX_ELEMENTS,
            },
            StepError::Unhandled(reason) => self.unhandled(step.output, reason),
        };
        let operand = |values: &[Option<Val<'a>>], id: ValueId| self.operand(values, id);
        // The first operand, taken rather than copied when this step is its last reader.
        let first = step.inputs.first().copied().ok_or_else(|| fail("no operands".into()))?;
        let take_first = |values: &mut [Option<Val<'a>>]| -> Result<Val<'a>, RunError> {
            let only_reader =
                self.last_reader[first] == index && step.inputs.iter().filter(|i| **i == first).count() == 1;
            match values[first].take() {
                Some(value) if only_reader => Ok(value),
                Some(value) => {
                    values[first] = Some(value.clone());
                    Ok(value)
                }
                None => operand(values, first),
            }
        };
        let others = |values: &[Option<Val<'a>>]| -> Result<Vec<Val<'a>>, RunError> {
            step.inputs[1..].iter().map(|id| operand(values, *id)).collect()
        };
        Ok(match &step.kernel {
            Kernel::MatMul { form, packed } => {
                let a = operand(values, first)?;
                let b = operand(values, step.inputs[1])?;
                let (ProductSizes { batches, m, k, n }, shape) = form.sizes(&a.shape, &b.shape).map_err(fail)?;
                let elements = sized(&shape).map_err(refuse)?;
                check_channels(&step.epilogue, n).map_err(fail)?;
                let mut out = vec![0.0f32; elements];
                for batch in 0..batches {
                    let own;
                    let matrix = match packed {
                        Some(packed) => &packed[batch],
                        None => {
                            own = PackedMatrix::pack(&b.data[batch * k * n..][..k * n], k, n, form.transposed);
                            &own
                        }
                    };
                    let a_block = &a.data[batch * m * k..][..m * k];
                    kernels::matmul(
                        a_block,
                        0..m,
                        matrix,
                        &mut out[batch * m * n..][..m * n],
                        &step.epilogue,
                    );
                }
                Val {
                    shape,
                    data: Cow::Owned(out),
                }
            }
            Kernel::Conv { window, group } => {
                let input = operand(values, first)?;
                let rest = others(values)?;
                conv(&input, &rest, window, *group, &step.epilogue, scratch).map_err(refuse)?
            }
            Kernel::Pool {
                window,
                average,
                output,
            } => pool(&operand(values, first)?, window, *average, output).map_err(refuse)?,
            Kernel::Binary(op) => {
                let a = take_first(values)?;
                let b = operand(
                    values,
                    step.inputs.get(1).copied().ok_or_else(|| fail("one operand".into()))?,
                )?;
                binary(*op, a, &b).map_err(refuse)?
            }
            Kernel::Unary(op) => {
                let mut value = take_first(values)?;
                unary(*op, value.data.to_mut());
                value
            }
            Kernel::Softmax(axis) => {
                let mut value = take_first(values)?;
                let (_, width, inner) = split_at_axis(&value.shape, *axis).ok_or_else(|| fail("bad axis".into()))?;
                if inner == 1 {
                    kernels::softmax_rows(value.data.to_mut(), width);
                } else {
                    kernels::softmax_strided(value.data.to_mut(), width, inner);
                }
                value
            }
            Kernel::RmsNorm { axis, eps } => {
                let mut value = take_first(values)?;
                let (_, width, inner) = split_at_axis(&value.shape, *axis).ok_or_else(|| fail("bad axis".into()))?;
                rms_norm(value.data.to_mut(), width, inner, *eps);
                value
            }
            Kernel::AddAxis(axis) => {
                let mut value = take_first(values)?;
                if *axis > value.shape.len() {
                    return Err(fail("bad axis".into()));
                }
                value.shape.insert(*axis, 1);
                value
            }
            Kernel::RemoveAxis(axis) => {
                let mut value = take_first(values)?;
                if value.shape.get(*axis) != Some(&1) {
                    return Err(fail(format!("axis {axis} of {:?} is not 1", value.shape)));
                }
                value.shape.remove(*axis);
                value
            }
            Kernel::Reshape { at, from, to } => {
                let mut value = take_first(values)?;
                value.shape = reshaped(&value.shape, *at, from, to).map_err(fail)?;
                value
            }
            Kernel::MoveAxis { from, to } => move_axis(&operand(values, first)?, *from, *to).map_err(fail)?,
            Kernel::Reduce { op, axes } => reduce(&operand(values, first)?, *op, axes).map_err(fail)?,
            Kernel::Concat(axis) => {
                let parts: Vec<Val<'a>> = step
                    .inputs
                    .iter()
                    .map(|id| operand(values, *id))
                    .collect::<Result<_, _>>()?;
                concat(&parts, *axis).map_err(refuse)?
            }
            Kernel::Slice { axis, start, end } => slice(&operand(values, first)?, *axis, *start, *end).map_err(fail)?,
        })
    }
}

/// The constant right operand of a product, packed per batch index.
fn pack_constant(form: &EinsumForm, b: &Const) -> Option<Vec<PackedMatrix>> {
    if b.shape.len() != form.batch + form.sum + form.cols {
        return None;
    }
    let (batch_dims, rest) = b.shape.split_at(form.batch);
    let (first, second) = rest.split_at(if form.transposed { form.cols } else { form.sum });
    let (k, n) = if form.transposed {
        (second.iter().product::<usize>(), first.iter().product::<usize>())
    } else {
        (first.iter().product::<usize>(), second.iter().product::<usize>())
    };
    let batches = batch_dims.iter().product::<usize>();
    Some(
        (0..batches)
            .map(|batch| PackedMatrix::pack(&b.data[batch * k * n..][..k * n], k, n, form.transposed))
            .collect(),
    )
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

/// Calls `f` with the offsets, under each set of strides, of every index of `shape` in
/// row-major order.
fn walk<const N: usize>(shape: &[usize], strides: [&[usize]; N], mut f: impl FnMut([usize; N])) {
    let width = shape.last().copied().unwrap_or(1);
    let steps: [usize; N] = std::array::from_fn(|s| strides[s].last().copied().unwrap_or(0));
    broadcast::for_each_row(shape, strides, |row| {
        for i in 0..width {
            f(std::array::from_fn(|s| row[s] + i * steps[s]));
        }
    });
}

fn binary<'a>(op: BinaryOp, mut a: Val<'a>, b: &Val<'_>) -> Result<Val<'a>, StepError> {
    let shape = broadcast::shape(&[&a.shape, &b.shape])?;
    let elements = sized(&shape)?;
    let f = |x: f32, y: f32| kernels::binary(op, x, y);
    if a.shape == shape {
        let trailing = b.shape.iter().skip_while(|d| **d == 1).count();
        let suffix = shape.len() >= trailing && b.shape[b.shape.len() - trailing..] == shape[shape.len() - trailing..];
        let out = a.data.to_mut();
        if b.data.len() == out.len() {
            out.iter_mut().zip(b.data.iter()).for_each(|(x, y)| *x = f(*x, *y));
            return Ok(a);
        }
        if suffix && !b.data.is_empty() {
            for chunk in out.chunks_exact_mut(b.data.len()) {
                chunk.iter_mut().zip(b.data.iter()).for_each(|(x, y)| *x = f(*x, *y));
            }
            return Ok(a);
        }
    }
    let mut out = Vec::with_capacity(elements);
    let (sa, sb) = (
        broadcast::strides(&a.shape, &shape),
        broadcast::strides(&b.shape, &shape),
    );
    walk(&shape, [&sa, &sb], |[i, j]| out.push(f(a.data[i], b.data[j])));
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
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

fn move_axis<'a>(value: &Val<'_>, from: usize, to: usize) -> Result<Val<'a>, String> {
    let rank = value.shape.len();
    if from >= rank || to >= rank {
        return Err(format!("cannot move axis {from} to {to} of {:?}", value.shape));
    }
    let mut order: Vec<usize> = (0..rank).collect();
    let axis = order.remove(from);
    order.insert(to, axis);
    let strides = broadcast::strides(&value.shape, &value.shape);
    let shape: Vec<usize> = order.iter().map(|a| value.shape[*a]).collect();
    // A dimension of 1 has stride 0 in `broadcast::strides`, which reads the same element.
    let read: Vec<usize> = order.iter().map(|a| strides[*a]).collect();
    let mut out = Vec::with_capacity(value.data.len());
    walk(&shape, [&read], |[i]| out.push(value.data[i]));
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
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
    walk(&value.shape, [&read, &write], |[i, o]| {
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

fn concat<'a>(parts: &[Val<'_>], axis: usize) -> Result<Val<'a>, StepError> {
    let first = parts.first().ok_or("nothing to join")?;
    if axis >= first.shape.len()
        || parts.iter().any(|p| {
            p.shape.len() != first.shape.len()
                || p.shape
                    .iter()
                    .zip(&first.shape)
                    .enumerate()
                    .any(|(i, (x, y))| i != axis && x != y)
        })
    {
        return Err("operands do not line up along the other axes".into());
    }
    let outer: usize = first.shape[..axis].iter().product();
    let mut shape = first.shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    let elements = sized(&shape)?;
    let mut out = Vec::with_capacity(elements);
    for o in 0..outer {
        for p in parts {
            let block = p.data.len() / outer.max(1);
            out.extend_from_slice(&p.data[o * block..][..block]);
        }
    }
    Ok(Val {
        shape,
        data: Cow::Owned(out),
    })
}

fn slice<'a>(value: &Val<'_>, axis: usize, start: usize, end: usize) -> Result<Val<'a>, String> {
    let Some((outer, width, inner)) = split_at_axis(&value.shape, axis) else {
        return Err(format!("no axis {axis} in {:?}", value.shape));
    };
    if start > end || end > width {
        return Err(format!("slice {start}..{end} of an axis of {width}"));
    }
    let mut shape = value.shape.clone();
    shape[axis] = end - start;
    let mut out = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        out.extend_from_slice(&value.data[(o * width + start) * inner..(o * width + end) * inner]);
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
                fixed(&a[form.batch + form.rows..])?
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
    use super::*;
    use crate::ir::{Node, Value};

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
        let cut = |g: Graph| FloatProgram::new(&g).expect("program").rows.is_some();
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

    #[test]
    fn einsums_that_are_matrix_products_are_recognized() {
        let form = |e: &str| EinsumForm::parse(e);
        assert_eq!(
            form("mk,kn->mn"),
            Some(EinsumForm {
                batch: 0,
                rows: 1,
                sum: 1,
                cols: 1,
                transposed: false
            })
        );
        assert_eq!(
            form("mbak,bakn->mn"),
            Some(EinsumForm {
                batch: 0,
                rows: 1,
                sum: 3,
                cols: 1,
                transposed: false
            })
        );
        assert_eq!(
            form("bmk,bnk->bmn"),
            Some(EinsumForm {
                batch: 1,
                rows: 1,
                sum: 1,
                cols: 1,
                transposed: true
            })
        );
        for other in ["mk,kn->nm", "mk,kn->m", "ii,ij->j", "mk->m", "mk,nk,kj->mn"] {
            assert_eq!(form(other), None, "{other}");
        }
    }
}
