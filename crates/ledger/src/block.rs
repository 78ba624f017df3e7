//! Blocks: an ordered batch of transactions and the state root after applying them.

use bytes::BufMut;
use vouch_codec::{Buf, CanonicalError, Error as CodecError, ReadExt, Write, decode_canonical, read_vec, read_whole};
use vouch_crypto::{Digest, PublicKey};

use crate::exec::BlockContext;
use crate::tx::SignedTransaction;

/// The domain of a block's digest.
pub const BLOCK_DOMAIN: &str = "vouch block";
/// The domain of a block's seed.
pub const SEED_DOMAIN: &str = "vouch block seed";
/// The largest encoded block accepted.
pub const MAX_BLOCK_BYTES: usize = 16 * 1024 * 1024;
/// The most transactions a block encoding may list (the chain's own limit may be lower).
pub const MAX_BLOCK_TXS_DECODED: usize = 65_536;

/// A block of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The digest of the block it extends (zero for the genesis block).
    pub parent: Digest,
    /// Its height; the genesis block is height 0.
    pub height: u64,
    /// The validator that proposed it.
    pub proposer: PublicKey,
    /// The state root after applying it.
    pub state_root: Digest,
    /// Its transactions, in order.
    pub txs: Vec<SignedTransaction>,
}

/// Why a block's bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum BlockDecodeError {
    /// Larger than [`MAX_BLOCK_BYTES`].
    #[error("block of {size} bytes exceeds the limit of {MAX_BLOCK_BYTES}")]
    TooLarge {
        /// The size offered.
        size: usize,
    },
    /// Does not decode, or is not canonical.
    #[error("malformed block: {0}")]
    Malformed(#[from] CanonicalError),
}

/// The randomness a block gives the draws made in it. It follows from the parent's digest and
/// the height, so every validator derives it alone.
pub fn block_seed(parent: &Digest, height: u64) -> Digest {
    let mut message = parent.as_bytes().to_vec();
    message.extend_from_slice(&height.to_be_bytes());
    Digest::of(SEED_DOMAIN, &message)
}

impl Block {
    /// The genesis block: height 0, no transactions, the genesis state root.
    pub fn genesis(state_root: Digest) -> Self {
        Self {
            parent: Digest::from_bytes([0; 32]),
            height: 0,
            proposer: PublicKey::from_bytes([0; 32]),
            state_root,
            txs: Vec::new(),
        }
    }

    /// What the block gives the transactions in it.
    pub fn context(&self) -> BlockContext {
        BlockContext {
            height: self.height,
            proposer: self.proposer,
            seed: block_seed(&self.parent, self.height),
        }
    }

    /// Appends the canonical encoding.
    pub fn write(&self, buf: &mut impl BufMut) {
        self.parent.write(buf);
        self.height.write(buf);
        self.proposer.write(buf);
        self.state_root.write(buf);
        self.txs.len().write(buf);
        for tx in &self.txs {
            tx.write(buf);
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128 + self.txs.len() * 192);
        self.write(&mut buf);
        buf
    }

    /// Reads a block (without the size check of [`Block::decode`]).
    pub fn read(buf: &mut impl Buf) -> Result<Self, CodecError> {
        Ok(Self {
            parent: Digest::read(buf)?,
            height: u64::read(buf)?,
            proposer: PublicKey::read(buf)?,
            state_root: Digest::read(buf)?,
            txs: read_vec(buf, MAX_BLOCK_TXS_DECODED, SignedTransaction::read)?,
        })
    }

    /// Decodes a block's canonical encoding. Transaction signatures are checked when the block
    /// is applied.
    pub fn decode(bytes: &[u8]) -> Result<Self, BlockDecodeError> {
        if bytes.len() > MAX_BLOCK_BYTES {
            return Err(BlockDecodeError::TooLarge { size: bytes.len() });
        }
        Ok(decode_canonical(bytes, |b| read_whole(b, Self::read), Self::encode)?)
    }

    /// The block's digest: what consensus orders.
    pub fn digest(&self) -> Digest {
        Self::digest_of_encoding(&self.encode())
    }

    /// The digest of a block from its canonical encoding, for callers that hold it already.
    pub fn digest_of_encoding(encoded: &[u8]) -> Digest {
        Digest::of(BLOCK_DOMAIN, encoded)
    }
}
