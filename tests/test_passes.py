"""The pass framework and the built-in normalization passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper

from conftest import conv_bn_model, make_model, ort_run
from edgec.core.errors import EdgecError, PassDriftError, PassError
from edgec.core.graph import provenance
from edgec.core.importer import normalize
from edgec.passes import (PassReport, Tolerance, copy_model, make_config, register_pass,
                          run_pass)
from edgec.driver.pipeline import Pipeline, parse_sets, resolve_passes


def _bn_inits(rng, k, prefix=""):
    return {f"{prefix}g": (rng.random(k) + 0.5).astype(np.float32),
            f"{prefix}b": rng.standard_normal(k).astype(np.float32),
            f"{prefix}m": (rng.standard_normal(k) * 0.3).astype(np.float32),
            f"{prefix}v": (rng.random(k) + 0.2).astype(np.float32)}


@settings(max_examples=15, deadline=None)
@given(c=st.integers(1, 6), kmul=st.integers(1, 3), groups=st.sampled_from([1, 2, "dw"]),
       bias=st.booleans(), k=st.sampled_from([1, 3]), stride=st.integers(1, 2))
def test_fold_bn_conv_exact(c, kmul, groups, bias, k, stride):
    rng = np.random.default_rng(c * 100 + kmul)
    g = c if groups == "dw" else groups
    c = c * g if groups == 2 else c
    K = c * kmul if groups == "dw" else 4 * kmul
    K = K - K % g
    inits = {"W": rng.standard_normal((K, c // g, k, k)).astype(np.float32)}
    ins = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(K).astype(np.float32)
        ins.append("B")
    inits.update(_bn_inits(rng, K))
    nodes = [helper.make_node("Conv", ins, ["y"], group=g, strides=[stride, stride],
                              name="conv"),
             helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"],
                              epsilon=1e-3, name="bn")]
    m, _ = normalize(make_model(nodes, [("x", [2, c, 9, 9])], [("z", None)], inits))
    out, rep = run_pass("fold-bn", m)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert provenance(out.graph.node[0])["edgec.pass"] == "fold-bn"
    x = rng.standard_normal((2, c, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_fold_bn_gemm_exact(trans_b, alpha, beta):
    rng = np.random.default_rng(3)
    B = rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = {"B": B, "C": rng.standard_normal(6).astype(np.float32), **_bn_inits(rng, 6)}
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=trans_b, alpha=alpha,
                              beta=beta, name="fc"),
             helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"],
                              name="bn")]
    m, _ = normalize(make_model(nodes, [("x", [3, 5])], [("z", None)], inits))
    out, rep = run_pass("fold-bn", m)
    assert len(rep.rewritten) == 1 and [n.op_type for n in out.graph.node] == ["Gemm"]
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [1, 2])
def test_fold_bn_conv_transpose_exact(group):
    rng = np.random.default_rng(4)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             **_bn_inits(rng, 3 * group)}
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=group, strides=[2, 2],
                              name="deconv"),
             helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"],
                              name="bn")]
    m, _ = normalize(make_model(nodes, [("x", [1, 4, 5, 5])], [("z", None)], inits))
    out, rep = run_pass("fold-bn", m)
    assert len(rep.rewritten) == 1
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_fold_bn_skips_with_reasons():
    rng = np.random.default_rng(5)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **_bn_inits(rng, 4),
             **_bn_inits(rng, 3, "i")}
    nodes = [helper.make_node("BatchNormalization", ["x", "ig", "ib", "im", "iv"], ["x1"],
                              name="bn_on_input"),
             helper.make_node("Conv", ["x1", "W"], ["y"], name="conv"),
             helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"],
                              name="bn_shared"),
             helper.make_node("Relu", ["y"], ["r"], name="other_reader")]
    m, _ = normalize(make_model(nodes, [("x", [1, 3, 6, 6])], [("z", None), ("r", None)],
                                inits))
    out, rep = run_pass("fold-bn", m)
    assert not rep.modified
    reasons = {s["node"]: s["reason"] for s in rep.skipped}
    assert "graph input" in reasons["bn_on_input"]
    assert "other readers" in reasons["bn_shared"]


def test_report_stats_and_purity():
    m, _ = normalize(conv_bn_model())
    before = m.SerializeToString()
    out, rep = run_pass("fold-bn", m)
    assert m.SerializeToString() == before
    assert rep.before["params"] > rep.after["params"]  # 4 BN vectors gone
    assert rep.before["macs"] == rep.after["macs"] == 8 * 27 * 144 + 80
    assert rep.after["bytes"] == 4 * rep.after["params"]


def test_eliminate_identity_keeps_graph_output_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="id1"),
             helper.make_node("Dropout", ["b"], ["c"], name="drop"),
             helper.make_node("Identity", ["c"], ["y"], name="id_out")]
    m, _ = normalize(make_model(nodes, [("x", [2, 3])], [("y", [2, 3])]))
    out, rep = run_pass("eliminate-identity", m)
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert out.graph.node[0].output[0] == "y"
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], np.maximum(x, 0))


@pytest.mark.parametrize("op,n", [("Sum", 3), ("Sum", 2), ("Max", 4), ("Min", 3),
                                  ("Mean", 3), ("Sum", 1)])
def test_split_variadic_is_exact(op, n):
    """Variadic ops with broadcasting become binary chains; onnxruntime gives the same bits
    (Mean: up to the division's rounding)."""
    shapes = [[2, 3, 4, 5], [1, 3, 1, 1], [2, 3, 4, 5], [5]][:n]
    names = [f"a{i}" for i in range(n)]
    nodes = [helper.make_node(op, names, ["y"], name="v")]
    m, _ = normalize(make_model(nodes, list(zip(names, shapes)), [("y", [2, 3, 4, 5])]))
    out, rep = run_pass("split-variadic", m)
    assert all(len(nd.input) <= 2 for nd in out.graph.node)
    assert op in ("Max", "Min") or op not in {nd.op_type for nd in out.graph.node}
    assert len(rep.rewritten) == 1 and rep.modified
    rng = np.random.default_rng(n)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in zip(names, shapes)}
    ref, got = ort_run(m, feeds)[0], ort_run(out, feeds)[0]
    if op == "Mean":
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, ref)


