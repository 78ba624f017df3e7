//! Blocks: an ordered batch of transactions and the state root after applying them.

use bytes::BufMut;
use serde::{Deserialize, Serialize};
use vouch_codec::{Buf, CanonicalError, Error as CodecError, ReadExt, Write, decode_canonical, read_vec, read_whole};
use vouch_crypto::{Digest, PublicKey};

use crate::exec::BlockContext;
use crate::tx::SignedTransaction;

/// The domain of a block's digest.
pub const BLOCK_DOMAIN: &str = "vouch block";
/// The domain of the hash of a block's transactions.
pub const TXS_DOMAIN: &str = "vouch block transactions";
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

    /// The block's header: its fields with the transactions replaced by their hash.
    pub fn header(&self) -> BlockHeader {
        self.header_and_size().0
    }

    /// The header and the length of the block's canonical encoding, from one encoding of the
    /// transactions.
    pub fn header_and_size(&self) -> (BlockHeader, usize) {
        let mut txs = Vec::with_capacity(8 + self.txs.len() * 192);
        self.txs.len().write(&mut txs);
        for tx in &self.txs {
            tx.write(&mut txs);
        }
        let header = BlockHeader {
            parent: self.parent,
            height: self.height,
            proposer: self.proposer,
            state_root: self.state_root,
            txs_hash: Digest::of(TXS_DOMAIN, &txs),
        };
        // parent, height, proposer and state root, then the transactions.
        (header, 32 + 8 + 32 + 32 + txs.len())
    }

    /// The block's digest: what consensus orders and finalization certificates sign. It is the
    /// digest of the header, so a light client checks a state root against a certificate
    /// without the transactions.
    pub fn digest(&self) -> Digest {
        self.header().digest()
    }
}

/// What a block's digest covers: everything but the transactions, which it covers by their
/// hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    /// The digest of the block it extends (zero for the genesis block).
    pub parent: Digest,
    /// Its height.
    pub height: u64,
    /// The validator that proposed it.
    pub proposer: PublicKey,
    /// The state root after applying it.
    pub state_root: Digest,
    /// `H("vouch block transactions", count ‖ transactions)` over their canonical encodings.
    pub txs_hash: Digest,
}

impl BlockHeader {
    /// The block's digest.
    pub fn digest(&self) -> Digest {
        let mut message = Vec::with_capacity(136);
        self.parent.write(&mut message);
        self.height.write(&mut message);
        self.proposer.write(&mut message);
        self.state_root.write(&mut message);
        self.txs_hash.write(&mut message);
        Digest::of(BLOCK_DOMAIN, &message)
    }
}

#[cfg(test)]
mod tests {
    use vouch_crypto::SecretKey;

    use super::*;
    use crate::tx::{Transaction, TxBody};

    fn transfer(key: &SecretKey, nonce: u64, amount: u64) -> SignedTransaction {
        Transaction {
            signer: key.public_key(),
            nonce,
            fee: 1,
            body: TxBody::Transfer {
                to: key.public_key(),
                amount,
            },
        }
        .sign(key, &Digest::of("chain", b"test"))
    }

    #[test]
    fn the_header_commits_to_every_field_and_the_transactions() {
        let key = SecretKey::from_seed([7; 32]);
        let block = Block {
            parent: Digest::of("parent", b""),
            height: 9,
            proposer: key.public_key(),
            state_root: Digest::of("root", b""),
            txs: vec![transfer(&key, 0, 5), transfer(&key, 1, 6)],
        };
        let (header, size) = block.header_and_size();
        assert_eq!(size, block.encode().len());
        assert_eq!(header.digest(), block.digest());
        assert_eq!(header.state_root, block.state_root);

        let mut other_tx = block.clone();
        other_tx.txs[1] = transfer(&key, 1, 7);
        let mut fewer = block.clone();
        fewer.txs.pop();
        let mut other_root = block.clone();
        other_root.state_root = Digest::of("root", b"other");
        let mut other_height = block.clone();
        other_height.height += 1;
        for changed in [other_tx, fewer, other_root, other_height] {
            assert_ne!(changed.digest(), block.digest());
        }
    }
}
