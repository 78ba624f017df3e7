//! The exact plans of real trained classifiers (two MLPs and a CNN on the digits data set):
//! accuracy against the float model, exactness across kernels and thread counts, a canonical plan
//! encoding, and trace proofs.

mod common;

use common::{fixture, tensors, traced_run};
use vouch_engine::plan::Instr;
use vouch_engine::{
    ExecOptions, FloatModel, Plan, PlanLimits, TraceTree, build_plan, execute, execute_instr, load_onnx,
};
use vouch_tensor::{NamedTensor, TensorData};

fn named<'a>(tensors: &'a [NamedTensor], name: &str) -> &'a NamedTensor {
    tensors
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .expect("named tensor")
}

fn argmax_rows(values: &[f32], width: usize) -> Vec<usize> {
    values
        .chunks(width)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::MIN), |best, (i, v)| if *v > best.1 { (i, *v) } else { best })
                .0
        })
        .collect()
}

/// Every trained model fixture: the MLPs (MatMul, Add, Relu, Softmax) and the CNN (Conv,
/// depthwise and grouped Conv, BatchNormalization, MaxPool, Clip, AveragePool, Flatten, Gemm).
const MODELS: [&str; 3] = [
    "models/digits_mlp_v1.onnx",
    "models/digits_mlp_v2.onnx",
    "models/digits_cnn.onnx",
];

fn plan_for(model_file: &str) -> (vouch_engine::LoadedModel, Plan) {
    let bytes = std::fs::read(fixture(model_file)).expect("model");
    let model = load_onnx(&bytes).expect("load");
    let graph = model.to_ir().expect("ir");
    let plan = build_plan(&model, &graph, &tensors("data/digits_calibration.npz")).expect("plan");
    (model, plan)
}

#[test]
fn exact_plan_agrees_with_the_float_model_on_held_out_digits() {
    for model_file in MODELS {
        let (model, plan) = plan_for(model_file);
        let test = tensors("data/digits_test.npz");
        let input = vec![named(&test, "input").clone()];
        let labels = tensors("data/digits_test_labels.npy");
        let TensorData::I64(labels) = labels[0].tensor.data() else {
            panic!("labels are int64");
        };
        let float = FloatModel::new(&model)
            .expect("float")
            .run(&input, 1)
            .expect("float run");
        let exact = execute(&plan, &input, &ExecOptions::default()).expect("exact run");
        let (TensorData::F32(f), TensorData::F32(e)) = (float[0].tensor.data(), exact.outputs[0].tensor.data()) else {
            panic!("float outputs");
        };
        assert_eq!(float[0].tensor.shape(), exact.outputs[0].tensor.shape());
        let (float_top, exact_top) = (argmax_rows(f, 10), argmax_rows(e, 10));
        let agree = float_top.iter().zip(&exact_top).filter(|(a, b)| a == b).count();
        let agreement = agree as f64 / float_top.len() as f64;
        assert!(agreement >= 0.99, "{model_file}: top-1 agreement {agreement}");
        let correct = exact_top.iter().zip(labels).filter(|(p, l)| **p as i64 == **l).count();
        assert!(
            correct as f64 / labels.len() as f64 > 0.95,
            "{model_file}: exact accuracy"
        );
        let max_error = f.iter().zip(e).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let mean_error = f.iter().zip(e).map(|(a, b)| (a - b).abs()).sum::<f32>() / f.len() as f32;
        // int8 weights move a logit by up to ~1% of its channel's largest weight; softmax turns
        // that into at most a few hundredths of probability near a decision boundary.
        assert!(
            max_error < 0.05,
            "{model_file}: probabilities differ by up to {max_error}"
        );
        assert!(
            mean_error < 0.001,
            "{model_file}: probabilities differ by {mean_error} on average"
        );
    }
}

