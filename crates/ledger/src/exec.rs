//! Deterministic execution: how each transaction changes the state, all or nothing.

use std::collections::BTreeMap;

use vouch_crypto::{Digest, PublicKey};
use vouch_types::receipt::Receipt;
use vouch_types::{BlobId, ModelId, ModelName, VerifyLevel, Version};

use crate::block::MAX_BLOCK_BYTES;
use crate::genesis::{Genesis, Params};
use crate::merkle::{AuthMap, StateProof};
use crate::state::{
    Account, MAX_REPLICAS, MAX_UNBONDING_ENTRIES, ModelRecord, NodeRecord, Record, TaskRecord, TaskStatus, Unbonding,
    account_key, assignment_key, assignments_prefix, deadline_key, host_key, hosts_prefix, model_key, name_key,
    node_key, prefix, publication_key, replica_duties_prefix, replica_duty_key, task_key, unbonding_key, version_key,
};
use crate::tx::{MAX_ADDRESS_BYTES, MAX_MODELS_PER_NODE, MAX_QUORUM, SignedTransaction, TxBody};

/// The domain of the draws that pick replicas and executors.
const DRAW_DOMAIN: &str = "vouch draw";

/// What a block gives the transactions in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockContext {
    /// The block's height.
    pub height: u64,
    /// The validator that proposed it; it collects the fees.
    pub proposer: PublicKey,
    /// The randomness that draws replicas and executors.
    pub seed: Digest,
}

/// Why a transaction was refused. A refused transaction changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The signature does not verify for this chain.
    #[error("bad signature: it does not verify against the signer's key for this chain")]
    BadSignature,
    /// The nonce is not the account's next one (a replay, or one sent out of order).
    #[error("wrong nonce {got}: the account's next nonce is {expected}")]
    Nonce {
        /// The nonce the account expects.
        expected: u64,
        /// The nonce the transaction carries.
        got: u64,
    },
    /// The fee is below the chain's minimum.
    #[error("fee {offered} is below the minimum fee {minimum}")]
    FeeTooLow {
        /// The least fee accepted.
        minimum: u64,
        /// The fee offered.
        offered: u64,
    },
    /// The account cannot pay.
    #[error("insufficient funds: needs {needed}, has {available}")]
    InsufficientFunds {
        /// What the transaction needs.
        needed: u64,
        /// What the account holds.
        available: u64,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid transaction: {0}")]
    Invalid(String),
    /// The signer is not a registered node.
    #[error("{0} is not a registered node")]
    NotANode(PublicKey),
    /// The model is not published.
    #[error("unknown model {0}: it is not published on the ledger")]
    UnknownModel(ModelId),
    /// Another key owns the name.
    #[error("the name {name} belongs to {owner}; only that key may publish versions of it")]
    NameOwned {
        /// The name.
        name: ModelName,
        /// Its publisher.
        owner: PublicKey,
    },
    /// The version is already published with other content.
    #[error("{name}@{version} is already published as {existing}")]
    VersionTaken {
        /// The name.
        name: ModelName,
        /// The version.
        version: Version,
        /// The model id it holds.
        existing: ModelId,
    },
    /// Fewer eligible nodes host the model than the task asks for.
    #[error("model {model} has {hosts} eligible hosts, fewer than the {needed} asked for")]
    NotEnoughHosts {
        /// The model.
        model: ModelId,
        /// How many executors were asked for.
        needed: usize,
        /// How many staked nodes host it.
        hosts: usize,
    },
    /// No task has this id.
    #[error("unknown task {0}")]
    UnknownTask(Digest),
    /// The signer was not drawn for the task.
    #[error("{executor} was not assigned task {task}")]
    NotAssigned {
        /// The task.
        task: Digest,
        /// The signer.
        executor: PublicKey,
    },
    /// The state holds a value that does not decode (a bug, never bad input).
    #[error("corrupt ledger state at key {0}")]
    CorruptState(String),
}

fn invalid(message: impl Into<String>) -> TxError {
    TxError::Invalid(message.into())
}

/// A transaction's writes, held apart from the state until it succeeds.
struct Pending<'a> {
    base: &'a AuthMap,
    writes: Writes,
}

impl<'a> Pending<'a> {
    fn new(base: &'a AuthMap) -> Self {
        Self {
            base,
            writes: BTreeMap::new(),
        }
    }

