//! Inference on a node with receipts: models published with their exact plans, answers
//! re-executed by the client, receipts checked later by `vouch verify`, and lying nodes caught.

mod common;

use std::path::{Path, PathBuf};

use common::{NodeProcess, User, assert_api_error, data, digits, fixture};
use vouch_crypto::{Digest, SecretKey};
use vouch_tensor::{NamedTensor, Tensor, TensorData, TensorLimits, read_tensor_file, write_tensor_file};
use vouch_types::Receipt;

/// A data fixture's path as a command-line argument.
fn data_arg(name: &str) -> String {
    data(name).display().to_string()
}

/// The first `rows` held-out digits as one unnamed tensor, written to `dir/file`.
fn digits_file(dir: &Path, file: &str, rows: usize) -> String {
    let mut input = digits(rows);
    input.name = None;
    let path = dir.join(file);
    write_tensor_file(&path, &[input]).expect("write input");
    path.display().to_string()
}

struct Net {
    dir: tempfile::TempDir,
    node: NodeProcess,
    alice: User,
}

impl Net {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = NodeProcess::start(&dir.path().join("node"), &[]);
        let alice = User::with_key(&dir.path().join("alice"), &node.url);
        Self { dir, node, alice }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Pushes a fixture with its exact plan built from the digits calibration set.
    fn push_with_plan(&self, model: &str, version: &str) -> serde_json::Value {
        let file = fixture(model);
        let calibration = data_arg("digits_calibration.npz");
        self.alice
            .run(&[
                "model",
                "push",
                file.to_str().expect("utf8"),
                "--name",
                "acme/digits",
                "--version",
                version,
                "--calibration",
                &calibration,
                "--json",
            ])
            .ok()
            .json()
    }

    fn node_key(&self) -> SecretKey {
        SecretKey::load(&self.node.data_dir.join("node_key.pem")).expect("node key")
    }
}

fn read_receipt(path: &Path) -> Receipt {
    serde_json::from_slice(&std::fs::read(path).expect("receipt file")).expect("receipt JSON")
}

fn write_receipt(path: &Path, receipt: &Receipt) -> String {
    std::fs::write(path, serde_json::to_string_pretty(receipt).expect("json")).expect("write");
    path.display().to_string()
}

