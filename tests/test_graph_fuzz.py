"""Random graphs against onnxruntime (issue 21): hypothesis draws small DAGs from a menu of
CNN ops -- convolutions of every form, pools, element-wise ops with and without broadcast,
BatchNormalization, Concat, Resize, several outputs -- compiles each for x86 and compares with
onnxruntime (rtol/atol 1e-4). A few dozen graphs in the default suite, more with ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import compile_to
from edgec.runtime import OrtSession, Session

UNARY = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid", "Abs", "Neg", "Elu"]
BINARY = ["Add", "Mul", "Sub", "Max", "Min"]


class _Graph:
    """A DAG under construction: NCHW tensors and their shapes."""

    def __init__(self, draw, shape):
        self.draw, self.nodes, self.inits = draw, [], []
        self.shapes = {"x": list(shape)}
        self.rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))

    def new(self, shape) -> str:
        name = f"t{len(self.shapes)}"
        self.shapes[name] = list(shape)
        return name

    def const(self, arr) -> str:
        name = f"w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def pick(self) -> str:
        names = list(self.shapes)
        # favour recent tensors: deep chains as well as branches
        return names[-1 - self.draw(st.integers(0, min(3, len(names) - 1)))]

    def add(self, op, inputs, shape, **attrs) -> str:
        out = self.new(shape)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def _conv(g: _Graph, x: str) -> None:
    n, c, h, w = g.shapes[x]
    k = g.draw(st.sampled_from([1, 3, 5]))
    s = g.draw(st.integers(1, 2))
    p = [g.draw(st.integers(0, k // 2)) for _ in range(4)]
    oh, ow = (h + p[0] + p[2] - k) // s + 1, (w + p[1] + p[3] - k) // s + 1
    if oh < 1 or ow < 1:
        return
    groups = c if c > 1 and g.draw(st.booleans()) else 1
    oc = c if groups > 1 else g.draw(st.integers(1, 12))
    wt = g.rng.standard_normal((oc, c // groups, k, k)) * np.sqrt(2.0 / (c // groups * k * k))
    ins = [x, g.const(wt)] + ([g.const(g.rng.standard_normal(oc) * 0.1)]
                              if g.draw(st.booleans()) else [])
    g.add("Conv", ins, [n, oc, oh, ow], kernel_shape=[k, k], strides=[s, s], pads=p,
          group=groups)


def _unary(g: _Graph, x: str) -> None:
    op = g.draw(st.sampled_from(UNARY))
    if op == "Clip":
        lo = g.const(np.float32(-0.5))
        hi = g.const(np.float32(g.draw(st.sampled_from([0.5, 6.0]))))
        g.add("Clip", [x, lo, hi], g.shapes[x])
    elif op == "LeakyRelu":
        g.add(op, [x], g.shapes[x], alpha=0.1)
    else:
        g.add(op, [x], g.shapes[x])


def _binary(g: _Graph, x: str) -> None:
    op = g.draw(st.sampled_from(BINARY))
    same = [t for t, s in g.shapes.items() if s == g.shapes[x] and t != x]
    if same and g.draw(st.booleans()):
        y = g.draw(st.sampled_from(same))
    else:  # a per-channel constant, broadcast over the map
        y = g.const(g.rng.standard_normal((1, g.shapes[x][1], 1, 1)))
    g.add(op, [x, y], g.shapes[x])


def _pool(g: _Graph, x: str) -> None:
    n, c, h, w = g.shapes[x]
    kind = g.draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool"]))
    if kind == "GlobalAveragePool":
        g.add(kind, [x], [n, c, 1, 1])
        return
    k = g.draw(st.integers(2, 3))
    s = g.draw(st.integers(1, 2))
    p = [g.draw(st.integers(0, k - 1)) for _ in range(4)]
    oh, ow = (h + p[0] + p[2] - k) // s + 1, (w + p[1] + p[3] - k) // s + 1
    if oh < 1 or ow < 1 or min(h, w) < k:
        return
    extra = {"count_include_pad": g.draw(st.integers(0, 1))} if kind == "AveragePool" else {}
    g.add(kind, [x], [n, c, oh, ow], kernel_shape=[k, k], strides=[s, s], pads=p, **extra)


def _bn(g: _Graph, x: str) -> None:
    c = g.shapes[x][1]
    ins = [x, g.const(g.rng.random(c) + 0.5), g.const(g.rng.standard_normal(c) * 0.1),
           g.const(g.rng.standard_normal(c) * 0.1), g.const(g.rng.random(c) + 0.5)]
    g.add("BatchNormalization", ins, g.shapes[x])


def _concat(g: _Graph, x: str) -> None:
    n, c, h, w = g.shapes[x]
    others = [t for t, s in g.shapes.items() if s[0] == n and s[2:] == [h, w]]
    y = g.draw(st.sampled_from(others))
    g.add("Concat", [x, y], [n, c + g.shapes[y][1], h, w], axis=1)


def _resize(g: _Graph, x: str) -> None:
    n, c, h, w = g.shapes[x]
    if h * w > 256:
        return
    mode = g.draw(st.sampled_from(["nearest", "linear"]))
    scales = g.const(np.array([1, 1, 2, 2], np.float32))
    g.add("Resize", [x, "", scales], [n, c, 2 * h, 2 * w], mode=mode)


OPS = [_conv, _conv, _unary, _binary, _pool, _bn, _concat, _resize]


@st.composite
def graphs(draw):
    shape = [draw(st.sampled_from([1, 2])), draw(st.integers(1, 8)), draw(st.integers(5, 14)),
             draw(st.integers(5, 14))]
    g = _Graph(draw, shape)
    for _ in range(draw(st.integers(2, 7))):
        draw(st.sampled_from(OPS))(g, g.pick())
    produced = [t for t in g.shapes if t != "x"]
    if not produced:
        _unary(g, "x")
        produced = [t for t in g.shapes if t != "x"]
    outs = [produced[-1]] + ([produced[0]] if len(produced) > 2 and draw(st.booleans()) else [])
    graph = helper.make_graph(
        g.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, g.shapes[o]) for o in outs],
        g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _check(model, tmp) -> None:
    out = tmp / "art"
    compile_to(model, out)
    x = np.random.default_rng(3).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    ref = OrtSession(model).run(None, {"x": x})
    got = Session(out).run(None, {"x": x})
    for r, o in zip(ref, got):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                       HealthCheck.too_slow])


@settings(max_examples=24, **_SETTINGS)
@given(model=graphs())
def test_random_graphs(tmp_path_factory, model):
    _check(model, tmp_path_factory.mktemp("fuzz"))


@pytest.mark.slow
@settings(max_examples=200, **_SETTINGS)
@given(model=graphs())
def test_random_graphs_many(tmp_path_factory, model):
    _check(model, tmp_path_factory.mktemp("fuzz"))
