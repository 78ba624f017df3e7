//! The ledger's rules, transaction by transaction: what each one changes, and that a refused one
//! changes nothing.

use vouch_crypto::{Digest, PublicKey, SecretKey};
use vouch_ledger::state::{TaskStatus, task_key};
use vouch_ledger::{
    Block, BlockContext, BlockError, Genesis, GenesisAccount, GenesisValidator, InputRef, Ledger, Params,
    SignedTransaction, SnapshotError, Transaction, TxBody, TxError, block_seed,
};
use vouch_types::receipt::{Receipt, ReceiptBody};
use vouch_types::{BlobId, ModelId, VerifyLevel};

const VALIDATORS: u8 = 6;

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

fn validator_key(index: u8) -> SecretKey {
    key(100 + index)
}

/// A chain with six staked validators and two funded users (keys 1 and 2).
struct Chain {
    genesis: Genesis,
    ledger: Ledger,
    height: u64,
    nonces: std::collections::HashMap<PublicKey, u64>,
}

impl Chain {
    fn new() -> Self {
        let genesis = Genesis {
            chain_name: "test".into(),
            params: Params {
                unbonding_blocks: 5,
                ..Params::default()
            },
            validators: (0..VALIDATORS)
                .map(|index| GenesisValidator {
                    public_key: validator_key(index).public_key(),
                    p2p_address: format!("127.0.0.1:{}", 9000 + u16::from(index)),
                    api_address: format!("127.0.0.1:{}", 7000 + u16::from(index)),
                    stake: 5_000,
                })
                .collect(),
            accounts: [1u8, 2]
                .iter()
                .map(|seed| GenesisAccount {
                    public_key: key(*seed).public_key(),
                    balance: 1_000_000,
                })
                .chain((0..VALIDATORS).map(|index| GenesisAccount {
                    public_key: validator_key(index).public_key(),
                    balance: 10_000,
                }))
                .collect(),
        };
        genesis.check().expect("valid genesis");
        Self {
            ledger: Ledger::from_genesis(&genesis),
            genesis,
            height: 1,
            nonces: Default::default(),
        }
    }

    fn ctx(&self) -> BlockContext {
        BlockContext {
            height: self.height,
            proposer: validator_key(0).public_key(),
            seed: block_seed(&Digest::of("parent", &self.height.to_be_bytes()), self.height),
        }
    }

    fn sign(&mut self, signer: &SecretKey, body: TxBody) -> SignedTransaction {
        let nonce = self.nonces.entry(signer.public_key()).or_insert(0);
        let tx = Transaction {
            signer: signer.public_key(),
            nonce: *nonce,
            fee: 1,
            body,
        }
        .sign(signer, self.ledger.chain_id());
        *nonce += 1;
        tx
    }

    /// Applies `body` in a block of its own; on refusal checks that nothing changed.
    fn submit(&mut self, signer: &SecretKey, body: TxBody) -> Result<SignedTransaction, TxError> {
        let tx = self.sign(signer, body);
        let before = self.ledger.clone();
        let ctx = self.ctx();
        self.ledger.begin_block(&ctx).expect("block start");
        let started = self.ledger.clone();
        self.height += 1;
        match self.ledger.apply(&ctx, &tx) {
            Ok(()) => Ok(tx),
            Err(error) => {
                assert_eq!(self.ledger, started, "a refused transaction changed the state");
                assert_eq!(
                    before.account(&signer.public_key()),
                    started.account(&signer.public_key())
                );
                *self.nonces.get_mut(&signer.public_key()).expect("signed") -= 1;
                Err(error)
            }
        }
    }

    fn advance(&mut self, blocks: u64) {
        for _ in 0..blocks {
            let ctx = self.ctx();
            self.ledger.begin_block(&ctx).expect("block start");
            self.height += 1;
        }
    }

    fn balance(&self, who: &SecretKey) -> u64 {
        self.ledger.account(&who.public_key()).expect("account").balance
    }

