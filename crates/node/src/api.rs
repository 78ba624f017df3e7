//! The HTTP API under `/v1`, plus `/healthz` and `/metrics`.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tower_http::timeout::RequestBodyTimeoutLayer;
use vouch_store::BlobStore;
use vouch_types::api::{BlobInfo, Health, ModelView, PublishInfo};
use vouch_types::{BlobId, Manifest, ModelFormat, ModelName, ModelRef};

use crate::NodeLimits;
use crate::chain_api::ledger_error;
use crate::error::ApiError;
use crate::metrics::{HttpLabels, Metrics};
use crate::registry::{PublishOutcome, Published, Registry, RegistryError};
use crate::streaming::stream_body;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub store: Arc<dyn BlobStore>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: NodeLimits,
    pub upload_slots: Arc<Semaphore>,
    pub download_slots: Arc<Semaphore>,
    pub inference: Arc<crate::infer::Inference>,
    /// The validator, when the node takes part in a network.
    pub chain: Option<crate::chain::validator::Validator>,
    /// Fetches models from peers, when the node takes part in a network.
    pub replicator: Option<Arc<crate::replication::Replicator>>,
}

/// Builds the router.
pub(crate) fn router(state: AppState) -> Router {
    let request_timeout = Duration::from_millis(state.limits.request_timeout_ms);
    let body_idle_timeout = Duration::from_millis(state.limits.body_idle_timeout_ms);
    // Blob transfers may take long, so they have no deadline; like every request, they are
    // bounded by the idle timeout on the request body below.
    let transfers = Router::new()
        .route("/v1/blobs", post(put_blob))
        .route("/v1/blobs/{id}", get(get_blob))
        .route("/v1/blobs/{id}/verified", get(get_verified));
    let queries = Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", post(publish_model).get(list_models))
        .route("/v1/models/{*reference}", get(show_model))
        .route("/v1/infer", post(crate::infer::infer))
        .route("/v1/chain/status", get(crate::chain_api::status))
        .route("/v1/chain/transactions", post(crate::chain_api::submit))
        .route("/v1/chain/accounts/{key}", get(crate::chain_api::account))
        .route("/v1/chain/genesis", get(crate::chain_api::genesis))
        .route("/v1/chain/tasks/{id}", get(crate::chain_api::task))
        .route("/v1/chain/tasks/{id}/proof", get(crate::chain_api::task_proof))
        .route("/v1/chain/tasks/{id}/output", get(crate::chain_api::task_output))
        .route("/v1/chain/models/{id}", get(crate::chain_api::model))
        .layer(middleware::from_fn_with_state(request_timeout, deadline));
    transfers
        .merge(queries)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(RequestBodyTimeoutLayer::new(body_idle_timeout))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Answers `408 request_timeout` (as JSON, like every error) when a request runs past its deadline.
async fn deadline(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {} ms", timeout.as_millis()),
        )
        .into_response(),
    }
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state.metrics.http_requests.get_or_create(&labels).inc();
    response
}

async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        node_key: state.inference.key.public_key(),
    })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

fn parse_blob_id(text: &str) -> Result<BlobId, ApiError> {
    text.parse()
        .map_err(|e: vouch_types::IdError| ApiError::bad_request("invalid_id", e.to_string()))
}

/// `POST /v1/blobs`: the body is the blob; `Content-Length` is required so that an oversize
/// upload is refused before a byte of it is read.
async fn put_blob(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let size = headers
        .get(header::CONTENT_LENGTH)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "a blob upload needs a Content-Length header",
            )
        })?
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ApiError::bad_request("bad_content_length", "Content-Length is not a number"))?;
    if size > state.limits.max_upload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "blob of {size} bytes is larger than this node's limit of {} bytes",
                state.limits.max_upload_bytes
            ),
        ));
    }
    let _slot = state.upload_slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_uploads",
            "too many uploads in progress; retry later",
        )
    })?;
    state.metrics.uploads_in_flight.inc();
    let (mut reader, pump) = vouch_store::bridge::reader(body.into_data_stream());
    tokio::spawn(pump);
    let store = state.store.clone();
    let result = tokio::task::spawn_blocking(move || store.put(&mut reader, size)).await;
    state.metrics.uploads_in_flight.dec();
    let outcome = result?.map_err(|error| match error {
        vouch_store::StoreError::Io(e) => ApiError::bad_request("upload_failed", format!("upload failed: {e}")),
        other => other.into(),
    })?;
    if outcome.created {
        state.metrics.blobs_stored.inc();
        state.metrics.blob_bytes_received.inc_by(outcome.size);
    }
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(BlobInfo {
            id: outcome.id,
            size: outcome.size,
            created: outcome.created,
        }),
    )
        .into_response())
}

