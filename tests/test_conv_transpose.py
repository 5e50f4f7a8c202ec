"""ConvTranspose through the phase decomposition (targets/cpu/rewrites/conv_transpose.py)
against onnxruntime: every case also checks the report -- the layer got a conv kernel
(packed / pixel / Winograd / depthwise row), no ``reduce`` schedule of TOPI's dilated-input
loop, no function left unscheduled. Tolerance: max abs error <= 1e-4 * max |ref|.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper

from conftest import compile_to, make_model
from edgec.runtime import OrtSession, Session
from edgec.targets.cpu.rewrites.conv_transpose import phase_weight

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
CONV_KINDS = ("gconv2d", "conv2d-packed", "conv2d-stem", "conv2d-px", "conv2d-winograd-f4",
              "conv2d-winograd-f2",
              "dwconv2d",
              # the phase weights of a kernel the stride does not divide hold zeros (16 taps
              # for 9 with 3x3 s2): below the break-even density they take the sparse kernel
              "sparse-px(B=1)", "sparse-px(B=2)", "sparse-px(B=4)", "sparse-px(B=8)",
              "sparse-px(B=16)")
ISAS = {"avx2": "haswell", "avx512": "skylake-avx512"}


def convt_model(n, ci, co, h, w, k, s, pads=(0, 0, 0, 0), op=(0, 0), group=1, bias=True,
                dil=(1, 1), relu=False, seed=0):
    rng = np.random.default_rng(seed)
    inits = {"W": rng.standard_normal((ci, co // group, *k)).astype(np.float32)}
    ins = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(co).astype(np.float32)
        ins.append("B")
    nodes = [helper.make_node("ConvTranspose", ins, ["y"], kernel_shape=list(k),
                              strides=list(s), pads=list(pads), output_padding=list(op),
                              group=group, dilations=list(dil))]
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    oh = (h - 1) * s[0] + (k[0] - 1) * dil[0] + 1 + op[0] - pads[0] - pads[2]
    ow = (w - 1) * s[1] + (k[1] - 1) * dil[1] + 1 + op[1] - pads[1] - pads[3]
    return make_model(nodes, [("x", [n, ci, h, w])], [("z" if relu else "y", [n, co, oh, ow])],
                      inits)


def check(model, out, target="x86", mcpu=None, run=True):
    """Compile (and on x86 run) ``model``; the report's kernels."""
    opts = {"mcpu": mcpu} if mcpu else {}
    report = compile_to(model, out, target=target, target_options=opts)
    kernels = report["kernels"]
    assert kernels["unscheduled"] == {}, kernels
    assert "reduce" not in kernels["counts"], kernels
    assert any(k in kernels["counts"] for k in CONV_KINDS), kernels
    if run:
        sess = Session(out)
        rng = np.random.default_rng(3)
        feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32)
                 for i in sess.input_specs}
        ref = OrtSession(model).run(None, feeds)[0]
        got = sess.run(None, feeds)[0]
        assert got.shape == ref.shape
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
        assert err <= 1e-4, err
    return kernels


def test_phase_weight_taps():
    """Phase (rh, rw) of the conv2d weight holds the taps j * s + r, flipped."""
    w = np.arange(2 * 3 * 5 * 3, dtype=np.float32).reshape(2, 3, 5, 3)
    g = phase_weight(w, (2, 3))  # Th = 3, Tw = 1
    assert g.shape == (3 * 6, 2, 3, 1)
    for co in range(3):
        for rh in range(2):
            for rw in range(3):
                for mh in range(3):
                    kh = (2 - mh) * 2 + rh
                    got = g[co * 6 + rh * 3 + rw, :, mh, 0]
                    want = w[:, co, kh, rw] if kh < 5 else np.zeros(2, np.float32)
                    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", list(ISAS))
def test_kernel_equals_stride(tmp_path, isa):
    """2x2 s2 with bias and ReLU (the detectors' upsampler): one conv with the bias in its
    epilogue, the depth-to-space and the ReLU in one function."""
    m = convt_model(1, 16, 12, 8, 16, (2, 2), (2, 2), relu=True)
    kernels = check(m, tmp_path / "k2", mcpu=ISAS[isa])
    fns = kernels["functions"]
    assert sum(v in CONV_KINDS for v in fns.values()) == 1, fns
    assert len(fns) == 2, fns  # conv (+ bias), depth-to-space (+ ReLU)


