//! An executor: it runs the exact plan for each quorum task the ledger assigned it and submits
//! its signed receipt as a transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use commonware_runtime::{Spawner, Supervisor};
use futures::StreamExt;
use tracing::{debug, info, warn};
use vouch_crypto::{Digest, SecretKey};
use vouch_engine::{ExecOptions, Plan, PlanLimits};
use vouch_ledger::state::TaskRecord;
use vouch_ledger::{InputRef, Ledger, Transaction, TxBody};
use vouch_store::BlobStore;
use vouch_tensor::{TensorFormat, TensorLimits};
use vouch_types::{BlobId, Manifest, ManifestLimits, ModelId, Receipt, ReceiptBody, VerifyLevel};
use vouch_verify::{decode_plan, name_inputs, run_exact, tensors_hash};

use super::app::SubmitError;
use super::validator::Validator;
use crate::infer::ModelCache;
use crate::replication::holds_model;

/// How many prepared plans an executor keeps.
const PLAN_CACHE_ENTRIES: usize = 8;

/// What an executor needs.
#[derive(Clone)]
pub struct ExecutorConfig {
    /// The executor's key: the node registered on the ledger.
    pub key: SecretKey,
    /// Where the models and blob inputs are.
    pub store: Arc<dyn BlobStore>,
    /// Largest manifest, plan or input blob read.
    pub max_blob_bytes: u64,
    /// Bounds on the decoded inputs.
    pub tensor_limits: TensorLimits,
    /// Threads for one run of a plan.
    pub threads: usize,
    /// After this many finalized blocks without its receipts going in, the executor submits
    /// them again from its account's current nonce.
    pub resubmit_after_blocks: u64,
    /// The node's help with input blobs and outputs (none: inputs must be in the store, and
    /// outputs are not kept).
    pub support: Option<Arc<dyn TaskSupport>>,
}

/// What an executor asks of its node beyond the store.
pub trait TaskSupport: Send + Sync {
    /// Fetches `blob` from peers into the store (a task's input uploaded to another node);
    /// blocking.
    fn fetch_blob(&self, blob: &BlobId) -> Result<(), String>;
    /// Records that the stored blob `outputs` holds the outputs this node computed for `task`,
    /// so that clients can fetch them.
    fn keep_outputs(&self, task: &Digest, outputs: &BlobId) -> Result<(), String>;
}