    fn get<T: Record>(&self, key: &[u8]) -> Result<Option<T>, TxError> {
        let bytes = match self.writes.get(key) {
            Some(written) => written.as_deref(),
            None => self.base.get(key),
        };
        bytes
            .map(|bytes| T::from_bytes(bytes).map_err(|_| TxError::CorruptState(hex::encode(key))))
            .transpose()
    }

    fn contains(&self, key: &[u8]) -> bool {
        match self.writes.get(key) {
            Some(written) => written.is_some(),
            None => self.base.get(key).is_some(),
        }
    }

    fn put<T: Record>(&mut self, key: Vec<u8>, record: &T) {
        self.writes.insert(key, Some(record.to_bytes()));
    }

    fn put_marker(&mut self, key: Vec<u8>) {
        self.writes.insert(key, Some(Vec::new()));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Every present key from `start` (inclusive) to `end` (exclusive), in order.
    fn keys_between(&self, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
        let range = start.to_vec()..end.to_vec();
        let mut keys: BTreeMap<Vec<u8>, bool> = self
            .base
            .range(range.clone())
            .map(|(key, _)| (key.to_vec(), true))
            .collect();
        for (key, value) in self.writes.range(range) {
            keys.insert(key.clone(), value.is_some());
        }
        keys.into_iter()
            .filter(|(_, present)| *present)
            .map(|(key, _)| key)
            .collect()
    }

    fn keys_with_prefix(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        self.keys_between(prefix, &prefix_end(prefix))
    }

    fn account(&self, who: &PublicKey) -> Result<Account, TxError> {
        Ok(self.get(&account_key(who))?.unwrap_or_default())
    }

    fn debit(&mut self, who: &PublicKey, amount: u64) -> Result<(), TxError> {
        let mut account = self.account(who)?;
        account.balance = account.balance.checked_sub(amount).ok_or(TxError::InsufficientFunds {
            needed: amount,
            available: account.balance,
        })?;
        self.put(account_key(who), &account);
        Ok(())
    }

    fn credit(&mut self, who: &PublicKey, amount: u64) -> Result<(), TxError> {
        let mut account = self.account(who)?;
        account.balance = account
            .balance
            .checked_add(amount)
            .ok_or_else(|| invalid("the balance would overflow"))?;
        self.put(account_key(who), &account);
        Ok(())
    }

    fn into_writes(self) -> Writes {
        self.writes
    }
}

/// Keys set (`Some`) or removed (`None`) by a transaction.
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

fn commit(writes: Writes, state: &mut AuthMap) {
    {
        for (key, value) in writes {
            match value {
                Some(value) => state.insert(key, value),
                None => state.remove(&key),
            }
        }
    }
}

/// The least key greater than every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

fn key_tail<const N: usize>(key: &[u8]) -> Result<[u8; N], TxError> {
    key.len()
        .checked_sub(N)
        .and_then(|start| key[start..].try_into().ok())
        .ok_or_else(|| TxError::CorruptState(hex::encode(key)))
}

/// Draws `count` distinct members of `candidates` (sorted, so every node draws the same).
fn draw(candidates: &[PublicKey], count: usize, seed: &Digest, salt: &[u8]) -> Vec<PublicKey> {
    let mut pool = candidates.to_vec();
    let count = count.min(pool.len());
    for index in 0..count {
        let mut message = seed.as_bytes().to_vec();
        message.extend_from_slice(salt);
        message.extend_from_slice(&(index as u64).to_be_bytes());
        let random = Digest::of(DRAW_DOMAIN, &message);
        let mut word = [0u8; 8];
        word.copy_from_slice(&random.as_bytes()[..8]);
        // Multiply-shift maps 64 random bits onto the remaining pool with a bias below 2^-50.
        let remaining = (pool.len() - index) as u128;
        let pick = index + ((u64::from_be_bytes(word) as u128 * remaining) >> 64) as usize;
        pool.swap(index, pick);
    }
    pool.truncate(count);
    pool
}

/// The replicated state machine: the authenticated state and the rules that change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    state: AuthMap,
    params: Params,
    chain_id: Digest,
}

