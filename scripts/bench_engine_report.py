#!/usr/bin/env python3
"""Measure onnxruntime on the models and inputs `vouch-bench engine` measured, compare the exact
plans with onnxruntime fp32 on the held-out inputs, and print one Markdown report with every
engine's inferences per second as a ratio to onnxruntime's.

Used by scripts/bench-engine; arguments: RUST_RESULTS.jsonl VOUCH_BINARY CASE..., where a CASE is
MODEL,CALIBRATION,INPUT[,LABELS]: classifiers (with LABELS) are compared by top-1 agreement,
sentence encoders (inputs with an `attention_mask`) by the cosine of mean-pooled embeddings, and
other models by the cosine of each output row.
"""
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def rate(seconds, f):
    for _ in range(3):
        f()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or calls < 5:
        f()
        calls += 1
    return calls / (time.perf_counter() - start)


def session(model, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def feed(s, inputs, batch):
    """The model's inputs by name (or the only array for a one-input model), first `batch` rows."""
    names = [i.name for i in s.get_inputs()]
    if len(names) == 1 and len(inputs) == 1:
        return {names[0]: next(iter(inputs.values()))[:batch]}
    return {name: inputs[name][:batch] for name in names}


def exact_outputs(vouch, model, calibration, test_input):
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "out.npz"
        subprocess.run([vouch, "run", model, "--input", test_input, "--exact", "--calibration",
                        calibration, "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
        with np.load(out) as arrays:
            return arrays[arrays.files[0]]


def pooled(hidden, mask):
    mask = mask.astype(np.float64)[:, :, None]
    mean = (hidden.astype(np.float64) * mask).sum(1) / mask.sum(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def main():
    results_path, vouch, *specs = sys.argv[1:]
    cases_given = [spec.split(",") for spec in specs]
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    cases = sorted({(r["model"], r["batch"], r["threads"]) for r in rows})
    for model, _calibration, test_input, *_ in cases_given:
        name = pathlib.Path(model).stem
        inputs = dict(np.load(test_input))
        for (m, batch, threads) in cases:
            if m != name:
                continue
            s = session(model, threads)
            given = feed(s, inputs, batch)
            r = rate(1.0, lambda: s.run(None, given))
            rows.append({"model": name, "engine": "onnxruntime", "batch": batch, "threads": threads,
                         "inferences_per_second": r * batch})
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}\n")
    print("| model | batch | threads | onnxruntime inf/s | Vouch exact | Vouch float | tract |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    index = {(r["model"], r["engine"], r["batch"], r["threads"]): r["inferences_per_second"] for r in rows}
    for (model, batch, threads) in cases:
        base = index[(model, "onnxruntime", batch, threads)]
        cells = []
        for engine in ["vouch-exact", "vouch-float", "tract"]:
            value = index[(model, engine, batch, threads)]
            cells.append(f"{value:,.1f} ({value / base:.2f}x)")
        print(f"| {model} | {batch} | {threads} | {base:,.1f} | " + " | ".join(cells) + " |")

    print("\nThe exact plans against onnxruntime fp32 on held-out inputs:\n")
    print("| model | held-out inputs | measure | exact vs onnxruntime | exact task accuracy | onnxruntime task accuracy |")
    print("|---|---:|---|---:|---:|---:|")
    for model, calibration, test_input, *labels in cases_given:
        name = pathlib.Path(model).stem
        inputs = dict(np.load(test_input))
        exact = exact_outputs(vouch, model, calibration, test_input)
        s = session(model, 1)
        reference = s.run(None, feed(s, inputs, None))[0]
        count = len(exact)
        if labels:
            truth = np.load(labels[0])
            agree = (exact.argmax(1) == reference.argmax(1)).mean()
            print(f"| {name} | {count} | top-1 agreement | {agree:.2%} | {(exact.argmax(1) == truth).mean():.2%} "
                  f"| {(reference.argmax(1) == truth).mean():.2%} |")
        elif "attention_mask" in inputs:
            mask = inputs["attention_mask"]
            cosine = (pooled(exact, mask) * pooled(reference, mask)).sum(1)
            print(f"| {name} | {count} | cosine of mean-pooled embeddings, min (mean) "
                  f"| {cosine.min():.5f} ({cosine.mean():.5f}) | n/a | n/a |")
        else:
            unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
            cosine = (unit(exact.astype(np.float64)) * unit(reference.astype(np.float64))).sum(-1).reshape(-1)
            print(f"| {name} | {count} | cosine of output rows, min (mean) "
                  f"| {cosine.min():.5f} ({cosine.mean():.5f}) | n/a | n/a |")


if __name__ == "__main__":
    main()
