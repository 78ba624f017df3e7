//! Measure Vouch against peers on the same machine in the same run, and print ratios.
//!
//! `hub`: push and pull a large file through a `vouch node` process on loopback, beside BLAKE3
//! hashing of the same file (one thread, and all threads), `cp` of it on the same disk, and the
//! node's answers fetched by `curl` (which must be installed).
//! Run it with `scripts/bench-hub`, which builds the release binaries first.
//!
//! `engine`: inferences per second of Vouch float, Vouch exact and tract on the same inputs; run
//! it with `scripts/bench-engine`, which adds onnxruntime and prints ratios.
//!
//! `network`: a 4-node devnet's finalized transfers and quorum inferences per second with their
//! latencies, beside the ledger executing in-process and one node answering alone; run it with
//! `scripts/bench-network`.

mod engine;
mod network;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Vouch benchmarks, each against a peer measured in the same run")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Push and pull a file through a node, beside BLAKE3 hashing and cp of the same file.
    Hub {
        /// File size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Repetitions; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Working directory (on the disk to measure); default: a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Transfers and quorum inferences on a 4-node devnet, beside the ledger in-process and one
    /// node answering alone.
    Network(network::NetworkBench),
    /// Inferences per second of Vouch float, Vouch exact and tract (JSON lines).
    Engine {
        /// ONNX models whose inputs are batched along axis 0.
        #[arg(long, required = true)]
        model: Vec<PathBuf>,
        /// Calibration inputs for the exact plans.
        #[arg(long)]
        calibration: PathBuf,
        /// Inputs, named as the models' (`.npz`) or the one input (`.npy`), with at least as many
        /// rows as the largest batch.
        #[arg(long)]
        input: PathBuf,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        batch: Vec<usize>,
        /// Thread counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Seconds spent measuring each case.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Instead of the comparison, time each instruction of the exact plans alone (replayed
        /// on the operands of one execution) and print one line per instruction.
        #[arg(long)]
        per_instruction: bool,
    },
}

