//! Run a Vouch node: the content-addressed blob store, the model registry and the HTTP API.

mod api;
pub mod chain;
mod chain_api;
mod error;
mod infer;
mod metrics;
pub mod registry;
mod replication;
mod streaming;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use vouch_crypto::{CryptoError, SecretKey};
use vouch_store::{DiskStore, StoreError};
use vouch_tensor::TensorLimits;
use vouch_types::ManifestLimits;

pub use error::ApiError;
pub use metrics::Metrics;
use registry::{Registry, RegistryError};

/// Limits on what clients may ask of a node.
#[derive(Debug, Clone)]
pub struct NodeLimits {
    /// Largest blob accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Limits on manifests, including their encoded size.
    pub manifest: ManifestLimits,
    /// Largest model file whose schema the node checks against its manifest, in bytes.
    pub max_inspect_bytes: u64,
    /// Uploads served at once; more get 503.
    pub max_concurrent_uploads: usize,
    /// Downloads served at once; more get 503.
    pub max_concurrent_downloads: usize,
    /// Deadline for requests other than blob transfers, in milliseconds.
    pub request_timeout_ms: u64,
    /// Longest pause allowed inside a request body, in milliseconds.
    pub body_idle_timeout_ms: u64,
    /// Most models one listing returns.
    pub max_list_items: usize,
    /// Largest inference request body, in bytes.
    pub max_infer_request_bytes: usize,
    /// Limits on the input tensors of one inference.
    pub inference_tensors: TensorLimits,
    /// Most elements of any one value an exact plan computes.
    pub max_inference_elements: usize,
    /// Inferences run at once; more get 503.
    pub max_concurrent_inferences: usize,
    /// Worker threads of one exact inference.
    pub inference_threads: usize,
    /// Models kept prepared (optimized float models, decoded plans) between requests.
    pub max_cached_models: usize,
}

impl Default for NodeLimits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 8 << 30,
            manifest: ManifestLimits::default(),
            max_inspect_bytes: 512 << 20,
            max_concurrent_uploads: 16,
            max_concurrent_downloads: 64,
            request_timeout_ms: 30_000,
            body_idle_timeout_ms: 30_000,
            max_list_items: 1000,
            max_infer_request_bytes: 64 << 20,
            inference_tensors: TensorLimits {
                max_elements: 1 << 24,
                max_total_elements: 1 << 24,
                ..TensorLimits::default()
            },
            max_inference_elements: 1 << 26,
            max_concurrent_inferences: 4,
            inference_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_cached_models: 8,
        }
    }
}

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where blobs and the registry live.
    pub data_dir: PathBuf,
    /// Address of the HTTP API; port 0 picks a free one.
    pub api_addr: SocketAddr,
    /// Limits.
    pub limits: NodeLimits,
    /// The network to take part in (none: a standalone node).
    pub chain: Option<ChainOptions>,
}

