//! The records the ledger keeps, their keys in the authenticated map, and their encodings.

use bytes::BufMut;
use serde::{Deserialize, Serialize};
use vouch_codec::{Buf, Error as CodecError, ReadExt, Write, read_str, read_vec, read_whole, write_str, write_vec};
use vouch_crypto::{Digest, PublicKey};
use vouch_types::receipt::Receipt;
use vouch_types::{BlobId, ModelId, ModelName, Version};

use crate::tx::{
    InputRef, MAX_ADDRESS_BYTES, MAX_MODELS_PER_NODE, MAX_QUORUM, MAX_RECEIPT_BYTES, read_input, write_input,
};

/// The most unbonding entries one node may have at once.
pub const MAX_UNBONDING_ENTRIES: usize = 16;
/// The most replicas one model is assigned.
pub const MAX_REPLICAS: usize = 16;

/// The first byte of every key says which kind of record it holds.
pub mod prefix {
    /// `a` + public key → [`super::Account`].
    pub const ACCOUNT: u8 = b'a';
    /// `n` + public key → [`super::NodeRecord`].
    pub const NODE: u8 = b'n';
    /// `m` + model id → [`super::ModelRecord`].
    pub const MODEL: u8 = b'm';
    /// `p` + name → the publisher's public key.
    pub const NAME: u8 = b'p';
    /// `v` + name + `@` + version → the model id.
    pub const VERSION: u8 = b'v';
    /// `h` + model id + public key → empty: the node hosts the model.
    pub const HOST: u8 = b'h';
    /// `t` + task id → [`super::TaskRecord`].
    pub const TASK: u8 = b't';
    /// `d` + deadline (8 bytes, big-endian) + task id → empty: an open task's deadline.
    pub const DEADLINE: u8 = b'd';
    /// `u` + release height (8 bytes, big-endian) + public key → empty: stake unbonding.
    pub const UNBONDING: u8 = b'u';
    /// `x` + executor public key + task id → empty: the executor owes the open task a receipt.
    pub const ASSIGNMENT: u8 = b'x';
    /// `r` + node public key + model id → empty: the node is an assigned replica of the model
    /// and has not confirmed it yet.
    pub const REPLICA_DUTY: u8 = b'r';
    /// `o` + height (8 bytes, big-endian) + model id → empty: the model was published in that
    /// block (publication order, for nodes that follow the registry).
    pub const PUBLICATION: u8 = b'o';
}

fn key_of(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![prefix];
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

/// The key of an account.
pub fn account_key(account: &PublicKey) -> Vec<u8> {
    key_of(prefix::ACCOUNT, &[account.as_bytes()])
}
/// The key of a node.
pub fn node_key(node: &PublicKey) -> Vec<u8> {
    key_of(prefix::NODE, &[node.as_bytes()])
}
/// The key of a model.
pub fn model_key(model: &ModelId) -> Vec<u8> {
    key_of(prefix::MODEL, &[model.0.hash()])
}
/// The key of a name's publisher.
pub fn name_key(name: &ModelName) -> Vec<u8> {
    key_of(prefix::NAME, &[name.as_str().as_bytes()])
}
/// The key of `name@version`.
pub fn version_key(name: &ModelName, version: &Version) -> Vec<u8> {
    key_of(
        prefix::VERSION,
        &[name.as_str().as_bytes(), b"@", version.as_str().as_bytes()],
    )
}
/// The key saying that `node` hosts `model`.
pub fn host_key(model: &ModelId, node: &PublicKey) -> Vec<u8> {
    key_of(prefix::HOST, &[model.0.hash(), node.as_bytes()])
}
/// The first key of the hosts of `model`.
pub fn hosts_prefix(model: &ModelId) -> Vec<u8> {
    key_of(prefix::HOST, &[model.0.hash()])
}
/// The key of a task.
pub fn task_key(task: &Digest) -> Vec<u8> {
    key_of(prefix::TASK, &[task.as_bytes()])
}
/// The key recording an open task's deadline.
pub fn deadline_key(deadline: u64, task: &Digest) -> Vec<u8> {
    key_of(prefix::DEADLINE, &[&deadline.to_be_bytes(), task.as_bytes()])
}
/// The key recording that `node` has stake released at `height`.
pub fn unbonding_key(height: u64, node: &PublicKey) -> Vec<u8> {
    key_of(prefix::UNBONDING, &[&height.to_be_bytes(), node.as_bytes()])
}

/// The key recording that `executor` owes `task` a receipt.
pub fn assignment_key(executor: &PublicKey, task: &Digest) -> Vec<u8> {
    key_of(prefix::ASSIGNMENT, &[executor.as_bytes(), task.as_bytes()])
}

/// The prefix of every assignment `executor` holds.
pub fn assignments_prefix(executor: &PublicKey) -> Vec<u8> {
    key_of(prefix::ASSIGNMENT, &[executor.as_bytes()])
}

/// The key recording that `node` must still confirm its replica of `model`.
pub fn replica_duty_key(node: &PublicKey, model: &ModelId) -> Vec<u8> {
    key_of(prefix::REPLICA_DUTY, &[node.as_bytes(), model.0.hash()])
}

/// The prefix of every replica `node` must still confirm.
pub fn replica_duties_prefix(node: &PublicKey) -> Vec<u8> {
    key_of(prefix::REPLICA_DUTY, &[node.as_bytes()])
}

/// The key recording that `model` was published at `height`.
pub fn publication_key(height: u64, model: &ModelId) -> Vec<u8> {
    key_of(prefix::PUBLICATION, &[&height.to_be_bytes(), model.0.hash()])
}

/// Encodes and decodes a record as the value stored under its key.
pub trait Record: Sized {
    /// Appends the canonical encoding.
    fn write_record(&self, buf: &mut impl BufMut);
    /// Reads the encoding written by [`Record::write_record`].
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError>;

    /// The canonical encoding.
    fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64);
        self.write_record(&mut buf);
        buf
    }

    /// Decodes a stored value; the whole value must be used.
    fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        read_whole(bytes, |buf| Self::read_record(buf))
    }
}

