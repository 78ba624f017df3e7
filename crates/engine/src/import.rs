//! ONNX to Vouch's IR, through tract's parser, shape inference and decluttering.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_core::ops::array::{Gather, GatherNd, MultiBroadcastTo, Range, Slice, TypedConcat};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, MaxPool, PoolSpec, SumPool};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::nn::{DataFormat, LeakyRelu, Reduce, Reducer, RmsNorm, Softmax, SoftmaxKind};
use tract_onnx::tract_core::ops::source::TypedSource;
use vouch_tensor::{DType, Tensor, TensorData};

use crate::EngineError;
use crate::ir::{BinaryOp, CompareOp, DimFact, Graph, LogicOp, Node, Op, ReduceOp, UnaryOp, Value, ValueId, Window};

/// An ONNX model loaded through tract: typed, shapes inferred, decluttered.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub(crate) typed: TypedModel,
}

/// Parses an ONNX model and runs tract's shape inference and decluttering on it.
///
/// Model files come from users and peers, so this never panics: the graph is checked for what
/// tract assumes (every output is produced by something), and any panic left inside tract on a
/// malformed model is caught and returned as an import error.
pub fn load_onnx(model_bytes: &[u8]) -> Result<LoadedModel, EngineError> {
    let load = || -> Result<LoadedModel, EngineError> {
        let mut reader = model_bytes;
        let framework = onnx();
        let proto = framework
            .proto_model_for_read(&mut reader)
            .map_err(|e| EngineError::NotOnnx(format!("{e:#}")))?;
        check_graph(&proto)?;
        let inference = framework
            .model_for_proto_model(&proto)
            .map_err(|e| EngineError::NotOnnx(format!("{e:#}")))?;
        let mut typed = inference
            .into_typed()
            .map_err(|e| EngineError::Import(format!("{e:#}")))?;
        declutter(&mut typed).map_err(|e| EngineError::Import(format!("{e:#}")))?;
        Ok(LoadedModel { typed })
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "unknown reason".into());
        Err(EngineError::Import(format!(
            "the ONNX importer failed on this model: {reason}"
        )))
    })
}

/// tract's declutter pipeline without its `FoldUniformMask` pass: in tract 0.23.9 that pass
/// replaces an all-true boolean input by a `[1, 1, ..]` constant, and the `And` it fed then
/// vanishes, losing the broadcast that input contributed (all-MiniLM-L6-v2's attention mask
/// comes out `[batch, 1, 1, seq]` instead of `[batch, 1, seq, seq]` and the model fails to run).
pub fn declutter(model: &mut TypedModel) -> TractResult<()> {
    let mut optimizer = tract_onnx::tract_core::optim::Optimizer::declutter();
    optimizer
        .passes
        .retain(|pass| !format!("{pass:?}").starts_with("FoldUniformMask"));
    optimizer.optimize(model)
}

/// Checks that every graph output names a value the graph has.
fn check_graph(proto: &tract_onnx::pb::ModelProto) -> Result<(), EngineError> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| EngineError::NotOnnx("the model has no graph".into()))?;
    let produced = |name: &str| {
        graph.input.iter().any(|i| i.name == name)
            || graph.initializer.iter().any(|t| t.name == name)
            || graph.node.iter().any(|n| n.output.iter().any(|o| o == name))
    };
    if let Some(output) = graph.output.iter().find(|o| !produced(&o.name)) {
        return Err(EngineError::NotOnnx(format!(
            "graph output '{}' is not produced by any node, input or initializer",
            output.name
        )));
    }
    Ok(())
}

