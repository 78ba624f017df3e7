//! Measure Vouch against peers on the same machine in the same run, and print ratios.
//!
//! `hub`: push and pull a large file through a `vouch node` process on loopback, beside BLAKE3
//! hashing of the same file (one thread, and all threads) and `cp` of it on the same disk.
//! Run it with `scripts/bench-hub`, which builds the release binaries first.

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

/// What any durable store must at least do: read the bytes, write them through the page
/// cache, and wait for the disk.
fn write_blocks_and_sync(source: &Path, target: &Path) -> Result<()> {
    let mut input = File::open(source)?;
    let mut output = File::create(target)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n])?;
    }
    output.sync_all()?;
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
    let mut results: Vec<(&str, Vec<Duration>)> = vec![
        ("BLAKE3 hash, 1 thread", vec![]),
        ("BLAKE3 hash, all threads (mmap)", vec![]),
        ("cp", vec![]),
        ("cp + fsync", vec![]),
        ("write() in 1 MiB blocks + fsync (dd conv=fsync)", vec![]),
        ("vouch push (upload, hash, outboard, fsync)", vec![]),
        ("vouch pull (verified stream to file)", vec![]),
    ];
    let expected = blake3::Hasher::new().update_mmap_rayon(&source)?.finalize();
    for run in 0..runs {
        eprintln!("run {}/{runs}", run + 1);
        let (t, hash) = time(|| hash_one_thread(&source))?;
        anyhow::ensure!(hash == expected, "hash mismatch");
        results[0].1.push(t);
        let (t, hash) = time(|| Ok(blake3::Hasher::new().update_mmap_rayon(&source)?.finalize()))?;
        anyhow::ensure!(hash == expected, "hash mismatch");
        results[1].1.push(t);
        let copy = dir.join("copy.bin");
        let (t, ()) = time(|| {
            let status = Command::new("cp").arg(&source).arg(&copy).status()?;
            anyhow::ensure!(status.success(), "cp failed");
            Ok(())
        })?;
        results[2].1.push(t);
        std::fs::remove_file(&copy)?;
        let (t, ()) = time(|| {
            let status = Command::new("cp").arg(&source).arg(&copy).status()?;
            anyhow::ensure!(status.success(), "cp failed");
            File::open(&copy)?.sync_all()?;
            Ok(())
        })?;
        results[3].1.push(t);
        std::fs::remove_file(&copy)?;
        let (t, ()) = time(|| write_blocks_and_sync(&source, &copy))?;
        results[4].1.push(t);
        std::fs::remove_file(&copy)?;

        let data_dir = dir.join(format!("node-{run}"));
        let node = start_node(&data_dir, size + 1)?;
        let client = vouch_client::Client::new(&node.url)?;
        let (t, info) = time(|| Ok(runtime.block_on(client.put_blob_file(&source, None))?))?;
        anyhow::ensure!(
            info.id.hash() == expected.as_bytes() && info.created,
            "push stored the wrong blob"
        );
        results[5].1.push(t);
        let pulled = dir.join("pulled.bin");
        let (t, pulled_size) = time(|| Ok(runtime.block_on(client.get_blob_to_file(&info.id, &pulled, None))?))?;
        anyhow::ensure!(pulled_size == size, "pulled {pulled_size} bytes");
        results[6].1.push(t);
        std::fs::remove_file(&pulled)?;
        drop(node);
        std::fs::remove_dir_all(&data_dir)?;
    }
    let hash_1t = median(results[0].1.clone());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("hub benchmark: {size_mib} MiB file, median of {runs} runs, {cpus} CPUs, warm page cache");
    println!();
    let durable_write = median(results[4].1.clone());
    println!("| operation | median time | MB/s | × BLAKE3 1 thread | × write + fsync |");
    println!("|---|---|---|---|---|");
    for (name, times) in &results {
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
    }
}
