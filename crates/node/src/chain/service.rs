//! A node's part in the network: a validator on commonware's authenticated p2p and tokio runtime,
//! with an executor beside it (started once the node hands it its configuration), running on
//! threads of its own beside the HTTP API.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use commonware_cryptography::ChaCha20Poly1305;
use commonware_p2p::authenticated::lookup;
use commonware_p2p::{Address, AddressableManager};
use commonware_runtime::{Quota, Runner, Spawner, Supervisor};
use commonware_stream::cups::{self, Cups};
use commonware_stream::sake::{self, Sake};
use commonware_utils::ordered::Map;
use commonware_utils::{NZU32, NZUsize};
use futures::channel::oneshot;
use tracing::{error, info};
use vouch_crypto::SecretKey;
use vouch_ledger::Genesis;

use super::executor::{self, ExecutorConfig};
use super::validator::{
    self, CHANNEL_BACKFILL, CHANNEL_BLOCKS, CHANNEL_CERTIFICATES, CHANNEL_CONSENSUS_RESOLVER, CHANNEL_TRANSACTIONS,
    CHANNEL_VOTES, Channels, MAX_MESSAGE_BYTES, StartError, Timing, Validator, ValidatorConfig,
};

/// Messages each peer may send on each channel per second.
const CHANNEL_QUOTA: Quota = Quota::per_second(NZU32!(1_000));

/// How to take part in the network.
#[derive(Clone)]
pub struct ChainConfig {
    /// The chain.
    pub genesis: Genesis,
    /// The node's key: it validates, executes and signs receipts with it.
    pub key: SecretKey,
    /// Where the validator listens for peers.
    pub p2p_addr: SocketAddr,
    /// Where to reach validators whose genesis p2p address no longer holds (the genesis, and so
    /// the chain id, cannot change).
    pub peer_addresses: std::collections::BTreeMap<vouch_crypto::PublicKey, SocketAddr>,
    /// Where consensus and the ledger keep their files.
    pub storage_dir: PathBuf,
    /// Worker threads of the consensus runtime.
    pub worker_threads: usize,
}

impl std::fmt::Debug for ChainConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainConfig")
            .field("p2p_addr", &self.p2p_addr)
            .field("storage_dir", &self.storage_dir)
            .finish_non_exhaustive()
    }
}

/// Why the node could not join the network.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The genesis names a peer address that is not `IP:PORT`.
    #[error("genesis validator {key} has p2p address {address:?}, which is not IP:PORT")]
    PeerAddress {
        /// The validator.
        key: vouch_crypto::PublicKey,
        /// Its address.
        address: String,
    },
    /// The validator did not start.
    #[error("{0}")]
    Start(#[from] StartError),
    /// The runtime stopped before the validator started.
    #[error("the consensus runtime stopped while starting")]
    Stopped,
}

