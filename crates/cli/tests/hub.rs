//! The model hub end to end: real `vouch node` processes on ephemeral ports, driven through
//! the `vouch` CLI and raw HTTP.

mod common;

use std::time::Duration;

use common::{NodeProcess, User, assert_api_error, fixture, node_metrics, wait_until};
use vouch_client::{Client, ClientError};
use vouch_crypto::SecretKey;
use vouch_types::{BlobId, ManifestBody, ModelFile, ModelFormat};

fn setup() -> (tempfile::TempDir, NodeProcess, User) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let user = User::with_key(&dir.path().join("alice"), &node.url);
    (dir, node, user)
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_pushed_model_pulls_back_byte_identical_by_every_kind_of_reference() {
    let (dir, _node, alice) = setup();
    let id = alice.push("digits_mlp_v1.onnx", "acme/digits", "1.0");
    assert!(id.starts_with("bafkr4i"), "model id is a BLAKE3 CID: {id}");
    for reference in [id.as_str(), "acme/digits@1.0", "acme/digits"] {
        let out = dir.path().join("pulled.onnx");
        alice
            .run(&["model", "pull", reference, "-o", out.to_str().expect("path")])
            .ok();
        assert_eq!(read(&out), read(&fixture("digits_mlp_v1.onnx")), "pull {reference}");
    }
    let shown = alice.run(&["model", "show", "acme/digits@1.0", "--json"]).ok().json();
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["name"], "acme/digits");
    assert_eq!(shown["version"], "1.0");
    assert_eq!(shown["inputs"][0]["name"], "input");
    assert_eq!(shown["inputs"][0]["shape"], serde_json::json!(["batch", 64]));
    assert_eq!(shown["outputs"][0]["shape"], serde_json::json!(["batch", 10]));
    let listed = alice.run(&["model", "list", "--json"]).ok().json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["id"], id.as_str());
}