@pytest.mark.parametrize("isa", list(ISAS))
@given(data=st.data())
@SETTINGS
def test_convt_matches(tmp_path_factory, isa, data):
    d = data.draw
    s = (d(st.integers(1, 4)), d(st.integers(1, 4)))
    k = (d(st.integers(1, 5)), d(st.integers(1, 5)))
    pads = [d(st.integers(0, k[i % 2] - 1)) for i in range(4)]
    op = [d(st.integers(0, s[i] - 1)) for i in range(2)]
    h, w = d(st.integers(1, 6)), d(st.integers(1, 7))
    for i, n in enumerate((h, w)):  # a positive output size
        while (n - 1) * s[i] + k[i] + op[i] - pads[i] - pads[i + 2] < 1:
            pads[i] = max(pads[i] - 1, 0)
            pads[i + 2] = max(pads[i + 2] - 1, 0)
    m = convt_model(d(st.integers(1, 2)), d(st.sampled_from([1, 3, 5])),
                    d(st.sampled_from([1, 3, 7])), h, w, k, s, pads, op,
                    bias=d(st.booleans()), seed=d(st.integers(0, 9)))
    check(m, tmp_path_factory.mktemp("ct") / "a", mcpu=ISAS[isa])


@pytest.mark.parametrize("case", ["depthwise", "grouped", "dilated", "stride1", "bigpads"])
def test_special_cases(tmp_path, case):
    m = {"depthwise": lambda: convt_model(2, 6, 6, 5, 4, (4, 4), (2, 2), (1, 1, 1, 1),
                                          group=6, relu=True),
         "grouped": lambda: convt_model(1, 6, 4, 5, 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1),
                                        group=2),
         "dilated": lambda: convt_model(1, 3, 4, 5, 5, (3, 3), (2, 2), (1, 1, 1, 1), dil=(2, 2)),
         "stride1": lambda: convt_model(1, 4, 5, 6, 6, (3, 3), (1, 1), (1, 1, 1, 1), bias=False),
         "bigpads": lambda: convt_model(1, 3, 4, 6, 6, (2, 2), (1, 1), (3, 2, 2, 3)),
         }[case]()
    kernels = check(m, tmp_path / case)
    if case == "depthwise":
        assert "dwconv2d" in kernels["counts"], kernels


@pytest.mark.parametrize("mcpu", [None, "haswell"])
@pytest.mark.parametrize("group,cin,cout,k,s", [(12, 24, 12, 2, 2), (16, 32, 64, 2, 2),
                                                (4, 8, 8, 4, 3), (2, 8, 8, 2, 2)])
def test_many_groups_one_grouped_conv(tmp_path, mcpu, group, cin, cout, k, s):
    """Grouped (not depthwise): one grouped convolution of the groups' phases (the packed
    kernel where a group's outputs x phases are whole vectors, else the grouped row kernel)
    and the depth-to-space; before, more than 8 groups stayed on TOPI's loop. 1x1 phases in
    at most SLICED_GROUPS groups: a pixel-kernel conv per group, concatenated."""
    from edgec.targets.cpu.rewrites.conv_transpose import SLICED_GROUPS

    m = convt_model(1, cin, cout, 4, 5, (k, k), (s, s), group=group)
    kernels = check(m, tmp_path / f"g{group}", mcpu=mcpu)
    assert kernels["counts"].get("depth-to-space") == 1, kernels
    if group <= SLICED_GROUPS and k == s:
        assert len(kernels["functions"]) > 2, kernels  # the slices, their concatenation
    else:  # no per-group slices, no concatenation
        assert len(kernels["functions"]) == 2, kernels


def test_disabled_by_env(tmp_path, monkeypatch):
    """EDGEC_NO_CONVT_REWRITE=1 (benchmarks' old path): TOPI's loop, still correct."""
    monkeypatch.setenv("EDGEC_NO_CONVT_REWRITE", "1")
    m = convt_model(1, 4, 4, 3, 3, (2, 2), (2, 2))
    report = compile_to(m, tmp_path / "off")
    fns = report["kernels"]["functions"]
    assert list(fns) == ["fused_conv2d_transpose_add"], fns
    assert list(fns.values()) in (["reduce"], ["generic"]), fns  # TOPI's loop, no conv kernel