impl Ledger {
    /// The state at height 0.
    pub fn from_genesis(genesis: &Genesis) -> Self {
        let mut state = AuthMap::new();
        for account in &genesis.accounts {
            let record = Account {
                balance: account.balance,
                nonce: 0,
            };
            state.insert(account_key(&account.public_key), record.to_bytes());
        }
        for validator in &genesis.validators {
            let record = NodeRecord {
                stake: validator.stake,
                address: validator.api_address.clone(),
                models: Vec::new(),
                unbonding: Vec::new(),
            };
            state.insert(node_key(&validator.public_key), record.to_bytes());
        }
        Self {
            state,
            params: genesis.params,
            chain_id: genesis.chain_id(),
        }
    }

    /// The chain's rules.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The chain id that transactions are signed for.
    pub fn chain_id(&self) -> &Digest {
        &self.chain_id
    }

    /// The Merkle root of the state.
    pub fn root(&self) -> Digest {
        self.state.root()
    }

    /// Every state entry, for saving: a count, then each key and value with a 4-byte length.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.state.len() as u64).to_be_bytes());
        for (key, value) in self.state.iter() {
            for part in [key, value] {
                out.extend_from_slice(&(part.len() as u32).to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    /// Restores a state saved by [`Ledger::snapshot`] on the chain of `genesis`, checking that it
    /// gives `expected_root`.
    pub fn from_snapshot(genesis: &Genesis, bytes: &[u8], expected_root: &Digest) -> Result<Self, SnapshotError> {
        fn take<'b>(rest: &mut &'b [u8], count: usize) -> Result<&'b [u8], SnapshotError> {
            if rest.len() < count {
                return Err(SnapshotError::Malformed("truncated"));
            }
            let (head, tail) = rest.split_at(count);
            *rest = tail;
            Ok(head)
        }
        fn length(rest: &mut &[u8]) -> Result<usize, SnapshotError> {
            let mut word = [0u8; 4];
            word.copy_from_slice(take(rest, 4)?);
            Ok(u32::from_be_bytes(word) as usize)
        }
        let mut rest = bytes;
        let mut word = [0u8; 8];
        word.copy_from_slice(take(&mut rest, 8)?);
        let count = u64::from_be_bytes(word);
        let mut state = AuthMap::new();
        for _ in 0..count {
            let key_len = length(&mut rest)?;
            let key = take(&mut rest, key_len)?.to_vec();
            let value_len = length(&mut rest)?;
            let value = take(&mut rest, value_len)?.to_vec();
            state.insert(key, value);
        }
        if !rest.is_empty() {
            return Err(SnapshotError::Malformed("bytes after the last entry"));
        }
        if state.len() as u64 != count {
            return Err(SnapshotError::Malformed("a key appears twice"));
        }
        let found = state.root();
        if found != *expected_root {
            return Err(SnapshotError::Root {
                expected: *expected_root,
                found,
            });
        }
        Ok(Self {
            state,
            params: genesis.params,
            chain_id: genesis.chain_id(),
        })
    }

    /// The open tasks that `executor` owes a receipt, in task-id order.
    pub fn assigned_tasks(&self, executor: &PublicKey) -> Result<Vec<Digest>, TxError> {
        let prefix = assignments_prefix(executor);
        self.state
            .range(prefix.clone()..prefix_end(&prefix))
            .map(|(key, _)| key_tail::<32>(key).map(Digest::from_bytes))
            .collect()
    }

    /// The models `node` was assigned to replicate and has not confirmed, in model-id order.
    pub fn replica_duties(&self, node: &PublicKey) -> Result<Vec<ModelId>, TxError> {
        let prefix = replica_duties_prefix(node);
        self.state
            .range(prefix.clone()..prefix_end(&prefix))
            .map(|(key, _)| key_tail::<32>(key).map(|hash| ModelId(BlobId::from_hash(hash))))
            .collect()
    }

    /// Up to `limit` models published after `cursor` (a `(height, model)` this returned
    /// before; `None` starts at the first), in publication order: height, then model id.
    pub fn published_after(
        &self,
        cursor: Option<(u64, ModelId)>,
        limit: usize,
    ) -> Result<Vec<(u64, ModelId)>, TxError> {
        let start = match cursor {
            // The smallest key after the cursor's own.
            Some((height, model)) => {
                let mut key = publication_key(height, &model);
                key.push(0);
                key
            }
            None => vec![prefix::PUBLICATION],
        };
        self.state
            .range(start..prefix_end(&[prefix::PUBLICATION]))
            .take(limit)
            .map(|(key, _)| {
                let height = key
                    .get(1..9)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| TxError::CorruptState(hex::encode(key)))?;
                let hash = key_tail::<32>(key)?;
                Ok((height, ModelId(BlobId::from_hash(hash))))
            })
            .collect()
    }

