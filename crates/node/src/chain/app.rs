//! The application consensus drives: it builds and checks blocks by executing the ledger, and
//! applies the blocks marshal reports finalized.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use commonware_actor::Feedback;
use commonware_consensus::marshal::Update;
use commonware_consensus::marshal::ancestry::Ancestry;
use commonware_consensus::simplex::types::Context;
use commonware_consensus::{Application, Heightable, Reporter};
use commonware_cryptography::blake3::Digest as ChainDigest;
use commonware_cryptography::ed25519::PublicKey as ConsensusKey;
use commonware_cryptography::{Digested, Digestible};
use commonware_utils::Acknowledgement;
use futures::StreamExt;
use futures::channel::mpsc;
use tracing::{debug, error, warn};
use vouch_crypto::{Digest, PublicKey};
use vouch_ledger::{Block, BlockContext, Genesis, Ledger, SignedTransaction, TxError, block_seed};

use super::Scheme;
use super::block::{ChainBlock, from_chain_digest, to_chain_digest};
use super::persist::{Finalization, Recovered};

/// The most transactions the mempool holds.
pub const MAX_MEMPOOL_TXS: usize = 100_000;

/// How many finalized blocks [`LedgerApp::finalized`] remembers.
pub const MAX_HISTORY: usize = 10_000;

/// A saved finalized block that does not apply on top of the saved state before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the saved finalized block at height {0} does not apply to the saved state")]
pub struct RecoverError(pub u64);

/// Why a transaction was not admitted to the mempool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The ledger refuses it against the finalized state.
    #[error("{0}")]
    Refused(#[from] TxError),
    /// It is already waiting.
    #[error("transaction {0} is already in the mempool")]
    Duplicate(Digest),
    /// The mempool is full.
    #[error("the mempool is full ({MAX_MEMPOOL_TXS} transactions); try again later")]
    Full,
}

/// A finalized block as the application recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    /// Its height.
    pub height: u64,
    /// Its digest.
    pub digest: Digest,
    /// The state root after it.
    pub state_root: Digest,
    /// How many transactions it carried.
    pub tx_count: usize,
}

struct ChainState {
    genesis_digest: ChainDigest,
    genesis_ledger: Arc<Ledger>,
    /// The state after each block built or verified above the finalized tip.
    pending: HashMap<ChainDigest, (u64, Arc<Ledger>)>,
    finalized_digest: ChainDigest,
    finalized_height: u64,
    finalized_ledger: Arc<Ledger>,
    /// The last [`MAX_HISTORY`] finalized blocks.
    history: VecDeque<Finalized>,
    watchers: Vec<mpsc::Sender<()>>,
    /// Waiting transactions with their ids, in arrival order.
    mempool: VecDeque<(Digest, SignedTransaction)>,
    mempool_ids: HashSet<Digest>,
}

impl ChainState {
    fn known_state(&self, digest: &ChainDigest) -> Option<Arc<Ledger>> {
        if *digest == self.finalized_digest {
            return Some(self.finalized_ledger.clone());
        }
        if *digest == self.genesis_digest {
            return Some(self.genesis_ledger.clone());
        }
        self.pending.get(digest).map(|(_, ledger)| ledger.clone())
    }
}

/// The ledger application of one validator.
#[derive(Clone)]
pub struct LedgerApp {
    me: PublicKey,
    state: Arc<Mutex<ChainState>>,
    /// Where finalized blocks go to be saved before they are acknowledged (none: acknowledged
    /// at once, for tests that keep nothing).
    persist: Option<mpsc::UnboundedSender<Finalization>>,
}

impl std::fmt::Debug for LedgerApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerApp")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// The genesis block of a genesis: height 0, the genesis state root.
pub fn genesis_block(genesis: &Genesis) -> ChainBlock {
    genesis_block_of(&Ledger::from_genesis(genesis))
}

