//! The genesis: the chain's parameters, its validators and the accounts funded at height 0.

use serde::{Deserialize, Serialize};
use vouch_crypto::{Digest, PublicKey};

/// The domain of the chain id (the hash of the genesis).
pub const CHAIN_ID_DOMAIN: &str = "vouch chain id";
/// The most validators a genesis may name.
pub const MAX_VALIDATORS: usize = 128;
/// The most accounts a genesis may fund.
pub const MAX_GENESIS_ACCOUNTS: usize = 10_000;

/// Rules every node applies identically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// The least fee a transaction may offer.
    pub min_fee: u64,
    /// The least stake that makes a node eligible to execute or replicate.
    pub min_stake: u64,
    /// How many blocks unstaked funds wait before they return to the balance.
    pub unbonding_blocks: u64,
    /// How many replicas each published model is assigned (fewer when fewer nodes are eligible).
    pub replication: u8,
    /// The furthest ahead a task's deadline may be, in blocks.
    pub max_deadline_blocks: u64,
    /// The most transactions one block may carry.
    pub max_block_txs: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            min_fee: 1,
            min_stake: 1_000,
            unbonding_blocks: 100,
            replication: 3,
            max_deadline_blocks: 10_000,
            max_block_txs: 4_096,
        }
    }
}

/// A validator named in the genesis: it orders blocks and is registered as a staked node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisValidator {
    /// Its identity (ed25519), used for consensus, p2p and its ledger account.
    pub public_key: PublicKey,
    /// Where its peer-to-peer endpoint listens (`host:port`).
    pub p2p_address: String,
    /// Where its HTTP API answers (`host:port`).
    pub api_address: String,
    /// The stake bonded at genesis.
    pub stake: u64,
}

/// An account funded at genesis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisAccount {
    /// The account.
    pub public_key: PublicKey,
    /// Its balance at height 0.
    pub balance: u64,
}

/// Everything a node needs to start the chain from height 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// A name that makes this chain's id differ from other chains with the same members.
    pub chain_name: String,
    /// The rules.
    pub params: Params,
    /// The validator set.
    pub validators: Vec<GenesisValidator>,
    /// Funded accounts.
    pub accounts: Vec<GenesisAccount>,
}

/// Why a genesis was refused.
#[derive(Debug, thiserror::Error)]
pub enum GenesisError {
    /// Not JSON of the expected shape.
    #[error("genesis is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Out of the limits or inconsistent.
    #[error("invalid genesis: {0}")]
    Invalid(String),
}

impl Genesis {
    /// Parses and checks a genesis file's JSON.
    pub fn from_json(text: &str) -> Result<Self, GenesisError> {
        let genesis: Self = serde_json::from_str(text)?;
        genesis.check()?;
        Ok(genesis)
    }

    /// The canonical JSON: fields in declaration order, pretty-printed as genesis files are.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| unreachable!("a genesis always serializes"))
    }

    /// Checks the limits and that every key appears once.
    pub fn check(&self) -> Result<(), GenesisError> {
        let invalid = |message: String| Err(GenesisError::Invalid(message));
        if self.validators.is_empty() || self.validators.len() > MAX_VALIDATORS {
            return invalid(format!(
                "needs 1 to {MAX_VALIDATORS} validators, has {}",
                self.validators.len()
            ));
        }
        if self.accounts.len() > MAX_GENESIS_ACCOUNTS {
            return invalid(format!("funds more than {MAX_GENESIS_ACCOUNTS} accounts"));
        }
        let mut validators = std::collections::BTreeSet::new();
        for validator in &self.validators {
            if !validators.insert(validator.public_key) {
                return invalid(format!("validator {} appears twice", validator.public_key));
            }
            if validator.stake < self.params.min_stake {
                return invalid(format!(
                    "validator {} stakes {} below the minimum {}",
                    validator.public_key, validator.stake, self.params.min_stake
                ));
            }
        }
        let mut accounts = std::collections::BTreeSet::new();
        for account in &self.accounts {
            if !accounts.insert(account.public_key) {
                return invalid(format!("account {} appears twice", account.public_key));
            }
        }
        if self.params.max_block_txs == 0 || self.params.replication == 0 {
            return invalid("max_block_txs and replication must be positive".into());
        }
        Ok(())
    }

    /// The chain id: the hash of the canonical JSON. Transactions are signed for one chain id.
    pub fn chain_id(&self) -> Digest {
        Digest::of(CHAIN_ID_DOMAIN, self.to_json().as_bytes())
    }
}
