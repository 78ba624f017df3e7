//! One validator wired together: simplex consensus, marshal with its archives, block broadcast
//! and backfill, the ledger application with its saved state, and transaction gossip, over any
//! commonware p2p network (the simulated one in tests, the authenticated one in the node).

use std::num::{NonZeroU16, NonZeroUsize};
use std::time::Duration;

use commonware_broadcast::buffered;
use commonware_codec::DecodeExt;
use commonware_consensus::marshal::core::{Actor, Mailbox as MarshalMailbox};
use commonware_consensus::marshal::resolver::p2p as marshal_resolver;
use commonware_consensus::marshal::standard::{Inline, Standard};
use commonware_consensus::marshal::{Config as MarshalConfig, Start};
use commonware_consensus::simplex::Engine as SimplexEngine;
use commonware_consensus::simplex::config::{Config as SimplexConfig, Floor, ForwardPolicy, SkipBudget, SkipPolicy};
use commonware_consensus::simplex::elector::RoundRobin;
use commonware_consensus::types::{Epoch, FixedEpocher, Height, ViewDelta};
use commonware_cryptography::blake3::Blake3;
use commonware_cryptography::certificate::{ConstantProvider, Verifier as _};
use commonware_cryptography::ed25519::{PrivateKey, PublicKey as ConsensusKey};
use commonware_cryptography::{Digested, Digestible, Signer as _};
use commonware_p2p::{Blocker, Provider, Receiver, Recipients, Sender};
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_runtime::{Clock, Metrics, Spawner, Storage, Supervisor};
use commonware_storage::archive::immutable;
use commonware_utils::ordered::Set;
use commonware_utils::{NZU16, NZU64, NZUsize};
use futures::StreamExt;
use futures::channel::mpsc;
use rand_core::CryptoRng;
use tracing::{debug, warn};
use vouch_crypto::{Digest, PublicKey, SecretKey};
use vouch_ledger::tx::MAX_TX_BYTES;
use vouch_ledger::{Genesis, SignedTransaction};

use super::Scheme;
use super::app::{LedgerApp, SubmitError, genesis_block};
use super::block::{ChainBlock, to_chain_digest};
use super::finality::FinalityProof;
use super::persist::{PersistError, Persister};

/// The p2p channel of consensus votes.
pub const CHANNEL_VOTES: u64 = 0;
/// The p2p channel of consensus certificates.
pub const CHANNEL_CERTIFICATES: u64 = 1;
/// The p2p channel consensus fetches missing certificates on.
pub const CHANNEL_CONSENSUS_RESOLVER: u64 = 2;
/// The p2p channel marshal fetches missing blocks on.
pub const CHANNEL_BACKFILL: u64 = 3;
/// The p2p channel proposed blocks are broadcast on.
pub const CHANNEL_BLOCKS: u64 = 4;
/// The p2p channel transactions are gossiped on.
pub const CHANNEL_TRANSACTIONS: u64 = 5;

/// The largest p2p message a validator sends or accepts: a block at its limit plus framing.
pub const MAX_MESSAGE_BYTES: u32 = vouch_ledger::MAX_BLOCK_BYTES as u32 + 64 * 1024;
/// The most bytes of transactions one gossip message carries.
const MAX_GOSSIP_BATCH_BYTES: usize = 1 << 20;
/// The most transactions waiting to be gossiped; more are kept in the local mempool only.
const GOSSIP_QUEUE: usize = 65_536;
const PAGE_SIZE: NonZeroU16 = NZU16!(4096);
const PAGE_CACHE_PAGES: NonZeroUsize = NZUsize!(256);
const MAILBOX_SIZE: NonZeroUsize = NZUsize!(1024);
const WRITE_BUFFER: NonZeroUsize = NZUsize!(1 << 20);

/// A sender and receiver of one p2p channel.
pub type Channel<S, R> = (S, R);

/// The p2p channels a validator talks on, registered by the caller on its network.
#[derive(Debug)]
pub struct Channels<S, R> {
    /// [`CHANNEL_VOTES`].
    pub votes: Channel<S, R>,
    /// [`CHANNEL_CERTIFICATES`].
    pub certificates: Channel<S, R>,
    /// [`CHANNEL_CONSENSUS_RESOLVER`].
    pub consensus_resolver: Channel<S, R>,
    /// [`CHANNEL_BACKFILL`].
    pub backfill: Channel<S, R>,
    /// [`CHANNEL_BLOCKS`].
    pub blocks: Channel<S, R>,
    /// [`CHANNEL_TRANSACTIONS`].
    pub transactions: Channel<S, R>,
}

