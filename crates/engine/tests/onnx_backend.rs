//! The ONNX backend node tests (onnx==1.22.0) on the float path and on the exact path: every test
//! model is loaded, run on its reference inputs, and compared with its reference outputs. The
//! exact path quantizes each model with its own test inputs as calibration data and must land
//! within the tolerance its operation documents (see `EXACT_OPS`).
//!
//! The fixtures come from `scripts/fetch-fixtures` (the README's test command runs it first); the
//! test fails, never skips, when they are missing. It reports how many pass and fails if fewer
//! pass than the last recorded count, so a change that breaks import or the float path shows.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use vouch_engine::{ExecOptions, FloatModel, Plan, PlanLimits, build_plan, execute, load_onnx};
use vouch_tensor::{NamedTensor, TensorData, TensorLimits, read_tensor_proto};

/// Tests that passed when this file was last updated (see README.md); a lower count fails.
const PASSING_AT_LEAST: usize = 930;

/// How many of those pass on Vouch's own float kernels rather than tract's.
const OWN_KERNELS_AT_LEAST: usize = 335;

fn node_tests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fetched/onnx-1.22.0/onnx/backend/test/data/node")
}

fn read_pbs(dir: &Path, prefix: &str) -> Result<Vec<NamedTensor>, String> {
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            let index = name.strip_prefix(prefix)?.strip_suffix(".pb")?.parse().ok()?;
            Some((index, p))
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|(_, p)| {
            let bytes = std::fs::read(p).map_err(|e| e.to_string())?;
            read_tensor_proto(&bytes, &TensorLimits::default()).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}

fn close(actual: &TensorData, expected: &TensorData) -> bool {
    let floats = |d: &TensorData| -> Option<Vec<f64>> {
        match d {
            TensorData::F32(v) => Some(v.iter().map(|x| f64::from(*x)).collect()),
            TensorData::F64(v) => Some(v.clone()),
            _ => None,
        }
    };
    match (floats(actual), floats(expected)) {
        (Some(a), Some(e)) => {
            a.len() == e.len()
                && a.iter()
                    .zip(&e)
                    .all(|(a, e)| (a.is_nan() && e.is_nan()) || a == e || (a - e).abs() <= 1e-5 + 1e-3 * e.abs())
        }
        // Integers and booleans must match exactly (imported constants widen integers to int64).
        _ => actual.to_le_bytes() == expected.to_le_bytes() || widened(actual) == widened(expected),
    }
}

fn widened(d: &TensorData) -> Option<Vec<i64>> {
    Some(match d {
        TensorData::I8(v) => v.iter().map(|x| i64::from(*x)).collect(),
        TensorData::U8(v) => v.iter().map(|x| i64::from(*x)).collect(),
        TensorData::I16(v) => v.iter().map(|x| i64::from(*x)).collect(),
        TensorData::I32(v) => v.iter().map(|x| i64::from(*x)).collect(),
        TensorData::I64(v) => v.clone(),
        TensorData::Bool(v) => v.iter().map(|x| i64::from(*x)).collect(),
        _ => return None,
    })
}

/// Runs a test's model exactly, with its own inputs as calibration, and returns the largest error
/// of any output relative to that output's largest magnitude.
///
/// The backend tests pass weights, shapes and axes as graph inputs; a published model holds them
/// as initializers. Inputs after the first `keep` are moved into the graph's initializers.
fn run_exact(dir: &Path, keep: usize) -> Result<f64, String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let data = dir.join("test_data_set_0");
    let bytes = freeze_inputs(&bytes, &data, keep)?;
    let model = load_onnx(&bytes).map_err(|e| e.to_string())?;
    let graph = model.to_ir().map_err(|e| e.to_string())?;
    let mut inputs = read_pbs(&data, "input_")?;
    inputs.truncate(keep);
    let mut expected = read_pbs(&data, "output_")?;
    expected.truncate(1);
    for (given, value) in inputs.iter_mut().zip(&graph.inputs) {
        if given.name.is_none() {
            given.name = Some(graph.values[*value].name.clone());
        }
    }
    let plan = build_plan(&model, &graph, &inputs).map_err(|e| e.to_string())?;
    // Every instruction's encoding decodes to itself.
    let decoded = Plan::decode(&plan.encode(), &PlanLimits::default()).map_err(|e| format!("plan codec: {e}"))?;
    if decoded != plan {
        return Err("the plan does not decode to itself".into());
    }
    let run = execute(&plan, &inputs, &ExecOptions::default()).map_err(|e| e.to_string())?;
    if run.outputs.len() != expected.len() {
        return Err(format!("{} outputs, expected {}", run.outputs.len(), expected.len()));
    }
    let mut worst = 0f64;
    for (actual, expected) in run.outputs.iter().zip(&expected) {
        if actual.tensor.shape() != expected.tensor.shape() {
            return Err(format!(
                "shape {:?}, expected {:?}",
                actual.tensor.shape(),
                expected.tensor.shape()
            ));
        }
        let (TensorData::F32(a), TensorData::F32(e)) = (actual.tensor.data(), expected.tensor.data()) else {
            if widened(actual.tensor.data()) == widened(expected.tensor.data()) {
                continue;
            }
            return Err("integer outputs differ".into());
        };
        let amax = e.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
        let error = a.iter().zip(e).fold(0f64, |m, (a, e)| m.max(f64::from((a - e).abs())));
        worst = worst.max(if amax > 0.0 { error / amax } else { error });
    }
    Ok(worst)
}

