//! `vouch node --genesis FILE --peers KEY@IP:PORT`: validators whose genesis p2p addresses no
//! longer hold still form the chain when each is told where the other listens, and a bad
//! `--peers` is refused with one line.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use vouch_client::Client;
use vouch_crypto::SecretKey;
use vouch_ledger::{Genesis, GenesisAccount, GenesisValidator, Params};

fn base_port() -> u16 {
    // Below the devnet test's range; node i listens for peers on BASE+i.
    21_000 + (std::process::id() % 4_000) as u16 * 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validators_with_stale_genesis_addresses_finalize_when_given_their_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys: Vec<SecretKey> = (0..2).map(|i| SecretKey::from_seed([90 + i; 32])).collect();
    for (index, key) in keys.iter().enumerate() {
        let data_dir = dir.path().join(format!("node-{index}"));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        key.save(&data_dir.join(vouch_node::NODE_KEY_FILE)).expect("key");
    }
    // The genesis names addresses where nobody listens (ports 1 and 2).
    let genesis = Genesis {
        chain_name: "moved".into(),
        params: Params::default(),
        validators: keys
            .iter()
            .enumerate()
            .map(|(index, key)| GenesisValidator {
                public_key: key.public_key(),
                p2p_address: format!("127.0.0.1:{}", index + 1),
                api_address: format!("127.0.0.1:{}", index + 1),
                stake: 10_000,
            })
            .collect(),
        accounts: vec![GenesisAccount {
            public_key: keys[0].public_key(),
            balance: 1_000,
        }],
    };
    let genesis_path = dir.path().join("genesis.json");
    std::fs::write(&genesis_path, genesis.to_json()).expect("genesis");
    let genesis_arg = genesis_path.to_str().expect("utf8");
    let p2p = |index: usize| format!("127.0.0.1:{}", base_port() + index as u16);

    // A --peers entry that is not a validator, or not KEY@IP:PORT, is one clear line.
    let stranger = SecretKey::from_seed([7; 32]).public_key();
    for (peers, error) in [
        (format!("{stranger}@127.0.0.1:9"), "not a validator"),
        ("nonsense".to_string(), "PUBLIC_KEY@IP:PORT"),
    ] {
        let output = Command::new(common::VOUCH)
            .args(["node", "--api", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("node-0"))
            .args(["--genesis", genesis_arg, "--peers", &peers])
            .output()
            .expect("runs");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(error), "{peers}: {stderr}");
    }

    let nodes: Vec<common::NodeProcess> = (0..2)
        .map(|index| {
            let other = 1 - index;
            let peers = format!("{}@{}", keys[other].public_key(), p2p(other));
            common::NodeProcess::start(
                &dir.path().join(format!("node-{index}")),
                &["--genesis", genesis_arg, "--p2p", &p2p(index), "--peers", &peers],
            )
        })
        .collect();
    let client = Client::new(&nodes[0].url).expect("client");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let height = client
            .chain_status()
            .await
            .ok()
            .and_then(|status| status["height"].as_u64());
        if height.is_some_and(|height| height >= 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two validators never finalized (height {height:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
