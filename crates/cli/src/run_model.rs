//! `vouch run`: run a model locally, in float or exactly, with no node needed for a local file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use vouch_client::Client;
use vouch_engine::{ExecOptions, FloatModel, Plan, PlanLimits, build_plan, load_onnx};
use vouch_tensor::{NamedTensor, TensorData, TensorLimits, TensorsJson, read_tensor_file, write_tensor_file};
use vouch_types::{BlobId, Manifest, ModelRef};

/// Largest model file `vouch run` fetches from a node.
pub(crate) const MAX_MODEL_BYTES: u64 = 4 << 30;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// An ONNX file, or a model on the node: its id, name@version, or name.
    model: String,
    /// Input tensors: .npy (a model with one input), .npz, .pb or .json.
    #[arg(long)]
    input: PathBuf,
    /// Run the exact integer plan instead of float32.
    #[arg(long)]
    exact: bool,
    /// Calibration inputs for building an exact plan here (samples stacked on axis 0); required
    /// for an ONNX file, optional for a published model, which brings its own plan.
    #[arg(long, requires = "exact")]
    calibration: Option<PathBuf>,
    /// Worker threads (default: every core). An exact plan's bits do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Use the plain one-element-at-a-time kernels instead of the SIMD-friendly ones (same bits).
    #[arg(long)]
    no_simd: bool,
    /// Write the outputs here: .npy (one output), .npz or .json.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub(crate) fn load_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    Ok(read_tensor_file(path, &TensorLimits::default())?)
}

/// Execution options from `--threads` and `--no-simd`.
pub(crate) fn exec_options(threads: Option<usize>, no_simd: bool) -> ExecOptions {
    ExecOptions {
        threads: threads.unwrap_or(ExecOptions::default().threads).max(1),
        simd: !no_simd,
        ..ExecOptions::default()
    }
}

/// Fetches a published model's ONNX file, verified against its blob id.
pub(crate) async fn fetch_model_file(client: &Client, manifest: &Manifest) -> Result<Vec<u8>> {
    let file = manifest
        .body
        .files
        .iter()
        .find(|f| f.path.ends_with(".onnx"))
        .context("the model has no ONNX file")?;
    Ok(client
        .get_blob_bytes(&file.blob, MAX_MODEL_BYTES.min(file.size))
        .await?)
}

/// Fetches one of a model's exact plans (the first when `plan_id` is `None`), verified against
/// its id and decoded.
pub(crate) async fn fetch_plan(client: &Client, manifest: &Manifest, plan_id: Option<&BlobId>) -> Result<Plan> {
    let plans = &manifest.body.plans;
    let plan = match plan_id {
        Some(id) => plans.iter().find(|p| p.id == *id),
        None => plans.first(),
    };
    let Some(plan) = plan else {
        bail!(
            "model {}@{} has no exact plan{}; publish it with --calibration, or run the ONNX file with --calibration",
            manifest.body.name,
            manifest.body.version,
            plan_id.map(|id| format!(" {id}")).unwrap_or_default()
        );
    };
    let bytes = client.get_blob_bytes(&plan.id, MAX_MODEL_BYTES.min(plan.size)).await?;
    Ok(vouch_verify::decode_plan(&plan.id, &bytes, &PlanLimits::default())?)
}

/// The model's bytes and, for a published model, its manifest and the client that fetched it.
async fn resolve(node: &str, model: &str) -> Result<(Option<(Client, Manifest)>, Option<Vec<u8>>)> {
    let path = Path::new(model);
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        return Ok((None, Some(bytes)));
    }
    let reference: ModelRef = model
        .parse()
        .with_context(|| format!("'{model}' is neither a file nor a model reference"))?;
    let client = Client::new(node)?;
    let (_, manifest) = client.fetch_manifest(&reference).await?;
    Ok((Some((client, manifest)), None))
}

pub async fn run(node: &str, json_output: bool, args: &RunArgs) -> Result<()> {
    let (published, file_bytes) = resolve(node, &args.model).await?;
    let inputs = load_tensors(&args.input)?;
    let mut report = serde_json::Map::new();
    if let Some((_, manifest)) = &published {
        report.insert("model_id".into(), json!(manifest.id().to_string()));
    }
    let onnx = async || -> Result<Vec<u8>> {
        match (&file_bytes, &published) {
            (Some(bytes), _) => Ok(bytes.clone()),
            (None, Some((client, manifest))) => fetch_model_file(client, manifest).await,
            (None, None) => bail!("no model"),
        }
    };
    let outputs = if args.exact {
        let plan = match (&args.calibration, &published) {
            (Some(calibration), _) => {
                let model = load_onnx(&onnx().await?).with_context(|| args.model.clone())?;
                build_plan(&model, &model.to_ir()?, &load_tensors(calibration)?)?
            }
            (None, Some((client, manifest))) => fetch_plan(client, manifest, None).await?,
            (None, None) => bail!("--exact on an ONNX file needs --calibration FILE to build its plan"),
        };
        let answer = vouch_verify::run_exact(&plan, &inputs, &exec_options(args.threads, args.no_simd))?;
        report.insert("mode".into(), json!("exact"));
        report.insert("plan_id".into(), json!(plan.id().to_string()));
        report.insert("trace_root".into(), json!(answer.trace_root.to_string()));
        answer.outputs
    } else {
        report.insert("mode".into(), json!("float"));
        let model = load_onnx(&onnx().await?).with_context(|| args.model.clone())?;
        FloatModel::new(&model)?.run(&inputs, exec_options(args.threads, args.no_simd).threads)?
    };
    report.insert(
        "output_hash".into(),
        json!(vouch_verify::tensors_hash(&outputs).to_string()),
    );
    if let Some(path) = &args.output {
        write_tensor_file(path, &outputs)?;
    }
    if json_output {
        report.insert("outputs".into(), serde_json::to_value(TensorsJson(&outputs))?);
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_outputs(&outputs);
    for key in ["model_id", "mode", "plan_id", "trace_root", "output_hash"] {
        if let Some(value) = report.get(key).and_then(|v| v.as_str()) {
            println!("{key}: {value}");
        }
    }
    Ok(())
}

/// One line per output: name, type, shape and the first few elements.
pub(crate) fn print_outputs(outputs: &[NamedTensor]) {
    for output in outputs {
        println!(
            "{} {} {:?}: {}",
            output.name.as_deref().unwrap_or("output"),
            vouch_tensor::dtype_name(output.tensor.dtype()),
            output.tensor.shape(),
            preview(output.tensor.data())
        );
    }
}

/// The first few elements, for a person to glance at.
fn preview(data: &TensorData) -> String {
    const SHOWN: usize = 8;
    let items: Vec<String> = match data {
        TensorData::F32(v) => v.iter().take(SHOWN).map(|x| format!("{x:.6}")).collect(),
        TensorData::F64(v) => v.iter().take(SHOWN).map(|x| format!("{x:.6}")).collect(),
        TensorData::I64(v) => v.iter().take(SHOWN).map(ToString::to_string).collect(),
        TensorData::I32(v) => v.iter().take(SHOWN).map(ToString::to_string).collect(),
        TensorData::I16(v) => v.iter().take(SHOWN).map(ToString::to_string).collect(),
        TensorData::I8(v) => v.iter().take(SHOWN).map(ToString::to_string).collect(),
        TensorData::U8(v) => v.iter().take(SHOWN).map(ToString::to_string).collect(),
        TensorData::Bool(v) => v.iter().take(SHOWN).map(ToString::to_string).collect(),
    };
    let more = if data.len() > SHOWN { ", …" } else { "" };
    format!("[{}{more}]", items.join(", "))
}
