//! `/v1/chain/…`: the node's view of the ledger — its finalized tip, transaction submission, and
//! accounts and tasks with Merkle proofs against the finalized state root.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use vouch_crypto::{Digest, PublicKey};
use vouch_ledger::state::{account_key, model_key, node_key, task_key};
use vouch_ledger::tx::MAX_TX_BYTES;
use vouch_ledger::{SignedTransaction, TxError};

use std::time::Duration;

use futures::StreamExt;

use crate::api::{AppState, read_limited};
use crate::chain::app::SubmitError;
use crate::chain::finality::TaskProof;
use crate::chain::validator::Validator;
use crate::error::ApiError;

fn validator(state: &AppState) -> Result<&Validator, ApiError> {
    state.chain.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_chain",
            "this node is not part of a network (start it with --genesis)",
        )
    })
}

pub(crate) fn ledger_error(error: TxError) -> ApiError {
    ApiError::internal(error.to_string())
}

/// `GET /v1/chain/status`: the chain id and the finalized tip.
pub(crate) async fn status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let app = validator(&state)?.app();
    let (height, digest) = app.finalized_tip();
    let ledger = app.finalized_ledger();
    Ok(Json(json!({
        "chain_id": ledger.chain_id(),
        "height": height,
        "block": digest,
        "state_root": ledger.root(),
        "mempool": app.mempool_len(),
        "min_fee": ledger.params().min_fee,
    })))
}

/// `POST /v1/chain/transactions`: the body is a signed transaction's canonical encoding.
pub(crate) async fn submit(State(state): State<AppState>, body: Body) -> Result<(StatusCode, Json<Value>), ApiError> {
    let validator = validator(&state)?;
    let bytes = read_limited(body, MAX_TX_BYTES, "a transaction").await?;
    let chain_id = *validator.app().finalized_ledger().chain_id();
    let tx = SignedTransaction::decode(&bytes, &chain_id)
        .map_err(|error| ApiError::bad_request("invalid_transaction", error.to_string()))?;
    match validator.submit(tx) {
        Ok(id) => Ok((StatusCode::ACCEPTED, Json(json!({ "id": id })))),
        Err(SubmitError::Refused(error)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "transaction_refused",
            error.to_string(),
        )),
        Err(error @ SubmitError::Duplicate(_)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "duplicate", error.to_string()))
        }
        Err(error @ SubmitError::Full) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "mempool_full",
            error.to_string(),
        )),
    }
}

/// `GET /v1/chain/accounts/{public_key}`: balance and nonce, and the node registration if any,
/// each proven against the state root.
pub(crate) async fn account(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Value>, ApiError> {
    let app = validator(&state)?.app();
    let key: PublicKey = key
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_public_key", format!("{key:?} is not a public key")))?;
    let (height, _) = app.finalized_tip();
    let ledger = app.finalized_ledger();
    let account = ledger.account(&key).map_err(ledger_error)?;
    let node = ledger.node(&key).map_err(ledger_error)?;
    Ok(Json(json!({
        "public_key": key,
        "balance": account.balance,
        "nonce": account.nonce,
        "node": node,
        "height": height,
        "state_root": ledger.root(),
        "proof": ledger.prove(&account_key(&key)),
        "node_proof": ledger.prove(&node_key(&key)),
    })))
}

/// `GET /v1/chain/tasks/{id}`: a quorum task with its receipts, proven against the state root.
pub(crate) async fn task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let app = validator(&state)?.app();
    let id = parse_task_id(&id)?;
    let (height, _, ledger) = app.finalized_snapshot();
    let task = ledger
        .task(&id)
        .map_err(ledger_error)?
        .ok_or_else(|| unknown_task(&id))?;
    Ok(Json(json!({
        "id": id,
        "task": task,
        "height": height,
        "state_root": ledger.root(),
        "proof": ledger.prove(&task_key(&id)),
    })))
}