/// How long consensus waits before moving on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// For the leader's proposal.
    pub leader_timeout_ms: u64,
    /// For a proposal to be certified.
    pub certification_timeout_ms: u64,
    /// Between re-broadcasts of a timed-out view's votes.
    pub timeout_retry_ms: u64,
    /// Before skipping a silent leader's views (must exceed the retry).
    pub skip_timeout_ms: u64,
    /// For a peer to answer a fetch.
    pub fetch_timeout_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            leader_timeout_ms: 1_000,
            certification_timeout_ms: 2_000,
            timeout_retry_ms: 3_000,
            skip_timeout_ms: 5_000,
            fetch_timeout_ms: 2_000,
        }
    }
}

/// What a validator needs besides its network.
#[derive(Debug, Clone)]
pub struct ValidatorConfig {
    /// The chain.
    pub genesis: Genesis,
    /// The validator's key: it votes, proposes and collects fees with it.
    pub key: SecretKey,
    /// Prefix of every storage partition the validator writes.
    pub partition_prefix: String,
    /// Consensus timeouts.
    pub timing: Timing,
    /// How often (in blocks) the whole ledger state is saved; blocks between snapshots are
    /// replayed on restart.
    pub snapshot_interval_blocks: u64,
}

/// Why a validator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The key is not one of the genesis validators.
    #[error("{0} is not a validator of this chain")]
    NotAValidator(PublicKey),
    /// The genesis lists a key consensus cannot use.
    #[error("genesis validator key {0} is not a valid ed25519 key")]
    BadValidatorKey(PublicKey),
    /// The genesis lists a validator twice.
    #[error("the genesis lists a validator twice")]
    DuplicateValidator,
    /// The saved state could not be opened or restored.
    #[error("{0}")]
    Persist(#[from] PersistError),
    /// The saved blocks do not replay.
    #[error("{0}")]
    Recover(#[from] super::app::RecoverError),
    /// Consensus storage could not be opened.
    #[error("consensus storage: {0}")]
    Storage(String),
}

/// The runtime a validator runs on: tokio in the node, the deterministic runtime in tests.
pub trait Runtime: Clock + CryptoRng + Spawner + Storage + Metrics + Supervisor + Send + Sync + 'static {}
impl<T: Clock + CryptoRng + Spawner + Storage + Metrics + Supervisor + Send + Sync + 'static> Runtime for T {}

/// A running validator.
#[derive(Clone)]
pub struct Validator {
    genesis: std::sync::Arc<Genesis>,
    app: LedgerApp,
    gossip: mpsc::Sender<SignedTransaction>,
    marshal: MarshalMailbox<Scheme, Standard<ChainBlock>>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl Validator {
    /// The chain's genesis.
    pub fn genesis(&self) -> &Genesis {
        &self.genesis
    }

    /// The ledger application: the finalized state and the mempool.
    pub fn app(&self) -> &LedgerApp {
        &self.app
    }

    /// Marshal's mailbox: finalized blocks and their certificates.
    pub fn marshal(&self) -> &MarshalMailbox<Scheme, Standard<ChainBlock>> {
        &self.marshal
    }

    /// The state after the last finalized block, with that block's finality proof when marshal
    /// holds a certificate of the block's own (a block finalized only as the ancestor of a
    /// later one has none; the next block will).
    pub async fn finalized_with_proof(&self) -> (std::sync::Arc<vouch_ledger::Ledger>, Option<FinalityProof>) {
        let (height, digest, ledger) = self.app.finalized_snapshot();
        let finalization = match self.marshal.get_finalization(Height::new(height)).await {
            Some(finalization) if finalization.proposal.payload == to_chain_digest(&digest) => finalization,
            _ => return (ledger, None),
        };
        let Some(block) = self.marshal.get_block(Height::new(height)).await else {
            return (ledger, None);
        };
        let proof = FinalityProof::new(block.inner().block().header(), &finalization);
        (ledger, Some(proof))
    }

    /// Admits a transaction to the mempool and gossips it to the other validators.
    pub fn submit(&self, tx: SignedTransaction) -> Result<Digest, SubmitError> {
        let id = self.app.submit(tx.clone())?;
        if self.gossip.clone().try_send(tx).is_err() {
            // The transaction still waits here and goes into a block when this validator leads.
            debug!(%id, "gossip queue full; transaction kept locally");
        }
        Ok(id)
    }
}

/// The consensus key of a Vouch key: the same ed25519 key.
pub(crate) fn consensus_private_key(key: &SecretKey) -> PrivateKey {
    let seed = key.to_seed();
    PrivateKey::decode(bytes::Bytes::copy_from_slice(&seed))
        .unwrap_or_else(|_| unreachable!("every 32-byte seed is an ed25519 key"))
}

pub(crate) fn consensus_public_key(key: &PublicKey) -> Result<ConsensusKey, StartError> {
    ConsensusKey::decode(bytes::Bytes::copy_from_slice(key.as_bytes())).map_err(|_| StartError::BadValidatorKey(*key))
}

fn fetch_timeout(timing: &Timing) -> commonware_utils::NonZeroDuration {
    commonware_utils::NonZeroDuration::new(Duration::from_millis(timing.fetch_timeout_ms.max(1)))
        .unwrap_or_else(|| unreachable!("a positive duration"))
}

/// The validators of `genesis` as consensus keys.
pub fn participants(genesis: &Genesis) -> Result<Set<ConsensusKey>, StartError> {
    let keys = genesis
        .validators
        .iter()
        .map(|validator| consensus_public_key(&validator.public_key))
        .collect::<Result<Vec<_>, _>>()?;
    // Genesis checks refuse duplicate validators.
    Set::try_from(keys).map_err(|_| StartError::DuplicateValidator)
}

/// The namespace votes are signed in: one per chain, so that votes cannot be replayed across
/// chains.
pub fn namespace(genesis: &Genesis) -> Vec<u8> {
    format!("vouch-{}", genesis.chain_id()).into_bytes()
}

fn archive_config<C>(prefix: &str, name: &str, page_cache: &CacheRef, codec_config: C) -> immutable::Config<C> {
    immutable::Config {
        metadata_partition: format!("{prefix}-{name}-metadata"),
        freezer_table_partition: format!("{prefix}-{name}-freezer-table"),
        freezer_table_initial_size: 64,
        freezer_table_resize_frequency: 10,
        freezer_table_resize_chunk_size: 10,
        freezer_key_partition: format!("{prefix}-{name}-freezer-key"),
        freezer_key_page_cache: page_cache.clone(),
        freezer_value_partition: format!("{prefix}-{name}-freezer-value"),
        freezer_value_target_size: 64 * 1024 * 1024,
        freezer_value_compression: None,
        ordinal_partition: format!("{prefix}-{name}-ordinal"),
        items_per_section: NZU64!(1024),
        codec_config,
        replay_buffer: WRITE_BUFFER,
        freezer_key_write_buffer: WRITE_BUFFER,
        freezer_value_write_buffer: WRITE_BUFFER,
        ordinal_write_buffer: WRITE_BUFFER,
    }
}

/// Starts a validator on `context`: its tasks live as long as that context's task. `peers`
/// names who fetches go to and `blocker` blocks peers that misbehave.
pub async fn start<E, S, R, P, B>(
    context: E,
    config: ValidatorConfig,
    channels: Channels<S, R>,
    peers: P,
    blocker: B,
) -> Result<Validator, StartError>
where
    E: Runtime,
    S: Sender<PublicKey = ConsensusKey>,
    R: Receiver<PublicKey = ConsensusKey>,
    P: Provider<PublicKey = ConsensusKey>,
    B: Blocker<PublicKey = ConsensusKey>,
{
    let genesis = &config.genesis;
    let me = config.key.public_key();
    if !genesis.validators.iter().any(|validator| validator.public_key == me) {
        return Err(StartError::NotAValidator(me));
    }
    let private = consensus_private_key(&config.key);
    let public = private.public_key();
    let participants = participants(genesis)?;
    let scheme = Scheme::signer(&namespace(genesis), participants, private).ok_or(StartError::NotAValidator(me))?;
    let prefix = config.partition_prefix.clone();
    let page_cache = CacheRef::new(PAGE_SIZE, PAGE_CACHE_PAGES);
    let timing = config.timing;

    // The ledger application, restored from what it saved.
    let (persister, recovered) = Persister::open(
        context.child("ledger"),
        &prefix,
        genesis,
        config.snapshot_interval_blocks,
    )
    .await?;
    let (persist_sender, persist_receiver) = mpsc::unbounded();
    let app = LedgerApp::new(genesis, me).with_persistence(persist_sender);
    if let Some(recovered) = recovered {
        app.recover(recovered)?;
    }
    context.child("persist").spawn(move |_| persister.run(persist_receiver));

    // Marshal: finalized blocks in order, fetched from peers when missing.
    let genesis_block = genesis_block(genesis);
    let genesis_digest = genesis_block.digest();
    let (backfill_sender, backfill_receiver) = channels.backfill;
    let resolver = marshal_resolver::init(
        context.child("backfill"),
        marshal_resolver::Config {
            public_key: public.clone(),
            peer_provider: peers.clone(),
            blocker: blocker.clone(),
            mailbox_size: MAILBOX_SIZE,
            fetch_timeout: fetch_timeout(&timing),
            fetch_retry_delay: Duration::from_millis(100),
            priority_requests: false,
            priority_responses: false,
        },
        (backfill_sender, backfill_receiver),
    );
    let (broadcast_engine, buffer) = buffered::Engine::new(
        context.child("broadcast"),
        buffered::Config {
            public_key: public.clone(),
            mailbox_size: MAILBOX_SIZE,
            deque_size: 10,
            priority: false,
            codec_config: (),
            peer_provider: peers,
            strategy: Sequential,
        },
    );
    broadcast_engine.start(channels.blocks);
    let finalizations = immutable::Archive::init(
        context.child("finalizations"),
        archive_config(
            &prefix,
            "finalizations",
            &page_cache,
            Scheme::certificate_codec_config_unbounded(),
        ),
    )
    .await
    .map_err(|error| StartError::Storage(error.to_string()))?;
    let blocks = immutable::Archive::init(
        context.child("blocks"),
        archive_config(&prefix, "blocks", &page_cache, ()),
    )
    .await
    .map_err(|error| StartError::Storage(error.to_string()))?;
    let (actor, marshal, _) = Actor::init(
        context.child("marshal"),
        finalizations,
        blocks,
        MarshalConfig {
            provider: ConstantProvider::new(scheme.clone()),
            epocher: FixedEpocher::new(NZU64!(u64::MAX / 2)),
            start: Start::Genesis(Digested::precomputed(genesis_block, genesis_digest)),
            mailbox_size: MAILBOX_SIZE,
            view_retention: ViewDelta::new(10),
            max_repair: NZUsize!(10),
            max_pending_acks: NZUsize!(16),
            block_codec_config: (),
            partition_prefix: prefix.clone(),
            prunable_items_per_section: NZU64!(10),
            replay_buffer: WRITE_BUFFER,
            key_write_buffer: WRITE_BUFFER,
            value_write_buffer: WRITE_BUFFER,
            page_cache: page_cache.clone(),
            strategy: Sequential,
        },
    )
    .await;
    actor.start(app.clone(), buffer, resolver);

    // Consensus, verifying each proposal by executing it.
    let wrapper = Inline::new(
        context.child("inline"),
        app.clone(),
        marshal.clone(),
        FixedEpocher::new(NZU64!(u64::MAX / 2)),
    );
    let engine = SimplexEngine::new(
        context.child("simplex"),
        SimplexConfig {
            scheme,
            elector: RoundRobin::<Blake3>::default(),
            blocker,
            automaton: wrapper.clone(),
            relay: wrapper.clone(),
            reporter: wrapper,
            strategy: Sequential,
            partition: format!("{prefix}-simplex"),
            mailbox_size: MAILBOX_SIZE,
            epoch: Epoch::zero(),
            floor: Floor::Genesis(genesis_digest),
            replay_buffer: WRITE_BUFFER,
            write_buffer: WRITE_BUFFER,
            page_cache,
            leader_timeout: Duration::from_millis(timing.leader_timeout_ms),
            certification_timeout: Duration::from_millis(timing.certification_timeout_ms),
            timeout_retry: Duration::from_millis(timing.timeout_retry_ms),
            view_retention: ViewDelta::new(10),
            skip: SkipPolicy::Enabled {
                timeout: Duration::from_millis(timing.skip_timeout_ms),
                budget: SkipBudget::Participants,
            },
            fetch_timeout: fetch_timeout(&timing),
            fetch_retry_delay: Duration::from_millis(100),
            forward: ForwardPolicy::Disabled,
            track_historical_votes: false,
        },
    );
    engine.start(channels.votes, channels.certificates, channels.consensus_resolver);

    // Transaction gossip.
    let (gossip_sender, gossip_receiver) = mpsc::channel(GOSSIP_QUEUE);
    let gossip_app = app.clone();
    context
        .child("gossip")
        .spawn(move |_| gossip(gossip_app, gossip_receiver, channels.transactions));

    Ok(Validator {
        genesis: std::sync::Arc::new(config.genesis.clone()),
        app,
        gossip: gossip_sender,
        marshal,
    })
}

/// Sends locally submitted transactions to every peer, in batches, and admits the transactions
/// peers send. Validators are fully connected, so a received transaction is not forwarded.
async fn gossip<S, R>(app: LedgerApp, mut outbound: mpsc::Receiver<SignedTransaction>, channel: Channel<S, R>)
where
    S: Sender<PublicKey = ConsensusKey>,
    R: Receiver<PublicKey = ConsensusKey>,
{
    let (mut sender, mut receiver) = channel;
    loop {
        commonware_macros::select! {
            next = outbound.next() => {
                let Some(first) = next else { return };
                let mut batch = encode_gossip(first);
                while batch.len() < MAX_GOSSIP_BATCH_BYTES {
                    match outbound.try_recv() {
                        Ok(tx) => batch.extend_from_slice(&encode_gossip(tx)),
                        _ => break,
                    }
                }
                sender.send(Recipients::All, batch, false);
            },
            message = receiver.recv() => {
                let Ok((peer, bytes)) = message else { return };
                for tx in decode_gossip(bytes.as_ref()) {
                    match tx {
                        Ok(tx) => {
                            if let Err(error) = app.submit(tx) {
                                debug!(%error, "gossiped transaction not admitted");
                            }
                        }
                        Err(reason) => {
                            warn!(?peer, reason, "malformed transaction gossip");
                            break;
                        }
                    }
                }
            },
        }
    }
}

/// One transaction in a gossip batch: a 4-byte length, then its encoding.
fn encode_gossip(tx: SignedTransaction) -> Vec<u8> {
    let encoded = tx.encode();
    let mut out = Vec::with_capacity(4 + encoded.len());
    out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    out.extend_from_slice(&encoded);
    out
}

/// The transactions of a gossip batch, each decoded within [`MAX_TX_BYTES`].
fn decode_gossip(mut bytes: &[u8]) -> impl Iterator<Item = Result<SignedTransaction, &'static str>> + '_ {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        if bytes.len() < 4 {
            bytes = &[];
            return Some(Err("truncated length"));
        }
        let mut word = [0u8; 4];
        word.copy_from_slice(&bytes[..4]);
        let length = u32::from_be_bytes(word) as usize;
        if length > MAX_TX_BYTES || bytes.len() - 4 < length {
            bytes = &[];
            return Some(Err("transaction length out of bounds"));
        }
        let encoded = &bytes[4..4 + length];
        bytes = &bytes[4 + length..];
        Some(SignedTransaction::decode_unverified(encoded).map_err(|_| "undecodable transaction"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vouch_ledger::{Transaction, TxBody};

    #[test]
    fn gossip_batches_round_trip_and_bad_bytes_stop_decoding() {
        let key = SecretKey::from_seed([3; 32]);
        let chain = Digest::of("chain", b"");
        let txs: Vec<SignedTransaction> = (0..3)
            .map(|nonce| {
                Transaction {
                    signer: key.public_key(),
                    nonce,
                    fee: 1,
                    body: TxBody::Transfer {
                        to: key.public_key(),
                        amount: 1,
                    },
                }
                .sign(&key, &chain)
            })
            .collect();
        let batch: Vec<u8> = txs.iter().cloned().flat_map(encode_gossip).collect();
        let decoded: Vec<SignedTransaction> = decode_gossip(&batch).map(|tx| tx.expect("decodes")).collect();
        assert_eq!(decoded, txs);

        let mut truncated = batch.clone();
        truncated.truncate(batch.len() - 1);
        let results: Vec<_> = decode_gossip(&truncated).collect();
        assert_eq!(results.len(), 3);
        assert!(results[2].is_err());

        let oversize = ((MAX_TX_BYTES + 1) as u32).to_be_bytes();
        let results: Vec<_> = decode_gossip(&oversize).collect();
        assert_eq!(results, vec![Err("transaction length out of bounds")]);
    }
}
