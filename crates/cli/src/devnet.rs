//! `vouch devnet`: a local network of validator nodes, each a separate process on loopback.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use vouch_client::Client;
use vouch_crypto::SecretKey;
use vouch_ledger::{Genesis, GenesisAccount, GenesisValidator, Params};

/// The most validators a devnet runs.
const MAX_NODES: u8 = 16;
/// What the dev account holds at genesis.
const DEV_BALANCE: u64 = 1_000_000_000_000;
/// What each validator holds at genesis, besides its stake.
const VALIDATOR_BALANCE: u64 = 1_000_000;
const VALIDATOR_STAKE: u64 = 10_000;
/// How long the nodes get to finalize their first block.
const START_TIMEOUT_MS: u64 = 120_000;
/// How long a node gets to stop after SIGTERM before it is killed.
const STOP_TIMEOUT_MS: u64 = 15_000;

#[derive(Debug, Args)]
pub struct DevnetArgs {
    /// Validators to run (1 to 16); a resumed devnet keeps the number it was made with.
    #[arg(long, default_value_t = 4)]
    nodes: u8,
    /// Where the devnet keeps its genesis, keys and node data (default: $VOUCH_HOME/devnet).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node i serves its HTTP API on 127.0.0.1:BASE_PORT+i and talks to peers on
    /// 127.0.0.1:BASE_PORT+100+i.
    #[arg(long, default_value_t = 7070)]
    base_port: u16,
    /// How many nodes replicate each published model (written into a new devnet's genesis).
    #[arg(long, default_value_t = Params::default().replication)]
    replication: u8,
}

/// One node of the devnet.
struct Node {
    index: usize,
    dir: PathBuf,
    api_url: String,
    child: Child,
}

fn node_dir(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("node-{index}"))
}

/// Makes the devnet's keys and genesis, or reads them back when the directory has them.
fn genesis_for(dir: &Path, args: &DevnetArgs) -> Result<Genesis> {
    let path = dir.join("genesis.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let genesis = Genesis::from_json(&text).with_context(|| format!("{}", path.display()))?;
        if genesis.validators.len() != usize::from(args.nodes) {
            bail!(
                "the devnet in {} has {} nodes; run it with --nodes {} or use another --data-dir",
                dir.display(),
                genesis.validators.len(),
                genesis.validators.len()
            );
        }
        return Ok(genesis);
    }
    if args.nodes == 0 || args.nodes > MAX_NODES {
        bail!("--nodes must be 1 to {MAX_NODES}");
    }
    let top_port = u32::from(args.base_port) + 100 + u32::from(args.nodes);
    if top_port > u32::from(u16::MAX) {
        bail!("--base-port {} leaves no room for {} nodes", args.base_port, args.nodes);
    }
    let mut validators = Vec::new();
    let mut accounts = Vec::new();
    for index in 0..usize::from(args.nodes) {
        let key = SecretKey::generate()?;
        key.save(&node_dir(dir, index).join(vouch_node::NODE_KEY_FILE))?;
        let offset = index as u16;
        validators.push(GenesisValidator {
            public_key: key.public_key(),
            p2p_address: format!("127.0.0.1:{}", args.base_port + 100 + offset),
            api_address: format!("127.0.0.1:{}", args.base_port + offset),
            stake: VALIDATOR_STAKE,
        });
        accounts.push(GenesisAccount {
            public_key: key.public_key(),
            balance: VALIDATOR_BALANCE,
        });
    }
    let dev_key = SecretKey::generate()?;
    dev_key.save(&dir.join("dev.key"))?;
    accounts.push(GenesisAccount {
        public_key: dev_key.public_key(),
        balance: DEV_BALANCE,
    });
    let genesis = Genesis {
        chain_name: "vouch-devnet".into(),
        params: Params {
            replication: args.replication,
            ..Params::default()
        },
        validators,
        accounts,
    };
    genesis.check()?;
    std::fs::write(&path, genesis.to_json()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(genesis)
}

fn spawn_node(dir: &Path, index: usize, api: &str) -> Result<Child> {
    let node_dir = node_dir(dir, index);
    std::fs::create_dir_all(&node_dir)?;
    let log_path = node_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the vouch executable")?;
    Command::new(exe)
        .arg("node")
        .arg("--data-dir")
        .arg(&node_dir)
        .arg("--api")
        .arg(api)
        .arg("--genesis")
        .arg(dir.join("genesis.json"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start node {index}"))
}

/// Waits until `node` has finalized a block.
async fn wait_until_finalizing(node: &mut Node, deadline: Instant) -> Result<u64> {
    let client = Client::new(&node.api_url)?;
    loop {
        if let Some(status) = node.child.try_wait()? {
            bail!(
                "node {} exited ({status}) while starting; see {}",
                node.index,
                node.dir.join("node.log").display()
            );
        }
        if let Ok(status) = client.chain_status().await
            && let Some(height) = status["height"].as_u64()
            && height >= 1
        {
            return Ok(height);
        }
        if Instant::now() > deadline {
            bail!(
                "node {} finalized no block in {} s; see {}",
                node.index,
                START_TIMEOUT_MS / 1000,
                node.dir.join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(node: &mut Node) {
    if let Some(pid) = node.child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(Duration::from_millis(STOP_TIMEOUT_MS), node.child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!("node {} did not stop in time; killing it", node.index);
            let _ = node.child.kill().await;
        }
    }
}

pub async fn run(args: &DevnetArgs, default_dir: PathBuf) -> Result<()> {
    let dir = args.data_dir.clone().unwrap_or(default_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let genesis = genesis_for(&dir, args)?;
    let mut nodes = Vec::new();
    for (index, validator) in genesis.validators.iter().enumerate() {
        let child = spawn_node(&dir, index, &validator.api_address)?;
        nodes.push(Node {
            index,
            dir: node_dir(&dir, index),
            api_url: format!("http://{}", validator.api_address),
            child,
        });
    }
    let deadline = Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
    for node in &mut nodes {
        if let Err(error) = wait_until_finalizing(node, deadline).await {
            for node in &mut nodes {
                stop(node).await;
            }
            return Err(error);
        }
    }
    println!("vouch devnet: {} validators, chain {}", nodes.len(), genesis.chain_id());
    println!("dev key: {}", dir.join("dev.key").display());
    for (node, validator) in nodes.iter().zip(&genesis.validators) {
        println!(
            "node {}: {} pid {} key {}",
            node.index,
            node.api_url,
            node.child.id().unwrap_or(0),
            validator.public_key
        );
    }

    // Run until told to stop; a node that dies is started again on its data.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => { result?; break; }
            _ = terminate.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for node in &mut nodes {
            if let Some(status) = node.child.try_wait()? {
                eprintln!("node {} exited ({status}); starting it again", node.index);
                let api = node.api_url.trim_start_matches("http://").to_string();
                node.child = spawn_node(&dir, node.index, &api)?;
                println!(
                    "node {}: {} pid {} restarted",
                    node.index,
                    node.api_url,
                    node.child.id().unwrap_or(0)
                );
            }
        }
    }
    eprintln!("stopping the devnet");
    for node in &mut nodes {
        stop(node).await;
    }
    Ok(())
}
