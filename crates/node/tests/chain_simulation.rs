//! Validators running the ledger on simplex consensus and marshal, over commonware's simulated
//! network on the deterministic runtime: agreement, message loss, a crashed validator that
//! restarts from its saved state, a partition that heals, and quorum inference with honest
//! executors and one that lies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use commonware_cryptography::ed25519::PublicKey as ConsensusKey;
use commonware_p2p::simulated::{self, Control, Link, Network, Oracle};
use commonware_runtime::{Clock, Handle, Quota, Runner, Spawner, Supervisor as _, deterministic};
use commonware_utils::{NZU32, NZUsize, probability};
use futures::StreamExt;
use futures::channel::oneshot;
use vouch_crypto::{Digest, PublicKey, SecretKey};
use vouch_engine::ExecOptions;
use vouch_ledger::state::{TaskStatus, task_key};
use vouch_ledger::{Genesis, GenesisAccount, GenesisValidator, InputRef, Params, Transaction, TxBody};
use vouch_node::chain::executor::{self, ExecutorConfig};
use vouch_node::chain::finality::{FinalityError, TaskProof, ValidatorSet};
use vouch_node::chain::validator::{
    self, CHANNEL_BACKFILL, CHANNEL_BLOCKS, CHANNEL_CERTIFICATES, CHANNEL_CONSENSUS_RESOLVER, CHANNEL_TRANSACTIONS,
    CHANNEL_VOTES, Channels, MAX_MESSAGE_BYTES, Timing, Validator, ValidatorConfig,
};
use vouch_store::{BlobStore, MemoryStore};
use vouch_tensor::{NamedTensor, TensorLimits, write_npy};
use vouch_types::{
    BlobId, Manifest, ManifestBody, ModelFile, ModelFormat, ModelId, ModelName, PlanRef, ReceiptBody, VerifyLevel,
    Version,
};
use vouch_verify::{name_inputs, run_exact, tensors_hash};

const VALIDATORS: u8 = 4;
const QUOTA: Quota = Quota::per_second(NZU32!(1_024));
const LINK: Link = Link {
    latency: Duration::from_millis(50),
    jitter: Duration::from_millis(10),
    success_rate: probability!(1.0),
};
const LOSSY_LINK: Link = Link {
    latency: Duration::from_millis(200),
    jitter: Duration::from_millis(100),
    success_rate: probability!(0.8),
};
const AMOUNT: u64 = 10;

fn validator_key(index: u8) -> SecretKey {
    SecretKey::from_seed([200 + index; 32])
}

fn user() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

fn recipient() -> SecretKey {
    SecretKey::from_seed([50; 32])
}

fn publisher() -> SecretKey {
    SecretKey::from_seed([60; 32])
}

fn executor_secret(index: u8) -> SecretKey {
    SecretKey::from_seed([100 + index; 32])
}

fn genesis(executors: u8) -> Genesis {
    let funded = [user(), publisher()]
        .into_iter()
        .chain((0..executors).map(executor_secret))
        .map(|key| GenesisAccount {
            public_key: key.public_key(),
            balance: 1_000_000,
        });
    Genesis {
        chain_name: "simulation".into(),
        params: Params::default(),
        validators: (0..VALIDATORS)
            .map(|index| GenesisValidator {
                public_key: validator_key(index).public_key(),
                p2p_address: format!("127.0.0.1:{}", 9000 + u16::from(index)),
                api_address: format!("127.0.0.1:{}", 7000 + u16::from(index)),
                stake: 10_000,
            })
            .collect(),
        accounts: funded.collect(),
    }
}

fn consensus_key(index: u8) -> ConsensusKey {
    use commonware_codec::DecodeExt;
    ConsensusKey::decode(bytes::Bytes::copy_from_slice(
        validator_key(index).public_key().as_bytes(),
    ))
    .expect("key")
}

type SimControl = Control<ConsensusKey, deterministic::Context>;