impl std::fmt::Debug for ExecutorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorConfig")
            .field("executor", &self.key.public_key())
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// Why an executor could not answer a task.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// A blob the task needs is not here or cannot be read.
    #[error("blob {what}: {reason}")]
    Blob {
        /// Which blob.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The model's manifest does not decode.
    #[error("manifest: {0}")]
    Manifest(String),
    /// The model has no exact plan.
    #[error("model {0} has no exact plan")]
    NoPlan(ModelId),
    /// The plan or the input is refused, or the plan fails on the input.
    #[error("{0}")]
    Verify(#[from] vouch_verify::VerifyError),
    /// The input does not decode.
    #[error("input: {0}")]
    Input(String),
    /// The receipt could not be signed.
    #[error("receipt: {0}")]
    Receipt(vouch_types::ReceiptError),
    /// The input's hash differs from the one the task names.
    #[error("the input hashes to {computed}, the task names {expected}")]
    InputHash {
        /// What the task names.
        expected: Digest,
        /// What the input gives.
        computed: Digest,
    },
}

struct Prepared {
    manifest: Manifest,
    plan: Plan,
}

fn read_blob(store: &dyn BlobStore, id: &BlobId, max_bytes: u64, what: &'static str) -> Result<Vec<u8>, AnswerError> {
    store.read_to_vec(id, max_bytes).map_err(|error| AnswerError::Blob {
        what,
        reason: format!("{id}: {error}"),
    })
}

fn prepare(config: &ExecutorConfig, model_id: &ModelId) -> Result<Prepared, AnswerError> {
    let store = config.store.as_ref();
    let bytes = read_blob(store, &model_id.0, config.max_blob_bytes, "manifest")?;
    let manifest =
        Manifest::decode(&bytes, &ManifestLimits::default()).map_err(|e| AnswerError::Manifest(e.to_string()))?;
    let plan_ref = manifest.body.plans.first().ok_or(AnswerError::NoPlan(*model_id))?;
    let plan_bytes = read_blob(store, &plan_ref.id, config.max_blob_bytes, "plan")?;
    let plan = decode_plan(&plan_ref.id, &plan_bytes, &PlanLimits::default())?;
    Ok(Prepared { manifest, plan })
}

/// Runs `task`'s model on its input and signs the receipt; blocking.
fn answer(
    config: &ExecutorConfig,
    cache: &ModelCache<Prepared>,
    id: &Digest,
    task: &TaskRecord,
) -> Result<Receipt, AnswerError> {
    let key = (task.model_id, VerifyLevel::Quorum);
    let prepared = match cache.get(&key) {
        Some(prepared) => prepared,
        None => {
            let prepared = Arc::new(prepare(config, &task.model_id)?);
            cache.insert(key, prepared.clone());
            prepared
        }
    };
    let bytes = match &task.input {
        InputRef::Inline(bytes) => bytes.clone(),
        InputRef::Blob(blob) => {
            let store = config.store.as_ref();
            let held = store.size(blob).map_err(|error| AnswerError::Blob {
                what: "input",
                reason: format!("{blob}: {error}"),
            })?;
            if let (None, Some(support)) = (held, &config.support) {
                support
                    .fetch_blob(blob)
                    .map_err(|reason| AnswerError::Blob { what: "input", reason })?;
            }
            read_blob(store, blob, config.max_blob_bytes, "input")?
        }
    };
    let tensors = TensorFormat::sniff(&bytes)
        .decode(&bytes, &config.tensor_limits)
        .map_err(|e| AnswerError::Input(e.to_string()))?;
    let inputs = name_inputs(&prepared.manifest.body.inputs, tensors)?;
    let input_hash = tensors_hash(&inputs);
    if input_hash != task.input_hash {
        return Err(AnswerError::InputHash {
            expected: task.input_hash,
            computed: input_hash,
        });
    }
    let options = ExecOptions {
        threads: config.threads.max(1),
        ..ExecOptions::default()
    };
    let answer = run_exact(&prepared.plan, &inputs, &options)?;
    if let Some(support) = &config.support {
        // The receipt does not depend on keeping the outputs: another executor may serve them.
        if let Err(error) = keep_outputs(config.store.as_ref(), support.as_ref(), id, &answer.outputs) {
            warn!(task = %id, %error, "outputs not kept");
        }
    }
    ReceiptBody {
        request_hash: *id,
        model_id: task.model_id,
        level: VerifyLevel::Quorum,
        plan_id: Some(prepared.plan.id()),
        input_hash,
        output_hash: answer.output_hash,
        trace_root: Some(answer.trace_root),
        executor: config.key.public_key(),
    }
    .sign(&config.key)
    .map_err(AnswerError::Receipt)
}

/// Stores `outputs` as an `.npz` blob and records it as `task`'s.
fn keep_outputs(
    store: &dyn BlobStore,
    support: &dyn TaskSupport,
    task: &Digest,
    outputs: &[vouch_tensor::NamedTensor],
) -> Result<(), String> {
    let bytes = vouch_tensor::write_npz(outputs).map_err(|error| error.to_string())?;
    let stored = store
        .put(&mut bytes.as_slice(), bytes.len() as u64)
        .map_err(|error| error.to_string())?;
    support.keep_outputs(task, &stored.id)
}

/// What the executor has done for the tasks it still owes.
#[derive(Default)]
struct Progress {
    /// Signed receipts, by task.
    answers: HashMap<Digest, Receipt>,
    /// Tasks it cannot answer (logged once).
    failed: HashSet<Digest>,
    /// Tasks whose receipt transaction is submitted.
    submitted: HashSet<Digest>,
    /// Models whose replica confirmation is submitted.
    confirmations: HashSet<ModelId>,
    /// The nonce of the next receipt transaction.
    next_nonce: u64,
    /// The account's nonce, and the height at which it last moved.
    seen_nonce: u64,
    progress_height: u64,
}

/// Runs an executor for `validator`'s chain until the runtime stops: after each finalized block
/// it answers the tasks assigned to its key and submits the receipts.
pub async fn run<E: Spawner + Supervisor>(context: E, validator: Validator, config: ExecutorConfig) {
    let app = validator.app().clone();
    let me = config.key.public_key();
    let mut finalized = app.subscribe();
    let cache = Arc::new(ModelCache::new(PLAN_CACHE_ENTRIES));
    let config = Arc::new(config);
    let mut progress = Progress::default();
    info!(executor = %me, "executor started");
    loop {
        let ledger = app.finalized_ledger();
        let height = app.finalized_height();
        if let Err(error) = step(&context, &validator, &config, &cache, &ledger, height, &mut progress).await {
            warn!(%error, "executor cannot read the ledger");
        }
        if finalized.next().await.is_none() {
            return;
        }
    }
}

async fn step<E: Spawner + Supervisor>(
    context: &E,
    validator: &Validator,
    config: &Arc<ExecutorConfig>,
    cache: &Arc<ModelCache<Prepared>>,
    ledger: &Ledger,
    height: u64,
    progress: &mut Progress,
) -> Result<(), vouch_ledger::TxError> {
    let me = config.key.public_key();
    let assigned = ledger.assigned_tasks(&me)?;
    let owed: HashSet<Digest> = assigned.iter().copied().collect();
    progress.answers.retain(|id, _| owed.contains(id));
    progress.failed.retain(|id| owed.contains(id));
    progress.submitted.retain(|id| owed.contains(id));

    for id in &assigned {
        if progress.answers.contains_key(id) || progress.failed.contains(id) {
            continue;
        }
        let Some(task) = ledger.task(id)? else { continue };
        let (config, cache, task_id) = (config.clone(), cache.clone(), *id);
        // Running a plan holds a thread; keep it off the runtime's async workers.
        let outcome = context
            .child("answer")
            .shared(true)
            .spawn(move |_| async move { answer(&config, &cache, &task_id, &task) })
            .await;
        match outcome {
            Ok(Ok(receipt)) => {
                progress.answers.insert(*id, receipt);
            }
            Ok(Err(error)) => {
                warn!(task = %id, %error, "cannot answer an assigned task");
                progress.failed.insert(*id);
            }
            Err(error) => {
                warn!(task = %id, %error, "the answering task stopped");
                progress.failed.insert(*id);
            }
        }
    }

    let account_nonce = ledger.account(&me)?.nonce;
    if account_nonce != progress.seen_nonce {
        progress.seen_nonce = account_nonce;
        progress.progress_height = height;
    }
    let stalled = account_nonce < progress.next_nonce
        && height >= progress.progress_height.saturating_add(config.resubmit_after_blocks);
    if stalled || account_nonce > progress.next_nonce {
        // A submitted receipt was refused or lost, so later nonces cannot apply: start again
        // from the account's nonce with what is still owed.
        progress.submitted.clear();
        progress.confirmations.clear();
        progress.next_nonce = account_nonce;
        progress.progress_height = height;
    }
    let fee = ledger.params().min_fee;
    for id in &assigned {
        let Some(receipt) = progress.answers.get(id) else {
            continue;
        };
        if progress.submitted.contains(id) {
            continue;
        }
        let tx = Transaction {
            signer: me,
            nonce: progress.next_nonce,
            fee,
            body: TxBody::SubmitReceipt {
                receipt: receipt.clone(),
            },
        }
        .sign(&config.key, ledger.chain_id());
        match validator.submit(tx) {
            // A resubmission can find the same transaction still waiting: it is in.
            Ok(tx_id) | Err(SubmitError::Duplicate(tx_id)) => {
                debug!(task = %id, tx = %tx_id, "receipt submitted");
                progress.submitted.insert(*id);
                progress.next_nonce += 1;
            }
            Err(error) => {
                warn!(task = %id, %error, "receipt not admitted");
                return Ok(());
            }
        }
    }

    // A replica confirms a model once the node's store holds all of it (the replication
    // follower fetches the blobs).
    let duties = ledger.replica_duties(&me)?;
    progress.confirmations.retain(|model| duties.contains(model));
    for model in duties {
        if progress.confirmations.contains(&model) {
            continue;
        }
        match holds_model(config.store.as_ref(), &model, &ManifestLimits::default()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                debug!(%model, %error, "replica not ready to confirm");
                continue;
            }
        }
        let tx = Transaction {
            signer: me,
            nonce: progress.next_nonce,
            fee,
            body: TxBody::ConfirmReplica { model_id: model },
        }
        .sign(&config.key, ledger.chain_id());
        match validator.submit(tx) {
            Ok(tx_id) | Err(SubmitError::Duplicate(tx_id)) => {
                info!(%model, tx = %tx_id, "replica confirmation submitted");
                progress.confirmations.insert(model);
                progress.next_nonce += 1;
            }
            Err(error) => {
                warn!(%model, %error, "replica confirmation not admitted");
                break;
            }
        }
    }
    Ok(())
}