/// Moves graph inputs after the first `keep` into the initializers, with the test's values, and
/// keeps only the first output.
fn freeze_inputs(model_bytes: &[u8], data: &Path, keep: usize) -> Result<Vec<u8>, String> {
    use prost::Message;
    use tract_onnx::pb::{ModelProto, TensorProto};
    let mut model = ModelProto::decode(model_bytes).map_err(|e| e.to_string())?;
    let graph = model.graph.as_mut().ok_or("no graph")?;
    // Optional extra outputs (LayerNormalization's mean and inverse deviation) are not part of
    // what a published model computes; the exact path is checked on the first output.
    graph.output.truncate(1);
    let frozen: Vec<_> = graph.input.drain(keep.min(graph.input.len())..).collect();
    for (index, input) in frozen.into_iter().enumerate() {
        let path = data.join(format!("input_{}.pb", keep + index));
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut tensor = TensorProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
        tensor.name = input.name;
        graph.initializer.push(tensor);
    }
    Ok(model.encode_to_vec())
}

/// Runs one backend test on the float path; `Ok(true)` when it passed on Vouch's own kernels.
fn run_one(dir: &Path) -> Result<bool, String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let model = load_onnx(&bytes).map_err(|e| e.to_string())?;
    let float = FloatModel::new(&model).map_err(|e| e.to_string())?;
    let data = dir.join("test_data_set_0");
    let mut inputs = read_pbs(&data, "input_")?;
    let expected = read_pbs(&data, "output_")?;
    // Some models take optional inputs they do not list; name the rest by position.
    for (given, spec) in inputs.iter_mut().zip(float.inputs()) {
        if given.name.is_none() {
            given.name = Some(spec.name.clone());
        }
    }
    let outputs = float.run(&inputs, 1).map_err(|e| e.to_string())?;
    if outputs.len() != expected.len() {
        return Err(format!("{} outputs, expected {}", outputs.len(), expected.len()));
    }
    for (actual, expected) in outputs.iter().zip(&expected) {
        if actual.tensor.shape() != expected.tensor.shape() {
            return Err(format!(
                "shape {:?}, expected {:?}",
                actual.tensor.shape(),
                expected.tensor.shape()
            ));
        }
        if !close(actual.tensor.data(), expected.tensor.data()) {
            return Err("values differ".into());
        }
    }
    Ok(float.runs_on_vouch_kernels() && float.runs_handed_to_tract() == 0)
}

#[test]
fn onnx_backend_node_tests_on_the_float_path() {
    let root = node_tests();
    assert!(
        root.is_dir(),
        "missing {}: run scripts/fetch-fixtures (scripts/test does)",
        root.display()
    );
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read node tests")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    dirs.sort();
    let (mut passed, mut own_kernels, mut failed) = (0usize, 0usize, Vec::new());
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
        // tract may panic on a model it cannot handle; that counts as a failure of that test.
        match catch_unwind(AssertUnwindSafe(|| run_one(dir))) {
            Ok(Ok(on_own_kernels)) => {
                passed += 1;
                own_kernels += usize::from(on_own_kernels);
            }
            Ok(Err(reason)) => failed.push(format!("{name}: {}", reason.lines().next().unwrap_or(""))),
            Err(_) => failed.push(format!("{name}: panicked")),
        }
    }
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join("onnx-backend-report.txt");
    let _ = std::fs::write(&report, failed.join("\n"));
    eprintln!(
        "ONNX backend node tests (float path): {passed} of {} pass, {own_kernels} of them on Vouch's own \
         float kernels; failures listed in {}",
        dirs.len(),
        report.display()
    );
    assert!(
        passed >= PASSING_AT_LEAST,
        "only {passed} pass, fewer than the {PASSING_AT_LEAST} recorded"
    );
    assert!(
        own_kernels >= OWN_KERNELS_AT_LEAST,
        "only {own_kernels} pass on Vouch's own kernels, fewer than the {OWN_KERNELS_AT_LEAST} recorded"
    );
}

