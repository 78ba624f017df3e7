//! Validators running the ledger on simplex consensus and marshal, over commonware's simulated
//! network on the deterministic runtime.

use std::num::{NonZeroU16, NonZeroUsize};
use std::time::Duration;

use commonware_broadcast::buffered;
use commonware_codec::DecodeExt;
use commonware_consensus::marshal::core::Actor;
use commonware_consensus::marshal::resolver::p2p as marshal_resolver;
use commonware_consensus::marshal::standard::Inline;
use commonware_consensus::marshal::{Config as MarshalConfig, Start};
use commonware_consensus::simplex::Engine as SimplexEngine;
use commonware_consensus::simplex::config::{Config as SimplexConfig, Floor, ForwardPolicy, SkipBudget, SkipPolicy};
use commonware_consensus::simplex::elector::RoundRobin;
use commonware_consensus::types::{Epoch, FixedEpocher, ViewDelta};
use commonware_cryptography::blake3::Blake3;
use commonware_cryptography::certificate::ConstantProvider;
use commonware_cryptography::certificate::Verifier as _;
use commonware_cryptography::ed25519::{PrivateKey, PublicKey as ConsensusKey};
use commonware_cryptography::{Digested, Digestible, Signer};
use commonware_p2p::simulated::{self, Link, Network, Oracle};
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_runtime::{Clock, Quota, Runner, Supervisor as _, deterministic};
use commonware_storage::archive::immutable;
use commonware_utils::ordered::Set;
use commonware_utils::{NZDuration, NZU16, NZU32, NZU64, NZUsize, probability};
use vouch_crypto::{Digest, SecretKey};
use vouch_ledger::{Genesis, GenesisAccount, GenesisValidator, Params, Transaction, TxBody};
use vouch_node::chain::Scheme;
use vouch_node::chain::app::{LedgerApp, genesis_block};

const NAMESPACE: &[u8] = b"vouch-test";
const PAGE_SIZE: NonZeroU16 = NZU16!(1024);
const PAGE_CACHE_SIZE: NonZeroUsize = NZUsize!(10);
const QUOTA: Quota = Quota::per_second(NZU32!(1_024));
const MAX_MESSAGE_BYTES: u32 = 1024 * 1024;
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
const TRANSFERS: u64 = 20;
const AMOUNT: u64 = 10;

fn recipient() -> SecretKey {
    SecretKey::from_seed([50; 32])
}

/// What one validator finalized: (height, state root) per block, and how many transactions.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    chain: Vec<(u64, Digest)>,
    transactions: usize,
    recipient_balance: u64,
}

fn validator_secret(index: u8) -> [u8; 32] {
    [200 + index; 32]
}

fn user() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

fn genesis(validators: u8) -> Genesis {
    Genesis {
        chain_name: "simulation".into(),
        params: Params::default(),
        validators: (0..validators)
            .map(|index| GenesisValidator {
                public_key: SecretKey::from_seed(validator_secret(index)).public_key(),
                p2p_address: format!("127.0.0.1:{}", 9000 + u16::from(index)),
                api_address: format!("127.0.0.1:{}", 7000 + u16::from(index)),
                stake: 10_000,
            })
            .collect(),
        accounts: vec![GenesisAccount {
            public_key: user().public_key(),
            balance: 1_000_000,
        }],
    }
}

fn consensus_key(index: u8) -> PrivateKey {
    PrivateKey::decode(bytes::Bytes::copy_from_slice(&validator_secret(index))).expect("32-byte seed")
}

/// The configuration of one of a validator's immutable archives (finalizations or blocks).
fn archive_config<C>(prefix: &str, name: &str, page_cache: &CacheRef, codec_config: C) -> immutable::Config<C> {
    immutable::Config {
        metadata_partition: format!("{prefix}-{name}-metadata"),
        freezer_table_partition: format!("{prefix}-{name}-freezer-table"),
        freezer_table_initial_size: 64,
        freezer_table_resize_frequency: 10,
        freezer_table_resize_chunk_size: 10,
        freezer_key_partition: format!("{prefix}-{name}-freezer-key"),
        freezer_key_page_cache: page_cache.clone(),
        freezer_value_partition: format!("{prefix}-{name}-freezer-value"),
        freezer_value_target_size: 1024 * 1024,
        freezer_value_compression: None,
        ordinal_partition: format!("{prefix}-{name}-ordinal"),
        items_per_section: NZU64!(1024),
        codec_config,
        replay_buffer: NZUsize!(1024 * 1024),
        freezer_key_write_buffer: NZUsize!(1024 * 1024),
        freezer_value_write_buffer: NZUsize!(1024 * 1024),
        ordinal_write_buffer: NZUsize!(1024 * 1024),
    }
}

