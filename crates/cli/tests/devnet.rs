//! `vouch devnet` with real processes: four validators finalize transfers submitted over HTTP;
//! a model is published with its exact plan and replicated; a copy flawed on a node is found
//! by its next pull and restored from a replica by the one after; quorum inference from the CLI is
//! proven and checked; 100 quorum inferences run while one node is SIGKILLed, the rest keep
//! finalizing, the devnet restarts it and it catches up; and a second run on the same directory
//! resumes the same chain with nothing lost.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vouch_client::Client;
use vouch_crypto::{PublicKey, SecretKey};
use vouch_ledger::{Transaction, TxBody};
use vouch_node::chain::finality::{TaskProof, ValidatorSet};

const NODES: usize = 4;
/// Quorum inferences the test runs.
const TASKS: usize = 100;
/// Of those, how many send their input as a blob rather than inline.
const BLOB_INPUTS: usize = 5;
/// Blocks the executors have for a task: far more than a restart takes.
const TASK_DEADLINE_BLOCKS: u64 = 5_000;
const AMOUNT: u64 = 7;
/// More than the dev account holds.
const DEV_BALANCE_TOO_MUCH: u64 = 10_000_000_000_000;

struct Devnet {
    child: Child,
    lines: mpsc::Receiver<String>,
    urls: Vec<String>,
    pids: Vec<i32>,
}

impl Drop for Devnet {
    /// A failed test must not leave the devnet's processes running: SIGTERM stops them all.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

fn base_port() -> u16 {
    // Spread concurrent runs apart; node i uses BASE+i and BASE+100+i.
    30_000 + (std::process::id() % 150) as u16 * 200
}

fn read_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

fn next_line(lines: &mpsc::Receiver<String>, timeout: Duration) -> String {
    lines.recv_timeout(timeout).expect("a line from the devnet in time")
}

/// `node I: URL pid PID …` → (I, URL, PID).
fn parse_node_line(line: &str) -> (usize, String, i32) {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[0], "node", "unexpected line {line:?}");
    let index = words[1].trim_end_matches(':').parse().expect("index");
    let pid = words[4].parse().expect("pid");
    (index, words[2].to_string(), pid)
}

