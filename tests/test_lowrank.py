"""The lowrank pass: exactness at full rank, both conv forms, Gemm/MatMul, rank criteria,
data-aware fitting, skips with reasons, idempotence, report and plots."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import compile_to, make_model, ort_run
from edgec.core.errors import EdgecError
from edgec.core.graph import provenance
from edgec.core.importer import infer_shapes
from edgec.passes import PassContext, make_config, run_pass


def lowrank(model, calib=None, **sets):
    cfg = make_config("lowrank", {k: str(v) for k, v in sets.items()})
    return run_pass("lowrank", model, cfg, PassContext(calib=calib))


def conv_model(rng, n=2, c=5, k=7, h=9, w=8, kh=3, kw=3, strides=(1, 1), dil=(1, 1),
               pads=(1, 1, 1, 1), bias=True, auto_pad=None, group=1):
    W = (rng.standard_normal((k, c // group, kh, kw)) / np.sqrt(c * kh * kw)).astype(np.float32)
    inits = {"W": W}
    ins = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(k).astype(np.float32)
        ins.append("B")
    attrs = dict(strides=list(strides), dilations=list(dil), group=group)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    node = helper.make_node("Conv", ins, ["y"], name="conv", **attrs)
    m = make_model([node], [("x", [n, c, h, w])], [("y", None)], inits)
    m.graph.output[0].type.tensor_type.ClearField("shape")
    return infer_shapes(m)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 2), sw=st.integers(1, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), pads=st.lists(st.integers(0, 2), min_size=4,
                                                                 max_size=4),
       h=st.integers(6, 11), w=st.integers(6, 11), form=st.sampled_from(["weight", "spatial"]),
       data=st.booleans(), seed=st.integers(0, 1000))
def test_full_rank_is_exact(kh, kw, sh, sw, dh, dw, pads, h, w, form, data, seed):
    assume(h + pads[0] + pads[2] >= dh * (kh - 1) + 1
           and w + pads[1] + pads[3] >= dw * (kw - 1) + 1)
    if form == "spatial" and (kh == 1 or kw == 1):
        form = "weight"
    rng = np.random.default_rng(seed)
    m = conv_model(rng, h=h, w=w, kh=kh, kw=kw, strides=(sh, sw), dil=(dh, dw), pads=pads)
    x = rng.standard_normal((2, 5, h, w)).astype(np.float32)
    calib = {"x": rng.standard_normal((40, 5, h, w)).astype(np.float32)} if data else None
    out, rep = lowrank(m, calib, rank_ratio=1.0, form=form, force=True)
    assert [r["form"] for r in rep.rewritten] == [form]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    ref, got = ort_run(m, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("form", ["weight", "spatial"])
def test_auto_pad_becomes_explicit(auto_pad, form):
    rng = np.random.default_rng(1)
    m = conv_model(rng, h=10, w=9, kh=4, kw=3, strides=(2, 2), auto_pad=auto_pad)
    x = rng.standard_normal((2, 5, 10, 9)).astype(np.float32)
    out, rep = lowrank(m, rank_ratio=1.0, form=form, force=True)
    assert rep.modified
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0], atol=1e-5)


def gemm_model(rng, trans_a, trans_b, alpha, beta, bias, m_=6, k=20, n=16):
    A_shape = [k, m_] if trans_a else [m_, k]
    B = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = {"B": B}
    ins = ["a", "B"]
    if bias:
        inits["C"] = rng.standard_normal(n).astype(np.float32)
        ins.append("C")
    node = helper.make_node("Gemm", ins, ["y"], name="gemm", transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    return infer_shapes(make_model([node], [("a", A_shape)], [("y", [m_, n])], inits)), A_shape


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_every_attribute_combination(trans_a, trans_b, alpha, beta, bias):
    rng = np.random.default_rng(trans_a * 8 + trans_b * 4 + bias)
    m, a_shape = gemm_model(rng, trans_a, trans_b, alpha, beta, bias)
    a = rng.standard_normal(a_shape).astype(np.float32)
    ref = ort_run(m, {"a": a})[0]
    out, rep = lowrank(m, rank_ratio=1.0, force=True)
    assert rep.modified and [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
    np.testing.assert_allclose(ort_run(out, {"a": a})[0], ref, atol=1e-4, rtol=1e-5)
    # a real truncation: error equals the SVD tail of alpha * op(B)
    out, rep = lowrank(m, rank_ratio=0.25)
    B = onnx.numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    s = np.linalg.svd(alpha * (B.T if trans_b else B), compute_uv=False)
    r = rep.details["layers"][0]["rank"]
    assert r == 4
    want = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))
    assert rep.details["layers"][0]["weight_error"] == pytest.approx(want, rel=1e-3)


def test_matmul_3d_input_and_data_aware_bias():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24, 12)).astype(np.float32)
    m = infer_shapes(make_model([helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")],
                                [("a", [2, 5, 24])], [("y", [2, 5, 12])], {"W": W}))
    a = rng.standard_normal((2, 5, 24)).astype(np.float32)
    out, rep = lowrank(m, rank_ratio=1.0, force=True)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    np.testing.assert_allclose(ort_run(out, {"a": a})[0], ort_run(m, {"a": a})[0], atol=1e-4)
    assert rep.details["layers"][0]["macs_before"] == 5 * 24 * 12
    # data with a mean offset: the refit adds a bias (MatMul + Add)
    calib = {"a": (rng.standard_normal((64, 5, 24)) + 3.0).astype(np.float32)}
    out, rep = lowrank(m, calib, rank_ratio=0.25)
    row = rep.details["layers"][0]
    assert row["output_error_refit"] < row["output_error"]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul", "Add"]


def test_grouped_and_depthwise_pass_through_with_reasons():
    rng = np.random.default_rng(4)
    dw = (rng.standard_normal((8, 1, 3, 3))).astype(np.float32)
    gw = (rng.standard_normal((8, 4, 3, 3))).astype(np.float32)
    w1d = rng.standard_normal((8, 8, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "DW"], ["a"], group=8, pads=[1] * 4, name="dw"),
             helper.make_node("Conv", ["a", "GW"], ["b"], group=2, pads=[1] * 4, name="grp"),
             helper.make_node("Conv", ["b", "WX"], ["c"], pads=[1] * 4, name="dyn")]
    m = infer_shapes(make_model(nodes, [("x", [1, 8, 6, 6]), ("WX", [8, 8, 3, 3])],
                                [("c", [1, 8, 6, 6])], {"DW": dw, "GW": gw}))
    out, rep = lowrank(m, rank_ratio=0.1)
    assert not rep.modified
    assert out.graph.node[0].op_type == "Conv" and len(out.graph.node) == 3
    reasons = {s["node"]: s["reason"] for s in rep.skipped}
    assert "group=8" in reasons["dw"] and "group=2" in reasons["grp"]
    assert "not a constant" in reasons["dyn"]
    m1 = infer_shapes(make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c1")],
                                 [("x", [1, 8, 10])], [("y", [1, 8, 8])], {"W": w1d}))
    _, rep = lowrank(m1, rank_ratio=0.1)
    assert "only 2-D" in rep.skipped[0]["reason"]


def test_only_rewritten_when_macs_and_params_drop():
    rng = np.random.default_rng(5)
    m = conv_model(rng, c=4, k=4, kh=1, kw=1, pads=(0, 0, 0, 0))  # 1x1, 4 -> 4: never pays
    out, rep = lowrank(m, rank_ratio=0.75)
    assert not rep.modified
    assert "would not reduce" in rep.skipped[0]["reason"]


def test_idempotent():
    rng = np.random.default_rng(6)
    m = conv_model(rng, c=16, k=32, h=12, w=12)
    once, rep1 = lowrank(m, rank_ratio=0.25)
    assert rep1.modified
    twice, rep2 = lowrank(once, rank_ratio=0.25)
    assert not rep2.modified
    assert all(s["reason"] == "already factorized by lowrank" for s in rep2.skipped)
    assert twice.graph == once.graph


def test_provenance_and_report_fields():
    rng = np.random.default_rng(7)
    m = conv_model(rng, c=16, k=32, h=12, w=12)
    calib = {"x": rng.standard_normal((32, 16, 12, 12)).astype(np.float32)}
    out, rep = lowrank(m, calib, energy=0.9)
    for n in out.graph.node:
        p = provenance(n)
        assert p["edgec.pass"] == "lowrank" and p["edgec.origin"] == "conv"
        assert p["edgec.form"] in ("weight", "spatial") and int(p["edgec.rank"]) >= 1
    row = rep.details["layers"][0]
    for key in ("form", "rank", "full_rank", "macs_before", "macs_after", "params_before",
                "params_after", "weight_error", "output_error", "output_error_refit"):
        assert key in row
    assert row["macs_after"] < row["macs_before"]
    assert rep.after["macs"] < rep.before["macs"]
    sp = rep.details["spectra"]["conv"]
    assert len(sp["weight"]) == 32 and len(sp["image"]) == 16 * 9
    assert json.dumps(rep.to_json())  # serializable


def test_rank_criteria():
    rng = np.random.default_rng(8)
    # a conv with a known decaying spectrum (weight form matrix 32 x 72)
    U, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    V, _ = np.linalg.qr(rng.standard_normal((72, 32)))
    s = 0.7 ** np.arange(32)
    W = ((U * s) @ V.T).reshape(32, 8, 3, 3).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4, name="conv")
    m = infer_shapes(make_model([node], [("x", [1, 8, 10, 10])], [("y", [1, 32, 10, 10])],
                                {"W": W}))
    _, rep = lowrank(m, sigma_threshold=0.1, form="weight")
    assert rep.details["layers"][0]["rank"] == int(np.sum(s >= 0.1))
    _, rep = lowrank(m, energy=0.99, form="weight")
    e = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert rep.details["layers"][0]["rank"] == int(np.argmax(e >= 0.99)) + 1
    _, rep = lowrank(m, max_error=0.05, form="weight")
    err = np.sqrt(1 - e)
    assert rep.details["layers"][0]["rank"] == int(np.argmax(err <= 0.05)) + 1
    _, rep = lowrank(m, rank_ratio=0.3, form="weight", round_to=4)
    assert rep.details["layers"][0]["rank"] == 12  # ceil(9.6) = 10 -> multiple of 4
    _, rep = lowrank(m, mac_ratio=0.5)
    row = rep.details["layers"][0]
    assert row["macs_after"] <= 0.5 * row["macs_before"]


def test_model_mac_budget_is_met_and_spent_where_error_is_cheapest():
    rng = np.random.default_rng(9)
    easy = rng.standard_normal((32, 2)) @ rng.standard_normal((2, 16 * 9))   # rank 2
    hard = rng.standard_normal((32, 32 * 9))                                 # full rank
    nodes = [helper.make_node("Conv", ["x", "E"], ["a"], pads=[1] * 4, name="easy"),
             helper.make_node("Conv", ["a", "H"], ["y"], pads=[1] * 4, name="hard")]
    m = infer_shapes(make_model(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 32, 8, 8])],
                                {"E": easy.reshape(32, 16, 3, 3).astype(np.float32),
                                 "H": hard.reshape(32, 32, 3, 3).astype(np.float32)}))
    _, rep = lowrank(m, model_mac_ratio=0.7, form="weight")
    rows = {r["node"]: r for r in rep.details["layers"]}
    assert rep.after["macs"] <= 0.7 * rep.before["macs"]
    assert rows["easy"]["rank"] == 2 and rows["easy"]["error"] < 1e-6


def test_data_aware_beats_data_free_at_equal_macs():
    """Inputs that live in a low-dimensional subspace: the data-aware factors spend the rank
    where the activations are, the plain weight SVD does not."""
    rng = np.random.default_rng(10)
    m = conv_model(rng, n=1, c=16, k=32, h=12, w=12)
    basis = rng.standard_normal((3, 16))

    def inputs(n):  # channel mixtures of 3 sources, smooth in space: patches of rank ~3
        z = rng.standard_normal((n, 3, 1, 1)) + np.linspace(0, 1, 12)[None, None, :, None]
        return (np.einsum("nkhw,kc->nchw", z, basis)
                + 0.05 * rng.standard_normal((n, 16, 12, 12))).astype(np.float32)

    calib, held = {"x": inputs(64)}, inputs(8)
    ref = np.concatenate([ort_run(m, {"x": held[i:i + 1]})[0] for i in range(8)])
    errs = {}
    for name, c in (("free", None), ("data", calib)):
        out, rep = lowrank(m, c, mac_ratio=0.3, form="weight")
        assert rep.details["layers"][0]["rank"] == 7  # 7 * (144 + 32) <= 0.3 * 32 * 144
        got = np.concatenate([ort_run(out, {"x": held[i:i + 1]})[0] for i in range(8)])
        errs[name] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert errs["data"] < 0.5 * errs["free"], errs


def test_bad_options():
    with pytest.raises(EdgecError, match="only one rank criterion"):
        make_config("lowrank", {"energy": "0.9", "rank_ratio": "0.5"})
    with pytest.raises(EdgecError, match="within"):
        make_config("lowrank", {"rank_ratio": "1.5"})
    with pytest.raises(EdgecError, match="not one of"):
        make_config("lowrank", {"form": "diagonal"})
    with pytest.raises(EdgecError, match="unknown option"):
        make_config("lowrank", {"alpha": "0.1"})


def test_fixed_batch_model_calibrates_with_fewer_rows():
    """A model exported with batch 8 and 5 calibration rows: padded, not refused."""
    from edgec.passes._calib import collect

    rng = np.random.default_rng(11)
    m = conv_model(rng, n=8, c=4, k=8)
    x = rng.standard_normal((5, 4, 9, 8)).astype(np.float32)
    got = collect(m, {"x": x}, ["y", "x"])
    assert got["y"].shape[0] == 5 and np.array_equal(got["x"], x)
    ref = ort_run(m, {"x": np.concatenate([x, x[:3]])})[0][:5]
    np.testing.assert_allclose(got["y"], ref, atol=1e-6)


def test_compiled_factorized_model_matches_onnxruntime(tmp_path):
    """Both forms and a Gemm, through TVM: artifact == onnxruntime on the rewritten graph."""
    from edgec.runtime import Session

    rng = np.random.default_rng(12)
    W1 = (rng.standard_normal((32, 8, 3, 3)) * 0.2).astype(np.float32)
    W2 = (rng.standard_normal((32, 32, 3, 5)) * 0.05).astype(np.float32)
    G = (rng.standard_normal((32 * 16, 10)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "W2"], ["c"], pads=[1, 2, 1, 2], strides=[2, 2],
                              name="c2"),
             helper.make_node("Flatten", ["c"], ["f"], name="fl"),
             helper.make_node("Gemm", ["f", "G"], ["y"], name="fc")]
    m = make_model(nodes, [("x", [1, 8, 8, 8])], [("y", [1, 10])], {"W1": W1, "W2": W2, "G": G})
    out = tmp_path / "art"
    rep = compile_to(m, out, passes=["lowrank"], sets=["lowrank.rank_ratio=0.25"])
    lr = next(p for p in rep["passes"] if p["name"] == "lowrank")
    assert {r["node"] for r in lr["rewritten"]} == {"c1", "c2", "fc"}
    assert rep["plots"] == ["plots/lowrank_weight_spectra.png"]
    assert (out / "plots" / "lowrank_weight_spectra.png").stat().st_size > 1000
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    want = ort_run(onnx.load(out / "model.onnx"), {"x": x})[0]
    got = Session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_trained_fashion_model_data_aware_beats_data_free():
    """The issue's claim on real data: at the same MAC budget, fitting the factors to real
    activations keeps far more accuracy than the plain weight SVD."""
    from edgec.core.importer import load_model, normalize
    from edgec.models import fashion_mnist
    from edgec.driver.pipeline import NORMALIZE, Pipeline
    from edgec.runtime import OrtSession

    if not fashion_mnist.available():
        pytest.skip("dataset-fashion-mnist is not installed")
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
    model, _ = normalize(load_model(src), {"input": (250, 1, 28, 28)})
    model = Pipeline(NORMALIZE).run(model).model
    xc, _ = fashion_mnist.load("train", 256)
    xt, yt = fashion_mnist.load("test", 1000)

    def acc(m):
        s = OrtSession(m)
        return np.mean(np.concatenate([s.run(None, {"input": xt[i:i + 250]})[0].argmax(1)
                                       for i in range(0, 1000, 250)]) == yt)

    base = acc(model)
    got = {}
    for mode, calib in (("free", None), ("data", {"input": xc})):
        out, rep = lowrank(model, calib, model_mac_ratio=0.4)
        assert rep.after["macs"] <= 0.4 * rep.before["macs"] * 1.01
        got[mode] = acc(out)
    assert got["data"] > got["free"] + 0.01, got
    assert base - got["data"] < 0.02, (base, got)


def test_cli_lowrank_with_calib_and_bad_option(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(13)
    m = conv_model(rng, n=4, c=16, k=32, h=12, w=12)
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 16, 12, 12)).astype(np.float32))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgec.driver.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    res = cli("compile", tmp_path / "m.onnx", "--passes", "lowrank", "--set",
              "lowrank.energy=2", "-o", tmp_path / "bad")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "energy must be within" in res.stderr and not (tmp_path / "bad").exists()
    res = cli("compile", tmp_path / "m.onnx", "--passes", "lowrank", "--set",
              "lowrank.mac_ratio=0.8", "--calib", tmp_path / "calib.npz", "--no-build",
              "--verify",  # fixed batch 4, 8 verification rows: fed in chunks
              "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "pass lowrank" in res.stdout
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    lr = rep["passes"][-1]
    assert lr["name"] == "lowrank" and lr["details"]["data_aware"]
    assert sorted(rep["plots"]) == ["plots/lowrank_image_spectra.png",
                                    "plots/lowrank_weight_spectra.png"]
    assert onnx.load(tmp_path / "m.onnx") == m  # input untouched


def test_gemm_bias_of_shape_1xn_is_refitted():
    rng = np.random.default_rng(14)
    B = rng.standard_normal((24, 16)).astype(np.float32)
    C = rng.standard_normal((1, 16)).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="g", beta=0.5)
    m = infer_shapes(make_model([node], [("a", [4, 24])], [("y", [4, 16])], {"B": B, "C": C}))
    calib = {"a": (rng.standard_normal((128, 24)) + 2.0).astype(np.float32)}
    out, rep = lowrank(m, calib, rank_ratio=0.5)
    row = rep.details["layers"][0]
    assert row["output_error_refit"] < row["output_error"]
    a = (rng.standard_normal((4, 24)) + 2.0).astype(np.float32)
    ref, got = ort_run(m, {"a": a})[0], ort_run(out, {"a": a})[0]
    assert got.shape == (4, 16)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < row["output_error"] * 1.5


def test_non_finite_weights_are_skipped_with_a_reason():
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    m = conv_model(rng, c=16, k=16)
    W = numpy_helper.to_array(m.graph.initializer[0]).copy()
    W[0, 0, 0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(W, "W"))
    out, rep = lowrank(m, rank_ratio=0.5, force=True)
    assert not rep.modified
    assert rep.skipped[0]["reason"] == "weight holds NaN or infinity"
