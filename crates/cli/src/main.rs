//! The `vouch` command: run a node, manage keys, publish and fetch models, and run them.

mod chain;
mod devnet;
mod quorum;
mod receipts;
mod run_model;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vouch_client::{Client, Progress};
use vouch_crypto::SecretKey;
use vouch_node::{ChainOptions, NodeConfig, NodeLimits};
use vouch_types::api::{BlobInfo, ModelView};
use vouch_types::{BlobId, Manifest, ManifestBody, ModelFile, ModelFormat, ModelName, ModelRef, PlanRef, Version};

#[derive(Debug, Parser)]
#[command(
    name = "vouch",
    version,
    about = "Publish, serve and verify AI models on the Vouch network"
)]
struct Cli {
    /// The node to talk to.
    #[arg(long, global = true, env = "VOUCH_NODE", default_value = "http://127.0.0.1:7070")]
    node: String,
    /// The signing key (default: $VOUCH_HOME/key.pem, VOUCH_HOME defaulting to ~/.vouch).
    #[arg(long, global = true, env = "VOUCH_KEY")]
    key: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local network: validator nodes as separate processes on loopback.
    Devnet(devnet::DevnetArgs),
    /// Run a node: blob store, model registry and HTTP API (and, with --genesis, a validator).
    Node(NodeArgs),
    /// Create or show the signing key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Publish, fetch and inspect models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Store and fetch raw blobs.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// Run a model locally, in float32 or exactly (`--exact`).
    Run(run_model::RunArgs),
    /// Run a model on the node and check the answer: its signed receipt and a local re-execution
    /// (`reexec`), or K executors' agreement finalized on the ledger (`quorum`).
    Infer(receipts::InferArgs),
    /// Check a receipt: its signature, its model and plan, and (with --input) by re-execution.
    Verify(receipts::VerifyArgs),
    /// Show an account's balance, nonce and stake on the ledger.
    Account(chain::AccountArgs),
    /// Move funds to another account (signed with --key, waits for finality).
    Transfer(chain::TransferArgs),
    /// Stake as a node (register or add stake), or start unbonding with --unstake.
    Stake(chain::StakeArgs),
    /// Quorum tasks on the ledger.
    #[command(subcommand)]
    Task(TaskCommand),
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Show a task: its model, executors, receipts and status.
    Show {
        /// The task id.
        id: vouch_crypto::Digest,
    },
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// Where the node keeps its data (default: $VOUCH_HOME/node).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    api: SocketAddr,
    /// Join the network of this genesis file as one of its validators (the node's key must be
    /// listed in it).
    #[arg(long)]
    genesis: Option<PathBuf>,
    /// Where to listen for peers (default: this validator's p2p address in the genesis).
    #[arg(long, requires = "genesis")]
    p2p: Option<SocketAddr>,
    /// Where to reach validators whose p2p address in the genesis no longer holds:
    /// `PUBLIC_KEY@IP:PORT`, repeated or comma-separated (the others keep the genesis address).
    #[arg(long, requires = "genesis", value_delimiter = ',')]
    peers: Vec<PeerAddress>,
    /// Largest blob accepted, in bytes.
    #[arg(long, default_value_t = NodeLimits::default().max_upload_bytes)]
    max_upload_bytes: u64,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = NodeLimits::default().manifest.max_encoded_bytes)]
    max_manifest_bytes: usize,
    /// Uploads served at once.
    #[arg(long, default_value_t = NodeLimits::default().max_concurrent_uploads)]
    max_concurrent_uploads: usize,
    /// Deadline for requests other than blob transfers, in milliseconds.
    #[arg(long, default_value_t = NodeLimits::default().request_timeout_ms)]
    request_timeout_ms: u64,
    /// Longest pause allowed inside a request body, in milliseconds.
    #[arg(long, default_value_t = NodeLimits::default().body_idle_timeout_ms)]
    body_idle_timeout_ms: u64,
    /// Inferences run at once; more get 503.
    #[arg(long, default_value_t = NodeLimits::default().max_concurrent_inferences)]
    max_concurrent_inferences: usize,
    /// Largest inference request body, in bytes.
    #[arg(long, default_value_t = NodeLimits::default().max_infer_request_bytes)]
    max_infer_request_bytes: usize,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Generate a new ed25519 key (never overwrites an existing one).
    New,
    /// Print the public key.
    Show,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Upload a model file and publish it as NAME@VERSION, signed with your key.
    Push(PushArgs),
    /// Download a model's file, verified against its id.
    Pull {
        /// Model id, `name@version`, or `name` (latest version).
        reference: ModelRef,
        /// Where to write the file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List published models.
    List {
        /// Only versions of this name.
        #[arg(long)]
        name: Option<ModelName>,
    },
    /// Show a model's manifest, verified.
    Show {
        /// Model id, `name@version`, or `name` (latest version).
        reference: ModelRef,
    },
}

