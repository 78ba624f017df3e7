//! `POST /v1/infer`: run a published model and sign a receipt for the answer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use vouch_crypto::SecretKey;
use vouch_engine::{ExecOptions, FloatModel, Plan, PlanLimits, load_onnx};
use vouch_tensor::NamedTensor;
use vouch_types::api::{InferRequest, InferResponse};
use vouch_types::{Manifest, ModelId, ModelRef, ReceiptBody, VerifyLevel, request_hash};
use vouch_verify::{VerifyError, decode_plan, name_inputs, run_exact, tensors_hash};

use crate::api::{AppState, read_limited};
use crate::error::ApiError;

/// A model made ready to run, kept between requests.
pub(crate) enum Prepared {
    Float(FloatModel),
    Exact(Plan),
}

/// A model prepared for one verification level.
type CacheKey = (ModelId, VerifyLevel);

/// Prepared models, the most recently prepared last; bounded so that requests for many models
/// cannot exhaust memory.
pub(crate) struct ModelCache<T = Prepared> {
    entries: Mutex<VecDeque<(CacheKey, Arc<T>)>>,
    capacity: usize,
}

impl<T> ModelCache<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    pub(crate) fn get(&self, key: &CacheKey) -> Option<Arc<T>> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.iter().find(|(k, _)| k == key).map(|(_, p)| p.clone())
    }

    pub(crate) fn insert(&self, key: CacheKey, prepared: Arc<T>) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|(k, _)| *k != key);
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back((key, prepared));
    }
}

