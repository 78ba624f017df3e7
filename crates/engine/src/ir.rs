//! Vouch's graph IR: what a model computes, in float terms, before it is quantized.
//!
//! Imported from tract's decluttered typed model (so shapes are inferred and ONNX's many spellings
//! of one operation are already normalized), one IR node per tract node. Each value keeps the tract
//! outlet it came from, so calibration can observe it by running tract.

use vouch_tensor::{DType, Tensor};

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;

/// A dimension: known, or symbolic (a batch size or sequence length fixed only at run time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimFact {
    /// A fixed size.
    Fixed(usize),
    /// A size fixed at run time, by its symbol (`batch`).
    Symbol(String),
}

/// A tensor the graph computes or holds.
#[derive(Debug, Clone)]
pub struct Value {
    /// A name unique in the graph (the tract node name, with `.N` for extra outputs).
    pub name: String,
    /// The element type.
    pub dtype: DType,
    /// The shape as inferred at import.
    pub shape: Vec<DimFact>,
    /// The tract node and output slot that computes it.
    pub tract_outlet: (usize, usize),
}

/// Element-wise binary operations, with NumPy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// Element-wise functions of one input.
#[derive(Debug, Clone, Copy, PartialEq)]
#[allow(missing_docs)]
pub enum UnaryOp {
    Sigmoid,
    Tanh,
    Erf,
    Exp,
    Recip,
    Sqrt,
    Rsqrt,
    Abs,
    Neg,
    Square,
    Gelu,
    LeakyRelu { alpha: f32 },
}

impl UnaryOp {
    /// The function in double precision, for building lookup tables (through `libm`, whose
    /// results do not depend on the platform's math library).
    pub fn eval(self, x: f64) -> f64 {
        match self {
            Self::Sigmoid => 1.0 / (1.0 + libm::exp(-x)),
            Self::Tanh => libm::tanh(x),
            Self::Erf => libm::erf(x),
            Self::Exp => libm::exp(x),
            Self::Recip => 1.0 / x,
            Self::Sqrt => libm::sqrt(x),
            Self::Rsqrt => 1.0 / libm::sqrt(x),
            Self::Abs => x.abs(),
            Self::Neg => -x,
            Self::Square => x * x,
            Self::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Self::LeakyRelu { alpha } => {
                if x < 0.0 {
                    f64::from(alpha) * x
                } else {
                    x
                }
            }
        }
    }
}

/// The sliding window of a convolution or pooling over the spatial axes of NCHW-style data
/// (`[batch, channels, spatial..]`), with padding made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Kernel size along each spatial axis.
    pub kernel: Vec<usize>,
    /// Step along each spatial axis.
    pub strides: Vec<usize>,
    /// Spacing of kernel taps along each spatial axis.
    pub dilations: Vec<usize>,
    /// Padding before each spatial axis.
    pub pads_before: Vec<usize>,
    /// Padding after each spatial axis.
    pub pads_after: Vec<usize>,
}

impl Window {
    /// Whether the windows tile planes of size `spatial`: strides equal to the kernel, no
    /// dilation or padding, and each side a whole number of windows (a 2x2 pooling of even
    /// sides). Such a pooling reduces rows, then columns, over every plane at once.
    pub(crate) fn tiles(&self, spatial: &[usize]) -> bool {
        self.kernel.len() == spatial.len()
            && self.strides == self.kernel
            && self.dilations.iter().all(|d| *d == 1)
            && self.pads_before.iter().chain(&self.pads_after).all(|p| *p == 0)
            && spatial
                .iter()
                .zip(&self.kernel)
                .all(|(side, k)| *k > 0 && side % k == 0)
    }

    /// The window of `kernel` whose strides equal the kernel, with no dilation or padding.
    #[cfg(test)]
    pub(crate) fn tiling(kernel: &[usize]) -> Self {
        Self {
            kernel: kernel.to_vec(),
            strides: kernel.to_vec(),
            dilations: vec![1; kernel.len()],
            pads_before: vec![0; kernel.len()],
            pads_after: vec![0; kernel.len()],
        }
    }
}

