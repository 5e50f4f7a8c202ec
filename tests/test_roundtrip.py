"""Compiled output (TVM, x86) against onnxruntime on generated graphs, batch 1 and > 1.

Tolerance: rtol 1e-4 / atol 1e-4 on float32 graphs whose outputs are O(1-10) -- both
runtimes accumulate in float32 in different orders.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper

from conftest import compile_to, conv_bn_model, make_model
from edgec.runtime import OrtSession, Session, run_batched

RTOL = ATOL = 1e-4


def _roundtrip(model, tmp, shapes=None, batch_data=None, **kw):
    out = tmp / "art"
    compile_to(model, out, **kw)
    sess = Session(out)
    rng = np.random.default_rng(7)
    feeds = {i["name"]: rng.standard_normal(batch_data or i["shape"]).astype(np.float32)
             if batch_data is None else
             rng.standard_normal([batch_data] + i["shape"][1:]).astype(np.float32)
             for i in sess.input_specs}
    ref = run_batched(OrtSession(model), feeds, sess.batch if batch_data else None)
    got = run_batched(sess, feeds, sess.batch)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL)
    return sess


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_bn_model(tmp_path, batch):
    _roundtrip(conv_bn_model(batch=batch), tmp_path)


def test_batch_split_over_compiled_batch(tmp_path):
    # compiled for batch 2, fed 5 rows: chunks of 2, the last padded
    sess = _roundtrip(conv_bn_model(batch=2), tmp_path, batch_data=5)
    assert sess.batch == 2


conv_cases = st.fixed_dictionaries({
    "c": st.integers(1, 8), "k": st.integers(1, 8), "kh": st.sampled_from([1, 3, 5]),
    "kw": st.sampled_from([1, 3]), "stride": st.integers(1, 2), "dil": st.integers(1, 2),
    "pads": st.tuples(*[st.integers(0, 2)] * 4), "hw": st.integers(7, 13),
    "groups": st.sampled_from([1, 2, "dw"]), "batch": st.sampled_from([1, 2]),
    "act": st.sampled_from(["Relu", "Sigmoid", None]),
})


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=conv_cases)
def test_generated_convs(tmp_path_factory, p):
    tmp = tmp_path_factory.mktemp("conv")
    rng = np.random.default_rng(0)
    g = p["c"] if p["groups"] == "dw" else p["groups"]
    c = p["c"] * (2 if p["groups"] == 2 else 1)
    k = c if p["groups"] == "dw" else p["k"] * g
    kh, kw = p["kh"], p["kw"]
    inits = {"W": rng.standard_normal((k, c // g, kh, kw)).astype(np.float32) * 0.3,
             "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], group=g,
                              strides=[p["stride"]] * 2, dilations=[p["dil"]] * 2,
                              pads=list(p["pads"]), name="conv")]
    last = "y"
    if p["act"]:
        nodes.append(helper.make_node(p["act"], ["y"], ["z"], name="act"))
        last = "z"
    ext_h = (kh - 1) * p["dil"] + 1
    if p["hw"] + p["pads"][0] + p["pads"][2] < ext_h:
        return
    m = make_model(nodes, [("x", [p["batch"], c, p["hw"], p["hw"] + 1])], [(last, None)], inits)
    m = onnx.shape_inference.infer_shapes(m)
    _roundtrip(m, tmp)


def test_pool_concat_add_resize_graph(tmp_path):
    rng = np.random.default_rng(2)
    inits = {"W": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2,
             "scales": np.array([1, 1, 2, 2], np.float32), "roi": np.array([], np.float32)}
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "p"], ["a"]),
        helper.make_node("Resize", ["a", "roi", "scales"], ["u"], mode="nearest"),
        helper.make_node("Concat", ["u", "x"], ["cat"], axis=1),
        helper.make_node("AveragePool", ["cat"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Softmax", ["ap"], ["y"], axis=1),
    ]
    m = make_model(nodes, [("x", [2, 4, 8, 8])], [("y", [2, 8, 8, 8])], inits)
    _roundtrip(m, tmp_path)


def test_multiple_inputs_and_outputs(tmp_path):
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["a", "b"], ["p"]),
             helper.make_node("MatMul", ["s", "p"], ["mm"])]
    m = make_model(nodes, [("a", [1, 4, 4]), ("b", [1, 4, 4])],
                   [("mm", [1, 4, 4]), ("s", [1, 4, 4])])
    sess = _roundtrip(m, tmp_path)
    assert sess.output_names == ["mm", "s"]
