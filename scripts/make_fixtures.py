#!/usr/bin/env python3
"""Train the small committed model fixtures and write them as ONNX.

Also writes the digits data the engine's tests use: `fixtures/data/digits_calibration.npz`
(256 training samples, the publisher's calibration set) and `fixtures/data/digits_test.npz`
(the 450 held-out samples) with `digits_test_labels.npy`.

Two multilayer perceptrons trained on scikit-learn's bundled 8x8 digits data set
(BSD-3), exported as plain ONNX graphs (MatMul/Add/Relu/Softmax, opset 13, a
dynamic batch dimension). They are real trained classifiers, small enough to
commit. Re-running this script with the pinned versions reproduces them.

    pip install numpy scikit-learn==1.9.1 onnx==1.22.0
    python3 scripts/make_fixtures.py
"""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "models"
DATA = ROOT / "data"


def export(clf: MLPClassifier, name: str) -> onnx.ModelProto:
    nodes, inits = [], []
    current = "input"
    layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        out = f"z{i}" if i + 1 < layers else "logits"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if i + 1 < layers:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    n_in, n_out = clf.coefs_[0].shape[0], clf.coefs_[-1].shape[1]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="vouch-fixtures")
    onnx.checker.check_model(model)
    return model


def digits_split():
    """scikit-learn's digits scaled to [0, 1], split 75/25 with seed 0: (x_train, x_test, y_train, y_test)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=0)


def main() -> None:
    x_train, x_test, y_train, y_test = digits_split()
    OUT.mkdir(parents=True, exist_ok=True)
    for file_name, hidden, seed in [("digits_mlp_v1.onnx", (32,), 0), ("digits_mlp_v2.onnx", (48,), 1)]:
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=400, random_state=seed)
        clf.fit(x_train, y_train)
        accuracy = clf.score(x_test, y_test)
        model = export(clf, file_name.removesuffix(".onnx"))
        onnx.save(model, OUT / file_name)
        print(f"{file_name}: hidden={hidden} seed={seed} held-out accuracy={accuracy:.4f}")
    DATA.mkdir(parents=True, exist_ok=True)
    np.savez(DATA / "digits_calibration.npz", input=x_train[:256])
    np.savez(DATA / "digits_test.npz", input=x_test)
    np.save(DATA / "digits_test_labels.npy", y_test.astype(np.int64))


if __name__ == "__main__":
    main()