def qdq_convt_model(seed=0):
    """QDQ ConvTranspose as a quantizer writes it: uint8 activations, int8 weights with
    per-output-channel scales (axis 1 of IOHW), float bias, the output requantized."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    ci, co, k = 6, 5, 3
    w = rng.standard_normal((ci, co, k, k)).astype(np.float32)
    sw = (np.abs(w).max(axis=(0, 2, 3)) / 127).astype(np.float32)
    inits = {"Wq": np.clip(np.round(w / sw[None, :, None, None]), -127, 127).astype(np.int8),
             "sw": sw, "zw": np.zeros(co, np.int8),
             "sx": np.float32(0.02), "zx": np.uint8(128),
             "sy": np.float32(0.05), "zy": np.uint8(120),
             "B": rng.standard_normal(co).astype(np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], axis=1),
             helper.make_node("ConvTranspose", ["xd", "Wd", "B"], ["y"], kernel_shape=[k, k],
                              strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["z"])]
    m = make_model(nodes, [("x", [1, ci, 5, 6])], [("z", [1, co, 10, 12])])
    m.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), n)
                               for n, v in inits.items())
    return m, float(inits["sy"])


def test_qdq_convt_stays_float_exact(tmp_path):
    """int8 (QDQ) ConvTranspose: no integer kernel for it -- it runs as the float phase
    convolution between the exact Q/DQ ops; within one output step of onnxruntime's exact
    QDQ run."""
    m, step = qdq_convt_model()
    kernels = compile_to(m, tmp_path / "q")["kernels"]
    assert kernels["unscheduled"] == {}, kernels
    assert any(k in kernels["counts"] for k in CONV_KINDS), kernels
    x = np.random.default_rng(4).standard_normal((1, 6, 5, 6)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    got = Session(tmp_path / "q").run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= step * 1.001


def test_aarch64_builds(tmp_path):
    m = convt_model(1, 8, 8, 6, 6, (4, 4), (2, 2), (1, 1, 1, 1), relu=True)
    check(m, tmp_path / "arm", target="rpi4", run=False)


def test_runs_on_emulated_board(tmp_path, rpc_board):
    """The aarch64 (NEON) build of a 3x3 s2 p1 op1 layer on the emulated rpi4 board."""
    from edgec.runtime.remote import RemoteSession

    m = convt_model(1, 5, 6, 4, 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    check(m, tmp_path / "arm", target="rpi4", run=False)
    x = np.random.default_rng(1).standard_normal((1, 5, 4, 5)).astype(np.float32)
    got = RemoteSession(tmp_path / "arm", rpc_board.address, "rpi4").run(None, {"x": x})[0]
    ref = OrtSession(m).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(ISAS))
@given(data=st.data())
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_convt_sweep(tmp_path_factory, isa, data):
    """Wider: larger maps (the pixel / Winograd kernels), groups, dilation, batch 3."""
    d = data.draw
    s = (d(st.integers(1, 4)), d(st.integers(1, 4)))
    k = (d(st.integers(1, 5)), d(st.integers(1, 5)))
    dil = (d(st.integers(1, 2)), d(st.integers(1, 2)))
    ke = [(k[i] - 1) * dil[i] + 1 for i in range(2)]
    pads = [d(st.integers(0, ke[i % 2] - 1)) for i in range(4)]
    op = [d(st.integers(0, s[i] - 1)) for i in range(2)]  # (TVM: below the stride)
    h, w = d(st.integers(1, 20)), d(st.integers(1, 33))
    for i, n in enumerate((h, w)):
        while (n - 1) * s[i] + ke[i] + op[i] - pads[i] - pads[i + 2] < 1:
            pads[i] = max(pads[i] - 1, 0)
            pads[i + 2] = max(pads[i + 2] - 1, 0)
    group = d(st.sampled_from([1, 1, 2, 3]))
    ci = group * d(st.sampled_from([1, 3, 5, 16]))
    co = group * d(st.sampled_from([1, 3, 7, 16]))
    m = convt_model(d(st.integers(1, 3)), ci, co, h, w, k, s, pads, op, group=group,
                    dil=dil, bias=d(st.booleans()), relu=d(st.booleans()),
                    seed=d(st.integers(0, 9)))
    check(m, tmp_path_factory.mktemp("cts") / "a", mcpu=ISAS[isa])
