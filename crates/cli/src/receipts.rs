//! `vouch infer` (run on the node and check its receipt) and `vouch verify` (check a receipt later).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use vouch_client::Client;
use vouch_tensor::{NamedTensor, TensorLimits, TensorsJson, write_tensor_file};
use vouch_types::api::InferRequest;
use vouch_types::{Manifest, ModelRef, Receipt, VerifyLevel};
use vouch_verify::{
    VerifyError, check_inputs, check_outputs, check_receipt_model, check_request, name_inputs, reexecute,
};

use crate::run_model::{exec_options, fetch_plan, load_tensors, print_outputs};

/// Largest receipt file `vouch verify` reads.
const MAX_RECEIPT_BYTES: u64 = 64 << 10;

#[derive(Debug, Args)]
pub struct InferArgs {
    /// The model: its id, name@version, or name (latest version).
    pub(crate) model: ModelRef,
    /// Input tensors: .npy (a model with one input), .npz, .pb or .json.
    #[arg(long)]
    pub(crate) input: PathBuf,
    /// `reexec`: the node runs the exact plan and this machine re-executes it before accepting
    /// the answer (the default when the model has a plan); `none`: trust the node's float
    /// answer; `quorum`: K staked executors drawn by the ledger must agree bit for bit (a
    /// transaction signed with --key pays them).
    #[arg(long)]
    pub(crate) verify: Option<VerifyLevel>,
    /// With `--verify quorum`: how many executors must agree.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=i64::from(vouch_ledger::tx::MAX_QUORUM)))]
    pub(crate) k: u8,
    /// With `--verify quorum`: the most paid, split among the executors (default: 10 each).
    #[arg(long)]
    pub(crate) max_fee: Option<u64>,
    /// With `--verify quorum`: blocks the executors have before the task expires and the fee
    /// returns.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) deadline_blocks: u64,
    /// With `--verify quorum`: the chain's genesis file, whose validators must have finalized
    /// the answer (default: the genesis the node serves).
    #[arg(long)]
    pub(crate) genesis: Option<PathBuf>,
    /// Write the outputs here: .npy (one output), .npz or .json.
    #[arg(short, long)]
    pub(crate) output: Option<PathBuf>,
    /// Write the receipt here (JSON): the node's signed receipt, or with `--verify quorum` the
    /// task's proof (its K receipts, the finalized block and its certificate).
    #[arg(long)]
    pub(crate) receipt: Option<PathBuf>,
    /// Worker threads for re-execution (default: every core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The receipt (JSON, as `vouch infer --receipt` writes it).
    pub(crate) receipt: PathBuf,
    /// The inputs the receipt answers; needed to re-execute an exact receipt.
    #[arg(long)]
    pub(crate) input: Option<PathBuf>,
    /// Outputs to check against the receipt's output hash.
    #[arg(long)]
    pub(crate) output: Option<PathBuf>,
    /// For a quorum receipt: the chain's genesis file, whose validators must have finalized the
    /// task (default: the genesis the node serves).
    #[arg(long)]
    pub(crate) genesis: Option<PathBuf>,
    /// Worker threads for re-execution (default: every core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// A nonce that no other request of this process or another will repeat: a hash of the time,
/// the process id and a counter.
fn fresh_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut message = nanos.to_le_bytes().to_vec();
    message.extend_from_slice(&std::process::id().to_le_bytes());
    message.extend_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let digest = vouch_crypto::Digest::of("nonce", &message);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

fn write_receipt(path: &Path, receipt: &Receipt) -> Result<()> {
    let text = serde_json::to_string_pretty(receipt)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Checks everything the answer claims that this machine can check; at level `reexec` that
/// includes re-executing the plan.
async fn check_answer(
    client: &Client,
    manifest: &Manifest,
    receipt: &Receipt,
    request: (&[NamedTensor], VerifyLevel, u64),
    outputs: &[NamedTensor],
    threads: Option<usize>,
) -> Result<()> {
    let (inputs, level, nonce) = request;
    let plan_id = check_receipt_model(receipt, manifest)?;
    check_request(receipt, level, nonce)?;
    check_inputs(receipt, inputs)?;
    check_outputs(receipt, outputs)?;
    if level != VerifyLevel::None {
        let plan_id = plan_id.ok_or(VerifyError::NothingToReexecute)?;
        let plan = fetch_plan(client, manifest, Some(&plan_id)).await?;
        reexecute(receipt, &plan, inputs, &exec_options(threads, false))?;
    }
    Ok(())
}

pub async fn infer(node: &str, json_output: bool, args: &InferArgs) -> Result<()> {
    let client = Client::new(node)?;
    let (view, manifest) = client.fetch_manifest(&args.model).await?;
    let level = args.verify.unwrap_or(if manifest.body.plans.is_empty() {
        VerifyLevel::None
    } else {
        VerifyLevel::Reexec
    });
    if level == VerifyLevel::Reexec && manifest.body.plans.is_empty() {
        bail!(
            "model {}@{} has no exact plan, so its answers cannot be re-executed; use --verify none",
            manifest.body.name,
            manifest.body.version
        );
    }
    let inputs = name_inputs(&manifest.body.inputs, load_tensors(&args.input)?)?;
    let nonce = fresh_nonce();
    let response = client
        .infer(&InferRequest {
            model: view.id.to_string(),
            inputs: vouch_tensor::to_json_value(&inputs)?,
            verify: level,
            nonce,
        })
        .await?;
    let receipt = response.receipt;
    let outputs = vouch_tensor::from_json_value(response.outputs, &TensorLimits::default())
        .context("the node's outputs do not decode")?;
    let checked = check_answer(
        &client,
        &manifest,
        &receipt,
        (&inputs, level, nonce),
        &outputs,
        args.threads,
    )
    .await;
    if let Err(error) = checked {
        // The receipt is the evidence against the node; keep it, but never the answer.
        if let Some(path) = &args.receipt {
            write_receipt(path, &receipt)?;
            bail!(
                "the node's answer failed verification: {error:#} (its receipt is kept in {})",
                path.display()
            );
        }
        bail!("the node's answer failed verification: {error:#}");
    }
    if let Some(path) = &args.output {
        write_tensor_file(path, &outputs)?;
    }
    if let Some(path) = &args.receipt {
        write_receipt(path, &receipt)?;
    }
    let verified = match level {
        VerifyLevel::Reexec | VerifyLevel::Quorum => "re-executed locally: output hash and trace root match",
        VerifyLevel::None => "not re-executed (level none): receipt signature checked",
    };
    if json_output {
        let report = json!({
            "model_id": view.id,
            "verify": level,
            "verified": verified,
            "output_hash": receipt.body.output_hash,
            "receipt": receipt,
            "outputs": TensorsJson(&outputs),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_outputs(&outputs);
    println!("model_id: {}", view.id);
    println!("executor: {}", receipt.body.executor);
    if let Some(plan_id) = receipt.body.plan_id {
        println!("plan_id: {plan_id}");
    }
    if let Some(root) = receipt.body.trace_root {
        println!("trace_root: {root}");
    }
    println!("output_hash: {}", receipt.body.output_hash);
    println!("verified: {verified}");
    Ok(())
}

pub async fn verify(node: &str, json_output: bool, args: &VerifyArgs) -> Result<()> {
    let size = std::fs::metadata(&args.receipt)
        .with_context(|| format!("cannot read {}", args.receipt.display()))?
        .len();
    if size > crate::quorum::MAX_PROOF_BYTES {
        bail!(
            "{} is {size} bytes; a receipt is at most {}",
            args.receipt.display(),
            crate::quorum::MAX_PROOF_BYTES
        );
    }
    let text = std::fs::read(&args.receipt).with_context(|| format!("cannot read {}", args.receipt.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a receipt (not JSON)", args.receipt.display()))?;
    // A quorum inference's receipt is its task proof, which names the task.
    if value.get("task_id").is_some() {
        return crate::quorum::verify(node, json_output, value, args).await;
    }
    if size > MAX_RECEIPT_BYTES {
        bail!(
            "{} is {size} bytes; a node's receipt is at most {MAX_RECEIPT_BYTES}",
            args.receipt.display()
        );
    }
    let receipt: Receipt =
        serde_json::from_value(value).with_context(|| format!("{} is not a receipt", args.receipt.display()))?;
    receipt.check_signature()?;
    let client = Client::new(node)?;
    let (_, manifest) = client
        .fetch_manifest(&ModelRef::Id(receipt.body.model_id))
        .await
        .with_context(|| format!("cannot fetch model {} named by the receipt", receipt.body.model_id))?;
    let plan_id = check_receipt_model(&receipt, &manifest)?;
    if let Some(path) = &args.output {
        // Named as the model names its outputs, so an unnamed .npy hashes as the node's did.
        check_outputs(&receipt, &name_inputs(&manifest.body.outputs, load_tensors(path)?)?)?;
    }
    let inputs = match &args.input {
        Some(path) => Some(name_inputs(&manifest.body.inputs, load_tensors(path)?)?),
        None => None,
    };
    if let Some(inputs) = &inputs {
        check_inputs(&receipt, inputs)?;
    }
    let outcome = match (plan_id, &inputs) {
        (Some(plan_id), Some(inputs)) => {
            let plan = fetch_plan(&client, &manifest, Some(&plan_id)).await?;
            reexecute(&receipt, &plan, inputs, &exec_options(args.threads, false))?;
            "valid: re-executed the exact plan; output hash and trace root match"
        }
        (Some(_), None) => {
            bail!("cannot re-execute without the inputs (the receipt holds only their hash): pass --input FILE")
        }
        (None, _) => "valid signature from the executor; level none (float), so there is no plan to re-execute",
    };
    if json_output {
        let report = json!({
            "valid": true,
            "outcome": outcome,
            "model_id": receipt.body.model_id,
            "model": format!("{}@{}", manifest.body.name, manifest.body.version),
            "executor": receipt.body.executor,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model:    {}@{} ({})",
        manifest.body.name, manifest.body.version, receipt.body.model_id
    );
    println!("executor: {}", receipt.body.executor);
    println!("{outcome}");
    Ok(())
}
