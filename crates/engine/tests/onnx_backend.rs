//! The ONNX backend node tests (onnx==1.22.0) on the float path: every test model is loaded,
//! run on its reference inputs, and compared with its reference outputs.
//!
//! The fixtures come from `scripts/fetch-fixtures` (the README's test command runs it first); the
//! test fails, never skips, when they are missing. It reports how many pass and fails if fewer
//! pass than the last recorded count, so a change that breaks import or the float path shows.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use vouch_engine::{FloatModel, load_onnx};
use vouch_tensor::{NamedTensor, TensorData, TensorLimits, read_tensor_proto};

/// Tests that passed when this file was last updated (see README.md); a lower count fails.
const PASSING_AT_LEAST: usize = 925;

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

fn run_one(dir: &Path) -> Result<(), String> {
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
    let outputs = float.run(&inputs).map_err(|e| e.to_string())?;
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
    Ok(())
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
    let (mut passed, mut failed) = (0usize, Vec::new());
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
        // tract may panic on a model it cannot handle; that counts as a failure of that test.
        match catch_unwind(AssertUnwindSafe(|| run_one(dir))) {
            Ok(Ok(())) => passed += 1,
            Ok(Err(reason)) => failed.push(format!("{name}: {}", reason.lines().next().unwrap_or(""))),
            Err(_) => failed.push(format!("{name}: panicked")),
        }
    }
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join("onnx-backend-report.txt");
    let _ = std::fs::write(&report, failed.join("\n"));
    eprintln!(
        "ONNX backend node tests (float path): {passed} of {} pass; failures listed in {}",
        dirs.len(),
        report.display()
    );
    assert!(
        passed >= PASSING_AT_LEAST,
        "only {passed} pass, fewer than the {PASSING_AT_LEAST} recorded"
    );
}