    /// A proof of what `key` holds, against [`Ledger::root`].
    pub fn prove(&self, key: &[u8]) -> StateProof {
        self.state.prove(key)
    }

    fn read<T: Record>(&self, key: &[u8]) -> Result<Option<T>, TxError> {
        Pending::new(&self.state).get(key)
    }

    /// An account (a fresh one holds nothing and expects nonce 0).
    pub fn account(&self, who: &PublicKey) -> Result<Account, TxError> {
        Ok(self.read(&account_key(who))?.unwrap_or_default())
    }

    /// A registered node.
    pub fn node(&self, who: &PublicKey) -> Result<Option<NodeRecord>, TxError> {
        self.read(&node_key(who))
    }

    /// Up to `limit` registered nodes, in key order.
    pub fn nodes(&self, limit: usize) -> Result<Vec<(PublicKey, NodeRecord)>, TxError> {
        let start = vec![prefix::NODE];
        self.state
            .range(start..prefix_end(&[prefix::NODE]))
            .take(limit)
            .map(|(key, value)| {
                let node = PublicKey::from_bytes(key_tail::<32>(key)?);
                let record = NodeRecord::from_bytes(value).map_err(|_| TxError::CorruptState(hex::encode(key)))?;
                Ok((node, record))
            })
            .collect()
    }

    /// A published model.
    pub fn model(&self, id: &ModelId) -> Result<Option<ModelRecord>, TxError> {
        self.read(&model_key(id))
    }

    /// The key that owns `name` (the first to publish it).
    pub fn name_owner(&self, name: &ModelName) -> Result<Option<PublicKey>, TxError> {
        self.read(&name_key(name))
    }

    /// The model published as `name@version`.
    pub fn resolve(&self, name: &ModelName, version: &Version) -> Result<Option<ModelId>, TxError> {
        self.read(&version_key(name, version))
    }

    /// The nodes that host `model` and hold enough stake to execute it, in key order.
    pub fn eligible_hosts(&self, model: &ModelId) -> Result<Vec<PublicKey>, TxError> {
        eligible_hosts(&Pending::new(&self.state), &self.params, model)
    }

    /// A task.
    pub fn task(&self, id: &Digest) -> Result<Option<TaskRecord>, TxError> {
        self.read(&task_key(id))
    }

    /// Checks a transaction against the current state without applying it.
    pub fn check(&self, ctx: &BlockContext, tx: &SignedTransaction) -> Result<(), TxError> {
        self.stage(ctx, tx).map(drop)
    }

    /// Work done at the start of every block: released stake returns to balances and open
    /// tasks past their deadline expire, refunding their escrow.
    pub fn begin_block(&mut self, ctx: &BlockContext) -> Result<(), TxError> {
        let mut pending = Pending::new(&self.state);
        let end = ctx.height.saturating_add(1).to_be_bytes();
        for key in pending.keys_between(&[prefix::UNBONDING], &[&[prefix::UNBONDING][..], &end].concat()) {
            let who = PublicKey::from_bytes(key_tail::<32>(&key)?);
            pending.delete(key);
            let Some(mut node) = pending.get::<NodeRecord>(&node_key(&who))? else {
                continue;
            };
            let (released, kept): (Vec<Unbonding>, Vec<Unbonding>) = node
                .unbonding
                .iter()
                .partition(|entry| entry.release_height <= ctx.height);
            node.unbonding = kept;
            let amount = released
                .iter()
                .try_fold(0u64, |sum, entry| sum.checked_add(entry.amount));
            let amount = amount.ok_or_else(|| invalid("released stake overflows"))?;
            pending.put(node_key(&who), &node);
            pending.credit(&who, amount)?;
        }
        // A task expires once its deadline height has passed.
        let end = ctx.height.to_be_bytes();
        for key in pending.keys_between(&[prefix::DEADLINE], &[&[prefix::DEADLINE][..], &end].concat()) {
            let id = Digest::from_bytes(key_tail::<32>(&key)?);
            pending.delete(key);
            let Some(mut task) = pending.get::<TaskRecord>(&task_key(&id))? else {
                continue;
            };
            if task.status == TaskStatus::Open {
                task.status = TaskStatus::Expired;
                pending.credit(&task.requester, task.max_fee)?;
                release_assignments(&mut pending, &task, &id);
                pending.put(task_key(&id), &task);
            }
        }
        let writes = pending.into_writes();
        commit(writes, &mut self.state);
        Ok(())
    }

