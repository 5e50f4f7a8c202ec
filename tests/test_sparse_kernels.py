"""The sparse kernels (targets/cpu/kernels/sparse.py) and their rewrite: compiled models with
mostly-zero weights against onnxruntime on the same (masked) model, on each ISA by -mcpu."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from onnx import helper

from conftest import compile_to, make_model
from edgec.runtime import OrtSession, Session
from edgec.targets.cpu.kernels import sparse as K

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _mask(rng, shape, density, block):
    """Zeros at 1 - density (at least one: a weight with none is no sparse weight, and a
    1x1x1x1 kernel at density 0.6 drew none), blocks of ``block`` output channels sharing the
    pattern."""
    o = shape[0]
    keep = rng.random((-(-o // block), *shape[1:])) < density
    keep.flat[0] = False
    return np.repeat(keep, block, axis=0)[:o]


def onnx_numpy(model, name):
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _compare(model, out, feeds, **kw):
    report = compile_to(model, out, **kw)
    ref = OrtSession(model).run(None, feeds)
    got = Session(out).run(None, feeds)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(r).max()))
    return report


def _conv_model(rng, c, k, ksz, stride, dil, pads, h, w, batch, density, block, epi):
    wt = rng.standard_normal((k, c, ksz, ksz)).astype(np.float32) * 0.3
    wt *= _mask(rng, wt.shape, density, block)
    inits = {"W": wt, "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], strides=[stride] * 2,
                              dilations=[dil] * 2, pads=list(pads))]
    oh = (h + pads[0] + pads[2] - (ksz - 1) * dil - 1) // stride + 1
    ow = (w + pads[1] + pads[3] - (ksz - 1) * dil - 1) // stride + 1
    last = "y"
    if epi == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["e"]))
        last = "e"
    elif epi == "relu6":
        inits.update({"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
        nodes.append(helper.make_node("Clip", ["y", "lo", "hi"], ["e"]))
        last = "e"
    elif epi == "add":  # a second reader: the epilogue chain stops at the conv
        nodes += [helper.make_node("Relu", ["y"], ["r"]),
                  helper.make_node("Add", ["y", "r"], ["e"])]
        last = "e"
    return make_model(nodes, [("x", [batch, c, h, w])], [(last, [batch, k, oh, ow])], inits,
                      opset=14)


@SETTINGS
@example(c=1, k=1, ksz=1, stride=1, dil=1, pads=(0, 0, 0, 0), h=3, w=3, batch=1, density=0.6,
         block=1, epi="none", mcpu=None)  # one weight: it drew no zero
@given(c=st.integers(1, 40), k=st.integers(1, 40), ksz=st.sampled_from([1, 1, 3, 5]),
       stride=st.integers(1, 2), dil=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 2)] * 4),
       h=st.integers(3, 17), w=st.integers(3, 19), batch=st.sampled_from([1, 2]),
       density=st.sampled_from([0.0, 0.05, 0.2, 0.6]), block=st.sampled_from([1, 4, 8]),
       epi=st.sampled_from(["none", "relu", "relu6", "add"]),
       mcpu=st.sampled_from([None, "haswell"]))
def test_sparse_conv_matches_onnxruntime(tmp_path_factory, monkeypatch, c, k, ksz, stride, dil,
                                         pads, h, w, batch, density, block, epi, mcpu):
    ext = (ksz - 1) * dil + 1
    if h + pads[0] + pads[2] < ext or w + pads[1] + pads[3] < ext:
        return
    if ksz == 1:
        dil = 1
    monkeypatch.setenv("EDGEC_SPARSE", "sparse")
    rng = np.random.default_rng(c * 31 + k)
    m = _conv_model(rng, c, k, ksz, stride, dil, pads, h, w, batch, density, block, epi)
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    report = _compare(m, tmp_path_factory.mktemp("sc") / "art", {"x": x},
                      target_options={"mcpu": mcpu} if mcpu else {})
    (layer,) = report["kernels"]["structured"]
    takes = (ksz == 1 and not any(pads)) or stride == 1
    assert layer["kernel"] == ("sparse" if takes else "dense"), layer
    if takes:
        assert any(v.startswith("sparse-px") for v in report["kernels"]["functions"].values())


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
@pytest.mark.parametrize("rows,kdim,n,density,block,trans_b,relu", [
    (1, 784, 500, 0.04, 1, 1, False), (1, 784, 500, 0.04, 4, 1, True),
    (3, 33, 10, 0.3, 1, 0, False), (2, 9, 13, 0.5, 4, 1, True), (5, 64, 17, 0.0, 1, 1, False),
    (1, 100, 30, 0.1, 16, 0, False)])
def test_sparse_gemm_matches_onnxruntime(tmp_path, monkeypatch, mcpu, rows, kdim, n, density,
                                         block, trans_b, relu):
    monkeypatch.setenv("EDGEC_SPARSE", "sparse")
    rng = np.random.default_rng(kdim + n)
    w = rng.standard_normal((n, kdim)).astype(np.float32) * _mask(rng, (n, kdim), density, block)
    inits = {"G": w if trans_b else np.ascontiguousarray(w.T),
             "C": rng.standard_normal(n).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "G", "C"], ["y"], transB=trans_b)]
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    m = make_model(nodes, [("x", [rows, kdim])], [("z" if relu else "y", [rows, n])], inits)
    x = rng.standard_normal((rows, kdim)).astype(np.float32)
    report = _compare(m, tmp_path / "art", {"x": x},
                      target_options={"mcpu": mcpu} if mcpu else {})
    (layer,) = report["kernels"]["structured"]
    assert layer["kernel"] == "sparse" and layer["shape_class"] == "gemm"
    assert layer["block"] == (block if density > 0 and block <= n else layer["block"])


def test_matmul_3d_input(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_SPARSE", "sparse")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 10)).astype(np.float32) * (rng.random((24, 10)) < 0.2)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", [2, 3, 24])],
                   [("y", [2, 3, 10])], {"W": w})
    _compare(m, tmp_path / "art", {"x": rng.standard_normal((2, 3, 24)).astype(np.float32)})


def test_nan_propagates_through_the_sparse_epilogue(tmp_path, monkeypatch):
    """NaN input reaches every output channel with a nonzero weight through the ReLU6
    epilogue (the clamp keeps NaN). A zero weight is skipped, not multiplied: a channel
    whose weights are all zero gives its bias where onnxruntime's 0 * NaN gives NaN."""
    monkeypatch.setenv("EDGEC_SPARSE", "sparse")
    rng = np.random.default_rng(1)
    m = _conv_model(rng, 8, 8, 1, 1, 1, (0, 0, 0, 0), 4, 4, 1, 0.3, 1, "relu6")
    compile_to(m, tmp_path / "art")
    x = np.full((1, 8, 4, 4), np.nan, np.float32)
    got = Session(tmp_path / "art").run(None, {"x": x})[0]
    live = (np.asarray(onnx_numpy(m, "W")).reshape(8, -1) != 0).any(axis=1)
    assert live.any() and not live.all()
    assert np.isnan(got[0, live]).all()
    assert np.isfinite(got[0, ~live]).all()


