"""Integer kernels for QDQ convolutions (targets/cpu/kernels) against exact QDQ arithmetic.

The graphs are QDQ as the quantize pass writes them: uint8/int8 activation, int8 weights
per output channel, int32 bias, and the output quantized again, so both sides round to the
same grid. The reference is onnxruntime with graph optimizations off (``OrtSession``'s default
for QDQ models: every DequantizeLinear alone, the convolution in float) or numpy -- never
onnxruntime's fused int8 kernels, whose answers depend on the host CPU (16-bit pair sums that
saturate without VNNI). edgec may differ from it by one output step where a value falls on a
rounding tie. Every case also checks the compile report: the integer
kernel was used for the intended ISA and nothing was left with plain loops.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import onnx
from onnx import helper

from conftest import compile_to, host_has, make_model
from edgec.runtime import OrtSession, Session
from edgec.targets.cpu.isa import ISAS
from edgec.targets.cpu.kernels.int8_pixel import px_applies

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def qdq_conv(rng, batch, c, k, ksz, stride, dil, pads, h, w, group=1, act="uint8",
             relu=True, w_zero_point=0):
    """x -> Q/DQ -> Conv(DQ(int8 W per channel), DQ(int32 bias)) [-> Relu] -> Q/DQ."""
    cin = c // group
    wq = rng.integers(-127, 128, (k, cin, ksz, ksz)).astype(np.int8)
    sw = (rng.uniform(0.5, 2.0, k) * 0.01).astype(np.float32)
    sx = np.float32(0.02)
    zx = np.array(128 if act == "uint8" else 3, np.uint8 if act == "uint8" else np.int8)
    bq = rng.integers(-2000, 2000, k).astype(np.int32)
    sy = np.float32(0.05 * np.sqrt(cin * ksz * ksz) / 4)
    zy = np.array(0 if relu else 128, np.uint8)
    inits = {"sx": sx, "zx": zx, "wq": wq, "sw": sw,
             "zw": np.full(k, w_zero_point, np.int8), "bq": bq, "sb": (sx * sw).astype(np.float32),
             "zb": np.zeros(k, np.int32), "sy": sy, "zy": zy}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], strides=[stride] * 2,
                         dilations=[dil] * 2, pads=list(pads), group=group),
    ]
    last = "y"
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["r"]))
        last = "r"
    nodes += [helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"])]
    oh = (h + pads[0] + pads[2] - (ksz - 1) * dil - 1) // stride + 1
    ow = (w + pads[1] + pads[3] - (ksz - 1) * dil - 1) // stride + 1
    m = make_model(nodes, [("x", [batch, c, h, w])], [("out", [batch, k, oh, ow])], inits,
                   opset=13)
    return m, float(sy)


def compare(m, step, tmp, **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "art"
    report = compile_to(m, out, **kw)
    sess, ort = Session(out), OrtSession(m)
    rng = np.random.default_rng(7)
    shape = sess.input_specs[0]["shape"]
    for _ in range(2):
        x = (rng.standard_normal(shape) * 1.5).astype(np.float32)
        ref = ort.run(None, {"x": x})[0]
        got = sess.run(None, {"x": x})[0]
        diff = np.abs(got - ref)
        assert diff.max() <= step * 1.001 + 1e-6, diff.max()
        # ties are rare: nearly every value is identical (one of a small output may differ:
        # 1 of 72 was 1.4 %)
        assert np.sum(diff > 1e-6) <= max(1, 0.01 * diff.size), np.sum(diff > 1e-6)
    return report["kernels"]


def int8_convs(kern, isa, px=None) -> int:
    """How many functions got an integer convolution kernel for ``isa`` (channels in the
    lanes, pixels in the lanes (px=True), or either)."""
    kinds = {None: ("conv2d-int8-", "conv2d-int8px-"), False: ("conv2d-int8-",),
             True: ("conv2d-int8px-",)}[px]
    return sum(kern["counts"].get(k + isa, 0) for k in kinds)


@SETTINGS
@given(batch=st.sampled_from([1, 2]), c=st.integers(1, 21), k=st.integers(1, 40),
       ksz=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2), dil=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 2)] * 4), h=st.integers(5, 16), w=st.integers(5, 30),
       act=st.sampled_from(["uint8", "int8"]), relu=st.booleans())
def test_int8_conv_host(tmp_path_factory, batch, c, k, ksz, stride, dil, pads, h, w, act, relu):
    ext = (ksz - 1) * dil + 1
    if h + pads[0] + pads[2] < ext or w + pads[1] + pads[3] < ext:
        return
    rng = np.random.default_rng(c * 31 + k)
    m, step = qdq_conv(rng, batch, c, k, ksz, stride, dil, pads, h, w, act=act, relu=relu)
    kern = compare(m, step, tmp_path_factory.mktemp("i8"))
    isa = kern["int8"]["isa"]
    assert kern["int8"]["conv2d"] == 1 and not kern["int8"]["float"], kern["int8"]
    assert kern["int8"]["requant_fused"] == 1, kern["int8"]  # bias, ReLU, quantize folded
    assert int8_convs(kern, isa) == 1, kern
    assert kern["unscheduled"] == {}


# each ISA's kernel, forced through -mcpu; run where this host has the instructions
ISA_CPUS = [("avx512vnni", "icelake-server", ("avx512vnni",)),
            ("avxvnni", "alderlake", ("avxvnni",)),
            ("avx512bw", "skylake-avx512", ("avx512bw",)),
            ("avx2", "haswell", ("avx2",)),
            ("generic", "x86-64", ())]


@pytest.mark.parametrize("isa,mcpu,needs", ISA_CPUS, ids=[i[0] for i in ISA_CPUS])
@pytest.mark.parametrize("case", [(1, 13, 24, 3, 1, 1, (1, 1, 1, 1), 11, 19, "uint8"),
                                  (2, 8, 33, 3, 2, 1, (0, 1, 2, 0), 12, 15, "int8"),
                                  (1, 64, 16, 1, 1, 1, (0, 0, 0, 0), 7, 7, "uint8"),
                                  (2, 13, 40, 1, 1, 1, (0, 0, 0, 0), 5, 28, "int8"),
                                  (1, 24, 20, 1, 1, 1, (0, 0, 0, 0), 8, 12, "uint8")],
                         ids=["3x3", "strided-asym-int8", "1x1-7x7", "1x1-pixels", "1x1-flat"])
def test_int8_conv_each_isa(tmp_path, isa, mcpu, needs, case):
    if needs and not host_has(*needs):
        pytest.skip(f"this CPU lacks {needs}")
    batch, c, k, ksz, stride, dil, pads, h, w, act = case
    m, step = qdq_conv(np.random.default_rng(1), batch, c, k, ksz, stride, dil, pads, h, w,
                       act=act)
    kern = compare(m, step, tmp_path, target_options={"mcpu": mcpu})
    assert kern["int8"]["isa"] == isa
    # 1x1 stride 1 whose pixels fill whole vectors (one flat row) or whose rows pad to
    # whole vectors wasting at most 1/4: pixels in the lanes
    px = px_applies(ISAS[isa], (batch, c, h, w), (k, c, ksz, ksz), (stride,) * 2, pads,
                    (dil,) * 2)
    assert px == (ksz == 1 and (h * w % ISAS[isa].lanes == 0 or
                                4 * (-w % ISAS[isa].lanes) <= w + (-w % ISAS[isa].lanes)))
    assert int8_convs(kern, isa, px=px) == 1, kern
    assert kern["unscheduled"] == {}


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_reads_8bit_input(tmp_path, stride):
    m, step = qdq_conv(np.random.default_rng(2), 1, 24, 24, 3, stride, 1, (1, 1, 1, 1), 14, 17,
                       group=24)
    kern = compare(m, step, tmp_path)
    assert kern["int8"]["dwconv2d"] == 1 and kern["int8"]["conv2d"] == 0
    assert kern["int8"]["requant_fused"] == 1
    assert kern["counts"].get("dwconv2d") == 1 and kern["unscheduled"] == {}


def test_left_float_with_reason(tmp_path):
    """A grouped conv and a weight zero point other than 0 keep the float path, with the
    reason in the report, and are still right."""
    m, step = qdq_conv(np.random.default_rng(3), 1, 8, 8, 3, 1, 1, (1, 1, 1, 1), 9, 9, group=2)
    kern = compare(m, step, tmp_path / "g")
    assert kern["int8"]["float"] == {"grouped convolution": 1}
    m, step = qdq_conv(np.random.default_rng(3), 1, 8, 8, 3, 1, 1, (1, 1, 1, 1), 9, 9,
                       w_zero_point=1)
    kern = compare(m, step, tmp_path / "z")
    assert kern["int8"]["float"] == {"weight zero point not 0": 1}


@pytest.mark.parametrize("target,isa", [("rpi5", "dotprod"), ("rpi4", "generic"),
                                        pytest.param("arm64", "generic",
                                                     marks=pytest.mark.slow)])
def test_int8_kernels_build_for_aarch64(tmp_path, target, isa):
    m, _ = qdq_conv(np.random.default_rng(4), 1, 16, 32, 3, 1, 1, (1, 1, 1, 1), 10, 10)
    report = compile_to(m, tmp_path / "a", target=target)
    kern = report["kernels"]
    assert kern["int8"]["isa"] == isa
    assert kern["counts"].get(f"conv2d-int8-{isa}") == 1 and kern["unscheduled"] == {}
    # the pixel-lane 1x1 kernel and the integer matmul build too
    m, _ = qdq_conv(np.random.default_rng(4), 1, 16, 32, 1, 1, 1, (0, 0, 0, 0), 6, 16)
    kern = compile_to(m, tmp_path / "px", target=target)["kernels"]
    assert kern["counts"].get(f"conv2d-int8px-{isa}") == 1 and kern["unscheduled"] == {}
    m, _ = qdq_matmul(np.random.default_rng(4), 2, 40, 24)
    kern = compile_to(m, tmp_path / "mm", target=target)["kernels"]
    assert kern["int8"]["matmul"] == 1 and kern["unscheduled"] == {}


def test_pack_weight_layout_and_isa_choice():
    from edgec.targets import get_target
    from edgec.targets.backend import make_target
    from edgec.targets.cpu.isa import ISAS, select_isa
    from edgec.targets.cpu.kernels.int8_conv import pack_weight

    w = np.random.default_rng(0).integers(-127, 128, (20, 6, 3, 2)).astype(np.int8)
    isa = ISAS["avx512vnni"]
    p = pack_weight(w, isa)
    assert p.shape == (2, 2, 3, 2, 16, 4) and p.dtype == np.int8
    for o, c, y, x in [(0, 0, 0, 0), (19, 5, 2, 1), (17, 4, 1, 0), (3, 2, 0, 1)]:
        assert p[o // 16, c // 4, y, x, o % 16, c % 4] == w[o, c, y, x]
    assert not p[1, :, :, :, 4:].any() and not p[:, 1, :, :, :, 2:].any()  # zero padding
    assert pack_weight(w, ISAS["avx2"]).dtype == np.int16

    def isa_of(target, **opt):
        return select_isa(make_target(get_target(target), opt)).name

    assert isa_of("x86", mcpu="haswell") == "avx2"
    assert isa_of("x86", mcpu="icelake-server") == "avx512vnni"
    assert isa_of("rpi5") == "dotprod" and isa_of("rpi4") == "generic"


def test_quantize_pass_model_through_int8_kernels(tmp_path):
    """The quantize pass's own output (tiny ResNet: residual Add, depthwise and grouped
    convs) runs on the integer kernels and matches onnxruntime on the same QDQ model."""
    from edgec.models import zoo
    from edgec.driver.pipeline import NORMALIZE, Pipeline

    m = Pipeline(NORMALIZE).run(zoo.build("tiny_resnet", batch=1)).model
    x = np.random.default_rng(0).standard_normal((16, 8, 17, 17)).astype(np.float32)
    q = Pipeline(["quantize"], {"quantize": {"progress": "false"}}, calib={"input": x}).run(m)
    report = compile_to(q.model, tmp_path / "q")
    kern = report["kernels"]
    assert kern["int8"]["conv2d"] >= 4 and kern["unscheduled"] == {}
    sess, ort = Session(tmp_path / "q"), OrtSession(q.model)
    for i in range(4):
        ref = ort.run(None, {"input": x[i:i + 1]})[0]
        got = sess.run(None, {"input": x[i:i + 1]})[0]
        assert ref.argmax() == got.argmax()
        np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_maxpool_on_8bit_tensor(tmp_path):
    """q(maxpool(dq(Xq))) with one shared scale becomes a maxpool of the uint8 tensor (exact:
    max commutes with the increasing dequantize map); the model still matches onnxruntime.
    The nodes are unnamed, as in many exported models: the pipeline names a copy (the
    quantize pass used to emit one weight DequantizeLinear twice)."""
    rng = np.random.default_rng(6)
    inits = {"W1": (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32),
             "W2": (rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "W2"], ["y"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("x", [1, 3, 20, 20])], [("y", [1, 8, 10, 10])], inits, opset=13)
    from edgec.driver.pipeline import Pipeline

    calib = {"x": rng.standard_normal((16, 3, 20, 20)).astype(np.float32)}
    q = Pipeline(["quantize"], {"quantize": {"progress": "false"}}, calib=calib).run(m).model
    assert [n.name for n in m.graph.node] == [""] * 4  # the input is left alone
    report = compile_to(q, tmp_path / "mp")
    assert report["kernels"]["int8"].get("maxpool") == 1, report["kernels"]["int8"]
    sess, ort = Session(tmp_path / "mp"), OrtSession(q)
    x = calib["x"][:1]
    ref, got = ort.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def qdq_matmul(rng, m_rows, k, n, op="Gemm", act="uint8", bias=True):
    """x -> Q/DQ -> Gemm(transB=1: W[N, K], scales on axis 0) or MatMul (W[K, N], axis 1)
    with DQ(int8 W per output column) [+ DQ(int32 bias)] -> Q/DQ."""
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    sw = rng.uniform(0.002, 0.02, n).astype(np.float32)
    sx = np.array(0.05, np.float32)
    zx = np.array(128 if act == "uint8" else -5, np.uint8 if act == "uint8" else np.int8)
    bq = rng.integers(-3000, 3000, n).astype(np.int32)
    inits = {"sx": sx, "zx": zx, "sw": sw, "zw": np.zeros(n, np.int8),
             "wq": wq if op == "Gemm" else np.ascontiguousarray(wq.T),
             "bq": bq, "sb": (sx * sw).astype(np.float32), "zb": np.zeros(n, np.int32),
             "sy": np.array(0.5, np.float32), "zy": np.array(128, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"],
                              axis=0 if op == "Gemm" else 1),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], axis=0)]
    if op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "wd"] + (["bd"] if bias else []), ["y"],
                                      transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["mm"]))
        nodes.append(helper.make_node("Add", ["mm", "bd"], ["y"]) if bias else
                     helper.make_node("Identity", ["mm"], ["y"]))
    nodes += [helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"])]
    return make_model(nodes, [("x", [m_rows, k])], [("out", [m_rows, n])], inits,
                      opset=13), 0.5


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("m_rows,k,n,act", [(1, 1280, 1000, "uint8"), (3, 37, 21, "int8"),
                                            (17, 64, 16, "uint8"), (40, 10, 3, "int8")])
def test_int8_matmul(tmp_path, op, m_rows, k, n, act):
    """QDQ Gemm/MatMul -> integer matmul (batch rows as the tile's columns): within one
    output step of onnxruntime on the same QDQ model, for odd K, N and row counts."""
    m, step = qdq_matmul(np.random.default_rng(k + n), m_rows, k, n, op=op, act=act,
                         bias=m_rows != 40)
    kern = compare(m, step, tmp_path)
    isa = kern["int8"]["isa"]
    assert kern["int8"]["matmul"] == 1 and not kern["int8"]["float"], kern["int8"]
    assert kern["int8"]["requant_fused"] == 1
    assert int8_convs(kern, isa, px=False) == 1, kern
    assert kern["unscheduled"] == {}


@pytest.mark.parametrize("isa,mcpu,needs", ISA_CPUS, ids=[i[0] for i in ISA_CPUS])
def test_int8_matmul_each_isa(tmp_path, isa, mcpu, needs):
    if needs and not host_has(*needs):
        pytest.skip(f"this CPU lacks {needs}")
    m, step = qdq_matmul(np.random.default_rng(3), 5, 70, 33, act="int8")
    kern = compare(m, step, tmp_path, target_options={"mcpu": mcpu})
    assert kern["int8"]["isa"] == isa and kern["int8"]["matmul"] == 1
    assert int8_convs(kern, isa, px=False) == 1, kern


@pytest.mark.parametrize("kind", ["clip", "shared", "clip-then-add"])
def test_requant_fold_clip_and_its_limits(tmp_path, kind):
    """conv -> bias -> Clip(0, 6) -> quantize folds into one requantizing kernel; a conv
    output that another node also reads, or an Add after the Clip, is left unfolded (the
    float epilogue) -- all three within one step of onnxruntime."""
    rng = np.random.default_rng(11)
    m, step = qdq_conv(rng, 1, 8, 24, 1, 1, 1, (0, 0, 0, 0), 6, 16, relu=False)
    g = m.graph
    for init, val in (("lo", 0.0), ("hi", 6.0), ("one", 0.25)):
        g.initializer.append(onnx.numpy_helper.from_array(np.array(val, np.float32), init))
    qi = next(i for i, n in enumerate(g.node) if n.op_type == "QuantizeLinear"
              and n.input[0] == "y")
    g.node.insert(qi, helper.make_node("Clip", ["y", "lo", "hi"], ["r6"]))
    g.node[qi + 1].input[0] = "r6"
    if kind == "clip-then-add":
        g.node.insert(qi + 1, helper.make_node("Add", ["r6", "one"], ["r7"]))
        g.node[qi + 2].input[0] = "r7"
    if kind == "shared":  # the conv output is also a graph output
        g.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                      [1, 24, 6, 16]))
    onnx.checker.check_model(m)
    kern = compare(m, step, tmp_path)
    assert kern["int8"]["conv2d"] == 1
    assert kern["int8"]["requant_fused"] == (1 if kind == "clip" else 0), kern["int8"]


@pytest.mark.parametrize("ksz,h,w,relu,shared", [(1, 8, 16, False, False), (1, 6, 10, True, False),
                                                  (3, 7, 9, True, False), (3, 7, 9, False, True)],
                         ids=["1x1-flat", "1x1-rows-relu", "3x3-relu", "shared"])
def test_residual_add_fold(tmp_path, ksz, h, w, relu, shared):
    """q(dq(conv_q) + dq(xq)) [-> Relu] -> q becomes the kernel's second epilogue (as
    onnxruntime's QLinearAdd: both roundings kept), within one step of onnxruntime; not when
    the conv's 8-bit output has another reader."""
    rng = np.random.default_rng(5)
    c = 16
    m, _ = qdq_conv(rng, 1, c, c, ksz, 1, 1, (ksz // 2,) * 4, h, w, relu=False)
    g = m.graph
    sa = 0.09
    for name, val in (("sa", np.array(sa, np.float32)), ("za", np.array(100, np.uint8))):
        g.initializer.append(onnx.numpy_helper.from_array(val, name))
    g.node.remove(next(n for n in g.node if n.output[0] == "out"))
    g.node.extend([helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["yd"]),
                   helper.make_node("Add", ["yd", "xd"], ["s"])])
    last = "s"
    if relu:
        g.node.append(helper.make_node("Relu", ["s"], ["sr"]))
        last = "sr"
    g.node.extend([helper.make_node("QuantizeLinear", [last, "sa", "za"], ["aq"]),
                   helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["out"])])
    if shared:
        g.output.append(helper.make_tensor_value_info("yd", onnx.TensorProto.FLOAT,
                                                      [1, c, h, w]))
    onnx.checker.check_model(m)
    kern = compare(m, sa, tmp_path)
    assert kern["int8"]["requant_fused"] == 1
    assert kern["int8"]["residual_fused"] == (0 if shared else 1), kern["int8"]
    assert kern["unscheduled"] == {}


# ------------------------------------------------------------------ exact, on every host
def exact_qdq_matmul(x, m):
    """numpy's exact QDQ arithmetic of :func:`qdq_matmul`'s Gemm model (integer sums in
    int64, round half to even): the reference that does not depend on any CPU."""
    i = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    sx, zx = float(i["sx"]), int(i["zx"])
    lo, hi = (0, 255) if i["zx"].dtype == np.uint8 else (-128, 127)
    xq = np.clip(np.round(x.astype(np.float64) / sx) + zx, lo, hi).astype(np.int64)
    acc = (xq - zx) @ i["wq"].astype(np.int64).T
    y = acc * (sx * i["sw"].astype(np.float64)) + i["bq"] * i["sb"].astype(np.float64)
    sy, zy = float(i["sy"]), int(i["zy"])
    return (np.clip(np.round(y / sy) + zy, 0, 255) - zy) * sy


def pair_sums_saturating(xq_u8: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """What ``vpmaddubsw`` + ``vpmaddwd(1)`` compute for u8 x s8 dot products: adjacent
    products summed in saturating int16 pairs, then added in int32."""
    p = xq_u8.astype(np.int64)[None, :] * wq.astype(np.int64)        # [N, K]
    p = np.pad(p, ((0, 0), (0, p.shape[1] % 2)))
    pairs = np.clip(p[:, 0::2] + p[:, 1::2], -32768, 32767)
    return pairs.sum(1)


def test_7bit_weights_are_what_keeps_u8_s8_pair_sums_exact():
    """The arithmetic behind ``quantize weight_bits=7`` and the ``-s7`` kernels: with
    full-range 8-bit weights and high activations the 16-bit pair sums saturate; with weights
    in [-64, 64] (:attr:`DotISA.max_weight`) they never do."""
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, 1280).astype(np.uint8)
    w8 = rng.choice([-127, 127], (64, 1280)).astype(np.int8)
    exact8 = w8.astype(np.int64) @ x.astype(np.int64)
    assert np.any(pair_sums_saturating(x, w8) != exact8)
    w7 = rng.choice([-64, 64], (64, 1280)).astype(np.int8)
    w7[0, :2] = 64  # the worst pair: 255 * 128 = 32640 <= 32767
    x[:2] = 255
    np.testing.assert_array_equal(pair_sums_saturating(x, w7), w7.astype(np.int64) @ x)
    assert ISAS["avx2-s7"].max_weight == ISAS["avx512bw-s7"].max_weight == 64
    assert 255 * 2 * ISAS["avx2-s7"].max_weight <= 32767


@pytest.mark.parametrize("isa,mcpu,needs", ISA_CPUS, ids=[i[0] for i in ISA_CPUS])
def test_saturation_case_exact_on_each_isa(tmp_path, isa, mcpu, needs):
    """Large K, full-range weights, activations near the top of uint8 (where onnxruntime's
    fused kernels on AVX2 hosts were 39 output steps off): every ISA's compiled kernel gives
    numpy's exact answer within one output step."""
    if needs and not host_has(*needs):
        pytest.skip(f"this CPU lacks {needs}")
    rng = np.random.default_rng(12)
    m, step = qdq_matmul(rng, 2, 1280, 96)
    for t in m.graph.initializer:
        if t.name == "wq":  # full range, both signs in every pair
            t.CopyFrom(onnx.numpy_helper.from_array(
                rng.choice([-127, -120, 120, 127], (96, 1280)).astype(np.int8), "wq"))
        if t.name == "sw":  # (and the bias scale with it: s_x * s_w, as QDQ requires)
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(96, 2e-5, np.float32), "sw"))
        if t.name == "sb":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(96, 1e-6, np.float32), "sb"))
    out = tmp_path / "sat"
    kern = compile_to(m, out, target_options={"mcpu": mcpu})["kernels"]
    assert kern["int8"]["isa"] == isa and "weights_7bit" not in kern["int8"]
    x = rng.uniform(3.0, 6.35, (2, 1280)).astype(np.float32)  # u8 values 188..255
    got = Session(out).run(None, {"x": x})[0]
    ref = exact_qdq_matmul(x, m)
    assert np.abs(got - ref).max() <= step * 1.001, np.abs(got - ref).max() / step
    assert np.abs(OrtSession(m).run(None, {"x": x})[0] - ref).max() <= step * 1.001


