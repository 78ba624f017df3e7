#!/usr/bin/env python3
"""Measure onnxruntime on the models and inputs `vouch-bench engine` measured, check the exact
plans' top-1 agreement with onnxruntime fp32 on the held-out inputs, and print one Markdown
report with every engine's inferences per second as a ratio to onnxruntime's.

Used by scripts/bench-engine; arguments: RUST_RESULTS.jsonl VOUCH_BINARY CALIBRATION INPUT LABELS MODEL...
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


def main():
    results_path, vouch, calibration, test_input, labels_path, *models = sys.argv[1:]
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    x = np.load(test_input)["input"].astype(np.float32)
    labels = np.load(labels_path)
    cases = sorted({(r["model"], r["batch"], r["threads"]) for r in rows})
    seconds = 1.0
    for model in models:
        name = pathlib.Path(model).stem
        for (m, batch, threads) in cases:
            if m != name:
                continue
            s = session(model, threads)
            feed = {s.get_inputs()[0].name: x[:batch]}
            r = rate(seconds, lambda: s.run(None, feed))
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
            cells.append(f"{value:,.0f} ({value / base:.2f}x)")
        print(f"| {model} | {batch} | {threads} | {base:,.0f} | " + " | ".join(cells) + " |")
    print("\nTop-1 agreement of the exact plan with onnxruntime fp32 on the held-out digits:\n")
    print("| model | held-out inputs | agreement | exact accuracy | onnxruntime accuracy |")
    print("|---|---:|---:|---:|---:|")
    for model in models:
        name = pathlib.Path(model).stem
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "out.npy"
            subprocess.run([vouch, "run", model, "--input", test_input, "--exact", "--calibration",
                            calibration, "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
            exact = np.load(out)
        reference = session(model, 1).run(None, {"input": x})[0]
        agree = (exact.argmax(1) == reference.argmax(1)).mean()
        print(f"| {name} | {len(x)} | {agree:.2%} | {(exact.argmax(1) == labels).mean():.2%} "
              f"| {(reference.argmax(1) == labels).mean():.2%} |")


if __name__ == "__main__":
    main()
