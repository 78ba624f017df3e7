//! Talk to a Vouch node over its HTTP API, verifying everything it sends back.
//!
//! Blobs are downloaded as verified streams and checked chunk group by chunk group against the
//! id that was asked for; uploads are hashed as they stream and the node's answer is checked
//! against that hash; manifests are fetched as blobs, decoded and their signatures verified here,
//! never taken from the node's JSON on trust.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use reqwest::header::CONTENT_LENGTH;
use serde::de::DeserializeOwned;
use vouch_store::stream::{self, VerifyError};
use vouch_types::api::{BlobInfo, ErrorBody, Health, InferRequest, InferResponse, ModelView, PublishInfo};
use vouch_types::{BlobId, Manifest, ManifestError, ManifestLimits, ModelName, ModelRef};

/// Reports progress: bytes transferred so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Errors from the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The node's error code.
        code: String,
        /// The node's message.
        message: String,
    },
    /// The node could not be reached, or the connection failed.
    #[error("cannot reach the node at {url}: {detail}")]
    Unreachable {
        /// The node's URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// Blob data failed verification: the node's copy is corrupt, or the data was altered.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The node said something that is not true or not well-formed.
    #[error("the node's answer is invalid: {0}")]
    BadAnswer(String),
    /// A manifest failed to decode or verify.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn file_error(path: &Path) -> impl FnOnce(io::Error) -> ClientError + '_ {
    move |source| ClientError::File {
        path: path.display().to_string(),
        source,
    }
}

/// The header that marks a request as one node fetching from another.
pub const PEER_FETCH_HEADER: &str = "x-vouch-peer-fetch";

/// A client of one node.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    manifest_limits: ManifestLimits,
    request_timeout: Duration,
}

