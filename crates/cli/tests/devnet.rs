//! `vouch devnet` with real processes: four validators finalize transfers submitted over HTTP,
//! one is SIGKILLed and the rest keep finalizing, the devnet restarts it and it catches up, and a
//! second run on the same directory resumes the same chain.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vouch_client::Client;
use vouch_crypto::{PublicKey, SecretKey};
use vouch_ledger::{Transaction, TxBody};

const NODES: usize = 4;
const AMOUNT: u64 = 7;

struct Devnet {
    child: Child,
    lines: mpsc::Receiver<String>,
    urls: Vec<String>,
    pids: Vec<i32>,
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

    // Node 3 is SIGKILLed; the other three keep finalizing.
    signal(devnet.pids[3], "-KILL");
    let before = height(&devnet.urls[0]).await.expect("height");
    send_transfers(&devnet.urls[1], &dev, &chain_id, 10..20, &recipient).await;
    wait_for_balance(&devnet.urls[..3], &recipient, 20 * AMOUNT).await;
    assert!(height(&devnet.urls[0]).await.expect("height") > before);

    // The devnet starts it again, and it catches up.
    let (index, _, _) = parse_node_line(&next_line(&devnet.lines, Duration::from_secs(30)));
    assert_eq!(index, 3);
    wait_for_balance(&devnet.urls[3..], &recipient, 20 * AMOUNT).await;

    // SIGTERM stops everything cleanly.
    let last_height = height(&devnet.urls[0]).await.expect("height");
    signal(devnet.child.id() as i32, "-TERM");
    let status = devnet.child.wait().expect("devnet exits");
    assert!(status.success(), "devnet exited with {status}");

    // Run again on the same directory: the same chain, with nothing lost.
    let mut resumed = start(dir.path());
    wait_for_balance(&resumed.urls, &recipient, 20 * AMOUNT).await;
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
    signal(resumed.child.id() as i32, "-TERM");
    assert!(resumed.child.wait().expect("devnet exits").success());
}