#[derive(Debug, Args)]
struct PushArgs {
    /// The ONNX file.
    file: PathBuf,
    /// `namespace/model`.
    #[arg(long)]
    name: ModelName,
    /// The version to publish; a published version is immutable.
    #[arg(long)]
    version: Version,
    /// SPDX license expression.
    #[arg(long)]
    license: Option<String>,
    /// Free-text description.
    #[arg(long, default_value = "")]
    description: String,
    /// Calibration inputs (.npz, samples stacked on axis 0): build the model's exact plan from
    /// them, upload it, and list it in the manifest, so that answers can be re-executed.
    #[arg(long)]
    calibration: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum BlobCommand {
    /// Upload a file; prints its id.
    Put {
        /// The file.
        file: PathBuf,
    },
    /// Download a blob, verified against its id.
    Get {
        /// The blob id.
        id: BlobId,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn vouch_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("VOUCH_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither VOUCH_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".vouch"))
}

fn key_path(cli: &Cli) -> Result<PathBuf> {
    match &cli.key {
        Some(path) => Ok(path.clone()),
        None => Ok(vouch_home()?.join("key.pem")),
    }
}

fn load_key(cli: &Cli) -> Result<SecretKey> {
    let path = key_path(cli)?;
    if !path.exists() {
        bail!(
            "no key at {}; create one with 'vouch key new' or pass --key PATH",
            path.display()
        );
    }
    Ok(SecretKey::load(&path)?)
}

/// A progress bar for a transfer of `total` bytes, shown only to a person at a terminal.
fn progress_bar(cli: &Cli, label: &str, total: u64) -> Option<(ProgressBar, Progress)> {
    if cli.json || !std::io::stdout().is_terminal() || total < (1 << 20) {
        return None;
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(label.to_string());
    let handle = bar.clone();
    Some((bar, Arc::new(move |bytes| handle.set_position(bytes))))
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Devnet(args) => devnet::run(args, vouch_home()?.join("devnet")).await,
        Command::Node(args) => run_node(args, cli.json).await,
        Command::Key(command) => run_key(&cli, command),
        Command::Model(command) => run_model(&cli, command).await,
        Command::Blob(command) => run_blob(&cli, command).await,
        Command::Run(args) => run_model::run(&cli.node, cli.json, args).await,
        Command::Infer(args) if args.verify == Some(vouch_types::VerifyLevel::Quorum) => {
            quorum::infer(&cli.node, &load_key(&cli)?, cli.json, args).await
        }
        Command::Infer(args) => receipts::infer(&cli.node, cli.json, args).await,
        Command::Verify(args) => receipts::verify(&cli.node, cli.json, args).await,
        Command::Account(args) => {
            let who = match args.public_key {
                Some(who) => who,
                None => load_key(&cli)?.public_key(),
            };
            chain::account(&Client::new(&cli.node)?, who, cli.json).await
        }
        Command::Transfer(args) => {
            let body = vouch_ledger::TxBody::Transfer {
                to: args.to,
                amount: args.amount,
            };
            let what = format!("transferred {} to {}", args.amount, args.to);
            chain::send_and_wait(&Client::new(&cli.node)?, &load_key(&cli)?, body, &what, cli.json).await
        }
        Command::Stake(args) => chain::stake(&Client::new(&cli.node)?, &load_key(&cli)?, args, cli.json).await,
        Command::Task(TaskCommand::Show { id }) => chain::show_task(&Client::new(&cli.node)?, id, cli.json).await,
    }
}

async fn run_node(args: &NodeArgs, json: bool) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => vouch_home()?.join("node"),
    };
    let mut limits = NodeLimits {
        max_upload_bytes: args.max_upload_bytes,
        max_concurrent_uploads: args.max_concurrent_uploads,
        request_timeout_ms: args.request_timeout_ms,
        body_idle_timeout_ms: args.body_idle_timeout_ms,
        max_concurrent_inferences: args.max_concurrent_inferences,
        max_infer_request_bytes: args.max_infer_request_bytes,
        ..NodeLimits::default()
    };
    limits.manifest.max_encoded_bytes = args.max_manifest_bytes;
    let chain = match &args.genesis {
        Some(path) => Some(chain_options(path, args.p2p, &args.peers, &data_dir)?),
        None => None,
    };
    let node = vouch_node::start(NodeConfig {
        data_dir: data_dir.clone(),
        api_addr: args.api,
        limits,
        chain,
    })
    .await?;
    // Scripts and tests read this line to learn the address (the port may have been 0).
    if json {
        println!("{}", json!({ "api": node.url(), "data_dir": data_dir }));
    } else {
        println!(
            "vouch node listening on {} (data in {})",
            node.url(),
            data_dir.display()
        );
    }
    wait_for_shutdown_signal().await?;
    eprintln!("shutting down");
    node.shutdown().await?;
    Ok(())
}

/// `PUBLIC_KEY@IP:PORT`: where one validator listens for peers.
#[derive(Debug, Clone)]
struct PeerAddress {
    key: vouch_crypto::PublicKey,
    address: SocketAddr,
}

impl std::str::FromStr for PeerAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (key, address) = text
            .split_once('@')
            .ok_or_else(|| format!("{text:?} is not PUBLIC_KEY@IP:PORT"))?;
        Ok(Self {
            key: key.parse().map_err(|_| format!("{key:?} is not a public key"))?,
            address: address.parse().map_err(|_| format!("{address:?} is not IP:PORT"))?,
        })
    }
}

