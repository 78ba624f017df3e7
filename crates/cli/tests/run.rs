//! `vouch run` on real models: float and exact, every input format, exactness across threads and
//! kernels, and one-line errors for bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{User, data, digits};
use vouch_tensor::{NamedTensor, Tensor, TensorData, TensorLimits, read_tensor_file, write_tensor_file};

fn write(dir: &Path, file: &str, tensors: &[NamedTensor]) -> String {
    let path = dir.join(file);
    write_tensor_file(&path, tensors).expect("write input");
    path.display().to_string()
}

struct Setup {
    _dir: tempfile::TempDir,
    user: User,
    model: String,
    calibration: String,
    input: String,
    dir: PathBuf,
}

impl Setup {
    /// `vouch run MODEL --input INPUT --exact --calibration CALIBRATION EXTRA..`.
    fn exact_with(&self, input: &str, extra: &[&str]) -> common::Run {
        let mut args = vec![
            "run",
            &self.model,
            "--input",
            input,
            "--exact",
            "--calibration",
            &self.calibration,
        ];
        args.extend_from_slice(extra);
        self.user.run(&args)
    }

    fn exact(&self, input: &str) -> common::Run {
        self.exact_with(input, &[])
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = User::new(dir.path(), "http://127.0.0.1:9");
    let mut unnamed = digits(5);
    unnamed.name = None;
    let input = write(dir.path(), "x.npy", &[unnamed]);
    Setup {
        user,
        model: common::fixture("digits_mlp_v2.onnx").display().to_string(),
        calibration: data("digits_calibration.npz").display().to_string(),
        input,
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

#[test]
fn float_and_exact_runs_agree_and_write_outputs() {
    let s = setup();
    let float = s
        .user
        .run(&["run", &s.model, "--input", &s.input, "--json"])
        .ok()
        .json();
    assert_eq!(float["mode"], "float");
    assert!(float.get("plan_id").is_none());
    let out = s.dir.join("out.npz");
    let out_arg = out.to_str().expect("utf8");
    let exact = s.exact_with(&s.input, &["-o", out_arg, "--json"]).ok().json();
    assert_eq!(exact["mode"], "exact");
    assert!(exact["plan_id"].as_str().expect("plan id").starts_with("bafkr4"));
    assert_eq!(exact["trace_root"].as_str().expect("root").len(), 64);
    assert_eq!(exact["output_hash"].as_str().expect("hash").len(), 64);
    let argmax = |v: &serde_json::Value| -> Vec<usize> {
        let values: Vec<f64> = v["outputs"]["probabilities"]["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect();
        values
            .chunks(10)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold((0, f64::MIN), |b, (i, x)| if *x > b.1 { (i, *x) } else { b })
                    .0
            })
            .collect()
    };
    assert_eq!(argmax(&float), argmax(&exact));
    let written = read_tensor_file(&out, &TensorLimits::default()).expect("output file");
    assert_eq!(written[0].name.as_deref(), Some("probabilities"));
    assert_eq!(written[0].tensor.shape(), &[5, 10]);
    // The human form ends with the hashes.
    let text = s.user.run(&["run", &s.model, "--input", &s.input]).ok();
    assert!(text.stdout.contains("probabilities float32 [5, 10]"), "{}", text.stdout);
    assert!(text.stdout.contains(&format!(
        "output_hash: {}",
        float["output_hash"].as_str().expect("hash")
    )));
}

#[test]
fn every_input_format_gives_the_same_answer() {
    let s = setup();
    let named = [digits(5)];
    let mut hashes = Vec::new();
    for file in ["x.npz", "x.json", "x.pb"] {
        let input = write(&s.dir, file, &named);
        let run = s.user.run(&["run", &s.model, "--input", &input, "--json"]).ok().json();
        hashes.push(run["output_hash"].clone());
    }
    let npy = s
        .user
        .run(&["run", &s.model, "--input", &s.input, "--json"])
        .ok()
        .json();
    hashes.push(npy["output_hash"].clone());
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}

#[test]
fn exact_runs_are_identical_across_threads_and_kernels() {
    let s = setup();
    let mut seen = Vec::new();
    for extra in [
        &["--threads", "1"][..],
        &["--threads", "2"],
        &["--threads", "8"],
        &["--threads", "1", "--no-simd"],
        &["--threads", "4", "--no-simd"],
    ] {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let run = s.exact_with(&s.input, &args).ok().json();
        seen.push((
            run["plan_id"].clone(),
            run["trace_root"].clone(),
            run["output_hash"].clone(),
        ));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let s = setup();
    let mut renamed = digits(2);
    renamed.name = Some("pixels".into());
    let input = write(&s.dir, "renamed.npz", &[renamed.clone()]);
    s.exact(&input)
        .failed_with("input 'pixels': the model has no such input; it takes 'input' float32 [batch, 64]");
    s.user
        .run(&["run", &s.model, "--input", &input])
        .failed_with("input 'pixels'");

    let narrow = NamedTensor {
        name: None,
        tensor: Tensor::new(vec![2, 63], TensorData::F32(vec![0.5; 126])).expect("tensor"),
    };
    let input = write(&s.dir, "narrow.npy", &[narrow]);
    s.exact(&input)
        .failed_with("has shape [2, 63], expected float32 [batch, 64]");

    let garbage = s.dir.join("garbage.npy");
    std::fs::write(&garbage, b"not a tensor").expect("write");
    s.user
        .run(&["run", &s.model, "--input", garbage.to_str().expect("utf8")])
        .failed_with("npy:");
    s.user
        .run(&["run", &s.model, "--input", "input.csv"])
        .failed_with("unknown extension");
    s.user
        .run(&["run", &s.model, "--input", &s.input, "--exact"])
        .failed_with("needs --calibration");
    s.user
        .run(&["run", &s.model, "--input", &s.input, "--exact", "--calibration", &input])
        .failed_with("calibration");
    let not_onnx = s.dir.join("model.onnx");
    std::fs::write(&not_onnx, b"\x08\x01garbage").expect("write");
    s.user
        .run(&["run", not_onnx.to_str().expect("utf8"), "--input", &s.input])
        .failed_with("model.onnx");
}