#[test]
fn a_published_plan_runs_locally_on_the_node_and_is_verified_by_reexecution() {
    let net = Net::start();
    let pushed = net.push_with_plan("digits_mlp_v1.onnx", "1");
    let plan_id = pushed["plan_id"].as_str().expect("plan id").to_string();
    let model_id = pushed["id"].as_str().expect("model id").to_string();
    let shown = net.alice.run(&["model", "show", "acme/digits@1", "--json"]).ok().json();
    assert_eq!(shown["plans"][0]["id"], plan_id.as_str());
    let input = digits_file(net.dir.path(), "x.npy", 7);

    // `vouch run REF --exact` uses the published plan; building the same plan here agrees.
    let published = net
        .alice
        .run(&["run", "acme/digits@1", "--input", &input, "--exact", "--json"])
        .ok()
        .json();
    assert_eq!(published["plan_id"], plan_id.as_str());
    assert_eq!(published["model_id"], model_id.as_str());
    let local = net
        .alice
        .run(&[
            "run",
            fixture("digits_mlp_v1.onnx").to_str().expect("utf8"),
            "--input",
            &input,
            "--exact",
            "--calibration",
            &data_arg("digits_calibration.npz"),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(local["plan_id"], published["plan_id"]);
    assert_eq!(local["trace_root"], published["trace_root"]);

    // On the node, re-executed by default.
    let receipt_path = net.path("receipt.json");
    let out = net.path("out.npz");
    let answer = net
        .alice
        .run(&[
            "infer",
            "acme/digits@1",
            "--input",
            &input,
            "--receipt",
            receipt_path.to_str().expect("utf8"),
            "-o",
            out.to_str().expect("utf8"),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(answer["verify"], "reexec");
    assert_eq!(answer["receipt"]["plan_id"], plan_id.as_str());
    assert_eq!(answer["receipt"]["trace_root"], published["trace_root"]);
    assert_eq!(answer["output_hash"], published["output_hash"]);
    let receipt = read_receipt(&receipt_path);
    assert_eq!(receipt.body.model_id.to_string(), model_id);
    assert_eq!(receipt.body.executor, net.node_key().public_key());
    let written = read_tensor_file(&out, &TensorLimits::default()).expect("outputs");
    assert_eq!(written[0].tensor.shape(), &[7, 10]);

    // Later, anyone holding the inputs checks it.
    let valid = net
        .alice
        .run(&[
            "verify",
            receipt_path.to_str().expect("utf8"),
            "--input",
            &input,
            "--output",
            out.to_str().expect("utf8"),
        ])
        .ok();
    assert!(valid.stdout.contains("valid: re-executed"), "{}", valid.stdout);
    net.alice
        .run(&["verify", receipt_path.to_str().expect("utf8")])
        .failed_with("pass --input FILE");
    let other_input = digits_file(net.dir.path(), "other.npy", 6);
    net.alice
        .run(&["verify", receipt_path.to_str().expect("utf8"), "--input", &other_input])
        .failed_with("input hash differs");
}

#[test]
fn changed_receipts_and_lying_nodes_fail_verification() {
    let net = Net::start();
    let v1 = net.push_with_plan("digits_mlp_v1.onnx", "1");
    let v2 = net.push_with_plan("digits_mlp_v2.onnx", "2");
    let input = digits_file(net.dir.path(), "x.npy", 4);
    let receipt_path = net.path("receipt.json");
    let receipt_arg = receipt_path.to_str().expect("utf8");
    net.alice
        .run(&["infer", "acme/digits@1", "--input", &input, "--receipt", receipt_arg])
        .ok();
    let honest = read_receipt(&receipt_path);
    let verify = |receipt: &Receipt, name: &str| {
        let path = write_receipt(&net.path(name), receipt);
        net.alice.run(&["verify", &path, "--input", &input])
    };
    verify(&honest, "honest.json").ok();

    // Edited by someone without the node's key: the signature breaks.
    let mut changed = honest.clone();
    changed.body.output_hash = Digest::of("tensors", b"a better answer");
    verify(&changed, "changed_output.json").failed_with("signature does not verify");
    let mut changed = honest.clone();
    changed.body.trace_root = Some(Digest::of("trace root", b"elsewhere"));
    verify(&changed, "changed_root.json").failed_with("signature does not verify");
    let mut changed = honest.clone();
    changed.body.model_id = v2["id"].as_str().expect("id").parse().expect("model id");
    verify(&changed, "changed_model.json").failed_with("signature does not verify");
    let mut changed = honest.clone();
    let mut signature = *changed.signature.as_bytes();
    signature[5] ^= 0x40;
    changed.signature = vouch_crypto::Signature::from_bytes(signature);
    verify(&changed, "changed_signature.json").failed_with("signature does not verify");

    // Signed by the node itself: lies the signature cannot catch, re-execution does.
    let node_key = net.node_key();
    let lie = |edit: &dyn Fn(&mut vouch_types::ReceiptBody)| {
        let mut body = honest.body.clone();
        edit(&mut body);
        body.sign(&node_key).expect("sign")
    };
    verify(
        &lie(&|b| b.output_hash = Digest::of("tensors", b"a better answer")),
        "lie_output.json",
    )
    .failed_with("output hash differs");
    verify(
        &lie(&|b| b.trace_root = Some(Digest::of("trace root", b"elsewhere"))),
        "lie_root.json",
    )
    .failed_with("trace root differs");
    // A node that ran v2 and says it ran v1.
    let v2_receipt_path = net.path("v2.json");
    net.alice
        .run(&[
            "infer",
            "acme/digits@2",
            "--input",
            &input,
            "--receipt",
            v2_receipt_path.to_str().expect("utf8"),
        ])
        .ok();
    let ran_v2 = read_receipt(&v2_receipt_path);
    assert_ne!(ran_v2.body.model_id.to_string(), v1["id"].as_str().expect("id"));
    verify(
        &lie(&|b| {
            b.output_hash = ran_v2.body.output_hash;
            b.trace_root = ran_v2.body.trace_root;
        }),
        "lie_model.json",
    )
    .failed_with("output hash differs");
    // Claiming v2's plan for v1.
    verify(&lie(&|b| b.plan_id = ran_v2.body.plan_id), "lie_plan.json").failed_with("is not an exact plan of model");
}

#[test]
fn models_without_plans_answer_at_level_none() {
    let net = Net::start();
    net.alice.push("digits_mlp_v2.onnx", "acme/plain", "1");
    let input = digits_file(net.dir.path(), "x.npy", 3);
    net.alice
        .run(&["infer", "acme/plain", "--input", &input, "--verify", "reexec"])
        .failed_with("has no exact plan");
    net.alice
        .run(&["run", "acme/plain", "--input", &input, "--exact"])
        .failed_with("has no exact plan");
    let receipt_path = net.path("receipt.json");
    let answer = net
        .alice
        .run(&[
            "infer",
            "acme/plain",
            "--input",
            &input,
            "--receipt",
            receipt_path.to_str().expect("utf8"),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(answer["verify"], "none");
    assert!(answer["receipt"]["plan_id"].is_null());
    // The float answer is the float path's: the same hash as a local float run.
    let local = net
        .alice
        .run(&["run", "acme/plain", "--input", &input, "--json"])
        .ok()
        .json();
    assert_eq!(answer["output_hash"], local["output_hash"]);
    let checked = net
        .alice
        .run(&["verify", receipt_path.to_str().expect("utf8"), "--input", &input])
        .ok();
    assert!(checked.stdout.contains("level none"), "{}", checked.stdout);

    // Asked directly, the node refuses to re-execute what has no plan.
    let request = serde_json::json!({
        "model": "acme/plain", "verify": "reexec", "nonce": 1,
        "inputs": {"input": {"shape": [1, 64], "dtype": "float32", "data": vec![0.0f32; 64]}},
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/infer", net.node.url))
            .json(&request)
            .send()
            .await
            .expect("send");
        assert_api_error(response, 422, "no_exact_plan").await;
    });
}

#[test]
fn a_node_at_its_inference_limit_answers_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &["--max-concurrent-inferences", "0"]);
    let alice = User::with_key(&dir.path().join("alice"), &node.url);
    alice.push("digits_mlp_v2.onnx", "acme/plain", "1");
    let input = digits_file(dir.path(), "x.npy", 1);
    alice
        .run(&["infer", "acme/plain", "--input", &input])
        .failed_with("too_many_inferences");
}

#[test]
fn bad_requests_get_clear_errors_and_the_node_stays_up() {
    let net = Net::start();
    net.push_with_plan("digits_mlp_v1.onnx", "1");
    let renamed = {
        let path = net.path("renamed.npz");
        let tensor = Tensor::new(vec![1, 64], TensorData::F32(vec![0.0; 64])).expect("tensor");
        write_tensor_file(
            &path,
            &[NamedTensor {
                name: Some("pixels".into()),
                tensor,
            }],
        )
        .expect("write");
        path.display().to_string()
    };
    net.alice
        .run(&["infer", "acme/digits", "--input", &renamed])
        .failed_with("input 'pixels': the model has no such input");
    let narrow = net.path("narrow.npy");
    let tensor = Tensor::new(vec![2, 63], TensorData::F32(vec![0.5; 126])).expect("tensor");
    write_tensor_file(&narrow, &[NamedTensor { name: None, tensor }]).expect("write");
    net.alice
        .run(&["infer", "acme/digits", "--input", narrow.to_str().expect("utf8")])
        .failed_with("has shape [2, 63], expected float32 [batch, 64]");
    net.alice
        .run(&["infer", "acme/nothing", "--input", &renamed])
        .failed_with("no model acme/nothing");
    let not_receipt = net.path("not_receipt.json");
    std::fs::write(&not_receipt, b"{\"hello\": 1}").expect("write");
    net.alice
        .run(&["verify", not_receipt.to_str().expect("utf8")])
        .failed_with("is not a receipt");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/infer", net.node.url);
        let response = http.post(&url).body("{not json").send().await.expect("send");
        assert_api_error(response, 400, "invalid_request").await;
        let huge = vec![b' '; (64 << 20) + 1];
        let response = http.post(&url).body(huge).send().await.expect("send");
        assert_api_error(response, 413, "payload_too_large").await;
        let too_many_elements = serde_json::json!({
            "model": "acme/digits",
            "verify": "reexec",
            "nonce": 1,
            "inputs": {"input": {"shape": [1 << 20, 64], "dtype": "float32", "data": []}},
        });
        let response = http.post(&url).json(&too_many_elements).send().await.expect("send");
        assert_api_error(response, 400, "invalid_inputs").await;
        let health: serde_json::Value = http
            .get(format!("{}/healthz", net.node.url))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(health["status"], "ok");
        assert_eq!(health["node_key"], net.node_key().public_key().to_string());

        // A manifest whose plan is missing, or is not a plan, is refused.
        let client = vouch_client::Client::new(&net.node.url).expect("client");
        let model = std::fs::read(fixture("digits_mlp_v2.onnx")).expect("model");
        let schema = vouch_engine::read_onnx_schema(&model).expect("schema");
        let blob = client.put_blob_bytes(model.clone()).await.expect("upload");
        let not_a_plan = client.put_blob_bytes(b"not a plan".to_vec()).await.expect("upload");
        let key = SecretKey::from_seed([3; 32]);
        let manifest = |plan: vouch_types::PlanRef| {
            vouch_types::ManifestBody {
                name: "acme/planned".parse().expect("name"),
                version: "1".parse().expect("version"),
                format: vouch_types::ModelFormat::Onnx,
                files: vec![vouch_types::ModelFile {
                    path: "model.onnx".into(),
                    blob: blob.id,
                    size: blob.size,
                }],
                plans: vec![plan],
                inputs: schema.inputs.clone(),
                outputs: schema.outputs.clone(),
                license: None,
                description: String::new(),
                publisher: key.public_key(),
            }
            .sign(&key)
            .expect("sign")
        };
        let missing = manifest(vouch_types::PlanRef {
            id: vouch_types::BlobId::of(b"never uploaded"),
            size: 14,
        });
        let error = client.publish(&missing).await.expect_err("missing plan");
        assert!(error.to_string().contains("missing_blob"), "{error}");
        let garbage = manifest(vouch_types::PlanRef {
            id: not_a_plan.id,
            size: not_a_plan.size,
        });
        let error = client.publish(&garbage).await.expect_err("not a plan");
        assert!(error.to_string().contains("invalid_plan"), "{error}");

        // A real plan, but of another model (the ONNX backend's Relu test, input 'x').
        let relu = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/fetched/onnx-1.22.0/onnx/backend/test/data/node/test_relu");
        let relu_model =
            vouch_engine::load_onnx(&std::fs::read(relu.join("model.onnx")).expect("fetched fixture")).expect("load");
        let relu_input = std::fs::read(relu.join("test_data_set_0/input_0.pb")).expect("fetched fixture");
        let calibration = vouch_tensor::read_tensor_proto(&relu_input, &TensorLimits::default()).expect("tensor");
        let relu_plan = vouch_engine::build_plan(&relu_model, &relu_model.to_ir().expect("ir"), &[calibration])
            .expect("plan")
            .encode();
        let stored = client.put_blob_bytes(relu_plan).await.expect("upload");
        let foreign = manifest(vouch_types::PlanRef {
            id: stored.id,
            size: stored.size,
        });
        let error = client.publish(&foreign).await.expect_err("another model's plan");
        assert!(error.to_string().contains("plan_mismatch"), "{error}");
    });
}
