//! Signed transactions: who sends them, in what order (the nonce), what they pay, and what they do.

use bytes::BufMut;
use serde::{Deserialize, Serialize};
use vouch_codec::{
    Buf, CanonicalError, Error as CodecError, ReadExt, Write, decode_canonical, read_str, read_vec, read_whole,
    write_str, write_vec,
};
use vouch_crypto::{Digest, PublicKey, SecretKey, Signature};
use vouch_types::receipt::Receipt;
use vouch_types::{BlobId, ModelId, ModelName, Version};

use crate::state::{read_name, read_version};

/// The domain under which transactions are signed.
pub const TX_DOMAIN: &str = "vouch transaction";
/// The domain of a transaction's id (and so of a task's id).
pub const TX_ID_DOMAIN: &str = "vouch transaction id";
/// The largest encoded transaction accepted anywhere.
pub const MAX_TX_BYTES: usize = 96 * 1024;
/// The largest input carried inside a request rather than as a blob.
pub const MAX_INLINE_INPUT_BYTES: usize = 64 * 1024;
/// The longest network address a node may register.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// The most models one registration may list.
pub const MAX_MODELS_PER_NODE: usize = 64;
/// The largest encoded receipt a transaction may carry.
pub const MAX_RECEIPT_BYTES: usize = 1024;
/// The most executors one quorum task may ask for.
pub const MAX_QUORUM: u8 = 16;

/// Where an inference request's input lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputRef {
    /// A blob on the nodes, fetched by id.
    Blob(BlobId),
    /// The input file's bytes (`.npy`, `.npz`, `.pb` or JSON), at most [`MAX_INLINE_INPUT_BYTES`].
    Inline(#[serde(with = "crate::hex_bytes")] Vec<u8>),
}

/// What a transaction does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TxBody {
    /// Moves `amount` from the signer to `to`.
    Transfer {
        /// The receiving account.
        to: PublicKey,
        /// How much moves.
        amount: u64,
    },
    /// Registers the signer as a node, or updates its registration: adds `stake` (moved from its
    /// balance), sets its address and the models it serves.
    RegisterNode {
        /// Added to the node's stake.
        stake: u64,
        /// Where the node's HTTP API answers (`host:port`).
        address: String,
        /// Published models the node serves.
        models: Vec<ModelId>,
    },
    /// Starts unbonding `amount` of the signer's stake; it returns to the balance after the
    /// unbonding delay.
    Unstake {
        /// How much stops being stake.
        amount: u64,
    },
    /// Publishes a model under `name@version`.
    PublishModel {
        /// The manifest's id.
        model_id: ModelId,
        /// The model's name.
        name: ModelName,
        /// The version published.
        version: Version,
    },
    /// A replica assigned to a model says it holds every blob of it.
    ConfirmReplica {
        /// The model replicated.
        model_id: ModelId,
    },
    /// Asks `k` staked nodes that host `model_id` to run it on an input.
    RequestInference {
        /// The model to run.
        model_id: ModelId,
        /// The input.
        input: InputRef,
        /// The hash of the input tensors as the model names them ([`vouch_types`]' input hash),
        /// which every receipt must repeat.
        input_hash: Digest,
        /// How many executors must agree.
        k: u8,
        /// The most the requester pays the executors, escrowed until the task ends.
        max_fee: u64,
        /// The last height at which receipts count; the escrow returns after it.
        deadline: u64,
    },
    /// An executor's receipt for a task it was assigned.
    SubmitReceipt {
        /// The receipt; its request hash is the task id.
        receipt: Receipt,
    },
}

/// A transaction before it is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The account that signs and pays.
    pub signer: PublicKey,
    /// The signer's transaction count so far: each nonce is used once, in order.
    pub nonce: u64,
    /// What the signer pays the block's proposer for including it.
    pub fee: u64,
    /// What it does.
    pub body: TxBody,
}

/// A transaction with its signer's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTransaction {
    /// The signed content.
    #[serde(flatten)]
    pub tx: Transaction,
    /// The signer's signature over the chain id and the transaction's encoding.
    pub signature: Signature,
}