impl LoadedModel {
    /// The model in Vouch's IR; fails on the first operation the exact engine does not support.
    pub fn to_ir(&self) -> Result<Graph, EngineError> {
        let model = &self.typed;
        let order = model.eval_order().map_err(|e| EngineError::Import(format!("{e:#}")))?;
        let mut graph = Graph {
            values: Vec::with_capacity(order.len()),
            nodes: Vec::with_capacity(order.len()),
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        let mut by_outlet: HashMap<OutletId, ValueId> = HashMap::new();
        for node_id in order {
            let node = model.node(node_id);
            let unsupported = |reason: String| EngineError::Unsupported {
                op: node.op.name().to_string(),
                node: node.name.clone(),
                reason,
            };
            if node.outputs.len() != 1 {
                return Err(unsupported(format!(
                    "has {} outputs; only one is supported",
                    node.outputs.len()
                )));
            }
            let fact = &node.outputs[0].fact;
            let dtype =
                dtype_of(fact.datum_type).ok_or_else(|| unsupported(format!("produces {:?}", fact.datum_type)))?;
            let shape = fact.shape.iter().map(dim_fact).collect();
            let inputs = node
                .inputs
                .iter()
                .map(|outlet| {
                    by_outlet.get(outlet).copied().ok_or_else(|| {
                        unsupported(format!(
                            "reads output {} of node {}, which is not imported",
                            outlet.slot, outlet.node
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let op = match fold_constant(model, node) {
                Some(tensor) => Op::Const(tensor),
                None => convert_op(model, node).map_err(unsupported)?,
            };
            let value = graph.values.len();
            if let Op::Input(_) = op {
                graph.inputs.push(value);
            }
            graph.values.push(Value {
                name: node.name.clone(),
                dtype,
                shape,
                tract_outlet: (node_id, 0),
            });
            graph.nodes.push(Node {
                name: node.name.clone(),
                op,
                inputs,
                output: value,
            });
            by_outlet.insert(OutletId::new(node_id, 0), value);
        }
        let values_of = |outlets: TractResult<&[OutletId]>, what: &str| -> Result<Vec<ValueId>, EngineError> {
            let outlets = outlets.map_err(|e| EngineError::Import(format!("{e:#}")))?;
            outlets
                .iter()
                .map(|outlet| {
                    by_outlet
                        .get(outlet)
                        .copied()
                        .ok_or_else(|| EngineError::Import(format!("an {what} is not imported")))
                })
                .collect()
        };
        // Inputs are numbered in the model's order, which eval order need not follow.
        graph.inputs = values_of(model.input_outlets(), "input")?;
        graph.outputs = values_of(model.output_outlets(), "output")?;
        // Outputs go by the model's names for them, which decluttering may have moved off the
        // node names.
        let outlets = model
            .output_outlets()
            .map_err(|e| EngineError::Import(format!("{e:#}")))?;
        for (value, outlet) in graph.outputs.iter().zip(outlets) {
            // An output that is an input (a model that computes nothing) keeps the input's name.
            if let Some(label) = model.outlet_label(*outlet).filter(|_| !graph.inputs.contains(value)) {
                graph.values[*value].name = label.to_owned();
            }
        }
        for (index, value) in graph.inputs.iter().enumerate() {
            graph.nodes[*value].op = Op::Input(index);
        }
        Ok(graph)
    }
}

/// Largest constant the importer computes itself (a 30,522 × 384 embedding table is 11.7 M).
const MAX_FOLDED_ELEMENTS: usize = 1 << 26;

/// Evaluates a node whose inputs are all constants (weights stored as int8 and dequantized in the
/// graph, say), so the exact engine sees the constant itself. `None` leaves the node as it is.
fn fold_constant(model: &TypedModel, node: &TypedNode) -> Option<Tensor> {
    let shape = node.outputs[0].fact.shape.as_concrete()?;
    // A model may expand a tiny constant to any size; such a node is left to run, not folded.
    let elements = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d))?;
    if node.inputs.is_empty() || node.op_as::<Const>().is_some() || elements > MAX_FOLDED_ELEMENTS {
        return None;
    }
    let inputs: TVec<TValue> = node
        .inputs
        .iter()
        .map(|outlet| {
            let fact = model.outlet_fact(*outlet).ok()?;
            let konst = fact.konst.as_ref()?;
            // Symbolic dimensions are known only at run time.
            if konst.datum_type() == DatumType::TDim {
                return None;
            }
            Some(TValue::from((**konst).clone()))
        })
        .collect::<Option<_>>()?;
    let outputs = node.op.eval_out_of_plan(inputs).ok()??;
    tensor_from_tract(outputs.first()?).ok()
}

/// A tract dimension as a fact: a number, or the expression's text.
fn dim_fact(dim: &TDim) -> DimFact {
    match dim.to_usize() {
        Ok(n) => DimFact::Fixed(n),
        Err(_) => DimFact::Symbol(dim.to_string()),
    }
}

pub(crate) fn dtype_of(datum: DatumType) -> Option<DType> {
    Some(match datum {
        DatumType::F32 => DType::Float32,
        DatumType::F64 => DType::Float64,
        DatumType::I64 | DatumType::TDim => DType::Int64,
        DatumType::I32 => DType::Int32,
        DatumType::I16 => DType::Int16,
        DatumType::I8 => DType::Int8,
        DatumType::U8 => DType::Uint8,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

/// A tract constant as a Vouch tensor: floats become float32, integers int64.
pub(crate) fn tensor_from_tract(tensor: &tract_onnx::prelude::Tensor) -> Result<Tensor, String> {
    let shape = tensor.shape().to_vec();
    let data = if tensor.datum_type().is_float() {
        let cast = tensor.cast_to::<f32>().map_err(|e| format!("{e:#}"))?;
        let view = cast.to_plain_array_view::<f32>().map_err(|e| format!("{e:#}"))?;
        TensorData::F32(view.iter().copied().collect())
    } else if tensor.datum_type() == DatumType::Bool {
        let view = tensor.to_plain_array_view::<bool>().map_err(|e| format!("{e:#}"))?;
        TensorData::Bool(view.iter().copied().collect())
    } else if tensor.datum_type().is_integer() || tensor.datum_type() == DatumType::TDim {
        let cast = tensor.cast_to::<i64>().map_err(|e| format!("{e:#}"))?;
        let view = cast.to_plain_array_view::<i64>().map_err(|e| format!("{e:#}"))?;
        TensorData::I64(view.iter().copied().collect())
    } else {
        return Err(format!("constant of type {:?}", tensor.datum_type()));
    };
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

/// A Vouch tensor as a tract tensor.
pub(crate) fn to_tract(tensor: &Tensor) -> Result<tract_onnx::prelude::Tensor, String> {
    use tract_onnx::prelude::Tensor as T;
    let shape = tensor.shape();
    let result = match tensor.data() {
        TensorData::F32(v) => T::from_shape(shape, v),
        TensorData::F64(v) => T::from_shape(shape, v),
        TensorData::I8(v) => T::from_shape(shape, v),
        TensorData::U8(v) => T::from_shape(shape, v),
        TensorData::I16(v) => T::from_shape(shape, v),
        TensorData::I32(v) => T::from_shape(shape, v),
        TensorData::I64(v) => T::from_shape(shape, v),
        TensorData::Bool(v) => T::from_shape(shape, v),
    };
    result.map_err(|e| format!("{e:#}"))
}

/// The window of a convolution or pooling whose input has fixed spatial dimensions.
fn window(model: &TypedModel, node: &TypedNode, spec: &PoolSpec) -> Result<Window, String> {
    if spec.data_format != DataFormat::NCHW {
        return Err(format!(
            "data format {:?} is not supported (only NCHW)",
            spec.data_format
        ));
    }
    let fact = model.outlet_fact(node.inputs[0]).map_err(|e| format!("{e:#}"))?;
    let spatial: Vec<usize> = fact
        .shape
        .iter()
        .skip(2)
        .map(|d| d.to_usize().map_err(|_| format!("spatial dimension {d} is not fixed")))
        .collect::<Result<_, _>>()?;
    if spatial.len() != spec.kernel_shape.len() {
        return Err("the kernel's rank differs from the data's".into());
    }
    let padded = spec.computed_padding(&spatial);
    Ok(Window {
        kernel: spec.kernel_shape.to_vec(),
        strides: spec.strides().to_vec(),
        dilations: spec.dilations().to_vec(),
        pads_before: padded.iter().map(|p| p.pad_before).collect(),
        pads_after: padded.iter().map(|p| p.pad_after).collect(),
    })
}

fn convert_op(model: &TypedModel, node: &TypedNode) -> Result<Op, String> {
    if let Some(conv) = node.op_as::<Conv>() {
        if conv.q_params.is_some() {
            return Err("quantized convolution is not supported".into());
        }
        if conv.kernel_fmt != KernelFormat::OIHW {
            return Err(format!(
                "kernel format {:?} is not supported (only OIHW)",
                conv.kernel_fmt
            ));
        }
        return Ok(Op::Conv {
            window: window(model, node, &conv.pool_spec)?,
            group: conv.group,
        });
    }
    if let Some(pool) = node.op_as::<MaxPool>() {
        if pool.with_index_outputs.is_some() {
            return Err("max pooling with index outputs is not supported".into());
        }
        return Ok(Op::MaxPool(window(model, node, &pool.pool_spec)?));
    }
    if let Some(pool) = node.op_as::<SumPool>() {
        if !pool.normalize {
            return Err("sum pooling without normalization is not supported".into());
        }
        return Ok(Op::AvgPool {
            window: window(model, node, &pool.pool_spec)?,
            count_include_pad: pool.count_include_pad,
        });
    }
    if let Some(reduce) = node.op_as::<Reduce>() {
        let op = match reduce.reducer {
            Reducer::Sum => ReduceOp::Sum,
            Reducer::Max => ReduceOp::Max,
            Reducer::Min => ReduceOp::Min,
            Reducer::MeanOfSquares => ReduceOp::MeanOfSquares,
            other => return Err(format!("reduction {other:?} is not supported by the exact engine")),
        };
        return Ok(Op::Reduce {
            op,
            axes: reduce.axes.to_vec(),
        });
    }
    if node.op_as::<TypedSource>().is_some() {
        return Ok(Op::Input(0));
    }
    if let Some(konst) = node.op_as::<Const>() {
        let value = konst.val();
        if value.datum_type() == DatumType::TDim {
            let view = value.to_plain_array_view::<TDim>().map_err(|e| format!("{e:#}"))?;
            if view.iter().any(|d| d.to_i64().is_err()) {
                return Ok(Op::Dims {
                    shape: value.shape().to_vec(),
                    dims: view.iter().map(dim_fact).collect(),
                });
            }
        }
        return Ok(Op::Const(tensor_from_tract(value)?));
    }
    if let Some(gather) = node.op_as::<Gather>() {
        if gather.output_type.is_some() {
            return Err("gather with a conversion of its output is not supported".into());
        }
        return Ok(Op::Gather { axis: gather.axis });
    }
    if let Some(gather) = node.op_as::<GatherNd>() {
        if gather.batch_dims != 0 {
            return Err("GatherND with batch dimensions is not supported".into());
        }
        return Ok(Op::GatherNd);
    }
    if let Some(concat) = node.op_as::<TypedConcat>() {
        return Ok(Op::Concat { axis: concat.axis });
    }
    if let Some(slice) = node.op_as::<Slice>() {
        return Ok(Op::Slice {
            axis: slice.axis,
            start: dim_fact(&slice.start),
            end: dim_fact(&slice.end),
        });
    }
    if node.op_as::<Range>().is_some() {
        return Ok(Op::Range);
    }
    if let Some(broadcast) = node.op_as::<MultiBroadcastTo>() {
        return Ok(Op::Broadcast {
            shape: broadcast.shape.iter().map(dim_fact).collect(),
        });
    }
    if let Some(cast) = node.op_as::<Cast>() {
        let to = dtype_of(cast.to).ok_or_else(|| format!("cast to {:?} is not supported", cast.to))?;
        return Ok(Op::Cast { to });
    }
    if node.op_as::<Iff>().is_some() {
        return Ok(Op::Where);
    }
    if let Some(norm) = node.op_as::<RmsNorm>() {
        let eps = norm.eps.cast_to_scalar::<f32>().map_err(|e| format!("{e:#}"))?;
        return Ok(Op::RmsNorm { axis: norm.axis, eps });
    }
    if let Some(einsum) = node.op_as::<EinSum>() {
        if einsum.q_params.is_some() {
            return Err("quantized einsum is not supported".into());
        }
        return Ok(Op::EinSum {
            expr: einsum.axes.to_string(),
        });
    }
    if let Some(binary) = node.op_as::<TypedBinOp>() {
        let op = match binary.0.name() {
            "Add" => BinaryOp::Add,
            "Sub" => BinaryOp::Sub,
            "Mul" => BinaryOp::Mul,
            "Div" => BinaryOp::Div,
            "Max" => BinaryOp::Max,
            "Min" => BinaryOp::Min,
            "Eq" => return Ok(Op::Compare(CompareOp::Eq)),
            "NE" => return Ok(Op::Compare(CompareOp::Ne)),
            "LT" => return Ok(Op::Compare(CompareOp::Lt)),
            "LTE" => return Ok(Op::Compare(CompareOp::Le)),
            "GT" => return Ok(Op::Compare(CompareOp::Gt)),
            "GTE" => return Ok(Op::Compare(CompareOp::Ge)),
            "And" => return Ok(Op::Logic(LogicOp::And)),
            "Or" => return Ok(Op::Logic(LogicOp::Or)),
            "Xor" => return Ok(Op::Logic(LogicOp::Xor)),
            other => return Err(format!("binary operation {other} is not supported by the exact engine")),
        };
        return Ok(Op::Binary(op));
    }
    if let Some(unary) = node.op_as::<ElementWiseOp>() {
        let op = match unary.0.name().as_str() {
            "Not" => return Ok(Op::Not),
            "IsNan" => return Ok(Op::IsNan),
            "Sigmoid" => UnaryOp::Sigmoid,
            "Tanh" => UnaryOp::Tanh,
            "Erf" => UnaryOp::Erf,
            "Exp" => UnaryOp::Exp,
            "Recip" => UnaryOp::Recip,
            "Sqrt" => UnaryOp::Sqrt,
            "Rsqrt" => UnaryOp::Rsqrt,
            "Abs" => UnaryOp::Abs,
            "Neg" => UnaryOp::Neg,
            "Square" => UnaryOp::Square,
            "GeluExact" => UnaryOp::Gelu,
            "LeakyRelu" => {
                let alpha = unary
                    .0
                    .downcast_ref::<LeakyRelu>()
                    .map(|l| l.alpha)
                    .ok_or("LeakyRelu without its alpha")?;
                UnaryOp::LeakyRelu { alpha }
            }
            other => {
                return Err(format!(
                    "element-wise function {other} is not supported by the exact engine"
                ));
            }
        };
        return Ok(Op::Unary(op));
    }
    if let Some(softmax) = node.op_as::<Softmax>() {
        if softmax.kind != SoftmaxKind::Softmax {
            return Err("LogSoftmax is not supported by the exact engine".into());
        }
        let [axis] = softmax.axes.as_slice() else {
            return Err("softmax over several axes is not supported".into());
        };
        return Ok(Op::Softmax { axis: *axis });
    }
    if let Some(axis_op) = node.op_as::<AxisOp>() {
        let dims = |dims: &[TDim]| dims.iter().map(dim_fact).collect::<Vec<_>>();
        return Ok(match axis_op {
            AxisOp::Add(axis) => Op::AddAxis(*axis),
            AxisOp::Rm(axis) => Op::RemoveAxis(*axis),
            AxisOp::Move(from, to) => Op::MoveAxis { from: *from, to: *to },
            AxisOp::Reshape(at, from, to) => Op::Reshape {
                at: *at,
                from: dims(from),
                to: dims(to),
            },
        });
    }
    Err("this operation is not supported by the exact engine".into())
}