fn genesis_block_of(genesis_ledger: &Ledger) -> ChainBlock {
    ChainBlock::new(Block::genesis(genesis_ledger.root()))
}

impl LedgerApp {
    /// An application starting from the genesis, proposing blocks as `me`.
    pub fn new(genesis: &Genesis, me: PublicKey) -> Self {
        let ledger = Arc::new(Ledger::from_genesis(genesis));
        let genesis_digest = genesis_block_of(&ledger).digest();
        Self {
            me,
            state: Arc::new(Mutex::new(ChainState {
                genesis_digest,
                genesis_ledger: ledger.clone(),
                pending: HashMap::new(),
                finalized_digest: genesis_digest,
                finalized_height: 0,
                finalized_ledger: ledger,
                history: VecDeque::new(),
                watchers: Vec::new(),
                mempool: VecDeque::new(),
                mempool_ids: HashSet::new(),
            })),
            persist: None,
        }
    }

    /// The same application, sending each finalized block to `persist` to be saved and
    /// acknowledged there.
    pub fn with_persistence(mut self, persist: mpsc::UnboundedSender<Finalization>) -> Self {
        self.persist = Some(persist);
        self
    }

    fn lock(&self) -> MutexGuard<'_, ChainState> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state after the last finalized block.
    pub fn finalized_ledger(&self) -> Arc<Ledger> {
        self.lock().finalized_ledger.clone()
    }

    /// The last blocks finalized (at most [`MAX_HISTORY`]; since the start of this process), in
    /// height order.
    pub fn finalized(&self) -> Vec<Finalized> {
        self.lock().history.iter().cloned().collect()
    }

    /// The height and digest of the last finalized block.
    pub fn finalized_tip(&self) -> (u64, Digest) {
        let state = self.lock();
        (state.finalized_height, from_chain_digest(&state.finalized_digest))
    }

    /// The last finalized block's height and digest with the state after it, read together.
    pub fn finalized_snapshot(&self) -> (u64, Digest, Arc<Ledger>) {
        let state = self.lock();
        (
            state.finalized_height,
            from_chain_digest(&state.finalized_digest),
            state.finalized_ledger.clone(),
        )
    }

    /// The height of the last finalized block.
    pub fn finalized_height(&self) -> u64 {
        self.lock().finalized_height
    }

    /// How many transactions wait in the mempool.
    pub fn mempool_len(&self) -> usize {
        self.lock().mempool.len()
    }

    /// Continues from a saved state: the snapshot, then the finalized blocks saved after it.
    pub fn recover(&self, recovered: Recovered) -> Result<(), RecoverError> {
        {
            let mut state = self.lock();
            state.finalized_digest = to_chain_digest(&recovered.digest);
            state.finalized_height = recovered.height;
            state.finalized_ledger = recovered.ledger;
        }
        for block in &recovered.blocks {
            self.apply_finalized(block).map_err(RecoverError)?;
        }
        Ok(())
    }

    /// A stream that yields each time a block is finalized (several blocks may yield once: read
    /// the state when it does).
    pub fn subscribe(&self) -> mpsc::Receiver<()> {
        let (sender, receiver) = mpsc::channel(1);
        self.lock().watchers.push(sender);
        receiver
    }