/// Starts one validator: marshal (with its resolver, buffer and archives), the ledger
/// application, and the simplex engine, on channels 0 to 4 of the simulated network.
async fn start_validator(
    context: deterministic::Context,
    oracle: &mut Oracle<ConsensusKey, deterministic::Context>,
    genesis: &Genesis,
    participants: &Set<ConsensusKey>,
    index: u8,
) -> LedgerApp {
    let private = consensus_key(index);
    let public = private.public_key();
    let scheme = Scheme::signer(NAMESPACE, participants.clone(), private).expect("a participant");
    let app = LedgerApp::new(genesis, SecretKey::from_seed(validator_secret(index)).public_key());
    let genesis_block = genesis_block(genesis);
    let prefix = format!("validator-{index}");
    let page_cache = CacheRef::new(PAGE_SIZE, PAGE_CACHE_SIZE);
    let control = oracle.control(public.clone());

    let marshal_config = MarshalConfig {
        provider: ConstantProvider::new(scheme.clone()),
        epocher: FixedEpocher::new(NZU64!(u64::MAX / 2)),
        start: Start::Genesis(Digested::precomputed(genesis_block.clone(), genesis_block.digest())),
        mailbox_size: NZUsize!(1024),
        view_retention: ViewDelta::new(10),
        max_repair: NZUsize!(10),
        max_pending_acks: NZUsize!(1),
        block_codec_config: (),
        partition_prefix: prefix.clone(),
        prunable_items_per_section: NZU64!(10),
        replay_buffer: NZUsize!(1024 * 1024),
        key_write_buffer: NZUsize!(1024 * 1024),
        value_write_buffer: NZUsize!(1024 * 1024),
        page_cache: page_cache.clone(),
        strategy: Sequential,
    };
    let backfill = control.register(3, QUOTA).await.expect("channel");
    let resolver = marshal_resolver::init(
        context.child("resolver"),
        marshal_resolver::Config {
            public_key: public.clone(),
            peer_provider: oracle.manager(),
            blocker: control.clone(),
            mailbox_size: NZUsize!(1024),
            fetch_timeout: NZDuration!(Duration::from_secs(2)),
            fetch_retry_delay: Duration::from_millis(100),
            priority_requests: false,
            priority_responses: false,
        },
        backfill,
    );
    let (broadcast_engine, buffer) = buffered::Engine::new(
        context.child("broadcast"),
        buffered::Config {
            public_key: public.clone(),
            mailbox_size: NZUsize!(1024),
            deque_size: 10,
            priority: false,
            codec_config: (),
            peer_provider: oracle.manager(),
            strategy: Sequential,
        },
    );
    broadcast_engine.start(control.register(4, QUOTA).await.expect("channel"));

    let finalizations = immutable::Archive::init(
        context.child("finalizations"),
        archive_config(
            &prefix,
            "finalizations",
            &page_cache,
            Scheme::certificate_codec_config_unbounded(),
        ),
    )
    .await
    .expect("finalizations archive");
    let blocks = immutable::Archive::init(
        context.child("blocks"),
        archive_config(&prefix, "blocks", &page_cache, ()),
    )
    .await
    .expect("blocks archive");
    let (actor, marshal, _floor) = Actor::init(context.child("marshal"), finalizations, blocks, marshal_config).await;
    actor.start(app.clone(), buffer, resolver);

    let wrapper = Inline::new(
        context.child("inline"),
        app.clone(),
        marshal,
        FixedEpocher::new(NZU64!(u64::MAX / 2)),
    );
    let engine = SimplexEngine::new(
        context.child("simplex"),
        SimplexConfig {
            scheme,
            elector: RoundRobin::<Blake3>::default(),
            blocker: control.clone(),
            automaton: wrapper.clone(),
            relay: wrapper.clone(),
            reporter: wrapper,
            strategy: Sequential,
            partition: format!("{prefix}-simplex"),
            mailbox_size: NZUsize!(1024),
            epoch: Epoch::zero(),
            floor: Floor::Genesis(genesis_block.digest()),
            replay_buffer: NZUsize!(1024 * 1024),
            write_buffer: NZUsize!(1024 * 1024),
            page_cache,
            leader_timeout: Duration::from_secs(1),
            certification_timeout: Duration::from_secs(2),
            timeout_retry: Duration::from_secs(3),
            view_retention: ViewDelta::new(10),
            skip: SkipPolicy::Enabled {
                timeout: Duration::from_secs(5),
                budget: SkipBudget::Participants,
            },
            fetch_timeout: NZDuration!(Duration::from_secs(1)),
            fetch_retry_delay: Duration::from_millis(100),
            forward: ForwardPolicy::Disabled,
            track_historical_votes: false,
        },
    );
    engine.start(
        control.register(0, QUOTA).await.expect("channel"),
        control.register(1, QUOTA).await.expect("channel"),
        control.register(2, QUOTA).await.expect("channel"),
    );
    app
}