#[test]
fn plans_are_deterministic_and_canonical() {
    let (_, first) = plan_for("models/digits_mlp_v1.onnx");
    let (_, second) = plan_for("models/digits_mlp_v1.onnx");
    assert_eq!(first.id(), second.id());
    let bytes = first.encode();
    let decoded = Plan::decode(&bytes, &PlanLimits::default()).expect("decode");
    assert_eq!(decoded, first);
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Plan::decode(&longer, &PlanLimits::default()).is_err());
    for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            Plan::decode(&bytes[..cut], &PlanLimits::default()).is_err(),
            "cut at {cut}"
        );
    }
    let (_, other) = plan_for("models/digits_mlp_v2.onnx");
    assert_ne!(other.id(), first.id());
    let (_, cnn) = plan_for("models/digits_cnn.onnx");
    let bytes = cnn.encode();
    assert_eq!(Plan::decode(&bytes, &PlanLimits::default()).expect("decode"), cnn);
    for name in ["Conv", "MaxPool", "AvgPool", "Dense"] {
        assert!(cnn.instrs.iter().any(|i| i.name() == name), "the CNN plan has a {name}");
    }
}

/// A bias add and a ReLU or clip after a product are folded into it: the MLP (MatMul, Add, Relu,
/// MatMul, Add, Softmax) is two dense layers and a softmax, the first clamped at zero; in the CNN
/// each convolution takes its ReLU or clip (0..6), and no clamp is left.
#[test]
fn biases_and_clamps_fold_into_the_products() {
    let (_, mlp) = plan_for("models/digits_mlp_v1.onnx");
    let names: Vec<&str> = mlp.instrs.iter().map(|i| i.name()).collect();
    assert_eq!(names, ["Dense", "Dense", "Softmax"]);
    let lows: Vec<i32> = mlp
        .instrs
        .iter()
        .filter_map(|i| match i {
            Instr::Dense { low, .. } => Some(*low),
            _ => None,
        })
        .collect();
    assert_eq!(lows, [0, -32767]);
    let (_, cnn) = plan_for("models/digits_cnn.onnx");
    assert!(cnn.instrs.iter().all(|i| i.name() != "Clamp" && i.name() != "AddSub"));
    let ranges: Vec<(i32, i32)> = cnn
        .instrs
        .iter()
        .filter_map(|i| match i {
            Instr::Conv { low, high, .. } => Some((*low, *high)),
            _ => None,
        })
        .collect();
    assert_eq!(ranges.len(), 3);
    assert!(ranges.iter().all(|(low, _)| *low == 0), "{ranges:?}");
    assert!(ranges[2].1 < 32767, "the clip's upper bound is fused: {ranges:?}");
}

#[test]
fn every_kernel_and_thread_count_gives_the_same_trace() {
    for model_file in ["models/digits_mlp_v2.onnx", "models/digits_cnn.onnx"] {
        let (_, plan) = plan_for(model_file);
        let test = tensors("data/digits_test.npz");
        let input = vec![named(&test, "input").clone()];
        let (root, reference_outputs) = traced_run(&plan, &input, 1, false);
        for threads in [1, 2, 3, 8] {
            for simd in [false, true] {
                let (run_root, outputs) = traced_run(&plan, &input, threads, simd);
                assert_eq!(run_root, root, "{model_file}: threads {threads} simd {simd}");
                assert_eq!(outputs, reference_outputs);
            }
        }
    }
}

#[test]
fn any_value_proves_against_the_root_and_any_step_replays() {
    for model_file in ["models/digits_mlp_v1.onnx", "models/digits_cnn.onnx"] {
        let (_, plan) = plan_for(model_file);
        let test = tensors("data/digits_test.npz");
        let input = vec![named(&test, "input").clone()];
        let run = execute(&plan, &input, &ExecOptions::default()).expect("run");
        let tree = TraceTree::new(&run.values);
        let root = tree.root();
        for (index, value) in run.values.iter().enumerate() {
            assert!(tree.prove(index).expect("proof").verify(&root, value));
        }
        let inputs = plan.inputs.len();
        for (index, instr) in plan.instrs.iter().enumerate() {
            // Operands are taken from the trace only after their proofs check out.
            let operands: Vec<_> = instr
                .inputs()
                .iter()
                .map(|v| {
                    let value = &run.values[*v as usize];
                    assert!(tree.prove(*v as usize).expect("proof").verify(&root, value));
                    value
                })
                .collect();
            let replayed = execute_instr(&plan, index, &operands, &ExecOptions::default()).expect("replay");
            assert_eq!(
                replayed,
                run.values[inputs + index],
                "{model_file}: instruction {index}"
            );
        }
    }
}