    /// Publishes a model and has every validator serve it; returns its id.
    fn publish_served(&mut self, label: &str) -> ModelId {
        let model_id = ModelId(BlobId::of(label.as_bytes()));
        self.submit(
            &key(1),
            TxBody::PublishModel {
                model_id,
                name: format!("demo/{label}").parse().expect("name"),
                version: "1.0.0".parse().expect("version"),
            },
        )
        .expect("published");
        for index in 0..VALIDATORS {
            self.submit(
                &validator_key(index),
                TxBody::RegisterNode {
                    stake: 0,
                    address: format!("127.0.0.1:{}", 7000 + u16::from(index)),
                    models: vec![model_id],
                },
            )
            .expect("serves");
        }
        model_id
    }
}

fn receipt(task: Digest, model_id: ModelId, executor: &SecretKey, output: &[u8]) -> Receipt {
    ReceiptBody {
        request_hash: task,
        model_id,
        level: VerifyLevel::Quorum,
        plan_id: Some(BlobId::of(b"plan")),
        input_hash: Digest::of("input", b"x"),
        output_hash: Digest::of("output", output),
        trace_root: Some(Digest::of("trace", output)),
        executor: executor.public_key(),
    }
    .sign(executor)
    .expect("signs")
}

fn request(model_id: ModelId, k: u8, max_fee: u64, deadline: u64) -> TxBody {
    TxBody::RequestInference {
        model_id,
        input: InputRef::Inline(b"{}".to_vec()),
        input_hash: Digest::of("input", b"x"),
        k,
        max_fee,
        deadline,
    }
}

fn executor_key(public: &PublicKey) -> SecretKey {
    (0..VALIDATORS)
        .map(validator_key)
        .find(|candidate| candidate.public_key() == *public)
        .expect("executors are validators")
}

#[test]
fn transfers_move_funds_and_pay_the_proposer() {
    let mut chain = Chain::new();
    let proposer_before = chain.balance(&validator_key(0));
    chain
        .submit(
            &key(1),
            TxBody::Transfer {
                to: key(3).public_key(),
                amount: 500,
            },
        )
        .expect("transfer");
    assert_eq!(chain.balance(&key(1)), 1_000_000 - 501);
    assert_eq!(chain.balance(&key(3)), 500);
    assert_eq!(chain.balance(&validator_key(0)), proposer_before + 1);
    assert_eq!(chain.ledger.account(&key(1).public_key()).expect("account").nonce, 1);
}

#[test]
fn bad_transactions_are_refused_and_change_nothing() {
    let mut chain = Chain::new();
    let transfer = |amount| TxBody::Transfer {
        to: key(3).public_key(),
        amount,
    };
    assert!(matches!(
        chain.submit(&key(1), transfer(2_000_000)),
        Err(TxError::InsufficientFunds { .. })
    ));
    assert!(matches!(
        chain.submit(&key(9), transfer(1)),
        Err(TxError::InsufficientFunds { .. })
    ));
    assert!(matches!(chain.submit(&key(1), transfer(0)), Err(TxError::Invalid(_))));

    // A replayed transaction: same nonce twice.
    let tx = chain.sign(&key(1), transfer(10));
    let ctx = chain.ctx();
    chain.ledger.apply(&ctx, &tx).expect("first time");
    let after_first = chain.ledger.clone();
    assert_eq!(
        chain.ledger.apply(&ctx, &tx),
        Err(TxError::Nonce { expected: 1, got: 0 })
    );
    assert_eq!(chain.ledger, after_first);

    // A tampered transaction: the signature no longer matches.
    let mut forged = chain.sign(&key(1), transfer(10));
    forged.tx.body = transfer(10_000);
    assert_eq!(chain.ledger.apply(&ctx, &forged), Err(TxError::BadSignature));
    // A transaction signed for another chain.
    let other_chain = Transaction {
        signer: key(1).public_key(),
        nonce: 1,
        fee: 1,
        body: transfer(10),
    }
    .sign(&key(1), &Digest::of("another chain", b""));
    assert_eq!(chain.ledger.apply(&ctx, &other_chain), Err(TxError::BadSignature));
    // A fee below the minimum.
    let cheap = Transaction {
        signer: key(1).public_key(),
        nonce: 1,
        fee: 0,
        body: transfer(10),
    }
    .sign(&key(1), chain.ledger.chain_id());
    assert!(matches!(
        chain.ledger.apply(&ctx, &cheap),
        Err(TxError::FeeTooLow { .. })
    ));
    assert_eq!(chain.ledger, after_first);

    // The helper signed the refused transactions above with nonces the account never reached.
    chain.nonces.insert(key(1).public_key(), 1);
    let unknown = ModelId(BlobId::of(b"never published"));
    assert_eq!(
        chain.submit(&key(1), request(unknown, 1, 10, 50)),
        Err(TxError::UnknownModel(unknown))
    );
}

