#!/usr/bin/env python3
"""Train a small convolutional digit classifier in numpy and write it as ONNX.

Writes `fixtures/models/digits_cnn.onnx`: a real trained CNN on scikit-learn's bundled 8x8
digits (BSD-3), on the same train/test split as `make_fixtures.py`, so the committed
`digits_calibration.npz` and `digits_test.npz` serve it too (its input is the flat 64 pixels,
reshaped inside the graph). It covers the layers the exact engine lowers for CNNs:

    Reshape -> Conv 3x3 (1->8) -> BatchNormalization -> Relu -> MaxPool 2x2
            -> depthwise Conv 3x3 (group 8) -> Relu -> grouped Conv 1x1 (8->16, group 2) -> Clip(0, 6)
            -> AveragePool 2x2 -> Flatten -> Gemm (64->10) -> Softmax

Training: plain numpy forward and backward passes, Adam, batch statistics in BatchNormalization
(exported with the running averages), seed 0. Re-running with the pinned versions reproduces it.

    pip install numpy scikit-learn==1.9.1 onnx==1.22.0
    python3 scripts/make_cnn_fixture.py
"""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from make_fixtures import digits_split

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "models"
EPS = 1e-5


def im2col(x, k, pad):
    """x [n,c,h,w] -> columns [n, c*k*k, h*w] for a stride-1 'same' convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((n, c, k, k, h, w), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + h, j:j + w]
    return cols.reshape(n, c * k * k, h * w)


def col2im(cols, shape, k, pad):
    n, c, h, w = shape
    cols = cols.reshape(n, c, k, k, h, w)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            xp[:, :, i:i + h, j:j + w] += cols[:, :, i, j]
    return xp[:, :, pad:pad + h, pad:pad + w]


class Conv:
    """Stride-1 'same' convolution with groups."""

    def __init__(self, rng, c_in, c_out, k, groups):
        self.k, self.pad, self.groups = k, k // 2, groups
        fan_in = (c_in // groups) * k * k
        self.w = rng.normal(0, np.sqrt(2 / fan_in), (c_out, c_in // groups, k, k))
        self.b = np.zeros(c_out)

    def params(self):
        return [self.w, self.b]

    def forward(self, x):
        self.x_shape = x.shape
        n, c, h, w = x.shape
        g, cig, cog = self.groups, c // self.groups, self.w.shape[0] // self.groups
        self.cols = [im2col(x[:, gi * cig:(gi + 1) * cig], self.k, self.pad) for gi in range(g)]
        outs = []
        for gi in range(g):
            wg = self.w[gi * cog:(gi + 1) * cog].reshape(cog, -1)
            outs.append(np.einsum("ok,nkp->nop", wg, self.cols[gi]))
        y = np.concatenate(outs, axis=1) + self.b[None, :, None]
        return y.reshape(n, -1, h, w)

    def backward(self, dy):
        n, c, h, w = self.x_shape
        g, cig, cog = self.groups, c // self.groups, self.w.shape[0] // self.groups
        dy = dy.reshape(n, -1, h * w)
        self.db = dy.sum(axis=(0, 2))
        dw, dx = np.zeros_like(self.w), np.zeros(self.x_shape)
        for gi in range(g):
            dyg = dy[:, gi * cog:(gi + 1) * cog]
            wg = self.w[gi * cog:(gi + 1) * cog].reshape(cog, -1)
            dw[gi * cog:(gi + 1) * cog] = np.einsum("nop,nkp->ok", dyg, self.cols[gi]).reshape(dw[gi * cog:(gi + 1) * cog].shape)
            dcols = np.einsum("ok,nop->nkp", wg, dyg)
            dx[:, gi * cig:(gi + 1) * cig] = col2im(dcols, (n, cig, h, w), self.k, self.pad)
        self.dw = dw
        return dx

    def grads(self):
        return [self.dw, self.db]


class BatchNorm:
    def __init__(self, c):
        self.gamma, self.beta = np.ones(c), np.zeros(c)
        self.mean, self.var = np.zeros(c), np.ones(c)

    def params(self):
        return [self.gamma, self.beta]

    def forward(self, x, train):
        if train:
            mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            self.mean = 0.9 * self.mean + 0.1 * mu
            self.var = 0.9 * self.var + 0.1 * var
        else:
            mu, var = self.mean, self.var
        self.inv = 1 / np.sqrt(var + EPS)
        self.xhat = (x - mu[None, :, None, None]) * self.inv[None, :, None, None]
        return self.gamma[None, :, None, None] * self.xhat + self.beta[None, :, None, None]

    def backward(self, dy):
        m = dy.shape[0] * dy.shape[2] * dy.shape[3]
        self.dgamma = (dy * self.xhat).sum(axis=(0, 2, 3))
        self.dbeta = dy.sum(axis=(0, 2, 3))
        dxhat = dy * self.gamma[None, :, None, None]
        return (self.inv[None, :, None, None] / m) * (
            m * dxhat - dxhat.sum(axis=(0, 2, 3), keepdims=True)
            - self.xhat * (dxhat * self.xhat).sum(axis=(0, 2, 3), keepdims=True))

    def grads(self):
        return [self.dgamma, self.dbeta]


def maxpool_forward(x):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    y = r.max(axis=(3, 5))
    mask = r == y[:, :, :, None, :, None]
    # Route each gradient to one maximum only.
    first = np.cumsum(np.cumsum(mask, axis=3), axis=5) == 1
    return y, mask & first


def maxpool_backward(dy, mask):
    n, c, h2, _, w2, _ = mask.shape
    return (mask * dy[:, :, :, None, :, None]).reshape(n, c, h2 * 2, w2 * 2)


def avgpool_forward(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def avgpool_backward(dy):
    return np.repeat(np.repeat(dy, 2, axis=2), 2, axis=3) / 4


class Net:
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.conv1 = Conv(rng, 1, 8, 3, 1)
        self.bn1 = BatchNorm(8)
        self.dw = Conv(rng, 8, 8, 3, 8)
        self.pw = Conv(rng, 8, 16, 1, 2)
        self.fc_w = rng.normal(0, np.sqrt(2 / 64), (64, 10))
        self.fc_b = np.zeros(10)

    def layers(self):
        return [self.conv1, self.bn1, self.dw, self.pw]

    def params(self):
        return [p for layer in self.layers() for p in layer.params()] + [self.fc_w, self.fc_b]

    def forward(self, x, train):
        x = x.reshape(-1, 1, 8, 8)
        a1 = self.bn1.forward(self.conv1.forward(x), train)
        self.r1 = a1 > 0
        p1, self.mask1 = maxpool_forward(a1 * self.r1)
        a2 = self.dw.forward(p1)
        self.r2 = a2 > 0
        a3 = self.pw.forward(a2 * self.r2)
        self.r3 = (a3 > 0) & (a3 < 6)
        p2 = avgpool_forward(np.clip(a3, 0, 6))
        self.flat = p2.reshape(p2.shape[0], -1)
        return self.flat @ self.fc_w + self.fc_b

    def backward(self, dlogits):
        self.dfc_w = self.flat.T @ dlogits
        self.dfc_b = dlogits.sum(axis=0)
        d = (dlogits @ self.fc_w.T).reshape(-1, 16, 2, 2)
        d = avgpool_backward(d) * self.r3
        d = self.pw.backward(d) * self.r2
        d = self.dw.backward(d)
        d = maxpool_backward(d, self.mask1) * self.r1
        self.conv1.backward(self.bn1.backward(d))

    def grads(self):
        return [g for layer in self.layers() for g in layer.grads()] + [self.dfc_w, self.dfc_b]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def train(x, y, seed=0, epochs=40, batch=32, lr=3e-3):
    net = Net(seed)
    rng = np.random.default_rng(seed)
    params = net.params()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            logits = net.forward(x[idx], train=True)
            dlogits = softmax(logits)
            dlogits[np.arange(len(idx)), y[idx]] -= 1
            net.backward(dlogits / len(idx))
            t += 1
            for p, g, mi, vi in zip(params, net.grads(), m, v):
                mi[...] = 0.9 * mi + 0.1 * g
                vi[...] = 0.999 * vi + 0.001 * g * g
                p -= lr * (mi / (1 - 0.9 ** t)) / (np.sqrt(vi / (1 - 0.999 ** t)) + 1e-8)
    return net


def export(net):
    f32 = lambda a: numpy_helper.from_array(np.asarray(a, dtype=np.float32))
    inits = []

    def init(name, array):
        tensor = f32(array)
        tensor.name = name
        inits.append(tensor)
        return name

    shape = numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "image_shape")
    inits.append(shape)
    nodes = [
        helper.make_node("Reshape", ["input", "image_shape"], ["image"]),
        helper.make_node("Conv", ["image", init("conv1_w", net.conv1.w), init("conv1_b", net.conv1.b)], ["c1"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization",
                         ["c1", init("bn1_scale", net.bn1.gamma), init("bn1_bias", net.bn1.beta),
                          init("bn1_mean", net.bn1.mean), init("bn1_var", net.bn1.var)], ["b1"], epsilon=EPS),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", init("dw_w", net.dw.w), init("dw_b", net.dw.b)], ["c2"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", init("pw_w", net.pw.w), init("pw_b", net.pw.b)], ["c3"],
                         kernel_shape=[1, 1], group=2),
        helper.make_node("Clip", ["c3", init("clip_min", np.float32(0)), init("clip_max", np.float32(6))], ["r3"]),
        helper.make_node("AveragePool", ["r3"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", init("fc_w", net.fc_w), init("fc_b", net.fc_b)], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="vouch-fixtures")
    onnx.checker.check_model(model)
    return model


def main() -> None:
    x_train, x_test, y_train, y_test = digits_split()
    net = train(x_train.astype(np.float64), y_train)
    accuracy = (net.forward(x_test.astype(np.float64), train=False).argmax(axis=1) == y_test).mean()
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(export(net), OUT / "digits_cnn.onnx")
    print(f"digits_cnn.onnx: held-out accuracy={accuracy:.4f}")


if __name__ == "__main__":
    main()