    /// Applies a finalized block to the finalized state; `Ok(None)` when it was applied before,
    /// `Err(height)` when it does not apply.
    fn apply_finalized(&self, block: &ChainBlock) -> Result<Option<Arc<Ledger>>, u64> {
        let digest = block.digest();
        let inner = block.block();
        let mut state = self.lock();
        if inner.height <= state.finalized_height {
            return Ok(None);
        }
        let ledger = match state.pending.get(&digest) {
            Some((_, ledger)) => ledger.clone(),
            None => match state.finalized_ledger.execute_block(&inner.context(), &inner.txs) {
                Ok(next) if next.root() == inner.state_root => Arc::new(next),
                _ => return Err(inner.height),
            },
        };
        state.finalized_digest = digest;
        state.finalized_height = inner.height;
        state.finalized_ledger = ledger.clone();
        let finalized_height = inner.height;
        state.pending.retain(|_, (height, _)| *height > finalized_height);
        let included: HashSet<Digest> = inner.txs.iter().map(SignedTransaction::id).collect();
        let ChainState {
            mempool,
            mempool_ids,
            watchers,
            history,
            ..
        } = &mut *state;
        mempool.retain(|(id, tx)| {
            // Drop what the block carried and what can never apply again (a used nonce).
            let stale = ledger
                .account(&tx.tx.signer)
                .map(|account| tx.tx.nonce < account.nonce)
                .unwrap_or(true);
            let keep = !included.contains(id) && !stale;
            if !keep {
                mempool_ids.remove(id);
            }
            keep
        });
        if history.len() >= MAX_HISTORY {
            history.pop_front();
        }
        history.push_back(Finalized {
            height: inner.height,
            digest: from_chain_digest(&digest),
            state_root: inner.state_root,
            tx_count: inner.txs.len(),
        });
        // A full channel already holds a wake-up; a closed one belongs to a stopped watcher.
        watchers.retain_mut(|watcher| match watcher.try_send(()) {
            Ok(()) => true,
            Err(error) => error.is_full(),
        });
        Ok(Some(ledger))
    }

    /// Admits a transaction to the mempool after checking it against the finalized state
    /// (fully when its nonce is the account's next one; otherwise signature and nonce order).
    pub fn submit(&self, tx: SignedTransaction) -> Result<Digest, SubmitError> {
        let mut state = self.lock();
        let id = tx.id();
        if state.mempool_ids.contains(&id) {
            return Err(SubmitError::Duplicate(id));
        }
        if state.mempool.len() >= MAX_MEMPOOL_TXS {
            return Err(SubmitError::Full);
        }
        let ledger = &state.finalized_ledger;
        let account = ledger.account(&tx.tx.signer)?;
        if tx.tx.nonce < account.nonce {
            return Err(TxError::Nonce {
                expected: account.nonce,
                got: tx.tx.nonce,
            }
            .into());
        }
        let height = state.finalized_height + 1;
        let ctx = BlockContext {
            height,
            proposer: self.me,
            seed: block_seed(&from_chain_digest(&state.finalized_digest), height),
        };
        if tx.tx.nonce == account.nonce {
            ledger.check(&ctx, &tx)?;
        } else {
            tx.check_signature(ledger.chain_id())
                .map_err(|_| SubmitError::Refused(TxError::BadSignature))?;
        }
        state.mempool_ids.insert(id);
        state.mempool.push_back((id, tx));
        Ok(id)
    }

    /// The state after the block `target`, replaying from the nearest known state through the
    /// blocks `ancestry` yields (newest first).
    async fn state_after<A: Ancestry<ChainBlock>>(&self, target: ChainDigest, mut ancestry: A) -> Option<Arc<Ledger>> {
        let mut replay = Vec::new();
        let mut wanted = target;
        let mut base = loop {
            if let Some(known) = self.lock().known_state(&wanted) {
                break known;
            }
            let block = ancestry.next().await?;
            if block.digest() != wanted {
                warn!("ancestry does not lead to the wanted block");
                return None;
            }
            wanted = commonware_consensus::Block::parent(&block);
            replay.push(block);
        };
        for block in replay.into_iter().rev() {
            let inner = block.inner().block();
            let next = match base.execute_block(&inner.context(), &inner.txs) {
                Ok(next) if next.root() == inner.state_root => Arc::new(next),
                Ok(_) => {
                    warn!(height = inner.height, "replayed block gives another state root");
                    return None;
                }
                Err(error) => {
                    warn!(height = inner.height, %error, "replayed block does not apply");
                    return None;
                }
            };
            self.lock().pending.insert(block.digest(), (inner.height, next.clone()));
            base = next;
        }
        Some(base)
    }
}