#[test]
fn stake_unbonds_after_the_delay() {
    let mut chain = Chain::new();
    assert!(matches!(
        chain.submit(
            &key(2),
            TxBody::RegisterNode {
                stake: 10,
                address: "127.0.0.1:7100".into(),
                models: vec![]
            }
        ),
        Err(TxError::Invalid(_))
    ));
    chain
        .submit(
            &key(2),
            TxBody::RegisterNode {
                stake: 2_000,
                address: "127.0.0.1:7100".into(),
                models: vec![],
            },
        )
        .expect("registers");
    let staked_balance = chain.balance(&key(2));
    assert_eq!(staked_balance, 1_000_000 - 1 - 2_000);
    assert!(matches!(
        chain.submit(&key(2), TxBody::Unstake { amount: 5_000 }),
        Err(TxError::Invalid(_))
    ));
    assert!(matches!(
        chain.submit(&key(1), TxBody::Unstake { amount: 5 }),
        Err(TxError::NotANode(_))
    ));
    chain
        .submit(&key(2), TxBody::Unstake { amount: 1_500 })
        .expect("unstakes");
    let node = chain
        .ledger
        .node(&key(2).public_key())
        .expect("node")
        .expect("registered");
    assert_eq!(node.stake, 500);
    assert_eq!(chain.balance(&key(2)), staked_balance - 1);
    chain.advance(3);
    assert_eq!(chain.balance(&key(2)), staked_balance - 1, "released before the delay");
    chain.advance(3);
    assert_eq!(chain.balance(&key(2)), staked_balance - 1 + 1_500);
    let node = chain
        .ledger
        .node(&key(2).public_key())
        .expect("node")
        .expect("registered");
    assert!(node.unbonding.is_empty());
}