/// Reads the genesis and finds where this node, as one of its validators, listens for peers,
/// and where it reaches the others.
fn chain_options(
    path: &std::path::Path,
    p2p: Option<SocketAddr>,
    peers: &[PeerAddress],
    data_dir: &std::path::Path,
) -> Result<ChainOptions> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let genesis = vouch_ledger::Genesis::from_json(&text).with_context(|| format!("{}", path.display()))?;
    let key_path = data_dir.join(vouch_node::NODE_KEY_FILE);
    let key =
        SecretKey::load(&key_path).with_context(|| format!("a validator needs its key at {}", key_path.display()))?;
    let me = key.public_key();
    let Some(entry) = genesis.validators.iter().find(|v| v.public_key == me) else {
        bail!("this node's key {me} is not a validator in {}", path.display());
    };
    let p2p_addr = match p2p {
        Some(addr) => addr,
        None => entry.p2p_address.parse().with_context(|| {
            format!(
                "the genesis gives this validator the p2p address {:?}",
                entry.p2p_address
            )
        })?,
    };
    let mut peer_addresses = std::collections::BTreeMap::new();
    for peer in peers {
        if !genesis.validators.iter().any(|v| v.public_key == peer.key) {
            bail!(
                "--peers names {}, which is not a validator in {}",
                peer.key,
                path.display()
            );
        }
        peer_addresses.insert(peer.key, peer.address);
    }
    Ok(ChainOptions {
        genesis,
        p2p_addr,
        peer_addresses,
    })
}

async fn wait_for_shutdown_signal() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn run_key(cli: &Cli, command: &KeyCommand) -> Result<()> {
    let path = key_path(cli)?;
    let key = match command {
        KeyCommand::New => {
            if path.exists() {
                bail!("a key already exists at {}; refusing to overwrite it", path.display());
            }
            let key = SecretKey::generate()?;
            key.save(&path)?;
            key
        }
        KeyCommand::Show => load_key(cli)?,
    };
    if cli.json {
        print_json(&json!({ "public_key": key.public_key(), "path": path }))
    } else {
        println!("public key: {}", key.public_key());
        println!("key file:   {}", path.display());
        Ok(())
    }
}

/// Builds and signs the manifest for an uploaded ONNX file whose schema was read from the file.
fn onnx_manifest(
    args: &PushArgs,
    schema: vouch_engine::ModelSchema,
    uploaded: &BlobInfo,
    plans: Vec<PlanRef>,
    key: &SecretKey,
) -> Result<Manifest> {
    let file_name = args
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.ends_with(".onnx"))
        .unwrap_or("model.onnx")
        .to_string();
    let body = ManifestBody {
        name: args.name.clone(),
        version: args.version.clone(),
        format: ModelFormat::Onnx,
        files: vec![ModelFile {
            path: file_name,
            blob: uploaded.id,
            size: uploaded.size,
        }],
        plans,
        inputs: schema.inputs,
        outputs: schema.outputs,
        license: args.license.clone(),
        description: args.description.clone(),
        publisher: key.public_key(),
    };
    body.validate(&Default::default())?;
    Ok(body.sign(key)?)
}

