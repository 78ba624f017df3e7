//! Receipts: what a node signs about one inference it ran.
//!
//! Layout (commonware-codec, fixed-size fields):
//!
//! ```text
//! format_version u8 (= 1) | request_hash 32B | model_id 32B | level u8 (0 none, 1 reexec)
//! | [reexec: plan_id 32B] | input_hash 32B | output_hash 32B | [reexec: trace_root 32B]
//! | executor 32B | signature 64B
//! ```
//!
//! The signature covers every byte before it, under the `"receipt"` domain. A receipt at level
//! `none` comes from the float path and binds the node to its answer; one at level `reexec` also
//! names the exact plan and the trace root, so anyone holding the inputs can re-execute and check.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vouch_codec::{CanonicalError, Error as CodecError, ReadExt, Write, decode_canonical};
use vouch_crypto::{CryptoError, Digest, PublicKey, SecretKey, Signature};

use crate::ids::{BlobId, ModelId};

/// The signature domain of receipts.
pub const RECEIPT_DOMAIN: &str = "receipt";
/// The receipt encoding this code writes.
pub const RECEIPT_FORMAT_VERSION: u8 = 1;
/// The hash domain of inference requests.
pub const REQUEST_DOMAIN: &str = "infer request";

/// How an answer is checked before the client accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyLevel {
    /// Trust the node: it may answer from the float path.
    None,
    /// The node runs the exact plan; the client re-executes it and compares bit for bit.
    Reexec,
    /// K staked nodes drawn by the ledger run the exact plan; the answer stands when their
    /// receipts agree bit for bit.
    Quorum,
}

impl VerifyLevel {
    /// The level's byte in canonical encodings.
    pub fn tag(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Reexec => 1,
            Self::Quorum => 2,
        }
    }
}

impl fmt::Display for VerifyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Reexec => "reexec",
            Self::Quorum => "quorum",
        })
    }
}

impl FromStr for VerifyLevel {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(Self::None),
            "reexec" => Ok(Self::Reexec),
            "quorum" => Ok(Self::Quorum),
            other => Err(format!(
                "unknown verification level '{other}' (expected none, reexec or quorum)"
            )),
        }
    }
}

/// The hash that ties a receipt to one request: the model, the inputs, the level and the
/// requester's nonce.
pub fn request_hash(model_id: &ModelId, input_hash: &Digest, level: VerifyLevel, nonce: u64) -> Digest {
    let mut message = Vec::with_capacity(80);
    model_id.0.write(&mut message);
    input_hash.write(&mut message);
    level.tag().write(&mut message);
    nonce.write(&mut message);
    Digest::of(REQUEST_DOMAIN, &message)
}

/// What the exact path adds to a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactClaim {
    /// The plan that ran.
    pub plan_id: BlobId,
    /// The Merkle root over every value the plan computed.
    pub trace_root: Digest,
}

/// What a node signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// [`request_hash`] of the request this answers.
    pub request_hash: Digest,
    /// The model that ran.
    pub model_id: ModelId,
    /// The level the request asked for.
    pub level: VerifyLevel,
    /// The plan that ran (level `reexec` only).
    pub plan_id: Option<BlobId>,
    /// The hash of the inputs, named as the model names them, in the model's order.
    pub input_hash: Digest,
    /// The hash of the outputs the node returned.
    pub output_hash: Digest,
    /// The trace root of the exact run (level `reexec` only).
    pub trace_root: Option<Digest>,
    /// The node that ran it.
    pub executor: PublicKey,
}

/// A receipt: a node's signed statement that it ran a model on some inputs and got some outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The signed content.
    #[serde(flatten)]
    pub body: ReceiptBody,
    /// The executor's signature over the body's encoding.
    pub signature: Signature,
}