#[test]
fn names_belong_to_their_first_publisher_and_versions_never_change() {
    let mut chain = Chain::new();
    let publish = |label: &[u8], version: &str| TxBody::PublishModel {
        model_id: ModelId(BlobId::of(label)),
        name: "demo/digits".parse().expect("name"),
        version: version.parse().expect("version"),
    };
    chain.submit(&key(1), publish(b"v1", "1.0.0")).expect("v1");
    assert!(matches!(
        chain.submit(&key(1), publish(b"v1 changed", "1.0.0")),
        Err(TxError::VersionTaken { .. })
    ));
    assert!(matches!(
        chain.submit(&key(2), publish(b"v2 by another", "2.0.0")),
        Err(TxError::NameOwned { .. })
    ));
    assert!(matches!(
        chain.submit(&key(1), publish(b"v1", "1.0.1")),
        Err(TxError::Invalid(_))
    ));
    chain.submit(&key(1), publish(b"v2", "2.0.0")).expect("v2");
    let v1 = ModelId(BlobId::of(b"v1"));
    assert_eq!(
        chain
            .ledger
            .resolve(
                &"demo/digits".parse().expect("name"),
                &"1.0.0".parse().expect("version")
            )
            .expect("resolve"),
        Some(v1)
    );
    let record = chain.ledger.model(&v1).expect("model").expect("published");
    assert_eq!(record.replicas.len(), 3, "three replicas drawn among six staked nodes");
    assert!(record.confirmed.is_empty());
    for replica in &record.replicas {
        assert!(chain.ledger.replica_duties(replica).expect("duties").contains(&v1));
    }
    let v2 = ModelId(BlobId::of(b"v2"));
    let published = chain.ledger.published_after(None, 10).expect("publications");
    assert_eq!(
        published.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        vec![v1, v2],
        "publication order"
    );
    assert!(published[0].0 < published[1].0, "heights rise");
    assert_eq!(
        chain.ledger.published_after(None, 1).expect("first"),
        published[..1],
        "the limit holds"
    );
    assert_eq!(
        chain.ledger.published_after(Some(published[0]), 10).expect("after v1"),
        published[1..]
    );
    assert!(
        chain
            .ledger
            .published_after(Some(published[1]), 10)
            .expect("none")
            .is_empty()
    );

    // Only an assigned replica may confirm, once; it then hosts the model.
    let outsider = (0..VALIDATORS)
        .map(validator_key)
        .find(|k| !record.replicas.contains(&k.public_key()))
        .expect("an unassigned validator");
    assert!(matches!(
        chain.submit(&outsider, TxBody::ConfirmReplica { model_id: v1 }),
        Err(TxError::Invalid(_))
    ));
    let replica = executor_key(&record.replicas[0]);
    chain
        .submit(&replica, TxBody::ConfirmReplica { model_id: v1 })
        .expect("confirms");
    assert!(
        !chain
            .ledger
            .replica_duties(&replica.public_key())
            .expect("duties")
            .contains(&v1),
        "a confirmed replica owes nothing more"
    );
    assert!(matches!(
        chain.submit(&replica, TxBody::ConfirmReplica { model_id: v1 }),
        Err(TxError::Invalid(_))
    ));
    assert_eq!(
        chain.ledger.eligible_hosts(&v1).expect("hosts"),
        vec![replica.public_key()]
    );
}