/// Parses a single `Range: bytes=…` header. `Ok(None)`: serve the whole blob (no header, or one
/// this node does not interpret, which HTTP allows it to ignore); `Err`: unsatisfiable.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = spec.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), number(first), number(last)) {
        (true, _, Some(suffix)) if suffix > 0 && size > 0 => Ok(Some(size - suffix.min(size)..size)),
        (true, _, Some(_)) => Err(()),
        (false, Some(start), None) if last.trim().is_empty() => {
            if start < size {
                Ok(Some(start..size))
            } else {
                Err(())
            }
        }
        (false, Some(start), Some(end)) if start <= end => {
            if start < size {
                Ok(Some(start..end.saturating_add(1).min(size)))
            } else {
                Err(())
            }
        }
        _ => Ok(None),
    }
}

/// The size of blob `id`. On a network node that lacks it, a request from a client (not from a
/// peer, see [`vouch_client::PEER_FETCH_HEADER`]) first fetches it from the replicas of the model
/// that lists it.
async fn blob_size(state: &AppState, id: BlobId, headers: &HeaderMap) -> Result<u64, ApiError> {
    let (mut size, mut quarantined) = stat_blob(state, id).await?;
    if size.is_none()
        && let Some(replicator) = &state.replicator
        && !headers.contains_key(vouch_client::PEER_FETCH_HEADER)
    {
        // A fetch is a download from a peer: it takes a download slot while it runs. Storing
        // the fetched bytes also restores a copy that was put aside as corrupt.
        let _slot = acquire_download(state)?;
        if let Err(error) = replicator.fetch_for_pull(&id).await {
            tracing::warn!(blob = %id, %error, "cannot fetch a blob from the replicas");
        }
        (size, quarantined) = stat_blob(state, id).await?;
    }
    match size {
        Some(size) => Ok(size),
        None if quarantined => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "blob_corrupt",
            format!("blob {id} failed verification on this node and was put aside; push it again to restore it"),
        )),
        None => Err(vouch_store::StoreError::NotFound(id).into()),
    }
}

/// The blob's size if the store holds it, and whether it was put aside as corrupt.
async fn stat_blob(state: &AppState, id: BlobId) -> Result<(Option<u64>, bool), ApiError> {
    let store = state.store.clone();
    Ok(tokio::task::spawn_blocking(move || {
        Ok::<_, vouch_store::StoreError>((store.size(&id)?, store.is_quarantined(&id)?))
    })
    .await??)
}

/// `GET|HEAD /v1/blobs/{id}`: raw bytes, with single-range requests; every chunk group is
/// verified before it is sent.
async fn get_blob(
    State(state): State<AppState>,
    method: Method,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_blob_id(&id)?;
    let size = blob_size(&state, id, &headers).await?;
    let range = parse_range(&headers, size).map_err(|()| {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!("blob {id} has {size} bytes"),
        )
    });
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{id}\""))
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    let range = match range {
        Ok(range) => range,
        Err(error) => {
            let mut response = error.into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return Ok(response);
        }
    };
    let (status, byte_range) = match range {
        Some(r) => {
            response = response.header(header::CONTENT_RANGE, format!("bytes {}-{}/{size}", r.start, r.end - 1));
            (StatusCode::PARTIAL_CONTENT, r)
        }
        None => (StatusCode::OK, 0..size),
    };
    response = response
        .status(status)
        .header(header::CONTENT_LENGTH, byte_range.end - byte_range.start);
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        let _slot = acquire_download(&state)?;
        stream_body(state.store.clone(), state.metrics.clone(), move |store, out| {
            let _slot = _slot;
            store.read_range(&id, byte_range, out)
        })
        .await?
    };
    response.body(body).map_err(|e| ApiError::internal(e.to_string()))
}