/// An account: what it holds and how many transactions it has sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Spendable balance.
    pub balance: u64,
    /// The nonce its next transaction must carry.
    pub nonce: u64,
}

impl Record for Account {
    fn write_record(&self, buf: &mut impl BufMut) {
        self.balance.write(buf);
        self.nonce.write(buf);
    }
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Ok(Self {
            balance: u64::read(buf)?,
            nonce: u64::read(buf)?,
        })
    }
}

/// Stake on its way back to the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbonding {
    /// How much.
    pub amount: u64,
    /// The height at whose start it returns to the balance.
    pub release_height: u64,
}

/// A registered node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Bonded stake: what the node risks.
    pub stake: u64,
    /// Where its HTTP API answers.
    pub address: String,
    /// The models it serves, declared or replicated.
    pub models: Vec<ModelId>,
    /// Stake leaving, oldest first.
    pub unbonding: Vec<Unbonding>,
}

impl Record for NodeRecord {
    fn write_record(&self, buf: &mut impl BufMut) {
        self.stake.write(buf);
        write_str(&self.address, buf);
        write_vec(&self.models, buf, |model, buf| model.0.write(buf));
        write_vec(&self.unbonding, buf, |entry, buf| {
            entry.amount.write(buf);
            entry.release_height.write(buf);
        });
    }
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Ok(Self {
            stake: u64::read(buf)?,
            address: read_str(buf, MAX_ADDRESS_BYTES, "node address")?,
            // Replication can add models beyond what one registration lists.
            models: read_vec(buf, MAX_MODELS_PER_NODE * 4, |buf| BlobId::read(buf).map(ModelId))?,
            unbonding: read_vec(buf, MAX_UNBONDING_ENTRIES, |buf| {
                Ok(Unbonding {
                    amount: u64::read(buf)?,
                    release_height: u64::read(buf)?,
                })
            })?,
        })
    }
}

/// A published model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Its name.
    pub name: ModelName,
    /// Its version.
    pub version: Version,
    /// Who published it.
    pub publisher: PublicKey,
    /// The height of the block that published it.
    pub published_at: u64,
    /// The nodes assigned to hold a replica.
    pub replicas: Vec<PublicKey>,
    /// The replicas that confirmed they hold it, in confirmation order.
    pub confirmed: Vec<PublicKey>,
}

/// Reads a model name written with `write_str`.
pub(crate) fn read_name(buf: &mut impl Buf) -> Result<ModelName, CodecError> {
    read_str(buf, vouch_types::MAX_NAME_BYTES, "model name")?
        .parse()
        .map_err(|_| CodecError::Invalid("model name", "not a valid model name"))
}

/// Reads a version written with `write_str`.
pub(crate) fn read_version(buf: &mut impl Buf) -> Result<Version, CodecError> {
    read_str(buf, vouch_types::MAX_VERSION_BYTES, "model version")?
        .parse()
        .map_err(|_| CodecError::Invalid("model version", "not a valid version"))
}

