//! Receipts over a real trained model: an honest receipt re-executes; each kind of lie is caught
//! and named.

use std::path::PathBuf;

use vouch_crypto::{Digest, SecretKey};
use vouch_engine::{ExecOptions, Plan, PlanLimits, build_plan, load_onnx};
use vouch_tensor::{NamedTensor, TensorLimits, read_tensor_file};
use vouch_types::{
    BlobId, Manifest, ManifestBody, ModelFile, ModelFormat, PlanRef, Receipt, ReceiptBody, VerifyLevel, request_hash,
};
use vouch_verify::{
    VerifyError, check_outputs, check_receipt_model, check_request, decode_plan, name_inputs, reexecute, run_exact,
};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn tensors(path: &str) -> Vec<NamedTensor> {
    read_tensor_file(&fixture(path), &TensorLimits::default()).expect("fixture tensors")
}

/// A published model: its signed manifest and its plan.
fn publish(model_file: &str, version: &str) -> (Manifest, Plan) {
    let bytes = std::fs::read(fixture(model_file)).expect("model");
    let model = load_onnx(&bytes).expect("load");
    let plan = build_plan(
        &model,
        &model.to_ir().expect("ir"),
        &tensors("data/digits_calibration.npz"),
    )
    .expect("plan");
    let schema = vouch_engine::read_onnx_schema(&bytes).expect("schema");
    let publisher = SecretKey::from_seed([1; 32]);
    let plan_bytes = plan.encode();
    let manifest = ManifestBody {
        name: "acme/digits".parse().expect("name"),
        version: version.parse().expect("version"),
        format: ModelFormat::Onnx,
        files: vec![ModelFile {
            path: "model.onnx".into(),
            blob: BlobId::of(&bytes),
            size: bytes.len() as u64,
        }],
        plans: vec![PlanRef {
            id: BlobId::of(&plan_bytes),
            size: plan_bytes.len() as u64,
        }],
        inputs: schema.inputs,
        outputs: schema.outputs,
        license: None,
        description: String::new(),
        publisher: publisher.public_key(),
    }
    .sign(&publisher)
    .expect("sign");
    (manifest, plan)
}

fn inputs(manifest: &Manifest) -> Vec<NamedTensor> {
    let mut test = tensors("data/digits_test.npz");
    test.retain(|t| t.name.as_deref() == Some("input"));
    // As a client would send it: one unnamed tensor for a one-input model.
    test[0].name = None;
    name_inputs(&manifest.body.inputs, test).expect("inputs fit")
}

/// What an honest node signs after running `plan` for `manifest`.
fn honest_receipt(node: &SecretKey, manifest: &Manifest, plan: &Plan, inputs: &[NamedTensor]) -> Receipt {
    let answer = run_exact(plan, inputs, &ExecOptions::default()).expect("runs");
    let input_hash = vouch_verify::tensors_hash(inputs);
    ReceiptBody {
        request_hash: request_hash(&manifest.id(), &input_hash, VerifyLevel::Reexec, 42),
        model_id: manifest.id(),
        level: VerifyLevel::Reexec,
        plan_id: Some(plan.id()),
        input_hash,
        output_hash: answer.output_hash,
        trace_root: Some(answer.trace_root),
        executor: node.public_key(),
    }
    .sign(node)
    .expect("sign")
}

fn full_check(receipt: &Receipt, manifest: &Manifest, plan: &Plan, inputs: &[NamedTensor]) -> Result<(), VerifyError> {
    let plan_id = check_receipt_model(receipt, manifest)?.ok_or(VerifyError::NothingToReexecute)?;
    let plan = decode_plan(&plan_id, &plan.encode(), &PlanLimits::default())?;
    reexecute(receipt, &plan, inputs, &ExecOptions::default()).map(|_| ())
}

