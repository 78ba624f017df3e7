//! Shared harness: real `vouch node` processes on ephemeral ports, and the `vouch` CLI.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VOUCH: &str = env!("CARGO_BIN_EXE_vouch");

pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name);
    assert!(path.exists(), "missing fixture {}", path.display());
    path
}

/// A committed data fixture (`fixtures/data/NAME`).
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/data")
        .join(name)
}

/// The first `rows` held-out digits, named `input` as the digit models name their input.
pub fn digits(rows: usize) -> vouch_tensor::NamedTensor {
    use vouch_tensor::{NamedTensor, Tensor, TensorData, TensorLimits, read_tensor_file};
    let test = read_tensor_file(&data("digits_test.npz"), &TensorLimits::default()).expect("fixture");
    let input = test
        .into_iter()
        .find(|t| t.name.as_deref() == Some("input"))
        .expect("input");
    let TensorData::F32(values) = input.tensor.data() else {
        panic!("float input");
    };
    NamedTensor {
        name: Some("input".into()),
        tensor: Tensor::new(vec![rows, 64], TensorData::F32(values[..rows * 64].to_vec())).expect("tensor"),
    }
}

/// A `vouch node` process; killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl NodeProcess {
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Self {
        let mut child = Command::new(VOUCH)
            .args(["node", "--api", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vouch node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let url = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in node output: {line:?}"))
            .to_string();
        Self {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The `.data` files in the node's blob store.
    pub fn stored_blob_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let blobs = self.data_dir.join("store/blobs");
        for shard in std::fs::read_dir(&blobs).expect("blobs dir").flatten() {
            for entry in std::fs::read_dir(shard.path()).expect("shard").flatten() {
                if entry.path().extension().is_some_and(|e| e == "data") {
                    files.push(entry.path());
                }
            }
        }
        files.sort();
        files
    }

    pub fn blob_file(&self, id: &str) -> PathBuf {
        blob_file(&self.data_dir, id)
    }
}

/// The file that holds blob `id` in the store of the node whose data directory is `data_dir`.
pub fn blob_file(data_dir: &Path, id: &str) -> PathBuf {
    let id: vouch_types::BlobId = id.parse().expect("blob id");
    let hex = id.to_hex();
    data_dir.join("store/blobs").join(&hex[..2]).join(format!("{hex}.data"))
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A user of the CLI: their own VOUCH_HOME (and so key), pointed at a node.
pub struct User {
    pub home: PathBuf,
    pub node_url: String,
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.status, 0,
            "command failed: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn last_line(&self) -> String {
        self.stdout.lines().last().unwrap_or_default().to_string()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
    /// A failure: non-zero exit and exactly one line on stderr.
    pub fn failed_with(self, needle: &str) -> Self {
        assert_ne!(self.status, 0, "expected failure, got stdout={}", self.stdout);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one error line, got: {}", self.stderr);
        assert!(self.stderr.contains(needle), "expected '{needle}' in: {}", self.stderr);
        self
    }
}

impl User {
    pub fn new(home: &Path, node_url: &str) -> Self {
        Self {
            home: home.to_path_buf(),
            node_url: node_url.to_string(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let output: Output = Command::new(VOUCH)
            .args(args)
            .env("VOUCH_HOME", &self.home)
            .env("VOUCH_NODE", &self.node_url)
            .env_remove("VOUCH_KEY")
            .stdin(Stdio::null())
            .output()
            .expect("run vouch");
        Run {
            status: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub fn with_key(home: &Path, node_url: &str) -> Self {
        let user = Self::new(home, node_url);
        user.run(&["key", "new"]).ok();
        user
    }

    /// Pushes a fixture and returns the model id (the last line of stdout).
    pub fn push(&self, fixture_name: &str, name: &str, version: &str) -> String {
        let file = fixture(fixture_name);
        let run = self
            .run(&[
                "model",
                "push",
                file.to_str().expect("utf-8 path"),
                "--name",
                name,
                "--version",
                version,
            ])
            .ok();
        run.last_line()
    }
}

/// Asserts that `response` is an API error: `status`, and a JSON body with `code` and a message.
pub async fn assert_api_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status, "expected {status} {code}");
    let body: serde_json::Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code);
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// The node's Prometheus metrics, as text.
pub async fn node_metrics(node_url: &str) -> String {
    reqwest::get(format!("{node_url}/metrics"))
        .await
        .expect("get metrics")
        .text()
        .await
        .expect("metrics text")
}

pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