fn read_keys(buf: &mut impl Buf, max: usize) -> Result<Vec<PublicKey>, CodecError> {
    read_vec(buf, max, |buf| PublicKey::read(buf))
}

fn write_keys(keys: &[PublicKey], buf: &mut impl BufMut) {
    write_vec(keys, buf, |key, buf| key.write(buf));
}

impl Record for ModelRecord {
    fn write_record(&self, buf: &mut impl BufMut) {
        write_str(self.name.as_str(), buf);
        write_str(self.version.as_str(), buf);
        self.publisher.write(buf);
        self.published_at.write(buf);
        write_keys(&self.replicas, buf);
        write_keys(&self.confirmed, buf);
    }
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Ok(Self {
            name: read_name(buf)?,
            version: read_version(buf)?,
            publisher: PublicKey::read(buf)?,
            published_at: u64::read(buf)?,
            replicas: read_keys(buf, MAX_REPLICAS)?,
            confirmed: read_keys(buf, MAX_REPLICAS)?,
        })
    }
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for receipts.
    Open,
    /// Every executor's receipt agreed; the executors were paid.
    Finalized,
    /// The receipts disagree; the escrow stays locked for the dispute.
    Disputed,
    /// The deadline passed without every receipt; the escrow went back to the requester.
    Expired,
}

impl TaskStatus {
    fn tag(self) -> u8 {
        match self {
            Self::Open => 0,
            Self::Finalized => 1,
            Self::Disputed => 2,
            Self::Expired => 3,
        }
    }
}

/// A quorum inference task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Who asked and pays.
    pub requester: PublicKey,
    /// The model to run.
    pub model_id: ModelId,
    /// The input.
    pub input: InputRef,
    /// The hash every receipt must repeat.
    pub input_hash: Digest,
    /// The escrowed fee, split among the executors when the task finalizes.
    pub max_fee: u64,
    /// The last height at which receipts count.
    pub deadline: u64,
    /// The height of the block that opened it.
    pub opened_at: u64,
    /// The executors drawn for it.
    pub executors: Vec<PublicKey>,
    /// The receipts submitted so far, in submission order.
    pub receipts: Vec<Receipt>,
    /// Where it stands.
    pub status: TaskStatus,
}

impl TaskRecord {
    /// How many executors must agree.
    pub fn k(&self) -> usize {
        self.executors.len()
    }
}

impl Record for TaskRecord {
    fn write_record(&self, buf: &mut impl BufMut) {
        self.requester.write(buf);
        self.model_id.0.write(buf);
        write_input(&self.input, buf);
        self.input_hash.write(buf);
        self.max_fee.write(buf);
        self.deadline.write(buf);
        self.opened_at.write(buf);
        write_keys(&self.executors, buf);
        write_vec(&self.receipts, buf, |receipt, buf| receipt.encode().write(buf));
        self.status.tag().write(buf);
    }
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError> {
        use vouch_codec::ReadRangeExt;
        let requester = PublicKey::read(buf)?;
        let model_id = ModelId(BlobId::read(buf)?);
        let input = read_input(buf)?;
        Ok(Self {
            requester,
            model_id,
            input,
            input_hash: Digest::read(buf)?,
            max_fee: u64::read(buf)?,
            deadline: u64::read(buf)?,
            opened_at: u64::read(buf)?,
            executors: read_keys(buf, MAX_QUORUM as usize)?,
            receipts: read_vec(buf, MAX_QUORUM as usize, |buf| {
                // Stored receipts had their signatures checked when they were submitted.
                let bytes = Vec::<u8>::read_range(buf, 0..=MAX_RECEIPT_BYTES)?;
                Receipt::decode_unverified(&bytes).map_err(|_| CodecError::Invalid("receipt", "malformed"))
            })?,
            status: match u8::read(buf)? {
                0 => TaskStatus::Open,
                1 => TaskStatus::Finalized,
                2 => TaskStatus::Disputed,
                3 => TaskStatus::Expired,
                other => return Err(CodecError::InvalidEnum(other)),
            },
        })
    }
}

impl Record for PublicKey {
    fn write_record(&self, buf: &mut impl BufMut) {
        self.write(buf);
    }
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Self::read(buf)
    }
}

impl Record for ModelId {
    fn write_record(&self, buf: &mut impl BufMut) {
        self.0.write(buf);
    }
    fn read_record(buf: &mut impl Buf) -> Result<Self, CodecError> {
        BlobId::read(buf).map(ModelId)
    }
}
