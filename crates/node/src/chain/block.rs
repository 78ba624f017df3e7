//! The ledger's block as commonware consensus and marshal see it.

use bytes::BufMut;
use commonware_codec::{Buf, EncodeSize, Error as CodecError, Read, Write};
use commonware_consensus::types::Height;
use commonware_consensus::{BoundedBlock, Heightable};
use commonware_cryptography::Digestible;
use commonware_cryptography::blake3::Digest as ChainDigest;
use vouch_crypto::Digest;
use vouch_ledger::{Block, MAX_BLOCK_BYTES};

/// Converts a Vouch digest to the digest type consensus orders.
pub fn to_chain_digest(digest: &Digest) -> ChainDigest {
    ChainDigest(*digest.as_bytes())
}

/// Converts a consensus digest back to a Vouch digest.
pub fn from_chain_digest(digest: &ChainDigest) -> Digest {
    Digest::from_bytes(digest.0)
}

/// A ledger block with its digest and encoded size worked out once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBlock {
    block: Block,
    digest: ChainDigest,
    encoded_len: usize,
}

impl ChainBlock {
    /// Wraps a ledger block.
    pub fn new(block: Block) -> Self {
        let (header, encoded_len) = block.header_and_size();
        Self {
            digest: to_chain_digest(&header.digest()),
            block,
            encoded_len,
        }
    }

    /// The ledger block.
    pub fn block(&self) -> &Block {
        &self.block
    }
}

impl Write for ChainBlock {
    fn write(&self, buf: &mut impl BufMut) {
        self.block.write(buf);
    }
}

impl EncodeSize for ChainBlock {
    fn encode_size(&self) -> usize {
        self.encoded_len
    }
}

impl Read for ChainBlock {
    type Cfg = ();

    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        // Every field and list in a block has its own bound; the network's message limit bounds
        // the whole.
        Block::read(buf).map(Self::new)
    }
}

impl Digestible for ChainBlock {
    type Digest = ChainDigest;

    fn digest(&self) -> ChainDigest {
        self.digest
    }
}

impl Heightable for ChainBlock {
    fn height(&self) -> Height {
        Height::new(self.block.height)
    }
}

impl commonware_consensus::Block for ChainBlock {
    fn parent(&self) -> ChainDigest {
        to_chain_digest(&self.block.parent)
    }
}

impl BoundedBlock for ChainBlock {
    fn max_encode_size(_: &()) -> usize {
        MAX_BLOCK_BYTES
    }
}
