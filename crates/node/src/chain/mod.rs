//! The chain: the ledger ordered by commonware's simplex consensus, with marshal delivering
//! finalized blocks.

pub mod app;
pub mod block;
pub mod executor;
pub mod finality;
pub mod persist;
pub mod service;
pub mod validator;

/// The signing scheme validators vote with: ed25519, attributable, 2f+1 of 3f+1.
pub type Scheme = commonware_consensus::simplex::scheme::ed25519::Scheme;