#[test]
fn pushing_twice_gives_the_same_id_and_one_copy_on_disk() {
    let (_dir, node, alice) = setup();
    let first = alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    let files_after_first = node.stored_blob_files();
    let second = alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    assert_eq!(first, second);
    // One model file and one manifest, stored once each.
    assert_eq!(files_after_first.len(), 2);
    assert_eq!(node.stored_blob_files(), files_after_first);
    assert_eq!(
        alice
            .run(&["model", "list", "--json"])
            .ok()
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[test]
fn the_bare_name_resolves_to_the_latest_version() {
    let (dir, _node, alice) = setup();
    let v1 = alice.push("digits_mlp_v1.onnx", "acme/digits", "1.9");
    let v2 = alice.push("digits_mlp_v2.onnx", "acme/digits", "1.10");
    let listed = alice.run(&["model", "list", "--json"]).ok().json();
    let ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec![v1.as_str(), v2.as_str()]);
    let latest = alice.run(&["model", "show", "acme/digits", "--json"]).ok().json();
    assert_eq!(latest["id"], v2.as_str(), "1.10 is later than 1.9");
    let out = dir.path().join("latest.onnx");
    alice
        .run(&["model", "pull", "acme/digits", "-o", out.to_str().expect("path")])
        .ok();
    assert_eq!(read(&out), read(&fixture("digits_mlp_v2.onnx")));
}

#[test]
fn a_published_version_is_immutable() {
    let (dir, _node, alice) = setup();
    let v1 = alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    let other = fixture("digits_mlp_v2.onnx");
    alice
        .run(&[
            "model",
            "push",
            other.to_str().expect("path"),
            "--name",
            "acme/digits",
            "--version",
            "1",
        ])
        .failed_with("immutable");
    // Same bytes, different description: also a different manifest, also refused.
    let same = fixture("digits_mlp_v1.onnx");
    alice
        .run(&[
            "model",
            "push",
            same.to_str().expect("path"),
            "--name",
            "acme/digits",
            "--version",
            "1",
            "--description",
            "x",
        ])
        .failed_with("already published");
    let out = dir.path().join("v1.onnx");
    alice
        .run(&["model", "pull", "acme/digits@1", "-o", out.to_str().expect("path")])
        .ok();
    assert_eq!(read(&out), read(&fixture("digits_mlp_v1.onnx")));
    assert_eq!(
        alice.run(&["model", "show", "acme/digits@1", "--json"]).ok().json()["id"],
        v1.as_str()
    );
}

#[test]
fn only_the_first_publisher_of_a_name_may_publish_it() {
    let (dir, node, alice) = setup();
    alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    let mallory = User::with_key(&dir.path().join("mallory"), &node.url);
    let file = fixture("digits_mlp_v2.onnx");
    mallory
        .run(&[
            "model",
            "push",
            file.to_str().expect("path"),
            "--name",
            "acme/digits",
            "--version",
            "2",
        ])
        .failed_with("belongs to publisher");
    // Mallory's own name is fine.
    mallory.push("digits_mlp_v2.onnx", "mallory/digits", "2");
}

#[test]
fn a_corrupted_blob_fails_the_pull_and_the_node_stays_up() {
    let (dir, mut node, alice) = setup();
    alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    alice.push("digits_mlp_v2.onnx", "acme/other", "1");
    let shown = alice.run(&["model", "show", "acme/digits@1", "--json"]).ok().json();
    let blob = shown["files"][0]["blob"].as_str().expect("blob id").to_string();
    let path = node.blob_file(&blob);
    let mut bytes = read(&path);
    bytes[5000] ^= 0x40;
    std::fs::write(&path, &bytes).expect("corrupt the blob");
    let out = dir.path().join("pulled.onnx");
    alice
        .run(&["model", "pull", "acme/digits@1", "-o", out.to_str().expect("path")])
        .failed_with("corrupt");
    assert!(!out.exists(), "nothing is written for a failed pull");
    assert!(node.is_running());
    alice
        .run(&["model", "pull", "acme/other@1", "-o", out.to_str().expect("path")])
        .ok();
    assert_eq!(read(&out), read(&fixture("digits_mlp_v2.onnx")));
    // Pushing the good bytes again restores the model.
    alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    alice
        .run(&["model", "pull", "acme/digits@1", "-o", out.to_str().expect("path")])
        .ok();
    assert_eq!(read(&out), read(&fixture("digits_mlp_v1.onnx")));
}

#[tokio::test(flavor = "multi_thread")]
async fn corruption_found_mid_stream_is_reported_as_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let client = Client::new(&node.url).expect("client");
    // Large enough that the node has sent data before it reaches the damaged chunk group.
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let info = client.put_blob_bytes(data.clone()).await.expect("put");
    assert_eq!(client.get_blob_bytes(&info.id, u64::MAX).await.expect("get"), data);
    let path = node.blob_file(&info.id.to_string());
    let mut bytes = read(&path);
    bytes[2_500_000] ^= 1;
    std::fs::write(&path, &bytes).expect("corrupt");
    let error = client
        .get_blob_bytes(&info.id, u64::MAX)
        .await
        .expect_err("corrupt blob must not download");
    assert!(matches!(error, ClientError::Corrupt(_)), "{error}");
    let raw = reqwest::get(format!("{}/v1/blobs/{}", node.url, info.id))
        .await
        .expect("request");
    assert_api_error(raw, 500, "blob_corrupt").await;
    assert!(client.health().await.is_ok());
    let metrics = node_metrics(&node.url).await;
    assert!(metrics.contains("vouch_corrupt_blobs_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_upload_shows_no_partial_blob_and_keeps_what_was_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("node");
    let mut node = NodeProcess::start(&data_dir, &[]);
    let alice = User::with_key(&dir.path().join("alice"), &node.url);
    let published = alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    let files_before = node.stored_blob_files();

    // A 64 MiB upload that trickles in, so the node is mid-upload when it dies.
    let chunk = vec![0xabu8; 64 * 1024];
    let total: u64 = 64 << 20;
    let chunks = total / chunk.len() as u64;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let body = futures::stream::iter(0..chunks).then(move |_| {
        let chunk = chunk.clone();
        let counter = counter.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes::Bytes::from(chunk))
        }
    });
    let upload = reqwest::Client::new()
        .post(format!("{}/v1/blobs", node.url))
        .header("content-length", total)
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let upload = tokio::spawn(upload);
    assert!(wait_until(Duration::from_secs(30), || sent
        .load(std::sync::atomic::Ordering::SeqCst)
        > 4 << 20));
    assert!(
        std::fs::read_dir(data_dir.join("store/tmp")).expect("tmp").count() > 0,
        "upload is staged"
    );
    node.kill();
    assert!(upload.await.expect("join").is_err(), "the upload cannot have succeeded");

    let node = NodeProcess::start(&data_dir, &[]);
    assert_eq!(node.stored_blob_files(), files_before, "no partial blob became visible");
    assert_eq!(
        std::fs::read_dir(data_dir.join("store/tmp")).expect("tmp").count(),
        0,
        "staging was cleared"
    );
    let alice = User::new(&alice.home, &node.url);
    let out = dir.path().join("after.onnx");
    alice
        .run(&["model", "pull", &published, "-o", out.to_str().expect("path")])
        .ok();
    assert_eq!(read(&out), read(&fixture("digits_mlp_v1.onnx")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_upload_gets_413_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &["--max-upload-bytes", "100000"]);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/blobs", node.url))
        .body(vec![1u8; 100_001])
        .send()
        .await
        .expect("request");
    assert_api_error(response, 413, "payload_too_large").await;
    assert!(node.stored_blob_files().is_empty());
    // Through the CLI: one clear line, non-zero exit.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![2u8; 200_000]).expect("write");
    let user = User::new(&dir.path().join("u"), &node.url);
    user.run(&["blob", "put", big.to_str().expect("path")])
        .failed_with("larger than this node's limit");
    assert!(node.stored_blob_files().is_empty());
    // At the limit is fine.
    let ok = reqwest::Client::new()
        .post(format!("{}/v1/blobs", node.url))
        .body(vec![1u8; 100_000])
        .send()
        .await;
    assert_eq!(ok.expect("request").status(), 201);
}

async fn post_manifest(url: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/models"))
        .body(body)
        .send()
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_dishonest_manifests_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &["--max-manifest-bytes", "65536"]);
    let client = Client::new(&node.url).expect("client");
    assert_api_error(
        post_manifest(&node.url, b"this is not a manifest".to_vec()).await,
        400,
        "malformed_manifest",
    )
    .await;
    assert_api_error(
        post_manifest(&node.url, vec![0u8; 70_000]).await,
        413,
        "payload_too_large",
    )
    .await;

    let model = read(&fixture("digits_mlp_v1.onnx"));
    let blob = client.put_blob_bytes(model.clone()).await.expect("upload").id;
    let schema = vouch_engine::read_onnx_schema(&model).expect("schema");
    let key = SecretKey::from_seed([1; 32]);
    let body = |blob: BlobId, size: u64| ManifestBody {
        name: "acme/digits".parse().expect("name"),
        version: "1".parse().expect("version"),
        format: ModelFormat::Onnx,
        files: vec![ModelFile {
            path: "model.onnx".into(),
            blob,
            size,
        }],
        plans: Vec::new(),
        inputs: schema.inputs.clone(),
        outputs: schema.outputs.clone(),
        license: None,
        description: String::new(),
        publisher: key.public_key(),
    };
    let good = body(blob, model.len() as u64).sign(&key).expect("sign");
    // A flipped signature bit.
    let mut bytes = good.encode();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_api_error(post_manifest(&node.url, bytes).await, 400, "bad_signature").await;
    // A file the node does not hold, and a wrong size.
    let missing = body(BlobId::of(b"not uploaded"), 12).sign(&key).expect("sign");
    assert_api_error(post_manifest(&node.url, missing.encode()).await, 422, "missing_blob").await;
    let wrong_size = body(blob, 1).sign(&key).expect("sign");
    assert_api_error(
        post_manifest(&node.url, wrong_size.encode()).await,
        422,
        "size_mismatch",
    )
    .await;
    // A schema that is not the model's.
    let mut lying = body(blob, model.len() as u64);
    lying.inputs[0].name = "something_else".into();
    assert_api_error(
        post_manifest(&node.url, lying.sign(&key).expect("sign").encode()).await,
        422,
        "schema_mismatch",
    )
    .await;
    // Nothing was registered; the honest manifest still goes through.
    assert!(client.list_models(None, None).await.expect("list").is_empty());
    assert!(client.publish(&good).await.expect("publish").created);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_json_with_a_code_and_the_right_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", node.url)).send();
    let unknown = BlobId::of(b"unknown");
    let cases = [
        (get("/v1/blobs/not-a-cid").await, 400, "invalid_id"),
        (get(&format!("/v1/blobs/{unknown}")).await, 404, "blob_not_found"),
        (
            get(&format!("/v1/blobs/{unknown}/verified")).await,
            404,
            "blob_not_found",
        ),
        (get("/v1/models/acme/none@1").await, 404, "model_not_found"),
        (get("/v1/models/NotAName").await, 400, "invalid_reference"),
        (get("/v1/nothing-here").await, 404, "not_found"),
        (get("/v1/chain/status").await, 404, "no_chain"),
        (
            http.post(format!("{}/v1/blobs", node.url))
                .header("transfer-encoding", "chunked")
                .body(reqwest::Body::wrap_stream(futures::stream::iter([Ok::<
                    _,
                    std::io::Error,
                >(
                    bytes::Bytes::from_static(b"x"),
                )])))
                .send()
                .await,
            411,
            "length_required",
        ),
    ];
    for (response, status, code) in cases {
        assert_api_error(response.expect("request"), status, code).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_serve_http_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let id = Client::new(&node.url)
        .expect("client")
        .put_blob_bytes(data.clone())
        .await
        .expect("put")
        .id;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/blobs/{id}", node.url);
    for (header, start, end) in [
        ("bytes=0-9", 0, 10),
        ("bytes=16380-16390", 16380, 16391),
        ("bytes=99990-", 99990, 100_000),
        ("bytes=-5", 99995, 100_000),
    ] {
        let response = http.get(&url).header("range", header).send().await.expect("request");
        assert_eq!(response.status(), 206, "{header}");
        assert_eq!(
            response.headers()["content-range"].to_str().expect("header"),
            format!("bytes {start}-{}/100000", end - 1)
        );
        assert_eq!(
            response.bytes().await.expect("body").as_ref(),
            &data[start..end],
            "{header}"
        );
    }
    let full = http.get(&url).send().await.expect("request");
    assert_eq!(full.status(), 200);
    assert_eq!(full.bytes().await.expect("body").as_ref(), &data[..]);
    let unsatisfiable = http
        .get(&url)
        .header("range", "bytes=100000-")
        .send()
        .await
        .expect("request");
    assert_eq!(unsatisfiable.status(), 416);
    assert_eq!(unsatisfiable.headers()["content-range"], "bytes */100000");
    let head = http.head(&url).send().await.expect("request");
    assert_eq!(head.headers()["content-length"], "100000");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let alice = User::with_key(&dir.path().join("alice"), &node.url);
    alice.push("digits_mlp_v1.onnx", "acme/digits", "1");
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", node.url))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");
    let metrics = node_metrics(&node.url).await;
    assert!(metrics.contains("vouch_models_published_total 1"), "{metrics}");
    assert!(metrics.contains("vouch_blobs_stored_total 2"), "{metrics}");
    assert!(metrics.contains(r#"route="/v1/models",status="201""#), "{metrics}");
}

#[test]
fn cli_failures_are_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nobody = User::new(&dir.path().join("nobody"), "http://127.0.0.1:9");
    let file = fixture("digits_mlp_v1.onnx");
    nobody
        .run(&[
            "model",
            "push",
            file.to_str().expect("path"),
            "--name",
            "acme/x",
            "--version",
            "1",
        ])
        .failed_with("vouch key new");
    nobody.run(&["model", "list"]).failed_with("cannot reach the node");
    nobody.run(&["model", "show", "NotAName"]).failed_with("invalid");
    let user = User::with_key(&dir.path().join("u"), "http://127.0.0.1:9");
    user.run(&["key", "new"]).failed_with("refusing to overwrite");
    let shown = user.run(&["key", "show", "--json"]).ok().json();
    assert_eq!(shown["public_key"].as_str().map(str::len), Some(64));
    let not_onnx = dir.path().join("not.onnx");
    std::fs::write(&not_onnx, b"hello").expect("write");
    user.run(&[
        "model",
        "push",
        not_onnx.to_str().expect("path"),
        "--name",
        "acme/x",
        "--version",
        "1",
    ])
    .failed_with("not a valid ONNX model");
}

#[test]
fn the_node_reports_its_address_as_json_too() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(common::VOUCH)
        .args(["node", "--json", "--api", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    let _ = child.kill();
    let _ = child.wait();
    let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert!(
        value["api"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
        "{line}"
    );
}

/// A request body that sends `first` and then stalls for `stall`.
fn stalling_body(first: &'static [u8], stall: Duration) -> reqwest::Body {
    let frames = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(first))]).chain(
        futures::stream::once(async move {
            tokio::time::sleep(stall).await;
            Ok(bytes::Bytes::from_static(b"late"))
        }),
    );
    reqwest::Body::wrap_stream(frames)
}

