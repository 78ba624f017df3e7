//! `vouch run`: run a model locally, in float or exactly, with no node needed for a local file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use vouch_client::Client;
use vouch_engine::{ExecOptions, FloatModel, TraceTree, build_plan, execute, load_onnx};
use vouch_tensor::{
    NamedTensor, TensorData, TensorLimits, TensorsJson, hash_named_tensors, read_tensor_file, write_tensor_file,
};
use vouch_types::ModelRef;

/// Largest model file `vouch run` fetches from a node.
const MAX_MODEL_BYTES: u64 = 4 << 30;

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
    /// Calibration inputs for building the exact plan of an ONNX file (samples stacked on axis 0).
    #[arg(long, requires = "exact")]
    calibration: Option<PathBuf>,
    /// Worker threads for the exact plan (default: every core). The bits do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Use the plain one-element-at-a-time kernels instead of the SIMD-friendly ones (same bits).
    #[arg(long)]
    no_simd: bool,
    /// Write the outputs here: .npy (one output), .npz or .json.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

fn load_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    Ok(read_tensor_file(path, &TensorLimits::default())?)
}

async fn model_bytes(node: &str, model: &str) -> Result<Vec<u8>> {
    let path = Path::new(model);
    if path.is_file() {
        return std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    }
    let reference: ModelRef = model
        .parse()
        .with_context(|| format!("'{model}' is neither a file nor a model reference"))?;
    let client = Client::new(node)?;
    let (_, manifest) = client.fetch_manifest(&reference).await?;
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

pub async fn run(node: &str, json_output: bool, args: &RunArgs) -> Result<()> {
    let bytes = model_bytes(node, &args.model).await?;
    let inputs = load_tensors(&args.input)?;
    let model = load_onnx(&bytes).with_context(|| args.model.clone())?;
    let mut report = serde_json::Map::new();
    let outputs = if args.exact {
        let Some(calibration) = &args.calibration else {
            if Path::new(&args.model).is_file() {
                bail!("--exact on an ONNX file needs --calibration FILE to build its plan");
            }
            bail!("exact plans of published models are not served by nodes yet; pass the ONNX file with --calibration");
        };
        let graph = model.to_ir()?;
        let plan = build_plan(&model, &graph, &load_tensors(calibration)?)?;
        let options = ExecOptions {
            threads: args.threads.unwrap_or(ExecOptions::default().threads).max(1),
            simd: !args.no_simd,
            ..ExecOptions::default()
        };
        let execution = execute(&plan, &inputs, &options)?;
        let root = TraceTree::new(&execution.values).root();
        report.insert("mode".into(), json!("exact"));
        report.insert("plan_id".into(), json!(plan.id().to_string()));
        report.insert("trace_root".into(), json!(hex::encode(root)));
        execution.outputs
    } else {
        report.insert("mode".into(), json!("float"));
        FloatModel::new(&model)?.run(&inputs)?
    };
    let output_hash = hash_named_tensors(outputs.iter().map(|t| (t.name.as_deref().unwrap_or(""), &t.tensor)));
    report.insert("output_hash".into(), json!(hex::encode(output_hash)));
    if let Some(path) = &args.output {
        write_tensor_file(path, &outputs)?;
    }
    if json_output {
        report.insert("outputs".into(), serde_json::to_value(TensorsJson(&outputs))?);
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for output in &outputs {
        println!(
            "{} {} {:?}: {}",
            output.name.as_deref().unwrap_or("output"),
            vouch_tensor::dtype_name(output.tensor.dtype()),
            output.tensor.shape(),
            preview(output.tensor.data())
        );
    }
    for key in ["mode", "plan_id", "trace_root", "output_hash"] {
        if let Some(value) = report.get(key).and_then(|v| v.as_str()) {
            println!("{key}: {value}");
        }
    }
    Ok(())
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