S7_CPUS = [("avx2", "haswell"), ("avx512bw", "skylake-avx512")]


@pytest.mark.parametrize("isa,mcpu", S7_CPUS, ids=[i[0] for i in S7_CPUS])
@pytest.mark.parametrize("case", [(1, 13, 24, 3, 1, 1, (1, 1, 1, 1), 11, 19, "uint8"),
                                  (2, 8, 33, 3, 2, 1, (0, 1, 2, 0), 12, 15, "int8"),
                                  (1, 24, 20, 1, 1, 1, (0, 0, 0, 0), 8, 12, "uint8"),
                                  "matmul"],
                         ids=["3x3", "strided-asym-int8", "1x1-px", "matmul"])
def test_7bit_weights_take_the_s7_form(tmp_path, isa, mcpu, case):
    """Weights within [-64, 64] (what ``quantize weight_bits=7`` writes, extremes included)
    take the u8 x s7 ``vpmaddubsw`` form on AVX2 / AVX-512BW, exact within one step; one
    weight of 65 keeps the s16 form; VNNI keeps ``vpdpbusd``."""
    if isa == "avx512bw" and not host_has("avx512bw"):
        pytest.skip("this CPU lacks avx512bw")
    rng = np.random.default_rng(3)
    if case == "matmul":
        m, step = qdq_matmul(rng, 5, 70, 33, act="int8")
    else:
        batch, c, k, ksz, stride, dil, pads, h, w, act = case
        m, step = qdq_conv(rng, batch, c, k, ksz, stride, dil, pads, h, w, act=act)
    wt = next(t for t in m.graph.initializer if t.name == "wq")
    w7 = np.clip(onnx.numpy_helper.to_array(wt) // 2, -64, 64).astype(np.int8)
    w7.flat[0], w7.flat[1], w7.flat[-1] = 64, 64, -64
    wt.CopyFrom(onnx.numpy_helper.from_array(w7, "wq"))
    kern = compare(m, step, tmp_path / "s7", target_options={"mcpu": mcpu})
    assert kern["int8"]["isa"] == isa and kern["int8"]["weights_7bit"] == 1
    px = "px" if case != "matmul" and case[3] == 1 else ""
    assert kern["counts"].get(f"conv2d-int8{px}-{isa}-s7") == 1, kern["counts"]
    w7.flat[2] = 65
    wt.CopyFrom(onnx.numpy_helper.from_array(w7, "wq"))
    kern = compare(m, step, tmp_path / "s16", target_options={"mcpu": mcpu})
    assert "weights_7bit" not in kern["int8"]
    assert kern["counts"].get(f"conv2d-int8{px}-{isa}") == 1, kern["counts"]
    if host_has("avx512vnni"):
        w7.flat[2] = 64
        wt.CopyFrom(onnx.numpy_helper.from_array(w7, "wq"))
        kern = compare(m, step, tmp_path / "vnni", target_options={"mcpu": "icelake-server"})
        assert kern["int8"]["isa"] == "avx512vnni" and "weights_7bit" not in kern["int8"]


def test_reference_is_exact_qdq_on_every_host():
    """A QDQ model runs in onnxruntime with graph optimizations off (exact QDQ arithmetic,
    no fused int8 kernels); a float model keeps them."""
    from edgec.runtime import has_qdq

    m, _ = qdq_matmul(np.random.default_rng(0), 2, 16, 8)
    assert has_qdq(m) and not OrtSession(m).optimized and OrtSession(m, optimize=True).optimized
    f = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    assert not has_qdq(f) and OrtSession(f).optimized


# ------------------------------------------------------------- integer Winograd F(2, 3)
WINO_CPUS = [("avx2", "haswell"), ("avx512bw", "skylake-avx512")]


@pytest.mark.parametrize("isa,mcpu", WINO_CPUS, ids=[i[0] for i in WINO_CPUS])
@pytest.mark.parametrize("case", [(1, 64, 64, 28, 28, (1, 1, 1, 1), "uint8", True),
                                  (2, 61, 56, 19, 30, (0, 1, 2, 0), "int8", False)],
                         ids=["64@28", "odd-asym-batch2"])
def test_int8_winograd_exact(tmp_path, isa, mcpu, case):
    """3x3 QDQ convolutions on x86 without VNNI take the integer Winograd F(2, 3) kernel
    (exact integer arithmetic: within one output step of exact QDQ, as the direct kernel),
    odd channel counts, asymmetric padding, int8 input and a batch included."""
    if isa == "avx512bw" and not host_has("avx512bw"):
        pytest.skip("this CPU lacks avx512bw")
    batch, c, k, h, w, pads, act, relu = case
    m, step = qdq_conv(np.random.default_rng(c + k), batch, c, k, 3, 1, 1, pads, h, w, act=act,
                       relu=relu)
    kern = compare(m, step, tmp_path, target_options={"mcpu": mcpu})
    assert kern["int8"]["winograd"] == 1 and kern["int8"]["requant_fused"] == 1, kern["int8"]
    assert kern["counts"].get(f"conv2d-int8wino-{isa}") == 1 and kern["unscheduled"] == {}


def test_int8_winograd_transform_is_exact():
    """U = (2G) g (2G)^T and V = B^T d B are integers, and A^T (U . V) A is 4x the direct
    3x3 correlation of every 2x2 output tile, to the integer."""
    from edgec.targets.cpu.kernels.int8_winograd import transform_weight_int8
    from edgec.targets.cpu.kernels.winograd import matrices

    rng = np.random.default_rng(0)
    g = rng.integers(-127, 128, (3, 3, 3, 3)).astype(np.int8)      # k=3, c=3
    d = rng.integers(-255, 256, (3, 4, 4)).astype(np.int64)        # c, 4x4 input tile
    u = transform_weight_int8(g, 8)                                  # [16, 1, 2, 8, 2]
    assert u.dtype == np.int16 and u.shape == (16, 1, 2, 8, 2)
    bt, _, at = (np.rint(x).astype(np.int64) for x in matrices(2))
    v = np.einsum("ei,cij,fj->efc", bt, d, bt).reshape(16, 3)
    uu = u.transpose(0, 1, 3, 2, 4).reshape(16, 8, 4)[:, :3, :3].astype(np.int64)  # [e,k,c]
    mm = np.einsum("ekc,ec->ek", uu, v).reshape(4, 4, 3)
    y4 = np.einsum("ie,efk,jf->kij", at, mm, at)
    direct = np.array([[[np.sum(d[:, i:i + 3, j:j + 3] * g[k]) for j in range(2)]
                        for i in range(2)] for k in range(3)])
    np.testing.assert_array_equal(y4, 4 * direct)


def test_int8_winograd_where_it_applies():
    from edgec.targets.cpu.kernels.int8_winograd import wino8_applies

    avx2 = ISAS["avx2"]

    def ok(c, k, hw, isa=avx2, s7=False, stride=1):
        return wino8_applies(isa, (1, c, hw, hw), (k, c, 3, 3), (stride,) * 2, (1,) * 4,
                             (1, 1), weights_7bit=s7)

    assert ok(64, 64, 56) and ok(128, 128, 28) and ok(256, 256, 14)
    assert ok(128, 128, 28, s7=True) and not ok(64, 64, 56, s7=True)  # s7 wins on big maps
    assert not ok(512, 512, 7) and not ok(8, 64, 56) and not ok(64, 64, 56, stride=2)
    assert not ok(64, 64, 56, isa=ISAS["avx512vnni"]) and not ok(64, 64, 56, isa=ISAS["dotprod"])
    assert ok(64, 64, 56, isa=ISAS["avx512bw"])


def test_int8_winograd_residual_fold_and_chunks(tmp_path):
    """The residual Add folds into the Winograd kernel's epilogue as into the direct one's; a
    map whose transformed tiles exceed the chunk budget (64 channels at 112x112) runs in
    chunks of tile rows; both within one step of exact QDQ."""
    rng = np.random.default_rng(5)
    c = 64
    m, _ = qdq_conv(rng, 1, c, c, 3, 1, 1, (1,) * 4, 28, 28, relu=False)
    g = m.graph
    for name, val in (("sa", np.array(0.09, np.float32)), ("za", np.array(100, np.uint8))):
        g.initializer.append(onnx.numpy_helper.from_array(val, name))
    g.node.remove(next(n for n in g.node if n.output[0] == "out"))
    g.node.extend([helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["yd"]),
                   helper.make_node("Add", ["yd", "xd"], ["s"]),
                   helper.make_node("QuantizeLinear", ["s", "sa", "za"], ["aq"]),
                   helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["out"])])
    kern = compare(m, 0.09, tmp_path / "res", target_options={"mcpu": "haswell"})
    assert kern["int8"]["winograd"] == 1 and kern["int8"]["residual_fused"] == 1
    m, step = qdq_conv(np.random.default_rng(6), 1, c, c, 3, 1, 1, (1,) * 4, 112, 112)
    kern = compare(m, step, tmp_path / "big", target_options={"mcpu": "haswell"})
    assert kern["int8"]["winograd"] == 1 and kern["unscheduled"] == {}