fn acquire_download(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state.download_slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_downloads",
            "too many downloads in progress; retry later",
        )
    })
}

#[derive(Debug, Deserialize)]
struct VerifiedQuery {
    start: Option<u64>,
    end: Option<u64>,
}

/// `GET /v1/blobs/{id}/verified[?start=&end=]`: the verified stream (see `vouch_store::stream`).
async fn get_verified(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<VerifiedQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_blob_id(&id)?;
    let size = blob_size(&state, id, &headers).await?;
    let range = match (query.start, query.end) {
        (None, None) => None,
        (start, end) => {
            let range = start.unwrap_or(0)..end.unwrap_or(size);
            if range.start > range.end || range.end > size {
                return Err(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range_not_satisfiable",
                    format!(
                        "range {}..{} is outside blob {id} of {size} bytes",
                        range.start, range.end
                    ),
                ));
            }
            Some(range)
        }
    };
    let slot = acquire_download(&state)?;
    let body = stream_body(state.store.clone(), state.metrics.clone(), move |store, out| {
        let _slot = slot;
        store.write_verified(&id, range, out)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/vnd.vouch.verified-stream")], body).into_response())
}

fn view(published: Published) -> ModelView {
    ModelView {
        id: published.id,
        published_seq: published.seq,
        manifest: published.manifest,
    }
}

/// Reads a whole request body of at most `limit` bytes: 413 beyond it, 400 if the body breaks off.
/// `what` names the body in the error (`a manifest`).
pub(crate) async fn read_limited(body: Body, limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{what} is at most {limit} bytes"),
        )
    };
    let mut frames = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(frame) = frames.next().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request("upload_failed", format!("the request body broke off: {e}")))?;
        if bytes.len() + frame.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&frame);
    }
    Ok(bytes)
}

/// `POST /v1/models`: the body is a signed manifest in its canonical encoding.
async fn publish_model(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let limit = state.limits.manifest.max_encoded_bytes;
    let bytes = read_limited(body, limit, "a manifest").await?;
    let manifest = Manifest::decode(&bytes, &state.limits.manifest)?;
    let task_state = state.clone();
    let (outcome, id) = tokio::task::spawn_blocking(move || publish(&task_state, &manifest, &bytes)).await??;
    let (status, created, staged) = match outcome {
        PublishOutcome::Created => {
            state.metrics.models_published.inc();
            tracing::info!(model = %id, "published");
            (StatusCode::CREATED, true, false)
        }
        PublishOutcome::AlreadyPublished => (StatusCode::OK, false, false),
        PublishOutcome::Staged => (StatusCode::ACCEPTED, false, true),
    };
    Ok((status, Json(PublishInfo { id, created, staged })).into_response())
}