/// Why a transaction's bytes or signature were refused.
#[derive(Debug, thiserror::Error)]
pub enum TxDecodeError {
    /// Larger than [`MAX_TX_BYTES`].
    #[error("transaction of {size} bytes exceeds the limit of {MAX_TX_BYTES}")]
    TooLarge {
        /// The size offered.
        size: usize,
    },
    /// Does not decode, or is not canonical.
    #[error("malformed transaction: {0}")]
    Malformed(#[from] CanonicalError),
    /// The signature does not verify against the signer for this chain.
    #[error("bad transaction signature: it does not verify against the signer's key for this chain")]
    BadSignature,
}

const TAG_TRANSFER: u8 = 0;
const TAG_REGISTER_NODE: u8 = 1;
const TAG_UNSTAKE: u8 = 2;
const TAG_PUBLISH_MODEL: u8 = 3;
const TAG_CONFIRM_REPLICA: u8 = 4;
const TAG_REQUEST_INFERENCE: u8 = 5;
const TAG_SUBMIT_RECEIPT: u8 = 6;
const INPUT_BLOB: u8 = 0;
const INPUT_INLINE: u8 = 1;

fn write_body(body: &TxBody, buf: &mut impl BufMut) {
    match body {
        TxBody::Transfer { to, amount } => {
            TAG_TRANSFER.write(buf);
            to.write(buf);
            amount.write(buf);
        }
        TxBody::RegisterNode { stake, address, models } => {
            TAG_REGISTER_NODE.write(buf);
            stake.write(buf);
            write_str(address, buf);
            write_vec(models, buf, |model, buf| model.0.write(buf));
        }
        TxBody::Unstake { amount } => {
            TAG_UNSTAKE.write(buf);
            amount.write(buf);
        }
        TxBody::PublishModel {
            model_id,
            name,
            version,
        } => {
            TAG_PUBLISH_MODEL.write(buf);
            model_id.0.write(buf);
            write_str(name.as_str(), buf);
            write_str(version.as_str(), buf);
        }
        TxBody::ConfirmReplica { model_id } => {
            TAG_CONFIRM_REPLICA.write(buf);
            model_id.0.write(buf);
        }
        TxBody::RequestInference {
            model_id,
            input,
            input_hash,
            k,
            max_fee,
            deadline,
        } => {
            TAG_REQUEST_INFERENCE.write(buf);
            model_id.0.write(buf);
            write_input(input, buf);
            input_hash.write(buf);
            k.write(buf);
            max_fee.write(buf);
            deadline.write(buf);
        }
        TxBody::SubmitReceipt { receipt } => {
            TAG_SUBMIT_RECEIPT.write(buf);
            receipt.encode().write(buf);
        }
    }
}

/// Writes where an input lives: a tag, then the blob id or the bytes.
pub(crate) fn write_input(input: &InputRef, buf: &mut impl BufMut) {
    match input {
        InputRef::Blob(blob) => {
            INPUT_BLOB.write(buf);
            blob.write(buf);
        }
        InputRef::Inline(bytes) => {
            INPUT_INLINE.write(buf);
            bytes.write(buf);
        }
    }
}

/// Reads what [`write_input`] wrote.
pub(crate) fn read_input(buf: &mut impl Buf) -> Result<InputRef, CodecError> {
    match u8::read(buf)? {
        INPUT_BLOB => Ok(InputRef::Blob(BlobId::read(buf)?)),
        INPUT_INLINE => Ok(InputRef::Inline(read_bytes(buf, MAX_INLINE_INPUT_BYTES)?)),
        other => Err(CodecError::InvalidEnum(other)),
    }
}

fn read_model_id(buf: &mut impl Buf) -> Result<ModelId, CodecError> {
    BlobId::read(buf).map(ModelId)
}

fn read_body(buf: &mut impl Buf) -> Result<TxBody, CodecError> {
    Ok(match u8::read(buf)? {
        TAG_TRANSFER => TxBody::Transfer {
            to: PublicKey::read(buf)?,
            amount: u64::read(buf)?,
        },
        TAG_REGISTER_NODE => TxBody::RegisterNode {
            stake: u64::read(buf)?,
            address: read_str(buf, MAX_ADDRESS_BYTES, "node address")?,
            models: read_vec(buf, MAX_MODELS_PER_NODE, read_model_id)?,
        },
        TAG_UNSTAKE => TxBody::Unstake {
            amount: u64::read(buf)?,
        },
        TAG_PUBLISH_MODEL => TxBody::PublishModel {
            model_id: read_model_id(buf)?,
            name: read_name(buf)?,
            version: read_version(buf)?,
        },
        TAG_CONFIRM_REPLICA => TxBody::ConfirmReplica {
            model_id: read_model_id(buf)?,
        },
        TAG_REQUEST_INFERENCE => TxBody::RequestInference {
            model_id: read_model_id(buf)?,
            input: read_input(buf)?,
            input_hash: Digest::read(buf)?,
            k: u8::read(buf)?,
            max_fee: u64::read(buf)?,
            deadline: u64::read(buf)?,
        },
        TAG_SUBMIT_RECEIPT => {
            let bytes = read_bytes(buf, MAX_RECEIPT_BYTES)?;
            let receipt =
                Receipt::decode(&bytes).map_err(|_| CodecError::Invalid("receipt", "malformed or unsigned"))?;
            TxBody::SubmitReceipt { receipt }
        }
        other => return Err(CodecError::InvalidEnum(other)),
    })
}

fn read_bytes(buf: &mut impl Buf, max_bytes: usize) -> Result<Vec<u8>, CodecError> {
    use vouch_codec::ReadRangeExt;
    Vec::<u8>::read_range(buf, 0..=max_bytes)
}

impl Transaction {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128);
        self.write(&mut buf);
        buf
    }

    fn write(&self, buf: &mut impl BufMut) {
        self.signer.write(buf);
        self.nonce.write(buf);
        self.fee.write(buf);
        write_body(&self.body, buf);
    }

    fn read(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Ok(Self {
            signer: PublicKey::read(buf)?,
            nonce: u64::read(buf)?,
            fee: u64::read(buf)?,
            body: read_body(buf)?,
        })
    }

    fn signed_message(&self, chain_id: &Digest) -> Vec<u8> {
        let mut message = chain_id.as_bytes().to_vec();
        self.write(&mut message);
        message
    }

    /// Signs the transaction for the chain `chain_id` with the signer's key.
    pub fn sign(self, key: &SecretKey, chain_id: &Digest) -> SignedTransaction {
        let signature = key.sign(TX_DOMAIN, &self.signed_message(chain_id));
        SignedTransaction { tx: self, signature }
    }
}

