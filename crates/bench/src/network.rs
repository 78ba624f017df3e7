//! `vouch-bench network`: a 4-node `vouch devnet` on loopback. Finalized transfers per second
//! with p50/p99 finality latency, beside the ledger executing the same transfers in-process
//! (the ceiling consensus is measured against); quorum inferences (K executors, the digits MLP)
//! per second with p50/p99 end-to-end latency, each checked as `vouch infer --verify quorum`
//! checks it, beside the same node answering the same input alone (`POST /v1/infer`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vouch_client::Client;
use vouch_crypto::{Digest, PublicKey, SecretKey};
use vouch_ledger::{BlockContext, Genesis, InputRef, Ledger, SignedTransaction, Transaction, TxBody, block_seed};
use vouch_node::chain::finality::{TaskProof, ValidatorSet, check_outputs};
use vouch_tensor::{NamedTensor, Tensor, TensorData, TensorLimits};
use vouch_types::api::InferRequest;
use vouch_types::{ModelId, VerifyLevel};

/// What to measure.
#[derive(Debug, clap::Args)]
pub struct NetworkBench {
    /// The `vouch` binary.
    #[arg(long, default_value = "target/release/vouch")]
    pub vouch: PathBuf,
    /// The model quorum inferences run.
    #[arg(long, default_value = "fixtures/models/digits_mlp_v1.onnx")]
    pub model: PathBuf,
    /// Its calibration inputs.
    #[arg(long, default_value = "fixtures/data/digits_calibration.npz")]
    pub calibration: PathBuf,
    /// Test inputs (an `.npz` holding `input`).
    #[arg(long, default_value = "fixtures/data/digits_test.npz")]
    pub inputs: PathBuf,
    /// Transfers sent per run.
    #[arg(long, default_value_t = 20_000)]
    pub transfers: usize,
    /// Offered load of the second, paced transfer run, per second.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Quorum inferences sent.
    #[arg(long, default_value_t = 200)]
    pub inferences: usize,
    /// Executors per quorum inference.
    #[arg(long, default_value_t = 3)]
    pub k: u8,
    /// Accounts sending at once.
    #[arg(long, default_value_t = 16)]
    pub senders: usize,
    /// First port of the devnet (node i serves on BASE+i, peers on BASE+100+i).
    #[arg(long, default_value_t = 47_000)]
    pub base_port: u16,
}

const NODES: usize = 4;
/// How often finality is polled; latencies are measured to within it.
const POLL: Duration = Duration::from_millis(20);
/// The longest any phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

struct Devnet {
    child: Child,
    urls: Vec<String>,
}

impl Drop for Devnet {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start_devnet(vouch: &Path, dir: &Path, base_port: u16) -> Result<Devnet> {
    let mut child = Command::new(vouch)
        .args([
            "devnet",
            "--nodes",
            &NODES.to_string(),
            "--replication",
            &NODES.to_string(),
        ])
        .args(["--base-port", &base_port.to_string(), "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", vouch.display()))?;
    let stdout = child.stdout.take().context("devnet stdout")?;
    let mut urls = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"node") && words.len() > 2 {
            urls.push(words[2].to_string());
            if urls.len() == NODES {
                break;
            }
        }
    }
    if urls.len() != NODES {
        bail!("the devnet did not start its {NODES} nodes");
    }
    Ok(Devnet { child, urls })
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

async fn nonce(client: &Client, who: &PublicKey) -> Result<u64> {
    client.chain_account(who).await?["nonce"]
        .as_u64()
        .context("the account has no nonce")
}