/// Each operation the exact engine lowers, the backend tests that exercise it, and the largest
/// error allowed relative to the output's largest magnitude. Products with int8 weights allow 2%
/// (a weight is within 1/254 of its channel's largest); a 16-bit activation's rounding is 1/65534
/// of its range, so data movement and pooling allow 0.1%; functions by lookup table allow 0.5%
/// (input rounding moves steep functions by up to one table step); softmax allows 1%. Products
/// of two activations and normalization (exact integer square root) keep 16-bit precision and
/// allow 0.1%. Integer and boolean outputs (comparisons, logic, ranges) must match exactly.
///
/// Each entry: the operation, its tolerance, how many leading inputs stay inputs (the rest are
/// frozen into initializers, as weights are in a published model), and the tests.
type ExactOp = (&'static str, f64, usize, &'static [&'static str]);
const EXACT_OPS: &[ExactOp] = &[
    (
        "Gemm",
        0.02,
        1,
        &[
            "test_gemm_default_no_bias",
            "test_gemm_transposeB",
            "test_gemm_default_single_elem_vector_bias",
        ],
    ),
    ("MatMul (constant weights)", 0.02, 1, &["test_matmul_2d"]),
    (
        "Conv",
        0.02,
        1,
        &[
            "test_conv_with_strides_padding",
            "test_conv_with_strides_no_padding",
            "test_basic_conv_with_padding",
            "test_conv_with_autopad_same",
        ],
    ),
    (
        "Conv (asymmetric padding)",
        0.02,
        1,
        &["test_conv_with_strides_and_asymmetric_padding"],
    ),
    ("Add", 0.001, 2, &["test_add", "test_add_bcast"]),
    ("Sub", 0.001, 2, &["test_sub", "test_sub_bcast"]),
    ("Mul", 0.001, 2, &["test_mul", "test_mul_bcast"]),
    ("Div (by a constant)", 0.001, 1, &["test_div_example", "test_div"]),
    ("Relu", 0.001, 1, &["test_relu"]),
    ("LeakyRelu", 0.005, 1, &["test_leakyrelu", "test_leakyrelu_default"]),
    (
        "Clip",
        0.001,
        1,
        &["test_clip_default_inbounds", "test_clip_example", "test_clip"],
    ),
    ("Sigmoid", 0.005, 1, &["test_sigmoid", "test_sigmoid_example"]),
    ("Tanh", 0.005, 1, &["test_tanh", "test_tanh_example"]),
    ("Erf", 0.005, 1, &["test_erf"]),
    ("Gelu", 0.005, 1, &["test_gelu_default_1", "test_gelu_default_2"]),
    ("Softmax", 0.01, 1, &["test_softmax_example", "test_softmax_axis_1"]),
    (
        "BatchNormalization",
        0.001,
        1,
        &["test_batchnorm_example", "test_batchnorm_epsilon"],
    ),
    (
        "MaxPool",
        0.001,
        1,
        &[
            "test_maxpool_2d_default",
            "test_maxpool_2d_pads",
            "test_maxpool_2d_strides",
            "test_maxpool_1d_default",
            "test_maxpool_3d_default",
            "test_maxpool_3d_dilations",
        ],
    ),
    (
        "AveragePool",
        0.001,
        1,
        &[
            "test_averagepool_2d_default",
            "test_averagepool_2d_strides",
            "test_averagepool_2d_pads",
            "test_averagepool_1d_default",
            "test_averagepool_3d_default",
        ],
    ),
    (
        "GlobalAveragePool",
        0.001,
        1,
        &["test_globalaveragepool", "test_globalaveragepool_precomputed"],
    ),
    (
        "Reshape",
        0.001,
        1,
        &["test_reshape_reordered_all_dims", "test_reshape_negative_dim"],
    ),
    (
        "Flatten",
        0.001,
        1,
        &["test_flatten_axis1", "test_flatten_default_axis"],
    ),
    (
        "Transpose",
        0.001,
        1,
        &["test_transpose_default", "test_transpose_all_permutations_1"],
    ),
    ("Squeeze", 0.001, 1, &["test_squeeze"]),
    (
        "Unsqueeze",
        0.001,
        1,
        &["test_unsqueeze_axis_0", "test_unsqueeze_two_axes"],
    ),
    (
        "ReduceSum",
        0.001,
        1,
        &[
            "test_reduce_sum_keepdims_example",
            "test_reduce_sum_do_not_keepdims_example",
        ],
    ),
    ("ReduceMax", 0.001, 1, &["test_reduce_max_keepdims_example"]),
    (
        "MatMul (two activations)",
        0.001,
        2,
        &["test_matmul_3d", "test_matmul_4d", "test_matmul_bcast"],
    ),
    (
        "Gather",
        0.001,
        2,
        &[
            "test_gather_0",
            "test_gather_1",
            "test_gather_2d_indices",
            "test_gather_negative_indices",
        ],
    ),
    (
        "GatherND",
        0.001,
        2,
        &["test_gathernd_example_float32", "test_gathernd_example_int32"],
    ),
    (
        "Concat",
        0.001,
        3,
        &[
            "test_concat_1d_axis_0",
            "test_concat_2d_axis_1",
            "test_concat_3d_axis_negative_2",
        ],
    ),
    (
        "Slice",
        0.001,
        1,
        &[
            "test_slice",
            "test_slice_neg",
            "test_slice_default_axes",
            "test_slice_end_out_of_bounds",
            "test_slice_start_out_of_bounds",
            "test_slice_negative_axes",
        ],
    ),
    (
        "Expand",
        0.001,
        1,
        &["test_expand_dim_changed", "test_expand_dim_unchanged"],
    ),
    ("Where", 0.001, 3, &["test_where_example", "test_where_long_example"]),
    ("Equal", 0.0, 2, &["test_equal", "test_equal_bcast"]),
    (
        "Greater, Less",
        0.0,
        2,
        &[
            "test_greater",
            "test_greater_bcast",
            "test_less",
            "test_greater_equal",
            "test_less_equal_bcast",
        ],
    ),
    ("Not", 0.0, 1, &["test_not_2d", "test_not_4d"]),
    (
        "And, Or, Xor",
        0.0,
        2,
        &["test_and2d", "test_and_bcast3v1d", "test_or_bcast4v2d", "test_xor3d"],
    ),
    (
        "LayerNormalization",
        0.001,
        1,
        &[
            "test_layer_normalization_2d_axis1",
            "test_layer_normalization_3d_axis2_epsilon",
            "test_layer_normalization_4d_axis3",
            "test_layer_normalization_default_axis",
            "test_layer_normalization_3d_axis1_epsilon",
            "test_layer_normalization_4d_axis_negative_2",
        ],
    ),
    (
        "RMSNormalization",
        0.001,
        1,
        &[
            "test_rms_normalization_2d_axis1",
            "test_rms_normalization_3d_axis2_epsilon",
            "test_rms_normalization_default_axis",
        ],
    ),
    ("Range", 0.0, 3, &["test_range_int32_type_negative_delta"]),
    (
        "ReduceMean",
        0.001,
        1,
        &[
            "test_reduce_mean_keepdims_example",
            "test_reduce_mean_do_not_keepdims_example",
        ],
    ),
];

#[test]
fn onnx_backend_node_tests_on_the_exact_path() {
    let root = node_tests();
    assert!(
        root.is_dir(),
        "missing {}: run scripts/fetch-fixtures (scripts/test does)",
        root.display()
    );
    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for (op, tolerance, keep, tests) in EXACT_OPS {
        for test in *tests {
            let outcome = catch_unwind(AssertUnwindSafe(|| run_exact(&root.join(test), *keep)));
            let line = match outcome {
                Ok(Ok(error)) if error <= *tolerance => format!("{op}: {test}: relative error {error:.2e}"),
                Ok(Ok(error)) => {
                    failures.push(format!("{op}: {test}: relative error {error:.2e} > {tolerance}"));
                    continue;
                }
                Ok(Err(reason)) => {
                    failures.push(format!("{op}: {test}: {}", reason.lines().next().unwrap_or("")));
                    continue;
                }
                Err(_) => {
                    failures.push(format!("{op}: {test}: panicked"));
                    continue;
                }
            };
            lines.push(line);
        }
    }
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join("onnx-backend-exact-report.txt");
    let _ = std::fs::write(&report, lines.join("\n"));
    eprintln!(
        "exact path: {} backend tests within tolerance ({})",
        lines.len(),
        report.display()
    );
    assert!(failures.is_empty(), "exact path failures:\n{}", failures.join("\n"));
}