impl Client {
    /// A client of the node at `base_url` (`http://127.0.0.1:7070`).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::build(base_url, reqwest::header::HeaderMap::new())
    }

    /// A client for a node fetching from a peer: its requests carry [`PEER_FETCH_HEADER`], so
    /// the peer answers from what it holds and never fetches on its behalf (which could loop
    /// between nodes that both lack a blob).
    pub fn peer(base_url: &str) -> Result<Self, ClientError> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(PEER_FETCH_HEADER, reqwest::header::HeaderValue::from_static("1"));
        Self::build(base_url, headers)
    }

    fn build(base_url: &str, headers: reqwest::header::HeaderMap) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10))
            // A node that stops sending mid-answer must not hang the caller forever.
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: base_url.into(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            manifest_limits: ManifestLimits::default(),
            request_timeout: Duration::from_secs(60),
        })
    }

    /// The node's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn unreachable(&self, error: reqwest::Error) -> ClientError {
        // The innermost cause ("connection refused") is what a user needs to see.
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(inner) = source {
            detail = inner.to_string();
            source = inner.source();
        }
        ClientError::Unreachable {
            url: self.base_url.clone(),
            detail,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message: format!("{status}: {}", text.chars().take(200).collect::<String>()),
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request.timeout(self.request_timeout)).await?;
        let bytes = response.bytes().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.json(self.http.get(self.url("/healthz"))).await
    }

    /// Uploads a file as a blob, hashing it as it streams; fails unless the node stored it
    /// under the id of the bytes that were sent.
    pub async fn put_blob_file(&self, path: &Path, progress: Option<Progress>) -> Result<BlobInfo, ClientError> {
        let file = tokio::fs::File::open(path).await.map_err(file_error(path))?;
        let size = file.metadata().await.map_err(file_error(path))?.len();
        let hasher = Arc::new(std::sync::Mutex::new(blake3::Hasher::new()));
        let stream_hasher = hasher.clone();
        let mut sent = 0u64;
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map_ok(move |chunk| {
            stream_hasher.lock().unwrap_or_else(|p| p.into_inner()).update(&chunk);
            sent += chunk.len() as u64;
            if let Some(progress) = &progress {
                progress(sent);
            }
            chunk
        });
        let request = self
            .http
            .post(self.url("/v1/blobs"))
            .header(CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(body));
        let response = self.send(request).await?;
        let info: BlobInfo = response
            .json()
            .await
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let sent_id = BlobId::from_hash(*hasher.lock().unwrap_or_else(|p| p.into_inner()).finalize().as_bytes());
        check_put(&info, sent_id, size)?;
        Ok(info)
    }

    /// Uploads bytes as a blob and checks the node's answer.
    pub async fn put_blob_bytes(&self, bytes: Vec<u8>) -> Result<BlobInfo, ClientError> {
        let (id, size) = (BlobId::of(&bytes), bytes.len() as u64);
        let info: BlobInfo = self.json(self.http.post(self.url("/v1/blobs")).body(bytes)).await?;
        check_put(&info, id, size)?;
        Ok(info)
    }

    /// Downloads blob `id` to `path`, verifying every chunk group against the id as it arrives;
    /// refuses blobs over `max_bytes`. The file appears under `path` only once all of it has
    /// verified.
    pub async fn get_blob_to_file(
        &self,
        id: &BlobId,
        path: &Path,
        max_bytes: u64,
        progress: Option<Progress>,
    ) -> Result<u64, ClientError> {
        let partial = partial_path(path);
        let sink = stream::FileSink::create(&partial).map_err(file_error(&partial))?;
        let result = self.get_verified(id, Box::new(sink), max_bytes, progress).await;
        match result {
            Ok((size, _)) => {
                std::fs::rename(&partial, path).map_err(file_error(path))?;
                Ok(size)
            }
            Err(error) => {
                let _ = std::fs::remove_file(&partial);
                Err(error)
            }
        }
    }

    /// Downloads blob `id` into memory, verified; refuses blobs over `max_bytes`.
    pub async fn get_blob_bytes(&self, id: &BlobId, max_bytes: u64) -> Result<Vec<u8>, ClientError> {
        let (_, sink) = self.get_verified(id, Box::new(Vec::new()), max_bytes, None).await?;
        sink.into_vec()
            .ok_or_else(|| ClientError::BadAnswer("internal: sink kind".into()))
    }

    async fn get_verified(
        &self,
        id: &BlobId,
        sink: Box<dyn Sink>,
        max_bytes: u64,
        progress: Option<Progress>,
    ) -> Result<(u64, Box<dyn Sink>), ClientError> {
        let response = self
            .send(self.http.get(self.url(&format!("/v1/blobs/{id}/verified"))))
            .await?;
        let mut received = 0u64;
        let body = response.bytes_stream().map_ok(move |chunk| {
            received += chunk.len() as u64;
            if let Some(progress) = &progress {
                progress(received);
            }
            chunk
        });
        let (reader, pump) = vouch_store::bridge::reader(body);
        tokio::spawn(pump);
        let id_copy = *id;
        let decoded = tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            let size = stream::decode(&id_copy, reader, None, max_bytes, sink.as_verified())?;
            Ok::<_, VerifyError>((size, sink))
        })
        .await
        .map_err(|e| ClientError::BadAnswer(format!("decoder task failed: {e}")))?;
        match decoded {
            Ok(done) => Ok(done),
            Err(VerifyError::Mismatch { .. }) => Err(ClientError::Corrupt(decoded_error(decoded))),
            Err(VerifyError::Truncated { .. } | VerifyError::Io { .. }) => {
                // A transfer that broke off: ask whether the node found its copy corrupt (a
                // one-byte GET, because only a response with a body carries the error code).
                // Marked as a peer's request, so that a network node answers from its own store
                // instead of fetching a good copy from a replica first, which would hide the
                // corruption behind a success.
                let probe = self
                    .http
                    .get(self.url(&format!("/v1/blobs/{id}")))
                    .header(reqwest::header::RANGE, "bytes=0-0")
                    .header(PEER_FETCH_HEADER, "1");
                match self.send(probe).await {
                    Err(ClientError::Api { code, .. }) if code == "blob_corrupt" => Err(ClientError::Corrupt(format!(
                        "blob {id} failed verification on the node at {}, which stopped serving it",
                        self.base_url
                    ))),
                    _ => Err(ClientError::Unreachable {
                        url: self.base_url.clone(),
                        detail: decoded_error(decoded),
                    }),
                }
            }
            Err(VerifyError::TooLarge { .. }) => Err(ClientError::BadAnswer(decoded_error(decoded))),
        }
    }

    /// `POST /v1/infer`. The answer is parsed, not checked: the caller checks the receipt (see
    /// `vouch-verify`), because only it knows the request it meant.
    pub async fn infer(&self, request: &InferRequest) -> Result<InferResponse, ClientError> {
        self.json(self.http.post(self.url("/v1/infer")).json(request)).await
    }

    /// `GET /v1/chain/status`: the chain id and the node's finalized tip.
    pub async fn chain_status(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url("/v1/chain/status"))).await
    }

    /// `POST /v1/chain/transactions`: submits a signed transaction's canonical encoding; the
    /// answer holds its id.
    pub async fn submit_transaction(&self, encoded: Vec<u8>) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.post(self.url("/v1/chain/transactions")).body(encoded))
            .await
    }

    /// `GET /v1/chain/accounts/{key}`: balance and nonce with a proof against the state root.
    pub async fn chain_account(&self, key: &vouch_crypto::PublicKey) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/chain/accounts/{key}"))))
            .await
    }

    /// `GET /v1/chain/tasks/{id}`: a quorum task with its receipts and a proof against the state
    /// root.
    pub async fn chain_task(&self, id: &vouch_crypto::Digest) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/chain/tasks/{id}"))))
            .await
    }

    /// `GET /v1/chain/tasks/{id}/proof`: the task record, the finalized block whose state holds
    /// it with that block's finalization certificate, and the Merkle proof (vouch-node's
    /// `TaskProof`, which the caller checks against the validators it trusts).
    pub async fn chain_task_proof(&self, id: &vouch_crypto::Digest) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/chain/tasks/{id}/proof"))))
            .await
    }

    /// `GET /v1/chain/tasks/{id}/output`: the blob holding a quorum task's outputs (an `.npz`),
    /// which the caller checks against the output hash the executors agreed on.
    pub async fn chain_task_output(&self, id: &vouch_crypto::Digest) -> Result<BlobId, ClientError> {
        #[derive(serde::Deserialize)]
        struct TaskOutput {
            outputs: BlobId,
        }
        let answer: TaskOutput = self
            .json(self.http.get(self.url(&format!("/v1/chain/tasks/{id}/output"))))
            .await?;
        Ok(answer.outputs)
    }

    /// `GET /v1/chain/genesis`: the chain's genesis JSON as the node serves it; its hash is the
    /// chain id, which the caller checks.
    pub async fn chain_genesis(&self) -> Result<String, ClientError> {
        let response = self
            .send(
                self.http
                    .get(self.url("/v1/chain/genesis"))
                    .timeout(self.request_timeout),
            )
            .await?;
        response.text().await.map_err(|e| self.unreachable(e))
    }

    /// `GET /v1/chain/models/{id}`: a published model's ledger record (replicas assigned and
    /// confirmed) and a proof against the state root.
    pub async fn chain_model(&self, id: &vouch_types::ModelId) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/chain/models/{id}"))))
            .await
    }

    /// Publishes a signed manifest.
    pub async fn publish(&self, manifest: &Manifest) -> Result<PublishInfo, ClientError> {
        let info: PublishInfo = self
            .json(self.http.post(self.url("/v1/models")).body(manifest.encode()))
            .await?;
        if info.id != manifest.id() {
            return Err(ClientError::BadAnswer(format!(
                "node published {} but the manifest's id is {}",
                info.id,
                manifest.id()
            )));
        }
        Ok(info)
    }

    /// Lists published models, optionally of one name.
    pub async fn list_models(
        &self,
        name: Option<&ModelName>,
        limit: Option<usize>,
    ) -> Result<Vec<ModelView>, ClientError> {
        let mut request = self.http.get(self.url("/v1/models"));
        if let Some(name) = name {
            request = request.query(&[("name", name.as_str())]);
        }
        if let Some(limit) = limit {
            request = request.query(&[("limit", limit)]);
        }
        self.json(request).await
    }

    /// Shows a model as the node describes it (not verified; see [`Client::fetch_manifest`]).
    pub async fn show_model(&self, reference: &ModelRef) -> Result<ModelView, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/models/{reference}"))))
            .await
    }

    /// Resolves `reference` on the node, then fetches the manifest as a blob and verifies it
    /// here: its bytes hash to the id, its signature verifies, and it is what was asked for.
    pub async fn fetch_manifest(&self, reference: &ModelRef) -> Result<(ModelView, Manifest), ClientError> {
        let view = self.show_model(reference).await?;
        let bytes = self
            .get_blob_bytes(&view.id.0, self.manifest_limits.max_encoded_bytes as u64)
            .await?;
        let manifest = Manifest::decode(&bytes, &self.manifest_limits)?;
        let matches = match reference {
            ModelRef::Id(id) => *id == view.id,
            ModelRef::Version(name, version) => manifest.body.name == *name && manifest.body.version == *version,
            ModelRef::Latest(name) => manifest.body.name == *name,
        };
        if !matches || manifest != view.manifest {
            return Err(ClientError::BadAnswer(format!(
                "the node answered {reference} with manifest {}, which is not it",
                view.id
            )));
        }
        Ok((view, manifest))
    }
}

fn decoded_error<T>(result: Result<T, VerifyError>) -> String {
    result.err().map(|e| e.to_string()).unwrap_or_default()
}

fn check_put(info: &BlobInfo, sent: BlobId, size: u64) -> Result<(), ClientError> {
    if info.id != sent || info.size != size {
        return Err(ClientError::BadAnswer(format!(
            "node stored {} ({} bytes) but {sent} ({size} bytes) was sent",
            info.id, info.size
        )));
    }
    Ok(())
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// A destination for verified bytes that can be handed to a blocking decoder and back.
trait Sink: Send {
    fn as_verified(&mut self) -> &mut dyn stream::VerifiedSink;
    fn into_vec(self: Box<Self>) -> Option<Vec<u8>>;
}

impl Sink for Vec<u8> {
    fn as_verified(&mut self) -> &mut dyn stream::VerifiedSink {
        self
    }
    fn into_vec(self: Box<Self>) -> Option<Vec<u8>> {
        Some(*self)
    }
}

impl Sink for stream::FileSink {
    fn as_verified(&mut self) -> &mut dyn stream::VerifiedSink {
        self
    }
    fn into_vec(self: Box<Self>) -> Option<Vec<u8>> {
        None
    }
}
