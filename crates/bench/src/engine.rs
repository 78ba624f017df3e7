//! `engine`: inferences per second of Vouch's float and exact paths and of tract, on the same
//! inputs, at each batch size and thread count; printed as JSON lines for `scripts/bench-engine`,
//! which adds onnxruntime measured in the same run and prints the ratios.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tract_onnx::prelude::*;
use vouch_engine::{
    ExecOptions, FloatModel, Plan, build_plan, declutter_tract_model, execute, execute_instr, load_onnx,
};
use vouch_tensor::{NamedTensor, Tensor as VTensor, TensorData, TensorLimits, read_tensor_file};

/// What one case measures.
pub struct EngineBench {
    /// ONNX models whose inputs are batched along axis 0.
    pub models: Vec<PathBuf>,
    /// Calibration inputs for the exact plans.
    pub calibration: PathBuf,
    /// Inputs: tensors of at least the largest batch size of rows.
    pub input: PathBuf,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Time spent measuring each case.
    pub seconds: f64,
}

/// Runs `f` repeatedly for about `seconds` after a warm-up and returns calls per second.
fn rate(seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget || calls < 5 {
        f()?;
        calls += 1;
    }
    Ok(calls as f64 / start.elapsed().as_secs_f64())
}

/// The first `count` rows (along axis 0) of an input.
fn rows(input: &NamedTensor, count: usize) -> Result<NamedTensor> {
    let shape = input.tensor.shape();
    let Some(&available) = shape.first() else {
        bail!("benchmark inputs need a batch axis");
    };
    if available < count {
        bail!("the input has {available} rows, fewer than a batch of {count}");
    }
    let width: usize = shape[1..].iter().product();
    let end = count * width;
    let data = match input.tensor.data() {
        TensorData::F32(v) => TensorData::F32(v[..end].to_vec()),
        TensorData::I64(v) => TensorData::I64(v[..end].to_vec()),
        _ => bail!("benchmark inputs must be float32 or int64"),
    };
    let mut new_shape = shape.to_vec();
    new_shape[0] = count;
    Ok(NamedTensor {
        name: input.name.clone(),
        tensor: VTensor::new(new_shape, data)?,
    })
}

/// The inputs in the order the model takes them (an unnamed tensor is the only input).
fn ordered<'a>(float: &FloatModel, inputs: &'a [NamedTensor]) -> Result<Vec<&'a NamedTensor>> {
    float
        .inputs()
        .iter()
        .map(|spec| {
            inputs
                .iter()
                .find(|t| t.name.as_deref() == Some(spec.name.as_str()))
                .or_else(|| (inputs.len() == 1).then(|| &inputs[0]))
                .with_context(|| format!("no input named {}", spec.name))
        })
        .collect()
}

fn to_tract(input: &NamedTensor) -> Result<TValue> {
    let shape = input.tensor.shape();
    Ok(match input.tensor.data() {
        TensorData::F32(v) => Tensor::from_shape(shape, v)?.into(),
        TensorData::I64(v) => Tensor::from_shape(shape, v)?.into(),
        _ => bail!("benchmark inputs must be float32 or int64"),
    })
}

fn report(model: &str, engine: &str, batch: usize, threads: usize, calls_per_second: f64) {
    println!(
        "{}",
        serde_json::json!({
            "model": model, "engine": engine, "batch": batch, "threads": threads,
            "inferences_per_second": calls_per_second * batch as f64,
        })
    );
}

fn name_of(path: &Path) -> String {
    path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string()
}

/// One benchmarked model: its name, its exact plan and its float model.
struct BenchModel {
    name: String,
    plan: Plan,
    float: FloatModel,
}

/// The bench's inputs and its models, each with its exact plan built from the calibration.
fn load(bench: &EngineBench) -> Result<(Vec<NamedTensor>, Vec<BenchModel>)> {
    let limits = TensorLimits::default();
    let calibration = read_tensor_file(&bench.calibration, &limits)?;
    let inputs = read_tensor_file(&bench.input, &limits)?;
    let mut models = Vec::with_capacity(bench.models.len());
    for path in &bench.models {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let loaded = load_onnx(&bytes)?;
        models.push(BenchModel {
            name: name_of(path),
            plan: build_plan(&loaded, &loaded.to_ir()?, &calibration)?,
            float: FloatModel::new(&loaded)?,
        });
    }
    Ok((inputs, models))
}