async fn register(
    control: &SimControl,
) -> Channels<simulated::Sender<ConsensusKey, deterministic::Context>, simulated::Receiver<ConsensusKey>> {
    let channel = |id| {
        let control = control.clone();
        async move { control.register(id, QUOTA).await.expect("channel") }
    };
    Channels {
        votes: channel(CHANNEL_VOTES).await,
        certificates: channel(CHANNEL_CERTIFICATES).await,
        consensus_resolver: channel(CHANNEL_CONSENSUS_RESOLVER).await,
        backfill: channel(CHANNEL_BACKFILL).await,
        blocks: channel(CHANNEL_BLOCKS).await,
        transactions: channel(CHANNEL_TRANSACTIONS).await,
    }
}

/// The simulated network with the four validators linked by `link`.
async fn network(context: &deterministic::Context, link: &Link) -> Oracle<ConsensusKey, deterministic::Context> {
    let keys: Vec<ConsensusKey> = (0..VALIDATORS).map(consensus_key).collect();
    let (network, oracle) = Network::new_with_peers(
        context.child("network"),
        simulated::Config {
            max_size: MAX_MESSAGE_BYTES,
            max_peers_per_set: NZUsize!(4),
            disconnect_on_block: true,
            tracked_peer_sets: NZUsize!(1),
        },
        keys.clone(),
    )
    .await;
    network.start();
    for from in &keys {
        for to in &keys {
            if from != to {
                oracle
                    .add_link(from.clone(), to.clone(), link.clone())
                    .await
                    .expect("link");
            }
        }
    }
    oracle
}

/// Starts validator `index` in a task of its own (aborting the task crashes the validator);
/// its storage partitions survive a restart.
async fn spawn_validator(
    context: &deterministic::Context,
    oracle: &Oracle<ConsensusKey, deterministic::Context>,
    genesis: &Genesis,
    index: u8,
    run: u32,
) -> (Handle<()>, Validator) {
    let control = oracle.control(consensus_key(index));
    let channels = register(&control).await;
    let config = ValidatorConfig {
        genesis: genesis.clone(),
        key: validator_key(index),
        partition_prefix: format!("validator-{index}"),
        timing: Timing::default(),
        snapshot_interval_blocks: 4,
    };
    let peers = oracle.manager();
    let (started, ready) = oneshot::channel();
    let handle = context
        .child("validator")
        .with_attribute("index", index)
        .with_attribute("run", run)
        .spawn(move |context| async move {
            let validator = validator::start(context, config, channels, peers, control)
                .await
                .expect("validator starts");
            let _ = started.send(validator);
            futures::future::pending::<()>().await;
        });
    (handle, ready.await.expect("validator started"))
}

async fn start_all(
    context: &deterministic::Context,
    oracle: &Oracle<ConsensusKey, deterministic::Context>,
    genesis: &Genesis,
) -> Vec<(Handle<()>, Validator)> {
    let mut validators = Vec::new();
    for index in 0..VALIDATORS {
        validators.push(spawn_validator(context, oracle, genesis, index, 0).await);
    }
    validators
}

async fn wait_for_height(context: &deterministic::Context, validators: &[&Validator], height: u64) {
    while !validators.iter().all(|v| v.app().finalized_height() >= height) {
        context.sleep(Duration::from_millis(100)).await;
    }
}

fn transfer(chain_id: &Digest, nonce: u64) -> vouch_ledger::SignedTransaction {
    Transaction {
        signer: user().public_key(),
        nonce,
        fee: 1,
        body: TxBody::Transfer {
            to: recipient().public_key(),
            amount: AMOUNT,
        },
    }
    .sign(&user(), chain_id)
}

/// The (height, state root) of every block each validator remembers finalizing, checked to agree
/// wherever two validators remember the same height.
fn check_agreement(validators: &[&Validator]) -> Vec<(u64, Digest)> {
    let chains: Vec<Vec<(u64, Digest)>> = validators
        .iter()
        .map(|v| v.app().finalized().iter().map(|f| (f.height, f.state_root)).collect())
        .collect();
    for chain in &chains[1..] {
        for (height, root) in chain {
            if let Some((_, other)) = chains[0].iter().find(|(h, _)| h == height) {
                assert_eq!(root, other, "validators disagree on the state root at height {height}");
            }
        }
    }
    chains[0].clone()
}