/// Checks a decoded manifest against the stored files, stores its bytes, and registers it.
fn publish(
    state: &AppState,
    manifest: &Manifest,
    bytes: &[u8],
) -> Result<(PublishOutcome, vouch_types::ModelId), ApiError> {
    let unprocessable = |code, message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
    let files = manifest
        .body
        .files
        .iter()
        .map(|f| (format!("file '{}'", f.path), f.blob, f.size));
    let plans = manifest
        .body
        .plans
        .iter()
        .map(|p| (format!("exact plan {}", p.id), p.id, p.size));
    for (what, blob, declared) in files.chain(plans) {
        match state.store.size(&blob)? {
            None => {
                return Err(unprocessable(
                    "missing_blob",
                    format!("{what} refers to blob {blob}, which this node does not hold; upload it first"),
                ));
            }
            Some(size) if size != declared => {
                return Err(unprocessable(
                    "size_mismatch",
                    format!("{what} is declared as {declared} bytes but blob {blob} has {size}"),
                ));
            }
            Some(_) => {}
        }
    }
    for plan in &manifest.body.plans {
        // A plan must decode and take the model's inputs, or every re-execution of it would fail.
        if plan.size > state.limits.max_inspect_bytes {
            tracing::warn!(
                size = plan.size,
                "exact plan larger than the inspection limit; not checked"
            );
            continue;
        }
        let bytes = state.store.read_to_vec(&plan.id, state.limits.max_inspect_bytes)?;
        let decoded = vouch_verify::decode_plan(&plan.id, &bytes, &vouch_engine::PlanLimits::default())
            .map_err(|e| unprocessable("invalid_plan", e.to_string()))?;
        let plan_inputs: Vec<&str> = decoded.inputs.iter().map(|i| i.name.as_str()).collect();
        let model_inputs: Vec<&str> = manifest.body.inputs.iter().map(|i| i.name.as_str()).collect();
        if plan_inputs != model_inputs {
            return Err(unprocessable(
                "plan_mismatch",
                format!(
                    "exact plan {} takes inputs {plan_inputs:?} but the model takes {model_inputs:?}",
                    plan.id
                ),
            ));
        }
    }
    match manifest.body.format {
        ModelFormat::Onnx => {
            // Check, don't trust: the schema a manifest advertises must be the model's own.
            let file = &manifest.body.files[0];
            if file.size <= state.limits.max_inspect_bytes {
                let model = state.store.read_to_vec(&file.blob, state.limits.max_inspect_bytes)?;
                let schema = vouch_engine::read_onnx_schema(&model)
                    .map_err(|e| unprocessable("invalid_model", format!("file '{}': {e}", file.path)))?;
                if schema.inputs != manifest.body.inputs || schema.outputs != manifest.body.outputs {
                    return Err(unprocessable(
                        "schema_mismatch",
                        "the manifest's inputs and outputs differ from those in the ONNX file".into(),
                    ));
                }
            } else {
                tracing::warn!(
                    size = file.size,
                    "model larger than the inspection limit; its schema is taken as declared"
                );
            }
        }
    }
    let stored = state.store.put_bytes(bytes)?;
    if stored.created {
        state.metrics.blobs_stored.inc();
        state.metrics.blob_bytes_received.inc_by(stored.size);
    }
    if let Some(validator) = &state.chain {
        // On a network the ledger is the registry: the local one follows finalized
        // publications (see `replication`), so a manifest waits for its transaction. What
        // the ledger would refuse is refused now, with the hub's errors.
        let id = vouch_types::ModelId(stored.id);
        let ledger = validator.app().finalized_ledger();
        let body = &manifest.body;
        if let Some(existing) = ledger.resolve(&body.name, &body.version).map_err(ledger_error)?
            && existing != id
        {
            return Err(RegistryError::VersionExists {
                name: body.name.clone(),
                version: body.version.clone(),
                existing,
            }
            .into());
        }
        if let Some(owner) = ledger.name_owner(&body.name).map_err(ledger_error)?
            && owner != body.publisher
        {
            return Err(RegistryError::NameOwned {
                name: body.name.clone(),
                owner,
            }
            .into());
        }
        // Published already when the ledger has it, even before this registry follows.
        let published = ledger.model(&id).map_err(ledger_error)?.is_some();
        let outcome = if published {
            PublishOutcome::AlreadyPublished
        } else {
            PublishOutcome::Staged
        };
        return Ok((outcome, id));
    }
    let outcome = state.registry.publish(manifest)?;
    Ok((outcome, vouch_types::ModelId(stored.id)))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    name: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/models[?name=&limit=]`: published models in publication order.
async fn list_models(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<ModelView>>, ApiError> {
    let name = query
        .name
        .map(|n| n.parse::<ModelName>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))?;
    let limit = query
        .limit
        .unwrap_or(state.limits.max_list_items)
        .min(state.limits.max_list_items);
    let registry = state.registry.clone();
    let models = tokio::task::spawn_blocking(move || registry.list(name.as_ref(), limit)).await??;
    Ok(Json(models.into_iter().map(view).collect()))
}

/// `GET /v1/models/{ref}`: a model by id, `name@version` or `name` (latest version).
async fn show_model(State(state): State<AppState>, Path(reference): Path<String>) -> Result<Json<ModelView>, ApiError> {
    let reference: ModelRef = reference
        .parse()
        .map_err(|e: vouch_types::NameError| ApiError::bad_request("invalid_reference", e.to_string()))?;
    let registry = state.registry.clone();
    let lookup = reference.clone();
    let found = tokio::task::spawn_blocking(move || registry.resolve(&lookup)).await??;
    found.map(|published| Json(view(published))).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model {reference} on this node"),
        )
    })
}
