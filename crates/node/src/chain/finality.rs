//! Finality proofs a client checks alone: a finalized block's header, the simplex finalization
//! certificate that signs the block's digest, and a Merkle proof of a ledger record against the
//! header's state root, all checked against the validator set a genesis names. Pure functions:
//! no runtime, no network, no node to trust.

use commonware_codec::{Decode, Encode};
use commonware_consensus::simplex::types::Finalization;
use commonware_consensus::types::Epoch;
use commonware_cryptography::blake3::Digest as ChainDigest;
use commonware_cryptography::certificate::Verifier as _;
use commonware_parallel::Sequential;
use serde::{Deserialize, Serialize};
use vouch_crypto::Digest;
use vouch_ledger::state::{Record, TaskRecord, TaskStatus, task_key};
use vouch_ledger::{BlockHeader, Genesis, ProofError, StateProof};
use vouch_tensor::{NamedTensor, TensorLimits, read_npz};
use vouch_types::VerifyLevel;
use vouch_verify::tensors_hash;

use super::Scheme;
use super::block::{from_chain_digest, to_chain_digest};
use super::validator::{namespace, participants};

/// The largest encoded finalization accepted: a proposal and up to 128 validators' signatures
/// with their indices fit well within it.
pub const MAX_FINALIZATION_BYTES: usize = 64 * 1024;

/// A finalized block, as a client checks it: the header and the certificate that finalizes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalityProof {
    /// The header of the finalized block; its digest is what the certificate signs.
    pub header: BlockHeader,
    /// commonware's encoding of the simplex finalization: the proposal (round, parent view,
    /// block digest) and the ed25519 signatures of at least 2f+1 validators, with their indices.
    #[serde(with = "vouch_ledger::hex_bytes")]
    pub finalization: Vec<u8>,
}

impl FinalityProof {
    /// Pairs a block's header with the finalization consensus produced for it.
    pub fn new(header: BlockHeader, finalization: &Finalization<Scheme, ChainDigest>) -> Self {
        Self {
            header,
            finalization: finalization.encode().to_vec(),
        }
    }
}

