//! Helpers shared by the engine's integration tests: fixture paths, fixture tensors, and the
//! trace root of a run with chosen kernels and threads.

#![allow(dead_code)]

use std::path::PathBuf;

use vouch_engine::{ExecOptions, Plan, TraceTree, execute};
use vouch_tensor::{NamedTensor, TensorLimits, read_tensor_file};

/// A path under the repository's `fixtures/`.
pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

/// The tensors of a fixture file.
pub fn tensors(path: &str) -> Vec<NamedTensor> {
    read_tensor_file(&fixture(path), &TensorLimits::default()).expect("fixture tensors")
}

/// Runs `plan` with `threads` threads and the SIMD-friendly kernels on or off; returns the trace
/// root and the outputs.
pub fn traced_run(plan: &Plan, inputs: &[NamedTensor], threads: usize, simd: bool) -> ([u8; 32], Vec<NamedTensor>) {
    let options = ExecOptions {
        threads,
        simd,
        ..ExecOptions::default()
    };
    let run = execute(plan, inputs, &options).expect("exact run");
    (TraceTree::new(&run.values).root(), run.outputs)
}
