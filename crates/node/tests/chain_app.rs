//! The ledger application alone: what it proposes, what it accepts as a block, how it rebuilds
//! a parent's state it never saw, and what its mempool admits.

use std::future::Future;

use commonware_codec::DecodeExt;
use commonware_consensus::Application;
use commonware_consensus::marshal::ancestry;
use commonware_consensus::simplex::types::Context;
use commonware_consensus::types::{Epoch, Round, View};
use commonware_cryptography::ed25519::{PrivateKey, PublicKey as ConsensusKey};
use commonware_cryptography::{Digested, Digestible, Signer};
use vouch_crypto::{Digest, SecretKey};
use vouch_ledger::{Block, Genesis, GenesisAccount, GenesisValidator, Params, Transaction, TxBody, TxError};
use vouch_node::chain::app::{LedgerApp, SubmitError, genesis_block};
use vouch_node::chain::block::{ChainBlock, from_chain_digest};

fn validator_seed() -> [u8; 32] {
    [200; 32]
}

fn user() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

fn genesis() -> Genesis {
    Genesis {
        chain_name: "app".into(),
        params: Params::default(),
        validators: vec![GenesisValidator {
            public_key: SecretKey::from_seed(validator_seed()).public_key(),
            p2p_address: "127.0.0.1:9000".into(),
            api_address: "127.0.0.1:7000".into(),
            stake: 10_000,
        }],
        accounts: vec![GenesisAccount {
            public_key: user().public_key(),
            balance: 1_000,
        }],
    }
}

fn leader() -> ConsensusKey {
    PrivateKey::decode(bytes::Bytes::copy_from_slice(&validator_seed()))
        .expect("32-byte seed")
        .public_key()
}

fn context(
    view: u64,
    parent: &Digested<ChainBlock>,
) -> ((), Context<commonware_cryptography::blake3::Digest, ConsensusKey>) {
    (
        (),
        Context {
            round: Round::new(Epoch::zero(), View::new(view)),
            leader: leader(),
            parent: (View::new(view - 1), parent.digest()),
        },
    )
}

fn transfer(nonce: u64, amount: u64) -> vouch_ledger::SignedTransaction {
    Transaction {
        signer: user().public_key(),
        nonce,
        fee: 1,
        body: TxBody::Transfer {
            to: SecretKey::from_seed([9; 32]).public_key(),
            amount,
        },
    }
    .sign(&user(), &genesis().chain_id())
}

fn app() -> LedgerApp {
    LedgerApp::new(&genesis(), SecretKey::from_seed(validator_seed()).public_key())
}

/// Proposes three blocks on top of each other, one transfer each.
async fn three_blocks(proposer: &mut LedgerApp) -> Vec<Digested<ChainBlock>> {
    let genesis_block = genesis_block(&genesis());
    let mut chain = vec![Digested::precomputed(genesis_block.clone(), genesis_block.digest())];
    for nonce in 0..3u64 {
        proposer.submit(transfer(nonce, 10)).expect("admitted");
        let newest_first: Vec<_> = chain.iter().rev().cloned().collect();
        let parent = newest_first[0].clone();
        let block = proposer
            .propose(context(nonce + 1, &parent), ancestry::from_iter(newest_first), ())
            .await
            .expect("proposes");
        // The mempool still holds the earlier transfers (nothing is finalized), but they are spent
        // in the parent's state, so each block carries only the new one.
        let nonces: Vec<u64> = block.inner().block().txs.iter().map(|tx| tx.tx.nonce).collect();
        assert_eq!(nonces, vec![nonce]);
        chain.push(block);
    }
    chain
}

fn run<F: Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}

#[test]
fn a_validator_that_missed_the_parents_replays_them_and_accepts_the_block() {
    run(async {
        let mut proposer = app();
        let chain = three_blocks(&mut proposer).await;
        let mut fresh = app();
        let newest_first: Vec<_> = chain.iter().rev().cloned().collect();
        assert!(
            fresh
                .verify(context(3, &chain[2]), ancestry::from_iter(newest_first))
                .await,
            "the block at height 3 verifies after replaying heights 1 and 2"
        );
    });
}

#[test]
fn blocks_with_a_wrong_root_or_proposer_are_refused() {
    run(async {
        let mut proposer = app();
        let chain = three_blocks(&mut proposer).await;
        let parent = chain[0].clone();
        let honest = chain[1].inner().block().clone();

        let wrong_root = ChainBlock::new(Block {
            state_root: Digest::of("not the root", b""),
            ..honest.clone()
        });
        let impostor = ChainBlock::new(Block {
            proposer: user().public_key(),
            ..honest.clone()
        });
        let unsigned = ChainBlock::new(Block {
            txs: vec![vouch_ledger::SignedTransaction {
                signature: transfer(1, 10).signature,
                ..transfer(0, 10)
            }],
            ..honest
        });
        for block in [wrong_root, impostor, unsigned] {
            let digest = block.digest();
            let ancestry = ancestry::from_iter([Digested::precomputed(block, digest), parent.clone()]);
            assert!(!app().verify(context(1, &parent), ancestry).await);
        }
    });
}

#[test]
fn the_mempool_refuses_duplicates_spent_nonces_and_unpayable_transfers() {
    let app = app();
    let first = transfer(0, 10);
    let id = app.submit(first.clone()).expect("admitted");
    assert_eq!(app.submit(first), Err(SubmitError::Duplicate(id)));
    assert!(matches!(
        app.submit(transfer(0, 5_000)),
        Err(SubmitError::Refused(TxError::InsufficientFunds { .. }))
    ));
    // A later nonce waits for its predecessors; its signature is still checked.
    app.submit(transfer(1, 10)).expect("admitted");
    let mut forged = transfer(2, 10);
    forged.signature = transfer(3, 10).signature;
    assert_eq!(app.submit(forged), Err(SubmitError::Refused(TxError::BadSignature)));
    assert_eq!(app.mempool_len(), 2);
    assert_eq!(
        from_chain_digest(&genesis_block(&genesis()).digest()),
        genesis_block(&genesis()).block().digest()
    );
}
