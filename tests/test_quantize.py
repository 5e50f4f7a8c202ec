"""The quantize pass: per-channel weight scales, the four calibrators against hand-computed
cases, QDQ graph structure (int8 weights, int32 biases, fused Relu, shared scales), onnxruntime
vs the compiled TVM model, fp16, bias correction, sensitivity, exclusions and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import compile_to, conv_bn_model, edgec_here, make_model, ort_run
from edgec.core.errors import EdgecError
from edgec.passes import PassContext, make_config, run_pass
from edgec.passes._quant_calib import (BINS, Observer, activation_range, fake_quant,
                                       kl_divergence, quantize_weight, range_entropy,
                                       range_mse, range_percentile, scale_zero_point,
                                       weight_scales)
from edgec.driver.pipeline import NORMALIZE, Pipeline


def quantize(model, calib=None, normalize=True, **sets):
    sets = {k: str(v) for k, v in sets.items()}
    if normalize:
        res = Pipeline(NORMALIZE + ["quantize"], {"quantize": sets}, calib=calib).run(model)
        return res.model, res.reports[-1]
    return run_pass("quantize", model, make_config("quantize", sets), PassContext(calib=calib))


def inits_of(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def nodes_of(m, op):
    return [n for n in m.graph.node if n.op_type == op]


def producer_of(m, t):
    return next((n for n in m.graph.node if t in n.output), None)


def attr(n, name, default=None):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------------------- weights

def test_per_channel_scales_exact():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    amax = np.abs(W).reshape(6, -1).max(1)
    s = weight_scales(W, 0)
    np.testing.assert_array_equal(s, amax.astype(np.float64) / 127.0)
    q = quantize_weight(W, s, 0)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    # each channel's largest magnitude lands exactly on +-127
    assert all(np.abs(q[k]).max() == 127 for k in range(6))
    np.testing.assert_array_equal(q, np.round(W / s[:, None, None, None]).astype(np.int8))
    # Gemm without transB: the output channels are on axis 1
    B = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(weight_scales(B, 1), np.abs(B).max(0).astype(np.float64) / 127.0)
    # per tensor, and an all-zero channel
    assert weight_scales(W, 0, per_channel=False).shape == (1,)
    W[2] = 0
    s = weight_scales(W, 0)
    assert s[2] > 0 and np.all(quantize_weight(W, s, 0)[2] == 0)


def test_weight_mse_clips_long_tails_not_lone_outliers():
    rng = np.random.default_rng(1)
    W = np.stack([rng.uniform(-1, 1, 100_000), rng.laplace(0, 0.1, 100_000)])
    s_mm, s_mse = weight_scales(W, 0), weight_scales(W, 0, "mse")

    def err(s):
        return ((quantize_weight(W, s, 0) * s[:, None] - W) ** 2).sum(1)

    assert s_mse[1] < 0.95 * s_mm[1]                     # the long-tailed channel is clipped
    assert err(s_mse)[1] < err(s_mm)[1]
    assert np.all(err(s_mse) <= err(s_mm) + 1e-12)       # never worse than minmax
    # one far outlier among small weights: clipping it costs more than the coarse step
    W2 = rng.uniform(-0.1, 0.1, (2, 256))
    W2[:, 0] = 5.0
    np.testing.assert_array_equal(weight_scales(W2, 0, "mse"), weight_scales(W2, 0))


# ----------------------------------------------------------------------------- calibrators

def test_scale_zero_point_hand_computed():
    s, z = scale_zero_point(-1.0, 3.0, "uint8")
    assert s == pytest.approx(4 / 255) and z == 64          # round(0 + 1 / (4/255)) = 64
    s, z = scale_zero_point(-1.0, 3.0, "int8")
    assert s == pytest.approx(4 / 255) and z == -64         # round(-128 + 63.75)
    s, z = scale_zero_point(0.5, 2.0, "uint8")               # range always contains 0
    assert s == pytest.approx(2 / 255) and z == 0
    assert fake_quant(np.array([0.0]), s, z, "uint8")[0] == 0.0


def _obs(x, batches=4):
    o = Observer()
    for part in np.array_split(x, batches):
        o.update_range(part)
    for part in np.array_split(x, batches):
        o.update_hist(part)
    return o


def test_observer_streams_like_one_shot():
    x = np.random.default_rng(2).standard_normal((64, 3, 5, 5)).astype(np.float32)
    o = _obs(x, 7)
    assert (o.lo, o.hi) == (float(x.min()), float(x.max()))
    h, _ = np.histogram(x, bins=BINS, range=o.edges())
    np.testing.assert_array_equal(o.hist, h)
    np.testing.assert_allclose(o.channel_mean(), x.mean(axis=(0, 2, 3)), rtol=1e-6)


def test_minmax_calibrator():
    x = np.array([-2.0, 0.0, 1.0, 6.0], np.float32)
    assert activation_range(_obs(x, 2), "minmax", 99.9, "uint8") == (-2.0, 6.0)


def test_percentile_calibrator():
    x = np.concatenate([np.linspace(0, 1, 9999), [100.0]])   # one outlier in 10000
    lo, hi = activation_range(_obs(x), "percentile", 99.9, "uint8")
    width = 100.0 / BINS
    assert lo == 0.0 and 1.0 - width <= hi <= 1.0 + 2 * width
    assert activation_range(_obs(x), "percentile", 100.0, "uint8")[1] == pytest.approx(100.0)
    # two-sided: the lower tail is clipped too
    y = np.concatenate([np.linspace(-1, 1, 9998), [-50.0, 50.0]])
    lo, hi = range_percentile(*[_obs(y).hist, *_obs(y).edges()], 99.9)
    assert -1.2 < lo < -0.9 and 0.9 < hi < 1.2


def test_mse_calibrator_hand_computed():
    """n values uniform on [0, 10] and one at 100: with clip c >= 10 the expected error is
    n (c/255)^2 / 12 (rounding) + (100 - c)^2 (clipping), least at c* = 100 / (1 + n / (12
    255^2)) = 43.83 for n = 10^6 (candidates are 1 apart)."""
    n = 1_000_000
    lo, hi = 0.0, 100.0
    hist = np.zeros(BINS)
    edges = np.linspace(lo, hi, BINS + 1)
    last = int(np.searchsorted(edges, 10.0))   # bins inside [0, 10]
    hist[:last] = n / last
    hist[-1] = 1
    c_star = 100 / (1 + n / (12 * 255 ** 2))
    a, b = range_mse(hist, lo, hi, "uint8")
    assert a == 0 and abs(b - c_star) <= 1.5, (b, c_star)
    # without the outlier nothing is clipped
    hist[-1] = 0
    assert range_mse(hist[:last], 0.0, edges[last], "uint8") == (0.0, edges[last])


def test_kl_hand_computed():
    # levels=2, P = [3, 1, 2, 2]/8: group {0,1} -> 4 over 2 non-empty bins, {2,3} -> 4 over 2
    p = np.array([3.0, 1.0, 2.0, 2.0])
    want = 3 / 8 * math.log(3 / 2) + 1 / 8 * math.log(1 / 2)
    assert kl_divergence(p, 0.0, 4.0, 0.0, 4.0, levels=2) == pytest.approx(want)
    # an empty bin stays empty in Q
    p = np.array([4.0, 0.0, 2.0, 2.0])
    assert kl_divergence(p, 0.0, 4.0, 0.0, 4.0, levels=2) == pytest.approx(0.0)


def test_entropy_calibrator():
    # uniform: the full range reproduces P exactly (KL 0), any clip folds mass -> keep all
    hist = np.full(BINS, 10.0)
    assert range_entropy(hist, 0.0, 8.0) == (0.0, 8.0)
    # a Gaussian with a far outlier: clipped well inside the observed maximum
    x = np.concatenate([np.random.default_rng(3).standard_normal(200_000), [60.0]])
    lo, hi = activation_range(_obs(x), "entropy", 99.9, "int8")
    assert 2.5 < hi < 20 and -20 < lo < -2.5


# ----------------------------------------------------------------------------- the graph

def calib_for(model, n=64, seed=0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return {model.graph.input[0].name: rng.standard_normal([n] + shape[1:]).astype(np.float32)}


def test_qdq_structure_conv_bn_model():
    m = conv_bn_model(k=8)
    calib = calib_for(m)
    q, rep = quantize(m, calib)
    onnx.checker.check_model(q)
    ini = inits_of(q)
    conv, fc = nodes_of(q, "Conv")[0], nodes_of(q, "Gemm")[0]
    # weights: int8 initializer -> DequantizeLinear(axis 0) with one scale per channel
    for node, k in ((conv, 8), (fc, 10)):
        wd = producer_of(q, node.input[1])
        assert wd.op_type == "DequantizeLinear" and attr(wd, "axis") == 0
        assert ini[wd.input[0]].dtype == np.int8 and ini[wd.input[1]].shape == (k,)
        assert np.all(ini[wd.input[2]] == 0)
        # bias: int32 with scale s_x * s_w[k]
        bd = producer_of(q, node.input[2])
        assert ini[bd.input[0]].dtype == np.int32
        xd = producer_of(q, node.input[0])
        assert xd.op_type == "DequantizeLinear"
        np.testing.assert_allclose(ini[bd.input[1]], ini[xd.input[1]] * ini[wd.input[1]],
                                   rtol=1e-6)
    # no float weights left, activations uint8
    assert not any(v.dtype == np.float32 and v.size > 16 for v in ini.values())
    assert ini[producer_of(q, conv.input[0]).input[2]].dtype == np.uint8
    # Relu fused: the Conv feeds the Relu directly, the Q/DQ sits after the Relu
    relu = nodes_of(q, "Relu")[0]
    assert producer_of(q, relu.input[0]) is conv
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0]
               for n in q.graph.node)
    assert producer_of(q, nodes_of(q, "GlobalAveragePool")[0].input[0]).op_type == \
        "DequantizeLinear"
    # the report: rewritten nodes, the fused relu, per-layer and per-tensor tables
    done = {r["node"]: r for r in rep.rewritten}
    assert set(done) == {"conv", "fc"}
    assert rep.details["fused"] == [{"activation": "relu", "into": "conv"}]
    assert {r["node"] for r in rep.details["layers"]} == {"conv", "fc"}
    assert rep.details["activations"]
    # it still computes nearly the same thing
    x = calib["x"][:16]
    (ref,) = ort_run(m, {"x": x[:1]})
    (got,) = ort_run(q, {"x": x[:1]})
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def branchy_model(rng, transB=0):
    """conv -> relu -> maxpool ; conv2 ; add ; concat ; flatten ; gemm(transB=0)."""
    c, k, hw = 3, 4, 8
    inits = {"W1": rng.standard_normal((k, c, 3, 3)).astype(np.float32) * 0.3,
             "W2": rng.standard_normal((k, c, 3, 3)).astype(np.float32) * 0.3,
             "B2": rng.standard_normal(k).astype(np.float32),
             "G": rng.standard_normal((2 * k * 16, 5) if not transB else (5, 2 * k * 16)
                                      ).astype(np.float32) * 0.1,
             "C": rng.standard_normal(5).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("MaxPool", ["ar"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                         name="pool"),
        helper.make_node("Conv", ["x", "W2", "B2"], ["b"], pads=[1, 1, 1, 1],
                         strides=[2, 2], name="conv2"),
        helper.make_node("Add", ["p", "b"], ["s"], name="add"),
        helper.make_node("Concat", ["s", "p"], ["cat"], axis=1, name="concat"),
        helper.make_node("Flatten", ["cat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=transB, name="fc"),
    ]
    return make_model(nodes, [("x", [1, c, hw, hw])], [("y", [1, 5])], inits)


def test_qdq_structure_maxpool_add_concat_gemm():
    m = branchy_model(np.random.default_rng(4))
    calib = calib_for(m, 32)
    q, rep = quantize(m, calib)
    ini = inits_of(q)

    def qparams(t):
        qn = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
        return float(ini[qn.input[1]]), int(ini[qn.input[2]])

    def src(t):  # the float tensor a DequantizeLinear output stands for
        d = producer_of(q, t)
        return producer_of(q, d.input[0]).input[0]

    # MaxPool keeps its input's scale; Concat inputs and output share one scale
    pool = nodes_of(q, "MaxPool")[0]
    assert qparams(src(pool.input[0])) == qparams(pool.output[0])
    cat = nodes_of(q, "Concat")[0]
    shared = {qparams(src(t)) for t in cat.input}
    assert len(shared) == 1 and shared == {qparams("cat_float")}
    # the add reads two quantized inputs and is quantized itself
    add = nodes_of(q, "Add")[0]
    assert all(producer_of(q, t).op_type == "DequantizeLinear" for t in add.input)
    # Gemm with transB=0: output channels on axis 1
    fc = nodes_of(q, "Gemm")[0]
    wd = producer_of(q, fc.input[1])
    assert attr(wd, "axis") == 1 and ini[wd.input[1]].shape == (5,)
    # the graph output stays float (the Gemm writes it directly)
    assert fc.output[0] == "y"
    assert {"conv1", "conv2", "pool", "add", "concat", "fc"} == \
        {r["node"] for r in rep.rewritten}
    (ref,) = ort_run(m, {"x": calib["x"][:1]})
    (got,) = ort_run(q, {"x": calib["x"][:1]})
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max() + 0.05


def test_int8_activations_and_exclude_and_purity():
    m = branchy_model(np.random.default_rng(5), transB=1)
    before = m.SerializeToString()
    q, rep = quantize(m, calib_for(m), activation_type="int8", exclude="conv2,add")
    assert m.SerializeToString() == before
    ini = inits_of(q)
    zps = [ini[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 for z in zps)
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert ini[conv2.input[1]].dtype == np.float32 and conv2.input[0] == "x"
    skipped = {s["node"]: s["reason"] for s in rep.skipped}
    assert "exclude" in skipped["conv2"] and "exclude" in skipped["add"]
    assert attr(producer_of(q, nodes_of(q, "Gemm")[0].input[1]), "axis") == 0  # transB=1


def test_already_quantized_is_left_alone():
    m = conv_bn_model()
    q, _ = quantize(m, calib_for(m))
    q2, rep = quantize(q, calib_for(m), normalize=False)
    assert not rep.modified and rep.skipped
    assert len(q2.graph.node) == len(q.graph.node)


def test_bias_correction_removes_the_mean_shift():
    rng = np.random.default_rng(6)
    W = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv")],
                   [("x", [1, 8, 6, 6])], [("y", [1, 16, 4, 4])],
                   {"W": W, "B": np.zeros(16, np.float32)})
    x = (rng.standard_normal((256, 8, 6, 6)) * 0.1 + 3.0).astype(np.float32)  # mean 3
    calib = {"x": x}

    def mean_shift(model):
        sess_out = np.concatenate([ort_run(model, {"x": x[i:i + 1]})[0] for i in range(64)])
        ref = np.concatenate([ort_run(m, {"x": x[i:i + 1]})[0] for i in range(64)])
        return np.abs((sess_out - ref).mean(axis=(0, 2, 3))).mean()

    plain, _ = quantize(m, calib, normalize=False, weight_method="mse")
    fixed, rep = quantize(m, calib, normalize=False, weight_method="mse",
                          bias_correction="true")
    assert "bias_correction_max" in rep.details["layers"][0]
    assert mean_shift(fixed) < 0.5 * mean_shift(plain)


def test_sensitivity_table_with_labels():
    m = branchy_model(np.random.default_rng(7), transB=1)
    calib = calib_for(m, 48)
    calib["labels"] = np.random.default_rng(0).integers(0, 5, 48)
    _, rep = quantize(m, calib, sensitivity="true", sensitivity_rows=32)
    rows = rep.details["sensitivity"]
    assert {r["node"] for r in rows} == {"conv1", "conv2", "fc"}
    for r in rows:
        assert r["output_error"] >= 0 and 0 <= r["top1_agreement"] <= 1
        assert "accuracy_drop_points" in r
    assert rows == sorted(rows, key=lambda r: -r["output_error"])


def test_int8_needs_calib_and_bad_options():
    with pytest.raises(EdgecError, match="needs calibration data"):
        quantize(conv_bn_model())
    with pytest.raises(EdgecError, match="method"):
        make_config("quantize", {"method": "magic"})
    with pytest.raises(EdgecError, match="percentile"):
        make_config("quantize", {"percentile": "20"})


def test_onnxruntime_vs_compiled_int8_within_one_step(tmp_path):
    """With the output quantized too, the compiled (TVM) model and onnxruntime may differ by at
    most one quantization step of the output (rounding ties inside)."""
    m = branchy_model(np.random.default_rng(8), transB=1)
    calib = calib_for(m, 32)
    q, rep = quantize(m, calib, quantize_outputs="true")
    step = rep.details["activations"]["y"]["scale"]
    compile_to(q, tmp_path / "art", input_shapes={})
    from edgec.runtime import Session

    sess = Session(tmp_path / "art")
    xs = calib_for(m, 8, seed=9)["x"]
    for i in range(8):
        (ref,) = ort_run(q, {"x": xs[i:i + 1]})
        (got,) = sess.run(None, {"x": xs[i:i + 1]})
        assert np.abs(np.asarray(got) - ref).max() <= step * 1.001 + 1e-6


# ----------------------------------------------------------------------------- fp16

def test_fp16_keep_io_types_and_block_ops():
    m = conv_bn_model()
    x = calib_for(m, 4)["x"]
    q, rep = quantize(m, mode="fp16")
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(t.data_type == TensorProto.FLOAT16 for t in q.graph.initializer)
    for i in range(4):
        (ref,) = ort_run(m, {"x": x[i:i + 1]})
        (got,) = ort_run(q, {"x": x[i:i + 1]})
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    # fp16 end to end, and a blocked op kept in float32 between casts
    q2, rep2 = quantize(m, mode="fp16", keep_io_types="false", block_ops="GlobalAveragePool")
    assert q2.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    gap = nodes_of(q2, "GlobalAveragePool")[0]
    cast_in = producer_of(q2, gap.input[0])
    assert cast_in.op_type == "Cast" and attr(cast_in, "to") == TensorProto.FLOAT
    assert any(s["node"] == gap.name for s in rep2.skipped)
    (got,) = ort_run(q2, {"x": x[:1].astype(np.float16)})
    (ref,) = ort_run(m, {"x": x[:1]})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-2,
                               atol=1e-2 * np.abs(ref).max())


def test_fp16_storage_only_compute_fp32():
    m = conv_bn_model()
    q, rep = quantize(m, mode="fp16", compute="fp32")
    big = [t for t in q.graph.initializer if np.prod(t.dims) >= 16]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)
    casts = nodes_of(q, "Cast")
    assert casts and all(attr(c, "to") == TensorProto.FLOAT for c in casts)
    x = calib_for(m, 1)["x"]
    np.testing.assert_allclose(ort_run(q, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-2,
                               atol=1e-2)


def test_fp16_compiles_with_tvm(tmp_path):
    m = conv_bn_model()
    x = calib_for(m, 1)["x"]
    for compute in ("fp16", "fp32"):
        q, _ = quantize(m, mode="fp16", compute=compute)
        compile_to(q, tmp_path / compute)
        from edgec.runtime import Session

        (got,) = Session(tmp_path / compute).run(None, {"x": x})
        (ref,) = ort_run(m, {"x": x})
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=1e-2,
                                   atol=1e-2 * np.abs(ref).max())


def test_fp16_relu6_clip(tmp_path):
    """Clip(0, 6) (ReLU6) with constant bounds: the bounds follow the data to fp16."""
    rng = np.random.default_rng(10)
    m = make_model([helper.make_node("Conv", ["x", "W"], ["a"], name="conv"),
                    helper.make_node("Clip", ["a", "lo", "hi"], ["y"], name="relu6")],
                   [("x", [1, 2, 5, 5])], [("y", [1, 3, 5, 5])],
                   {"W": rng.standard_normal((3, 2, 1, 1)).astype(np.float32) * 4,
                    "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)})
    q, _ = quantize(m, mode="fp16")
    assert {t.data_type for t in q.graph.initializer} == {TensorProto.FLOAT16}
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    ref = ort_run(m, {"x": x})[0]
    assert ref.max() == 6.0 and ref.min() == 0.0      # the clip is active on both sides
    np.testing.assert_allclose(ort_run(q, {"x": x})[0], ref, rtol=1e-2, atol=1e-2)
    from edgec.runtime import Session

    compile_to(q, tmp_path / "art")
    got = np.asarray(Session(tmp_path / "art").run(None, {"x": x})[0], np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- CLI

def test_cli_bad_calib_and_missing_calib(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "wrongname.npz", y=np.zeros((4, 3, 12, 12), np.float32))
    np.savez(tmp_path / "wrongshape.npz", x=np.zeros((4, 3, 10, 12), np.float32))
    np.savez(tmp_path / "nan.npz", x=np.full((4, 3, 12, 12), np.nan, np.float32))
    np.savez(tmp_path / "ints.npz", x=np.zeros((4, 3, 12, 12), np.int64))
    for f, needle in [("wrongname.npz", "lacks input(s) x"), ("wrongshape.npz", "shape"),
                      ("nan.npz", "NaN"), ("ints.npz", "dtype"), (None, "--calib")]:
        calib = ["--calib", tmp_path / f] if f else []
        res = edgec_here("compile", tmp_path / "m.onnx", "--passes", "quantize", *calib,
                         "--no-build", "-o", tmp_path / "o")
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- trained model

def test_fashion_mnist_int8_accuracy_and_size():
    from pathlib import Path

    from edgec.core.importer import load_model, normalize
    from edgec.models.fashion_mnist import load

    src = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
    model, _ = normalize(load_model(src), {"input": (100, 1, 28, 28)})
    xc, _ = load("train", 512)
    xt, yt = load("test", 1000)
    fm = Pipeline(NORMALIZE, {}).run(model).model
    q, rep = quantize(fm, {"input": xc}, normalize=False, method="percentile")

    def acc(mm, optimize=None):  # None: exact QDQ arithmetic on every host
        from edgec.runtime import OrtSession

        s = OrtSession(mm, optimize=optimize)
        out = np.concatenate([s.run(None, {"input": xt[i:i + 100]})[0]
                              for i in range(0, len(xt), 100)])
        return float(np.mean(out.argmax(1) == yt))

    assert acc(fm) - acc(q) <= 0.005
    assert len(q.SerializeToString()) <= 0.3 * len(fm.SerializeToString())
    # 7-bit weights: same budget, and onnxruntime's optimized (fused int8) run on this host
    # is the exact arithmetic too -- on AVX2 hosts as on VNNI ones
    q7, rep = quantize(fm, {"input": xc}, normalize=False, method="percentile", weight_bits=7)
    assert rep.details["weight_bits"] == 7
    a7 = acc(q7)
    assert acc(fm) - a7 <= 0.005 and acc(q7, optimize=True) == a7
    assert len(q7.SerializeToString()) <= 0.3 * len(fm.SerializeToString())


def test_weight_bits_auto_follows_the_target():
    """``weight_bits=auto``: 7 where the target's CPU sums u8 x s8 products in saturating
    16-bit pairs (x86 without VNNI), else 8; 7-bit weights lie in [-63, 63]."""
    from edgec.passes import TargetInfo

    m = conv_bn_model()
    calib = calib_for(m)
    fm = Pipeline(NORMALIZE).run(m).model
    cases = [(None, 8), (TargetInfo("x86", "x86_64", "cpu", "avx2"), 7),
             (TargetInfo("x86", "x86_64", "cpu", "avx512bw"), 7),
             (TargetInfo("x86", "x86_64", "cpu", "avx512vnni"), 8),
             (TargetInfo("rpi5", "aarch64", "cpu", "dotprod"), 8),
             (TargetInfo("cuda", "x86_64", "cuda", None), 8)]
    for target, bits in cases:
        q, rep = run_pass("quantize", fm, make_config("quantize", {"progress": "false"}),
                          PassContext(calib=calib, target=target))
        assert rep.details["weight_bits"] == bits, (target, rep.details["weight_bits_reason"])
        wmax = max(np.abs(v).max() for k, v in inits_of(q).items() if v.dtype == np.int8)
        assert wmax == (63 if bits == 7 else 127)
    q, rep = run_pass("quantize", fm, make_config("quantize", {"weight_bits": "8"}),
                      PassContext(calib=calib, target=cases[1][0]))
    assert rep.details["weight_bits"] == 8 and rep.details["weight_bits_reason"] == \
        "set by the user"
    with pytest.raises(EdgecError, match="weight_bits"):
        make_config("quantize", {"weight_bits": "4"})


def test_compile_for_avx2_quantizes_7bit_and_runs_the_s7_kernels(tmp_path):
    """``--target x86 --mcpu haswell --passes quantize``: 7-bit weights, the u8 x s7 kernels,
    and the compiled model within one output step of onnxruntime (exact arithmetic)."""
    m = branchy_model(np.random.default_rng(8), transB=1)
    calib = calib_for(m, 32)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.runtime import Session

    rep = compile_model(src, tmp_path / "art", CompileOptions(
        target="x86", passes=["quantize"], calib=calib, target_options={"mcpu": "haswell"},
        sets=["quantize.quantize_outputs=true", "quantize.progress=false"]))
    q = rep["passes"][-1]["details"]
    assert q["weight_bits"] == 7, q["weight_bits_reason"]
    kern = rep["kernels"]
    assert kern["int8"]["isa"] == "avx2" and kern["int8"]["weights_7bit"] == \
        kern["int8"]["conv2d"] + kern["int8"]["matmul"] > 0
    step = q["activations"]["y"]["scale"]
    qm = onnx.load(tmp_path / "art" / "model.onnx")
    sess = Session(tmp_path / "art")
    xs = calib_for(m, 8, seed=9)["x"]
    for i in range(8):
        (ref,) = ort_run(qm, {"x": xs[i:i + 1]})
        (got,) = sess.run(None, {"x": xs[i:i + 1]})
        assert np.abs(np.asarray(got) - ref).max() <= step * 1.001 + 1e-6


def test_check_reports_exact_qdq_and_onnxruntime_host_effect(tmp_path):
    """``edgec check`` on a QDQ artifact: the rewritten reference is the exact QDQ arithmetic;
    onnxruntime's optimized run on this host is compared with it, and a difference (as its
    saturating kernels give on AVX2 hosts, simulated here) is one line with the figures."""
    from edgec.driver.check import _host_effect, check, format_table, host_line

    m = branchy_model(np.random.default_rng(8), transB=1)
    calib = calib_for(m, 32)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    from edgec.driver.compiler import CompileOptions, compile_model

    compile_model(src, tmp_path / "art", CompileOptions(
        target="x86", passes=["quantize"], calib=calib, sets=["quantize.progress=false"]))
    data = calib_for(m, 16, seed=3)
    data["labels"] = np.random.default_rng(1).integers(0, 5, 16)
    res = check(src, tmp_path / "art", data)
    host = res["onnxruntime_host"]
    assert host is not None and set(host["outputs"]) == {"y"}
    assert "rewritten, exact QDQ" in format_table(res)
    assert ("note: onnxruntime's optimized" in format_table(res)) == host["differs"]
    # a float artifact has no such comparison
    compile_model(src, tmp_path / "fp", CompileOptions(target="x86"))
    assert check(src, tmp_path / "fp", data)["onnxruntime_host"] is None

    rng = np.random.default_rng(0)
    exact = [rng.standard_normal((100, 10))]
    labels = exact[0].argmax(1)
    same = _host_effect(exact, [exact[0] + 1e-7], ["y"], labels)
    assert not same["differs"]
    sat = exact[0].copy()
    sat[:6] = -sat[:6]  # six rows pushed elsewhere, as saturated sums do
    off = _host_effect(exact, [sat], ["y"], labels)
    assert off["differs"] and off["accuracy_exact"] == 1.0 and off["accuracy_host"] < 1.0
    line = host_line(off)
    assert "\n" not in line and "saturating" in line and "weight_bits=7" in line
    assert f"{100 * off['accuracy_host']:.2f} %" in line