/// Calibrates and quantizes an ONNX model into its exact plan.
fn build_exact_plan(model_bytes: &[u8], calibration: &std::path::Path) -> Result<vouch_engine::Plan> {
    let calibration = run_model::load_tensors(calibration)?;
    let model = vouch_engine::load_onnx(model_bytes)?;
    Ok(vouch_engine::build_plan(&model, &model.to_ir()?, &calibration)?)
}

async fn run_model(cli: &Cli, command: &ModelCommand) -> Result<()> {
    let client = Client::new(&cli.node)?;
    match command {
        ModelCommand::Push(args) => {
            let key = load_key(cli)?;
            let (file, name, version) = (&args.file, &args.name, &args.version);
            // Read the schema before uploading anything, so a bad file fails fast.
            let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let schema = vouch_engine::read_onnx_schema(&bytes).with_context(|| format!("{}", file.display()))?;
            let plan = match &args.calibration {
                Some(calibration) => Some(build_exact_plan(&bytes, calibration).with_context(|| {
                    format!(
                        "cannot build the exact plan of {} from {}",
                        file.display(),
                        calibration.display()
                    )
                })?),
                None => None,
            };
            let size = bytes.len() as u64;
            drop(bytes);
            let bar = progress_bar(cli, "uploading", size);
            // The upload hashes the file as it streams and checks that the node stored exactly
            // those bytes, so its answer is the file's verified id.
            let uploaded = client.put_blob_file(file, bar.as_ref().map(|(_, p)| p.clone())).await?;
            if let Some((bar, _)) = bar {
                bar.finish_and_clear();
            }
            if uploaded.size != size {
                bail!("{} changed while it was being uploaded", file.display());
            }
            let mut plans = Vec::new();
            if let Some(plan) = plan {
                let plan_bytes = plan.encode();
                let plan_id = plan.id();
                let stored = client.put_blob_bytes(plan_bytes).await?;
                if stored.id != plan_id {
                    bail!("the node stored the plan as {} but its id is {plan_id}", stored.id);
                }
                plans.push(PlanRef {
                    id: plan_id,
                    size: stored.size,
                });
            }
            let manifest = onnx_manifest(args, schema, &uploaded, plans, &key)?;
            let mut published = client.publish(&manifest).await?;
            if published.staged {
                // A network node: the ledger publishes the model once our transaction is final.
                let body = vouch_ledger::TxBody::PublishModel {
                    model_id: published.id,
                    name: name.clone(),
                    version: version.clone(),
                };
                let sent = chain::submit(&client, &key, body).await?;
                chain::wait_finalized(&client, &key.public_key(), &sent).await?;
                wait_registered(&client, &published.id).await?;
                published.created = true;
            }
            let plan_id = manifest.body.plans.first().map(|p| p.id);
            if cli.json {
                return print_json(&json!({
                    "id": published.id, "name": name, "version": version,
                    "created": published.created, "blob": uploaded.id, "size": uploaded.size,
                    "plan_id": plan_id,
                }));
            }
            let verb = if published.created {
                "published"
            } else {
                "already published, unchanged:"
            };
            println!(
                "uploaded {} ({} bytes) as blob {}",
                file.display(),
                uploaded.size,
                uploaded.id
            );
            if let Some(plan_id) = plan_id {
                println!("exact plan {plan_id}");
            }
            println!("{verb} {name}@{version}");
            println!("{}", published.id);
            Ok(())
        }
        ModelCommand::Pull { reference, output } => {
            let (view, manifest) = client.fetch_manifest(reference).await?;
            let file = manifest.body.files.first().context("the manifest lists no files")?;
            let bar = progress_bar(cli, "downloading", file.size);
            let size = client
                .get_blob_to_file(&file.blob, output, u64::MAX, bar.as_ref().map(|(_, p)| p.clone()))
                .await?;
            if let Some((bar, _)) = bar {
                bar.finish_and_clear();
            }
            if size != file.size {
                let _ = std::fs::remove_file(output);
                bail!(
                    "blob {} has {size} bytes but the manifest says {}",
                    file.blob,
                    file.size
                );
            }
            if cli.json {
                return print_json(&json!({
                    "id": view.id, "name": manifest.body.name, "version": manifest.body.version,
                    "path": output, "size": size,
                }));
            }
            println!(
                "pulled {}@{} ({}) to {} ({size} bytes, verified)",
                manifest.body.name,
                manifest.body.version,
                view.id,
                output.display()
            );
            Ok(())
        }
        ModelCommand::List { name } => {
            let models = client.list_models(name.as_ref(), None).await?;
            if cli.json {
                return print_json(&models);
            }
            if models.is_empty() {
                println!("no models published");
            }
            for model in &models {
                let size: u64 = model.manifest.body.files.iter().map(|f| f.size).sum();
                println!(
                    "{}  {}@{}  {size} bytes",
                    model.id, model.manifest.body.name, model.manifest.body.version
                );
            }
            Ok(())
        }
        ModelCommand::Show { reference } => {
            let (view, manifest) = client.fetch_manifest(reference).await?;
            if cli.json {
                return print_json(&view);
            }
            print_model(&view, &manifest);
            Ok(())
        }
    }
}

