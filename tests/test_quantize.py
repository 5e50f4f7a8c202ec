"""The quantize pass (int8 QDQ): scales, calibrators, graph structure, onnxruntime vs compiled,
exclusions, sensitivity, errors, and the trained model's accuracy and size."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import compile_to, conv_bn_model, make_model, ort_run
from edgec.errors import EdgecError
from edgec.importer import infer_shapes
from edgec.passes import PassContext, make_config, run_pass
from edgec.passes.quantize import (Observer, activation_range, quantize_weight,
                                   scale_zero_point, weight_scales)


def quantize(model, calib, **sets):
    cfg = make_config("quantize", {k: str(v) for k, v in sets.items()})
    return run_pass("quantize", model, cfg, PassContext(calib=calib))


def test_per_channel_weight_scales_are_exact():
    w = np.zeros((3, 2, 2, 2))
    w[0, 0, 0, 0] = -2.54
    w[1, 1, 1, 1] = 1.27
    w[2] = 0.5
    s = weight_scales(w, axis=0)
    np.testing.assert_allclose(s, [2.54 / 127, 1.27 / 127, 0.5 / 127])
    q = quantize_weight(w, s, axis=0)
    assert q.dtype == np.int8 and q[0, 0, 0, 0] == -127 and q[1, 1, 1, 1] == 127
    assert np.all(q[2] == 127)
    # axis 1 (Gemm with transB=0: B is [in, out])
    s1 = weight_scales(w.reshape(3, 8).T, axis=1)
    np.testing.assert_allclose(s1, s)
    # mse clipping: long-tailed (Laplace) channels are clipped, since that lowers the error;
    # a single far outlier is not (clipping it would cost more than the coarser step)
    rng = np.random.default_rng(0)
    wl = rng.laplace(0, 0.1, (4, 4096))
    assert np.all(weight_scales(wl, 0, "mse") < 0.999 * weight_scales(wl, 0, "minmax"))
    wo = rng.standard_normal((4, 256)) * 0.1
    wo[:, 0] = 5.0
    np.testing.assert_allclose(weight_scales(wo, 0, "mse"), weight_scales(wo, 0, "minmax"))


def test_scale_zero_point_hand_case():
    s, z = scale_zero_point(-1.0, 3.0, "uint8")
    assert s == pytest.approx(4 / 255) and z == 64  # round(0 + 1 / (4/255)) = round(63.75)
    s, z = scale_zero_point(0.0, 2.55, "uint8")
    assert s == pytest.approx(0.01) and z == 0      # a ReLU output: the range starts at 0
    s, z = scale_zero_point(-1.28, 1.27, "int8")
    assert s == pytest.approx(0.01) and z == 0


def _observe(x, method, **kw):
    o = Observer()
    o.update_range(x)
    if method != "minmax":
        o.update_hist(x)
    return activation_range(o, method, kw.get("p", 99.9), "uint8")


def test_calibrators_on_hand_made_distributions():
    rng = np.random.default_rng(1)
    # minmax: exactly the observed range (0 included)
    assert _observe(np.array([0.5, 2.0, 3.0]), "minmax") == (0.0, 3.0)
    assert _observe(np.array([-1.0, 2.0]), "minmax") == (-1.0, 2.0)
    # 10 000 values uniform on [0, 1] and one outlier at 100
    x = np.concatenate([rng.random(10_000), [100.0]])
    lo, hi = _observe(x, "percentile", p=99.9)
    assert lo == 0.0 and 0.99 <= hi <= 1.0 + 100 / 2048 + 1e-9  # within one histogram bin
    lo, hi = _observe(x, "entropy")
    assert lo == 0.0 and hi < 10.0, hi  # the outlier is clipped
    # mse clips a long dense tail (|Laplace|: the max is ~12 scale units out)
    lap = np.abs(rng.laplace(0, 1.0, 100_000))
    _, hi = _observe(lap, "mse")
    assert hi < 0.95 * lap.max(), (hi, lap.max())  # 8-bit optimum for Laplace(b=1): ~10
    # without outliers the clip keeps (nearly) the whole range
    u = rng.random(10_000) * 4.0
    for method in ("mse", "entropy", "percentile"):
        _, hi = _observe(u, method, p=99.99)
        assert 3.6 <= hi <= 4.01, (method, hi)


def test_qdq_graph_structure():
    m = conv_bn_model()
    from edgec.pipeline import NORMALIZE, Pipeline

    m = Pipeline(NORMALIZE).run(infer_shapes(m)).model
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)}
    out, rep = quantize(m, calib)
    nodes = {n.name: n for n in out.graph.node}
    prod = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for name in ("conv", "fc"):
        n = nodes[name]
        x, w = prod[n.input[0]], prod[n.input[1]]
        assert x.op_type == "DequantizeLinear" and prod[x.input[0]].op_type == "QuantizeLinear"
        assert inits[x.input[2]].dtype == np.uint8
        assert w.op_type == "DequantizeLinear" and inits[w.input[0]].dtype == np.int8
        b = prod[n.input[2]]
        assert b.op_type == "DequantizeLinear" and inits[b.input[0]].dtype == np.int32
        # bias scale = input scale * weight scale, per output channel
        np.testing.assert_allclose(inits[b.input[1]],
                                   inits[x.input[1]] * inits[w.input[1]], rtol=1e-6)
    fc_w = prod[nodes["fc"].input[1]]
    assert [a.i for a in fc_w.attribute if a.name == "axis"] == [0]  # transB=1: rows
    assert len(rep.rewritten) == 2
    y = ort_run(out, {"x": calib["x"][:1]})[0]
    assert y.shape == (1, 10)


def test_onnxruntime_and_compiled_int8_agree_within_a_step(tmp_path):
    from edgec.runtime import Session

    rng = np.random.default_rng(3)
    W1 = (rng.standard_normal((16, 4, 3, 3)) * 0.3).astype(np.float32)
    W2 = (rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32)
    B2 = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                              name="pool"),
             helper.make_node("Conv", ["p", "W2", "B2"], ["y"], pads=[1] * 4, name="c2")]
    m = make_model(nodes, [("x", [1, 4, 10, 10])], [("y", [1, 8, 5, 5])],
                   {"W1": W1, "W2": W2, "B2": B2})
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 4, 10, 10)).astype(np.float32))
    from edgec.runtime import load_npz

    out = tmp_path / "art"
    rep = compile_to(m, out, passes=["quantize"], calib=load_npz(tmp_path / "calib.npz"))
    q = next(p for p in rep["passes"] if p["name"] == "quantize")
    step = q["details"]["activations"]["p"]["scale"]
    x = rng.standard_normal((1, 4, 10, 10)).astype(np.float32)
    want = ort_run(onnx.load(out / "model.onnx"), {"x": x})[0]
    got = Session(out).run(None, {"x": x})[0]
    # one quantization step of c2's input moves an output by at most step * sum|W2[k]|
    bound = step * np.abs(W2).reshape(8, -1).sum(axis=1).max()
    assert np.abs(got - want).max() <= bound
    assert np.mean(np.abs(got - want) <= 1e-4) > 0.95  # and almost all agree exactly


def test_exclude_and_sensitivity():
    rng = np.random.default_rng(4)
    m = conv_bn_model(rng)
    calib = {"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)}
    out, rep = quantize(m, calib, exclude="fc", sensitivity=True)
    fc = next(n for n in out.graph.node if n.name == "fc")
    assert fc.input[0] == "f" and fc.input[1] == "G"  # untouched, float
    assert any(s["node"] == "fc" and "exclude" in s["reason"] for s in rep.skipped)
    sens = rep.details["sensitivity"]
    assert [s["node"] for s in sens] == ["conv"] and 0 < sens[0]["output_error"] < 0.1
    again, rep2 = quantize(out, calib)
    assert not rep2.modified and "already quantized" in rep2.skipped[0]["reason"]


def test_bad_options_and_calibration_errors(tmp_path):
    m = conv_bn_model()
    with pytest.raises(EdgecError, match="needs calibration data"):
        run_pass("quantize", m)
    with pytest.raises(EdgecError, match="not one of"):
        make_config("quantize", {"method": "kmeans"})
    with pytest.raises(EdgecError, match="percentile"):
        make_config("quantize", {"percentile": "20"})
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 3, 12, 12), np.nan, np.float32))
    np.savez(tmp_path / "name.npz", y=np.zeros((4, 3, 12, 12), np.float32))
    env = dict(os.environ)
    for args, needle in (([], "needs calibration data"),
                         (["--calib", tmp_path / "nan.npz"], "NaN"),
                         (["--calib", tmp_path / "name.npz"], "lacks input(s) x")):
        res = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", tmp_path / "m.onnx",
                              "--passes", "quantize", "--no-build", "-o", tmp_path / "o",
                              *args], capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 2 and needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_trained_fashion_model_int8_accuracy_and_size(tmp_path):
    from pathlib import Path

    from edgec.importer import load_model, normalize
    from edgec.models import fashion_mnist
    from edgec.pipeline import NORMALIZE, Pipeline
    from edgec.runtime import OrtSession

    if not fashion_mnist.available():
        pytest.skip("dataset-fashion-mnist is not installed")
    src = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
    model, _ = normalize(load_model(src), {"input": (250, 1, 28, 28)})
    model = Pipeline(NORMALIZE).run(model).model
    xc, _ = fashion_mnist.load("train", 512)
    xt, yt = fashion_mnist.load("test", 2000)

    def acc(m):
        s = OrtSession(m)
        return np.mean(np.concatenate([s.run(None, {"input": xt[i:i + 250]})[0].argmax(1)
                                       for i in range(0, 2000, 250)]) == yt)

    out, rep = quantize(model, {"input": xc}, method="mse")
    onnx.save(model, tmp_path / "f.onnx")
    onnx.save(out, tmp_path / "q.onnx")
    assert os.path.getsize(tmp_path / "q.onnx") <= 0.3 * os.path.getsize(tmp_path / "f.onnx")
    assert acc(model) - acc(out) <= 0.005