fn leader_key(leader: &ConsensusKey) -> PublicKey {
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(leader.as_ref());
    PublicKey::from_bytes(bytes)
}

impl<E: Send + 'static> Application<E> for LedgerApp {
    type SigningScheme = Scheme;
    type Context = Context<ChainDigest, ConsensusKey>;
    type Block = ChainBlock;
    type Input = ();

    async fn propose(
        &mut self,
        context: (E, Self::Context),
        ancestry: impl Ancestry<Self::Block>,
        _input: (),
    ) -> Option<Digested<Self::Block>> {
        let (_, consensus) = context;
        let parent = ancestry.peek()?.clone();
        let parent_state = self.state_after(parent.digest(), ancestry.clone()).await?;
        let parent_digest = from_chain_digest(&parent.digest());
        let height = parent.height().get() + 1;
        let ctx = BlockContext {
            height,
            proposer: self.me,
            seed: block_seed(&parent_digest, height),
        };
        let candidates: Vec<SignedTransaction> = {
            let state = self.lock();
            let limit = parent_state.params().max_block_txs as usize;
            state.mempool.iter().take(limit).map(|(_, tx)| tx.clone()).collect()
        };
        let built = match parent_state.build_block(&ctx, candidates) {
            Ok(built) => built,
            Err(error) => {
                error!(%error, "cannot build a block");
                return None;
            }
        };
        debug!(height, view = %consensus.round.view(), txs = built.included.len(), "proposing");
        let block = ChainBlock::new(Block {
            parent: parent_digest,
            height,
            proposer: self.me,
            state_root: built.ledger.root(),
            txs: built.included,
        });
        let digest = block.digest();
        self.lock().pending.insert(digest, (height, Arc::new(built.ledger)));
        Some(Digested::precomputed(block, digest))
    }

    async fn verify(&mut self, context: (E, Self::Context), mut ancestry: impl Ancestry<Self::Block>) -> bool {
        let (_, consensus) = context;
        let Some(block) = ancestry.next().await else {
            return false;
        };
        let inner = block.inner().block();
        if inner.proposer != leader_key(&consensus.leader) {
            warn!(
                height = inner.height,
                "block names another proposer than the view's leader"
            );
            return false;
        }
        let Some(parent_state) = self.state_after(to_chain_digest(&inner.parent), ancestry).await else {
            return false;
        };
        match parent_state.execute_block(&inner.context(), &inner.txs) {
            Ok(next) if next.root() == inner.state_root => {
                self.lock()
                    .pending
                    .insert(block.digest(), (inner.height, Arc::new(next)));
                true
            }
            Ok(_) => {
                warn!(
                    height = inner.height,
                    "block commits to a state root its transactions do not give"
                );
                false
            }
            Err(error) => {
                warn!(height = inner.height, %error, "block does not apply");
                false
            }
        }
    }
}

impl Reporter for LedgerApp {
    type Activity = Update<ChainBlock>;

    fn report(&mut self, activity: Self::Activity) -> Feedback {
        let Update::Block(block, ack) = activity else {
            return Feedback::Ok;
        };
        match self.apply_finalized(block.inner()) {
            Ok(Some(ledger)) => match &self.persist {
                Some(persist) => {
                    let finalization = Finalization {
                        block: block.inner().clone(),
                        ledger,
                        ack,
                    };
                    if persist.unbounded_send(finalization).is_err() {
                        error!("the chain storage stopped; this validator stops applying blocks");
                    }
                }
                None => ack.acknowledge(),
            },
            // Marshal redelivers after a restart; the block is already applied and saved.
            Ok(None) => ack.acknowledge(),
            // A finalized block that does not apply means this node's state diverged; stop
            // acknowledging (which stops marshal) rather than build on it.
            Err(height) => error!(height, "finalized block does not apply to the local state"),
        }
        Feedback::Ok
    }
}