use futures::StreamExt as _;

#[tokio::test(flavor = "multi_thread")]
async fn slow_requests_hit_their_limits_with_json_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[
            "--request-timeout-ms",
            "300",
            "--body-idle-timeout-ms",
            "1500",
            "--max-concurrent-uploads",
            "1",
        ],
    );
    let http = reqwest::Client::new();
    // A manifest upload that stalls runs into the request deadline.
    let response = http
        .post(format!("{}/v1/models", node.url))
        .body(stalling_body(b"x", Duration::from_secs(5)))
        .send()
        .await
        .expect("request");
    assert_api_error(response, 408, "request_timeout").await;
    // A blob upload that stalls runs into the idle timeout, and nothing is stored.
    let response = http
        .post(format!("{}/v1/blobs", node.url))
        .header("content-length", 5)
        .body(stalling_body(b"x", Duration::from_secs(5)))
        .send()
        .await
        .expect("request");
    assert_api_error(response, 400, "upload_failed").await;
    assert!(node.stored_blob_files().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_body_that_breaks_off_is_a_400_not_a_413() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &["--request-timeout-ms", "10000", "--body-idle-timeout-ms", "300"],
    );
    let response = reqwest::Client::new()
        .post(format!("{}/v1/models", node.url))
        .body(stalling_body(b"x", Duration::from_secs(5)))
        .send()
        .await
        .expect("request");
    assert_api_error(response, 400, "upload_failed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_beyond_the_concurrency_limit_get_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &["--max-concurrent-uploads", "1"]);
    let http = reqwest::Client::new();
    let holding = tokio::spawn(
        http.post(format!("{}/v1/blobs", node.url))
            .header("content-length", 5)
            .body(stalling_body(b"x", Duration::from_secs(3)))
            .send(),
    );
    let mut holding_slot = false;
    for _ in 0..500 {
        let metrics = node_metrics(&node.url).await;
        if metrics.contains("vouch_uploads_in_flight 1") {
            holding_slot = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(holding_slot, "the first upload holds the only slot");
    let response = http
        .post(format!("{}/v1/blobs", node.url))
        .body(vec![1u8; 10])
        .send()
        .await
        .expect("request");
    assert_api_error(response, 503, "too_many_uploads").await;
    let first = holding.await.expect("join").expect("first upload completes");
    assert_eq!(
        first.status(),
        201,
        "the first upload, once its body arrives, is stored"
    );
}