_ORT_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.log_severity_level = 3
x = np.load(sys.argv[1])["x"]
for path in sys.argv[2:]:
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    np.save(path + ".out.npy", s.run(None, {"x": x})[0])
"""


@pytest.mark.slow
def test_onnxruntime_on_an_avx2_cpu_is_exact_with_7bit_weights_only(tmp_path):
    """onnxruntime's optimized run on an AVX2 CPU without VNNI (emulated: qemu user mode with
    a Haswell CPUID, so its kernels take the vpmaddubsw path) of the saturating QDQ MatMul:
    8-bit weights are off by many output steps, the same layer with 7-bit weights is exact."""
    import shutil
    import subprocess
    import sys

    qemu = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user-static)")
    rng = np.random.default_rng(12)
    m8, step = qdq_matmul(rng, 1, 1280, 1000)
    wt = next(t for t in m8.graph.initializer if t.name == "wq")
    w8 = rng.choice([-127, -120, 120, 127], (1000, 1280)).astype(np.int8)
    wt.CopyFrom(onnx.numpy_helper.from_array(w8, "wq"))
    m7 = onnx.ModelProto()
    m7.CopyFrom(m8)
    wt = next(t for t in m7.graph.initializer if t.name == "wq")
    wt.CopyFrom(onnx.numpy_helper.from_array((w8 // 2).astype(np.int8), "wq"))
    for t in list(m8.graph.initializer) + list(m7.graph.initializer):
        if t.name == "sw":  # (and the bias scale with it: s_x * s_w, as QDQ requires)
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(1000, 1e-4, np.float32), "sw"))
        if t.name == "sb":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(1000, 5e-6, np.float32), "sb"))
    x = rng.uniform(3.0, 6.35, (1, 1280)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    paths = [str(tmp_path / "m8.onnx"), str(tmp_path / "m7.onnx")]
    onnx.save(m8, paths[0])
    onnx.save(m7, paths[1])
    (tmp_path / "run.py").write_text(_ORT_SCRIPT)
    subprocess.run([qemu, "-cpu", "Haswell-v4", sys.executable, str(tmp_path / "run.py"),
                    str(tmp_path / "x.npz"), *paths], check=True, capture_output=True,
                   timeout=1200)
    off8 = np.abs(np.load(paths[0] + ".out.npy") - exact_qdq_matmul(x, m8)).max() / step
    off7 = np.abs(np.load(paths[1] + ".out.npy") - exact_qdq_matmul(x, m7)).max() / step
    assert off8 > 3 and off7 <= 1.001, (off8, off7)


@pytest.mark.parametrize("residual", [False, True])
def test_same_shape_layers_keep_their_own_scales(tmp_path, residual):
    """Two QDQ convolutions of one shape share one TVM function (the builder deduplicates
    structurally equal PrimFuncs); each must keep its own weights' scales, bias and
    requantization in the folds (the second took the first's: ResNet-18 int8 was 0.85
    relative off)."""
    rng = np.random.default_rng(11)
    c, hw = 16, 10
    inits, nodes, x = {"s0": np.float32(0.02), "z0": np.array(128, np.uint8)}, [], "x"
    nodes += [helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "s0", "z0"], ["x0"])]
    x, sx = "x0", np.float32(0.02)
    for i in range(3):
        sw = (rng.uniform(0.5, 2.0, c) * 0.01 * (i + 1)).astype(np.float32)
        sy = np.float32(0.03 * (i + 1))
        inits.update({f"wq{i}": rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8),
                      f"sw{i}": sw, f"zw{i}": np.zeros(c, np.int8),
                      f"bq{i}": rng.integers(-3000, 3000, c).astype(np.int32),
                      f"sb{i}": (sx * sw).astype(np.float32), f"zb{i}": np.zeros(c, np.int32),
                      f"sy{i}": sy, f"zy{i}": np.array(0, np.uint8)})
        nodes += [
            helper.make_node("DequantizeLinear", [f"wq{i}", f"sw{i}", f"zw{i}"], [f"w{i}"],
                             axis=0),
            helper.make_node("DequantizeLinear", [f"bq{i}", f"sb{i}", f"zb{i}"], [f"b{i}"],
                             axis=0),
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1])]
        y = f"c{i}"
        if residual and i > 0:
            nodes.append(helper.make_node("Add", [y, x], [f"a{i}"]))
            y = f"a{i}"
        nodes += [helper.make_node("Relu", [y], [f"r{i}"]),
                  helper.make_node("QuantizeLinear", [f"r{i}", f"sy{i}", f"zy{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"sy{i}", f"zy{i}"],
                                   [f"d{i}"])]
        x, sx = f"d{i}", sy
    m = make_model(nodes, [("x", [1, c, hw, hw])], [(x, [1, c, hw, hw])], inits, opset=13)
    step = float(sx)
    kern = compare(m, step, tmp_path)
    assert sum(v for k, v in kern["counts"].items() if "int8" in k) >= 1, kern