async fn wait_nonce(client: &Client, who: &PublicKey, at_least: u64) -> Result<()> {
    let started = Instant::now();
    while nonce(client, who).await? < at_least {
        if started.elapsed() > PHASE_TIMEOUT {
            bail!("account {who} never reached nonce {at_least}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

fn transfer(key: &SecretKey, nonce: u64, to: PublicKey, chain_id: &Digest) -> SignedTransaction {
    Transaction {
        signer: key.public_key(),
        nonce,
        fee: 1,
        body: TxBody::Transfer { to, amount: 1 },
    }
    .sign(key, chain_id)
}

/// Funds `count` fresh sender accounts from the dev account and waits until they hold it.
async fn fund_senders(client: &Client, dev: &SecretKey, chain_id: &Digest, count: usize) -> Result<Vec<SecretKey>> {
    let senders: Vec<SecretKey> = (0..count).map(|_| SecretKey::generate()).collect::<Result<_, _>>()?;
    let first = nonce(client, &dev.public_key()).await?;
    for (offset, sender) in senders.iter().enumerate() {
        let tx = Transaction {
            signer: dev.public_key(),
            nonce: first + offset as u64,
            fee: 1,
            body: TxBody::Transfer {
                to: sender.public_key(),
                amount: 1_000_000_000,
            },
        }
        .sign(dev, chain_id);
        client.submit_transaction(tx.encode()).await?;
    }
    wait_nonce(client, &dev.public_key(), first + count as u64).await?;
    Ok(senders)
}

/// The ledger applying the same kind of transfers in-process, in blocks of the chain's size:
/// what consensus would reach if ordering and broadcasting cost nothing.
fn ledger_ceiling(genesis: &Genesis, dev: &SecretKey, transfers: usize) -> f64 {
    let chain_id = genesis.chain_id();
    let to = PublicKey::from_bytes([9; 32]);
    let txs: Vec<SignedTransaction> = (0..transfers as u64)
        .map(|nonce| transfer(dev, nonce, to, &chain_id))
        .collect();
    let mut ledger = Ledger::from_genesis(genesis);
    let block_txs = genesis.params.max_block_txs as usize;
    let started = Instant::now();
    for (index, block) in txs.chunks(block_txs).enumerate() {
        let height = index as u64 + 1;
        let ctx = BlockContext {
            height,
            proposer: genesis.validators[0].public_key,
            seed: block_seed(&ledger.root(), height),
        };
        match ledger.execute_block(&ctx, block) {
            Ok(next) => {
                let _root = next.root();
                ledger = next;
            }
            Err(error) => {
                eprintln!("the in-process ledger refused a block: {error}");
                return 0.0;
            }
        }
    }
    transfers as f64 / started.elapsed().as_secs_f64()
}

struct Phase {
    latencies: Vec<Duration>,
    wall: Duration,
}

/// The latencies every sender measured, and the time since `started` once all are done.
async fn gather(handles: Vec<tokio::task::JoinHandle<Result<Vec<Duration>>>>, started: Instant) -> Result<Phase> {
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await??);
    }
    Ok(Phase {
        latencies,
        wall: started.elapsed(),
    })
}

/// Each sender sends its share of `total` transfers in nonce order to its node, as fast as it
/// can or paced so that all senders together offer `rate` per second; a poller at node 0 stamps
/// the moment each nonce is finalized.
async fn transfers(
    urls: &[String],
    senders: &[SecretKey],
    chain_id: &Digest,
    total: usize,
    rate: Option<u64>,
) -> Result<Phase> {
    let per_sender = total / senders.len();
    let to = PublicKey::from_bytes([9; 32]);
    let interval = rate.map(|rate| Duration::from_secs_f64(senders.len() as f64 / rate.max(1) as f64));
    let started = Instant::now();
    let mut handles = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let client = Client::new(&urls[index % urls.len()])?;
        let poller = Client::new(&urls[0])?;
        let sender = sender.clone();
        let chain_id = *chain_id;
        handles.push(tokio::spawn(async move {
            let first = nonce(&poller, &sender.public_key()).await?;
            let txs: Vec<SignedTransaction> = (0..per_sender as u64)
                .map(|offset| transfer(&sender, first + offset, to, &chain_id))
                .collect();
            let submit = async {
                let mut sent = Vec::with_capacity(txs.len());
                for (index, tx) in txs.iter().enumerate() {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until((started + interval * index as u32).into()).await;
                    }
                    sent.push(Instant::now());
                    client.submit_transaction(tx.encode()).await?;
                }
                Ok::<_, anyhow::Error>(sent)
            };
            let watch = async {
                let mut finalized = Vec::with_capacity(txs.len());
                while finalized.len() < txs.len() {
                    let done = nonce(&poller, &sender.public_key()).await?.saturating_sub(first) as usize;
                    let now = Instant::now();
                    while finalized.len() < done.min(txs.len()) {
                        finalized.push(now);
                    }
                    if started.elapsed() > PHASE_TIMEOUT {
                        bail!("transfers were not finalized within {} s", PHASE_TIMEOUT.as_secs());
                    }
                    tokio::time::sleep(POLL).await;
                }
                Ok(finalized)
            };
            let (sent, finalized) = tokio::try_join!(submit, watch)?;
            Ok::<_, anyhow::Error>(
                sent.iter()
                    .zip(&finalized)
                    .map(|(sent, done)| done.saturating_duration_since(*sent))
                    .collect::<Vec<_>>(),
            )
        }));
    }
    gather(handles, started).await
}

/// One digit as the model's input.
fn digit(digits: &NamedTensor, row: usize) -> Result<NamedTensor> {
    let TensorData::F32(values) = digits.tensor.data() else {
        bail!("the digits are not float32");
    };
    let features = digits.tensor.shape()[1..].iter().product::<usize>();
    let rows = values.len() / features.max(1);
    let row = row % rows.max(1);
    Ok(NamedTensor {
        name: Some("input".into()),
        tensor: Tensor::new(
            vec![1, features],
            TensorData::F32(values[row * features..(row + 1) * features].to_vec()),
        )?,
    })
}

