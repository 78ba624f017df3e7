//! Quorum inference: `vouch infer --verify quorum` asks the ledger for K executors, waits for
//! the task to close, and believes the answer only after checking the finalization certificate
//! against the validators, the task record against the certified state root, the K receipts,
//! and the outputs against the hash they agree on. `vouch verify` checks the same proof later.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use vouch_client::Client;
use vouch_crypto::{Digest, SecretKey};
use vouch_ledger::tx::MAX_INLINE_INPUT_BYTES;
use vouch_ledger::{Genesis, InputRef, TxBody};
use vouch_node::chain::finality::{Agreement, TaskProof, ValidatorSet, check_outputs};
use vouch_tensor::{NamedTensor, TensorsJson, write_npz, write_tensor_file};
use vouch_types::ModelRef;
use vouch_verify::{check_inputs, name_inputs, reexecute, tensors_hash};

use crate::chain::{self, FINALITY_TIMEOUT};
use crate::receipts::{InferArgs, VerifyArgs};
use crate::run_model::{exec_options, fetch_plan, load_tensors, print_outputs};

/// How long `vouch infer` waits for a task to close once its request is in.
const TASK_TIMEOUT: Duration = Duration::from_secs(300);
/// How often it asks.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Largest genesis file read.
const MAX_GENESIS_BYTES: u64 = 16 << 20;
/// Largest outputs blob fetched.
const MAX_OUTPUT_BYTES: u64 = 1 << 30;
/// Largest quorum receipt file read.
pub(crate) const MAX_PROOF_BYTES: u64 = 1 << 20;