def test_fold_constants_folds_shape_subgraph():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="gather"),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="concat"),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    inits = {"i0": np.array(0, np.int64), "ax": np.array([0], np.int64),
             "minus1": np.array([-1], np.int64)}
    m, _ = normalize(make_model(nodes, [("x", [2, 3, 4])], [("y", None)], inits))
    out, rep = run_pass("fold-constants", m)
    assert [n.op_type for n in out.graph.node] == ["Reshape"]
    assert len(rep.rewritten) == 4


def test_cleanup_removes_dead_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="live"),
             helper.make_node("Sigmoid", ["x"], ["dead"], name="dead")]
    m, _ = normalize(make_model(nodes, [("x", [2])], [("y", [2])]))
    out, rep = run_pass("cleanup", m)
    assert [n.name for n in out.graph.node] == ["live"]
    assert rep.rewritten[0]["node"] == "dead"


def test_config_typing_from_dataclass():
    cfg = make_config("fold-constants", {"size_threshold": "1024", "fold_shapes": "false"})
    assert cfg.size_threshold == 1024 and cfg.fold_shapes is False
    with pytest.raises(EdgecError, match="unknown option"):
        make_config("fold-constants", {"nope": "1"})
    with pytest.raises(EdgecError, match="cannot read"):
        make_config("fold-constants", {"size_threshold": "big"})
    with pytest.raises(EdgecError):
        parse_sets(["fold-bn.conv=1"], ["cleanup"])  # pass not in the pipeline
    with pytest.raises(EdgecError):
        parse_sets(["noequals"], ["cleanup"])
    assert parse_sets(["fold-bn.conv=0"], ["fold-bn"]) == {"fold-bn": {"conv": "0"}}


def test_passes_list_resolution():
    assert resolve_passes(None, None)[:5] == ["fold-constants", "split-variadic",
                                              "eliminate-identity", "fold-bn", "cleanup"]
    assert resolve_passes("none", ["fold-bn"]) == ["fold-bn"]
    assert resolve_passes(None, ["cleanup"])[-1] == "cleanup"


# --- deliberately broken passes, to see the pipeline name them --------------------------
@dataclass(frozen=True)
class _ScaleConfig:
    factor: float = 1.5


@register_pass("test-scale-weights", _ScaleConfig, tolerance=Tolerance(1e-4, 1e-4, 0.99999))
def _scale(model, config, ctx):
    """test-scale-weights: multiplies every Conv weight (a wrong rewrite, for tests)."""
    from onnx import numpy_helper

    m = copy_model(model)
    rep = PassReport("test-scale-weights")
    for t in m.graph.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * config.factor, "W"))
            rep.rewrite("W", "scaled")
    return m, rep


@register_pass("test-mutating", _ScaleConfig)
def _mutating(model, config, ctx):
    model.graph.node[0].name = "changed"
    return model, PassReport("test-mutating")


@register_pass("test-raising", _ScaleConfig)
def _raising(model, config, ctx):
    raise ValueError("boom")


def test_verify_names_the_drifting_pass():
    m, _ = normalize(conv_bn_model())
    Pipeline(["fold-bn", "cleanup"], verify=True).run(m)  # exact passes pass
    with pytest.raises(PassDriftError, match="test-scale-weights"):
        Pipeline(["fold-constants", "test-scale-weights", "fold-bn"], verify=True).run(m)
    # factor 1 is exact: no drift
    Pipeline(["test-scale-weights"], {"test-scale-weights": {"factor": "1.0"}},
             verify=True).run(m)


def test_broken_passes_are_named():
    m, _ = normalize(conv_bn_model())
    with pytest.raises(PassError, match="test-mutating.*mutated"):
        run_pass("test-mutating", m)
    with pytest.raises(PassError, match="test-raising.*boom"):
        Pipeline(["cleanup", "test-raising"]).run(m)


def test_residual_sum_fuses_into_the_convolution(tmp_path):
    """An older exporter's residual ``Sum`` (TVM imports it as broadcast_to + stack + sum)
    ends up as the convolution kernel's fused epilogue, matching onnxruntime."""
    from conftest import compile_to
    from edgec.runtime import Session

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sum", ["c", "x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    m = make_model(nodes, [("x", [1, 16, 10, 10])], [("y", [1, 16, 10, 10])],
                   {"W": (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)})
    report = compile_to(m, tmp_path / "art")
    assert list(report["kernels"]["functions"]) == ["fused_conv2d_packed_add_relu"]
    x = rng.standard_normal((1, 16, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(Session(tmp_path / "art").run(None, {"x": x})[0],
                               ort_run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