/// Why a receipt was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// Does not decode, or is not canonical.
    #[error("malformed receipt: {0}")]
    Malformed(#[from] CanonicalError),
    /// Plan id and trace root must be present exactly at level `reexec`.
    #[error("invalid receipt: {0}")]
    Invalid(&'static str),
    /// The signature does not verify against the executor key.
    #[error("receipt signature does not verify against its executor key: {0}")]
    Signature(#[from] CryptoError),
}

impl ReceiptBody {
    /// The exact claim, when the body is consistent about it.
    pub fn exact(&self) -> Result<Option<ExactClaim>, ReceiptError> {
        match (self.level, self.plan_id, self.trace_root) {
            (VerifyLevel::None, None, None) => Ok(None),
            (VerifyLevel::Reexec | VerifyLevel::Quorum, Some(plan_id), Some(trace_root)) => {
                Ok(Some(ExactClaim { plan_id, trace_root }))
            }
            (VerifyLevel::None, _, _) => Err(ReceiptError::Invalid(
                "a level-none receipt names no plan or trace root",
            )),
            (VerifyLevel::Reexec | VerifyLevel::Quorum, _, _) => Err(ReceiptError::Invalid(
                "an exact (reexec or quorum) receipt needs a plan id and a trace root",
            )),
        }
    }

    /// The canonical encoding that the executor signs.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256);
        RECEIPT_FORMAT_VERSION.write(&mut buf);
        self.request_hash.write(&mut buf);
        self.model_id.0.write(&mut buf);
        self.level.tag().write(&mut buf);
        if let Some(plan_id) = &self.plan_id {
            plan_id.write(&mut buf);
        }
        self.input_hash.write(&mut buf);
        self.output_hash.write(&mut buf);
        if let Some(trace_root) = &self.trace_root {
            trace_root.write(&mut buf);
        }
        self.executor.write(&mut buf);
        buf
    }

    /// Signs the body with the executor's key.
    pub fn sign(self, key: &SecretKey) -> Result<Receipt, ReceiptError> {
        self.exact()?;
        if key.public_key() != self.executor {
            return Err(ReceiptError::Invalid("the signing key is not the receipt's executor"));
        }
        let signature = key.sign(RECEIPT_DOMAIN, &self.encode());
        Ok(Receipt { body: self, signature })
    }
}

impl Receipt {
    /// The canonical encoding: the signed body, then the signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = self.body.encode();
        self.signature.write(&mut buf);
        buf
    }

    /// Checks that the receipt is consistent and signed by its executor.
    pub fn check_signature(&self) -> Result<(), ReceiptError> {
        self.body.exact()?;
        self.body
            .executor
            .verify(RECEIPT_DOMAIN, &self.body.encode(), &self.signature)?;
        Ok(())
    }

    /// Decodes a receipt's canonical encoding and checks its signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let receipt = Self::decode_unverified(bytes)?;
        receipt.check_signature()?;
        Ok(receipt)
    }

    /// Decodes a receipt's canonical encoding without checking its signature: for receipts
    /// whose signature was checked before they were stored, or that a caller checks later.
    pub fn decode_unverified(bytes: &[u8]) -> Result<Self, ReceiptError> {
        Ok(decode_canonical(
            bytes,
            |b| Self::read(Bytes::copy_from_slice(b)),
            Self::encode,
        )?)
    }

    fn read(mut buf: Bytes) -> Result<Self, CodecError> {
        if u8::read(&mut buf)? != RECEIPT_FORMAT_VERSION {
            return Err(CodecError::Invalid("receipt", "unknown format version"));
        }
        let request_hash = Digest::read(&mut buf)?;
        let model_id = ModelId(BlobId::read(&mut buf)?);
        let level = match u8::read(&mut buf)? {
            0 => VerifyLevel::None,
            1 => VerifyLevel::Reexec,
            2 => VerifyLevel::Quorum,
            other => return Err(CodecError::InvalidEnum(other)),
        };
        let exact = level != VerifyLevel::None;
        let plan_id = if exact { Some(BlobId::read(&mut buf)?) } else { None };
        let input_hash = Digest::read(&mut buf)?;
        let output_hash = Digest::read(&mut buf)?;
        let trace_root = if exact { Some(Digest::read(&mut buf)?) } else { None };
        let executor = PublicKey::read(&mut buf)?;
        let signature = Signature::read(&mut buf)?;
        if bytes::Buf::has_remaining(&buf) {
            return Err(CodecError::ExtraData(bytes::Buf::remaining(&buf)));
        }
        Ok(Self {
            body: ReceiptBody {
                request_hash,
                model_id,
                level,
                plan_id,
                input_hash,
                output_hash,
                trace_root,
                executor,
            },
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: &SecretKey, level: VerifyLevel) -> ReceiptBody {
        let model_id = ModelId(BlobId::of(b"manifest"));
        let input_hash = Digest::of("tensors", b"inputs");
        let exact = level == VerifyLevel::Reexec;
        ReceiptBody {
            request_hash: request_hash(&model_id, &input_hash, level, 7),
            model_id,
            level,
            plan_id: exact.then(|| BlobId::of(b"plan")),
            input_hash,
            output_hash: Digest::of("tensors", b"outputs"),
            trace_root: exact.then(|| Digest::of("trace root", b"root")),
            executor: key.public_key(),
        }
    }

    #[test]
    fn receipts_round_trip_in_bytes_and_json() {
        let key = SecretKey::from_seed([4; 32]);
        for level in [VerifyLevel::None, VerifyLevel::Reexec] {
            let receipt = sample(&key, level).sign(&key).expect("sign");
            let decoded = Receipt::decode(&receipt.encode()).expect("decodes");
            assert_eq!(decoded, receipt);
            let json = serde_json::to_string(&receipt).expect("json");
            let parsed: Receipt = serde_json::from_str(&json).expect("parses");
            assert_eq!(parsed, receipt);
            parsed.check_signature().expect("signature");
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let key = SecretKey::from_seed([4; 32]);
        let bytes = sample(&key, VerifyLevel::Reexec).sign(&key).expect("sign").encode();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x10;
            assert!(Receipt::decode(&tampered).is_err(), "byte {i} flipped was accepted");
        }
    }

    #[test]
    fn inconsistent_levels_are_refused() {
        let key = SecretKey::from_seed([4; 32]);
        let mut body = sample(&key, VerifyLevel::Reexec);
        body.trace_root = None;
        assert!(matches!(body.sign(&key), Err(ReceiptError::Invalid(_))));
        let mut body = sample(&key, VerifyLevel::None);
        body.plan_id = Some(BlobId::of(b"plan"));
        assert!(matches!(body.sign(&key), Err(ReceiptError::Invalid(_))));
    }

    #[test]
    fn the_request_hash_binds_every_field() {
        let model = ModelId(BlobId::of(b"m"));
        let other_model = ModelId(BlobId::of(b"n"));
        let inputs = Digest::of("tensors", b"x");
        let base = request_hash(&model, &inputs, VerifyLevel::Reexec, 1);
        assert_ne!(base, request_hash(&other_model, &inputs, VerifyLevel::Reexec, 1));
        assert_ne!(
            base,
            request_hash(&model, &Digest::of("tensors", b"y"), VerifyLevel::Reexec, 1)
        );
        assert_ne!(base, request_hash(&model, &inputs, VerifyLevel::None, 1));
        assert_ne!(base, request_hash(&model, &inputs, VerifyLevel::Reexec, 2));
    }
}