/// What inference needs beyond the API state.
pub(crate) struct Inference {
    /// Signs receipts; its public half is the executor's id.
    pub key: SecretKey,
    pub cache: ModelCache,
    pub slots: Arc<tokio::sync::Semaphore>,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// Loads and prepares a model for `level` from the node's store.
fn prepare(state: &AppState, id: ModelId, manifest: &Manifest, level: VerifyLevel) -> Result<Prepared, ApiError> {
    let limit = state.limits.max_inspect_bytes;
    match level {
        VerifyLevel::Quorum => Err(unprocessable(
            "quorum_via_ledger",
            "quorum inference is requested on the ledger, not from one node",
        )),
        VerifyLevel::Reexec => {
            let plan = manifest.body.plans.first().ok_or_else(|| {
                unprocessable(
                    "no_exact_plan",
                    format!("model {id} has no exact plan; ask for --verify none, or publish it with --calibration"),
                )
            })?;
            let bytes = state.store.read_to_vec(&plan.id, limit)?;
            let plan = decode_plan(&plan.id, &bytes, &PlanLimits::default())
                .map_err(|e| unprocessable("invalid_plan", e.to_string()))?;
            Ok(Prepared::Exact(plan))
        }
        VerifyLevel::None => {
            let file = manifest
                .body
                .files
                .first()
                .ok_or_else(|| unprocessable("invalid_model", "the manifest lists no files"))?;
            let bytes = state.store.read_to_vec(&file.blob, limit)?;
            let model = load_onnx(&bytes).map_err(|e| unprocessable("invalid_model", e.to_string()))?;
            let float = FloatModel::new(&model).map_err(|e| unprocessable("invalid_model", e.to_string()))?;
            Ok(Prepared::Float(float))
        }
    }
}

/// Runs one request to its signed answer; blocking.
fn answer(
    state: &AppState,
    id: ModelId,
    manifest: &Manifest,
    request: &InferRequest,
    inputs: Vec<NamedTensor>,
) -> Result<InferResponse, ApiError> {
    let inference = &state.inference;
    let inputs =
        name_inputs(&manifest.body.inputs, inputs).map_err(|e| unprocessable("invalid_inputs", e.to_string()))?;
    let key = (id, request.verify);
    let prepared = match inference.cache.get(&key) {
        Some(prepared) => prepared,
        None => {
            let prepared = Arc::new(prepare(state, id, manifest, request.verify)?);
            inference.cache.insert(key, prepared.clone());
            prepared
        }
    };
    let input_error = |e: String| unprocessable("invalid_inputs", e);
    let (outputs, exact) = match prepared.as_ref() {
        Prepared::Exact(plan) => {
            let options = ExecOptions {
                threads: state.limits.inference_threads.max(1),
                max_elements: state.limits.max_inference_elements,
                ..ExecOptions::default()
            };
            let answer = run_exact(plan, &inputs, &options).map_err(|e| match e {
                VerifyError::Execution(e) => input_error(e.to_string()),
                other => ApiError::internal(other.to_string()),
            })?;
            (answer.outputs, Some((plan.id(), answer.trace_root)))
        }
        Prepared::Float(model) => (
            model
                .run(&inputs, state.limits.inference_threads)
                .map_err(|e| input_error(e.to_string()))?,
            None,
        ),
    };
    let input_hash = tensors_hash(&inputs);
    let receipt = ReceiptBody {
        request_hash: request_hash(&id, &input_hash, request.verify, request.nonce),
        model_id: id,
        level: request.verify,
        plan_id: exact.map(|(plan_id, _)| plan_id),
        input_hash,
        output_hash: tensors_hash(&outputs),
        trace_root: exact.map(|(_, root)| root),
        executor: inference.key.public_key(),
    }
    .sign(&inference.key)
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let outputs = vouch_tensor::to_json_value(&outputs).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(InferResponse { outputs, receipt })
}

/// `POST /v1/infer`: the body is an [`InferRequest`]; the answer an [`InferResponse`].
pub(crate) async fn infer(State(state): State<AppState>, body: Body) -> Result<Json<InferResponse>, ApiError> {
    let bytes = read_limited(body, state.limits.max_infer_request_bytes, "an inference request").await?;
    let mut request: InferRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("not an inference request: {e}")))?;
    drop(bytes);
    let reference: ModelRef = request
        .model
        .parse()
        .map_err(|e: vouch_types::NameError| ApiError::bad_request("invalid_reference", e.to_string()))?;
    // The inputs can be large: decode them out of the request rather than copying them.
    let inputs_json = std::mem::take(&mut request.inputs);
    let inputs = vouch_tensor::from_json_value(inputs_json, &state.limits.inference_tensors)
        .map_err(|e| ApiError::bad_request("invalid_inputs", e.to_string()))?;
    let slot = state.inference.slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_inferences",
            "too many inferences in progress; retry later",
        )
    })?;
    let task_state = state.clone();
    let response = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let published = task_state.registry.resolve(&reference)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("no model {reference} on this node"),
            )
        })?;
        answer(&task_state, published.id, &published.manifest, &request, inputs)
    })
    .await??;
    state.metrics.inferences.inc();
    Ok(Json(response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_types::BlobId;

    fn key(name: &[u8], level: VerifyLevel) -> CacheKey {
        (ModelId(BlobId::of(name)), level)
    }

    #[test]
    fn the_cache_keeps_the_most_recently_prepared_up_to_its_capacity() {
        let cache = ModelCache::<u32>::new(2);
        cache.insert(key(b"a", VerifyLevel::Reexec), Arc::new(1));
        cache.insert(key(b"a", VerifyLevel::None), Arc::new(2));
        assert_eq!(cache.get(&key(b"a", VerifyLevel::Reexec)).as_deref(), Some(&1));
        cache.insert(key(b"b", VerifyLevel::Reexec), Arc::new(3));
        assert!(
            cache.get(&key(b"a", VerifyLevel::Reexec)).is_none(),
            "the oldest is evicted"
        );
        assert_eq!(cache.get(&key(b"a", VerifyLevel::None)).as_deref(), Some(&2));
        assert_eq!(cache.get(&key(b"b", VerifyLevel::Reexec)).as_deref(), Some(&3));
        // Re-inserting a key replaces it rather than growing the cache.
        cache.insert(key(b"b", VerifyLevel::Reexec), Arc::new(4));
        assert_eq!(cache.get(&key(b"b", VerifyLevel::Reexec)).as_deref(), Some(&4));
        assert_eq!(cache.get(&key(b"a", VerifyLevel::None)).as_deref(), Some(&2));
        let disabled = ModelCache::<u32>::new(0);
        disabled.insert(key(b"a", VerifyLevel::None), Arc::new(1));
        assert!(disabled.get(&key(b"a", VerifyLevel::None)).is_none());
    }
}