/// One quorum inference as `vouch infer --verify quorum` runs it: request, wait for the task to
/// close, check the proof against the validators, fetch the outputs and check their hash.
async fn quorum_inference(
    client: &Client,
    key: &SecretKey,
    nonce: u64,
    request: (&ModelId, &NamedTensor, u8),
    chain: (&Digest, &ValidatorSet, u64),
) -> Result<()> {
    let (model_id, input, k) = request;
    let (chain_id, validators, deadline) = chain;
    let inputs = std::slice::from_ref(input);
    let tx = Transaction {
        signer: key.public_key(),
        nonce,
        fee: 1,
        body: TxBody::RequestInference {
            model_id: *model_id,
            input: InputRef::Inline(vouch_tensor::write_npz(inputs)?),
            input_hash: vouch_verify::tensors_hash(inputs),
            k,
            max_fee: 10 * u64::from(k),
            deadline,
        },
    }
    .sign(key, chain_id);
    let task = tx.id();
    client.submit_transaction(tx.encode()).await?;
    let started = Instant::now();
    loop {
        if let Ok(answer) = client.chain_task(&task).await {
            match answer["task"]["status"].as_str() {
                Some("open") | None => {}
                Some("finalized") => break,
                Some(other) => bail!("task {task} is {other}"),
            }
        }
        if started.elapsed() > PHASE_TIMEOUT {
            bail!("task {task} did not close");
        }
        tokio::time::sleep(POLL).await;
    }
    let proof: TaskProof = serde_json::from_value(client.chain_task_proof(&task).await?)?;
    proof.verify(validators)?;
    let agreement = proof.agreement()?;
    let blob = client.chain_task_output(&task).await?;
    check_outputs(&client.get_blob_bytes(&blob, 1 << 20).await?, &agreement.output_hash)?;
    Ok(())
}