fn deterministic_runner(seed: u64) -> deterministic::Runner {
    deterministic::Runner::new(
        deterministic::Config::new()
            .with_seed(seed)
            .with_timeout(Some(Duration::from_secs(600))),
    )
}

/// Four validators over `link` finalize `blocks` blocks with `transfers` transfers submitted to
/// validator 0 (gossip carries them to the others); returns the chain and the recipient's
/// balance on each validator.
fn run_transfers(seed: u64, blocks: u64, transfers: u64, link: Link) -> (Vec<(u64, Digest)>, Vec<u64>) {
    deterministic_runner(seed).start(|context| async move {
        let genesis = genesis(0);
        let oracle = network(&context, &link).await;
        let validators = start_all(&context, &oracle, &genesis).await;
        let chain_id = genesis.chain_id();
        for nonce in 0..transfers {
            validators[0].1.submit(transfer(&chain_id, nonce)).expect("admitted");
        }
        let all: Vec<&Validator> = validators.iter().map(|(_, v)| v).collect();
        wait_for_height(&context, &all, blocks).await;
        let chain: Vec<(u64, Digest)> = check_agreement(&all).into_iter().take(blocks as usize).collect();
        let included: usize = all[0].app().finalized().iter().map(|f| f.tx_count).sum();
        assert_eq!(included as u64, transfers, "every transfer is finalized once");
        let balances = all
            .iter()
            .map(|v| {
                v.app()
                    .finalized_ledger()
                    .account(&recipient().public_key())
                    .expect("account")
                    .balance
            })
            .collect();
        (chain, balances)
    })
}

#[test]
fn four_validators_finalize_the_same_ledger_and_the_same_seed_repeats_it() {
    let (chain, balances) = run_transfers(7, 12, 20, LINK);
    let heights: Vec<u64> = chain.iter().map(|(height, _)| *height).collect();
    assert_eq!(heights, (1..=12).collect::<Vec<_>>());
    assert_eq!(balances, vec![20 * AMOUNT; 4]);
    let again = run_transfers(7, 12, 20, LINK);
    assert_eq!(again.0, chain, "the same seed gave another chain");
}

#[test]
fn the_ledger_finalizes_under_message_loss_and_latency() {
    let (chain, balances) = run_transfers(11, 12, 20, LOSSY_LINK);
    assert_eq!(chain.len(), 12);
    assert_eq!(balances, vec![20 * AMOUNT; 4]);
}

#[test]
fn a_crashed_validator_restarts_from_its_saved_state_and_catches_up() {
    deterministic_runner(3).start(|context| async move {
        let genesis = genesis(0);
        let chain_id = genesis.chain_id();
        let oracle = network(&context, &LINK).await;
        let mut validators = start_all(&context, &oracle, &genesis).await;
        for nonce in 0..10 {
            validators[0].1.submit(transfer(&chain_id, nonce)).expect("admitted");
        }
        let all: Vec<Validator> = validators.iter().map(|(_, v)| v.clone()).collect();
        wait_for_height(&context, &all.iter().collect::<Vec<_>>(), 6).await;

        // Validator 3 crashes; three of four keep finalizing, with new transactions.
        let (handle, crashed) = validators.pop().expect("four validators");
        handle.abort();
        let stopped_at = crashed.app().finalized_height();
        for nonce in 10..20 {
            validators[0].1.submit(transfer(&chain_id, nonce)).expect("admitted");
        }
        let live: Vec<&Validator> = validators.iter().map(|(_, v)| v).collect();
        wait_for_height(&context, &live, stopped_at + 10).await;
        assert_eq!(
            crashed.app().finalized_height(),
            stopped_at,
            "a crashed validator finalizes nothing"
        );

        // Restarted on the same storage, it resumes from its snapshot and journal, then fetches
        // what it missed.
        let (_handle, restarted) = spawn_validator(&context, &oracle, &genesis, 3, 1).await;
        assert!(
            restarted.app().finalized_height() >= stopped_at.saturating_sub(1),
            "the restarted validator resumed at height {} (it stopped at {stopped_at})",
            restarted.app().finalized_height()
        );
        let target = live[0].app().finalized_height() + 4;
        let mut everyone = live.clone();
        everyone.push(&restarted);
        wait_for_height(&context, &everyone, target).await;
        check_agreement(&everyone);
        for validator in &everyone {
            let ledger = validator.app().finalized_ledger();
            assert_eq!(
                ledger.account(&recipient().public_key()).expect("account").balance,
                20 * AMOUNT
            );
        }
    });
}