/// How long a proof request waits for a finalized block with a certificate of its own.
const PROOF_WAIT_MS: u64 = 5_000;

fn parse_task_id(id: &str) -> Result<Digest, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request("invalid_task_id", format!("{id:?} is not a task id")))
}

fn unknown_task(id: &Digest) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_task", format!("no task {id}"))
}

/// `GET /v1/chain/tasks/{id}/proof`: the task as a [`TaskProof`]: its record, the finalized
/// block whose state holds it with that block's finalization certificate, and the Merkle proof.
/// A client checks it against the genesis validators without trusting this node.
pub(crate) async fn task_proof(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let validator = validator(&state)?;
    let id = parse_task_id(&id)?;
    let app = validator.app();
    let mut finalized = app.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(PROOF_WAIT_MS);
    loop {
        let (ledger, finality) = validator.finalized_with_proof().await;
        let task = ledger
            .task(&id)
            .map_err(ledger_error)?
            .ok_or_else(|| unknown_task(&id))?;
        if let Some(finality) = finality {
            let proof = TaskProof {
                chain_id: *ledger.chain_id(),
                task_id: id,
                task,
                finality,
                state_proof: ledger.prove(&task_key(&id)),
            };
            return serde_json::to_value(proof)
                .map(Json)
                .map_err(|error| ApiError::internal(error.to_string()));
        }
        // This block was finalized as the ancestor of a later one and has no certificate of
        // its own here; the next block will.
        match tokio::time::timeout_at(deadline, finalized.next()).await {
            Ok(Some(())) => {}
            _ => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_certificate",
                    format!("no finalized block with a certificate within {PROOF_WAIT_MS} ms; try again"),
                ));
            }
        }
    }
}

/// `GET /v1/chain/tasks/{id}/output`: `{"task", "outputs"}`, the blob (an `.npz`) holding the
/// outputs of a quorum task. A node that did not run the task fetches them from its executors
/// and checks them against their receipts, except for requests from peers, which it answers
/// only from what it holds.
pub(crate) async fn task_output(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    validator(&state)?;
    let id = parse_task_id(&id)?;
    let registry = state.registry.clone();
    let held = tokio::task::spawn_blocking(move || registry.task_output(&id))
        .await
        .map_err(|error| ApiError::internal(error.to_string()))?
        .map_err(|error| ApiError::internal(error.to_string()))?;
    let outputs = match (held, &state.replicator) {
        (Some(blob), _) => Some(blob),
        (None, Some(replicator)) if !headers.contains_key(vouch_client::PEER_FETCH_HEADER) => {
            replicator.fetch_task_output(&id).await.map_err(|error| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "fetch_failed",
                    format!("task {id}'s outputs: {error}"),
                )
            })?
        }
        _ => None,
    };
    let outputs = outputs.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_output",
            format!("no outputs of task {id} here or at its executors (an open task has none yet)"),
        )
    })?;
    Ok(Json(json!({ "task": id, "outputs": outputs })))
}

/// `GET /v1/chain/genesis`: the genesis JSON, whose hash is the chain id. A client that pins the
/// chain id can take it from any node.
pub(crate) async fn genesis(
    State(state): State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    let genesis = validator(&state)?.genesis();
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        genesis.to_json(),
    ))
}

/// `GET /v1/chain/models/{id}`: a published model's record (name, version, publisher, replicas
/// assigned and confirmed), proven against the state root.
pub(crate) async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let app = validator(&state)?.app();
    let id: vouch_types::ModelId = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_model_id", format!("{id:?} is not a model id")))?;
    let (height, _) = app.finalized_tip();
    let ledger = app.finalized_ledger();
    let model = ledger.model(&id).map_err(ledger_error)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!("the ledger has not published model {id}"),
        )
    })?;
    Ok(Json(json!({
        "id": id,
        "model": model,
        "height": height,
        "state_root": ledger.root(),
        "proof": ledger.prove(&model_key(&id)),
    })))
}