def test_breakeven_decides(tmp_path, monkeypatch):
    """Without a forced choice: a dense-enough weight keeps the dense kernel, a very sparse
    one takes the sparse kernel; the report says why."""
    monkeypatch.delenv("EDGEC_SPARSE", raising=False)
    rng = np.random.default_rng(2)
    for density, kernel in ((0.9, "dense"), (0.02, "sparse")):
        m = _conv_model(rng, 64, 64, 1, 1, 1, (0, 0, 0, 0), 14, 14, 1, density, 1, "relu")
        out = tmp_path / f"d{density}"
        report = _compare(m, out, {"x": rng.standard_normal((1, 64, 14, 14)).astype(np.float32)})
        (layer,) = report["kernels"]["structured"]
        assert layer["kernel"] == kernel, layer
        assert "break-even" in layer["reason"]


def test_library_shrinks_with_density(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEC_SPARSE", raising=False)
    rng = np.random.default_rng(3)
    sizes = {}
    for density in (1.0, 0.1):
        m = _conv_model(rng, 256, 256, 1, 1, 1, (0, 0, 0, 0), 14, 14, 1, density, 1, "relu")
        out = tmp_path / f"d{density}"
        compile_to(m, out)
        sizes[density] = (out / "model.so").stat().st_size
    assert sizes[0.1] < 0.45 * sizes[1.0], sizes


def test_compress_roundtrip():
    rng = np.random.default_rng(4)
    for block in (1, 2, 4, 8):
        w = rng.standard_normal((19, 23)).astype(np.float32) * _mask(rng, (19, 23), 0.3, block)
        assert K.block_size(w) >= block
        b = K.block_size(w)
        c = K.compress(w, b, np.arange(23) * 5)
        dense = np.zeros((len(c.ptr) - 1) * b * 23, np.float32).reshape(-1, 23)
        for blk in range(len(c.ptr) - 1):
            for q in range(c.ptr[blk], c.ptr[blk + 1]):
                dense[blk * b:(blk + 1) * b, c.offs[q] // 5] = c.vals[q * b:(q + 1) * b]
        np.testing.assert_array_equal(dense[:19], w)
    g = K.compress_gather(w)
    assert len(g.vals) % K.GATHER == 0 and g.ptr[-1] * K.GATHER == len(g.vals)


def test_breakeven_table_is_measured_for_x86():
    table = json.loads(K.BREAKEVEN_FILE.read_text())
    for isa in ("avx512", "avx2"):
        for cls in ("conv1x1", "convkxk", "gemm"):
            for pat in ("unstructured", "block"):
                assert 0.0 < table["isa"][isa][cls][pat] <= 1.0
    assert "neon" not in table["isa"] or table["isa"]["neon"].get("host")


def _three_layers(rng):
    """A sparse 1x1 conv (ReLU6), a sparse 3x3 conv and a sparse Gemm in one model."""
    w1 = rng.standard_normal((24, 16, 1, 1)).astype(np.float32) * _mask(rng, (24, 16, 1, 1),
                                                                         0.2, 1)
    w3 = rng.standard_normal((20, 24, 3, 3)).astype(np.float32) * _mask(rng, (20, 24, 3, 3),
                                                                         0.1, 4)
    g = rng.standard_normal((10, 20 * 6 * 10)).astype(np.float32) * _mask(rng, (10, 1200),
                                                                            0.05, 1)
    inits = {"A": w1, "B": w3, "G": g, "lo": np.array(0, np.float32),
             "hi": np.array(6, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "A"], ["a"]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["b"]),
             helper.make_node("Conv", ["b", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["y"], transB=1)]
    return make_model(nodes, [("x", [1, 16, 6, 10])], [("y", [1, 10])], inits, opset=14)


# rpi4 in the default run; the other two CPUs with the slow tests
@pytest.mark.parametrize("target", ["rpi4", pytest.param("rpi5", marks=pytest.mark.slow),
                                    pytest.param("arm64", marks=pytest.mark.slow)])
def test_sparse_kernels_build_for_aarch64(tmp_path, monkeypatch, target):
    monkeypatch.setenv("EDGEC_SPARSE", "sparse")
    report = compile_to(_three_layers(np.random.default_rng(6)), tmp_path / "a",
                        target=target)
    kinds = report["kernels"]["counts"]
    assert kinds.get("sparse-px(B=1)") == 1 and kinds.get("sparse-px(B=4)") == 1, kinds
    assert kinds.get("sparse-gather(B=1)") == 1, kinds
    assert all(layer["kernel"] == "sparse" for layer in report["kernels"]["structured"])


def test_sparse_kernels_on_the_board(rpc_board, tmp_path, monkeypatch):
    """The aarch64 (NEON) sparse kernels run on the emulated board and match onnxruntime."""
    from edgec.runtime.remote import RemoteSession

    monkeypatch.setenv("EDGEC_SPARSE", "sparse")
    rng = np.random.default_rng(8)
    m = _three_layers(rng)
    compile_to(m, tmp_path / "art", target="rpi4")
    x = rng.standard_normal((1, 16, 6, 10)).astype(np.float32)
    got = RemoteSession(tmp_path / "art", rpc_board.address, "rpi4").run(None, {"x": x})[0]
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("passes", [["prune", "lowrank", "sparse"],
                                    ["prune", "lowrank", "sparse", "quantize"]])
def test_composes_with_prune_lowrank_quantize_and_builds(tmp_path, passes):
    """All four passes in one compile, built and run: float layers the break-even picks take
    the sparse kernels; after quantize (int8 kernels, which are dense) the artifact still
    matches onnxruntime's exact run of its own model.onnx."""
    import onnxruntime as ort

    from test_sparse_pass import _calib, layered

    rng = np.random.default_rng(11)
    m = layered(rng, k=3, batch=1)
    sets = ["prune.ratio=0.25", "lowrank.rank_ratio=0.5", "sparse.density=0.1",
            "sparse.min_weights=0"]
    out = tmp_path / "art"
    rep = compile_to(m, out, passes=passes, sets=sets, calib=_calib(rng, 32), progress=False)
    assert [p["name"] for p in rep["passes"]][-len(passes):] == passes
    x = rng.standard_normal((1, 6, 10, 10)).astype(np.float32)
    got = Session(out).run(None, {"x": x})[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(out / "model.onnx"), so,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    scale = np.abs(ref).max()
    if "quantize" in passes:
        assert np.abs(got - ref).max() <= 0.05 * scale
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
        assert any(x["kernel"] == "sparse" for x in rep["kernels"]["structured"]), \
            rep["kernels"]["structured"]