#[test]
fn a_partition_without_a_quorum_halts_finality_and_healing_resumes_it() {
    deterministic_runner(5).start(|context| async move {
        let genesis = genesis(0);
        let oracle = network(&context, &LINK).await;
        let validators = start_all(&context, &oracle, &genesis).await;
        let all: Vec<&Validator> = validators.iter().map(|(_, v)| v).collect();
        wait_for_height(&context, &all, 4).await;

        let sides = [[0u8, 1], [2, 3]];
        for a in sides[0] {
            for b in sides[1] {
                oracle
                    .remove_link(consensus_key(a), consensus_key(b))
                    .await
                    .expect("unlink");
                oracle
                    .remove_link(consensus_key(b), consensus_key(a))
                    .await
                    .expect("unlink");
            }
        }
        let split_at = all.iter().map(|v| v.app().finalized_height()).max().unwrap_or(0);
        context.sleep(Duration::from_secs(30)).await;
        let during = all.iter().map(|v| v.app().finalized_height()).max().unwrap_or(0);
        // Two of four is no quorum: at most a block already certified before the split lands.
        assert!(during <= split_at + 1, "finalized {during} from {split_at} while split");

        for a in sides[0] {
            for b in sides[1] {
                oracle
                    .add_link(consensus_key(a), consensus_key(b), LINK)
                    .await
                    .expect("link");
                oracle
                    .add_link(consensus_key(b), consensus_key(a), LINK)
                    .await
                    .expect("link");
            }
        }
        wait_for_height(&context, &all, during + 5).await;
        check_agreement(&all);
    });
}

