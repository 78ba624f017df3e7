//! `/v1/chain/…`: the node's view of the ledger — its finalized tip, transaction submission, and
//! accounts and tasks with Merkle proofs against the finalized state root.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use vouch_crypto::{Digest, PublicKey};
use vouch_ledger::state::{account_key, model_key, node_key, task_key};
use vouch_ledger::tx::MAX_TX_BYTES;
use vouch_ledger::{SignedTransaction, TxError};

use crate::api::{AppState, read_limited};
use crate::chain::app::SubmitError;
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
    let id: Digest = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_task_id", format!("{id:?} is not a task id")))?;
    let (height, _) = app.finalized_tip();
    let ledger = app.finalized_ledger();
    let task = ledger
        .task(&id)
        .map_err(ledger_error)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_task", format!("no task {id}")))?;
    Ok(Json(json!({
        "id": id,
        "task": task,
        "height": height,
        "state_root": ledger.root(),
        "proof": ledger.prove(&task_key(&id)),
    })))
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