/// A validator running until [`RunningChain::stop`].
#[derive(Debug)]
pub struct RunningChain {
    validator: Validator,
    executor: Option<oneshot::Sender<ExecutorConfig>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningChain {
    /// The validator: its ledger application and mempool.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Starts the node's executor on the consensus runtime (at most once).
    pub fn start_executor(&mut self, config: ExecutorConfig) {
        if let Some(start) = self.executor.take() {
            let _ = start.send(config);
        }
    }

    /// Stops consensus and waits for its runtime to end. Everything finalized is already saved.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningChain {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Starts the validator and its executor on a runtime of their own, and returns once the
/// validator has restored its saved state.
pub fn start(config: ChainConfig) -> Result<RunningChain, ChainError> {
    let mut peers = Vec::new();
    for validator in &config.genesis.validators {
        let address = match config.peer_addresses.get(&validator.public_key) {
            Some(address) => *address,
            None => validator.p2p_address.parse().map_err(|_| ChainError::PeerAddress {
                key: validator.public_key,
                address: validator.p2p_address.clone(),
            })?,
        };
        peers.push((
            validator::consensus_public_key(&validator.public_key)?,
            Address::from(address),
        ));
    }
    let (started_sender, started) = std::sync::mpsc::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let (executor_sender, executor_config) = oneshot::channel::<ExecutorConfig>();
    let runtime_config = commonware_runtime::tokio::Config::new()
        .with_storage_directory(config.storage_dir.clone())
        .with_worker_threads(config.worker_threads.max(1))
        .with_catch_panics(false);
    let thread = std::thread::Builder::new()
        .name("vouch-consensus".into())
        .spawn(move || {
            commonware_runtime::tokio::Runner::new(runtime_config).start(|context| async move {
                // The validator's tasks are children of this one: they run until it returns.
                match run(&context, config, peers).await {
                    Ok(validator) => {
                        let _ = started_sender.send(Ok(validator.clone()));
                        context.child("executor").spawn(move |context| async move {
                            // Dropped unstarted when the node runs without an executor.
                            if let Ok(config) = executor_config.await {
                                executor::run(context, validator, config).await;
                                error!("the executor stopped");
                            }
                        });
                        let _ = stopped.await;
                        info!("consensus stopping");
                    }
                    Err(error) => {
                        let _ = started_sender.send(Err(error));
                    }
                }
            });
        })
        .map_err(|_| ChainError::Stopped)?;
    match started.recv() {
        Ok(Ok(validator)) => Ok(RunningChain {
            validator,
            executor: Some(executor_sender),
            stop: Some(stop),
            thread: Some(thread),
        }),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => {
            let _ = thread.join();
            Err(ChainError::Stopped)
        }
    }
}

async fn run(
    context: &commonware_runtime::tokio::Context,
    config: ChainConfig,
    peers: Vec<(commonware_cryptography::ed25519::PublicKey, Address)>,
) -> Result<Validator, ChainError> {
    let genesis = &config.genesis;
    let signer = validator::consensus_private_key(&config.key);
    let namespace = validator::namespace(genesis);
    let handshake = Cups::<_, ChaCha20Poly1305>::new(
        Sake {
            signer,
            synchrony_bound: Duration::from_secs(5),
            max_handshake_age: Duration::from_secs(10),
            version: sake::Version::V1,
        },
        cups::Version::V1,
    );
    let p2p_config = lookup::Config::local(
        handshake,
        &namespace,
        config.p2p_addr,
        // Inbound mailboxes are sized for a quota burst from every peer of every tracked set.
        NonZeroUsize::new(peers.len()).unwrap_or(NZUsize!(1)),
        MAX_MESSAGE_BYTES,
        NZUsize!(1_024),
    );
    let (mut network, mut oracle) = lookup::Network::new(context.child("p2p"), p2p_config);
    let peer_count = peers.len();
    let peers: Map<_, Address> = peers.try_into().map_err(|_| StartError::DuplicateValidator)?;
    let _ = oracle.track(0, peers);
    let mut channel = |id| network.register(id, CHANNEL_QUOTA);
    let channels = Channels {
        votes: channel(CHANNEL_VOTES),
        certificates: channel(CHANNEL_CERTIFICATES),
        consensus_resolver: channel(CHANNEL_CONSENSUS_RESOLVER),
        backfill: channel(CHANNEL_BACKFILL),
        blocks: channel(CHANNEL_BLOCKS),
        transactions: channel(CHANNEL_TRANSACTIONS),
    };
    network.start();
    let validator = validator::start(
        context.child("validator"),
        ValidatorConfig {
            genesis: genesis.clone(),
            key: config.key.clone(),
            partition_prefix: "chain".into(),
            timing: Timing::default(),
            snapshot_interval_blocks: 256,
        },
        channels,
        oracle.clone(),
        oracle,
    )
    .await?;
    info!(
        p2p = %config.p2p_addr,
        peers = peer_count,
        height = validator.app().finalized_height(),
        "validator started"
    );
    Ok(validator)
}