/// How a node takes part in a network.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// The chain's genesis; the node's key must be one of its validators.
    pub genesis: vouch_ledger::Genesis,
    /// Where the node listens for its peers.
    pub p2p_addr: SocketAddr,
    /// Where to reach validators whose genesis p2p address no longer holds.
    pub peer_addresses: std::collections::BTreeMap<vouch_crypto::PublicKey, SocketAddr>,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The blob store could not be opened.
    #[error("cannot open the blob store: {0}")]
    Store(#[from] StoreError),
    /// The registry could not be opened.
    #[error("cannot open the registry: {0}")]
    Registry(#[from] RegistryError),
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node's signing key could not be read or created.
    #[error("node key: {0}")]
    Key(#[from] CryptoError),
    /// The node could not join the network.
    #[error("cannot join the network: {0}")]
    Chain(#[from] chain::service::ChainError),
    /// Starting the network stopped part way.
    #[error("starting the network failed: {0}")]
    ChainStart(#[from] tokio::task::JoinError),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A node serving its API until shut down.
#[derive(Debug)]
pub struct RunningNode {
    addr: SocketAddr,
    node_key: vouch_crypto::PublicKey,
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
    chain: Option<chain::service::RunningChain>,
}

impl RunningNode {
    /// The address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The key the node signs receipts with.
    pub fn node_key(&self) -> vouch_crypto::PublicKey {
        self.node_key
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets those in flight finish, stops consensus, and returns.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(());
        let served = self.server.await.map_err(std::io::Error::other)?;
        if let Some(chain) = self.chain {
            tokio::task::spawn_blocking(move || chain.stop())
                .await
                .map_err(std::io::Error::other)?;
        }
        served
    }
}

/// Opens the node's storage and starts serving its API.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = DiskStore::open(&config.data_dir.join("store"), config.limits.max_upload_bytes)?;
    let registry = Registry::open(&config.data_dir.join("registry.redb"), config.limits.manifest.clone())?;
    let key = load_or_create_key(&config.data_dir.join(NODE_KEY_FILE))?;
    let node_key = key.public_key();
    let inference = infer::Inference {
        key,
        cache: infer::ModelCache::new(config.limits.max_cached_models),
        slots: Arc::new(Semaphore::new(config.limits.max_concurrent_inferences)),
    };
    let store: Arc<dyn vouch_store::BlobStore> = Arc::new(store);
    let mut chain = match &config.chain {
        Some(options) => {
            let chain_config = chain::service::ChainConfig {
                genesis: options.genesis.clone(),
                key: inference.key.clone(),
                p2p_addr: options.p2p_addr,
                peer_addresses: options.peer_addresses.clone(),
                storage_dir: config.data_dir.join("chain"),
                worker_threads: 2,
            };
            Some(tokio::task::spawn_blocking(move || chain::service::start(chain_config)).await??)
        }
        None => None,
    };
    let registry = Arc::new(registry);
    let replicator = match &mut chain {
        Some(running) => {
            let replicator = replication::Replicator::new(
                store.clone(),
                registry.clone(),
                running.validator().clone(),
                node_key,
                config.data_dir.join("replication"),
                config.limits.manifest.clone(),
                config.limits.max_upload_bytes,
            )
            .map_err(|source| NodeError::DataDir {
                path: config.data_dir.join("replication").display().to_string(),
                source,
            })?;
            let replicator = Arc::new(replicator);
            tokio::spawn(replication::follow(replicator.clone()));
            running.start_executor(chain::executor::ExecutorConfig {
                key: inference.key.clone(),
                store: store.clone(),
                max_blob_bytes: config.limits.max_inspect_bytes,
                tensor_limits: TensorLimits::default(),
                threads: config.limits.inference_threads,
                resubmit_after_blocks: 16,
                support: Some(Arc::new(replication::ExecutorSupport(replicator.clone()))),
            });
            Some(replicator)
        }
        None => None,
    };
    let state = api::AppState {
        store,
        registry,
        replicator,
        metrics: Arc::new(Metrics::new()),
        upload_slots: Arc::new(Semaphore::new(config.limits.max_concurrent_uploads)),
        download_slots: Arc::new(Semaphore::new(config.limits.max_concurrent_downloads)),
        inference: Arc::new(inference),
        limits: config.limits,
        chain: chain.as_ref().map(|chain| chain.validator().clone()),
    };
    let listener = TcpListener::bind(config.api_addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.api_addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: config.api_addr,
        source,
    })?;
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let app = api::router(state);
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.await;
            })
            .await
    });
    tracing::info!(%addr, "node API listening");
    tracing::info!(%node_key, "signing receipts");
    Ok(RunningNode {
        addr,
        node_key,
        shutdown,
        server,
        chain,
    })
}

/// The file in the data directory that holds the node's signing key.
pub const NODE_KEY_FILE: &str = "node_key.pem";

/// The node keeps one identity across restarts: the key is made on first start and read after.
fn load_or_create_key(path: &std::path::Path) -> Result<SecretKey, CryptoError> {
    if path.exists() {
        return SecretKey::load(path);
    }
    let key = SecretKey::generate()?;
    key.save(path)?;
    Ok(key)
}