/// The first `batch` rows of each input, in the model's order.
fn batch_of(float: &FloatModel, inputs: &[NamedTensor], batch: usize) -> Result<Vec<NamedTensor>> {
    ordered(float, inputs)?
        .into_iter()
        .map(|input| rows(input, batch))
        .collect()
}

pub fn run(bench: &EngineBench) -> Result<()> {
    let (inputs, models) = load(bench)?;
    for (path, model) in bench.models.iter().zip(&models) {
        let BenchModel {
            name: model_name,
            plan,
            float,
        } = model;
        // tract on its own: the peer Vouch's float path is built on (decluttered as Vouch does,
        // without the pass that breaks all-MiniLM-L6-v2 in tract 0.23.9).
        let mut tract_model = onnx().model_for_path(path)?.into_typed()?;
        declutter_tract_model(&mut tract_model)?;
        tract_model.optimize()?;
        let tract_plan = tract_model.into_runnable()?;
        for &batch in &bench.batches {
            let given = batch_of(float, &inputs, batch)?;
            let tract_inputs: TVec<TValue> = given.iter().map(to_tract).collect::<Result<_>>()?;
            for &threads in &bench.threads {
                let options = ExecOptions {
                    threads,
                    ..ExecOptions::default()
                };
                let exact = rate(bench.seconds, || {
                    execute(plan, &given, &options)?;
                    Ok(())
                })?;
                report(model_name, "vouch-exact", batch, threads, exact);
            }
            for &threads in &bench.threads {
                let float_rate = rate(bench.seconds, || {
                    float.run(&given, threads)?;
                    Ok(())
                })?;
                report(model_name, "vouch-float", batch, threads, float_rate);
            }
            // tract used plainly (one thread, the plan optimized for any batch): one figure
            // serves every thread count.
            let tract_rate = rate(bench.seconds, || {
                tract_plan.run(tract_inputs.clone())?;
                Ok(())
            })?;
            for &threads in &bench.threads {
                report(model_name, "tract", batch, threads, tract_rate);
            }
        }
    }
    Ok(())
}

/// Where the exact path's time goes: for each model, batch size and thread count, the time of one
/// whole execution, then of each instruction replayed alone on the operands that execution gave
/// it, as JSON lines (`engine` is `vouch-exact` for the whole, `vouch-exact-instr` per
/// instruction, with its index, its op and its share of the sum over instructions).
pub fn per_instruction(bench: &EngineBench) -> Result<()> {
    let (inputs, models) = load(bench)?;
    for BenchModel {
        name: model_name,
        plan,
        float,
    } in &models
    {
        for &batch in &bench.batches {
            let given = batch_of(float, &inputs, batch)?;
            for &threads in &bench.threads {
                let options = ExecOptions {
                    threads,
                    ..ExecOptions::default()
                };
                let run = execute(plan, &given, &options)?;
                let whole = rate(bench.seconds, || {
                    execute(plan, &given, &options)?;
                    Ok(())
                })?;
                report(model_name, "vouch-exact", batch, threads, whole);
                let first_result = run.values.len() - plan.instrs.len();
                let mut micros = Vec::with_capacity(plan.instrs.len());
                for (index, instr) in plan.instrs.iter().enumerate() {
                    let operands: Vec<_> = instr.inputs().iter().map(|v| &run.values[*v as usize]).collect();
                    let calls = rate(bench.seconds / plan.instrs.len() as f64, || {
                        execute_instr(plan, index, &operands, &options)?;
                        Ok(())
                    })?;
                    micros.push((
                        index,
                        instr.name(),
                        &run.values[first_result + index].shape,
                        1e6 / calls,
                    ));
                }
                let total: f64 = micros.iter().map(|m| m.3).sum();
                for (index, op, shape, us) in micros {
                    println!(
                        "{}",
                        serde_json::json!({
                            "model": model_name, "engine": "vouch-exact-instr", "batch": batch,
                            "threads": threads, "index": index, "op": op, "output_shape": shape,
                            "microseconds": us, "share": us / total,
                        })
                    );
                }
            }
        }
    }
    Ok(())
}