#[test]
fn an_honest_receipt_verifies_and_each_lie_is_named() {
    let node = SecretKey::from_seed([7; 32]);
    let (manifest, plan) = publish("models/digits_mlp_v1.onnx", "1");
    let inputs = inputs(&manifest);
    let receipt = honest_receipt(&node, &manifest, &plan, &inputs);
    full_check(&receipt, &manifest, &plan, &inputs).expect("an honest receipt verifies");
    check_request(&receipt, VerifyLevel::Reexec, 42).expect("answers the request");
    assert!(matches!(
        check_request(&receipt, VerifyLevel::Reexec, 43),
        Err(VerifyError::Mismatch {
            what: "request hash",
            ..
        })
    ));
    let single_thread = ExecOptions {
        threads: 1,
        simd: false,
        ..ExecOptions::default()
    };
    let answer = run_exact(&plan, &inputs, &single_thread).expect("runs");
    check_outputs(&receipt, &answer.outputs).expect("outputs match");

    // A node that lies, re-signing each lie with its own key so the signature holds.
    let lie = |edit: &dyn Fn(&mut ReceiptBody)| {
        let mut body = receipt.body.clone();
        edit(&mut body);
        body.sign(&node).expect("sign")
    };
    let changed_output = lie(&|b| b.output_hash = Digest::of("tensors", b"other outputs"));
    assert!(matches!(
        full_check(&changed_output, &manifest, &plan, &inputs),
        Err(VerifyError::Mismatch {
            what: "output hash",
            ..
        })
    ));
    let changed_root = lie(&|b| b.trace_root = Some(Digest::of("trace root", b"other")));
    assert!(matches!(
        full_check(&changed_root, &manifest, &plan, &inputs),
        Err(VerifyError::Mismatch { what: "trace root", .. })
    ));
    let changed_input = lie(&|b| b.input_hash = Digest::of("tensors", b"other inputs"));
    assert!(matches!(
        full_check(&changed_input, &manifest, &plan, &inputs),
        Err(VerifyError::Mismatch { what: "input hash", .. })
    ));
    let (other_manifest, other_plan) = publish("models/digits_mlp_v2.onnx", "2");
    let changed_model = lie(&|b| b.model_id = other_manifest.id());
    assert!(matches!(
        full_check(&changed_model, &manifest, &plan, &inputs),
        Err(VerifyError::ModelMismatch { .. })
    ));
    let foreign_plan = lie(&|b| b.plan_id = Some(other_plan.id()));
    assert!(matches!(
        full_check(&foreign_plan, &manifest, &plan, &inputs),
        Err(VerifyError::PlanNotInModel { .. })
    ));

    // A changed signature.
    let mut bad_signature = receipt.clone();
    let mut signature = *bad_signature.signature.as_bytes();
    signature[0] ^= 1;
    bad_signature.signature = vouch_crypto::Signature::from_bytes(signature);
    assert!(matches!(
        full_check(&bad_signature, &manifest, &plan, &inputs),
        Err(VerifyError::Receipt(_))
    ));

    // A node that ran v2 but claims v1: its outputs and trace are v2's.
    let ran_v2 = honest_receipt(&node, &other_manifest, &other_plan, &inputs);
    let claims_v1 = lie(&|b| {
        b.output_hash = ran_v2.body.output_hash;
        b.trace_root = ran_v2.body.trace_root;
    });
    assert!(matches!(
        full_check(&claims_v1, &manifest, &plan, &inputs),
        Err(VerifyError::Mismatch {
            what: "output hash",
            ..
        })
    ));
}

#[test]
fn plan_bytes_must_be_the_named_plan() {
    let (_, plan) = publish("models/digits_mlp_v1.onnx", "1");
    let mut bytes = plan.encode();
    decode_plan(&plan.id(), &bytes, &PlanLimits::default()).expect("the plan's own bytes");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert!(matches!(
        decode_plan(&plan.id(), &bytes, &PlanLimits::default()),
        Err(VerifyError::Plan { .. })
    ));
}

#[test]
fn inputs_are_named_as_the_model_names_them() {
    let (manifest, _) = publish("models/digits_mlp_v1.onnx", "1");
    let mut test = tensors("data/digits_test.npz");
    test.retain(|t| t.name.as_deref() == Some("input"));
    let mut wrong = test.clone();
    wrong[0].name = Some("pixels".into());
    let error = name_inputs(&manifest.body.inputs, wrong).expect_err("unknown name");
    assert!(error.to_string().contains("input 'pixels'"), "{error}");
    let twice = vec![test[0].clone(), test[0].clone()];
    assert!(matches!(
        name_inputs(&manifest.body.inputs, twice),
        Err(VerifyError::Input { .. })
    ));
    assert!(matches!(
        name_inputs(&manifest.body.inputs, Vec::new()),
        Err(VerifyError::Input { .. })
    ));
}