    /// Applies one transaction: all of its effects, or (with an error) none.
    pub fn apply(&mut self, ctx: &BlockContext, tx: &SignedTransaction) -> Result<(), TxError> {
        let writes = self.stage(ctx, tx)?;
        commit(writes, &mut self.state);
        Ok(())
    }

    /// Works out a transaction's writes without making them.
    fn stage(&self, ctx: &BlockContext, tx: &SignedTransaction) -> Result<Writes, TxError> {
        tx.check_signature(&self.chain_id).map_err(|_| TxError::BadSignature)?;
        let mut pending = Pending::new(&self.state);
        let signer = tx.tx.signer;
        let mut account = pending.account(&signer)?;
        if tx.tx.nonce != account.nonce {
            return Err(TxError::Nonce {
                expected: account.nonce,
                got: tx.tx.nonce,
            });
        }
        if tx.tx.fee < self.params.min_fee {
            return Err(TxError::FeeTooLow {
                minimum: self.params.min_fee,
                offered: tx.tx.fee,
            });
        }
        account.nonce += 1;
        pending.put(account_key(&signer), &account);
        pending.debit(&signer, tx.tx.fee)?;
        pending.credit(&ctx.proposer, tx.tx.fee)?;
        let params = self.params;
        match &tx.tx.body {
            TxBody::Transfer { to, amount } => {
                if *amount == 0 {
                    return Err(invalid("a transfer moves a positive amount"));
                }
                pending.debit(&signer, *amount)?;
                pending.credit(to, *amount)?;
            }
            TxBody::RegisterNode { stake, address, models } => {
                register_node(&mut pending, &params, signer, *stake, address, models)?;
            }
            TxBody::Unstake { amount } => unstake(&mut pending, &params, ctx, signer, *amount)?,
            TxBody::PublishModel {
                model_id,
                name,
                version,
            } => publish_model(&mut pending, &params, ctx, signer, model_id, name, version)?,
            TxBody::ConfirmReplica { model_id } => confirm_replica(&mut pending, signer, model_id)?,
            TxBody::RequestInference {
                model_id,
                input,
                input_hash,
                k,
                max_fee,
                deadline,
            } => {
                if *k == 0 || *k > MAX_QUORUM {
                    return Err(invalid(format!("k must be 1 to {MAX_QUORUM}, not {k}")));
                }
                if *deadline <= ctx.height || *deadline - ctx.height > params.max_deadline_blocks {
                    return Err(invalid(format!(
                        "the deadline must be a height after {} and at most {} blocks ahead",
                        ctx.height, params.max_deadline_blocks
                    )));
                }
                if *max_fee < u64::from(*k) {
                    return Err(invalid("max_fee must pay each executor at least 1"));
                }
                if !pending.contains(&model_key(model_id)) {
                    return Err(TxError::UnknownModel(*model_id));
                }
                let hosts = eligible_hosts(&pending, &params, model_id)?;
                if hosts.len() < usize::from(*k) {
                    return Err(TxError::NotEnoughHosts {
                        model: *model_id,
                        needed: usize::from(*k),
                        hosts: hosts.len(),
                    });
                }
                let id = tx.id();
                pending.debit(&signer, *max_fee)?;
                let task = TaskRecord {
                    requester: signer,
                    model_id: *model_id,
                    input: input.clone(),
                    input_hash: *input_hash,
                    max_fee: *max_fee,
                    deadline: *deadline,
                    opened_at: ctx.height,
                    executors: draw(&hosts, usize::from(*k), &ctx.seed, id.as_bytes()),
                    receipts: Vec::new(),
                    status: TaskStatus::Open,
                };
                for executor in &task.executors {
                    pending.put_marker(assignment_key(executor, &id));
                }
                pending.put(task_key(&id), &task);
                pending.put_marker(deadline_key(*deadline, &id));
            }
            TxBody::SubmitReceipt { receipt } => submit_receipt(&mut pending, signer, receipt)?,
        }
        Ok(pending.into_writes())
    }