#[test]
fn agreeing_receipts_finalize_the_task_and_split_the_fee() {
    let mut chain = Chain::new();
    let model_id = chain.publish_served("mlp");
    assert!(matches!(
        chain.submit(&key(2), request(model_id, 7, 70, 50)),
        Err(TxError::NotEnoughHosts { .. })
    ));
    let before = chain.balance(&key(2));
    let height = chain.height;
    let tx = chain
        .submit(&key(2), request(model_id, 3, 31, height + 20))
        .expect("requested");
    let task_id = tx.id();
    assert_eq!(chain.balance(&key(2)), before - 1 - 31);
    let task = chain.ledger.task(&task_id).expect("task").expect("open");
    assert_eq!(task.executors.len(), 3);
    assert_eq!(task.status, TaskStatus::Open);
    for executor in &task.executors {
        assert_eq!(chain.ledger.assigned_tasks(executor).expect("index"), vec![task_id]);
    }

    // Someone not drawn cannot submit.
    let outsider = (0..VALIDATORS)
        .map(validator_key)
        .find(|k| !task.executors.contains(&k.public_key()))
        .expect("an executor not drawn");
    assert!(matches!(
        chain.submit(
            &outsider,
            TxBody::SubmitReceipt {
                receipt: receipt(task_id, model_id, &outsider, b"answer")
            }
        ),
        Err(TxError::NotAssigned { .. })
    ));
    // A receipt for a task that does not exist.
    let first = executor_key(&task.executors[0]);
    assert!(matches!(
        chain.submit(
            &first,
            TxBody::SubmitReceipt {
                receipt: receipt(Digest::of("no task", b""), model_id, &first, b"answer")
            }
        ),
        Err(TxError::UnknownTask(_))
    ));

    // A receipt whose signature is not its executor's over its body.
    let mut forged = receipt(task_id, model_id, &first, b"answer");
    forged.signature = receipt(task_id, model_id, &first, b"other answer").signature;
    assert!(matches!(
        chain.submit(&first, TxBody::SubmitReceipt { receipt: forged }),
        Err(TxError::Invalid(_))
    ));

    let balances: Vec<u64> = task.executors.iter().map(|e| chain.balance(&executor_key(e))).collect();
    for executor in &task.executors {
        let signer = executor_key(executor);
        chain
            .submit(
                &signer,
                TxBody::SubmitReceipt {
                    receipt: receipt(task_id, model_id, &signer, b"answer"),
                },
            )
            .expect("receipt");
    }
    let task = chain.ledger.task(&task_id).expect("task").expect("exists");
    assert_eq!(task.status, TaskStatus::Finalized);
    assert_eq!(task.receipts.len(), 3);
    for executor in &task.executors {
        assert!(chain.ledger.assigned_tasks(executor).expect("index").is_empty());
    }
    for (executor, before) in task.executors.iter().zip(balances) {
        let proposer_fees = if *executor == validator_key(0).public_key() {
            3
        } else {
            0
        };
        assert_eq!(chain.balance(&executor_key(executor)), before - 1 + 10 + proposer_fees);
    }
    // 31 split three ways: 10 each, 1 back to the requester.
    assert_eq!(chain.balance(&key(2)), before - 1 - 31 + 1);

    // The task is proven against the state root, receipts included.
    let root = chain.ledger.root();
    let proof = chain.ledger.prove(&task_key(&task_id));
    let value = proof
        .verify(&root, &task_key(&task_id))
        .expect("verifies")
        .expect("present");
    assert_eq!(
        <vouch_ledger::state::TaskRecord as vouch_ledger::state::Record>::from_bytes(&value).expect("decodes"),
        task
    );
    let json = serde_json::to_string(&proof).expect("json");
    let parsed: vouch_ledger::StateProof = serde_json::from_str(&json).expect("parses");
    assert_eq!(parsed, proof);
}

#[test]
fn a_wrong_receipt_disputes_the_task_and_locks_the_escrow() {
    let mut chain = Chain::new();
    let model_id = chain.publish_served("cnn");
    let height = chain.height;
    let tx = chain
        .submit(&key(2), request(model_id, 3, 30, height + 20))
        .expect("requested");
    let task = chain.ledger.task(&tx.id()).expect("task").expect("open");
    let outputs: [&[u8]; 3] = [b"right", b"wrong", b"right"];
    for (executor, output) in task.executors.iter().zip(outputs) {
        let signer = executor_key(executor);
        let result = chain.submit(
            &signer,
            TxBody::SubmitReceipt {
                receipt: receipt(tx.id(), model_id, &signer, output),
            },
        );
        if output == b"right" && result.is_err() {
            // The third receipt arrives after the dispute: the task no longer takes receipts.
            assert!(matches!(result, Err(TxError::Invalid(_))));
        }
    }
    let task = chain.ledger.task(&tx.id()).expect("task").expect("exists");
    assert_eq!(task.status, TaskStatus::Disputed);
    assert_eq!(task.receipts.len(), 2);
    // Nobody owes a disputed task a receipt any more.
    for executor in &task.executors {
        assert!(chain.ledger.assigned_tasks(executor).expect("index").is_empty());
    }
    // The escrow is not refunded when the deadline passes.
    let balance = chain.balance(&key(2));
    chain.advance(30);
    assert_eq!(chain.balance(&key(2)), balance);
}

