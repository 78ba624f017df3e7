//! Models on a network: the node's registry follows the ledger's, an assigned replica fetches
//! its models' blobs from peers (verified as they stream), and a blob this node lacks is fetched
//! from the replicas of the model that lists it when someone asks for it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::{info, warn};
use vouch_client::Client;
use vouch_crypto::{Digest, PublicKey};
use vouch_ledger::{Ledger, TxError};
use vouch_store::{BlobStore, StoreError};
use vouch_types::{BlobId, Manifest, ManifestLimits, ModelId};

use crate::chain::finality::check_outputs;
use crate::chain::validator::Validator;
use crate::registry::{PublishOutcome, Registry, RegistryError};

/// Most peers asked for one blob.
const MAX_SOURCES: usize = 32;
/// Most registered nodes read when looking for peers beyond a model's replicas.
const MAX_NODES_READ: usize = 256;
/// Most publications the follower reads from the ledger per finalized block.
const PUBLICATIONS_PER_STEP: usize = 256;
/// Largest outputs blob read back to check it.
const MAX_OUTPUT_BYTES: u64 = 1 << 30;
/// The first wait before a model whose blobs could not be fetched is tried again.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between two tries.
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Why a blob or a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No peer asked had the blob.
    #[error("none of {tried} peers served blob {blob} (last: {last})")]
    NotFound {
        /// The blob.
        blob: BlobId,
        /// How many peers were asked.
        tried: usize,
        /// What the last one answered.
        last: String,
    },
    /// The local store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The staging file could not be read.
    #[error("staging file: {0}")]
    Staging(#[from] std::io::Error),
    /// The ledger's state could not be read.
    #[error("ledger: {0}")]
    Ledger(#[from] TxError),
    /// The registry failed.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The manifest a peer served is not the one the ledger published.
    #[error("model {model}: {reason}")]
    Manifest {
        /// The model.
        model: ModelId,
        /// What is wrong with it.
        reason: String,
    },
}

impl FetchError {
    /// Whether trying again later may succeed.
    fn is_lasting(&self) -> bool {
        matches!(self, Self::Manifest { .. })
    }
}

/// Fetches blobs from peers into the node's store.
pub(crate) struct Replicator {
    store: Arc<dyn BlobStore>,
    registry: Arc<Registry>,
    validator: Validator,
    me: PublicKey,
    staging_dir: PathBuf,
    manifest_limits: ManifestLimits,
    max_blob_bytes: u64,
    staged: AtomicU64,
    /// The API's runtime, where downloads run.
    runtime: tokio::runtime::Handle,
}

impl Replicator {
    /// A replicator that stages downloads in `staging_dir` (emptied now); made on the API's
    /// runtime, where its downloads run.
    pub(crate) fn new(
        store: Arc<dyn BlobStore>,
        registry: Arc<Registry>,
        validator: Validator,
        me: PublicKey,
        staging_dir: PathBuf,
        manifest_limits: ManifestLimits,
        max_blob_bytes: u64,
    ) -> std::io::Result<Self> {
        // Downloads cut off by a crash are of no use: their blobs are fetched again.
        if staging_dir.exists() {
            std::fs::remove_dir_all(&staging_dir)?;
        }
        std::fs::create_dir_all(&staging_dir)?;
        Ok(Self {
            store,
            registry,
            validator,
            me,
            staging_dir,
            manifest_limits,
            max_blob_bytes,
            staged: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The HTTP addresses to ask for a blob of `model`: its confirmed replicas first, then its
    /// other replicas, then every other registered node (the one a publisher uploaded to may
    /// be none of them), never this node, at most [`MAX_SOURCES`].
    fn sources(&self, ledger: &Ledger, model: Option<&ModelId>) -> Result<Vec<String>, FetchError> {
        let nodes = ledger.nodes(MAX_NODES_READ)?;
        let mut order: Vec<PublicKey> = Vec::new();
        if let Some(record) = model.map(|model| ledger.model(model)).transpose()?.flatten() {
            order.extend(record.confirmed.iter().copied());
            order.extend(record.replicas.iter().copied());
        }
        order.extend(nodes.iter().map(|(key, _)| *key));
        let addresses: HashMap<PublicKey, &str> = nodes
            .iter()
            .map(|(key, record)| (*key, record.address.as_str()))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut sources = Vec::new();
        for key in order {
            if key == self.me || !seen.insert(key) {
                continue;
            }
            let address = match addresses.get(&key) {
                Some(address) => (*address).to_string(),
                None => match ledger.node(&key)? {
                    Some(record) => record.address,
                    None => continue,
                },
            };
            sources.push(address);
            if sources.len() == MAX_SOURCES {
                break;
            }
        }
        Ok(sources)
    }

    /// Makes sure the store holds `blob`, fetching it from the first of `sources` that serves
    /// it. Each download is verified against the id as it streams and stored only whole.
    async fn fetch(&self, blob: &BlobId, sources: &[String]) -> Result<(), FetchError> {
        if self.store.size(blob)?.is_some() {
            return Ok(());
        }
        let mut last = "no peer to ask".to_string();
        for address in sources {
            let client = match Client::peer(&format!("http://{address}")) {
                Ok(client) => client,
                Err(error) => {
                    last = format!("{address}: {error}");
                    continue;
                }
            };
            let path = self
                .staging_dir
                .join(format!("{blob}-{}", self.staged.fetch_add(1, Ordering::Relaxed)));
            match client.get_blob_to_file(blob, &path, self.max_blob_bytes, None).await {
                Ok(_) => {
                    let store = self.store.clone();
                    let stored = tokio::task::spawn_blocking(move || {
                        let result = (|| {
                            let mut file = std::fs::File::open(&path)?;
                            let size = file.metadata()?.len();
                            Ok::<_, FetchError>(store.put(&mut file, size)?)
                        })();
                        let _ = std::fs::remove_file(&path);
                        result
                    })
                    .await
                    .map_err(std::io::Error::other)??;
                    if stored.id != *blob {
                        // The download verified against `blob`, so this is the store failing.
                        return Err(FetchError::Staging(std::io::Error::other(format!(
                            "blob {blob} was stored as {}",
                            stored.id
                        ))));
                    }
                    info!(%blob, %address, size = stored.size, "fetched a blob from a peer");
                    return Ok(());
                }
                Err(error) => last = format!("{address}: {error}"),
            }
        }
        Err(FetchError::NotFound {
            blob: *blob,
            tried: sources.len(),
            last,
        })
    }

    /// For a pull of `blob` this node lacks: fetches it from the replicas of the model it
    /// belongs to (the model whose manifest it is, or one the registry says lists it). Returns
    /// false when no published model is known to hold it.
    pub(crate) async fn fetch_for_pull(&self, blob: &BlobId) -> Result<bool, FetchError> {
        let ledger = self.validator.app().finalized_ledger();
        let as_model = ModelId(*blob);
        let model = if ledger.model(&as_model)?.is_some() {
            as_model
        } else {
            let registry = self.registry.clone();
            let lookup = *blob;
            match tokio::task::spawn_blocking(move || registry.model_holding(&lookup))
                .await
                .map_err(std::io::Error::other)??
            {
                Some(model) => model,
                None => return Ok(false),
            }
        };
        let sources = self.sources(&ledger, Some(&model))?;
        self.fetch(blob, &sources).await?;
        Ok(true)
    }

    /// For a client asking this node for the outputs of a quorum task it did not run: fetches
    /// them from an executor that submitted a receipt, checks them against that receipt's output
    /// hash, and keeps them. `None` when no executor serves outputs that hold up.
    pub(crate) async fn fetch_task_output(&self, task: &Digest) -> Result<Option<BlobId>, FetchError> {
        let ledger = self.validator.app().finalized_ledger();
        let Some(record) = ledger.task(task)? else {
            return Ok(None);
        };
        for receipt in &record.receipts {
            let executor = receipt.body.executor;
            let Some(node) = ledger.node(&executor)?.filter(|_| executor != self.me) else {
                continue;
            };
            let answer = match Client::peer(&format!("http://{}", node.address)) {
                Ok(client) => client.chain_task_output(task).await,
                Err(error) => Err(error),
            };
            let blob = match answer {
                Ok(blob) => blob,
                Err(error) => {
                    warn!(%task, %executor, %error, "executor did not serve the task's outputs");
                    continue;
                }
            };
            if let Err(error) = self.fetch(&blob, std::slice::from_ref(&node.address)).await {
                warn!(%task, %executor, %error, "cannot fetch the task's outputs");
                continue;
            }
            let (store, registry, task_id) = (self.store.clone(), self.registry.clone(), *task);
            let expected = receipt.body.output_hash;
            let kept = tokio::task::spawn_blocking(move || {
                let bytes = store.read_to_vec(&blob, MAX_OUTPUT_BYTES)?;
                // Outputs that do not decode or hash otherwise: try the next executor.
                if check_outputs(&bytes, &expected).is_err() {
                    return Ok(false);
                }
                registry.record_task_output(&task_id, &blob)?;
                Ok::<_, FetchError>(true)
            })
            .await
            .map_err(std::io::Error::other)??;
            if kept {
                return Ok(Some(blob));
            }
            warn!(%task, %executor, "the outputs an executor served do not match its receipt");
        }
        Ok(None)
    }

    /// Brings one published model into this node: its manifest into the registry, and, if
    /// this node is an assigned replica that has not confirmed, every blob it lists.
    async fn settle(&self, ledger: &Ledger, model: &ModelId) -> Result<(), FetchError> {
        let Some(record) = ledger.model(model)? else {
            return Ok(());
        };
        let sources = self.sources(ledger, Some(model))?;
        self.fetch(&model.0, &sources).await?;
        let bytes = self
            .store
            .read_to_vec(&model.0, self.manifest_limits.max_encoded_bytes as u64)?;
        let manifest = Manifest::decode(&bytes, &self.manifest_limits).map_err(|error| FetchError::Manifest {
            model: *model,
            reason: error.to_string(),
        })?;
        let body = &manifest.body;
        if body.name != record.name || body.version != record.version || body.publisher != record.publisher {
            return Err(FetchError::Manifest {
                model: *model,
                reason: format!(
                    "the ledger publishes {}@{} by {} but the manifest names {}@{} by {}",
                    record.name, record.version, record.publisher, body.name, body.version, body.publisher
                ),
            });
        }
        // Listed first, so the model shows on this node even while its blobs are on the way.
        let blobs: Vec<BlobId> = body
            .files
            .iter()
            .map(|file| file.blob)
            .chain(body.plans.iter().map(|plan| plan.id))
            .collect();
        let registry = self.registry.clone();
        let outcome = tokio::task::spawn_blocking(move || registry.publish(&manifest))
            .await
            .map_err(std::io::Error::other)??;
        if outcome == PublishOutcome::Created {
            info!(%model, name = %record.name, version = %record.version, "model published on the ledger");
        }
        if record.replicas.contains(&self.me) && !record.confirmed.contains(&self.me) {
            for blob in &blobs {
                self.fetch(blob, &sources).await?;
            }
        }
        Ok(())
    }
}

/// The executor's helper on a network node: input blobs come from peers, outputs are indexed
/// in the registry.
pub(crate) struct ExecutorSupport(pub(crate) Arc<Replicator>);

impl crate::chain::executor::TaskSupport for ExecutorSupport {
    fn fetch_blob(&self, blob: &BlobId) -> Result<(), String> {
        let replicator = self.0.clone();
        let blob = *blob;
        // Called from a blocking thread of the consensus runtime; the download runs on the
        // API's runtime, where the HTTP client lives.
        let fetch = self.0.runtime.spawn(async move {
            let ledger = replicator.validator.app().finalized_ledger();
            let sources = replicator.sources(&ledger, None)?;
            replicator.fetch(&blob, &sources).await
        });
        match futures::executor::block_on(fetch) {
            Ok(result) => result.map_err(|error| error.to_string()),
            Err(error) => Err(format!("the fetch stopped: {error}")),
        }
    }

    fn keep_outputs(&self, task: &Digest, outputs: &BlobId) -> Result<(), String> {
        self.0
            .registry
            .record_task_output(task, outputs)
            .map_err(|error| error.to_string())
    }
}

/// A model still to settle, and when to try it next.
struct Waiting {
    next_try: Instant,
    wait: Duration,
}

/// Follows the finalized ledger until the chain stops: settles every published model, trying
/// again with growing waits while its blobs cannot be found.
pub(crate) async fn follow(replicator: Arc<Replicator>) {
    let app = replicator.validator.app().clone();
    let mut finalized = app.subscribe();
    let mut cursor: Option<(u64, ModelId)> = None;
    let mut waiting: HashMap<ModelId, Waiting> = HashMap::new();
    loop {
        let ledger = app.finalized_ledger();
        match ledger.published_after(cursor, PUBLICATIONS_PER_STEP) {
            Ok(published) => {
                for (height, model) in published {
                    cursor = Some((height, model));
                    waiting.insert(
                        model,
                        Waiting {
                            next_try: Instant::now(),
                            wait: FIRST_RETRY,
                        },
                    );
                }
            }
            Err(error) => warn!(%error, "cannot read the ledger's publications"),
        }
        let due: Vec<ModelId> = waiting
            .iter()
            .filter(|(_, entry)| entry.next_try <= Instant::now())
            .map(|(model, _)| *model)
            .collect();
        for model in due {
            match replicator.settle(&ledger, &model).await {
                Ok(()) => {
                    waiting.remove(&model);
                }
                Err(error) if error.is_lasting() => {
                    warn!(%model, %error, "model not taken into the registry");
                    waiting.remove(&model);
                }
                Err(error) => {
                    if let Some(entry) = waiting.get_mut(&model) {
                        warn!(%model, %error, retry_ms = entry.wait.as_millis() as u64, "cannot fetch a model yet");
                        entry.next_try = Instant::now() + entry.wait;
                        entry.wait = (entry.wait * 2).min(LAST_RETRY);
                    }
                }
            }
        }
        if finalized.next().await.is_none() {
            return;
        }
    }
}

/// Whether `store` holds every blob of `model` at its declared size: what a replica confirms.
pub(crate) fn holds_model(store: &dyn BlobStore, model: &ModelId, limits: &ManifestLimits) -> Result<bool, FetchError> {
    if store.size(&model.0)?.is_none() {
        return Ok(false);
    }
    let bytes = store.read_to_vec(&model.0, limits.max_encoded_bytes as u64)?;
    let manifest = Manifest::decode(&bytes, limits).map_err(|error| FetchError::Manifest {
        model: *model,
        reason: error.to_string(),
    })?;
    let files = manifest.body.files.iter().map(|file| (file.blob, file.size));
    for (blob, size) in files.chain(manifest.body.plans.iter().map(|plan| (plan.id, plan.size))) {
        if store.size(&blob)? != Some(size) {
            return Ok(false);
        }
    }
    Ok(true)
}