    /// Applies a whole block's transactions on a copy of the state; any refused transaction
    /// refuses the block. Returns the state after the block.
    pub fn execute_block(&self, ctx: &BlockContext, txs: &[SignedTransaction]) -> Result<Self, BlockError> {
        if txs.len() > self.params.max_block_txs as usize {
            return Err(BlockError::TooManyTransactions {
                count: txs.len(),
                limit: self.params.max_block_txs as usize,
            });
        }
        let mut next = self.clone();
        next.begin_block(ctx).map_err(BlockError::Begin)?;
        for (index, tx) in txs.iter().enumerate() {
            next.apply(ctx, tx)
                .map_err(|error| BlockError::Transaction { index, error })?;
        }
        Ok(next)
    }

    /// Builds a block from `candidates` in order, keeping those that apply (up to the block
    /// limit) and returning the refused ones with their reasons.
    pub fn build_block(
        &self,
        ctx: &BlockContext,
        candidates: Vec<SignedTransaction>,
    ) -> Result<BuiltBlock, BlockError> {
        let mut next = self.clone();
        next.begin_block(ctx).map_err(BlockError::Begin)?;
        let mut included = Vec::new();
        let mut refused = Vec::new();
        // Room for the header and the list's length; transactions fill the rest.
        let mut block_bytes = 1024;
        for tx in candidates {
            if included.len() >= self.params.max_block_txs as usize {
                break;
            }
            let tx_bytes = tx.encode().len() + 8;
            if block_bytes + tx_bytes > MAX_BLOCK_BYTES {
                break;
            }
            match next.apply(ctx, &tx) {
                Ok(()) => {
                    block_bytes += tx_bytes;
                    included.push(tx);
                }
                Err(error) => refused.push((tx, error)),
            }
        }
        Ok(BuiltBlock {
            ledger: next,
            included,
            refused,
        })
    }
}

/// A block a proposer built: the state after it, what went in, what was refused.
#[derive(Debug)]
pub struct BuiltBlock {
    /// The state after the block.
    pub ledger: Ledger,
    /// The transactions in the block, in order.
    pub included: Vec<SignedTransaction>,
    /// The candidates refused, with why.
    pub refused: Vec<(SignedTransaction, TxError)>,
}

/// Why a saved state could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes are not a state snapshot.
    #[error("malformed state snapshot: {0}")]
    Malformed(&'static str),
    /// The entries give another state root than the one recorded beside them.
    #[error("state snapshot gives root {found}, expected {expected}")]
    Root {
        /// The root the snapshot should give.
        expected: Digest,
        /// The root it gives.
        found: Digest,
    },
}