#[test]
fn an_unanswered_task_expires_and_refunds() {
    let mut chain = Chain::new();
    let model_id = chain.publish_served("slow");
    let height = chain.height;
    let before = chain.balance(&key(2));
    let tx = chain
        .submit(&key(2), request(model_id, 2, 40, height + 3))
        .expect("requested");
    chain.advance(2);
    assert_eq!(
        chain.ledger.task(&tx.id()).expect("task").expect("exists").status,
        TaskStatus::Open
    );
    chain.advance(2);
    let task = chain.ledger.task(&tx.id()).expect("task").expect("exists");
    assert_eq!(task.status, TaskStatus::Expired);
    for executor in &task.executors {
        assert!(chain.ledger.assigned_tasks(executor).expect("index").is_empty());
    }
    assert_eq!(chain.balance(&key(2)), before - 1);
    let late = executor_key(&task.executors[0]);
    assert!(matches!(
        chain.submit(
            &late,
            TxBody::SubmitReceipt {
                receipt: receipt(tx.id(), model_id, &late, b"late")
            }
        ),
        Err(TxError::Invalid(_))
    ));
}

#[test]
fn blocks_apply_whole_or_not_at_all_and_replay_to_the_same_root() {
    let mut chain = Chain::new();
    let genesis_ledger = chain.ledger.clone();
    let good: Vec<SignedTransaction> = (0..5)
        .map(|i| {
            chain.sign(
                &key(1),
                TxBody::Transfer {
                    to: key(10 + i).public_key(),
                    amount: 100,
                },
            )
        })
        .collect();
    let ctx = chain.ctx();
    let next = genesis_ledger.execute_block(&ctx, &good).expect("applies");
    let again = genesis_ledger.execute_block(&ctx, &good).expect("applies");
    assert_eq!(next.root(), again.root());
    assert_ne!(next.root(), genesis_ledger.root());

    // Out-of-order nonces refuse the whole block.
    let mut swapped = good.clone();
    swapped.swap(1, 2);
    assert!(matches!(
        genesis_ledger.execute_block(&ctx, &swapped),
        Err(BlockError::Transaction { index: 1, .. })
    ));
    // A proposer building from the same candidates keeps what applies, in order: nonces 0 and
    // 1; nonce 2 came too early, and 3 and 4 then come too late.
    let built = genesis_ledger.build_block(&ctx, swapped).expect("builds");
    assert_eq!(built.included.len(), 2);
    assert_eq!(built.refused.len(), 3);

    let block = Block {
        parent: Digest::of("parent", b""),
        height: 1,
        proposer: ctx.proposer,
        state_root: next.root(),
        txs: good,
    };
    let bytes = block.encode();
    assert_eq!(Block::decode(&bytes).expect("decodes"), block);
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(Block::decode(&trailing).is_err());
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        assert!(Block::decode(&bytes[..cut]).is_err());
    }
}

#[test]
fn a_saved_state_restores_to_the_same_ledger_and_a_damaged_one_is_refused() {
    let mut chain = Chain::new();
    let model_id = chain.publish_served("saved");
    let height = chain.height;
    chain
        .submit(&key(2), request(model_id, 2, 20, height + 20))
        .expect("requested");
    let saved = chain.ledger.snapshot();
    let root = chain.ledger.root();
    let restored = Ledger::from_snapshot(&chain.genesis, &saved, &root).expect("restores");
    assert_eq!(restored, chain.ledger);

    // A byte of the first key (after the entry count and the key's length) flipped.
    let mut flipped = saved.clone();
    flipped[8 + 4 + 1] ^= 1;
    assert!(matches!(
        Ledger::from_snapshot(&chain.genesis, &flipped, &root),
        Err(SnapshotError::Root { .. })
    ));
    for cut in [0, 7, saved.len() / 2, saved.len() - 1] {
        assert!(matches!(
            Ledger::from_snapshot(&chain.genesis, &saved[..cut], &root),
            Err(SnapshotError::Malformed(_))
        ));
    }
    let mut longer = saved;
    longer.push(0);
    assert!(matches!(
        Ledger::from_snapshot(&chain.genesis, &longer, &root),
        Err(SnapshotError::Malformed(_))
    ));
}