async fn quorum(
    urls: &[String],
    senders: &[SecretKey],
    model: (&ModelId, &NamedTensor),
    chain: (&Digest, &ValidatorSet),
    bench: &NetworkBench,
) -> Result<Phase> {
    let per_sender = bench.inferences.div_ceil(senders.len());
    let height = Client::new(&urls[0])?.chain_status().await?["height"]
        .as_u64()
        .unwrap_or(0);
    let deadline = height + 5_000;
    let started = Instant::now();
    let mut handles = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let client = Client::new(&urls[index % urls.len()])?;
        let sender = sender.clone();
        let (model_id, input) = (*model.0, model.1.clone());
        let (chain_id, validators) = (*chain.0, chain.1.clone());
        let k = bench.k;
        handles.push(tokio::spawn(async move {
            let first = nonce(&client, &sender.public_key()).await?;
            let mut latencies = Vec::new();
            for offset in 0..per_sender as u64 {
                let began = Instant::now();
                quorum_inference(
                    &client,
                    &sender,
                    first + offset,
                    (&model_id, &input, k),
                    (&chain_id, &validators, deadline),
                )
                .await?;
                latencies.push(began.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    gather(handles, started).await
}

/// The same node answering alone: `POST /v1/infer` at level `reexec` (the node runs the exact
/// plan and signs a receipt; no consensus).
async fn single_node(url: &str, model: &ModelId, input: &NamedTensor, count: usize) -> Result<Vec<Duration>> {
    let client = Client::new(url)?;
    let mut latencies = Vec::with_capacity(count);
    for nonce in 0..count as u64 {
        let began = Instant::now();
        client
            .infer(&InferRequest {
                model: model.to_string(),
                inputs: vouch_tensor::to_json_value(std::slice::from_ref(input))?,
                verify: VerifyLevel::Reexec,
                nonce,
            })
            .await?;
        latencies.push(began.elapsed());
    }
    Ok(latencies)
}

async fn push_model(bench: &NetworkBench, dir: &Path, url: &str) -> Result<ModelId> {
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    std::fs::copy(dir.join("devnet/dev.key"), home.join("key.pem"))?;
    let output = Command::new(&bench.vouch)
        .env("VOUCH_HOME", &home)
        .args(["--node", url, "model", "push"])
        .arg(&bench.model)
        .args(["--name", "bench/digits", "--version", "1", "--calibration"])
        .arg(&bench.calibration)
        .output()?;
    if !output.status.success() {
        bail!("model push failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let id = stdout.lines().last().context("model push printed nothing")?.trim();
    Ok(id.parse()?)
}

async fn wait_hosts(client: &Client, model: &ModelId, hosts: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(record) = client.chain_model(model).await
            && record["model"]["confirmed"].as_array().map_or(0, Vec::len) >= hosts
        {
            return Ok(());
        }
        if started.elapsed() > PHASE_TIMEOUT {
            bail!("fewer than {hosts} replicas confirmed model {model}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn summary(name: &str, phase: &Phase, unit: &str) -> (f64, Duration, Duration) {
    let mut sorted = phase.latencies.clone();
    sorted.sort();
    let rate = sorted.len() as f64 / phase.wall.as_secs_f64();
    let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
    eprintln!(
        "{name}: {} {unit} in {:.2} s; p50 {:.0} ms, p99 {:.0} ms",
        sorted.len(),
        phase.wall.as_secs_f64(),
        ms(p50),
        ms(p99)
    );
    (rate, p50, p99)
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(bench: &NetworkBench) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_async(bench))
}

async fn run_async(bench: &NetworkBench) -> Result<()> {
    if bench.senders == 0 {
        bail!("--senders must be at least 1");
    }
    let work = tempfile::tempdir()?;
    let devnet = start_devnet(&bench.vouch, &work.path().join("devnet"), bench.base_port)?;
    let genesis = Genesis::from_json(&std::fs::read_to_string(work.path().join("devnet/genesis.json"))?)?;
    let chain_id = genesis.chain_id();
    let dev = SecretKey::load(&work.path().join("devnet/dev.key"))?;
    let client = Client::new(&devnet.urls[0])?;
    let ceiling = ledger_ceiling(&genesis, &dev, bench.transfers);
    let senders = fund_senders(&client, &dev, &chain_id, bench.senders).await?;

    let transfer_phase = transfers(&devnet.urls, &senders, &chain_id, bench.transfers, None).await?;
    let (transfer_rate, transfer_p50, transfer_p99) = summary("transfers", &transfer_phase, "finalized");
    let paced_phase = transfers(&devnet.urls, &senders, &chain_id, bench.transfers, Some(bench.rate)).await?;
    let (paced_rate, paced_p50, paced_p99) = summary("paced transfers", &paced_phase, "finalized");

    let model_id = push_model(bench, work.path(), &devnet.urls[0]).await?;
    wait_hosts(&client, &model_id, usize::from(bench.k)).await?;
    let digits = vouch_tensor::read_npz(&std::fs::read(&bench.inputs)?, &TensorLimits::default())?;
    let digits = digits
        .into_iter()
        .find(|tensor| tensor.name.as_deref() == Some("input"))
        .context("the inputs hold no 'input'")?;
    let input = digit(&digits, 0)?;
    let validators = ValidatorSet::from_genesis(&genesis)?;
    let single = single_node(&devnet.urls[0], &model_id, &input, bench.inferences.min(200)).await?;
    let single_phase = Phase {
        wall: single.iter().sum(),
        latencies: single,
    };
    let (single_rate, single_p50, single_p99) = summary("single node", &single_phase, "inferences");
    let quorum_phase = quorum(
        &devnet.urls,
        &senders,
        (&model_id, &input),
        (&chain_id, &validators),
        bench,
    )
    .await?;
    let (quorum_rate, quorum_p50, quorum_p99) = summary("quorum", &quorum_phase, "inferences");
    drop(devnet);

    println!("| measure | per second | p50 | p99 | against |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| finalized transfers, 4 validators, sent at once | {transfer_rate:.0} | {:.1} ms | {:.1} ms | {:.3} × the ledger executing them in-process ({ceiling:.0}/s) |",
        ms(transfer_p50),
        ms(transfer_p99),
        transfer_rate / ceiling
    );
    println!(
        "| finalized transfers, offered at {}/s | {paced_rate:.0} | {:.1} ms | {:.1} ms | {:.3} × the ledger in-process |",
        bench.rate,
        ms(paced_p50),
        ms(paced_p99),
        paced_rate / ceiling
    );
    println!(
        "| quorum inferences, K={} (proof and outputs checked) | {quorum_rate:.1} | {:.1} ms | {:.1} ms | p50 {:.1} × one node answering alone |",
        bench.k,
        ms(quorum_p50),
        ms(quorum_p99),
        quorum_p50.as_secs_f64() / single_p50.as_secs_f64()
    );
    println!(
        "| one node answering alone (`/v1/infer`, reexec level, sequential) | {single_rate:.1} | {:.1} ms | {:.1} ms | — |",
        ms(single_p50),
        ms(single_p99)
    );
    println!();
    println!(
        "{} transfers per run from {} accounts at once; {} quorum inferences from {} accounts at once; finality polled every {} ms",
        transfer_phase.latencies.len(),
        bench.senders,
        quorum_phase.latencies.len(),
        bench.senders,
        POLL.as_millis()
    );
    Ok(())
}