/// Why a block does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The block-start work failed (corrupt state).
    #[error("block start: {0}")]
    Begin(TxError),
    /// A transaction in the block is refused.
    #[error("transaction {index} in the block is refused: {error}")]
    Transaction {
        /// Its position in the block.
        index: usize,
        /// Why.
        error: TxError,
    },
    /// More transactions than a block may hold.
    #[error("block carries {count} transactions, more than the limit of {limit}")]
    TooManyTransactions {
        /// How many it carries.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

fn eligible_hosts(pending: &Pending<'_>, params: &Params, model: &ModelId) -> Result<Vec<PublicKey>, TxError> {
    let mut hosts = Vec::new();
    for key in pending.keys_with_prefix(&hosts_prefix(model)) {
        let node = PublicKey::from_bytes(key_tail::<32>(&key)?);
        if let Some(record) = pending.get::<NodeRecord>(&node_key(&node))?
            && record.stake >= params.min_stake
        {
            hosts.push(node);
        }
    }
    Ok(hosts)
}

fn register_node(
    pending: &mut Pending<'_>,
    params: &Params,
    signer: PublicKey,
    stake: u64,
    address: &str,
    models: &[ModelId],
) -> Result<(), TxError> {
    if address.is_empty() || address.len() > MAX_ADDRESS_BYTES {
        return Err(invalid(format!("a node address has 1 to {MAX_ADDRESS_BYTES} bytes")));
    }
    let mut node = pending.get::<NodeRecord>(&node_key(&signer))?.unwrap_or_default();
    pending.debit(&signer, stake)?;
    node.stake = node
        .stake
        .checked_add(stake)
        .ok_or_else(|| invalid("the stake would overflow"))?;
    if node.stake < params.min_stake {
        return Err(invalid(format!(
            "a node needs a stake of at least {}; it would have {}",
            params.min_stake, node.stake
        )));
    }
    node.address = address.to_string();
    for model in models {
        if !pending.contains(&model_key(model)) {
            return Err(TxError::UnknownModel(*model));
        }
        if !node.models.contains(model) {
            if node.models.len() >= MAX_MODELS_PER_NODE * 4 {
                return Err(invalid("the node serves too many models"));
            }
            node.models.push(*model);
        }
        pending.put_marker(host_key(model, &signer));
    }
    pending.put(node_key(&signer), &node);
    Ok(())
}

fn unstake(
    pending: &mut Pending<'_>,
    params: &Params,
    ctx: &BlockContext,
    signer: PublicKey,
    amount: u64,
) -> Result<(), TxError> {
    let mut node = pending
        .get::<NodeRecord>(&node_key(&signer))?
        .ok_or(TxError::NotANode(signer))?;
    if amount == 0 || amount > node.stake {
        return Err(invalid(format!("can unstake 1 to {} (the node's stake)", node.stake)));
    }
    if node.unbonding.len() >= MAX_UNBONDING_ENTRIES {
        return Err(invalid(format!(
            "at most {MAX_UNBONDING_ENTRIES} unbondings may be pending at once"
        )));
    }
    let release_height = ctx.height.saturating_add(params.unbonding_blocks.max(1));
    node.stake -= amount;
    node.unbonding.push(Unbonding { amount, release_height });
    pending.put(node_key(&signer), &node);
    pending.put_marker(unbonding_key(release_height, &signer));
    Ok(())
}

fn publish_model(
    pending: &mut Pending<'_>,
    params: &Params,
    ctx: &BlockContext,
    signer: PublicKey,
    model_id: &ModelId,
    name: &ModelName,
    version: &Version,
) -> Result<(), TxError> {
    if let Some(owner) = pending.get::<PublicKey>(&name_key(name))?
        && owner != signer
    {
        return Err(TxError::NameOwned {
            name: name.clone(),
            owner,
        });
    }
    if let Some(existing) = pending.get::<ModelId>(&version_key(name, version))? {
        return Err(TxError::VersionTaken {
            name: name.clone(),
            version: version.clone(),
            existing,
        });
    }
    if let Some(record) = pending.get::<ModelRecord>(&model_key(model_id))? {
        return Err(invalid(format!(
            "model {model_id} is already published as {}@{}",
            record.name, record.version
        )));
    }
    let mut candidates = Vec::new();
    for key in pending.keys_with_prefix(&[prefix::NODE]) {
        let node = PublicKey::from_bytes(key_tail::<32>(&key)?);
        if let Some(record) = pending.get::<NodeRecord>(&key)?
            && record.stake >= params.min_stake
        {
            candidates.push(node);
        }
    }
    let count = usize::from(params.replication).min(MAX_REPLICAS);
    let record = ModelRecord {
        name: name.clone(),
        version: version.clone(),
        publisher: signer,
        published_at: ctx.height,
        replicas: draw(&candidates, count, &ctx.seed, model_id.0.hash()),
        confirmed: Vec::new(),
    };
    for replica in &record.replicas {
        pending.put_marker(replica_duty_key(replica, model_id));
    }
    pending.put_marker(publication_key(ctx.height, model_id));
    pending.put(name_key(name), &signer);
    pending.put(version_key(name, version), model_id);
    pending.put(model_key(model_id), &record);
    Ok(())
}

fn confirm_replica(pending: &mut Pending<'_>, signer: PublicKey, model_id: &ModelId) -> Result<(), TxError> {
    let mut model = pending
        .get::<ModelRecord>(&model_key(model_id))?
        .ok_or(TxError::UnknownModel(*model_id))?;
    if !model.replicas.contains(&signer) {
        return Err(invalid(format!(
            "{signer} is not an assigned replica of model {model_id}"
        )));
    }
    if model.confirmed.contains(&signer) {
        return Err(invalid(format!(
            "{signer} already confirmed its replica of model {model_id}"
        )));
    }
    let mut node = pending
        .get::<NodeRecord>(&node_key(&signer))?
        .ok_or(TxError::NotANode(signer))?;
    if !node.models.contains(model_id) {
        if node.models.len() >= MAX_MODELS_PER_NODE * 4 {
            return Err(invalid("the node serves too many models"));
        }
        node.models.push(*model_id);
    }
    model.confirmed.push(signer);
    pending.delete(replica_duty_key(&signer, model_id));
    pending.put(node_key(&signer), &node);
    pending.put(model_key(model_id), &model);
    pending.put_marker(host_key(model_id, &signer));
    Ok(())
}

/// Drops what a closed task's executors still owed it.
fn release_assignments(pending: &mut Pending<'_>, task: &TaskRecord, id: &Digest) {
    for executor in &task.executors {
        if !task.receipts.iter().any(|receipt| receipt.body.executor == *executor) {
            pending.delete(assignment_key(executor, id));
        }
    }
}

fn submit_receipt(pending: &mut Pending<'_>, signer: PublicKey, receipt: &Receipt) -> Result<(), TxError> {
    let body = &receipt.body;
    if body.executor != signer {
        return Err(invalid("a receipt is submitted by its executor"));
    }
    if body.level != VerifyLevel::Quorum {
        return Err(invalid(format!(
            "a task's receipts have level quorum, not {}",
            body.level
        )));
    }
    receipt
        .check_signature()
        .map_err(|error| invalid(format!("receipt: {error}")))?;
    let id = body.request_hash;
    let mut task = pending
        .get::<TaskRecord>(&task_key(&id))?
        .ok_or(TxError::UnknownTask(id))?;
    if task.status != TaskStatus::Open {
        return Err(invalid(format!("task {id} is no longer open")));
    }
    if !task.executors.contains(&signer) {
        return Err(TxError::NotAssigned {
            task: id,
            executor: signer,
        });
    }
    if task.receipts.iter().any(|earlier| earlier.body.executor == signer) {
        return Err(invalid(format!("{signer} already submitted a receipt for task {id}")));
    }
    if body.model_id != task.model_id {
        return Err(invalid("the receipt names another model than the task"));
    }
    if body.input_hash != task.input_hash {
        return Err(invalid("the receipt's input hash differs from the task's"));
    }
    let agrees = |other: &Receipt| {
        other.body.output_hash == body.output_hash
            && other.body.trace_root == body.trace_root
            && other.body.plan_id == body.plan_id
    };
    let disagreement = task.receipts.iter().any(|earlier| !agrees(earlier));
    task.receipts.push(receipt.clone());
    pending.delete(assignment_key(&signer, &id));
    if disagreement {
        // The escrow stays locked for the dispute game.
        task.status = TaskStatus::Disputed;
        pending.delete(deadline_key(task.deadline, &id));
        release_assignments(pending, &task, &id);
    } else if task.receipts.len() == task.k() {
        task.status = TaskStatus::Finalized;
        pending.delete(deadline_key(task.deadline, &id));
        let k = task.k() as u64;
        let share = task.max_fee / k;
        for executor in task.executors.clone() {
            pending.credit(&executor, share)?;
        }
        pending.credit(&task.requester, task.max_fee - share * k)?;
    }
    pending.put(task_key(&id), &task);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_distinct_deterministic_and_seed_dependent() {
        let candidates: Vec<PublicKey> = (0u8..10).map(|i| PublicKey::from_bytes([i; 32])).collect();
        let seed = Digest::of("seed", b"1");
        let first = draw(&candidates, 4, &seed, b"task");
        assert_eq!(first, draw(&candidates, 4, &seed, b"task"));
        let mut unique = first.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 4);
        let others: Vec<_> = (0..20)
            .map(|i| draw(&candidates, 4, &Digest::of("seed", &[i]), b"task"))
            .collect();
        assert!(others.iter().any(|other| *other != first));
        assert_eq!(draw(&candidates, 20, &seed, b"task").len(), 10);
    }

    #[test]
    fn prefix_end_bounds_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(&[1, 255]), vec![2]);
        assert_eq!(prefix_end(&[255, 255]), vec![255, 255, 255]);
    }
}