impl SignedTransaction {
    /// The canonical encoding: the transaction, then the signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(192);
        self.write(&mut buf);
        buf
    }

    /// Appends the canonical encoding to `buf`.
    pub fn write(&self, buf: &mut impl BufMut) {
        self.tx.write(buf);
        self.signature.write(buf);
    }

    /// Reads one transaction from `buf` (checks neither size nor signature).
    pub fn read(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Ok(Self {
            tx: Transaction::read(buf)?,
            signature: Signature::read(buf)?,
        })
    }

    /// Decodes a transaction's canonical encoding and checks its size and signature.
    pub fn decode(bytes: &[u8], chain_id: &Digest) -> Result<Self, TxDecodeError> {
        let tx = Self::decode_unverified(bytes)?;
        tx.check_signature(chain_id)?;
        Ok(tx)
    }

    /// Decodes a transaction's canonical encoding and checks its size, leaving the signature to
    /// the ledger, which checks it when the transaction is admitted or applied.
    pub fn decode_unverified(bytes: &[u8]) -> Result<Self, TxDecodeError> {
        if bytes.len() > MAX_TX_BYTES {
            return Err(TxDecodeError::TooLarge { size: bytes.len() });
        }
        Ok(decode_canonical(bytes, |b| read_whole(b, Self::read), Self::encode)?)
    }

    /// Checks the signature against the signer's key for the chain `chain_id`.
    pub fn check_signature(&self, chain_id: &Digest) -> Result<(), TxDecodeError> {
        self.tx
            .signer
            .verify(TX_DOMAIN, &self.tx.signed_message(chain_id), &self.signature)
            .map_err(|_| TxDecodeError::BadSignature)
    }

    /// The transaction's id: the hash of its signed encoding. A request's id is its task's id.
    pub fn id(&self) -> Digest {
        Digest::of(TX_ID_DOMAIN, &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain() -> Digest {
        Digest::of("test chain", b"")
    }

    fn sample_bodies() -> Vec<TxBody> {
        let model_id = ModelId(BlobId::of(b"manifest"));
        vec![
            TxBody::Transfer {
                to: SecretKey::from_seed([2; 32]).public_key(),
                amount: 5,
            },
            TxBody::RegisterNode {
                stake: 1000,
                address: "127.0.0.1:7070".into(),
                models: vec![model_id],
            },
            TxBody::Unstake { amount: 10 },
            TxBody::PublishModel {
                model_id,
                name: "demo/digits".parse().expect("name"),
                version: "1.0.0".parse().expect("version"),
            },
            TxBody::ConfirmReplica { model_id },
            TxBody::RequestInference {
                model_id,
                input: InputRef::Inline(vec![1, 2, 3]),
                input_hash: Digest::of("input", b""),
                k: 3,
                max_fee: 30,
                deadline: 100,
            },
        ]
    }

    #[test]
    fn every_body_round_trips_and_is_signed_for_one_chain() {
        let key = SecretKey::from_seed([1; 32]);
        for (nonce, body) in sample_bodies().into_iter().enumerate() {
            let tx = Transaction {
                signer: key.public_key(),
                nonce: nonce as u64,
                fee: 1,
                body,
            }
            .sign(&key, &chain());
            let bytes = tx.encode();
            assert_eq!(SignedTransaction::decode(&bytes, &chain()).expect("decodes"), tx);
            assert!(matches!(
                SignedTransaction::decode(&bytes, &Digest::of("other chain", b"")),
                Err(TxDecodeError::BadSignature)
            ));
            let json = serde_json::to_string(&tx).expect("json");
            assert_eq!(serde_json::from_str::<SignedTransaction>(&json).expect("from json"), tx);
        }
    }

    #[test]
    fn oversize_and_trailing_bytes_are_refused() {
        let key = SecretKey::from_seed([1; 32]);
        let tx = Transaction {
            signer: key.public_key(),
            nonce: 0,
            fee: 1,
            body: TxBody::Unstake { amount: 1 },
        }
        .sign(&key, &chain());
        let mut bytes = tx.encode();
        bytes.push(0);
        assert!(matches!(
            SignedTransaction::decode(&bytes, &chain()),
            Err(TxDecodeError::Malformed(_))
        ));
        assert!(matches!(
            SignedTransaction::decode(&vec![0; MAX_TX_BYTES + 1], &chain()),
            Err(TxDecodeError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SignedTransaction::decode(&bytes, &chain());
        }
    }
}