/// Why a finality proof does not hold.
#[derive(Debug, thiserror::Error)]
pub enum FinalityError {
    /// The genesis names a validator key consensus cannot use.
    #[error("the genesis cannot give a validator set: {0}")]
    Genesis(String),
    /// The proof is for another chain.
    #[error("the proof is for chain {proof}, the genesis is chain {genesis}")]
    OtherChain {
        /// The chain the proof names.
        proof: Digest,
        /// The chain of the genesis checked against.
        genesis: Digest,
    },
    /// The certificate is larger than [`MAX_FINALIZATION_BYTES`].
    #[error("the finalization certificate is {0} bytes; at most {MAX_FINALIZATION_BYTES} are accepted")]
    TooLarge(usize),
    /// The certificate does not decode.
    #[error("the finalization certificate does not decode: {0}")]
    Malformed(String),
    /// The certificate finalizes another block than the header describes.
    #[error("the certificate finalizes block {certified}, but the header is of block {header}")]
    OtherBlock {
        /// The digest the certificate signs.
        certified: Digest,
        /// The digest of the header given.
        header: Digest,
    },
    /// The certificate is from an epoch this chain never had.
    #[error("the certificate is from epoch {0}; this chain has only epoch 0")]
    Epoch(u64),
    /// The signatures are not a quorum of this chain's validators over this proposal.
    #[error("the finalization certificate is not signed by a quorum of the chain's validators")]
    Signatures,
    /// The Merkle proof does not lead to the block's state root.
    #[error("the state proof does not match the block's state root: {0}")]
    StateProof(#[from] ProofError),
    /// The state at that block holds no such record.
    #[error("the finalized state at height {height} holds no {what}")]
    Absent {
        /// What was looked for.
        what: String,
        /// The block's height.
        height: u64,
    },
    /// The proven bytes do not decode, or differ from the record the proof claims.
    #[error("the proven {what} differs from the one claimed")]
    RecordMismatch {
        /// What was proven.
        what: String,
    },
    /// The task did not finalize: its receipts disagree, are missing, or it expired.
    #[error("task {task} is {status:?}, not finalized")]
    NotFinalized {
        /// The task.
        task: Digest,
        /// Where it stands.
        status: TaskStatus,
    },
    /// The outputs served for a task do not decode as `.npz`.
    #[error("the task's outputs do not decode: {0}")]
    Outputs(String),
    /// The outputs served for a task are not the ones its receipts name.
    #[error("the outputs served hash to {computed}, but the executors agreed on {agreed}")]
    OutputHash {
        /// The hash of the outputs served.
        computed: Digest,
        /// The hash the receipts name.
        agreed: Digest,
    },
    /// A receipt of a finalized task does not hold up on its own.
    #[error("receipt {index} of task {task}: {reason}")]
    Receipt {
        /// The task.
        task: Digest,
        /// Which receipt, in submission order.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The validators of one chain, as a verifier of their certificates.
#[derive(Debug, Clone)]
pub struct ValidatorSet {
    chain_id: Digest,
    scheme: Scheme,
}

impl ValidatorSet {
    /// The validators `genesis` names, voting in the chain's namespace.
    pub fn from_genesis(genesis: &Genesis) -> Result<Self, FinalityError> {
        let participants = participants(genesis).map_err(|error| FinalityError::Genesis(error.to_string()))?;
        Ok(Self {
            chain_id: genesis.chain_id(),
            scheme: Scheme::verifier(&namespace(genesis), participants),
        })
    }

    /// The chain these validators finalize.
    pub fn chain_id(&self) -> &Digest {
        &self.chain_id
    }

    /// Checks that `proof`'s certificate finalizes the block its header describes.
    pub fn verify(&self, proof: &FinalityProof) -> Result<(), FinalityError> {
        if proof.finalization.len() > MAX_FINALIZATION_BYTES {
            return Err(FinalityError::TooLarge(proof.finalization.len()));
        }
        let finalization = Finalization::<Scheme, ChainDigest>::decode_cfg(
            bytes::Bytes::copy_from_slice(&proof.finalization),
            &self.scheme.certificate_codec_config(),
        )
        .map_err(|error| FinalityError::Malformed(error.to_string()))?;
        let header_digest = proof.header.digest();
        if finalization.proposal.payload != to_chain_digest(&header_digest) {
            return Err(FinalityError::OtherBlock {
                certified: from_chain_digest(&finalization.proposal.payload),
                header: header_digest,
            });
        }
        let epoch = finalization.proposal.round.epoch();
        if epoch != Epoch::zero() {
            return Err(FinalityError::Epoch(epoch.get()));
        }
        if !finalization.verify(&mut commonware_utils::sys_rng(), &self.scheme, &Sequential) {
            return Err(FinalityError::Signatures);
        }
        Ok(())
    }

    /// Checks `proof` and then that `state` proves the value under `key` in the finalized
    /// block's state; returns that value (`None`: proven absent).
    pub fn verify_value(
        &self,
        proof: &FinalityProof,
        key: &[u8],
        state: &StateProof,
    ) -> Result<Option<Vec<u8>>, FinalityError> {
        self.verify(proof)?;
        Ok(state.verify(&proof.header.state_root, key)?)
    }
}

/// A quorum task with everything a client needs to believe it: the task record (receipts
/// included), the finalized block whose state holds it, and the Merkle proof. This is the
/// receipt file `vouch infer --verify quorum --receipt` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProof {
    /// The chain.
    pub chain_id: Digest,
    /// The task: the id of the request transaction.
    pub task_id: Digest,
    /// The task's record in the proven state.
    pub task: TaskRecord,
    /// The finalized block whose state root the record is proven against.
    pub finality: FinalityProof,
    /// The Merkle proof of the record under the task's key.
    pub state_proof: StateProof,
}

/// What the executors of a finalized task agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The hash of the outputs every executor computed.
    pub output_hash: Digest,
    /// The trace root every executor computed.
    pub trace_root: Option<Digest>,
    /// The exact plan they ran.
    pub plan_id: Option<vouch_types::BlobId>,
}

impl TaskProof {
    /// Checks the certificate against `validators` and the task record against the certified
    /// state root.
    pub fn verify(&self, validators: &ValidatorSet) -> Result<(), FinalityError> {
        if self.chain_id != *validators.chain_id() {
            return Err(FinalityError::OtherChain {
                proof: self.chain_id,
                genesis: *validators.chain_id(),
            });
        }
        let what = || format!("task {}", self.task_id);
        let bytes = validators
            .verify_value(&self.finality, &task_key(&self.task_id), &self.state_proof)?
            .ok_or_else(|| FinalityError::Absent {
                what: what(),
                height: self.finality.header.height,
            })?;
        match TaskRecord::from_bytes(&bytes) {
            Ok(proven) if proven == self.task => Ok(()),
            _ => Err(FinalityError::RecordMismatch { what: what() }),
        }
    }