/// How a reduction combines values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum.
    Sum,
    /// The largest.
    Max,
    /// The smallest.
    Min,
    /// The mean of the squares.
    MeanOfSquares,
}

/// How two values compare (the result is 1 or 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    /// Whether `x op y` holds.
    pub fn holds<T: PartialOrd>(self, x: T, y: T) -> bool {
        match self {
            Self::Eq => x == y,
            Self::Ne => x != y,
            Self::Lt => x < y,
            Self::Le => x <= y,
            Self::Gt => x > y,
            Self::Ge => x >= y,
        }
    }
}

/// Logic on booleans (held as 1 and 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum LogicOp {
    And,
    Or,
    Xor,
}

impl LogicOp {
    /// `x op y` on booleans held as integers (any non-zero one is true), as 1 or 0.
    pub fn apply<T: Default + PartialEq + From<bool>>(self, x: T, y: T) -> T {
        let (x, y) = (x != T::default(), y != T::default());
        T::from(match self {
            Self::And => x && y,
            Self::Or => x || y,
            Self::Xor => x ^ y,
        })
    }
}

/// What an IR node computes.
#[derive(Debug, Clone)]
pub enum Op {
    /// The model input with this index.
    Input(usize),
    /// A constant (weights, biases, shapes).
    Const(Tensor),
    /// A product summed over one shared axis, in einsum notation over single-letter axes
    /// (`mk,kn->mn`, `bmk,bkn->bmn`).
    EinSum {
        /// The expression, as tract normalized it.
        expr: String,
    },
    /// Element-wise binary operation with broadcasting.
    Binary(BinaryOp),
    /// Element-wise function.
    Unary(UnaryOp),
    /// Softmax over one axis.
    Softmax {
        /// The axis.
        axis: usize,
    },
    /// Inserts an axis of size 1.
    AddAxis(usize),
    /// Removes an axis of size 1.
    RemoveAxis(usize),
    /// Moves an axis.
    MoveAxis {
        /// Where it is.
        from: usize,
        /// Where it goes.
        to: usize,
    },
    /// Convolution of NCHW-style data (input 0) with constant OIHW weights (input 1) and bias
    /// (input 2).
    Conv {
        /// The window.
        window: Window,
        /// Channel groups (1: dense; the channel count: depthwise).
        group: usize,
    },
    /// The largest value in each window; padding never wins.
    MaxPool(Window),
    /// The mean of each window.
    AvgPool {
        /// The window.
        window: Window,
        /// Whether padding counts in the divisor.
        count_include_pad: bool,
    },
    /// A reduction over axes, which stay with size 1.
    Reduce {
        /// How values combine.
        op: ReduceOp,
        /// The axes reduced.
        axes: Vec<usize>,
    },
    /// Integer constants that may name dimensions fixed only at run time (`batch`), with their
    /// shape; a scalar has an empty shape.
    Dims {
        /// The shape.
        shape: Vec<usize>,
        /// The elements.
        dims: Vec<DimFact>,
    },
    /// Picks entries of input 0 along `axis` by the integer indices of input 1.
    Gather {
        /// The axis indexed.
        axis: usize,
    },
    /// Picks slices of input 0 by the index tuples in the last axis of input 1 (ONNX GatherND
    /// with no batch dimensions).
    GatherNd,
    /// Joins inputs along an axis.
    Concat {
        /// The axis.
        axis: usize,
    },
    /// `start..end` along one axis.
    Slice {
        /// The axis.
        axis: usize,
        /// First index kept.
        start: DimFact,
        /// One past the last index kept.
        end: DimFact,
    },
    /// `start, start + step, ..` below `end` (inputs: three integer scalars).
    Range,
    /// Broadcasts input 0 to a shape.
    Broadcast {
        /// The shape.
        shape: Vec<DimFact>,
    },
    /// Converts the element type.
    Cast {
        /// The type converted to.
        to: DType,
    },
    /// `cond ? a : b` element-wise (inputs: cond, a, b), with broadcasting.
    Where,
    /// Element-wise comparison with broadcasting.
    Compare(CompareOp),
    /// Element-wise logic with broadcasting.
    Logic(LogicOp),
    /// Logical negation.
    Not,
    /// Whether each element is NaN.
    IsNan,
    /// `x / sqrt(mean(x^2 over axis) + eps)`: layer normalization once the mean is subtracted.
    RmsNorm {
        /// The axis.
        axis: usize,
        /// Added to the mean of squares.
        eps: f32,
    },
    /// Replaces the dimensions starting at `at` by others with the same element count.
    Reshape {
        /// First axis replaced.
        at: usize,
        /// The dimensions replaced.
        from: Vec<DimFact>,
        /// The dimensions they become.
        to: Vec<DimFact>,
    },
}