/// Runs four validators over `link` until each has finalized `blocks` blocks, with transfers
/// submitted to every validator; returns what each finalized.
fn run(seed: u64, blocks: u64, link: Link) -> Vec<Outcome> {
    let runner = deterministic::Runner::new(
        deterministic::Config::new()
            .with_seed(seed)
            .with_timeout(Some(Duration::from_secs(300))),
    );
    runner.start(|context| async move {
        let genesis = genesis(4);
        let keys: Vec<ConsensusKey> = (0..4).map(|i| consensus_key(i).public_key()).collect();
        let participants = Set::try_from(keys.clone()).expect("distinct keys");
        let (network, mut oracle) = Network::new_with_peers(
            context.child("network"),
            simulated::Config {
                max_size: MAX_MESSAGE_BYTES,
                max_peers_per_set: NZUsize!(4),
                disconnect_on_block: true,
                tracked_peer_sets: NZUsize!(1),
            },
            participants.iter().cloned(),
        )
        .await;
        network.start();
        let mut apps = Vec::new();
        for index in 0..4u8 {
            let app = start_validator(
                context.child(["v0", "v1", "v2", "v3"][usize::from(index)]),
                &mut oracle,
                &genesis,
                &participants,
                index,
            )
            .await;
            apps.push(app);
        }
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
        let chain_id = genesis.chain_id();
        for nonce in 0..TRANSFERS {
            let tx = Transaction {
                signer: user().public_key(),
                nonce,
                fee: 1,
                body: TxBody::Transfer {
                    to: recipient().public_key(),
                    amount: AMOUNT,
                },
            }
            .sign(&user(), &chain_id);
            // Every validator may lead a view, so each one hears of the transaction.
            for app in &apps {
                app.submit(tx.clone()).expect("admitted");
            }
        }
        loop {
            if apps.iter().all(|app| app.finalized_height() >= blocks) {
                break;
            }
            context.sleep(Duration::from_millis(100)).await;
        }
        apps.iter()
            .map(|app| {
                let finalized: Vec<_> = app.finalized().into_iter().take(blocks as usize).collect();
                Outcome {
                    chain: finalized.iter().map(|f| (f.height, f.state_root)).collect(),
                    transactions: finalized.iter().map(|f| f.tx_count).sum(),
                    recipient_balance: app
                        .finalized_ledger()
                        .account(&recipient().public_key())
                        .expect("account")
                        .balance,
                }
            })
            .collect()
    })
}

fn check_agreement(outcomes: &[Outcome], blocks: u64) {
    for other in &outcomes[1..] {
        assert_eq!(
            other.chain, outcomes[0].chain,
            "validators disagree on the finalized chain"
        );
    }
    assert_eq!(outcomes[0].chain.len() as u64, blocks);
    let heights: Vec<u64> = outcomes[0].chain.iter().map(|(height, _)| *height).collect();
    assert_eq!(heights, (1..=blocks).collect::<Vec<_>>());
    assert_eq!(
        outcomes[0].transactions as u64, TRANSFERS,
        "every transfer is finalized once"
    );
    for outcome in outcomes {
        assert_eq!(outcome.recipient_balance, TRANSFERS * AMOUNT);
    }
}

#[test]
fn four_validators_finalize_the_same_ledger_and_the_same_seed_repeats_it() {
    let first = run(7, 12, LINK);
    check_agreement(&first, 12);
    let again = run(7, 12, LINK);
    assert_eq!(again, first, "the same seed gave another chain");
}

#[test]
fn the_ledger_finalizes_under_message_loss_and_latency() {
    let outcomes = run(11, 12, LOSSY_LINK);
    check_agreement(&outcomes, 12);
}