/// Writes `size` pseudo-random bytes (incompressible, so no layer can shortcut them).
fn write_random_file(path: &Path, size: u64) -> Result<()> {
    let mut file = std::io::BufWriter::with_capacity(8 << 20, File::create(path)?);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let start = Instant::now();
    let value = f()?;
    Ok((start.elapsed(), value))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

struct Node {
    child: Child,
    url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(data_dir: &Path, max_upload_bytes: u64) -> Result<Node> {
    let exe = std::env::current_exe()?;
    let vouch = exe.with_file_name("vouch");
    if !vouch.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p vouch-cli` (scripts/bench-hub does)",
            vouch.display()
        );
    }
    let mut child = Command::new(&vouch)
        .args([
            "node",
            "--api",
            "127.0.0.1:0",
            "--max-upload-bytes",
            &max_upload_bytes.to_string(),
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", vouch.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("node stdout")?).read_line(&mut line)?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .context("node printed no URL")?
        .to_string();
    Ok(Node { child, url })
}

fn hash_one_thread(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize())
}

/// Reads `source` in 1 MiB `read()`s and writes each to `output`.
fn copy_in_blocks(source: &Path, output: &mut dyn Write) -> Result<()> {
    let mut input = File::open(source)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        output.write_all(&buf[..n])?;
    }
}

/// What any durable store must at least do: read the bytes, write them through the page
/// cache, and wait for the disk.
fn write_blocks_and_sync(source: &Path, target: &Path) -> Result<()> {
    let mut output = File::create(target)?;
    copy_in_blocks(source, &mut output)?;
    output.sync_all()?;
    Ok(())
}

/// Copies `source` to `target` through the store's file writer (whole blocks past the page
/// cache where the file system allows), then fsyncs: the floor under a push, without the
/// network or the hashing.
fn write_past_cache_and_sync(source: &Path, target: &Path) -> Result<()> {
    let mut writer = vouch_store::WriteBehind::new(File::create(target)?, target);
    copy_in_blocks(source, &mut writer)?;
    let written = writer.finish()?;
    written.file.sync_all()?;
    anyhow::ensure!(
        written.bytes_past_cache > 0,
        "this file system refused O_DIRECT: the direct-write row would measure the page cache"
    );
    Ok(())
}

const HASH_ONE_THREAD: &str = "BLAKE3 hash, 1 thread";
const DURABLE_WRITE: &str = "write() in 1 MiB blocks + fsync (dd conv=fsync)";

/// Timings by operation, in the order operations were first recorded.
#[derive(Default)]
struct Results {
    rows: Vec<(&'static str, Vec<Duration>)>,
}

impl Results {
    fn record(&mut self, name: &'static str, time: Duration) {
        match self.rows.iter_mut().find(|(n, _)| *n == name) {
            Some((_, times)) => times.push(time),
            None => self.rows.push((name, vec![time])),
        }
    }

    fn median(&self, name: &str) -> Duration {
        self.rows
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Duration::ZERO, |(_, times)| median(times.clone()))
    }
}

/// Copies with the system's `cp` to a new file, optionally waiting for the disk.
fn cp(source: &Path, target: &Path, sync: bool) -> Result<()> {
    let status = Command::new("cp").arg(source).arg(target).status()?;
    anyhow::ensure!(status.success(), "cp failed");
    if sync {
        File::open(target)?.sync_all()?;
    }
    Ok(())
}

/// Copies with `dd` in 4 MiB blocks past the page cache, then fsyncs: the device's best case
/// for a durable write, with no copy beyond the read.
fn dd_direct(source: &Path, target: &Path) -> Result<()> {
    let status = Command::new("dd")
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", target.display()))
        .args(["bs=4M", "oflag=direct", "conv=fsync", "status=none"])
        .status()
        .context("running dd")?;
    anyhow::ensure!(
        status.success(),
        "dd with oflag=direct failed (does this file system allow O_DIRECT?)"
    );
    Ok(())
}

/// Fetches `url` with curl into /dev/null.
fn curl(url: &str) -> Result<()> {
    let status = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", url])
        .status()
        .context("running curl")?;
    anyhow::ensure!(status.success(), "curl {url} failed");
    Ok(())
}

fn hub(size_mib: u64, runs: usize, dir: Option<PathBuf>) -> Result<()> {
    let size = size_mib << 20;
    let temp;
    let dir = match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            dir
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let source = dir.join("source.bin");
    eprintln!("writing {size_mib} MiB test file in {}", dir.display());
    write_random_file(&source, size)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut results = Results::default();
    let expected = blake3::Hasher::new().update_mmap_rayon(&source)?.finalize();
    let copy = dir.join("copy.bin");
    for run in 0..runs {
        eprintln!("run {}/{runs}", run + 1);
        let (t, hash) = time(|| hash_one_thread(&source))?;
        anyhow::ensure!(hash == expected, "hash mismatch");
        results.record(HASH_ONE_THREAD, t);
        let (t, hash) = time(|| Ok(blake3::Hasher::new().update_mmap_rayon(&source)?.finalize()))?;
        anyhow::ensure!(hash == expected, "hash mismatch");
        results.record("BLAKE3 hash, all threads (mmap)", t);
        // Every copy goes to a new file, removed outside the timing.
        results.record("cp", time(|| cp(&source, &copy, false))?.0);
        std::fs::remove_file(&copy)?;
        results.record("cp + fsync", time(|| cp(&source, &copy, true))?.0);
        std::fs::remove_file(&copy)?;
        results.record(DURABLE_WRITE, time(|| write_blocks_and_sync(&source, &copy))?.0);
        std::fs::remove_file(&copy)?;
        results.record(
            "dd bs=4M oflag=direct conv=fsync",
            time(|| dd_direct(&source, &copy))?.0,
        );
        std::fs::remove_file(&copy)?;
        results.record(
            "the store's writer (4 MiB blocks past the page cache) + fsync",
            time(|| write_past_cache_and_sync(&source, &copy))?.0,
        );
        std::fs::remove_file(&copy)?;

        let data_dir = dir.join(format!("node-{run}"));
        let node = start_node(&data_dir, size + 1)?;
        let client = vouch_client::Client::new(&node.url)?;
        let (t, info) = time(|| Ok(runtime.block_on(client.put_blob_file(&source, None))?))?;
        anyhow::ensure!(
            info.id.hash() == expected.as_bytes() && info.created,
            "push stored the wrong blob"
        );
        results.record("vouch push (upload, hash, outboard, fsync)", t);
        // The first pull from a new node pays for touching fresh memory in both processes; the
        // repeat shows the steady state.
        let pulled = dir.join("pulled.bin");
        for name in [
            "vouch pull (verified stream to file)",
            "vouch pull, repeated in the same processes",
        ] {
            let (t, pulled_size) =
                time(|| Ok(runtime.block_on(client.get_blob_to_file(&info.id, &pulled, u64::MAX, None))?))?;
            anyhow::ensure!(pulled_size == size, "pulled {pulled_size} bytes");
            results.record(name, t);
            std::fs::remove_file(&pulled)?;
        }
        // The node alone, read by curl into /dev/null: what the node can serve without our client.
        let blob_url = format!("{}/v1/blobs/{}", node.url, info.id);
        results.record(
            "node → curl, verified stream (no checking client)",
            time(|| curl(&format!("{blob_url}/verified")))?.0,
        );
        results.record(
            "node → curl, raw bytes (no checking client)",
            time(|| curl(&blob_url))?.0,
        );
        drop(node);
        std::fs::remove_dir_all(&data_dir)?;
    }
    let hash_1t = results.median(HASH_ONE_THREAD);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("hub benchmark: {size_mib} MiB file, median of {runs} runs, {cpus} CPUs, warm page cache");
    println!();
    let durable_write = results.median(DURABLE_WRITE);
    println!("| operation | median time | MB/s | × BLAKE3 1 thread | × write + fsync |");
    println!("|---|---|---|---|---|");
    for (name, times) in &results.rows {
        let t = median(times.clone());
        let mb_per_s = size as f64 / 1e6 / t.as_secs_f64();
        let ratio = hash_1t.as_secs_f64() / t.as_secs_f64();
        let write_ratio = durable_write.as_secs_f64() / t.as_secs_f64();
        println!(
            "| {name} | {:.3} s | {mb_per_s:.0} | {ratio:.2} | {write_ratio:.2} |",
            t.as_secs_f64()
        );
    }
    std::fs::remove_file(&source)?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Bench::Hub { size_mib, runs, dir } => hub(size_mib, runs, dir),
        Bench::Network(bench) => network::run(&bench),
        Bench::Engine {
            model,
            calibration,
            input,
            batch,
            threads,
            seconds,
            per_instruction,
        } => {
            let bench = engine::EngineBench {
                models: model,
                calibration,
                input,
                batches: batch,
                threads,
                seconds,
            };
            if per_instruction {
                engine::per_instruction(&bench)
            } else {
                engine::run(&bench)
            }
        }
    }
}