    /// Checks that the task finalized with `k` receipts that each hold up (signed by a distinct
    /// assigned executor, for this task, model and input) and agree; returns what they agree on.
    /// The ledger checked all of this before finalizing; a client checks it again because it
    /// costs little.
    pub fn agreement(&self) -> Result<Agreement, FinalityError> {
        let task = &self.task;
        if task.status != TaskStatus::Finalized {
            return Err(FinalityError::NotFinalized {
                task: self.task_id,
                status: task.status,
            });
        }
        let receipt_error = |index: usize, reason: String| FinalityError::Receipt {
            task: self.task_id,
            index,
            reason,
        };
        if task.receipts.len() != task.k() || task.k() == 0 {
            return Err(receipt_error(
                task.receipts.len(),
                format!("{} receipts for a quorum of {}", task.receipts.len(), task.k()),
            ));
        }
        let first = &task.receipts[0].body;
        let mut signers = std::collections::BTreeSet::new();
        for (index, receipt) in task.receipts.iter().enumerate() {
            let body = &receipt.body;
            receipt
                .check_signature()
                .map_err(|error| receipt_error(index, error.to_string()))?;
            let problem = if body.request_hash != self.task_id {
                Some("answers another task")
            } else if body.level != VerifyLevel::Quorum {
                Some("is not of level quorum")
            } else if body.model_id != task.model_id {
                Some("names another model")
            } else if body.input_hash != task.input_hash {
                Some("names another input")
            } else if !task.executors.contains(&body.executor) {
                Some("is signed by a node the task did not assign")
            } else if !signers.insert(body.executor) {
                Some("repeats an executor")
            } else if body.output_hash != first.output_hash
                || body.trace_root != first.trace_root
                || body.plan_id != first.plan_id
            {
                Some("disagrees with the first receipt")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(receipt_error(index, problem.to_string()));
            }
        }
        Ok(Agreement {
            output_hash: first.output_hash,
            trace_root: first.trace_root,
            plan_id: first.plan_id,
        })
    }
}

/// Decodes a task's outputs blob (an `.npz`, as executors keep it) and checks that it hashes to
/// `output_hash`, the hash a receipt names.
pub fn check_outputs(npz: &[u8], output_hash: &Digest) -> Result<Vec<NamedTensor>, FinalityError> {
    let outputs = read_npz(npz, &TensorLimits::default()).map_err(|error| FinalityError::Outputs(error.to_string()))?;
    let computed = tensors_hash(&outputs);
    if computed != *output_hash {
        return Err(FinalityError::OutputHash {
            computed,
            agreed: *output_hash,
        });
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use vouch_tensor::{Tensor, TensorData, write_npz};

    use super::*;

    #[test]
    fn outputs_are_accepted_only_under_the_hash_the_receipts_name() {
        let outputs = vec![NamedTensor {
            name: Some("logits".into()),
            tensor: Tensor::new(vec![1, 3], TensorData::F32(vec![0.5, -1.0, 2.0])).expect("tensor"),
        }];
        let npz = write_npz(&outputs).expect("npz");
        let hash = tensors_hash(&outputs);
        assert_eq!(check_outputs(&npz, &hash).expect("the agreed outputs"), outputs);
        let other = Digest::of("other", b"outputs");
        assert!(matches!(
            check_outputs(&npz, &other),
            Err(FinalityError::OutputHash { computed, agreed }) if computed == hash && agreed == other
        ));
        assert!(matches!(
            check_outputs(b"not an npz", &hash),
            Err(FinalityError::Outputs(_))
        ));
    }
}