/// The digits MLP with its exact plan, stored as a node stores a published model.
struct Model {
    id: ModelId,
    manifest: Manifest,
    plan: vouch_engine::Plan,
    store: Arc<MemoryStore>,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn digits_model() -> Model {
    let onnx = std::fs::read(fixtures().join("models/digits_mlp_v1.onnx")).expect("model fixture");
    let calibration = vouch_tensor::read_tensor_file(
        &fixtures().join("data/digits_calibration.npz"),
        &TensorLimits::default(),
    )
    .expect("calibration fixture");
    let model = vouch_engine::load_onnx(&onnx).expect("loads");
    let plan = vouch_engine::build_plan(&model, &model.to_ir().expect("ir"), &calibration).expect("plan");
    let schema = vouch_engine::read_onnx_schema(&onnx).expect("schema");
    let store = Arc::new(MemoryStore::new(1 << 30));
    let file = store.put_bytes(&onnx).expect("stored");
    let plan_bytes = plan.encode();
    let stored_plan = store.put_bytes(&plan_bytes).expect("stored");
    let manifest = ManifestBody {
        name: "digits/mlp".parse().expect("name"),
        version: "1".parse().expect("version"),
        format: ModelFormat::Onnx,
        files: vec![ModelFile {
            path: "digits_mlp_v1.onnx".into(),
            blob: file.id,
            size: file.size,
        }],
        plans: vec![PlanRef {
            id: stored_plan.id,
            size: stored_plan.size,
        }],
        inputs: schema.inputs,
        outputs: schema.outputs,
        license: None,
        description: "digits MLP".into(),
        publisher: publisher().public_key(),
    }
    .sign(&publisher())
    .expect("signed");
    let id = ModelId(store.put_bytes(&manifest.encode()).expect("stored").id);
    Model {
        id,
        manifest,
        plan,
        store,
    }
}

/// Test digit `index` as an inline `.npy` input, with its input hash and the output hash an
/// honest executor computes.
fn digit_input(model: &Model, index: usize) -> (Vec<u8>, Digest, Digest) {
    let tests = vouch_tensor::read_tensor_file(&fixtures().join("data/digits_test.npz"), &TensorLimits::default())
        .expect("test fixture");
    let images = &tests[0].tensor;
    let features = images.shape()[1..].iter().product::<usize>();
    let vouch_tensor::TensorData::F32(values) = images.data() else {
        panic!("digits are f32");
    };
    let mut shape = images.shape().to_vec();
    shape[0] = 1;
    let one = vouch_tensor::Tensor::new(
        shape,
        vouch_tensor::TensorData::F32(values[index * features..(index + 1) * features].to_vec()),
    )
    .expect("tensor");
    let bytes = write_npy(&one);
    let inputs = name_inputs(
        &model.manifest.body.inputs,
        vec![NamedTensor {
            name: None,
            tensor: one,
        }],
    )
    .expect("named");
    let answer = run_exact(&model.plan, &inputs, &ExecOptions::default()).expect("runs");
    (bytes, tensors_hash(&inputs), answer.output_hash)
}

/// Waits until `who`'s transaction with `nonce` has applied on `validator`.
async fn wait_for_nonce(context: &deterministic::Context, validator: &Validator, who: &PublicKey, nonce: u64) {
    while validator.app().finalized_ledger().account(who).expect("account").nonce <= nonce {
        context.sleep(Duration::from_millis(100)).await;
    }
}

/// An executor that answers every task it is assigned with a made-up output.
async fn lying_executor(validator: Validator, key: SecretKey, plan_id: BlobId, first_nonce: u64) {
    let mut finalized = validator.app().subscribe();
    let mut answered = std::collections::HashSet::new();
    let mut nonce = first_nonce;
    loop {
        let ledger = validator.app().finalized_ledger();
        for id in ledger.assigned_tasks(&key.public_key()).expect("index") {
            if !answered.insert(id) {
                continue;
            }
            let task = ledger.task(&id).expect("task").expect("exists");
            let receipt = ReceiptBody {
                request_hash: id,
                model_id: task.model_id,
                level: VerifyLevel::Quorum,
                plan_id: Some(plan_id),
                input_hash: task.input_hash,
                output_hash: Digest::of("a made-up answer", id.as_bytes()),
                trace_root: Some(Digest::of("a made-up trace", id.as_bytes())),
                executor: key.public_key(),
            }
            .sign(&key)
            .expect("signed");
            let tx = Transaction {
                signer: key.public_key(),
                nonce,
                fee: 1,
                body: TxBody::SubmitReceipt { receipt },
            }
            .sign(&key, ledger.chain_id());
            validator.submit(tx).expect("admitted");
            nonce += 1;
        }
        if finalized.next().await.is_none() {
            return;
        }
    }
}

const EXECUTORS: u8 = 6;
const LIAR: u8 = 5;
const TASKS: usize = 8;
const QUORUM: u8 = 3;

/// What the quorum run ended with: each task's status, and the state root all validators agree
/// on at the end.
fn run_quorum(seed: u64, link: Link) -> (Vec<(Digest, TaskStatus, Vec<PublicKey>)>, Digest) {
    let model = digits_model();
    let inputs: Vec<(Vec<u8>, Digest, Digest)> = (0..TASKS).map(|i| digit_input(&model, i)).collect();
    deterministic_runner(seed).start(|context| async move {
        let genesis = genesis(EXECUTORS);
        let chain_id = genesis.chain_id();
        let oracle = network(&context, &link).await;
        let validators = start_all(&context, &oracle, &genesis).await;
        let all: Vec<&Validator> = validators.iter().map(|(_, v)| v).collect();
        let v0 = all[0];

        // The model is published on the ledger, and six staked executors host it.
        let publish = Transaction {
            signer: publisher().public_key(),
            nonce: 0,
            fee: 1,
            body: TxBody::PublishModel {
                model_id: model.id,
                name: "digits/mlp".parse::<ModelName>().expect("name"),
                version: "1".parse::<Version>().expect("version"),
            },
        }
        .sign(&publisher(), &chain_id);
        v0.submit(publish).expect("admitted");
        wait_for_nonce(&context, v0, &publisher().public_key(), 0).await;
        wait_for_height(&context, &all, v0.app().finalized_height()).await;
        for index in 0..EXECUTORS {
            let key = executor_secret(index);
            let register = Transaction {
                signer: key.public_key(),
                nonce: 0,
                fee: 1,
                body: TxBody::RegisterNode {
                    stake: 2_000,
                    address: format!("127.0.0.1:{}", 8000 + u16::from(index)),
                    models: vec![model.id],
                },
            }
            .sign(&key, &chain_id);
            all[usize::from(index % VALIDATORS)].submit(register).expect("admitted");
        }
        for index in 0..EXECUTORS {
            wait_for_nonce(&context, v0, &executor_secret(index).public_key(), 0).await;
        }
        assert_eq!(
            v0.app()
                .finalized_ledger()
                .eligible_hosts(&model.id)
                .expect("hosts")
                .len(),
            usize::from(EXECUTORS)
        );

        // Each executor follows a validator; the liar makes up its answers.
        for index in 0..EXECUTORS {
            let validator = all[usize::from(index % VALIDATORS)].clone();
            let key = executor_secret(index);
            let child = context.child("executor").with_attribute("index", index);
            if index == LIAR {
                let plan_id = model.plan.id();
                child.spawn(move |_| lying_executor(validator, key, plan_id, 1));
            } else {
                let config = ExecutorConfig {
                    key,
                    store: model.store.clone() as Arc<dyn BlobStore>,
                    max_blob_bytes: 1 << 26,
                    tensor_limits: TensorLimits::default(),
                    threads: 1,
                    resubmit_after_blocks: 8,
                    support: None,
                };
                child.spawn(move |context| executor::run(context, validator, config));
            }
        }

        // The user asks for quorum inferences.
        let deadline = v0.app().finalized_height() + 200;
        let mut task_ids = Vec::new();
        for (nonce, (bytes, input_hash, _)) in inputs.iter().enumerate() {
            let request = Transaction {
                signer: user().public_key(),
                nonce: nonce as u64,
                fee: 1,
                body: TxBody::RequestInference {
                    model_id: model.id,
                    input: InputRef::Inline(bytes.clone()),
                    input_hash: *input_hash,
                    k: QUORUM,
                    max_fee: 30,
                    deadline,
                },
            }
            .sign(&user(), &chain_id);
            task_ids.push(v0.submit(request).expect("admitted"));
        }

        // Every task closes on every validator.
        loop {
            let open = all.iter().any(|v| {
                let ledger = v.app().finalized_ledger();
                task_ids.iter().any(|id| {
                    ledger
                        .task(id)
                        .expect("task")
                        .is_none_or(|task| task.status == TaskStatus::Open)
                })
            });
            if !open {
                break;
            }
            context.sleep(Duration::from_millis(200)).await;
        }
        let height = all.iter().map(|v| v.app().finalized_height()).max().unwrap_or(0);
        wait_for_height(&context, &all, height).await;
        check_agreement(&all);

        let liar = executor_secret(LIAR).public_key();
        let ledger = v0.app().finalized_ledger();
        let mut outcomes = Vec::new();
        for (id, (_, _, honest_output)) in task_ids.iter().zip(&inputs) {
            let task = ledger.task(id).expect("task").expect("exists");
            if task.executors.contains(&liar) {
                assert_eq!(
                    task.status,
                    TaskStatus::Disputed,
                    "a task with the liar must not finalize"
                );
            } else {
                assert_eq!(task.status, TaskStatus::Finalized);
                assert_eq!(task.receipts.len(), usize::from(QUORUM));
                for receipt in &task.receipts {
                    assert_eq!(receipt.body.output_hash, *honest_output);
                    assert_eq!(receipt.body.plan_id, Some(model.plan.id()));
                }
            }
            outcomes.push((*id, task.status, task.executors.clone()));
        }
        check_task_proofs(&context, &genesis, v0, &task_ids, &inputs).await;
        let root = ledger.root();
        (outcomes, root)
    })
}

/// A client that trusts only the genesis validators believes each task's outcome from a proof
/// any validator gives, and refuses a proof that was tampered with or that other validators
/// would have to have signed.
async fn check_task_proofs(
    context: &deterministic::Context,
    genesis: &Genesis,
    validator: &Validator,
    task_ids: &[Digest],
    inputs: &[(Vec<u8>, Digest, Digest)],
) {
    let validators = ValidatorSet::from_genesis(genesis).expect("validator set");
    let (ledger, finality) = loop {
        if let (ledger, Some(finality)) = validator.finalized_with_proof().await {
            break (ledger, finality);
        }
        context.sleep(Duration::from_millis(50)).await;
    };
    let mut finalized_proof = None;
    for (id, (_, _, honest_output)) in task_ids.iter().zip(inputs) {
        let proof = TaskProof {
            chain_id: genesis.chain_id(),
            task_id: *id,
            task: ledger.task(id).expect("task").expect("exists"),
            finality: finality.clone(),
            state_proof: ledger.prove(&task_key(id)),
        };
        proof.verify(&validators).expect("an honest proof holds");
        match proof.task.status {
            TaskStatus::Finalized => {
                assert_eq!(proof.agreement().expect("agreement").output_hash, *honest_output);
                finalized_proof = Some(proof);
            }
            _ => assert!(matches!(proof.agreement(), Err(FinalityError::NotFinalized { .. }))),
        }
    }
    let proof = finalized_proof.expect("a finalized task");

    let mut other_status = proof.clone();
    other_status.task.status = TaskStatus::Expired;
    assert!(matches!(
        other_status.verify(&validators),
        Err(FinalityError::RecordMismatch { .. })
    ));
    let mut other_root = proof.clone();
    other_root.finality.header.state_root = Digest::of("forged", b"root");
    assert!(matches!(
        other_root.verify(&validators),
        Err(FinalityError::OtherBlock { .. })
    ));
    let mut other_task = proof.clone();
    other_task.task_id = Digest::of("forged", b"task");
    assert!(other_task.verify(&validators).is_err());
    let mut cut = proof.clone();
    cut.finality.finalization.pop();
    assert!(matches!(cut.verify(&validators), Err(FinalityError::Malformed(_))));
    let mut forged = proof.clone();
    let last = forged.finality.finalization.len() - 1;
    forged.finality.finalization[last - 40] ^= 1;
    assert!(matches!(
        forged.verify(&validators),
        Err(FinalityError::Signatures | FinalityError::Malformed(_))
    ));

    let mut other_genesis = genesis.clone();
    other_genesis.validators[0].public_key = executor_secret(0).public_key();
    let strangers = ValidatorSet::from_genesis(&other_genesis).expect("validator set");
    assert!(matches!(
        proof.verify(&strangers),
        Err(FinalityError::OtherChain { .. })
    ));
    assert!(matches!(
        strangers.verify(&proof.finality),
        Err(FinalityError::Signatures)
    ));
}

#[test]
fn quorum_tasks_finalize_under_message_loss_and_a_lying_executor_only_gets_disputes() {
    let (outcomes, root) = run_quorum(21, LOSSY_LINK);
    let liar = executor_secret(LIAR).public_key();
    assert!(
        outcomes.iter().any(|(_, _, executors)| executors.contains(&liar)),
        "the draw never picked the liar; choose another seed"
    );
    assert!(
        outcomes.iter().any(|(_, status, _)| *status == TaskStatus::Finalized),
        "no task finalized"
    );
    let again = run_quorum(21, LOSSY_LINK);
    assert_eq!(again, (outcomes, root), "the same seed gave another final state");
}