impl Op {
    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            Self::Input(_) => "Input".into(),
            Self::Const(_) => "Const".into(),
            Self::EinSum { expr } => format!("EinSum({expr})"),
            Self::Binary(op) => format!("{op:?}"),
            Self::Unary(op) => format!("{op:?}"),
            Self::Softmax { .. } => "Softmax".into(),
            Self::AddAxis(_) => "AddAxis".into(),
            Self::RemoveAxis(_) => "RemoveAxis".into(),
            Self::MoveAxis { .. } => "MoveAxis".into(),
            Self::Reshape { .. } => "Reshape".into(),
            Self::Conv { .. } => "Conv".into(),
            Self::MaxPool(_) => "MaxPool".into(),
            Self::AvgPool { .. } => "AvgPool".into(),
            Self::Reduce { op, .. } => format!("Reduce{op:?}"),
            Self::Dims { .. } => "Dims".into(),
            Self::Gather { .. } => "Gather".into(),
            Self::GatherNd => "GatherNd".into(),
            Self::Concat { .. } => "Concat".into(),
            Self::Slice { .. } => "Slice".into(),
            Self::Range => "Range".into(),
            Self::Broadcast { .. } => "Broadcast".into(),
            Self::Cast { to } => format!("Cast({to:?})"),
            Self::Where => "Where".into(),
            Self::Compare(op) => format!("Compare({op:?})"),
            Self::Logic(op) => format!("{op:?}"),
            Self::Not => "Not".into(),
            Self::IsNan => "IsNan".into(),
            Self::RmsNorm { .. } => "RmsNorm".into(),
        }
    }
}

/// One operation of the graph.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's name in the model.
    pub name: String,
    /// What it computes.
    pub op: Op,
    /// The values it reads.
    pub inputs: Vec<ValueId>,
    /// The value it produces.
    pub output: ValueId,
}

/// A model as Vouch's IR: nodes in a topological order, each producing one value.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Every value, in the order nodes produce them.
    pub values: Vec<Value>,
    /// Every node, topologically ordered; node `i` produces value `i`.
    pub nodes: Vec<Node>,
    /// The model inputs, in the model's order.
    pub inputs: Vec<ValueId>,
    /// The model outputs, in the model's order.
    pub outputs: Vec<ValueId>,
}

impl Graph {
    /// How many nodes read each value (model outputs count as a reader).
    pub fn reader_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.values.len()];
        for node in &self.nodes {
            for input in &node.inputs {
                counts[*input] += 1;
            }
        }
        for output in &self.outputs {
            counts[*output] += 1;
        }
        counts
    }

    /// The constant a value holds, if its node is a constant.
    pub fn constant(&self, value: ValueId) -> Option<&Tensor> {
        match &self.nodes.get(value)?.op {
            Op::Const(tensor) => Some(tensor),
            _ => None,
        }
    }
}