fn start(dir: &std::path::Path) -> Devnet {
    let mut child = Command::new(common::VOUCH)
        .args([
            "devnet",
            "--nodes",
            "4",
            "--base-port",
            &base_port().to_string(),
            // Two replicas besides the node a model is pushed to leave at least one node that
            // holds none of it, to show a pull fetching from a replica.
            "--replication",
            "2",
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("devnet starts");
    let lines = read_lines(child.stdout.take().expect("stdout"));
    let startup = Duration::from_secs(180);
    assert!(next_line(&lines, startup).starts_with("vouch devnet: 4 validators"));
    assert!(next_line(&lines, startup).starts_with("dev key: "));
    let mut urls = Vec::new();
    let mut pids = Vec::new();
    for expected in 0..NODES {
        let (index, url, pid) = parse_node_line(&next_line(&lines, startup));
        assert_eq!(index, expected);
        urls.push(url);
        pids.push(pid);
    }
    Devnet {
        child,
        lines,
        urls,
        pids,
    }
}

fn signal(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn balance(url: &str, who: &PublicKey) -> Option<u64> {
    let account = Client::new(url).ok()?.chain_account(who).await.ok()?;
    account["balance"].as_u64()
}

async fn height(url: &str) -> Option<u64> {
    Client::new(url).ok()?.chain_status().await.ok()?["height"].as_u64()
}

async fn wait_for_balance(urls: &[String], who: &PublicKey, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    for url in urls {
        while balance(url, who).await != Some(expected) {
            assert!(Instant::now() < deadline, "{url} never showed balance {expected}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The dev account as a CLI user (its own VOUCH_HOME holding `dev.key` as its key), at `url`.
fn dev_user(dir: &std::path::Path, url: &str) -> common::User {
    let home = dir.join("dev-home");
    std::fs::create_dir_all(&home).expect("home");
    if !home.join("key.pem").exists() {
        std::fs::copy(dir.join("dev.key"), home.join("key.pem")).expect("key");
    }
    common::User::new(&home, url)
}

/// Waits until node `url`'s registry, which follows the ledger, shows `reference` as `id`.
async fn wait_for_model(url: &str, reference: &str, id: &str) {
    let client = Client::new(url).expect("client");
    let reference: vouch_types::ModelRef = reference.parse().expect("reference");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(view) = client.show_model(&reference).await {
            assert_eq!(view.id.to_string(), id, "{url} resolves {reference} to another model");
            return;
        }
        assert!(Instant::now() < deadline, "{url} never listed {reference}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the two replicas the ledger drew for model `id` confirm it; returns their keys.
async fn wait_for_replicas(client: &Client, id: &str) -> Vec<String> {
    let parsed_id: vouch_types::ModelId = id.parse().expect("model id");
    let deadline = Instant::now() + Duration::from_secs(180);
    let record = loop {
        let record = client.chain_model(&parsed_id).await.expect("published on the ledger");
        if record["model"]["confirmed"].as_array().expect("confirmed").len() == 2 {
            break record;
        }
        assert!(Instant::now() < deadline, "the replicas never confirmed: {record}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    record["model"]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|key| key.as_str().expect("key").to_string())
        .collect()
}

/// Row `row` of `digits` as a one-digit input named as the model names it.
fn digit_row(digits: &vouch_tensor::NamedTensor, row: usize) -> vouch_tensor::NamedTensor {
    let vouch_tensor::TensorData::F32(values) = digits.tensor.data() else {
        panic!("float digits");
    };
    vouch_tensor::NamedTensor {
        name: digits.name.clone(),
        tensor: vouch_tensor::Tensor::new(
            vec![1, 64],
            vouch_tensor::TensorData::F32(values[row * 64..(row + 1) * 64].to_vec()),
        )
        .expect("tensor"),
    }
}

/// Waits until node `url`'s finalized ledger shows every task in `tasks` finalized.
async fn wait_for_tasks(url: &str, tasks: &[vouch_crypto::Digest]) {
    let client = Client::new(url).expect("client");
    let deadline = Instant::now() + Duration::from_secs(300);
    for id in tasks {
        loop {
            let status = match client.chain_task(id).await {
                Ok(answer) => answer["task"]["status"].as_str().map(str::to_string),
                Err(_) => None,
            };
            match status.as_deref() {
                Some("finalized") => break,
                Some("open") | None => {}
                Some(other) => panic!("task {id} is {other} on {url}"),
            }
            assert!(Instant::now() < deadline, "task {id} never finalized on {url}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn send_transfers(
    url: &str,
    dev: &SecretKey,
    chain_id: &vouch_crypto::Digest,
    nonces: std::ops::Range<u64>,
    to: &PublicKey,
) {
    let client = Client::new(url).expect("client");
    for nonce in nonces {
        let tx = Transaction {
            signer: dev.public_key(),
            nonce,
            fee: 1,
            body: TxBody::Transfer {
                to: *to,
                amount: AMOUNT,
            },
        }
        .sign(dev, chain_id);
        client.submit_transaction(tx.encode()).await.expect("submitted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_node_devnet_survives_a_killed_node_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut devnet = start(dir.path());
    let dev = SecretKey::load(&dir.path().join("dev.key")).expect("dev key");
    let genesis =
        vouch_ledger::Genesis::from_json(&std::fs::read_to_string(dir.path().join("genesis.json")).expect("genesis"))
            .expect("parses");
    let chain_id = genesis.chain_id();
    let recipient = SecretKey::from_seed([77; 32]).public_key();

    // A malformed transaction is refused with a clear error and changes nothing.
    let refused = Client::new(&devnet.urls[0])
        .expect("client")
        .submit_transaction(b"not a transaction".to_vec())
        .await;
    assert!(refused.expect_err("refused").to_string().contains("transaction"));

    send_transfers(&devnet.urls[0], &dev, &chain_id, 0..10, &recipient).await;
    wait_for_balance(&devnet.urls, &recipient, 10 * AMOUNT).await;

    // Queries name what was wrong; a replayed nonce is refused.
    let http = reqwest::Client::new();
    let unknown_task = vouch_crypto::Digest::of("no such task", b"");
    for (path, status, code) in [
        (format!("/v1/chain/tasks/{unknown_task}"), 404, "unknown_task"),
        ("/v1/chain/tasks/xyz".to_string(), 400, "invalid_task_id"),
        ("/v1/chain/accounts/xyz".to_string(), 400, "invalid_public_key"),
    ] {
        let response = http
            .get(format!("{}{path}", devnet.urls[0]))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], code, "{path}");
    }
    let replayed = Transaction {
        signer: dev.public_key(),
        nonce: 0,
        fee: 1,
        body: TxBody::Transfer {
            to: recipient,
            amount: AMOUNT,
        },
    }
    .sign(&dev, &chain_id);
    let response = http
        .post(format!("{}/v1/chain/transactions", devnet.urls[2]))
        .body(replayed.encode())
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 422);
    let account = Client::new(&devnet.urls[2])
        .expect("client")
        .chain_account(&dev.public_key())
        .await
        .expect("account");
    assert_eq!(account["nonce"].as_u64(), Some(10));

    // A model pushed through node 0 with its exact plan is published on the ledger, fetched
    // and confirmed by the two replicas drawn for it, and listed by every node.
    let dev_cli = dev_user(dir.path(), &devnet.urls[0]);
    let model_file = common::fixture("digits_mlp_v1.onnx");
    let calibration = common::data("digits_calibration.npz");
    let push_v1 = || {
        dev_cli
            .run(&[
                "model",
                "push",
                model_file.to_str().expect("utf8"),
                "--name",
                "acme/digits",
                "--version",
                "1.0.0",
                "--calibration",
                calibration.to_str().expect("utf8"),
                "--json",
            ])
            .ok()
            .json()
    };
    let pushed = push_v1();
    let model_id = pushed["id"].as_str().expect("model id").to_string();
    let file_blob = pushed["blob"].as_str().expect("file blob").to_string();
    let client0 = Client::new(&devnet.urls[0]).expect("client");
    let replicas = wait_for_replicas(&client0, &model_id).await;
    let parsed_id: vouch_types::ModelId = model_id.parse().expect("model id");
    for url in &devnet.urls {
        wait_for_model(url, "acme/digits@1.0.0", &model_id).await;
    }
    // Pushing the same model again changes nothing.
    let again = push_v1();
    assert_eq!(again["id"].as_str(), Some(model_id.as_str()));
    assert_eq!(again["created"].as_bool(), Some(false));
    // The same name and version with other bytes is refused by the ledger's rules.
    dev_cli
        .run(&[
            "model",
            "push",
            common::fixture("digits_mlp_v2.onnx").to_str().expect("utf8"),
            "--name",
            "acme/digits",
            "--version",
            "1.0.0",
        ])
        .failed_with("already published");

    // A node that is neither a replica nor the one pushed to holds none of a model's bytes,
    // and serves a pull by fetching them from a replica, verified. Then a byte flipped in the
    // copy it fetched: its next pull fails and the copy is put aside; the pull after that
    // fetches the bytes again from a replica and is whole. The digits model is 10 kB, so the
    // node finds the flaw before it sends a byte. A second model, the same file with a 1.5 MB
    // doc string appended (still a valid ONNX file), is flawed past the node's first 1 MiB
    // chunk of the stream, so the node finds it mid-stream.
    let bystander_of = |replicas: &[String]| {
        (1..NODES)
            .find(|&i| !replicas.contains(&genesis.validators[i].public_key.to_string()))
            .expect("a node that is not a replica")
    };
    let bystander = bystander_of(&replicas);
    let mut padded = std::fs::read(&model_file).expect("fixture");
    let doc_string = vec![b'x'; 1_500_000];
    padded.push(6 << 3 | 2); // ModelProto field 6, doc_string, length-delimited
    let mut length = doc_string.len();
    while length >= 0x80 {
        padded.push((length & 0x7f) as u8 | 0x80);
        length >>= 7;
    }
    padded.push(length as u8);
    padded.extend_from_slice(&doc_string);
    let padded_file = dir.path().join("padded.onnx");
    std::fs::write(&padded_file, &padded).expect("padded model");
    let padded_push = dev_cli
        .run(&[
            "model",
            "push",
            padded_file.to_str().expect("utf8"),
            "--name",
            "acme/padded",
            "--version",
            "1",
            "--json",
        ])
        .ok()
        .json();
    let padded_replicas = wait_for_replicas(&client0, padded_push["id"].as_str().expect("id")).await;
    let pulled = dir.path().join("pulled.onnx");
    for (node, reference, blob, original, flawed_byte) in [
        (bystander, "acme/digits@1.0.0", file_blob.as_str(), &model_file, 100),
        (
            bystander_of(&padded_replicas),
            "acme/padded@1",
            padded_push["blob"].as_str().expect("blob"),
            &padded_file,
            1_200_000,
        ),
    ] {
        let peer_probe = http
            .get(format!("{}/v1/blobs/{blob}", devnet.urls[node]))
            .header(vouch_client::PEER_FETCH_HEADER, "1")
            .send()
            .await
            .expect("answer");
        assert_eq!(
            peer_probe.status().as_u16(),
            404,
            "{reference}: the bystander already held the model"
        );
        let pull = || {
            let _ = std::fs::remove_file(&pulled);
            dev_user(dir.path(), &devnet.urls[node]).run(&[
                "model",
                "pull",
                reference,
                "-o",
                pulled.to_str().expect("utf8"),
            ])
        };
        let original = std::fs::read(original).expect("original");
        pull().ok();
        assert!(
            std::fs::read(&pulled).expect("pulled") == original,
            "{reference}: the pull is byte-identical"
        );
        let stored = common::blob_file(&dir.path().join(format!("node-{node}")), blob);
        let mut bytes = std::fs::read(&stored).expect("the bystander holds the fetched copy");
        bytes[flawed_byte] ^= 0x01;
        std::fs::write(&stored, &bytes).expect("flaw the copy");
        pull().failed_with("corrupt");
        assert!(!pulled.exists(), "{reference}: a failed pull leaves no file");
        pull().ok();
        assert!(
            std::fs::read(&pulled).expect("pulled") == original,
            "{reference}: the copy fetched again from a replica is byte-identical"
        );
        assert!(
            std::fs::read(&stored).expect("restored") == original,
            "{reference}: the bystander's store holds good bytes again"
        );
    }

    // Quorum inference from the CLI: the ledger draws two executors among the replicas, both
    // run the exact plan, and the CLI believes the answer only after checking the finalization
    // certificate against the genesis validators, the task against the certified state root,
    // and the outputs (fetched from a node) against the hash the receipts agree on.
    let genesis_path = dir.path().join("genesis.json");
    let genesis_arg = genesis_path.to_str().expect("utf8");
    let digits = common::digits(TASKS);
    let one_digit = dir.path().join("digit.npy");
    vouch_tensor::write_tensor_file(&one_digit, std::slice::from_ref(&digit_row(&digits, 0))).expect("written");
    let one_digit_arg = one_digit.to_str().expect("utf8");
    let proof_path = dir.path().join("quorum.json");
    let proof_arg = proof_path.to_str().expect("utf8");
    let outputs_path = dir.path().join("quorum-out.npy");
    let infer_quorum = |k: &str, extra: &[&str]| {
        let mut args = vec![
            "infer",
            "acme/digits@1.0.0",
            "--input",
            one_digit_arg,
            "--verify",
            "quorum",
            "--k",
            k,
        ];
        args.extend_from_slice(extra);
        dev_cli.run(&args)
    };
    let outputs_arg = outputs_path.to_str().expect("utf8");
    let answer = infer_quorum(
        "2",
        &[
            "--genesis",
            genesis_arg,
            "--receipt",
            proof_arg,
            "-o",
            outputs_arg,
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(answer["executors"].as_array().map(Vec::len), Some(2));
    let local = dev_cli
        .run(&[
            "run",
            "acme/digits@1.0.0",
            "--input",
            one_digit_arg,
            "--exact",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        answer["output_hash"], local["output_hash"],
        "the quorum's answer is the exact plan's"
    );
    assert_eq!(answer["trace_root"], local["trace_root"]);
    dev_cli
        .run(&[
            "verify",
            proof_arg,
            "--genesis",
            genesis_arg,
            "--input",
            one_digit_arg,
            "--output",
            outputs_arg,
        ])
        .ok();
    // A proof edited after the fact, or checked against another chain's validators, fails.
    let proof: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&proof_path).expect("proof")).expect("json");
    let edited_path = dir.path().join("edited.json");
    let edited_arg = edited_path.to_str().expect("utf8");
    for (pointer, value, error) in [
        ("/task/status", "disputed", "differs from the one claimed"),
        (
            "/finality/header/state_root",
            "0000000000000000000000000000000000000000000000000000000000000000",
            "certificate finalizes block",
        ),
    ] {
        let mut edited = proof.clone();
        *edited.pointer_mut(pointer).expect("field") = serde_json::Value::from(value);
        std::fs::write(&edited_path, edited.to_string()).expect("written");
        dev_cli
            .run(&["verify", edited_arg, "--genesis", genesis_arg])
            .failed_with(error);
    }
    let mut stranger = genesis.clone();
    stranger.accounts.clear();
    let stranger_path = dir.path().join("other-genesis.json");
    std::fs::write(&stranger_path, stranger.to_json()).expect("written");
    dev_cli
        .run(&["verify", proof_arg, "--genesis", stranger_path.to_str().expect("utf8")])
        .failed_with("the proof is for chain");
    // Asking for more executors than host the model is refused before anything is paid.
    infer_quorum("3", &[]).failed_with("eligible hosts, fewer than the 3 asked for");

    // 100 quorum inferences sent to node 1 (the last five with their inputs as blobs); node 3
    // is SIGKILLed halfway. The other three keep
    // finalizing, and the devnet restarts node 3.
    let client1 = Client::new(&devnet.urls[1]).expect("client");
    let mut nonce = client1.chain_account(&dev.public_key()).await.expect("account")["nonce"]
        .as_u64()
        .expect("nonce");
    let start_height = height(&devnet.urls[1]).await.expect("height");
    let mut tasks = Vec::new();
    for row in 0..TASKS {
        if row == TASKS / 2 {
            signal(devnet.pids[3], "-KILL");
        }
        let input = digit_row(&digits, row);
        let encoded = vouch_tensor::write_npz(std::slice::from_ref(&input)).expect("npz");
        // The last few go as blobs uploaded to node 1, which executors fetch from their peers.
        let input_ref = if row >= TASKS - BLOB_INPUTS {
            vouch_ledger::InputRef::Blob(client1.put_blob_bytes(encoded).await.expect("uploaded").id)
        } else {
            vouch_ledger::InputRef::Inline(encoded)
        };
        let request = Transaction {
            signer: dev.public_key(),
            nonce,
            fee: 1,
            body: TxBody::RequestInference {
                model_id: parsed_id,
                input: input_ref,
                input_hash: vouch_verify::tensors_hash(std::slice::from_ref(&input)),
                k: 2,
                max_fee: 20,
                deadline: start_height + TASK_DEADLINE_BLOCKS,
            },
        }
        .sign(&dev, &chain_id);
        tasks.push(request.id());
        client1.submit_transaction(request.encode()).await.expect("submitted");
        nonce += 1;
    }
    let before = height(&devnet.urls[0]).await.expect("height");
    send_transfers(&devnet.urls[1], &dev, &chain_id, nonce..nonce + 10, &recipient).await;
    wait_for_balance(&devnet.urls[..3], &recipient, 20 * AMOUNT).await;
    assert!(height(&devnet.urls[0]).await.expect("height") > before);
    let (index, _, _) = parse_node_line(&next_line(&devnet.lines, Duration::from_secs(30)));
    assert_eq!(index, 3);
    wait_for_balance(&devnet.urls[3..], &recipient, 20 * AMOUNT).await;

    // Every task finalizes (those drawn to node 3 once it is back), and the restarted node
    // proves each of them to a client that trusts only the genesis validators.
    let validators = ValidatorSet::from_genesis(&genesis).expect("validator set");
    for url in [&devnet.urls[0], &devnet.urls[3]] {
        wait_for_tasks(url, &tasks).await;
    }
    let client3 = Client::new(&devnet.urls[3]).expect("client");
    let mut agreed = Vec::new();
    for id in &tasks {
        let proof: TaskProof =
            serde_json::from_value(client3.chain_task_proof(id).await.expect("proof")).expect("parses");
        proof.verify(&validators).expect("the proof holds");
        agreed.push(proof.agreement().expect("finalized and agreed").output_hash);
    }
    assert_eq!(
        agreed[0].to_string(),
        answer["output_hash"].as_str().expect("hash"),
        "the same digit gives the same answer"
    );
    // A node that executed none of them serves their outputs, fetched from an executor.
    let outputs_from = Client::new(&devnet.urls[bystander]).expect("client");
    for (id, agreed) in tasks.iter().zip(&agreed).take(3) {
        let blob = outputs_from.chain_task_output(id).await.expect("outputs");
        let bytes = outputs_from.get_blob_bytes(&blob, 1 << 20).await.expect("bytes");
        let outputs = vouch_tensor::read_npz(&bytes, &vouch_tensor::TensorLimits::default()).expect("npz");
        assert_eq!(vouch_verify::tensors_hash(&outputs), *agreed);
    }

    // SIGTERM stops everything cleanly.
    let last_height = height(&devnet.urls[0]).await.expect("height");
    signal(devnet.child.id() as i32, "-TERM");
    let status = devnet.child.wait().expect("devnet exits");
    assert!(status.success(), "devnet exited with {status}");

    // Run again on the same directory: the same chain, with nothing lost.
    let mut resumed = start(dir.path());
    wait_for_balance(&resumed.urls, &recipient, 20 * AMOUNT).await;
    wait_for_tasks(&resumed.urls[2], &tasks).await;
    for url in &resumed.urls {
        wait_for_model(url, "acme/digits@1.0.0", &model_id).await;
    }
    let status = Client::new(&resumed.urls[0])
        .expect("client")
        .chain_status()
        .await
        .expect("status");
    assert_eq!(status["chain_id"].as_str(), Some(chain_id.to_string().as_str()));
    assert!(
        status["height"].as_u64().expect("height") >= last_height,
        "the resumed chain went back"
    );

    // The ledger commands of the CLI, signed with --key's account.
    let cli = dev_user(dir.path(), &resumed.urls[1]);
    let recipient_hex = recipient.to_string();
    cli.run(&["transfer", &recipient_hex, "5", "--json"]).ok();
    let shown = cli.run(&["account", &recipient_hex, "--json"]).ok().json();
    assert_eq!(shown["balance"].as_u64(), Some(20 * AMOUNT + 5));
    cli.run(&["transfer", &recipient_hex, &DEV_BALANCE_TOO_MUCH.to_string()])
        .failed_with("insufficient funds");
    cli.run(&["stake", "2000"]).failed_with("--address");
    cli.run(&["stake", "2000", "--address", "127.0.0.1:9"]).ok();
    let mine = cli.run(&["account", "--json"]).ok().json();
    assert_eq!(mine["node"]["stake"].as_u64(), Some(2000));
    assert_eq!(mine["node"]["address"].as_str(), Some("127.0.0.1:9"));
    cli.run(&["stake", "500", "--unstake"]).ok();
    let mine = cli.run(&["account", "--json"]).ok().json();
    assert_eq!(mine["node"]["stake"].as_u64(), Some(1500));
    let unknown_task = vouch_crypto::Digest::of("no such task", b"").to_string();
    cli.run(&["task", "show", &unknown_task]).failed_with("no task");

    signal(resumed.child.id() as i32, "-TERM");
    assert!(resumed.child.wait().expect("devnet exits").success());
}