#[test]
fn wrong_inputs_are_named_with_what_was_expected() {
    let (_, plan) = plan_for("models/digits_mlp_v1.onnx");
    let test = tensors("data/digits_test.npz");
    let good = named(&test, "input").clone();
    let options = ExecOptions::default();

    let mut renamed = good.clone();
    renamed.name = Some("pixels".into());
    let error = execute(&plan, &[renamed], &options)
        .expect_err("unknown name")
        .to_string();
    assert!(
        error.contains("input 'pixels'") && error.contains("'input' float32 [batch, 64]"),
        "{error}"
    );

    let wrong_shape = NamedTensor {
        name: Some("input".into()),
        tensor: vouch_tensor::Tensor::new(vec![2, 32], TensorData::F32(vec![0.0; 64])).expect("tensor"),
    };
    let error = execute(&plan, &[wrong_shape], &options).expect_err("shape").to_string();
    assert!(
        error.contains("has shape [2, 32], expected float32 [batch, 64]"),
        "{error}"
    );

    let wrong_type = NamedTensor {
        name: Some("input".into()),
        tensor: vouch_tensor::Tensor::new(vec![1, 64], TensorData::I64(vec![0; 64])).expect("tensor"),
    };
    let error = execute(&plan, &[wrong_type], &options).expect_err("dtype").to_string();
    assert!(error.contains("has type int64, expected float32"), "{error}");
}

#[test]
fn malformed_models_are_errors_not_panics() {
    // Found by the onnx_import fuzz target: a graph output that nothing produces made tract panic.
    let bytes = std::fs::read(fixture("regressions/onnx_dangling_output.onnx")).expect("fixture");
    let error = load_onnx(&bytes).expect_err("malformed");
    assert!(error.to_string().contains("not produced"), "{error}");
    assert!(load_onnx(b"\x08\x07garbage").is_err());
    assert!(load_onnx(&[]).is_err());
}

/// The first `count` digits of the held-out set, as the CNN's input.
fn first_digits(count: usize) -> Vec<NamedTensor> {
    let test = tensors("data/digits_test.npz");
    let input = named(&test, "input");
    let TensorData::F32(values) = input.tensor.data() else {
        panic!("digits are float32");
    };
    let width = input.tensor.shape()[1];
    let tensor =
        vouch_tensor::Tensor::new(vec![count, width], TensorData::F32(values[..count * width].to_vec())).expect("rows");
    vec![NamedTensor {
        name: input.name.clone(),
        tensor,
    }]
}

fn float_values(outputs: &[NamedTensor]) -> Vec<f32> {
    let TensorData::F32(values) = outputs[0].tensor.data() else {
        panic!("float outputs");
    };
    values.clone()
}

#[test]
fn float_model_specializes_a_shape_that_comes_back_and_forgets_old_ones() {
    let bytes = std::fs::read(fixture("models/digits_cnn.onnx")).expect("model");
    // The CNN runs on Vouch's own float kernels; the shapes are tract's concern.
    let float = FloatModel::new(&load_onnx(&bytes).expect("load"))
        .expect("float")
        .on_tract_only();
    assert!(!float.runs_on_vouch_kernels());
    let batch = first_digits(32);
    let general = float_values(&float.run(&batch, 1).expect("first run"));
    assert_eq!(float.specialized_shapes(), 0, "a shape seen once runs the general plan");
    let specialized = float_values(&float.run(&batch, 1).expect("second run"));
    assert_eq!(float.specialized_shapes(), 1, "a shape seen twice gets its own plan");
    let threaded = float_values(&float.run(&batch, 2).expect("two threads"));
    for values in [&specialized, &threaded] {
        let max_difference = general
            .iter()
            .zip(values.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_difference < 1e-4, "plans disagree by {max_difference}");
    }
    // Shapes beyond the remembered few push the oldest (and its plan) out.
    for count in 1..=12 {
        let rows = first_digits(count);
        float.run(&rows, 1).expect("run");
        float.run(&rows, 1).expect("run again");
    }
    assert_eq!(float.specialized_shapes(), 8);
    // A forgotten shape starts over, taking the place (and plan) of the oldest one.
    let again = float_values(&float.run(&batch, 1).expect("forgotten shape"));
    assert_eq!(float.specialized_shapes(), 7);
    assert_eq!(again, general, "a forgotten shape runs the general plan again");
}