/// The validators to check certificates against: those of `--genesis FILE` when given (the
/// trusted way), or else those of the genesis the node serves, checked against the chain id
/// the node reports (which trusts the node about which chain it is on).
async fn validator_set(client: &Client, genesis: Option<&Path>) -> Result<(ValidatorSet, &'static str)> {
    let (text, from_node) = match genesis {
        Some(path) => {
            let size = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len();
            if size > MAX_GENESIS_BYTES {
                bail!(
                    "{} is {size} bytes; a genesis is at most {MAX_GENESIS_BYTES}",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            (text, false)
        }
        None => (client.chain_genesis().await?, true),
    };
    let genesis = Genesis::from_json(&text).context("the genesis does not parse")?;
    if from_node {
        let status = client.chain_status().await?;
        let reported = status.get("chain_id").and_then(|id| id.as_str()).unwrap_or_default();
        if reported != genesis.chain_id().to_string() {
            bail!(
                "the node serves a genesis of chain {} but reports chain {reported}",
                genesis.chain_id()
            );
        }
    }
    let source = if from_node {
        "the node's genesis (pass --genesis FILE to trust your own copy)"
    } else {
        "the given genesis"
    };
    Ok((ValidatorSet::from_genesis(&genesis)?, source))
}

fn write_proof(path: &Path, proof: &TaskProof) -> Result<()> {
    let text = serde_json::to_string_pretty(proof)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Waits until task `id` is no longer open on the node's finalized ledger.
async fn wait_closed(client: &Client, id: &Digest) -> Result<()> {
    let started = Instant::now();
    loop {
        match client.chain_task(id).await {
            Ok(answer) => {
                let status = answer.pointer("/task/status").and_then(|status| status.as_str());
                if status.is_some_and(|status| status != "open") {
                    return Ok(());
                }
            }
            // Not finalized yet: the request's block is still on its way.
            Err(vouch_client::ClientError::Api { status: 404, .. }) if started.elapsed() < FINALITY_TIMEOUT => {}
            Err(error) => return Err(error.into()),
        }
        if started.elapsed() > TASK_TIMEOUT {
            bail!("task {id} did not close within {} s", TASK_TIMEOUT.as_secs());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The task's outputs, fetched by id (verified as they stream) and checked against the hash the
/// executors agreed on.
async fn fetch_outputs(client: &Client, id: &Digest, agreement: &Agreement) -> Result<Vec<NamedTensor>> {
    let blob = client.chain_task_output(id).await?;
    let bytes = client.get_blob_bytes(&blob, MAX_OUTPUT_BYTES).await?;
    Ok(check_outputs(&bytes, &agreement.output_hash)?)
}

/// `vouch infer REF --input FILE --verify quorum --k K`.
pub(crate) async fn infer(node: &str, key: &SecretKey, json_output: bool, args: &InferArgs) -> Result<()> {
    let client = Client::new(node)?;
    let (view, manifest) = client.fetch_manifest(&args.model).await?;
    if manifest.body.plans.is_empty() {
        bail!(
            "model {}@{} has no exact plan, so executors cannot agree bit for bit; quorum needs one",
            manifest.body.name,
            manifest.body.version
        );
    }
    let (validators, trusted) = validator_set(&client, args.genesis.as_deref()).await?;
    let inputs = name_inputs(&manifest.body.inputs, load_tensors(&args.input)?)?;
    let input_hash = tensors_hash(&inputs);
    // Executors read any tensor format; an .npz of the named inputs is unambiguous.
    let encoded = write_npz(&inputs)?;
    let input = if encoded.len() <= MAX_INLINE_INPUT_BYTES {
        InputRef::Inline(encoded)
    } else {
        InputRef::Blob(client.put_blob_bytes(encoded).await?.id)
    };
    let status = client.chain_status().await?;
    let height = status.get("height").and_then(|height| height.as_u64()).unwrap_or(0);
    let k = args.k;
    let body = TxBody::RequestInference {
        model_id: view.id,
        input,
        input_hash,
        k,
        max_fee: args.max_fee.unwrap_or(10 * u64::from(k)),
        deadline: height + args.deadline_blocks,
    };
    let sent = chain::submit(&client, key, body).await?;
    let task_id = sent.id;
    wait_closed(&client, &task_id).await?;

    let proof: TaskProof = serde_json::from_value(client.chain_task_proof(&task_id).await?)
        .context("the node's task proof does not parse")?;
    proof
        .verify(&validators)
        .with_context(|| format!("the proof of task {task_id} does not hold"))?;
    if proof.task_id != task_id {
        bail!("the node proved task {} instead of {task_id}", proof.task_id);
    }
    let agreement = match proof.agreement() {
        Ok(agreement) => agreement,
        Err(error) => {
            // A disputed or expired task is a fact on the ledger worth keeping.
            if let Some(path) = &args.receipt {
                write_proof(path, &proof)?;
            }
            let kept = args
                .receipt
                .as_ref()
                .map(|path| format!(" (proof kept in {})", path.display()))
                .unwrap_or_default();
            bail!("no agreed answer: {error}{kept}");
        }
    };
    let outputs = fetch_outputs(&client, &task_id, &agreement).await?;
    if let Some(path) = &args.output {
        write_tensor_file(path, &outputs)?;
    }
    if let Some(path) = &args.receipt {
        write_proof(path, &proof)?;
    }
    let verified = format!(
        "{k} of {k} executors agree; block {} proves it, finalized by a quorum of the validators of {trusted}",
        proof.finality.header.height
    );
    if json_output {
        let report = json!({
            "model_id": view.id,
            "verify": "quorum",
            "task_id": task_id,
            "verified": verified,
            "output_hash": agreement.output_hash,
            "trace_root": agreement.trace_root,
            "plan_id": agreement.plan_id,
            "executors": proof.task.executors,
            "height": proof.finality.header.height,
            "outputs": TensorsJson(&outputs),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_outputs(&outputs);
    println!("model_id: {}", view.id);
    println!("task_id: {task_id}");
    for executor in &proof.task.executors {
        println!("executor: {executor}");
    }
    if let Some(plan_id) = agreement.plan_id {
        println!("plan_id: {plan_id}");
    }
    if let Some(root) = agreement.trace_root {
        println!("trace_root: {root}");
    }
    println!("output_hash: {}", agreement.output_hash);
    println!("verified: {verified}");
    Ok(())
}

/// `vouch verify PROOF`: the certificate, the task record, the receipts' agreement, and with
/// `--output` or `--input`, the outputs or a local re-execution.
pub(crate) async fn verify(node: &str, json_output: bool, proof: serde_json::Value, args: &VerifyArgs) -> Result<()> {
    let proof: TaskProof =
        serde_json::from_value(proof).with_context(|| format!("{} is not a quorum receipt", args.receipt.display()))?;
    let client = Client::new(node)?;
    let (validators, trusted) = validator_set(&client, args.genesis.as_deref()).await?;
    proof.verify(&validators)?;
    let agreement = proof.agreement()?;
    let task = &proof.task;
    let manifest = match (&args.input, &args.output) {
        (None, None) => None,
        _ => Some(
            client
                .fetch_manifest(&ModelRef::Id(task.model_id))
                .await
                .with_context(|| format!("cannot fetch model {} named by the task", task.model_id))?
                .1,
        ),
    };
    if let (Some(path), Some(manifest)) = (&args.output, &manifest) {
        // Named as the model names its outputs, so an unnamed .npy hashes as the executors' did.
        let outputs = name_inputs(&manifest.body.outputs, load_tensors(path)?)?;
        let hash = tensors_hash(&outputs);
        if hash != agreement.output_hash {
            bail!(
                "the outputs in {} hash to {hash}, but the executors agreed on {}",
                path.display(),
                agreement.output_hash
            );
        }
    }
    let mut outcome = format!(
        "valid: {} of {} executors agree; block {} proves it, finalized by a quorum of the validators of {trusted}",
        task.receipts.len(),
        task.k(),
        proof.finality.header.height
    );
    if let (Some(path), Some(manifest)) = (&args.input, &manifest) {
        let inputs = name_inputs(&manifest.body.inputs, load_tensors(path)?)?;
        let first = &task.receipts[0];
        check_inputs(first, &inputs)?;
        let plan = fetch_plan(&client, manifest, first.body.plan_id.as_ref()).await?;
        reexecute(first, &plan, &inputs, &exec_options(args.threads, false))?;
        outcome.push_str("; re-executed the exact plan here: output hash and trace root match");
    }
    if json_output {
        let report = json!({
            "valid": true,
            "outcome": outcome,
            "task_id": proof.task_id,
            "model_id": task.model_id,
            "executors": task.executors,
            "output_hash": agreement.output_hash,
            "height": proof.finality.header.height,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("task:   {}", proof.task_id);
    println!("model:  {}", task.model_id);
    println!("status: finalized");
    println!("{outcome}");
    Ok(())
}