/// The name a unit enum has in the JSON API (`float32`, `onnx`), so both outputs agree.
/// Waits until the node's registry holds `id`, which follows the ledger.
async fn wait_registered(client: &Client, id: &vouch_types::ModelId) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        match client.show_model(&ModelRef::Id(*id)).await {
            Ok(_) => return Ok(()),
            Err(vouch_client::ClientError::Api { status: 404, .. }) if started.elapsed() < chain::FINALITY_TIMEOUT => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

fn serde_name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn print_model(view: &ModelView, manifest: &Manifest) {
    let body = &manifest.body;
    println!("id:          {}", view.id);
    println!("name:        {}@{}", body.name, body.version);
    println!("format:      {}", serde_name(&body.format));
    println!("publisher:   {} (signature verified)", body.publisher);
    println!("license:     {}", body.license.as_deref().unwrap_or("-"));
    if !body.description.is_empty() {
        println!("description: {}", body.description);
    }
    for file in &body.files {
        println!("file:        {} ({} bytes, blob {})", file.path, file.size, file.blob);
    }
    for plan in &body.plans {
        println!("exact plan:  {} ({} bytes)", plan.id, plan.size);
    }
    let describe = |spec: &vouch_types::TensorSpec| {
        let shape = spec.shape.as_ref().map_or("?".to_string(), |dims| {
            let dims: Vec<String> = dims
                .iter()
                .map(|d| match d {
                    vouch_types::Dim::Fixed(n) => n.to_string(),
                    vouch_types::Dim::Named(name) => name.clone(),
                    vouch_types::Dim::Unknown => "?".into(),
                })
                .collect();
            format!("[{}]", dims.join(", "))
        });
        format!("{} {} {shape}", spec.name, serde_name(&spec.dtype))
    };
    for input in &body.inputs {
        println!("input:       {}", describe(input));
    }
    for output in &body.outputs {
        println!("output:      {}", describe(output));
    }
}

async fn run_blob(cli: &Cli, command: &BlobCommand) -> Result<()> {
    let client = Client::new(&cli.node)?;
    match command {
        BlobCommand::Put { file } => {
            let size = std::fs::metadata(file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            let bar = progress_bar(cli, "uploading", size);
            let info = client.put_blob_file(file, bar.as_ref().map(|(_, p)| p.clone())).await?;
            if let Some((bar, _)) = bar {
                bar.finish_and_clear();
            }
            if cli.json {
                return print_json(&info);
            }
            println!("{}", info.id);
            Ok(())
        }
        BlobCommand::Get { id, output } => {
            let bar = progress_bar(cli, "downloading", 0);
            let size = client
                .get_blob_to_file(id, output, u64::MAX, bar.as_ref().map(|(_, p)| p.clone()))
                .await?;
            if cli.json {
                return print_json(&json!({ "id": id, "path": output, "size": size }));
            }
            println!("wrote {size} bytes to {} (verified)", output.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line, like every other failure; `--help` has the rest.
            let rendered = e.to_string();
            eprintln!(
                "{}",
                rendered
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
