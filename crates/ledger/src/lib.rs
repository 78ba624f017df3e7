//! The replicated state machine every validator runs: accounts, stakes, nodes, models, quorum
//! inference tasks, and the authenticated state whose root each block commits to.

pub mod block;
mod exec;
pub mod genesis;
pub mod merkle;
pub mod state;
pub mod tx;

pub use block::{Block, BlockDecodeError, BlockHeader, MAX_BLOCK_BYTES, block_seed};
pub use exec::{BlockContext, BlockError, BuiltBlock, Ledger, SnapshotError, TxError};
pub use genesis::{Genesis, GenesisAccount, GenesisError, GenesisValidator, Params};
pub use merkle::{ProofError, StateProof};
pub use tx::{InputRef, SignedTransaction, Transaction, TxBody, TxDecodeError};

/// Serde for byte strings as lower-case hex, as the ledger's JSON writes them.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the bytes as hex.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&hex::encode(bytes))
    }

    /// Reads hex back into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        hex::decode(text.as_ref()).map_err(serde::de::Error::custom)
    }
}
